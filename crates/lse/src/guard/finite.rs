//! Fail-fast finiteness checks on named tensors, on a schedule.

use core::fmt;

use crate::element::{DType, Element};
use crate::guard::tensor::{Role, TensorShapeError, TensorView};

/// Which batches a [`FiniteGuard`] checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Every batch.
    Always,
    /// Batches `0..first`, then every batch whose index is a multiple of `every` (so the checked
    /// batches line up with round step numbers in the logs: `first = 3, every = 10` checks
    /// 0, 1, 2, 10, 20, 30, …). `every = 0` checks only the first `first` batches.
    FirstThenEvery {
        /// How many batches, from batch 0, are all checked.
        first: u64,
        /// After them, the period of the checks.
        every: u64,
    },
    /// No batch: every check passes without reading anything.
    Never,
}

impl Schedule {
    /// Whether batch `batch` (0-based) is checked.
    pub fn is_active(self, batch: u64) -> bool {
        match self {
            Schedule::Always => true,
            Schedule::Never => false,
            Schedule::FirstThenEvery { first, every } => {
                batch < first || (every != 0 && batch.is_multiple_of(every))
            }
        }
    }
}

impl Default for Schedule {
    /// The first 100 batches, then every 100th.
    fn default() -> Self {
        Schedule::FirstThenEvery {
            first: 100,
            every: 100,
        }
    }
}

/// What a [`FiniteGuard`] check found.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum GuardError {
    /// A checked tensor holds a NaN or an infinity (`-inf` is allowed in [`Role::Logits`], where it
    /// is a mask).
    #[error(
        "non-finite value {value} in tensor `{tensor}` ({role}, {dtype}) at batch {batch}, row {row}, column {column}"
    )]
    NonFinite {
        /// The tensor's name.
        tensor: String,
        /// The tensor's role.
        role: Role,
        /// The tensor's dtype.
        dtype: DType,
        /// The batch being checked (as given to [`FiniteGuard::begin_batch`]).
        batch: u64,
        /// The row of the first offending entry.
        row: usize,
        /// Its column.
        column: usize,
        /// Its value (NaN, `inf` or `-inf`), widened to `f64`.
        value: f64,
    },
    /// The shape given for a checked tensor does not fit its buffer.
    #[error(transparent)]
    Shape(#[from] TensorShapeError),
}

/// Fail-fast finiteness checks on a [`Schedule`].
///
/// A NaN found at the step where it appears names its origin; found a thousand steps later in the
/// weights it names nothing. [`FiniteGuard`] checks the tensors you hand it (input batch, logits,
/// loss, gradients) and returns a [`GuardError`] that names the tensor, the batch, the row, the
/// column and the value. A full check reads every element, so it runs on a [`Schedule`]: every
/// batch while a run is young, then every K-th batch; on a batch the schedule skips a check costs
/// one branch and reads nothing.
///
/// ```
/// use lse::guard::{FiniteGuard, GuardError, Schedule};
///
/// let mut guard = FiniteGuard::new(Schedule::FirstThenEvery { first: 2, every: 10 });
/// let logits = [0.5f32, f32::NAN, 1.0, 2.0];
/// guard.begin_batch(1);
/// let err = guard.check_slice("logits", lse::guard::Role::Logits, &logits, 2).unwrap_err();
/// assert!(matches!(err, GuardError::NonFinite { batch: 1, row: 0, column: 1, .. }));
/// guard.begin_batch(5); // not scheduled: nothing is read
/// assert!(guard.check_slice("logits", lse::guard::Role::Logits, &logits, 2).is_ok());
/// ```
#[derive(Clone, Debug)]
pub struct FiniteGuard {
    schedule: Schedule,
    batch: u64,
    active: bool,
    batches_checked: u64,
    tensors_checked: u64,
}

impl FiniteGuard {
    /// A guard on `schedule`, positioned at batch 0 (as if [`FiniteGuard::begin_batch`]`(0)` had
    /// been called).
    pub fn new(schedule: Schedule) -> Self {
        let active = schedule.is_active(0);
        FiniteGuard {
            schedule,
            batch: 0,
            active,
            batches_checked: 0,
            tensors_checked: 0,
        }
    }

