//! `lse bench` end to end: the JSON document a script consumes, the table, the kernel choice and
//! the usage errors. Shapes are tiny and the copy buffer small (`--copy-mib 8`): these tests
//! check what is reported, not how fast anything is.

use serde_json::Value;

mod common;

use common::{help, run_err, run_ok};

const OPS: [&str; 8] = [
    "logsumexp",
    "softmax",
    "log_softmax",
    "softmax_backward",
    "log_softmax_backward",
    "cross_entropy",
    "cross_entropy_grad",
    "cross_entropy_in_place",
];

/// Bytes moved per element of `b` bytes, as `lse bench --help` documents it.
fn bytes_per_element(op: &str, b: f64) -> f64 {
    match op {
        "logsumexp" | "cross_entropy" => b,
        "softmax_backward" | "log_softmax_backward" => 3.0 * b,
        _ => 2.0 * b,
    }
}

fn elem_size(dtype: &str) -> f64 {
    match dtype {
        "f64" => 8.0,
        "f32" => 4.0,
        "f16" | "bf16" => 2.0,
        other => panic!("unknown dtype {other}"),
    }
}

fn bench_json(extra: &[&str]) -> Value {
    let mut args = vec!["bench", "--copy-mib", "8", "--json"];
    args.extend_from_slice(extra);
    let out = run_ok(&args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: not JSON:\n{out}"))
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

fn positive_finite(v: &Value, key: &str) -> f64 {
    let x = num(v, key);
    assert!(x.is_finite() && x > 0.0, "{key} = {x} in {v}");
    x
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}

fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect();
    k.sort_unstable();
    k
}

#[test]
fn json_reports_every_op_and_dtype_consistently() {
    let doc = bench_json(&[
        "--shape",
        "16x1000",
        "--dtype",
        "f32,bf16",
        "--op",
        "all",
        "--repeats",
        "2",
    ]);
    assert_eq!(
        keys(&doc),
        [
            "ce_options",
            "copy_gbs",
            "kernel",
            "machine",
            "results",
            "threads"
        ]
    );
    assert_eq!(doc["ce_options"], "default");
    assert_eq!(keys(&doc["machine"]), ["cores", "cpu"]);
    let cpu = doc["machine"]["cpu"].as_str().expect("cpu is a string");
    assert!(!cpu.is_empty());
    let cores = doc["machine"]["cores"].as_u64().expect("cores");
    assert!(cores >= 1);
    // The default thread count is the number of available cores.
    let threads = doc["threads"].as_u64().expect("threads");
    assert_eq!(threads, cores);
    let kernel = doc["kernel"].as_str().expect("kernel");
    assert!(
        ["avx512", "avx2", "neon", "portable", "scalar"].contains(&kernel),
        "kernel {kernel}"
    );
    let copy_gbs = positive_finite(&doc, "copy_gbs");

    let results = doc["results"].as_array().expect("results");
    assert_eq!(results.len(), OPS.len() * 2, "{doc:#}");
    for dtype in ["f32", "bf16"] {
        for op in OPS {
            let matching: Vec<&Value> = results
                .iter()
                .filter(|r| r["op"] == op && r["dtype"] == dtype)
                .collect();
            assert_eq!(matching.len(), 1, "{op} {dtype} in {doc:#}");
        }
    }
    for r in results {
        assert_eq!(
            keys(r),
            [
                "bandwidth_fraction",
                "best_s",
                "classes",
                "dtype",
                "gbs",
                "gelem_s",
                "median_s",
                "op",
                "rows",
                "threads"
            ]
        );
        assert_eq!(r["rows"], 16);
        assert_eq!(r["classes"], 1000);
        assert_eq!(r["threads"], threads);
        let best = positive_finite(r, "best_s");
        let median = positive_finite(r, "median_s");
        assert!(best <= median, "{r}");
        let gelem = positive_finite(r, "gelem_s");
        let gbs = positive_finite(r, "gbs");
        let fraction = positive_finite(r, "bandwidth_fraction");
        let elements = 16.0 * 1000.0;
        assert!(close(gelem, elements / best / 1e9), "{r}");
        let op = r["op"].as_str().unwrap();
        let b = elem_size(r["dtype"].as_str().unwrap());
        assert!(
            close(gbs, elements * bytes_per_element(op, b) / best / 1e9),
            "{r}"
        );
        assert!(close(fraction, gbs / copy_gbs), "{r}");
    }
}

#[test]
fn results_come_in_dtype_shape_op_order() {
    let doc = bench_json(&[
        "--shape",
        "4x10,3x7",
        "--dtype",
        "f64,f16",
        "--op",
        "cross_entropy,logsumexp",
        "--repeats",
        "1",
    ]);
    let got: Vec<String> = doc["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{} {}x{} {}", r["dtype"], r["rows"], r["classes"], r["op"]))
        .collect();
    let want = [
        r#""f64" 4x10 "cross_entropy""#,
        r#""f64" 4x10 "logsumexp""#,
        r#""f64" 3x7 "cross_entropy""#,
        r#""f64" 3x7 "logsumexp""#,
        r#""f16" 4x10 "cross_entropy""#,
        r#""f16" 4x10 "logsumexp""#,
        r#""f16" 3x7 "cross_entropy""#,
        r#""f16" 3x7 "logsumexp""#,
    ];
    assert_eq!(got, want);
}

