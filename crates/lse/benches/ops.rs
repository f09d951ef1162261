//! Throughput of every public op, in every dtype, on the shapes training actually uses.
//!
//! Ops: `logsumexp`, `softmax`, `log_softmax`, `softmax_backward`, `log_softmax_backward`,
//! `cross_entropy` (forward only), `cross_entropy_with_grad` (forward + gradient) and
//! `cross_entropy_in_place`; dtypes `f64`, `f32`, `f16`, `bf16`; shapes (rows × classes)
//! 4096×32000, 65536×1000, 512×128256, 16×262144 and 1×1000000. Every case is named
//! `op/dtype/ROWSxCLASSES` and reports `Throughput::Elements(rows · classes)`.
//!
//! ```sh
//! cargo bench -p lse --bench ops                                   # everything (long: 160 cases)
//! cargo bench -p lse --bench ops -- '^softmax/f32'                 # one op, one dtype
//! cargo bench -p lse --bench ops -- 'cross_entropy_with_grad/bf16/4096x32000'
//! cargo bench -p lse --bench ops -- '/16x262144$'                  # one shape, every op
//! LSE_BENCH_THREADS=1 LSE_BENCH_KERNEL=scalar cargo bench -p lse --bench ops -- '^logsumexp/'
//! ```
//!
//! The filter is criterion's regular expression over the full id, so `softmax/f32` also matches
//! `log_softmax/f32`; anchor it with `^` to mean only the former.
//!
//! Environment:
//! - `LSE_BENCH_THREADS=n` runs every case inside a rayon pool of `n` threads (default: rayon's
//!   global pool, one thread per core).
//! - `LSE_BENCH_KERNEL=auto|scalar|portable|avx2|avx512|neon` pins the kernel family with [`lse::set_kernel`]
//!   (default `auto`); the kernel that actually runs is printed first.
//!
//! Inputs are deterministic pseudo-random logits `3 · N(0, 1)` and uniformly random class
//! targets, built lazily when a case first runs and freed when it ends (4096×32000 in `f64` is
//! 1 GiB per buffer), so a filtered run only pays for the cases it selects. Each case takes 10
//! samples after a 1 s warm-up, over a 3 s measurement target (criterion stretches it, with a
//! warning, when ten calls take longer). The in-place cross-entropy gets a fresh copy of the
//! logits per call ([`BatchSize::PerIteration`]), made outside the timed region.
//!
//! This measures time only. `lse bench` (the CLI) runs the same ops and also reports the achieved
//! memory bandwidth as a fraction of the machine's measured copy bandwidth.

use lse_testkit::rng::Rng;
use std::time::Duration;

use criterion::{
    black_box, measurement::WallTime, BatchSize, BenchmarkGroup, BenchmarkId, Criterion, Throughput,
};
use lse::{bf16, f16, CrossEntropyOptions, Element, GradOutput, Kernel, Targets};

/// `(rows, classes)`: an LLM batch at a 32k vocabulary, many short rows, one Llama-3-vocabulary
/// micro-batch, a 262k vocabulary (Gemma) and one very long row.
const SHAPES: [(usize, usize); 5] = [
    (4096, 32_000),
    (65_536, 1_000),
    (512, 128_256),
    (16, 262_144),
    (1, 1_000_000),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Logsumexp,
    Softmax,
    LogSoftmax,
    SoftmaxBackward,
    LogSoftmaxBackward,
    CrossEntropy,
    CrossEntropyWithGrad,
    CrossEntropyInPlace,
}

impl Op {
    const ALL: [Op; 8] = [
        Op::Logsumexp,
        Op::Softmax,
        Op::LogSoftmax,
        Op::SoftmaxBackward,
        Op::LogSoftmaxBackward,
        Op::CrossEntropy,
        Op::CrossEntropyWithGrad,
        Op::CrossEntropyInPlace,
    ];

