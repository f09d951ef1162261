//! `lse demo`: the same mixed-precision training run twice, naive softmax vs lse; the naive run
//! dies, the lse run trains.
//!
//! - [`data`]: the synthetic task (Gaussian clusters from a seed) and its random numbers;
//! - [`model`]: the MLP, its hand-written `f32` matmuls and Adam;
//! - [`train`]: the two runs in lockstep on the same batches;
//! - [`report`]: the text and JSON reports;
//! - [`plot`]: the PNG chart.

mod data;
mod model;
mod plot;
mod report;
mod train;

use std::fs;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use lse::guard::LossScalerConfig;
use lse::DType;

use crate::dtype::dispatch;
use crate::error::{CliError, Result};
use train::{Config, Experiment, Progress};

/// Input features of the task.
const DIM: usize = 32;
/// Hidden units of the MLP.
const HIDDEN: usize = 128;
/// Standard deviation of the class centres' coordinates (the noise around them is 1).
const SPREAD: f64 = 0.8;
/// Training samples per class.
const TRAIN_PER_CLASS: usize = 200;
/// Held-out samples per class.
const HELD_OUT_PER_CLASS: usize = 50;
/// The output layer starts at `N(0, OUT_SCALE² / HIDDEN)`: small logits at step 1.
const OUT_SCALE: f64 = 0.1;
/// Rows per batch.
const BATCH: usize = 128;
/// The loss scaler grows its scale after this many clean steps.
const GROWTH_INTERVAL: u32 = 200;
/// The final loss is the mean batch loss of this many last steps.
const FINAL_WINDOW: usize = 50;
/// The largest `--classes`.
const MAX_CLASSES: usize = 1000;
/// The largest `--steps`.
const MAX_STEPS: u64 = 1_000_000;

/// The default peak learning rate for `dtype`.
///
/// A naive `bf16` softmax survives logits up to 88.72, eight times `f16`'s 11.09: it takes a
/// hotter run (a learning rate 50 times higher) to drive the logits there.
fn default_lr(dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => 0.05,
        _ => 0.001,
    }
}

