//! `loss.backward()` of `lse_candle::cross_entropy` against candle's own composed ops, for every
//! dtype and a spread of options, on ordinary inputs.

mod common;

use candle_core::{DType, Tensor};
use common::*;
use lse_candle::{cross_entropy, CrossEntropyOptions, Reduction};

const N: usize = 6;
const C: usize = 7;
const TARGETS: [i64; N] = [3, 0, 6, 2, 5, 1];
const IGNORED: [i64; N] = [3, -100, 6, 2, -100, 1];

fn option_sets() -> Vec<(&'static str, CrossEntropyOptions, [i64; N])> {
    let d = CrossEntropyOptions::default;
    let weights = Some(vec![0.5, 1.0, 2.0, 1.5, 0.25, 1.0, 3.0]);
    vec![
        ("default mean", d(), TARGETS),
        (
            "sum",
            CrossEntropyOptions {
                reduction: Reduction::Sum,
                ..d()
            },
            TARGETS,
        ),
        (
            "none",
            CrossEntropyOptions {
                reduction: Reduction::None,
                ..d()
            },
            IGNORED,
        ),
        ("ignore_index", d(), IGNORED),
        (
            "weights + smoothing",
            CrossEntropyOptions {
                weights: weights.clone(),
                label_smoothing: 0.1,
                ..d()
            },
            IGNORED,
        ),
        (
            "z-loss + softcap",
            CrossEntropyOptions {
                z_loss: 1e-2,
                softcap: Some(3.0),
                ..d()
            },
            TARGETS,
        ),
        (
            "everything, recomputed in backward",
            CrossEntropyOptions {
                weights,
                label_smoothing: 0.2,
                z_loss: 1e-3,
                softcap: Some(5.0),
                cache_gradient: false,
                ..d()
            },
            IGNORED,
        ),
        (
            "none, smoothing, recomputed",
            CrossEntropyOptions {
                reduction: Reduction::None,
                label_smoothing: 0.05,
                cache_gradient: false,
                ..d()
            },
            TARGETS,
        ),
    ]
}

/// The scalar that backward starts from: the loss times `scale`; for `None` and `scale ≠ 1`,
/// different weights per row (`scale = 1`: the plain sum, an incoming gradient of 1 per row).
fn seed(loss: &Tensor, reduction: Reduction, scale: f64) -> Tensor {
    let r = match reduction {
        Reduction::None if scale != 1.0 => {
            let w: Vec<f64> = (0..N).map(|i| scale * (0.5 + i as f64)).collect();
            Tensor::from_vec(w, N, DEV)
                .and_then(|w| w.to_dtype(loss.dtype()))
                .expect("w")
        }
        _ => Tensor::new(scale, DEV)
            .and_then(|w| w.to_dtype(loss.dtype()))
            .expect("w"),
    };
    loss.broadcast_mul(&r)
        .and_then(|l| l.sum_all())
        .expect("seed")
}

/// How far candle's composed ops in a half dtype may be from ours, relative to max |g|.
fn composed_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-12,
        DType::F32 => 2e-6,
        DType::F16 => 1e-2,
        _ => 6e-2,
    }
}

