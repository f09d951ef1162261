//! `lse eval` end to end: every op in every dtype gives, bit for bit, what the library gives; the
//! files written are `.npy` files NumPy loads (checked byte by byte: magic, version, header length
//! and its alignment, the header dict); every cross-entropy option; the class axis; bf16 written
//! the way it was read; and the errors.

use std::path::{Path, PathBuf};

use lse::{bf16, f16, CrossEntropyOptions, Element, GradOutput, NonFinite, Reduction, Targets};
use lse_io::npy::{parse, Bf16Descr, ReadOptions};
use lse_io::{FloatElement, NpyElement};

mod common;

use common::{s, safetensors_file, write_npy as write};

/// A fresh, empty directory for one test.
fn dir(test: &str) -> PathBuf {
    common::dir("eval", test)
}

/// Runs `lse eval ARGS`, expecting success; returns stdout.
fn eval_ok(args: &[&str]) -> String {
    common::run_ok(&[&["eval"], args].concat())
}

/// Runs `lse eval ARGS`, expecting exit status 2 with one line on stderr; returns it.
fn eval_err(args: &[&str]) -> String {
    common::run_err(&[&["eval"], args].concat())
}

/// Checks the bytes of a `.npy` file as NumPy's format specification lays them out, and returns
/// the header dict (without padding) and the data.
fn check_npy_layout(bytes: &[u8], descr: &str, shape: &str) -> Vec<u8> {
    assert_eq!(&bytes[..6], b"\x93NUMPY", "magic");
    assert_eq!(&bytes[6..8], &[1, 0], "version 1.0");
    let header_len = usize::from(u16::from_le_bytes([bytes[8], bytes[9]]));
    let data_start = 10 + header_len;
    assert_eq!(data_start % 64, 0, "data aligned to 64 bytes");
    let header = std::str::from_utf8(&bytes[10..data_start]).unwrap();
    assert!(header.ends_with('\n'), "{header:?}");
    let dict = header.trim_end_matches('\n').trim_end_matches(' ');
    assert_eq!(
        dict,
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"),
    );
    assert!(header[dict.len()..header.len() - 1]
        .bytes()
        .all(|b| b == b' '));
    bytes[data_start..].to_vec()
}

/// The bits of every element, for bit-for-bit comparisons that also hold for NaN.
trait Bits {
    fn bits(&self) -> Vec<u64>;
}

impl<E: Element> Bits for [E] {
    fn bits(&self) -> Vec<u64> {
        self.iter()
            .map(|x| {
                let v = x.to_f64();
                // Element values are exact in f64; NaN payloads are not compared.
                if v.is_nan() {
                    u64::MAX
                } else {
                    v.to_bits()
                }
            })
            .collect()
    }
}

fn read_back<E: FloatElement>(
    path: &Path,
    descr: &str,
    shape: &[usize],
    shape_text: &str,
) -> Vec<E> {
    let bytes = std::fs::read(path).unwrap();
    let data = check_npy_layout(&bytes, descr, shape_text);
    assert_eq!(data.len(), shape.iter().product::<usize>() * E::SIZE);
    let a = parse(&bytes, ReadOptions { void_as_bf16: true }).unwrap();
    assert_eq!(a.tensor.shape, shape);
    let values = a.tensor.data.to_f64().unwrap();
    independent_reader_agrees(&bytes, descr, shape, &values);
    E::take(a.tensor.data).unwrap_or_else(|d| panic!("{path:?}: wrong dtype {:?}", d.dtype()))
}

/// A second, independent `.npy` reader (the npyz crate) reads the same shape, order and values.
fn independent_reader_agrees(bytes: &[u8], descr: &str, shape: &[usize], values: &[f64]) {
    if descr == "bfloat16" {
        return; // Not a NumPy type string: only NumPy with ml_dtypes knows it.
    }
    let file = npyz::NpyFile::new(bytes).unwrap();
    let want_shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    assert_eq!(file.shape(), want_shape.as_slice());
    assert_eq!(file.order(), npyz::Order::C);
    assert_eq!(file.dtype().descr(), format!("'{descr}'"));
    let theirs: Vec<f64> = match descr {
        "<f8" => file.into_vec::<f64>().unwrap(),
        "<f4" => file
            .into_vec::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect(),
        "<f2" => file
            .into_vec::<npyz::half::f16>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect(),
        // '<V2': opaque 2-byte records; their bits are the bf16 bits.
        _ => {
            let raw: &[u8] = file.into_inner();
            raw.chunks_exact(2)
                .map(|c| f64::from(bf16::from_le_bytes([c[0], c[1]])))
                .collect()
        }
    };
    let bits = |v: &[f64]| -> Vec<u64> {
        v.iter()
            .map(|x| if x.is_nan() { u64::MAX } else { x.to_bits() })
            .collect()
    };
    assert_eq!(bits(&theirs), bits(values), "npyz reads other values");
}

