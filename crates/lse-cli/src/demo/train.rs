//! The two training runs of `lse demo`, stepped in lockstep on the same batches.

use lse::guard::{
    triage, LogitMonitor, LossScaler, LossScalerConfig, MonitorConfig, MonitorEvent, Role,
    TensorShapeError, TensorView, TriageReport,
};
use lse::{cross_entropy_with_grad, CrossEntropyOptions, Element, GradOutput, Targets};

use super::data::{stream, Rng, Samples, Task};
use super::model::{Activations, Adam, Mlp, Params};
use crate::dtype::PerDType;
use crate::error::{CliError, Result};

/// Everything that defines the experiment.
#[derive(Clone, Debug)]
pub struct Config {
    /// Seed of the task, the samples, the initialisation and the batch order.
    pub seed: u64,
    /// Classes.
    pub classes: usize,
    /// Input features.
    pub dim: usize,
    /// Hidden units.
    pub hidden: usize,
    /// Standard deviation of the class centres' coordinates (the samples have unit noise).
    pub spread: f64,
    /// Training samples per class.
    pub train_per_class: usize,
    /// Held-out samples per class.
    pub held_out_per_class: usize,
    /// Output-layer initialisation scale (`w2 ~ N(0, out_scale² / hidden)`).
    pub out_scale: f64,
    /// Rows per batch.
    pub batch: usize,
    /// Optimizer steps.
    pub steps: u64,
    /// Peak learning rate of Adam (cosine decay to 0 over the run).
    pub lr: f32,
    /// The stable run's loss scaler.
    pub scaler: LossScalerConfig,
}

impl Config {
    /// The learning rate of step `step` (from 1): `lr · (1 + cos(π · (step − 1) / steps)) / 2`.
    pub fn lr_at(&self, step: u64) -> f32 {
        let t = step.saturating_sub(1) as f64 / self.steps.max(1) as f64;
        (f64::from(self.lr) * 0.5 * (1.0 + (core::f64::consts::PI * t).cos())) as f32
    }

    /// The number of parameters of the model.
    pub fn params(&self) -> usize {
        (self.dim + 1) * self.hidden + (self.hidden + 1) * self.classes
    }
}

/// The first step of a run whose loss or logits gradient is not finite.
#[derive(Clone, Debug)]
pub struct FirstNonFinite {
    /// The step (counted from 1).
    pub step: u64,
    /// The batch loss of that step.
    pub loss: f64,
    /// Rows of the batch whose loss is NaN.
    pub nan_rows: usize,
    /// Rows whose loss is `+inf`.
    pub inf_rows: usize,
    /// Non-finite entries of the logits gradient.
    pub bad_gradients: usize,
    /// The largest logit of the batch.
    pub max_logit: f64,
    /// What [`triage`] says about the step's tensors (naive run only).
    pub triage: Option<TriageReport>,
    /// Held-out accuracy of the weights the step started from.
    pub accuracy_before: f64,
}

/// The step whose update wrote NaN or infinity into the parameters: the end of a run.
#[derive(Clone, Copy, Debug)]
pub struct Poisoned {
    /// The step.
    pub step: u64,
    /// Non-finite parameters after its update.
    pub params: usize,
}

/// What one run did.
#[derive(Clone, Debug, Default)]
pub struct RunOutcome {
    /// The batch loss of every step taken, step `i + 1` at index `i` (NaN or `inf` where it was
    /// not finite).
    pub losses: Vec<f64>,
    /// The largest logit of every step taken.
    pub max_logits: Vec<f64>,
    /// The first non-finite step, if any.
    pub first_non_finite: Option<FirstNonFinite>,
    /// Steps whose loss or logits gradient was not finite.
    pub non_finite_steps: usize,
    /// The step whose update made the parameters non-finite (the run stops there).
    pub poisoned: Option<Poisoned>,
    /// Held-out accuracy of the final weights; `None` when they are not finite.
    pub accuracy: Option<f64>,
    /// Steps the loss scaler skipped (stable run only).
    pub skipped: Vec<u64>,
    /// The loss scale at the start and at the end (stable run only).
    pub scales: Option<(f64, f64)>,
    /// Entries of the logits gradient that were nonzero at the loss scale but would have been
    /// flushed to 0 at scale 1 (stable run only).
    pub rescued_from_underflow: u64,
    /// What the logit monitor reported (stable run only): starts, reminders, clearings.
    pub monitor_events: Vec<MonitorEvent>,
    /// The first warning: its step and text.
    pub first_warning: Option<(u64, String)>,
}

