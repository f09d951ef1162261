//! lse-burn against independent references: burn's own `CrossEntropyLoss`, softmax and
//! autodiff on moderate logits, central differences of the loss, an `f64` reference written
//! here; burn's own loss failing where lse-burn does not; typed errors. On every backend this
//! build has: burn-flex, burn-ndarray, and wgpu when `LSE_BURN_WGPU=1` (CI's llvmpipe).

use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::{activation, DType, Device, Int, Tensor, TensorData};
use lse_burn::{
    cross_entropy, linear_cross_entropy, log_softmax, logsumexp, softmax, CrossEntropyOptions,
    Error, LinearCrossEntropyOptions, NonFinite, Reduction,
};

/// The backends under test, each with autodiff.
#[allow(deprecated)] // burn 0.22 deprecates burn-ndarray; lse-burn still serves it
fn devices() -> Vec<(&'static str, Device)> {
    let mut devices = vec![
        ("flex", Device::flex().autodiff()),
        ("ndarray", Device::ndarray().autodiff()),
    ];
    if std::env::var("LSE_BURN_WGPU").as_deref() == Ok("1") {
        #[cfg(feature = "wgpu")]
        devices.push((
            "wgpu",
            Device::wgpu(burn::tensor::DeviceKind::DefaultDevice).autodiff(),
        ));
        #[cfg(not(feature = "wgpu"))]
        panic!("LSE_BURN_WGPU=1 needs the `wgpu` feature");
    }
    devices
}

/// A small deterministic generator (splitmix64), values in `[-scale, scale)`.
fn values(seed: u64, n: usize, scale: f64) -> Vec<f64> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn tensor2(values: &[f64], rows: usize, cols: usize, device: &Device) -> Tensor<2> {
    let data = TensorData::new(
        values.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        [rows, cols],
    );
    Tensor::from_data(data, device)
}

fn ints(values: &[i64], device: &Device) -> Tensor<1, Int> {
    Tensor::from_data(TensorData::new(values.to_vec(), [values.len()]), device)
}

fn f64s<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.into_data().iter::<f64>().collect()
}

fn assert_close(what: &str, got: &[f64], want: &[f64], rel: f64, abs: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let bound = abs + rel * w.abs();
        assert!(
            (g - w).abs() <= bound,
            "{what}[{i}]: {g} vs {w} (bound {bound})"
        );
    }
}

/// Cross-entropy and its gradient against burn's own loss + autodiff, with weights, label
/// smoothing and padding, on every backend.
#[test]
fn cross_entropy_matches_burns_loss_and_autodiff() {
    let (rows, classes) = (12, 7);
    let x = values(1, rows * classes, 4.0);
    let targets: Vec<i64> = (0..rows as i64).map(|r| (r * 3) % classes as i64).collect();
    let weights: Vec<f64> = (0..classes).map(|c| 0.5 + c as f64 * 0.25).collect();
    for (name, device) in devices() {
        for (smoothing, weighted) in [(0.0, false), (0.1, false), (0.0, true), (0.2, true)] {
            let burn_config = CrossEntropyLossConfig::new()
                .with_smoothing((smoothing > 0.0).then_some(smoothing as f32))
                .with_weights(weighted.then(|| weights.iter().map(|&w| w as f32).collect()));
            let reference_logits = tensor2(&x, rows, classes, &device).require_grad();
            let reference = burn_config
                .init(&device)
                .forward(reference_logits.clone(), ints(&targets, &device));
            let reference_grad = reference_logits.grad(&reference.backward()).unwrap();

            let options = CrossEntropyOptions {
                label_smoothing: smoothing,
                weights: weighted.then(|| weights.clone()),
                ..Default::default()
            };
            let logits = tensor2(&x, rows, classes, &device).require_grad();
            let loss = cross_entropy(logits.clone(), ints(&targets, &device), &options).unwrap();
            let grad = logits.grad(&loss.backward()).unwrap();
            let what = format!("{name} ε={smoothing} weighted={weighted}");
            assert_close(
                &format!("{what} loss"),
                &f64s(loss),
                &f64s(reference),
                1e-5,
                1e-6,
            );
            assert_close(
                &format!("{what} grad"),
                &f64s(grad),
                &f64s(reference_grad),
                1e-4,
                1e-6,
            );
        }
    }
}

