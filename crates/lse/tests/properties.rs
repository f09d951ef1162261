//! Property tests (proptest) of the numerics contract, over all four dtypes:
//!
//! - `test_extreme_logits_no_nan_*`: logits drawn from mixtures of ordinary values, ±1e4, ±the
//!   dtype's largest finite value and large fractions of it, subnormals of the dtype, exact ties at the row max and `-inf`
//!   masks. Finite input ⇒ finite logsumexp, softmax, log_softmax (−inf exactly where the logit
//!   is −inf), and — for every combination of the cross-entropy options, every reduction and
//!   output-gradient form, in place and out of place — finite loss, row losses, row lse and
//!   gradient. Softmax rows sum to 1 and cross-entropy gradient rows sum to 0 within the bounds
//!   derived below.
//! - `test_rows_independent_of_batching_*`: a row's outputs do not depend on the other rows of
//!   the batch or on their order (bitwise).
//! - `test_softmax_shift_invariance_*`: adding a constant `c` to a row, where `x + c` is exact
//!   (integers), leaves softmax, log_softmax and the z-free, cap-free cross-entropy bitwise
//!   unchanged and moves logsumexp by `c`.
//! - `test_state_merge_matches_single_fold`: `RowState` merged from parts split anywhere gives
//!   the logsumexp of one sequential fold within a few f64 ulps (bound derived at the test).
//!
//! Every proptest here runs from a fixed seed (`config`), so CI sees the same cases on every run
//! and a landing never depends on the draw; failures found anywhere are kept in
//! `properties.proptest-regressions` beside this file and replayed first. Fresh exploration:
//! `LSE_PROPTEST_SEED=random` (or a number) and `LSE_PROPTEST_CASES=N` (cases per test), e.g.
//! `LSE_PROPTEST_SEED=random LSE_PROPTEST_CASES=50000 cargo test --release -p lse --test properties`.
//!
//! Error bounds follow docs/numerics.md, floor included: an absolute error below the output dtype's
//! smallest normal number passes (`floor`), so a bound never underflows to 0 where the outputs
//! are subnormal.
//!
//! Inputs are generated so that no target mass sits on a `-inf` logit (that loss is +inf by
//! contract) and every non-ignored row has a finite logit; ignored rows may hold anything,
//! NaN, `+inf` and all `-inf` included, and must still give a finite loss and a zero gradient.

use lse::{
    cross_entropy_in_place, cross_entropy_with_grad, log_softmax, logsumexp, softmax,
    CrossEntropyOptions, CrossEntropyOutput, DType, Element, GradOutput, Reduction, RowState,
    Targets,
};

use half::{bf16, f16};
use lse_testkit::oracle::torch_argmax;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{FileFailurePersistence, RngSeed};

const IGNORE: i64 = -100;
/// Unit roundoff of f64, the precision every kernel computes in.
const U64: f64 = f64::EPSILON / 2.0;

/// The smallest positive subnormal of the dtype: `min_normal · 2u` (`2u` = machine epsilon).
fn denorm_min(dtype: DType) -> f64 {
    dtype.min_positive_normal() * 2.0 * dtype.unit_roundoff()
}

/// docs/numerics.md's absolute floor for `n` outputs of the dtype added up: each may be off by less
/// than the dtype's smallest normal number. Error terms derived at the subnormal level
/// (`k·denorm/2`) underflow to 0 in f64 arithmetic for f64 outputs; this one never does.
fn floor(dtype: DType, n: usize) -> f64 {
    n as f64 * dtype.min_positive_normal()
}

/// The seed every proptest starts from unless `LSE_PROPTEST_SEED` says otherwise.
const FIXED_SEED: u64 = 0x15e_5eed;

