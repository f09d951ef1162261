//! `lse eval --op linear_cross_entropy` end to end: the loss and the three gradients it writes
//! are, bit for bit, what the library returns; the flags are checked.

use lse::{
    bf16, CrossEntropyOptions, GradOutput, LinearCrossEntropyOptions, LinearGradients, LinearHead,
    Reduction,
};
use lse_io::npy::{parse, Bf16Descr, ReadOptions};
use lse_io::FloatElement;

mod common;

use common::{s, write_npy};

fn read<E: FloatElement>(path: &std::path::Path) -> Vec<E> {
    let bytes = std::fs::read(path).unwrap();
    let a = parse(&bytes, ReadOptions { void_as_bf16: true }).unwrap();
    E::take(a.tensor.data).unwrap_or_else(|d| panic!("{path:?}: wrong dtype {:?}", d.dtype()))
}

#[test]
fn loss_and_gradients_are_the_librarys() {
    let dir = common::dir("eval_linear", "library");
    let (n, d, v) = (6, 4, 9);
    let value = |i: usize, k: f32| bf16::from_f32(((i as f32 * k).sin()) * 2.0);
    let hidden: Vec<bf16> = (0..n * d).map(|i| value(i, 0.7)).collect();
    let weight: Vec<bf16> = (0..v * d).map(|i| value(i, 1.3)).collect();
    let bias: Vec<bf16> = (0..v).map(|i| value(i, 0.4)).collect();
    let targets: Vec<i64> = vec![0, 8, -100, 3, 3, 1];
    let path = |name: &str| dir.join(name);
    write_npy(&path("h.npy"), &[n, d], &hidden, Bf16Descr::Void);
    write_npy(&path("w.npy"), &[v, d], &weight, Bf16Descr::Void);
    write_npy(&path("b.npy"), &[v], &bias, Bf16Descr::Void);
    write_npy(&path("t.npy"), &[n], &targets, Bf16Descr::Void);
    let out = common::run_ok(&[
        "eval",
        "--op",
        "linear_cross_entropy",
        "--void-as-bf16",
        s(&path("h.npy")),
        "--weight",
        s(&path("w.npy")),
        "--bias",
        s(&path("b.npy")),
        "--targets",
        s(&path("t.npy")),
        "--label-smoothing",
        "0.1",
        "--reduction",
        "sum",
        "--out",
        s(&path("loss.npy")),
        "--grad-hidden",
        s(&path("dh.npy")),
        "--grad-weight",
        s(&path("dw.npy")),
        "--grad-bias",
        s(&path("db.npy")),
    ]);
    assert!(out.contains("5 counted of 6 rows"), "{out}");

    let options = LinearCrossEntropyOptions {
        cross_entropy: CrossEntropyOptions {
            label_smoothing: 0.1,
            reduction: Reduction::Sum,
            ..Default::default()
        },
        ..Default::default()
    };
    let (mut dh, mut dw, mut db) = (
        vec![bf16::ZERO; n * d],
        vec![bf16::ZERO; v * d],
        vec![bf16::ZERO; v],
    );
    let grads = LinearGradients {
        hidden: &mut dh,
        weight: &mut dw,
        bias: Some(&mut db),
    };
    let head = LinearHead {
        weight: &weight,
        bias: Some(&bias),
        classes: v,
    };
    let want = lse::linear_cross_entropy_with_grad(
        &hidden,
        head,
        lse::Targets::Classes(&targets),
        &options,
        GradOutput::Scalar(1.0),
        grads,
    )
    .unwrap();
    assert_eq!(read::<f32>(&path("loss.npy")), vec![want.loss]);
    let bits = |x: &[bf16]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&read::<bf16>(&path("dh.npy"))), bits(&dh));
    assert_eq!(bits(&read::<bf16>(&path("dw.npy"))), bits(&dw));
    assert_eq!(bits(&read::<bf16>(&path("db.npy"))), bits(&db));
}

