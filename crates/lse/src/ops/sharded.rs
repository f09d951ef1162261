//! A split vocabulary: the classes of every row spread over shards (processes, devices), each
//! holding the columns `[start, stop)`, as tensor-parallel training splits a language-model head.
//!
//! Three steps, of which only the middle one needs the other shards (docs/mpi.md):
//!
//! 1. **Partials** — each shard reduces each row of its columns to a [`RowPartial`]: the §1 state
//!    `(m, s')` of its (soft-capped) logits, the target logit when the target class is one of its
//!    columns, its live (finite-logit) class count and weight and `Σ w_c (m − x_c)` over them
//!    (label smoothing), and the first NaN or `+inf` it saw.
//! 2. **Merge** — [`RowPartial::merge`] combines two partials of the same row. It is commutative
//!    to the bit (the two are put in a fixed order first: by `m`, then `s'`, then every other
//!    field), [`RowPartial::EMPTY`] is its identity to the bit, and no `−inf − (−inf)` is ever
//!    formed. It is associative up to rounding: two reduction trees give states that differ by
//!    a few `f64` ulps of `s'`, which the finished results absorb to within one ulp of their
//!    type for the loss and lse (`f32`/`f16`/`bf16` usually bitwise). One all-reduce of `rows` partials with this
//!    operation (a user-defined MPI operation, say) replaces Megatron-LM's three.
//! 3. **Finish** — every shard turns the merged partials into the loss (or logsumexp), and its
//!    own columns' gradient (or softmax, log_softmax), with no further communication. Every
//!    shard that holds the same merged partials computes bitwise the same loss.
//!
//! Errors that depend on the logits (NaN, `+inf`, target mass on a `-inf` logit) travel in the
//! partials and are reported by the finish, identically on every shard, naming the row and the
//! global column: a shard never fails alone in step 1 over its logits' values, so no shard is
//! left waiting for another in step 2.
//!
//! ```
//! use lse::sharded::{self, RowPartial, Shard};
//! use lse::CrossEntropyOptions;
//!
//! // One row of 5 classes, split 3 + 2; target class 3 lives in the second shard.
//! let row = [2.0f32, 1.0, 0.5, 3.0, -1.0];
//! let targets = [3i64];
//! let opts = CrossEntropyOptions { label_smoothing: 0.1, ..Default::default() };
//! let (a, b) = (Shard::new(0, 3, 5)?, Shard::new(3, 5, 5)?);
//! let mut pa = [RowPartial::EMPTY];
//! let mut pb = [RowPartial::EMPTY];
//! sharded::cross_entropy_partials(&row[..3], a, &targets, &opts, &mut pa)?;
//! sharded::cross_entropy_partials(&row[3..], b, &targets, &opts, &mut pb)?;
//! let merged = [pa[0].merge(pb[0])]; // what an all-reduce would hand every shard
//! let split = sharded::cross_entropy_finish::<f32>(&merged, 5, &targets, &opts)?;
//! let whole = lse::cross_entropy(&row, 5, lse::Targets::Classes(&targets), &opts)?;
//! assert!((split.loss - whole.loss).abs() <= f32::EPSILON * whole.loss);
//! # Ok::<(), lse::LseError>(())
//! ```

use core::cmp::Ordering;

use rayon::prelude::*;

use super::cross_entropy::{Batch, CrossEntropyOptions, CrossEntropyOutput, GradOutput, Targets};
use super::linear_cross_entropy::{
    check_finite, chunk_targets, counted_rows, ChunkLayout, Chunks, HeadGradients,
    LinearCrossEntropyOptions, LinearHead,
};
use super::{expect_len, row_count, rows_per_task, NonFinite};
use crate::element::{DType, Element};
use crate::error::{LseError, Result};
use crate::kernels::{
    self,
    row_plan::{
        mass_on_masked, CeConfig, CeRow, RowFacts, RowFault, RowPlan, RowTarget, RowValues,
    },
    scalar::{add_distance, LogitMap, RowScan},
};
use crate::state::{CompensatedSum, RowState};

/// The columns `[start, stop)` of a row of `classes` classes that one shard holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shard {
    start: usize,
    stop: usize,
    classes: usize,
}

impl Shard {
    /// The shard of columns `[start, stop)` of `classes` (an empty range is allowed: a shard
    /// with no columns contributes [`RowPartial::EMPTY`]).
    ///
    /// # Errors
    /// [`LseError::EmptyClasses`] when `classes == 0`, [`LseError::BadShard`] unless
    /// `start ≤ stop ≤ classes`.
    pub fn new(start: usize, stop: usize, classes: usize) -> Result<Self> {
        if classes == 0 {
            return Err(LseError::EmptyClasses);
        }
        if start > stop || stop > classes {
            return Err(LseError::BadShard {
                start,
                stop,
                classes,
            });
        }
        Ok(Self {
            start,
            stop,
            classes,
        })
    }

    /// Shard `index` of `count` near-equal shards of `classes` columns: the first
    /// `classes % count` shards hold one column more than the others.
    ///
    /// # Errors
    /// [`LseError::EmptyClasses`] when `classes == 0`, [`LseError::BadShard`] when
    /// `index ≥ count`.
    pub fn split_evenly(index: usize, count: usize, classes: usize) -> Result<Self> {
        if index >= count {
            return Err(LseError::BadShard {
                start: index,
                stop: count,
                classes,
            });
        }
        let (base, extra) = (classes / count, classes % count);
        let start = index * base + index.min(extra);
        let stop = start + base + usize::from(index < extra);
        Self::new(start, stop, classes)
    }

    /// First global column held.
    pub fn start(&self) -> usize {
        self.start
    }

    /// One past the last global column held.
    pub fn stop(&self) -> usize {
        self.stop
    }

    /// Columns held.
    pub fn width(&self) -> usize {
        self.stop - self.start
    }

    /// Classes of the whole row.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The local column of global class `class`, if this shard holds it.
    fn local(&self, class: usize) -> Option<usize> {
        (self.start..self.stop)
            .contains(&class)
            .then(|| class - self.start)
    }

    /// The number of rows of a row-major `logits` buffer of this shard's width, which must be
    /// `rows`.
    fn check_rows(&self, len: usize, rows: usize) -> Result<()> {
        expect_len("shard logits", rows * self.width(), len)
    }
}

