//! What a training loop logs beside the loss, from the loss's own call: each row's argmax and
//! the token accuracy ([`CrossEntropyOptions::keep_row_argmax`]) and the z-loss term
//! ([`CrossEntropyOutput::z_loss`]), in every dtype and through every entry point (out of
//! place, in place, chunked, the fused linear loss, the split vocabulary).
//!
//! References are lse-testkit's: `torch_argmax` (the first column holding the row's largest
//! value, a plain loop) and `Σ z·lse²` from the oracle's exact logsumexp; the rows are long enough (up to 5000 classes) that ties and maxima fall in different blocks
//! of every kernel.

use lse::{
    cross_entropy, cross_entropy_in_place, cross_entropy_with_grad, linear_cross_entropy,
    linear_cross_entropy_with_grad, sharded, ChunkedCrossEntropy, CrossEntropyOptions,
    CrossEntropyOutput, Element, GradOutput, LinearCrossEntropyOptions, LinearGradients,
    LinearHead, NonFinite, Reduction, Targets,
};
use lse_testkit::oracle::{logsumexp_f64, torch_argmax};
use lse_testkit::{all_dtypes, rng::Rng, NAN, NEG};

all_dtypes!(
    argmax_is_the_first_largest_logit,
    argmax_in_place_is_taken_before_the_gradient,
    argmax_of_propagated_rows_follows_torch,
    accuracy_counts_rows_on_target,
    asking_for_metrics_changes_no_bit,
    z_loss_term_is_the_z_share_of_the_loss,
);

const IGNORE: i64 = -100;

/// `torch.argmax` of a row, as lse's row indices are.
fn reference_argmax(row: &[f64]) -> i64 {
    torch_argmax(row) as i64
}

/// `rows` rows of `classes` logits in `E`, with ties at the row max planted in other blocks
/// (the max and a copy of it at least 256 and 2048 columns apart where the row allows), some
/// masked columns, and the max at the last column in some rows.
fn logits<E: Element>(rng: &mut Rng, rows: usize, classes: usize) -> Vec<E> {
    let mut out = Vec::with_capacity(rows * classes);
    for r in 0..rows {
        let mut row: Vec<f64> = (0..classes).map(|_| 4.0 * rng.normal()).collect();
        for _ in 0..classes / 10 {
            row[rng.below(classes)] = NEG;
        }
        let top = 20.0 + r as f64;
        match r % 4 {
            0 => row[classes - 1] = top,
            1 => {
                let first = rng.below(classes);
                row[first] = top;
                row[(first + 2049) % classes] = top;
                row[(first + 257) % classes] = top;
            }
            _ => row[rng.below(classes)] = top,
        }
        out.extend(row.into_iter().map(E::from_f64));
    }
    out
}

/// The first column at or after `c` (wrapping) whose logit is not `-inf`: a valid target.
fn live<E: Element>(x: &[E], classes: usize, r: usize, c: usize) -> i64 {
    let row = &x[r * classes..(r + 1) * classes];
    let found = (0..classes)
        .map(|k| (c + k) % classes)
        .find(|&k| row[k].to_f64() > NEG);
    found.expect("a row with a finite logit") as i64
}

fn row_f64<E: Element>(x: &[E], classes: usize, r: usize) -> Vec<f64> {
    x[r * classes..(r + 1) * classes]
        .iter()
        .map(|v| v.to_f64())
        .collect()
}

fn with_argmax<'a>() -> CrossEntropyOptions<'a> {
    CrossEntropyOptions {
        keep_row_argmax: true,
        ..Default::default()
    }
}

fn argmax_is_the_first_largest_logit<E: Element>() {
    let mut rng = Rng::new(7);
    for classes in [1, 3, 255, 257, 1000, 2049, 5000] {
        let rows = 9;
        let x = logits::<E>(&mut rng, rows, classes);
        let targets: Vec<i64> = (0..rows).map(|r| live(&x, classes, r, r)).collect();
        let options = with_argmax();
        let out = cross_entropy(&x, classes, Targets::Classes(&targets), &options).unwrap();
        let got = out.row_argmax.expect("asked for");
        for (r, &g) in got.iter().enumerate() {
            let want = reference_argmax(&row_f64(&x, classes, r));
            assert_eq!(g, want, "{} classes {classes} row {r}", E::DTYPE);
        }
    }
}