/// Logits with ordinary rows, a row that overflows a naive softmax in every dtype, masked
/// entries, ties and a row that only the ignore index lets through.
fn logits<E: Element>() -> Vec<E> {
    let big = E::MAX.to_f64() * 0.5;
    let rows = [
        2.0,
        1.0,
        0.1,
        -1.0,
        0.5, //
        big,
        1.0,
        -big,
        3.0,
        big, //
        f64::NEG_INFINITY,
        0.25,
        0.25,
        f64::NEG_INFINITY,
        -3.0, //
        -7.5,
        6.0,
        0.0,
        1e-3,
        4.0, //
    ];
    rows.iter().map(|&v| E::from_f64(v)).collect()
}

const TARGETS: [i64; 4] = [0, 4, 2, -100];

fn run_all_ops<E: FloatElement>(test: &str, descr: &str, style: Bf16Descr)
where
    E::Stat: FloatElement,
{
    let d = dir(test);
    let x = logits::<E>();
    let input = write(&d.join("x.npy"), &[4, 5], &x, style);
    let targets = write(&d.join("t.npy"), &[4], &TARGETS, style);
    let stat_descr = if E::DTYPE == lse::DType::F64 {
        "<f8"
    } else {
        "<f4"
    };
    let mut extra: Vec<&str> = Vec::new();
    if descr == "<V2" {
        extra.push("--void-as-bf16");
    }

    // logsumexp
    let out = d.join("lse.npy");
    eval_ok(
        &[
            &["--op", "logsumexp", s(&input), "--out", s(&out)][..],
            &extra,
        ]
        .concat(),
    );
    let got = read_back::<E::Stat>(&out, stat_descr, &[4], "(4,)");
    let mut want = vec![E::Stat::zero(); 4];
    lse::logsumexp(&x, 5, &mut want).unwrap();
    assert_eq!(got.bits(), want.bits(), "{test} logsumexp");

    // softmax and log_softmax
    for (op, f) in [
        (
            "softmax",
            lse::softmax::<E> as fn(&[E], usize, &mut [E]) -> lse::Result<()>,
        ),
        ("log_softmax", lse::log_softmax::<E>),
    ] {
        let out = d.join(format!("{op}.npy"));
        eval_ok(&[&["--op", op, s(&input), "--out", s(&out)][..], &extra].concat());
        let got = read_back::<E>(&out, descr, &[4, 5], "(4, 5)");
        let mut want = vec![E::zero(); 20];
        f(&x, 5, &mut want).unwrap();
        assert_eq!(got.bits(), want.bits(), "{test} {op}");
    }

    // cross_entropy, each reduction, with the gradient
    for (reduction, lib_reduction) in [
        ("mean", Reduction::Mean),
        ("sum", Reduction::Sum),
        ("none", Reduction::None),
    ] {
        let out = d.join(format!("ce_{reduction}.npy"));
        let grad = d.join(format!("grad_{reduction}.npy"));
        let args = [
            "--op",
            "cross_entropy",
            s(&input),
            "--targets",
            s(&targets),
            "--reduction",
            reduction,
            "--out",
            s(&out),
            "--grad",
            s(&grad),
        ];
        let report = eval_ok(&[&args[..], &extra].concat());
        assert!(
            report.contains("3 counted of 4 rows, 1 ignored"),
            "{report}"
        );
        let opts = CrossEntropyOptions {
            reduction: lib_reduction,
            ..Default::default()
        };
        let mut want_grad = vec![E::zero(); 20];
        let want = lse::cross_entropy_with_grad(
            &x,
            5,
            Targets::Classes(&TARGETS),
            &opts,
            GradOutput::Scalar(E::Stat::from_f64(1.0)),
            &mut want_grad,
        )
        .unwrap();
        if lib_reduction == Reduction::None {
            let got = read_back::<E::Stat>(&out, stat_descr, &[4], "(4,)");
            assert_eq!(got.bits(), want.row_loss.unwrap().bits(), "{test} ce none");
        } else {
            let got = read_back::<E::Stat>(&out, stat_descr, &[], "()");
            assert_eq!(got.bits(), [want.loss].bits(), "{test} ce {reduction}");
        }
        let got = read_back::<E>(&grad, descr, &[4, 5], "(4, 5)");
        assert_eq!(got.bits(), want_grad.bits(), "{test} grad {reduction}");
        assert!(got[15..].iter().all(|g| g.to_f64() == 0.0), "ignored row");
    }

    // cross_entropy without --grad: cross_entropy itself, the same loss.
    let out = d.join("ce.npy");
    eval_ok(
        &[
            &[
                "--op",
                "cross_entropy",
                s(&input),
                "--targets",
                s(&targets),
                "--out",
                s(&out),
            ][..],
            &extra,
        ]
        .concat(),
    );
    let got = read_back::<E::Stat>(&out, stat_descr, &[], "()");
    let want = lse::cross_entropy(
        &x,
        5,
        Targets::Classes(&TARGETS),
        &CrossEntropyOptions::default(),
    )
    .unwrap();
    assert_eq!(got.bits(), [want.loss].bits(), "{test} ce without grad");
}

