//! `lse bench --op linear_cross_entropy --shape NxDxV`: the fused linear cross-entropy, forward
//! and backward, beside the matrix crate alone on the same three products, in one run.
//!
//! For each dtype and shape: the fused call's best and median time over `--repeats` (after a
//! warm-up), its rate in GFLOP/s counted as `6·N·D·V` (three products of `2·N·D·V` each), the
//! peak extra memory of the call (the growth of the process's peak resident set, reset before
//! the call through `/proc/self/clear_refs`; `-` where that is not available), and the fraction
//! of the matrix crate's own rate: `gemm` timed on the same three `f32` products, chunk by chunk
//! at the chunk size the call's budget gives (`logits = H_c·Wᵀ`, `dH_c = G·W`, `dW += Gᵀ·H_c`),
//! with nothing else in between.

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::Instant;

use lse::{
    DType, Element, GradOutput, LinearCrossEntropyOptions, LinearGradients, LinearHead,
    DEFAULT_LINEAR_BUDGET_BYTES,
};
use serde::Serialize;

use super::args::Args;
use super::inputs::{normal_vec, targets};
use super::timing::best_and_median;
use crate::error::{CliError, Result};

/// One measured case.
#[derive(Clone, Debug, Serialize)]
pub struct LinearResult {
    /// The dtype of `H` and `W`.
    pub dtype: String,
    /// `N`, `D`, `V`.
    pub rows: usize,
    /// Hidden size `D`.
    pub dim: usize,
    /// Classes `V`.
    pub classes: usize,
    /// The working-memory budget (bytes).
    pub budget_bytes: usize,
    /// Best and median seconds of one forward + backward call.
    pub best_s: f64,
    /// Median seconds.
    pub median_s: f64,
    /// `6·N·D·V / best_s / 1e9`.
    pub gflops: f64,
    /// Seconds of the three `f32` products alone (best of the repeats).
    pub matmul_s: f64,
    /// `matmul_s / best_s`: the fraction of the matrix crate's own rate.
    pub matmul_fraction: f64,
    /// Peak resident-set growth during one call, bytes (`None` where unmeasurable).
    pub peak_extra_bytes: Option<u64>,
    /// The reduced loss (a sanity value).
    pub loss: f32,
}

/// Runs the cases of `args` (every `--shape` must be `NxDxV`).
///
/// # Errors
/// A shape without a hidden size, a dtype other than f32/f16/bf16, or a library error.
pub fn run(args: &Args, threads: usize, out: &mut String) -> Result<u8> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| CliError::Other(format!("cannot start {threads} threads: {e}")))?;
    let mut results = Vec::new();
    for &shape in &args.shape {
        let Some(dim) = shape.dim else {
            return Err(CliError::usage(format!(
                "--op linear_cross_entropy needs --shape NxDxV (tokens x hidden x classes), not '{shape}'"
            )));
        };
        for dtype in args.dtype.iter().flat_map(|d| d.dtypes()) {
            let job = Case {
                rows: shape.rows,
                dim,
                classes: shape.classes,
                repeats: args.repeats,
            };
            // f64 has no f32 statistics type: the linear cross-entropy takes f32, f16 and bf16.
            let result = pool.install(|| match dtype {
                DType::F32 => job.run::<f32>(),
                DType::F16 => job.run::<lse::f16>(),
                DType::BF16 => job.run::<lse::bf16>(),
                DType::F64 => Err(CliError::usage(
                    "--op linear_cross_entropy takes --dtype f32, f16 or bf16",
                )),
            })?;
            results.push(result);
        }
    }
    if args.json {
        let json = serde_json::to_string_pretty(&results)
            .map_err(|e| CliError::Other(format!("cannot write the JSON report: {e}")))?;
        out.push_str(&json);
        out.push('\n');
        return Ok(0);
    }
    let _ = writeln!(
        out,
        "linear cross-entropy, forward + backward (dH, dW, db), {threads} threads, budget {} MiB",
        DEFAULT_LINEAR_BUDGET_BYTES >> 20
    );
    let _ = writeln!(
        out,
        "{:<6} {:>20} {:>10} {:>10} {:>8} {:>12} {:>9} {:>12}",
        "dtype",
        "N x D x V",
        "best s",
        "median s",
        "GFLOP/s",
        "gemm alone s",
        "of gemm",
        "peak extra"
    );
    for r in &results {
        let peak = r.peak_extra_bytes.map_or("-".to_owned(), |b| {
            format!("{:.1} MiB", b as f64 / 1048576.0)
        });
        let _ = writeln!(
            out,
            "{:<6} {:>20} {:>10.3} {:>10.3} {:>8.1} {:>12.3} {:>8.0}% {:>12}",
            r.dtype,
            format!("{}x{}x{}", r.rows, r.dim, r.classes),
            r.best_s,
            r.median_s,
            r.gflops,
            r.matmul_s,
            100.0 * r.matmul_fraction,
            peak
        );
    }
    Ok(0)
}

/// One dtype's case of one shape.
#[derive(Clone, Copy)]
struct Case {
    rows: usize,
    dim: usize,
    classes: usize,
    repeats: usize,
}