impl RunOutcome {
    /// The mean batch loss of the last `window` steps taken, or the loss of the last step when
    /// it is not finite.
    pub fn final_loss(&self, window: usize) -> f64 {
        let n = self.losses.len();
        match self.losses.last() {
            Some(last) if !last.is_finite() => *last,
            Some(_) => {
                let tail = &self.losses[n.saturating_sub(window)..];
                tail.iter().sum::<f64>() / tail.len() as f64
            }
            None => f64::NAN,
        }
    }

    /// The largest logit over all steps taken.
    pub fn peak_logit(&self) -> f64 {
        self.max_logits
            .iter()
            .copied()
            .filter(|v| v.is_finite())
            .fold(f64::NEG_INFINITY, f64::max)
    }
}

/// Both runs, and the task they trained on.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The naive run.
    pub naive: RunOutcome,
    /// The stable run.
    pub stable: RunOutcome,
    /// Held-out accuracy of the nearest true centre (the best achievable on average).
    pub bayes_accuracy: f64,
    /// Held-out accuracy of the initial weights.
    pub initial_accuracy: f64,
}

/// The progress of the two runs after a step, for a progress bar.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// The step just taken.
    pub step: u64,
    /// The naive run's first non-finite step, if any.
    pub naive_failed_at: Option<u64>,
    /// The stable run's loss at this step.
    pub stable_loss: f64,
}

/// The data both runs see.
struct Data {
    train: Samples,
    held_out: Samples,
    order: Rng,
    /// The current pass's permutation of the training set, and the position in it.
    epoch: Vec<usize>,
    next: usize,
}

impl Data {
    /// The next batch, gathered into `x` and `y`: consecutive samples of a shuffled pass over the
    /// training set, reshuffled at the end of every pass.
    fn batch(&mut self, rows: usize, dim: usize, x: &mut Vec<f32>, y: &mut Vec<i64>) {
        x.clear();
        y.clear();
        for _ in 0..rows {
            if self.next == self.epoch.len() {
                self.epoch = self.order.permutation(self.train.len());
                self.next = 0;
            }
            let i = self.epoch[self.next];
            self.next += 1;
            x.extend_from_slice(&self.train.x[i * dim..(i + 1) * dim]);
            y.push(self.train.y[i]);
        }
    }
}

/// Which loss a run uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// `lse::naive::cross_entropy`: `exp(x) / Σ exp(x)` in the low-precision dtype, no guards.
    Naive,
    /// `lse::cross_entropy_with_grad`, with the logit monitor and the loss scaler.
    Stable,
}

/// The guards of the stable run.
struct Guards {
    monitor: LogitMonitor,
    scaler: LossScaler,
}

/// One run's state.
struct Run<E: Element> {
    kind: Kind,
    model: Mlp,
    adam: Adam,
    grads: Params,
    acts: Activations,
    logits: Vec<E>,
    grad: Vec<E>,
    row_loss: Vec<E>,
    gz: Vec<f32>,
    guards: Option<Guards>,
    outcome: RunOutcome,
}

fn shape_error(e: TensorShapeError) -> CliError {
    CliError::Other(e.to_string())
}

impl<E: Element> Run<E> {
    fn new(kind: Kind, model: Mlp, config: &Config) -> Result<Self> {
        let (d, h, c) = (model.dim, model.hidden, model.classes);
        let guards = match kind {
            Kind::Naive => None,
            Kind::Stable => Some(Guards {
                monitor: LogitMonitor::new(MonitorConfig {
                    watch: E::DTYPE,
                    ..MonitorConfig::default()
                })?,
                scaler: LossScaler::new(config.scaler.clone())
                    .map_err(|e| CliError::Other(e.to_string()))?,
            }),
        };
        let outcome = RunOutcome {
            scales: guards
                .as_ref()
                .map(|g| (g.scaler.scale(), g.scaler.scale())),
            ..RunOutcome::default()
        };
        Ok(Run {
            kind,
            model,
            adam: Adam::new(d, h, c),
            grads: Params::zeros(d, h, c),
            acts: Activations::default(),
            logits: Vec::new(),
            grad: Vec::new(),
            row_loss: Vec::new(),
            gz: Vec::new(),
            guards,
            outcome,
        })
    }