fn argmax_in_place_is_taken_before_the_gradient<E: Element>() {
    let mut rng = Rng::new(8);
    let (rows, classes) = (8, 3000);
    let x = logits::<E>(&mut rng, rows, classes);
    // Targets on the argmax: the gradient there is p − 1 < 0, so the gradient's own argmax
    // (what an argmax taken after the write would find) is another column.
    let targets: Vec<i64> = (0..rows)
        .map(|r| reference_argmax(&row_f64(&x, classes, r)))
        .collect();
    let options = with_argmax();
    let mut grad = vec![E::zero(); x.len()];
    let classes_of = Targets::Classes(&targets);
    let out = cross_entropy_with_grad(
        &x,
        classes,
        classes_of,
        &options,
        GradOutput::default(),
        &mut grad,
    )
    .unwrap();
    let mut buf = x.clone();
    let in_place = cross_entropy_in_place(
        &mut buf,
        classes,
        classes_of,
        &options,
        GradOutput::default(),
    )
    .unwrap();
    assert_eq!(out.row_argmax, in_place.row_argmax);
    assert_eq!(in_place.row_argmax.as_ref(), Some(&targets));
    // A control: the argmax of what the in-place call leaves (the gradient) differs in every row.
    for (r, &target) in targets.iter().enumerate() {
        assert_ne!(
            reference_argmax(&row_f64(&buf, classes, r)),
            target,
            "row {r}"
        );
    }
}

fn argmax_of_propagated_rows_follows_torch<E: Element>() {
    let classes = 600;
    let mut x = vec![E::from_f64(0.0); 4 * classes];
    // Row 0: +inf at 300, then NaN at 500 → the NaN. Row 1: +inf at 10 and 400 → 10.
    // Row 2: every logit -inf → 0. Row 3: the max 2 at 599, last.
    x[300] = E::from_f64(f64::INFINITY);
    x[500] = E::from_f64(NAN);
    x[classes + 10] = E::from_f64(f64::INFINITY);
    x[classes + 400] = E::from_f64(f64::INFINITY);
    x[2 * classes..3 * classes].fill(E::from_f64(NEG));
    x[4 * classes - 1] = E::from_f64(2.0);
    let options = CrossEntropyOptions {
        non_finite: NonFinite::Propagate,
        ignore_index: None,
        ..with_argmax()
    };
    let targets = [500, 10, 0, 599];
    let out = cross_entropy(&x, classes, Targets::Classes(&targets), &options).unwrap();
    assert_eq!(out.row_argmax, Some(vec![500, 10, 0, 599]));
    for r in 0..4 {
        assert_eq!(
            out.row_argmax.as_ref().unwrap()[r],
            reference_argmax(&row_f64(&x, classes, r))
        );
    }
}

fn accuracy_counts_rows_on_target<E: Element>() {
    let mut rng = Rng::new(9);
    let (rows, classes) = (40, 700);
    let x = logits::<E>(&mut rng, rows, classes);
    let want_argmax: Vec<i64> = (0..rows)
        .map(|r| reference_argmax(&row_f64(&x, classes, r)))
        .collect();
    // Every third row on target, every fifth ignored, the rest off target.
    let targets: Vec<i64> = (0..rows)
        .map(|r| match r {
            _ if r % 5 == 0 => IGNORE,
            _ if r % 3 == 0 => want_argmax[r],
            _ => live(&x, classes, r, want_argmax[r] as usize + 1),
        })
        .collect();
    let on_target = (0..rows).filter(|r| r % 5 != 0 && r % 3 == 0).count();
    let counted = (0..rows).filter(|r| r % 5 != 0).count();
    let options = with_argmax();
    let out = cross_entropy(&x, classes, Targets::Classes(&targets), &options).unwrap();
    assert_eq!(out.correct_rows, Some(on_target));
    assert_eq!(out.accuracy(), Some(on_target as f64 / counted as f64));
    let argmax = out.row_argmax.as_ref().unwrap();
    for r in 0..rows {
        let want = if targets[r] == IGNORE {
            -1
        } else {
            want_argmax[r]
        };
        assert_eq!(argmax[r], want, "row {r}");
    }

    // Chunks of rows give what one call gives.
    let mut chunked =
        ChunkedCrossEntropy::<E>::new(classes, &targets, &options, GradOutput::default()).unwrap();
    for chunk in x.chunks(7 * classes) {
        chunked.next_rows(chunk, None).unwrap();
    }
    let chunked = chunked.finish();
    assert_eq!(chunked.row_argmax, out.row_argmax);
    assert_eq!(chunked.correct_rows, out.correct_rows);

    // Probability targets: argmax per row, no accuracy.
    let uniform = E::from_f64(1.0 / classes as f64);
    let probs: Vec<E> = x
        .iter()
        .map(|v| if v.to_f64() > NEG { uniform } else { E::zero() })
        .collect();
    let soft = cross_entropy(&x, classes, Targets::Probabilities(&probs), &options).unwrap();
    assert_eq!(soft.row_argmax, Some(want_argmax));
    assert_eq!(soft.correct_rows, None);
    assert_eq!(soft.accuracy(), None);
    // Not asked for: nothing.
    let plain = cross_entropy(&x, classes, Targets::Classes(&targets), &Default::default());
    let plain = plain.unwrap();
    assert_eq!((plain.row_argmax, plain.correct_rows), (None, None));
}

