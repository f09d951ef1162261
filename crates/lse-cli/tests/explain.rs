//! `lse explain` end to end: the binary's output, exit statuses and help.

use predicates::prelude::*;

mod common;

use common::{lse, run_ok};

/// The part of the report about one dtype: from its `== dtype ==` header to the next header or the
/// summary.
fn section<'a>(out: &'a str, dtype: &str) -> &'a str {
    let header = format!("== {dtype} ==");
    let start = out
        .find(&header)
        .unwrap_or_else(|| panic!("no {header} in\n{out}"));
    let rest = &out[start + header.len()..];
    let end = [rest.find("\n== "), rest.find("\nSummary:")]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(rest.len());
    &rest[..end]
}

/// The table of the row whose heading starts with `heading` (e.g. `row 2/3: [1000, 1, -1000]`).
fn row_table<'a>(section: &'a str, heading: &str) -> &'a str {
    let start = section
        .find(heading)
        .unwrap_or_else(|| panic!("no {heading:?} in\n{section}"));
    let rest = &section[start..];
    &rest[..rest.find("\n\n").unwrap_or(rest.len())]
}

/// The line of `table` labelled `label`.
fn line<'a>(table: &'a str, label: &str) -> &'a str {
    table
        .lines()
        .find(|l| {
            l.trim_start()
                .strip_prefix(label)
                .is_some_and(|rest| rest.starts_with(' '))
        })
        .unwrap_or_else(|| panic!("no line {label:?} in\n{table}"))
}

/// The numbers on the line labelled `label` (a `[f32]` tag and a trailing `<- ...` mark skipped).
fn values(table: &str, label: &str) -> Vec<f64> {
    let l = line(table, label);
    let body = l.trim_start()[label.len()..].split("<-").next().unwrap();
    body.split_whitespace()
        .filter(|t| !t.starts_with('['))
        .map(|t| t.parse().unwrap_or_else(|_| panic!("{t:?} in {l:?}")))
        .collect()
}

fn assert_close(got: &[f64], want: &[f64], rel: f64, abs: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: {got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() <= w.abs() * rel + abs,
            "{what}: got {got:?}, want {want:?}"
        );
    }
}

const DTYPES: [&str; 4] = ["f64", "f32", "f16", "bf16"];

#[test]
fn default_run_shows_naive_overflow_and_finite_stable_values_in_every_dtype() {
    let out = run_ok(&["explain"]);
    for dtype in DTYPES {
        let s = section(&out, dtype);
        let row = row_table(s, "row 2/3: [1000, 1, -1000]");

        let exp = line(row, "naive exp(x)");
        assert!(
            exp.contains(" inf ") && exp.contains("<- overflow: inf"),
            "{dtype}: {exp}"
        );
        assert!(values(row, "naive exp(x)")[0].is_infinite(), "{dtype}");
        let softmax = values(row, "naive softmax");
        assert!(softmax[0].is_nan(), "{dtype}: {softmax:?}");
        assert!(line(row, "naive softmax").contains("<- NaN"), "{dtype}");
        let ce = values(row, "naive CE(y)");
        assert!(ce.iter().all(|v| !v.is_finite()), "{dtype}: {ce:?}");
        assert!(values(row, "naive logsumexp")[0].is_infinite(), "{dtype}");

        for label in [
            "stable softmax",
            "stable log_softmax",
            "stable CE(y)",
            "stable logsumexp",
        ] {
            let v = values(row, label);
            assert!(v.iter().all(|x| x.is_finite()), "{dtype} {label}: {v:?}");
        }
        // Stable values from f64 math: softmax = onehot(0), CE(y) = x_0 - x_y, lse = 1000.
        assert_close(
            &values(row, "stable softmax"),
            &[1.0, 0.0, 0.0],
            0.0,
            0.0,
            dtype,
        );
        // bf16 stores 1 - 1000 = -999 as -1000 (8 significant bits): allow its rounding.
        let rel = if dtype == "bf16" { 2f64.powi(-8) } else { 1e-6 };
        assert_close(
            &values(row, "stable log_softmax"),
            &[0.0, -999.0, -2000.0],
            rel,
            0.0,
            dtype,
        );
        assert_close(
            &values(row, "stable CE(y)"),
            &[0.0, 999.0, 2000.0],
            1e-6,
            0.0,
            dtype,
        );
        assert_close(
            &values(row, "stable logsumexp"),
            &[1000.0],
            1e-6,
            0.0,
            dtype,
        );

        // The ordinary rows are not marked at all.
        for heading in ["row 1/3: [2, 1, 0.1]", "row 3/3: [3, 2, 1]"] {
            let table = row_table(s, heading);
            assert!(!table.contains("<-"), "{dtype} {heading}:\n{table}");
        }
    }
    let summary = &out[out.find("\nSummary:").expect("a summary")..];
    for dtype in DTYPES {
        let threshold = match dtype {
            "f64" => "709.78",
            "f16" => "11.09",
            _ => "88.72",
        };
        let sentence = format!("{dtype}: naive exp overflows for logits > {threshold} (row 2)");
        assert!(
            summary.contains(&sentence),
            "{sentence:?} not in\n{summary}"
        );
    }
    assert_eq!(
        summary.matches("stable results finite everywhere").count(),
        4
    );
    assert!(
        out.lines().all(|l| l.len() <= 100),
        "a line over 100 columns"
    );
}

