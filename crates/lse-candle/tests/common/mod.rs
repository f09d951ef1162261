//! Shared test helpers: data, a composed candle reference cross-entropy, tolerances.
#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor, Var};
use lse_candle::{CrossEntropyOptions, Reduction};
use lse_testkit::rng::Rng;

pub const DEV: &Device = &Device::Cpu;
pub const DTYPES: [DType; 4] = [DType::F64, DType::F32, DType::F16, DType::BF16];

/// Unit roundoff of a float dtype.
pub fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::EPSILON / 2.0,
        DType::F32 => f64::from(f32::EPSILON) / 2.0,
        DType::F16 => 2f64.powi(-11),
        DType::BF16 => 2f64.powi(-8),
        other => panic!("not a float dtype: {other:?}"),
    }
}

/// Deterministic pseudo-random values in `[-scale, scale)`.
pub fn values(len: usize, seed: u64, scale: f64) -> Vec<f64> {
    Rng::new(seed).fill_range(len, -scale, scale)
}

/// A tensor of `dtype` from f64 values.
pub fn tensor(data: &[f64], shape: &[usize], dtype: DType) -> Tensor {
    Tensor::from_vec(data.to_vec(), shape, DEV)
        .and_then(|t| t.to_dtype(dtype))
        .expect("tensor")
}

/// A variable of `dtype` from f64 values.
pub fn var(data: &[f64], shape: &[usize], dtype: DType) -> Var {
    Var::from_tensor(&tensor(data, shape, dtype)).expect("var")
}

/// The elements of `t` as f64, row-major.
pub fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .expect("to_vec")
}

/// The gradient of `loss` with respect to `v`.
pub fn grad(loss: &Tensor, v: &Var) -> Tensor {
    let grads = loss.backward().expect("backward");
    grads.get(v).expect("a gradient for the variable").clone()
}

/// Asserts `|got_i − want_i| ≤ tol` elementwise (NaN never passes; equal infinities pass).
#[track_caller]
pub fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = g == w || (g - w).abs() <= tol;
        assert!(
            ok,
            "{what}[{i}]: got {g}, want {w}, |diff| {} > tol {tol}",
            (g - w).abs()
        );
    }
}

/// `max |x_i|`.
pub fn max_abs(x: &[f64]) -> f64 {
    x.iter().fold(0.0f64, |m, v| m.max(v.abs()))
}

/// The cross-entropy of `x` (`n × c`) composed from candle ops in `x`'s dtype, with every option
/// of `opts` except the NaN policy (no masked logits): soft-cap, log_softmax, the smoothed,
/// weighted target distribution as a constant tensor, z-loss via `log_sum_exp`, the reduction.
pub fn reference_ce(x: &Tensor, targets: &[i64], opts: &CrossEntropyOptions) -> Result<Tensor> {
    let (n, c) = x.dims2()?;
    let dt = x.dtype();
    let x = match opts.softcap {
        Some(cap) => ((x / cap)?.tanh()? * cap)?,
        None => x.clone(),
    };
    let logp = candle_nn::ops::log_softmax(&x, 1)?;
    let w = opts.weights.clone().unwrap_or_else(|| vec![1.0; c]);
    let eps = opts.label_smoothing;
    let mut coef = vec![0.0f64; n * c];
    let mut valid = vec![0.0f64; n];
    let mut denom = 0.0;
    for (r, &t) in targets.iter().enumerate() {
        if Some(t) == opts.ignore_index {
            continue;
        }
        valid[r] = 1.0;
        denom += w[t as usize];
        for k in 0..c {
            let q = (1.0 - eps) * f64::from(u8::from(k as i64 == t)) + eps / c as f64;
            coef[r * c + k] = w[k] * q;
        }
    }
    let coef = Tensor::from_vec(coef, (n, c), DEV)?.to_dtype(dt)?;
    let mut rows = (logp * coef)?.sum(1)?.neg()?;
    if opts.z_loss > 0.0 {
        let valid = Tensor::from_vec(valid, n, DEV)?.to_dtype(dt)?;
        let z = (x.log_sum_exp(1)?.sqr()? * opts.z_loss)?;
        rows = (rows + (z * valid)?)?;
    }
    match opts.reduction {
        Reduction::None => Ok(rows),
        Reduction::Sum => rows.sum_all(),
        Reduction::Mean => rows.sum_all()? / denom,
    }
}