/// A proptest configuration that CI can rely on: `cases` from a fixed seed, failures persisted
/// next to this file (and replayed first). `LSE_PROPTEST_SEED=random|N` and
/// `LSE_PROPTEST_CASES=N` open it up for exploration away from CI.
fn config(cases: u32) -> ProptestConfig {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let rng_seed = match env("LSE_PROPTEST_SEED").as_deref() {
        None => RngSeed::Fixed(FIXED_SEED),
        Some("random") => RngSeed::Random,
        Some(n) => RngSeed::Fixed(
            n.parse()
                .unwrap_or_else(|_| panic!("LSE_PROPTEST_SEED={n}: a u64 or `random`")),
        ),
    };
    let cases = env("LSE_PROPTEST_CASES").map_or(cases, |n| {
        n.parse()
            .unwrap_or_else(|_| panic!("LSE_PROPTEST_CASES={n}: a u32"))
    });
    ProptestConfig {
        cases,
        rng_seed,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Generated cases.

/// How an ignored row's logits are spoiled (when the ignore option is on).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Junk {
    /// Not ignored.
    Kept,
    /// Ignored, logits as they are.
    Ignored,
    /// Ignored and fully masked.
    AllMasked,
    /// Ignored, one logit NaN.
    Nan,
    /// Ignored, one logit +inf.
    PosInf,
}

/// One random batch plus option values; what is switched on is decided by the test.
#[derive(Clone, Debug)]
struct Case {
    classes: usize,
    /// Raw values; NaN is a placeholder for "equal to the row max" (an exact tie).
    logits: Vec<f64>,
    /// Class target per row (taken modulo `classes`); made to sit on a finite logit.
    targets: Vec<usize>,
    /// Which rows are ignored when the ignore option is on, and what they then hold.
    junk: Vec<Junk>,
    /// Probability targets (rounded to the dtype; zeroed where the logit is `-inf`).
    probs: Vec<f64>,
    weights: Vec<f64>,
    smoothing: f64,
    z_loss: f64,
    softcap: f64,
    /// `logit_scale`, applied in every call of the case (1 in half the cases).
    logit_scale: f64,
    grad: f64,
    row_grads: Vec<f64>,
    /// Option switches for the tests that do not sweep every combination.
    flags: u8,
}

/// A logit: a mixture of the kinds of values the contract must survive.
fn logit(dtype: DType) -> impl Strategy<Value = f64> {
    let max = dtype.max_value();
    let tiny = denorm_min(dtype);
    prop_oneof![
        6 => -10.0f64..10.0,
        1 => prop_oneof![Just(1e4), Just(-1e4)],
        1 => prop_oneof![Just(max), Just(-max)],
        // Large fractions of the largest value: differences x − m near −max, where TwoSum's
        // intermediate overflowed while the difference itself is finite.
        1 => (0.0625f64..1.0, any::<bool>()).prop_map(move |(f, neg)| if neg { -f * max } else { f * max }),
        1 => (1u32..64, any::<bool>())
            .prop_map(move |(k, neg)| if neg { -f64::from(k) * tiny } else { f64::from(k) * tiny }),
        1 => Just(f64::NAN), // tie with the row max
        1 => Just(f64::NEG_INFINITY),
    ]
}

fn probability(dtype: DType) -> impl Strategy<Value = f64> {
    let tiny = denorm_min(dtype);
    prop_oneof![
        2 => Just(0.0),
        4 => 0.0f64..1.0,
        1 => Just(1.0),
        1 => Just(2.5),
        1 => (1u32..8).prop_map(move |k| f64::from(k) * tiny),
    ]
}

fn weight() -> impl Strategy<Value = f64> {
    prop_oneof![
        2 => Just(0.0),
        2 => Just(1.0),
        4 => 0.0f64..3.0,
        1 => Just(1e-30),
    ]
}

fn junk() -> impl Strategy<Value = Junk> {
    prop_oneof![
        8 => Just(Junk::Kept),
        2 => Just(Junk::Ignored),
        1 => Just(Junk::AllMasked),
        1 => Just(Junk::Nan),
        1 => Just(Junk::PosInf),
    ]
}

fn case(dtype: DType, max_rows: usize, max_classes: usize) -> impl Strategy<Value = Case> {
    (1..=max_rows, 1..=max_classes).prop_flat_map(move |(rows, classes)| {
        let data = (
            prop::collection::vec(logit(dtype), rows * classes),
            prop::collection::vec(0..classes, rows),
            prop::collection::vec(junk(), rows),
            prop::collection::vec(probability(dtype), rows * classes),
            prop::collection::vec(weight(), classes),
            prop::collection::vec(-3.0f64..3.0, rows),
        );
        let scalars = (
            prop_oneof![Just(0.1), Just(1.0), 0.0f64..1.0],
            prop_oneof![Just(1e-4), Just(1.0), 0.0f64..1.0],
            prop_oneof![Just(30.0), Just(0.05), 0.5f64..50.0],
            prop_oneof![3 => Just(1.0), 3 => -3.0f64..3.0, 1 => Just(0.0), 1 => Just(1e30)],
            any::<u8>(),
            prop_oneof![2 => Just(1.0), 1 => Just(0.5), 1 => 0.01f64..20.0],
        );
        (data, scalars).prop_map(
            move |(
                (logits, targets, junk, probs, weights, row_grads),
                (smoothing, z_loss, softcap, grad, flags, logit_scale),
            )| Case {
                classes,
                logits,
                targets,
                junk,
                probs,
                weights,
                smoothing,
                z_loss,
                softcap,
                logit_scale,
                grad,
                row_grads,
                flags,
            },
        )
    })
}

/// A case in dtype `E`, with ties resolved and targets made consistent with the masks.
#[derive(Clone, Debug)]
struct Prepared<E: Element> {
    rows: usize,
    classes: usize,
    /// Every row has a finite logit on its class target.
    logits: Vec<E>,
    /// `logits` with the ignored rows spoiled as `Case::junk` says.
    junk_logits: Vec<E>,
    targets: Vec<i64>,
    /// `targets` with the ignored rows set to the ignore index.
    ignored_targets: Vec<i64>,
    /// Zero wherever the logit is `-inf`.
    probs: Vec<E>,
    weights: Vec<f64>,
    grad: E::Stat,
    row_grads: Vec<E::Stat>,
}

fn prepare<E: Element>(case: &Case) -> Prepared<E> {
    let c = case.classes;
    let rows = case.logits.len() / c;
    let mut logits = Vec::with_capacity(rows * c);
    let mut probs = Vec::with_capacity(rows * c);
    let mut targets = Vec::with_capacity(rows);
    for r in 0..rows {
        let raw = &case.logits[r * c..(r + 1) * c];
        let row: Vec<Option<E>> = raw
            .iter()
            .map(|&v| (!v.is_nan()).then(|| E::from_f64(v)))
            .collect();
        let finite_max = |row: &[Option<E>]| {
            row.iter()
                .flatten()
                .map(|v| v.to_f64())
                .filter(|v| v.is_finite())
                .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
        };
        let tie = E::from_f64(finite_max(&row).unwrap_or(0.0));
        let mut row: Vec<E> = row.iter().map(|v| v.unwrap_or(tie)).collect();
        let t = case.targets[r] % c;
        if row[t].to_f64() == f64::NEG_INFINITY {
            let m = row
                .iter()
                .map(|v| v.to_f64())
                .filter(|v| v.is_finite())
                .fold(f64::NEG_INFINITY, f64::max);
            row[t] = E::from_f64(if m.is_finite() { m } else { 0.0 });
        }
        for (i, x) in row.iter().enumerate() {
            probs.push(if x.to_f64() == f64::NEG_INFINITY {
                E::zero()
            } else {
                E::from_f64(case.probs[r * c + i])
            });
        }
        logits.extend(row);
        targets.push(t as i64);
    }
    let mut junk_logits = logits.clone();
    let mut ignored_targets = targets.clone();
    for r in 0..rows {
        let row = &mut junk_logits[r * c..(r + 1) * c];
        let spot = (targets[r] as usize + 1) % c;
        match case.junk[r] {
            Junk::Kept => continue,
            Junk::Ignored => {}
            Junk::AllMasked => row.fill(E::from_f64(f64::NEG_INFINITY)),
            Junk::Nan => row[spot] = E::from_f64(f64::NAN),
            Junk::PosInf => row[spot] = E::from_f64(f64::INFINITY),
        }
        ignored_targets[r] = IGNORE;
    }
    let stat = |v: f64| <E::Stat as Element>::from_f64(v);
    Prepared {
        rows,
        classes: c,
        logits,
        junk_logits,
        targets,
        ignored_targets,
        probs,
        weights: case.weights.clone(),
        grad: stat(case.grad),
        row_grads: case.row_grads.iter().map(|&v| stat(v)).collect(),
    }
}

/// Which options are on, as bits: weights, smoothing, z-loss, softcap, probability targets,
/// ignored rows.
#[derive(Clone, Copy, Debug)]
struct Switches(u8);

impl Switches {
    const WEIGHTS: u8 = 1;
    const SMOOTHING: u8 = 2;
    const Z_LOSS: u8 = 4;
    const SOFTCAP: u8 = 8;
    const PROBS: u8 = 16;
    const IGNORE: u8 = 32;
    const ALL: u8 = 63;
    fn on(self, bit: u8) -> bool {
        self.0 & bit != 0
    }
}

/// The output-gradient form and reduction of one call.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Variant {
    NoneScalar,
    NonePerRow,
    Sum,
    Mean,
}

impl Variant {
    const ALL: [Variant; 4] = [
        Variant::NoneScalar,
        Variant::NonePerRow,
        Variant::Sum,
        Variant::Mean,
    ];
    fn reduction(self) -> Reduction {
        match self {
            Variant::NoneScalar | Variant::NonePerRow => Reduction::None,
            Variant::Sum => Reduction::Sum,
            Variant::Mean => Reduction::Mean,
        }
    }
}

/// One cross-entropy call's inputs, borrowed from a prepared case.
struct Call<'a, E: Element> {
    logits: &'a [E],
    classes: usize,
    targets: Targets<'a, E>,
    options: CrossEntropyOptions<'a>,
    grad: GradOutput<'a, E::Stat>,
}

