//! The fused cross-entropy allocates nothing proportional to `rows × classes`.
//!
//! A counting global allocator (wrapping [`System`]) records every byte allocated and the peak of
//! live bytes, in every thread: rayon's workers are counted on purpose, so work the library hands
//! to its pool cannot hide an allocation. Each measurement follows a warm-up call of the same
//! kind (rayon's pool and lazy statics allocate on first use) and is the minimum over a few calls,
//! so that the test harness's own small allocations on its main thread cannot make it flaky.
//!
//! `cargo test -p lse --test allocation -- --nocapture` prints the numbers.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use lse::{bf16, CrossEntropyOptions, Element, GradOutput, Targets};

/// [`System`], counting bytes allocated (monotonic), live bytes and the peak of live bytes.
struct Counting;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

impl Counting {
    fn add(bytes: usize) {
        ALLOCATED.fetch_add(bytes, Ordering::SeqCst);
        let live = LIVE.fetch_add(bytes, Ordering::SeqCst) + bytes;
        PEAK.fetch_max(live, Ordering::SeqCst);
    }

    fn remove(bytes: usize) {
        LIVE.fetch_sub(bytes, Ordering::SeqCst);
    }
}

// SAFETY: every call is forwarded to `System` unchanged; the counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = System.alloc(layout);
        if !ptr.is_null() {
            Counting::add(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = System.alloc_zeroed(layout);
        if !ptr.is_null() {
            Counting::add(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        Counting::remove(layout.size());
    }

    /// Counted as freeing the old block and allocating the new one.
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = System.realloc(ptr, layout, new_size);
        if !new.is_null() {
            Counting::remove(layout.size());
            Counting::add(new_size);
        }
        new
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// What one closure allocated, in all threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Usage {
    /// Bytes allocated during the call (frees not subtracted).
    allocated: usize,
    /// The highest live-byte count during the call, above the count at its start.
    peak_above_start: usize,
}

/// Runs `f` and reports what it allocated.
fn measure<R>(f: impl FnOnce() -> R) -> (R, Usage) {
    let live_at_start = LIVE.load(Ordering::SeqCst);
    PEAK.store(live_at_start, Ordering::SeqCst);
    let allocated_at_start = ALLOCATED.load(Ordering::SeqCst);
    let result = black_box(f());
    let usage = Usage {
        allocated: ALLOCATED.load(Ordering::SeqCst) - allocated_at_start,
        peak_above_start: PEAK.load(Ordering::SeqCst).saturating_sub(live_at_start),
    };
    (result, usage)
}

/// The counters are process-wide: one measuring test at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The measured calls after one warm-up call: the smallest allocation of `REPEATS` calls (noise
/// from other threads only ever adds).
const REPEATS: usize = 2;

#[derive(Clone, Copy, Debug)]
enum Call {
    WithGrad,
    InPlace,
}

#[derive(Clone, Copy, Debug)]
enum Opts {
    Default,
    SmoothedZLoss,
}

impl Opts {
    fn options(self) -> CrossEntropyOptions<'static> {
        match self {
            Opts::Default => CrossEntropyOptions::default(),
            Opts::SmoothedZLoss => CrossEntropyOptions {
                label_smoothing: 0.1,
                z_loss: 1e-4,
                ..Default::default()
            },
        }
    }
}

fn logits<E: Element>(rows: usize, classes: usize) -> Vec<E> {
    (0..rows * classes)
        .map(|i| E::from_f64(((i as f64) * 0.618_034).fract() * 16.0 - 8.0))
        .collect()
}

/// The allocation of one fused cross-entropy call of `rows × classes` (warmed up, least of
/// [`REPEATS`]). Only the call is measured: inputs, gradient buffer and the in-place copy of the
/// logits are made before it.
fn cross_entropy_usage<E: Element>(call: Call, opts: Opts, rows: usize, classes: usize) -> Usage {
    let x = logits::<E>(rows, classes);
    let targets: Vec<i64> = (0..rows as i64)
        .map(|r| r * 7919 % classes as i64)
        .collect();
    let options = opts.options();
    let mut grad = vec![E::zero(); x.len()];
    let mut scratch = x.clone();
    let mut best: Option<Usage> = None;
    for attempt in 0..=REPEATS {
        let (loss, usage) = match call {
            Call::WithGrad => measure(|| {
                lse::cross_entropy_with_grad(
                    &x,
                    classes,
                    Targets::Classes(&targets),
                    &options,
                    GradOutput::default(),
                    &mut grad,
                )
                .expect("finite logits")
                .loss
            }),
            Call::InPlace => {
                scratch.copy_from_slice(&x);
                measure(|| {
                    lse::cross_entropy_in_place(
                        &mut scratch,
                        classes,
                        Targets::Classes(&targets),
                        &options,
                        GradOutput::default(),
                    )
                    .expect("finite logits")
                    .loss
                })
            }
        };
        let loss: f64 = loss.into();
        assert!(loss.is_finite());
        if attempt == 0 {
            continue; // warm-up
        }
        best = Some(match best {
            Some(b) if b.allocated <= usage.allocated => b,
            _ => usage,
        });
    }
    best.expect("REPEATS ≥ 1")
}

const ROWS: usize = 64;
const CLASSES: usize = 32_000;

/// The bound: a sixteenth of one `rows × classes` buffer of `E`.
fn bound<E: Element>(rows: usize, classes: usize) -> usize {
    rows * classes * std::mem::size_of::<E>() / 16
}

/// Slack for allocations that may legitimately differ between two shapes (how rayon splits the
/// rows, capacity rounding). Even one scratch row of the logits differs by 48 000 B in `bf16`
/// between 8000 and 32 000 classes, so this also catches a buffer proportional to `classes` alone,
/// which the `rows × classes / 16` bound is too coarse to see.
const GROWTH_SLACK: usize = 4096;

/// For both calls and both option sets: one `64 × 32000` call allocates less than a sixteenth of
/// a `rows × classes` buffer of `E`, and no more (within [`GROWTH_SLACK`]) than a `64 × 8000` one.
fn check_fused_cross_entropy<E: Element>() {
    let _serial = serial();
    let limit = bound::<E>(ROWS, CLASSES);
    for call in [Call::WithGrad, Call::InPlace] {
        for opts in [Opts::Default, Opts::SmoothedZLoss] {
            let small = cross_entropy_usage::<E>(call, opts, ROWS, CLASSES / 4);
            let large = cross_entropy_usage::<E>(call, opts, ROWS, CLASSES);
            println!(
                "{} {call:?} {opts:?}: {ROWS}x{CLASSES} allocates {} B (peak {} B above start; \
                 bound {limit} B), {ROWS}x{} allocates {} B",
                E::DTYPE,
                large.allocated,
                large.peak_above_start,
                CLASSES / 4,
                small.allocated,
            );
            assert!(
                large.allocated < limit,
                "{} {call:?} {opts:?}: {} bytes allocated in one {ROWS}x{CLASSES} call, bound \
                 {limit} (1/16 of a rows x classes buffer)",
                E::DTYPE,
                large.allocated
            );
            assert!(
                large.allocated.abs_diff(small.allocated) < GROWTH_SLACK,
                "{} {call:?} {opts:?}: {} bytes at {} classes but {} at {CLASSES}",
                E::DTYPE,
                small.allocated,
                CLASSES / 4,
                large.allocated
            );
        }
    }
}

#[test]
fn f32_fused_cross_entropy_allocates_nothing_proportional_to_the_logits() {
    check_fused_cross_entropy::<f32>();
}

#[test]
fn bf16_fused_cross_entropy_allocates_nothing_proportional_to_the_logits() {
    check_fused_cross_entropy::<bf16>();
}

/// The detector detects: a `rows × classes` buffer made inside the measured call (what a
/// non-fused implementation would allocate for its probabilities) is counted and breaks both
/// bounds, even when it is freed before the call returns.
#[test]
fn counter_sees_a_rows_times_classes_buffer() {
    let _serial = serial();
    for bytes in [ROWS * CLASSES * 4, ROWS * CLASSES * 2, CLASSES * 2] {
        let ((), usage) = measure(|| {
            let buffer = black_box(vec![0u8; bytes]);
            drop(buffer);
        });
        println!("a {bytes} B buffer: {usage:?}");
        assert!(usage.allocated >= bytes);
        // Another thread may free a little between the two samples of `measure`.
        assert!(usage.peak_above_start + GROWTH_SLACK >= bytes);
    }
    // The same through the real measurement path: a cross-entropy that also allocates its
    // probabilities would exceed the bound of `check_fused_cross_entropy`.
    let x = logits::<bf16>(ROWS, CLASSES);
    let targets: Vec<i64> = (0..ROWS as i64).collect();
    let mut grad = vec![bf16::ZERO; x.len()];
    let ((), usage) = measure(|| {
        let mut probabilities = vec![bf16::ZERO; x.len()];
        lse::softmax(&x, CLASSES, &mut probabilities).expect("finite logits");
        lse::cross_entropy_with_grad(
            &x,
            CLASSES,
            Targets::Classes(&targets),
            &CrossEntropyOptions::default(),
            GradOutput::default(),
            &mut grad,
        )
        .expect("finite logits");
        black_box(probabilities);
    });
    println!("cross-entropy + a bf16 probability buffer: {usage:?}");
    assert!(usage.allocated >= bound::<bf16>(ROWS, CLASSES));
}

/// The fused linear cross-entropy at a language-model shape (8192 tokens, 131072 classes, a
/// small hidden size) stays within its working-memory budget plus `O(rows + classes)`: the
/// 4.3 GB of `f32` logits are never allocated. Besides the budget, it keeps the counted-row
/// list (8 B a row) and `db`'s `f64` sums (8 B a class); the matrix crate packs operands in
/// buffers of a few MiB at most (one `k × n` panel of the product: `dim × classes` here).
#[test]
fn linear_cross_entropy_stays_within_its_budget() {
    use lse::{LinearCrossEntropyOptions, LinearGradients, LinearHead};
    let _serial = serial();
    let (rows, dim, classes) = (8192, 4, 131_072);
    let budget = 32 << 20;
    let run = |rows: usize, classes: usize| {
        let hidden = logits::<f32>(rows, dim);
        let weight = logits::<f32>(classes, dim);
        let targets: Vec<i64> = (0..rows as i64)
            .map(|r| r * 7919 % classes as i64)
            .collect();
        let (mut dh, mut dw, mut db) = (
            vec![0.0; hidden.len()],
            vec![0.0; weight.len()],
            vec![0.0; classes],
        );
        let options = LinearCrossEntropyOptions {
            budget_bytes: budget,
            ..Default::default()
        };
        let head = LinearHead {
            weight: &weight,
            bias: None,
            classes,
        };
        measure(|| {
            let grads = LinearGradients {
                hidden: &mut dh,
                weight: &mut dw,
                bias: Some(&mut db),
            };
            lse::linear_cross_entropy_with_grad(
                &hidden,
                head,
                Targets::Classes(&targets),
                &options,
                GradOutput::default(),
                grads,
            )
            .expect("finite")
            .loss
        })
    };
    run(256, 4096); // warm-up: rayon's pool, thread-local rows
    let (loss, usage) = run(rows, classes);
    assert!(loss.is_finite());
    let logits_bytes = rows * classes * 4;
    let linear_terms = 8 * (rows + classes);
    let packing = 4 * dim * classes + (4 << 20);
    println!(
        "linear cross-entropy {rows}x{dim}x{classes}: peak {} B (budget {budget} B, logits would be {logits_bytes} B)",
        usage.peak_above_start
    );
    assert!(
        usage.peak_above_start <= budget + linear_terms + packing,
        "peak {} B over budget {budget} + O(N + V) {linear_terms} + packing {packing}",
        usage.peak_above_start
    );
}