/// What one shard knows about one row, and what the merge of several shards' partials knows.
///
/// `#[repr(C)]` and [`Copy`], made of [`Self::F64_FIELDS`] `f64`s followed by
/// [`Self::U64_FIELDS`] `u64`s and nothing else ([`Self::BYTES`] bytes), so that a transport
/// (an MPI datatype, a device buffer) can carry it as plain data. Its fields are private: build
/// partials with the `*_partials` functions and combine them with [`Self::merge`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowPartial {
    /// `m`, the max of the (soft-capped) finite logits.
    max: f64,
    /// `s'` as a compensated sum: rounded part and carried error.
    rest: f64,
    rest_carry: f64,
    /// `Σ_live w_c (m − x_c)` (only gathered with label smoothing or class weights), as a
    /// compensated sum: rounded part and carried error.
    distance: f64,
    distance_carry: f64,
    /// `Σ_live w_c` (the live class count when unweighted).
    live_weight: f64,
    /// The (soft-capped) target logit, when [`Self::TARGET`] is set.
    target: f64,
    /// Probability targets: `Σ_c w_c q_c` as a compensated sum (0 for class targets).
    mass: f64,
    mass_carry: f64,
    /// Probability targets: `Σ_live w_c q_c (m − x_c)` as a compensated sum.
    mass_distance: f64,
    mass_distance_carry: f64,
    /// Probability targets: the largest `|q_c|`.
    probability_max: f64,
    /// Probability targets: the first non-finite `q_c` (at [`Self::bad_probability_column`]).
    bad_probability: f64,
    /// Live (finite-logit) classes.
    live: u64,
    /// Global column of the first NaN or `+inf` logit; `u64::MAX` when none.
    fault_column: u64,
    /// Probability targets: global column of the first non-finite `q_c`; `u64::MAX` when none.
    bad_probability_column: u64,
    /// Probability targets: global column of the first target mass on a `-inf` logit;
    /// `u64::MAX` when none.
    masked_mass_column: u64,
    /// [`Self::TARGET`], [`Self::FAULT_IS_INF`], [`Self::FAILED`].
    flags: u64,
}

const NO_FAULT: u64 = u64::MAX;

impl RowPartial {
    /// `f64` fields at the start of the layout.
    pub const F64_FIELDS: usize = 13;
    /// `u64` fields after them.
    pub const U64_FIELDS: usize = 5;
    /// The size of one partial: what one row costs on the wire.
    pub const BYTES: usize = 8 * (Self::F64_FIELDS + Self::U64_FIELDS);

    const TARGET: u64 = 1;
    const FAULT_IS_INF: u64 = 2;
    const FAILED: u64 = 4;

    /// The partial of no columns: the identity of [`Self::merge`].
    pub const EMPTY: Self = Self {
        max: f64::NEG_INFINITY,
        rest: 0.0,
        rest_carry: 0.0,
        distance: 0.0,
        distance_carry: 0.0,
        live_weight: 0.0,
        target: f64::NEG_INFINITY,
        mass: 0.0,
        mass_carry: 0.0,
        mass_distance: 0.0,
        mass_distance_carry: 0.0,
        probability_max: 0.0,
        bad_probability: 0.0,
        live: 0,
        fault_column: NO_FAULT,
        bad_probability_column: NO_FAULT,
        masked_mass_column: NO_FAULT,
        flags: 0,
    };

    /// A partial that says "this shard could not compute its part" (bad arguments on one
    /// process): merged into anything it stays marked, so every shard learns of it from the
    /// same collective instead of waiting for a shard that has given up.
    pub const FAILED_SHARD: Self = Self {
        flags: Self::FAILED,
        ..Self::EMPTY
    };

    /// True when a [`Self::FAILED_SHARD`] went into this partial.
    pub fn is_failed(&self) -> bool {
        self.flags & Self::FAILED != 0
    }

    /// The row's state `(m, s')` so far.
    pub fn state(&self) -> RowState {
        RowState::from_raw_parts(self.max, self.rest, self.rest_carry)
    }

    /// A total order on every field (bits of the floats, by `f64::total_cmp`): `m` first, then
    /// `s'`. The merge puts its operands in this order, which makes it commutative to the bit.
    fn order(&self, other: &Self) -> Ordering {
        let floats = |p: &Self| {
            [
                p.max,
                p.rest,
                p.rest_carry,
                p.distance,
                p.distance_carry,
                p.live_weight,
                p.target,
                p.mass,
                p.mass_carry,
                p.mass_distance,
                p.mass_distance_carry,
                p.probability_max,
                p.bad_probability,
            ]
        };
        let (a, b) = (floats(self), floats(other));
        a.iter()
            .zip(&b)
            .map(|(x, y)| x.total_cmp(y))
            .chain([
                self.live.cmp(&other.live),
                self.fault_column.cmp(&other.fault_column),
                self.bad_probability_column
                    .cmp(&other.bad_probability_column),
                self.masked_mass_column.cmp(&other.masked_mass_column),
                self.flags.cmp(&other.flags),
            ])
            .find(|o| o.is_ne())
            .unwrap_or(Ordering::Equal)
    }

