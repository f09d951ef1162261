//! The fused linear cross-entropy against independent references.
//!
//! * An unfused reference: the logits `H·Wᵀ + b` by double-`f64` (compensated) dot products
//!   (the `f32`, `f16` and `bf16` inputs widened exactly), the `f64` cross-entropy with its
//!   gradient `G`, and `dH = G·W`, `dW = Gᵀ·H`, `db = Σ_rows G` compensated in the same way.
//!   Every result must lie within the a-priori error bound of the products the fused path runs
//!   in its working dtype, `f32` (or `f64` for `f64` input; see [`Bounds`]); the tests print the
//!   largest error as a fraction of its bound. Class and probability targets.
//! * Central differences of the fused loss itself on tiny shapes.
//! * Extreme logits, chunk counts, ignored rows, bad input, thread counts.

// The reference's matrix products read best as index arithmetic.
#![allow(clippy::needless_range_loop)]

use lse_testkit::rng::Rng;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};

use lse::sharded::{self, LinearShardGradients, RowPartial, Shard, ShardTargets};
use lse::{
    bf16, f16, linear_cross_entropy, linear_cross_entropy_with_grad, CrossEntropyOptions,
    CrossEntropyOutput, Element, EmptyMean, GradOutput, LinearCrossEntropyOptions, LinearGradients,
    LinearHead, LseError, NonFinite, Reduction, Targets,
};

/// One problem: `hidden` is `rows × dim`, `weight` `classes × dim`.
#[derive(Clone, Debug)]
struct Problem<E> {
    dim: usize,
    classes: usize,
    hidden: Vec<E>,
    weight: Vec<E>,
    bias: Option<Vec<E>>,
    targets: Vec<i64>,
    /// Probability targets (`rows × classes`) in place of `targets` when given.
    probabilities: Option<Vec<E>>,
}

impl<E: Element> Problem<E> {
    /// Entries of `H` uniform in `±h_scale`, of `W` and `b` in `±1`; every `ignore_every`-th
    /// row has target -100, row 1 targets the last class.
    fn new(seed: u64, [rows, dim, classes]: [usize; 3], h_scale: f64, bias: bool) -> Self {
        let mut rng = Rng::new(seed);
        let mut values = |n: usize, scale: f64| -> Vec<E> {
            (0..n)
                .map(|_| E::from_f64(scale * rng.range(-1.0, 1.0)))
                .collect()
        };
        let hidden = values(rows * dim, h_scale);
        let weight = values(classes * dim, 1.0);
        let bias = bias.then(|| values(classes, 1.0));
        let mut rng = Rng::new(seed ^ 0x5555);
        let targets = (0..rows)
            .map(|r| match r {
                1 => classes as i64 - 1,
                _ if r % 5 == 3 => -100,
                _ => (rng.next_u64() % classes as u64) as i64,
            })
            .collect();
        Self {
            dim,
            classes,
            hidden,
            weight,
            bias,
            targets,
            probabilities: None,
        }
    }

    /// The same problem with probability targets: every third row one-hot, the others a random
    /// distribution; with `negative`, some values below 0 and rows not summing to 1 (PyTorch
    /// accepts any finite values).
    fn with_probabilities(mut self, seed: u64, negative: bool) -> Self {
        let (rows, classes) = (self.rows(), self.classes);
        let mut rng = Rng::new(seed);
        let mut q = vec![0.0f64; rows * classes];
        for (r, row) in q.chunks_mut(classes).enumerate() {
            if r % 3 == 0 {
                row[(rng.next_u64() % classes as u64) as usize] = 1.0;
                continue;
            }
            for v in row.iter_mut() {
                *v = rng.range(0.0, 1.0).powi(4);
            }
            let total: f64 = row.iter().sum();
            for v in row.iter_mut() {
                *v /= total;
                if negative && rng.range(0.0, 1.0) < 0.2 {
                    *v -= 0.05;
                }
            }
        }
        self.probabilities = Some(q.into_iter().map(E::from_f64).collect());
        self
    }

    fn targets(&self) -> Targets<'_, E> {
        match &self.probabilities {
            Some(q) => Targets::Probabilities(q),
            None => Targets::Classes(&self.targets),
        }
    }

    fn rows(&self) -> usize {
        self.targets.len()
    }

    fn head(&self) -> LinearHead<'_, E> {
        LinearHead {
            weight: &self.weight,
            bias: self.bias.as_deref(),
            classes: self.classes,
        }
    }

    fn wide(x: &[E]) -> Vec<f64> {
        x.iter().map(|v| v.to_f64()).collect()
    }
}

/// The fused call's outputs, widened.
struct Fused<S> {
    out: CrossEntropyOutput<S>,
    dh: Vec<f64>,
    dw: Vec<f64>,
    db: Vec<f64>,
}

fn fused<E: Element>(
    p: &Problem<E>,
    options: &LinearCrossEntropyOptions<'_>,
    grad_output: GradOutput<'_, E::Stat>,
) -> Fused<E::Stat> {
    let mut dh = vec![E::from_f64(7.0); p.hidden.len()];
    let mut dw = vec![E::from_f64(7.0); p.weight.len()];
    let mut db = vec![E::from_f64(7.0); p.classes];
    let grads = LinearGradients {
        hidden: &mut dh,
        weight: &mut dw,
        bias: Some(&mut db),
    };
    let out = linear_cross_entropy_with_grad(
        &p.hidden,
        p.head(),
        p.targets(),
        options,
        grad_output,
        grads,
    )
    .unwrap();
    let wide = Problem::<E>::wide;
    Fused {
        out,
        dh: wide(&dh),
        dw: wide(&dw),
        db: wide(&db),
    }
}

/// The unfused `f64` reference and the error bound of each output.
struct Reference {
    out: CrossEntropyOutput<f64>,
    dh: Vec<f64>,
    dw: Vec<f64>,
    db: Vec<f64>,
    bounds: Bounds,
}

