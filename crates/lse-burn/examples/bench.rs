//! lse-burn beside burn's own losses on burn-flex (the CPU backend, all cores), in one run:
//!
//! - the cross-entropy, forward and backward through burn's autodiff on the same logits, against
//!   burn's `CrossEntropyLoss`: each one's median time and the ratio;
//! - with `--linear DIM`: the linear loss `hidden · weightᵀ` (forward and backward into both)
//!   against burn's matmul + `CrossEntropyLoss`: time and the peak memory each allocates beyond
//!   its inputs (a counting allocator).
//!
//! ```text
//! cargo run --release --no-default-features --example bench -- [--rows 4096] [--classes 32000] [--repeats 5]
//! cargo run --release --no-default-features --example bench -- --linear 1024 --rows 8192 --repeats 1 [--budget-mib 64]
//! ```
//! (from `crates/lse-burn`.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// The system allocator, counting the bytes live and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call forwards to `System` unchanged; the counters are only statistics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(p, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f`, returning its result, the seconds it took and the peak bytes it allocated beyond
/// what was live when it started.
fn measured<T>(f: impl FnOnce() -> T) -> (T, f64, usize) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let start = Instant::now();
    let out = f();
    let seconds = start.elapsed().as_secs_f64();
    (out, seconds, PEAK.load(Ordering::Relaxed) - base)
}

use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::{Device, Distribution, Int, Tensor};
use lse_burn::{
    cross_entropy, linear_cross_entropy, CrossEntropyOptions, LinearCrossEntropyOptions,
};

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (mut rows, mut classes, mut repeats, mut linear) = (4096usize, 32_000usize, 5usize, 0usize);
    let mut budget_mib = LinearCrossEntropyOptions::default().budget_bytes >> 20;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || -> Result<usize, Box<dyn std::error::Error>> {
            Ok(args.next().ok_or("a flag needs a number")?.parse()?)
        };
        match arg.as_str() {
            "--rows" => rows = value()?,
            "--classes" => classes = value()?,
            "--repeats" => repeats = value()?,
            "--linear" => linear = value()?,
            "--budget-mib" => budget_mib = value()?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let device = Device::flex().autodiff();
    device.seed(1);
    if linear > 0 {
        return linear_bench(&device, rows, linear, classes, repeats, budget_mib << 20);
    }
    let logits = Tensor::<2>::random([rows, classes], Distribution::Normal(0.0, 4.0), &device);
    let targets =
        Tensor::<1, Int>::random([rows], Distribution::Uniform(0.0, classes as f64), &device);
    let burn_loss = CrossEntropyLossConfig::new().init(&device);
    let options = CrossEntropyOptions::default();

    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for _ in 0..repeats {
        // Alternate, so both see the same machine state.
        let x = logits.clone().detach().require_grad();
        let start = Instant::now();
        let loss = cross_entropy(x.clone(), targets.clone(), &options)?;
        let grad = x.grad(&loss.backward()).expect("tracked");
        let _ = grad.into_data();
        ours.push(start.elapsed().as_secs_f64());

        let x = logits.clone().detach().require_grad();
        let start = Instant::now();
        let loss = burn_loss.forward(x.clone(), targets.clone());
        let grad = x.grad(&loss.backward()).expect("tracked");
        let _ = grad.into_data();
        theirs.push(start.elapsed().as_secs_f64());
    }
    let (ours, theirs) = (median(ours), median(theirs));
    let gb = (rows * classes * 4) as f64 / 1e9;
    println!(
        "cross-entropy forward + backward, {rows} x {classes} f32, burn-flex, median of {repeats}:"
    );
    println!(
        "  lse-burn              {:8.1} ms  ({:.2} GB/s of logits)",
        ours * 1e3,
        gb / ours
    );
    println!(
        "  burn CrossEntropyLoss {:8.1} ms  ({:.2} GB/s of logits)",
        theirs * 1e3,
        gb / theirs
    );
    println!("  ratio (burn / lse-burn): {:.2}x", theirs / ours);
    Ok(())
}

/// The linear loss against burn's unfused path: time and peak extra memory.
fn linear_bench(
    device: &Device,
    rows: usize,
    dim: usize,
    classes: usize,
    repeats: usize,
    budget_bytes: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let hidden = Tensor::<2>::random([rows, dim], Distribution::Normal(0.0, 1.0), device);
    let weight = Tensor::<2>::random([classes, dim], Distribution::Normal(0.0, 0.03), device);
    let targets =
        Tensor::<1, Int>::random([rows], Distribution::Uniform(0.0, classes as f64), device);
    let burn_loss = CrossEntropyLossConfig::new().init(device);
    let options = LinearCrossEntropyOptions {
        budget_bytes,
        ..Default::default()
    };
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let (mut ours_peak, mut theirs_peak) = (0, 0);
    for _ in 0..repeats {
        let (h, w) = (
            hidden.clone().detach().require_grad(),
            weight.clone().detach().require_grad(),
        );
        let (result, seconds, peak) = measured(|| -> Result<_, lse_burn::Error> {
            let loss = linear_cross_entropy(h.clone(), w.clone(), None, targets.clone(), &options)?;
            let grads = loss.clone().backward();
            // burn-flex runs eagerly: the gradients exist when `backward` returns.
            let (dh, dw) = (
                h.grad(&grads).expect("tracked"),
                w.grad(&grads).expect("tracked"),
            );
            Ok((loss.into_scalar::<f32>(), dh, dw))
        });
        let (ours_loss, dh, dw) = result?;
        let _ = (dh.into_data(), dw.into_data());
        ours.push(seconds);
        ours_peak = ours_peak.max(peak);

        let (h, w) = (
            hidden.clone().detach().require_grad(),
            weight.clone().detach().require_grad(),
        );
        let (theirs_loss, seconds, peak) = measured(|| {
            let logits = h.clone().matmul(w.clone().transpose());
            let loss = burn_loss.forward(logits, targets.clone());
            let grads = loss.clone().backward();
            let (dh, dw) = (
                h.grad(&grads).expect("tracked"),
                w.grad(&grads).expect("tracked"),
            );
            let _ = (dh.into_data(), dw.into_data());
            loss.into_scalar::<f32>()
        });
        theirs.push(seconds);
        theirs_peak = theirs_peak.max(peak);
        println!("  losses: lse-burn {ours_loss:.6}, burn {theirs_loss:.6}");
    }
    let (ours, theirs) = (median(ours), median(theirs));
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    println!(
        "linear cross-entropy forward + backward, {rows} x {dim} x {classes} f32, burn-flex, \
         budget {} MiB, median of {repeats}:",
        budget_bytes >> 20
    );
    println!(
        "  lse-burn                      {:8.1} ms, peak extra {:9.1} MiB",
        ours * 1e3,
        mib(ours_peak)
    );
    println!(
        "  burn matmul + CrossEntropyLoss {:8.1} ms, peak extra {:9.1} MiB",
        theirs * 1e3,
        mib(theirs_peak)
    );
    println!(
        "  time ratio (burn / lse-burn) {:.2}x, memory ratio (lse-burn / burn) {:.3}",
        theirs / ours,
        ours_peak as f64 / theirs_peak as f64
    );
    Ok(())
}