    fn name(self) -> &'static str {
        match self {
            Op::Logsumexp => "logsumexp",
            Op::Softmax => "softmax",
            Op::LogSoftmax => "log_softmax",
            Op::SoftmaxBackward => "softmax_backward",
            Op::LogSoftmaxBackward => "log_softmax_backward",
            Op::CrossEntropy => "cross_entropy",
            Op::CrossEntropyWithGrad => "cross_entropy_with_grad",
            Op::CrossEntropyInPlace => "cross_entropy_in_place",
        }
    }
}

/// `n` values `scale · N(0, 1)`, rounded into `E`.
fn normal<E: Element>(n: usize, scale: f64, seed: u64) -> Vec<E> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| E::from_f64(scale * rng.normal())).collect()
}

/// One uniformly random class per row.
fn class_targets(rows: usize, classes: usize, seed: u64) -> Vec<i64> {
    let mut rng = Rng::new(seed);
    (0..rows)
        .map(|_| (rng.next_u64() % classes as u64) as i64)
        .collect()
}

/// A case's buffers, built on the first call of its routine (criterion calls a routine many times,
/// and not at all when the filter excludes the case).
struct Case<E: Element> {
    logits: Vec<E>,
    targets: Vec<i64>,
    /// The forward output (`softmax`/`log_softmax` of the logits) for the backward ops.
    y: Vec<E>,
    /// The incoming gradient for the backward ops.
    dy: Vec<E>,
    out: Vec<E>,
    stats: Vec<E::Stat>,
}

impl<E: Element> Case<E> {
    fn new(op: Op, rows: usize, classes: usize) -> Self {
        let n = rows * classes;
        let logits = normal::<E>(n, 3.0, 0x5EED_0000 ^ n as u64);
        let mut case = Case {
            logits,
            targets: Vec::new(),
            y: Vec::new(),
            dy: Vec::new(),
            out: Vec::new(),
            stats: Vec::new(),
        };
        match op {
            Op::Logsumexp => case.stats = vec![E::Stat::zero(); rows],
            Op::Softmax | Op::LogSoftmax => case.out = vec![E::zero(); n],
            Op::SoftmaxBackward | Op::LogSoftmaxBackward => {
                let mut y = vec![E::zero(); n];
                let forward = if op == Op::SoftmaxBackward {
                    lse::softmax(&case.logits, classes, &mut y)
                } else {
                    lse::log_softmax(&case.logits, classes, &mut y)
                };
                forward.expect("finite logits");
                case.y = y;
                case.dy = normal::<E>(n, 1.0, 0xD1D1_0000 ^ n as u64);
                case.logits = Vec::new();
                case.out = vec![E::zero(); n];
            }
            Op::CrossEntropy | Op::CrossEntropyInPlace => {
                case.targets = class_targets(rows, classes, 0x7A26_0000 ^ n as u64);
            }
            Op::CrossEntropyWithGrad => {
                case.targets = class_targets(rows, classes, 0x7A26_0000 ^ n as u64);
                case.out = vec![E::zero(); n];
            }
        }
        case
    }
}

