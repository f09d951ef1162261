//! Softmax cross-entropy from raw logits, fused with its gradient.

use core::cell::Cell;

use super::{expect_len, non_finite_logit, row_count, rows_per_task, NonFinite};
use crate::element::{Element, Stat};
use crate::error::{LseError, Result};
use rayon::prelude::*;

use crate::guard::{ElementTally, LogitStats, StatsBuilder};
use crate::kernels::{
    self,
    row_plan::{CeConfig, CeRow, FastWrite, GradScale, RowTarget, RowValues},
    scalar::{LogitMap, RowScan},
    BlockMaxima,
};
use crate::state::{saturate, CompensatedSum};

/// How per-row losses are combined.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Reduction {
    /// Keep one loss per row ([`CrossEntropyOutput::row_loss`]); `loss` holds their sum.
    None,
    /// The sum of the row losses.
    Sum,
    /// The weighted mean: the sum of the row losses divided by the sum of `w[target]` over
    /// non-ignored rows (their count when unweighted; the row count for probability targets),
    /// as in PyTorch.
    #[default]
    Mean,
}

/// What a mean over nothing (every row ignored, or a zero total weight) returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum EmptyMean {
    /// Loss 0 and gradient 0: an all-padding batch is a no-op step.
    #[default]
    Zero,
    /// Loss NaN (PyTorch's 0/0) and gradient 0.
    Nan,
    /// [`LseError::EmptyMean`].
    Error,
}

/// Targets of a cross-entropy call.
#[derive(Clone, Copy, Debug)]
pub enum Targets<'a, E> {
    /// One class index per row, in `0..classes`, or the ignore index.
    Classes(&'a [i64]),
    /// A `rows × classes` row-major buffer of target values, read as probabilities: any finite
    /// values (PyTorch's rule: rows need not sum to 1, values may be negative; the loss is
    /// linear in them). Has no ignore index.
    Probabilities(&'a [E]),
}

/// The incoming gradient `∂L/∂loss` that the logit gradient is scaled by.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GradOutput<'a, S> {
    /// One value for the (reduced) loss; with [`Reduction::None`], the same value for every row.
    Scalar(S),
    /// One value per row; only with [`Reduction::None`].
    PerRow(&'a [S]),
}

impl<S: Stat> Default for GradOutput<'_, S> {
    fn default() -> Self {
        GradOutput::Scalar(S::from_f64(1.0))
    }
}

/// Options of the cross-entropy: everything `torch.nn.CrossEntropyLoss` has, plus z-loss and
/// soft-capping (as in Liger's kernel) and the policies of the `lse` contract.
///
/// With `q` the target distribution (one-hot or the given probabilities), smoothed as
/// `q_c ← (1 − ε)·q_c + ε/K` over the `K` classes whose logit is not `-inf`, `w` the class weights
/// and `x` the (capped) logits, the loss of a non-ignored row is
///
/// ```text
/// ℓ = Σ_c w_c q_c (lse(x) − x_c) + z · lse(x)²
/// ```
///
/// which is PyTorch's definition when `z = 0` and nothing is masked.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CrossEntropyOptions<'a> {
    /// Rows whose class target equals this value contribute 0 to the loss, nothing to the mean's
    /// denominator, and a zero gradient, whatever their logits hold (NaN too). Default `-100`.
    pub ignore_index: Option<i64>,
    /// Per-class weights (`classes` values, finite; negative and zero weights are allowed, as in
    /// PyTorch: the mean then divides by a sum that may be negative, and a zero sum is an empty
    /// mean, see [`EmptyMean`]).
    pub weights: Option<&'a [f64]>,
    /// Label smoothing `ε` in `[0, 1]`.
    pub label_smoothing: f64,
    /// z-loss coefficient `z ≥ 0` (PaLM uses 1e-4): adds `z · lse²` per non-ignored row,
    /// unweighted.
    pub z_loss: f64,
    /// Soft-capping: logits become `cap · tanh(x / cap)` before anything else but
    /// `logit_scale` (`cap > 0`); `-inf` stays `-inf`.
    pub softcap: Option<f64>,
    /// A scale `s` every logit is multiplied by first, inside the kernel (a temperature `T` is
    /// `s = 1/T`; CLIP's `logit_scale`): the loss, row lse and z-loss are those of the logits
    /// `s·x`, each rounded once to `f64` (and saturated at `±f64::MAX`; `-inf` stays `-inf`),
    /// and the gradient is with respect to `x` (so it carries the factor `s`); the argmax is
    /// that of `x`. Finite and `> 0`; default 1 (the identity: no extra work).
    pub logit_scale: f64,
    /// How row losses are combined.
    pub reduction: Reduction,
    /// What NaN and `+inf` logits (and target mass on `-inf` logits) do.
    pub non_finite: NonFinite,
    /// What a mean over zero non-ignored rows returns.
    pub empty_mean: EmptyMean,
    /// Also return the per-row losses (always returned with [`Reduction::None`]).
    pub keep_row_loss: bool,
    /// Also return the per-row logsumexp (NaN for ignored rows).
    pub keep_row_lse: bool,
    /// Also gather [`LogitStats`] of the logits in the same read pass (rows that are read: ignored
    /// rows are skipped), for a [`LogitMonitor`](crate::guard::LogitMonitor).
    pub keep_logit_stats: bool,
    /// Also return each row's prediction ([`CrossEntropyOutput::row_argmax`]) and, with class
    /// targets, how many counted rows it gets right ([`CrossEntropyOutput::correct_rows`], the
    /// token accuracy). The argmax is taken while the row is in cache from its read pass, before
    /// the gradient is written over it; it is that of the raw logits, as `torch.argmax` finds it
    /// (the first of equal maxima; the first NaN where a propagated row holds one), which
    /// soft-capping (monotone) leaves unchanged.
    pub keep_row_argmax: bool,
}

impl Default for CrossEntropyOptions<'_> {
    fn default() -> Self {
        Self {
            ignore_index: Some(-100),
            weights: None,
            label_smoothing: 0.0,
            z_loss: 0.0,
            softcap: None,
            logit_scale: 1.0,
            reduction: Reduction::Mean,
            non_finite: NonFinite::Error,
            empty_mean: EmptyMean::Zero,
            keep_row_loss: false,
            keep_row_lse: false,
            keep_logit_stats: false,
            keep_row_argmax: false,
        }
    }
}