    /// Combines the partials of two disjoint sets of columns of the same row.
    ///
    /// Commutative to the bit, with [`Self::EMPTY`] as its identity to the bit; associative up
    /// to the rounding of `s'` and of the smoothing distance (a few `f64` ulps). The state is
    /// merged by [`RowState::merge`] with the larger operand as its base; the distance of the
    /// smaller one is moved to the larger max as `Σ w (m_hi − x) = Σ w (m_lo − x) + W·(m_hi −
    /// m_lo)`, all terms ≥ 0 and the difference split exactly, so nothing cancels; the target
    /// mass's distance likewise (its terms have the signs of the target values).
    #[must_use]
    pub fn merge(self, other: Self) -> Self {
        let (high, low) = if self.order(&other).is_ge() {
            (self, other)
        } else {
            (other, self)
        };
        let (max, rest, rest_carry) = high.state().merge(low.state()).raw_parts();
        let mut distance = high.distance_sum();
        let mut mass_distance = high.mass_distance_sum();
        if low.max > f64::NEG_INFINITY {
            distance.add_sum(low.distance_sum());
            add_distance(&mut distance, low.live_weight, high.max, low.max);
            mass_distance.add_sum(low.mass_distance_sum());
            add_distance(
                &mut mass_distance,
                low.mass_sum().value(),
                high.max,
                low.max,
            );
        }
        let (distance, distance_carry) = distance.parts();
        let (mass_distance, mass_distance_carry) = mass_distance.parts();
        let mut mass = high.mass_sum();
        mass.add_sum(low.mass_sum());
        let (mass, mass_carry) = mass.parts();
        let with_bad_probability = if low.bad_probability_column < high.bad_probability_column {
            low
        } else {
            high
        };
        let with_target = if low.flags & Self::TARGET != 0 {
            low
        } else {
            high
        };
        let with_fault = if low.fault_column < high.fault_column {
            low
        } else {
            high
        };
        Self {
            max,
            rest,
            rest_carry,
            distance,
            distance_carry,
            live_weight: high.live_weight + low.live_weight,
            target: with_target.target,
            mass,
            mass_carry,
            mass_distance,
            mass_distance_carry,
            probability_max: high.probability_max.max(low.probability_max),
            bad_probability: with_bad_probability.bad_probability,
            live: high.live + low.live,
            fault_column: with_fault.fault_column,
            bad_probability_column: with_bad_probability.bad_probability_column,
            masked_mass_column: high.masked_mass_column.min(low.masked_mass_column),
            flags: (with_target.flags & Self::TARGET)
                | (with_fault.flags & Self::FAULT_IS_INF)
                | ((high.flags | low.flags) & Self::FAILED),
        }
    }

    /// `Σ_live w_c (m − x_c)` as the compensated sum it travels as.
    fn distance_sum(&self) -> CompensatedSum {
        CompensatedSum::from_parts(self.distance, self.distance_carry)
    }

    /// `Σ_c w_c q_c`.
    fn mass_sum(&self) -> CompensatedSum {
        CompensatedSum::from_parts(self.mass, self.mass_carry)
    }

    /// `Σ_live w_c q_c (m − x_c)`.
    fn mass_distance_sum(&self) -> CompensatedSum {
        CompensatedSum::from_parts(self.mass_distance, self.mass_distance_carry)
    }

    /// Adds a probability-target row's terms: this shard's columns `q` of the row's targets,
    /// with the row's (mapped) logits `row`; the first non-finite `q_c` ends the sweep (it is
    /// the row's error).
    fn add_probabilities<E: Element, Q: Element>(
        &mut self,
        row: &[E],
        q: &[Q],
        shard: Shard,
        config: &CeConfig<'_>,
    ) {
        let weights = config.weights.map(|w| &w[shard.start..shard.stop]);
        let keep = 1.0 - config.smoothing;
        let (mut mass, mut distance, mut peak) = (CompensatedSum::ZERO, CompensatedSum::ZERO, 0.0);
        for (c, (&qc, &x)) in q.iter().zip(row).enumerate() {
            let qc = qc.to_f64();
            if !qc.is_finite() {
                self.bad_probability_column = (shard.start + c) as u64;
                self.bad_probability = qc;
                break;
            }
            let weighted = weights.map_or(1.0, |w| w[c]) * qc;
            let mapped = config.map.apply(x.to_f64());
            if mass_on_masked(mapped, keep * weighted) && self.masked_mass_column == NO_FAULT {
                self.masked_mass_column = (shard.start + c) as u64;
            }
            mass.add(weighted);
            add_distance(&mut distance, weighted, self.max, mapped);
            peak = f64::max(peak, qc.abs());
        }
        (self.mass, self.mass_carry) = mass.parts();
        (self.mass_distance, self.mass_distance_carry) = distance.parts();
        self.probability_max = peak;
    }

    /// `acc[r] ← acc[r].merge(other[r])` for every row: the reduction an all-reduce applies.
    ///
    /// # Panics
    /// When the slices differ in length.
    pub fn merge_rows(acc: &mut [Self], other: &[Self]) {
        assert_eq!(
            acc.len(),
            other.len(),
            "merging partials of different row counts"
        );
        for (a, &b) in acc.iter_mut().zip(other) {
            *a = a.merge(b);
        }
    }

    /// The first NaN or `+inf` the row's shards saw: its global column and value.
    fn non_finite(&self) -> Option<(usize, f64)> {
        let value = if self.flags & Self::FAULT_IS_INF != 0 {
            f64::INFINITY
        } else {
            f64::NAN
        };
        (self.fault_column != NO_FAULT).then_some((self.fault_column as usize, value))
    }

    /// [`Self::non_finite`] as an error of row `row`.
    fn fault(&self, row: usize) -> Option<LseError> {
        let (column, value) = self.non_finite()?;
        Some(RowFault::NonFinite { column, value }.in_row(row))
    }

    /// The partial of one shard's row from its read pass; `sweep` adds the label-smoothing
    /// distance and live weight (a second pass, only with smoothing or class weights).
    fn of_row<E: Element>(
        row: &[E],
        shard: Shard,
        scan: &RowScan,
        map: LogitMap,
        weights: Option<&[f64]>,
        sweep: bool,
    ) -> Self {
        let (max, rest, rest_carry) = scan.state.raw_parts();
        let mut partial = Self {
            max,
            rest,
            rest_carry,
            live: (row.len() - scan.masked - scan.nan - scan.pos_inf) as u64,
            ..Self::EMPTY
        };
        partial.live_weight = partial.live as f64;
        if let Some(column) = scan.first_non_finite {
            partial.fault_column = (shard.start + column) as u64;
            if row[column].to_f64() == f64::INFINITY {
                partial.flags |= Self::FAULT_IS_INF;
            }
        }
        if sweep && partial.fault_column == NO_FAULT && max > f64::NEG_INFINITY {
            let weights = weights.map(|w| &w[shard.start..shard.stop]);
            let (mut distance, mut live_weight) = (CompensatedSum::ZERO, CompensatedSum::ZERO);
            for (c, &x) in row.iter().enumerate() {
                let mapped = map.apply(x.to_f64());
                if mapped > f64::NEG_INFINITY {
                    let w = weights.map_or(1.0, |w| w[c]);
                    live_weight.add(w);
                    add_distance(&mut distance, w, max, mapped);
                }
            }
            (partial.distance, partial.distance_carry) = distance.parts();
            partial.live_weight = live_weight.value();
        }
        partial
    }
}

