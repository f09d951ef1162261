//! The semantics contract of docs/contract.md: every row of the table has a named test here, for the
//! forward ops and their gradients, in every dtype (`<test>::f64`, `::f32`, `::f16`, `::bf16`).
//!
//! Expected values come from independent `f64` formulas written below (max-shifted, as in §1) or
//! from values derivable by hand (softmax of ties is `1/n`); never from the library's own output.
//! Where the contract says "the same as without X", the comparison is bit for bit against a
//! second library call on the input without X.

use lse::{
    cross_entropy, cross_entropy_in_place, cross_entropy_with_grad, log_softmax,
    log_softmax_backward, log_softmax_with, logsumexp, logsumexp_with, naive, softmax,
    softmax_backward, softmax_with, CrossEntropyOptions, CrossEntropyOutput, DType, Element,
    EmptyMean, GradOutput, LseError, NonFinite, Reduction, Targets,
};

use lse_testkit::{all_dtypes, Stat, INF, NAN, NEG};

all_dtypes!(
    all_finite,
    all_finite_cross_entropy_with_options,
    softmax_of_ties_is_one_over_n,
    some_neg_inf,
    some_neg_inf_cross_entropy,
    neg_inf_target_logit,
    fully_masked,
    ignored_row,
    nan_anywhere,
    pos_inf_anywhere,
    first_non_finite_is_reported,
    target_out_of_range,
    every_row_ignored_mean,
    zero_total_weight_mean,
    probability_targets_on_masked_logits,
    label_smoothing_spreads_over_finite_logits,
    in_place_matches_out_of_place,
    reduction_none_sums_to_loss,
    per_row_grad_output_scales_each_row,
    weighted_mean_divides_by_summed_weights,
    naive_fails_where_stable_does_not,
);

// ---------------------------------------------------------------------------------------------
// Helpers.

/// `xs` in the dtype `E`; every value must be exactly representable (the tests use dyadic values).
fn elems<E: Element>(xs: &[f64]) -> Vec<E> {
    xs.iter()
        .map(|&x| {
            let e = E::from_f64(x);
            let back = e.to_f64();
            assert!(
                back == x || (x.is_nan() && back.is_nan()),
                "test input {x} is not exact in {}",
                E::DTYPE
            );
            e
        })
        .collect()
}

fn wide<E: Element>(xs: &[E]) -> Vec<f64> {
    xs.iter().map(|x| x.to_f64()).collect()
}

fn bits<E: Element>(xs: &[E]) -> Vec<u64> {
    xs.iter().map(|x| x.to_f64().to_bits()).collect()
}

/// Absolute floor of every tolerance: docs/numerics.md lets errors below the smallest normal pass.
fn floor<E: Element>() -> f64 {
    E::DTYPE.min_positive_normal()
}

fn floor_s<E: Element>() -> f64 {
    <Stat<E> as Element>::DTYPE.min_positive_normal()
}

fn sv<E: Element>(x: f64) -> Stat<E> {
    <Stat<E> as Element>::from_f64(x)
}

/// Unit roundoff of the input dtype.
fn u<E: Element>() -> f64 {
    E::DTYPE.unit_roundoff()
}

/// Unit roundoff of the statistics dtype (f32 for the narrow types).
fn us<E: Element>() -> f64 {
    <Stat<E> as Element>::DTYPE.unit_roundoff()
}

fn rows_of(x: &[f64], classes: usize) -> Vec<&[f64]> {
    x.chunks_exact(classes).collect()
}

#[track_caller]
fn close(what: &str, got: f64, want: f64, tol: f64) {
    let ok = if want.is_nan() {
        got.is_nan()
    } else if want.is_infinite() {
        got == want
    } else {
        (got - want).abs() <= tol
    };
    assert!(
        ok,
        "{what}: got {got:e}, want {want:e} (|diff| {:e} > tol {tol:e})",
        (got - want).abs()
    );
}

#[track_caller]
fn same_bits<E: Element>(what: &str, got: &[E], want: &[E]) {
    assert_eq!(
        bits(got),
        bits(want),
        "{what}: {:?} vs {:?}",
        wide(got),
        wide(want)
    );
}

fn debug(e: &LseError) -> String {
    format!("{e:?}")
}

// ----- Independent f64 references (max shift, log1p) -----------------------------------------

/// `(m, s')` over the finite entries: `m` the max, `s' = Σ_{i≠k} exp(x_i − m)`.
fn ref_state(row: &[f64]) -> (f64, f64) {
    let m = row
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold(NEG, f64::max);
    if m == NEG {
        return (NEG, 0.0);
    }
    let k = row.iter().position(|&x| x == m).unwrap();
    let s = row
        .iter()
        .enumerate()
        .filter(|&(i, x)| i != k && x.is_finite())
        .map(|(_, &x)| (x - m).exp())
        .sum();
    (m, s)
}

fn ref_lse(row: &[f64]) -> f64 {
    let (m, s) = ref_state(row);
    if m == NEG {
        NEG
    } else {
        m + s.ln_1p()
    }
}

fn ref_softmax(row: &[f64]) -> Vec<f64> {
    let (m, s) = ref_state(row);
    row.iter()
        .map(|&x| {
            if x == NEG {
                0.0
            } else {
                (x - m).exp() / (1.0 + s)
            }
        })
        .collect()
}

fn ref_log_softmax(row: &[f64]) -> Vec<f64> {
    let (m, s) = ref_state(row);
    row.iter()
        .map(|&x| if x == NEG { NEG } else { (x - m) - s.ln_1p() })
        .collect()
}

/// Tolerance for an lse output: a few ulps of the stat dtype, relative to `|m| + log1p(s')`.
fn lse_tol<E: Element>(row: &[f64]) -> f64 {
    let (m, s) = ref_state(row);
    4.0 * us::<E>() * (m.abs() + s.ln_1p()) + floor_s::<E>()
}

#[track_caller]
fn check_lse<E: Element>(what: &str, got: Stat<E>, row: &[f64]) {
    close(what, got.to_f64(), ref_lse(row), lse_tol::<E>(row));
}

/// Normwise: every entry within `k·u` of the row's largest `|want|` (docs/numerics.md).
#[track_caller]
fn check_normwise<E: Element>(what: &str, got: &[E], want: &[f64], k: f64) {
    let scale = want
        .iter()
        .filter(|w| w.is_finite())
        .fold(0.0f64, |a, w| a.max(w.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        close(
            &format!("{what}[{i}]"),
            g.to_f64(),
            w,
            k * u::<E>() * scale + floor::<E>(),
        );
    }
}

#[track_caller]
fn check_softmax_row<E: Element>(what: &str, got: &[E], row: &[f64]) {
    let want = ref_softmax(row);
    check_normwise::<E>(what, got, &want, 4.0);
    for (i, &x) in row.iter().enumerate() {
        if x == NEG {
            assert_eq!(got[i].to_f64(), 0.0, "{what}[{i}]: masked entry must be 0");
        }
    }
}

#[track_caller]
fn check_log_softmax_row<E: Element>(what: &str, got: &[E], row: &[f64]) {
    let (m, s) = ref_state(row);
    for (i, (&g, w)) in got.iter().zip(ref_log_softmax(row)).enumerate() {
        // Elementwise relative (the max entry too); for f64 the reference's own rounding of the
        // two terms is relative to their sum of magnitudes, which is the same thing here.
        let scale = if w == NEG {
            0.0
        } else {
            (row[i] - m).abs() + s.ln_1p()
        };
        close(
            &format!("{what}[{i}]"),
            g.to_f64(),
            w,
            4.0 * u::<E>() * scale + floor::<E>(),
        );
    }
}

/// `dx = y ⊙ (dy − Σ y dy)` from the (rounded) forward output actually given to the backward.
fn ref_softmax_backward(y: &[f64], dy: &[f64]) -> (Vec<f64>, f64) {
    let dot: f64 = y.iter().zip(dy).map(|(a, b)| a * b).sum();
    let dx = y.iter().zip(dy).map(|(&a, &b)| a * (b - dot)).collect();
    let scale = y.iter().zip(dy).fold(0.0f64, |acc, (a, b)| {
        acc.max(a.abs() * (b.abs() + dot.abs()))
    });
    (dx, scale)
}

/// `dx = dy − exp(y) Σ dy`.
fn ref_log_softmax_backward(y: &[f64], dy: &[f64]) -> (Vec<f64>, f64) {
    let total: f64 = dy.iter().sum();
    let dx = y
        .iter()
        .zip(dy)
        .map(|(&a, &b)| b - a.exp() * total)
        .collect();
    let scale = y.iter().zip(dy).fold(0.0f64, |acc, (a, b)| {
        acc.max(b.abs() + a.exp() * dy.iter().map(|d| d.abs()).sum::<f64>())
    });
    (dx, scale)
}

#[track_caller]
fn check_backward<E: Element>(what: &str, got: &[E], want: &[f64], scale: f64) {
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        close(
            &format!("{what}[{i}]"),
            g.to_f64(),
            w,
            4.0 * u::<E>() * scale + floor::<E>(),
        );
    }
}

fn one_hot(y: usize, classes: usize) -> Vec<f64> {
    (0..classes).map(|c| f64::from(u8::from(c == y))).collect()
}