/// What a cross-entropy call returns.
#[derive(Clone, Debug, PartialEq)]
pub struct CrossEntropyOutput<S> {
    /// The reduced loss (with [`Reduction::None`]: the sum of `row_loss`).
    pub loss: S,
    /// Per-row losses (0 for ignored rows), when asked for or with [`Reduction::None`].
    pub row_loss: Option<Vec<S>>,
    /// Per-row logsumexp of the (capped) logits (NaN for ignored rows), when asked for.
    pub row_lse: Option<Vec<S>>,
    /// The z-loss term's share of `loss`: `z · lse²` summed over the counted rows and reduced
    /// as the loss is (0 without z-loss), so that `loss − z_loss` is the cross-entropy alone.
    pub z_loss: S,
    /// Each row's argmax (the first column holding its largest logit; `-1` for ignored rows),
    /// with [`CrossEntropyOptions::keep_row_argmax`].
    pub row_argmax: Option<Vec<i64>>,
    /// With [`CrossEntropyOptions::keep_row_argmax`] and class targets: the number of counted
    /// rows whose argmax is their target. [`CrossEntropyOutput::accuracy`] divides it.
    pub correct_rows: Option<usize>,
    /// Number of rows that were not ignored.
    pub counted_rows: usize,
    /// What the mean divides by: the summed target weight of non-ignored rows (their count when
    /// unweighted, the row count for probability targets). Useful to re-weight micro-batches.
    pub denominator: f64,
    /// Statistics of the logits, gathered in the loss's own read pass, when asked for.
    pub logit_stats: Option<LogitStats>,
}

impl<S> CrossEntropyOutput<S> {
    /// The token accuracy: [`correct_rows`](Self::correct_rows) over the counted rows (`None`
    /// without [`CrossEntropyOptions::keep_row_argmax`], with probability targets, or when no
    /// row was counted).
    pub fn accuracy(&self) -> Option<f64> {
        let correct = self.correct_rows?;
        (self.counted_rows > 0).then(|| correct as f64 / self.counted_rows as f64)
    }
}

/// The checked, per-call state of a cross-entropy call (also the reduction of a split
/// vocabulary's rows, [`crate::sharded`]).
pub(crate) struct Batch<'a, E: Element> {
    rows: usize,
    classes: usize,
    targets: Targets<'a, E>,
    pub(crate) config: CeConfig<'a>,
    options: &'a CrossEntropyOptions<'a>,
    /// `Σ w[target]` of non-ignored rows (see [`CrossEntropyOutput::denominator`]).
    denominator: f64,
    counted_rows: usize,
    grad_output: GradOutput<'a, E::Stat>,
    total: CompensatedSum,
    /// `Σ z · lse²` of the recorded rows (part of `total`).
    z_total: CompensatedSum,
    any_non_finite_row: bool,
    row_loss: Option<Vec<E::Stat>>,
    row_lse: Option<Vec<E::Stat>>,
    row_argmax: Option<Vec<i64>>,
    correct_rows: usize,
    stats: Option<StatsBuilder>,
    /// Rows `0..recorded` have their values in `total`, `row_loss`, `row_lse` and `stats`.
    recorded: usize,
}

fn check_option(name: &'static str, value: f64, ok: bool, expected: &'static str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(LseError::BadOption {
            name,
            value,
            expected,
        })
    }
}

impl<'a, E: Element> Batch<'a, E> {
    /// Validates everything that does not need the logits: shapes, options, weights, class
    /// targets and the incoming gradient. Nothing has been written when this fails.
    pub(crate) fn new(
        len: usize,
        classes: usize,
        targets: Targets<'a, E>,
        options: &'a CrossEntropyOptions<'a>,
        grad_output: GradOutput<'a, E::Stat>,
    ) -> Result<Self> {
        Self::build(len, classes, targets, false, options, grad_output)
    }

    /// [`Batch::new`] for probability targets that arrive with each chunk's logits
    /// ([`ProbabilityRows`]) instead of at the start.
    pub(crate) fn with_probabilities_by_chunk(
        rows: usize,
        classes: usize,
        options: &'a CrossEntropyOptions<'a>,
        grad_output: GradOutput<'a, E::Stat>,
    ) -> Result<Self> {
        let len = rows.saturating_mul(classes);
        let by_chunk = Targets::Probabilities(&[]);
        Self::build(len, classes, by_chunk, true, options, grad_output)
    }

    fn build(
        len: usize,
        classes: usize,
        targets: Targets<'a, E>,
        probabilities_by_chunk: bool,
        options: &'a CrossEntropyOptions<'a>,
        grad_output: GradOutput<'a, E::Stat>,
    ) -> Result<Self> {
        let rows = row_count("logits", len, classes)?;
        let o = options;
        let eps = o.label_smoothing;
        check_option(
            "label_smoothing",
            eps,
            (0.0..=1.0).contains(&eps),
            "in [0, 1]",
        )?;
        check_option(
            "z_loss",
            o.z_loss,
            o.z_loss.is_finite() && o.z_loss >= 0.0,
            "finite and >= 0",
        )?;
        check_option(
            "logit_scale",
            o.logit_scale,
            o.logit_scale.is_finite() && o.logit_scale > 0.0,
            "finite and > 0",
        )?;
        if let Some(cap) = o.softcap {
            check_option(
                "softcap",
                cap,
                cap.is_finite() && cap > 0.0,
                "finite and > 0",
            )?;
        }
        let mut weight_total = CompensatedSum::ZERO;
        if let Some(w) = o.weights {
            expect_len("weights", classes, w.len())?;
            for (class, &value) in w.iter().enumerate() {
                // Any finite weight, negative and zero too (PyTorch's rule): the loss is linear
                // in each weight.
                if !value.is_finite() {
                    return Err(LseError::BadWeight { class, value });
                }
                weight_total.add(value);
            }
        } else {
            weight_total.add(classes as f64);
        }
        let (denominator, counted_rows) = match targets {
            Targets::Classes(t) => {
                expect_len("targets", rows, t.len())?;
                let mut denominator = CompensatedSum::ZERO;
                let mut counted = 0;
                for (row, &value) in t.iter().enumerate() {
                    if Some(value) == o.ignore_index {
                        continue;
                    }
                    let class = usize::try_from(value).ok().filter(|&c| c < classes).ok_or(
                        LseError::TargetOutOfRange {
                            row,
                            value,
                            classes,
                        },
                    )?;
                    denominator.add(o.weights.map_or(1.0, |w| w[class]));
                    counted += 1;
                }
                (denominator.value(), counted)
            }
            Targets::Probabilities(p) => {
                if !probabilities_by_chunk {
                    expect_len("probability targets", len, p.len())?;
                }
                (rows as f64, rows)
            }
        };
        if o.reduction == Reduction::Mean && denominator == 0.0 && o.empty_mean == EmptyMean::Error
        {
            return Err(LseError::EmptyMean { rows });
        }
        let check_grad = |row: usize, g: E::Stat| {
            let value: f64 = g.into();
            if o.non_finite == NonFinite::Error && !value.is_finite() {
                return Err(LseError::NonFinite {
                    what: "output gradient",
                    row,
                    column: 0,
                    value,
                });
            }
            Ok(())
        };
        match grad_output {
            GradOutput::Scalar(g) => check_grad(0, g)?,
            GradOutput::PerRow(gs) => {
                if o.reduction != Reduction::None {
                    return Err(LseError::PerRowGradient {
                        reduction: o.reduction,
                    });
                }
                expect_len("per-row output gradient", rows, gs.len())?;
                for (row, &g) in gs.iter().enumerate() {
                    check_grad(row, g)?;
                }
            }
        }
        let keep_rows = |keep: bool| keep.then(|| vec![E::Stat::zero(); rows]);
        Ok(Self {
            rows,
            classes,
            targets,
            config: CeConfig {
                weights: o.weights,
                weight_total: weight_total.value(),
                // The largest weight in magnitude: it bounds the gradient and the cancellation
                // of a smoothed row whatever the weights' signs.
                weight_max: o
                    .weights
                    .map_or(1.0, |w| w.iter().fold(0.0, |m, v| v.abs().max(m))),
                smoothing: eps,
                z_loss: o.z_loss,
                map: LogitMap::of(o.logit_scale, o.softcap),
                propagate_non_finite: o.non_finite == NonFinite::Propagate,
            },
            options,
            denominator,
            counted_rows,
            grad_output,
            total: CompensatedSum::ZERO,
            z_total: CompensatedSum::ZERO,
            any_non_finite_row: false,
            row_loss: keep_rows(o.keep_row_loss || o.reduction == Reduction::None),
            row_lse: keep_rows(o.keep_row_lse),
            row_argmax: o.keep_row_argmax.then(|| vec![-1; rows]),
            correct_rows: 0,
            stats: o.keep_logit_stats.then(StatsBuilder::default),
            recorded: 0,
        })
    }