/// One test per dtype (and bf16 descr): `run_all_ops` with the test's directory name, the descr
/// the outputs are written with and the bf16 style of the inputs.
macro_rules! bit_exact {
    ($($test:ident: $e:ty, $dir:literal, $descr:literal, $style:ident;)*) => {$(
        #[test]
        fn $test() {
            run_all_ops::<$e>($dir, $descr, Bf16Descr::$style);
        }
    )*};
}

bit_exact! {
    f64_bit_exact: f64, "f64", "<f8", Named;
    f32_bit_exact: f32, "f32", "<f4", Named;
    f16_bit_exact: f16, "f16", "<f2", Named;
    bf16_bit_exact_with_the_named_descr: bf16, "bf16_named", "bfloat16", Named;
    bf16_bit_exact_with_the_void_descr: bf16, "bf16_void", "<V2", Void;
}

#[test]
fn every_cross_entropy_option() {
    let d = dir("options");
    let x = logits::<f32>();
    let input = write(&d.join("x.npy"), &[4, 5], &x, Bf16Descr::Void);
    let targets: [i64; 4] = [0, 4, 2, 7];
    let t = write(&d.join("t.npy"), &[4], &targets, Bf16Descr::Void);
    let weights = [1.0f64, 0.5, 2.0, 1.0, 0.25];
    let w = write(&d.join("w.npy"), &[5], &weights, Bf16Descr::Void);
    let (out, grad) = (d.join("loss.npy"), d.join("grad.npy"));
    eval_ok(&[
        "--op",
        "cross_entropy",
        s(&input),
        "--targets",
        s(&t),
        "--ignore-index",
        "7",
        "--label-smoothing",
        "0.1",
        "--z-loss",
        "1e-4",
        "--softcap",
        "30",
        "--weights",
        s(&w),
        "--reduction",
        "none",
        "--out",
        s(&out),
        "--grad",
        s(&grad),
    ]);
    let opts = CrossEntropyOptions {
        ignore_index: Some(7),
        weights: Some(&weights),
        label_smoothing: 0.1,
        z_loss: 1e-4,
        softcap: Some(30.0),
        reduction: Reduction::None,
        ..Default::default()
    };
    let mut want_grad = vec![0.0f32; 20];
    let want = lse::cross_entropy_with_grad(
        &x,
        5,
        Targets::Classes(&targets),
        &opts,
        GradOutput::Scalar(1.0),
        &mut want_grad,
    )
    .unwrap();
    let got = read_back::<f32>(&out, "<f4", &[4], "(4,)");
    assert_eq!(got.bits(), want.row_loss.unwrap().bits());
    assert_eq!(got[3], 0.0, "ignored row");
    let got = read_back::<f32>(&grad, "<f4", &[4, 5], "(4, 5)");
    assert_eq!(got.bits(), want_grad.bits());

    // --ignore-index none: every target must be a class.
    let t2 = write(&d.join("t2.npy"), &[4], &[0i64, 4, 2, 1], Bf16Descr::Void);
    eval_ok(&[
        "--op",
        "cross_entropy",
        s(&input),
        "--targets",
        s(&t2),
        "--ignore-index",
        "none",
        "--out",
        s(&out),
    ]);
    let want = lse::cross_entropy(
        &x,
        5,
        Targets::Classes(&[0, 4, 2, 1]),
        &CrossEntropyOptions {
            ignore_index: None,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        read_back::<f32>(&out, "<f4", &[], "()").bits(),
        [want.loss].bits()
    );
    let e = eval_err(&[
        "--op",
        "cross_entropy",
        s(&input),
        "--targets",
        s(&t),
        "--ignore-index",
        "none",
        "--out",
        s(&out),
    ]);
    assert!(
        e.contains("target 7 at row 3 is out of range for 5 classes"),
        "{e}"
    );

    // Options and class weights the library rejects are errors, and nothing is written (any
    // finite weight is accepted, negative ones too, as PyTorch does).
    let fresh = d.join("fresh.npy");
    let bad_w = write(
        &d.join("bw.npy"),
        &[5],
        &[1.0f32, f32::INFINITY, 1.0, 1.0, 1.0],
        Bf16Descr::Void,
    );
    let short_w = write(&d.join("sw.npy"), &[4], &[1.0f32; 4], Bf16Descr::Void);
    let int_w = write(&d.join("iw.npy"), &[5], &[1i64; 5], Bf16Descr::Void);
    for (flag, value, want) in [
        ("--label-smoothing", "1.5", "label_smoothing"),
        ("--z-loss", "-1", "z_loss"),
        ("--softcap", "0", "softcap"),
        (
            "--weights",
            s(&bad_w),
            "class weight inf for class 1 is not finite",
        ),
        (
            "--weights",
            s(&short_w),
            "4 class weights (shape (4,)) for 5 classes",
        ),
        ("--weights", s(&int_w), "class weights must be floats"),
    ] {
        let e = eval_err(&[
            "--op",
            "cross_entropy",
            s(&input),
            "--targets",
            s(&t2),
            flag,
            value,
            "--out",
            s(&fresh),
        ]);
        assert!(e.contains(want), "{e}");
        assert!(!fresh.exists());
    }
}

/// Logits or gradients of shape (2, 3, 4) with the classes on axis 1, as rows of 3 classes in
/// the order (n, t).
fn classes_last(x: &[f32]) -> Vec<f32> {
    let mut rows = Vec::new();
    for n in 0..2 {
        for t in 0..4 {
            for c in 0..3 {
                rows.push(x[n * 12 + c * 4 + t]);
            }
        }
    }
    rows
}

/// The inverse of [`classes_last`]: rows of 3 classes in the order (n, t) laid out as shape
/// (2, 3, 4) with the classes on axis 1.
fn classes_on_axis_1(rows: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0f32; 24];
    for n in 0..2 {
        for t in 0..4 {
            for c in 0..3 {
                out[n * 12 + c * 4 + t] = rows[(n * 4 + t) * 3 + c];
            }
        }
    }
    out
}