fn call<'a, E: Element>(
    p: &'a Prepared<E>,
    case: &Case,
    sw: Switches,
    variant: Variant,
) -> Call<'a, E> {
    let probs = sw.on(Switches::PROBS);
    let ignore = sw.on(Switches::IGNORE) && !probs;
    let logits = if ignore { &p.junk_logits } else { &p.logits };
    let targets = if probs {
        Targets::Probabilities(&p.probs[..])
    } else if ignore {
        Targets::Classes(&p.ignored_targets[..])
    } else {
        Targets::Classes(&p.targets[..])
    };
    let options = CrossEntropyOptions {
        weights: sw.on(Switches::WEIGHTS).then_some(&p.weights[..]),
        label_smoothing: if sw.on(Switches::SMOOTHING) {
            case.smoothing
        } else {
            0.0
        },
        z_loss: if sw.on(Switches::Z_LOSS) {
            case.z_loss
        } else {
            0.0
        },
        softcap: sw.on(Switches::SOFTCAP).then_some(case.softcap),
        logit_scale: case.logit_scale,
        reduction: variant.reduction(),
        keep_row_loss: true,
        keep_row_lse: true,
        keep_row_argmax: true,
        ..Default::default()
    };
    let grad = match variant {
        Variant::NonePerRow => GradOutput::PerRow(&p.row_grads[..]),
        _ => GradOutput::Scalar(p.grad),
    };
    Call {
        logits,
        classes: p.classes,
        targets,
        options,
        grad,
    }
}

impl<E: Element> Call<'_, E> {
    fn ignored(&self, r: usize) -> bool {
        matches!(self.targets, Targets::Classes(t) if t[r] == IGNORE)
    }

    fn run(&self) -> (CrossEntropyOutput<E::Stat>, Vec<E>) {
        let mut grad = vec![E::from_f64(f64::NAN); self.logits.len()];
        let out = cross_entropy_with_grad(
            self.logits,
            self.classes,
            self.targets,
            &self.options,
            self.grad,
            &mut grad,
        )
        .unwrap_or_else(|e| panic!("cross_entropy_with_grad failed: {e}"));
        (out, grad)
    }

    fn run_in_place(&self) -> (CrossEntropyOutput<E::Stat>, Vec<E>) {
        let mut buf = self.logits.to_vec();
        let out = cross_entropy_in_place(
            &mut buf,
            self.classes,
            self.targets,
            &self.options,
            self.grad,
        )
        .unwrap_or_else(|e| panic!("cross_entropy_in_place failed: {e}"));
        (out, buf)
    }

    /// The factor the library multiplies row `r`'s loss gradient by: `g` or `g_r`, divided by
    /// the mean's denominator (0 for an empty mean).
    fn scale(&self, out: &CrossEntropyOutput<E::Stat>, r: usize) -> f64 {
        let g = self.caller_grad(r);
        match self.options.reduction {
            Reduction::Mean if out.denominator == 0.0 => 0.0,
            Reduction::Mean => g / out.denominator,
            _ => g,
        }
    }

    /// The caller's incoming gradient for row `r`.
    fn caller_grad(&self, r: usize) -> f64 {
        match self.grad {
            GradOutput::Scalar(g) => g.into(),
            GradOutput::PerRow(gs) => gs[r].into(),
        }
    }

    /// `A = Σ_c a_c`, the row's total weighted (smoothed) target mass.
    fn target_total(&self, r: usize) -> f64 {
        let c = self.classes;
        let row = &self.logits[r * c..(r + 1) * c];
        let live: Vec<usize> = (0..c)
            .filter(|&i| row[i].to_f64() > f64::NEG_INFINITY)
            .collect();
        let eps = self.options.label_smoothing;
        let w = |i: usize| self.options.weights.map_or(1.0, |w| w[i]);
        live.iter()
            .map(|&i| {
                let q = match self.targets {
                    Targets::Classes(t) => f64::from(u8::from(t[r] == i as i64)),
                    Targets::Probabilities(p) => p[r * c + i].to_f64(),
                };
                w(i) * ((1.0 - eps) * q + eps / live.len() as f64)
            })
            .sum()
    }
}

fn bits<E: Element>(v: &[E]) -> Vec<u64> {
    v.iter().map(|x| x.to_f64().to_bits()).collect()
}