    /// True when the mean has nothing to divide by: loss per [`EmptyMean`], gradient 0.
    fn empty_mean(&self) -> bool {
        self.options.reduction == Reduction::Mean && self.denominator == 0.0
    }

    /// The factors the gradient of row `r`'s loss is multiplied by.
    pub(crate) fn grad_scale(&self, r: usize) -> GradScale {
        let caller: f64 = match self.grad_output {
            GradOutput::Scalar(g) => g.into(),
            GradOutput::PerRow(gs) => gs[r].into(),
        };
        let reduction = match self.options.reduction {
            Reduction::Mean if self.empty_mean() => 0.0,
            Reduction::Mean => saturate(1.0 / self.denominator),
            Reduction::Sum | Reduction::None => 1.0,
        };
        GradScale { reduction, caller }
    }

    /// Row `r` from its read pass to its loss, writing its gradient as `io` asks; `None` for
    /// an ignored row.
    fn row(
        &self,
        r: usize,
        mut io: RowIo<'_, E>,
        window: Option<ProbabilityRows<'_, E>>,
        tally: Option<&mut ElementTally>,
    ) -> Result<Option<RowValues>> {
        let target = match self.targets {
            Targets::Classes(t) if Some(t[r]) == self.options.ignore_index => {
                io.zero_grad();
                return Ok(None);
            }
            // In range: checked by `new`.
            Targets::Classes(t) => RowTarget::Class(t[r] as usize),
            Targets::Probabilities(p) => {
                let (p, first) = window.map_or((p, 0), |w| (w.values, w.first_row));
                let r = r - first;
                RowTarget::Probabilities(&p[r * self.classes..(r + 1) * self.classes])
            }
        };
        let map = self.config.map;
        let mut pass = ReadPass::of(
            &self.config,
            matches!(target, RowTarget::Class(_)),
            !matches!(io, RowIo::Loss(_)),
            kernels::vector_scan(),
            kernels::caches::<E>(io.logits().len()),
        );
        let mut maxima = BlockMaxima::new();
        let mut scratch = None;
        // The masked count and finite minimum serve smoothing, class weights and statistics.
        let gather =
            self.config.smoothing > 0.0 || self.config.weights.is_some() || self.stats.is_some();
        // The caches go to the gradient buffer (an f32 one) or to a per-thread f32 row (f16/bf16,
        // and the in-place loss, whose logits must outlive a bad row).
        let scan = match (pass, &mut io) {
            (ReadPass::CachingSmoothed, RowIo::Grad(x, g)) => {
                let caches = kernels::smoothed_buffers(x.len(), Some(&mut **g), &mut scratch);
                kernels::scan_caching_smoothed(x, Some(caches), &mut maxima, map, gather)
            }
            (ReadPass::CachingSmoothed, RowIo::InPlace(x)) => {
                let caches = kernels::smoothed_buffers::<E>(x.len(), None, &mut scratch);
                kernels::scan_caching_smoothed(x, Some(caches), &mut maxima, map, gather)
            }
            (ReadPass::CachingSmoothed, RowIo::Loss(x)) => {
                kernels::scan_caching_smoothed(x, None, &mut maxima, map, gather)
            }
            (ReadPass::Caching, RowIo::Grad(x, g)) => {
                let cache = kernels::cache_buffer(g, &mut scratch);
                kernels::scan_caching(x, Some(cache), &mut maxima, map, gather)
            }
            (ReadPass::Caching, RowIo::InPlace(x)) => {
                let cache = kernels::scratch_buffer(x.len(), &mut scratch);
                kernels::scan_caching(x, Some(cache), &mut maxima, map, gather)
            }
            // (`Caching` is never chosen for a loss-only row: no write pass to cache for.)
            (ReadPass::Vector | ReadPass::Caching, io) => kernels::scan(io.logits()),
            (ReadPass::Wide, io) => kernels::scan_wide(io.logits(), map),
            (ReadPass::Exact, io) => kernels::scan_exact(io.logits(), map),
        };
        let logits = io.logits();
        if let Some(tally) = tally {
            tally.add(&scan);
        }
        let mut plan = self.plan(r, logits, &scan, target)?;
        // Before any write: the in-place call's gradient goes over these logits.
        let argmax = self
            .options
            .keep_row_argmax
            .then(|| kernels::argmax(logits, &scan, map));
        // The vector scan's s' is good to a fraction of an f32 ulp: enough for the vector
        // write pass and for a loss, whose terms never cancel. Rows whose gradient subtracts
        // nearly equal numbers (smoothing that matches the prediction) or whose z-loss needs a
        // cancelling lse are read again by the scalar kernel and written by the scalar pass.
        // The choice depends on the row alone, never on whether a gradient is asked for, so
        // the loss is the same bits either way. (Probability targets are checked by the write
        // pass instead; only their gradient then comes from the scalar kernel.)
        let lse_cancels = self.config.z_loss > 0.0
            && scan.first_non_finite.is_none()
            && !kernels::lse_well_conditioned(&scan.state);
        if pass != ReadPass::Exact && (lse_cancels || plan.needs_exact_state(logits)) {
            plan = self.plan(r, logits, &kernels::scan_exact(logits, map), target)?;
            pass = ReadPass::Exact;
        }
        let scale = self.grad_scale(r);
        let fast = if pass != ReadPass::Exact && !matches!(io, RowIo::Loss(_)) {
            plan.fast_write(logits, scale)
        } else {
            None
        };
        let set_target = |g: &mut [E], w: &FastWrite<'_, '_, E>| {
            if let Some(target) = w.target {
                g[target] = E::from_f64(w.target_grad);
            }
        };
        let values = match (io, fast) {
            (RowIo::Grad(_, g) | RowIo::InPlace(g), Some(w))
                if pass == ReadPass::CachingSmoothed =>
            {
                kernels::rescale_smoothed(g, scratch.as_ref(), &maxima, (w.max, w.c, w.b));
                set_target(g, &w);
                plan.fast_loss(maxima.distance(w.max))
            }
            (RowIo::Loss(_), _)
                if pass == ReadPass::CachingSmoothed && plan.fast_loss_applies() =>
            {
                plan.fast_loss(maxima.distance(plan.max()))
            }
            // The cache holds exp(x − m_b): it serves a write of c·exp(x − m) alone, which is
            // what a cached row's write is (no smoothing share, no masses, no distance sweep).
            (RowIo::Grad(_, g) | RowIo::InPlace(g), Some(w)) if pass == ReadPass::Caching => {
                kernels::rescale(g, scratch.as_ref(), &maxima, w.max, w.c);
                set_target(g, &w);
                plan.fast_loss(0.0)
            }
            (RowIo::Loss(x), _) if pass != ReadPass::Exact && plan.fast_loss_applies() => {
                let masses = plan.class_masses();
                plan.fast_loss(kernels::live_distance(x, plan.max(), masses.as_ref(), map))
            }
            (RowIo::Loss(x), _) => plan.finish(x.iter().copied(), scale, false, |_, _| {}),
            (RowIo::Grad(x, g), Some(w)) => {
                let pass = kernels::ce_grad(x, Some(&mut *g), &w);
                if pass.cancels {
                    // The scalar kernel's gradient; the loss stays the vector plan's.
                    let exact = self.plan(r, x, &kernels::scan_exact(x, map), target)?;
                    exact.finish(x.iter().copied(), scale, true, |c, v| g[c] = v);
                } else {
                    set_target(g, &w);
                }
                plan.fast_loss(pass.distance)
            }
            (RowIo::Grad(x, g), None) => {
                plan.finish(x.iter().copied(), scale, true, |c, v| g[c] = v)
            }
            (RowIo::InPlace(x), Some(w)) => {
                // A pass that may find its gradient cancelling looks before it writes: the
                // scalar kernel then needs the logits.
                let probe = w.verify().then(|| kernels::ce_grad(x, None, &w));
                let distance = match probe {
                    Some(probe) if probe.cancels => {
                        let exact = self.plan(r, x, &kernels::scan_exact(x, map), target)?;
                        let cells = Cell::from_mut(x).as_slice_of_cells();
                        exact.finish(cells.iter().map(Cell::get), scale, true, |c, v| {
                            cells[c].set(v);
                        });
                        probe.distance
                    }
                    Some(probe) => {
                        kernels::ce_grad_in_place(x, &w);
                        probe.distance
                    }
                    None => {
                        let pass = kernels::ce_grad_in_place(x, &w);
                        set_target(x, &w);
                        pass.distance
                    }
                };
                plan.fast_loss(distance)
            }
            (RowIo::InPlace(x), None) => {
                // Each element is read before it is overwritten: the row is its own gradient
                // buffer.
                let cells = Cell::from_mut(x).as_slice_of_cells();
                plan.finish(cells.iter().map(Cell::get), scale, true, |c, v| {
                    cells[c].set(v);
                })
            }
        };
        Ok(Some(RowValues { argmax, ..values }))
    }

