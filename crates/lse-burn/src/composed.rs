//! The operations composed of burn's own tensor operations, in the stable form: what a backend
//! without lse's kernels runs on its own device (the default methods of
//! [`LseBackend`](crate::LseBackend)). `f16` and `bf16` are computed in `f32`, `f64` in `f64`.
//!
//! Every row is shifted by its maximum before `exp` (a row whose maximum is infinite by 0, so
//! that a fully masked row's logsumexp is `-inf` and a row holding `+inf` gives `+inf`), so no
//! finite logit overflows; the reductions are burn's own (`f32` sums).

use burn::backend::tensor::{BoolTensor, FloatTensor, IntTensor};
use burn::backend::{get_or_init_device_settings, Backend, TensorMetadata};
use burn::tensor::{DType, FloatDType, IndexingUpdateOp, Shape};

use crate::options::{CrossEntropyOptions, EmptyMean, Reduction};

fn bool_dtype<B: Backend>(x: &FloatTensor<B>) -> burn::tensor::BoolDType {
    get_or_init_device_settings::<B>(&x.device()).bool_dtype
}

/// The dtype the arithmetic runs in: `f64` for `f64`, `f32` otherwise.
fn compute_dtype(dtype: DType) -> FloatDType {
    if dtype == DType::F64 {
        FloatDType::F64
    } else {
        FloatDType::F32
    }
}

fn widen<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    let target = compute_dtype(x.dtype());
    if FloatDType::from(x.dtype()) == target {
        x
    } else {
        B::float_cast(x, target)
    }
}

fn narrow<B: Backend>(x: FloatTensor<B>, dtype: DType) -> FloatTensor<B> {
    if x.dtype() == dtype {
        x
    } else {
        B::float_cast(x, FloatDType::from(dtype))
    }
}

/// Each row of `x` (already widened) shifted by its maximum, `x − m` (exact for the logits
/// near the maximum, which carry the probability), and `log Σ exp(x − m)` as a `rows × 1`
/// column: `lse = m + log s`.
fn shifted_rows<B: Backend>(x: FloatTensor<B>) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let m = B::float_max_dim(x.clone(), 1);
    let infinite = B::float_is_inf(m.clone(), bool_dtype::<B>(&m));
    let m = B::float_mask_fill(m, infinite, 0.0.into());
    let shifted = B::float_sub(x, m.clone());
    let log_s = B::float_log(B::float_sum_dim(B::float_exp(shifted.clone()), 1));
    (shifted, m, log_s)
}

/// `logsumexp` of each row of `x` (already widened) as a `rows × 1` column.
fn row_lse<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    let (_, m, log_s) = shifted_rows::<B>(x);
    B::float_add(log_s, m)
}

fn rows_of(shape: &Shape) -> (usize, usize) {
    let dims = shape.as_slice();
    (dims[0], dims[1])
}

/// `logsumexp` of each row: `rows` values, `f32` (`f64` for `f64`).
pub(crate) fn logsumexp<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    let (rows, _) = rows_of(&x.shape());
    B::float_reshape(row_lse::<B>(widen::<B>(x)), Shape::from([rows]))
}

/// `softmax` (`log_softmax` when `log`) of each row, in the input's dtype.
pub(crate) fn softmax<B: Backend>(x: FloatTensor<B>, log: bool) -> FloatTensor<B> {
    let dtype = x.dtype();
    // (x − m) − log s, never x − lse: lse carries the rounding of m + log s.
    let (shifted, _, log_s) = shifted_rows::<B>(widen::<B>(x));
    let log_p = B::float_sub(shifted, log_s);
    narrow::<B>(if log { log_p } else { B::float_exp(log_p) }, dtype)
}

/// The backward pass of `softmax` (`log_softmax` when `log`) from its output `y`.
pub(crate) fn softmax_backward<B: Backend>(
    y: FloatTensor<B>,
    dy: FloatTensor<B>,
    log: bool,
) -> FloatTensor<B> {
    let dtype = y.dtype();
    let (y, dy) = (widen::<B>(y), widen::<B>(dy));
    let dx = if log {
        // dx = dy − softmax · Σ dy
        let total = B::float_sum_dim(dy.clone(), 1);
        B::float_sub(dy, B::float_mul(B::float_exp(y), total))
    } else {
        // dx = y · (dy − Σ y·dy)
        let dot = B::float_sum_dim(B::float_mul(y.clone(), dy.clone()), 1);
        B::float_mul(y, B::float_sub(dy, dot))
    };
    narrow::<B>(dx, dtype)
}