    /// Whether the run goes on: its parameters are finite.
    fn alive(&self) -> bool {
        self.outcome.poisoned.is_none()
    }

    /// One training step on the batch `(x, y)`; returns the batch loss.
    fn step(
        &mut self,
        step: u64,
        x: &[f32],
        y: &[i64],
        config: &Config,
        held_out: &Samples,
    ) -> Result<f64> {
        let c = self.model.classes;
        let rows = y.len();
        // Forward in f32; the logits are rounded once into E, as a mixed-precision matmul
        // writes them.
        self.model.forward(x, &mut self.acts);
        self.logits.clear();
        self.logits
            .extend(self.acts.z.iter().map(|&v| E::from_f64(f64::from(v))));
        self.grad.resize(self.logits.len(), E::zero());
        let max_logit = self
            .logits
            .iter()
            .map(|v| v.to_f64())
            .fold(f64::NEG_INFINITY, |m, v| if v > m { v } else { m });
        self.outcome.max_logits.push(max_logit);

        // The loss and its gradient with respect to the logits, in E; then the backward pass
        // in f32 from that gradient.
        let loss = match self.kind {
            Kind::Naive => {
                self.row_loss.resize(rows, E::zero());
                lse::naive::cross_entropy(&self.logits, c, y, &mut self.row_loss, &mut self.grad)?;
                // The mean's 1/rows is applied in f32, on the way into the backward pass.
                let inv_rows = 1.0 / rows as f32;
                self.gz.clear();
                self.gz
                    .extend(self.grad.iter().map(|g| g.to_f64() as f32 * inv_rows));
                self.row_loss.iter().map(|l| l.to_f64()).sum::<f64>() / rows as f64
            }
            Kind::Stable => self.stable_loss(step, y)?,
        };
        self.outcome.losses.push(loss);
        self.model
            .backward(x, &mut self.acts, &self.gz, &mut self.grads);

        let bad_gradients = self.grad.iter().filter(|g| !g.to_f64().is_finite()).count();
        let failed = !loss.is_finite() || (self.kind == Kind::Naive && bad_gradients > 0);
        if failed {
            self.outcome.non_finite_steps += 1;
        }
        if failed && self.outcome.first_non_finite.is_none() {
            self.outcome.first_non_finite = Some(self.failure(step, x, loss, max_logit, held_out)?);
        }

        // The update: unguarded for the naive run; the stable run unscales the parameter
        // gradients and skips the step if any is not finite.
        let skip = match self.guards.as_mut() {
            None => false,
            Some(guards) => {
                let (h, c) = (self.model.hidden, self.model.classes);
                let mut unscale = guards.scaler.unscaler();
                for (name, tensor, columns) in self.grads.named_mut(h, c) {
                    unscale.apply(name, tensor, columns).map_err(shape_error)?;
                }
                let report = unscale.finish();
                if let Some(scales) = self.outcome.scales.as_mut() {
                    scales.1 = report.next_scale;
                }
                report.skipped
            }
        };
        if skip {
            self.outcome.skipped.push(step);
        } else {
            self.model
                .adam(&self.grads, &mut self.adam, config.lr_at(step));
        }
        let poisoned = self.model.params.non_finite();
        if poisoned > 0 {
            self.outcome.poisoned = Some(Poisoned {
                step,
                params: poisoned,
            });
        }
        Ok(loss)
    }

