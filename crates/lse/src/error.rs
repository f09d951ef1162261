//! The one error type of the library.

/// Everything that can be wrong with the input of an `lse` call.
///
/// Every variant names what is wrong and where (row, column, value), so that a training loop can
/// log it and a user can find the offending entry. A call that returns an error has left every
/// input buffer as it was (see the in-place cross-entropy for its own, documented guarantee).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum LseError {
    /// The class dimension is 0: there is no row to normalise.
    #[error("the class dimension is empty: classes must be at least 1")]
    EmptyClasses,

    /// A row-major buffer whose length is not a whole number of rows.
    #[error("{what} has {len} elements, which is not a multiple of {classes} classes")]
    RaggedRows {
        /// Which argument (`"logits"`, `"probability targets"`, …).
        what: &'static str,
        /// Its length.
        len: usize,
        /// The class count it was split by.
        classes: usize,
    },

    /// A buffer whose length does not match the one it goes with.
    #[error("{what} has {actual} elements, expected {expected}")]
    LengthMismatch {
        /// Which argument (`"output"`, `"targets"`, `"weights"`, …).
        what: &'static str,
        /// The length it must have.
        expected: usize,
        /// The length it has.
        actual: usize,
    },

    /// Two arrays whose 2-D shapes differ (the `ndarray` entry points).
    #[error("{what} has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Which argument.
        what: &'static str,
        /// The shape it must have (rows, classes).
        expected: [usize; 2],
        /// The shape it has.
        actual: [usize; 2],
    },

    /// A NaN or `+inf` input under [`NonFinite::Error`](crate::NonFinite::Error).
    /// (`-inf` is never an error: it is how masks are written.)
    #[error("non-finite {what} {value} at row {row}, column {column}")]
    NonFinite {
        /// Which argument (`"logit"`, `"output gradient"`, …).
        what: &'static str,
        /// Row of the first offending entry.
        row: usize,
        /// Column (class) of the first offending entry in that row.
        column: usize,
        /// The value found there (NaN or `+inf`), widened to `f64`.
        value: f64,
    },

    /// A class-index target that is neither a class nor the ignore index.
    #[error("target {value} at row {row} is out of range for {classes} classes")]
    TargetOutOfRange {
        /// The row of the target.
        row: usize,
        /// The target value.
        value: i64,
        /// The number of classes.
        classes: usize,
    },

    /// Target mass on a class whose logit is `-inf`: the loss is `+inf` (an error under
    /// [`NonFinite::Error`](crate::NonFinite::Error)).
    #[error("row {row} puts target mass on class {class}, whose logit is -inf (masked): the loss is +inf")]
    MaskedTarget {
        /// The row.
        row: usize,
        /// The masked class that carries target mass.
        class: usize,
    },

    /// A probability target that is NaN or infinite.
    #[error("probability target {value} at row {row}, column {column} is not finite")]
    BadProbability {
        /// The row.
        row: usize,
        /// The class.
        column: usize,
        /// The value found.
        value: f64,
    },

    /// A class weight that is NaN or infinite.
    #[error("class weight {value} for class {class} is not finite")]
    BadWeight {
        /// The class.
        class: usize,
        /// The value found.
        value: f64,
    },

    /// An option outside its domain (label smoothing outside `[0, 1]`, a negative z-loss, …).
    #[error("option {name} = {value} is invalid: {expected}")]
    BadOption {
        /// The option's field name.
        name: &'static str,
        /// The value given.
        value: f64,
        /// What it must be.
        expected: &'static str,
    },

    /// [`GradOutput::PerRow`](crate::GradOutput::PerRow) with a reduction that yields one scalar.
    #[error("a per-row output gradient needs Reduction::None, but the reduction is {reduction:?}")]
    PerRowGradient {
        /// The reduction in the options.
        reduction: crate::Reduction,
    },

    /// A working-memory budget (the linear cross-entropy's `budget_bytes`) too small for one row.
    #[error("a working-memory budget of {budget} bytes cannot hold one row: it needs at least {minimum}")]
    BudgetTooSmall {
        /// The budget given.
        budget: usize,
        /// The smallest budget that works for these shapes.
        minimum: usize,
    },

    /// A mean reduction with nothing to average (every row ignored, or a zero total weight),
    /// under [`EmptyMean::Error`](crate::EmptyMean::Error).
    #[error(
        "mean reduction over {rows} rows with zero total weight (every row ignored or weighted 0)"
    )]
    EmptyMean {
        /// The number of rows in the batch.
        rows: usize,
    },

    /// A vocabulary shard whose column range is not inside the classes
    /// ([`sharded::Shard`](crate::sharded::Shard)).
    #[error("shard columns [{start}, {stop}) do not lie in 0..{classes}")]
    BadShard {
        /// First column of the shard.
        start: usize,
        /// One past its last column.
        stop: usize,
        /// The number of classes of the whole row.
        classes: usize,
    },

    /// Merged shard partials in which no shard held a row's target class: the shards do not
    /// cover the classes.
    #[error("no shard held class {class}, the target of row {row}")]
    UncoveredTarget {
        /// The row.
        row: usize,
        /// Its target class.
        class: usize,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = LseError> = core::result::Result<T, E>;

impl LseError {
    /// This error as told of a whole tensor when it was found in a part of it that starts
    /// `rows` rows and `columns` columns in: the cell a [`LseError::NonFinite`] names moves by
    /// that much; every other error is returned as it is.
    #[must_use]
    pub fn in_whole(self, rows: usize, columns: usize) -> Self {
        match self {
            LseError::NonFinite {
                what,
                row,
                column,
                value,
            } => LseError::NonFinite {
                what,
                row: row + rows,
                column: column + columns,
                value,
            },
            other => other,
        }
    }
}