/// A-priori bounds on `|fused − reference|`, from the standard bound of a product of inner
/// length `k` in the working dtype, `|fl(A·B) − A·B| ≤ γ_k·|A|·|B|` with `γ_k = k·u/(1 − k·u)`,
/// `u` its unit roundoff (`2⁻²⁴` for `f32`, `2⁻⁵³` for `f64`):
///
/// * logits of row `r`: `|Δx_rc| ≤ X_r = γ_{D+1} · max_c (|H||W|ᵀ + |b|)_rc`;
/// * row loss: `|Δℓ_r| ≤ κ₁·X_r + k_u·u|ℓ_r|`, with `κ₁ = 2·w_max·q_r + 2z|lse_r|` the `ℓ¹` norm
///   of `∂ℓ/∂x` (class weights `w`, z-loss `z`, `q_r = max(1, Σ_c|q_rc|)` for probability
///   targets, 1 for a class; soft-capping and smoothing do not raise it);
/// * gradient row (after the scale `s_r`): `‖ΔG_r‖₁ ≤ s_r·(κ₂ + κ₁/cap)·X_r + k_u·u‖G_r‖₁`,
///   with `κ₂ = 2·w_max·q_r + 2z(1 + 2|lse_r|)` bounding the Hessian's `∞`-norm. `k_u` is 2
///   (the rounding of an `f32` result next to an `f64` reference) or, for `f64`, 5: both sides
///   then run the `f64` cross-entropy, each within 2.2 ulp of the 192-bit oracle
///   (`tests/accuracy.rs`, `tests/logit_scale.rs`);
/// * `dH_rd ≤ ‖ΔG_r‖₁·max_c|W_cd| + γ_V(|G||W|)_rd`, `dW_cd ≤ Σ_r ‖ΔG_r‖₁|H_rd| +
///   γ_N(|G|ᵀ|H|)_cd`, `db_c ≤ Σ_r ‖ΔG_r‖₁ + γ_N Σ_r|G_rc|`, each plus one rounding to `E`.
struct Bounds {
    loss: f64,
    row_loss: Vec<f64>,
    dh: Vec<f64>,
    dw: Vec<f64>,
    db: Vec<f64>,
}

/// The unit roundoff of `E`'s working dtype.
fn unit<E: Element>() -> f64 {
    <E::Stat as Element>::DTYPE.unit_roundoff()
}

fn gamma(k: usize, u: f64) -> f64 {
    let ku = k as f64 * u;
    ku / (1.0 - ku)
}

/// A sum of products in double-`f64` (error-free products and sums): the reference's dot
/// products, good to about `2⁻¹⁰⁶` relative before the final rounding.
#[derive(Clone, Copy, Default)]
struct Dot2 {
    hi: f64,
    lo: f64,
}

impl Dot2 {
    fn add_product(&mut self, a: f64, b: f64) {
        let p = a * b;
        let p_err = a.mul_add(b, -p);
        let s = self.hi + p;
        let z = s - self.hi;
        let s_err = (self.hi - (s - z)) + (p - z);
        self.hi = s;
        self.lo += s_err + p_err;
    }

    fn value(self) -> f64 {
        self.hi + self.lo
    }
}

fn reference<E: Element>(
    p: &Problem<E>,
    options: &CrossEntropyOptions<'_>,
    grad_output: GradOutput<'_, f64>,
) -> Reference {
    let (n, d, v) = (p.rows(), p.dim, p.classes);
    let u = unit::<E>();
    let h = Problem::<E>::wide(&p.hidden);
    let w = Problem::<E>::wide(&p.weight);
    let b = p.bias.as_deref().map_or(vec![0.0; v], Problem::<E>::wide);
    let q = p.probabilities.as_deref().map(Problem::<E>::wide);
    let mut x = vec![0.0; n * v];
    let mut magnitude = vec![0.0f64; n];
    for r in 0..n {
        for c in 0..v {
            let (mut dot, mut abs) = (Dot2::default(), b[c].abs());
            dot.add_product(b[c], 1.0);
            for k in 0..d {
                dot.add_product(h[r * d + k], w[c * d + k]);
                abs += (h[r * d + k] * w[c * d + k]).abs();
            }
            x[r * v + c] = dot.value();
            magnitude[r] = magnitude[r].max(abs);
        }
    }
    let opts = CrossEntropyOptions {
        keep_row_loss: true,
        keep_row_lse: true,
        ..*options
    };
    let mut g = vec![0.0; n * v];
    let targets = match &q {
        Some(q) => Targets::Probabilities(&q[..]),
        None => Targets::Classes(&p.targets),
    };
    let out = lse::cross_entropy_with_grad(&x, v, targets, &opts, grad_output, &mut g).unwrap();
    let (mut dh, mut dw, mut db) = (
        vec![Dot2::default(); n * d],
        vec![Dot2::default(); v * d],
        vec![Dot2::default(); v],
    );
    let mut dh_abs = vec![0.0; n * d];
    let mut dw_abs = vec![0.0; v * d];
    let mut db_abs = vec![0.0; v];
    for r in 0..n {
        for c in 0..v {
            let grc = g[r * v + c];
            db[c].add_product(grc, 1.0);
            db_abs[c] += grc.abs();
            for k in 0..d {
                dh[r * d + k].add_product(grc, w[c * d + k]);
                dh_abs[r * d + k] += (grc * w[c * d + k]).abs();
                dw[c * d + k].add_product(grc, h[r * d + k]);
                dw_abs[c * d + k] += (grc * h[r * d + k]).abs();
            }
        }
    }
    let value = |x: Vec<Dot2>| -> Vec<f64> { x.into_iter().map(Dot2::value).collect() };
    let (dh, dw, db) = (value(dh), value(dw), value(db));
    // The cross-entropy's own error: rounding an f32 result, or two f64 kernels.
    let k_u = if u < 1e-10 { 5.0 } else { 2.0 };

    // The bounds.
    let w_max = options
        .weights
        .map_or(1.0, |ws| ws.iter().copied().fold(0.0, f64::max));
    let z = options.z_loss;
    let inv_cap = options.softcap.map_or(0.0, |cap| 1.0 / cap);
    let row_lse = out.row_lse.as_ref().unwrap();
    let row_loss = out.row_loss.as_ref().unwrap();
    let reduction = match options.reduction {
        Reduction::Mean if out.denominator > 0.0 => 1.0 / out.denominator,
        Reduction::Mean => 0.0,
        _ => 1.0,
    };
    let caller = |r: usize| match grad_output {
        GradOutput::Scalar(s) => s.abs(),
        GradOutput::PerRow(s) => s[r].abs(),
    };
    let mut loss_bound = k_u * u * out.loss.abs();
    let mut row_loss_bound = vec![0.0; n];
    let mut grad_row = vec![0.0; n];
    for r in 0..n {
        if row_lse[r].is_nan() {
            continue; // ignored
        }
        let x_r = gamma(d + 1, u) * magnitude[r];
        let lse = row_lse[r].abs();
        let q_r = q.as_ref().map_or(1.0, |q| {
            let l1: f64 = q[r * v..(r + 1) * v].iter().map(|x| x.abs()).sum();
            l1.max(1.0)
        });
        let k1 = 2.0 * w_max * q_r + 2.0 * z * lse;
        let k2 = 2.0 * w_max * q_r + 2.0 * z * (1.0 + 2.0 * lse);
        row_loss_bound[r] = k1 * x_r + k_u * u * row_loss[r].abs();
        loss_bound += reduction * row_loss_bound[r];
        let g_l1: f64 = g[r * v..(r + 1) * v].iter().map(|x| x.abs()).sum();
        grad_row[r] = reduction * caller(r) * (k2 + k1 * inv_cap) * x_r + k_u * u * g_l1;
    }
    let u_e = E::DTYPE.unit_roundoff();
    let out_rounding = |x: f64| if u_e > u { u_e * x.abs() } else { 0.0 };
    let mut bounds = Bounds {
        loss: loss_bound,
        row_loss: row_loss_bound,
        dh: vec![0.0; n * d],
        dw: vec![0.0; v * d],
        db: vec![0.0; v],
    };
    let w_col_max: Vec<f64> = (0..d)
        .map(|k| (0..v).map(|c| w[c * d + k].abs()).fold(0.0, f64::max))
        .collect();
    for r in 0..n {
        for k in 0..d {
            let i = r * d + k;
            bounds.dh[i] =
                grad_row[r] * w_col_max[k] + gamma(v, u) * dh_abs[i] + out_rounding(dh[i]);
        }
    }
    for c in 0..v {
        let grad_sum: f64 = grad_row.iter().sum();
        bounds.db[c] = grad_sum + gamma(n, u) * db_abs[c] + out_rounding(db[c]);
        for k in 0..d {
            let i = c * d + k;
            let spread: f64 = (0..n).map(|r| grad_row[r] * h[r * d + k].abs()).sum();
            bounds.dw[i] = spread + gamma(n, u) * dw_abs[i] + out_rounding(dw[i]);
        }
    }
    Reference {
        out,
        dh,
        dw,
        db,
        bounds,
    }
}