#[test]
fn f16_overflows_at_12_where_the_stable_softmax_does_not() {
    let out = run_ok(&["explain", "--dtype", "f16", "12,0"]);
    assert!(!out.contains("== f32 =="), "only f16 was asked for");
    let row = row_table(section(&out, "f16"), "row 1/1: [12, 0]");

    assert!(
        line(row, "naive exp(x)").contains("<- overflow: inf"),
        "{row}"
    );
    assert_eq!(values(row, "naive exp(x)"), [f64::INFINITY, 1.0]);
    let naive = values(row, "naive softmax");
    assert!(naive[0].is_nan() && naive[1] == 0.0, "{naive:?}");
    let naive_line = line(row, "naive softmax");
    assert!(naive_line.contains("NaN") && naive_line.contains("underflow: 0"));

    // softmax([12, 0]) in f64: [1 / (1 + e^-12), e^-12 / (1 + e^-12)] = [0.99999386, 6.1e-6].
    let t = (-12f64).exp();
    let want = [1.0 / (1.0 + t), t / (1.0 + t)];
    assert!((want[0] - 0.99999386).abs() < 1e-8 && (want[1] - 6.1442e-6).abs() < 1e-9);
    // One rounding into f16 (half an ulp), then the shortest decimal that reads back as that f16
    // (another half ulp at most): one f16 ulp, 2^-10 relative or 2^-24 among subnormals.
    let (rel, abs) = (2f64.powi(-10), 2f64.powi(-24));
    let stable = values(row, "stable softmax");
    assert_close(&stable, &want, rel, abs, "stable softmax");
    assert!(
        stable[1] > 0.0,
        "the small probability survives: {stable:?}"
    );
    let log_want = [-(t.ln_1p()), -12.0 - t.ln_1p()];
    let log_p = values(row, "stable log_softmax");
    assert_close(&log_p, &log_want, rel, abs, "stable log_softmax");
    // CE and logsumexp come back in f32.
    let ce = values(row, "stable CE(y)");
    assert_close(&ce, &[t.ln_1p(), 12.0 + t.ln_1p()], 1e-6, 0.0, "stable CE");
    let lse = values(row, "stable logsumexp");
    assert_close(&lse, &[12.0 + t.ln_1p()], 1e-6, 0.0, "stable logsumexp");

    assert!(
        out.contains("f16: naive exp overflows for logits > 11.09 (row 1)"),
        "{out}"
    );
    assert!(out.contains("stable results finite everywhere"), "{out}");
}

#[test]
fn negative_rows_and_special_values_parse() {
    // A row that starts with '-' is a row, not an option, before or after --dtype.
    for args in [
        &["explain", "-1000,-1000", "--dtype", "f32"][..],
        &["explain", "--dtype", "f32", "-1000,-1000"],
    ] {
        let out = run_ok(args);
        let row = row_table(section(&out, "f32"), "row 1/1: [-1000, -1000]");
        // exp(-1000) underflows to 0 where exp(x - m) = 1; 0/0 = NaN; the stable softmax is 1/2.
        assert!(
            line(row, "naive exp(x)").contains("<- underflow: 0"),
            "{row}"
        );
        assert!(values(row, "naive softmax").iter().all(|v| v.is_nan()));
        assert_eq!(values(row, "stable softmax"), [0.5, 0.5]);
        assert!(out.contains("naive exp underflows to 0"), "{out}");
    }
    let out = run_ok(&["explain", "-d", "f16", "1e5,0,-inf", "1,nan,inf"]);
    let s = section(&out, "f16");
    let row = row_table(s, "row 1/2: [1e5, 0, -inf]");
    assert!(line(row, "x in f16").contains("<- overflow: inf"), "{row}");
    assert!(row.contains("1e5 is beyond the f16 range"), "{row}");
    assert!(values(row, "x in f16")[0].is_infinite());
    assert!(
        out.contains("logits beyond ±65504 become ±inf in f16 (row 1)"),
        "{out}"
    );
    let row = row_table(s, "row 2/2: [1, nan, inf]");
    assert!(values(row, "x in f16")[1].is_nan());
}

/// Asserts that `lse ARGS` fails with status 2, nothing on stdout and one line on stderr
/// containing `needle`.
fn assert_usage_error(args: &[&str], needle: &str) {
    let output = lse()
        .args(args)
        .assert()
        .code(2)
        .stdout(predicate::str::is_empty())
        .stderr(predicate::str::contains(needle))
        .get_output()
        .clone();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr:?}");
    assert!(stderr.starts_with("error: "), "{stderr:?}");
}

#[test]
fn bad_input_exits_with_status_2_and_one_line() {
    assert_usage_error(&["explain", "1,2,3", "4,5"], "same length");
    assert_usage_error(&["explain", "1,abc"], "cannot parse \"abc\"");
    assert_usage_error(&["explain", "1,,2"], "cannot parse \"\"");
    assert_usage_error(&["explain", "--dtype", "f8", "1,2"], "f8");
    assert_usage_error(
        &["explain", "--dtype", "f8"],
        "expected one of f64, f32, f16, bf16",
    );
    assert_usage_error(&["explain", "--bogus"], "--bogus");
    assert_usage_error(&["frobnicate"], "frobnicate");
}

#[test]
fn help_explains_the_command() {
    lse().args(["explain", "--help"]).assert().success().stdout(
        predicate::str::contains("naive")
            .and(predicate::str::contains("stable"))
            .and(predicate::str::contains("--dtype"))
            .and(predicate::str::contains("overflow: inf"))
            .and(predicate::str::contains("lse explain --dtype f16 12,0")),
    );
    lse()
        .args(["explain", "-h"])
        .assert()
        .success()
        .stdout(predicate::str::contains("Usage: lse explain"));
    lse()
        .arg("--help")
        .assert()
        .success()
        .stdout(predicate::str::contains("explain"));
}