#[test]
fn default_ops_are_the_four_common_ones() {
    let doc = bench_json(&["--shape", "2x5", "--repeats", "1"]);
    let ops: Vec<&str> = doc["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["op"].as_str().unwrap())
        .collect();
    assert_eq!(
        ops,
        ["logsumexp", "softmax", "log_softmax", "cross_entropy_grad"]
    );
    assert!(doc["results"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["dtype"] == "f32"));
}

#[test]
fn kernel_and_threads_are_reported() {
    let doc = bench_json(&[
        "--shape",
        "8x100",
        "--op",
        "softmax",
        "--repeats",
        "1",
        "--kernel",
        "scalar",
        "--threads",
        "1",
    ]);
    assert_eq!(doc["kernel"], "scalar");
    assert_eq!(doc["threads"], 1);
    assert_eq!(doc["results"][0]["threads"], 1);
}

#[test]
fn table_has_the_header_and_one_row_per_case() {
    let out = run_ok(&[
        "bench",
        "--copy-mib",
        "8",
        "--shape",
        "8x100,16x1000",
        "--dtype",
        "f32,bf16",
        "--op",
        "logsumexp,cross_entropy_in_place",
        "--repeats",
        "2",
        "--threads",
        "1",
        "--kernel",
        "scalar",
    ]);
    assert!(out.starts_with("lse bench\n"), "{out}");
    assert!(out.contains("CPU: "), "{out}");
    assert!(out.contains("; 1 threads; kernel scalar"), "{out}");
    assert!(out.contains("Copy bandwidth: "), "{out}");
    assert!(
        out.contains("'of copy' is each op's GB/s relative to it"),
        "{out}"
    );
    let header = out
        .lines()
        .find(|l| l.trim_start().starts_with("op "))
        .unwrap_or_else(|| panic!("no column header in\n{out}"));
    for column in [
        "dtype",
        "rows",
        "classes",
        "best ms",
        "median ms",
        "Gelem/s",
        "GB/s",
        "of copy",
    ] {
        assert!(header.contains(column), "{column} missing: {header}");
    }
    let rows: Vec<Vec<&str>> = out
        .lines()
        .skip_while(|l| *l != header)
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 8, "{out}");
    for dtype in ["f32", "bf16"] {
        for (r, c) in [("8", "100"), ("16", "1000")] {
            for op in ["logsumexp", "cross_entropy_in_place"] {
                let found = rows
                    .iter()
                    .filter(|row| row[..4] == [op, dtype, r, c])
                    .count();
                assert_eq!(found, 1, "{op} {dtype} {r}x{c} in\n{out}");
            }
        }
    }
    for row in &rows {
        assert_eq!(row.len(), 9, "{row:?}");
        for cell in &row[4..8] {
            let v: f64 = cell.parse().unwrap_or_else(|_| panic!("{cell} in {row:?}"));
            assert!(v.is_finite() && v >= 0.0, "{row:?}");
        }
        assert!(row[8].ends_with('%'), "{row:?}");
    }
}