/// The largest `|got − want| / bound` over the entries; fails when one exceeds 1.
fn within(what: &str, got: &[f64], want: &[f64], bound: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = 0.0f64;
    for (i, ((&g, &w), &b)) in got.iter().zip(want).zip(bound).enumerate() {
        let err = (g - w).abs();
        assert!(
            err <= b || (g.is_nan() && w.is_nan()),
            "{what}[{i}]: got {g:e}, want {w:e}, error {err:e} > bound {b:e}"
        );
        if b > 0.0 {
            worst = worst.max(err / b);
        }
    }
    worst
}

/// Checks every output of the fused call against the reference; returns the worst error as a
/// fraction of its bound.
fn check<E: Element>(
    p: &Problem<E>,
    options: &CrossEntropyOptions<'_>,
    budget_bytes: usize,
    per_row: Option<&[E::Stat]>,
) -> f64 {
    let linear = LinearCrossEntropyOptions {
        cross_entropy: CrossEntropyOptions {
            keep_row_loss: true,
            keep_row_lse: true,
            ..*options
        },
        budget_bytes,
    };
    let wide_row: Vec<f64> = per_row.map_or(Vec::new(), |g| g.iter().map(|&x| x.into()).collect());
    let (ours, theirs) = match per_row {
        Some(g) => (GradOutput::PerRow(g), GradOutput::PerRow(&wide_row[..])),
        None => (
            GradOutput::Scalar(E::Stat::from_f64(0.75)),
            GradOutput::Scalar(0.75f64),
        ),
    };
    let got = fused(p, &linear, ours);
    let want = reference(p, options, theirs);
    let b = &want.bounds;
    let row_loss: Vec<f64> = got
        .out
        .row_loss
        .as_ref()
        .unwrap()
        .iter()
        .map(|&x| x.into())
        .collect();
    let mut worst = within("loss", &[got.out.loss.into()], &[want.out.loss], &[b.loss]);
    worst = worst.max(within(
        "row loss",
        &row_loss,
        want.out.row_loss.as_ref().unwrap(),
        &b.row_loss,
    ));
    worst = worst.max(within("dH", &got.dh, &want.dh, &b.dh));
    worst = worst.max(within("dW", &got.dw, &want.dw, &b.dw));
    worst = worst.max(within("db", &got.db, &want.db, &b.db));
    assert_eq!(got.out.counted_rows, want.out.counted_rows);
    assert_eq!(got.out.denominator, want.out.denominator);
    // The loss-only call, within the same bound. (Not the same bits: without `dH` rows its
    // chunks are larger, and the matrix crate's blocking, hence the logits' last bits, may
    // depend on a chunk's row count: seen in f64.)
    let loss_only = linear_cross_entropy(&p.hidden, p.head(), p.targets(), &linear).unwrap();
    worst = worst.max(within(
        "loss-only loss",
        &[loss_only.loss.into()],
        &[want.out.loss],
        &[b.loss],
    ));
    worst
}

/// Every option set a class-target cross-entropy has, on shapes that split into several chunks
/// (and several weight blocks for half types).
fn option_sets(weights: &[f64]) -> Vec<(&'static str, CrossEntropyOptions<'_>)> {
    vec![
        ("default", CrossEntropyOptions::default()),
        (
            "weights+smoothing",
            CrossEntropyOptions {
                weights: Some(weights),
                label_smoothing: 0.1,
                ..Default::default()
            },
        ),
        (
            "z-loss+softcap",
            CrossEntropyOptions {
                z_loss: 1e-3,
                softcap: Some(5.0),
                ..Default::default()
            },
        ),
        (
            "sum, ignore index -100",
            CrossEntropyOptions {
                reduction: Reduction::Sum,
                ignore_index: Some(-100),
                ..Default::default()
            },
        ),
        (
            "none, every option",
            CrossEntropyOptions {
                reduction: Reduction::None,
                weights: Some(weights),
                label_smoothing: 0.2,
                z_loss: 1e-4,
                softcap: Some(30.0),
                keep_logit_stats: true,
                ..Default::default()
            },
        ),
    ]
}

const SHAPE: [usize; 3] = [37, 24, 50];

/// A budget for chunks of `chunk_rows` rows of `shape` with a gradient (and probability
/// targets, which a half type widens per chunk; its weight block takes a quarter of the budget).
fn budget_for<E: Element>(
    chunk_rows: usize,
    [_, dim, classes]: [usize; 3],
    probabilities: bool,
) -> usize {
    let elem = core::mem::size_of::<E::Stat>();
    let widened = E::DTYPE != <E::Stat as Element>::DTYPE;
    let target_copy = if widened && probabilities { classes } else { 0 };
    let row = elem * (classes + target_copy + 2 * dim);
    if widened {
        // rows·row ≤ 3/4·budget, and the budget/4 block holds classes/3 of the weight.
        (row * chunk_rows * 4).div_ceil(3)
    } else {
        row * chunk_rows
    }
}