/// The long help of `lse demo`, after the options.
pub const AFTER_LONG_HELP: &str = "\
What it runs:
  Task      --classes Gaussian clusters in 32 dimensions, drawn from --seed: class c has a
            centre whose coordinates are drawn from N(0, 0.8^2), and its samples are the centre
            plus N(0, 1) noise in every coordinate. 200 training samples per class, 50 held-out
            samples per class (never trained on). The report gives the accuracy of the
            nearest true centre on the held-out set: the best any classifier can do.
  Model     MLP: 32 inputs -> 128 hidden (ReLU) -> one logit per class. He-initialised first
            layer, output layer N(0, 0.1^2/128), zero biases. Weights, matmuls and the whole
            backward pass in f32; the logits are rounded once into --dtype, and the loss and
            its gradient with respect to the logits are computed in --dtype, as in mixed-
            precision training.
  Training  --steps steps of Adam (beta 0.9/0.999, eps 1e-8), peak learning rate --lr with
            cosine decay to 0, batches of 128 from a reshuffled pass over the training set.
            As the model fits its training set, Adam keeps driving the logits up. The bf16
            default learning rate is 50 times the f16 one: bf16's naive softmax survives
            logits 8 times larger. Two runs with the same data, initial weights, batch order
            and hyperparameters, differing only in the loss:
    naive   lse::naive::cross_entropy: exp(x) / sum exp(x) and -log p evaluated in --dtype,
            the textbook way, with no guards; its gradient p - onehot, held in --dtype, is
            divided by the batch size in f32.
    lse     lse::cross_entropy_with_grad, which shifts by the row max and never exponentiates a
            positive number, guarded by lse::guard::LogitMonitor (fed by the loss's own logit
            statistics) and lse::guard::LossScaler (scale 2^16, doubled after 200 clean steps,
            halved on overflow); the f16/bf16 logits gradient is scaled by the loss scale (a
            scaled gradient past the dtype's range comes out inf), the f32 parameter gradients
            are unscaled and checked, and a step with a non-finite one is skipped.
  A naive f16 exp overflows once a logit passes ln(65504) = 11.09 (bf16: 88.72): exp gives
  inf, inf / inf = NaN, and the loss and the gradient of that step are NaN. The report names
  the first non-finite step of the naive run and the NaN triage of its tensors
  (lse::guard::triage on input, logits, probabilities, loss and gradient). The naive run then
  applies its update like any unguarded loop; once that writes NaN into the weights, every
  later step is NaN and the run stops.

Output: a report on stdout (or --json), a progress bar on stderr when it is a terminal, and
a PNG chart, DIR/demo-DTYPE.png, of both loss curves and of the largest logit per step.
Exit status 0; 1 if the lse run ever had a non-finite loss; 2 for bad arguments or an
unwritable --out.

Examples:
  lse demo                        f16: the naive run dies, the lse run trains on
  lse demo --dtype bf16           bf16 needs logits past 88.72: a hotter default learning rate
  lse demo --steps 500 --no-plot  a shorter run, no chart
  lse demo --json > demo.json     the summary and the per-step losses as JSON";

/// Arguments of `lse demo`.
#[derive(Debug, clap::Args)]
#[command(after_long_help = AFTER_LONG_HELP)]
pub struct Args {
    /// The dtype of the logits and of their gradient: f16 or bf16
    #[arg(long, short, value_name = "DTYPE", default_value = "f16", value_parser = parse_dtype)]
    pub dtype: DType,

    /// Optimizer steps of each run
    #[arg(long, value_name = "N", default_value_t = 2000, value_parser = parse_steps)]
    pub steps: u64,

    /// Peak learning rate of Adam (cosine decay to 0) [default: 0.001 for f16, 0.05 for bf16]
    #[arg(long, value_name = "LR", value_parser = parse_lr)]
    pub lr: Option<f32>,

    /// Number of classes (2 to 1000)
    #[arg(long, value_name = "C", default_value_t = 100, value_parser = parse_classes)]
    pub classes: usize,

    /// Seed of the task, the samples, the initial weights and the batch order
    #[arg(long, value_name = "SEED", default_value_t = 0)]
    pub seed: u64,

    /// Directory for the chart, created if missing
    #[arg(long, value_name = "DIR", default_value = "lse-demo-out")]
    pub out: PathBuf,

    /// Draw no chart (and write nothing)
    #[arg(long)]
    pub no_plot: bool,

    /// Print the summary and the per-step losses as JSON instead of the report
    #[arg(long)]
    pub json: bool,
}

/// `--dtype`: the two dtypes of mixed-precision training.
fn parse_dtype(s: &str) -> Result<DType, String> {
    match s.parse::<DType>() {
        Ok(d @ (DType::F16 | DType::BF16)) => Ok(d),
        Ok(d) => Err(format!(
            "lse demo trains with f16 or bf16 logits, as mixed-precision training does, not {d}"
        )),
        Err(_) => Err("expected f16 or bf16".to_owned()),
    }
}

fn parse_steps(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) if (1..=MAX_STEPS).contains(&n) => Ok(n),
        _ => Err(format!(
            "expected a whole number of steps from 1 to {MAX_STEPS}"
        )),
    }
}

fn parse_classes(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (2..=MAX_CLASSES).contains(&n) => Ok(n),
        _ => Err(format!(
            "expected a whole number of classes from 2 to {MAX_CLASSES}"
        )),
    }
}

fn parse_lr(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(lr) if lr.is_finite() && lr > 0.0 && lr <= 10.0 => Ok(lr),
        _ => Err("expected a learning rate above 0 and at most 10".to_owned()),
    }
}

