//! Per-batch statistics of a logits buffer.

use serde::{Deserialize, Serialize};

use crate::element::{DType, Element};
use crate::error::Result;
use crate::kernels::{self, scalar::RowScan};
use crate::ops::row_count;
use crate::state::CompensatedSum;

/// How far the largest logit is from the point where a naive `exp` overflows, per dtype:
/// `ln(MAX) − max` (≈ 11.09 − max for `f16`, 88.72 − max for `bf16` and `f32`). Negative means a
/// naive softmax in that dtype would already return `inf`/NaN on this batch.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Headroom {
    /// Against `f16` (overflow at 11.09).
    #[serde(deserialize_with = "f64_or_nan")]
    pub f16: f64,
    /// Against `bf16` (overflow at 88.72).
    #[serde(deserialize_with = "f64_or_nan")]
    pub bf16: f64,
    /// Against `f32` (overflow at 88.72).
    #[serde(deserialize_with = "f64_or_nan")]
    pub f32: f64,
}

impl Headroom {
    /// The headroom of a batch whose largest logit is `max`.
    pub fn of_max(max: f64) -> Self {
        let left = |d: DType| d.exp_overflow_threshold() - max;
        Self {
            f16: left(DType::F16),
            bf16: left(DType::BF16),
            f32: left(DType::F32),
        }
    }
}

/// Reads a figure that JSON may hold as `null`: serde_json writes every non-finite `f64` as
/// `null`, and these figures are NaN when nothing finite was seen; `null` reads back as NaN, so a
/// [`MonitorState`](super::MonitorState) written to JSON reads back.
fn f64_or_nan<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
}

/// Statistics of one batch of logits: what a training loop logs to see a run drift toward
/// overflow before it dies.
///
/// Extremes are over finite logits (NaN when there is none; JSON `null`, read back as NaN); the
/// logsumexp figures are over rows whose logsumexp is finite. Gathered stand-alone by
/// [`LogitStats::of`], or inside the fused cross-entropy's read pass with
/// [`CrossEntropyOptions::keep_logit_stats`](crate::CrossEntropyOptions::keep_logit_stats), which
/// sees the raw (uncapped) logits of the rows it reads (ignored rows are not read).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogitStats {
    /// Dtype of the logits.
    pub dtype: DType,
    /// Rows observed.
    pub rows: usize,
    /// Classes per row.
    pub classes: usize,
    /// Largest finite logit.
    #[serde(deserialize_with = "f64_or_nan")]
    pub max: f64,
    /// Smallest finite logit.
    #[serde(deserialize_with = "f64_or_nan")]
    pub min: f64,
    /// Largest finite `|x|`.
    #[serde(deserialize_with = "f64_or_nan")]
    pub max_abs: f64,
    /// NaN count.
    pub nan: u64,
    /// `+inf` count.
    pub pos_inf: u64,
    /// `-inf` count (masks).
    pub neg_inf: u64,
    /// Mean of the per-row logsumexp.
    #[serde(deserialize_with = "f64_or_nan")]
    pub lse_mean: f64,
    /// Largest per-row logsumexp.
    #[serde(deserialize_with = "f64_or_nan")]
    pub lse_max: f64,
    /// Mean of `z = lse²` (what a z-loss penalises).
    #[serde(deserialize_with = "f64_or_nan")]
    pub z_mean: f64,
    /// Distance of `max` to naive-`exp` overflow per dtype.
    pub headroom: Headroom,
}

impl LogitStats {
    /// The statistics of `logits` (`rows × classes`, row-major), in one read pass.
    ///
    /// Never fails on the values themselves: NaN and infinities are counted, not rejected.
    ///
    /// # Errors
    /// [`LseError::EmptyClasses`](crate::LseError::EmptyClasses) or
    /// [`LseError::RaggedRows`](crate::LseError::RaggedRows) for a bad shape.
    ///
    /// # Panics
    /// Never.
    pub fn of<E: Element>(logits: &[E], classes: usize) -> Result<Self> {
        row_count("logits", logits.len(), classes)?;
        let mut builder = StatsBuilder::default();
        for row in logits.chunks_exact(classes) {
            let scan = kernels::scan(row);
            builder.tally(&scan);
            let lse = match scan.first_non_finite {
                None => kernels::logsumexp(row, &scan.state),
                Some(_) => f64::NAN,
            };
            builder.row(lse);
        }
        Ok(builder.finish(E::DTYPE, classes))
    }