fn bench_case<E: Element>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    op: Op,
    rows: usize,
    classes: usize,
) {
    let id = BenchmarkId::new(E::DTYPE.name(), format!("{rows}x{classes}"));
    let options = CrossEntropyOptions::default();
    let mut case: Option<Case<E>> = None;
    group.throughput(Throughput::Elements((rows * classes) as u64));
    group.bench_function(id, |b| {
        let case = case.get_or_insert_with(|| Case::new(op, rows, classes));
        match op {
            Op::Logsumexp => b.iter(|| {
                lse::logsumexp(black_box(&case.logits), classes, &mut case.stats)
                    .expect("finite logits")
            }),
            Op::Softmax => b.iter(|| {
                lse::softmax(black_box(&case.logits), classes, &mut case.out)
                    .expect("finite logits")
            }),
            Op::LogSoftmax => b.iter(|| {
                lse::log_softmax(black_box(&case.logits), classes, &mut case.out)
                    .expect("finite logits")
            }),
            Op::SoftmaxBackward => b.iter(|| {
                lse::softmax_backward(black_box(&case.y), &case.dy, classes, &mut case.out)
                    .expect("valid shapes")
            }),
            Op::LogSoftmaxBackward => b.iter(|| {
                lse::log_softmax_backward(black_box(&case.y), &case.dy, classes, &mut case.out)
                    .expect("valid shapes")
            }),
            Op::CrossEntropy => b.iter(|| {
                lse::cross_entropy(
                    black_box(&case.logits),
                    classes,
                    Targets::Classes(&case.targets),
                    &options,
                )
                .expect("finite logits")
                .loss
            }),
            Op::CrossEntropyWithGrad => b.iter(|| {
                lse::cross_entropy_with_grad(
                    black_box(&case.logits),
                    classes,
                    Targets::Classes(&case.targets),
                    &options,
                    GradOutput::default(),
                    &mut case.out,
                )
                .expect("finite logits")
                .loss
            }),
            Op::CrossEntropyInPlace => b.iter_batched(
                || case.logits.clone(),
                |mut buffer| {
                    let loss = lse::cross_entropy_in_place(
                        &mut buffer,
                        classes,
                        Targets::Classes(&case.targets),
                        &options,
                        GradOutput::default(),
                    )
                    .expect("finite logits")
                    .loss;
                    // Returned so that freeing the buffer happens outside the timed region.
                    (loss, buffer)
                },
                BatchSize::PerIteration,
            ),
        }
    });
    // `case` (up to a few GiB) is dropped here, before the next case builds its own.
}

fn ops(c: &mut Criterion) {
    for op in Op::ALL {
        let mut group = c.benchmark_group(op.name());
        for &(rows, classes) in &SHAPES {
            bench_case::<f64>(&mut group, op, rows, classes);
        }
        for &(rows, classes) in &SHAPES {
            bench_case::<f32>(&mut group, op, rows, classes);
        }
        for &(rows, classes) in &SHAPES {
            bench_case::<f16>(&mut group, op, rows, classes);
        }
        for &(rows, classes) in &SHAPES {
            bench_case::<bf16>(&mut group, op, rows, classes);
        }
        group.finish();
    }
}

/// Reads `LSE_BENCH_KERNEL` and pins the kernel it names.
fn configure_kernel() {
    let kernel = match std::env::var("LSE_BENCH_KERNEL").as_deref() {
        Err(_) | Ok("") => Kernel::Auto,
        Ok(name) => Kernel::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .unwrap_or_else(|| {
                panic!(
                    "LSE_BENCH_KERNEL={name:?}: expected one of {:?}",
                    Kernel::ALL.map(Kernel::name)
                )
            }),
    };
    lse::set_kernel(kernel);
    eprintln!(
        "lse ops bench: kernel {} requested, {} active",
        kernel.name(),
        lse::active_kernel().name()
    );
}

/// Reads `LSE_BENCH_THREADS`: `Some(pool)` of that many threads, or `None` for rayon's global pool.
fn thread_pool() -> Option<rayon::ThreadPool> {
    let value = std::env::var("LSE_BENCH_THREADS").ok()?;
    let threads: usize = value
        .trim()
        .parse()
        .ok()
        .filter(|&n| n > 0)
        .unwrap_or_else(|| panic!("LSE_BENCH_THREADS={value:?}: expected a positive integer"));
    eprintln!("lse ops bench: {threads} rayon thread(s)");
    Some(
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .stack_size(8 << 20)
            .build()
            .expect("rayon thread pool"),
    )
}

fn run() {
    let mut criterion = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    ops(&mut criterion);
    criterion.final_summary();
}

fn main() {
    configure_kernel();
    match thread_pool() {
        // The whole run happens on one of the pool's threads, so every parallel call inside the
        // library uses this pool.
        Some(pool) => pool.install(run),
        None => run(),
    }
}
