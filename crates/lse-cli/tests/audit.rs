//! `lse audit` end to end: every flag, the text and JSON reports, exit statuses 0, 1 and 2, and
//! the naive-softmax overflow and underflow counts. Fixtures are written into a temporary
//! directory by the tests themselves (`.npy` with the crate's own writer, `.safetensors` by hand
//! and with the reference implementation's writer).

use lse_testkit::rng::Rng;
use std::path::{Path, PathBuf};

use lse::{bf16, f16, CrossEntropyOptions, Element, NonFinite, Reduction, Targets};
use lse_io::npy::Bf16Descr;
use lse_io::NpyElement;
use predicates::prelude::*;
use serde_json::Value;

mod common;

use common::{dir as scratch, lse, s, safetensors_file, write_npy as npy_bf16};

/// A fresh, empty directory for one test.
fn dir(test: &str) -> PathBuf {
    scratch("audit", test)
}

fn npy<E: NpyElement>(path: &Path, shape: &[usize], data: &[E]) -> PathBuf {
    npy_bf16(path, shape, data, Bf16Descr::Named)
}

fn halfs(values: &[f64]) -> Vec<f16> {
    values
        .iter()
        .map(|&v| <f16 as Element>::from_f64(v))
        .collect()
}

/// A safetensors file: `(name, dtype, shape, little-endian bytes)`, in this order.
fn safetensors(tensors: &[(&str, &str, &[usize], Vec<u8>)]) -> Vec<u8> {
    let mut offset = 0;
    let mut entries = Vec::new();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        entries.push(format!(
            r#""{name}":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{offset},{}]}}"#,
            offset + bytes.len()
        ));
        offset += bytes.len();
        data.extend_from_slice(bytes);
    }
    safetensors_file(&format!("{{{}}}", entries.join(",")), &data)
}

fn le<E: NpyElement>(values: &[E]) -> Vec<u8> {
    let mut out = Vec::new();
    for &v in values {
        v.put_le(&mut out);
    }
    out
}

