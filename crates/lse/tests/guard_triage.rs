//! NaN triage on the tensors of one step of a toy linear classifier, for each way a step dies.

use lse::guard::{triage, Cause, Role, RowChoice, TensorView};
use lse::{
    bf16, cross_entropy_with_grad, f16, CrossEntropyOptions, DType, Element, GradOutput, Targets,
};

const FEATURES: usize = 3;
const CLASSES: usize = 5;
const ROWS: usize = 4;

/// `x · w` (`ROWS × FEATURES` times `FEATURES × CLASSES`) in f64, rounded once to `E`.
fn linear<E: Element>(x: &[f32], w: &[f64]) -> Vec<E> {
    let mut out = Vec::with_capacity(ROWS * CLASSES);
    for r in 0..ROWS {
        for c in 0..CLASSES {
            let dot: f64 = (0..FEATURES)
                .map(|f| f64::from(x[r * FEATURES + f]) * w[f * CLASSES + c])
                .sum();
            out.push(E::from_f64(dot));
        }
    }
    out
}

/// `xᵀ · dlogits`: the gradient of the weights, in f64 and rounded once to `E`.
fn weight_grad<E: Element, G: Element>(x: &[f32], dlogits: &[G]) -> Vec<E> {
    let mut out = Vec::with_capacity(FEATURES * CLASSES);
    for f in 0..FEATURES {
        for c in 0..CLASSES {
            let dot: f64 = (0..ROWS)
                .map(|r| f64::from(x[r * FEATURES + f]) * dlogits[r * CLASSES + c].to_f64())
                .sum();
            out.push(E::from_f64(dot));
        }
    }
    out
}

fn input() -> Vec<f32> {
    vec![
        0.5, -1.0, 0.25, //
        1.5, 0.0, -0.5, //
        -0.75, 2.0, 1.0, //
        0.1, 0.2, 0.3,
    ]
}

fn weights() -> Vec<f64> {
    (0..FEATURES * CLASSES)
        .map(|i| ((i * 7 % 11) as f64 - 5.0) / 4.0)
        .collect()
}

const TARGETS: [i64; ROWS] = [0, 3, 1, 4];

#[test]
fn a_nan_in_one_input_row_is_named_as_the_input_not_the_loss() {
    // Sample 2 came out of the normaliser as 0/0.
    let mut x = input();
    x[2 * FEATURES + 1] = f32::NAN;
    let logits: Vec<f32> = linear(&x, &weights());
    // The training loop's loss: a per-row cross-entropy (which propagates the NaN of row 2).
    let mut losses = [0.0f32; ROWS];
    let mut dlogits = vec![0.0f32; ROWS * CLASSES];
    lse::naive::cross_entropy(&logits, CLASSES, &TARGETS, &mut losses, &mut dlogits).unwrap();
    let dw: Vec<f32> = weight_grad(&x, &dlogits);
    assert!(losses[2].is_nan() && dw.iter().all(|g| g.is_nan()));

    let report = triage(&[
        TensorView::new("input", Role::Input, &x, FEATURES).unwrap(),
        TensorView::new("logits", Role::Logits, &logits, CLASSES).unwrap(),
        TensorView::new("loss", Role::Loss, &losses, 1).unwrap(),
        TensorView::new("grad_logits", Role::Gradient, &dlogits, CLASSES).unwrap(),
        TensorView::new("grad_w", Role::Gradient, &dw, CLASSES).unwrap(),
    ]);
    let first = report.first_non_finite.as_ref().unwrap();
    assert_eq!(first.tensor, "input", "the loss is NaN too, but not first");
    assert_eq!((first.row, first.column, first.role), (2, 1, Role::Input));
    assert!(first.value.is_nan());
    assert_eq!(report.cause, Some(Cause::NonFiniteInput));
    assert_eq!(
        report.non_finite_tensors,
        ["input", "logits", "loss", "grad_logits", "grad_w"]
    );
    // The logits shown are those of sample 2: every one of them NaN.
    let top = report.top_logits.as_ref().unwrap();
    assert_eq!(
        (top.tensor.as_str(), top.row, top.chosen_by),
        ("logits", 2, RowChoice::CorrespondingRow)
    );
    assert_eq!(top.entries.len(), 5);
    assert!(top.entries.iter().all(|e| e.value.is_nan()));

    let text = report.to_string();
    println!("{text}");
    for needle in [
        "`input`",
        "row 2, column 1",
        "NaN",
        "non-finite input",
        "data loader",
        "`logits`",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["cause"], "non_finite_input");
    assert_eq!(json["first_non_finite"]["tensor"], "input");
    assert_eq!(json["first_non_finite"]["role"], "input");
    assert_eq!(json["first_non_finite"]["row"], 2);
    assert_eq!(json["first_non_finite"]["value"], "NaN");
    assert_eq!(json["top_logits"]["tensor"], "logits");
    assert_eq!(json["top_logits"]["row"], 2);
    assert!(json["advice"].as_str().unwrap().contains("data loader"));
}

