//! The dynamic loss scaler: the stories of an f16 run whose scaled gradients overflow.

use lse::guard::{
    LossScaler, LossScalerConfig, NonFiniteValue, Role, ScaleBound, ScaleChange, ScalerConfigError,
    StepReport,
};
use lse::{bf16, f16, DType, Element};
use lse_testkit::rng::Rng;

/// What an f16 backward pass produces for the true gradients `grads` and a loss scaled by
/// `scale`: every gradient lifted by `scale` and rounded to f16 (`inf` past 65504).
fn backward_f16(grads: &[f64], scale: f64) -> Vec<f16> {
    grads.iter().map(|&g| f16::from_f64(g * scale)).collect()
}

/// One training step: backward in f16 at the scaler's scale, unscale `b0`, `w1`, `w2` in that
/// order, update. Returns the report and the unscaled `w1`.
fn step(scaler: &mut LossScaler, w1_true: &[f64]) -> (StepReport, Vec<f16>) {
    let scale = scaler.scale();
    let mut b0 = backward_f16(&[0.5, -0.25], scale);
    let mut w1 = backward_f16(w1_true, scale);
    let mut w2 = backward_f16(&[0.75, 1.25, -1.0, 0.0, 0.125, 0.5], scale);
    let mut unscale = scaler.unscaler();
    unscale.apply("b0", &mut b0, 2).unwrap();
    unscale.apply("w1", &mut w1, 2).unwrap();
    unscale.apply("w2", &mut w2, 3).unwrap();
    (unscale.finish(), w1)
}

fn small_interval(interval: u32) -> LossScaler {
    LossScaler::new(LossScalerConfig {
        growth_interval: interval,
        ..LossScalerConfig::default()
    })
    .unwrap()
}

#[test]
fn an_overflowing_f16_gradient_skips_exactly_that_step_backs_off_then_grows_again() {
    let mut scaler = small_interval(3);
    assert_eq!(scaler.scale(), 65536.0);
    assert_eq!(scaler.scale_loss(0.75), 49152.0);

    // The true gradient 1.5 at (1, 0) times 2^16 is 98304: past f16's 65504, so backward gives inf.
    let w1_true = [0.25, -0.5, 1.5, 0.125];
    let mut reports = Vec::new();
    let mut optimizer_steps = Vec::new();
    for _ in 0..5 {
        let (report, w1) = step(&mut scaler, &w1_true);
        if !report.skipped {
            // The optimizer sees the true gradients, exactly (powers of two times f16 values).
            let got: Vec<f64> = w1.iter().map(|g| g.to_f64()).collect();
            assert_eq!(got, w1_true, "step {}", report.step);
            optimizer_steps.push(report.step);
        }
        reports.push(report);
    }

    // Step 0 overflows at 2^16: skipped, backed off to 2^15.
    let r = &reports[0];
    assert!(r.skipped);
    assert_eq!((r.step, r.scale, r.next_scale), (0, 65536.0, 32768.0));
    assert_eq!(r.change, ScaleChange::BackedOff);
    let o = r.overflow.as_ref().expect("the overflow is reported");
    assert_eq!(
        o.tensor, "w1",
        "b0 comes first but is finite; w1 overflows first"
    );
    assert_eq!((o.row, o.column, o.index), (1, 0, 2));
    assert_eq!(o.value, f64::INFINITY);
    assert_eq!((o.role, o.dtype), (Role::Gradient, DType::F16));

    // Steps 1..=3 are clean at 2^15 (1.5 · 2^15 = 49152 fits); after the third clean step the
    // scale grows back to 2^16, and step 4 overflows again.
    assert_eq!(
        optimizer_steps,
        [1, 2, 3],
        "exactly the overflowing steps are skipped"
    );
    let trace: Vec<_> = reports
        .iter()
        .map(|r| (r.scale, r.next_scale, r.change, r.clean_steps))
        .collect();
    assert_eq!(
        trace,
        [
            (65536.0, 32768.0, ScaleChange::BackedOff, 0),
            (32768.0, 32768.0, ScaleChange::Unchanged, 1),
            (32768.0, 32768.0, ScaleChange::Unchanged, 2),
            (32768.0, 65536.0, ScaleChange::Grew, 0),
            (65536.0, 32768.0, ScaleChange::BackedOff, 0),
        ]
    );
    assert!(reports[4].skipped);
    assert_eq!(scaler.step_index(), 5);

    // The report reads well in a log and as JSON.
    let line = reports[0].to_string();
    for needle in [
        "step 0", "skipped", "`w1`", "f16", "inf", "row 1", "column 0", "32768",
    ] {
        assert!(line.contains(needle), "{needle:?} missing from {line:?}");
    }
    assert!(reports[3].to_string().contains("grew"), "{}", reports[3]);
    let json = serde_json::to_value(&reports[0]).unwrap();
    assert_eq!(json["skipped"], true);
    assert_eq!(json["change"], "backed_off");
    assert_eq!(json["overflow"]["tensor"], "w1");
    assert_eq!(json["overflow"]["value"], "inf");
    assert_eq!(json["next_scale"], 32768.0);
}