/// The read pass of a shard's row: the scalar kernel for `f64` (full `f64` accuracy), else the
/// vector kernel's exp in `f64` lanes (good to about 2^-50, far below an `f32` ulp).
fn scan<E: Element>(row: &[E], map: LogitMap) -> RowScan {
    if E::DTYPE == DType::F64 {
        kernels::scan_exact(row, map)
    } else {
        kernels::scan_wide(row, map)
    }
}

/// Runs `f(r, logits_row, item)` for every row on rayon's pool, in tasks of whole rows.
fn par_shard_rows<E: Element, T: Send>(
    logits: &[E],
    width: usize,
    items: &mut [T],
    f: impl Fn(usize, &[E], &mut T) + Sync,
) {
    let per_task = rows_per_task(width);
    // A shard of no columns still has rows: give each an empty slice.
    let empty: [E; 0] = [];
    items
        .par_iter_mut()
        .with_min_len(per_task)
        .enumerate()
        .for_each(|(r, item)| {
            let row = if width == 0 {
                &empty[..]
            } else {
                &logits[r * width..(r + 1) * width]
            };
            f(r, row, item);
        });
}

/// Step 1 of a split logsumexp, softmax or log_softmax: the partial of every row of this shard's
/// `logits` (`partials.len()` rows × `shard.width()` columns, row-major).
///
/// NaN and `+inf` are not errors here: they travel in the partials, and the finishing calls
/// apply the policy identically on every shard.
///
/// # Errors
/// [`LseError::LengthMismatch`] when `logits` does not hold `partials.len()` rows of the shard's
/// width. Nothing is written then.
///
/// # Panics
/// Never.
pub fn logsumexp_partials<E: Element>(
    logits: &[E],
    shard: Shard,
    partials: &mut [RowPartial],
) -> Result<()> {
    shard.check_rows(logits.len(), partials.len())?;
    par_shard_rows(logits, shard.width(), partials, |_, row, p| {
        *p = RowPartial::of_row(
            row,
            shard,
            &scan(row, LogitMap::Identity),
            LogitMap::Identity,
            None,
            false,
        );
    });
    Ok(())
}

/// Step 3 of a split logsumexp: each row's `m + log1p(s')` from the merged partials (`-inf` for a
/// fully masked row), into `out`.
///
/// # Errors
/// [`LseError::LengthMismatch`] when `out` is not one value per partial; [`LseError::NonFinite`]
/// (naming the row and the global column of the first NaN or `+inf`) under
/// [`NonFinite::Error`]; under [`NonFinite::Propagate`] such a row gives NaN.
///
/// # Panics
/// Never.
pub fn logsumexp_finish<E: Element>(
    merged: &[RowPartial],
    out: &mut [E::Stat],
    policy: NonFinite,
) -> Result<()> {
    expect_len("logsumexp output", merged.len(), out.len())?;
    first_fault(merged, policy)?;
    for (o, p) in out.iter_mut().zip(merged) {
        let value = if p.fault_column != NO_FAULT {
            f64::NAN
        } else {
            p.state().logsumexp()
        };
        *o = E::Stat::from_f64(value);
    }
    Ok(())
}

/// Under [`NonFinite::Error`], the error of the first row whose shards saw NaN or `+inf`.
fn first_fault(merged: &[RowPartial], policy: NonFinite) -> Result<()> {
    if policy == NonFinite::Error {
        if let Some(error) = merged.iter().enumerate().find_map(|(r, p)| p.fault(r)) {
            return Err(error);
        }
    }
    Ok(())
}

/// Step 3 of a split softmax: this shard's columns of `softmax(x)` from its `logits` and the
/// merged partials, into `out` (same shape as `logits`). A fully masked row gives zeros.
///
/// # Errors
/// [`LseError::LengthMismatch`] for shapes; [`LseError::NonFinite`] under [`NonFinite::Error`]
/// (under [`NonFinite::Propagate`] the row is NaN).
///
/// # Panics
/// Never.
pub fn softmax_shard<E: Element>(
    logits: &[E],
    shard: Shard,
    merged: &[RowPartial],
    out: &mut [E],
    policy: NonFinite,
) -> Result<()> {
    write_shard(logits, shard, merged, out, policy, kernels::softmax)
}

/// Step 3 of a split log_softmax: this shard's columns of `log_softmax(x)`, as
/// [`softmax_shard`]. A fully masked row gives `-inf`.
///
/// # Errors
/// As [`softmax_shard`].
///
/// # Panics
/// Never.
pub fn log_softmax_shard<E: Element>(
    logits: &[E],
    shard: Shard,
    merged: &[RowPartial],
    out: &mut [E],
    policy: NonFinite,
) -> Result<()> {
    write_shard(logits, shard, merged, out, policy, kernels::log_softmax)
}

fn write_shard<E: Element>(
    logits: &[E],
    shard: Shard,
    merged: &[RowPartial],
    out: &mut [E],
    policy: NonFinite,
    write: fn(&[E], &RowState, &mut [E]),
) -> Result<()> {
    shard.check_rows(logits.len(), merged.len())?;
    expect_len("output", logits.len(), out.len())?;
    first_fault(merged, policy)?;
    let width = shard.width();
    if width == 0 {
        return Ok(());
    }
    logits
        .par_chunks(width)
        .zip(out.par_chunks_mut(width))
        .zip(merged.par_iter())
        .with_min_len(rows_per_task(width))
        .for_each(|((row, o), p)| {
            if p.fault_column != NO_FAULT {
                o.fill(E::from_f64(f64::NAN));
            } else {
                write(row, &p.state(), o);
            }
        });
    Ok(())
}

/// The options a split cross-entropy honours: logit statistics and argmaxes would be of one
/// shard only, so they are not gathered.
fn split_options<'a>(options: &CrossEntropyOptions<'a>) -> CrossEntropyOptions<'a> {
    CrossEntropyOptions {
        keep_logit_stats: false,
        keep_row_argmax: false,
        ..*options
    }
}

