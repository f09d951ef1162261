//! Forward + backward of `lse_candle::cross_entropy` against `candle_nn::loss::cross_entropy`
//! (log_softmax + gather, candle's autograd) at LLM-vocabulary shapes, f32 and bf16.
//!
//! ```text
//! cargo bench -p lse-candle --bench cross_entropy                 # every shape
//! cargo bench -p lse-candle --bench cross_entropy -- 512x32000    # the small shape only
//! ```
//!
//! `lse_core` is `lse::cross_entropy_with_grad` on a plain slice into a reused buffer: the core
//! kernel alone, without candle's tensor allocation and gradient accumulation.
//! `candle_grad_store` is the zero tensor plus addition that candle's `backward` performs for
//! every tracked input, whatever op produced the loss: a floor under any candle op's time.
//! `copy` is a plain clone of the logits buffer: the machine's copy bandwidth, for scale
//! (a fused forward + gradient reads the logits and writes the gradient, about one copy).

// `criterion_group!` defines an undocumented `pub fn`; the workspace lints ask for docs.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use candle_core::{DType, Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use lse_candle::CrossEntropyOptions;

const SHAPES: [(usize, usize); 2] = [(512, 32000), (4096, 32000)];

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    for (rows, classes) in SHAPES {
        for dtype in [DType::F32, DType::BF16] {
            let name = format!("ce_fwd_bwd/{}/{rows}x{classes}", dtype.as_str());
            let mut g = c.benchmark_group(name);
            g.sample_size(10)
                .sampling_mode(SamplingMode::Flat)
                .warm_up_time(Duration::from_secs(1))
                .measurement_time(Duration::from_secs(if rows > 1024 { 30 } else { 10 }))
                .throughput(Throughput::Elements((rows * classes) as u64));
            let logits = Tensor::randn(0f32, 2.0, (rows, classes), &dev)
                .and_then(|t| t.to_dtype(dtype))
                .expect("logits");
            let x = Var::from_tensor(&logits).expect("var");
            let targets: Vec<u32> = (0..rows).map(|r| (r * 7919 % classes) as u32).collect();
            let t = Tensor::from_vec(targets, rows, &dev).expect("targets");
            let opts = CrossEntropyOptions::default();

            g.bench_function("lse_candle", |b| {
                b.iter(|| {
                    let loss = lse_candle::cross_entropy(&x, &t, &opts).expect("lse_candle");
                    black_box(loss.backward().expect("backward"))
                })
            });
            g.bench_function("candle_nn", |b| {
                b.iter(|| {
                    let loss = candle_nn::loss::cross_entropy(&x, &t).expect("candle_nn");
                    black_box(loss.backward().expect("backward"))
                })
            });
            bench_core(&mut g, &logits, &t);
            // What candle's backward adds on its own for any op: its gradient store makes a zero
            // tensor of the logits' shape and adds the returned gradient into it.
            g.bench_function("candle_grad_store", |b| {
                b.iter(|| {
                    let zeros = logits.zeros_like().expect("zeros");
                    black_box(zeros.add(&logits).expect("add"))
                })
            });
            g.bench_function("copy", |b| {
                b.iter(|| black_box(logits.copy().expect("copy")))
            });
            g.finish();
        }
    }
}

/// The core kernel on the same data, gradient written into a buffer allocated once.
fn bench_core(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    logits: &Tensor,
    targets: &Tensor,
) {
    fn run<E: lse::Element + candle_core::WithDType>(
        g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
        logits: &Tensor,
        targets: &[i64],
    ) {
        let classes = logits.dim(1).expect("classes");
        let x: Vec<E> = logits
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .expect("logits");
        let mut grad = vec![x[0]; x.len()];
        let opts = lse::CrossEntropyOptions::default();
        g.bench_function("lse_core", |b| {
            b.iter(|| {
                let t = lse::Targets::Classes(targets);
                let grad_output = lse::GradOutput::default();
                black_box(
                    lse::cross_entropy_with_grad(&x, classes, t, &opts, grad_output, &mut grad)
                        .expect("lse"),
                )
            })
        });
    }
    let t: Vec<i64> = targets
        .to_dtype(DType::I64)
        .and_then(|t| t.to_vec1())
        .expect("targets");
    match logits.dtype() {
        DType::BF16 => run::<lse::bf16>(g, logits, &t),
        _ => run::<f32>(g, logits, &t),
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
