//! `cross_entropy_with_metrics` and `linear_cross_entropy_with_metrics`: the argmax against
//! candle's own `argmax` (the linear loss's against lse-testkit's `torch_argmax` of `f64`
//! products), the token accuracy against a count, the z-loss term against the oracle's exact
//! logsumexp, in every dtype and with the classes in the middle.

mod common;

use candle_core::{DType, Tensor};
use common::*;
use lse_candle::{
    cross_entropy, cross_entropy_with_metrics, linear_cross_entropy_with_metrics,
    CrossEntropyOptions, Reduction,
};
use lse_testkit::oracle::{logsumexp_f64, torch_argmax};

#[test]
fn metrics_match_candles_argmax_and_a_reference_z_term() {
    let (n, c, d) = (3, 40, 4);
    for dtype in DTYPES {
        // N × C × d, classes on dim 1 (PyTorch's layout).
        let x = var(&values(n * c * d, 3, 4.0), &[n, c, d], dtype);
        let predicted: Vec<i64> = x
            .argmax(1)
            .and_then(|a| a.to_dtype(DType::I64))
            .and_then(|a| a.flatten_all())
            .and_then(|a| a.to_vec1())
            .expect("argmax");
        // Every other row off target, every fifth ignored.
        let targets: Vec<i64> = predicted
            .iter()
            .enumerate()
            .map(|(i, &p)| match i {
                _ if i % 5 == 4 => -100,
                _ if i % 2 == 1 => (p + 3) % c as i64,
                _ => p,
            })
            .collect();
        let t = Tensor::from_slice(&targets, (n, d), DEV).expect("targets");
        let options = CrossEntropyOptions {
            class_dim: 1,
            z_loss: 1e-3,
            reduction: Reduction::Sum,
            ..Default::default()
        };
        let (loss, metrics) = cross_entropy_with_metrics(&x, &t, &options).expect("metrics");
        assert_eq!(metrics.argmax.dims(), [n, d]);
        let argmax: Vec<i64> = metrics.argmax.flatten_all().unwrap().to_vec1().unwrap();
        let counted: Vec<usize> = (0..n * d).filter(|&i| targets[i] != -100).collect();
        for i in 0..n * d {
            let want = if targets[i] == -100 { -1 } else { predicted[i] };
            assert_eq!(argmax[i], want, "{dtype:?} row {i}");
        }
        let correct = counted
            .iter()
            .filter(|&&i| predicted[i] == targets[i])
            .count();
        assert_eq!(metrics.correct_rows, Some(correct));
        assert_eq!(metrics.counted_rows, counted.len());
        assert_eq!(
            metrics.accuracy(),
            Some(correct as f64 / counted.len() as f64)
        );
        // The z term from each row's logits as the dtype holds them.
        let xs = f64s(&x.as_tensor().transpose(1, 2).unwrap().contiguous().unwrap());
        let z: f64 = counted
            .iter()
            .map(|&i| 1e-3 * logsumexp_f64(&xs[i * c..(i + 1) * c]).powi(2))
            .sum();
        let u = unit_roundoff(if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        });
        assert!(
            (metrics.z_loss - z).abs() <= 16.0 * u * z,
            "{dtype:?}: z term {} vs {z}",
            metrics.z_loss
        );
        // The same loss as without metrics, and its gradient still flows.
        let plain = cross_entropy(&x, &t, &options).expect("plain");
        assert_eq!(f64s(&loss), f64s(&plain));
        assert_eq!(grad(&loss, &x).dims(), [n, c, d]);
    }
}

#[test]
fn linear_metrics_match_the_argmax_of_the_products() {
    let (rows, dim, classes) = (24, 16, 300);
    let h = var(&values(rows * dim, 4, 1.0), &[rows, dim], DType::F32);
    let w = var(&values(classes * dim, 5, 1.0), &[classes, dim], DType::F32);
    let (hs, ws) = (f64s(&h), f64s(&w));
    let logits: Vec<Vec<f64>> = (0..rows)
        .map(|r| {
            (0..classes)
                .map(|k| (0..dim).map(|j| hs[r * dim + j] * ws[k * dim + j]).sum())
                .collect()
        })
        .collect();
    let predicted: Vec<i64> = logits.iter().map(|r| torch_argmax(r) as i64).collect();
    let targets: Vec<i64> = (0..rows)
        .map(|r| if r % 6 == 5 { -100 } else { predicted[r] })
        .collect();
    let t = Tensor::from_slice(&targets, rows, DEV).unwrap();
    let options = CrossEntropyOptions {
        z_loss: 1e-4,
        ..Default::default()
    };
    let (loss, metrics) =
        linear_cross_entropy_with_metrics(&h, &w, None, &t, &options).expect("metrics");
    let argmax: Vec<i64> = metrics.argmax.to_vec1().unwrap();
    let mut compared = 0;
    for r in 0..rows {
        let mut sorted = logits[r].clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        if targets[r] == -100 {
            assert_eq!(argmax[r], -1);
        } else if sorted[0] - sorted[1] > 1e-3 {
            assert_eq!(argmax[r], predicted[r], "row {r}");
            compared += 1;
        }
    }
    assert!(compared > rows / 2);
    let counted: Vec<usize> = (0..rows).filter(|&r| targets[r] != -100).collect();
    let z = counted
        .iter()
        .map(|&r| 1e-4 * logsumexp_f64(&logits[r]).powi(2))
        .sum::<f64>()
        / counted.len() as f64;
    assert!(
        (metrics.z_loss - z).abs() <= 1e-5 * z,
        "{} vs {z}",
        metrics.z_loss
    );
    assert_eq!(metrics.counted_rows, counted.len());
    assert_eq!(grad(&loss, &h).dims(), [rows, dim]);
}

/// `logit_scale`: the loss and gradient of the scaled logits, against the unscaled call on
/// logits scaled here (in `f64`, where `s·x` is what the kernel forms), the gradient carrying
/// the factor `s`.
#[test]
fn logit_scale_is_the_loss_of_the_scaled_logits() {
    let (n, c) = (5, 64);
    let data = values(n * c, 6, 3.0);
    let x = var(&data, &[n, c], DType::F64);
    let scaled: Vec<f64> = data.iter().map(|v| v * 0.5).collect();
    let xs = var(&scaled, &[n, c], DType::F64);
    let t = Tensor::from_slice(&[1i64, 5, 9, 63, 0], n, DEV).unwrap();
    let options = CrossEntropyOptions {
        logit_scale: 0.5,
        label_smoothing: 0.1,
        ..Default::default()
    };
    let loss = cross_entropy(&x, &t, &options).unwrap();
    let plain = CrossEntropyOptions {
        logit_scale: 1.0,
        ..options.clone()
    };
    let want = cross_entropy(&xs, &t, &plain).unwrap();
    assert_close("loss", &f64s(&loss), &f64s(&want), 1e-15);
    let g: Vec<f64> = f64s(&grad(&want, &xs)).iter().map(|v| v * 0.5).collect();
    assert_close("gradient", &f64s(&grad(&loss, &x)), &g, 1e-15);
}
