//! Results are bitwise identical for any number of threads (rayon pools of 1, 2 and 3), for
//! every op and dtype, on shapes that split into many row tasks and on long rows that split into
//! pieces merged with the row-state rule; the in-place loss equals the out-of-place one bit for
//! bit; and an error names the smallest bad row whichever thread finds it.

use lse::{CrossEntropyOptions, Element, GradOutput, LseError, NonFinite, Reduction, Targets};
use lse_testkit::rng::Rng;
use lse_testkit::{all_dtypes, Stat, INF, NAN, NEG};

/// Deterministic logits: uniform in [−6, 6) (the kit's splitmix64), every 97th class masked.
fn logits<E: Element>(rows: usize, classes: usize, seed: u64) -> Vec<E> {
    let mut rng = Rng::new(seed);
    (0..rows * classes)
        .map(|i| {
            let u = rng.range(-6.0, 6.0);
            if i % 97 == 5 {
                NEG
            } else {
                u
            }
        })
        .map(E::from_f64)
        .collect()
}

fn bits<E: Element>(v: &[E]) -> Vec<u64> {
    v.iter().map(|x| x.to_f64().to_bits()).collect()
}

fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
        .install(f)
}

/// Every op's outputs on one input, as bits.
fn all_outputs<E: Element>(x: &[E], classes: usize) -> Vec<Vec<u64>> {
    let rows = x.len() / classes;
    let n = x.len();
    let mut outputs = Vec::new();
    let mut lse = vec![<Stat<E>>::zero(); rows];
    lse::logsumexp(x, classes, &mut lse).unwrap();
    outputs.push(bits(&lse));
    let mut p = vec![E::zero(); n];
    lse::softmax(x, classes, &mut p).unwrap();
    outputs.push(bits(&p));
    let mut lp = vec![E::zero(); n];
    lse::log_softmax(x, classes, &mut lp).unwrap();
    outputs.push(bits(&lp));
    let dy: Vec<E> = logits(rows, classes, 7)
        .iter()
        .map(|v: &E| E::from_f64(v.to_f64().max(-6.0) / 6.0))
        .collect();
    let mut dx = vec![E::zero(); n];
    lse::softmax_backward(&p, &dy, classes, &mut dx).unwrap();
    outputs.push(bits(&dx));
    lse::log_softmax_backward(&lp, &dy, classes, &mut dx).unwrap();
    outputs.push(bits(&dx));
    // Every fifth row ignored; never a masked class as target.
    let targets: Vec<i64> = (0..rows)
        .map(|r| {
            let t = (r * 31) % classes;
            let masked = (r * classes + t) % 97 == 5;
            if r % 5 == 4 || masked {
                -100
            } else {
                t as i64
            }
        })
        .collect();
    // Probability targets: the softmax of x/2 (0 on masked classes), and x's own softmax,
    // whose gradient cancels on every class (the vector pass then defers to the scalar one).
    let halved: Vec<E> = x.iter().map(|v| E::from_f64(v.to_f64() / 2.0)).collect();
    let mut soft = vec![E::zero(); n];
    lse::softmax(&halved, classes, &mut soft).unwrap();
    let weights: Vec<f64> = (0..classes).map(|c| 0.5 + (c % 7) as f64 / 4.0).collect();
    let classes_of = Targets::Classes(&targets);
    for (options, targets) in [
        (CrossEntropyOptions::default(), classes_of),
        (
            CrossEntropyOptions {
                label_smoothing: 0.1,
                z_loss: 1e-3,
                keep_row_loss: true,
                keep_logit_stats: true,
                non_finite: NonFinite::Propagate,
                ..Default::default()
            },
            classes_of,
        ),
        (
            CrossEntropyOptions {
                softcap: Some(5.0),
                reduction: Reduction::Sum,
                non_finite: NonFinite::Propagate,
                ..Default::default()
            },
            classes_of,
        ),
        (
            CrossEntropyOptions {
                softcap: Some(8.0),
                label_smoothing: 0.1,
                keep_row_loss: true,
                non_finite: NonFinite::Propagate,
                ..Default::default()
            },
            classes_of,
        ),
        (
            CrossEntropyOptions {
                softcap: Some(12.0),
                label_smoothing: 0.05,
                weights: Some(&weights),
                z_loss: 1e-4,
                keep_row_loss: true,
                non_finite: NonFinite::Propagate,
                ..Default::default()
            },
            Targets::Probabilities(&soft),
        ),
        (
            CrossEntropyOptions {
                label_smoothing: 0.1,
                weights: Some(&weights),
                keep_row_loss: true,
                non_finite: NonFinite::Propagate,
                ..Default::default()
            },
            classes_of,
        ),
        (
            CrossEntropyOptions {
                keep_row_loss: true,
                non_finite: NonFinite::Propagate,
                ..Default::default()
            },
            Targets::Probabilities(&soft),
        ),
        (
            CrossEntropyOptions {
                label_smoothing: 0.05,
                weights: Some(&weights),
                z_loss: 1e-4,
                non_finite: NonFinite::Propagate,
                ..Default::default()
            },
            Targets::Probabilities(&p),
        ),
    ] {
        let mut grad = vec![E::zero(); n];
        let out = lse::cross_entropy_with_grad(
            x,
            classes,
            targets,
            &options,
            GradOutput::Scalar(E::Stat::from_f64(0.5)),
            &mut grad,
        )
        .unwrap();
        let mut in_place = x.to_vec();
        let out_in_place = lse::cross_entropy_in_place(
            &mut in_place,
            classes,
            targets,
            &options,
            GradOutput::Scalar(E::Stat::from_f64(0.5)),
        )
        .unwrap();
        assert_eq!(bits(&grad), bits(&in_place), "in-place gradient");
        assert_eq!(
            out.loss.to_f64().to_bits(),
            out_in_place.loss.to_f64().to_bits()
        );
        let loss_only = lse::cross_entropy(x, classes, targets, &options).unwrap();
        assert_eq!(
            out.loss.to_f64().to_bits(),
            loss_only.loss.to_f64().to_bits(),
            "loss-only vs fused"
        );
        outputs.push(bits(&grad));
        outputs.push(vec![out.loss.to_f64().to_bits()]);
        if let Some(row_loss) = out.row_loss {
            outputs.push(bits(&row_loss));
        }
        if let Some(stats) = out.logit_stats {
            outputs.push(vec![
                stats.max.to_bits(),
                stats.min.to_bits(),
                stats.lse_mean.to_bits(),
                stats.neg_inf,
            ]);
        }
    }
    outputs
}

