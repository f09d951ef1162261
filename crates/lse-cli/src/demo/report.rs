//! The report of `lse demo`: text for people, JSON for scripts.

use std::fmt::Write as _;
use std::path::Path;

use lse::guard::MonitorEvent;
use lse::DType;
use serde_json::{json, Value};

use super::train::{Config, Outcome, RunOutcome};
use super::{default_lr, FINAL_WINDOW};
use crate::format::wrap;

/// Everything the report shows.
pub struct Summary<'a> {
    /// The dtype of the logits.
    pub dtype: DType,
    /// The experiment.
    pub config: &'a Config,
    /// What both runs did.
    pub outcome: &'a Outcome,
    /// The chart, when one was drawn.
    pub chart: Option<&'a Path>,
}

/// `0.9048` as `90.5%`.
fn percent(v: f64) -> String {
    format!("{:.1}%", 100.0 * v)
}

/// A loss with 4 decimals, or `NaN` / `inf`.
fn loss(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        "inf".into()
    } else {
        format!("{v:.4}")
    }
}

/// A logit with 2 decimals.
fn logit(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}")
    } else {
        loss(v)
    }
}

/// Pushes `text` wrapped, the first line indented by `indent`, the others by `hang`.
fn para(out: &mut String, text: &str, indent: usize, hang: usize) {
    out.push_str(&wrap(text, indent, hang));
}