/// The loss's own rate of change: the gradient against central differences in `f64`, with
/// every option on (z-loss and the soft-cap have no counterpart in burn).
#[test]
fn cross_entropy_gradient_matches_central_differences() {
    let (rows, classes) = (5, 6);
    let x = values(2, rows * classes, 3.0);
    let targets = [0i64, 5, -100, 2, 3];
    let options = CrossEntropyOptions {
        label_smoothing: 0.1,
        z_loss: 1e-2,
        softcap: Some(4.0),
        weights: Some(vec![1.0, 0.5, 2.0, 1.5, 1.0, 0.25]),
        reduction: Reduction::Sum,
        ..Default::default()
    };
    let device = Device::flex().autodiff();
    let as_f64 = |v: &[f64]| {
        Tensor::<2>::from_data(
            TensorData::new(v.to_vec(), [rows, classes]),
            (&device, DType::F64),
        )
    };
    let loss_at = |v: &[f64]| {
        let loss = cross_entropy(as_f64(v), ints(&targets, &device), &options).unwrap();
        f64s(loss)[0]
    };
    let logits = as_f64(&x).require_grad();
    let loss = cross_entropy(logits.clone(), ints(&targets, &device), &options).unwrap();
    let grad = f64s(logits.grad(&loss.backward()).unwrap());
    let h = 1e-6;
    let numeric: Vec<f64> = (0..x.len())
        .map(|i| {
            let (mut up, mut down) = (x.clone(), x.clone());
            up[i] += h;
            down[i] -= h;
            (loss_at(&up) - loss_at(&down)) / (2.0 * h)
        })
        .collect();
    assert_close("central differences", &grad, &numeric, 1e-6, 1e-8);
    // The ignored row's gradient is exactly 0.
    assert!(grad[2 * classes..3 * classes].iter().all(|&g| g == 0.0));
}

/// Logits of ±4·10⁴ in `f16` (which holds them): burn's own loss is formed in `f16`, where
/// the row loss 8·10⁴ is past its largest value 65504, and reports `inf`; lse-burn's loss is
/// finite `f32` and its gradient finite.
#[test]
fn extreme_f16_logits_break_burns_loss_not_this_one() {
    let (rows, classes) = (8, 4);
    let device = Device::flex().autodiff();
    let x: Vec<f64> = (0..rows * classes)
        .map(|i| {
            if i % classes == 0 {
                40_000.0
            } else {
                -40_000.0
            }
        })
        .collect();
    // Every target is a class the row scores at -4·10⁴: a loss of 8·10⁴ per row.
    let targets: Vec<i64> = vec![1; rows];
    let half = || tensor2(&x, rows, classes, &device).cast(DType::F16);

    let burn_logits = half().require_grad();
    let burn_loss = CrossEntropyLossConfig::new()
        .init(&device)
        .forward(burn_logits.clone(), ints(&targets, &device));
    let burn_value = f64s(burn_loss.clone())[0];
    assert!(
        !burn_value.is_finite(),
        "burn's f16 loss was finite: {burn_value}"
    );

    let logits = half().require_grad();
    let loss = cross_entropy(logits.clone(), ints(&targets, &device), &Default::default()).unwrap();
    assert_eq!(loss.dtype(), DType::F32);
    assert_close("f16 loss", &f64s(loss.clone()), &[80_000.0], 1e-6, 0.0);
    let grad = f64s(logits.grad(&loss.backward()).unwrap());
    assert!(grad.iter().all(|g| g.is_finite()));
    // p − q / rows: -1/8 at the target, +1/8 at the class holding all the mass.
    assert_close(
        "f16 grad row 0",
        &grad[..classes],
        &[0.125, -0.125, 0.0, 0.0],
        1e-3,
        1e-6,
    );
}

/// Every dtype each backend stores, with spreads far past exp's range: the loss and gradient
/// against a reference written here in `f64` from the rounded inputs.
#[test]
fn every_dtype_survives_extreme_logits() {
    let (rows, classes) = (6, 5);
    let x = values(3, rows * classes, 1.0e4);
    let targets: Vec<i64> = (0..rows as i64).map(|r| r % classes as i64).collect();
    for (name, device) in devices() {
        for dtype in [DType::F64, DType::F32, DType::F16, DType::BF16] {
            if !device.supports_dtype(dtype) {
                eprintln!("{name}: no {dtype:?}");
                continue;
            }
            let data = TensorData::new(x.clone(), [rows, classes]);
            let logits = Tensor::<2>::from_data(data, (&device, dtype)).require_grad();
            let rounded = f64s(logits.clone());
            let loss = cross_entropy(logits.clone(), ints(&targets, &device), &Default::default())
                .unwrap();
            let grad = f64s(logits.grad(&loss.backward()).unwrap());
            let mut want_loss = 0.0;
            let mut want_grad = vec![0.0; rows * classes];
            for r in 0..rows {
                let row = &rounded[r * classes..(r + 1) * classes];
                let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
                want_loss += (lse - row[targets[r] as usize]) / rows as f64;
                for c in 0..classes {
                    let q = if c as i64 == targets[r] { 1.0 } else { 0.0 };
                    want_grad[r * classes + c] = ((row[c] - lse).exp() - q) / rows as f64;
                }
            }
            let tol = match dtype {
                DType::F64 => 1e-12,
                DType::F32 => 1e-6,
                _ => 1e-2, // the gradient is rounded once into f16/bf16
            };
            let what = format!("{name} {dtype:?}");
            assert_close(
                &format!("{what} loss"),
                &f64s(loss),
                &[want_loss],
                1e-6,
                0.0,
            );
            assert_close(&format!("{what} grad"), &grad, &want_grad, tol, 1e-7);
        }
    }
}