#[test]
fn the_report_names_the_first_overflowing_tensor_in_unscale_order() {
    let mut scaler = LossScaler::default();
    let mut emb = vec![bf16::from_f32(1.0); 8];
    emb[5] = bf16::NAN; // a NaN gradient, e.g. from 0 · inf in the backward pass
    let mut head = vec![f16::from_f32(1.0); 6];
    head[0] = f16::INFINITY;
    let mut unscale = scaler.unscaler();
    unscale.apply("head", &mut head, 3).unwrap();
    unscale.apply("emb", &mut emb, 4).unwrap();
    assert!(unscale.found_overflow());
    let report = unscale.finish();
    let o = report.overflow.unwrap();
    assert_eq!((o.tensor.as_str(), o.row, o.column), ("head", 0, 0));

    let mut head = vec![f16::from_f32(1.0); 6];
    let mut emb = vec![bf16::from_f32(1.0); 8];
    emb[6] = bf16::NEG_INFINITY; // -inf is an overflow for a gradient (no masks here)
    emb[7] = bf16::NAN;
    let mut unscale = scaler.unscaler();
    unscale.apply("head", &mut head, 3).unwrap();
    unscale.apply("emb", &mut emb, 4).unwrap();
    let o = unscale.finish().overflow.unwrap();
    assert_eq!(
        (o.tensor.as_str(), o.dtype, o.row, o.column, o.value),
        ("emb", DType::BF16, 1, 2, f64::NEG_INFINITY)
    );
}

#[test]
fn gradients_of_a_skipped_step_are_fully_unscaled_and_the_overflow_stays() {
    let mut scaler = LossScaler::default();
    let mut g = backward_f16(&[0.5, 2.0, -0.25, 0.0], 65536.0); // 2 · 2^16 = inf
    let mut unscale = scaler.unscaler();
    unscale.apply("g", &mut g, 4).unwrap();
    assert!(unscale.finish().skipped);
    let got: Vec<f64> = g.iter().map(|x| x.to_f64()).collect();
    assert_eq!(got, [0.5, f64::INFINITY, -0.25, 0.0]);
}