#[test]
fn class_axis_is_moved_and_moved_back() {
    let d = dir("axis");
    // Shape (2, 3, 4) with the classes on axis 1.
    let x: Vec<f32> = (0..24)
        .map(|i| ((i * 5) % 13) as f32 * 0.75 - 4.0)
        .collect();
    let input = write(&d.join("x.npy"), &[2, 3, 4], &x, Bf16Descr::Void);
    let rows = classes_last(&x);
    let mut p = vec![0.0f32; 24];
    lse::softmax(&rows, 3, &mut p).unwrap();
    let want = classes_on_axis_1(&p);
    let out = d.join("p.npy");
    let report = eval_ok(&[
        "--op",
        "softmax",
        s(&input),
        "--axis",
        "1",
        "--out",
        s(&out),
    ]);
    assert!(report.contains("shape (2, 3, 4), class axis 1"), "{report}");
    assert_eq!(
        read_back::<f32>(&out, "<f4", &[2, 3, 4], "(2, 3, 4)").bits(),
        want.bits()
    );
    // Per-row outputs have the input's shape without the class axis.
    let lse_out = d.join("lse.npy");
    eval_ok(&[
        "--op",
        "logsumexp",
        s(&input),
        "--axis=-2",
        "--out",
        s(&lse_out),
    ]);
    let mut want = vec![0.0f32; 8];
    lse::logsumexp(&rows, 3, &mut want).unwrap();
    assert_eq!(
        read_back::<f32>(&lse_out, "<f4", &[2, 4], "(2, 4)").bits(),
        want.bits()
    );
    // Targets in the rows' order, gradient moved back.
    let targets: Vec<i64> = (0..8).map(|i| (i * 2) % 3).collect();
    let t = write(&d.join("t.npy"), &[2, 4], &targets, Bf16Descr::Void);
    let (loss, grad) = (d.join("loss.npy"), d.join("grad.npy"));
    eval_ok(&[
        "--op",
        "cross_entropy",
        s(&input),
        "--axis",
        "1",
        "--targets",
        s(&t),
        "--reduction",
        "none",
        "--out",
        s(&loss),
        "--grad",
        s(&grad),
    ]);
    let mut g = vec![0.0f32; 24];
    let r = lse::cross_entropy_with_grad(
        &rows,
        3,
        Targets::Classes(&targets),
        &CrossEntropyOptions {
            reduction: Reduction::None,
            ..Default::default()
        },
        GradOutput::Scalar(1.0),
        &mut g,
    )
    .unwrap();
    assert_eq!(
        read_back::<f32>(&loss, "<f4", &[2, 4], "(2, 4)").bits(),
        r.row_loss.unwrap().bits()
    );
    assert_eq!(
        read_back::<f32>(&grad, "<f4", &[2, 3, 4], "(2, 3, 4)").bits(),
        classes_on_axis_1(&g).bits()
    );
}