fn every_option_matches_reference<E: Element>(probabilities: bool) {
    let mut p = Problem::<E>::new(1, SHAPE, 1.5, true);
    if probabilities {
        p = p.with_probabilities(21, false);
    }
    let weights: Vec<f64> = (0..SHAPE[2]).map(|c| 0.5 + (c % 7) as f64 / 4.0).collect();
    let per_row: Vec<E::Stat> = (0..SHAPE[0])
        .map(|r| E::Stat::from_f64(0.5 + r as f64 / 16.0))
        .collect();
    // With probability targets every row counts: 37 rows, 30 with class targets.
    let counted = if probabilities { SHAPE[0] } else { 30 };
    let mut worst = 0.0f64;
    for (name, options) in option_sets(&weights) {
        for chunk_rows in [counted, 7] {
            let budget = budget_for::<E>(chunk_rows, SHAPE, probabilities);
            let g = (options.reduction == Reduction::None).then_some(&per_row[..]);
            let ratio = check(&p, &options, budget, g);
            println!(
                "{} {} {name} chunk {chunk_rows}: worst error / bound {ratio:.3}",
                E::DTYPE,
                if probabilities {
                    "probabilities"
                } else {
                    "classes"
                },
            );
            worst = worst.max(ratio);
        }
    }
    assert!(
        worst > 0.0,
        "the comparison saw no error at all: suspicious"
    );
}

#[test]
fn every_option_matches_reference_f32() {
    every_option_matches_reference::<f32>(false);
}

#[test]
fn every_option_matches_reference_bf16() {
    every_option_matches_reference::<bf16>(false);
}

#[test]
fn every_option_matches_reference_f16() {
    every_option_matches_reference::<f16>(false);
}

#[test]
fn every_option_matches_reference_f64() {
    every_option_matches_reference::<f64>(false);
}

#[test]
fn probability_targets_match_reference_f32() {
    every_option_matches_reference::<f32>(true);
}

#[test]
fn probability_targets_match_reference_bf16() {
    every_option_matches_reference::<bf16>(true);
}

#[test]
fn probability_targets_match_reference_f16() {
    every_option_matches_reference::<f16>(true);
}

#[test]
fn probability_targets_match_reference_f64() {
    every_option_matches_reference::<f64>(true);
}

/// PyTorch's rule for probability targets: any finite values, negative ones and rows that do not
/// sum to 1 included; and a probability target that is NaN is a typed error naming its row and
/// column, for every dtype's path (the widened chunk of a half type too).
#[test]
fn probability_targets_any_finite_values_and_typed_errors() {
    fn run<E: Element>() {
        let p = Problem::<E>::new(12, SHAPE, 1.0, true).with_probabilities(22, true);
        let options = CrossEntropyOptions {
            label_smoothing: 0.05,
            ..Default::default()
        };
        for chunk_rows in [SHAPE[0], 5] {
            check(&p, &options, budget_for::<E>(chunk_rows, SHAPE, true), None);
        }
        let mut bad = p.clone();
        let (row, column) = (23, 17);
        bad.probabilities.as_mut().unwrap()[row * SHAPE[2] + column] = E::from_f64(f64::NAN);
        let linear = LinearCrossEntropyOptions {
            budget_bytes: budget_for::<E>(5, SHAPE, true),
            ..Default::default()
        };
        let err =
            linear_cross_entropy(&bad.hidden, bad.head(), bad.targets(), &linear).unwrap_err();
        match err {
            LseError::BadProbability {
                row: r, column: c, ..
            } => {
                assert_eq!((r, c), (row, column), "{}", E::DTYPE)
            }
            other => panic!("{}: {other:?}", E::DTYPE),
        }
        // Probability targets that are not whole rows.
        let q = &p.probabilities.as_ref().unwrap()[..SHAPE[2] * 3 + 1];
        let err = linear_cross_entropy(&p.hidden, p.head(), Targets::Probabilities(q), &linear)
            .unwrap_err();
        assert!(matches!(err, LseError::RaggedRows { .. }), "{err:?}");
    }
    run::<f32>();
    run::<bf16>();
    run::<f64>();
}

/// Budgets that force 1, 2, 7 and one-row chunks: every result within the bound, and the loss
/// bits are the same whatever the chunking (each row's logits come from the same products).
#[test]
fn chunk_counts_stay_within_bound() {
    let p = Problem::<f32>::new(2, SHAPE, 1.0, true);
    let options = CrossEntropyOptions::default();
    let counted: usize = 30;
    for chunks in [1, 2, 7, counted] {
        let chunk_rows = counted.div_ceil(chunks);
        check(
            &p,
            &options,
            budget_for::<f32>(chunk_rows, SHAPE, false),
            None,
        );
    }
}

/// dW's error does not grow with the number of chunks: 1 vs 64 chunks of a 512-row batch.
#[test]
fn weight_gradient_error_does_not_grow_with_chunks() {
    let shape = [512, 16, 64];
    let mut p = Problem::<f32>::new(3, shape, 1.0, false);
    p.targets
        .iter_mut()
        .filter(|t| **t < 0)
        .for_each(|t| *t = 0);
    let options = CrossEntropyOptions::default();
    let want = reference(&p, &options, GradOutput::Scalar(1.0));
    let error = |chunks: usize| {
        let linear = LinearCrossEntropyOptions {
            budget_bytes: budget_for::<f32>(512 / chunks, shape, false),
            ..Default::default()
        };
        let got = fused(&p, &linear, GradOutput::Scalar(1.0));
        within("dW", &got.dw, &want.dw, &want.bounds.dw);
        let err: f64 = got
            .dw
            .iter()
            .zip(&want.dw)
            .map(|(g, w)| (g - w).abs())
            .sum();
        err / want.dw.iter().map(|w| w.abs()).sum::<f64>()
    };
    let (one, many) = (error(1), error(64));
    println!("dW relative L1 error: 1 chunk {one:.3e}, 64 chunks {many:.3e}");
    assert!(many <= 2.0 * one, "64 chunks: {many:e} vs 1 chunk: {one:e}");
}

/// Central differences of the fused `f32` loss itself on tiny shapes.
#[test]
fn gradients_match_central_differences() {
    let weights = [0.5, 1.0, 2.0, 1.5, 0.25];
    let option_sets = [
        CrossEntropyOptions::default(),
        CrossEntropyOptions {
            weights: Some(&weights),
            label_smoothing: 0.1,
            z_loss: 0.01,
            softcap: Some(2.0),
            reduction: Reduction::Sum,
            ..Default::default()
        },
    ];
    for options in option_sets {
        let p = Problem::<f32>::new(4, [4, 3, 5], 1.0, true);
        let linear = LinearCrossEntropyOptions {
            cross_entropy: options,
            budget_bytes: budget_for::<f32>(2, [4, 3, 5], false),
        };
        let got = fused(&p, &linear, GradOutput::Scalar(1.0));
        let loss = |q: &Problem<f32>| -> f64 {
            linear_cross_entropy(&q.hidden, q.head(), q.targets(), &linear)
                .unwrap()
                .loss
                .into()
        };
        let check_param = |what: &str, analytic: &[f64], pick: Pick| {
            for (i, &want) in analytic.iter().enumerate() {
                let h = 1e-2;
                let mut q = p.clone();
                let x = pick(&mut q)[i];
                pick(&mut q)[i] = x + h as f32;
                let up = loss(&q);
                pick(&mut q)[i] = x - h as f32;
                let down = loss(&q);
                let numeric = (up - down) / (2.0 * h);
                let err = (numeric - want).abs();
                assert!(
                    err <= 2e-3 * (1.0 + want.abs()),
                    "{what}[{i}]: analytic {want} numeric {numeric}"
                );
            }
        };
        check_param("dH", &got.dh, |q| &mut q.hidden);
        check_param("dW", &got.dw, |q| &mut q.weight);
        check_param("db", &got.db, |q| q.bias.as_mut().unwrap());
    }
}

