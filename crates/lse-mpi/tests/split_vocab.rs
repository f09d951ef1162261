//! Vocabulary-parallel cross-entropy, logsumexp, softmax and log_softmax under `mpirun -np K`
//! (K = 1, 2, 3, …): every rank builds the same full logits, keeps its columns, and holds the
//! split result against the one-process `lse` result on the full rows. No test harness (one MPI
//! initialisation per process, every rank running the same checks in the same order); a failed
//! check panics, and the panic hook aborts the whole job.
//!
//! Run: `cargo test --no-run`, then `mpirun -np 2 target/debug/deps/split_vocab-*` (the README's
//! MPI section; `.ci/run` does it for 2 and 3 ranks).

use lse::sharded::{self, RowPartial, Shard, ShardTargets};
use lse::{
    CrossEntropyOptions, Element, GradOutput, LinearCrossEntropyOptions, LinearGradients,
    LinearHead, LseError, NonFinite, Targets,
};
use lse_mpi::{Error, VocabParallel};
use lse_testkit::options::split_option_sets;
use lse_testkit::rng::Rng;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

const NEG: f64 = f64::NEG_INFINITY;
const CLASSES: usize = 11;

/// The full logits and targets, the same on every rank: rows for the contract's edge cases,
/// then pseudo-random rows.
fn batch() -> (Vec<f64>, Vec<i64>) {
    let mut rows: Vec<([f64; CLASSES], i64)> = vec![
        (
            [0.5, -1.2, 3.3, 2.0, -0.7, 1.1, 0.0, 0.2, -2.0, 1.5, 0.9],
            3,
        ),
        (
            [
                1e4, 9999.5, -1e4, 9997.0, 1e4, -9999.0, 0.0, 1e4, 9998.0, -1e4, 9999.9,
            ],
            6,
        ),
        (
            [
                1e30, -1e30, 5e29, 0.0, 1e30, -3e29, 2e29, -1e30, 1e29, 0.0, 7e29,
            ],
            1,
        ),
        // Fully masked on the leading columns (a whole shard under most layouts).
        ([NEG, NEG, NEG, NEG, NEG, NEG, 2.0, 1.0, NEG, 0.5, 0.0], 7),
        // Ignored: its NaN and +inf are never read.
        (
            [
                f64::NAN,
                1.0,
                f64::INFINITY,
                0.0,
                2.0,
                3.0,
                4.0,
                0.0,
                0.0,
                0.0,
                0.0,
            ],
            -100,
        ),
        ([30.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], 0),
        ([5.0, 5.0, 5.0, 1.0, 5.0, 2.0, 5.0, 5.0, 0.0, 5.0, 5.0], 10),
        (
            [
                -1e4, -9999.0, -1e4, -1e4, -9998.5, -1e4, -1e4, -1e4, -1e4, -1e4, -9999.5,
            ],
            4,
        ),
    ];
    // Targets on every class, hence on every shard boundary of every layout below.
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    for t in 0..CLASSES {
        let mut row = [0.0; CLASSES];
        for v in &mut row {
            *v = rng.range(-6.0, 6.0);
        }
        rows.push((row, t as i64));
    }
    (
        rows.iter().flat_map(|(r, _)| r.iter().copied()).collect(),
        rows.iter().map(|&(_, t)| t).collect(),
    )
}

const WEIGHTS: [f64; CLASSES] = [0.5, 2.0, 1.0, 1.5, 0.25, 3.0, 1.0, 0.75, 1.25, 2.5, 1.0];

/// Shard layouts for `size` ranks: near-equal (uneven when `size` does not divide 11), skewed
/// (one column, two, then the rest), and one whose first rank holds nothing.
fn layouts(size: usize) -> Vec<(&'static str, Vec<usize>)> {
    let even: Vec<usize> = (0..size)
        .map(|r| Shard::split_evenly(r, size, CLASSES).unwrap().start())
        .chain([CLASSES])
        .collect();
    let skewed: Vec<usize> = (0..size)
        .map(|r| r * (r + 1) / 2)
        .chain([CLASSES])
        .collect();
    let empty_first: Vec<usize> = [0]
        .into_iter()
        .chain((1..size).map(|r| (r - 1) * 3))
        .chain([CLASSES])
        .collect();
    vec![
        ("even", even),
        ("skewed", skewed),
        ("empty first", empty_first),
    ]
}

fn columns<E: Copy>(x: &[E], s: Shard) -> Vec<E> {
    x.chunks(CLASSES)
        .flat_map(|r| r[s.start()..s.stop()].to_vec())
        .collect()
}