#[test]
fn f16_logits_at_1e5_are_out_of_range() {
    let x = input();
    // The output layer of row 1 produced 1e5: f16 holds at most 65504, so it is inf.
    let mut wide: Vec<f64> = linear::<f64>(&x, &weights());
    wide[CLASSES + 3] = 1e5;
    let logits: Vec<f16> = wide.iter().map(|&v| f16::from_f64(v)).collect();
    assert_eq!(logits[CLASSES + 3], f16::INFINITY);
    let mut losses = [f16::ZERO; ROWS];
    let mut dlogits = vec![f16::ZERO; ROWS * CLASSES];
    lse::naive::cross_entropy(&logits, CLASSES, &TARGETS, &mut losses, &mut dlogits).unwrap();

    let report = triage(&[
        TensorView::new("input", Role::Input, &x, FEATURES).unwrap(),
        TensorView::new("logits", Role::Logits, &logits, CLASSES).unwrap(),
        TensorView::new("loss", Role::Loss, &losses, ROWS).unwrap(),
        TensorView::new("grad_logits", Role::Gradient, &dlogits, CLASSES).unwrap(),
    ]);
    let first = report.first_non_finite.as_ref().unwrap();
    assert_eq!(
        (first.tensor.as_str(), first.dtype, first.row, first.column),
        ("logits", DType::F16, 1, 3)
    );
    assert_eq!(first.value, f64::INFINITY);
    assert_eq!(report.cause, Some(Cause::LogitsOutOfRange));
    let top = report.top_logits.as_ref().unwrap();
    assert_eq!((top.row, top.chosen_by), (1, RowChoice::OffendingEntry));
    assert_eq!(
        (top.entries[0].column, top.entries[0].value),
        (3, f64::INFINITY)
    );
    assert!(top.entries.windows(2).all(|w| w[0].value >= w[1].value));
    let text = report.to_string();
    println!("{text}");
    assert!(text.contains("logits out of range"), "{text}");
    assert!(text.contains("lse::cross_entropy"), "{text}");
    assert_eq!(
        serde_json::to_value(&report).unwrap()["cause"],
        "logits_out_of_range"
    );
}