/// Which parameter of a problem a central difference moves.
type Pick = fn(&mut Problem<f32>) -> &mut Vec<f32>;

/// Hidden states whose logits pass ±1e4 (f32) and f16's overflow point 11.09: finite loss and
/// gradients, within the bound.
#[test]
fn extreme_logits_stay_finite() {
    let p = Problem::<f32>::new(5, SHAPE, 5e3, true);
    let big = reference(&p, &CrossEntropyOptions::default(), GradOutput::Scalar(1.0));
    let max_logit = big
        .out
        .row_lse
        .as_ref()
        .unwrap()
        .iter()
        .fold(0.0f64, |m, x| m.max(x.abs()));
    assert!(max_logit > 1e4, "the case must reach 1e4: {max_logit}");
    check(
        &p,
        &CrossEntropyOptions::default(),
        budget_for::<f32>(7, SHAPE, false),
        None,
    );

    let p = Problem::<f16>::new(6, SHAPE, 4.0, true);
    let got = fused(
        &p,
        &LinearCrossEntropyOptions::default(),
        GradOutput::Scalar(1.0),
    );
    let lse_max = reference(&p, &CrossEntropyOptions::default(), GradOutput::Scalar(1.0))
        .out
        .row_lse
        .unwrap()
        .iter()
        .fold(0.0f64, |m, x| m.max(*x));
    assert!(lse_max > 11.09, "the f16 case must pass 11.09: {lse_max}");
    assert!(got.out.loss.is_finite());
    assert!(got
        .dh
        .iter()
        .chain(&got.dw)
        .chain(&got.db)
        .all(|x| x.is_finite()));
    check(
        &p,
        &CrossEntropyOptions::default(),
        budget_for::<f16>(7, SHAPE, false),
        None,
    );
}

/// An all-ignored batch: the loss per the empty-mean policy, every gradient 0.
#[test]
fn all_ignored_batch() {
    let mut p = Problem::<bf16>::new(7, SHAPE, 1.0, true);
    p.targets.iter_mut().for_each(|t| *t = -100);
    p.hidden[0] = bf16::NAN; // ignored rows are never read
    for (policy, want) in [(EmptyMean::Zero, Some(0.0)), (EmptyMean::Nan, None)] {
        let linear = LinearCrossEntropyOptions {
            cross_entropy: CrossEntropyOptions {
                empty_mean: policy,
                ..Default::default()
            },
            ..Default::default()
        };
        let got = fused(&p, &linear, GradOutput::Scalar(1.0));
        match want {
            Some(w) => assert_eq!(got.out.loss, w),
            None => assert!(got.out.loss.is_nan()),
        }
        assert_eq!(got.out.counted_rows, 0);
        assert!(got
            .dh
            .iter()
            .chain(&got.dw)
            .chain(&got.db)
            .all(|&x| x == 0.0));
    }
    let linear = LinearCrossEntropyOptions {
        cross_entropy: CrossEntropyOptions {
            empty_mean: EmptyMean::Error,
            ..Default::default()
        },
        ..Default::default()
    };
    let err = linear_cross_entropy(&p.hidden, p.head(), p.targets(), &linear).unwrap_err();
    assert_eq!(err, LseError::EmptyMean { rows: SHAPE[0] });
}

/// Ignored rows get a zero dH row and cost nothing, whatever their hidden state holds.
#[test]
fn ignored_rows_are_never_read() {
    let mut p = Problem::<f32>::new(8, SHAPE, 1.0, false);
    let clean = fused(
        &p,
        &LinearCrossEntropyOptions::default(),
        GradOutput::Scalar(1.0),
    );
    assert_eq!(p.targets[3], -100);
    p.hidden[3 * SHAPE[1] + 2] = f32::NAN;
    let dirty = fused(
        &p,
        &LinearCrossEntropyOptions::default(),
        GradOutput::Scalar(1.0),
    );
    assert_eq!(clean.out.loss.to_bits(), dirty.out.loss.to_bits());
    assert_eq!(clean.dw, dirty.dw);
    assert!(dirty.dh[3 * SHAPE[1]..4 * SHAPE[1]]
        .iter()
        .all(|&x| x == 0.0));
    assert!(dirty.db.iter().zip(&clean.db).all(|(a, b)| a == b));
}

fn expect_error<E: Element<Stat = f32>>(
    p: &Problem<E>,
    options: &LinearCrossEntropyOptions<'_>,
    want: &LseError,
) {
    let before = p.clone();
    let err = linear_cross_entropy(&p.hidden, p.head(), p.targets(), options).unwrap_err();
    assert_eq!(&err, want);
    let mut dh = vec![E::zero(); p.hidden.len()];
    let mut dw = vec![E::zero(); p.weight.len()];
    let grads = LinearGradients {
        hidden: &mut dh,
        weight: &mut dw,
        bias: None,
    };
    let err = linear_cross_entropy_with_grad(
        &p.hidden,
        p.head(),
        p.targets(),
        options,
        GradOutput::Scalar(1.0),
        grads,
    )
    .unwrap_err();
    assert_eq!(&err, want);
    // Inputs untouched (bitwise: NaN payloads too).
    let bits = |x: &[E]| x.iter().map(|v| v.to_f64().to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&before.hidden), bits(&p.hidden));
    assert_eq!(bits(&before.weight), bits(&p.weight));
    assert_eq!(before.targets, p.targets);
}