    /// The stable loss: the fused cross-entropy at the loss scale, its logit statistics to the
    /// monitor, its (scaled) gradient into `gz`.
    fn stable_loss(&mut self, step: u64, y: &[i64]) -> Result<f64> {
        let c = self.model.classes;
        let guards = self.guards.as_mut().expect("the stable run has guards");
        let options = CrossEntropyOptions {
            keep_logit_stats: true,
            ..CrossEntropyOptions::default()
        };
        let scale = guards.scaler.scale();
        let mut out = cross_entropy_with_grad(
            &self.logits,
            c,
            Targets::Classes(y),
            &options,
            GradOutput::Scalar(E::Stat::from_f64(scale)),
            &mut self.grad,
        )?;
        if let Some(stats) = out.logit_stats.take() {
            let events = guards.monitor.record(step, stats);
            if let (None, Some(first)) = (&self.outcome.first_warning, events.first()) {
                self.outcome.first_warning = Some((step, first.to_string()));
            }
            self.outcome.monitor_events.extend_from_slice(events);
        }
        self.gz.clear();
        let mut rescued = 0;
        for g in &self.grad {
            let v = g.to_f64();
            if v != 0.0 && E::from_f64(v / scale).to_f64() == 0.0 {
                rescued += 1;
            }
            self.gz.push(v as f32);
        }
        self.outcome.rescued_from_underflow += rescued;
        Ok(out.loss.into())
    }

    /// The record of a first non-finite step, with the triage of its tensors (naive run).
    fn failure(
        &self,
        step: u64,
        x: &[f32],
        loss: f64,
        max_logit: f64,
        held_out: &Samples,
    ) -> Result<FirstNonFinite> {
        let c = self.model.classes;
        let triage = match self.kind {
            Kind::Stable => None,
            Kind::Naive => {
                let mut probs = vec![E::zero(); self.logits.len()];
                lse::naive::softmax(&self.logits, c, &mut probs)?;
                let views = [
                    TensorView::new("input", Role::Input, x, self.model.dim),
                    TensorView::new("logits", Role::Logits, &self.logits, c),
                    TensorView::new("probabilities", Role::Probabilities, &probs, c),
                    TensorView::new("loss", Role::Loss, &self.row_loss, 1),
                    TensorView::new("logits gradient", Role::Gradient, &self.grad, c),
                ]
                .into_iter()
                .collect::<Result<Vec<_>, _>>()
                .map_err(shape_error)?;
                let report = triage(&views);
                Some(report)
            }
        };
        let (nan_rows, inf_rows) = self.row_loss.iter().fold((0, 0), |(n, i), l| {
            let l = l.to_f64();
            (
                n + usize::from(l.is_nan()),
                i + usize::from(l.is_infinite()),
            )
        });
        Ok(FirstNonFinite {
            step,
            loss,
            nan_rows,
            inf_rows,
            bad_gradients: self.grad.iter().filter(|g| !g.to_f64().is_finite()).count(),
            max_logit,
            triage,
            accuracy_before: self.model.accuracy(held_out),
        })
    }

    fn finish(mut self, held_out: &Samples) -> RunOutcome {
        let finite = self.model.params.non_finite() == 0;
        self.outcome.accuracy = finite.then(|| self.model.accuracy(held_out));
        self.outcome
    }
}

/// The experiment, run for one dtype of logits by [`crate::dtype::dispatch`].
pub struct Experiment<'a> {
    /// The settings.
    pub config: &'a Config,
    /// Called after every step.
    pub progress: &'a dyn Fn(Progress),
}