    /// The schedule.
    pub fn schedule(&self) -> Schedule {
        self.schedule
    }

    /// Starts batch `batch` (0-based): decides, once, whether this batch's checks run.
    pub fn begin_batch(&mut self, batch: u64) {
        self.batch = batch;
        self.active = self.schedule.is_active(batch);
        self.batches_checked += u64::from(self.active);
    }

    /// The current batch.
    pub fn batch(&self) -> u64 {
        self.batch
    }

    /// Whether the current batch is checked. Use it to skip work that only feeds the checks.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// How many [`FiniteGuard::begin_batch`] calls so far started a batch the schedule checks.
    pub fn batches_checked(&self) -> u64 {
        self.batches_checked
    }

    /// How many tensors (and losses) were actually read so far.
    pub fn tensors_checked(&self) -> u64 {
        self.tensors_checked
    }

    /// Checks one tensor, if the current batch is scheduled; one pass, stopping at the first
    /// non-finite entry (see [`TensorView::first_non_finite`] for what counts).
    ///
    /// # Errors
    /// [`GuardError::NonFinite`] naming the tensor, its role and dtype, the batch, the row, the
    /// column and the value of the first offending entry. Never on a batch the schedule skips.
    ///
    /// # Panics
    /// Never.
    pub fn check(&mut self, tensor: &TensorView<'_>) -> Result<(), GuardError> {
        if !self.active {
            return Ok(());
        }
        self.tensors_checked += 1;
        match tensor.first_non_finite() {
            None => Ok(()),
            Some(found) => Err(GuardError::NonFinite {
                tensor: found.tensor,
                role: found.role,
                dtype: found.dtype,
                batch: self.batch,
                row: found.row,
                column: found.column,
                value: found.value,
            }),
        }
    }

    /// Checks several tensors in order and returns the first failure.
    ///
    /// # Errors
    /// As [`FiniteGuard::check`], for the first tensor that fails.
    ///
    /// # Panics
    /// Never.
    pub fn check_all(&mut self, tensors: &[TensorView<'_>]) -> Result<(), GuardError> {
        tensors.iter().try_for_each(|t| self.check(t))
    }

    /// Checks a row-major slice (`rows × columns`) of any dtype; see [`FiniteGuard::check`].
    /// Give [`Role::Logits`] for masked logits, so that their `-inf` entries pass.
    ///
    /// # Errors
    /// [`GuardError::Shape`] when `columns` is 0 or does not divide `data.len()` (checked only on
    /// scheduled batches), else as [`FiniteGuard::check`].
    ///
    /// # Panics
    /// Never.
    pub fn check_slice<E: Element>(
        &mut self,
        name: &str,
        role: Role,
        data: &[E],
        columns: usize,
    ) -> Result<(), GuardError> {
        if !self.active {
            return Ok(());
        }
        self.check(&TensorView::new(name, role, data, columns)?)
    }

    /// Checks a scalar loss (reported as row 0, column 0).
    ///
    /// # Errors
    /// [`GuardError::NonFinite`] when `value` is NaN or infinite on a scheduled batch.
    ///
    /// # Panics
    /// Never.
    pub fn check_loss(&mut self, name: &str, value: f64) -> Result<(), GuardError> {
        if !self.active {
            return Ok(());
        }
        self.check(&TensorView::scalar(name, Role::Loss, &value))
    }
}

impl Default for FiniteGuard {
    /// A guard on [`Schedule::default`].
    fn default() -> Self {
        FiniteGuard::new(Schedule::default())
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Schedule::Always => f.write_str("every batch"),
            Schedule::Never => f.write_str("no batch"),
            Schedule::FirstThenEvery { first, every: 0 } => write!(f, "the first {first} batches"),
            Schedule::FirstThenEvery { first, every } => {
                write!(f, "the first {first} batches, then every {every}th")
            }
        }
    }
}
