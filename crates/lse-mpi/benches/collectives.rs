//! One collective against three: the communication of a vocabulary-parallel cross-entropy
//! forward, `lse-mpi`'s one all-reduce of [`RowPartial`] rows (a user-defined operation)
//! against Megatron-LM's three all-reduces (max, target logit, sum of exponentials; `f32`, MPI's
//! built-in MAX and SUM), on the same logits split over the ranks. Run under mpirun (no
//! criterion: every rank must run the same iterations in step):
//!
//! ```text
//! cargo bench --no-run     # then, from crates/lse-mpi:
//! mpirun -np 2 target/release/deps/collectives-* [ROWS CLASSES ITERATIONS]
//! ```
//!
//! Defaults: 4096 × 32000 (16000 columns per rank with 2 ranks), 20 iterations. Each
//! collective is timed on rank 0 from just after a barrier (so the time is the collective's
//! own, not a wait for a slower rank's compute); a path's communication time is the sum over its
//! collectives, its step time that of the whole forward + gradient (barriers included); medians
//! over the iterations. Rank 0 prints both paths, their ratio, and the bytes per row each sends.

use std::time::Instant;

use lse::sharded::{self, RowPartial};
use lse::{CrossEntropyOptions, GradOutput};
use lse_mpi::VocabParallel;
use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Megatron-LM's vocab-parallel cross-entropy forward and gradient (fp32), with its three
/// all-reduces; returns (communication seconds, loss).
fn three_collectives(
    world: &SimpleCommunicator,
    logits: &[f32],
    width: usize,
    start: usize,
    targets: &[i64],
    grad: &mut [f32],
) -> (f64, f32) {
    let rows = targets.len();
    let mut comm = 0.0;
    let mut max: Vec<f32> = logits
        .chunks(width)
        .map(|r| r.iter().copied().fold(f32::NEG_INFINITY, f32::max))
        .collect();
    let local = max.clone();
    world.barrier(); // not timed: the collective alone, not the other rank's compute
    let t = Instant::now();
    world.all_reduce_into(&local[..], &mut max[..], SystemOperation::max());
    comm += t.elapsed().as_secs_f64();
    let mut predicted = vec![0.0f32; rows];
    let mut sum_exp = vec![0.0f32; rows];
    for (r, row) in logits.chunks(width).enumerate() {
        let target = targets[r] as usize;
        if (start..start + width).contains(&target) {
            predicted[r] = row[target - start] - max[r];
        }
        let g = &mut grad[r * width..(r + 1) * width];
        let mut s = 0.0f32;
        for (gi, &x) in g.iter_mut().zip(row) {
            *gi = (x - max[r]).exp();
            s += *gi;
        }
        sum_exp[r] = s;
    }
    let (p_local, s_local) = (predicted.clone(), sum_exp.clone());
    world.barrier();
    let t = Instant::now();
    world.all_reduce_into(&p_local[..], &mut predicted[..], SystemOperation::sum());
    world.all_reduce_into(&s_local[..], &mut sum_exp[..], SystemOperation::sum());
    comm += t.elapsed().as_secs_f64();
    let mut loss = 0.0f32;
    for r in 0..rows {
        loss += sum_exp[r].ln() - predicted[r];
        let g = &mut grad[r * width..(r + 1) * width];
        let scale = 1.0 / (sum_exp[r] * rows as f32);
        g.iter_mut().for_each(|v| *v *= scale);
        let target = targets[r] as usize;
        if (start..start + width).contains(&target) {
            g[target - start] -= 1.0 / rows as f32;
        }
    }
    (comm, loss / rows as f32)
}

fn main() {
    let universe = mpi::initialize().expect("MPI initialises once");
    lse_mpi::abort_on_panic();
    let world = universe.world();
    let arg = |i: usize, default: usize| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
    };
    let (rows, classes, iterations) = (arg(1, 4096), arg(2, 32000), arg(3, 20));
    let split = VocabParallel::evenly(&world, classes).expect("classes > 0");
    let shard = split.shard();
    let width = shard.width();
    let mut seed = 0x853c_49e6_748f_ea9bu64 ^ shard.start() as u64;
    let logits: Vec<f32> = (0..rows * width)
        .map(|_| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 16.0
        })
        .collect();
    let targets: Vec<i64> = (0..rows).map(|r| ((r * 7919) % classes) as i64).collect();
    let options = CrossEntropyOptions::default();
    let mut grad = vec![0.0f32; logits.len()];

    let (mut one_comm, mut one_step, mut three_comm, mut three_step) =
        (vec![], vec![], vec![], vec![]);
    let (mut one_loss, mut three_loss) = (0.0, 0.0);
    for i in 0..iterations + 2 {
        world.barrier();
        let t = Instant::now();
        let mut partials = vec![RowPartial::EMPTY; rows];
        sharded::cross_entropy_partials(&logits, shard, &targets, &options, &mut partials)
            .expect("valid partials");
        world.barrier(); // not timed, as in the three-collective path
        let c = Instant::now();
        split.all_reduce(&mut partials).expect("no rank failed");
        let comm = c.elapsed().as_secs_f64();
        let out = sharded::cross_entropy_shard_grad(
            &logits,
            shard,
            &partials,
            &targets,
            &options,
            GradOutput::default(),
            &mut grad,
        )
        .expect("finite logits");
        let step = t.elapsed().as_secs_f64();
        one_loss = out.loss;

        world.barrier();
        let t = Instant::now();
        let (comm3, loss3) =
            three_collectives(&world, &logits, width, shard.start(), &targets, &mut grad);
        let step3 = t.elapsed().as_secs_f64();
        three_loss = loss3;
        if i >= 2 {
            // Two warm-up iterations.
            one_comm.push(comm);
            one_step.push(step);
            three_comm.push(comm3);
            three_step.push(step3);
        }
    }
    if world.rank() == 0 {
        let (c1, s1, c3, s3) = (
            median(one_comm),
            median(one_step),
            median(three_comm),
            median(three_step),
        );
        println!(
            "{} ranks, {rows} x {classes} f32 ({width} columns on rank 0), {iterations} iterations, medians:",
            world.size()
        );
        println!(
            "  one all-reduce (lse-mpi):     communication {:8.1} us, step {:8.2} ms, {} B per row, loss {one_loss}",
            c1 * 1e6,
            s1 * 1e3,
            RowPartial::BYTES
        );
        println!(
            "  three all-reduces (Megatron): communication {:8.1} us, step {:8.2} ms, {} B per row, loss {three_loss}",
            c3 * 1e6,
            s3 * 1e3,
            3 * 4
        );
        println!(
            "  communication: three / one = {:.2}x; one collective moves {} bytes per rank per step",
            c3 / c1,
            rows * RowPartial::BYTES
        );
    }
}