fn same_stats<S: Element>(a: &Option<Vec<S>>, b: &Option<Vec<S>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => bits(a) == bits(b),
        (None, None) => true,
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// Extreme logits: finite in, finite out.

/// Softmax and log_softmax of the clean logits: finiteness, −inf pattern, and the row sum.
/// What the dispatched (AVX2) kernel adds to the scalar kernel's error budget, relative to each
/// probability or gradient entry: for f32/f16/bf16 rows its exp's relative error (≤ 2^-26 per
/// term) and, for f32 rows whose exp terms it caches in the output buffer between its two
/// passes, one more rounding to f32 (≤ u). Its f64 exp stays within the scalar budget.
fn kernel_error(dtype: DType) -> f64 {
    let exp = (-26f64).exp2();
    match dtype {
        DType::F64 => 0.0,
        DType::F32 => dtype.unit_roundoff() + exp,
        DType::F16 | DType::BF16 => exp,
    }
}

fn check_softmax_family<E: Element>(p: &Prepared<E>) {
    let (c, dtype) = (p.classes, E::DTYPE);
    let mut lse = vec![<E::Stat as Element>::zero(); p.rows];
    logsumexp(&p.logits, c, &mut lse).expect("logsumexp");
    let mut y = vec![E::zero(); p.logits.len()];
    softmax(&p.logits, c, &mut y).expect("softmax");
    let mut ly = vec![E::zero(); p.logits.len()];
    log_softmax(&p.logits, c, &mut ly).expect("log_softmax");
    // Row sum of softmax. Each ŷ_i is the f64 value y_i·(1 + θ_i) rounded once to the dtype, with
    // |θ_i| ≤ 4·u64 (exp ≤ 1 ulp and its subtraction correction, one division, the compensated
    // denominator ≤ 2 ulps). Rounding adds ≤ u·y_i in the normal range and ≤ denorm/2 in the
    // subnormal range (within docs/numerics.md's floor). Summing the C values in f64 here adds
    // ≤ (C − 1)·u64·Σŷ. With Σ y_i = 1:
    //   |Σŷ_i − 1| ≤ u + C·denorm/2 + (C + 4)·u64 (+ second-order terms),
    // which we take with a factor 2 on the f64 part and the floor for the subnormal part:
    // u + floor(C) + (2C + 8)·u64, plus `kernel_error(dtype)` for the dispatched kernel.
    let u = dtype.unit_roundoff();
    let bound = u + kernel_error(dtype) + floor(dtype, c) + (2.0 * c as f64 + 8.0) * U64;
    for r in 0..p.rows {
        let row = &p.logits[r * c..(r + 1) * c];
        let l: f64 = lse[r].into();
        assert!(
            l.is_finite(),
            "{dtype} logsumexp row {r} = {l}; row {row:?}"
        );
        let yr = &y[r * c..(r + 1) * c];
        assert!(
            yr.iter().all(|v| v.to_f64().is_finite()),
            "{dtype} softmax row {r} = {yr:?}; row {row:?}"
        );
        let sum: f64 = yr.iter().map(|v| v.to_f64()).sum();
        assert!(
            (sum - 1.0).abs() <= bound,
            "{dtype} softmax row {r} sums to 1 + {:e}, bound {bound:e}; row {row:?} → {yr:?}",
            sum - 1.0
        );
        for i in 0..c {
            let (x, l) = (row[i].to_f64(), ly[r * c + i].to_f64());
            if x == f64::NEG_INFINITY {
                assert_eq!(
                    l,
                    f64::NEG_INFINITY,
                    "{dtype} log_softmax of -inf; row {row:?}"
                );
                assert_eq!(yr[i].to_f64(), 0.0, "{dtype} softmax of -inf; row {row:?}");
            } else {
                assert!(
                    l.is_finite() && l <= 0.0,
                    "{dtype} log_softmax ({r},{i}) = {l} for logit {x}; row {row:?}"
                );
            }
        }
    }
}

/// One cross-entropy call: finite outputs, zeros where the contract says, in-place bitwise equal
/// to out-of-place, and the gradient row sum.
fn check_ce<E: Element>(p: &Prepared<E>, case: &Case, sw: Switches, variant: Variant) {
    let dtype = E::DTYPE;
    let cl = call(p, case, sw, variant);
    let ctx = || format!("{dtype} {sw:?} {variant:?}\nlogits {:?}", cl.logits);
    let (out, grad) = cl.run();
    let (out_ip, grad_ip) = cl.run_in_place();
    assert_eq!(
        out.loss.to_f64().to_bits(),
        out_ip.loss.to_f64().to_bits(),
        "in-place loss; {}",
        ctx()
    );
    assert!(
        same_stats(&out.row_loss, &out_ip.row_loss),
        "in-place row losses; {}",
        ctx()
    );
    assert!(
        same_stats(&out.row_lse, &out_ip.row_lse),
        "in-place row lse; {}",
        ctx()
    );
    assert_eq!(bits(&grad), bits(&grad_ip), "in-place gradient; {}", ctx());
    assert_eq!(
        out.row_argmax,
        out_ip.row_argmax,
        "in-place argmax; {}",
        ctx()
    );
    check_metrics(&cl, &out, ctx);

    let loss: f64 = out.loss.into();
    assert!(loss.is_finite(), "loss {loss}; {}", ctx());
    let row_loss = out.row_loss.as_ref().expect("row losses");
    let row_lse = out.row_lse.as_ref().expect("row lse");
    let c = cl.classes;
    let u = dtype.unit_roundoff();
    for r in 0..p.rows {
        let (rl, rlse): (f64, f64) = (row_loss[r].into(), row_lse[r].into());
        let g = &grad[r * c..(r + 1) * c];
        let x = &cl.logits[r * c..(r + 1) * c];
        assert!(rl.is_finite(), "row {r} loss {rl}; {}", ctx());
        if cl.ignored(r) {
            assert_eq!(rl, 0.0, "ignored row {r} loss; {}", ctx());
            assert!(rlse.is_nan(), "ignored row {r} lse {rlse}; {}", ctx());
            assert!(
                g.iter().all(|v| v.to_f64() == 0.0),
                "ignored row {r} gradient {g:?}; {}",
                ctx()
            );
            continue;
        }
        assert!(rlse.is_finite(), "row {r} lse {rlse}; {}", ctx());
        // The loss's own gradient is finite (saturating at MAX if it must); only an incoming
        // gradient larger than 1 in magnitude (a loss scale) may push it past the dtype's range,
        // and then it is ±inf — never NaN — so that a loss scaler sees the overflow.
        let caller = cl.caller_grad(r).abs();
        for i in 0..c {
            let gi = g[i].to_f64();
            assert!(
                gi.is_finite() || (gi.is_infinite() && caller > 1.0),
                "gradient ({r},{i}) = {gi} with incoming gradient {caller}; {}",
                ctx()
            );
            if x[i].to_f64() == f64::NEG_INFINITY {
                assert_eq!(gi, 0.0, "gradient ({r},{i}) at a -inf logit; {}", ctx());
            }
        }
        // Gradient row sum. Without z-loss and soft-capping the row gradient is
        // scale·(A·p_i − a_i) with A = Σ_c a_c and Σ p_i = 1, so it sums to 0 exactly (one-hot
        // unweighted unsmoothed targets are the case A = 1). In f64, p̂_i = p_i(1 + θ_i) with
        // |θ_i| ≤ 4·u64, a_i carries ≤ 3 roundings, the library's A ≤ 3 more, and forming
        // A·p̂_i − a_i and the product with `scale` add ≤ u64 each relative to the result, so
        // |Σ_i g_i(f64)| ≤ 11·u64·|scale|·A + 2·u64·Σ|g_i|. Rounding to the dtype adds
        // ≤ u·Σ|g_i| + C·denorm/2, and our f64 summation ≤ (C − 1)·u64·Σ|ĝ_i|. Target masses
        // can be subnormal in f64 itself (subnormal probabilities): each of the ~8 f64 operations
        // behind A·p̂_i − a_i then also has an absolute error ≤ denorm64/2, magnified by `scale`
        // when it is large — and not shrunk when it is small, since the product with `scale`
        // rounds to a subnormal again. Every such subnormal-level term is covered by the floor of
        // docs/numerics.md (each entry may be off by less than the dtype's smallest normal), which,
        // unlike `C·denorm/2` for f64 outputs, does not underflow to 0 (issue 18's case: an
        // exact 0 computed as −5e-324). We check
        //   |Σĝ_i| ≤ (u + (C + 4)·u64)·Σ|ĝ_i|·(1 + u) + 32·u64·|scale|·A + floor(C)
        //            + 4·(C + 1)·|scale|·denorm64
        // (a factor ~3 of headroom on the f64 constant), plus `kernel_error(dtype)·Σ|ĝ_i|` for
        // the dispatched kernel. Rows where a gradient entry saturated
        // at the dtype's largest value or overflowed past it (an exact gradient beyond its
        // range: huge `scale`) are skipped: saturation is not rounding.
        if !sw.on(Switches::Z_LOSS) && !sw.on(Switches::SOFTCAP) {
            let max = E::MAX.to_f64();
            if g.iter().any(|v| v.to_f64().abs() >= max) {
                continue;
            }
            let sum: f64 = g.iter().map(|v| v.to_f64()).sum();
            let abs: f64 = g.iter().map(|v| v.to_f64().abs()).sum();
            // The logit scale is a factor of the gradient with respect to the raw logits.
            let scale = cl.scale(&out, r).abs() * cl.options.logit_scale;
            let a = cl.target_total(r);
            let bound = (u + kernel_error(dtype) + (c as f64 + 4.0) * U64) * abs * (1.0 + u)
                + 32.0 * U64 * scale * a
                + floor(dtype, c)
                + 4.0 * (c as f64 + 1.0) * scale * denorm_min(DType::F64);
            assert!(
                sum.abs() <= bound,
                "gradient row {r} sums to {sum:e}, bound {bound:e} (Σ|g| {abs:e}, scale {scale:e}, A {a:e}); gradient {g:?}; {}",
                ctx()
            );
        }
    }
}

/// The argmax, token accuracy and z-loss term of a call against their definitions: the first
/// column holding the row's largest logit (lse-testkit's `torch_argmax`), the rows whose argmax is their
/// target, and `Σ z·lse²` from the row lse, reduced as the loss is.
fn check_metrics<E: Element>(
    cl: &Call<'_, E>,
    out: &CrossEntropyOutput<E::Stat>,
    ctx: impl Fn() -> String,
) {
    let c = cl.classes;
    let argmax = out.row_argmax.as_ref().expect("row argmax");
    let row_lse = out.row_lse.as_ref().expect("row lse");
    let mut correct = 0;
    let mut z_sum = 0.0;
    for (r, &got) in argmax.iter().enumerate() {
        if cl.ignored(r) {
            assert_eq!(got, -1, "ignored row {r} argmax; {}", ctx());
            continue;
        }
        let x = &cl.logits[r * c..(r + 1) * c];
        let row: Vec<f64> = x.iter().map(|v| v.to_f64()).collect();
        assert_eq!(got, torch_argmax(&row) as i64, "row {r} argmax; {}", ctx());
        if let Targets::Classes(t) = cl.targets {
            correct += usize::from(t[r] == got);
        }
        let lse: f64 = row_lse[r].into();
        if lse > f64::NEG_INFINITY {
            z_sum += cl.options.z_loss * lse * lse;
        }
    }
    let want_correct = matches!(cl.targets, Targets::Classes(_)).then_some(correct);
    assert_eq!(out.correct_rows, want_correct, "correct rows; {}", ctx());
    let z_loss: f64 = out.z_loss.into();
    if cl.options.z_loss == 0.0 {
        assert_eq!(z_loss, 0.0, "z-loss term without z-loss; {}", ctx());
        return;
    }
    let want = match cl.options.reduction {
        Reduction::Mean if out.denominator == 0.0 => 0.0,
        Reduction::Mean => z_sum / out.denominator,
        _ => z_sum,
    };
    // Each term is z·lse² of an lse rounded to the loss dtype (2u relative, squared: 4u) and the
    // library's own f64 terms and sums are exact to a few f64 ulps each; terms are all >= 0, so
    // the sum and the division keep the relative error. Saturated terms are skipped.
    let u = <E::Stat as Element>::DTYPE.unit_roundoff();
    let stat_max = <E::Stat as Element>::MAX.to_f64();
    if want.is_finite() && want.abs() < stat_max / 2.0 && z_loss.abs() < stat_max {
        let bound = (6.0 * u + (row_lse.len() as f64 + 8.0) * U64) * want.abs()
            + floor(<E::Stat as Element>::DTYPE, 1);
        assert!(
            (z_loss - want).abs() <= bound,
            "z-loss term {z_loss:e}, from the row lse {want:e} (bound {bound:e}); {}",
            ctx()
        );
    }
}

fn check_extreme<E: Element>(case: &Case) {
    let p = prepare::<E>(case);
    check_softmax_family(&p);
    for on in 0..=Switches::ALL {
        let sw = Switches(on);
        if sw.on(Switches::PROBS) && sw.on(Switches::IGNORE) {
            continue; // probability targets have no ignore index: same call as without
        }
        for variant in Variant::ALL {
            check_ce(&p, case, sw, variant);
        }
    }
}

const EXTREME_CASES: u32 = 10000;

/// The minimal case proptest found for `test_extreme_logits_no_nan_f64`, kept as a fixed test:
/// finite row losses whose weighted mean exceeds `f64::MAX` (denominator < 1) must saturate,
/// not overflow to `+inf`.
#[test]
fn test_extreme_logits_no_nan_f64_mean_overflow() {
    /// Logits (one row), class target, class weights, z-loss.
    type Input<'a> = (&'a [f64], &'a [i64], &'a [f64], f64);
    let cases: [Input; 2] = [
        // One row, one class at f64::MAX, weight 0.39, z-loss 1: row loss = z·lse² saturates to
        // f64::MAX, and the mean divides it by 0.39.
        (&[f64::MAX], &[0], &[0.390756928960737], 1.0),
        // No z-loss: the distance m − x_y = MAX − (−MAX) saturates, weight 0.5.
        (&[f64::MAX, -f64::MAX], &[1], &[0.5, 0.5], 0.0),
    ];
    for (logits, targets, weights, z_loss) in cases {
        let options = CrossEntropyOptions {
            weights: Some(weights),
            z_loss,
            reduction: Reduction::Mean,
            keep_row_loss: true,
            ..Default::default()
        };
        let mut grad = vec![0.0; logits.len()];
        let out = cross_entropy_with_grad(
            logits,
            logits.len(),
            Targets::Classes(targets),
            &options,
            GradOutput::Scalar(1.0),
            &mut grad,
        )
        .unwrap();
        assert!(out.row_loss.as_ref().unwrap()[0].is_finite());
        assert!(grad.iter().all(|g| g.is_finite()), "{grad:?}");
        assert!(
            out.loss.is_finite(),
            "mean of finite row losses {:?} over denominator {} is {}",
            out.row_loss,
            out.denominator,
            out.loss
        );
    }
}