/// Reference cross-entropy of one non-ignored row:
/// `ℓ = Σ_c a_c (lse − x̃_c) + z lse²`, `a_c = w_c ((1 − ε) q_c + ε/K)` over the K finite classes,
/// `∂ℓ/∂x_c = slope(x_c)·((Σa + 2 z lse) p_c − a_c)`, `x̃ = cap·tanh(x/cap)`.
/// Returns (loss, gradient, loss scale for tolerances, row max).
fn ref_ce_row(x: &[f64], q: &[f64], o: &CrossEntropyOptions<'_>) -> (f64, Vec<f64>, f64, f64) {
    let mapped: Vec<f64> = x
        .iter()
        .map(|&v| match o.softcap {
            Some(cap) if v != NEG => cap * (v / cap).tanh(),
            _ => v,
        })
        .collect();
    let (m, s) = ref_state(&mapped);
    let log1p = s.ln_1p();
    let lse = m + log1p;
    let live = mapped.iter().filter(|v| v.is_finite()).count();
    let eps = o.label_smoothing;
    let w = |c: usize| o.weights.map_or(1.0, |w| w[c]);
    let a: Vec<f64> = (0..x.len())
        .map(|c| {
            if mapped[c] == NEG {
                assert!(q[c] == 0.0, "reference called with mass on a masked class");
                0.0
            } else {
                w(c) * ((1.0 - eps) * q[c] + eps / live as f64)
            }
        })
        .collect();
    let total_a: f64 = a.iter().sum();
    let mut loss = o.z_loss * lse * lse;
    let mut scale = loss;
    for c in 0..x.len() {
        if a[c] > 0.0 {
            loss += a[c] * ((m - mapped[c]) + log1p);
            scale += a[c] * (m.abs() + mapped[c].abs() + log1p);
        }
    }
    let grad = (0..x.len())
        .map(|c| {
            if mapped[c] == NEG {
                return 0.0;
            }
            let p = (mapped[c] - m).exp() / (1.0 + s);
            let slope = o.softcap.map_or(1.0, |cap| {
                let ch = (x[c] / cap).cosh();
                1.0 / (ch * ch)
            });
            slope * ((total_a + 2.0 * o.z_loss * lse) * p - a[c])
        })
        .collect();
    (loss, grad, scale, m)
}

/// Targets in f64 for the reference.
#[derive(Clone, Copy)]
enum RefTargets<'a> {
    Classes(&'a [i64]),
    Probs(&'a [f64]),
}

/// Runs the cross-entropy (all three entry points, checked to agree bit for bit) on `x` in the
/// dtype `E` and checks loss, per-row losses and gradient against [`ref_ce_row`].
#[track_caller]
fn check_ce_vs_ref<E: Element>(
    label: &str,
    x: &[f64],
    classes: usize,
    targets: RefTargets<'_>,
    opts: &CrossEntropyOptions<'_>,
    g: f64,
) -> (CrossEntropyOutput<Stat<E>>, Vec<E>) {
    let label = format!("{label} [{}]", E::DTYPE);
    let opts = CrossEntropyOptions {
        keep_row_loss: true,
        ..*opts
    };
    let logits = elems::<E>(x);
    let probs: Vec<E>;
    let lib_targets = match targets {
        RefTargets::Classes(t) => Targets::Classes(t),
        RefTargets::Probs(q) => {
            probs = elems::<E>(q);
            Targets::Probabilities(&probs)
        }
    };
    let (out, grad) = ce(
        &logits,
        classes,
        lib_targets,
        &opts,
        GradOutput::Scalar(sv::<E>(g)),
    )
    .unwrap_or_else(|e| panic!("{label}: unexpected error {e}"));

    let rows = x.len() / classes;
    let mut row_ref = Vec::new();
    let mut denominator = 0.0;
    for r in 0..rows {
        let xr = &x[r * classes..(r + 1) * classes];
        let (q, den) = match targets {
            RefTargets::Classes(t) if Some(t[r]) == opts.ignore_index => {
                row_ref.push(None);
                continue;
            }
            RefTargets::Classes(t) => (
                one_hot(t[r] as usize, classes),
                opts.weights.map_or(1.0, |w| w[t[r] as usize]),
            ),
            RefTargets::Probs(q) => (q[r * classes..(r + 1) * classes].to_vec(), 1.0),
        };
        denominator += den;
        row_ref.push(Some(ref_ce_row(xr, &q, &opts)));
    }
    let total: f64 = row_ref.iter().flatten().map(|r| r.0).sum();
    let total_scale: f64 = row_ref.iter().flatten().map(|r| r.2).sum();
    let (want_loss, loss_scale, grad_scale) = match opts.reduction {
        Reduction::Mean => (
            total / denominator,
            total_scale / denominator,
            g / denominator,
        ),
        Reduction::Sum | Reduction::None => (total, total_scale, g),
    };
    close(
        &format!("{label}: loss"),
        out.loss.to_f64(),
        want_loss,
        8.0 * us::<E>() * loss_scale + floor_s::<E>(),
    );
    close(
        &format!("{label}: denominator"),
        out.denominator,
        denominator,
        1e-12 * denominator,
    );
    let row_loss = out.row_loss.as_ref().expect("keep_row_loss was set");
    assert_eq!(row_loss.len(), rows, "{label}: row_loss length");
    for (r, want) in row_ref.iter().enumerate() {
        let grad_row = &grad[r * classes..(r + 1) * classes];
        match want {
            None => {
                assert_eq!(row_loss[r].to_f64(), 0.0, "{label}: ignored row {r} loss");
                assert!(
                    grad_row.iter().all(|g| g.to_f64() == 0.0),
                    "{label}: ignored row {r} gradient {:?}",
                    wide(grad_row)
                );
            }
            Some((loss, g_ref, scale, m)) => {
                close(
                    &format!("{label}: row {r} loss"),
                    row_loss[r].to_f64(),
                    *loss,
                    8.0 * us::<E>() * scale + floor_s::<E>(),
                );
                let want: Vec<f64> = g_ref.iter().map(|v| v * grad_scale).collect();
                let widen = if E::DTYPE == DType::F64 {
                    4.0 * (1.0 + m.abs())
                } else {
                    1.0
                };
                check_normwise::<E>(
                    &format!("{label}: row {r} gradient"),
                    grad_row,
                    &want,
                    4.0 * widen,
                );
                for (c, &xc) in x[r * classes..(r + 1) * classes].iter().enumerate() {
                    if xc == NEG {
                        assert_eq!(
                            grad_row[c].to_f64(),
                            0.0,
                            "{label}: gradient at masked ({r}, {c})"
                        );
                    }
                }
            }
        }
    }
    (out, grad)
}

/// Checks two outputs are identical bit for bit (NaN included).
#[track_caller]
fn same_output<S: Element>(what: &str, a: &CrossEntropyOutput<S>, b: &CrossEntropyOutput<S>) {
    assert_eq!(
        a.loss.to_f64().to_bits(),
        b.loss.to_f64().to_bits(),
        "{what}: loss {} vs {}",
        a.loss,
        b.loss
    );
    let vb = |v: &Option<Vec<S>>| v.as_ref().map(|v| bits(v));
    assert_eq!(vb(&a.row_loss), vb(&b.row_loss), "{what}: row_loss");
    assert_eq!(vb(&a.row_lse), vb(&b.row_lse), "{what}: row_lse");
    assert_eq!(a.counted_rows, b.counted_rows, "{what}: counted_rows");
    assert_eq!(
        a.denominator.to_bits(),
        b.denominator.to_bits(),
        "{what}: denominator"
    );
}

/// Runs `cross_entropy_with_grad`, `cross_entropy_in_place` and (when the gradient output is a
/// finite scalar) `cross_entropy`; checks they agree bit for bit (or return the same error) and
/// returns the out-of-place result.
#[track_caller]
fn ce<E: Element>(
    logits: &[E],
    classes: usize,
    targets: Targets<'_, E>,
    opts: &CrossEntropyOptions<'_>,
    g: GradOutput<'_, Stat<E>>,
) -> Result<(CrossEntropyOutput<Stat<E>>, Vec<E>), LseError> {
    let mut grad = vec![E::from_f64(-7.0); logits.len()];
    let out = cross_entropy_with_grad(logits, classes, targets, opts, g, &mut grad);
    let mut buf = logits.to_vec();
    let in_place = cross_entropy_in_place(&mut buf, classes, targets, opts, g);
    match (&out, &in_place) {
        (Ok(a), Ok(b)) => {
            same_output("in-place vs out-of-place", a, b);
            same_bits("in-place vs out-of-place gradient", &buf, &grad);
        }
        (Err(a), Err(b)) => assert_eq!(debug(a), debug(b), "in-place error"),
        (a, b) => panic!("out-of-place {a:?} but in-place {b:?}"),
    }
    if matches!(g, GradOutput::Scalar(s) if s.to_f64().is_finite()) {
        let loss_only = cross_entropy(logits, classes, targets, opts);
        match (&out, &loss_only) {
            (Ok(a), Ok(b)) => same_output("loss-only vs fused", a, b),
            (Err(a), Err(b)) => assert_eq!(debug(a), debug(b), "loss-only error"),
            (a, b) => panic!("fused {a:?} but loss-only {b:?}"),
        }
    }
    out.map(|o| (o, grad))
}

fn one<E: Element>() -> GradOutput<'static, Stat<E>> {
    GradOutput::Scalar(sv::<E>(1.0))
}

fn run_lse<E: Element>(logits: &[E], classes: usize, policy: NonFinite) -> Vec<Stat<E>> {
    let mut out = vec![sv::<E>(-7.0); logits.len() / classes];
    logsumexp_with(logits, classes, &mut out, policy).unwrap();
    out
}

fn run_softmax<E: Element>(logits: &[E], classes: usize, policy: NonFinite) -> Vec<E> {
    let mut out = vec![E::from_f64(-7.0); logits.len()];
    softmax_with(logits, classes, &mut out, policy).unwrap();
    out
}

fn run_log_softmax<E: Element>(logits: &[E], classes: usize, policy: NonFinite) -> Vec<E> {
    let mut out = vec![E::from_f64(-7.0); logits.len()];
    log_softmax_with(logits, classes, &mut out, policy).unwrap();
    out
}

