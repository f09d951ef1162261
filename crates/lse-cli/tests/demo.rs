//! `lse demo` end to end: the naive run dies, the lse run does not, the same seed gives the same
//! output, the chart is a real PNG, and bad arguments fail with one line and status 2.
//!
//! The runs are small (20 classes, a few hundred steps, a hotter learning rate than the default
//! so that the naive run dies early): each takes well under a second.

use std::fs;
use std::path::PathBuf;

mod common;

/// A fresh, empty directory for one test.
fn scratch(name: &str) -> PathBuf {
    common::dir("demo", name)
}

/// A small f16 run whose naive half dies within the first hundred steps.
const SMALL: [&str; 6] = ["--classes", "20", "--steps", "300", "--lr", "0.005"];

/// Runs `lse demo ARGS`, asserts success with nothing on stderr (the progress bar is hidden
/// when stderr is not a terminal) and returns stdout.
fn demo(args: &[&str]) -> String {
    common::run_ok(&[&["demo"], args].concat())
}

/// `text` with every run of whitespace (line breaks of wrapped paragraphs too) as one space.
fn flat(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The cells of the results-table row of `run` (`naive` or `lse`): the table's header starts
/// with `run`, cells are separated by two or more spaces.
fn result_row<'a>(out: &'a str, run: &str) -> Vec<&'a str> {
    let mut lines = out
        .lines()
        .skip_while(|l| !(l.trim_start().starts_with("run ") && l.contains("first non-finite")));
    let header = lines
        .next()
        .unwrap_or_else(|| panic!("no results table in\n{out}"));
    assert!(header.contains("monitor events"), "{header}");
    let line = lines
        .take(2)
        .find(|l| l.trim_start().starts_with(&format!("{run} ")))
        .unwrap_or_else(|| panic!("no {run} row in\n{out}"));
    line.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect()
}

/// The step of the naive run's first non-finite value, from the results table.
fn naive_failure(out: &str) -> u64 {
    let row = result_row(out, "naive");
    row[1]
        .strip_prefix("step ")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("naive row {row:?} in\n{out}"))
}

#[test]
fn the_naive_run_dies_the_lse_run_does_not_and_the_same_seed_repeats() {
    let args: Vec<&str> = SMALL.iter().copied().chain(["--no-plot"]).collect();
    let first = demo(&args);
    let step = naive_failure(&first);
    assert!((2..=300).contains(&step), "{first}");
    let text = flat(&first);
    assert!(
        text.contains(&format!("naive run: its loss is NaN at step {step} of 300")),
        "{first}"
    );
    // The triage of that step names the naive softmax, with its evidence.
    assert!(text.contains("NaN triage: `probabilities`"), "{first}");
    assert!(text.contains("Likely cause: naive softmax"), "{first}");
    assert!(
        text.contains("exceeds f16's naive exp limit 11.09"),
        "{first}"
    );
    // The naive weights are NaN afterwards; the lse run is finite and learned.
    assert!(text.contains("wrote NaN into"), "{first}");
    let naive = result_row(&first, "naive");
    assert_eq!(naive[2], "NaN", "{naive:?}");
    assert!(naive[3].contains("weights NaN"), "{naive:?}");
    let stable = result_row(&first, "lse");
    assert_eq!(stable[1], "none", "{stable:?}");
    let loss: f64 = stable[2].parse().expect("a finite final loss");
    assert!(loss.is_finite() && loss < 1.0, "{stable:?}");
    let accuracy: f64 = stable[3]
        .trim_end_matches('%')
        .parse()
        .expect("a percentage");
    assert!(accuracy > 80.0, "{stable:?}");
    assert!(first.contains("chart: none (--no-plot)"), "{first}");

    // Determinism: the same seed gives the same report, byte for byte; another seed does not.
    assert_eq!(demo(&args), first);
    let mut other = args.clone();
    other.extend(["--seed", "1"]);
    assert_ne!(demo(&other), first);
}

#[test]
fn bf16_dies_too_past_88_72() {
    let out = demo(&[
        "--dtype",
        "bf16",
        "--classes",
        "10",
        "--steps",
        "300",
        "--no-plot",
    ]);
    let step = naive_failure(&out);
    let text = flat(&out);
    assert!(
        text.contains(&format!("naive run: its loss is NaN at step {step}")),
        "{out}"
    );
    assert!(text.contains("past 88.72 = ln(max bf16)"), "{out}");
    assert!(text.contains("learning rate 0.05"), "{out}");
    assert_eq!(result_row(&out, "lse")[1], "none");
}