#[test]
fn bad_input_is_a_typed_error() {
    let [rows, dim, classes] = SHAPE;
    let base = Problem::<bf16>::new(9, SHAPE, 1.0, true);
    let opts = LinearCrossEntropyOptions::default();

    let mut p = base.clone();
    p.hidden.pop();
    expect_error(
        &p,
        &opts,
        &LseError::LengthMismatch {
            what: "hidden",
            expected: rows * dim,
            actual: rows * dim - 1,
        },
    );
    let mut p = base.clone();
    p.weight.pop();
    expect_error(
        &p,
        &opts,
        &LseError::RaggedRows {
            what: "weight",
            len: classes * dim - 1,
            classes,
        },
    );
    let mut p = base.clone();
    p.bias.as_mut().unwrap().pop();
    expect_error(
        &p,
        &opts,
        &LseError::LengthMismatch {
            what: "bias",
            expected: classes,
            actual: classes - 1,
        },
    );
    let mut p = base.clone();
    p.targets[4] = classes as i64;
    expect_error(
        &p,
        &opts,
        &LseError::TargetOutOfRange {
            row: 4,
            value: classes as i64,
            classes,
        },
    );

    // One row and one class of the weight in f32 (and, with a gradient, one dH row) is the
    // least budget; 0 is too small.
    for budget in [0, 4 * (classes + dim) + 4 * dim - 1] {
        let options = LinearCrossEntropyOptions {
            budget_bytes: budget,
            ..Default::default()
        };
        let err =
            linear_cross_entropy(&base.hidden, base.head(), base.targets(), &options).unwrap_err();
        assert_eq!(
            err,
            LseError::BudgetTooSmall {
                budget,
                minimum: 4 * (classes + dim) + 4 * dim
            }
        );
    }
    let least = LinearCrossEntropyOptions {
        budget_bytes: 4 * (classes + dim) + 4 * dim,
        ..Default::default()
    };
    linear_cross_entropy(&base.hidden, base.head(), base.targets(), &least).unwrap();
}

/// `LseError` compares NaN values as unequal: compare the error's fields instead.
fn nonfinite_at(err: LseError) -> (&'static str, usize, usize) {
    match err {
        LseError::NonFinite {
            what,
            row,
            column,
            value,
        } => {
            assert!(!value.is_finite());
            (what, row, column)
        }
        other => panic!("expected NonFinite, got {other:?}"),
    }
}

#[test]
fn non_finite_inputs_follow_the_policy() {
    let dim = SHAPE[1];
    let base = Problem::<f32>::new(10, SHAPE, 1.0, true);
    let propagate = LinearCrossEntropyOptions {
        cross_entropy: CrossEntropyOptions {
            non_finite: NonFinite::Propagate,
            ..Default::default()
        },
        ..Default::default()
    };
    let cases: [(&str, usize, usize, f32); 4] = [
        ("hidden", 5, 7, f32::NAN),
        ("weight", 11, 3, f32::NAN),
        ("weight", 12, 0, f32::INFINITY),
        ("bias", 0, 9, f32::NAN),
    ];
    for (what, row, column, value) in cases {
        let mut p = base.clone();
        match what {
            "hidden" => p.hidden[row * dim + column] = value,
            "weight" => p.weight[row * dim + column] = value,
            _ => p.bias.as_mut().unwrap()[column] = value,
        }
        let before = p.clone();
        let err = linear_cross_entropy(&p.hidden, p.head(), p.targets(), &Default::default())
            .unwrap_err();
        assert_eq!(nonfinite_at(err), (what, row, column));
        assert_eq!(
            before
                .hidden
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>(),
            p.hidden.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        let got = fused(&p, &propagate, GradOutput::Scalar(1.0));
        assert!(
            got.out.loss.is_nan(),
            "{what}: NaN propagates into the loss"
        );
    }
    // A logit that the f32 product makes infinite is named as a logit.
    let mut p = base.clone();
    p.hidden[2 * dim..3 * dim].fill(1e30);
    p.weight[4 * dim..5 * dim].fill(1e30);
    let err =
        linear_cross_entropy(&p.hidden, p.head(), p.targets(), &Default::default()).unwrap_err();
    assert_eq!(nonfinite_at(err), ("logit", 2, 4));
}

/// Bitwise the same for rayon pools of 1, 2 and 3 threads, at a budget that makes several
/// chunks (and several weight blocks for bf16).
#[test]
fn bitwise_identical_across_thread_counts() {
    fn bits<E: Element<Stat = f32>>(shape: [usize; 3], budget: usize) -> Vec<Vec<u64>> {
        let p = Problem::<E>::new(11, shape, 2.0, true);
        let weights: Vec<f64> = (0..shape[2]).map(|c| 1.0 + (c % 3) as f64).collect();
        let linear = LinearCrossEntropyOptions {
            cross_entropy: CrossEntropyOptions {
                weights: Some(&weights),
                label_smoothing: 0.05,
                keep_row_lse: true,
                ..Default::default()
            },
            budget_bytes: budget,
        };
        let got = fused(&p, &linear, GradOutput::Scalar(1.0));
        let to_bits = |x: &[f64]| x.iter().map(|v| v.to_bits()).collect();
        let lse: Vec<f64> = got.out.row_lse.unwrap().iter().map(|&x| x.into()).collect();
        vec![
            vec![got.out.loss.to_bits().into()],
            to_bits(&lse),
            to_bits(&got.dh),
            to_bits(&got.dw),
            to_bits(&got.db),
        ]
    }
    fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(f)
    }
    let shape = [256, 64, 4096];
    let budget = 4 * (4096 + 128) * 60;
    let one = in_pool(1, || {
        (bits::<f32>(shape, budget), bits::<bf16>(shape, budget))
    });
    for threads in [2, 3] {
        let many = in_pool(threads, || {
            (bits::<f32>(shape, budget), bits::<bf16>(shape, budget))
        });
        assert!(one == many, "{threads} threads differ from 1");
    }
}

// ---- The vocab-split fused call (`lse::sharded::linear_cross_entropy_shard`) -------------------

/// An all-reduce of partials between threads: each shard's partials of a chunk are merged in
/// shard order, and every shard gets the result. Counts its rounds.
struct Loopback {
    barrier: Barrier,
    slots: Mutex<Vec<Vec<RowPartial>>>,
    rounds: AtomicUsize,
}

impl Loopback {
    fn new(shards: usize) -> Self {
        Self {
            barrier: Barrier::new(shards),
            slots: Mutex::new(vec![Vec::new(); shards]),
            rounds: AtomicUsize::new(0),
        }
    }

    fn all_reduce(&self, shard: usize, partials: &mut [RowPartial]) -> Result<(), LseError> {
        self.slots.lock().unwrap()[shard] = partials.to_vec();
        if self.barrier.wait().is_leader() {
            self.rounds.fetch_add(1, Ordering::Relaxed);
        }
        partials.fill(RowPartial::EMPTY);
        for slot in self.slots.lock().unwrap().iter() {
            RowPartial::merge_rows(partials, slot);
        }
        // Nobody writes the next round's slot before everyone has read this one's.
        self.barrier.wait();
        Ok(())
    }
}

/// The split call's outputs: the assembled gradients (dH: the shards' shares in the working
/// dtype summed in shard order, rounded once to `E`), each shard's output, and the number of
/// merges.
struct Split<S> {
    whole: Fused<S>,
    outs: Vec<CrossEntropyOutput<S>>,
    merges: usize,
}