#[test]
fn finite_f16_logits_through_a_naive_softmax_show_its_signature() {
    // Row 0 is confident: 12 is a finite f16, but exp(12) = 162755 is not (ln 65504 = 11.09).
    #[rustfmt::skip]
    let wide = [
        12.0, 3.0, -1.0, 0.5, 2.0,
        1.0, 2.0, 0.0, 0.5, -0.5,
        0.0, 0.0, 0.0, 0.0, 0.0,
        -3.0, 1.0, 4.0, 2.0, 0.25,
    ];
    let logits: Vec<f16> = wide.iter().map(|&v| f16::from_f64(v)).collect();
    let mut probs = vec![f16::ZERO; ROWS * CLASSES];
    lse::naive::softmax(&logits, CLASSES, &mut probs).unwrap();
    let losses: Vec<f16> = (0..ROWS)
        .map(|r| f16::from_f64(-probs[r * CLASSES + TARGETS[r] as usize].to_f64().ln()))
        .collect();
    // The stable softmax of the same logits is fine.
    let mut stable = vec![f16::ZERO; ROWS * CLASSES];
    lse::softmax(&logits, CLASSES, &mut stable).unwrap();
    assert!(stable.iter().all(|p| p.is_finite()));

    let report = triage(&[
        TensorView::new("logits", Role::Logits, &logits, CLASSES).unwrap(),
        TensorView::new("probs", Role::Probabilities, &probs, CLASSES).unwrap(),
        TensorView::new("loss", Role::Loss, &losses, 1).unwrap(),
    ]);
    let first = report.first_non_finite.as_ref().unwrap();
    assert_eq!(
        (first.tensor.as_str(), first.row, first.column),
        ("probs", 0, 0)
    );
    assert!(first.value.is_nan(), "inf / inf");
    assert_eq!(report.cause, Some(Cause::NaiveSoftmaxSignature));
    let m = report.naive_softmax.as_ref().unwrap();
    assert_eq!((m.row, m.column, m.logit), (0, 0, 12.0));
    assert!(m.value.is_nan() && (m.expected - 0.99983).abs() < 1e-4);
    let range = report.logits.as_ref().unwrap();
    assert!(range.exceeds_threshold && range.largest == Some(12.0));
    let top = report.top_logits.as_ref().unwrap();
    assert_eq!((top.row, top.chosen_by), (0, RowChoice::CorrespondingRow));
    let text = report.to_string();
    println!("{text}");
    for needle in ["`probs`", "naive softmax", "lse::softmax", "11.09"] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["cause"], "naive_softmax_signature");
    assert_eq!(json["naive_softmax"]["tensor"], "probs");
    assert_eq!(json["naive_softmax"]["value"], "NaN");
}

#[test]
fn a_naive_softmax_whose_sum_overflows_leaves_zeros_and_an_infinite_loss() {
    // Every logit is below f16's limit 11.09, so every exp is finite (exp(11) = 59874), but their
    // sum is not: each probability becomes x / inf = 0, and the loss -ln(0) = inf.
    let logits: Vec<f16> = [11.0, 11.0, 11.0, 0.0, -2.0]
        .iter()
        .map(|&v| f16::from_f64(v))
        .collect();
    let mut probs = vec![f16::ZERO; CLASSES];
    lse::naive::softmax(&logits, CLASSES, &mut probs).unwrap();
    assert!(probs.iter().all(|&p| p == f16::ZERO));
    let loss = f16::from_f64(-probs[1].to_f64().ln());

    let report = triage(&[
        TensorView::new("logits", Role::Logits, &logits, CLASSES).unwrap(),
        TensorView::new("probs", Role::Probabilities, &probs, CLASSES).unwrap(),
        TensorView::scalar("loss", Role::Loss, &loss),
    ]);
    assert_eq!(report.first_non_finite.as_ref().unwrap().tensor, "loss");
    assert_eq!(report.cause, Some(Cause::NaiveSoftmaxSignature));
    let m = report.naive_softmax.as_ref().unwrap();
    assert_eq!((m.value, m.column), (0.0, 0));
    assert!((m.expected - 1.0 / 3.0).abs() < 1e-3);
    assert!(!report.logits.as_ref().unwrap().exceeds_threshold);
}