impl Case {
    fn run<E: Element<Stat = f32>>(self) -> Result<LinearResult> {
        let Case {
            rows,
            dim,
            classes,
            repeats,
        } = self;
        // Logits of about N(0, 3²): hidden states N(0, 1), weights N(0, 3²/D).
        let hidden = normal_vec::<E>(rows * dim, 1, 1.0);
        let weight = normal_vec::<E>(classes * dim, 2, 3.0 / (dim as f64).sqrt());
        let bias = normal_vec::<E>(classes, 6, 0.1);
        let targets = targets(rows, classes);
        let mut dh = vec![E::zero(); hidden.len()];
        let mut dw = vec![E::zero(); weight.len()];
        let mut db = vec![E::zero(); classes];
        let options = LinearCrossEntropyOptions::default();
        let head = LinearHead {
            weight: &weight,
            bias: Some(&bias),
            classes,
        };
        let mut call = || {
            let grads = LinearGradients {
                hidden: &mut dh,
                weight: &mut dw,
                bias: Some(&mut db),
            };
            lse::linear_cross_entropy_with_grad(
                &hidden,
                head,
                lse::Targets::Classes(&targets),
                &options,
                GradOutput::Scalar(1.0),
                grads,
            )
        };
        let loss = call()?.loss; // warm-up
        let peak_extra_bytes = peak_growth(|| call().map(|_| ()))?;
        let mut times = Vec::with_capacity(repeats);
        for _ in 0..repeats {
            let start = Instant::now();
            black_box(call()?);
            times.push(start.elapsed().as_secs_f64());
        }
        let (best_s, median_s) = best_and_median(times);
        let matmul_s = matmul_alone(rows, dim, classes, E::DTYPE, repeats);
        let flops = 6.0 * rows as f64 * dim as f64 * classes as f64;
        Ok(LinearResult {
            dtype: E::DTYPE.name().to_owned(),
            rows,
            dim,
            classes,
            budget_bytes: options.budget_bytes,
            best_s,
            median_s,
            gflops: flops / best_s / 1e9,
            matmul_s,
            matmul_fraction: matmul_s / best_s,
            peak_extra_bytes,
            loss,
        })
    }
}

/// The rows of a chunk at the default budget, as the library plans it: `f32` logits, hidden row
/// and `dH` row per row, less a quarter of the budget for the widened weight block of a half
/// type, then the rows shared out evenly over the chunks needed.
fn chunk_rows(rows: usize, dim: usize, classes: usize, dtype: DType) -> usize {
    let budget = DEFAULT_LINEAR_BUDGET_BYTES;
    let block = if dtype == DType::F32 {
        0
    } else {
        (budget / 4 / (4 * dim)).clamp(1, classes) * 4 * dim
    };
    let most = ((budget - block) / (4 * (classes + 2 * dim))).clamp(1, rows);
    rows.div_ceil(rows.div_ceil(most))
}

/// Best seconds of the three `f32` products of a call, chunk by chunk, with `gemm` alone.
fn matmul_alone(rows: usize, dim: usize, classes: usize, dtype: DType, repeats: usize) -> f64 {
    let n = chunk_rows(rows, dim, classes, dtype);
    let h = normal_vec::<f32>(n * dim, 1, 1.0);
    let w = normal_vec::<f32>(classes * dim, 2, 0.1);
    let mut x = vec![0.0f32; n * classes];
    let mut dh = vec![0.0f32; n * dim];
    let mut dw = vec![0.0f32; classes * dim];
    let threads = rayon::current_num_threads();
    let product = |m: usize,
                   nn: usize,
                   k: usize,
                   dst: &mut [f32],
                   (dst_rs, dst_cs): (isize, isize),
                   lhs: &[f32],
                   (lhs_rs, lhs_cs): (isize, isize),
                   rhs: &[f32],
                   (rhs_rs, rhs_cs): (isize, isize),
                   acc: bool| {
        // SAFETY: every view below lies inside its buffer (the shapes are those the buffers
        // were allocated with) and `dst` overlaps neither operand.
        unsafe {
            gemm::gemm(
                m,
                nn,
                k,
                dst.as_mut_ptr(),
                dst_cs,
                dst_rs,
                acc,
                lhs.as_ptr(),
                lhs_cs,
                lhs_rs,
                rhs.as_ptr(),
                rhs_cs,
                rhs_rs,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(threads),
            );
        }
    };
    let (d, v, ni) = (dim as isize, classes as isize, n as isize);
    let chunks = rows.div_ceil(n);
    let mut best = f64::INFINITY;
    for _ in 0..=repeats {
        let start = Instant::now();
        for chunk in 0..chunks {
            // logits = H_c · Wᵀ; dH_c = G · W; dW += Gᵀ · H_c
            product(
                n,
                classes,
                dim,
                &mut x,
                (v, 1),
                &h,
                (d, 1),
                &w,
                (1, d),
                false,
            );
            product(
                n,
                dim,
                classes,
                &mut dh,
                (d, 1),
                &x,
                (v, 1),
                &w,
                (d, 1),
                false,
            );
            product(
                classes,
                dim,
                n,
                &mut dw,
                (d, 1),
                &x,
                (1, v),
                &h,
                (d, 1),
                chunk > 0,
            );
        }
        black_box((&x, &dh, &dw, ni));
        best = best.min(start.elapsed().as_secs_f64());
    }
    best
}

/// The growth of the peak resident set during `f`, in bytes: `None` where the peak cannot be
/// reset (not Linux).
fn peak_growth(f: impl FnOnce() -> lse::Result<()>) -> Result<Option<u64>> {
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let before = reset.then(|| status_kib("VmHWM")).flatten();
    f()?;
    let after = status_kib("VmHWM");
    Ok(match (before, after) {
        (Some(b), Some(a)) => Some(a.saturating_sub(b) * 1024),
        _ => None,
    })
}

/// A `kB` field of `/proc/self/status`.
fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