#[test]
fn min_and_max_bounds_hold() {
    let mut scaler = LossScaler::new(LossScalerConfig {
        init_scale: 4.0,
        min_scale: 2.0,
        max_scale: 8.0,
        growth_interval: 1,
        ..LossScalerConfig::default()
    })
    .unwrap();
    let bad = inf_gradient();
    let mut trace = Vec::new();
    for overflow in [true, true, true, false, false, false, false] {
        let r = scaler.update(if overflow { bad.clone() } else { None });
        assert_eq!(r.skipped, overflow);
        assert!((2.0..=8.0).contains(&r.next_scale));
        trace.push((r.next_scale, r.change, r.clamped));
    }
    assert_eq!(
        trace,
        [
            (2.0, ScaleChange::BackedOff, None),
            (2.0, ScaleChange::Unchanged, Some(ScaleBound::Min)),
            (2.0, ScaleChange::Unchanged, Some(ScaleBound::Min)),
            (4.0, ScaleChange::Grew, None),
            (8.0, ScaleChange::Grew, None),
            (8.0, ScaleChange::Unchanged, Some(ScaleBound::Max)),
            (8.0, ScaleChange::Unchanged, Some(ScaleBound::Max)),
        ]
    );

    // A backoff or growth that would overshoot a bound stops at it, and says so.
    let mut scaler = LossScaler::new(LossScalerConfig {
        init_scale: 3.0,
        min_scale: 2.0,
        max_scale: 5.0,
        growth_interval: 1,
        ..LossScalerConfig::default()
    })
    .unwrap();
    let r = scaler.update(bad.clone());
    assert_eq!(
        (r.next_scale, r.change, r.clamped),
        (2.0, ScaleChange::BackedOff, Some(ScaleBound::Min))
    );
    scaler.update(None);
    let r = scaler.update(None);
    assert_eq!(
        (r.scale, r.next_scale, r.change, r.clamped),
        (4.0, 5.0, ScaleChange::Grew, Some(ScaleBound::Max))
    );
    assert!(r.to_string().contains("max_scale"), "{r}");
}

#[test]
fn hysteresis_two_backs_off_only_on_the_second_consecutive_overflow() {
    let mut scaler = LossScaler::new(LossScalerConfig {
        hysteresis: 2,
        growth_interval: 3,
        ..LossScalerConfig::default()
    })
    .unwrap();
    let w_overflows = [4.0, 0.5]; // 4 · 2^16 (and 4 · 2^15, 4 · 2^14) overflow f16
    let w_clean = [0.25, 0.5];
    let mut run = |w: &[f64]| {
        let mut g = backward_f16(w, scaler.scale());
        let mut unscale = scaler.unscaler();
        unscale.apply("w", &mut g, 2).unwrap();
        let r = unscale.finish();
        (r.skipped, r.next_scale, r.change, r.overflow_streak)
    };
    // An isolated overflow: skipped, but the scale holds.
    assert_eq!(
        run(&w_overflows),
        (true, 65536.0, ScaleChange::Unchanged, 1)
    );
    // A clean step resets the streak; the next lone overflow again does not back off.
    assert_eq!(run(&w_clean), (false, 65536.0, ScaleChange::Unchanged, 0));
    assert_eq!(
        run(&w_overflows),
        (true, 65536.0, ScaleChange::Unchanged, 1)
    );
    // The second overflow in a row backs off; a third in a row backs off again.
    assert_eq!(
        run(&w_overflows),
        (true, 32768.0, ScaleChange::BackedOff, 2)
    );
    assert_eq!(
        run(&w_overflows),
        (true, 16384.0, ScaleChange::BackedOff, 3)
    );
    // Overflows also restart the clean-step count: growth needs 3 clean steps from here.
    assert_eq!(run(&w_clean), (false, 16384.0, ScaleChange::Unchanged, 0));
    assert_eq!(run(&w_clean), (false, 16384.0, ScaleChange::Unchanged, 0));
    assert_eq!(run(&w_clean), (false, 32768.0, ScaleChange::Grew, 0));
}

/// What other code reports when it finds an inf gradient itself.
fn inf_gradient() -> Option<NonFiniteValue> {
    Some(NonFiniteValue {
        tensor: "g".into(),
        role: Role::Gradient,
        dtype: DType::F16,
        index: 0,
        row: 0,
        column: 0,
        value: f64::INFINITY,
    })
}

#[test]
fn the_clean_step_count_restarts_after_an_overflow() {
    let mut scaler = small_interval(3);
    scaler.update(None);
    scaler.update(None);
    assert_eq!(scaler.clean_steps(), 2);
    assert_eq!(scaler.update(inf_gradient()).next_scale, 32768.0);
    assert_eq!(scaler.clean_steps(), 0);
    assert_eq!(scaler.update(None).change, ScaleChange::Unchanged);
    assert_eq!(scaler.update(None).change, ScaleChange::Unchanged);
    assert_eq!(scaler.update(None).change, ScaleChange::Grew);
}