/// Issue 18: the case `test_extreme_logits_no_nan_f64` found at random. One class, so every
/// softmax is exactly 1 and every gradient entry `scale·(A·p − a)` is exactly 0; row 1 carries a
/// subnormal probability target (3e-323, weighted 1.495: a mass of 9 subnormal units). The
/// library's f64 arithmetic on those subnormal masses leaves one unit, −5e-324: an absolute error
/// far below `f64::MIN_POSITIVE`, which docs/numerics.md lets pass. The library was right; the test's
/// bound `… + C·denorm/2 + 4·(C + 1)·scale·denorm64` rounded to 0 in f64 (scale 0.06) and now
/// carries the floor.
#[test]
fn test_extreme_logits_subnormal_probability_target_f64() {
    let case = Case {
        classes: 1,
        logits: vec![0.0; 4],
        targets: vec![0; 4],
        junk: vec![Junk::Kept; 4],
        probs: vec![0.0, 3e-323, 0.0, 0.0],
        weights: vec![1.4951902799374999],
        smoothing: 0.1,
        z_loss: 0.0001,
        softcap: 30.0,
        logit_scale: 1.0,
        grad: 0.23949903108584755,
        row_grads: vec![0.0; 4],
        flags: 0,
    };
    // The exact call that failed, then the whole sweep of options and variants on this case.
    let p = prepare::<f64>(&case);
    check_ce(
        &p,
        &case,
        Switches(Switches::WEIGHTS | Switches::PROBS),
        Variant::Mean,
    );
    check_extreme::<f64>(&case);

    // Independently of the sweep's bookkeeping: the gradient is 0 up to the floor, and the loss
    // is exactly 0 (one class: lse = x, every distance is 0).
    let probs = [0.0, 3e-323, 0.0, 0.0];
    let weights = [1.4951902799374999];
    let options = CrossEntropyOptions {
        weights: Some(&weights),
        reduction: Reduction::Mean,
        ..Default::default()
    };
    let mut grad = [1.0f64; 4];
    let out = cross_entropy_with_grad(
        &[0.0f64; 4],
        1,
        Targets::Probabilities(&probs),
        &options,
        GradOutput::Scalar(0.23949903108584755),
        &mut grad,
    )
    .expect("finite logits and targets");
    assert_eq!(out.loss, 0.0);
    for (i, g) in grad.iter().enumerate() {
        assert!(
            g.abs() < f64::MIN_POSITIVE,
            "gradient row {i} = {g:e}, exact 0, floor {:e}",
            f64::MIN_POSITIVE
        );
    }
}

