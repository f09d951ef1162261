//! Gradient correctness of the fused cross-entropy and of the softmax / log_softmax backward
//! passes, against central finite differences in `f64`, and of the forward loss against an
//! independent `f64` reference written here.
//!
//! # Finite-difference tolerance
//!
//! For an objective `F` evaluated by the library in `f64`, the central difference with step `h`
//! has two errors:
//! - truncation: `|(F(x+h) − F(x−h)) / 2h − F'(x)| ≤ h² · max|F'''| / 6`;
//! - rounding: each evaluation of `F` carries a relative error of a few ulps (compensated sums,
//!   one `exp`/`log1p` per term), so the difference quotient is off by about
//!   `2 · k · u · |F| / 2h` with `u = 2^-53` and `k` a small constant.
//!
//! With `h = 1e-6 · max(1, |x|)` the rounding term is about `1e-10 · k · |F| / max(1, |x|)` and
//! the truncation term about `1e-12 · max(1, |x|)² · max|F'''| / 6`. For the data used here
//! (logits with spread ~3, `|x| ≤ ~15`, class weights ≤ 2, `|g| ≤ 2`, z-loss ≤ 0.05, caps ≥ 4) the
//! third derivative of the loss with respect to one logit is below ~100, so the truncation term
//! stays below ~2e-8 · max(1, |x|)² / 100 … we budget `1e-8 · max(1, |x|)²` for it, and
//! `64 · u · (|F| + 1) / h` for rounding (k = 32 with a factor-2 margin). A gradient entry passes
//! when `|g − fd| ≤ that + 1e-8 · |fd|`. Gradient entries here are O(1e-3 … 1), so this still
//! checks six to eight significant digits.

use lse::{
    cross_entropy, cross_entropy_in_place, cross_entropy_with_grad, log_softmax,
    log_softmax_backward, logsumexp, softmax, softmax_backward, CrossEntropyOptions,
    CrossEntropyOutput, DType, Element, GradOutput, Reduction, Targets,
};
use lse_testkit::rng::Rng;

use half::{bf16, f16};

const IGNORE: i64 = -100;
const U64: f64 = f64::EPSILON / 2.0;

// ---------------------------------------------------------------------------------------------
/// The kit's generator on `seed`, mixed with this file's constant (the streams these tests were
/// written against).
fn rng(seed: u64) -> Rng {
    Rng::new(seed ^ 0x5DEE_CE66_D1CE_4E5B)
}

// ---------------------------------------------------------------------------------------------
// Test problems.

/// How the incoming gradient is given.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Go {
    Scalar(f64),
    /// Random per-row values; needs `Reduction::None`.
    PerRow,
}

/// Which cross-entropy options a case exercises.
#[derive(Clone, Copy, Debug)]
struct Spec {
    weights: bool,
    smoothing: f64,
    z_loss: f64,
    softcap: Option<f64>,
    probs: bool,
    ignore: bool,
    mask: bool,
    reduction: Reduction,
    grad: Go,
}

const PLAIN: Spec = Spec {
    weights: false,
    smoothing: 0.0,
    z_loss: 0.0,
    softcap: None,
    probs: false,
    ignore: false,
    mask: false,
    reduction: Reduction::Mean,
    grad: Go::Scalar(1.0),
};

/// One batch: logits, targets and everything the options point to.
#[derive(Clone, Debug)]
struct Problem {
    rows: usize,
    classes: usize,
    logits: Vec<f64>,
    targets: Vec<i64>,
    probs: Vec<f64>,
    weights: Vec<f64>,
    row_grads: Vec<f64>,
}