#[test]
fn a_naive_run_that_survives_says_so() {
    let out = demo(&["--classes", "10", "--steps", "20", "--no-plot"]);
    assert!(
        flat(&out).contains("naive run: survived all 20 steps"),
        "{out}"
    );
    assert_eq!(result_row(&out, "naive")[1], "none");
    assert!(!out.contains("NaN triage"), "{out}");
}

#[test]
fn json_summary_matches_the_runs() {
    let args: Vec<&str> = SMALL
        .iter()
        .copied()
        .chain(["--no-plot", "--json"])
        .collect();
    let text = demo(&args);
    assert_eq!(demo(&args), text, "deterministic");
    let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let naive = &v["naive"];
    let step = naive["first_non_finite"]["step"].as_u64().expect("a step");
    assert_eq!(naive["weights_non_finite_after_step"].as_u64(), Some(step));
    assert_eq!(
        naive["losses"].as_array().map(Vec::len),
        Some(step as usize)
    );
    assert_eq!(
        naive["first_non_finite"]["triage"]["cause"],
        "naive_softmax_signature"
    );
    assert!(naive["held_out_accuracy"].is_null());
    let stable = &v["lse"];
    assert!(stable["first_non_finite"].is_null());
    assert_eq!(stable["losses"].as_array().map(Vec::len), Some(300));
    assert!(stable["held_out_accuracy"]
        .as_f64()
        .is_some_and(|a| a > 0.8));
    assert_eq!(v["dtype"], "f16");
    assert!(v["chart"].is_null());
}

#[test]
fn the_chart_is_a_png_of_the_promised_size() {
    let dir = scratch("png").join("nested");
    let dir_text = dir.to_str().expect("utf-8 path");
    let args: Vec<&str> = SMALL.iter().copied().chain(["--out", dir_text]).collect();
    let out = demo(&args);
    let png = dir.join("demo-f16.png");
    assert!(out.contains(&format!("chart: {}", png.display())), "{out}");
    let bytes = fs::read(&png).expect("the chart is written");
    assert!(
        bytes.len() > 20_000,
        "a real chart, not a stub: {} bytes",
        bytes.len()
    );
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&bytes[12..16], b"IHDR", "first chunk");
    let be =
        |at: usize| u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    assert_eq!((be(16), be(20)), (1200, 900), "width and height");
    // Nothing else is left in the directory (the write probe is removed).
    let entries: Vec<_> = fs::read_dir(&dir).unwrap().flatten().collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
}

#[test]
fn no_plot_writes_nothing() {
    let dir = scratch("no-plot").join("out");
    let args: Vec<&str> = [
        "--classes",
        "10",
        "--steps",
        "20",
        "--no-plot",
        "--out",
        dir.to_str().unwrap(),
    ]
    .to_vec();
    demo(&args);
    assert!(!dir.exists(), "--no-plot creates no directory");
}

#[test]
fn bad_arguments_fail_with_one_line_and_status_2() {
    let file = scratch("bad").join("a-file");
    fs::write(&file, b"not a directory").unwrap();
    let under_file = file.join("out");
    let cases: [(&[&str], &str); 7] = [
        (&["--dtype", "f64"], "f16 or bf16"),
        (&["--dtype", "f8"], "f16 or bf16"),
        (&["--classes", "1"], "from 2 to 1000"),
        (&["--steps", "0"], "from 1 to"),
        (&["--lr", "0"], "learning rate"),
        (&["--lr", "nan"], "learning rate"),
        (
            &["--steps", "5", "--out", under_file.to_str().unwrap()],
            "cannot write the chart there",
        ),
    ];
    for (args, message) in cases {
        // One line on stderr and nothing on stdout.
        let stderr = common::run_err(&[&["demo"], args].concat());
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr:?}");
        assert!(stderr.contains(message), "{args:?}: {stderr:?}");
    }
}

#[test]
fn help_says_what_the_demo_trains() {
    let help = flat(&common::help("demo"));
    for needle in [
        "Gaussian clusters",
        "32 inputs -> 128 hidden (ReLU)",
        "Adam",
        "lse::naive::cross_entropy",
        "LossScaler",
        "11.09",
        "88.72",
        "--no-plot",
        "--json",
    ] {
        assert!(help.contains(needle), "{needle:?} missing from\n{help}");
    }
}
