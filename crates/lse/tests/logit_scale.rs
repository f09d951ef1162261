//! `CrossEntropyOptions::logit_scale` (a temperature's `1/T`, applied inside the kernel): the
//! loss and gradient of the logits `s·x` (rounded once to `f64`) against the 192-bit oracle on
//! those logits (the gradient with respect to `x` carrying the factor `s`), within the accuracy
//! targets of docs/numerics.md, in every dtype, on rows long enough for every kernel's blocks;
//! scaled and soft-capped against soft-capping the pre-scaled logits; masks, saturation,
//! argmax and the linear loss.

use lse::{
    cross_entropy, cross_entropy_in_place, cross_entropy_with_grad, linear_cross_entropy,
    CrossEntropyOptions, DType, Element, GradOutput, LinearCrossEntropyOptions, LinearHead,
    LseError, Reduction, Targets,
};
use lse_testkit::measure::{bound, measure_of, Measure, Op};
use lse_testkit::oracle::{
    big, logsumexp_f64, mul, normwise_error, to_f64, ulp_error, CeSpec, ExactRow,
};
use lse_testkit::{all_dtypes, rng::Rng, NEG};

all_dtypes!(
    scaled_loss_and_gradient_meet_the_targets,
    scaled_and_capped_is_capping_the_scaled_logits,
    masks_stay_masked_and_the_argmax_is_the_raw_one,
);

const SCALES: [f64; 6] = [0.5, 1.0 / 3.0, 2.0, 1e-3, 10.0, 100.0];

/// Rows of `classes` logits in `E` (N(0, 1)·spread, a few masked), a target on a live class.
fn rows<E: Element>(rng: &mut Rng, rows: usize, classes: usize, spread: f64) -> (Vec<E>, Vec<i64>) {
    let mut x = Vec::with_capacity(rows * classes);
    let mut targets = Vec::with_capacity(rows);
    for _ in 0..rows {
        let mut row: Vec<E> = (0..classes)
            .map(|_| E::from_f64(spread * rng.normal()))
            .collect();
        for _ in 0..classes / 8 {
            row[rng.below(classes)] = E::from_f64(NEG);
        }
        let t = rng.below(classes);
        row[t] = E::from_f64(spread * rng.normal());
        x.extend(row);
        targets.push(t as i64);
    }
    (x, targets)
}

/// The logits the kernel works on: `s·x` rounded once in `f64` (no saturation at these sizes).
fn scaled<E: Element>(row: &[E], s: f64) -> Vec<f64> {
    row.iter().map(|v| v.to_f64() * s).collect()
}

fn scaled_loss_and_gradient_meet_the_targets<E: Element>() {
    let dtype = E::DTYPE;
    let stat = Op::CeLoss.output_dtype(dtype);
    let mut rng = Rng::new(21);
    let mut worst = (0.0f64, 0.0f64);
    for (classes, spread) in [(7, 3.0), (300, 8.0), (3000, 3.0), (600, 200.0)] {
        let (x, targets) = rows::<E>(&mut rng, 3, classes, spread);
        for s in SCALES {
            for (smoothing, z_loss) in [(0.0, 0.0), (0.0, 1e-3), (0.1, 0.0)] {
                // f64 sets itself no target with options whose gradient cancels (smoothing).
                let op = if smoothing > 0.0 {
                    Op::CeGradOptions
                } else {
                    Op::CeGrad
                };
                let options = CrossEntropyOptions {
                    logit_scale: s,
                    label_smoothing: smoothing,
                    z_loss,
                    reduction: Reduction::None,
                    ..Default::default()
                };
                let mut grad = vec![E::zero(); x.len()];
                let out = cross_entropy_with_grad(
                    &x,
                    classes,
                    Targets::Classes(&targets),
                    &options,
                    GradOutput::default(),
                    &mut grad,
                )
                .unwrap();
                let row_loss = out.row_loss.unwrap();
                for r in 0..targets.len() {
                    let xr = &x[r * classes..(r + 1) * classes];
                    let exact = ExactRow::new(&scaled(xr, s)).ce(&CeSpec {
                        target: Some(targets[r] as usize),
                        label_smoothing: smoothing,
                        z_loss,
                        ..Default::default()
                    });
                    let what =
                        format!("{dtype} classes {classes} s {s} ε {smoothing} z {z_loss} row {r}");
                    let loss_err = ulp_error(row_loss[r].into(), &exact.loss, stat);
                    assert!(
                        loss_err <= bound(Op::CeLoss, dtype).max(3.0),
                        "{what}: loss {} off by {loss_err} ulp",
                        row_loss[r]
                    );
                    // ∂/∂x = s · ∂/∂(s·x), exact in the oracle.
                    let want: Vec<_> = exact.grad.iter().map(|g| mul(g, &big(s))).collect();
                    let got: Vec<f64> = grad[r * classes..(r + 1) * classes]
                        .iter()
                        .map(|g| g.to_f64())
                        .collect();
                    let grad_bound =
                        bound(op, dtype).min(if dtype == DType::F64 { 8.0 } else { f64::MAX });
                    let grad_err = match measure_of(op, dtype) {
                        Measure::Normwise => normwise_error(&got, &want, dtype).0,
                        _ => got
                            .iter()
                            .zip(&want)
                            .map(|(&g, w)| ulp_error(g, w, dtype))
                            .fold(0.0, f64::max),
                    };
                    assert!(
                        grad_err <= grad_bound,
                        "{what}: gradient off by {grad_err} ulp (bound {grad_bound}); e.g. {} vs {}",
                        got[targets[r] as usize],
                        to_f64(&want[targets[r] as usize])
                    );
                    worst = (worst.0.max(loss_err), worst.1.max(grad_err));
                }
            }
        }
    }
    eprintln!(
        "{dtype}: worst loss {} ulp, gradient {} ulp",
        worst.0, worst.1
    );
}