/// Distance in ulps (of a `bits`-bit significand) between two values; 0 when equal or both NaN.
fn ulps(a: f64, b: f64, bits: i32) -> f64 {
    if a == b || (a.is_nan() && b.is_nan()) {
        return 0.0;
    }
    let scale = a.abs().max(b.abs()).max(f64::MIN_POSITIVE);
    (a - b).abs() / 2f64.powi(scale.log2().floor() as i32 - (bits - 1))
}

/// The loss's bits on every rank.
fn all_bits(world: &SimpleCommunicator, value: f64) -> Vec<u64> {
    let mut bits = vec![0u64; world.size() as usize];
    world.all_gather_into(&value.to_bits(), &mut bits[..]);
    bits
}

/// `split_bound`: ulps from the one-shard split result (the algebra's stated bound) for the loss
/// and row losses, `split_grad_bound` for the gradient (ulps of the row's largest entry);
/// `lse_bound`: ulps from the one-process `lse` call (each within 2 ulp of an oracle, docs/numerics.md).
fn check_cross_entropy<E: Element>(
    world: &SimpleCommunicator,
    mantissa: i32,
    split_bound: f64,
    split_grad_bound: f64,
    lse_bound: f64,
) {
    let (full, targets) = batch();
    let x: Vec<E> = full.iter().map(|&v| E::from_f64(v)).collect();
    let size = world.size() as usize;
    let rank = world.rank() as usize;
    for (layout, bounds) in layouts(size) {
        let shard = Shard::new(bounds[rank], bounds[rank + 1], CLASSES).unwrap();
        let split = VocabParallel::new(world, shard);
        let local = columns(&x, shard);
        for (name, opts) in split_option_sets(&WEIGHTS) {
            let what = format!("{} ranks, {layout} layout, {name}, {:?}", size, E::DTYPE);
            let mut grad = vec![E::zero(); local.len()];
            let before = split.collectives();
            let out = split
                .cross_entropy_with_grad(&local, &targets, &opts, GradOutput::default(), &mut grad)
                .unwrap();
            assert_eq!(
                split.collectives(),
                before + 1,
                "{what}: one collective per forward"
            );
            let loss_only = split.cross_entropy(&local, &targets, &opts).unwrap();
            assert_eq!(split.collectives(), before + 2, "{what}");
            let loss: f64 = out.loss.into();
            assert_eq!(
                loss.to_bits(),
                Into::<f64>::into(loss_only.loss).to_bits(),
                "{what}"
            );
            let bits = all_bits(world, loss);
            assert!(
                bits.iter().all(|&b| b == bits[0]),
                "{what}: ranks disagree: {bits:x?}"
            );

            // Against the one-shard split result (the algebra's own bound) ...
            let mut one = vec![RowPartial::EMPTY; targets.len()];
            let whole = Shard::new(0, CLASSES, CLASSES).unwrap();
            sharded::cross_entropy_partials(&x, whole, &targets, &opts, &mut one).unwrap();
            let mut one_grad = vec![E::zero(); x.len()];
            let one_out = sharded::cross_entropy_shard_grad(
                &x,
                whole,
                &one,
                &targets,
                &opts,
                GradOutput::default(),
                &mut one_grad,
            )
            .unwrap();
            // ... and against the one-process lse call.
            let mut lse_grad = vec![E::zero(); x.len()];
            let lse_out = lse::cross_entropy_with_grad(
                &x,
                CLASSES,
                Targets::Classes(&targets),
                &opts,
                GradOutput::default(),
                &mut lse_grad,
            )
            .unwrap();
            for (against, reference, bound, grad_bound, ref_grad) in [
                (
                    "one shard",
                    &one_out,
                    split_bound,
                    split_grad_bound,
                    &one_grad,
                ),
                ("one process", &lse_out, lse_bound, lse_bound, &lse_grad),
            ] {
                let what = format!("{what} against {against}");
                let u = ulps(loss, reference.loss.into(), mantissa);
                assert!(
                    u <= bound,
                    "{what}: loss {loss} vs {:?}",
                    reference.loss.into()
                );
                let rows = out
                    .row_loss
                    .iter()
                    .flatten()
                    .zip(reference.row_loss.iter().flatten());
                for (r, (&a, &b)) in rows.enumerate() {
                    assert!(
                        ulps(a.into(), b.into(), mantissa) <= bound,
                        "{what}: row {r}"
                    );
                }
                for (r, g) in grad.chunks(shard.width().max(1)).enumerate() {
                    let full_row = &ref_grad[r * CLASSES..(r + 1) * CLASSES];
                    let peak = full_row.iter().fold(0.0f64, |m, v| m.max(v.to_f64().abs()));
                    for (c, a) in g.iter().enumerate().take(shard.width()) {
                        let b = full_row[shard.start() + c].to_f64();
                        let u = ulps(peak + (a.to_f64() - b).abs(), peak, mantissa);
                        assert!(
                            u <= grad_bound,
                            "{what}: gradient row {r} column {c}: {a:?} vs {b}"
                        );
                    }
                }
            }
        }
    }
}