/// softmax, log_softmax and logsumexp over an inner dimension, forward and backward, against
/// burn's own activations and their autodiff.
#[test]
fn softmax_family_matches_burn_and_its_autodiff() {
    let x = values(4, 2 * 5 * 3, 5.0);
    for (name, device) in devices() {
        let input = || {
            Tensor::<3>::from_data(
                TensorData::new(x.iter().map(|&v| v as f32).collect::<Vec<_>>(), [2, 5, 3]),
                &device,
            )
            .require_grad()
        };
        let weights = Tensor::<3>::from_data(
            TensorData::new(
                values(5, 30, 1.0)
                    .iter()
                    .map(|&v| v as f32)
                    .collect::<Vec<_>>(),
                [2, 5, 3],
            ),
            &device,
        );
        for log in [false, true] {
            let (ours_in, theirs_in) = (input(), input());
            let ours = if log {
                log_softmax(ours_in.clone(), 1, NonFinite::Error).unwrap()
            } else {
                softmax(ours_in.clone(), 1, NonFinite::Error).unwrap()
            };
            let theirs = if log {
                activation::log_softmax(theirs_in.clone(), 1)
            } else {
                activation::softmax(theirs_in.clone(), 1)
            };
            let what = format!("{name} log={log}");
            assert_close(
                &what,
                &f64s(ours.clone()),
                &f64s(theirs.clone()),
                1e-5,
                1e-7,
            );
            let g_ours = ours_in
                .grad(&(ours * weights.clone()).sum().backward())
                .unwrap();
            let g_theirs = theirs_in
                .grad(&(theirs * weights.clone()).sum().backward())
                .unwrap();
            assert_close(
                &format!("{what} grad"),
                &f64s(g_ours),
                &f64s(g_theirs),
                1e-4,
                1e-6,
            );
        }
        let (ours_in, theirs_in) = (input(), input());
        let ours = logsumexp(ours_in.clone(), 1, NonFinite::Error).unwrap();
        assert_eq!(ours.dims(), [2, 1, 3]);
        let max = theirs_in.clone().max_dim(1);
        let theirs = (theirs_in.clone() - max.clone()).exp().sum_dim(1).log() + max;
        assert_close(
            &format!("{name} lse"),
            &f64s(ours.clone()),
            &f64s(theirs.clone()),
            1e-6,
            1e-6,
        );
        let g_ours = ours_in.grad(&ours.sum().backward()).unwrap();
        let g_theirs = theirs_in.grad(&theirs.sum().backward()).unwrap();
        assert_close(
            &format!("{name} lse grad"),
            &f64s(g_ours),
            &f64s(g_theirs),
            1e-4,
            1e-6,
        );
    }
}