    /// The cross-entropy plan of row `r` from its read pass, with the row's error named.
    fn plan<'t>(
        &self,
        r: usize,
        logits: &[E],
        scan: &RowScan,
        target: RowTarget<'t, E>,
    ) -> Result<CeRow<'t, 'a, E>> {
        CeRow::new(logits, scan, target, self.config).map_err(|fault| fault.in_row(r))
    }

    /// A task's rows `(index, io)`, in order; stops at the first row with an error.
    fn task<'r>(
        &self,
        rows: impl Iterator<Item = (usize, RowIo<'r, E>)>,
        window: Option<ProbabilityRows<'_, E>>,
    ) -> Result<TaskOutcome> {
        let mut outcome = TaskOutcome {
            values: Vec::new(),
            tally: self.stats.as_ref().map(|_| ElementTally::default()),
        };
        for (r, io) in rows {
            let values = self.row(r, io, window, outcome.tally.as_mut())?;
            outcome.values.push(values);
        }
        Ok(outcome)
    }

    /// Runs all the rows of `logits` and reduces them.
    fn run(mut self, logits: Logits<'_, E>) -> Result<CrossEntropyOutput<E::Stat>> {
        self.process(&|i| i, logits, None)?;
        Ok(self.finish())
    }

    /// Runs the rows of `logits` (row `i` of the buffer is row `index(i)` of the batch; `index`
    /// increasing and past every row recorded so far) on rayon's pool in tasks of whole rows,
    /// the gradient going where `logits` says, then records the tasks' outcomes in row order
    /// (so the loss is bitwise the same for any number of threads). Rows skipped by `index` are
    /// recorded as ignored. The error is that of the smallest failing row. Probability targets
    /// given by chunk come in `window`.
    fn process(
        &mut self,
        index: &(dyn Fn(usize) -> usize + Sync),
        logits: Logits<'_, E>,
        window: Option<ProbabilityRows<'_, E>>,
    ) -> Result<()> {
        let rows_per = rows_per_task(self.classes);
        let (per, classes) = (rows_per * self.classes, self.classes);
        let this = &*self;
        // Row `i` of task `t`, with its batch index.
        let at = |t: usize| move |(i, io)| (index(t * rows_per + i), io);
        let outcomes: Vec<Result<TaskOutcome>> = match logits {
            Logits::Loss(x) => x
                .par_chunks(per)
                .enumerate()
                .map(|(t, x)| {
                    this.task(
                        x.chunks_exact(classes)
                            .map(RowIo::Loss)
                            .enumerate()
                            .map(at(t)),
                        window,
                    )
                })
                .collect(),
            Logits::Grad(x, g) => x
                .par_chunks(per)
                .zip(g.par_chunks_mut(per))
                .enumerate()
                .map(|(t, (x, g))| {
                    let rows = x.chunks_exact(classes).zip(g.chunks_exact_mut(classes));
                    this.task(
                        rows.map(|(x, g)| RowIo::Grad(x, g)).enumerate().map(at(t)),
                        window,
                    )
                })
                .collect(),
            Logits::InPlace(x) => x
                .par_chunks_mut(per)
                .enumerate()
                .map(|(t, x)| {
                    this.task(
                        x.chunks_exact_mut(classes)
                            .map(RowIo::InPlace)
                            .enumerate()
                            .map(at(t)),
                        window,
                    )
                })
                .collect(),
        };
        let mut i = 0;
        for outcome in outcomes {
            let outcome = outcome?;
            if let (Some(stats), Some(tally)) = (self.stats.as_mut(), outcome.tally.as_ref()) {
                stats.merge_tally(tally);
            }
            for values in outcome.values {
                self.record_ignored_before(index(i));
                self.record(values);
                i += 1;
            }
        }
        Ok(())
    }

    /// Records the rows from the next unrecorded one up to `r` (excluded) as ignored.
    pub(crate) fn record_ignored_before(&mut self, r: usize) {
        while self.recorded < r {
            self.record(None);
        }
    }

    /// Records the loss and lse of the next row (`None`: ignored).
    pub(crate) fn record(&mut self, values: Option<RowValues>) {
        let r = self.recorded;
        self.recorded += 1;
        if let (Some(stats), Some(v)) = (self.stats.as_mut(), values) {
            stats.row(v.lse);
        }
        if let (Some(v), Some(argmax)) = (self.row_argmax.as_mut(), values.and_then(|v| v.argmax)) {
            v[r] = argmax as i64;
            if let Targets::Classes(t) = self.targets {
                self.correct_rows += usize::from(t[r] == argmax as i64);
            }
        }
        let values = values.unwrap_or(RowValues {
            loss: 0.0,
            lse: f64::NAN,
            z_term: 0.0,
            argmax: None,
        });
        self.any_non_finite_row |= !values.loss.is_finite();
        self.total.add(values.loss);
        self.z_total.add(values.z_term);
        if let Some(v) = self.row_loss.as_mut() {
            v[r] = E::Stat::from_f64_saturating(values.loss);
        }
        if let Some(v) = self.row_lse.as_mut() {
            v[r] = E::Stat::from_f64_saturating(values.lse);
        }
    }

    /// A sum over the rows, reduced as the loss is.
    fn reduce(&self, sum: f64) -> f64 {
        let reduced = match self.options.reduction {
            // A propagated NaN row still poisons the loss, even with nothing to average.
            Reduction::Mean if self.empty_mean() => match self.options.empty_mean {
                EmptyMean::Nan => f64::NAN,
                _ if sum.is_nan() => f64::NAN,
                _ => 0.0,
            },
            Reduction::Mean => sum / self.denominator,
            Reduction::Sum | Reduction::None => sum,
        };
        // Finite row losses give a finite total: the sum or the division may overflow f64.
        if self.any_non_finite_row {
            reduced
        } else {
            saturate(reduced)
        }
    }

    pub(crate) fn finish(mut self) -> CrossEntropyOutput<E::Stat> {
        self.record_ignored_before(self.rows);
        let loss = self.reduce(self.total.value());
        let z_loss = self.reduce(self.z_total.value());
        let classes_targets = matches!(self.targets, Targets::Classes(_));
        CrossEntropyOutput {
            loss: E::Stat::from_f64_saturating(loss),
            row_loss: self.row_loss,
            row_lse: self.row_lse,
            z_loss: E::Stat::from_f64_saturating(z_loss),
            correct_rows: (self.row_argmax.is_some() && classes_targets)
                .then_some(self.correct_rows),
            row_argmax: self.row_argmax,
            counted_rows: self.counted_rows,
            denominator: self.denominator,
            logit_stats: self.stats.map(|s| s.finish(E::DTYPE, self.classes)),
        }
    }
}