/// f64 logits whose difference from the row max is finite but beyond −max/2 (`3e307 − MAX`):
/// TwoSum's intermediate overflowed and made the subtraction's error term NaN, so the scalar
/// kernel's loss and gradient and the vector kernel's target gradient were NaN (found through
/// the Python package's hypothesis tests). Every op and option on such rows stays finite.
#[test]
fn test_extreme_logits_difference_near_max_f64() {
    let max = f64::MAX;
    let case = Case {
        classes: 3,
        logits: vec![
            3e307,
            max,
            -1.0,
            -max,
            -0.6 * max,
            0.9 * max,
            0.5 * max,
            -0.5 * max,
            0.0,
        ],
        targets: vec![0, 0, 1],
        junk: vec![Junk::Kept; 3],
        probs: vec![0.5, 0.25, 0.25, 0.0, 1.0, 0.0, 1.0, 0.0, 2.5],
        weights: vec![1.0, 0.5, 2.0],
        smoothing: 0.1,
        z_loss: 0.0001,
        softcap: 30.0,
        logit_scale: 1.0,
        grad: 1.0,
        row_grads: vec![1.0, -2.0, 0.5],
        flags: 0,
    };
    check_extreme::<f64>(&case);
    // PyTorch's answer for the issue's row: softmax [0, 1], so the gradient is [−1, 1] exactly.
    let mut grad = [0.0f64; 2];
    let out = cross_entropy_with_grad(
        &[3e307, max],
        2,
        Targets::Classes(&[0]),
        &CrossEntropyOptions::default(),
        GradOutput::Scalar(1.0),
        &mut grad,
    )
    .expect("finite logits");
    assert_eq!(out.loss, max - 3e307);
    assert_eq!(grad, [-1.0, 1.0]);
}

proptest! {
    #![proptest_config(config(EXTREME_CASES))]

    #[test]
    fn test_extreme_logits_no_nan_f64(case in case(DType::F64, 5, 12)) {
        check_extreme::<f64>(&case);
    }

    #[test]
    fn test_extreme_logits_no_nan_f32(case in case(DType::F32, 5, 12)) {
        check_extreme::<f32>(&case);
    }

    #[test]
    fn test_extreme_logits_no_nan_f16(case in case(DType::F16, 5, 12)) {
        check_extreme::<f16>(&case);
    }

    #[test]
    fn test_extreme_logits_no_nan_bf16(case in case(DType::BF16, 5, 12)) {
        check_extreme::<bf16>(&case);
    }
}

// ---------------------------------------------------------------------------------------------
// Row independence: a row's outputs do not depend on the batch.

fn check_batching<E: Element>(case: &Case) {
    let p = prepare::<E>(case);
    let c = p.classes;
    let dtype = E::DTYPE;
    // Softmax family: each row alone equals its slice of the batch, bitwise.
    let mut lse = vec![<E::Stat as Element>::zero(); p.rows];
    let mut y = vec![E::zero(); p.logits.len()];
    let mut ly = vec![E::zero(); p.logits.len()];
    logsumexp(&p.logits, c, &mut lse).unwrap();
    softmax(&p.logits, c, &mut y).unwrap();
    log_softmax(&p.logits, c, &mut ly).unwrap();
    for r in 0..p.rows {
        let row = &p.logits[r * c..(r + 1) * c];
        let mut l1 = [<E::Stat as Element>::zero()];
        let (mut y1, mut ly1) = (vec![E::zero(); c], vec![E::zero(); c]);
        logsumexp(row, c, &mut l1).unwrap();
        softmax(row, c, &mut y1).unwrap();
        log_softmax(row, c, &mut ly1).unwrap();
        assert_eq!(bits(&l1), bits(&lse[r..r + 1]), "{dtype} lse row {r}");
        assert_eq!(
            bits(&y1),
            bits(&y[r * c..(r + 1) * c]),
            "{dtype} softmax row {r}"
        );
        assert_eq!(
            bits(&ly1),
            bits(&ly[r * c..(r + 1) * c]),
            "{dtype} log_softmax row {r}"
        );
    }

    // Cross-entropy with per-row results (Reduction::None / Sum; a mean couples the rows through
    // its denominator). Options from the case's switches.
    let sw = Switches(case.flags & Switches::ALL);
    for variant in [Variant::NoneScalar, Variant::NonePerRow, Variant::Sum] {
        let batch = call(&p, case, sw, variant);
        let (out, grad) = batch.run();
        let row_loss = out.row_loss.as_ref().unwrap();
        let row_lse = out.row_lse.as_ref().unwrap();
        // Each row alone.
        for r in 0..p.rows {
            let one_targets = match batch.targets {
                Targets::Classes(t) => Targets::Classes(&t[r..r + 1]),
                Targets::Probabilities(q) => Targets::Probabilities(&q[r * c..(r + 1) * c]),
            };
            let one_grad = match batch.grad {
                GradOutput::PerRow(gs) => GradOutput::PerRow(&gs[r..r + 1]),
                g => g,
            };
            let mut g1 = vec![E::zero(); c];
            let o1 = cross_entropy_with_grad(
                &batch.logits[r * c..(r + 1) * c],
                c,
                one_targets,
                &batch.options,
                one_grad,
                &mut g1,
            )
            .unwrap();
            let ctx = format!("{dtype} {sw:?} {variant:?} row {r}");
            assert_eq!(
                bits(o1.row_loss.as_ref().unwrap()),
                bits(&row_loss[r..r + 1]),
                "row loss; {ctx}"
            );
            assert_eq!(
                bits(o1.row_lse.as_ref().unwrap()),
                bits(&row_lse[r..r + 1]),
                "row lse; {ctx}"
            );
            assert_eq!(
                bits(&g1),
                bits(&grad[r * c..(r + 1) * c]),
                "gradient; {ctx}"
            );
        }
        // The batch in reverse row order: outputs permuted the same way, bitwise; the total
        // (a compensated sum of non-negative row losses) within 4·u64 relative before its one
        // rounding to the stat dtype, so within one ulp of that dtype plus that.
        let rev = |v: &[E]| -> Vec<E> { v.chunks(c).rev().flatten().copied().collect() };
        let rev_logits = rev(batch.logits);
        let rev_probs;
        let rev_classes: Vec<i64>;
        let rev_targets = match batch.targets {
            Targets::Classes(t) => {
                rev_classes = t.iter().rev().copied().collect();
                Targets::Classes(&rev_classes[..])
            }
            Targets::Probabilities(q) => {
                rev_probs = rev(q);
                Targets::Probabilities(&rev_probs[..])
            }
        };
        let rev_row_grads: Vec<E::Stat> = p.row_grads.iter().rev().copied().collect();
        let rev_grad_out = match batch.grad {
            GradOutput::PerRow(_) => GradOutput::PerRow(&rev_row_grads[..]),
            g => g,
        };
        let mut rev_grad = vec![E::zero(); p.logits.len()];
        let rev_out = cross_entropy_with_grad(
            &rev_logits,
            c,
            rev_targets,
            &batch.options,
            rev_grad_out,
            &mut rev_grad,
        )
        .unwrap();
        let ctx = format!("{dtype} {sw:?} {variant:?} reversed");
        assert_eq!(bits(&rev(&grad)), bits(&rev_grad), "gradient; {ctx}");
        let rl_rev: Vec<_> = rev_out
            .row_loss
            .as_ref()
            .unwrap()
            .iter()
            .rev()
            .copied()
            .collect();
        assert_eq!(bits(&rl_rev), bits(row_loss), "row losses; {ctx}");
        let (a, b): (f64, f64) = (out.loss.into(), rev_out.loss.into());
        let stat = <E::Stat as Element>::DTYPE;
        let tol = 2.0 * stat.unit_roundoff() * a.abs().max(b.abs()) + 4.0 * U64 * a.abs();
        assert!((a - b).abs() <= tol, "total loss {a} vs {b}; {ctx}");
    }
}

