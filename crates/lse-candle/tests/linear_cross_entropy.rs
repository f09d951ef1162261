//! `linear_cross_entropy` against the unfused candle graph: `hidden · weightᵀ + bias` by candle's
//! own matmul, then `lse_candle::cross_entropy`, both differentiated by candle.

use candle_core::{DType, Device, Result, Tensor, Var};
use lse_candle::{cross_entropy, linear_cross_entropy, CrossEntropyOptions, Reduction};

mod common;

/// `common::values` as `f32`.
fn values(n: usize, seed: u64, scale: f64) -> Vec<f32> {
    common::values(n, seed, scale)
        .into_iter()
        .map(|v| v as f32)
        .collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// Loss and gradients of both paths agree to a few f32 roundings of the products.
fn compare(options: &CrossEntropyOptions, upstream: Option<&[f32]>) -> Result<()> {
    let (rows, dim, classes) = (12, 7, 19);
    let dev = &Device::Cpu;
    let h = Var::from_vec(values(rows * dim, 1, 1.5), (rows, dim), dev)?;
    let w = Var::from_vec(values(classes * dim, 2, 1.0), (classes, dim), dev)?;
    let b = Var::from_vec(values(classes, 3, 0.5), classes, dev)?;
    let targets: Vec<i64> = (0..rows as i64)
        .map(|r| if r == 5 { -100 } else { r * 7 % classes as i64 })
        .collect();
    let t = Tensor::from_vec(targets, rows, dev)?;

    let fused = linear_cross_entropy(&h, &w, Some(&b), &t, options)?;
    let logits = h.matmul(&w.t()?)?.broadcast_add(&b)?;
    let unfused = cross_entropy(&logits, &t, options)?;
    let (fused_sum, unfused_sum) = match upstream {
        Some(g) => {
            let g = Tensor::from_vec(g.to_vec(), rows, dev)?;
            ((&fused * &g)?.sum_all()?, (&unfused * &g)?.sum_all()?)
        }
        None => (fused.clone(), unfused.clone()),
    };
    assert!(max_abs_diff(&fused, &unfused)? < 1e-5, "loss");
    let (gf, gu) = (fused_sum.backward()?, unfused_sum.backward()?);
    for (name, v) in [("hidden", &h), ("weight", &w), ("bias", &b)] {
        let a = gf.get(v).expect("fused gradient");
        let e = gu.get(v).expect("unfused gradient");
        assert_eq!(a.dims(), e.dims(), "{name}");
        let diff = max_abs_diff(a, e)?;
        assert!(diff < 1e-5, "{name}: {diff}");
    }
    Ok(())
}

#[test]
fn matches_the_unfused_graph() -> Result<()> {
    compare(&CrossEntropyOptions::default(), None)?;
    let every = CrossEntropyOptions {
        label_smoothing: 0.1,
        z_loss: 1e-3,
        softcap: Some(4.0),
        weights: Some((0..19).map(|c| 0.5 + (c % 3) as f64).collect()),
        ..Default::default()
    };
    compare(&every, None)?;
    let none = CrossEntropyOptions {
        reduction: Reduction::None,
        ..every.clone()
    };
    let upstream: Vec<f32> = (0..12).map(|r| 0.25 + r as f32 / 8.0).collect();
    compare(&none, Some(&upstream))?;
    let recompute = CrossEntropyOptions {
        cache_gradient: false,
        reduction: Reduction::Sum,
        ..every
    };
    compare(&recompute, None)
}

#[test]
fn bad_inputs_are_errors() -> Result<()> {
    let dev = &Device::Cpu;
    let h = Tensor::zeros((4, 3), DType::F32, dev)?;
    let w = Tensor::zeros((5, 2), DType::F32, dev)?;
    let t = Tensor::from_vec(vec![0i64, 1, 2, 3], 4, dev)?;
    let err = linear_cross_entropy(&h, &w, None, &t, &Default::default()).unwrap_err();
    assert!(err.to_string().contains("hidden size is 3"), "{err}");
    let w = Tensor::zeros((5, 3), DType::F32, dev)?;
    let t = Tensor::from_vec(vec![0i64, 1, 2, 9], 4, dev)?;
    let err = linear_cross_entropy(&h, &w, None, &t, &Default::default()).unwrap_err();
    assert!(err.to_string().contains("target 9 at row 3"), "{err}");
    let w16 = w.to_dtype(DType::BF16)?;
    let err = linear_cross_entropy(&h, &w16, None, &t, &Default::default()).unwrap_err();
    assert!(err.to_string().contains("dtype"), "{err}");
    Ok(())
}