/// The cross-entropy loss of `logits` (`rows × classes`, row-major) against `targets`.
///
/// Computed as `(m − x_y) + log1p(Σ_{j≠k} exp(x_j − m))`, never as `lse − x_y`, so finite logits
/// give a finite loss and tiny losses keep their digits (`CE([30, 0], 0) = 9.3576e-14` in `f32`).
///
/// ```
/// use lse::{cross_entropy, CrossEntropyOptions, Targets};
/// let logits = [1000.0f32, 1.0, -1000.0, /* row 2 */ 3.0, 2.0, 1.0];
/// let out = cross_entropy(&logits, 3, Targets::Classes(&[1, 0]), &CrossEntropyOptions::default())?;
/// assert!((out.loss - (999.0 + 0.40761) / 2.0).abs() < 1e-3);
/// # Ok::<(), lse::LseError>(())
/// ```
///
/// # Errors
/// Shapes: [`LseError::EmptyClasses`], [`LseError::RaggedRows`], [`LseError::LengthMismatch`].
/// Options: [`LseError::BadOption`], [`LseError::BadWeight`]. Targets:
/// [`LseError::TargetOutOfRange`], [`LseError::BadProbability`]. Logits under
/// [`NonFinite::Error`]: [`LseError::NonFinite`] (NaN or `+inf` in a non-ignored row) and
/// [`LseError::MaskedTarget`] (target mass on a `-inf` logit). [`LseError::EmptyMean`] under
/// [`EmptyMean::Error`]. No input is modified.
///
/// # Panics
/// Never.
pub fn cross_entropy<E: Element>(
    logits: &[E],
    classes: usize,
    targets: Targets<'_, E>,
    options: &CrossEntropyOptions<'_>,
) -> Result<CrossEntropyOutput<E::Stat>> {
    fused(
        logits,
        classes,
        targets,
        options,
        GradOutput::default(),
        None,
    )
}

