//! What the logit monitor costs inside the fused cross-entropy: the same forward + gradient call
//! with and without `keep_logit_stats`. The bar is ≤ 5 %.
//!
//! `cargo bench -p lse --bench monitor`

// `criterion_group!` defines an undocumented `pub fn`; the workspace lints ask for docs.
#![allow(missing_docs)]

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lse::{bf16, cross_entropy_with_grad, CrossEntropyOptions, Element, GradOutput, Targets};

fn logits<E: Element>(rows: usize, classes: usize) -> Vec<E> {
    (0..rows * classes)
        .map(|i| E::from_f64(((i as f64) * 0.618_034).fract() * 16.0 - 8.0))
        .collect()
}

fn bench_dtype<E: Element>(c: &mut Criterion, rows: usize, classes: usize) {
    let x = logits::<E>(rows, classes);
    let targets: Vec<i64> = (0..rows as i64).map(|r| r * 31 % classes as i64).collect();
    let mut grad = vec![E::zero(); x.len()];
    let mut group = c.benchmark_group(format!("ce_monitor/{}/{rows}x{classes}", E::DTYPE));
    group.throughput(Throughput::Elements(x.len() as u64));
    group.sample_size(20);
    for watch in [false, true] {
        let options = CrossEntropyOptions {
            keep_logit_stats: watch,
            ..Default::default()
        };
        let name = if watch { "with_stats" } else { "without_stats" };
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                let out = cross_entropy_with_grad(
                    black_box(&x),
                    classes,
                    Targets::Classes(&targets),
                    &options,
                    GradOutput::default(),
                    &mut grad,
                )
                .expect("finite logits");
                black_box(out.loss)
            })
        });
    }
    group.finish();
}

fn monitor_overhead(c: &mut Criterion) {
    bench_dtype::<f32>(c, 64, 32_000);
    bench_dtype::<bf16>(c, 64, 32_000);
}

criterion_group!(benches, monitor_overhead);
criterion_main!(benches);