#[test]
fn bad_shapes_are_usage_errors_that_name_the_value() {
    for bad in ["4096", "0x10", "ax3", "16x0", "1x2x3"] {
        let err = run_err(&["bench", "--shape", bad]);
        assert!(err.contains(&format!("'{bad}'")), "{bad}: {err}");
    }
    // A bad value among good ones is named too, and nothing runs.
    let err = run_err(&["bench", "--shape", "16x1000,abc"]);
    assert!(err.contains("'abc'"), "{err}");
}

#[test]
fn cross_entropy_options_are_reported_and_soft_targets_counted_as_a_read() {
    let doc = bench_json(&[
        "--shape",
        "8x300",
        "--op",
        "cross_entropy,cross_entropy_grad,logsumexp",
        "--label-smoothing",
        "0.1",
        "--z-loss",
        "0.0001",
        "--softcap",
        "30",
        "--class-weights",
        "--soft-targets",
        "--repeats",
        "1",
    ]);
    assert_eq!(
        doc["ce_options"],
        "label_smoothing=0.1,z_loss=0.0001,softcap=30,class_weights,soft_targets"
    );
    for r in doc["results"].as_array().expect("results") {
        let op = r["op"].as_str().unwrap();
        let extra = if op.starts_with("cross_entropy") {
            4.0
        } else {
            0.0
        };
        let bytes = 8.0 * 300.0 * (bytes_per_element(op, 4.0) + extra);
        let best = positive_finite(r, "best_s");
        assert!(close(positive_finite(r, "gbs"), bytes / best / 1e9), "{r}");
    }
    // The library checks the options: a bad one fails the run.
    let err = run_err(&[
        "bench",
        "--shape",
        "8x300",
        "--op",
        "cross_entropy",
        "--label-smoothing",
        "2",
    ]);
    assert!(err.contains("label_smoothing"), "{err}");
}

#[test]
fn other_bad_values_are_usage_errors() {
    let err = run_err(&["bench", "--op", "softplus"]);
    assert!(err.contains("softplus"), "{err}");
    let err = run_err(&["bench", "--dtype", "f8"]);
    assert!(err.contains("f8"), "{err}");
    let err = run_err(&["bench", "--threads", "0"]);
    assert!(err.contains("--threads"), "{err}");
    let err = run_err(&["bench", "--repeats", "0"]);
    assert!(err.contains("--repeats"), "{err}");
    let err = run_err(&["bench", "--kernel", "sve"]);
    assert!(err.contains("sve"), "{err}");
}

/// A family this CPU lacks is not an error: the widest one it has runs, and the report says
/// which ran and what was asked for (as the library's `set_kernel` does).
#[test]
fn a_kernel_this_cpu_lacks_is_reported_beside_the_one_that_ran() {
    let lacking = if cfg!(target_arch = "aarch64") {
        "avx2"
    } else {
        "neon"
    };
    let out = run_ok(&[
        "bench",
        "--shape",
        "2x64",
        "--dtype",
        "f32",
        "--op",
        "logsumexp",
        "--repeats",
        "1",
        "--copy-mib",
        "8",
        "--kernel",
        lacking,
    ]);
    assert!(out.contains(&format!("(requested {lacking})")), "{out}");
}

#[test]
fn a_case_larger_than_memory_is_refused_before_anything_runs() {
    if std::fs::read_to_string("/proc/meminfo").is_err() {
        return; // no MemTotal: the check is skipped, and so is this test
    }
    // 10^13 f32 logits: 40 TB.
    let err = run_err(&["bench", "--shape", "100000000x100000", "--copy-mib", "8"]);
    assert!(
        err.contains("100000000x100000") && err.contains("memory"),
        "{err}"
    );
}

#[test]
fn help_says_what_the_fraction_is_relative_to() {
    let text = help("bench");
    for needle in [
        "copy bandwidth",
        "bytes read + bytes written",
        "--shape",
        "--threads",
        "--kernel",
        "--repeats",
        "--json",
        "bandwidth_fraction",
    ] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }
    assert!(
        !text.contains("--copy-mib"),
        "the test-only flag is hidden:\n{text}"
    );
}