/// Unscales `values` by `scale` and checks each result against `(g · (1/scale))` in f64, rounded
/// once into `E`.
fn check_rounded_once<E: Element>(values: &[E], scale: f64) -> usize {
    let mut scaler = LossScaler::new(LossScalerConfig {
        init_scale: scale,
        ..LossScalerConfig::default()
    })
    .unwrap();
    let mut grad = values.to_vec();
    let mut unscale = scaler.unscaler();
    assert_eq!(unscale.inv_scale(), 1.0 / scale);
    unscale.apply("g", &mut grad, values.len()).unwrap();
    assert!(!unscale.finish().skipped);
    let inv = 1.0 / scale;
    let mut differs_from_f32_math = 0;
    for (i, (&g, &got)) in values.iter().zip(&grad).enumerate() {
        let want = E::from_f64(g.to_f64() * inv);
        assert_eq!(
            got.to_f64().to_bits(),
            want.to_f64().to_bits(),
            "{:?} element {i}: {g} / {scale} gave {got}, expected {want}",
            E::DTYPE
        );
        // The value a loop doing the product in f32 and then narrowing would produce.
        let via_f32 = E::from_f64(f64::from(g.to_f64() as f32 * inv as f32));
        differs_from_f32_math += usize::from(via_f32 != want);
    }
    differs_from_f32_math
}

/// Deterministic gradients spanning many binades (some become subnormal after unscaling).
fn gradients<E: Element>(n: usize, max_exp: i32) -> Vec<E> {
    let mut rng = Rng::new(0x9E37_79B9_7F4A_7C15);
    (0..n)
        .map(|_| {
            let state = rng.next_u64();
            let mantissa = 1.0 + (state >> 11) as f64 / (1u64 << 53) as f64;
            let exp = (state % (2 * max_exp as u64 + 1)) as i32 - max_exp;
            let sign = if state & 1 == 0 { 1.0 } else { -1.0 };
            E::from_f64(sign * mantissa * 2f64.powi(exp))
        })
        .collect()
}

#[test]
fn unscaled_values_are_g_times_inverse_scale_rounded_once_in_every_dtype() {
    for scale in [65536.0, 1000.0, 3.0, 12345.678] {
        check_rounded_once::<f32>(&gradients(4000, 60), scale);
        check_rounded_once::<f16>(&gradients(4000, 15), scale);
        check_rounded_once::<bf16>(&gradients(4000, 60), scale);
        check_rounded_once::<f64>(&gradients(4000, 200), scale);
    }
    // With a scale that is not a power of two, rounding the product in f32 first is visibly worse
    // for f32 gradients: the one-rounding path is not what a naive f32 loop computes.
    assert!(check_rounded_once::<f32>(&gradients(4000, 60), 1000.0) > 0);
}

#[test]
fn shape_errors_leave_the_gradient_untouched() {
    let mut scaler = LossScaler::default();
    let mut g = vec![f16::from_f32(2.0); 6];
    let mut unscale = scaler.unscaler();
    let err = unscale.apply("w", &mut g, 4).unwrap_err();
    assert!(err.to_string().contains("`w`"), "{err}");
    assert!(unscale.apply("w", &mut g, 0).is_err());
    assert!(g.iter().all(|&x| x == f16::from_f32(2.0)));
    let _ = unscale.finish();
}