impl Problem {
    fn generate(rng: &mut Rng, spec: &Spec, rows: usize, classes: usize) -> Self {
        let c = classes;
        let mut logits = vec![0.0; rows * c];
        let mut targets = vec![0i64; rows];
        let mut probs = vec![0.0; rows * c];
        for r in 0..rows {
            let row = &mut logits[r * c..(r + 1) * c];
            for x in row.iter_mut() {
                *x = 3.0 * rng.normal();
            }
            if spec.mask {
                for x in row.iter_mut() {
                    if rng.chance(0.3) {
                        *x = f64::NEG_INFINITY;
                    }
                }
                if row.iter().all(|&x| x == f64::NEG_INFINITY) {
                    row[rng.below(c)] = 3.0 * rng.normal();
                }
            }
            let live: Vec<usize> = (0..c).filter(|&i| row[i] > f64::NEG_INFINITY).collect();
            targets[r] = live[rng.below(live.len())] as i64;
            // Probability rows: random mass on live classes, not necessarily summing to 1.
            let q = &mut probs[r * c..(r + 1) * c];
            for &i in &live {
                q[i] = if rng.chance(0.2) { 0.0 } else { rng.uniform() };
            }
            let total: f64 = q.iter().sum();
            let scale = if rng.chance(0.5) {
                1.0
            } else {
                rng.range(0.5, 1.5)
            };
            if total > 0.0 {
                q.iter_mut().for_each(|v| *v *= scale / total);
            }
        }
        if spec.ignore && !spec.probs {
            // Ignore about a third of the rows, but keep at least one; ignored rows may hold
            // anything, NaN and +inf included.
            for r in 1..rows {
                if rng.chance(0.35) {
                    targets[r] = IGNORE;
                    let row = &mut logits[r * c..(r + 1) * c];
                    match rng.below(3) {
                        0 => row[rng.below(c)] = f64::NAN,
                        1 => row[rng.below(c)] = f64::INFINITY,
                        _ => {}
                    }
                }
            }
            if rows > 1 && !targets.contains(&IGNORE) {
                targets[rows - 1] = IGNORE;
                logits[(rows - 1) * c] = f64::NAN;
            }
        }
        let weights = (0..c)
            .map(|_| {
                if rng.chance(0.1) {
                    0.0
                } else {
                    rng.range(0.2, 2.0)
                }
            })
            .collect();
        let row_grads = (0..rows).map(|_| rng.range(-2.0, 2.0)).collect();
        Problem {
            rows,
            classes,
            logits,
            targets,
            probs,
            weights,
            row_grads,
        }
    }