/// `softcap` after `logit_scale` maps `x` as soft-capping `s·x` does: with `f64` logits the
/// pre-scaled row is the same bits, so the losses are bit for bit those of capping it, and the
/// gradients differ by the factor `s` (one rounding).
fn scaled_and_capped_is_capping_the_scaled_logits<E: Element>() {
    let mut rng = Rng::new(22);
    let classes = 2500;
    let (x, targets) = rows::<E>(&mut rng, 4, classes, 40.0);
    for s in SCALES {
        let options = CrossEntropyOptions {
            logit_scale: s,
            softcap: Some(30.0),
            label_smoothing: 0.1,
            reduction: Reduction::Sum,
            keep_row_loss: true,
            ..Default::default()
        };
        let pre: Vec<f64> = scaled(&x, s);
        let capped = CrossEntropyOptions {
            logit_scale: 1.0,
            ..options
        };
        let mut g = vec![E::zero(); x.len()];
        let mut g_pre = vec![0.0f64; x.len()];
        let t = Targets::Classes(&targets);
        let a = cross_entropy_with_grad(&x, classes, t, &options, GradOutput::default(), &mut g);
        let t = Targets::Classes(&targets);
        let b =
            cross_entropy_with_grad(&pre, classes, t, &capped, GradOutput::default(), &mut g_pre);
        let (a, b) = (a.unwrap(), b.unwrap());
        let u = Op::CeLoss.output_dtype(E::DTYPE).unit_roundoff();
        for (r, (&la, &lb)) in a
            .row_loss
            .unwrap()
            .iter()
            .zip(&b.row_loss.unwrap())
            .enumerate()
        {
            let (la, lb): (f64, f64) = (la.into(), lb);
            assert!(
                (la - lb).abs() <= 4.0 * u * lb.abs(),
                "{} s {s} row {r}: {la} vs {lb}",
                E::DTYPE
            );
        }
        let ud = E::DTYPE.unit_roundoff();
        let largest = g_pre.iter().fold(0.0f64, |m, v| m.max((s * v).abs()));
        for (i, (ga, gb)) in g.iter().zip(&g_pre).enumerate() {
            let want = s * gb;
            assert!(
                (ga.to_f64() - want).abs() <= 8.0 * ud * largest + E::DTYPE.min_positive_normal(),
                "{} s {s} gradient {i}: {} vs {want}",
                E::DTYPE,
                ga.to_f64()
            );
        }
    }
}

