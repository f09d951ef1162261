//! Bad input: every public function returns the right [`LseError`] variant, with the right fields
//! and a message that names them, and leaves every input buffer as it was (compared bit for bit,
//! NaN payloads included). The in-place cross-entropy is checked against its own documented
//! guarantee. Every test runs in every dtype (`<test>::f64`, `::f32`, `::f16`, `::bf16`).

use lse::{
    cross_entropy, cross_entropy_in_place, cross_entropy_with_grad, log_softmax,
    log_softmax_backward, log_softmax_with, logsumexp, logsumexp_with, naive, softmax,
    softmax_backward, softmax_with, CrossEntropyOptions, Element, EmptyMean, GradOutput, LseError,
    NonFinite, Reduction, Targets,
};

use lse_testkit::{all_dtypes, Stat, INF, NAN, NEG};

all_dtypes!(
    empty_classes,
    ragged_rows,
    output_lengths,
    backward_lengths,
    cross_entropy_lengths,
    target_out_of_range,
    non_finite_logit,
    bad_weight,
    bad_probability,
    bad_probability_whatever_the_logits,
    bad_label_smoothing,
    bad_z_loss,
    bad_softcap,
    per_row_gradient_needs_reduction_none,
    non_finite_grad_output,
    masked_target,
    empty_mean,
    in_place_error_before_any_write,
    in_place_error_in_row_r,
);

// ---------------------------------------------------------------------------------------------
// Helpers.

fn elems<E: Element>(xs: &[f64]) -> Vec<E> {
    xs.iter().map(|&x| E::from_f64(x)).collect()
}

/// Bit patterns of the widened values: NaN payloads and signed zeros count.
fn snap<E: Element>(xs: &[E]) -> Vec<u64> {
    xs.iter().map(|x| x.to_f64().to_bits()).collect()
}

fn sv<E: Element>(x: f64) -> Stat<E> {
    <Stat<E> as Element>::from_f64(x)
}

fn one<E: Element>() -> GradOutput<'static, Stat<E>> {
    GradOutput::Scalar(sv::<E>(1.0))
}

/// Errors compare by their `Debug` text, so that a NaN `value` equals a NaN `value`.
#[track_caller]
fn same_err(got: &LseError, want: &LseError, what: &str) {
    assert_eq!(format!("{got:?}"), format!("{want:?}"), "{what}");
}

/// The error's message names every given piece.
#[track_caller]
fn names(err: &LseError, pieces: &[&str]) {
    let msg = err.to_string();
    for p in pieces {
        assert!(msg.contains(p), "message {msg:?} should contain {p:?}");
    }
}

/// A sample batch: 2 rows × 3 classes (or `rows` rows), finite, dyadic.
fn sample<E: Element>(rows: usize) -> Vec<E> {
    let base = [
        1.0, 2.0, 0.5, -1.0, 0.25, 3.0, 0.0, -2.0, 1.5, 4.0, 4.0, -0.5,
    ];
    elems::<E>(
        &base
            .iter()
            .copied()
            .cycle()
            .take(rows * 3)
            .collect::<Vec<_>>(),
    )
}