#[test]
fn safetensors_input_and_bf16_output_as_void() {
    let d = dir("safetensors");
    let x = logits::<bf16>();
    let mut bytes = Vec::new();
    for v in &x {
        v.put_le(&mut bytes);
    }
    let other = 1.5f32.to_le_bytes();
    let header = r#"{"logits":{"dtype":"BF16","shape":[4,5],"data_offsets":[0,40]},"scale":{"dtype":"F32","shape":[],"data_offsets":[40,44]}}"#;
    let file = safetensors_file(header, &[bytes, other.to_vec()].concat());
    let input = d.join("dump.safetensors");
    std::fs::write(&input, file).unwrap();
    let out = d.join("p.npy");
    let e = eval_err(&["--op", "softmax", s(&input), "--out", s(&out)]);
    assert!(e.contains("holds 2 float tensors; choose one with --tensor: \"logits\" (BF16 (4, 5)), \"scale\" (F32 ())"), "{e}");
    let report = eval_ok(&[
        "--op",
        "softmax",
        s(&input),
        "--tensor",
        "logits",
        "--out",
        s(&out),
    ]);
    assert!(
        report.contains("tensor \"logits\" (bf16, shape (4, 5), class axis 1)"),
        "{report}"
    );
    assert!(report.contains("softmax, '<V2' (4, 5)"), "{report}");
    let got = read_back::<bf16>(&out, "<V2", &[4, 5], "(4, 5)");
    let mut want = vec![bf16::ZERO; 20];
    lse::softmax(&x, 5, &mut want).unwrap();
    assert_eq!(got.bits(), want.bits());
    // A 0-d tensor is one row of one class.
    let out = d.join("s.npy");
    eval_ok(&[
        "--op",
        "log_softmax",
        s(&input),
        "--tensor",
        "scale",
        "--out",
        s(&out),
    ]);
    assert_eq!(read_back::<f32>(&out, "<f4", &[], "()"), [0.0]);
}

#[test]
fn non_finite_policy() {
    let d = dir("nonfinite");
    let x = [1.0f32, f32::NAN, 0.0, 2.0, 3.0, 4.0];
    let input = write(&d.join("x.npy"), &[2, 3], &x, Bf16Descr::Void);
    let out = d.join("p.npy");
    let e = eval_err(&["--op", "softmax", s(&input), "--out", s(&out)]);
    assert!(e.contains("non-finite logit NaN at row 0, column 1"), "{e}");
    assert!(!out.exists(), "nothing written on error");
    eval_ok(&[
        "--op",
        "softmax",
        s(&input),
        "--non-finite",
        "propagate",
        "--out",
        s(&out),
    ]);
    let got = read_back::<f32>(&out, "<f4", &[2, 3], "(2, 3)");
    let mut want = [0.0f32; 6];
    lse::softmax_with(&x, 3, &mut want, NonFinite::Propagate).unwrap();
    assert!(got[..3].iter().all(|v| v.is_nan()));
    assert_eq!(got.bits(), want.bits());
}