impl PerDType for Experiment<'_> {
    type Output = Result<Outcome>;

    fn run<E: Element>(self) -> Result<Outcome> {
        let config = self.config;
        let task = Task::new(config.seed, config.classes, config.dim, config.spread);
        let train = task.sample(config.seed, stream::TRAIN, config.train_per_class);
        let held_out = task.sample(config.seed, stream::HELD_OUT, config.held_out_per_class);
        let bayes_accuracy = task.nearest_centre_accuracy(&held_out);
        let model = Mlp::new(
            &mut Rng::new(config.seed, stream::INIT),
            config.dim,
            config.hidden,
            config.classes,
            config.out_scale,
        );
        debug_assert_eq!(model.params.len(), config.params());
        let initial_accuracy = model.accuracy(&held_out);
        let mut naive = Run::<E>::new(Kind::Naive, model.clone(), config)?;
        let mut stable = Run::<E>::new(Kind::Stable, model, config)?;
        let mut data = Data {
            train,
            held_out,
            order: Rng::new(config.seed, stream::ORDER),
            epoch: Vec::new(),
            next: 0,
        };
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for step in 1..=config.steps {
            data.batch(config.batch, config.dim, &mut x, &mut y);
            if naive.alive() {
                naive.step(step, &x, &y, config, &data.held_out)?;
            }
            let stable_loss = if stable.alive() {
                stable.step(step, &x, &y, config, &data.held_out)?
            } else {
                f64::NAN
            };
            (self.progress)(Progress {
                step,
                naive_failed_at: naive.outcome.first_non_finite.as_ref().map(|f| f.step),
                stable_loss,
            });
        }
        Ok(Outcome {
            naive: naive.finish(&data.held_out),
            stable: stable.finish(&data.held_out),
            bayes_accuracy,
            initial_accuracy,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lse::{bf16, f16};

    fn config(classes: usize) -> Config {
        Config {
            seed: 3,
            classes,
            dim: 32,
            hidden: 128,
            spread: 0.8,
            train_per_class: 4,
            held_out_per_class: 2,
            out_scale: 0.1,
            batch: 128,
            steps: 10,
            lr: 0.001,
            scaler: LossScalerConfig::default(),
        }
    }

    /// The first step of both runs, on the same batch and weights.
    fn first_step<E: Element>(classes: usize) -> (Run<E>, Run<E>) {
        let config = config(classes);
        let task = Task::new(config.seed, classes, config.dim, config.spread);
        let samples = task.sample(config.seed, stream::TRAIN, config.train_per_class);
        let model = Mlp::new(&mut Rng::new(3, stream::INIT), 32, 128, classes, 0.1);
        let mut naive = Run::<E>::new(Kind::Naive, model.clone(), &config).unwrap();
        let mut stable = Run::<E>::new(Kind::Stable, model, &config).unwrap();
        let rows = config.batch.min(samples.len());
        let (x, y) = (&samples.x[..rows * 32], &samples.y[..rows]);
        naive.step(1, x, y, &config, &samples).unwrap();
        stable.step(1, x, y, &config, &samples).unwrap();
        (naive, stable)
    }

    /// While the logits are small, the naive and the stable cross-entropy are the same function:
    /// the losses agree to the dtype's precision, and so do the gradients (the stable one
    /// carries the loss scale and the 1/rows of the mean).
    fn agree_on_small_logits<E: Element>(ulp_of_one: f64) {
        let (naive, stable) = first_step::<E>(100);
        let max = naive.outcome.max_logits[0];
        assert!(max < 3.0, "the first logits are small: {max}");
        let (a, b) = (naive.outcome.losses[0], stable.outcome.losses[0]);
        assert!((4.0..5.5).contains(&b), "about ln(100): {b}");
        // The naive loss is a mean of per-row losses rounded to E (ulp 4·ulp(1) near 4.6),
        // after a sum of 100 exps rounded term by term.
        assert!((a - b).abs() <= 4.0 * ulp_of_one, "naive {a} vs stable {b}");
        // Gradients: within 4 ulp of the largest entry of a row (about 1, at the target), the
        // normwise measure; the stable one carries the loss scale and the mean's 1/rows.
        let scale = stable.guards.as_ref().unwrap().scaler.scale();
        for (gn, gs) in naive.grad.iter().zip(&stable.grad) {
            let (gn, gs) = (gn.to_f64(), gs.to_f64() * 128.0 / scale);
            assert!((gn - gs).abs() <= 4.0 * ulp_of_one, "gradient {gn} vs {gs}");
        }
        assert!(naive.outcome.first_non_finite.is_none());
        assert!(stable.outcome.first_non_finite.is_none());
    }

    #[test]
    fn naive_and_stable_losses_agree_on_the_first_step() {
        agree_on_small_logits::<f16>(f64::from(f16::EPSILON.to_f32()));
        agree_on_small_logits::<bf16>(f64::from(bf16::EPSILON.to_f32()));
    }

    #[test]
    fn learning_rate_decays_to_zero() {
        let c = Config {
            steps: 100,
            lr: 0.5,
            ..config(10)
        };
        assert_eq!(c.lr_at(1), 0.5);
        assert!((c.lr_at(51) - 0.25).abs() < 1e-6);
        assert!(c.lr_at(100) < 1e-3);
        assert_eq!(c.params(), 33 * 128 + 129 * 10);
    }
}