type FwdResult = (&'static str, Result<(), LseError>);

/// Every forward entry point (and the naive ones when `naive_too`) on `logits` with outputs of
/// the given lengths; checks `logits` is unchanged after each call.
fn forward_all<E: Element>(
    logits: &[E],
    classes: usize,
    out_len: usize,
    lse_len: usize,
    naive_too: bool,
) -> Vec<FwdResult> {
    let before = snap(logits);
    let mut out = vec![E::zero(); out_len];
    let mut lse_out = vec![sv::<E>(0.0); lse_len];
    let mut naive_lse = vec![E::zero(); lse_len];
    let mut results: Vec<FwdResult> = vec![
        ("logsumexp", logsumexp(logits, classes, &mut lse_out)),
        (
            "logsumexp_with",
            logsumexp_with(logits, classes, &mut lse_out, NonFinite::Error),
        ),
        ("softmax", softmax(logits, classes, &mut out)),
        (
            "softmax_with",
            softmax_with(logits, classes, &mut out, NonFinite::Error),
        ),
        ("log_softmax", log_softmax(logits, classes, &mut out)),
        (
            "log_softmax_with",
            log_softmax_with(logits, classes, &mut out, NonFinite::Error),
        ),
    ];
    let policy = NonFinite::Propagate;
    results.push((
        "logsumexp_with(Propagate)",
        logsumexp_with(logits, classes, &mut lse_out, policy),
    ));
    results.push((
        "softmax_with(Propagate)",
        softmax_with(logits, classes, &mut out, policy),
    ));
    results.push((
        "log_softmax_with(Propagate)",
        log_softmax_with(logits, classes, &mut out, policy),
    ));
    if naive_too {
        results.push((
            "naive::logsumexp",
            naive::logsumexp(logits, classes, &mut naive_lse),
        ));
        results.push(("naive::softmax", naive::softmax(logits, classes, &mut out)));
        results.push((
            "naive::log_softmax",
            naive::log_softmax(logits, classes, &mut out),
        ));
    }
    assert_eq!(snap(logits), before, "logits modified");
    results
}

/// `softmax_backward` and `log_softmax_backward`; checks `y` and `dy` are unchanged.
fn backward_all<E: Element>(y: &[E], dy: &[E], classes: usize, dx_len: usize) -> Vec<FwdResult> {
    let (y0, dy0) = (snap(y), snap(dy));
    let mut dx = vec![E::zero(); dx_len];
    let results = vec![
        (
            "softmax_backward",
            softmax_backward(y, dy, classes, &mut dx),
        ),
        (
            "log_softmax_backward",
            log_softmax_backward(y, dy, classes, &mut dx),
        ),
    ];
    assert_eq!(snap(y), y0, "forward output modified");
    assert_eq!(snap(dy), dy0, "output gradient modified");
    results
}

#[track_caller]
fn expect_all(results: &[FwdResult], want: &LseError) {
    for (name, r) in results {
        match r {
            Err(e) => same_err(e, want, name),
            Ok(()) => panic!("{name}: expected {want:?}, got Ok"),
        }
    }
}

/// One cross-entropy call's inputs.
#[derive(Clone, Copy)]
struct Ce<'a, E: Element> {
    logits: &'a [E],
    classes: usize,
    targets: Targets<'a, E>,
    opts: CrossEntropyOptions<'a>,
    g: GradOutput<'a, Stat<E>>,
}

impl<'a, E: Element> Ce<'a, E> {
    fn new(logits: &'a [E], classes: usize, targets: Targets<'a, E>) -> Self {
        Self {
            logits,
            classes,
            targets,
            opts: CrossEntropyOptions::default(),
            g: one::<E>(),
        }
    }

    fn opts(self, opts: CrossEntropyOptions<'a>) -> Self {
        Self { opts, ..self }
    }

    fn g(self, g: GradOutput<'a, Stat<E>>) -> Self {
        Self { g, ..self }
    }

    /// Bits of every input buffer (logits, targets, weights, per-row gradient).
    fn inputs(&self) -> Vec<Vec<u64>> {
        let mut v = vec![snap(self.logits)];
        v.push(match self.targets {
            Targets::Classes(t) => t.iter().map(|&x| x as u64).collect(),
            Targets::Probabilities(p) => snap(p),
        });
        v.push(
            self.opts
                .weights
                .map_or(vec![], |w| w.iter().map(|x| x.to_bits()).collect()),
        );
        if let GradOutput::PerRow(g) = self.g {
            v.push(snap(g));
        }
        v
    }

    /// Expects `want` from `cross_entropy_with_grad`, `cross_entropy_in_place` and (when
    /// `loss_only`, for errors that do not concern the gradient) `cross_entropy`. Checks that
    /// no input changed; when `before_logits` (an error found without reading the logits), also
    /// that the in-place buffer is untouched. Returns the error.
    #[track_caller]
    fn expect(&self, want: &LseError, loss_only: bool, before_logits: bool) -> LseError {
        let before = self.inputs();
        let (l, c, t, o, g) = (self.logits, self.classes, self.targets, &self.opts, self.g);
        if loss_only {
            let e = cross_entropy(l, c, t, o).expect_err("cross_entropy");
            same_err(&e, want, "cross_entropy");
        }
        let mut grad = vec![E::from_f64(-7.0); l.len()];
        let err = cross_entropy_with_grad(l, c, t, o, g, &mut grad).expect_err("with_grad");
        same_err(&err, want, "cross_entropy_with_grad");
        let mut buf = l.to_vec();
        let e = cross_entropy_in_place(&mut buf, c, t, o, g).expect_err("in_place");
        same_err(&e, want, "cross_entropy_in_place");
        if before_logits {
            assert_eq!(
                snap(&buf),
                snap(l),
                "in-place: an error found before the logits are read must leave them untouched"
            );
        }
        assert_eq!(self.inputs(), before, "an input buffer was modified");
        err
    }
}

// ---------------------------------------------------------------------------------------------
// Shapes.