/// Step 1 of a split cross-entropy: the partial of every row of this shard's `logits`
/// (`targets.len()` rows × `shard.width()` columns, row-major) into `partials`.
///
/// `targets` are the global class indices of every row (the same on every shard), `options` the
/// same on every shard; `options.weights`, when given, holds the weights of all
/// `shard.classes()` classes. Label smoothing spreads `ε` over the live classes of the whole
/// row, never of one shard. Probability targets and logit statistics are not offered here.
/// Ignored rows are not read (their partial is [`RowPartial::EMPTY`]).
///
/// # Errors
/// What [`crate::cross_entropy`] finds without the logits — [`LseError::BadOption`],
/// [`LseError::BadWeight`], [`LseError::LengthMismatch`] for the weights,
/// [`LseError::TargetOutOfRange`], [`LseError::EmptyMean`] — the same on every shard that is
/// given the same arguments, and [`LseError::LengthMismatch`] when `logits` or `partials` do
/// not have `targets.len()` rows. NaN, `+inf` and masked targets are reported by
/// [`cross_entropy_finish`]. Nothing is written on error.
///
/// # Panics
/// Never.
pub fn cross_entropy_partials<E: Element>(
    logits: &[E],
    shard: Shard,
    targets: &[i64],
    options: &CrossEntropyOptions<'_>,
    partials: &mut [RowPartial],
) -> Result<()> {
    let options = split_options(options);
    let batch = checked_batch::<E>(shard.classes, targets, &options, GradOutput::default())?;
    shard.check_rows(logits.len(), targets.len())?;
    expect_len("partials", targets.len(), partials.len())?;
    let targets = SplitTargets::Classes {
        targets,
        ignore_index: options.ignore_index,
    };
    fill_partials(logits, shard, &|i| i, targets, batch.config, partials);
    Ok(())
}

/// The targets of the rows of a split call: row `i` of the call is row `index(i)` of the batch.
#[derive(Clone, Copy)]
pub(crate) enum SplitTargets<'a, E> {
    /// The batch's global classes (checked in range), indexed by batch row; rows whose class is
    /// `ignore_index` are skipped.
    Classes {
        targets: &'a [i64],
        ignore_index: Option<i64>,
    },
    /// This shard's columns of each row's probabilities, indexed by the call's row: row `i` is
    /// `values[i·width..(i + 1)·width]`.
    Probabilities { values: &'a [E], width: usize },
}

impl<'a, E> SplitTargets<'a, E> {
    /// The target of the call's row `i`, which is the batch's row `r`.
    fn of(&self, i: usize, r: usize) -> Target<'a, E> {
        match *self {
            Self::Classes {
                targets,
                ignore_index,
            } if Some(targets[r]) == ignore_index => Target::Ignored,
            // In range: checked by the batch.
            Self::Classes { targets, .. } => Target::Class(targets[r] as usize),
            Self::Probabilities { values, width } => {
                Target::Probabilities(&values[i * width..(i + 1) * width])
            }
        }
    }
}

/// One row's target in a split call.
enum Target<'a, E> {
    Ignored,
    Class(usize),
    /// The shard's columns of the row's probabilities.
    Probabilities(&'a [E]),
}

/// The partial of every row of `logits` into `partials`; ignored rows get
/// [`RowPartial::EMPTY`].
pub(crate) fn fill_partials<E: Element>(
    logits: &[E],
    shard: Shard,
    index: &(dyn Fn(usize) -> usize + Sync),
    targets: SplitTargets<'_, E>,
    config: CeConfig<'_>,
    partials: &mut [RowPartial],
) {
    let sweep = config.smoothing > 0.0 || config.weights.is_some();
    par_shard_rows(logits, shard.width(), partials, |i, row, p| {
        let target = targets.of(i, index(i));
        if let Target::Ignored = target {
            *p = RowPartial::EMPTY;
            return;
        }
        *p = RowPartial::of_row(
            row,
            shard,
            &scan(row, config.map),
            config.map,
            config.weights,
            sweep,
        );
        match target {
            Target::Class(class) => {
                if let Some(local) = shard.local(class) {
                    p.target = config.map.apply(row[local].to_f64());
                    p.flags |= RowPartial::TARGET;
                }
            }
            Target::Probabilities(q) => p.add_probabilities(row, q, shard, &config),
            Target::Ignored => {}
        }
    });
}

/// The argument checks of [`crate::cross_entropy`] for `targets.len()` rows of `classes`.
fn checked_batch<'a, E: Element>(
    classes: usize,
    targets: &'a [i64],
    options: &'a CrossEntropyOptions<'a>,
    grad_output: GradOutput<'a, E::Stat>,
) -> Result<Batch<'a, E>> {
    Batch::new(
        targets.len() * classes,
        classes,
        Targets::Classes(targets),
        options,
        grad_output,
    )
}

/// The cross-entropy plan of row `r` from its merged partial, with the weights of `shard`'s
/// columns when its gradient is to be written (`None`: the plan of the whole row, for the loss
/// and for what the gradient of every shard must agree on; a probability row's `q` is then
/// empty).
fn merged_plan<'q, 'w, E: Element>(
    r: usize,
    target: &Target<'q, E>,
    merged: &RowPartial,
    config: CeConfig<'w>,
    shard: Option<Shard>,
) -> Result<CeRow<'q, 'w, E>> {
    let keep = 1.0 - config.smoothing;
    let (bad_target, masked_target, row_target, kept_mass, probability_max) = match *target {
        Target::Class(class) => {
            let weight = config.weights.map_or(1.0, |w| w[class]);
            let mut kept = CompensatedSum::ZERO;
            kept.add(weight);
            (
                (merged.flags & RowPartial::TARGET == 0)
                    .then_some(RowFault::UncoveredTarget { class }),
                mass_on_masked(merged.target, keep * weight).then_some(class),
                // No column of a piece equals usize::MAX: every class is "another class".
                RowTarget::Class(
                    shard
                        .map_or(Some(class), |s| s.local(class))
                        .unwrap_or(usize::MAX),
                ),
                kept,
                1.0,
            )
        }
        Target::Probabilities(q) => (
            (merged.bad_probability_column != NO_FAULT).then_some(RowFault::BadProbability {
                column: merged.bad_probability_column as usize,
                value: merged.bad_probability,
            }),
            (merged.masked_mass_column != NO_FAULT).then_some(merged.masked_mass_column as usize),
            RowTarget::Probabilities(if shard.is_some() { q } else { &[] }),
            merged.mass_sum(),
            merged.probability_max,
        ),
        Target::Ignored => unreachable!("ignored rows have no plan"),
    };
    let plan = RowPlan::of(RowFacts {
        bad_target,
        non_finite: merged.non_finite(),
        masked_target,
        fully_masked: merged.state().is_fully_masked(),
        propagate: config.propagate_non_finite,
    })
    .map_err(|fault| fault.in_row(r))?;
    let piece = CeConfig {
        weights: match shard {
            Some(s) => config.weights.map(|w| &w[s.start..s.stop]),
            None => config.weights,
        },
        ..config
    };
    Ok(CeRow::from_merged(
        piece,
        merged.state(),
        row_target,
        kept_mass,
        probability_max,
        merged.live,
        merged.live_weight,
        plan,
    ))
}