/// [`cross_entropy`] fused with its gradient: returns the loss and writes
/// `∂(grad_output · loss)/∂logits` into `grad` (same shape and dtype as `logits`), from one read
/// pass and one write pass per row.
///
/// Ignored rows get a zero gradient; `-inf` logits get 0; with [`Reduction::Mean`] the gradient
/// carries the `1/denominator` factor. The gradient of the loss itself is finite for finite
/// logits (it saturates at the dtype's `MAX` if it must); multiplied by `grad_output` it may
/// overflow the dtype to `±inf`, and is left so: with a loss scale as `grad_output` that overflow
/// is the signal a [`LossScaler`](crate::guard::LossScaler) needs to skip the step. The gradient is computed in `f64` as
/// `(A + 2z·lse)·softmax_i − w_i q_i` (times the soft-cap slope) and rounded once.
///
/// ```
/// use lse::{cross_entropy_with_grad, CrossEntropyOptions, GradOutput, Targets};
/// let logits = [2.0f32, 1.0, 0.1];
/// let mut grad = [0.0f32; 3];
/// let opts = CrossEntropyOptions { label_smoothing: 0.1, ..Default::default() };
/// let out = cross_entropy_with_grad(&logits, 3, Targets::Classes(&[0]), &opts,
///                                   GradOutput::Scalar(1.0), &mut grad)?;
/// assert!(out.loss > 0.0 && grad[0] < 0.0 && grad[1] > 0.0);
/// assert!(grad.iter().sum::<f32>().abs() < 1e-6); // a gradient row of p − q sums to 0
/// # Ok::<(), lse::LseError>(())
/// ```
///
/// # Errors
/// As [`cross_entropy`], and [`LseError::LengthMismatch`] when `grad` is not `logits.len()`
/// long, [`LseError::PerRowGradient`] for [`GradOutput::PerRow`] without [`Reduction::None`],
/// [`LseError::NonFinite`] for a non-finite `grad_output` under [`NonFinite::Error`]. On error
/// no input is modified and `grad` is unspecified.
///
/// # Panics
/// Never.
pub fn cross_entropy_with_grad<E: Element>(
    logits: &[E],
    classes: usize,
    targets: Targets<'_, E>,
    options: &CrossEntropyOptions<'_>,
    grad_output: GradOutput<'_, E::Stat>,
    grad: &mut [E],
) -> Result<CrossEntropyOutput<E::Stat>> {
    expect_len("gradient", logits.len(), grad.len())?;
    fused(logits, classes, targets, options, grad_output, Some(grad))
}

fn fused<E: Element>(
    logits: &[E],
    classes: usize,
    targets: Targets<'_, E>,
    options: &CrossEntropyOptions<'_>,
    grad_output: GradOutput<'_, E::Stat>,
    grad: Option<&mut [E]>,
) -> Result<CrossEntropyOutput<E::Stat>> {
    let batch = Batch::new(logits.len(), classes, targets, options, grad_output)?;
    batch.run(match grad {
        Some(g) => Logits::Grad(logits, g),
        None => Logits::Loss(logits),
    })
}

/// The gradient of a cross-entropy over probability targets with respect to the targets:
/// writes `∂(grad_output · loss)/∂q` into `grad` (`rows × classes`, the logits' dtype), the
/// derivative PyTorch's autograd gives a target that requires grad.
///
/// The loss is linear in `q`: with `x̃` the (soft-capped) logits, `ε` the label smoothing and
/// `w` the class weights, `∂ℓ_r/∂q_rc = (1 − ε) · w_c · (lse(x̃_r) − x̃_rc)`, formed as
/// `(m − x̃_c) + log1p(s')` (never `lse − x̃_c`), times the mean's `1/rows` and `grad_output`.
/// A masked class (`x̃_c = -inf`) gets `+inf · (1 − ε)·w_c` (0 when that factor is 0): moving
/// target mass onto it makes the loss infinite. The z-loss term does not depend on `q`.
///
/// ```
/// use lse::{cross_entropy_target_grad, CrossEntropyOptions, GradOutput};
/// let (logits, q) = ([2.0f64, 0.0], [0.5f64, 0.5]);
/// let mut dq = [0.0f64; 2];
/// cross_entropy_target_grad(&logits, 2, &q, &CrossEntropyOptions::default(),
///                           GradOutput::Scalar(1.0), &mut dq)?;
/// let lse = (2.0f64.exp() + 1.0).ln();
/// assert!((dq[0] - (lse - 2.0)).abs() < 1e-15 && (dq[1] - lse).abs() < 1e-15);
/// # Ok::<(), lse::LseError>(())
/// ```
///
/// # Errors
/// As [`cross_entropy_with_grad`] with [`Targets::Probabilities`]: shapes, options, weights,
/// `grad_output`, [`LseError::BadProbability`] for a non-finite target and, under
/// [`NonFinite::Error`], [`LseError::NonFinite`] for the first NaN or `+inf` logit (under
/// [`NonFinite::Propagate`] that row's gradient is NaN). No input is modified; on error `grad`
/// is unspecified.
///
/// # Panics
/// Never.
pub fn cross_entropy_target_grad<E: Element>(
    logits: &[E],
    classes: usize,
    probabilities: &[E],
    options: &CrossEntropyOptions<'_>,
    grad_output: GradOutput<'_, E::Stat>,
    grad: &mut [E],
) -> Result<()> {
    expect_len("target gradient", logits.len(), grad.len())?;
    let batch = Batch::new(
        logits.len(),
        classes,
        Targets::Probabilities(probabilities),
        options,
        grad_output,
    )?;
    let (config, keep) = (batch.config, 1.0 - options.label_smoothing);
    let dtype_max = E::MAX.to_f64();
    super::par_rows(logits, classes, grad, classes, |r, x, g| {
        let q = &probabilities[r * classes..(r + 1) * classes];
        if let Some((c, &v)) = q.iter().enumerate().find(|(_, v)| !v.to_f64().is_finite()) {
            return Err(LseError::BadProbability {
                row: r,
                column: c,
                value: v.to_f64(),
            });
        }
        let scan = kernels::scan_exact(x, config.map);
        if let Some(column) = scan.first_non_finite {
            if options.non_finite == NonFinite::Error {
                return Err(non_finite_logit(r, column, x[column]));
            }
            g.fill(E::from_f64(f64::NAN));
            return Ok(());
        }
        let scale = batch.grad_scale(r);
        let (max, log1p_sum) = (scan.state.max(), scan.state.log1p_sum());
        for (c, (g, &xc)) in g.iter_mut().zip(x).enumerate() {
            let factor = keep * config.weights.map_or(1.0, |w| w[c]);
            let mapped = config.map.apply(xc.to_f64());
            let value = if factor == 0.0 {
                0.0
            } else if mapped == f64::NEG_INFINITY {
                // lse − x̃_c = +inf (a fully masked row too): not saturated, it is no rounding.
                scale.caller * (scale.reduction * (factor * f64::INFINITY))
            } else {
                // lse − x̃_c ≥ 0; the derivative of the loss saturates as the logits' does.
                let of_loss = scale.reduction * (factor * ((max - mapped) + log1p_sum));
                scale.caller * of_loss.clamp(-dtype_max, dtype_max)
            };
            *g = E::from_f64(value);
        }
        Ok(())
    })
}