fn empty_classes<E: Element>() {
    for len in [0, 6] {
        let logits = sample::<E>(2)[..len].to_vec();
        let res = forward_all(&logits, 0, len, 2, true);
        expect_all(&res, &LseError::EmptyClasses);
        names(res[0].1.as_ref().unwrap_err(), &["classes", "at least 1"]);
        expect_all(
            &backward_all(&logits, &logits, 0, len),
            &LseError::EmptyClasses,
        );
        let t = [0i64, 1];
        Ce::new(&logits, 0, Targets::Classes(&t)).expect(&LseError::EmptyClasses, true, true);
        Ce::new(&logits, 0, Targets::Probabilities(&logits)).expect(
            &LseError::EmptyClasses,
            true,
            true,
        );
        let (mut losses, mut grad) = (vec![E::zero(); 2], vec![E::zero(); len]);
        let before = snap(&logits);
        let e = naive::cross_entropy(&logits, 0, &t, &mut losses, &mut grad).unwrap_err();
        same_err(&e, &LseError::EmptyClasses, "naive::cross_entropy");
        assert_eq!(snap(&logits), before);
    }
}

fn ragged_rows<E: Element>() {
    let logits = sample::<E>(3)[..7].to_vec();
    let want = LseError::RaggedRows {
        what: "logits",
        len: 7,
        classes: 3,
    };
    let res = forward_all(&logits, 3, 7, 2, true);
    expect_all(&res, &want);
    names(
        res[0].1.as_ref().unwrap_err(),
        &["logits", "7 elements", "3 classes"],
    );
    let want_bwd = LseError::RaggedRows {
        what: "forward output",
        len: 7,
        classes: 3,
    };
    expect_all(&backward_all(&logits, &logits, 3, 7), &want_bwd);
    let t = [0i64, 1];
    let e = Ce::new(&logits, 3, Targets::Classes(&t)).expect(&want, true, true);
    names(&e, &["logits", "7", "3 classes"]);
    Ce::new(&logits, 3, Targets::Probabilities(&logits)).expect(&want, true, true);
    let (mut losses, mut grad) = (vec![E::zero(); 2], vec![E::zero(); 7]);
    let e = naive::cross_entropy(&logits, 3, &t, &mut losses, &mut grad).unwrap_err();
    same_err(&e, &want, "naive::cross_entropy");
}

fn output_lengths<E: Element>() {
    let logits = sample::<E>(2);
    for bad in [5, 7, 0] {
        let res = forward_all(&logits, 3, bad, 2, true);
        let want = LseError::LengthMismatch {
            what: "output",
            expected: 6,
            actual: bad,
        };
        for (name, r) in &res {
            if !name.contains("logsumexp") {
                same_err(r.as_ref().unwrap_err(), &want, name);
            }
        }
        names(
            res[2].1.as_ref().unwrap_err(),
            &["output", &format!("{bad} elements"), "expected 6"],
        );
    }
    for bad in [1, 3, 0] {
        let res = forward_all(&logits, 3, 6, bad, true);
        let want = LseError::LengthMismatch {
            what: "logsumexp output",
            expected: 2,
            actual: bad,
        };
        for (name, r) in &res {
            if name.contains("logsumexp") {
                same_err(r.as_ref().unwrap_err(), &want, name);
            } else {
                assert!(r.is_ok(), "{name}");
            }
        }
        names(
            res[0].1.as_ref().unwrap_err(),
            &[
                "logsumexp output",
                &format!("has {bad} elements"),
                "expected 2",
            ],
        );
    }
}

fn backward_lengths<E: Element>() {
    let y = sample::<E>(2);
    let dy_short = sample::<E>(2)[..5].to_vec();
    let dy_long = sample::<E>(3)[..7].to_vec();
    for dy in [&dy_short, &dy_long] {
        let want = LseError::LengthMismatch {
            what: "output gradient",
            expected: 6,
            actual: dy.len(),
        };
        let res = backward_all(&y, dy, 3, 6);
        expect_all(&res, &want);
        names(
            res[0].1.as_ref().unwrap_err(),
            &["output gradient", "expected 6"],
        );
    }
    for dx_len in [5, 7] {
        let want = LseError::LengthMismatch {
            what: "input gradient",
            expected: 6,
            actual: dx_len,
        };
        let res = backward_all(&y, &y, 3, dx_len);
        expect_all(&res, &want);
        names(
            res[1].1.as_ref().unwrap_err(),
            &["input gradient", &format!("{dx_len} elements")],
        );
    }
}