/// True when the vector write pass serves row `r`: not when its gradient subtracts nearly equal
/// numbers (label smoothing that matches the prediction), which the vector pass's exp cannot
/// resolve — as [`crate::cross_entropy`] decides it for a whole row, from the merged partial —
/// and not for a probability row, which the scalar pass writes (its vector pass checks itself
/// as it writes, which a split row's plan does not).
fn vector_write_serves<E: Element>(
    r: usize,
    target: &Target<'_, E>,
    merged: &RowPartial,
    config: CeConfig<'_>,
) -> Result<bool> {
    match target {
        Target::Class(_) if config.smoothing == 0.0 => Ok(true),
        Target::Class(_) => {
            let whole = merged_plan::<E>(r, target, merged, config, None)?;
            // A smoothing that can cancel is decided on unmapped logits only: the target
            // logit is raw.
            Ok(!whole.smoothing_cancels(merged.target))
        }
        _ => Ok(false),
    }
}

/// The loss and lse of a row from its plan: the loss's distance term is the target's
/// `(1 − ε)·w_y·(m − x_y)` (a probability row's `(1 − ε)·Σ w_c q_c (m − x_c)`) plus
/// `(ε/K)·Σ_live w_c (m − x_c)`, from the merged partial.
fn row_values<E: Element>(
    plan: &CeRow<'_, '_, E>,
    merged: &RowPartial,
    config: &CeConfig<'_>,
    target: &Target<'_, E>,
) -> RowValues {
    let keep = 1.0 - config.smoothing;
    let mut distance = CompensatedSum::ZERO;
    match *target {
        Target::Class(class) => {
            let weight = config.weights.map_or(1.0, |w| w[class]);
            add_distance(&mut distance, keep * weight, merged.max, merged.target);
        }
        Target::Probabilities(_) => distance.add_sum(merged.mass_distance_sum().scaled(keep)),
        Target::Ignored => {}
    }
    let share = plan.smoothing_share();
    if share > 0.0 {
        // share · (distance + carry) with the product's rounding error kept: the split of the
        // sum into its two parts depends on the merge order, and a rounded product would show
        // it in an f64 loss.
        let product = share * merged.distance;
        distance.add(product);
        distance.add(share.mul_add(merged.distance, -product));
        distance.add(share * merged.distance_carry);
    }
    plan.values(distance.value())
}

/// Where the finish writes this shard's gradient rows.
pub(crate) enum ShardGrad<'g, E> {
    /// The loss alone.
    None,
    /// From the shard's logits into a buffer of their shape.
    Out(&'g [E], &'g mut [E]),
    /// Over the shard's logits.
    InPlace(&'g mut [E]),
}

/// Finishes every row (in parallel, writing this shard's gradient rows as `grad` says) and
/// records them in `batch` in row order, as [`crate::cross_entropy`] does: row `i` of
/// `merged` (and of the shard's logits) is row `index(i)` of the batch, `index` increasing and
/// past every row recorded so far; rows skipped are recorded as ignored. The error is that of
/// the smallest failing row.
pub(crate) fn finish_into<E: Element>(
    batch: &mut Batch<'_, E>,
    merged: &[RowPartial],
    index: &(dyn Fn(usize) -> usize + Sync),
    targets: SplitTargets<'_, E>,
    shard: Shard,
    grad: ShardGrad<'_, E>,
) -> Result<()> {
    let config = batch.config;
    let row = |i: usize, shard: Option<Shard>| -> Result<Option<(CeRow<'_, '_, E>, RowValues)>> {
        let r = index(i);
        let target = targets.of(i, r);
        if let Target::Ignored = target {
            return Ok(None);
        }
        let plan = merged_plan::<E>(r, &target, &merged[i], config, shard)?;
        let values = row_values(&plan, &merged[i], &config, &target);
        Ok(Some((plan, values)))
    };
    let width = shard.width();
    let batch_ref = &*batch;
    // The gradient of row i into g (x: its logits, or None when written over them).
    let write = |i: usize, x: Option<&[E]>, g: &mut [E]| -> Result<Option<RowValues>> {
        let Some((plan, values)) = row(i, Some(shard))? else {
            g.fill(E::zero());
            return Ok(None);
        };
        let r = index(i);
        // The merged state is good to the scalar kernel's accuracy; the vector write pass
        // serves every row whose gradient does not cancel beyond its exp's (a choice made
        // from the merged row alone: the same on every shard).
        let vector = vector_write_serves::<E>(r, &targets.of(i, r), &merged[i], config)?;
        let scale = batch_ref.grad_scale(r);
        match x {
            Some(x) => kernels::ce_grad_from_plan(x, g, &plan, scale, vector),
            None => kernels::ce_grad_from_plan_in_place(g, &plan, scale, vector),
        }
        Ok(Some(values))
    };
    let per_task = rows_per_task(width);
    let rows: Vec<Result<Option<RowValues>>> = match grad {
        ShardGrad::Out(x, g) if width > 0 => g
            .par_chunks_mut(width)
            .zip(x.par_chunks(width))
            .enumerate()
            .with_min_len(per_task)
            .map(|(i, (g, x))| write(i, Some(x), g))
            .collect(),
        ShardGrad::InPlace(x) if width > 0 => x
            .par_chunks_mut(width)
            .enumerate()
            .with_min_len(per_task)
            .map(|(i, x)| write(i, None, x))
            .collect(),
        // No columns, no gradient: the loss alone.
        _ => (0..merged.len())
            .into_par_iter()
            .map(|i| Ok(row(i, None)?.map(|(_, v)| v)))
            .collect(),
    };
    for (i, values) in rows.into_iter().enumerate() {
        let values = values?;
        batch.record_ignored_before(index(i));
        batch.record(values);
    }
    Ok(())
}