/// The cross-entropy of `logits` against class `targets` (checked by the public function) with
/// every option: the loss (one value, or one per row) in the compute dtype and, when
/// `with_grad`, `∂loss/∂logits` in the logits' dtype.
pub(crate) fn cross_entropy<B: Backend>(
    logits: FloatTensor<B>,
    targets: IntTensor<B>,
    options: &CrossEntropyOptions,
    with_grad: bool,
) -> (FloatTensor<B>, Option<FloatTensor<B>>) {
    let dtype = logits.dtype();
    let device = logits.device();
    let (rows, classes) = rows_of(&logits.shape());
    let compute = compute_dtype(dtype);
    let booleans = bool_dtype::<B>(&logits);
    let column = |t: FloatTensor<B>| B::float_reshape(t, Shape::from([rows, 1]));

    let mut x = widen::<B>(logits);
    // Soft-capping first: x̃ = cap · tanh(x / cap). Its slope for the gradient is 1 / cosh²,
    // never 1 − tanh² (which cancels in `f32` as tanh nears ±1).
    let mut scaled = None;
    if let Some(cap) = options.softcap {
        let u = B::float_div_scalar(x, cap.into());
        x = B::float_mul_scalar(B::float_tanh(u.clone()), cap.into());
        scaled = Some(u);
    }
    let (shifted, m, log_s) = shifted_rows::<B>(x.clone());
    let lse = B::float_add(log_s.clone(), m);

    // Ignored rows (compared before anything is gathered), and a target each row can gather.
    let targets = B::int_reshape(targets, Shape::from([rows, 1]));
    let ignored: BoolTensor<B> = match options.ignore_index {
        Some(index) => B::int_equal_elem(targets.clone(), index.into(), booleans),
        // Checked targets are never negative: nothing is ignored.
        None => B::int_lower_elem(targets.clone(), 0.into(), booleans),
    };
    let safe_targets = B::int_mask_fill(targets, ignored.clone(), 0.into());
    let target_logit = B::float_gather(1, x.clone(), safe_targets.clone());

    let weights = options.weights.as_ref().map(|w| {
        let values: Vec<f64> = w.clone();
        let data = burn::tensor::TensorData::new(values, [1, classes]);
        B::float_cast(B::float_from_data(data, &device), compute)
    });
    let weight_sum: f64 = options
        .weights
        .as_ref()
        .map_or(classes as f64, |w| w.iter().sum());
    let target_weight = match &weights {
        Some(w) => {
            let flat = B::int_reshape(safe_targets.clone(), Shape::from([rows]));
            let w_row = B::float_reshape(w.clone(), Shape::from([classes]));
            column(B::float_gather(0, w_row, flat))
        }
        None => B::float_full(Shape::from([rows, 1]), 1.0.into(), &device, compute),
    };
    let target_weight = B::float_mask_fill(target_weight, ignored.clone(), 0.0.into());

    let eps = options.label_smoothing;
    // (1 − ε) · w_t · (lse − x_t) + (ε / C) · Σ_c w_c (lse − x_c) + z · lse²
    let nll = B::float_sub(lse.clone(), target_logit);
    let mut row = B::float_mul_scalar(B::float_mul(target_weight.clone(), nll), (1.0 - eps).into());
    if eps > 0.0 {
        let weighted = match &weights {
            Some(w) => B::float_mul(x.clone(), w.clone()),
            None => x.clone(),
        };
        let spread = B::float_sub(
            B::float_mul_scalar(lse.clone(), weight_sum.into()),
            B::float_sum_dim(weighted, 1),
        );
        row = B::float_add(
            row,
            B::float_mul_scalar(spread, (eps / classes as f64).into()),
        );
    }
    if options.z_loss > 0.0 {
        let square = B::float_mul(lse.clone(), lse.clone());
        row = B::float_add(row, B::float_mul_scalar(square, options.z_loss.into()));
    }
    let row = B::float_mask_fill(row, ignored.clone(), 0.0.into());

    // The mean divides by the summed target weight of counted rows; an empty mean is 0 (or NaN).
    let denominator = B::float_sum(target_weight.clone());
    let empty = B::float_equal_elem(denominator.clone(), 0.0.into(), booleans);
    let safe_denominator = B::float_mask_fill(denominator, empty.clone(), 1.0.into());
    let empty_value = match options.empty_mean {
        EmptyMean::Nan => f64::NAN,
        _ => 0.0,
    };
    let loss = match options.reduction {
        Reduction::None => B::float_reshape(row, Shape::from([rows])),
        Reduction::Sum => B::float_reshape(B::float_sum(row), Shape::from([1])),
        Reduction::Mean => {
            let mean = B::float_div(B::float_sum(row), safe_denominator.clone());
            B::float_reshape(
                B::float_mask_fill(mean, empty.clone(), empty_value.into()),
                Shape::from([1]),
            )
        }
    };
    if !with_grad {
        return (loss, None);
    }

    // ∂/∂x̃_c = (A + 2z·lse) · p_c − w_c q_c, with A = Σ_c w_c q_c = (1 − ε) w_t + (ε / C) Σ w.
    let p = B::float_exp(B::float_sub(shifted, log_s));
    let a = B::float_add_scalar(
        B::float_mul_scalar(target_weight.clone(), (1.0 - eps).into()),
        (eps / classes as f64 * weight_sum).into(),
    );
    let coefficient = B::float_add(a, B::float_mul_scalar(lse, (2.0 * options.z_loss).into()));
    let mut grad = B::float_mul(p, coefficient);
    if eps > 0.0 {
        let share = eps / classes as f64;
        grad = match &weights {
            Some(w) => B::float_sub(grad, B::float_mul_scalar(w.clone(), share.into())),
            None => B::float_sub_scalar(grad, share.into()),
        };
    }
    let at_target = B::float_mul_scalar(target_weight, (-(1.0 - eps)).into());
    grad = B::float_scatter(1, grad, safe_targets, at_target, IndexingUpdateOp::Add);
    if let Some(u) = scaled {
        let cosh = B::float_cosh(u);
        grad = B::float_div(grad, B::float_mul(cosh.clone(), cosh));
    }
    let ignored_cells = B::bool_expand(ignored, Shape::from([rows, classes]));
    grad = B::float_mask_fill(grad, ignored_cells, 0.0.into());
    if options.reduction == Reduction::Mean {
        grad = B::float_div(
            grad,
            B::float_reshape(safe_denominator, Shape::from([1, 1])),
        );
        let empty = B::bool_expand(
            B::bool_reshape(empty, Shape::from([1, 1])),
            Shape::from([rows, classes]),
        );
        grad = B::float_mask_fill(grad, empty, 0.0.into());
    }
    (loss, Some(narrow::<B>(grad, dtype)))
}

