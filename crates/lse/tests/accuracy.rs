//! Accuracy against an arbitrary-precision oracle (docs/numerics.md).
//!
//! Every op runs through the public API on deterministic rows (normal logits with spreads 1e-3 …
//! 1e30, ties at the max, one class far above the rest, gaps at the f32 and f64 exp underflow
//! thresholds, -inf masks, negative maxima; C from 1 to 262144) in f64, f32, f16 and bf16, and
//! each output is compared with a 192-bit astro-float oracle (`lse_testkit::oracle`) in ulps of the
//! output dtype. The whole measurement runs once (`report()`) and each test asserts its op's
//! targets; a failure names the dtype, op, distribution, the exact generator call and row, the
//! expected and computed values and the error, so the library can be fixed from the message.
//!
//! `cargo run --release -p lse --example accuracy_table` prints the same measurement as a table.
//! This binary measures the kernel dispatched on this CPU; `accuracy_scalar.rs` runs the same
//! tests on the scalar reference kernel.

// The kernel family measured here: whatever this CPU dispatches to.
lse_testkit::accuracy_tests!(lse::Kernel::Auto);

use oracle::{exp_neg, exp_reference};

#[test]
fn oracle_fast_exp_agrees_with_astro_float_exp() {
    // The oracle's table + Taylor exp(−d) against astro-float's own exp, at reduction-step
    // boundaries (multiples of ln 2 and of 1/4096), the f32/f64 underflow thresholds and beyond.
    let ln2 = std::f64::consts::LN_2;
    let mut ds = vec![
        1e-300,
        1e-20,
        2f64.powi(-13),
        0.5,
        ln2,
        ln2 * (1.0 - 1e-16),
        ln2 * (1.0 + 1e-16),
        1.0,
        30.0,
        87.33654,
        103.97208,
        708.3964,
        745.1332,
        1e4,
        123_456.789,
        9.9e5,
    ];
    for k in [1.0, 2.0, 57.0, 1000.0] {
        ds.push(k * ln2);
        ds.push(k * ln2 + 0.5 / 4096.0);
        ds.push(k * ln2 - 0.5 / 4096.0);
    }
    let mut rng = lse_testkit::rng::Rng::new(7);
    ds.extend((0..200).map(|_| 10f64.powf(rng.range(-5.0, 5.0))));
    for d in ds {
        let fast = exp_neg(&big(d));
        let slow = exp_reference(&big(-d));
        let rel = to_f64(&oracle::div(&oracle::sub(&fast, &slow), &slow)).abs();
        assert!(
            rel < 2f64.powi(-170),
            "exp(-{d:e}): relative difference {rel:e}"
        );
    }
    assert!(exp_neg(&big(2e6)).is_zero(), "beyond e^-1e6 terms are 0");
}

#[test]
fn oracle_reproduces_known_values() {
    let ln2 = std::f64::consts::LN_2;
    let close = |b: &astro_float::BigFloat, want: f64| {
        let got = to_f64(b);
        assert!(
            (got - want).abs() <= 1e-15 * want.abs(),
            "got {got:e}, want {want:e}"
        );
    };
    let row = ExactRow::new(&[0.0, 0.0]);
    close(&row.logsumexp(), ln2);
    close(&row.log_softmax(1), -ln2);
    close(&row.softmax(0), 0.5);

    // lse([1e30, 0]) must not overflow the oracle: it is 1e30 exactly to within e^-1e30.
    let row = ExactRow::new(&[1e30, 0.0, f64::NEG_INFINITY]);
    close(&row.logsumexp(), 1e30);
    close(&row.log_softmax(1), -1e30);
    assert!(row.log_softmax(2).is_inf_neg());
    assert!(row.softmax(2).is_zero());

    let row = ExactRow::new(&[30.0, 0.0]);
    let ce = row.ce(&CeSpec {
        target: Some(0),
        ..CeSpec::default()
    });
    close(&ce.loss, TINY_LOSS_30);
    let p1 = (-30f64).exp() / (1.0 + (-30f64).exp());
    close(&ce.grad[0], -p1);
    close(&ce.grad[1], p1);

    // Smoothing, weights and z-loss against the definition evaluated in f64 (well conditioned),
    // with a class target and with probability targets (mass on every class).
    let x = [1.5, -0.25, 0.75];
    let w = [0.5, 2.0, 1.25];
    let (eps, z, y) = (0.1, 1e-2, 1);
    let lse = x.iter().map(|v: &f64| v.exp()).sum::<f64>().ln();
    let one_hot = [0.0, 1.0, 0.0];
    let soft = [0.25, 0.125, 0.625];
    let specs = [(one_hot, Some(y), None), (soft, None, Some(&soft[..]))];
    for (targets, target, probabilities) in specs {
        let a: Vec<f64> = (0..3)
            .map(|c| w[c] * ((1.0 - eps) * targets[c] + eps / 3.0))
            .collect();
        let total: f64 = a.iter().sum();
        let loss = (0..3).map(|c| a[c] * (lse - x[c])).sum::<f64>() + z * lse * lse;
        let ce = ExactRow::new(&x).ce(&CeSpec {
            target,
            probabilities,
            label_smoothing: eps,
            weights: Some(&w),
            z_loss: z,
        });
        close(&ce.loss, loss);
        for i in 0..3 {
            let p = (x[i] - lse).exp();
            let g = (total + 2.0 * z * lse) * p - a[i];
            assert!(
                (to_f64(&ce.grad[i]) - g).abs() < 1e-14,
                "grad {i} {targets:?}"
            );
        }
    }

    // Soft-capping: mapped logits and slopes against f64 tanh/cosh.
    let cap = 5.0f64;
    let x = [3.0f64, -7.0, 12.0];
    let mapped: Vec<f64> = x.iter().map(|v| cap * (v / cap).tanh()).collect();
    let lse = mapped.iter().map(|v| v.exp()).sum::<f64>().ln();
    let ce = ExactRow::with_softcap(&x, cap).ce(&CeSpec {
        target: Some(0),
        ..CeSpec::default()
    });
    close(&ce.loss, lse - mapped[0]);
    for i in 0..3 {
        let p = (mapped[i] - lse).exp();
        let g = (p - f64::from(u8::from(i == 0))) / (x[i] / cap).cosh().powi(2);
        assert!((to_f64(&ce.grad[i]) - g).abs() < 1e-15, "capped grad {i}");
    }
}