/// Runs `lse audit ARGS --json`, checks the exit status and parses the JSON.
fn json(args: &[&str], status: i32) -> Value {
    let out = lse()
        .arg("audit")
        .args(args)
        .arg("--json")
        .assert()
        .code(status)
        .get_output()
        .clone();
    assert!(
        out.stderr.is_empty(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

/// Runs `lse audit ARGS`, checks the exit status and returns stdout.
fn text(args: &[&str], status: i32) -> String {
    let out = lse()
        .arg("audit")
        .args(args)
        .assert()
        .code(status)
        .get_output()
        .clone();
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `lse audit ARGS`, expects exit status 2 and one line on stderr; returns it.
fn error(args: &[&str]) -> String {
    common::run_err(&[&["audit"], args].concat())
}

fn naive<'a>(t: &'a Value, dtype: &str) -> &'a Value {
    t["naive_softmax"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["dtype"] == dtype)
        .unwrap()
}

#[test]
fn f16_row_at_12_overflows_naive_f16_only() {
    let d = dir("overflow");
    // Row 0 at 12 (exp(12) = 162755 > f16 MAX 65504), row 1 ordinary, row 2 far below zero
    // (every exp rounds to 0 in f16, not in f32), row 3 just above the f16 underflow threshold.
    let rows = [
        12.0, 0.0, -1.0, //
        2.0, 1.0, 0.1, //
        -20.0, -21.0, -30.0, //
        -17.0, -18.0, -40.0,
    ];
    let f = npy(&d.join("x.npy"), &[4, 3], &halfs(&rows));
    let v = json(&[s(&f)], 0);
    let t = &v["tensors"][0];
    assert_eq!(t["dtype"], "f16");
    assert_eq!(t["stored_as"], "<f2");
    assert_eq!(t["shape"], serde_json::json!([4, 3]));
    assert_eq!(
        (t["rows"].as_u64(), t["classes"].as_u64()),
        (Some(4), Some(3))
    );
    let f16n = naive(t, "f16");
    assert_eq!(f16n["overflow_rows"], 1);
    assert_eq!(
        f16n["underflow_rows"], 1,
        "row 2 underflows, row 3 does not"
    );
    for dtype in ["bf16", "f32"] {
        assert_eq!(naive(t, dtype)["overflow_rows"], 0, "{dtype}");
        assert_eq!(naive(t, dtype)["underflow_rows"], 0, "{dtype}");
    }
    assert!((f16n["overflow_above"].as_f64().unwrap() - 11.0898).abs() < 1e-3);
    assert!((f16n["underflow_below"].as_f64().unwrap() + 17.3287).abs() < 1e-3);
    assert!(t["headroom"]["f16"].as_f64().unwrap() < 0.0);
    assert!(t["headroom"]["f32"].as_f64().unwrap() > 0.0);
    assert_eq!(t["max"], 12.0);
    assert_eq!(t["min"], -40.0);
    assert_eq!(v["non_finite"], false);
    assert_eq!(v["exit_status"], 0);

    let out = text(&[s(&f)], 0);
    let f16_line = out
        .lines()
        .find(|l| l.trim_start().starts_with("f16 "))
        .unwrap();
    assert!(
        f16_line.ends_with("overflow 1 (row max > 11.09), underflow 1 (row max < -17.33)"),
        "{out}"
    );
    let f32_line = out
        .lines()
        .find(|l| l.trim_start().starts_with("f32 "))
        .unwrap();
    assert!(
        f32_line.ends_with("overflow 0 (row max > 88.72), underflow 0 (row max < -103.97)"),
        "{out}"
    );
    assert!(
        out.contains("(4, 3): 4 rows of 3 classes (class axis 1)"),
        "{out}"
    );
    assert!(out.contains("f16 (stored as \"<f2\")"), "{out}");
    assert!(out.contains("min -40, max 12"), "{out}");
    assert!(
        out.trim_end().ends_with("result: clean (exit status 0)"),
        "{out}"
    );
}

#[test]
fn f32_overflow_in_bf16_and_f32() {
    let d = dir("overflow32");
    let f = npy(&d.join("x.npy"), &[2, 2], &[100.0f32, 0.0, 50.0, 0.0]);
    let v = json(&[s(&f)], 0);
    let t = &v["tensors"][0];
    assert_eq!(naive(t, "f16")["overflow_rows"], 2);
    assert_eq!(naive(t, "bf16")["overflow_rows"], 1);
    assert_eq!(naive(t, "f32")["overflow_rows"], 1);
    // f32 underflow only below -103.97.
    let f = npy(&d.join("y.npy"), &[2, 1], &[-104.0f32, -103.0]);
    let t = &json(&[s(&f)], 0)["tensors"][0];
    assert_eq!(naive(t, "f32")["underflow_rows"], 1);
    assert_eq!(naive(t, "bf16")["underflow_rows"], 2);
}

#[test]
fn statistics_match_the_library() {
    let d = dir("stats");
    let rows: Vec<f32> = vec![
        1000.0,
        1.0,
        -1000.0,
        2.0, //
        3.0,
        2.0,
        1.0,
        f32::NEG_INFINITY, //
        -5.0,
        0.5,
        0.25,
        0.125,
    ];
    let f = npy(&d.join("x.npy"), &[3, 4], &rows);
    let v = json(&[s(&f)], 0);
    let t = &v["tensors"][0];
    let stats = lse::guard::LogitStats::of(&rows, 4).unwrap();
    let mut row_lse = [0.0f32; 3];
    lse::logsumexp(&rows, 4, &mut row_lse).unwrap();
    assert_eq!(t["nan"], 0);
    assert_eq!(t["pos_inf"], 0);
    assert_eq!(t["neg_inf"], 1);
    assert_eq!(t["max_abs"], 1000.0);
    assert_eq!(t["lse"]["rows"], 3);
    assert_eq!(t["lse"]["max"].as_f64(), Some(f64::from(row_lse[0])));
    assert_eq!(t["lse"]["max_row"], 0);
    let min = row_lse.iter().copied().fold(f32::INFINITY, f32::min);
    assert_eq!(t["lse"]["min"].as_f64(), Some(f64::from(min)));
    assert_eq!(t["lse"]["mean"].as_f64(), Some(stats.lse_mean));
    assert_eq!(t["lse"]["z_mean"].as_f64(), Some(stats.z_mean));
    assert_eq!(
        t["lse"]["z_max"].as_f64(),
        Some(f64::from(row_lse[0]) * f64::from(row_lse[0]))
    );
    assert_eq!(t["headroom"]["f32"].as_f64(), Some(stats.headroom.f32));
    assert!(t["cross_entropy"].is_null());
    // -inf is a mask: clean; unless --deny-neg-inf.
    let out = text(&[s(&f)], 0);
    assert!(out.contains("NaN 0, +inf 0, -inf 1"), "{out}");
    assert!(
        out.contains("clean (no NaN or +inf; -inf entries are masks)"),
        "{out}"
    );
    let v = json(&[s(&f), "--deny-neg-inf"], 1);
    assert_eq!(v["non_finite"], true);
    assert_eq!(v["exit_status"], 1);
    let out = text(&[s(&f), "--deny-neg-inf"], 1);
    assert!(
        out.contains("result: NON-FINITE: 1 -inf (exit status 1)"),
        "{out}"
    );
}

#[test]
fn non_finite_values_exit_1() {
    let d = dir("nonfinite");
    let rows = [
        1.0f64,
        f64::NAN,
        2.0,
        f64::INFINITY,
        0.0,
        0.0,
        f64::NEG_INFINITY,
        f64::NEG_INFINITY,
    ];
    let f = npy(&d.join("x.npy"), &[4, 2], &rows);
    let v = json(&[s(&f)], 1);
    let t = &v["tensors"][0];
    assert_eq!(t["dtype"], "f64");
    assert_eq!(
        (
            t["nan"].as_u64(),
            t["pos_inf"].as_u64(),
            t["neg_inf"].as_u64()
        ),
        (Some(1), Some(1), Some(2))
    );
    assert_eq!(t["rows_with_nan_or_inf"], 2);
    assert_eq!(t["rows_fully_masked"], 1);
    assert_eq!(t["lse"]["rows"], 1);
    assert_eq!(v["non_finite"], true);
    let out = text(&[s(&f)], 1);
    assert!(
        out.contains("result: NON-FINITE: 1 NaN, 1 +inf (exit status 1)"),
        "{out}"
    );
    assert!(out.contains("2 with NaN or +inf, 1 fully masked"), "{out}");
    // Nothing finite at all: the extremes are null in JSON, n/a in text.
    let f = npy(&d.join("nan.npy"), &[1, 2], &[f32::NAN, f32::NAN]);
    let v = json(&[s(&f)], 1);
    assert!(v["tensors"][0]["max"].is_null());
    assert!(text(&[s(&f)], 1).contains("min n/a, max n/a"));
}

#[test]
fn targets_give_cross_entropy_and_accuracy() {
    let d = dir("targets");
    let rows: Vec<f32> = vec![
        3.0,
        1.0,
        0.0, //
        0.0,
        5.0,
        1.0, //
        2.0,
        2.5,
        9.0, //
        f32::NAN,
        0.0,
        0.0, // ignored: its NaN does not matter to the loss
    ];
    let f = npy(&d.join("x.npy"), &[4, 3], &rows);
    let targets = [0i64, 2, 2, -100];
    let t = npy(&d.join("t.npy"), &[4], &targets);
    let v = json(&[s(&f), "--targets", s(&t)], 1);
    let ce = &v["tensors"][0]["cross_entropy"];
    assert_eq!(ce["rows_counted"], 3);
    assert_eq!(ce["rows_ignored"], 1);
    assert_eq!(ce["rows_non_finite_loss"], 0);
    assert_eq!(ce["correct"], 2);
    assert!((ce["accuracy"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(ce["ignore_index"], -100);
    assert_eq!(ce["targets"], s(&t));
    let opts = CrossEntropyOptions {
        reduction: Reduction::None,
        non_finite: NonFinite::Propagate,
        ..Default::default()
    };
    let lib = lse::cross_entropy(&rows, 3, Targets::Classes(&targets), &opts).unwrap();
    let losses: Vec<f64> = lib
        .row_loss
        .unwrap()
        .iter()
        .map(|&l| f64::from(l))
        .collect();
    let max = losses[..3].iter().copied().fold(f64::MIN, f64::max);
    assert_eq!(ce["loss_max"].as_f64(), Some(max));
    assert_eq!(ce["loss_max_row"], 1);
    let mean = (losses[0] + losses[1] + losses[2]) / 3.0;
    assert!((ce["loss_mean"].as_f64().unwrap() - mean).abs() <= 1e-12 * mean);
    let out = text(&[s(&f), "--targets", s(&t)], 1);
    assert!(
        out.contains("rows 3 counted, 1 ignored, 0 with a non-finite loss"),
        "{out}"
    );
    assert!(
        out.contains("accuracy 66.67% (2 of 3 rows: argmax = target)"),
        "{out}"
    );
    assert!(out.contains("(ignore index -100)"), "{out}");

    // Another ignore index: class 2 rows ignored; -100 is then out of range.
    let t2 = npy(&d.join("t2.npy"), &[4, 1], &[0i32, 2, 2, 1]);
    let v = json(&[s(&f), "--targets", s(&t2), "--ignore-index", "2"], 1);
    let ce = &v["tensors"][0]["cross_entropy"];
    assert_eq!(ce["rows_ignored"], 2);
    assert_eq!(ce["rows_counted"], 2);
    assert_eq!(ce["rows_non_finite_loss"], 1, "the NaN row counts now");
    assert_eq!(ce["ignore_index"], 2);
    let e = error(&[s(&f), "--targets", s(&t), "--ignore-index", "none"]);
    assert!(
        e.contains("target -100 at row 3 is out of range for 3 classes"),
        "{e}"
    );
    assert!(e.contains("no ignore index"), "{e}");
    let v = json(&[s(&f), "--targets", s(&t2), "--ignore-index=none"], 1);
    assert!(v["tensors"][0]["cross_entropy"]["ignore_index"].is_null());
}

#[test]
fn class_axis_can_be_any_axis() {
    let d = dir("axis");
    // Shape (2, 3, 4): classes on axis 1; the row (n, t) is x[n, :, t].
    let data: Vec<f32> = (0..24).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
    let f = npy(&d.join("x.npy"), &[2, 3, 4], &data);
    let mut moved = Vec::new();
    for n in 0..2 {
        for t in 0..4 {
            for c in 0..3 {
                moved.push(data[n * 12 + c * 4 + t]);
            }
        }
    }
    let mut row_lse = [0.0f32; 8];
    lse::logsumexp(&moved, 3, &mut row_lse).unwrap();
    let (max_row, max) =
        row_lse.iter().enumerate().fold(
            (0, f32::MIN),
            |(br, b), (r, &v)| if v > b { (r, v) } else { (br, b) },
        );
    for axis in ["1", "-2"] {
        let v = json(&[s(&f), "--axis", axis], 0);
        let t = &v["tensors"][0];
        assert_eq!(t["class_axis"], 1);
        assert_eq!(
            (t["rows"].as_u64(), t["classes"].as_u64()),
            (Some(8), Some(3))
        );
        assert_eq!(t["lse"]["max"].as_f64(), Some(f64::from(max)));
        assert_eq!(t["lse"]["max_row"].as_u64(), Some(max_row as u64));
    }
    // Targets follow the rows' order: shape (2, 4) for (n, t).
    let targets: Vec<i64> = (0..8).map(|i| i % 3).collect();
    let tf = npy(&d.join("t.npy"), &[2, 4], &targets);
    let v = json(&[s(&f), "--axis", "1", "--targets", s(&tf)], 0);
    let lib = lse::cross_entropy(
        &moved,
        3,
        Targets::Classes(&targets),
        &CrossEntropyOptions {
            reduction: Reduction::None,
            ..Default::default()
        },
    )
    .unwrap();
    let max_loss = lib
        .row_loss
        .unwrap()
        .iter()
        .copied()
        .fold(f32::MIN, f32::max);
    assert_eq!(
        v["tensors"][0]["cross_entropy"]["loss_max"].as_f64(),
        Some(f64::from(max_loss))
    );
    let v = json(&[s(&f), "--axis", "0"], 0);
    assert_eq!(v["tensors"][0]["classes"], 2);
    let e = error(&[s(&f), "--axis", "3"]);
    assert!(e.contains("--axis 3 is out of range"), "{e}");
    let e = error(&[s(&f), "--axis", "-4"]);
    assert!(e.contains("out of range"), "{e}");
    // One row per target: 24 / 3 = 8 rows, not 6.
    let bad = npy(&d.join("bad.npy"), &[6], &[0i64; 6]);
    let e = error(&[s(&f), "--axis", "1", "--targets", s(&bad)]);
    assert!(e.contains("6 targets (shape (6,)) for 8 rows"), "{e}");
}

#[test]
fn safetensors_audits_every_float_tensor() {
    let d = dir("safetensors");
    let logits = halfs(&[12.0, 0.0, 1.0, 2.0]);
    let hidden = [1.0f32, f32::NAN, 3.0];
    let ids = [1i64, 0];
    let file = safetensors(&[
        ("ids", "I64", &[2], le(&ids)),
        ("logits", "F16", &[2, 2], le(&logits)),
        ("hidden", "F32", &[1, 3], le(&hidden)),
    ]);
    let f = d.join("dump.safetensors");
    std::fs::write(&f, file).unwrap();
    let v = json(&[s(&f)], 1);
    assert_eq!(v["format"], "safetensors");
    let names: Vec<&str> = v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["logits", "hidden"]);
    assert_eq!(
        v["skipped"],
        serde_json::json!([{"name": "ids", "dtype": "I64"}])
    );
    assert_eq!(v["tensors"][0]["stored_as"], "F16");
    assert_eq!(naive(&v["tensors"][0], "f16")["overflow_rows"], 1);
    assert_eq!(v["tensors"][1]["nan"], 1);
    let out = text(&[s(&f)], 1);
    assert!(out.contains("dump.safetensors, tensor \"logits\""), "{out}");
    assert!(out.contains("skipped (not float): \"ids\" (I64)"), "{out}");

    // --tensor picks one; targets then fit.
    let t = npy(&d.join("t.npy"), &[2], &[0i64, 1]);
    let v = json(&[s(&f), "--tensor", "logits", "--targets", s(&t)], 0);
    assert_eq!(v["tensors"].as_array().unwrap().len(), 1);
    assert_eq!(v["tensors"][0]["cross_entropy"]["correct"], 2);
    assert_eq!(v["skipped"], serde_json::json!([]));
    let e = error(&[s(&f), "--targets", s(&t)]);
    assert!(
        e.contains("choose one with --tensor: \"logits\", \"hidden\""),
        "{e}"
    );
    let e = error(&[s(&f), "--tensor", "nope"]);
    assert!(
        e.contains("no tensor named \"nope\"; the file holds \"ids\", \"logits\", \"hidden\""),
        "{e}"
    );
    let e = error(&[s(&f), "--tensor", "ids"]);
    assert!(e.contains("logits must be floats"), "{e}");
    // --tensor on a .npy file is a usage error.
    let e = error(&[s(&t), "--tensor", "x"]);
    assert!(e.contains("--tensor is for .safetensors files"), "{e}");
}

#[test]
fn reads_files_written_by_the_reference_safetensors_writer() {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let d = dir("reference");
    let a = le(&[1.0f64, 2.0, 3.0, 4.0]);
    let b: Vec<u8> = le(&[bf16::from_f32(100.0), bf16::from_f32(-1.0)]);
    let views = vec![
        ("a", TensorView::new(Dtype::F64, vec![2, 2], &a).unwrap()),
        ("b", TensorView::new(Dtype::BF16, vec![1, 2], &b).unwrap()),
    ];
    let bytes = safetensors::serialize(views, None).unwrap();
    let f = d.join("ref.safetensors");
    std::fs::write(&f, bytes).unwrap();
    let v = json(&[s(&f)], 0);
    let tensors = v["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 2);
    let b = tensors.iter().find(|t| t["name"] == "b").unwrap();
    assert_eq!(b["dtype"], "bf16");
    assert_eq!(b["max"], 100.0);
    assert_eq!(naive(b, "bf16")["overflow_rows"], 1);
    let a = tensors.iter().find(|t| t["name"] == "a").unwrap();
    assert_eq!(a["dtype"], "f64");
    assert_eq!(a["min"], 1.0);
}

#[test]
fn bf16_npy_needs_an_unambiguous_descr() {
    let d = dir("bf16");
    let data: Vec<bf16> = [100.0f32, 0.0, 1.0, 2.0]
        .iter()
        .map(|&x| bf16::from_f32(x))
        .collect();
    let named = npy_bf16(&d.join("named.npy"), &[2, 2], &data, Bf16Descr::Named);
    let v = json(&[s(&named)], 0);
    assert_eq!(v["tensors"][0]["dtype"], "bf16");
    assert_eq!(v["tensors"][0]["stored_as"], "bfloat16");
    assert_eq!(naive(&v["tensors"][0], "bf16")["overflow_rows"], 1);
    let void = npy_bf16(&d.join("void.npy"), &[2, 2], &data, Bf16Descr::Void);
    let e = error(&[s(&void)]);
    assert!(e.contains("\"<V2\" is 2-byte opaque data"), "{e}");
    assert!(e.contains("--void-as-bf16"), "{e}");
    let v = json(&[s(&void), "--void-as-bf16"], 0);
    assert_eq!(v["tensors"][0]["dtype"], "bf16");
    assert_eq!(v["tensors"][0]["stored_as"], "<V2");
}

#[test]
fn fortran_order_and_0d_arrays() {
    let d = dir("layouts");
    // [[1, 2, 3], [4, 5, 200]] in Fortran order, written by hand as NumPy would.
    let header = "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }";
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    let padded = format!("{header:<117}\n");
    bytes.extend_from_slice(&(padded.len() as u16).to_le_bytes());
    bytes.extend_from_slice(padded.as_bytes());
    for x in [1.0f32, 4.0, 2.0, 5.0, 3.0, 200.0] {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    let f = d.join("f.npy");
    std::fs::write(&f, bytes).unwrap();
    let t = npy(&d.join("t.npy"), &[2], &[2i64, 2]);
    let v = json(&[s(&f), "--targets", s(&t)], 0);
    // Row 1 = [4, 5, 200] overflows f32; argmax of both rows is 2.
    assert_eq!(naive(&v["tensors"][0], "f32")["overflow_rows"], 1);
    assert_eq!(v["tensors"][0]["cross_entropy"]["correct"], 2);

    let scalar = npy(&d.join("s.npy"), &[], &[3.5f64]);
    let v = json(&[s(&scalar)], 0);
    let t = &v["tensors"][0];
    assert_eq!(t["shape"], serde_json::json!([]));
    assert_eq!(
        (t["rows"].as_u64(), t["classes"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(t["lse"]["max"], 3.5);
    // Zero rows are fine; zero classes are not.
    let empty = npy::<f32>(&d.join("e.npy"), &[0, 4], &[]);
    let v = json(&[s(&empty)], 0);
    assert_eq!(v["tensors"][0]["rows"], 0);
    let none = npy::<f32>(&d.join("n.npy"), &[4, 0], &[]);
    assert!(error(&[s(&none)]).contains("no classes"));
}

#[test]
fn help_documents_every_flag() {
    let help = common::help("audit");
    for flag in [
        "--tensor",
        "--axis",
        "--targets",
        "--ignore-index",
        "--void-as-bf16",
        "--deny-neg-inf",
        "--json",
        "Exit status",
        "every float tensor",
        "'bfloat16'",
    ] {
        assert!(help.contains(flag), "{flag} not in help");
    }
    lse()
        .args(["audit"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("required"));
    let e = error(&["/nonexistent/x.npy"]);
    assert!(e.contains("cannot read"), "{e}");
    let d = dir("help");
    let f = d.join("x.txt");
    std::fs::write(&f, "hello").unwrap();
    assert!(error(&[s(&f)]).contains("unknown format"));
}

/// Logits with every case the audit counts: NaN, ±inf, a fully masked row, rows past f16's and
/// f32's overflow points and below their underflow points, ordinary rows.
fn awkward_logits(rows: usize, classes: usize) -> Vec<f32> {
    let mut rng = Rng::new(0x9E37_79B9_7F4A_7C15);
    let mut v: Vec<f32> = (0..rows * classes)
        .map(|_| rng.range(-12.0, 12.0) as f32)
        .collect();
    v[3] = f32::NAN;
    v[classes + 1] = f32::INFINITY;
    v[2 * classes + 2] = f32::NEG_INFINITY;
    v[3 * classes..4 * classes].fill(f32::NEG_INFINITY);
    v[4 * classes] = 95.0;
    v[5 * classes..6 * classes].fill(-120.0);
    v
}

/// Reading a file a chunk at a time changes nothing: the report (JSON numbers written in full)
/// is the same byte for byte whether the whole tensor is one chunk — the computation over all
/// rows at once — or each chunk is a single row or block of rows. Last class axis and a middle
/// one, f32 .npy and bf16/f16 .safetensors, with targets.
#[test]
fn reading_in_chunks_gives_the_same_report_bit_for_bit() {
    let d = dir("chunks");
    let (rows, classes) = (41, 23);
    let values = awkward_logits(rows, classes);
    let flat = npy(&d.join("flat.npy"), &[rows, classes], &values);
    let targets: Vec<i64> = (0..rows as i64).map(|r| (r * 5) % 23).collect();
    let labels = npy(&d.join("labels.npy"), &[rows], &targets);
    // (N, C, T) = (41, 23, 3) with the classes on axis 1.
    let wide = awkward_logits(rows * 3, classes);
    let middle = npy(&d.join("middle.npy"), &[rows, classes, 3], &wide);
    let halves: Vec<f16> = values.iter().map(|&x| f16::from_f32(x)).collect();
    let brains: Vec<bf16> = values.iter().map(|&x| bf16::from_f32(x)).collect();
    let st = d.join("dump.safetensors");
    std::fs::write(
        &st,
        safetensors(&[
            ("a", "BF16", &[rows, classes], le(&brains)),
            ("b", "F16", &[rows, classes], le(&halves)),
        ]),
    )
    .unwrap();

    let row = (classes * 4).to_string();
    let seven_rows = (classes * 4 * 7).to_string();
    let cases: [Vec<&str>; 4] = [
        vec![s(&flat), "--targets", s(&labels)],
        vec![s(&middle), "--axis", "1"],
        vec![s(&st), "--tensor", "a", "--targets", s(&labels)],
        vec![s(&st)],
    ];
    for case in &cases {
        let whole = text(&[case.as_slice(), &["--json"]].concat(), 1);
        for chunk in ["1", row.as_str(), seven_rows.as_str()] {
            let chunked = text(
                &[case.as_slice(), &["--json", "--chunk-bytes", chunk]].concat(),
                1,
            );
            assert_eq!(chunked, whole, "{case:?} in chunks of {chunk} bytes");
        }
    }
    // The fixtures do exercise what the chunks must carry across: rows of every kind.
    let report = json(&[s(&flat), "--targets", s(&labels)], 1);
    let t = &report["tensors"][0];
    assert_eq!(t["rows_fully_masked"], 1);
    assert_eq!(t["rows_with_nan_or_inf"], 2);
    assert_eq!(naive(t, "f32")["overflow_rows"], 1);
    assert_eq!(naive(t, "f32")["underflow_rows"], 1);
}

/// Several files, or a directory of them: one line per file and the totals; the exit status is
/// the worst: 2 when a file cannot be audited, else 1 when one holds NaN or +inf, else 0.
#[test]
fn several_files_and_directories_give_a_line_each_and_totals() {
    let d = dir("many");
    let steps = d.join("steps");
    std::fs::create_dir_all(&steps).unwrap();
    let clean: Vec<f32> = vec![1.0, 2.0, 3.0, -1.0, 0.5, 0.25];
    let mut dirty = clean.clone();
    dirty[4] = f32::NAN;
    npy(&steps.join("step-001.npy"), &[2, 3], &clean);
    npy(&steps.join("step-002.npy"), &[3, 2], &dirty);
    std::fs::write(steps.join("notes.txt"), "not a tensor").unwrap();

    let out = text(&[s(&steps)], 1);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(
        lines[0].ends_with("step-001.npy: clean: 1 tensor, 2 rows (f32), NaN 0, +inf 0, -inf 0"),
        "{out}"
    );
    assert!(
        lines[1].contains("step-002.npy: NON-FINITE: 1 tensor, 3 rows (f32), NaN 1"),
        "{out}"
    );
    assert!(
        lines[3].starts_with("total: 2 files, 1 non-finite, 0 failed; 2 tensors, 5 rows, NaN 1"),
        "{out}"
    );

    let report = json(&[s(&steps)], 1);
    assert_eq!(report["totals"]["files"], 2);
    assert_eq!(report["totals"]["rows"], 5);
    assert_eq!(report["files"][1]["tensors"][0]["nan"], 1);
    assert_eq!(report["exit_status"], 1);

    // A clean file alone in a list: status 0; a truncated file among them: status 2, and the
    // others are still audited.
    let first = steps.join("step-001.npy");
    let _ = text(&[s(&first), s(&first)], 0);
    let bytes = std::fs::read(&first).unwrap();
    let cut = d.join("cut.npy");
    std::fs::write(&cut, &bytes[..bytes.len() - 5]).unwrap();
    let out = text(&[s(&first), s(&cut)], 2);
    assert!(
        out.contains("cut.npy: error: ") && out.contains("the file holds"),
        "{out}"
    );
    assert!(out.contains("1 failed"), "{out}");
    let report = json(&[s(&first), s(&cut)], 2);
    assert!(report["files"][1]["error"]
        .as_str()
        .unwrap()
        .contains("cut.npy"));

    // A directory with no tensor file is an error of its own.
    let empty = d.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = error(&[s(&empty)]);
    assert!(err.contains("holds no .npy or .safetensors file"), "{err}");
}