/// The linear cross-entropy on a backend whose kernels are not on the host: a chunk of rows at a
/// time (within `options.budget_bytes` of `f32` logits and their gradient), each chunk's logits
/// formed by the backend's matrix product in `f32` and passed to the backend's own
/// [`LseBackend`](crate::LseBackend) cross-entropy with its gradient (lse-gpu's kernels on
/// burn's CubeCL backend); `dH`, `dW` and `db` follow from each chunk's gradient, on the device.
/// The reduction's denominator comes from the targets, read to the host once.
///
/// Returns the loss (`f32`: one value, or one per row) and, for an incoming gradient, the
/// gradients in the inputs' dtype.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_cross_entropy<B: crate::LseBackend>(
    hidden: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: FloatTensor<B>,
    has_bias: bool,
    targets: IntTensor<B>,
    options: &crate::LinearCrossEntropyOptions,
    grad_output: Option<FloatTensor<B>>,
) -> (FloatTensor<B>, Option<[FloatTensor<B>; 3]>) {
    use burn::tensor::Slice;

    let dtype = hidden.dtype();
    let device = hidden.device();
    let (rows, dim) = rows_of(&hidden.shape());
    let classes = weight.shape().as_slice()[0];
    let ce = &options.cross_entropy;
    let target_values = crate::host::targets::<B>(targets);
    // Σ w_t over counted rows: the mean's denominator, as `lse` forms it.
    let denominator: f64 = target_values
        .iter()
        .filter(|&&t| Some(t) != ce.ignore_index)
        .map(|&t| ce.weights.as_ref().map_or(1.0, |w| w[t as usize]))
        .sum();
    let empty = ce.reduction == Reduction::Mean && denominator == 0.0;

    let (h, w) = (
        B::float_cast(hidden, FloatDType::F32),
        B::float_cast(weight, FloatDType::F32),
    );
    let b = B::float_reshape(
        B::float_cast(bias, FloatDType::F32),
        Shape::from([1, classes]),
    );
    let w_t = B::float_transpose(w.clone());
    // Per chunk: f32 logits and their gradient.
    let chunk = (options.budget_bytes / (classes * 4 * 2).max(1)).clamp(1, rows.max(1));
    // Each chunk's loss is a sum of its rows (or the rows themselves); the mean divides once.
    let chunk_options = CrossEntropyOptions {
        reduction: match ce.reduction {
            Reduction::None => Reduction::None,
            _ => Reduction::Sum,
        },
        ..ce.clone()
    };
    // The incoming gradient: one value for a reduced loss, one per row otherwise; the mean's
    // 1/denominator folded in.
    let scale = match ce.reduction {
        Reduction::Mean if empty => 0.0,
        Reduction::Mean => 1.0 / denominator,
        _ => 1.0,
    };
    let (dy_scalar, dy_rows) = match grad_output {
        None => (None, None),
        Some(dy) if ce.reduction == Reduction::None => {
            (None, Some(B::float_cast(dy, FloatDType::F32)))
        }
        Some(dy) => (Some(crate::host::values::<B, f64>(dy)[0] * scale), None),
    };
    let with_grad = dy_scalar.is_some() || dy_rows.is_some();

    let mut losses = Vec::new();
    let mut dh_chunks = Vec::new();
    let mut dw: Option<FloatTensor<B>> = None;
    let mut db: Option<FloatTensor<B>> = None;
    let mut start = 0;
    while start < rows {
        let end = (start + chunk).min(rows);
        let row_slice = [
            Slice::new(start as isize, Some(end as isize), 1),
            Slice::full(),
        ];
        let h_c = B::float_slice(h.clone(), &row_slice);
        let mut logits = B::float_matmul(h_c.clone(), w_t.clone());
        if has_bias {
            logits = B::float_add(logits, b.clone());
        }
        let t_c = B::int_from_data(
            burn::tensor::TensorData::new(target_values[start..end].to_vec(), [end - start]),
            &device,
        );
        if with_grad {
            let (loss, g) = B::lse_cross_entropy_with_grad(logits, t_c, chunk_options.clone());
            let g = match (&dy_scalar, &dy_rows) {
                (Some(s), _) => B::float_mul_scalar(g, (*s).into()),
                (_, Some(rows_dy)) => {
                    let dy_c = B::float_slice(rows_dy.clone(), &row_slice[..1]);
                    B::float_mul(g, B::float_reshape(dy_c, Shape::from([end - start, 1])))
                }
                _ => g,
            };
            dh_chunks.push(B::float_matmul(g.clone(), w.clone()));
            let dw_c = B::float_matmul(B::float_transpose(g.clone()), h_c);
            dw = Some(match dw {
                Some(acc) => B::float_add(acc, dw_c),
                None => dw_c,
            });
            let db_c = B::float_sum_dim(g, 0);
            db = Some(match db {
                Some(acc) => B::float_add(acc, db_c),
                None => db_c,
            });
            losses.push(loss);
        } else {
            losses.push(B::lse_cross_entropy(logits, t_c, chunk_options.clone()));
        }
        start = end;
    }

    let loss = if rows == 0 {
        let value = if ce.reduction == Reduction::None {
            vec![]
        } else {
            vec![0.0f32]
        };
        let len = value.len();
        crate::host::upload::<B, f32>(value, [len], &device)
    } else if ce.reduction == Reduction::None {
        B::float_cast(B::float_cat(losses, 0), FloatDType::F32)
    } else {
        let total = losses
            .into_iter()
            .map(|l| B::float_cast(l, FloatDType::F32))
            .reduce(B::float_add)
            .expect("at least one chunk");
        match ce.reduction {
            Reduction::Mean if empty => {
                let value = match ce.empty_mean {
                    EmptyMean::Nan => f32::NAN,
                    _ => 0.0,
                };
                crate::host::upload::<B, f32>(vec![value], [1], &device)
            }
            Reduction::Mean => B::float_div_scalar(total, denominator.into()),
            _ => total,
        }
    };
    if !with_grad {
        return (loss, None);
    }
    let zeros = |shape: [usize; 2]| B::float_zeros(Shape::from(shape), &device, FloatDType::F32);
    let dh = if dh_chunks.is_empty() {
        zeros([0, dim])
    } else {
        B::float_cat(dh_chunks, 0)
    };
    let dw = dw.unwrap_or_else(|| zeros([classes, dim]));
    let db = B::float_reshape(
        db.unwrap_or_else(|| zeros([1, classes])),
        Shape::from([classes]),
    );
    let target = FloatDType::from(dtype);
    let grads = [dh, dw, db].map(|g| B::float_cast(g, target));
    (loss, Some(grads))
}