fn masks_stay_masked_and_the_argmax_is_the_raw_one<E: Element>() {
    let x: Vec<E> = [1.0, NEG, 4.0, 4.0, -2.0, NEG].map(E::from_f64).to_vec();
    let options = CrossEntropyOptions {
        logit_scale: 0.25,
        keep_row_argmax: true,
        keep_row_lse: true,
        ..Default::default()
    };
    let mut grad = x.clone();
    let out = cross_entropy_in_place(
        &mut grad,
        6,
        Targets::Classes(&[3]),
        &options,
        GradOutput::default(),
    )
    .unwrap();
    assert_eq!(out.row_argmax, Some(vec![2]));
    assert_eq!(grad[1].to_f64(), 0.0);
    assert_eq!(grad[5].to_f64(), 0.0);
    // lse of (0.25, 1, 1, -0.5) over the live classes.
    let want = [0.25f64, 1.0, 1.0, -0.5]
        .iter()
        .map(|v| v.exp())
        .sum::<f64>()
        .ln();
    let got: f64 = out.row_lse.unwrap()[0].into();
    assert!(
        (got - want).abs() <= 4.0 * Op::LogSumExp.output_dtype(E::DTYPE).unit_roundoff() * want
    );
    // The gradient carries the scale: 0.25·(p − onehot).
    let p3 = 1f64.exp() / want.exp();
    let g3 = grad[3].to_f64();
    assert!(
        (g3 - 0.25 * (p3 - 1.0)).abs() <= 2.0 * E::DTYPE.unit_roundoff() * 0.25,
        "{g3}"
    );
    // Out of its domain: a typed error naming the option.
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let options = CrossEntropyOptions {
            logit_scale: bad,
            ..Default::default()
        };
        let err = cross_entropy(&x, 6, Targets::Classes(&[3]), &options).unwrap_err();
        assert!(
            matches!(
                err,
                LseError::BadOption {
                    name: "logit_scale",
                    ..
                }
            ),
            "{err:?}"
        );
    }
}

/// `f64` logits whose scaled value passes `f64::MAX` saturate there: a finite loss and gradient.
#[test]
fn scaled_f64_logits_saturate_finite() {
    let x = [f64::MAX / 2.0, 1.0, -f64::MAX / 2.0];
    let options = CrossEntropyOptions {
        logit_scale: 4.0,
        reduction: Reduction::Sum,
        ..Default::default()
    };
    let mut grad = [0.0; 3];
    let out = cross_entropy_with_grad(
        &x,
        3,
        Targets::Classes(&[1]),
        &options,
        GradOutput::default(),
        &mut grad,
    )
    .unwrap();
    // s·x = (MAX, 4, -MAX): loss MAX − 4 (+ log1p of nothing that counts).
    assert_eq!(out.loss, f64::MAX - 4.0);
    assert!(grad.iter().all(|g| g.is_finite()), "{grad:?}");
    assert_eq!(grad, [4.0, -4.0, 0.0]);
}

/// The fused linear loss scales the logits it forms: the same as [`cross_entropy`] with the
/// scale on those logits, against an `f64` reference of `s·(H·Wᵀ)`.
#[test]
fn linear_loss_scales_its_logits() {
    let mut rng = Rng::new(23);
    let (rows, dim, classes) = (20, 16, 700);
    let hidden: Vec<f32> = (0..rows * dim).map(|_| rng.normal() as f32).collect();
    let weight: Vec<f32> = (0..classes * dim).map(|_| rng.normal() as f32).collect();
    let targets: Vec<i64> = (0..rows).map(|r| (r * 31 % classes) as i64).collect();
    let s = 0.5;
    let options = LinearCrossEntropyOptions {
        cross_entropy: CrossEntropyOptions {
            logit_scale: s,
            ..Default::default()
        },
        budget_bytes: 3 * classes * 4,
    };
    let head = LinearHead {
        weight: &weight,
        bias: None,
        classes,
    };
    let got = linear_cross_entropy(&hidden, head, Targets::Classes(&targets), &options).unwrap();
    let mut want = 0.0;
    for r in 0..rows {
        let z: Vec<f64> = (0..classes)
            .map(|c| {
                s * (0..dim)
                    .map(|k| f64::from(hidden[r * dim + k]) * f64::from(weight[c * dim + k]))
                    .sum::<f64>()
            })
            .collect();
        want += logsumexp_f64(&z) - z[targets[r] as usize];
    }
    want /= rows as f64;
    assert!(
        (f64::from(got.loss) - want).abs() <= 1e-5 * want,
        "{} vs {want}",
        got.loss
    );
}