/// Many rows (several row tasks) and long rows (several 32 Ki-element pieces each, merged in
/// order). `LSE_TEST_PLAN=small` (the aarch64 run under emulation) keeps both kinds, smaller:
/// 150 rows of 1000 are three row tasks of 2^16 elements, a row of 70 000 three pieces.
fn thread_shapes() -> &'static [(usize, usize)] {
    match std::env::var("LSE_TEST_PLAN").as_deref() {
        Ok("small") => &[(150, 1000), (2, 70_000)],
        Ok("test") | Err(_) => &[(300, 1000), (3, 100_000), (1, 262_144)],
        Ok(other) => panic!("LSE_TEST_PLAN={other}: `small` or `test`"),
    }
}

fn identical_for_any_thread_count<E: Element>() {
    for &(rows, classes) in thread_shapes() {
        let x = logits::<E>(rows, classes, 42);
        let one = in_pool(1, || all_outputs(&x, classes));
        for threads in [2, 3] {
            let many = in_pool(threads, || all_outputs(&x, classes));
            assert_eq!(one.len(), many.len());
            for (k, (a, b)) in one.iter().zip(&many).enumerate() {
                assert!(
                    a == b,
                    "{rows}x{classes} {}: output #{k} differs between 1 and {threads} threads",
                    E::DTYPE
                );
            }
        }
    }
}

all_dtypes!(identical_for_any_thread_count);