fn check_faults(world: &SimpleCommunicator) {
    let (mut full, mut targets) = batch();
    let size = world.size() as usize;
    let rank = world.rank() as usize;
    targets[4] = 2; // the NaN row is counted now: its first NaN/+inf is column 0 (NaN)
    full[4 * CLASSES] = 0.0; // ... now column 2 (+inf), held by one rank only
    for (layout, bounds) in layouts(size) {
        let shard = Shard::new(bounds[rank], bounds[rank + 1], CLASSES).unwrap();
        let split = VocabParallel::new(world, shard);
        let local = columns(&full, shard);
        let err = split
            .cross_entropy(&local, &targets, &CrossEntropyOptions::default())
            .err();
        assert!(
            matches!(
                err,
                Some(Error::Lse(LseError::NonFinite { row: 4, column: 2, value, .. }))
                    if value == f64::INFINITY
            ),
            "{layout}: {err:?}"
        );
        // Propagate: that row is NaN on every rank, the others are finite.
        let opts = CrossEntropyOptions {
            non_finite: NonFinite::Propagate,
            keep_row_loss: true,
            ..Default::default()
        };
        let out = split.cross_entropy(&local, &targets, &opts).unwrap();
        let rows = out.row_loss.unwrap();
        assert!(
            rows[4].is_nan()
                && rows
                    .iter()
                    .enumerate()
                    .all(|(r, l)| r == 4 || l.is_finite())
        );
    }
    // A rank with bad arguments (a logits buffer one element short) fails alone; the others
    // learn it from the same collective instead of waiting.
    let shard = Shard::split_evenly(rank, size, CLASSES).unwrap();
    let split = VocabParallel::new(world, shard);
    let mut local = columns(&full, shard);
    if rank == size - 1 {
        local.pop();
    }
    let err = split
        .cross_entropy(&local, &targets, &CrossEntropyOptions::default())
        .err();
    if rank == size - 1 {
        assert!(
            matches!(err, Some(Error::Lse(LseError::LengthMismatch { .. }))),
            "{err:?}"
        );
    } else {
        assert!(matches!(err, Some(Error::PeerFailed)), "{err:?}");
    }
    assert_eq!(split.collectives(), 1);
}

fn check_lse_family(world: &SimpleCommunicator) {
    let (mut full, _) = batch();
    full[4 * CLASSES] = 0.0;
    full[4 * CLASSES + 2] = 0.0;
    let x: Vec<f32> = full.iter().map(|&v| v as f32).collect();
    let rows = x.len() / CLASSES;
    let size = world.size() as usize;
    let rank = world.rank() as usize;
    let mut lse_whole = vec![0.0f32; rows];
    lse::logsumexp(&x, CLASSES, &mut lse_whole).unwrap();
    let mut p_whole = vec![0.0f32; x.len()];
    lse::softmax(&x, CLASSES, &mut p_whole).unwrap();
    let mut lp_whole = vec![0.0f32; x.len()];
    lse::log_softmax(&x, CLASSES, &mut lp_whole).unwrap();
    for (layout, bounds) in layouts(size) {
        let shard = Shard::new(bounds[rank], bounds[rank + 1], CLASSES).unwrap();
        let split = VocabParallel::new(world, shard);
        let local = columns(&x, shard);
        let mut l = vec![0.0f32; rows];
        split.logsumexp(&local, &mut l, NonFinite::Error).unwrap();
        for (a, b) in l.iter().zip(&lse_whole) {
            assert!(
                ulps(*a as f64, *b as f64, 24) <= 1.0,
                "{layout}: lse {a} vs {b}"
            );
        }
        let mut p = vec![0.0f32; local.len()];
        split
            .softmax(&local, rows, &mut p, NonFinite::Error)
            .unwrap();
        for (a, b) in p.iter().zip(&columns(&p_whole, shard)) {
            assert!(
                (a - b).abs() <= f32::EPSILON,
                "{layout}: softmax {a} vs {b}"
            );
        }
        let mut lp = vec![0.0f32; local.len()];
        split
            .log_softmax(&local, rows, &mut lp, NonFinite::Error)
            .unwrap();
        for (a, b) in lp.iter().zip(&columns(&lp_whole, shard)) {
            assert!(
                ulps(*a as f64, *b as f64, 24) <= 1.0,
                "{layout}: log_softmax {a} vs {b}"
            );
        }
        assert_eq!(split.collectives(), 3, "one collective per call");
    }
}