#[test]
fn invalid_configurations_are_typed_errors() {
    let d = LossScalerConfig::default;
    let cases: Vec<(LossScalerConfig, &str)> = vec![
        (
            LossScalerConfig {
                init_scale: f64::NAN,
                ..d()
            },
            "init_scale",
        ),
        (
            LossScalerConfig {
                init_scale: 0.0,
                ..d()
            },
            "init_scale",
        ),
        (
            LossScalerConfig {
                min_scale: -1.0,
                ..d()
            },
            "min_scale",
        ),
        (
            LossScalerConfig {
                max_scale: f64::INFINITY,
                ..d()
            },
            "max_scale",
        ),
        (
            LossScalerConfig {
                min_scale: 1e-310,
                ..d()
            },
            "min_scale",
        ),
        (
            LossScalerConfig {
                growth_factor: 1.0,
                ..d()
            },
            "growth_factor",
        ),
        (
            LossScalerConfig {
                backoff_factor: 1.0,
                ..d()
            },
            "backoff_factor",
        ),
        (
            LossScalerConfig {
                backoff_factor: 0.0,
                ..d()
            },
            "backoff_factor",
        ),
        (
            LossScalerConfig {
                growth_interval: 0,
                ..d()
            },
            "growth_interval",
        ),
        (
            LossScalerConfig {
                hysteresis: 0,
                ..d()
            },
            "hysteresis",
        ),
        (
            LossScalerConfig {
                min_scale: 4.0,
                max_scale: 2.0,
                init_scale: 3.0,
                ..d()
            },
            "min_scale",
        ),
        (
            LossScalerConfig {
                init_scale: 1e9,
                ..d()
            },
            "init_scale",
        ),
    ];
    for (config, field) in cases {
        let err = LossScaler::new(config.clone()).unwrap_err();
        assert!(
            err.to_string().contains(field),
            "{config:?}: {err} should name {field}"
        );
    }
    assert!(matches!(
        LossScalerConfig {
            min_scale: 4.0,
            max_scale: 2.0,
            ..d()
        }
        .validate(),
        Err(ScalerConfigError::MinAboveMax { .. })
    ));
    assert_eq!(LossScalerConfig::default().validate(), Ok(()));
}

/// The fused cross-entropy and the scaler work together: with the loss scale as the incoming
/// gradient, an f16 logits gradient that the scale pushes past 65504 comes out ±inf (not
/// clipped to 65504), so the scaler skips that step and backs off; at the lower scale the same
/// batch passes.
#[test]
fn fused_cross_entropy_overflow_under_a_loss_scale_is_seen_by_the_scaler() {
    use lse::{cross_entropy_with_grad, CrossEntropyOptions, GradOutput, Reduction, Targets};
    // Row 0 is confidently wrong: its gradient is about -1 at the target and +1 at the argmax.
    let logits: Vec<f16> = [9.0, -9.0, 0.0, 1.0, 2.0, 3.0]
        .iter()
        .map(|&v| f16::from_f32(v))
        .collect();
    let targets = [1i64, 2];
    let options = CrossEntropyOptions {
        reduction: Reduction::Sum,
        ..Default::default()
    };
    let mut scaler = LossScaler::new(LossScalerConfig {
        init_scale: 65536.0,
        ..Default::default()
    })
    .unwrap();
    let mut reports = Vec::new();
    for _ in 0..2 {
        let mut grad = vec![f16::ZERO; logits.len()];
        let scale = GradOutput::Scalar(scaler.scale() as f32);
        cross_entropy_with_grad(
            &logits,
            3,
            Targets::Classes(&targets),
            &options,
            scale,
            &mut grad,
        )
        .unwrap();
        let mut unscale = scaler.unscaler();
        unscale.apply("logits.grad", &mut grad, 3).unwrap();
        reports.push(unscale.finish());
    }
    // |p_0 − q_0| ≈ 1, and 65536 is past f16's largest value 65504.
    assert!(
        reports[0].skipped,
        "65536 · (p − q) overflows f16: {}",
        reports[0]
    );
    assert_eq!(reports[0].next_scale, 32768.0);
    let overflow = reports[0].overflow.as_ref().expect("the overflow is named");
    assert_eq!((overflow.row, overflow.column), (0, 0));
    assert!(!reports[1].skipped, "32768 · (p − q) fits: {}", reports[1]);
}