fn smallest_bad_row_is_named<E: Element>() {
    let (rows, classes) = (400, 1000);
    let mut x = logits::<E>(rows, classes, 3);
    // Bad values in rows far apart: different row tasks, found by different threads.
    x[350 * classes + 2] = E::from_f64(NAN);
    x[17 * classes + 9] = E::from_f64(INF);
    x[200 * classes + 1] = E::from_f64(NAN);
    let targets = vec![0i64; rows];
    for threads in [1, 2, 3] {
        let named = in_pool(threads, || {
            let mut p = vec![E::zero(); x.len()];
            let softmax = lse::softmax(&x, classes, &mut p).unwrap_err();
            let ce = lse::cross_entropy(
                &x,
                classes,
                Targets::Classes(&targets),
                &CrossEntropyOptions::default(),
            )
            .unwrap_err();
            let mut in_place = x.clone();
            let in_place_err = lse::cross_entropy_in_place(
                &mut in_place,
                classes,
                Targets::Classes(&targets),
                &CrossEntropyOptions::default(),
                GradOutput::default(),
            )
            .unwrap_err();
            // The named row (and every other bad row) still holds its logits.
            for r in [17, 200, 350] {
                let row = r * classes..(r + 1) * classes;
                assert_eq!(bits(&in_place[row.clone()]), bits(&x[row]), "row {r}");
            }
            [softmax, ce, in_place_err]
        });
        for err in named {
            assert!(
                matches!(
                    err,
                    LseError::NonFinite {
                        row: 17,
                        column: 9,
                        ..
                    }
                ),
                "{threads} threads: {err}"
            );
        }
    }
}

all_dtypes!(smallest_bad_row_is_named);

/// A NaN is found wherever it sits in a long row: among finite logits, as the only non-masked
/// value of a block of `-inf`, in a block of nothing but NaN, or next to the block's maximum;
/// `+inf` likewise. Every read pass names its column.
fn non_finite_found_in_any_block<E: Element>() {
    let classes = 10_000;
    let mut cases: Vec<(Vec<E>, usize)> = Vec::new();
    let base = logits::<E>(1, classes, 11);
    // NaN among finite logits, late in the row.
    let mut x = base.clone();
    x[9_001] = E::from_f64(NAN);
    cases.push((x, 9_001));
    // One NaN in a stretch of -inf that covers whole vector blocks.
    let mut x = base.clone();
    x[4_000..8_500].fill(E::from_f64(NEG));
    x[6_123] = E::from_f64(NAN);
    cases.push((x, 6_123));
    // A stretch of nothing but NaN.
    let mut x = base.clone();
    x[4_000..8_500].fill(E::from_f64(NAN));
    cases.push((x, 4_000));
    // +inf next to finite values, and NaN beside the row's largest logit.
    let mut x = base.clone();
    x[7_777] = E::from_f64(INF);
    cases.push((x, 7_777));
    let mut x = base.clone();
    x[3_000] = E::from_f64(100.0);
    x[3_001] = E::from_f64(NAN);
    cases.push((x, 3_001));
    for (x, column) in cases {
        let named = |err: LseError| match err {
            LseError::NonFinite {
                row: 0, column: c, ..
            } => c,
            other => panic!("{other}"),
        };
        let mut out = vec![E::zero(); classes];
        let mut lse = vec![<E::Stat as Element>::zero(); 1];
        let errors = [
            lse::softmax(&x, classes, &mut out).unwrap_err(),
            lse::log_softmax(&x, classes, &mut out).unwrap_err(),
            lse::logsumexp(&x, classes, &mut lse).unwrap_err(),
            lse::cross_entropy_with_grad(
                &x,
                classes,
                Targets::Classes(&[0]),
                &CrossEntropyOptions::default(),
                GradOutput::default(),
                &mut out,
            )
            .unwrap_err(),
        ];
        for err in errors {
            assert_eq!(named(err), column);
        }
    }
}

all_dtypes!(non_finite_found_in_any_block);