impl Summary<'_> {
    fn threshold(&self) -> f64 {
        self.dtype.exp_overflow_threshold()
    }

    /// The steps shown in the trajectory table: the first, about ten evenly spaced, the naive
    /// run's first non-finite step and the step before it, and the last.
    fn table_steps(&self) -> Vec<u64> {
        let n = self.config.steps;
        let mut steps: Vec<u64> = (0..=10).map(|k| (k * n / 10).max(1)).collect();
        if let Some(f) = &self.outcome.naive.first_non_finite {
            steps.extend([f.step.saturating_sub(1).max(1), f.step]);
        }
        steps.sort_unstable();
        steps.dedup();
        steps
    }

    /// Appends the text report to `out`.
    pub fn text(&self, out: &mut String) {
        let (c, o, d) = (self.config, self.outcome, self.dtype);
        let _ = writeln!(
            out,
            "lse demo: one {d} mixed-precision training run, twice, differing only in the loss\n"
        );
        let rows = [
            (
                "task",
                format!(
                    "{} classes of Gaussian clusters in {} dimensions (seed {}): {} training \
                     samples, {} held out. The nearest true centre scores {} on the held-out \
                     set: the best achievable.",
                    c.classes,
                    c.dim,
                    c.seed,
                    c.train_per_class * c.classes,
                    c.held_out_per_class * c.classes,
                    percent(o.bayes_accuracy)
                ),
            ),
            (
                "model",
                format!(
                    "MLP {} -> {} ReLU -> {} ({} parameters). Weights, matmuls and the backward \
                     pass in f32; logits and the gradient with respect to them in {d}.",
                    c.dim,
                    c.hidden,
                    c.classes,
                    c.params()
                ),
            ),
            (
                "training",
                format!(
                    "{} steps of Adam, batch {}, learning rate {} with cosine decay{}; the same \
                     initial weights, batches and batch order in both runs.",
                    c.steps,
                    c.batch,
                    c.lr,
                    if d == DType::BF16 && c.lr == default_lr(d) {
                        " (the bf16 default, 50 times the f16 one: a naive bf16 softmax survives \
                         logits 8 times larger)"
                    } else {
                        ""
                    }
                ),
            ),
            (
                "naive",
                format!(
                    "lse::naive::cross_entropy: exp(x) / sum exp(x) and -log p evaluated in \
                     {d}, no guards."
                ),
            ),
            (
                "lse",
                "lse::cross_entropy_with_grad (shifts by the row max: never exponentiates a \
                 positive number), guarded by lse::guard::LogitMonitor and \
                 lse::guard::LossScaler."
                    .to_owned(),
            ),
        ];
        for (label, text) in rows {
            let mut lines = wrap(&text, 12, 12);
            lines.replace_range(..12, &format!("  {label:<10}"));
            out.push_str(&lines);
        }
        out.push('\n');
        self.trajectory(out);
        if d == DType::BF16 {
            para(
                out,
                "bf16 keeps 8 significant bits: the naive sum of exps and its probabilities are \
                 rounded far more coarsely than the lse loss and gradient (one rounding), so the \
                 two runs drift apart from the first steps on.",
                2,
                2,
            );
        }
        out.push('\n');
        self.naive_story(out);
        out.push('\n');
        self.stable_story(out);
        out.push('\n');
        self.table(out);
        out.push('\n');
        match self.chart {
            Some(path) => {
                let _ = writeln!(
                    out,
                    "chart: {} (loss and largest logit per step)",
                    path.display()
                );
            }
            None => out.push_str("chart: none (--no-plot)\n"),
        }
    }

    /// The table of both runs' largest logit and loss at a few steps.
    fn trajectory(&self, out: &mut String) {
        let o = self.outcome;
        let _ = writeln!(
            out,
            "  {:>7}  {:>16} {:>10}  {:>14} {:>10}",
            "step", "naive: max logit", "loss", "lse: max logit", "loss"
        );
        let failed_at = o.naive.first_non_finite.as_ref().map(|f| f.step);
        for step in self.table_steps() {
            let i = (step - 1) as usize;
            let cell = |run: &RunOutcome, values: &[f64], f: fn(f64) -> String| {
                values.get(i).map_or_else(
                    || {
                        if run.poisoned.is_some() {
                            "stopped".into()
                        } else {
                            "-".into()
                        }
                    },
                    |&v| f(v),
                )
            };
            let mut line = format!(
                "  {step:>7}  {:>16} {:>10}  {:>14} {:>10}",
                cell(&o.naive, &o.naive.max_logits, logit),
                cell(&o.naive, &o.naive.losses, loss),
                cell(&o.stable, &o.stable.max_logits, logit),
                cell(&o.stable, &o.stable.losses, loss),
            );
            if Some(step) == failed_at {
                line.push_str("   <- naive: first non-finite step");
            }
            let _ = writeln!(out, "{}", line.trim_end());
        }
    }

    /// What happened to the naive run.
    fn naive_story(&self, out: &mut String) {
        let (o, d) = (self.outcome, self.dtype);
        let run = &o.naive;
        let Some(f) = &run.first_non_finite else {
            para(
                out,
                &format!(
                    "naive run: survived all {} steps. Its largest logit peaked at {}, below \
                     {:.2} = ln(max {d}), where a naive {d} exp overflows; a run whose logits \
                     grow further (a higher --lr, more --steps) dies.",
                    self.config.steps,
                    logit(run.peak_logit()),
                    self.threshold()
                ),
                0,
                2,
            );
            return;
        };
        let mut rows = Vec::new();
        if f.nan_rows > 0 {
            rows.push(format!("{} NaN", f.nan_rows));
        }
        if f.inf_rows > 0 {
            rows.push(format!("{} inf", f.inf_rows));
        }
        let cause = if f.max_logit > self.threshold() {
            format!(
                "The batch's largest logit, {}, is past {:.2} = ln(max {d}), the largest x whose \
                 exp(x) is finite in {d}: exp overflowed to inf, and inf / inf = NaN.",
                logit(f.max_logit),
                self.threshold()
            )
        } else {
            format!(
                "The batch's largest logit, {}, is below {:.2} = ln(max {d}): the naive sum of \
                 exps or a probability left {d}'s range (see the triage).",
                logit(f.max_logit),
                self.threshold()
            )
        };
        para(
            out,
            &format!(
                "naive run: its loss is {} at step {} of {} (rows of the batch with a non-finite \
                 loss: {}; non-finite logits-gradient entries: {}). {cause}",
                loss(f.loss),
                f.step,
                self.config.steps,
                if rows.is_empty() {
                    "none".to_owned()
                } else {
                    rows.join(", ")
                },
                f.bad_gradients
            ),
            0,
            2,
        );
        if let Some(report) = &f.triage {
            para(
                out,
                "NaN triage of that step (lse::guard::triage on input, logits, probabilities, \
                 loss, logits gradient):",
                2,
                2,
            );
            for line in report.to_string().lines() {
                para(out, line, 4, 6);
            }
        }
        let end = match run.poisoned {
            Some(p) if p.step == f.step => format!(
                "With no guard, that step's update wrote NaN into {} of the {} parameters: \
                 every later step is NaN, so the run stops there.",
                p.params,
                self.config.params()
            ),
            Some(p) => format!(
                "With no guard it went on; the update of step {} wrote NaN into {} of the {} \
                 parameters, and the run stops there ({} non-finite steps in all).",
                p.step,
                p.params,
                self.config.params(),
                run.non_finite_steps
            ),
            None => format!(
                "Its gradients stayed finite, so the weights did: the run went on to step {} \
                 with {} non-finite losses in all.",
                self.config.steps, run.non_finite_steps
            ),
        };
        para(
            out,
            &format!(
                "Held-out accuracy just before that step: {}. {end}",
                percent(f.accuracy_before)
            ),
            2,
            2,
        );
    }

    /// What the lse run did.
    fn stable_story(&self, out: &mut String) {
        let (o, d) = (self.outcome, self.dtype);
        let run = &o.stable;
        let head = match &run.first_non_finite {
            None => format!(
                "lse run: trained all {} steps with its loss finite at every step (its largest \
                 logit reached {}, {} the naive {d} limit {:.2}); held-out accuracy {} at the \
                 start, {} at the end.",
                self.config.steps,
                logit(run.peak_logit()),
                if run.peak_logit() > self.threshold() {
                    "past"
                } else {
                    "below"
                },
                self.threshold(),
                percent(o.initial_accuracy),
                run.accuracy.map_or_else(|| "n/a".to_owned(), percent)
            ),
            Some(f) => format!(
                "lse run: its loss is {} at step {}: this is a bug in lse, please report it.",
                loss(f.loss),
                f.step
            ),
        };
        para(out, &head, 0, 2);
        let monitor = match (&run.first_warning, &o.naive.first_non_finite) {
            (None, _) => "LogitMonitor (watching the distance to the naive overflow point): no \
                          warning."
                .to_owned(),
            (Some((step, text)), failure) => {
                let lead = match failure {
                    Some(f) if f.step > *step => format!(
                        ", {} steps before the naive run's first non-finite step",
                        f.step - step
                    ),
                    _ => String::new(),
                };
                let count = |wanted: fn(&MonitorEvent) -> bool| {
                    run.monitor_events.iter().filter(|e| wanted(e)).count()
                };
                format!(
                    "LogitMonitor: first warning at step {step}{lead}: \"{text}\"; {} events \
                     over the {} steps ({} started, {} reminders, {} cleared).",
                    run.monitor_events.len(),
                    run.losses.len(),
                    count(|e| matches!(e, MonitorEvent::Started { .. })),
                    count(|e| matches!(e, MonitorEvent::Reminder { .. })),
                    count(|e| matches!(e, MonitorEvent::Cleared { .. })),
                )
            }
        };
        para(out, &monitor, 2, 4);
        if let Some((first, last)) = run.scales {
            let skipped = match run.skipped.as_slice() {
                [] => "no step skipped".to_owned(),
                steps => format!("{} steps skipped (first at step {})", steps.len(), steps[0]),
            };
            let rescued = if d == DType::F16 {
                let total = run.losses.len() * self.config.batch * self.config.classes;
                format!(
                    "; {} of the {total} logits-gradient entries ({}) were nonzero only thanks to \
                     the scale: f16 would have flushed them to 0",
                    run.rescued_from_underflow,
                    percent(run.rescued_from_underflow as f64 / total.max(1) as f64)
                )
            } else {
                String::new()
            };
            para(
                out,
                &format!("LossScaler: scale {first} -> {last}, {skipped}{rescued}."),
                2,
                4,
            );
        }
    }

    /// The results table.
    fn table(&self, out: &mut String) {
        let o = self.outcome;
        let header = [
            "run",
            "first non-finite",
            "final loss",
            "held-out accuracy",
            "skipped steps",
            "monitor events",
        ];
        let first = |run: &RunOutcome| {
            run.first_non_finite
                .as_ref()
                .map_or_else(|| "none".to_owned(), |f| format!("step {}", f.step))
        };
        let accuracy = |run: &RunOutcome| {
            run.accuracy
                .map_or_else(|| "n/a: weights NaN".to_owned(), percent)
        };
        let rows = [
            [
                "naive".to_owned(),
                first(&o.naive),
                loss(o.naive.final_loss(FINAL_WINDOW)),
                accuracy(&o.naive),
                "- (no scaler)".to_owned(),
                "- (no monitor)".to_owned(),
            ],
            [
                "lse".to_owned(),
                first(&o.stable),
                loss(o.stable.final_loss(FINAL_WINDOW)),
                accuracy(&o.stable),
                o.stable.skipped.len().to_string(),
                o.stable.monitor_events.len().to_string(),
            ],
        ];
        let widths: Vec<usize> = (0..header.len())
            .map(|j| {
                rows.iter()
                    .map(|r| r[j].len())
                    .chain([header[j].len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: Vec<&str>| {
            let mut s = String::from(" ");
            for (cell, w) in cells.iter().zip(&widths) {
                let _ = write!(s, " {cell:<w$} ");
            }
            s.trim_end().to_owned()
        };
        let _ = writeln!(out, "{}", line(header.to_vec()));
        for row in &rows {
            let _ = writeln!(out, "{}", line(row.iter().map(String::as_str).collect()));
        }
        para(
            out,
            &format!(
                "final loss: mean batch loss of the last {FINAL_WINDOW} steps (a dead run: its \
                 last loss). held-out accuracy: {} samples never trained on.",
                self.config.held_out_per_class * self.config.classes
            ),
            2,
            2,
        );
    }

    /// The summary as pretty-printed JSON (non-finite numbers as `null`).
    pub fn json(&self) -> String {
        let (c, o) = (self.config, self.outcome);
        let run = |r: &RunOutcome| -> Value {
            let first = r.first_non_finite.as_ref().map(|f| {
                json!({
                    "step": f.step,
                    "loss": loss(f.loss),
                    "nan_rows": f.nan_rows,
                    "inf_rows": f.inf_rows,
                    "non_finite_gradients": f.bad_gradients,
                    "max_logit": f.max_logit,
                    "held_out_accuracy_before": f.accuracy_before,
                    "triage": f.triage,
                })
            });
            json!({
                "first_non_finite": first,
                "non_finite_steps": r.non_finite_steps,
                "weights_non_finite_after_step": r.poisoned.map(|p| p.step),
                "non_finite_weights": r.poisoned.map(|p| p.params),
                "steps_taken": r.losses.len(),
                "final_loss": r.final_loss(FINAL_WINDOW),
                "held_out_accuracy": r.accuracy,
                "peak_logit": r.peak_logit(),
                "losses": r.losses,
                "max_logits": r.max_logits,
            })
        };
        let mut stable = run(&o.stable);
        if let Some(map) = stable.as_object_mut() {
            map.insert("skipped_steps".into(), json!(o.stable.skipped));
            map.insert(
                "loss_scale".into(),
                json!(o
                    .stable
                    .scales
                    .map(|(a, b)| json!({"initial": a, "final": b}))),
            );
            map.insert(
                "gradients_kept_from_underflow".into(),
                json!(o.stable.rescued_from_underflow),
            );
            map.insert("monitor_events".into(), json!(o.stable.monitor_events));
            map.insert(
                "first_monitor_warning".into(),
                json!(o
                    .stable
                    .first_warning
                    .as_ref()
                    .map(|(step, text)| json!({"step": step, "text": text}))),
            );
        }
        let value = json!({
            "dtype": self.dtype,
            "naive_exp_overflow_threshold": self.threshold(),
            "config": {
                "seed": c.seed,
                "classes": c.classes,
                "dim": c.dim,
                "hidden": c.hidden,
                "parameters": c.params(),
                "spread": c.spread,
                "train_samples": c.train_per_class * c.classes,
                "held_out_samples": c.held_out_per_class * c.classes,
                "batch": c.batch,
                "steps": c.steps,
                "optimizer": "adam",
                "peak_lr": c.lr,
                "schedule": "cosine",
                "loss_scaler": c.scaler,
            },
            "bayes_accuracy": o.bayes_accuracy,
            "initial_accuracy": o.initial_accuracy,
            "naive": run(&o.naive),
            "lse": stable,
            "final_loss_window": FINAL_WINDOW,
            "chart": self.chart.map(|p| p.display().to_string()),
        });
        serde_json::to_string_pretty(&value).unwrap_or_else(|e| {
            json!({ "error": format!("cannot serialize the summary: {e}") }).to_string()
        })
    }
}