fn same_loss<S: Element>(a: &CrossEntropyOutput<S>, b: &CrossEntropyOutput<S>) {
    assert_eq!(a.loss.to_f64().to_bits(), b.loss.to_f64().to_bits());
    assert_eq!(a.z_loss.to_f64().to_bits(), b.z_loss.to_f64().to_bits());
    let bits = |v: &Option<Vec<S>>| {
        v.as_ref()
            .map(|v| v.iter().map(|x| x.to_f64().to_bits()).collect::<Vec<_>>())
    };
    assert_eq!(bits(&a.row_loss), bits(&b.row_loss));
}

fn asking_for_metrics_changes_no_bit<E: Element>() {
    let mut rng = Rng::new(10);
    let (rows, classes) = (12, 2500);
    let x = logits::<E>(&mut rng, rows, classes);
    let targets: Vec<i64> = (0..rows).map(|r| live(&x, classes, r, r * 97)).collect();
    let plain = CrossEntropyOptions {
        label_smoothing: 0.1,
        z_loss: 1e-4,
        softcap: Some(30.0),
        keep_row_loss: true,
        ..Default::default()
    };
    let asked = CrossEntropyOptions {
        keep_row_argmax: true,
        ..plain
    };
    let targets = Targets::Classes(&targets);
    let run = |options: &CrossEntropyOptions<'_>| {
        let mut grad = vec![E::zero(); x.len()];
        let out = cross_entropy_with_grad(
            &x,
            classes,
            targets,
            options,
            GradOutput::default(),
            &mut grad,
        )
        .unwrap();
        (
            out,
            grad.iter()
                .map(|g| g.to_f64().to_bits())
                .collect::<Vec<_>>(),
        )
    };
    let ((a, ga), (b, gb)) = (run(&plain), run(&asked));
    same_loss(&a, &b);
    assert_eq!(ga, gb);
}

fn z_loss_term_is_the_z_share_of_the_loss<E: Element>() {
    let mut rng = Rng::new(11);
    let (rows, classes) = (16, 1500);
    let x = logits::<E>(&mut rng, rows, classes);
    let targets: Vec<i64> = (0..rows)
        .map(|r| {
            if r % 6 == 5 {
                IGNORE
            } else {
                live(&x, classes, r, r * 31)
            }
        })
        .collect();
    let z = 1e-3;
    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
        let with_z = CrossEntropyOptions {
            z_loss: z,
            reduction,
            ..Default::default()
        };
        let without = CrossEntropyOptions {
            z_loss: 0.0,
            ..with_z
        };
        let t = Targets::Classes(&targets);
        let a = cross_entropy(&x, classes, t, &with_z).unwrap();
        let b = cross_entropy(&x, classes, t, &without).unwrap();
        let sum: f64 = (0..rows)
            .filter(|&r| targets[r] != IGNORE)
            .map(|r| z * logsumexp_f64(&row_f64(&x, classes, r)).powi(2))
            .sum();
        let want = if reduction == Reduction::Mean {
            sum / a.counted_rows as f64
        } else {
            sum
        };
        let u = <E::Stat as Element>::DTYPE.unit_roundoff();
        let (got, loss, ce): (f64, f64, f64) = (a.z_loss.into(), a.loss.into(), b.loss.into());
        assert!(
            (got - want).abs() <= 8.0 * u * want,
            "{} {reduction:?}: z-loss term {got:e}, reference {want:e}",
            E::DTYPE
        );
        // The loss is the cross-entropy plus that term (each rounded once to the loss dtype).
        assert!(
            (loss - (ce + got)).abs() <= 4.0 * u * loss.abs(),
            "{} {reduction:?}: loss {loss:e} vs CE {ce:e} + z {got:e}",
            E::DTYPE
        );
        assert_eq!(b.z_loss.to_f64(), 0.0);
    }
}