fn cross_entropy_lengths<E: Element>() {
    let logits = sample::<E>(2);
    let mismatch = |what, expected, actual| LseError::LengthMismatch {
        what,
        expected,
        actual,
    };
    // Targets.
    for t in [&[0i64][..], &[0, 1, 2][..], &[][..]] {
        let e = Ce::new(&logits, 3, Targets::Classes(t)).expect(
            &mismatch("targets", 2, t.len()),
            true,
            true,
        );
        names(
            &e,
            &[
                "targets",
                &format!("has {} elements", t.len()),
                "expected 2",
            ],
        );
        let (mut losses, mut grad) = (vec![E::zero(); 2], vec![E::zero(); 6]);
        let e = naive::cross_entropy(&logits, 3, t, &mut losses, &mut grad).unwrap_err();
        same_err(&e, &mismatch("targets", 2, t.len()), "naive targets");
    }
    let t = [0i64, 2];
    // Weights.
    for w in [&[1.0, 1.0][..], &[1.0; 4][..]] {
        let c = Ce::new(&logits, 3, Targets::Classes(&t)).opts(CrossEntropyOptions {
            weights: Some(w),
            ..Default::default()
        });
        let e = c.expect(&mismatch("weights", 3, w.len()), true, true);
        names(&e, &["weights", "expected 3"]);
    }
    // Gradient buffer (the fused out-of-place call only).
    for len in [5, 7, 0] {
        let before = snap(&logits);
        let mut grad = vec![E::zero(); len];
        let e = cross_entropy_with_grad(
            &logits,
            3,
            Targets::Classes(&t),
            &CrossEntropyOptions::default(),
            one::<E>(),
            &mut grad,
        )
        .unwrap_err();
        same_err(&e, &mismatch("gradient", 6, len), "gradient length");
        names(&e, &["gradient", "expected 6"]);
        assert_eq!(snap(&logits), before);
    }
    // Probability targets.
    for len in [5, 7, 3] {
        let q = sample::<E>(3)[..len]
            .iter()
            .map(|v| E::from_f64(v.to_f64().abs()))
            .collect::<Vec<E>>();
        let e = Ce::new(&logits, 3, Targets::Probabilities(&q)).expect(
            &mismatch("probability targets", 6, len),
            true,
            true,
        );
        names(&e, &["probability targets", "expected 6"]);
    }
    // Per-row output gradient.
    for len in [1, 3, 0] {
        let g = vec![sv::<E>(1.0); len];
        let c = Ce::new(&logits, 3, Targets::Classes(&t))
            .opts(CrossEntropyOptions {
                reduction: Reduction::None,
                ..Default::default()
            })
            .g(GradOutput::PerRow(&g));
        let e = c.expect(&mismatch("per-row output gradient", 2, len), false, true);
        names(&e, &["per-row output gradient", "expected 2"]);
    }
    // The naive cross-entropy's outputs.
    for len in [1, 3] {
        let (mut losses, mut grad) = (vec![E::zero(); len], vec![E::zero(); 6]);
        let e = naive::cross_entropy(&logits, 3, &t, &mut losses, &mut grad).unwrap_err();
        same_err(&e, &mismatch("losses", 2, len), "naive losses");
    }
    for len in [5, 7] {
        let (mut losses, mut grad) = (vec![E::zero(); 2], vec![E::zero(); len]);
        let e = naive::cross_entropy(&logits, 3, &t, &mut losses, &mut grad).unwrap_err();
        same_err(&e, &mismatch("output", 6, len), "naive gradient");
    }
}

// ---------------------------------------------------------------------------------------------
// Targets and options.

fn target_out_of_range<E: Element>() {
    let logits = sample::<E>(3);
    for row in [0, 2] {
        for bad in [-5i64, 3, 4, 1 << 40, i64::MAX, i64::MIN] {
            let mut t = [0i64, 1, 2];
            t[row] = bad;
            let want = LseError::TargetOutOfRange {
                row,
                value: bad,
                classes: 3,
            };
            for policy in [NonFinite::Error, NonFinite::Propagate] {
                let e = Ce::new(&logits, 3, Targets::Classes(&t))
                    .opts(CrossEntropyOptions {
                        non_finite: policy,
                        ..Default::default()
                    })
                    .expect(&want, true, true);
                names(
                    &e,
                    &[&format!("target {bad}"), &format!("row {row}"), "3 classes"],
                );
            }
            let (mut losses, mut grad) = (vec![E::zero(); 3], vec![E::zero(); 9]);
            let before = snap(&logits);
            let e = naive::cross_entropy(&logits, 3, &t, &mut losses, &mut grad).unwrap_err();
            same_err(&e, &want, "naive::cross_entropy");
            assert_eq!(snap(&logits), before);
        }
    }
}