/// The linear loss and its three gradients against the same loss on the logits formed by
/// burn's own matmul and recorded by burn's autodiff; per-row losses with per-row incoming
/// gradients too.
#[test]
fn linear_cross_entropy_matches_burns_matmul_and_autodiff() {
    let (rows, dim, classes) = (9, 4, 11);
    let h = values(6, rows * dim, 1.0);
    let w = values(7, classes * dim, 1.0);
    let b = values(8, classes, 0.5);
    let targets: Vec<i64> = vec![0, 3, -100, 10, 5, 5, 1, 2, 9];
    for (name, device) in devices() {
        for reduction in [Reduction::Mean, Reduction::None] {
            let options = CrossEntropyOptions {
                label_smoothing: 0.05,
                reduction,
                ..Default::default()
            };
            let make = || {
                (
                    tensor2(&h, rows, dim, &device).require_grad(),
                    tensor2(&w, classes, dim, &device).require_grad(),
                    tensor2(&b, 1, classes, &device)
                        .reshape([classes])
                        .require_grad(),
                )
            };
            let row_weights = tensor2(&values(9, rows, 1.0), 1, rows, &device).reshape([rows]);
            let scalarize = |loss: Tensor<1>| match reduction {
                Reduction::None => (loss * row_weights.clone()).sum(),
                _ => loss,
            };
            let (h1, w1, b1) = make();
            let logits = h1.clone().matmul(w1.clone().transpose()) + b1.clone().unsqueeze_dim(0);
            let reference = cross_entropy(logits, ints(&targets, &device), &options).unwrap();
            let grads = scalarize(reference.clone()).backward();
            let (h2, w2, b2) = make();
            let linear_options = LinearCrossEntropyOptions {
                cross_entropy: options.clone(),
                budget_bytes: 256, // chunks of a few rows
            };
            let loss = linear_cross_entropy(
                h2.clone(),
                w2.clone(),
                Some(b2.clone()),
                ints(&targets, &device),
                &linear_options,
            )
            .unwrap();
            let ours = scalarize(loss.clone()).backward();
            let what = format!("{name} {reduction:?}");
            assert_close(
                &format!("{what} loss"),
                &f64s(loss),
                &f64s(reference),
                1e-5,
                1e-6,
            );
            for (part, ours, theirs) in [
                ("dH", h2.grad(&ours).unwrap(), h1.grad(&grads).unwrap()),
                ("dW", w2.grad(&ours).unwrap(), w1.grad(&grads).unwrap()),
            ] {
                assert_close(
                    &format!("{what} {part}"),
                    &f64s(ours),
                    &f64s(theirs),
                    1e-4,
                    1e-6,
                );
            }
            let (db_ours, db_theirs) = (b2.grad(&ours).unwrap(), b1.grad(&grads).unwrap());
            assert_close(
                &format!("{what} db"),
                &f64s(db_ours),
                &f64s(db_theirs),
                1e-4,
                1e-6,
            );
        }
    }
}

/// Bad input is a typed error naming what and where, and leaves the inputs as they were.
#[test]
fn bad_input_is_a_typed_error() {
    for (_, device) in devices() {
        bad_input_on(&device);
    }
}

fn bad_input_on(device: &Device) {
    let device = device.clone();
    let x = values(10, 3 * 4, 2.0);
    let logits = tensor2(&x, 3, 4, &device);
    let before = f64s(logits.clone());
    match cross_entropy(
        logits.clone(),
        ints(&[0, 4, 1], &device),
        &Default::default(),
    ) {
        Err(Error::Input(lse::LseError::TargetOutOfRange {
            row: 1,
            value: 4,
            classes: 4,
        })) => {}
        other => panic!("expected TargetOutOfRange at row 1, got {other:?}"),
    }
    let mut with_nan = x.clone();
    with_nan[2 * 4 + 3] = f64::NAN;
    let nan_logits = tensor2(&with_nan, 3, 4, &device);
    match cross_entropy(
        nan_logits.clone(),
        ints(&[0, 1, 2], &device),
        &Default::default(),
    ) {
        Err(Error::Input(lse::LseError::NonFinite {
            row: 2,
            column: 3,
            value,
            ..
        })) => {
            assert!(value.is_nan())
        }
        other => panic!("expected NonFinite at (2, 3), got {other:?}"),
    }
    // The same row under the NaN policy: that row's loss only.
    let options = CrossEntropyOptions {
        non_finite: NonFinite::Propagate,
        reduction: Reduction::None,
        ..Default::default()
    };
    let rows = f64s(cross_entropy(nan_logits, ints(&[0, 1, 2], &device), &options).unwrap());
    assert!(rows[0].is_finite() && rows[1].is_finite() && rows[2].is_nan());
    match softmax(tensor2(&with_nan, 3, 4, &device), 1, NonFinite::Error) {
        Err(Error::Input(lse::LseError::NonFinite {
            row: 2, column: 3, ..
        })) => {}
        other => panic!("expected NonFinite at (2, 3), got {other:?}"),
    }
    assert!(matches!(
        logsumexp(logits.clone(), 2, NonFinite::Error),
        Err(Error::BadDim {
            dim: 2,
            rank: 2,
            ..
        })
    ));
    assert!(matches!(
        cross_entropy(logits.clone(), ints(&[0, 1], &device), &Default::default()),
        Err(Error::Input(lse::LseError::LengthMismatch {
            what: "targets",
            expected: 3,
            actual: 2
        }))
    ));
    let h = tensor2(&x, 3, 4, &device).cast(DType::F64);
    let w = tensor2(&x, 3, 4, &device).cast(DType::F64);
    assert!(matches!(
        linear_cross_entropy(h, w, None, ints(&[0, 1, 2], &device), &Default::default()),
        Err(Error::Unsupported {
            dtype: DType::F64,
            ..
        })
    ));
    assert_eq!(f64s(logits), before);
}