#[test]
fn argument_errors() {
    let d = dir("args");
    let input = write(&d.join("x.npy"), &[2, 3], &[1.0f32; 6], Bf16Descr::Void);
    let t = write(&d.join("t.npy"), &[2], &[0i64, 1], Bf16Descr::Void);
    let out = d.join("o.npy");
    for (flag, value) in [
        ("--targets", s(&t)),
        ("--ignore-index", "-1"),
        ("--label-smoothing", "0.1"),
        ("--z-loss", "0.1"),
        ("--softcap", "10"),
        ("--reduction", "sum"),
        ("--weights", s(&t)),
        ("--grad", "g.npy"),
    ] {
        let e = eval_err(&["--op", "softmax", s(&input), "--out", s(&out), flag, value]);
        assert!(
            e.contains(&format!("{flag} applies to --op cross_entropy only")),
            "{e}"
        );
    }
    let e = eval_err(&["--op", "cross_entropy", s(&input), "--out", s(&out)]);
    assert!(e.contains("needs --targets"), "{e}");
    let e = eval_err(&[
        "--op",
        "cross_entropy",
        s(&input),
        "--targets",
        s(&t),
        "--out",
        s(&out),
        "--grad",
        s(&out),
    ]);
    assert!(e.contains("same file"), "{e}");
    let e = eval_err(&["--op", "exp", s(&input), "--out", s(&out)]);
    assert!(e.contains("invalid value 'exp'"), "{e}");
    let e = eval_err(&["--op", "softmax", s(&input)]);
    assert!(e.contains("required"), "{e}");
    let e = eval_err(&[
        "--op",
        "softmax",
        s(&input),
        "--out",
        "/nonexistent/dir/o.npy",
    ]);
    assert!(e.contains("cannot write"), "{e}");
    // Aliases of the op names.
    eval_ok(&["--op", "log-softmax", s(&input), "--out", s(&out)]);
    eval_ok(&[
        "--op",
        "cross-entropy",
        s(&input),
        "--targets",
        s(&t),
        "--out",
        s(&out),
    ]);
    let help = common::help("eval");
    for flag in [
        "--op",
        "--out",
        "--tensor",
        "--axis",
        "--void-as-bf16",
        "--non-finite",
        "--targets",
        "--ignore-index",
        "--label-smoothing",
        "--z-loss",
        "--softcap",
        "--reduction",
        "--weights",
        "--grad",
        "0-d array",
        "'<V2'",
        "'bfloat16'",
    ] {
        assert!(help.contains(flag), "{flag} not in help");
    }
}

#[test]
fn integer_and_unsupported_inputs_are_errors() {
    let d = dir("types");
    let ints = write(&d.join("i.npy"), &[2, 2], &[1i32, 2, 3, 4], Bf16Descr::Void);
    let out = d.join("o.npy");
    let e = eval_err(&["--op", "softmax", s(&ints), "--out", s(&out)]);
    assert!(
        e.contains("logits must be floats (f64, f32, f16, bf16), but the elements are \"<i4\""),
        "{e}"
    );
    let floats = write(&d.join("f.npy"), &[2], &[0.0f32, 1.0], Bf16Descr::Void);
    let x = write(&d.join("x.npy"), &[2, 2], &[1.0f32; 4], Bf16Descr::Void);
    let e = eval_err(&[
        "--op",
        "cross_entropy",
        s(&x),
        "--targets",
        s(&floats),
        "--out",
        s(&out),
    ]);
    assert!(e.contains("targets must be integer class indices"), "{e}");
}