/// Runs every shard of `cut` (shard boundaries over the classes) on its own thread; each shard
/// is given its columns of the probability targets when the problem has them.
fn split_fused<E: Element>(
    p: &Problem<E>,
    options: &LinearCrossEntropyOptions<'_>,
    grad_output: GradOutput<'_, E::Stat>,
    cut: &[usize],
) -> Split<E::Stat> {
    let (n, d, v) = (p.rows(), p.dim, p.classes);
    let shards: Vec<Shard> = cut
        .windows(2)
        .map(|w| Shard::new(w[0], w[1], v).unwrap())
        .collect();
    let loopback = Loopback::new(shards.len());
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = shards
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                let loopback = &loopback;
                scope.spawn(move || {
                    let (a, b) = (s.start(), s.stop());
                    let head = LinearHead {
                        weight: &p.weight[a * d..b * d],
                        bias: p.bias.as_ref().map(|bias| &bias[a..b]),
                        classes: b - a,
                    };
                    let mut dh = vec![E::Stat::from_f64(7.0); n * d];
                    let mut dw = vec![E::from_f64(7.0); (b - a) * d];
                    let mut db = vec![E::from_f64(7.0); b - a];
                    let grads = LinearShardGradients {
                        hidden: &mut dh,
                        weight: &mut dw,
                        bias: Some(&mut db),
                    };
                    let columns: Option<Vec<E>> = p.probabilities.as_ref().map(|q| {
                        q.chunks(v)
                            .flat_map(|row| row[a..b].iter().copied())
                            .collect()
                    });
                    let targets = match &columns {
                        Some(values) => ShardTargets::Probabilities { values, rows: n },
                        None => ShardTargets::Classes(&p.targets),
                    };
                    let out = sharded::linear_cross_entropy_shard(
                        &p.hidden,
                        head,
                        s,
                        targets,
                        options,
                        grad_output,
                        Some(grads),
                        |partials| loopback.all_reduce(i, partials),
                    )
                    .unwrap();
                    (out, dh, dw, db)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut dh_sum = vec![E::Stat::from_f64(0.0); n * d];
    let (mut dw, mut db) = (Vec::new(), Vec::new());
    let mut outs = Vec::new();
    for (out, dh, w, b) in results {
        for (acc, &x) in dh_sum.iter_mut().zip(&dh) {
            // One rounding to the working dtype per addition, as its own `+` rounds.
            *acc = E::Stat::from_f64(Into::<f64>::into(*acc) + Into::<f64>::into(x));
        }
        dw.extend(w.iter().map(|x| x.to_f64()));
        db.extend(b.iter().map(|x| x.to_f64()));
        outs.push(out);
    }
    let dh = dh_sum
        .iter()
        .map(|&x| E::from_f64(x.into()).to_f64())
        .collect();
    Split {
        whole: Fused {
            out: outs[0].clone(),
            dh,
            dw,
            db,
        },
        outs,
        merges: loopback.rounds.load(Ordering::Relaxed),
    }
}

/// Distance in ulps of the working dtype of `E` (`f32`, or `f64` for `f64`).
fn ulps<E: Element>(a: f64, b: f64) -> f64 {
    if a == b || (a.is_nan() && b.is_nan()) {
        return 0.0;
    }
    let u = unit::<E>();
    let scale = a.abs().max(b.abs()).max(f64::from(f32::MIN_POSITIVE));
    (a - b).abs() / (2.0 * u * 2f64.powi(scale.log2().floor() as i32))
}

/// The vocab-split fused call, its shards merged (1, 2 and 3 shards, uneven, an empty one, the
/// last class alone), against the one-process call and the `f64` reference:
/// * every shard holds bitwise the same loss, and makes one merge per chunk;
/// * the loss and the row losses are within 2 ulp (of `f32`; 4 of `f64`) of the one-process
///   call (each row's
///   logits come from products over the same `k`, its loss from the merged partials: the
///   sharded finish's bound against the one-process cross-entropy);
/// * every output (dW's shard rows, db, the summed dH) within the reference's a-priori bound,
///   as the one-process call is.
fn split_matches_one_process<E: Element>(probabilities: bool) {
    let mut p = Problem::<E>::new(1, SHAPE, 1.5, true);
    if probabilities {
        // Distributions (values ≥ 0): with negative target values a row's loss is a sum of
        // terms of both signs, whose rounding no ulp count of the result bounds (the a-priori
        // bound below still holds; the one-process tests cover negative values).
        p = p.with_probabilities(23, false);
    }
    let counted = if probabilities { SHAPE[0] } else { 30 };
    let most_ulps = if unit::<E>() < 1e-10 { 4.0 } else { 2.0 };
    let v = SHAPE[2];
    let weights: Vec<f64> = (0..v).map(|c| 0.5 + (c % 7) as f64 / 4.0).collect();
    let per_row: Vec<E::Stat> = (0..SHAPE[0])
        .map(|r| E::Stat::from_f64(0.5 + r as f64 / 16.0))
        .collect();
    let wide_row: Vec<f64> = per_row.iter().map(|&x| x.into()).collect();
    let cuts = [
        vec![0, v],
        vec![0, 23, v],
        vec![0, 17, 17, v],
        vec![0, 1, v - 1, v],
    ];
    let (mut worst_loss, mut worst_ratio) = (0.0f64, 0.0f64);
    for (name, options) in option_sets(&weights) {
        let options = CrossEntropyOptions {
            keep_row_loss: true,
            keep_logit_stats: false,
            ..options
        };
        for chunk_rows in [counted, 7] {
            let linear = LinearCrossEntropyOptions {
                cross_entropy: options,
                budget_bytes: budget_for::<E>(chunk_rows, SHAPE, probabilities),
            };
            let none = options.reduction == Reduction::None;
            let (ours, theirs) = if none {
                (
                    GradOutput::PerRow(&per_row[..]),
                    GradOutput::PerRow(&wide_row[..]),
                )
            } else {
                (
                    GradOutput::Scalar(E::Stat::from_f64(0.75)),
                    GradOutput::Scalar(0.75f64),
                )
            };
            let one = fused(&p, &linear, ours);
            let want = reference(&p, &options, theirs);
            let b = &want.bounds;
            for cut in &cuts {
                let what = format!("{} {name} chunk {chunk_rows} cut {cut:?}", E::DTYPE);
                let s = split_fused(&p, &linear, ours, cut);
                let bits: Vec<u64> = s
                    .outs
                    .iter()
                    .map(|o| Into::<f64>::into(o.loss).to_bits())
                    .collect();
                assert!(bits.iter().all(|&x| x == bits[0]), "{what}: {bits:?}");
                // One merge per chunk of the counted rows.
                assert_eq!(s.merges, counted.div_ceil(chunk_rows), "{what}");
                let got = &s.whole;
                let loss = ulps::<E>(got.out.loss.into(), one.out.loss.into());
                let rows = got.out.row_loss.as_ref().unwrap();
                let rows_one = one.out.row_loss.as_ref().unwrap();
                let row = rows
                    .iter()
                    .zip(rows_one)
                    .map(|(&a, &b)| ulps::<E>(a.into(), b.into()))
                    .fold(0.0, f64::max);
                assert!(
                    loss <= most_ulps && row <= most_ulps,
                    "{what}: loss {loss}, rows {row} ulp"
                );
                worst_loss = worst_loss.max(loss).max(row);
                let row_loss: Vec<f64> = rows.iter().map(|&x| x.into()).collect();
                let mut ratio = within("loss", &[got.out.loss.into()], &[want.out.loss], &[b.loss]);
                ratio = ratio.max(within(
                    "row loss",
                    &row_loss,
                    want.out.row_loss.as_ref().unwrap(),
                    &b.row_loss,
                ));
                ratio = ratio.max(within("dH", &got.dh, &want.dh, &b.dh));
                ratio = ratio.max(within("dW", &got.dw, &want.dw, &b.dw));
                ratio = ratio.max(within("db", &got.db, &want.db, &b.db));
                assert_eq!(got.out.counted_rows, one.out.counted_rows);
                worst_ratio = worst_ratio.max(ratio);
            }
        }
    }
    println!(
        "{} {}: split vs one process: loss/row loss {worst_loss} ulp; worst error / bound {worst_ratio:.3}",
        E::DTYPE,
        if probabilities { "probabilities" } else { "classes" },
    );
}

#[test]
fn split_head_matches_one_process_f32() {
    split_matches_one_process::<f32>(false);
}

#[test]
fn split_head_matches_one_process_bf16() {
    split_matches_one_process::<bf16>(false);
}

#[test]
fn split_head_matches_one_process_f64() {
    split_matches_one_process::<f64>(false);
}

#[test]
fn split_head_probability_targets_match_one_process_f32() {
    split_matches_one_process::<f32>(true);
}

#[test]
fn split_head_probability_targets_match_one_process_bf16() {
    split_matches_one_process::<bf16>(true);
}

#[test]
fn split_head_probability_targets_match_one_process_f64() {
    split_matches_one_process::<f64>(true);
}

/// A NaN probability target held by one shard is every shard's error, named by its row and
/// global column; probability targets of the wrong length are that shard's error, which the
/// others learn of from the merge.
#[test]
fn split_head_probability_errors_are_every_shards() {
    let p = Problem::<f32>::new(13, SHAPE, 1.0, true).with_probabilities(24, false);
    let (n, d, v) = (p.rows(), p.dim, p.classes);
    let linear = LinearCrossEntropyOptions {
        budget_bytes: budget_for::<f32>(7, SHAPE, true),
        ..Default::default()
    };
    let (cut, p) = ([0, 23, v], &p);
    // Each shard's result, every shard on its own thread; `short` drops one value from the
    // second shard's targets.
    let run = |q: &[f32], short: bool| -> Vec<Result<f32, LseError>> {
        let loopback = Loopback::new(2);
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..2)
                .map(|i| {
                    let loopback = &loopback;
                    scope.spawn(move || {
                        let (a, b) = (cut[i], cut[i + 1]);
                        let mut columns: Vec<f32> = q
                            .chunks(v)
                            .flat_map(|row| row[a..b].iter().copied())
                            .collect();
                        if short && i == 1 {
                            columns.pop();
                        }
                        let head = LinearHead {
                            weight: &p.weight[a * d..b * d],
                            bias: p.bias.as_ref().map(|bias| &bias[a..b]),
                            classes: b - a,
                        };
                        sharded::linear_cross_entropy_shard(
                            &p.hidden,
                            head,
                            Shard::new(a, b, v).unwrap(),
                            ShardTargets::Probabilities {
                                values: &columns,
                                rows: n,
                            },
                            &linear,
                            GradOutput::Scalar(1.0),
                            None,
                            |partials| {
                                loopback.all_reduce(i, partials)?;
                                match partials.iter().any(RowPartial::is_failed) {
                                    true => Err(LseError::EmptyClasses),
                                    false => Ok(()),
                                }
                            },
                        )
                        .map(|out| out.loss)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    };
    let good = p.probabilities.clone().unwrap();
    let losses = run(&good, false);
    assert!(
        losses
            .iter()
            .all(|l| l.as_ref().is_ok_and(|l| l.is_finite())),
        "{losses:?}"
    );

    let (row, column) = (5, 30);
    let mut bad = good.clone();
    bad[row * v + column] = f32::NAN;
    for result in run(&bad, false) {
        match result {
            Err(LseError::BadProbability {
                row: r, column: c, ..
            }) => {
                assert_eq!((r, c), (row, column))
            }
            other => panic!("{other:?}"),
        }
    }
    let results = run(&good, true);
    assert!(
        matches!(results[0], Err(LseError::EmptyClasses)),
        "{results:?}"
    );
    assert!(
        matches!(
            results[1],
            Err(LseError::LengthMismatch {
                what: "shard probability targets",
                ..
            })
        ),
        "{results:?}"
    );
}

/// A shard's non-finite row of `W` or class of `b` is named by its global index: row
/// `start + r` of `W`, column `start + c` of `b`.
#[test]
fn shard_names_a_bad_weight_row_and_bias_class_globally() {
    let (rows, dim, classes) = (3, 4, 10);
    let shard = Shard::new(3, 7, classes).unwrap();
    let hidden = vec![0.25f32; rows * dim];
    let targets = [0i64, 5, 9];
    let call = |weight: &[f32], bias: &[f32]| {
        let head = LinearHead {
            weight,
            bias: Some(bias),
            classes: shard.width(),
        };
        sharded::linear_cross_entropy_shard(
            &hidden,
            head,
            shard,
            ShardTargets::Classes(&targets),
            &LinearCrossEntropyOptions::default(),
            GradOutput::default(),
            None,
            |_: &mut [RowPartial]| Ok::<(), LseError>(()),
        )
        .unwrap_err()
    };
    let (mut weight, mut bias) = (
        vec![0.5f32; shard.width() * dim],
        vec![0.0f32; shard.width()],
    );
    weight[dim + 2] = f32::NAN; // local row 1, column 2
    let err = call(&weight, &bias);
    assert!(
        matches!(err, LseError::NonFinite { what: "weight", row: 4, column: 2, value } if value.is_nan()),
        "{err:?}"
    );
    weight[dim + 2] = 0.5;
    bias[2] = f32::INFINITY; // local class 2
    assert_eq!(
        call(&weight, &bias),
        LseError::NonFinite {
            what: "bias",
            row: 0,
            column: 5,
            value: f64::INFINITY,
        }
    );
}