/// The experiment that `args` describe.
fn config(args: &Args) -> Config {
    // No cap below the scaler's default: a scaled logits gradient past the dtype's range comes
    // out of the fused cross-entropy as inf, so the scaler sees the overflow and backs off.
    Config {
        seed: args.seed,
        classes: args.classes,
        dim: DIM,
        hidden: HIDDEN,
        spread: SPREAD,
        train_per_class: TRAIN_PER_CLASS,
        held_out_per_class: HELD_OUT_PER_CLASS,
        out_scale: OUT_SCALE,
        batch: BATCH,
        steps: args.steps,
        lr: args.lr.unwrap_or_else(|| default_lr(args.dtype)),
        scaler: LossScalerConfig {
            growth_interval: GROWTH_INTERVAL,
            ..LossScalerConfig::default()
        },
    }
}

/// The chart's path in `dir`.
fn chart_path(dir: &Path, dtype: DType) -> PathBuf {
    dir.join(format!("demo-{dtype}.png"))
}

/// Creates `dir` and checks that a file can be written there, before any training.
fn prepare_out_dir(dir: &Path) -> Result<()> {
    let fail = |e: std::io::Error| CliError::File {
        path: dir.to_owned(),
        message: format!("cannot write the chart there: {e}"),
    };
    fs::create_dir_all(dir).map_err(fail)?;
    let probe = dir.join(format!(".lse-demo-probe-{}", std::process::id()));
    fs::write(&probe, b"").map_err(fail)?;
    let _ = fs::remove_file(&probe);
    Ok(())
}

/// The progress bar on stderr (drawn only when stderr is a terminal).
fn progress_bar(steps: u64) -> ProgressBar {
    let bar = ProgressBar::new(steps);
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} training [{bar:30}] {pos}/{len} steps  {msg}  ({elapsed})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Runs `lse demo`, appending its report to `out`; returns the exit status: 0, or 1 when the
/// lse run had a non-finite loss.
///
/// # Errors
/// [`CliError::File`] when `--out` cannot be created or written; library errors are passed on.
pub fn run(args: &Args, out: &mut String) -> Result<u8> {
    let config = config(args);
    let chart = (!args.no_plot).then(|| chart_path(&args.out, args.dtype));
    if !args.no_plot {
        prepare_out_dir(&args.out)?;
    }
    let bar = progress_bar(config.steps);
    let update = |p: Progress| {
        if p.step.is_multiple_of(20) || p.step == config.steps {
            let naive = match p.naive_failed_at {
                Some(step) => format!("naive: non-finite at step {step}"),
                None => "naive: finite".to_owned(),
            };
            bar.set_message(format!("{naive} | lse loss {:.4}", p.stable_loss));
            bar.set_position(p.step);
        }
    };
    let outcome = dispatch(
        args.dtype,
        Experiment {
            config: &config,
            progress: &update,
        },
    );
    bar.finish_and_clear();
    let outcome = outcome?;
    if let Some(path) = &chart {
        plot::draw(path, args.dtype, &config, &outcome)?;
    }
    let summary = report::Summary {
        dtype: args.dtype,
        config: &config,
        outcome: &outcome,
        chart: chart.as_deref(),
    };
    if args.json {
        out.push_str(&summary.json());
        out.push('\n');
    } else {
        summary.text(out);
    }
    Ok(u8::from(outcome.stable.first_non_finite.is_some()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked() {
        assert_eq!(parse_dtype("BF16"), Ok(DType::BF16));
        assert!(parse_dtype("f64").unwrap_err().contains("not f64"));
        assert!(parse_dtype("f8").is_err());
        assert!(parse_steps("0").is_err() && parse_steps("x").is_err());
        assert_eq!(parse_steps("7"), Ok(7));
        assert!(parse_classes("1").is_err() && parse_classes("1001").is_err());
        assert_eq!(parse_classes("2"), Ok(2));
        assert!(parse_lr("0").is_err() && parse_lr("nan").is_err() && parse_lr("-1").is_err());
    }
}