fn non_finite_logit<E: Element>() {
    for (bad, shown) in [(NAN, "NaN"), (-NAN, "NaN"), (INF, "inf")] {
        for (row, column) in [(0, 0), (1, 2), (2, 1)] {
            let mut logits = sample::<E>(3);
            logits[row * 3 + column] = E::from_f64(bad);
            let want = LseError::NonFinite {
                what: "logit",
                row,
                column,
                value: E::from_f64(bad).to_f64(),
            };
            // The forward ops (the naive ones do not check: producing NaN is their point).
            let res = forward_all(&logits, 3, 9, 3, false);
            for (name, r) in &res {
                if name.contains("Propagate") {
                    assert!(r.is_ok(), "{name}");
                } else {
                    let e = r.as_ref().unwrap_err();
                    match e {
                        LseError::NonFinite {
                            what: "logit",
                            row: r,
                            column: c,
                            value,
                        } => {
                            assert_eq!((*r, *c), (row, column), "{name}");
                            assert_eq!(value.is_nan(), bad.is_nan(), "{name}");
                            assert!(bad.is_nan() || *value == bad, "{name}");
                        }
                        other => panic!("{name}: {other:?}"),
                    }
                    names(
                        e,
                        &[
                            "non-finite logit",
                            shown,
                            &format!("row {row}, column {column}"),
                        ],
                    );
                }
            }
            // The cross-entropy, class and probability targets.
            let t = [0i64, 1, 2];
            let q = elems::<E>(&[0.25; 9]);
            for targets in [Targets::Classes(&t[..]), Targets::Probabilities(&q)] {
                let e = Ce::new(&logits, 3, targets).expect(&want, true, row == 0);
                names(&e, &[shown, &format!("row {row}, column {column}")]);
            }
            // Propagate: no error.
            let mut grad = vec![E::zero(); 9];
            let o = CrossEntropyOptions {
                non_finite: NonFinite::Propagate,
                ..Default::default()
            };
            let before = snap(&logits);
            cross_entropy_with_grad(&logits, 3, Targets::Classes(&t), &o, one::<E>(), &mut grad)
                .unwrap();
            assert_eq!(snap(&logits), before);
        }
    }
}

fn bad_weight<E: Element>() {
    let logits = sample::<E>(2);
    let t = [0i64, 2];
    // Negative and zero weights are PyTorch's too (see `tests/pytorch_semantics.rs`): only
    // non-finite ones are errors.
    for (class, value, shown) in [(2, NAN, "NaN"), (0, INF, "inf"), (1, NEG, "-inf")] {
        let mut w = [0.5, 2.0, 1.0];
        w[class] = value;
        let want = LseError::BadWeight { class, value };
        let e = Ce::new(&logits, 3, Targets::Classes(&t))
            .opts(CrossEntropyOptions {
                weights: Some(&w),
                ..Default::default()
            })
            .expect(&want, true, true);
        names(&e, &["class weight", shown, &format!("class {class}")]);
        // Probability targets check the weights too.
        let q = elems::<E>(&[0.5; 6]);
        Ce::new(&logits, 3, Targets::Probabilities(&q))
            .opts(CrossEntropyOptions {
                weights: Some(&w),
                ..Default::default()
            })
            .expect(&want, true, true);
    }
}

fn bad_probability<E: Element>() {
    let logits = sample::<E>(2);
    for (row, column, value, shown) in [
        (1, 0, NAN, "NaN"),
        (0, 2, INF, "inf"),
        (1, 2, INF, "inf"),
        (0, 0, NEG, "-inf"),
    ] {
        for policy in [NonFinite::Error, NonFinite::Propagate] {
            let mut qf = [0.25; 6];
            qf[row * 3 + column] = value;
            let q = elems::<E>(&qf);
            let want = LseError::BadProbability {
                row,
                column,
                value: E::from_f64(value).to_f64(),
            };
            // Checked in the row's read pass: before any write when the row is the first.
            let e = Ce::new(&logits, 3, Targets::Probabilities(&q))
                .opts(CrossEntropyOptions {
                    non_finite: policy,
                    ..Default::default()
                })
                .expect(&want, true, row == 0);
            names(
                &e,
                &[
                    "probability target",
                    shown,
                    &format!("row {row}, column {column}"),
                ],
            );
        }
    }
}