const BATCHING_CASES: u32 = 1000;

proptest! {
    #![proptest_config(config(BATCHING_CASES))]

    #[test]
    fn test_rows_independent_of_batching_f64(case in case(DType::F64, 6, 10)) {
        check_batching::<f64>(&case);
    }

    #[test]
    fn test_rows_independent_of_batching_f32(case in case(DType::F32, 6, 10)) {
        check_batching::<f32>(&case);
    }

    #[test]
    fn test_rows_independent_of_batching_f16(case in case(DType::F16, 6, 10)) {
        check_batching::<f16>(&case);
    }

    #[test]
    fn test_rows_independent_of_batching_bf16(case in case(DType::BF16, 6, 10)) {
        check_batching::<bf16>(&case);
    }
}

// ---------------------------------------------------------------------------------------------
// Shift invariance where the shift is exact.

#[derive(Clone, Debug)]
struct ShiftCase {
    classes: usize,
    /// Integers, or `None` for a masked (`-inf`) logit.
    logits: Vec<Option<i32>>,
    shift: i32,
    targets: Vec<usize>,
    probs: Vec<f64>,
    weights: Vec<f64>,
    smoothing: f64,
    flags: u8,
    reduction: u8,
}

/// Integer logits in `[-range, range]` and an integer shift in the same range: with
/// `2·range ≤ 2^p` (p the dtype's significand bits) `x + c` is exact.
fn shift_case(range: i32) -> impl Strategy<Value = ShiftCase> {
    (1usize..=4, 1usize..=12).prop_flat_map(move |(rows, classes)| {
        (
            prop::collection::vec(
                prop_oneof![6 => (-range..=range).prop_map(Some), 1 => Just(None)],
                rows * classes,
            ),
            -range..=range,
            prop::collection::vec(0..classes, rows),
            prop::collection::vec(0.0f64..1.0, rows * classes),
            prop::collection::vec(0.0f64..3.0, classes),
            0.0f64..1.0,
            any::<u8>(),
            0u8..3,
        )
            .prop_map(
                move |(logits, shift, targets, probs, weights, smoothing, flags, reduction)| {
                    ShiftCase {
                        classes,
                        logits,
                        shift,
                        targets,
                        probs,
                        weights,
                        smoothing,
                        flags,
                        reduction,
                    }
                },
            )
    })
}

fn check_shift<E: Element>(s: &ShiftCase) {
    let c = s.classes;
    let rows = s.logits.len() / c;
    let dtype = E::DTYPE;
    let mut x: Vec<f64> = s
        .logits
        .iter()
        .map(|v| v.map_or(f64::NEG_INFINITY, f64::from))
        .collect();
    // Class targets on finite logits; probability mass only on finite logits.
    let mut probs = s.probs.clone();
    for r in 0..rows {
        let t = s.targets[r] % c;
        if x[r * c + t] == f64::NEG_INFINITY {
            x[r * c + t] = 0.0;
        }
        for i in 0..c {
            if x[r * c + i] == f64::NEG_INFINITY {
                probs[r * c + i] = 0.0;
            }
        }
    }
    let shifted: Vec<f64> = x.iter().map(|&v| v + f64::from(s.shift)).collect();
    let to_e = |v: &[f64]| -> Vec<E> {
        v.iter()
            .map(|&x| {
                let e = E::from_f64(x);
                assert_eq!(e.to_f64(), x, "{dtype}: {x} must be exact");
                e
            })
            .collect()
    };
    let (xe, se) = (to_e(&x), to_e(&shifted));
    let ctx = format!("{dtype} shift {} logits {x:?}", s.shift);

    let run_sm = |v: &[E]| {
        let (mut y, mut ly) = (vec![E::zero(); v.len()], vec![E::zero(); v.len()]);
        let mut l = vec![<E::Stat as Element>::zero(); rows];
        softmax(v, c, &mut y).unwrap();
        log_softmax(v, c, &mut ly).unwrap();
        logsumexp(v, c, &mut l).unwrap();
        (y, ly, l)
    };
    let (y0, ly0, l0) = run_sm(&xe);
    let (y1, ly1, l1) = run_sm(&se);
    assert_eq!(bits(&y0), bits(&y1), "softmax; {ctx}");
    assert_eq!(bits(&ly0), bits(&ly1), "log_softmax; {ctx}");
    // logsumexp: both are the f64 value m + log1p(s') (resp. m + c + log1p(s'), the same s')
    // rounded once to the stat dtype: |lse(x + c) − c − lse(x)| ≤ ½ulp(lse(x + c)) + ½ulp(lse(x))
    // + f64 rounding of the two additions (2 u64 each of |m| + |c| + log1p).
    let stat = <E::Stat as Element>::DTYPE;
    for r in 0..rows {
        let (a, b): (f64, f64) = (l0[r].into(), l1[r].into());
        let shift = f64::from(s.shift);
        let tol = stat.unit_roundoff() * (a.abs() + b.abs())
            + 4.0 * U64 * (a.abs() + b.abs() + shift.abs())
            + floor(stat, 2);
        assert!(
            (b - shift - a).abs() <= tol,
            "lse row {r}: {a} vs {b} − {shift}; {ctx}"
        );
    }

    // Cross-entropy without z-loss and soft-capping (neither is shift invariant).
    let probs_e: Vec<E> = probs.iter().map(|&v| E::from_f64(v)).collect();
    let targets: Vec<i64> = (0..rows)
        .map(|r| {
            if s.flags & 64 != 0 && r % 2 == 1 {
                IGNORE
            } else {
                (s.targets[r] % c) as i64
            }
        })
        .collect();
    let t = if s.flags & 1 != 0 {
        Targets::Probabilities(&probs_e[..])
    } else {
        Targets::Classes(&targets[..])
    };
    let options = CrossEntropyOptions {
        weights: (s.flags & 2 != 0).then_some(&s.weights[..]),
        label_smoothing: if s.flags & 4 != 0 { s.smoothing } else { 0.0 },
        reduction: [Reduction::None, Reduction::Sum, Reduction::Mean][usize::from(s.reduction)],
        keep_row_loss: true,
        ..Default::default()
    };
    let g = GradOutput::Scalar(<E::Stat as Element>::from_f64(0.75));
    let (mut g0, mut g1) = (vec![E::zero(); xe.len()], vec![E::zero(); xe.len()]);
    let o0 = cross_entropy_with_grad(&xe, c, t, &options, g, &mut g0).unwrap();
    let o1 = cross_entropy_with_grad(&se, c, t, &options, g, &mut g1).unwrap();
    assert_eq!(
        o0.loss.to_f64().to_bits(),
        o1.loss.to_f64().to_bits(),
        "CE loss; {options:?} {ctx}"
    );
    assert!(
        same_stats(&o0.row_loss, &o1.row_loss),
        "CE row losses; {ctx}"
    );
    assert_eq!(bits(&g0), bits(&g1), "CE gradient; {options:?} {ctx}");
}