/// The logits of a call and where their gradient goes.
enum Logits<'x, E> {
    Loss(&'x [E]),
    Grad(&'x [E], &'x mut [E]),
    InPlace(&'x mut [E]),
}

/// The read pass of a cross-entropy row, and what it leaves for the write pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadPass {
    /// The scalar kernel: no vector kernel, or a row the vector kernel cannot serve (read again).
    Exact,
    /// The vector kernel.
    Vector,
    /// The vector kernel's exp in `f64` lanes: probability targets, so that `p − q` keeps its
    /// digits, and soft-capped rows, whose cap is computed in those lanes too.
    Wide,
    /// The vector kernel, leaving each exp term (times its slope when soft-capped) for the write
    /// pass: a plain class target, whose gradient is `c·exp(x − m)` but at the target
    /// (smoothing and probability targets subtract a mass from each term).
    Caching,
    /// The vector kernel, leaving each slope and the distance sums too: a soft-capped, smoothed
    /// class row without class weights, so that neither its loss nor its gradient maps a logit
    /// again (loss-only rows too: the same bits either way).
    CachingSmoothed,
}

impl ReadPass {
    /// The read pass of a row under `config`, with a class target or probabilities, with a
    /// gradient or for its loss alone; `vector` when a vector kernel runs, `caches` when the row
    /// is short enough to cache.
    fn of(
        config: &CeConfig<'_>,
        class_target: bool,
        gradient: bool,
        vector: bool,
        caches: bool,
    ) -> Self {
        let capped = config.map != LogitMap::Identity;
        let (smoothed, weighted) = (config.smoothing > 0.0, config.weights.is_some());
        match (vector, class_target, capped, smoothed) {
            (false, ..) => ReadPass::Exact,
            (true, true, true, true) if !weighted && caches => ReadPass::CachingSmoothed,
            (true, true, _, false) if gradient && caches => ReadPass::Caching,
            (true, false, ..) | (true, true, true, _) => ReadPass::Wide,
            (true, true, false, _) => ReadPass::Vector,
        }
    }
}

/// One row's logits and where its gradient goes.
enum RowIo<'r, E> {
    Loss(&'r [E]),
    Grad(&'r [E], &'r mut [E]),
    InPlace(&'r mut [E]),
}

impl<E: Element> RowIo<'_, E> {
    fn logits(&self) -> &[E] {
        match self {
            RowIo::Loss(x) | RowIo::Grad(x, _) => x,
            RowIo::InPlace(x) => x,
        }
    }

    /// An ignored row: its gradient is 0.
    fn zero_grad(self) {
        match self {
            RowIo::Loss(_) => {}
            RowIo::Grad(_, g) | RowIo::InPlace(g) => g.fill(E::zero()),
        }
    }
}

/// A cross-entropy over class targets (or probability targets,
/// [`ChunkedCrossEntropy::with_probabilities`]) whose logits arrive a chunk of rows at a time: a
/// file read piece by piece, or the logits that the fused linear cross-entropy forms block by
/// block.
///
/// The same checks, per-row work, gradient scale, reduction and statistics as one
/// [`cross_entropy`] / [`cross_entropy_with_grad`] call over all the rows, bit for bit, for any
/// split of the rows into chunks: each row's loss and gradient depend on that row alone, the
/// mean's denominator comes from the targets (known at [`ChunkedCrossEntropy::new`]), so each
/// chunk's gradient is final when it is written, and the loss is summed in row order.
///
/// ```
/// use lse::{cross_entropy_with_grad, ChunkedCrossEntropy, CrossEntropyOptions, GradOutput, Targets};
/// let logits = [2.0f32, 1.0, 0.1, /* row 1 */ 0.5, 3.0, -1.0, /* row 2 */ 1.0, 1.0, 1.0];
/// let targets = [0i64, 1, 2];
/// let options = CrossEntropyOptions::default();
/// let mut stream = ChunkedCrossEntropy::new(3, &targets, &options, GradOutput::Scalar(1.0))?;
/// let mut grad = [0.0f32; 9];
/// let (first, rest) = grad.split_at_mut(3);
/// stream.next_rows(&logits[..3], Some(first))?;
/// stream.next_rows(&logits[3..], Some(rest))?;
/// let streamed = stream.finish();
///
/// let mut whole = [0.0f32; 9];
/// let once = cross_entropy_with_grad(&logits, 3, Targets::Classes(&targets), &options,
///                                    GradOutput::Scalar(1.0), &mut whole)?;
/// assert_eq!(streamed.loss.to_bits(), once.loss.to_bits());
/// assert_eq!(grad.map(f32::to_bits), whole.map(f32::to_bits));
/// # Ok::<(), lse::LseError>(())
/// ```
pub struct ChunkedCrossEntropy<'a, E: Element> {
    batch: Batch<'a, E>,
}

impl<'a, E: Element> ChunkedCrossEntropy<'a, E> {
    /// Checks everything but the logits, as [`cross_entropy_with_grad`] does, for
    /// `targets.len()` rows of `classes` logits.
    ///
    /// # Errors
    /// Those of [`cross_entropy_with_grad`] that need no logits: [`LseError::EmptyClasses`],
    /// [`LseError::BadOption`], [`LseError::BadWeight`], [`LseError::TargetOutOfRange`],
    /// [`LseError::EmptyMean`], [`LseError::PerRowGradient`], [`LseError::LengthMismatch`] (a
    /// per-row `grad_output` of another length) and [`LseError::NonFinite`] (a non-finite
    /// `grad_output` under [`NonFinite::Error`]).
    ///
    /// # Panics
    /// Never.
    pub fn new(
        classes: usize,
        targets: &'a [i64],
        options: &'a CrossEntropyOptions<'a>,
        grad_output: GradOutput<'a, E::Stat>,
    ) -> Result<Self> {
        let len = targets.len().saturating_mul(classes);
        let batch = Batch::new(
            len,
            classes,
            Targets::Classes(targets),
            options,
            grad_output,
        )?;
        Ok(Self { batch })
    }