#[test]
fn flags_are_checked() {
    let dir = common::dir("eval_linear", "flags");
    let h = dir.join("h.npy");
    write_npy(&h, &[2, 3], &[0.5f32; 6], Bf16Descr::Void);
    let w = dir.join("w.npy");
    write_npy(&w, &[4, 2], &[0.5f32; 8], Bf16Descr::Void);
    let t = dir.join("t.npy");
    write_npy(&t, &[2], &[0i64, 1], Bf16Descr::Void);
    let out = dir.join("loss.npy");
    let err = common::run_err(&[
        "eval",
        "--op",
        "linear_cross_entropy",
        s(&h),
        "--targets",
        s(&t),
        "--out",
        s(&out),
    ]);
    assert!(err.contains("--weight"), "{err}");
    let err = common::run_err(&[
        "eval",
        "--op",
        "linear_cross_entropy",
        s(&h),
        "--weight",
        s(&w),
        "--targets",
        s(&t),
        "--out",
        s(&out),
    ]);
    assert!(err.contains("hidden size is 3"), "{err}");
    let err = common::run_err(&[
        "eval",
        "--op",
        "softmax",
        s(&h),
        "--weight",
        s(&w),
        "--out",
        s(&out),
    ]);
    assert!(
        err.contains("--weight applies to --op linear_cross_entropy only"),
        "{err}"
    );
    let err = common::run_err(&[
        "eval",
        "--op",
        "softmax",
        "--hidden",
        s(&h),
        "--out",
        s(&out),
    ]);
    assert!(
        err.contains("--hidden applies to --op linear_cross_entropy only"),
        "{err}"
    );
    // The hidden states are INPUT or --hidden, never both; one of them is required.
    let err = common::run_err(&[
        "eval",
        "--op",
        "linear_cross_entropy",
        s(&h),
        "--hidden",
        s(&h),
        "--weight",
        s(&w),
        "--targets",
        s(&t),
        "--out",
        s(&out),
    ]);
    assert!(err.contains("cannot be used with"), "{err}");
    let err = common::run_err(&["eval", "--op", "softmax", "--out", s(&out)]);
    assert!(err.contains("INPUT"), "{err}");
    assert!(!out.exists());
}

/// `--hidden FILE` is the positional INPUT under its own name: the same bytes out.
#[test]
fn hidden_flag_is_the_input() {
    let dir = common::dir("eval_linear", "hidden_flag");
    let (n, d, v) = (5, 3, 7);
    let hidden: Vec<f32> = (0..n * d).map(|i| (i as f32 * 0.9).cos() * 3.0).collect();
    let weight: Vec<f32> = (0..v * d).map(|i| (i as f32 * 0.4).sin()).collect();
    let (h, w, t) = (dir.join("h.npy"), dir.join("w.npy"), dir.join("t.npy"));
    write_npy(&h, &[n, d], &hidden, Bf16Descr::Void);
    write_npy(&w, &[v, d], &weight, Bf16Descr::Void);
    write_npy(&t, &[n], &[6i64, 0, 2, -100, 4], Bf16Descr::Void);
    let run = |hidden_args: &[&str], tag: &str| {
        let loss = dir.join(format!("loss-{tag}.npy"));
        let dw = dir.join(format!("dw-{tag}.npy"));
        let mut args = vec!["eval", "--op", "linear_cross_entropy"];
        args.extend_from_slice(hidden_args);
        args.extend_from_slice(&["--weight", s(&w), "--targets", s(&t), "--z-loss", "1e-3"]);
        args.extend_from_slice(&["--out", s(&loss), "--grad-weight", s(&dw)]);
        common::run_ok(&args);
        (std::fs::read(&loss).unwrap(), std::fs::read(&dw).unwrap())
    };
    let by_flag = run(&["--hidden", s(&h)], "flag");
    let positional = run(&[s(&h)], "positional");
    assert_eq!(by_flag, positional);
}