/// The vocab-split fused linear cross-entropy: every rank holds its rows of `W` and `b` (the
/// layouts above, over 11 classes), `H` is the same everywhere; class targets, and probability
/// targets (each rank given its columns). Against the one-process
/// `lse::linear_cross_entropy_with_grad`: the loss bits the same on every rank, one collective
/// per chunk (and one for `dH`), the loss and row losses within 2 `f32` ulp (the bound
/// `lse`'s own split test states and measures), and this rank's rows of `dW`, its classes of
/// `db` and the whole `dH` within 4 `f32` ulp of the largest entry of each (normwise: the
/// shards' products sum in another order than the one-process product).
fn check_linear(world: &SimpleCommunicator) {
    let (rows, dim) = (29, 6);
    let size = world.size() as usize;
    let rank = world.rank() as usize;
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = |scale: f64| {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (((seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0) * scale
    };
    let hidden: Vec<f32> = (0..rows * dim).map(|_| next(2.0) as f32).collect();
    let weight: Vec<f32> = (0..CLASSES * dim).map(|_| next(1.0) as f32).collect();
    let bias: Vec<f32> = (0..CLASSES).map(|_| next(1.0) as f32).collect();
    let targets: Vec<i64> = (0..rows)
        .map(|r| {
            if r % 6 == 5 {
                -100
            } else {
                (r % CLASSES) as i64
            }
        })
        .collect();
    let counted = targets.iter().filter(|&&t| t != -100).count();
    // Probability targets: a distribution per row.
    let q: Vec<f32> = (0..rows)
        .flat_map(|_| {
            let row: Vec<f64> = (0..CLASSES).map(|_| next(1.0).powi(2)).collect();
            let total: f64 = row.iter().sum();
            row.into_iter().map(move |x| (x / total) as f32)
        })
        .collect();
    // The largest |got − want| in f32 ulps of the largest |want|, over every comparison.
    let worst = std::cell::Cell::new(0.0f64);
    let normwise = |what: &str, got: &[f32], want: &[f32]| {
        let peak = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            let u = ulps(f64::from(peak + (a - b).abs()), f64::from(peak), 24);
            assert!(u <= 4.0, "{what}[{i}]: {a} vs {b} (peak {peak})");
            worst.set(worst.get().max(u));
        }
    };
    for (layout, bounds) in layouts(size) {
        let shard = Shard::new(bounds[rank], bounds[rank + 1], CLASSES).unwrap();
        let split = VocabParallel::new(world, shard);
        let (a, b) = (shard.start(), shard.stop());
        let head = LinearHead {
            weight: &weight[a * dim..b * dim],
            bias: Some(&bias[a..b]),
            classes: b - a,
        };
        // This rank's columns of the probability targets.
        let columns: Vec<f32> = q
            .chunks(CLASSES)
            .flat_map(|row| row[a..b].iter().copied())
            .collect();
        for ((name, ce), probabilities) in split_option_sets(&WEIGHTS)
            .into_iter()
            .flat_map(|set| [(set, false), (set, true)])
        {
            let ce = CrossEntropyOptions {
                keep_row_lse: false,
                ..ce
            };
            let (targets_here, one_targets, counted) = if probabilities {
                (
                    ShardTargets::Probabilities {
                        values: &columns,
                        rows,
                    },
                    lse::Targets::Probabilities(&q[..]),
                    rows,
                )
            } else {
                (
                    ShardTargets::Classes(&targets),
                    lse::Targets::Classes(&targets),
                    counted,
                )
            };
            for chunk_rows in [counted, 5] {
                let kind = if probabilities {
                    "probabilities"
                } else {
                    "classes"
                };
                let what = format!(
                    "linear, {size} ranks, {layout} layout, {name}, {kind}, chunk {chunk_rows}"
                );
                let options = LinearCrossEntropyOptions {
                    cross_entropy: ce,
                    budget_bytes: 4 * (CLASSES + 2 * dim) * chunk_rows,
                };
                let (mut dh, mut dw, mut db) = (
                    vec![0.0f32; rows * dim],
                    vec![0.0f32; (b - a) * dim],
                    vec![0.0f32; b - a],
                );
                let before = split.collectives();
                let out = split
                    .linear_cross_entropy_with_grad(
                        &hidden,
                        head,
                        targets_here,
                        &options,
                        GradOutput::Scalar(1.0),
                        LinearGradients {
                            hidden: &mut dh,
                            weight: &mut dw,
                            bias: Some(&mut db),
                        },
                    )
                    .unwrap();
                let chunks = counted.div_ceil(chunk_rows) as u64;
                assert_eq!(split.collectives(), before + chunks + 1, "{what}");
                let loss_only = split
                    .linear_cross_entropy(&hidden, head, targets_here, &options)
                    .unwrap();
                // Without dH rows the loss-only call's chunks hold more rows (the budget over
                // each row's logits and hidden row), so its logits may differ in a last bit.
                let loss_chunk = options.budget_bytes / (4 * (CLASSES + dim));
                let loss_chunks = counted.div_ceil(loss_chunk) as u64;
                assert_eq!(
                    split.collectives(),
                    before + chunks + 1 + loss_chunks,
                    "{what}"
                );
                assert!(
                    ulps(loss_only.loss.into(), out.loss.into(), 24) <= 2.0,
                    "{what}: {} vs {}",
                    loss_only.loss,
                    out.loss
                );
                let bits = all_bits(world, out.loss.into());
                assert!(bits.iter().all(|&x| x == bits[0]), "{what}: {bits:x?}");

                let whole = LinearHead {
                    weight: &weight,
                    bias: Some(&bias),
                    classes: CLASSES,
                };
                let (mut dh1, mut dw1, mut db1) = (
                    vec![0.0f32; rows * dim],
                    vec![0.0f32; CLASSES * dim],
                    vec![0.0f32; CLASSES],
                );
                let one = lse::linear_cross_entropy_with_grad(
                    &hidden,
                    whole,
                    one_targets,
                    &options,
                    GradOutput::Scalar(1.0),
                    LinearGradients {
                        hidden: &mut dh1,
                        weight: &mut dw1,
                        bias: Some(&mut db1),
                    },
                )
                .unwrap();
                assert!(
                    ulps(out.loss.into(), one.loss.into(), 24) <= 2.0,
                    "{what}: loss {} vs {}",
                    out.loss,
                    one.loss
                );
                for (r, (&x, &y)) in out
                    .row_loss
                    .iter()
                    .flatten()
                    .zip(one.row_loss.iter().flatten())
                    .enumerate()
                {
                    assert!(
                        ulps(x.into(), y.into(), 24) <= 2.0,
                        "{what}: row {r}: {x} vs {y}"
                    );
                }
                normwise(&format!("{what}: dH"), &dh, &dh1);
                normwise(&format!("{what}: dW"), &dw, &dw1[a * dim..b * dim]);
                normwise(&format!("{what}: db"), &db, &db1[a..b]);
            }
        }
    }
    if rank == 0 {
        println!(
            "linear: dH, dW, db within {} f32 ulp of their largest entry (normwise)",
            worst.get()
        );
    }
    // A rank whose weight is one element short fails alone; the others learn it from the
    // first chunk's collective.
    let shard = Shard::split_evenly(rank, size, CLASSES).unwrap();
    let split = VocabParallel::new(world, shard);
    let (a, b) = (shard.start(), shard.stop());
    let short = if rank == size - 1 { 1 } else { 0 };
    let head = LinearHead {
        weight: &weight[a * dim..b * dim - short],
        bias: None,
        classes: b - a,
    };
    let err = split
        .linear_cross_entropy(
            &hidden,
            head,
            ShardTargets::Classes(&targets),
            &LinearCrossEntropyOptions::default(),
        )
        .err();
    if rank == size - 1 {
        assert!(
            matches!(err, Some(Error::Lse(LseError::LengthMismatch { .. }))),
            "{err:?}"
        );
    } else {
        assert!(matches!(err, Some(Error::PeerFailed)), "{err:?}");
    }
    assert_eq!(split.collectives(), 1);
}

fn main() {
    let universe = mpi::initialize().expect("MPI initialises once");
    lse_mpi::abort_on_panic();
    let world = universe.world();
    check_cross_entropy::<f32>(&world, 24, 1.0, 1.0, 2.0);
    // f64: the loss within 1 ulp of one shard; the gradient within 2 ulp of the row's largest
    // entry (the one-shard state's own rescaling roundings differ from the split's).
    check_cross_entropy::<f64>(&world, 53, 1.0, 2.0, 4.0);
    check_faults(&world);
    check_lse_family(&world);
    check_linear(&world);
    world.barrier();
    if world.rank() == 0 {
        println!("split_vocab: every check passed on {} ranks", world.size());
    }
}
