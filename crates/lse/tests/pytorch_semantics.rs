//! PyTorch's cross-entropy semantics where they go beyond probabilities and non-negative
//! weights: any finite class weights and target values (the loss is linear in both), the
//! gradient with respect to probability targets, and IEEE's logsumexp of a row with `+inf`.
//! References are the definitions written out in `f64` here, and central differences.

use lse::{
    cross_entropy, cross_entropy_target_grad, cross_entropy_with_grad, logsumexp_with,
    CrossEntropyOptions, GradOutput, NonFinite, Reduction, Targets,
};

const ROWS: usize = 3;
const CLASSES: usize = 4;
#[rustfmt::skip]
const LOGITS: [f64; ROWS * CLASSES] = [
    2.0, -1.0, 0.5, 3.0,
    -4.0, 1.0, 1.5, 0.0,
    7.0, -8.5, -8.0, 0.25,
];
/// Mixed signs, a zero: PyTorch accepts any finite weight.
const WEIGHTS: [f64; CLASSES] = [8.5, -0.75, 0.0, 2.0];
/// Rows that do not sum to 1, negative values: PyTorch accepts any finite target.
#[rustfmt::skip]
const PROBABILITIES: [f64; ROWS * CLASSES] = [
    0.5, -0.25, 0.5, 0.25,
    1.5, 0.0, -2.0, 0.5,
    0.1, 0.2, 0.3, 0.4,
];

/// PyTorch's definition in `f64`: `Σ_c w_c q'_c (lse − x̃_c)` with `q' = (1 − ε) q + ε / C`,
/// plus `z · lse²`, reduced (the mean of probability targets divides by the row count; that of
/// class targets by the summed weight of the targets).
fn definition(targets: &Targets<'_, f64>, options: &CrossEntropyOptions<'_>) -> f64 {
    let eps = options.label_smoothing;
    let weight = |c: usize| options.weights.map_or(1.0, |w| w[c]);
    let (mut total, mut denominator) = (0.0, 0.0);
    for r in 0..ROWS {
        let x: Vec<f64> = LOGITS[r * CLASSES..(r + 1) * CLASSES]
            .iter()
            .map(|&v| options.softcap.map_or(v, |cap| cap * (v / cap).tanh()))
            .collect();
        let lse = x.iter().map(|v| v.exp()).sum::<f64>().ln();
        let q = |c: usize| match targets {
            Targets::Probabilities(p) => p[r * CLASSES + c],
            Targets::Classes(t) => f64::from(u8::from(t[r] as usize == c)),
        };
        let row: f64 = (0..CLASSES)
            .map(|c| weight(c) * ((1.0 - eps) * q(c) + eps / CLASSES as f64) * (lse - x[c]))
            .sum();
        total += row + options.z_loss * lse * lse;
        denominator += match targets {
            Targets::Probabilities(_) => 1.0,
            Targets::Classes(t) => weight(t[r] as usize),
        };
    }
    match options.reduction {
        Reduction::Mean => total / denominator,
        _ => total,
    }
}

fn option_sets(weights: &[f64]) -> Vec<CrossEntropyOptions<'_>> {
    let base = CrossEntropyOptions::default();
    vec![
        base,
        CrossEntropyOptions {
            weights: Some(weights),
            ..base
        },
        CrossEntropyOptions {
            weights: Some(weights),
            label_smoothing: 0.3,
            reduction: Reduction::Sum,
            ..base
        },
        CrossEntropyOptions {
            weights: Some(weights),
            label_smoothing: 0.1,
            z_loss: 1e-2,
            softcap: Some(5.0),
            ..base
        },
    ]
}

#[test]
fn any_finite_weights_and_targets_give_pytorchs_loss() {
    let classes = [3i64, 1, 0];
    for options in option_sets(&WEIGHTS) {
        for targets in [
            Targets::Probabilities(&PROBABILITIES[..]),
            Targets::Classes(&classes[..]),
        ] {
            let want = definition(&targets, &options);
            let got = cross_entropy(&LOGITS, CLASSES, targets, &options).unwrap();
            assert!(
                (got.loss - want).abs() <= 1e-13 * want.abs().max(1.0),
                "{options:?} {targets:?}: {} vs {want}",
                got.loss
            );
            // The loss through the fused gradient path is the same value.
            let mut grad = [0.0; ROWS * CLASSES];
            let fused = cross_entropy_with_grad(
                &LOGITS,
                CLASSES,
                targets,
                &options,
                GradOutput::Scalar(1.0),
                &mut grad,
            )
            .unwrap();
            assert_eq!(fused.loss.to_bits(), got.loss.to_bits());
        }
    }
}

/// A naive control for the test above: dropping the negative masses (what the kernels did
/// before they took PyTorch's rule) is far from the definition.
#[test]
fn dropping_negative_masses_is_detectably_wrong() {
    let options = CrossEntropyOptions {
        weights: Some(&WEIGHTS),
        label_smoothing: 0.3,
        ..Default::default()
    };
    let clipped: Vec<f64> = WEIGHTS.iter().map(|w| w.max(0.0)).collect();
    let targets = Targets::Probabilities(&PROBABILITIES[..]);
    let want = definition(&targets, &options);
    let wrong = definition(
        &targets,
        &CrossEntropyOptions {
            weights: Some(&clipped),
            ..options
        },
    );
    assert!((wrong - want).abs() > 1e-3);
}