/// The per-row ops read the input and write the output a chunk of rows at a time: the output
/// files are the same byte for byte for any chunk size (one block of rows, a few, the whole
/// tensor), with the classes on the last axis or a middle one; an error names the row in the
/// whole tensor, and leaves no output behind.
#[test]
fn per_row_ops_in_chunks_write_the_same_bytes() {
    let d = dir("chunks");
    let (n, c, t) = (13, 11, 3);
    let values: Vec<f32> = (0..n * c * t)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.37)
        .collect();
    let last = write(&d.join("last.npy"), &[n * t, c], &values, Bf16Descr::Named);
    let middle = write(&d.join("middle.npy"), &[n, c, t], &values, Bf16Descr::Named);
    let halves: Vec<f16> = values.iter().map(|&x| f16::from_f32(x / 4.0)).collect();
    let half = write(&d.join("half.npy"), &[n * t, c], &halves, Bf16Descr::Named);
    for (input, axis) in [(&last, "-1"), (&middle, "1"), (&half, "-1")] {
        for op in ["logsumexp", "softmax", "log_softmax"] {
            let whole = d.join("whole.npy");
            eval_ok(&["--op", op, s(input), "--axis", axis, "--out", s(&whole)]);
            let expected = std::fs::read(&whole).unwrap();
            for chunk in ["1", "100", "400"] {
                let part = d.join("part.npy");
                let args = [op, s(input), "--axis", axis, "--out", s(&part)];
                eval_ok(&[&["--op"], &args[..], &["--chunk-bytes", chunk]].concat());
                assert!(
                    std::fs::read(&part).unwrap() == expected,
                    "{op} of {input:?} axis {axis} in chunks of {chunk} bytes"
                );
            }
        }
    }
    let mut bad = values.clone();
    bad[7 * c + 4] = f32::NAN;
    let bad = write(&d.join("bad.npy"), &[n * t, c], &bad, Bf16Descr::Named);
    let out = d.join("never.npy");
    let e = eval_err(&[
        "--op",
        "softmax",
        s(&bad),
        "--out",
        s(&out),
        "--chunk-bytes",
        "44",
    ]);
    assert!(e.contains("non-finite logit NaN at row 7, column 4"), "{e}");
    assert!(!out.exists());
    let leftovers = std::fs::read_dir(&d)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("partial")
        })
        .count();
    assert_eq!(leftovers, 0);
}

/// `--op cross_entropy` streams too: the loss and the gradient files are the same byte for
/// byte for any chunk size, for each reduction (the mean's count comes from the targets, the
/// gradient's scale with it), with ignored rows and the options that read the whole row.
#[test]
fn cross_entropy_in_chunks_writes_the_same_bytes() {
    let d = dir("ce_chunks");
    let (n, c) = (13, 11);
    let values: Vec<f32> = (0..n * c)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.37)
        .collect();
    let input = write(&d.join("x.npy"), &[n, c], &values, Bf16Descr::Named);
    let targets: Vec<i64> = (0..n as i64)
        .map(|r| if r % 5 == 2 { -1 } else { r * 7 % 11 })
        .collect();
    let t = write(&d.join("t.npy"), &[n], &targets, Bf16Descr::Named);
    let weights: Vec<f64> = (0..c).map(|k| 0.25 + k as f64 / 8.0).collect();
    let w = write(&d.join("w.npy"), &[c], &weights, Bf16Descr::Named);
    let options: [&[&str]; 2] = [
        &[],
        &[
            "--label-smoothing",
            "0.1",
            "--z-loss",
            "1e-4",
            "--softcap",
            "30",
            "--weights",
            s(&w),
        ],
    ];
    for reduction in ["mean", "sum", "none"] {
        for extra in options {
            let run = |tag: &str, chunk: &[&str]| {
                let (out, grad) = (
                    d.join(format!("{tag}_loss.npy")),
                    d.join(format!("{tag}_grad.npy")),
                );
                let args = [
                    "--op",
                    "cross_entropy",
                    s(&input),
                    "--targets",
                    s(&t),
                    "--ignore-index",
                    "-1",
                    "--reduction",
                    reduction,
                    "--out",
                    s(&out),
                    "--grad",
                    s(&grad),
                ];
                eval_ok(&[&args[..], extra, chunk].concat());
                (std::fs::read(&out).unwrap(), std::fs::read(&grad).unwrap())
            };
            let whole = run("whole", &[]);
            for chunk in ["1", "100", "400"] {
                assert!(
                    run("part", &["--chunk-bytes", chunk]) == whole,
                    "{reduction} {extra:?} in chunks of {chunk} bytes"
                );
            }
        }
    }
}