#[cfg(test)]
mod tests {
    //! The composed operations against `lse`'s kernels (themselves tested against a
    //! higher-precision oracle in `lse`), on burn-flex, with every option and extreme logits.

    use burn::backend::ops::{FloatTensorOps, IntTensorOps};
    use burn::backend::Flex;
    use burn::tensor::{DType, TensorData};

    use super::*;
    use crate::backends::FlexRead;
    use crate::host;

    fn device() -> <Flex as burn::backend::BackendTypes>::Device {
        Default::default()
    }

    fn logits(values: &[f64], rows: usize, classes: usize, dtype: DType) -> FloatTensor<Flex> {
        let data = TensorData::new(values.to_vec(), [rows, classes]).convert_dtype(dtype);
        Flex::float_from_data(data, &device())
    }

    fn read(t: FloatTensor<Flex>) -> Vec<f64> {
        host::values::<Flex, f64>(t)
    }

    fn close(what: &str, got: &[f64], want: &[f64], rel: f64) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let ok =
                (g - w).abs() <= rel * w.abs().max(1e-3) || (g.is_nan() && w.is_nan()) || g == w;
            assert!(ok, "{what}[{i}]: composed {g} vs lse {w}");
        }
    }

    /// Spreads of 2·10⁴ (exp overflows past 88 in f32): every option, every reduction.
    #[test]
    fn cross_entropy_matches_lse_kernels() {
        let (rows, classes) = (7, 9);
        let mut state = 7u64;
        let values: Vec<f64> = (0..rows * classes)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * 1.0e4
            })
            .collect();
        // Row 2 is ignored (the ignore index of each option set); row 3 too where that is 3.
        let target_tensor = |options: &CrossEntropyOptions| {
            let ignored = options.ignore_index.unwrap_or(-100);
            let targets = [0i64, 8, ignored, 3, 3, 5, 1];
            Flex::int_from_data(TensorData::new(targets.to_vec(), [rows]), &device())
        };
        let option_sets = [
            CrossEntropyOptions::default(),
            CrossEntropyOptions {
                label_smoothing: 0.1,
                weights: Some((0..classes).map(|c| 0.5 + c as f64 / 4.0).collect()),
                reduction: Reduction::Sum,
                ..Default::default()
            },
            CrossEntropyOptions {
                z_loss: 1e-4,
                softcap: Some(30.0),
                reduction: Reduction::None,
                ..Default::default()
            },
            CrossEntropyOptions {
                label_smoothing: 0.2,
                z_loss: 1e-3,
                softcap: Some(50.0),
                ignore_index: Some(3),
                ..Default::default()
            },
        ];
        for dtype in [DType::F64, DType::F32, DType::BF16] {
            let rel = if dtype == DType::BF16 { 1e-2 } else { 1e-5 };
            for (k, options) in option_sets.iter().enumerate() {
                let x = logits(&values, rows, classes, dtype);
                let (loss, grad) =
                    cross_entropy::<Flex>(x.clone(), target_tensor(options), options, true);
                let (want_loss, want_grad) =
                    host::cross_entropy::<Flex, FlexRead>(x, target_tensor(options), options, true);
                let what = format!("{dtype:?} options {k}");
                close(&format!("{what} loss"), &read(loss), &read(want_loss), rel);
                close(
                    &format!("{what} grad"),
                    &read(grad.unwrap()),
                    &read(want_grad.unwrap()),
                    rel,
                );
            }
        }
    }

    /// softmax, log_softmax, their backward passes and logsumexp, with a fully masked row.
    #[test]
    fn softmax_family_matches_lse_kernels() {
        let (rows, classes) = (3, 5);
        let values = [
            1.0e4,
            -1.0e4,
            3.0,
            0.5,
            -2.0, //
            f64::NEG_INFINITY,
            2.0,
            f64::NEG_INFINITY,
            1.0,
            0.0, //
            -7.0,
            7.0,
            88.0,
            89.0,
            -90.0,
        ];
        let dy: Vec<f64> = (0..rows * classes)
            .map(|i| (i as f64 * 0.37).sin())
            .collect();
        for log in [false, true] {
            let x = logits(&values, rows, classes, DType::F32);
            let y = softmax::<Flex>(x.clone(), log);
            let want = host::softmax::<Flex, FlexRead>(x.clone(), log);
            close(
                &format!("log={log}"),
                &read(y.clone()),
                &read(want.clone()),
                1e-6,
            );
            let g = logits(&dy, rows, classes, DType::F32);
            let dx = softmax_backward::<Flex>(want.clone(), g.clone(), log);
            let want_dx = host::softmax_backward::<Flex, FlexRead>(want, g, log);
            close(
                &format!("log={log} backward"),
                &read(dx),
                &read(want_dx),
                1e-5,
            );
        }
        let x = logits(&values, rows, classes, DType::F32);
        let lse = logsumexp::<Flex>(x.clone());
        close(
            "lse",
            &read(lse),
            &read(host::logsumexp::<Flex, FlexRead>(x)),
            1e-7,
        );
    }

    /// A naive control: the textbook formula on the same logits is not finite, so the test
    /// above would catch composed arithmetic that skipped the shift.
    #[test]
    fn naive_softmax_overflows_on_these_logits() {
        let x = logits(&[1.0e4, 0.0, -1.0e4], 1, 3, DType::F32);
        let e = Flex::float_exp(x);
        let naive = Flex::float_div(e.clone(), Flex::float_sum_dim(e, 1));
        assert!(read(naive).iter().any(|v| !v.is_finite()));
    }

    /// The chunked linear loss (what burn's CubeCL backend runs) against lse's fused one, on
    /// burn-flex: every reduction, an incoming gradient other than 1, per-row incoming gradients,
    /// class weights, an ignored row, chunks of two rows.
    #[test]
    fn linear_cross_entropy_matches_lse_fused() {
        let (rows, dim, classes) = (7, 3, 5);
        let wave = |n: usize, f: f64| {
            (0..n)
                .map(|i| ((i as f64 + 1.0) * f).sin() * 3.0)
                .collect::<Vec<_>>()
        };
        let (h, w, b) = (
            wave(rows * dim, 0.7),
            wave(classes * dim, 1.3),
            wave(classes, 2.1),
        );
        let targets = [0i64, 4, -100, 2, 2, 1, 3];
        for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
            let options = crate::LinearCrossEntropyOptions {
                cross_entropy: CrossEntropyOptions {
                    reduction,
                    weights: Some(vec![1.0, 2.0, 0.5, 1.5, 1.0]),
                    label_smoothing: 0.1,
                    ..Default::default()
                },
                budget_bytes: 2 * classes * 4 * 2,
            };
            let dy: Vec<f64> = match reduction {
                Reduction::None => wave(rows, 0.3),
                _ => vec![0.75],
            };
            let dy_len = dy.len();
            let inputs = || {
                (
                    logits(&h, rows, dim, DType::F32),
                    logits(&w, classes, dim, DType::F32),
                    Flex::float_from_data(
                        TensorData::new(b.clone(), [classes]).convert_dtype(DType::F32),
                        &device(),
                    ),
                    Flex::int_from_data(TensorData::new(targets.to_vec(), [rows]), &device()),
                    Flex::float_from_data(
                        TensorData::new(dy.clone(), [dy_len]).convert_dtype(DType::F32),
                        &device(),
                    ),
                )
            };
            let (hh, ww, bb, tt, gg) = inputs();
            let (loss, grads) =
                linear_cross_entropy::<Flex>(hh, ww, bb, true, tt, &options, Some(gg));
            let (hh, ww, bb, tt, _) = inputs();
            let dy32: Vec<f32> = dy.iter().map(|&v| v as f32).collect();
            let want = host::linear_cross_entropy::<Flex, FlexRead>(
                hh,
                ww,
                bb,
                true,
                tt,
                &options,
                Some(dy32),
            );
            let what = format!("{reduction:?}");
            close(&format!("{what} loss"), &read(loss), &read(want.loss), 1e-5);
            let (got, want) = (grads.unwrap(), want.grads.unwrap());
            for (part, (g, w)) in ["dH", "dW", "db"].iter().zip(got.into_iter().zip(want)) {
                close(&format!("{what} {part}"), &read(g), &read(w), 1e-5);
            }
        }
    }
}