/// A bad probability target is a caller error whatever the row's logits hold: `Propagate` is the
/// policy for NaN and `+inf` *logits*, and must not hide an infinite or NaN target in the same row.
fn bad_probability_whatever_the_logits<E: Element>() {
    for (logit, value) in [(NAN, NEG), (INF, NEG), (NAN, NAN), (INF, INF)] {
        let mut logits = sample::<E>(2);
        logits[3] = E::from_f64(logit);
        let mut qf = [0.25; 6];
        qf[3 + 2] = value;
        let q = elems::<E>(&qf);
        let want = LseError::BadProbability {
            row: 1,
            column: 2,
            value: E::from_f64(value).to_f64(),
        };
        Ce::new(&logits, 3, Targets::Probabilities(&q))
            .opts(CrossEntropyOptions {
                non_finite: NonFinite::Propagate,
                ..Default::default()
            })
            .expect(&want, true, false);
    }
}

fn bad_option<E: Element>(opts: CrossEntropyOptions<'_>, name: &str, value: f64) {
    let logits = sample::<E>(2);
    let t = [0i64, 2];
    let q = elems::<E>(&[0.5; 6]);
    for targets in [Targets::Classes(&t[..]), Targets::Probabilities(&q)] {
        let e = Ce::new(&logits, 3, targets)
            .opts(opts)
            .expect_option(name, value);
        names(&e, &["option", name, &format!("{value}"), "invalid"]);
    }
}

impl<E: Element> Ce<'_, E> {
    #[track_caller]
    fn expect_option(&self, name: &str, value: f64) -> LseError {
        // The `expected` text is the library's wording: take it from the error, check the rest.
        let mut grad = vec![E::zero(); self.logits.len()];
        let e = cross_entropy_with_grad(
            self.logits,
            self.classes,
            self.targets,
            &self.opts,
            self.g,
            &mut grad,
        )
        .unwrap_err();
        let LseError::BadOption {
            name: got_name,
            value: got_value,
            expected,
        } = e.clone()
        else {
            panic!("expected BadOption for {name} = {value}, got {e:?}");
        };
        assert_eq!(got_name, name);
        assert_eq!(got_value.to_bits(), value.to_bits());
        assert!(!expected.is_empty());
        names(&e, &[expected]);
        self.expect(&e, true, true)
    }
}

fn bad_label_smoothing<E: Element>() {
    for v in [-0.1, 1.5, NAN, INF, NEG, 1.0 + f64::EPSILON] {
        bad_option::<E>(
            CrossEntropyOptions {
                label_smoothing: v,
                ..Default::default()
            },
            "label_smoothing",
            v,
        );
    }
}

fn bad_z_loss<E: Element>() {
    for v in [-1e-4, -f64::MIN_POSITIVE, NAN, INF, NEG] {
        bad_option::<E>(
            CrossEntropyOptions {
                z_loss: v,
                ..Default::default()
            },
            "z_loss",
            v,
        );
    }
}