#[test]
fn a_finite_loss_with_an_exploded_gradient() {
    // Unnormalised features (1e6) with tiny weights: the logits and the loss are fine, but the
    // weight gradient xᵀ·dlogits is ~1e5, past f16's 65504.
    let x: Vec<f32> = input().iter().map(|v| v * 1e6).collect();
    let w: Vec<f64> = weights().iter().map(|v| v * 1e-6).collect();
    let logits: Vec<bf16> = linear(&x, &w);
    let mut dlogits = vec![bf16::ZERO; ROWS * CLASSES];
    let out = cross_entropy_with_grad(
        &logits,
        CLASSES,
        Targets::Classes(&TARGETS),
        &CrossEntropyOptions::default(),
        GradOutput::Scalar(1.0),
        &mut dlogits,
    )
    .unwrap();
    let loss = out.loss;
    assert!(loss.is_finite());
    let dw: Vec<f16> = weight_grad(&x, &dlogits);
    assert!(dw.iter().any(|g| g.is_infinite()));

    let report = triage(&[
        TensorView::new("input", Role::Input, &x, FEATURES).unwrap(),
        TensorView::new("logits", Role::Logits, &logits, CLASSES).unwrap(),
        TensorView::scalar("loss", Role::Loss, &loss),
        TensorView::new("grad_logits", Role::Gradient, &dlogits, CLASSES).unwrap(),
        TensorView::new("grad_w", Role::Gradient, &dw, CLASSES).unwrap(),
    ]);
    let first = report.first_non_finite.as_ref().unwrap();
    assert_eq!((first.tensor.as_str(), first.dtype), ("grad_w", DType::F16));
    assert!(first.value.is_infinite());
    assert_eq!(report.cause, Some(Cause::GradientExploded));
    // grad_w is FEATURES × CLASSES, the logits ROWS × CLASSES: no row corresponds, so the triage
    // shows the row holding the largest logit.
    let top = report.top_logits.as_ref().unwrap();
    assert_eq!(top.chosen_by, RowChoice::LargestLogit);
    let range = report.logits.as_ref().unwrap();
    assert_eq!(top.row, range.row);
    assert_eq!(top.entries[0].value, range.largest.unwrap());
    let text = report.to_string();
    println!("{text}");
    for needle in [
        "`grad_w`",
        "exploded gradient",
        "`loss` is finite",
        "loss scaler",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    assert_eq!(
        serde_json::to_value(&report).unwrap()["cause"],
        "gradient_exploded"
    );
}

#[test]
fn a_healthy_step_has_no_culprit() {
    let x = input();
    let mut logits: Vec<f32> = linear(&x, &weights());
    logits[CLASSES + 4] = f32::NEG_INFINITY; // a masked class is not a fault
    let mut dlogits = vec![0.0f32; ROWS * CLASSES];
    let out = cross_entropy_with_grad(
        &logits,
        CLASSES,
        Targets::Classes(&TARGETS),
        &CrossEntropyOptions::default(),
        GradOutput::Scalar(1.0),
        &mut dlogits,
    )
    .unwrap();
    let dw: Vec<f32> = weight_grad(&x, &dlogits);
    let report = triage(&[
        TensorView::new("input", Role::Input, &x, FEATURES).unwrap(),
        TensorView::new("logits", Role::Logits, &logits, CLASSES).unwrap(),
        TensorView::scalar("loss", Role::Loss, &out.loss),
        TensorView::new("grad_logits", Role::Gradient, &dlogits, CLASSES).unwrap(),
        TensorView::new("grad_w", Role::Gradient, &dw, CLASSES).unwrap(),
    ]);
    assert!(report.is_healthy());
    assert_eq!(report.cause, None);
    assert!(report.top_logits.is_none() && report.non_finite_tensors.is_empty());
    assert!(!report.logits.as_ref().unwrap().exceeds_threshold);
    let text = report.to_string();
    println!("{text}");
    assert!(
        text.contains("healthy") && text.contains("`logits`"),
        "{text}"
    );
    let json = serde_json::to_value(&report).unwrap();
    assert!(json["first_non_finite"].is_null() && json["cause"].is_null());
    assert_eq!(json["tensors"], 5);
}