    /// [`ChunkedCrossEntropy::new`] for probability targets ([`Targets::Probabilities`]):
    /// `probabilities` is `rows × classes`, row-major. The checks that need no logits are made
    /// here (the probabilities themselves are checked row by row, as their rows arrive: a
    /// non-finite one is [`LseError::BadProbability`] from [`Self::next_rows`]); the mean
    /// divides by the row count.
    ///
    /// ```
    /// use lse::{cross_entropy, ChunkedCrossEntropy, CrossEntropyOptions, GradOutput, Targets};
    /// let logits = [2.0f32, 1.0, 0.1, /* row 1 */ 0.5, 3.0, -1.0];
    /// let q = [0.7f32, 0.2, 0.1, /* row 1 */ 0.0, 0.5, 0.5];
    /// let options = CrossEntropyOptions::default();
    /// let mut stream = ChunkedCrossEntropy::with_probabilities(3, &q, &options, GradOutput::Scalar(1.0))?;
    /// stream.next_rows(&logits[..3], None)?;
    /// stream.next_rows(&logits[3..], None)?;
    /// let once = cross_entropy(&logits, 3, Targets::Probabilities(&q), &options)?;
    /// assert_eq!(stream.finish().loss.to_bits(), once.loss.to_bits());
    /// # Ok::<(), lse::LseError>(())
    /// ```
    ///
    /// # Errors
    /// [`LseError::EmptyClasses`], [`LseError::RaggedRows`] (`probabilities` not whole rows),
    /// [`LseError::BadOption`], [`LseError::BadWeight`], [`LseError::EmptyMean`] (no rows under
    /// [`EmptyMean::Error`]), [`LseError::PerRowGradient`], [`LseError::LengthMismatch`] (a
    /// per-row `grad_output` of another length) and [`LseError::NonFinite`] (a non-finite
    /// `grad_output` under [`NonFinite::Error`]).
    ///
    /// # Panics
    /// Never.
    pub fn with_probabilities(
        classes: usize,
        probabilities: &'a [E],
        options: &'a CrossEntropyOptions<'a>,
        grad_output: GradOutput<'a, E::Stat>,
    ) -> Result<Self> {
        if classes > 0 && !probabilities.len().is_multiple_of(classes) {
            return Err(LseError::RaggedRows {
                what: "probability targets",
                len: probabilities.len(),
                classes,
            });
        }
        let batch = Batch::new(
            probabilities.len(),
            classes,
            Targets::Probabilities(probabilities),
            options,
            grad_output,
        )?;
        Ok(Self { batch })
    }

    /// The rows that follow those given so far: their losses are recorded and, with `grad`
    /// (as long as `logits`), their gradient is written into it, scaled as the whole call's.
    /// Errors name rows counted from the first row of the first chunk.
    ///
    /// # Errors
    /// [`LseError::RaggedRows`] when `logits` is not whole rows; [`LseError::LengthMismatch`]
    /// when `grad` is not as long as `logits` or the rows run past the targets; the errors of
    /// [`cross_entropy`] about the logits themselves ([`LseError::NonFinite`],
    /// [`LseError::MaskedTarget`]). After an error the stream is of no further use.
    ///
    /// # Panics
    /// Never.
    pub fn next_rows(&mut self, logits: &[E], grad: Option<&mut [E]>) -> Result<()> {
        let classes = self.batch.classes;
        let rows = row_count("logits", logits.len(), classes)?;
        let first = self.batch.recorded;
        let left = self.batch.rows - first;
        if rows > left {
            return Err(LseError::LengthMismatch {
                what: "logits of the rows left",
                expected: left * classes,
                actual: logits.len(),
            });
        }
        let logits = match grad {
            Some(g) => {
                expect_len("gradient", logits.len(), g.len())?;
                Logits::Grad(logits, g)
            }
            None => Logits::Loss(logits),
        };
        self.batch.process(&|i| first + i, logits, None)
    }

    /// Rows `rows` (increasing, after those of earlier calls), whose logits are the rows of
    /// `logits` in order: their losses are recorded and, with `gradient`, their scaled gradient
    /// is written over them. Rows skipped between calls count as ignored.
    pub(crate) fn chunk(&mut self, rows: &[usize], logits: &mut [E], gradient: bool) -> Result<()> {
        let logits = if gradient {
            Logits::InPlace(logits)
        } else {
            Logits::Loss(logits)
        };
        self.batch.process(&|i| rows[i], logits, None)
    }

    /// [`ChunkedCrossEntropy::with_probabilities`] for `rows` rows whose probability targets
    /// come with their logits, in [`Self::chunk_with_probabilities`].
    pub(crate) fn with_probabilities_by_chunk(
        classes: usize,
        rows: usize,
        options: &'a CrossEntropyOptions<'a>,
        grad_output: GradOutput<'a, E::Stat>,
    ) -> Result<Self> {
        let batch = Batch::with_probabilities_by_chunk(rows, classes, options, grad_output)?;
        Ok(Self { batch })
    }

    /// [`Self::chunk`] for a stream made by [`Self::with_probabilities_by_chunk`]: the rows
    /// `first_row..` of `logits`, whose probability targets are the same rows of
    /// `probabilities`.
    pub(crate) fn chunk_with_probabilities(
        &mut self,
        first_row: usize,
        probabilities: &[E],
        logits: &mut [E],
        gradient: bool,
    ) -> Result<()> {
        let window = ProbabilityRows {
            first_row,
            values: probabilities,
        };
        let logits = if gradient {
            Logits::InPlace(logits)
        } else {
            Logits::Loss(logits)
        };
        self.batch.process(&|i| first_row + i, logits, Some(window))
    }

    /// The reduced loss and what the options asked for besides, over every row (rows never
    /// given count as ignored).
    pub fn finish(self) -> CrossEntropyOutput<E::Stat> {
        self.batch.finish()
    }
}

/// Probability targets handed over with a chunk's logits: row `r` of the batch has the
/// probabilities of row `r − first_row` of `values`.
#[derive(Clone, Copy)]
pub(crate) struct ProbabilityRows<'p, E> {
    first_row: usize,
    values: &'p [E],
}

/// What one task of rows hands to the in-order reduction.
struct TaskOutcome {
    values: Vec<Option<RowValues>>,
    tally: Option<ElementTally>,
}

/// [`cross_entropy_with_grad`] writing the gradient over the logits, with no gradient buffer
/// (for memory-bound training steps, as in Liger's kernel).
///
/// Bit for bit the same loss and gradient as the out-of-place call, and as fast. Between a
/// row's two passes its exp terms wait in a per-thread `f32` row (at most 32 Ki elements),
/// allocated by a thread's first row and reused by every later call: nothing per call, nothing
/// proportional to the logits.
///
/// # Errors
/// As [`cross_entropy_with_grad`]. Errors that need no logits (shapes, options, weights, class
/// targets, `grad_output`) are found before anything is written. An error found in the logits
/// themselves ([`LseError::NonFinite`], [`LseError::MaskedTarget`], [`LseError::BadProbability`])
/// is found in the read pass of its row, before that row is written: then every row of `logits`
/// holds either its original logits or its final gradient, and the row named by the error and
/// all rows after it hold their original logits. Use [`NonFinite::Propagate`] (or the
/// out-of-place call) when that is not acceptable.
///
/// # Panics
/// Never.
pub fn cross_entropy_in_place<E: Element>(
    logits: &mut [E],
    classes: usize,
    targets: Targets<'_, E>,
    options: &CrossEntropyOptions<'_>,
    grad_output: GradOutput<'_, E::Stat>,
) -> Result<CrossEntropyOutput<E::Stat>> {
    let batch = Batch::new(logits.len(), classes, targets, options, grad_output)?;
    batch.run(Logits::InPlace(logits))
}