#[test]
fn oracle_ulp_helpers_follow_design_rules() {
    use oracle::{normwise_error, ulp};
    for dtype in DType::ALL {
        assert_eq!(
            2f64.powi(oracle::min_normal_exponent(dtype) as i32),
            dtype.min_positive_normal()
        );
        assert_eq!(
            2f64.powi(-oracle::precision_bits(dtype) as i32),
            dtype.unit_roundoff()
        );
    }
    assert_eq!(ulp(&big(1.0), DType::F32), 2f64.powi(-23));
    assert_eq!(ulp(&big(1.99), DType::F32), 2f64.powi(-23));
    assert_eq!(ulp(&big(0.75), DType::F32), 2f64.powi(-24));
    assert_eq!(ulp(&big(1.0), DType::F64), f64::EPSILON);
    assert_eq!(ulp(&big(1.0), DType::BF16), 2f64.powi(-7));
    // Subnormal spacing below the smallest normal, zero included.
    assert_eq!(ulp(&big(1e-40), DType::F32), 2f64.powi(-149));
    assert_eq!(ulp(&big(0.0), DType::F16), 2f64.powi(-24));
    assert_eq!(ulp(&big(f64::MAX), DType::F64), 2f64.powi(971));

    let one_up = 1.0 + 2f64.powi(-23);
    assert_eq!(ulp_error(one_up, &big(1.0), DType::F32), 1.0);
    assert_eq!(ulp_error(1.0, &big(one_up), DType::F32), 1.0);
    assert_eq!(ulp_error(1.5, &big(1.0), DType::F16), 512.0);
    // docs/numerics.md: an absolute error below the smallest normal passes (flushed exp terms).
    assert_eq!(ulp_error(0.0, &big(1e-39), DType::F32), 0.0);
    assert!(ulp_error(0.0, &big(1e-37), DType::F32) > 1e6);
    // Saturation: a finite exact value beyond the range is expected as ±MAX.
    assert_eq!(
        ulp_error(-f64::from(f32::MAX), &big(-1e39), DType::F32),
        0.0
    );
    assert_eq!(
        ulp_error(f64::NEG_INFINITY, &big(f64::NEG_INFINITY), DType::F32),
        0.0
    );
    assert!(ulp_error(f64::NEG_INFINITY, &big(-1.0), DType::F32).is_infinite());
    assert!(ulp_error(f64::NAN, &big(1.0), DType::F32).is_infinite());

    // Normwise: the error of the small entry is measured against the largest entry.
    let exact = [big(0.5), big(-(2f64.powi(-30)))];
    let got = [0.5, 2f64.powi(-24) - 2f64.powi(-30)];
    let (err, at) = normwise_error(&got, &exact, DType::F32);
    assert_eq!((err, at), (1.0, 1));
}

/// The generators are deterministic and what the failure messages say they are.
#[test]
fn generators_are_deterministic() {
    use measure::{block_data, block_seed, Dist};
    for dist in Dist::ALL {
        let seed = block_seed(DType::F32, dist, 17);
        let (a, ta) = block_data::<f32>(dist, 17, 16, seed);
        let (b, tb) = block_data::<f32>(dist, 17, 16, seed);
        assert_eq!(a, b);
        assert_eq!(ta, tb);
        for (r, t) in ta.iter().enumerate() {
            if let Some(t) = t {
                assert!(
                    a[r * 17 + t] > f32::NEG_INFINITY,
                    "{dist:?}: target on a mask"
                );
            }
        }
    }
    // Saturating conversion: σ = 1e30 in f16 lands on ±65504, never ±inf.
    let (h, _) = block_data::<f16>(Dist::Normal(30), 17, 4, 1);
    assert!(h.iter().all(|v| v.is_finite()));
}