/// Finishes every row of a whole batch (see [`finish_into`]).
fn finish_rows<E: Element>(
    merged: &[RowPartial],
    classes: usize,
    targets: &[i64],
    options: &CrossEntropyOptions<'_>,
    grad_output: GradOutput<'_, E::Stat>,
    grad: Option<(&[E], Shard, &mut [E])>,
) -> Result<CrossEntropyOutput<E::Stat>> {
    let options = split_options(options);
    let mut batch = checked_batch::<E>(classes, targets, &options, grad_output)?;
    expect_len("merged partials", targets.len(), merged.len())?;
    let (shard, grad) = match grad {
        Some((logits, shard, grad)) => {
            shard.check_rows(logits.len(), targets.len())?;
            expect_len("gradient", logits.len(), grad.len())?;
            (shard, ShardGrad::Out(logits, grad))
        }
        None => (Shard::new(0, 0, classes)?, ShardGrad::None),
    };
    let targets = SplitTargets::Classes {
        targets,
        ignore_index: options.ignore_index,
    };
    finish_into(&mut batch, merged, &|i| i, targets, shard, grad)?;
    Ok(batch.finish())
}

/// Step 3 of a split cross-entropy, loss only: the reduced loss (and, as asked, per-row losses
/// and logsumexp) of `classes` classes from the merged partials of every row. Bitwise the same
/// on every shard that holds the same merged partials and arguments.
///
/// # Errors
/// As [`cross_entropy_partials`]; [`LseError::LengthMismatch`] when `merged` does not hold
/// `targets.len()` rows; [`LseError::NonFinite`] (global column) and [`LseError::MaskedTarget`]
/// as [`crate::cross_entropy`] reports them; [`LseError::UncoveredTarget`] when no shard held a
/// row's target class.
///
/// # Panics
/// Never.
pub fn cross_entropy_finish<E: Element>(
    merged: &[RowPartial],
    classes: usize,
    targets: &[i64],
    options: &CrossEntropyOptions<'_>,
) -> Result<CrossEntropyOutput<E::Stat>> {
    finish_rows::<E>(
        merged,
        classes,
        targets,
        options,
        GradOutput::default(),
        None,
    )
}

/// Step 3 of a split cross-entropy with this shard's gradient: [`cross_entropy_finish`]'s
/// output, and `∂(grad_output · loss)/∂logits` of the shard's columns into `grad` (the shape of
/// `logits`), from the merged partials alone — no further communication. Ignored rows get 0,
/// `-inf` logits 0, poisoned rows (under [`NonFinite::Propagate`]) NaN.
///
/// # Errors
/// As [`cross_entropy_finish`], and [`LseError::LengthMismatch`] for `logits` or `grad`,
/// [`LseError::PerRowGradient`] / [`LseError::NonFinite`] for `grad_output` as
/// [`crate::cross_entropy_with_grad`]. On error `grad` is unspecified.
///
/// # Panics
/// Never.
pub fn cross_entropy_shard_grad<E: Element>(
    logits: &[E],
    shard: Shard,
    merged: &[RowPartial],
    targets: &[i64],
    options: &CrossEntropyOptions<'_>,
    grad_output: GradOutput<'_, E::Stat>,
    grad: &mut [E],
) -> Result<CrossEntropyOutput<E::Stat>> {
    finish_rows::<E>(
        merged,
        shard.classes,
        targets,
        options,
        grad_output,
        Some((logits, shard, grad)),
    )
}

/// The targets of a split linear cross-entropy ([`linear_cross_entropy_shard`]).
#[derive(Clone, Copy, Debug)]
pub enum ShardTargets<'a, E> {
    /// Every row's global class (the same on every shard), or the ignore index.
    Classes(&'a [i64]),
    /// This shard's columns of every row's probability targets: `rows × shard.width()`,
    /// row-major, any finite values (as [`crate::Targets::Probabilities`]). `rows` is given
    /// because a shard of no columns holds no values.
    Probabilities {
        /// The values.
        values: &'a [E],
        /// The number of rows (of `hidden`).
        rows: usize,
    },
}

/// Where [`linear_cross_entropy_shard`] writes one shard's gradients.
#[derive(Debug)]
pub struct LinearShardGradients<'a, E: Element> {
    /// This shard's share of `∂/∂H`, `rows × dim`, in the working dtype (`f32`; `f64` for
    /// `f64`): `G_shard·W_shard`. The gradient of `H` is the sum of every shard's share (an
    /// all-reduce sum), rounded once into `E`. Ignored rows are 0.
    pub hidden: &'a mut [E::Stat],
    /// `∂/∂W` of this shard's rows of `W`, `shard.width() × dim`.
    pub weight: &'a mut [E],
    /// `∂/∂b` of this shard's classes; computed only when given.
    pub bias: Option<&'a mut [E]>,
}