    fn options<'a>(&'a self, spec: &Spec) -> CrossEntropyOptions<'a> {
        CrossEntropyOptions {
            weights: spec.weights.then_some(&self.weights[..]),
            label_smoothing: spec.smoothing,
            z_loss: spec.z_loss,
            softcap: spec.softcap,
            reduction: spec.reduction,
            keep_row_loss: true,
            keep_row_lse: true,
            ..Default::default()
        }
    }

    fn targets<'a>(&'a self, spec: &Spec) -> Targets<'a, f64> {
        if spec.probs {
            Targets::Probabilities(&self.probs)
        } else {
            Targets::Classes(&self.targets)
        }
    }

    fn grad_output<'a>(&'a self, spec: &Spec) -> GradOutput<'a, f64> {
        match spec.grad {
            Go::Scalar(g) => GradOutput::Scalar(g),
            Go::PerRow => GradOutput::PerRow(&self.row_grads),
        }
    }

    fn ignored(&self, spec: &Spec, r: usize) -> bool {
        !spec.probs && self.targets[r] == IGNORE
    }

    fn weight(&self, spec: &Spec, c: usize) -> f64 {
        if spec.weights {
            self.weights[c]
        } else {
            1.0
        }
    }

    /// The library's loss of `logits` (the same shape as `self.logits`).
    fn loss_of(&self, spec: &Spec, logits: &[f64]) -> CrossEntropyOutput<f64> {
        cross_entropy(
            logits,
            self.classes,
            self.targets(spec),
            &self.options(spec),
        )
        .expect("cross_entropy")
    }

    /// The scalar whose gradient `cross_entropy_with_grad` returns: `g · loss`, or
    /// `Σ_r g_r · loss_r` for a per-row output gradient.
    fn objective(&self, spec: &Spec, logits: &[f64]) -> f64 {
        let out = self.loss_of(spec, logits);
        match spec.grad {
            Go::Scalar(g) => g * out.loss,
            Go::PerRow => {
                let rl = out.row_loss.expect("row losses with Reduction::None");
                rl.iter().zip(&self.row_grads).map(|(l, g)| l * g).sum()
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Independent f64 reference.

fn cap(x: f64, softcap: Option<f64>) -> f64 {
    match softcap {
        Some(c) if x > f64::NEG_INFINITY => c * (x / c).tanh(),
        _ => x,
    }
}

struct Reference {
    row_loss: Vec<f64>,
    row_lse: Vec<f64>,
    denominator: f64,
    loss: f64,
}

/// The textbook definition, two passes with a max shift:
/// `loss_r = Σ_c w_c q_c (lse − x_c) + z·lse²` with `lse − x_c = (m − x_c) + log1p(s')`,
/// `s' = Σ_{i≠k} exp(x_i − m)`, `q` smoothed as `(1−ε)·q + ε/K` over the `K` live classes.
fn reference(p: &Problem, spec: &Spec) -> Reference {
    let c = p.classes;
    let mut row_loss = vec![0.0; p.rows];
    let mut row_lse = vec![f64::NAN; p.rows];
    let mut denominator = 0.0;
    for r in 0..p.rows {
        if p.ignored(spec, r) {
            continue;
        }
        let x: Vec<f64> = p.logits[r * c..(r + 1) * c]
            .iter()
            .map(|&v| cap(v, spec.softcap))
            .collect();
        let live: Vec<usize> = (0..c).filter(|&i| x[i] > f64::NEG_INFINITY).collect();
        let k = live.len() as f64;
        let m = live.iter().map(|&i| x[i]).fold(f64::NEG_INFINITY, f64::max);
        let argmax = *live.iter().find(|&&i| x[i] == m).unwrap();
        let s: f64 = live
            .iter()
            .filter(|&&i| i != argmax)
            .map(|&i| (x[i] - m).exp())
            .sum();
        let log_norm = s.ln_1p();
        let lse = m + log_norm;
        let mut loss = 0.0;
        for &i in &live {
            let q = if spec.probs {
                p.probs[r * c + i]
            } else {
                f64::from(u8::from(i as i64 == p.targets[r]))
            };
            let q = (1.0 - spec.smoothing) * q + spec.smoothing / k;
            loss += p.weight(spec, i) * q * ((m - x[i]) + log_norm);
        }
        loss += spec.z_loss * lse * lse;
        row_loss[r] = loss;
        row_lse[r] = lse;
        denominator += if spec.probs {
            1.0
        } else {
            p.weight(spec, p.targets[r] as usize)
        };
    }
    let total: f64 = row_loss.iter().sum();
    let loss = match spec.reduction {
        Reduction::Mean if denominator == 0.0 => 0.0,
        Reduction::Mean => total / denominator,
        Reduction::Sum | Reduction::None => total,
    };
    Reference {
        row_loss,
        row_lse,
        denominator,
        loss,
    }
}

#[track_caller]
fn assert_rel(what: &str, got: f64, want: f64, rel: f64, ctx: &dyn std::fmt::Debug) {
    let ok = if want.is_nan() {
        got.is_nan()
    } else {
        (got - want).abs() <= rel * want.abs()
    };
    assert!(
        ok,
        "{what}: got {got:e}, want {want:e} (rel {rel:e}); {ctx:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Checks.

/// Forward: reduced loss, row losses, row lse and denominator against the reference to 1e-12.
/// The reference sums at most 50 non-negative terms of relative error ~2u each, so it is good to
/// ~60u ≈ 7e-15; the library is better still.
fn check_forward(p: &Problem, spec: &Spec) {
    let want = reference(p, spec);
    let got = p.loss_of(spec, &p.logits);
    let ctx = (spec, p);
    assert_rel("loss", got.loss, want.loss, 1e-12, &ctx);
    assert_rel(
        "denominator",
        got.denominator,
        want.denominator,
        1e-14,
        &ctx,
    );
    let rl = got.row_loss.as_ref().unwrap();
    let rlse = got.row_lse.as_ref().unwrap();
    for r in 0..p.rows {
        assert_rel("row loss", rl[r], want.row_loss[r], 1e-12, &(r, ctx));
        assert_rel("row lse", rlse[r], want.row_lse[r], 1e-12, &(r, ctx));
    }
}

/// Gradient: against central differences of the objective (see the module docs for the
/// tolerance), exact zeros on ignored rows and masked classes, and the in-place variant bitwise
/// equal to the out-of-place one. Returns the largest |gradient| seen, so callers can check that
/// the comparison was not vacuous.
fn check_gradient(p: &Problem, spec: &Spec) -> f64 {
    let c = p.classes;
    let mut grad = vec![f64::NAN; p.logits.len()];
    let out = cross_entropy_with_grad(
        &p.logits,
        c,
        p.targets(spec),
        &p.options(spec),
        p.grad_output(spec),
        &mut grad,
    )
    .expect("cross_entropy_with_grad");

    let mut in_place = p.logits.clone();
    let out_ip = cross_entropy_in_place(
        &mut in_place,
        c,
        p.targets(spec),
        &p.options(spec),
        p.grad_output(spec),
    )
    .expect("cross_entropy_in_place");
    assert_eq!(out_ip.loss.to_bits(), out.loss.to_bits(), "in-place loss");
    for (a, b) in in_place.iter().zip(&grad) {
        assert_eq!(a.to_bits(), b.to_bits(), "in-place gradient; {spec:?}");
    }

    let f0 = p.objective(spec, &p.logits).abs();
    let mut work = p.logits.clone();
    let mut max_abs_grad = 0.0f64;
    for r in 0..p.rows {
        for i in 0..c {
            let at = r * c + i;
            let x = p.logits[at];
            let g = grad[at];
            if p.ignored(spec, r) {
                assert_eq!(g.to_bits(), 0.0f64.to_bits(), "ignored row {r}: {g}");
                continue;
            }
            if x == f64::NEG_INFINITY {
                assert_eq!(g.to_bits(), 0.0f64.to_bits(), "masked class ({r},{i}): {g}");
                continue;
            }
            let h = 1e-6 * x.abs().max(1.0);
            let (xp, xm) = (x + h, x - h);
            work[at] = xp;
            let fp = p.objective(spec, &work);
            work[at] = xm;
            let fm = p.objective(spec, &work);
            work[at] = x;
            let fd = (fp - fm) / (xp - xm);
            let tol =
                64.0 * U64 * (f0 + 1.0) / h + 1e-8 * x.abs().max(1.0).powi(2) + 1e-8 * fd.abs();
            assert!(
                (g - fd).abs() <= tol,
                "gradient ({r},{i}): analytic {g:e}, finite difference {fd:e}, |diff| {:e} > tol {tol:e}\n{spec:?}\n{p:?}",
                (g - fd).abs()
            );
            max_abs_grad = max_abs_grad.max(g.abs());
        }
    }
    max_abs_grad
}

const CLASS_COUNTS: [usize; 7] = [2, 3, 5, 8, 17, 33, 50];

/// Forward and gradient checks of `spec` on several random batches for every class count.
/// Also checks that the comparison was not vacuous: some gradient entry was well away from 0.
fn run(spec: Spec, seeds: u64) {
    let mut largest = 0.0f64;
    for (ci, &classes) in CLASS_COUNTS.iter().enumerate() {
        for seed in 0..seeds {
            let mut rng = rng(seed * 1000 + ci as u64);
            let rows = 2 + rng.below(5);
            let p = Problem::generate(&mut rng, &spec, rows, classes);
            check_forward(&p, &spec);
            largest = largest.max(check_gradient(&p, &spec));
        }
    }
    assert!(
        largest > 1e-2,
        "vacuous gradient check: largest |g| = {largest}; {spec:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// One option at a time.

#[test]
fn grad_plain() {
    run(PLAIN, 6);
}

#[test]
fn grad_class_weights() {
    run(
        Spec {
            weights: true,
            ..PLAIN
        },
        6,
    );
}

#[test]
fn grad_label_smoothing() {
    for eps in [0.1, 0.5, 1.0] {
        run(
            Spec {
                smoothing: eps,
                ..PLAIN
            },
            4,
        );
    }
}

#[test]
fn grad_z_loss() {
    for z in [1e-4, 0.05] {
        run(Spec { z_loss: z, ..PLAIN }, 4);
    }
}

#[test]
fn grad_softcap() {
    for cap in [4.0, 30.0] {
        run(
            Spec {
                softcap: Some(cap),
                ..PLAIN
            },
            4,
        );
    }
}

#[test]
fn grad_probability_targets() {
    run(
        Spec {
            probs: true,
            ..PLAIN
        },
        6,
    );
}

#[test]
fn grad_probability_targets_with_smoothing() {
    run(
        Spec {
            probs: true,
            smoothing: 0.2,
            ..PLAIN
        },
        4,
    );
}

#[test]
fn grad_probability_targets_with_weights() {
    run(
        Spec {
            probs: true,
            weights: true,
            ..PLAIN
        },
        4,
    );
}

#[test]
fn grad_probability_targets_with_smoothing_and_weights() {
    run(
        Spec {
            probs: true,
            weights: true,
            smoothing: 0.3,
            ..PLAIN
        },
        4,
    );
}

#[test]
fn grad_ignored_rows_are_exactly_zero() {
    // `check_gradient` asserts bitwise +0 on every ignored row (some hold NaN or +inf).
    run(
        Spec {
            ignore: true,
            ..PLAIN
        },
        6,
    );
}

#[test]
fn grad_masked_classes_are_exactly_zero() {
    // `check_gradient` asserts bitwise +0 on every -inf logit.
    run(
        Spec {
            mask: true,
            ..PLAIN
        },
        6,
    );
    run(
        Spec {
            mask: true,
            smoothing: 0.25,
            ..PLAIN
        },
        3,
    );
    run(
        Spec {
            mask: true,
            probs: true,
            ..PLAIN
        },
        3,
    );
}

#[test]
fn grad_reduction_none() {
    run(
        Spec {
            reduction: Reduction::None,
            ..PLAIN
        },
        4,
    );
}

#[test]
fn grad_reduction_sum() {
    run(
        Spec {
            reduction: Reduction::Sum,
            ..PLAIN
        },
        4,
    );
}

#[test]
fn grad_reduction_mean() {
    run(
        Spec {
            reduction: Reduction::Mean,
            weights: true,
            ..PLAIN
        },
        4,
    );
}

#[test]
fn grad_output_scalar_scales_the_gradient() {
    for reduction in [Reduction::None, Reduction::Sum, Reduction::Mean] {
        for g in [-1.75, 0.3] {
            run(
                Spec {
                    reduction,
                    grad: Go::Scalar(g),
                    ..PLAIN
                },
                3,
            );
        }
    }
    // And exactly: g·(gradient for g = 1), since the scale is applied once in f64.
    let mut rng = rng(77);
    let p = Problem::generate(&mut rng, &PLAIN, 4, 9);
    let grad_for = |g: f64| {
        let mut grad = vec![0.0; p.logits.len()];
        let spec = Spec {
            grad: Go::Scalar(g),
            reduction: Reduction::Sum,
            ..PLAIN
        };
        cross_entropy_with_grad(
            &p.logits,
            p.classes,
            p.targets(&spec),
            &p.options(&spec),
            p.grad_output(&spec),
            &mut grad,
        )
        .unwrap();
        grad
    };
    let (one, two) = (grad_for(1.0), grad_for(-2.0));
    for (a, b) in one.iter().zip(&two) {
        assert_eq!(-2.0 * a, *b);
    }
}

#[test]
fn grad_output_per_row_with_reduction_none() {
    run(
        Spec {
            reduction: Reduction::None,
            grad: Go::PerRow,
            ..PLAIN
        },
        6,
    );
    run(
        Spec {
            reduction: Reduction::None,
            grad: Go::PerRow,
            ignore: true,
            weights: true,
            ..PLAIN
        },
        4,
    );
}

// ---------------------------------------------------------------------------------------------
// Everything at once, and every combination.

#[test]
fn grad_all_options_combined() {
    for reduction in [Reduction::None, Reduction::Sum, Reduction::Mean] {
        for probs in [false, true] {
            run(
                Spec {
                    weights: true,
                    smoothing: 0.15,
                    z_loss: 0.01,
                    softcap: Some(6.0),
                    probs,
                    ignore: true,
                    mask: true,
                    reduction,
                    grad: Go::Scalar(0.7),
                },
                3,
            );
        }
    }
    run(
        Spec {
            weights: true,
            smoothing: 0.15,
            z_loss: 0.01,
            softcap: Some(6.0),
            probs: false,
            ignore: true,
            mask: true,
            reduction: Reduction::None,
            grad: Go::PerRow,
        },
        3,
    );
}

/// Every subset of {weights, smoothing, z-loss, softcap, probability targets, ignored rows,
/// masks} × every reduction × {g = 1, g = −0.6, per-row}: forward against the reference and
/// gradient against finite differences, on a few small batches each.
#[test]
fn grad_every_option_combination() {
    let mut checked = 0;
    let mut largest = 0.0f64;
    for bits in 0u32..128 {
        let on = |b: u32| bits & (1 << b) != 0;
        for reduction in [Reduction::None, Reduction::Sum, Reduction::Mean] {
            for grad in [Go::Scalar(1.0), Go::Scalar(-0.6), Go::PerRow] {
                if grad == Go::PerRow && reduction != Reduction::None {
                    continue;
                }
                let spec = Spec {
                    weights: on(0),
                    smoothing: if on(1) { 0.2 } else { 0.0 },
                    z_loss: if on(2) { 0.02 } else { 0.0 },
                    softcap: on(3).then_some(5.0),
                    probs: on(4),
                    ignore: on(5),
                    mask: on(6),
                    reduction,
                    grad,
                };
                for (k, classes) in [2usize, 7, 19].into_iter().enumerate() {
                    let mut rng = rng(u64::from(bits) << 8 | (k as u64) << 4 | 9);
                    let rows = 2 + rng.below(3);
                    let p = Problem::generate(&mut rng, &spec, rows, classes);
                    check_forward(&p, &spec);
                    largest = largest.max(check_gradient(&p, &spec));
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 128 * 7 * 3);
    assert!(largest > 1e-2);
}

/// The forward loss of every option combination against the reference, on more and larger
/// batches than the gradient tests (no finite differences needed here).
#[test]
fn forward_loss_matches_reference_for_every_option_combination() {
    for bits in 0u32..128 {
        let on = |b: u32| bits & (1 << b) != 0;
        for reduction in [Reduction::None, Reduction::Sum, Reduction::Mean] {
            let spec = Spec {
                weights: on(0),
                smoothing: if on(1) { 0.3 } else { 0.0 },
                z_loss: if on(2) { 1e-3 } else { 0.0 },
                softcap: on(3).then_some(8.0),
                probs: on(4),
                ignore: on(5),
                mask: on(6),
                reduction,
                grad: Go::Scalar(1.0),
            };
            for (k, &classes) in CLASS_COUNTS.iter().enumerate() {
                let mut rng = rng(u64::from(bits) << 8 | (k as u64) << 4 | 3);
                let rows = 1 + rng.below(16);
                let p = Problem::generate(&mut rng, &spec, rows, classes);
                check_forward(&p, &spec);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// softmax / log_softmax backward.

/// Random logits (some masked when `mask`) and a random upstream gradient.
fn backward_problem(rng: &mut Rng, classes: usize, mask: bool) -> (Vec<f64>, Vec<f64>) {
    let mut x: Vec<f64> = (0..classes).map(|_| 3.0 * rng.normal()).collect();
    if mask {
        for v in x.iter_mut() {
            if rng.chance(0.3) {
                *v = f64::NEG_INFINITY;
            }
        }
        if x.iter().all(|&v| v == f64::NEG_INFINITY) {
            x[0] = 1.0;
        }
    }
    let dy = (0..classes).map(|_| rng.range(-2.0, 2.0)).collect();
    (x, dy)
}

#[test]
fn softmax_backward_matches_finite_differences() {
    // F(x) = Σ_i dy_i · softmax(x)_i; ∂F/∂x_j = y_j (dy_j − Σ_i y_i dy_i). |F| ≤ max|dy| ≤ 2,
    // and each softmax entry is good to a few ulps, so the rounding part of the FD error is
    // ≤ 64u·(Σ|dy_i y_i| + 1)/h as above.
    for mask in [false, true] {
        for &classes in &CLASS_COUNTS {
            for seed in 0..8 {
                let mut rng = rng(seed * 31 + classes as u64 + u64::from(mask) * 7777);
                let (x, dy) = backward_problem(&mut rng, classes, mask);
                let sm = |x: &[f64]| {
                    let mut y = vec![0.0; x.len()];
                    softmax(x, x.len(), &mut y).unwrap();
                    y
                };
                let f = |x: &[f64]| -> f64 { sm(x).iter().zip(&dy).map(|(a, b)| a * b).sum() };
                let y = sm(&x);
                let mut dx = vec![f64::NAN; classes];
                softmax_backward(&y, &dy, classes, &mut dx).unwrap();
                let scale: f64 = y.iter().zip(&dy).map(|(a, b)| (a * b).abs()).sum();
                let mut work = x.clone();
                for j in 0..classes {
                    if x[j] == f64::NEG_INFINITY {
                        assert_eq!(dx[j], 0.0, "masked entry of softmax_backward");
                        continue;
                    }
                    let h = 1e-6 * x[j].abs().max(1.0);
                    let (xp, xm) = (x[j] + h, x[j] - h);
                    work[j] = xp;
                    let fp = f(&work);
                    work[j] = xm;
                    let fm = f(&work);
                    work[j] = x[j];
                    let fd = (fp - fm) / (xp - xm);
                    let tol = 64.0 * U64 * (scale + 1.0) / h
                        + 1e-8 * x[j].abs().max(1.0).powi(2)
                        + 1e-8 * fd.abs();
                    assert!(
                        (dx[j] - fd).abs() <= tol,
                        "softmax_backward[{j}]: {} vs fd {fd}, tol {tol:e}; x={x:?} dy={dy:?}",
                        dx[j]
                    );
                }
            }
        }
    }
}

#[test]
fn log_softmax_backward_matches_finite_differences() {
    // log_softmax_i = x_i − lse(x) for every i, masked ones included (−inf − lse), so
    // F(x) = Σ_{i live} dy_i · log_softmax(x)_i − (Σ_{i masked} dy_i) · lse(x) has
    // ∂F/∂x_j = dy_j − p_j Σ_i dy_i, the formula of log_softmax_backward. Rounding part of the FD
    // error ≤ 64u·(Σ|dy_i · log_softmax_i| + |lse|·Σ_masked|dy| + 1)/h.
    for mask in [false, true] {
        for &classes in &CLASS_COUNTS {
            for seed in 0..8 {
                let mut rng = rng(seed * 37 + classes as u64 + u64::from(mask) * 5555);
                let (x, dy) = backward_problem(&mut rng, classes, mask);
                let live: Vec<bool> = x.iter().map(|&v| v > f64::NEG_INFINITY).collect();
                let masked_dy: f64 = (0..classes).filter(|&i| !live[i]).map(|i| dy[i]).sum();
                let parts = |x: &[f64]| -> (f64, f64) {
                    let mut y = vec![0.0; x.len()];
                    log_softmax(x, x.len(), &mut y).unwrap();
                    let mut l = [0.0];
                    logsumexp(x, x.len(), &mut l).unwrap();
                    let mut f = -masked_dy * l[0];
                    let mut mag = (masked_dy * l[0]).abs();
                    for i in 0..x.len() {
                        if live[i] {
                            f += dy[i] * y[i];
                            mag += (dy[i] * y[i]).abs();
                        }
                    }
                    (f, mag)
                };
                let mut y = vec![0.0; classes];
                log_softmax(&x, classes, &mut y).unwrap();
                let mut dx = vec![f64::NAN; classes];
                log_softmax_backward(&y, &dy, classes, &mut dx).unwrap();
                let scale = parts(&x).1;
                let mut work = x.clone();
                for j in 0..classes {
                    if !live[j] {
                        // Documented: a masked entry gets dy_j (its exp(y_j) is 0).
                        assert_eq!(dx[j], dy[j], "masked entry of log_softmax_backward");
                        continue;
                    }
                    let h = 1e-6 * x[j].abs().max(1.0);
                    let (xp, xm) = (x[j] + h, x[j] - h);
                    work[j] = xp;
                    let fp = parts(&work).0;
                    work[j] = xm;
                    let fm = parts(&work).0;
                    work[j] = x[j];
                    let fd = (fp - fm) / (xp - xm);
                    let tol = 64.0 * U64 * (scale + 1.0) / h
                        + 1e-8 * x[j].abs().max(1.0).powi(2)
                        + 1e-8 * fd.abs();
                    assert!(
                        (dx[j] - fd).abs() <= tol,
                        "log_softmax_backward[{j}]: {} vs fd {fd}, tol {tol:e}; x={x:?} dy={dy:?}",
                        dx[j]
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Narrow dtypes against f64 on the same (representable) inputs.

/// One ulp of the dtype at magnitude `v` (the spacing of the binade of `v`; the subnormal spacing
/// below the normal range).
fn ulp(dtype: DType, v: f64) -> f64 {
    let v = v.abs();
    let denorm = dtype.min_positive_normal() * 2.0 * dtype.unit_roundoff();
    if v < dtype.min_positive_normal() {
        return denorm;
    }
    let binade = 2f64.powi(v.log2().floor() as i32);
    (binade * 2.0 * dtype.unit_roundoff()).max(denorm)
}

fn round_to<E: Element>(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&x| E::from_f64(x).to_f64()).collect()
}

/// Runs the fused CE in `E` on `p` (whose values must be representable in `E`) and in `f64`, and
/// compares: every gradient entry within `ulps` ulps (of `E`) of the row's largest |gradient|,
/// the loss within `ulps` ulps of `E::Stat`.
fn check_narrow_against_f64<E: Element>(p: &Problem, spec: &Spec, ulps: f64) {
    let c = p.classes;
    let opts = p.options(spec);
    let mut g64 = vec![0.0f64; p.logits.len()];
    let out64 = cross_entropy_with_grad(
        &p.logits,
        c,
        p.targets(spec),
        &opts,
        p.grad_output(spec),
        &mut g64,
    )
    .unwrap();
    let logits: Vec<E> = p.logits.iter().map(|&x| E::from_f64(x)).collect();
    let probs: Vec<E> = p.probs.iter().map(|&x| E::from_f64(x)).collect();
    let row_grads: Vec<E::Stat> = p
        .row_grads
        .iter()
        .map(|&x| <E::Stat as Element>::from_f64(x))
        .collect();
    let targets = if spec.probs {
        Targets::Probabilities(&probs[..])
    } else {
        Targets::Classes(&p.targets[..])
    };
    let go = match spec.grad {
        Go::Scalar(g) => GradOutput::Scalar(<E::Stat as Element>::from_f64(g)),
        Go::PerRow => GradOutput::PerRow(&row_grads[..]),
    };
    let mut g = vec![E::zero(); logits.len()];
    let out = cross_entropy_with_grad(&logits, c, targets, &opts, go, &mut g).unwrap();
    let loss: f64 = out.loss.into();
    let stat = <E::Stat as Element>::DTYPE;
    assert!(
        (loss - out64.loss).abs() <= ulps * ulp(stat, out64.loss),
        "{}: loss {loss} vs f64 {}; {spec:?}",
        E::DTYPE,
        out64.loss
    );
    for r in 0..p.rows {
        let row64 = &g64[r * c..(r + 1) * c];
        let row_max = row64.iter().fold(0.0f64, |a, &v| a.max(v.abs()));
        let tol = ulps * ulp(E::DTYPE, row_max);
        for i in 0..c {
            let got = g[r * c + i].to_f64();
            assert!(
                (got - row64[i]).abs() <= tol,
                "{} gradient ({r},{i}): {got:e} vs f64 {:e}, tol {tol:e} (row max {row_max:e}); {spec:?}",
                E::DTYPE,
                row64[i]
            );
        }
    }
}

/// The same problem with every value the CE reads made representable in `E`.
fn representable<E: Element>(p: &Problem) -> Problem {
    Problem {
        logits: round_to::<E>(&p.logits),
        probs: round_to::<E>(&p.probs),
        row_grads: round_to::<E::Stat>(&p.row_grads),
        ..p.clone()
    }
}

#[test]
fn narrow_gradients_match_f64_gradients() {
    // The kernels widen to f64, compute there and round once, so the narrow gradient should be
    // the f64 gradient rounded: ≤ 1/2 ulp elementwise. We allow 2 ulps of the row's largest
    // |gradient| (docs/numerics.md's normwise measure). The only inputs that differ between the two
    // calls are the output gradient scale and probability targets, both made representable.
    let specs = [
        PLAIN,
        Spec {
            weights: true,
            smoothing: 0.1,
            z_loss: 1e-3,
            softcap: Some(10.0),
            ignore: true,
            mask: true,
            ..PLAIN
        },
        Spec {
            probs: true,
            weights: true,
            smoothing: 0.2,
            reduction: Reduction::Sum,
            grad: Go::Scalar(-1.5),
            ..PLAIN
        },
        Spec {
            reduction: Reduction::None,
            grad: Go::PerRow,
            mask: true,
            ..PLAIN
        },
    ];
    for spec in specs {
        for &classes in &CLASS_COUNTS {
            for seed in 0..5 {
                let mut rng = rng(seed * 101 + classes as u64);
                let rows = 1 + rng.below(6);
                let p = Problem::generate(&mut rng, &spec, rows, classes);
                check_narrow_against_f64::<f32>(&representable::<f32>(&p), &spec, 2.0);
                check_narrow_against_f64::<f16>(&representable::<f16>(&p), &spec, 2.0);
                check_narrow_against_f64::<bf16>(&representable::<bf16>(&p), &spec, 2.0);
            }
        }
    }
}

#[test]
fn narrow_softmax_and_log_softmax_match_f64() {
    // Same argument as for the gradient: computed in f64, rounded once.
    fn one<E: Element>(x: &[f64]) {
        let xe: Vec<E> = x.iter().map(|&v| E::from_f64(v)).collect();
        let x64: Vec<f64> = xe.iter().map(|v| v.to_f64()).collect();
        let c = x.len();
        let (mut y, mut l) = (vec![E::zero(); c], vec![E::zero(); c]);
        let (mut y64, mut l64) = (vec![0.0; c], vec![0.0; c]);
        softmax(&xe, c, &mut y).unwrap();
        log_softmax(&xe, c, &mut l).unwrap();
        softmax(&x64, c, &mut y64).unwrap();
        log_softmax(&x64, c, &mut l64).unwrap();
        let ymax = y64.iter().fold(0.0f64, |a, &v| a.max(v));
        for i in 0..c {
            let tol = 2.0 * ulp(E::DTYPE, ymax);
            assert!(
                (y[i].to_f64() - y64[i]).abs() <= tol,
                "{} softmax",
                E::DTYPE
            );
            if l64[i] == f64::NEG_INFINITY {
                assert_eq!(l[i].to_f64(), f64::NEG_INFINITY);
            } else {
                let tol = ulp(E::DTYPE, l64[i]);
                assert!(
                    (l[i].to_f64() - l64[i]).abs() <= tol,
                    "{} log_softmax {} vs {}",
                    E::DTYPE,
                    l[i],
                    l64[i]
                );
            }
        }
    }
    for &classes in &CLASS_COUNTS {
        for seed in 0..10 {
            let mut rng = rng(seed * 7 + classes as u64);
            let (x, _) = backward_problem(&mut rng, classes, seed % 2 == 1);
            one::<f32>(&x);
            one::<f16>(&x);
            one::<bf16>(&x);
        }
    }
}