const SHIFT_CASES: u32 = 2000;

proptest! {
    #![proptest_config(config(SHIFT_CASES))]

    #[test]
    fn test_softmax_shift_invariance_f64(s in shift_case(1 << 30)) {
        check_shift::<f64>(&s);
    }

    #[test]
    fn test_softmax_shift_invariance_f32(s in shift_case(1 << 23)) {
        check_shift::<f32>(&s);
    }

    #[test]
    fn test_softmax_shift_invariance_f16(s in shift_case(1 << 10)) {
        check_shift::<f16>(&s);
    }

    #[test]
    fn test_softmax_shift_invariance_bf16(s in shift_case(1 << 7)) {
        check_shift::<bf16>(&s);
    }
}

// ---------------------------------------------------------------------------------------------
// RowState: merge of parts = one fold.

fn state_value() -> impl Strategy<Value = f64> {
    prop_oneof![
        8 => -50.0f64..50.0,
        1 => prop_oneof![Just(1e300), Just(-1e300), Just(f64::MAX), Just(-f64::MAX)],
        1 => Just(f64::NEG_INFINITY),
        1 => prop_oneof![Just(0.0), Just(5e-324), Just(-1e-310)],
        2 => Just(7.25), // repeated: ties
    ]
}

/// Folds `xs` and counts how often the running maximum rose above a finite maximum (each rise
/// rescales the partial sum by one `exp`).
fn fold(xs: &[f64]) -> (RowState, u32) {
    let mut s = RowState::EMPTY;
    let mut rises = 0;
    for &x in xs {
        if x > s.max() && s.max() > f64::NEG_INFINITY {
            rises += 1;
        }
        s.push(x);
    }
    (s, rises)
}

/// Bound on |lse(a) − lse(b)| for two evaluations of the same row whose sums passed through
/// `ra` and `rb` rescalings. Each path's `s'` is `Σ e^{x_i − m}(1 + δ_i)` with
/// `|δ_i| ≤ 2·u64·(rises + 1)` (every `exp` ≤ 1 ulp plus the product error kept by the
/// compensated scaling) plus ≤ 2·u64·s' from the Neumaier sum. Since
/// `|Δ log1p(s')| ≤ Δs' / (1 + s')` and `s'/(1 + s') < 1`, and `log1p` and the final `m + ·` each
/// round once more:
///   |Δlse| ≤ (2(ra + 1) + 2 + 2(rb + 1) + 2)·u64 + 2·u64·log1p(s') + 2·u64·|lse|.
fn merge_tolerance(ra: u32, rb: u32, s: &RowState) -> f64 {
    let rises = f64::from(2 * (ra + 1) + 2 + 2 * (rb + 1) + 2);
    rises * U64 + 2.0 * U64 * s.log1p_sum().abs() + 2.0 * U64 * s.logsumexp().abs()
}

fn check_merge(xs: &[f64], split: usize, split2: usize) {
    let (whole, r_whole) = fold(xs);
    let (a, ra) = fold(&xs[..split]);
    let (b, rb) = fold(&xs[split..]);
    let merged = a.merge(b);
    // Identity, both sides, bitwise.
    assert_eq!(RowState::EMPTY.merge(whole), whole);
    assert_eq!(whole.merge(RowState::EMPTY), whole);
    assert_eq!(
        merged.max().to_bits(),
        whole.max().to_bits(),
        "max; {xs:?} @ {split}"
    );
    let (lw, lm) = (whole.logsumexp(), merged.logsumexp());
    if lw == f64::NEG_INFINITY {
        assert_eq!(lm, f64::NEG_INFINITY, "fully masked; {xs:?}");
        return;
    }
    assert!(lw.is_finite() && lm.is_finite(), "{lw} {lm}; {xs:?}");
    let tol = merge_tolerance(r_whole, ra + rb + 1, &whole);
    assert!(
        (lw - lm).abs() <= tol,
        "fold {lw:e} vs merge {lm:e} at split {split}: |Δ| {:e} > {tol:e}; {xs:?}",
        (lw - lm).abs()
    );
    // Three parts, merged in both association orders, against the fold.
    let (lo, hi) = (split.min(split2), split.max(split2));
    let (p, rp) = fold(&xs[..lo]);
    let (q, rq) = fold(&xs[lo..hi]);
    let (r, rr) = fold(&xs[hi..]);
    let rises = rp + rq + rr + 2;
    for (name, m) in [
        ("(p+q)+r", p.merge(q).merge(r)),
        ("p+(q+r)", p.merge(q.merge(r))),
    ] {
        assert_eq!(m.max().to_bits(), whole.max().to_bits());
        let l = m.logsumexp();
        let tol = merge_tolerance(r_whole, rises, &whole);
        assert!(
            (lw - l).abs() <= tol,
            "fold {lw:e} vs {name} {l:e} at {lo},{hi}: |Δ| {:e} > {tol:e}; {xs:?}",
            (lw - l).abs()
        );
    }
}

const MERGE_CASES: u32 = 10000;

proptest! {
    #![proptest_config(config(MERGE_CASES))]

    #[test]
    fn test_state_merge_matches_single_fold(
        xs in prop::collection::vec(state_value(), 0..48),
        i in any::<Index>(),
        j in any::<Index>(),
    ) {
        let split = i.index(xs.len() + 1);
        let split2 = j.index(xs.len() + 1);
        check_merge(&xs, split, split2);
    }
}
