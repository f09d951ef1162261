//! Shapes, class dimensions, target dtypes, probability targets, errors and options of
//! `lse_candle::cross_entropy`.

mod common;

use candle_core::{DType, Tensor, Var};
use common::*;
use lse_candle::{cross_entropy, CrossEntropyOptions, NonFinite, Reduction};

fn opts() -> CrossEntropyOptions {
    CrossEntropyOptions::default()
}

fn err_text(r: candle_core::Result<Tensor>) -> String {
    match r {
        Ok(t) => panic!("expected an error, got {t}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn rank3_logits_equal_the_flattened_rows() {
    let data = values(2 * 3 * 5, 1, 3.0);
    let t = Tensor::new(&[[0i64, 4, 2], [1, 3, -100]], DEV).expect("t");
    let x3 = var(&data, &[2, 3, 5], DType::F32);
    let l3 = cross_entropy(&x3, &t, &opts()).expect("rank 3");
    let x2 = var(&data, &[6, 5], DType::F32);
    let l2 = cross_entropy(&x2, &t.flatten_all().expect("flat"), &opts()).expect("rank 2");
    assert_eq!(f64s(&l3), f64s(&l2));
    let g3 = grad(&l3, &x3);
    assert_eq!(g3.dims(), [2, 3, 5]);
    assert_eq!(f64s(&g3), f64s(&grad(&l2, &x2)));
}

#[test]
fn class_dim_1_matches_moving_the_classes_last_by_hand() {
    // N × C × H × W, PyTorch's layout for segmentation.
    let (n, c, h, w) = (2, 4, 3, 2);
    let data = values(n * c * h * w, 2, 3.0);
    let targets: Vec<i64> = (0..n * h * w)
        .map(|i| (i % (c + 1)) as i64)
        .map(|v| if v == 4 { -100 } else { v })
        .collect();
    let t = Tensor::from_vec(targets, (n, h, w), DEV).expect("t");
    for class_dim in [1, -3] {
        for reduction in [Reduction::Mean, Reduction::None] {
            let o = CrossEntropyOptions {
                class_dim,
                reduction,
                label_smoothing: 0.1,
                ..opts()
            };
            let x = var(&data, &[n, c, h, w], DType::F64);
            let loss = cross_entropy(&x, &t, &o).expect("class_dim 1");
            let by_hand = var(&data, &[n, c, h, w], DType::F64);
            let moved = by_hand.permute((0, 2, 3, 1)).expect("permute");
            let o_last = CrossEntropyOptions {
                class_dim: -1,
                ..o.clone()
            };
            let want = cross_entropy(&moved, &t, &o_last).expect("class last");
            if reduction == Reduction::None {
                assert_eq!(loss.dims(), [n, h, w]);
            }
            assert_eq!(f64s(&loss), f64s(&want));
            let (g, g_want) = (
                grad(&loss.sum_all().expect("s"), &x),
                grad(&want.sum_all().expect("s"), &by_hand),
            );
            assert_eq!(g.dims(), [n, c, h, w]);
            assert_eq!(
                f64s(&g),
                f64s(&g_want),
                "class_dim {class_dim} {reduction:?}"
            );
        }
    }
}

#[test]
fn non_contiguous_logits_are_copied() {
    let data = values(5 * 4, 3, 2.0);
    let t = Tensor::new(&[0u32, 3, 1, 2], DEV).expect("t");
    let xt = var(&data, &[5, 4], DType::F32); // classes × rows
    let x = xt.t().expect("transpose");
    assert!(!x.is_contiguous());
    let loss = cross_entropy(&x, &t, &opts()).expect("strided");
    let xc = Var::from_tensor(&x.contiguous().expect("c")).expect("var");
    let want = cross_entropy(&xc, &t, &opts()).expect("contiguous");
    assert_eq!(f64s(&loss), f64s(&want));
    let g = grad(&loss, &xt);
    assert_eq!(g.dims(), [5, 4]);
    assert_eq!(f64s(&g.t().expect("t")), f64s(&grad(&want, &xc)));
}

#[test]
fn every_integer_target_dtype_gives_the_same_loss() {
    let data = values(4 * 6, 4, 2.0);
    let x = tensor(&data, &[4, 6], DType::BF16);
    let t = Tensor::new(&[5i64, 0, 3, 2], DEV).expect("t");
    let want = f64s(&cross_entropy(&x, &t, &opts()).expect("i64"));
    for dtype in [DType::U32, DType::U8, DType::I32, DType::I16] {
        let got =
            f64s(&cross_entropy(&x, &t.to_dtype(dtype).expect("cast"), &opts()).expect("cast"));
        assert_eq!(got, want, "{dtype:?}");
    }
    // u32 targets with their own ignore index.
    let tu = Tensor::new(&[5u32, u32::MAX, 3, 2], DEV).expect("t");
    let o = CrossEntropyOptions {
        ignore_index: Some(i64::from(u32::MAX)),
        reduction: Reduction::None,
        ..opts()
    };
    let rows = f64s(&cross_entropy(&x, &tu, &o).expect("u32 ignore"));
    assert_eq!(rows[1], 0.0);
}

#[test]
fn one_hot_probability_targets_equal_class_targets() {
    let data = values(3 * 4, 5, 3.0);
    let classes = [2i64, 0, 3];
    let mut one_hot = vec![0.0; 12];
    for (r, &c) in classes.iter().enumerate() {
        one_hot[r * 4 + c as usize] = 1.0;
    }
    for dtype in DTYPES {
        let o = CrossEntropyOptions {
            label_smoothing: 0.1,
            z_loss: 1e-3,
            ..opts()
        };
        let x = var(&data, &[3, 4], dtype);
        let a = cross_entropy(&x, &Tensor::new(&classes, DEV).expect("t"), &o).expect("classes");
        let ga = f64s(&grad(&a, &x));
        let xp = var(&data, &[3, 4], dtype);
        // f32 probabilities for f16 / bf16 / f64 logits are converted to the logits' dtype.
        let b =
            cross_entropy(&xp, &tensor(&one_hot, &[3, 4], DType::F32), &o).expect("probabilities");
        let gb = f64s(&grad(&b, &xp));
        let u = unit_roundoff(dtype);
        assert_close(
            &format!("{dtype:?} loss"),
            &f64s(&a),
            &f64s(&b),
            4.0 * unit_roundoff(a.dtype()) * f64s(&a)[0],
        );
        assert_close(&format!("{dtype:?} grad"), &ga, &gb, 2.0 * u * max_abs(&ga));
    }
}

#[test]
fn soft_targets_and_their_gradient_match_composed_candle() {
    let (n, c) = (4, 5);
    let data = values(n * c, 6, 3.0);
    // Rows of non-negative targets that do not sum to 1 (allowed).
    let q: Vec<f64> = values(n * c, 9, 1.0).iter().map(|v| v.abs()).collect();
    let w = vec![1.0, 0.5, 2.0, 1.0, 0.25];
    let eps = 0.1;
    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
        let o = CrossEntropyOptions {
            weights: Some(w.clone()),
            label_smoothing: eps,
            reduction,
            ..opts()
        };
        let x = var(&data, &[n, c], DType::F64);
        let qt = var(&q, &[n, c], DType::F64);
        let loss = cross_entropy(&x, &qt, &o).expect("ours");
        let seed_w = Tensor::new(&[1.0, 2.0, 0.5, 3.0], DEV).expect("w");
        let seed = |l: &Tensor| match reduction {
            Reduction::None => (l * &seed_w).and_then(|l| l.sum_all()).expect("s"),
            _ => l.clone(),
        };
        let grads = seed(&loss).backward().expect("backward");
        let (gx, gq) = (
            f64s(grads.get(&x).expect("gx")),
            f64s(grads.get(&qt).expect("gq")),
        );

        // Composed: Σ_c w_c q̃_c (−log p_c), q̃ = (1 − ε) q + ε/C.
        let x2 = var(&data, &[n, c], DType::F64);
        let q2 = var(&q, &[n, c], DType::F64);
        let wt = Tensor::from_vec(w.clone(), (1, c), DEV).expect("w");
        let qs = ((q2.as_tensor() * (1.0 - eps)).expect("q") + eps / c as f64).expect("q");
        let logp = candle_nn::ops::log_softmax(&x2, 1).expect("logp");
        let rows = (logp * qs)
            .and_then(|t| t.broadcast_mul(&wt))
            .and_then(|t| t.sum(1))
            .and_then(|t| t.neg())
            .expect("rows");
        let want = match reduction {
            Reduction::None => rows,
            Reduction::Sum => rows.sum_all().expect("s"),
            Reduction::Mean => (rows.sum_all().expect("s") / n as f64).expect("m"),
        };
        assert_close(
            &format!("{reduction:?} loss"),
            &f64s(&loss),
            &f64s(&want),
            1e-13,
        );
        let grads = seed(&want).backward().expect("backward");
        assert_close(
            &format!("{reduction:?} dx"),
            &gx,
            &f64s(grads.get(&x2).expect("gx")),
            1e-14,
        );
        assert_close(
            &format!("{reduction:?} dq"),
            &gq,
            &f64s(grads.get(&q2).expect("gq")),
            1e-13,
        );
    }
}

#[test]
fn errors_carry_the_core_librarys_message() {
    let x = tensor(&values(2 * 3, 1, 1.0), &[2, 3], DType::F32);
    let t = |v: &[i64]| Tensor::new(v, DEV).expect("t");

    let e = err_text(cross_entropy(&x, &t(&[0, 7]), &opts()));
    assert!(
        e.starts_with("lse-candle cross_entropy: target 7 at row 1 is out of range for 3 classes"),
        "{e}"
    );

    let nan = tensor(&[0.0, f64::NAN, 1.0, 0.0, 0.0, 0.0], &[2, 3], DType::F16);
    let e = err_text(cross_entropy(&nan, &t(&[0, 1]), &opts()));
    assert!(e.contains("non-finite logit NaN at row 0, column 1"), "{e}");
    let propagated = CrossEntropyOptions {
        non_finite: NonFinite::Propagate,
        reduction: Reduction::None,
        ..opts()
    };
    let rows = f64s(&cross_entropy(&nan, &t(&[0, 1]), &propagated).expect("propagate"));
    assert!(rows[0].is_nan() && rows[1].is_finite());

    // The error of `x` against targets [0, 1] under `options`.
    let options_error =
        |options: CrossEntropyOptions| err_text(cross_entropy(&x, &t(&[0, 1]), &options));
    let e = options_error(CrossEntropyOptions {
        label_smoothing: 1.5,
        ..opts()
    });
    assert!(
        e.contains("option label_smoothing = 1.5 is invalid: in [0, 1]"),
        "{e}"
    );
    let e = options_error(CrossEntropyOptions {
        weights: Some(vec![1.0, 2.0]),
        ..opts()
    });
    assert!(e.contains("weights has 2 elements, expected 3"), "{e}");
    let e = options_error(CrossEntropyOptions {
        weights: Some(vec![1.0, f64::NAN, 1.0]),
        ..opts()
    });
    assert!(
        e.contains("class weight NaN for class 1 is not finite"),
        "{e}"
    );

    let e = options_error(CrossEntropyOptions {
        class_dim: 2,
        ..opts()
    });
    assert!(
        e.contains("class_dim 2 is out of range for logits of rank 2"),
        "{e}"
    );
    let e = err_text(cross_entropy(&x, &t(&[0, 1, 2]), &opts()));
    assert!(
        e.contains("class-index targets have shape [3], expected"),
        "{e}"
    );
    let e = err_text(cross_entropy(
        &x,
        &tensor(&[0.5; 4], &[2, 2], DType::F32),
        &opts(),
    ));
    assert!(e.contains("probability targets have shape [2, 2]"), "{e}");
    let e = err_text(cross_entropy(
        &x.to_dtype(DType::U32).expect("u32"),
        &t(&[0, 1]),
        &opts(),
    ));
    assert!(e.contains("logits have dtype u32"), "{e}");
    let e = err_text(cross_entropy(
        &Tensor::new(1.0f32, DEV).expect("s"),
        &t(&[0]),
        &opts(),
    ));
    assert!(e.contains("at least one dimension"), "{e}");
    let e = err_text(cross_entropy(
        &Tensor::zeros((2, 0), DType::F32, DEV).expect("z"),
        &t(&[0, 0]),
        &opts(),
    ));
    assert!(e.contains("the class dimension is empty"), "{e}");
}

#[test]
fn a_nan_incoming_gradient_is_an_error_under_the_default_policy() {
    for cache_gradient in [true, false] {
        let x = var(&values(6, 2, 1.0), &[2, 3], DType::F32);
        let o = CrossEntropyOptions {
            cache_gradient,
            ..opts()
        };
        let loss = cross_entropy(&x, &Tensor::new(&[0i64, 1], DEV).expect("t"), &o).expect("loss");
        let e = match (loss * f64::NAN).expect("nan").backward() {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains("non-finite output gradient NaN at row 0"),
            "cache {cache_gradient}: {e}"
        );
    }
}

#[test]
fn a_mean_over_nothing_is_zero_with_a_zero_gradient() {
    let x = var(&values(6, 2, 1.0), &[2, 3], DType::F32);
    let loss =
        cross_entropy(&x, &Tensor::new(&[-100i64, -100], DEV).expect("t"), &opts()).expect("loss");
    assert_eq!(f64s(&loss), [0.0]);
    assert_eq!(f64s(&grad(&loss, &x)), [0.0; 6]);
}

#[test]
fn untracked_logits_give_the_loss_only() {
    let x = tensor(&values(6, 2, 1.0), &[2, 3], DType::F32);
    let loss = cross_entropy(&x, &Tensor::new(&[0i64, 2], DEV).expect("t"), &opts()).expect("loss");
    assert!(f64s(&loss)[0] > 0.0);
    assert!(!loss.track_op());
}

#[test]
fn weight_tensor_and_lse_options() {
    let w = Tensor::new(&[0.5f32, 2.0, 1.0], DEV).expect("w");
    let o = opts().with_weight_tensor(&w).expect("weights");
    assert_eq!(o.weights, Some(vec![0.5, 2.0, 1.0]));
    assert!(opts()
        .with_weight_tensor(&w.reshape((1, 3)).expect("r"))
        .is_err());
    let full = CrossEntropyOptions {
        class_dim: 1,
        ignore_index: None,
        label_smoothing: 0.1,
        z_loss: 1e-4,
        softcap: Some(30.0),
        reduction: Reduction::Sum,
        non_finite: NonFinite::Propagate,
        empty_mean: lse_candle::EmptyMean::Nan,
        ..o
    };
    let l = full.to_lse();
    assert_eq!(l.weights, Some(&[0.5, 2.0, 1.0][..]));
    assert_eq!(
        (l.ignore_index, l.label_smoothing, l.z_loss, l.softcap),
        (None, 0.1, 1e-4, Some(30.0))
    );
    assert_eq!(
        (l.reduction, l.non_finite, l.empty_mean),
        (
            Reduction::Sum,
            NonFinite::Propagate,
            lse_candle::EmptyMean::Nan
        )
    );
}