/// The vocab-split fused linear cross-entropy, one shard's part: this shard holds rows
/// `[start, stop)` of the head `W` (and of the bias), the hidden states `H` (`rows × dim`) are
/// the same on every shard, and `merge` is the one exchange between shards — called once per
/// chunk of rows, in the same order on every shard.
///
/// Per chunk of counted rows: the shard's logits `H_c·W_shardᵀ + b_shard` (in the working
/// dtype, `f32` or `f64` for `f64`, one matrix product), their [`RowPartial`]s, `merge` (which must leave in them the merge of every
/// shard's partials of those rows, as [`RowPartial::merge_rows`] would: an all-reduce), then the
/// loss of the rows and, with `grads`, the shard's gradient `G_c` from the merged partials
/// written over the logits, `dW_shard += G_cᵀ·H_c` (in the working dtype, rounded once at the
/// end, as
/// [`crate::linear_cross_entropy_with_grad`] does), `db_shard += Σ_rows G_c` and the shard's
/// share `G_c·W_shard` of `dH_c`. Chunks are cut as the one-process call cuts them, sized for
/// rows of all `shard.classes()` classes: every shard makes the same number of `merge` calls,
/// `counted_rows.div_ceil(chunk)` (none when every row is ignored), and holds at most
/// `options.budget_bytes` of chunk buffers.
///
/// One merge per chunk rather than one per call: a single merge would need every chunk's
/// partials before any gradient, and so either the whole `rows × width` logits in memory (what
/// the fused call exists to avoid) or a second product `H·W_shardᵀ` to form them again.
///
/// `head.weight` is this shard's `shard.width() × dim` rows, `head.bias` its `shard.width()`
/// values, `head.classes` must be `shard.width()`; `targets` are global classes or this
/// shard's columns of the probability targets ([`ShardTargets`]),
/// `options.cross_entropy.weights` (if any) are over all classes. Every shard given the same
/// merged partials computes bitwise the same loss. A probability row's partial carries its
/// target mass `Σ w_c q_c`, the mass's distance `Σ w_c q_c (m − x_c)`, its largest `|q_c|` and
/// the first bad probability and masked target mass (by global column), so the loss and every
/// shard's gradient come from the merged row as a class row's do; its gradient is written by
/// the scalar pass.
///
/// # Errors
/// Errors every shard finds alike, before any `merge`: those of
/// [`crate::linear_cross_entropy`] for the options, targets, `grad_output`, the budget, the
/// shape of `hidden` and its values. Errors of this shard alone — the shapes of `head`, of its
/// probability targets and of `grads`, a NaN or infinite value in this shard's `W` or `b` under [`NonFinite::Error`]
/// (named by its global row of `W` or class of `b`) — are returned after one `merge` of
/// [`RowPartial::FAILED_SHARD`] rows (when there is a chunk), so that the other shards learn of
/// it from that call; `merge` must then fail on every shard (lse-mpi's does). Errors of the
/// logits' values (as [`cross_entropy_finish`]) and of the probability targets
/// ([`LseError::BadProbability`], [`LseError::MaskedTarget`], by global column) are the same on
/// every shard. Any error of
/// `merge` is returned as it is. On error the gradient buffers are unspecified.
///
/// # Panics
/// Never, unless `merge` does.
#[allow(clippy::too_many_arguments)]
pub fn linear_cross_entropy_shard<E: Element, X: From<LseError>>(
    hidden: &[E],
    head: LinearHead<'_, E>,
    shard: Shard,
    targets: ShardTargets<'_, E>,
    options: &LinearCrossEntropyOptions<'_>,
    grad_output: GradOutput<'_, E::Stat>,
    grads: Option<LinearShardGradients<'_, E>>,
    mut merge: impl FnMut(&mut [RowPartial]) -> core::result::Result<(), X>,
) -> core::result::Result<CrossEntropyOutput<E::Stat>, X> {
    // What every shard finds alike.
    let ce_options = split_options(&options.cross_entropy);
    let ignore_index = ce_options.ignore_index;
    let (mut batch, rows, counted) = match targets {
        ShardTargets::Classes(t) => (
            checked_batch::<E::Stat>(shard.classes, t, &ce_options, grad_output)?,
            t.len(),
            counted_rows(t, ignore_index),
        ),
        ShardTargets::Probabilities { rows, .. } => (
            Batch::with_probabilities_by_chunk(rows, shard.classes, &ce_options, grad_output)?,
            rows,
            (0..rows).collect(),
        ),
    };
    let width = shard.width();
    let dim = match (rows, width) {
        (0, 0) => 0,
        (0, _) => row_count("weight", head.weight.len(), width)?,
        _ => row_count("hidden", hidden.len(), rows)?,
    };
    let probabilities = matches!(targets, ShardTargets::Probabilities { .. });
    let chunks = Chunks::new(
        options.budget_bytes,
        dim,
        (width, shard.classes),
        counted,
        ChunkLayout::of::<E>(grads.is_some(), probabilities),
    )?;
    let error_policy = ce_options.non_finite == NonFinite::Error;
    if error_policy && !chunks.counted.is_empty() {
        check_finite("hidden", hidden, dim, Some(&chunks.counted))?;
    }
    // What this shard alone may find: the others learn of it from the first merge.
    let local = (|| -> Result<()> {
        if head.classes != width {
            return Err(LseError::LengthMismatch {
                what: "shard head classes",
                expected: width,
                actual: head.classes,
            });
        }
        expect_len("shard weight", width * dim, head.weight.len())?;
        if let Some(bias) = head.bias {
            expect_len("shard bias", width, bias.len())?;
        }
        if let ShardTargets::Probabilities { values, .. } = targets {
            expect_len("shard probability targets", rows * width, values.len())?;
        }
        if let Some(g) = &grads {
            expect_len("hidden gradient", rows * dim, g.hidden.len())?;
            expect_len("shard weight gradient", width * dim, g.weight.len())?;
            if let Some(db) = &g.bias {
                expect_len("shard bias gradient", width, db.len())?;
            }
        }
        if error_policy && !chunks.counted.is_empty() {
            // The shard's rows of `W` and classes of `b`, named by their global index.
            check_finite("weight", head.weight, dim.max(1), None)
                .map_err(|e| e.in_whole(shard.start, 0))?;
            if let Some(bias) = head.bias {
                check_finite("bias", bias, width.max(1), None)
                    .map_err(|e| e.in_whole(0, shard.start))?;
            }
        }
        Ok(())
    })();
    if let Err(error) = local {
        if let Some(first) = chunks.each().next() {
            let mut failed = vec![RowPartial::FAILED_SHARD; first.len()];
            // The other shards' outcome is theirs to report.
            let _ = merge(&mut failed);
        }
        return Err(error.into());
    }

    let config = batch.config;
    let gradient = grads.is_some();
    let mut partials = Vec::new();
    let grads = grads.map(|g| HeadGradients {
        hidden: g.hidden,
        weight: g.weight,
        bias: g.bias,
    });
    // A chunk's probability rows (this shard's columns), widened when not in the working dtype.
    let mut wide_targets = Vec::new();
    chunks.run(
        hidden,
        head,
        grads,
        |rows_c, x| -> core::result::Result<(), X> {
            let split_targets = match targets {
                ShardTargets::Classes(targets) => SplitTargets::Classes {
                    targets,
                    ignore_index,
                },
                ShardTargets::Probabilities { values, .. } => SplitTargets::Probabilities {
                    values: chunk_targets(values, rows_c, width, &mut wide_targets),
                    width,
                },
            };
            partials.clear();
            partials.resize(rows_c.len(), RowPartial::EMPTY);
            let index = |i: usize| rows_c[i];
            fill_partials(x, shard, &index, split_targets, config, &mut partials);
            merge(&mut partials)?;
            let grad = if gradient {
                ShardGrad::InPlace(x)
            } else {
                ShardGrad::None
            };
            finish_into(&mut batch, &partials, &index, split_targets, shard, grad)?;
            Ok(())
        },
    )?;
    Ok(batch.finish())
}