/// Checks the forward ops and their backward passes on `x` against the references.
#[track_caller]
fn check_forward_and_backward<E: Element>(label: &str, x: &[f64], classes: usize) {
    let label = format!("{label} [{}]", E::DTYPE);
    let logits = elems::<E>(x);
    let rows = rows_of(x, classes);

    let mut l = vec![sv::<E>(-7.0); rows.len()];
    logsumexp(&logits, classes, &mut l).unwrap();
    assert_eq!(bits(&l), bits(&run_lse(&logits, classes, NonFinite::Error)));
    for (r, row) in rows.iter().enumerate() {
        check_lse::<E>(&format!("{label}: lse row {r}"), l[r], row);
    }

    let mut p = vec![E::from_f64(-7.0); x.len()];
    softmax(&logits, classes, &mut p).unwrap();
    same_bits(
        "softmax vs softmax_with(Error)",
        &p,
        &run_softmax(&logits, classes, NonFinite::Error),
    );
    let mut ls = vec![E::from_f64(-7.0); x.len()];
    log_softmax(&logits, classes, &mut ls).unwrap();
    same_bits(
        "log_softmax vs log_softmax_with(Error)",
        &ls,
        &run_log_softmax(&logits, classes, NonFinite::Error),
    );
    // Finite input, and Propagate changes nothing.
    same_bits(
        "softmax Propagate",
        &p,
        &run_softmax(&logits, classes, NonFinite::Propagate),
    );
    same_bits(
        "log_softmax Propagate",
        &ls,
        &run_log_softmax(&logits, classes, NonFinite::Propagate),
    );
    assert_eq!(
        bits(&l),
        bits(&run_lse(&logits, classes, NonFinite::Propagate))
    );

    let dy_pattern = [0.5, -1.0, 2.0, 0.25, -0.75, 1.5, 0.0];
    let dy_f: Vec<f64> = (0..x.len()).map(|i| dy_pattern[i % 7]).collect();
    let dy = elems::<E>(&dy_f);
    let mut dx = vec![E::from_f64(-7.0); x.len()];
    softmax_backward(&p, &dy, classes, &mut dx).unwrap();
    let mut dxl = vec![E::from_f64(-7.0); x.len()];
    log_softmax_backward(&ls, &dy, classes, &mut dxl).unwrap();

    for (r, row) in rows.iter().enumerate() {
        let span = r * classes..(r + 1) * classes;
        check_softmax_row::<E>(&format!("{label}: softmax row {r}"), &p[span.clone()], row);
        check_log_softmax_row::<E>(
            &format!("{label}: log_softmax row {r}"),
            &ls[span.clone()],
            row,
        );
        let (want, scale) = ref_softmax_backward(&wide(&p[span.clone()]), &dy_f[span.clone()]);
        check_backward::<E>(
            &format!("{label}: softmax_backward row {r}"),
            &dx[span.clone()],
            &want,
            scale,
        );
        let (want, scale) = ref_log_softmax_backward(&wide(&ls[span.clone()]), &dy_f[span.clone()]);
        check_backward::<E>(
            &format!("{label}: log_softmax_backward row {r}"),
            &dxl[span.clone()],
            &want,
            scale,
        );
        for (i, &xi) in row.iter().enumerate() {
            if xi == NEG {
                // softmax: y = 0 there, so dx = 0; log_softmax: ∂/∂x_i of a masked entry is dy_i.
                assert_eq!(
                    dx[span.start + i].to_f64(),
                    0.0,
                    "{label}: softmax_backward at masked"
                );
                assert_eq!(
                    dxl[span.start + i].to_f64(),
                    dy_f[span.start + i],
                    "{label}: log_softmax_backward at masked"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Row "all finite".

const FINITE: [f64; 20] = [
    1.0, 2.0, 3.0, 4.0, //
    0.5, -1.0, 2.25, 0.0, //
    1024.0, 1016.0, 1008.0, 960.0, //
    -1024.0, -1016.0, -1008.0, -960.0, //
    -0.5, 6.0, -3.0, 5.5,
];

fn all_finite<E: Element>() {
    check_forward_and_backward::<E>("all finite", &FINITE, 4);
    let t = [3i64, 0, 1, 2, 1];
    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
        let o = CrossEntropyOptions {
            reduction,
            ..Default::default()
        };
        let (out, grad) = check_ce_vs_ref::<E>(
            "all finite CE",
            &FINITE,
            4,
            RefTargets::Classes(&t),
            &o,
            1.0,
        );
        assert!(out.loss.to_f64().is_finite());
        assert!(grad.iter().all(|g| g.to_f64().is_finite()));
        assert_eq!(out.counted_rows, 5);
    }
    // Probability targets (rows need not sum to 1).
    let q = [
        0.25, 0.25, 0.25, 0.25, //
        1.0, 0.0, 0.0, 0.0, //
        0.0, 0.5, 0.5, 0.0, //
        0.125, 0.0, 0.0, 0.875, //
        0.0, 0.0, 0.0, 2.0,
    ];
    check_ce_vs_ref::<E>(
        "all finite CE, probabilities",
        &FINITE,
        4,
        RefTargets::Probs(&q),
        &CrossEntropyOptions::default(),
        1.0,
    );
}

fn all_finite_cross_entropy_with_options<E: Element>() {
    let t = [3i64, 0, 1, 2, 1];
    let w = [0.5, 2.0, 1.25, 1.0];
    let options = [
        CrossEntropyOptions {
            label_smoothing: 0.1,
            ..Default::default()
        },
        CrossEntropyOptions {
            z_loss: 1e-4,
            reduction: Reduction::Sum,
            ..Default::default()
        },
        CrossEntropyOptions {
            softcap: Some(30.0),
            ..Default::default()
        },
        CrossEntropyOptions {
            weights: Some(&w),
            label_smoothing: 0.25,
            z_loss: 1e-3,
            softcap: Some(15.0),
            ..Default::default()
        },
    ];
    for (i, o) in options.iter().enumerate() {
        check_ce_vs_ref::<E>(
            &format!("CE options #{i}"),
            &FINITE,
            4,
            RefTargets::Classes(&t),
            o,
            1.0,
        );
        let q = [0.25f64; 20];
        check_ce_vs_ref::<E>(
            &format!("CE options #{i}, probabilities"),
            &FINITE,
            4,
            RefTargets::Probs(&q),
            o,
            0.5,
        );
    }
}

fn softmax_of_ties_is_one_over_n<E: Element>() {
    // Values that are exact in every dtype: 1/4 and 1/2.
    let logits = elems::<E>(&[3.0, 3.0, 3.0, 3.0, -2.0, -2.0, -2.0, -2.0]);
    let p = run_softmax(&logits, 4, NonFinite::Error);
    assert!(p.iter().all(|v| v.to_f64() == 0.25), "{:?}", wide(&p));
    let pair = elems::<E>(&[7.0, 7.0, -900.0, -900.0]);
    let p = run_softmax(&pair, 2, NonFinite::Error);
    assert!(p.iter().all(|v| v.to_f64() == 0.5), "{:?}", wide(&p));
    // log_softmax = −ln n, lse = x + ln n.
    let ls = run_log_softmax(&logits, 4, NonFinite::Error);
    for v in &ls {
        close(
            "log_softmax of ties",
            v.to_f64(),
            -(4f64.ln()),
            2.0 * u::<E>() * 4f64.ln(),
        );
    }
    let l = run_lse(&logits, 4, NonFinite::Error);
    close(
        "lse of ties",
        l[0].to_f64(),
        3.0 + 4f64.ln(),
        2.0 * us::<E>() * 4.4,
    );
    close(
        "lse of ties",
        l[1].to_f64(),
        -2.0 + 4f64.ln(),
        2.0 * us::<E>() * 2.0,
    );
    // CE gradient of ties (sum reduction, g = 1): p − onehot = [1/4, −3/4, 1/4, 1/4] exactly.
    let o = CrossEntropyOptions {
        reduction: Reduction::Sum,
        ..Default::default()
    };
    let (out, grad) = ce(&logits, 4, Targets::Classes(&[1, 3]), &o, one::<E>()).unwrap();
    assert_eq!(
        wide(&grad),
        [0.25, -0.75, 0.25, 0.25, 0.25, 0.25, 0.25, -0.75]
    );
    close(
        "CE of ties",
        out.loss.to_f64(),
        2.0 * 4f64.ln(),
        4.0 * us::<E>() * 2.8,
    );
}

// ---------------------------------------------------------------------------------------------
// Row "some −inf, rest finite".

const MASKED: [f64; 10] = [
    2.0, NEG, 0.5, NEG, 1.0, //
    NEG, 3.0, NEG, -1.0, NEG,
];

/// The finite entries of each row of `x`.
fn compact(row: &[f64]) -> Vec<f64> {
    row.iter().copied().filter(|&v| v != NEG).collect()
}

fn some_neg_inf<E: Element>() {
    check_forward_and_backward::<E>("some -inf", &MASKED, 5);
    let logits = elems::<E>(&MASKED);
    let l = run_lse(&logits, 5, NonFinite::Error);
    let p = run_softmax(&logits, 5, NonFinite::Error);
    let ls = run_log_softmax(&logits, 5, NonFinite::Error);
    for (r, row) in rows_of(&MASKED, 5).into_iter().enumerate() {
        // "ignores them": bit for bit what the row without its -inf entries gives.
        let c = compact(row);
        let cl = elems::<E>(&c);
        assert_eq!(
            l[r].to_f64().to_bits(),
            run_lse(&cl, c.len(), NonFinite::Error)[0]
                .to_f64()
                .to_bits(),
            "lse row {r}"
        );
        let cp = run_softmax(&cl, c.len(), NonFinite::Error);
        let cls = run_log_softmax(&cl, c.len(), NonFinite::Error);
        let mut k = 0;
        for (i, &x) in row.iter().enumerate() {
            let (pi, lsi) = (p[r * 5 + i].to_f64(), ls[r * 5 + i].to_f64());
            if x == NEG {
                assert_eq!(
                    pi.to_bits(),
                    0f64.to_bits(),
                    "softmax ({r}, {i}) must be +0"
                );
                assert_eq!(lsi, NEG, "log_softmax ({r}, {i})");
            } else {
                assert_eq!(pi.to_bits(), cp[k].to_f64().to_bits(), "softmax ({r}, {i})");
                assert_eq!(
                    lsi.to_bits(),
                    cls[k].to_f64().to_bits(),
                    "log_softmax ({r}, {i})"
                );
                k += 1;
            }
        }
    }
}

fn some_neg_inf_cross_entropy<E: Element>() {
    let t = [0i64, 3];
    let w = [0.5, 2.0, 1.25, 1.0, 0.75];
    let options = [
        CrossEntropyOptions::default(),
        CrossEntropyOptions {
            label_smoothing: 0.1,
            z_loss: 1e-3,
            ..Default::default()
        },
        CrossEntropyOptions {
            softcap: Some(5.0),
            weights: Some(&w),
            label_smoothing: 0.25,
            ..Default::default()
        },
    ];
    for (i, o) in options.iter().enumerate() {
        for reduction in [Reduction::None, Reduction::Mean] {
            let o = CrossEntropyOptions { reduction, ..*o };
            let (out, grad) = check_ce_vs_ref::<E>(
                &format!("some -inf CE #{i} {reduction:?}"),
                &MASKED,
                5,
                RefTargets::Classes(&t),
                &o,
                1.0,
            );
            let row_loss = out.row_loss.unwrap();
            assert!(row_loss.iter().all(|l| l.to_f64().is_finite()));
            if reduction != Reduction::None {
                continue;
            }
            // Each row, bit for bit, is the row without its -inf entries (and their weights).
            for (r, row) in rows_of(&MASKED, 5).into_iter().enumerate() {
                let live: Vec<usize> = (0..5).filter(|&c| row[c] != NEG).collect();
                let c = compact(row);
                let cw: Vec<f64> = live.iter().map(|&c| w[c]).collect();
                let ct = live.iter().position(|&c| c as i64 == t[r]).unwrap() as i64;
                let co = CrossEntropyOptions {
                    weights: o.weights.map(|_| cw.as_slice()),
                    ..o
                };
                let (cout, cgrad) = ce(
                    &elems::<E>(&c),
                    c.len(),
                    Targets::Classes(&[ct]),
                    &co,
                    one::<E>(),
                )
                .unwrap();
                assert_eq!(
                    row_loss[r].to_f64().to_bits(),
                    cout.loss.to_f64().to_bits(),
                    "#{i} row {r} loss vs compacted"
                );
                for (k, &cidx) in live.iter().enumerate() {
                    assert_eq!(
                        grad[r * 5 + cidx].to_f64().to_bits(),
                        cgrad[k].to_f64().to_bits(),
                        "#{i} gradient ({r}, {cidx}) vs compacted"
                    );
                }
            }
        }
    }
}

/// A class target on a `-inf` logit (with other logits finite): target mass on a masked class.
fn neg_inf_target_logit<E: Element>() {
    let logits = elems::<E>(&MASKED);
    let t = [1i64, 3]; // row 0 targets its masked class 1
    let err = ce(
        &logits,
        5,
        Targets::Classes(&t),
        &CrossEntropyOptions::default(),
        one::<E>(),
    )
    .unwrap_err();
    assert_eq!(err, LseError::MaskedTarget { row: 0, class: 1 });
    let o = CrossEntropyOptions {
        non_finite: NonFinite::Propagate,
        reduction: Reduction::None,
        ..Default::default()
    };
    let (out, grad) = ce(&logits, 5, Targets::Classes(&t), &o, one::<E>()).unwrap();
    let row_loss = out.row_loss.unwrap();
    assert_eq!(row_loss[0].to_f64(), INF);
    assert_eq!(out.loss.to_f64(), INF);
    assert!(row_loss[1].to_f64().is_finite());
    for (c, &x) in MASKED.iter().enumerate() {
        let g = grad[c].to_f64();
        if x == NEG {
            assert_eq!(g, 0.0, "gradient at masked {c}");
        } else {
            assert!(g.is_finite(), "gradient {c} = {g}");
        }
    }
    // A zero-weight masked target carries no mass: no error, finite loss.
    let w = [1.0, 0.0, 1.0, 1.0, 1.0];
    let o = CrossEntropyOptions {
        weights: Some(&w),
        ..Default::default()
    };
    let (out, _) = ce(&logits, 5, Targets::Classes(&t), &o, one::<E>()).unwrap();
    assert!(out.loss.to_f64().is_finite());
}

// ---------------------------------------------------------------------------------------------
// Row "all −inf (fully masked)".

fn fully_masked<E: Element>() {
    let x = [1.0, 2.0, 0.5, NEG, NEG, NEG];
    check_forward_and_backward::<E>("fully masked", &x, 3);
    let logits = elems::<E>(&x);
    let l = run_lse(&logits, 3, NonFinite::Error);
    assert_eq!(l[1].to_f64(), NEG);
    let p = run_softmax(&logits, 3, NonFinite::Error);
    assert_eq!(wide(&p[3..]), [0.0; 3]);
    let ls = run_log_softmax(&logits, 3, NonFinite::Error);
    assert_eq!(wide(&ls[3..]), [NEG; 3]);
    // Backward through the masked row: softmax y = 0 → dx = 0; log_softmax y = −inf → dx = dy.
    let dy = elems::<E>(&[0.5, 1.0, -2.0, 0.5, 1.0, -2.0]);
    let mut dx = vec![E::from_f64(-7.0); 6];
    softmax_backward(&p, &dy, 3, &mut dx).unwrap();
    assert_eq!(wide(&dx[3..]), [0.0; 3]);
    log_softmax_backward(&ls, &dy, 3, &mut dx).unwrap();
    assert_eq!(wide(&dx[3..]), [0.5, 1.0, -2.0]);

    // CE with a class target in the masked row: MaskedTarget under Error.
    let t = [1i64, 2];
    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
        let o = CrossEntropyOptions {
            reduction,
            ..Default::default()
        };
        let err = ce(&logits, 3, Targets::Classes(&t), &o, one::<E>()).unwrap_err();
        assert_eq!(err, LseError::MaskedTarget { row: 1, class: 2 });
    }
    let q = elems::<E>(&[0.0, 1.0, 0.0, 0.25, 0.25, 0.5]);
    let err = ce(
        &logits,
        3,
        Targets::Probabilities(&q),
        &CrossEntropyOptions::default(),
        one::<E>(),
    )
    .unwrap_err();
    assert_eq!(err, LseError::MaskedTarget { row: 1, class: 0 });

    // Propagate: +inf row loss, zero gradient row, the other row as usual.
    for reduction in [Reduction::Mean, Reduction::None] {
        let o = CrossEntropyOptions {
            reduction,
            non_finite: NonFinite::Propagate,
            keep_row_loss: true,
            keep_row_lse: true,
            ..Default::default()
        };
        let (out, grad) = ce(&logits, 3, Targets::Classes(&t), &o, one::<E>()).unwrap();
        assert_eq!(out.loss.to_f64(), INF, "{reduction:?}");
        let row_loss = out.row_loss.unwrap();
        assert_eq!(row_loss[1].to_f64(), INF);
        assert_eq!(out.row_lse.unwrap()[1].to_f64(), NEG);
        assert_eq!(wide(&grad[3..]), [0.0; 3], "{reduction:?}");
        let (ref_loss, ref_grad, scale, _) = ref_ce_row(&x[..3], &one_hot(1, 3), &o);
        close(
            "row 0 loss",
            row_loss[0].to_f64(),
            ref_loss,
            8.0 * us::<E>() * scale,
        );
        let div = if reduction == Reduction::Mean {
            2.0
        } else {
            1.0
        };
        let want: Vec<f64> = ref_grad.iter().map(|g| g / div).collect();
        check_normwise::<E>("row 0 gradient", &grad[..3], &want, 4.0);
    }
    let o = CrossEntropyOptions {
        non_finite: NonFinite::Propagate,
        ..Default::default()
    };
    let (out, grad) = ce(&logits, 3, Targets::Probabilities(&q), &o, one::<E>()).unwrap();
    assert_eq!(out.loss.to_f64(), INF);
    assert_eq!(wide(&grad[3..]), [0.0; 3]);

    // Probability targets that put no mass on the masked row: loss 0 there, gradient 0, no error.
    let q0 = elems::<E>(&[0.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
    let o = CrossEntropyOptions {
        reduction: Reduction::None,
        ..Default::default()
    };
    let (out, grad) = ce(&logits, 3, Targets::Probabilities(&q0), &o, one::<E>()).unwrap();
    assert_eq!(out.row_loss.unwrap()[1].to_f64(), 0.0);
    assert_eq!(wide(&grad[3..]), [0.0; 3]);
}

// ---------------------------------------------------------------------------------------------
// Row "ignored row".

const WITH_IGNORED: [f64; 24] = [
    1.0, 2.0, 3.0, 4.0, // t 2
    NAN, INF, NEG, 1.0, // ignored
    INF, INF, INF, INF, // ignored
    NAN, NAN, NAN, NAN, // ignored
    0.5, -1.0, 2.25, 0.0, // t 0
    NEG, NEG, NEG, NEG, // ignored
];
const IGNORED_TARGETS: [i64; 6] = [2, -100, -100, -100, 0, -100];

fn ignored_row<E: Element>() {
    let logits = elems::<E>(&WITH_IGNORED);
    let kept = elems::<E>(
        &[&WITH_IGNORED[0..4], &WITH_IGNORED[16..20]]
            .concat()
            .to_vec(),
    );
    let w = [0.5, 2.0, 1.25, 1.0];
    for policy in [NonFinite::Error, NonFinite::Propagate] {
        for weights in [None, Some(&w[..])] {
            for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                let o = CrossEntropyOptions {
                    non_finite: policy,
                    weights,
                    reduction,
                    keep_row_lse: true,
                    ..Default::default()
                };
                let label = format!("{policy:?} {reduction:?} weighted={}", weights.is_some());
                let (out, grad) = check_ce_vs_ref::<E>(
                    &label,
                    &WITH_IGNORED,
                    4,
                    RefTargets::Classes(&IGNORED_TARGETS),
                    &o,
                    1.0,
                );
                assert_eq!(out.counted_rows, 2, "{label}");
                let want_den = weights.map_or(2.0, |w| w[2] + w[0]);
                assert_eq!(out.denominator, want_den, "{label}");
                let lse_rows = out.row_lse.unwrap();
                for r in [1, 2, 3, 5] {
                    assert!(
                        grad[r * 4..(r + 1) * 4].iter().all(|g| g.to_f64() == 0.0),
                        "{label}: ignored row {r} gradient {:?}",
                        wide(&grad[r * 4..(r + 1) * 4])
                    );
                    assert!(
                        lse_rows[r].to_f64().is_nan(),
                        "{label}: row_lse of ignored row"
                    );
                }
                // Excluded from the mean's denominator: the other rows are bit for bit what the
                // batch without the ignored rows gives.
                let (kout, kgrad) = ce(
                    &kept,
                    4,
                    Targets::Classes(&[2, 0]),
                    &CrossEntropyOptions {
                        keep_row_lse: false,
                        ..o
                    },
                    one::<E>(),
                )
                .unwrap();
                assert_eq!(
                    out.loss.to_f64().to_bits(),
                    kout.loss.to_f64().to_bits(),
                    "{label}: loss vs batch without ignored rows"
                );
                same_bits(&label, &grad[0..4], &kgrad[0..4]);
                same_bits(&label, &grad[16..20], &kgrad[4..8]);
            }
        }
    }
    // A custom ignore index that is a valid class.
    let t = [2i64, 1, 1, 1, 0, 1];
    let o = CrossEntropyOptions {
        ignore_index: Some(1),
        ..Default::default()
    };
    let (out, grad) = ce(&logits, 4, Targets::Classes(&t), &o, one::<E>()).unwrap();
    assert_eq!(out.counted_rows, 2);
    assert!(grad[4..16].iter().all(|g| g.to_f64() == 0.0));
    // Without an ignore index, -100 is just out of range.
    let o = CrossEntropyOptions {
        ignore_index: None,
        ..Default::default()
    };
    let err = ce(
        &logits,
        4,
        Targets::Classes(&IGNORED_TARGETS),
        &o,
        one::<E>(),
    )
    .unwrap_err();
    assert_eq!(
        err,
        LseError::TargetOutOfRange {
            row: 1,
            value: -100,
            classes: 4
        }
    );
}

// ---------------------------------------------------------------------------------------------
// Rows "NaN anywhere (not ignored)" and "+inf anywhere (not ignored)".

const CLEAN: [f64; 12] = [
    1.0, 2.0, 3.0, 4.0, //
    0.5, -1.0, 2.25, 0.0, //
    NEG, 1.0, 0.0, 2.0,
];
const CLEAN_TARGETS: [i64; 3] = [0, 1, 3];
const CLEAN_PROBS: [f64; 12] = [
    0.25, 0.25, 0.25, 0.25, //
    0.0, 0.5, 0.5, 0.0, //
    0.0, 0.125, 0.0, 0.875,
];

#[track_caller]
fn assert_non_finite(err: LseError, row: usize, column: usize, bad: f64, what: &str) {
    match err {
        LseError::NonFinite {
            what: w,
            row: r,
            column: c,
            value,
        } => {
            assert_eq!(w, "logit", "{what}");
            assert_eq!((r, c), (row, column), "{what}");
            assert!(
                value.to_bits() == bad.to_bits() || (bad.is_nan() && value.is_nan()),
                "{what}: value {value}, expected {bad}"
            );
        }
        other => panic!("{what}: expected NonFinite, got {other:?}"),
    }
}

fn non_finite_case<E: Element>(bad: f64) {
    let c = 4;
    for &(r, col) in &[(0, 0), (1, 2), (1, 3), (2, 0), (2, 3)] {
        let mut x = CLEAN;
        x[r * c + col] = bad;
        let logits = elems::<E>(&x);
        let clean = elems::<E>(&CLEAN);
        let label = format!("{bad} at ({r}, {col}) [{}]", E::DTYPE);

        // Error policy (the default): every op names row, column and value.
        let mut l = vec![sv::<E>(0.0); 3];
        let mut o = vec![E::zero(); 12];
        assert_non_finite(
            logsumexp(&logits, c, &mut l).unwrap_err(),
            r,
            col,
            bad,
            &label,
        );
        assert_non_finite(
            logsumexp_with(&logits, c, &mut l, NonFinite::Error).unwrap_err(),
            r,
            col,
            bad,
            &label,
        );
        assert_non_finite(
            softmax(&logits, c, &mut o).unwrap_err(),
            r,
            col,
            bad,
            &label,
        );
        assert_non_finite(
            softmax_with(&logits, c, &mut o, NonFinite::Error).unwrap_err(),
            r,
            col,
            bad,
            &label,
        );
        assert_non_finite(
            log_softmax(&logits, c, &mut o).unwrap_err(),
            r,
            col,
            bad,
            &label,
        );
        assert_non_finite(
            log_softmax_with(&logits, c, &mut o, NonFinite::Error).unwrap_err(),
            r,
            col,
            bad,
            &label,
        );
        let probs = elems::<E>(&CLEAN_PROBS);
        for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
            let opts = CrossEntropyOptions {
                reduction,
                ..Default::default()
            };
            for targets in [
                Targets::Classes(&CLEAN_TARGETS[..]),
                Targets::Probabilities(&probs),
            ] {
                let err = ce(&logits, c, targets, &opts, one::<E>()).unwrap_err();
                assert_non_finite(err, r, col, bad, &label);
            }
        }

        // Propagate: only row r is NaN (its logsumexp +inf for a +inf logit); the other rows
        // are bit for bit what they are without the bad row.
        let without: Vec<f64> = rows_of(&CLEAN, c)
            .into_iter()
            .enumerate()
            .filter(|&(i, _)| i != r)
            .flat_map(|(_, row)| row.to_vec())
            .collect();
        let without = elems::<E>(&without);
        let others = |i: usize| if i < r { i } else { i - 1 };

        let l = run_lse(&logits, c, NonFinite::Propagate);
        let lw = run_lse(&without, c, NonFinite::Propagate);
        for i in 0..3 {
            if i == r && bad == INF {
                // IEEE, SciPy and JAX: log Σ exp of a row with +inf (and no NaN) is +inf.
                assert_eq!(l[i].to_f64(), f64::INFINITY, "{label}: lse row {i}");
            } else if i == r {
                assert!(l[i].to_f64().is_nan(), "{label}: lse row {i}");
            } else {
                assert_eq!(l[i].to_f64().to_bits(), lw[others(i)].to_f64().to_bits());
            }
        }
        type Op<E> = fn(&[E], usize, NonFinite) -> Vec<E>;
        let ops: [(&str, Op<E>); 2] = [
            ("softmax", run_softmax::<E>),
            ("log_softmax", run_log_softmax::<E>),
        ];
        for (name, op) in ops {
            let y = op(&logits, c, NonFinite::Propagate);
            let yw = op(&without, c, NonFinite::Propagate);
            for i in 0..3 {
                let row = &y[i * c..(i + 1) * c];
                if i == r {
                    assert!(row.iter().all(|v| v.to_f64().is_nan()), "{label}: {name}");
                } else {
                    let j = others(i);
                    same_bits(
                        &format!("{label}: {name} row {i}"),
                        row,
                        &yw[j * c..(j + 1) * c],
                    );
                }
            }
            // The backward passes carry the NaN row through and leave the others alone.
            let dy = elems::<E>(&[0.5, -1.0, 2.0, 0.25].repeat(3));
            let mut dx = vec![E::zero(); 12];
            let mut dxw = vec![E::zero(); 8];
            let backward = if name == "softmax" {
                softmax_backward::<E>
            } else {
                log_softmax_backward::<E>
            };
            backward(&y, &dy, c, &mut dx).unwrap();
            backward(&yw, &dy[..8], c, &mut dxw).unwrap();
            for i in 0..3 {
                let row = &dx[i * c..(i + 1) * c];
                if i == r {
                    assert!(
                        row.iter().all(|v| v.to_f64().is_nan()),
                        "{label}: {name} bwd"
                    );
                } else {
                    let j = others(i);
                    same_bits(
                        &format!("{label}: {name} bwd {i}"),
                        row,
                        &dxw[j * c..(j + 1) * c],
                    );
                }
            }
        }

        let probs_without: Vec<f64> = rows_of(&CLEAN_PROBS, c)
            .into_iter()
            .enumerate()
            .filter(|&(i, _)| i != r)
            .flat_map(|(_, row)| row.to_vec())
            .collect();
        let probs_without = elems::<E>(&probs_without);
        let targets_without: Vec<i64> = (0..3)
            .filter(|&i| i != r)
            .map(|i| CLEAN_TARGETS[i])
            .collect();
        for probabilities in [false, true] {
            let (t, tw) = if probabilities {
                (
                    Targets::Probabilities(&probs[..]),
                    Targets::Probabilities(&probs_without[..]),
                )
            } else {
                (
                    Targets::Classes(&CLEAN_TARGETS[..]),
                    Targets::Classes(&targets_without[..]),
                )
            };
            // None and Sum: other rows are what the batch without row r gives.
            for reduction in [Reduction::None, Reduction::Sum] {
                let opts = CrossEntropyOptions {
                    reduction,
                    non_finite: NonFinite::Propagate,
                    keep_row_loss: true,
                    keep_row_lse: true,
                    label_smoothing: 0.125,
                    ..Default::default()
                };
                let (out, grad) = ce(&logits, c, t, &opts, one::<E>()).unwrap();
                let (wout, wgrad) = ce(&without, c, tw, &opts, one::<E>()).unwrap();
                assert!(out.loss.to_f64().is_nan(), "{label}: reduced loss");
                let (rl, rlse) = (out.row_loss.unwrap(), out.row_lse.unwrap());
                let (wrl, wrlse) = (wout.row_loss.unwrap(), wout.row_lse.unwrap());
                for i in 0..3 {
                    let g = &grad[i * c..(i + 1) * c];
                    if i == r {
                        assert!(rl[i].to_f64().is_nan(), "{label}: row loss");
                        assert!(rlse[i].to_f64().is_nan(), "{label}: row lse");
                        assert!(g.iter().all(|v| v.to_f64().is_nan()), "{label}: gradient");
                    } else {
                        let j = others(i);
                        assert_eq!(rl[i].to_f64().to_bits(), wrl[j].to_f64().to_bits());
                        assert_eq!(rlse[i].to_f64().to_bits(), wrlse[j].to_f64().to_bits());
                        same_bits(
                            &format!("{label}: CE grad {i}"),
                            g,
                            &wgrad[j * c..(j + 1) * c],
                        );
                    }
                }
            }
            // Mean: the bad row still counts in the denominator, so compare with the clean batch.
            let opts = CrossEntropyOptions {
                non_finite: NonFinite::Propagate,
                ..Default::default()
            };
            let (out, grad) = ce(&logits, c, t, &opts, one::<E>()).unwrap();
            let (cout, cgrad) = ce(&clean, c, t, &opts, one::<E>()).unwrap();
            assert!(out.loss.to_f64().is_nan());
            assert_eq!(out.denominator, cout.denominator);
            for i in 0..3 {
                let g = &grad[i * c..(i + 1) * c];
                if i == r {
                    assert!(
                        g.iter().all(|v| v.to_f64().is_nan()),
                        "{label}: mean gradient"
                    );
                } else {
                    same_bits(
                        &format!("{label}: mean grad {i}"),
                        g,
                        &cgrad[i * c..(i + 1) * c],
                    );
                }
            }
        }
    }
}

fn nan_anywhere<E: Element>() {
    non_finite_case::<E>(NAN);
    non_finite_case::<E>(-NAN);
}

fn pos_inf_anywhere<E: Element>() {
    non_finite_case::<E>(INF);
}

/// With several non-finite entries, the first in row-major order is named.
fn first_non_finite_is_reported<E: Element>() {
    let mut x = CLEAN;
    x[4 + 3] = NAN;
    x[4 + 1] = INF;
    x[8] = NAN;
    let logits = elems::<E>(&x);
    let mut l = vec![sv::<E>(0.0); 3];
    assert_non_finite(logsumexp(&logits, 4, &mut l).unwrap_err(), 1, 1, INF, "lse");
    let mut o = vec![E::zero(); 12];
    assert_non_finite(
        softmax(&logits, 4, &mut o).unwrap_err(),
        1,
        1,
        INF,
        "softmax",
    );
    assert_non_finite(
        log_softmax(&logits, 4, &mut o).unwrap_err(),
        1,
        1,
        INF,
        "log_softmax",
    );
    let err = ce(
        &logits,
        4,
        Targets::Classes(&CLEAN_TARGETS),
        &CrossEntropyOptions::default(),
        one::<E>(),
    )
    .unwrap_err();
    assert_non_finite(err, 1, 1, INF, "CE");
}

// ---------------------------------------------------------------------------------------------
// Row "target out of range".

fn target_out_of_range<E: Element>() {
    let logits = elems::<E>(&CLEAN);
    let mut losses = vec![E::zero(); 3];
    let mut grad = vec![E::zero(); 12];
    for bad in [-5i64, -1, 4, 5, 1 << 40, i64::MAX, i64::MIN] {
        let t = [0i64, bad, 3];
        let want = LseError::TargetOutOfRange {
            row: 1,
            value: bad,
            classes: 4,
        };
        for policy in [NonFinite::Error, NonFinite::Propagate] {
            let o = CrossEntropyOptions {
                non_finite: policy,
                ..Default::default()
            };
            let err = ce(&logits, 4, Targets::Classes(&t), &o, one::<E>()).unwrap_err();
            assert_eq!(err, want);
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("target {bad}")) && msg.contains("row 1"),
                "{msg}"
            );
        }
        assert_eq!(
            naive::cross_entropy(&logits, 4, &t, &mut losses, &mut grad).unwrap_err(),
            want
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Row "every row ignored, reduction mean".

fn every_row_ignored_mean<E: Element>() {
    let x = [1.0, 2.0, 3.0, NAN, INF, NEG, NEG, NEG, NEG];
    let logits = elems::<E>(&x);
    let t = [-100i64; 3];
    for policy in [NonFinite::Error, NonFinite::Propagate] {
        let base = CrossEntropyOptions {
            non_finite: policy,
            ..Default::default()
        };
        // Zero (the default): loss 0, gradient 0.
        let (out, grad) = ce(&logits, 3, Targets::Classes(&t), &base, one::<E>()).unwrap();
        assert_eq!(out.loss.to_f64(), 0.0);
        assert_eq!(out.counted_rows, 0);
        assert_eq!(out.denominator, 0.0);
        assert_eq!(wide(&grad), [0.0; 9]);
        // Nan: loss NaN, gradient 0.
        let o = CrossEntropyOptions {
            empty_mean: EmptyMean::Nan,
            ..base
        };
        let (out, grad) = ce(&logits, 3, Targets::Classes(&t), &o, one::<E>()).unwrap();
        assert!(out.loss.to_f64().is_nan());
        assert_eq!(wide(&grad), [0.0; 9]);
        // Error.
        let o = CrossEntropyOptions {
            empty_mean: EmptyMean::Error,
            ..base
        };
        let err = ce(&logits, 3, Targets::Classes(&t), &o, one::<E>()).unwrap_err();
        assert_eq!(err, LseError::EmptyMean { rows: 3 });
        // Sum and None over nothing are 0, whatever the empty-mean policy.
        for reduction in [Reduction::Sum, Reduction::None] {
            let o = CrossEntropyOptions {
                reduction,
                empty_mean: EmptyMean::Error,
                ..base
            };
            let (out, grad) = ce(&logits, 3, Targets::Classes(&t), &o, one::<E>()).unwrap();
            assert_eq!(out.loss.to_f64(), 0.0);
            assert_eq!(wide(&grad), [0.0; 9]);
        }
    }
    // An empty batch is a mean over nothing too.
    let o = CrossEntropyOptions {
        empty_mean: EmptyMean::Error,
        ..Default::default()
    };
    let err = ce::<E>(&[], 3, Targets::Classes(&[]), &o, one::<E>()).unwrap_err();
    assert_eq!(err, LseError::EmptyMean { rows: 0 });
    let (out, _) = ce::<E>(
        &[],
        3,
        Targets::Classes(&[]),
        &CrossEntropyOptions::default(),
        one::<E>(),
    )
    .unwrap();
    assert_eq!(out.loss.to_f64(), 0.0);
}

/// "every row ignored or weighted 0": a zero total weight is an empty mean as well.
fn zero_total_weight_mean<E: Element>() {
    let logits = elems::<E>(&CLEAN);
    let w = [0.0, 1.0, 1.0, 0.0];
    let t = [0i64, 0, 3];
    let o = CrossEntropyOptions {
        weights: Some(&w),
        ..Default::default()
    };
    let (out, grad) = ce(&logits, 4, Targets::Classes(&t), &o, one::<E>()).unwrap();
    assert_eq!(out.loss.to_f64(), 0.0);
    assert_eq!(out.counted_rows, 3);
    assert_eq!(wide(&grad), [0.0; 12]);
    let o = CrossEntropyOptions {
        empty_mean: EmptyMean::Nan,
        ..o
    };
    let (out, grad) = ce(&logits, 4, Targets::Classes(&t), &o, one::<E>()).unwrap();
    assert!(out.loss.to_f64().is_nan());
    assert_eq!(wide(&grad), [0.0; 12]);
    let o = CrossEntropyOptions {
        empty_mean: EmptyMean::Error,
        ..o
    };
    let err = ce(&logits, 4, Targets::Classes(&t), &o, one::<E>()).unwrap_err();
    assert_eq!(err, LseError::EmptyMean { rows: 3 });
}

// ---------------------------------------------------------------------------------------------
// Probability targets on masked logits, and label smoothing.

fn probability_targets_on_masked_logits<E: Element>() {
    let x = [
        2.0, NEG, 0.5, 1.0, //
        NEG, 1.0, 3.0, NEG,
    ];
    let q = [
        0.5, 0.0, 0.25, 0.25, //
        0.0, 0.75, 0.25, 0.0,
    ];
    let logits = elems::<E>(&x);
    for policy in [NonFinite::Error, NonFinite::Propagate] {
        let o = CrossEntropyOptions {
            reduction: Reduction::None,
            non_finite: policy,
            ..Default::default()
        };
        // A zero target on a -inf logit contributes exactly 0 (never 0·inf = NaN).
        let (out, grad) =
            check_ce_vs_ref::<E>("zero target on -inf", &x, 4, RefTargets::Probs(&q), &o, 1.0);
        let row_loss = out.row_loss.unwrap();
        for (r, row) in rows_of(&x, 4).into_iter().enumerate() {
            assert!(row_loss[r].to_f64().is_finite());
            let live: Vec<usize> = (0..4).filter(|&c| row[c] != NEG).collect();
            let cx: Vec<f64> = live.iter().map(|&c| row[c]).collect();
            let cq: Vec<f64> = live.iter().map(|&c| q[r * 4 + c]).collect();
            let cq = elems::<E>(&cq);
            let (cout, cgrad) = ce(
                &elems::<E>(&cx),
                cx.len(),
                Targets::Probabilities(&cq),
                &o,
                one::<E>(),
            )
            .unwrap();
            assert_eq!(
                row_loss[r].to_f64().to_bits(),
                cout.loss.to_f64().to_bits(),
                "row {r} vs compacted"
            );
            for (k, &c) in live.iter().enumerate() {
                assert_eq!(
                    grad[r * 4 + c].to_f64().to_bits(),
                    cgrad[k].to_f64().to_bits()
                );
            }
        }
    }
    // A positive target there: MaskedTarget under Error, +inf under Propagate.
    for tiny in [0.125, E::DTYPE.min_positive_normal()] {
        let mut q2 = q;
        q2[1] = tiny;
        let probs2 = elems::<E>(&q2);
        let err = ce(
            &logits,
            4,
            Targets::Probabilities(&probs2),
            &CrossEntropyOptions::default(),
            one::<E>(),
        )
        .unwrap_err();
        assert_eq!(err, LseError::MaskedTarget { row: 0, class: 1 });
        let msg = err.to_string();
        assert!(msg.contains("row 0") && msg.contains("class 1"), "{msg}");
        let o = CrossEntropyOptions {
            reduction: Reduction::None,
            non_finite: NonFinite::Propagate,
            ..Default::default()
        };
        let (out, grad) = ce(&logits, 4, Targets::Probabilities(&probs2), &o, one::<E>()).unwrap();
        let row_loss = out.row_loss.unwrap();
        assert_eq!(row_loss[0].to_f64(), INF);
        assert_eq!(out.loss.to_f64(), INF);
        let (want1, _, _, _) = ref_ce_row(&x[4..], &q[4..], &o);
        close(
            "row 1 unaffected",
            row_loss[1].to_f64(),
            want1,
            16.0 * us::<E>() * 4.0,
        );
        assert_eq!(grad[1].to_f64(), 0.0);
        assert!(grad.iter().all(|g| g.to_f64().is_finite()));
    }
}

fn label_smoothing_spreads_over_finite_logits<E: Element>() {
    // Hand-computed: 3 finite classes, ε = 1/4, target 0 ⇒ q = [3/4 + 1/12, 0, 1/12, 0, 1/12].
    let x = [2.0, NEG, 0.5, NEG, 1.0];
    let lse = (2f64.exp() + 0.5f64.exp() + 1f64.exp()).ln();
    let share = 0.25 / 3.0;
    let q = [0.75 + share, 0.0, share, 0.0, share];
    let want_loss = q[0] * (lse - 2.0) + q[2] * (lse - 0.5) + q[4] * (lse - 1.0);
    let want_grad: Vec<f64> = x
        .iter()
        .zip(q)
        .map(|(&xi, qi)| {
            if xi == NEG {
                0.0
            } else {
                (xi - lse).exp() - qi
            }
        })
        .collect();
    let logits = elems::<E>(&x);
    let o = CrossEntropyOptions {
        label_smoothing: 0.25,
        ..Default::default()
    };
    let (out, grad) = ce(&logits, 5, Targets::Classes(&[0]), &o, one::<E>()).unwrap();
    close(
        "smoothed masked loss",
        out.loss.to_f64(),
        want_loss,
        8.0 * us::<E>() * 3.0,
    );
    // The hand formula p − q cancels (|p|, |q| > |g|): a few more ulps of slack for f64.
    check_normwise::<E>("smoothed masked gradient", &grad, &want_grad, 16.0);
    assert_eq!(grad[1].to_f64(), 0.0);
    assert_eq!(grad[3].to_f64(), 0.0);
    // Spreading over all 5 classes would have given a different (here: infinite) loss.
    assert!(out.loss.to_f64().is_finite());

    // The same spread for probability targets: q ← (1 − ε) q + ε/3 on the finite classes.
    let p = [0.5, 0.0, 0.5, 0.0, 0.0];
    let qp: Vec<f64> = (0..5)
        .map(|c| {
            if x[c] == NEG {
                0.0
            } else {
                0.75 * p[c] + share
            }
        })
        .collect();
    let want_loss: f64 = (0..5)
        .filter(|&c| x[c] != NEG)
        .map(|c| qp[c] * (lse - x[c]))
        .sum();
    let probs = elems::<E>(&p);
    let (out, grad) = ce(&logits, 5, Targets::Probabilities(&probs), &o, one::<E>()).unwrap();
    close(
        "smoothed masked loss (probabilities)",
        out.loss.to_f64(),
        want_loss,
        8.0 * us::<E>() * 3.0,
    );
    let want_grad: Vec<f64> = (0..5)
        .map(|c| {
            if x[c] == NEG {
                0.0
            } else {
                (x[c] - lse).exp() - qp[c]
            }
        })
        .collect();
    check_normwise::<E>(
        "smoothed masked gradient (probabilities)",
        &grad,
        &want_grad,
        16.0,
    );

    // ε = 1: the target is uniform over the 3 finite classes.
    let o1 = CrossEntropyOptions {
        label_smoothing: 1.0,
        ..Default::default()
    };
    let (out, _) = ce(&logits, 5, Targets::Classes(&[2]), &o1, one::<E>()).unwrap();
    let want = ((lse - 2.0) + (lse - 0.5) + (lse - 1.0)) / 3.0;
    close("ε = 1", out.loss.to_f64(), want, 8.0 * us::<E>() * 3.0);

    // With nothing masked, the spread is over every class (1/C each).
    let xf = [2.0, 0.5, 1.0, -1.0];
    let lsef = xf.iter().map(|v: &f64| v.exp()).sum::<f64>().ln();
    let want: f64 = (0..4)
        .map(|c| (if c == 0 { 0.75 } else { 0.0 } + 0.0625) * (lsef - xf[c]))
        .sum();
    let (out, _) = ce(&elems::<E>(&xf), 4, Targets::Classes(&[0]), &o, one::<E>()).unwrap();
    close(
        "unmasked smoothing",
        out.loss.to_f64(),
        want,
        8.0 * us::<E>() * 4.0,
    );
}

// ---------------------------------------------------------------------------------------------
// In-place, reductions, per-row gradients, class weights.

fn in_place_matches_out_of_place<E: Element>() {
    // Masks, an ignored NaN row, a fully masked ignored row, a large-shift row.
    let x = [
        1.0, 2.0, 3.0, 4.0, //
        2.0, NEG, 0.5, 1.0, //
        NAN, INF, NEG, 1.0, //
        1024.0, 1016.0, 1008.0, 960.0, //
        NEG, NEG, NEG, NEG, //
        -0.5, 6.0, -3.0, 5.5,
    ];
    let t = [3i64, 0, -100, 1, -100, 2];
    let q = [
        0.25, 0.25, 0.25, 0.25, //
        0.5, 0.0, 0.25, 0.25, //
        0.0, 0.0, 0.0, 0.0, //
        0.0, 1.0, 0.0, 0.0, //
        0.0, 0.0, 0.0, 0.0, //
        0.125, 0.125, 0.5, 0.25,
    ];
    // The probability rows have no ignore index: make row 2 finite for them.
    let mut xq = x;
    xq[8..12].copy_from_slice(&[0.0, 1.0, NEG, 1.0]);
    // A poisoned non-ignored row for the Propagate options.
    let mut xp = x;
    xp[20] = NAN;
    let mut xqp = xq;
    xqp[20] = NAN;

    let w = [0.5, 2.0, 1.25, 1.0];
    let base = [
        CrossEntropyOptions::default(),
        CrossEntropyOptions {
            reduction: Reduction::Sum,
            ..Default::default()
        },
        CrossEntropyOptions {
            reduction: Reduction::None,
            ..Default::default()
        },
        CrossEntropyOptions {
            weights: Some(&w),
            ..Default::default()
        },
        CrossEntropyOptions {
            label_smoothing: 0.2,
            ..Default::default()
        },
        CrossEntropyOptions {
            z_loss: 1e-3,
            reduction: Reduction::Sum,
            ..Default::default()
        },
        CrossEntropyOptions {
            softcap: Some(5.0),
            ..Default::default()
        },
        CrossEntropyOptions {
            weights: Some(&w),
            label_smoothing: 0.1,
            z_loss: 1e-4,
            softcap: Some(30.0),
            keep_row_loss: true,
            keep_row_lse: true,
            ..Default::default()
        },
        CrossEntropyOptions {
            empty_mean: EmptyMean::Nan,
            ignore_index: Some(3),
            keep_row_lse: true,
            ..Default::default()
        },
    ];
    let per_row = [2.0, -0.5, 1.0, 0.0, 3.0, 0.75].map(sv::<E>);
    let mut checked = 0;
    for o in base {
        for policy in [NonFinite::Error, NonFinite::Propagate] {
            let o = CrossEntropyOptions {
                non_finite: policy,
                ..o
            };
            let class_logits = if policy == NonFinite::Propagate {
                &xp
            } else {
                &x
            };
            let mut grads = vec![one::<E>(), GradOutput::Scalar(sv::<E>(0.375))];
            if o.reduction == Reduction::None {
                grads.push(GradOutput::PerRow(&per_row));
            }
            for g in grads {
                let logits = elems::<E>(class_logits);
                // `ce` asserts the bit-for-bit agreement of all three entry points.
                let t_here: Vec<i64> = t
                    .iter()
                    .map(|&v| {
                        if v == -100 {
                            o.ignore_index.unwrap_or(-100)
                        } else {
                            v
                        }
                    })
                    .collect();
                // With ignore_index 3, row 0's target 3 is ignored too; that is fine.
                ce(&logits, 4, Targets::Classes(&t_here), &o, g).unwrap();
                let logits_q = elems::<E>(if policy == NonFinite::Propagate {
                    &xqp
                } else {
                    &xq
                });
                let probs = elems::<E>(&q);
                ce(&logits_q, 4, Targets::Probabilities(&probs), &o, g).unwrap();
                checked += 2;
            }
        }
    }
    assert!(checked >= 40);
}

fn reduction_none_sums_to_loss<E: Element>() {
    let t = [3i64, 0, 1, 2, 1];
    let o = CrossEntropyOptions {
        reduction: Reduction::None,
        label_smoothing: 0.1,
        ..Default::default()
    };
    let logits = elems::<E>(&FINITE);
    let (out, _) = ce(&logits, 4, Targets::Classes(&t), &o, one::<E>()).unwrap();
    let row_loss = out.row_loss.clone().expect("None returns per-row losses");
    assert_eq!(row_loss.len(), 5);
    let sum: f64 = row_loss.iter().map(|l| l.to_f64()).sum();
    let mag: f64 = row_loss.iter().map(|l| l.to_f64().abs()).sum();
    close(
        "Σ row_loss vs loss",
        out.loss.to_f64(),
        sum,
        8.0 * us::<E>() * mag,
    );
    // Sum reduces to the same number; Mean divides it by the row count; both keep the same rows.
    let (sum_out, _) = ce(
        &logits,
        4,
        Targets::Classes(&t),
        &CrossEntropyOptions {
            reduction: Reduction::Sum,
            keep_row_loss: true,
            ..o
        },
        one::<E>(),
    )
    .unwrap();
    assert_eq!(sum_out.loss.to_f64().to_bits(), out.loss.to_f64().to_bits());
    assert_eq!(bits(&sum_out.row_loss.unwrap()), bits(&row_loss));
    let (mean_out, _) = ce(
        &logits,
        4,
        Targets::Classes(&t),
        &CrossEntropyOptions {
            reduction: Reduction::Mean,
            keep_row_loss: true,
            ..o
        },
        one::<E>(),
    )
    .unwrap();
    assert_eq!(bits(&mean_out.row_loss.unwrap()), bits(&row_loss));
    close(
        "mean",
        mean_out.loss.to_f64(),
        sum / 5.0,
        8.0 * us::<E>() * mag / 5.0,
    );
    // Also with masked and ignored rows.
    let o = CrossEntropyOptions {
        reduction: Reduction::None,
        ..Default::default()
    };
    let (out, _) = ce(
        &elems::<E>(&WITH_IGNORED),
        4,
        Targets::Classes(&IGNORED_TARGETS),
        &o,
        one::<E>(),
    )
    .unwrap();
    let row_loss = out.row_loss.unwrap();
    assert_eq!(row_loss.len(), 6);
    let sum: f64 = row_loss.iter().map(|l| l.to_f64()).sum();
    close(
        "Σ row_loss with ignored rows",
        out.loss.to_f64(),
        sum,
        8.0 * us::<E>() * sum.abs(),
    );
}

fn per_row_grad_output_scales_each_row<E: Element>() {
    // Moderate logits (no subnormal gradients), powers of two: the scaling is exact.
    let x = [
        1.0, 2.0, 3.0, 4.0, //
        0.5, -1.0, 2.25, 0.0, //
        -0.5, 1.0, NEG, 0.25, //
        2.0, 2.0, 1.0, 1.0, //
        3.0, -1.0, 0.0, 1.5,
    ];
    let t = [3i64, 0, 1, 2, -100];
    let scales = [2.0, -1.0, 4.0, 0.0, 8.0];
    let logits = elems::<E>(&x);
    for smoothing in [0.0, 0.25] {
        let o = CrossEntropyOptions {
            reduction: Reduction::None,
            label_smoothing: smoothing,
            ..Default::default()
        };
        let (base, base_grad) = ce(&logits, 4, Targets::Classes(&t), &o, one::<E>()).unwrap();
        let g = scales.map(sv::<E>);
        let (out, grad) = ce(&logits, 4, Targets::Classes(&t), &o, GradOutput::PerRow(&g)).unwrap();
        // The loss does not depend on the incoming gradient.
        same_output_losses::<E>(&out, &base);
        for (r, &scale) in scales.iter().enumerate() {
            for c in 0..4 {
                let i = r * 4 + c;
                assert_eq!(
                    grad[i].to_f64(),
                    scale * base_grad[i].to_f64(),
                    "({r}, {c}) smoothing {smoothing}"
                );
            }
        }
        // Scalar(g) with None scales every row alike.
        let (_, grad2) = ce(
            &logits,
            4,
            Targets::Classes(&t),
            &o,
            GradOutput::Scalar(sv::<E>(-4.0)),
        )
        .unwrap();
        for i in 0..20 {
            assert_eq!(grad2[i].to_f64(), -4.0 * base_grad[i].to_f64());
        }
    }
}

fn same_output_losses<E: Element>(
    a: &CrossEntropyOutput<Stat<E>>,
    b: &CrossEntropyOutput<Stat<E>>,
) {
    assert_eq!(a.loss.to_f64().to_bits(), b.loss.to_f64().to_bits());
    assert_eq!(
        a.row_loss.as_ref().map(|v| bits(v)),
        b.row_loss.as_ref().map(|v| bits(v))
    );
}

fn weighted_mean_divides_by_summed_weights<E: Element>() {
    let x = [
        1.0, 2.0, 3.0, //
        0.5, -1.0, 2.25, //
        NAN, NAN, NAN, //
        -2.0, 0.0, 1.5, //
        4.0, 4.0, NEG,
    ];
    let t = [0i64, 1, -100, 2, 0];
    let w = [0.5, 2.0, 1.25];
    // Hand reference: Σ_r w_{y_r} (lse_r − x_{r,y_r}) / Σ_r w_{y_r}, ignored row excluded.
    let rows = rows_of(&x, 3);
    let mut num = 0.0;
    let mut den = 0.0;
    let mut scale = 0.0;
    for (r, row) in rows.iter().enumerate() {
        if t[r] == -100 {
            continue;
        }
        let y = t[r] as usize;
        let finite: Vec<f64> = row.iter().copied().filter(|v| v.is_finite()).collect();
        let m = finite.iter().copied().fold(NEG, f64::max);
        let lse = m + finite.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        num += w[y] * (lse - row[y]);
        den += w[y];
        scale += w[y] * (lse.abs() + row[y].abs());
    }
    assert_eq!(den, 0.5 + 2.0 + 1.25 + 0.5);
    let o = CrossEntropyOptions {
        weights: Some(&w),
        ..Default::default()
    };
    let (out, grad) = ce(&elems::<E>(&x), 3, Targets::Classes(&t), &o, one::<E>()).unwrap();
    close(
        "weighted mean",
        out.loss.to_f64(),
        num / den,
        8.0 * us::<E>() * scale / den,
    );
    assert_eq!(out.denominator, den);
    assert_eq!(out.counted_rows, 4);
    // Gradient: w_y (p − onehot) / Σ w_y.
    for (r, row) in rows.iter().enumerate() {
        let gr = &grad[r * 3..(r + 1) * 3];
        if t[r] == -100 {
            assert_eq!(wide(gr), [0.0; 3]);
            continue;
        }
        let y = t[r] as usize;
        let p = ref_softmax(row);
        let want: Vec<f64> = (0..3)
            .map(|c| w[y] * (p[c] - f64::from(u8::from(c == y))) / den)
            .collect();
        check_normwise::<E>(&format!("weighted gradient row {r}"), gr, &want, 4.0);
    }
    // And the general reference agrees, with smoothing on top (denominator still Σ w_y).
    let xs: Vec<f64> = x
        .iter()
        .map(|&v| if v.is_nan() { 0.0 } else { v })
        .collect();
    check_ce_vs_ref::<E>(
        "weighted + smoothing",
        &xs,
        3,
        RefTargets::Classes(&t),
        &CrossEntropyOptions {
            label_smoothing: 0.25,
            ..o
        },
        1.0,
    );
}

// ---------------------------------------------------------------------------------------------
// The naive formulas fail where the stable ones do not.

fn naive_fails_where_stable_does_not<E: Element>() {
    // The smallest integer whose naive exp overflows the dtype: 12 for f16, 89 for f32 and
    // bf16, 710 for f64.
    let big = E::DTYPE.exp_overflow_threshold().ceil();
    let x = [big, 0.0];
    let logits = elems::<E>(&x);
    let tail = (-big).exp();

    let mut naive_p = vec![E::zero(); 2];
    naive::softmax(&logits, 2, &mut naive_p).unwrap();
    assert!(
        naive_p.iter().any(|v| !v.to_f64().is_finite()),
        "naive softmax should overflow: {:?}",
        wide(&naive_p)
    );
    let p = run_softmax(&logits, 2, NonFinite::Error);
    check_normwise::<E>(
        "stable softmax",
        &p,
        &[1.0 / (1.0 + tail), tail / (1.0 + tail)],
        2.0,
    );

    let mut naive_l = vec![E::zero(); 1];
    naive::logsumexp(&logits, 2, &mut naive_l).unwrap();
    assert_eq!(naive_l[0].to_f64(), INF, "naive logsumexp should overflow");
    let l = run_lse(&logits, 2, NonFinite::Error);
    close(
        "stable lse",
        l[0].to_f64(),
        big + tail.ln_1p(),
        2.0 * us::<E>() * big,
    );

    let mut naive_ls = vec![E::zero(); 2];
    naive::log_softmax(&logits, 2, &mut naive_ls).unwrap();
    assert!(naive_ls.iter().any(|v| !v.to_f64().is_finite()));
    let ls = run_log_softmax(&logits, 2, NonFinite::Error);
    check_log_softmax_row::<E>("stable log_softmax", &ls, &x);

    let mut losses = vec![E::zero(); 1];
    let mut ngrad = vec![E::zero(); 2];
    naive::cross_entropy(&logits, 2, &[1], &mut losses, &mut ngrad).unwrap();
    assert!(
        !losses[0].to_f64().is_finite(),
        "naive CE loss {}",
        losses[0]
    );
    assert!(ngrad.iter().any(|v| !v.to_f64().is_finite()));
    let (out, grad) = ce(
        &logits,
        2,
        Targets::Classes(&[1]),
        &CrossEntropyOptions::default(),
        one::<E>(),
    )
    .unwrap();
    close(
        "stable CE",
        out.loss.to_f64(),
        big + tail.ln_1p(),
        2.0 * us::<E>() * big,
    );
    check_normwise::<E>(
        "stable CE gradient",
        &grad,
        &[1.0 / (1.0 + tail), tail / (1.0 + tail) - 1.0],
        2.0,
    );

    // Underflow: every naive exp rounds to 0 and softmax is 0/0; the stable one is exactly 1/2.
    let low = elems::<E>(&[-2.0 * big, -2.0 * big]);
    naive::softmax(&low, 2, &mut naive_p).unwrap();
    assert!(
        naive_p.iter().all(|v| v.to_f64().is_nan()),
        "{:?}",
        wide(&naive_p)
    );
    assert_eq!(wide(&run_softmax(&low, 2, NonFinite::Error)), [0.5, 0.5]);

    // On benign input the naive formulas are fine: they fail only where expected.
    let benign = [1.0, 2.0, 0.5, -1.0];
    let bl = elems::<E>(&benign);
    let mut np = vec![E::zero(); 4];
    naive::softmax(&bl, 4, &mut np).unwrap();
    check_normwise::<E>("naive softmax, benign", &np, &ref_softmax(&benign), 16.0);
    let mut nl = vec![E::zero(); 1];
    naive::logsumexp(&bl, 4, &mut nl).unwrap();
    close(
        "naive lse, benign",
        nl[0].to_f64(),
        ref_lse(&benign),
        16.0 * u::<E>() * 3.0,
    );
}

/// The example of the brief, spelled out: f16 softmax of [12, 0].
#[test]
fn naive_f16_softmax_of_12_0_overflows() {
    use lse::f16;
    let logits = [f16::from_f32(12.0), f16::from_f32(0.0)];
    let mut naive_p = [f16::ZERO; 2];
    naive::softmax(&logits, 2, &mut naive_p).unwrap();
    // exp(12) = 162755 > 65504 = f16::MAX: inf / inf = NaN, 1 / inf = 0.
    assert!(naive_p[0].is_nan(), "{naive_p:?}");
    assert_eq!(naive_p[1].to_f32(), 0.0);
    let mut p = [f16::ZERO; 2];
    softmax(&logits, 2, &mut p).unwrap();
    let tail = (-12f64).exp();
    // Correctly rounded: 1/(1 + e^-12) = 0.999993856 rounds to 1 in f16; e^-12/(1 + e^-12) =
    // 6.1442e-6 is an f16 subnormal (103 · 2^-24).
    assert_eq!(p[0], f16::ONE);
    assert_eq!(p[1], f16::from_f64(tail / (1.0 + tail)));
    assert_eq!(p[1].to_bits(), 103);
}