#[test]
fn gradients_match_composed_candle_for_every_dtype_and_option_set() {
    let data = values(N * C, 7, 4.0);
    for dtype in DTYPES {
        // The exact values the test's tensors hold, for the f64 reference.
        let exact = f64s(&tensor(&data, &[N, C], dtype));
        // The f64 reference for f64 input is no more accurate than ours: allow both errors.
        let u = unit_roundoff(dtype) * if dtype == DType::F64 { 8.0 } else { 1.0 };
        for (name, opts, targets) in option_sets() {
            for scale in [1.0, 3.0] {
                let what = format!("{dtype:?} {name} ×{scale}");
                let t = Tensor::new(&targets, DEV).expect("targets");

                let x = var(&exact, &[N, C], dtype);
                let loss = cross_entropy(&x, &t, &opts).expect("ours");
                let want_loss_dtype = if dtype == DType::F64 {
                    DType::F64
                } else {
                    DType::F32
                };
                assert_eq!(loss.dtype(), want_loss_dtype, "{what}: loss dtype");
                let ours_loss = f64s(&loss);
                let ours_grad = f64s(&grad(&seed(&loss, opts.reduction, scale), &x));

                // Reference 1: candle's composed ops in f64 on the same values.
                let x64 = var(&exact, &[N, C], DType::F64);
                let ref_loss = reference_ce(&x64, &targets, &opts).expect("reference f64");
                let ref64_loss = f64s(&ref_loss);
                let ref64_grad = f64s(&grad(&seed(&ref_loss, opts.reduction, scale), &x64));
                let loss_u = unit_roundoff(want_loss_dtype);
                assert_close(
                    &format!("{what}: loss vs f64 composed"),
                    &ours_loss,
                    &ref64_loss,
                    4.0 * loss_u * max_abs(&ref64_loss) + 1e-300,
                );
                let g_max = max_abs(&ref64_grad);
                assert!(g_max > 0.0, "{what}: a non-trivial gradient");
                assert_close(
                    &format!("{what}: grad vs f64 composed"),
                    &ours_grad,
                    &ref64_grad,
                    4.0 * u * g_max,
                );

                // Reference 2: candle's composed ops in the dtype itself.
                let xd = var(&exact, &[N, C], dtype);
                let ref_loss = reference_ce(&xd, &targets, &opts).expect("reference");
                let refd_grad = f64s(&grad(&seed(&ref_loss, opts.reduction, scale), &xd));
                assert_close(
                    &format!("{what}: grad vs {dtype:?} composed"),
                    &ours_grad,
                    &refd_grad,
                    composed_tolerance(dtype) * g_max,
                );
            }
        }
    }
}

#[test]
fn default_options_match_candle_nn_cross_entropy() {
    let data = values(N * C, 11, 6.0);
    for dtype in DTYPES {
        let exact = f64s(&tensor(&data, &[N, C], dtype));
        let t = Tensor::new(&TARGETS, DEV).expect("targets");
        let tu32 = t.to_dtype(DType::U32).expect("u32");

        let x = var(&exact, &[N, C], dtype);
        let loss = cross_entropy(&x, &t, &CrossEntropyOptions::default()).expect("ours");
        let ours = (f64s(&loss), f64s(&grad(&loss, &x)));

        let xc = var(&exact, &[N, C], dtype);
        let cl = candle_nn::loss::cross_entropy(&xc, &tu32).expect("candle");
        let theirs = (f64s(&cl), f64s(&grad(&cl, &xc)));

        let x64 = var(&exact, &[N, C], DType::F64);
        let cl64 = candle_nn::loss::cross_entropy(&x64, &tu32).expect("candle f64");
        let exact_ref = (f64s(&cl64), f64s(&grad(&cl64, &x64)));

        let g_max = max_abs(&exact_ref.1);
        let tol = composed_tolerance(dtype);
        assert_close(
            &format!("{dtype:?} loss vs candle"),
            &ours.0,
            &theirs.0,
            tol * 10.0 * exact_ref.0[0],
        );
        assert_close(
            &format!("{dtype:?} grad vs candle"),
            &ours.1,
            &theirs.1,
            tol * g_max,
        );
        let u = unit_roundoff(dtype) * if dtype == DType::F64 { 8.0 } else { 1.0 };
        assert_close(
            &format!("{dtype:?} grad vs candle f64"),
            &ours.1,
            &exact_ref.1,
            4.0 * u * g_max,
        );
    }
}

#[test]
fn cached_and_recomputed_gradients_agree() {
    let data = values(N * C, 3, 3.0);
    for dtype in DTYPES {
        for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
            let t = Tensor::new(&IGNORED, DEV).expect("targets");
            let run = |cache: bool, scale: f64| {
                let x = var(&data, &[N, C], dtype);
                let opts = CrossEntropyOptions {
                    reduction,
                    label_smoothing: 0.1,
                    cache_gradient: cache,
                    ..Default::default()
                };
                let loss = cross_entropy(&x, &t, &opts).expect("loss");
                (f64s(&loss), f64s(&grad(&seed(&loss, reduction, scale), &x)))
            };
            // With an incoming gradient of 1 the cached gradient is the recomputed one, bit for bit.
            assert_eq!(run(true, 1.0), run(false, 1.0), "{dtype:?} {reduction:?}");
            // Scaled: the cached path rounds once more.
            let (a, b) = (run(true, 3.0), run(false, 3.0));
            assert_eq!(a.0, b.0);
            assert_close(
                &format!("{dtype:?} {reduction:?} scaled"),
                &a.1,
                &b.1,
                2.0 * unit_roundoff(dtype) * max_abs(&b.1),
            );
        }
    }
}