fn bad_softcap<E: Element>() {
    for v in [0.0, -0.0, -30.0, INF, NEG, NAN] {
        bad_option::<E>(
            CrossEntropyOptions {
                softcap: Some(v),
                ..Default::default()
            },
            "softcap",
            v,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The incoming gradient.

fn per_row_gradient_needs_reduction_none<E: Element>() {
    let logits = sample::<E>(2);
    let t = [0i64, 2];
    let g = [sv::<E>(1.0), sv::<E>(0.5)];
    for reduction in [Reduction::Mean, Reduction::Sum] {
        let e = Ce::new(&logits, 3, Targets::Classes(&t))
            .opts(CrossEntropyOptions {
                reduction,
                ..Default::default()
            })
            .g(GradOutput::PerRow(&g))
            .expect(&LseError::PerRowGradient { reduction }, false, true);
        names(
            &e,
            &["per-row", "Reduction::None", &format!("{reduction:?}")],
        );
    }
}

fn non_finite_grad_output<E: Element>() {
    let logits = sample::<E>(2);
    let t = [0i64, 2];
    for (bad, shown) in [(NAN, "NaN"), (INF, "inf"), (NEG, "-inf")] {
        let b = sv::<E>(bad);
        let want = LseError::NonFinite {
            what: "output gradient",
            row: 0,
            column: 0,
            value: b.to_f64(),
        };
        let e = Ce::new(&logits, 3, Targets::Classes(&t))
            .g(GradOutput::Scalar(b))
            .expect(&want, false, true);
        names(&e, &["output gradient", shown, "row 0"]);
        let g = [sv::<E>(1.0), b];
        let want = LseError::NonFinite {
            what: "output gradient",
            row: 1,
            column: 0,
            value: b.to_f64(),
        };
        let e = Ce::new(&logits, 3, Targets::Classes(&t))
            .opts(CrossEntropyOptions {
                reduction: Reduction::None,
                ..Default::default()
            })
            .g(GradOutput::PerRow(&g))
            .expect(&want, false, true);
        names(&e, &["output gradient", shown, "row 1"]);
        // Under Propagate it is accepted (and propagates).
        let mut grad = vec![E::zero(); 6];
        let o = CrossEntropyOptions {
            non_finite: NonFinite::Propagate,
            ..Default::default()
        };
        cross_entropy_with_grad(
            &logits,
            3,
            Targets::Classes(&t),
            &o,
            GradOutput::Scalar(b),
            &mut grad,
        )
        .unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Masks and empty means.

fn masked_target<E: Element>() {
    let mut logits = sample::<E>(3);
    logits[3 + 1] = E::from_f64(NEG);
    let t = [0i64, 1, 2];
    let want = LseError::MaskedTarget { row: 1, class: 1 };
    let e = Ce::new(&logits, 3, Targets::Classes(&t)).expect(&want, true, false);
    names(&e, &["row 1", "class 1", "-inf"]);
    let mut q = [0.0; 9];
    q[3 + 1] = 0.5;
    q[3 + 2] = 0.5;
    let q = elems::<E>(&q);
    Ce::new(&logits, 3, Targets::Probabilities(&q)).expect(&want, true, false);
}

fn empty_mean<E: Element>() {
    let logits = sample::<E>(2);
    let o = CrossEntropyOptions {
        empty_mean: EmptyMean::Error,
        ..Default::default()
    };
    let want = LseError::EmptyMean { rows: 2 };
    let t = [-100i64, -100];
    let e = Ce::new(&logits, 3, Targets::Classes(&t))
        .opts(o)
        .expect(&want, true, true);
    names(&e, &["mean", "2 rows"]);
    let w = [0.0, 1.0, 0.0];
    let t = [0i64, 2];
    Ce::new(&logits, 3, Targets::Classes(&t))
        .opts(CrossEntropyOptions {
            weights: Some(&w),
            ..o
        })
        .expect(&want, true, true);
}

// ---------------------------------------------------------------------------------------------
// The in-place cross-entropy's guarantee.

/// Errors that need no logits are found before anything is written.
fn in_place_error_before_any_write<E: Element>() {
    // Logits with a NaN in the last row: a logit-free error must win before it is even seen, and
    // the buffer must come back bit for bit (NaN payload included).
    let mut logits = sample::<E>(3);
    logits[8] = E::from_f64(f64::from_bits(0x7ff8_dead_0000_0000));
    let w_bad = [1.0, NAN, 1.0];
    let g2 = [sv::<E>(1.0), sv::<E>(1.0), sv::<E>(NAN)];
    let t_ok = [0i64, 1, 2];
    let t_bad = [0i64, 7, 2];
    let t_ign = [-100i64; 3];
    let cases: Vec<(Ce<'_, E>, LseError)> = vec![
        (
            Ce::new(&logits, 3, Targets::Classes(&t_bad)),
            LseError::TargetOutOfRange {
                row: 1,
                value: 7,
                classes: 3,
            },
        ),
        (
            Ce::new(&logits, 3, Targets::Classes(&t_ok)).opts(CrossEntropyOptions {
                weights: Some(&w_bad),
                ..Default::default()
            }),
            LseError::BadWeight {
                class: 1,
                value: NAN,
            },
        ),
        (
            Ce::new(&logits, 3, Targets::Classes(&t_ok)).opts(CrossEntropyOptions {
                label_smoothing: 2.0,
                ..Default::default()
            }),
            LseError::BadOption {
                name: "label_smoothing",
                value: 2.0,
                expected: "in [0, 1]",
            },
        ),
        (
            Ce::new(&logits, 3, Targets::Classes(&t_ok))
                .opts(CrossEntropyOptions {
                    reduction: Reduction::None,
                    ..Default::default()
                })
                .g(GradOutput::PerRow(&g2)),
            LseError::NonFinite {
                what: "output gradient",
                row: 2,
                column: 0,
                value: sv::<E>(NAN).to_f64(),
            },
        ),
        (
            Ce::new(&logits, 3, Targets::Classes(&t_ok)).g(GradOutput::PerRow(&g2[..2])),
            LseError::PerRowGradient {
                reduction: Reduction::Mean,
            },
        ),
        (
            Ce::new(&logits, 3, Targets::Classes(&t_ign)).opts(CrossEntropyOptions {
                empty_mean: EmptyMean::Error,
                ..Default::default()
            }),
            LseError::EmptyMean { rows: 3 },
        ),
        (
            Ce::new(&logits, 3, Targets::Classes(&t_ok[..2])),
            LseError::LengthMismatch {
                what: "targets",
                expected: 3,
                actual: 2,
            },
        ),
    ];
    for (case, want) in cases {
        let e = case.expect_raw(&want);
        same_err(&e, &want, "in-place");
    }
}

impl<E: Element> Ce<'_, E> {
    /// `cross_entropy_in_place` alone; the buffer must be untouched.
    #[track_caller]
    fn expect_raw(&self, want: &LseError) -> LseError {
        let mut buf = self.logits.to_vec();
        let e = cross_entropy_in_place(&mut buf, self.classes, self.targets, &self.opts, self.g)
            .unwrap_err();
        assert_eq!(snap(&buf), snap(self.logits), "{want:?}: buffer touched");
        e
    }
}

/// An error in the logits of row `r` (NaN, +inf, target mass on -inf, bad probability): rows
/// before `r` hold exactly the out-of-place gradient, rows from `r` on their original logits.
fn in_place_error_in_row_r<E: Element>() {
    let rows = 4;
    let c = 3;
    let clean = sample::<E>(rows);
    let t = [0i64, -100, 2, 1];
    let w = [0.5, 2.0, 1.25];
    let option_sets = [
        CrossEntropyOptions::default(),
        CrossEntropyOptions {
            weights: Some(&w),
            label_smoothing: 0.125,
            z_loss: 1e-3,
            softcap: Some(8.0),
            ..Default::default()
        },
        CrossEntropyOptions {
            reduction: Reduction::Sum,
            ..Default::default()
        },
    ];
    for opts in option_sets {
        for r in 0..rows {
            // Row 1 is ignored: a NaN there is no error at all.
            let kinds: &[&str] = if t[r] == -100 {
                &["ignored"]
            } else {
                &["nan", "inf", "masked", "probability"]
            };
            for &kind in kinds {
                let mut logits = clean.clone();
                let mut qf = vec![0.25; rows * c];
                let mut class_targets = true;
                let want = match kind {
                    "nan" | "ignored" | "inf" => {
                        let v = if kind == "inf" { INF } else { NAN };
                        logits[r * c + 1] = E::from_f64(v);
                        Some(LseError::NonFinite {
                            what: "logit",
                            row: r,
                            column: 1,
                            value: E::from_f64(v).to_f64(),
                        })
                    }
                    "masked" => {
                        let y = t[r] as usize;
                        logits[r * c + y] = E::from_f64(NEG);
                        Some(LseError::MaskedTarget { row: r, class: y })
                    }
                    _ => {
                        class_targets = false;
                        qf[r * c + 2] = INF;
                        Some(LseError::BadProbability {
                            row: r,
                            column: 2,
                            value: INF,
                        })
                    }
                };
                let q = elems::<E>(&qf);
                let targets = if class_targets {
                    Targets::Classes(&t[..])
                } else {
                    Targets::Probabilities(&q)
                };
                // The out-of-place reference: the same call under Propagate (which changes only
                // row r), or for a bad probability, the same call with that probability fixed.
                let mut q_fixed = qf.clone();
                q_fixed[r * c + 2] = 0.25;
                let q_fixed = elems::<E>(&q_fixed);
                let ref_targets = if class_targets {
                    targets
                } else {
                    Targets::Probabilities(&q_fixed)
                };
                let ref_opts = CrossEntropyOptions {
                    non_finite: NonFinite::Propagate,
                    ..opts
                };
                let mut reference = vec![E::zero(); rows * c];
                cross_entropy_with_grad(
                    &logits,
                    c,
                    ref_targets,
                    &ref_opts,
                    one::<E>(),
                    &mut reference,
                )
                .unwrap();

                let mut buf = logits.clone();
                let res = cross_entropy_in_place(&mut buf, c, targets, &opts, one::<E>());
                if kind == "ignored" {
                    res.unwrap();
                    assert_eq!(snap(&buf), snap(&reference), "ignored row: full gradient");
                    continue;
                }
                let e = res.unwrap_err();
                same_err(&e, want.as_ref().unwrap(), kind);
                let label = format!("{kind} in row {r}, {opts:?}");
                assert_eq!(
                    snap(&buf[..r * c]),
                    snap(&reference[..r * c]),
                    "{label}: rows before r must hold the out-of-place gradient"
                );
                assert_eq!(
                    snap(&buf[r * c..]),
                    snap(&logits[r * c..]),
                    "{label}: rows from r on must hold their logits"
                );
                // The out-of-place call leaves the logits alone and reports the same error.
                let before = snap(&logits);
                let mut grad = vec![E::zero(); rows * c];
                let e2 = cross_entropy_with_grad(&logits, c, targets, &opts, one::<E>(), &mut grad)
                    .unwrap_err();
                same_err(&e2, &e, "out-of-place");
                assert_eq!(snap(&logits), before);
            }
        }
    }
}