    /// `ln(MAX of dtype) − max`: the headroom against any dtype, `f64` included.
    pub fn headroom_against(&self, dtype: DType) -> f64 {
        dtype.exp_overflow_threshold() - self.max
    }

    /// True when any logit is NaN or `+inf`.
    pub fn has_non_finite(&self) -> bool {
        self.nan > 0 || self.pos_inf > 0
    }

    /// One line of JSON (for JSON-lines logs).
    pub fn to_json_line(&self) -> String {
        // Serialising plain numbers and strings cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Counts and extremes of the elements seen by a read pass.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ElementTally {
    max: f64,
    min: f64,
    nan: u64,
    pos_inf: u64,
    neg_inf: u64,
}

impl Default for ElementTally {
    fn default() -> Self {
        Self {
            max: f64::NEG_INFINITY,
            min: f64::INFINITY,
            nan: 0,
            pos_inf: 0,
            neg_inf: 0,
        }
    }
}

impl ElementTally {
    /// Adds the elements of one scanned row.
    #[inline]
    pub(crate) fn add(&mut self, scan: &RowScan) {
        self.max = self.max.max(scan.finite_max);
        self.min = self.min.min(scan.finite_min);
        self.nan += scan.nan as u64;
        self.pos_inf += scan.pos_inf as u64;
        self.neg_inf += scan.masked as u64;
    }

    /// Combines the tallies of two disjoint sets of rows.
    pub(crate) fn merge(&mut self, other: &ElementTally) {
        self.max = self.max.max(other.max);
        self.min = self.min.min(other.min);
        self.nan += other.nan;
        self.pos_inf += other.pos_inf;
        self.neg_inf += other.neg_inf;
    }
}

/// Accumulates [`LogitStats`] row by row.
#[derive(Clone, Debug, Default)]
pub(crate) struct StatsBuilder {
    tally: ElementTally,
    rows: usize,
    lse_rows: usize,
    lse_sum: CompensatedSum,
    z_sum: CompensatedSum,
    lse_max: Option<f64>,
}

impl StatsBuilder {
    /// Adds the elements of one row, from its read pass.
    pub(crate) fn tally(&mut self, scan: &RowScan) {
        self.tally.add(scan);
    }

    /// Adds a tally gathered elsewhere (another thread's rows).
    pub(crate) fn merge_tally(&mut self, tally: &ElementTally) {
        self.tally.merge(tally);
    }

    /// Records one row's logsumexp (after its elements went through [`Self::tally`]).
    pub(crate) fn row(&mut self, lse: f64) {
        self.rows += 1;
        if lse.is_finite() {
            self.lse_rows += 1;
            self.lse_sum.add(lse);
            self.z_sum.add(lse * lse);
            self.lse_max = Some(self.lse_max.map_or(lse, |m| m.max(lse)));
        }
    }

    pub(crate) fn finish(self, dtype: DType, classes: usize) -> LogitStats {
        let t = self.tally;
        let any_finite = t.max >= t.min;
        let (max, min) = if any_finite {
            (t.max, t.min)
        } else {
            (f64::NAN, f64::NAN)
        };
        let mean = |s: CompensatedSum| {
            if self.lse_rows == 0 {
                f64::NAN
            } else {
                s.value() / self.lse_rows as f64
            }
        };
        LogitStats {
            dtype,
            rows: self.rows,
            classes,
            max,
            min,
            max_abs: max.abs().max(min.abs()),
            nan: t.nan,
            pos_inf: t.pos_inf,
            neg_inf: t.neg_inf,
            lse_mean: mean(self.lse_sum),
            lse_max: self.lse_max.unwrap_or(f64::NAN),
            z_mean: mean(self.z_sum),
            headroom: Headroom::of_max(max),
        }
    }
}