#[test]
fn target_gradient_is_the_central_difference_of_the_loss() {
    for options in option_sets(&WEIGHTS) {
        for reduction in [Reduction::Mean, Reduction::Sum] {
            let options = CrossEntropyOptions {
                reduction,
                ..options
            };
            let mut dq = [0.0; ROWS * CLASSES];
            cross_entropy_target_grad(
                &LOGITS,
                CLASSES,
                &PROBABILITIES,
                &options,
                GradOutput::Scalar(1.5),
                &mut dq,
            )
            .unwrap();
            for i in 0..ROWS * CLASSES {
                // The loss is linear in q: the central difference is exact up to rounding.
                let h = 0.25;
                let at = |delta: f64| {
                    let mut q = PROBABILITIES;
                    q[i] += delta;
                    cross_entropy(&LOGITS, CLASSES, Targets::Probabilities(&q), &options)
                        .unwrap()
                        .loss
                };
                let want = 1.5 * (at(h) - at(-h)) / (2.0 * h);
                assert!(
                    (dq[i] - want).abs() <= 1e-12 * want.abs().max(1.0),
                    "{options:?} element {i}: {} vs {want}",
                    dq[i]
                );
            }
        }
    }
}

#[test]
fn target_gradient_per_row_and_in_half_types() {
    let options = CrossEntropyOptions {
        reduction: Reduction::None,
        weights: Some(&WEIGHTS),
        ..Default::default()
    };
    let g = [1.0, -2.0, 0.5];
    let mut per_row = [0.0; ROWS * CLASSES];
    cross_entropy_target_grad(
        &LOGITS,
        CLASSES,
        &PROBABILITIES,
        &options,
        GradOutput::PerRow(&g),
        &mut per_row,
    )
    .unwrap();
    let mut unit = [0.0; ROWS * CLASSES];
    cross_entropy_target_grad(
        &LOGITS,
        CLASSES,
        &PROBABILITIES,
        &options,
        GradOutput::Scalar(1.0),
        &mut unit,
    )
    .unwrap();
    for (i, (&a, &b)) in per_row.iter().zip(&unit).enumerate() {
        assert_eq!(a, g[i / CLASSES] * b);
    }
    // f32 logits: the f64 result rounded once.
    let x32: Vec<f32> = LOGITS.iter().map(|&v| v as f32).collect();
    let q32: Vec<f32> = PROBABILITIES.iter().map(|&v| v as f32).collect();
    let mut d32 = vec![0.0f32; x32.len()];
    cross_entropy_target_grad(
        &x32,
        CLASSES,
        &q32,
        &options,
        GradOutput::Scalar(1.0),
        &mut d32,
    )
    .unwrap();
    for (&a, &b) in d32.iter().zip(&unit) {
        assert!((f64::from(a) - b).abs() <= 2.0 * f64::from(f32::EPSILON) * b.abs().max(1e-30));
    }
}

#[test]
fn target_gradient_errors_and_masked_classes() {
    let mut bad = LOGITS;
    bad[5] = f64::NAN;
    let mut dq = [0.0; ROWS * CLASSES];
    let options = CrossEntropyOptions::default();
    let e = cross_entropy_target_grad(
        &bad,
        CLASSES,
        &PROBABILITIES,
        &options,
        GradOutput::Scalar(1.0),
        &mut dq,
    )
    .unwrap_err();
    assert!(matches!(
        e,
        lse::LseError::NonFinite {
            row: 1,
            column: 1,
            ..
        }
    ));
    let propagate = CrossEntropyOptions {
        non_finite: NonFinite::Propagate,
        ..options
    };
    cross_entropy_target_grad(
        &bad,
        CLASSES,
        &PROBABILITIES,
        &propagate,
        GradOutput::Scalar(1.0),
        &mut dq,
    )
    .unwrap();
    assert!(dq[4..8].iter().all(|v| v.is_nan()) && dq[..4].iter().all(|v| v.is_finite()));
    // A masked class: moving target mass there makes the loss infinite.
    let mut masked = LOGITS;
    masked[2] = f64::NEG_INFINITY;
    cross_entropy_target_grad(
        &masked,
        CLASSES,
        &PROBABILITIES,
        &options,
        GradOutput::Scalar(1.0),
        &mut dq,
    )
    .unwrap();
    assert_eq!(dq[2], f64::INFINITY);
    let mut nan_target = PROBABILITIES;
    nan_target[7] = f64::NAN;
    let e = cross_entropy_target_grad(
        &LOGITS,
        CLASSES,
        &nan_target,
        &options,
        GradOutput::Scalar(1.0),
        &mut dq,
    )
    .unwrap_err();
    assert!(matches!(
        e,
        lse::LseError::BadProbability {
            row: 1,
            column: 3,
            ..
        }
    ));
}

#[test]
fn logsumexp_of_a_row_with_plus_inf_is_plus_inf_under_propagate() {
    let (inf, nan) = (f32::INFINITY, f32::NAN);
    let rows = [
        [1.0, inf, 0.0],
        [inf, inf, f32::NEG_INFINITY],
        [nan, 1.0, 0.0],
        [inf, nan, 0.0],
        [1.0, 2.0, 3.0],
    ];
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    let mut out = [0.0f32; 5];
    logsumexp_with(&flat, 3, &mut out, NonFinite::Propagate).unwrap();
    assert_eq!(out[0], f32::INFINITY);
    assert_eq!(out[1], f32::INFINITY);
    assert!(out[2].is_nan() && out[3].is_nan());
    assert!((out[4] - 3.407_606).abs() < 1e-5);
}