/// The fused linear loss reports the argmax and z-loss term of its logits `H·Wᵀ`: against
/// [`cross_entropy`] on logits formed here in `f64` (rows whose top two logits are closer
/// than the `f32` product's error bound are not compared), with and without gradients.
#[test]
fn linear_loss_reports_argmax_accuracy_and_z_term() {
    let mut rng = Rng::new(12);
    let (rows, dim, classes) = (48, 32, 900);
    let hidden: Vec<f32> = (0..rows * dim).map(|_| rng.normal() as f32).collect();
    let weight: Vec<f32> = (0..classes * dim).map(|_| rng.normal() as f32).collect();
    let logits: Vec<f64> = (0..rows * classes)
        .map(|i| {
            let (r, c) = (i / classes, i % classes);
            (0..dim)
                .map(|k| f64::from(hidden[r * dim + k]) * f64::from(weight[c * dim + k]))
                .sum()
        })
        .collect();
    let argmax: Vec<i64> = (0..rows)
        .map(|r| reference_argmax(&logits[r * classes..(r + 1) * classes]))
        .collect();
    let targets: Vec<i64> = (0..rows)
        .map(|r| match r % 4 {
            0 => IGNORE,
            1 | 2 => argmax[r],
            _ => (argmax[r] + 5) % classes as i64,
        })
        .collect();
    let options = LinearCrossEntropyOptions {
        cross_entropy: CrossEntropyOptions {
            z_loss: 1e-4,
            keep_row_argmax: true,
            ..Default::default()
        },
        // A few rows a chunk: the chunks' argmaxes are put together in row order.
        budget_bytes: 5 * classes * 4,
    };
    let head = LinearHead {
        weight: &weight,
        bias: None,
        classes,
    };
    let out = linear_cross_entropy(&hidden, head, Targets::Classes(&targets), &options).unwrap();
    let got = out.row_argmax.as_ref().unwrap();
    let mut compared = 0;
    for r in 0..rows {
        let row = &logits[r * classes..(r + 1) * classes];
        let mut sorted = row.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        // |f32 product − exact| ≤ dim·u32·Σ|h_k w_k| ≈ dim·u32·dim·16: far under 1e-2.
        if targets[r] == IGNORE {
            assert_eq!(got[r], -1);
        } else if sorted[0] - sorted[1] > 1e-2 {
            assert_eq!(got[r], argmax[r], "row {r}");
            compared += 1;
        }
    }
    assert!(compared > rows / 2, "only {compared} rows compared");
    let counted = rows - rows / 4;
    let on_target = (0..rows).filter(|r| r % 4 == 1 || r % 4 == 2).count();
    assert_eq!(out.correct_rows, Some(on_target));
    assert_eq!(out.counted_rows, counted);
    let z: f64 = (0..rows)
        .filter(|&r| targets[r] != IGNORE)
        .map(|r| 1e-4 * logsumexp_f64(&logits[r * classes..(r + 1) * classes]).powi(2))
        .sum::<f64>()
        / counted as f64;
    assert!(
        (f64::from(out.z_loss) - z).abs() <= 1e-5 * z,
        "z-loss term {} vs {z}",
        out.z_loss
    );

    // The same with gradients.
    let (mut dh, mut dw) = (vec![0.0f32; hidden.len()], vec![0.0f32; weight.len()]);
    let grads = LinearGradients {
        hidden: &mut dh,
        weight: &mut dw,
        bias: None,
    };
    let with_grad = linear_cross_entropy_with_grad(
        &hidden,
        head,
        Targets::Classes(&targets),
        &options,
        GradOutput::default(),
        grads,
    )
    .unwrap();
    assert_eq!(with_grad.row_argmax, out.row_argmax);
    assert_eq!(with_grad.correct_rows, out.correct_rows);
    assert_eq!(with_grad.z_loss.to_bits(), out.z_loss.to_bits());
}

/// A split vocabulary reports the z-loss term of the whole rows; argmaxes, which no shard has
/// alone, are not gathered.
#[test]
fn split_vocabulary_reports_the_z_term() {
    let mut rng = Rng::new(13);
    let (rows, classes) = (10, 1000);
    let x = logits::<f64>(&mut rng, rows, classes);
    let targets: Vec<i64> = (0..rows).map(|r| live(&x, classes, r, r * 7)).collect();
    let options = CrossEntropyOptions {
        z_loss: 1e-3,
        ..with_argmax()
    };
    let whole = cross_entropy(&x, classes, Targets::Classes(&targets), &options).unwrap();
    let mut merged = vec![sharded::RowPartial::EMPTY; rows];
    for index in 0..3 {
        let shard = sharded::Shard::split_evenly(index, 3, classes).unwrap();
        let part: Vec<f64> = (0..rows)
            .flat_map(|r| x[r * classes + shard.start()..r * classes + shard.stop()].to_vec())
            .collect();
        let mut partials = vec![sharded::RowPartial::EMPTY; rows];
        sharded::cross_entropy_partials(&part, shard, &targets, &options, &mut partials).unwrap();
        sharded::RowPartial::merge_rows(&mut merged, &partials);
    }
    let split = sharded::cross_entropy_finish::<f64>(&merged, classes, &targets, &options).unwrap();
    assert!((split.z_loss - whole.z_loss).abs() <= 1e-14 * whole.z_loss);
    assert!(whole.z_loss > 0.0);
    assert_eq!((split.row_argmax, split.correct_rows), (None, None));
}
