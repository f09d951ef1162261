//! softmax, log_softmax and logsumexp over every dimension, values and gradients against
//! candle's composed ops, for every dtype.

mod common;

use candle_core::{DType, Tensor, D};
use common::*;
use lse_candle::{log_softmax, logsumexp, softmax, softmax_with, NonFinite};

const SHAPE: [usize; 3] = [3, 4, 5];

/// (values, gradient) of `f(x)` against the weighted sum with `upstream`.
fn run(
    f: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    data: &[f64],
    dtype: DType,
    upstream: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<usize>) {
    let x = var(data, &SHAPE, dtype);
    let y = f(&x).expect("forward");
    let dy = tensor(upstream, y.dims(), y.dtype());
    let g = grad(&(&y * &dy).and_then(|l| l.sum_all()).expect("loss"), &x);
    (f64s(&y), f64s(&g), y.dims().to_vec())
}

#[test]
fn softmax_family_matches_composed_candle_over_every_dim() {
    let data = values(60, 21, 5.0);
    for dtype in DTYPES {
        let exact = f64s(&tensor(&data, &SHAPE, dtype));
        // The f64 reference for f64 input is no more accurate than ours: allow both errors.
        let u = unit_roundoff(dtype) * if dtype == DType::F64 { 8.0 } else { 1.0 };
        // candle's ops in the dtype itself are less accurate for f16 / bf16.
        let loose = match dtype {
            DType::F64 => 1e-14,
            DType::F32 => 1e-6,
            DType::F16 => 4e-3,
            _ => 3e-2,
        };
        for dim in 0..3 {
            let keep = SHAPE
                .iter()
                .enumerate()
                .filter(|&(d, _)| d != dim)
                .map(|(_, &n)| n)
                .product::<usize>();
            let up_full = values(60, 40 + dim as u64, 1.0);
            let up_rows = values(keep, 50 + dim as u64, 1.0);
            type Op = fn(&Tensor, usize) -> candle_core::Result<Tensor>;
            let cases: [(&str, Op, Op, bool); 3] = [
                (
                    "softmax",
                    |x, d| softmax(x, d),
                    |x, d| candle_nn::ops::softmax(x, d),
                    true,
                ),
                (
                    "log_softmax",
                    |x, d| log_softmax(x, d),
                    |x, d| candle_nn::ops::log_softmax(x, d),
                    true,
                ),
                (
                    "logsumexp",
                    |x, d| logsumexp(x, d),
                    |x, d| x.log_sum_exp(d),
                    false,
                ),
            ];
            for (name, ours, theirs, full) in cases {
                let what = format!("{dtype:?} {name} dim {dim}");
                let up = if full { &up_full } else { &up_rows };
                let (y, g, dims) = run(|x| ours(x, dim), &exact, dtype, up);
                let (y64, g64, dims64) = run(|x| theirs(x, dim), &exact, DType::F64, up);
                let (yd, gd, _) = run(|x| theirs(x, dim), &exact, dtype, up);
                assert_eq!(dims, dims64, "{what}: shape");
                let y_tol = if name == "softmax" {
                    1.0
                } else {
                    max_abs(&y64)
                };
                // logsumexp comes back in f32 for the half dtypes.
                let y_u = if name == "logsumexp" && dtype != DType::F64 {
                    unit_roundoff(DType::F32)
                } else {
                    u
                };
                assert_close(
                    &format!("{what}: values vs f64"),
                    &y,
                    &y64,
                    2.0 * y_u * y_tol,
                );
                assert_close(
                    &format!("{what}: grad vs f64"),
                    &g,
                    &g64,
                    4.0 * u * max_abs(&g64),
                );
                assert_close(
                    &format!("{what}: values vs {dtype:?}"),
                    &y,
                    &yd,
                    loose * y_tol,
                );
                assert_close(
                    &format!("{what}: grad vs {dtype:?}"),
                    &g,
                    &gd,
                    loose * max_abs(&g64),
                );
            }
        }
    }
}

#[test]
fn candle_fused_softmax_has_no_backward_ours_has() {
    let data = values(12, 3, 2.0);
    let x = var(&data, &[3, 4], DType::F32);
    let y = candle_nn::ops::softmax_last_dim(&x).expect("candle");
    let dy = tensor(&values(12, 4, 1.0), &[3, 4], DType::F32);
    let grads = (&y * &dy)
        .and_then(|l| l.sum_all())
        .and_then(|l| l.backward())
        .expect("backward");
    assert!(
        grads.get(&x).is_none(),
        "candle's fused softmax records no backward"
    );

    let y2 = softmax(&x, D::Minus1).expect("ours");
    assert_close("forward", &f64s(&y2), &f64s(&y), 1e-7);
    let g = grad(&(&y2 * &dy).and_then(|l| l.sum_all()).expect("l"), &x);
    let xc = var(&data, &[3, 4], DType::F32);
    let want = grad(
        &(candle_nn::ops::softmax(&xc, D::Minus1).expect("c") * &dy)
            .and_then(|l| l.sum_all())
            .expect("l"),
        &xc,
    );
    assert_close("grad", &f64s(&g), &f64s(&want), 1e-7);
}

#[test]
fn softmax_family_errors_and_policies() {
    let x = tensor(&[0.0, f64::NAN, 1.0, 2.0, 0.0, 1.0], &[2, 3], DType::F32);
    for r in [softmax(&x, 1), log_softmax(&x, 1), logsumexp(&x, 1)] {
        let e = r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("non-finite logit NaN at row 0, column 1"), "{e}");
    }
    let y = f64s(&softmax_with(&x, 1, NonFinite::Propagate).expect("propagate"));
    assert!(y[..3].iter().all(|v| v.is_nan()) && y[3..].iter().all(|v| v.is_finite()));
    let e = softmax(&x, 2)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("softmax"), "{e}");
    let e = softmax(&x.to_dtype(DType::I64).expect("i64"), 1)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("lse-candle softmax: inputs have dtype i64"),
        "{e}"
    );
    let e = logsumexp(&Tensor::new(1.0f32, DEV).expect("s"), 0)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("at least one dimension"), "{e}");
}
