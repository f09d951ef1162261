//! NaN triage: given the tensors of one training step, which one went non-finite first, and why.

use core::cmp::Ordering;
use core::fmt;

use serde::Serialize;

use crate::element::DType;
use crate::guard::tensor::{fmt_value, json_f64, ranks_above, NonFiniteValue, Role, TensorView};

/// How many logits of the offending row a [`TriageReport`] lists.
pub const TOP_K: usize = 5;

/// The likely cause of a non-finite training step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// The input batch was already non-finite: the model never had a chance.
    NonFiniteInput,
    /// The logits are NaN or `+inf` (the layers before the loss overflowed), or finite but beyond
    /// what their dtype can exponentiate naively (`ln(max)`: 11.09 in `f16`) while something
    /// downstream went non-finite and no probabilities were given to tell more.
    LogitsOutOfRange,
    /// The logits are finite but the probabilities hold NaN, `inf`, or exact zeros where the
    /// stable softmax ([`crate::softmax`]) is a normal number: the fingerprint of
    /// `exp(x) / Σ exp(x)` computed without subtracting the row max.
    NaiveSoftmaxSignature,
    /// Everything up to the loss is finite; a gradient is not: the backward pass overflowed.
    GradientExploded,
    /// None of the above rules matched.
    Unknown,
}

impl Cause {
    /// The `snake_case` name used in JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Cause::NonFiniteInput => "non_finite_input",
            Cause::LogitsOutOfRange => "logits_out_of_range",
            Cause::NaiveSoftmaxSignature => "naive_softmax_signature",
            Cause::GradientExploded => "gradient_exploded",
            Cause::Unknown => "unknown",
        }
    }

    /// One sentence on what the cause means.
    pub const fn description(self) -> &'static str {
        match self {
            Cause::NonFiniteInput => {
                "non-finite input: the data was already non-finite before the model saw it"
            }
            Cause::LogitsOutOfRange => {
                "logits out of range: the logits are NaN/inf, or too large for their dtype to \
                 exponentiate naively (overflow upstream of the loss)"
            }
            Cause::NaiveSoftmaxSignature => {
                "naive softmax: finite logits, but the probabilities or the loss are \
                 non-finite in the pattern of exp(x)/sum(exp(x)) computed without the max shift"
            }
            Cause::GradientExploded => {
                "exploded gradient: the forward pass and the loss are finite, a gradient is not"
            }
            Cause::Unknown => "unknown: no rule matched",
        }
    }

    /// What to do about it.
    pub const fn advice(self) -> &'static str {
        match self {
            Cause::NonFiniteInput => {
                "Check the data loader and the preprocessing of this batch (a division by zero in \
                 normalisation, log of 0, a corrupt record); drop or repair the sample, and check \
                 inputs as they are loaded (FiniteGuard with Role::Input)."
            }
            Cause::LogitsOutOfRange => {
                "Compute the loss from raw logits with lse::cross_entropy (it never exponentiates \
                 a positive number, so finite logits give a finite loss). Then find why the logits \
                 grow: keep the output layer in f32 or bf16, lower the learning rate, add a z-loss \
                 or logit soft-capping, and watch them with LogitMonitor."
            }
            Cause::NaiveSoftmaxSignature => {
                "Replace exp(x)/sum(exp(x)) and log(softmax(x)) with lse::softmax, \
                 lse::log_softmax or lse::cross_entropy: they subtract the row max and cannot \
                 overflow on finite logits."
            }
            Cause::GradientExploded => {
                "Lower the learning rate or clip gradients; in f16 use a loss scaler \
                 (lse::guard::LossScaler), which skips a step whose gradients overflow and backs \
                 off its scale."
            }
            Cause::Unknown => {
                "Look at the operation that produced the first non-finite tensor; check every \
                 tensor of the step with FiniteGuard to narrow it down."
            }
        }
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the row whose top logits are shown was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RowChoice {
    /// The logits themselves went non-finite: the row of the first bad entry.
    OffendingEntry,
    /// The row of the logits that matches the row of the first bad entry of the offending tensor
    /// (an input, a per-row loss, probabilities or a logit gradient of matching shape).
    CorrespondingRow,
    /// The row where the probabilities first differ from the stable softmax.
    NaiveSoftmaxMismatch,
    /// The shapes do not match (a scalar loss, a weight gradient): the row holding the largest
    /// logit.
    LargestLogit,
}

impl RowChoice {
    fn describe(self) -> &'static str {
        match self {
            RowChoice::OffendingEntry => "the row of the first bad logit",
            RowChoice::CorrespondingRow => "the row of the first bad entry",
            RowChoice::NaiveSoftmaxMismatch => "the first row where the softmax is wrong",
            RowChoice::LargestLogit => "the row holding the largest logit",
        }
    }
}

/// One logit: its column and value.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct LogitEntry {
    /// The column (class).
    pub column: usize,
    /// The value, widened to `f64` (`"NaN"`, `"inf"`, `"-inf"` in JSON).
    #[serde(serialize_with = "json_f64::serialize")]
    pub value: f64,
}

/// The largest logits of one row, largest first (NaN first, then `+inf`, then by value).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TopLogits {
    /// The logits tensor's name.
    pub tensor: String,
    /// Its dtype.
    pub dtype: DType,
    /// The row shown.
    pub row: usize,
    /// How the row was chosen.
    pub chosen_by: RowChoice,
    /// Up to [`TOP_K`] entries, largest first.
    pub entries: Vec<LogitEntry>,
}

/// The largest logit of the whole logits tensor, against the naive-exp limit of its dtype.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LogitRange {
    /// The logits tensor's name.
    pub tensor: String,
    /// Its dtype.
    pub dtype: DType,
    /// The largest logit (NaN and `+inf` rank above every finite value); `None` when the tensor
    /// is empty.
    #[serde(serialize_with = "json_f64::serialize_option")]
    pub largest: Option<f64>,
    /// Its row.
    pub row: usize,
    /// Its column.
    pub column: usize,
    /// `ln(max)` of the dtype ([`DType::exp_overflow_threshold`]): a naive `exp` of anything
    /// larger is `inf`.
    pub naive_exp_threshold: f64,
    /// Whether the largest logit exceeds `naive_exp_threshold` (`+inf` does; NaN does not).
    pub exceeds_threshold: bool,
}

/// An entry where the given probabilities differ from the stable softmax of the logits in the
/// way a naive softmax does: NaN or `inf`, or exactly 0 where the stable value is a normal number
/// of the probabilities' dtype.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SoftmaxMismatch {
    /// The probabilities tensor's name.
    pub tensor: String,
    /// The row.
    pub row: usize,
    /// The column.
    pub column: usize,
    /// The logit there.
    #[serde(serialize_with = "json_f64::serialize")]
    pub logit: f64,
    /// The probability given.
    #[serde(serialize_with = "json_f64::serialize")]
    pub value: f64,
    /// The probability [`crate::softmax`] computes (in `f64`) from the same logits.
    pub expected: f64,
}

/// What [`triage`] found. `Display` is a multi-line, human-readable account that ends with what to
/// do; `Serialize` / [`TriageReport::to_json`] give the same content as JSON (non-finite values as
/// `"NaN"`, `"inf"`, `"-inf"`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TriageReport {
    /// How many tensors were examined.
    pub tensors: usize,
    /// The first entry of the first tensor (in the order given) that is non-finite; `None` for a
    /// healthy step.
    pub first_non_finite: Option<NonFiniteValue>,
    /// The names of all non-finite tensors, in the order given.
    pub non_finite_tensors: Vec<String>,
    /// The likely cause; `None` for a healthy step.
    pub cause: Option<Cause>,
    /// What to do about the cause; `None` for a healthy step.
    pub advice: Option<&'static str>,
    /// The facts behind the cause, one sentence each.
    pub evidence: Vec<String>,
    /// The top [`TOP_K`] logits of the row involved, when a logits tensor was given and a step is
    /// non-finite.
    pub top_logits: Option<TopLogits>,
    /// The largest logit against its dtype's naive-exp limit, when a logits tensor was given.
    pub logits: Option<LogitRange>,
    /// The first naive-softmax fingerprint found in the probabilities, if any.
    pub naive_softmax: Option<SoftmaxMismatch>,
}

impl TriageReport {
    /// Whether every tensor was finite.
    pub fn is_healthy(&self) -> bool {
        self.first_non_finite.is_none()
    }

    /// The report as pretty-printed JSON.
    ///
    /// # Panics
    /// Never: the report serializes without error (should `serde_json` ever fail, the result is
    /// a JSON object with an `"error"` field instead).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| {
            serde_json::json!({ "error": format!("cannot serialize the triage report: {e}") })
                .to_string()
        })
    }
}

/// Triage of one training step: `tensors` in forward/backward order (e.g. input, logits,
/// probabilities, loss, gradients).
///
/// A NaN loss says nothing about where the NaN came from. Hand [`triage`] the tensors of the
/// failing step in forward/backward order — input batch, logits, probabilities if the model
/// computes them, loss, gradients — and it reports the first tensor that holds a non-finite value
/// (with row, column and value), the top logits of the row involved, and the likely cause
/// ([`Cause`]) with the evidence and what to do about it.
///
/// ```
/// use lse::guard::{triage, Cause, Role, TensorView};
/// use lse::f16;
///
/// // f16 logits of 12 are finite, but a naive exp(12) = 162755 is not (f16 max 65504).
/// let logits: Vec<f16> = [12.0, 1.0, 0.0].iter().map(|&x| f16::from_f64(x)).collect();
/// let mut probs = vec![f16::ZERO; 3];
/// lse::naive::softmax(&logits, 3, &mut probs)?; // [NaN, 0, 0]
/// let report = triage(&[
///     TensorView::new("logits", Role::Logits, &logits, 3)?,
///     TensorView::new("probs", Role::Probabilities, &probs, 3)?,
/// ]);
/// assert_eq!(report.cause, Some(Cause::NaiveSoftmaxSignature));
/// println!("{report}");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// Finds the first tensor holding a non-finite value (`-inf` logits are masks, not faults; see
/// [`TensorView::first_non_finite`]) and decides the [`Cause`] by these rules, the first that
/// applies:
///
/// 1. the first non-finite tensor is an [`Role::Input`] → [`Cause::NonFiniteInput`];
/// 2. it is the [`Role::Logits`] (NaN or `+inf`) → [`Cause::LogitsOutOfRange`];
/// 3. it is the probabilities or a loss, and the probabilities differ from [`crate::softmax`] of
///    the logits by a naive-softmax fingerprint (see [`SoftmaxMismatch`]) →
///    [`Cause::NaiveSoftmaxSignature`];
/// 4. it is the probabilities or a loss, and the largest logit exceeds
///    [`DType::exp_overflow_threshold`] of the logits' dtype → [`Cause::LogitsOutOfRange`];
/// 5. it is a [`Role::Gradient`] and no loss is non-finite → [`Cause::GradientExploded`];
/// 6. otherwise → [`Cause::Unknown`].
///
/// The top logits come from the first [`Role::Logits`] tensor: the row of the first bad logit; for
/// another offender, the corresponding row when the shapes match (same rows for an input; one loss
/// per logits row; same rows and columns for probabilities and gradients); else the row of the
/// naive-softmax fingerprint; else the row holding the largest logit.
///
/// Cost: one pass over each tensor up to its first non-finite value, one over the logits, and, only
/// when needed, the softmax of the probability rows that hold a NaN, an `inf` or a zero.
pub fn triage(tensors: &[TensorView<'_>]) -> TriageReport {
    let faults: Vec<(usize, NonFiniteValue)> = tensors
        .iter()
        .enumerate()
        .filter_map(|(i, t)| t.first_non_finite().map(|f| (i, f)))
        .collect();
    let logits = tensors.iter().find(|t| t.role() == Role::Logits);
    let probs = tensors.iter().find(|t| t.role() == Role::Probabilities);
    let range = logits.map(logit_range);
    let non_finite_tensors = faults.iter().map(|(_, f)| f.tensor.clone()).collect();

    let Some((position, found)) = faults.first().cloned() else {
        return TriageReport {
            tensors: tensors.len(),
            first_non_finite: None,
            non_finite_tensors,
            cause: None,
            advice: None,
            evidence: Vec::new(),
            top_logits: None,
            logits: range,
            naive_softmax: None,
        };
    };
    let offender = &tensors[position];
    let logits_dtype = logits.map_or(DType::F64, |l| l.dtype());
    let logits_finite = logits.is_some_and(|l| l.first_non_finite().is_none());
    let downstream = matches!(
        offender.role(),
        Role::Probabilities | Role::Loss | Role::Gradient | Role::Other
    );
    let mismatch = match (logits, probs) {
        (Some(l), Some(p)) if logits_finite && downstream => naive_fingerprint(l, p),
        _ => None,
    };
    let loss_fault = faults
        .iter()
        .find(|(i, _)| tensors[*i].role() == Role::Loss)
        .map(|(_, f)| f);

    let mut evidence = vec![format!(
        "`{}` ({}, {}) is the first non-finite tensor: {} at row {}, column {}.",
        found.tensor, found.role, found.dtype, found.value, found.row, found.column
    )];
    let cause = match offender.role() {
        Role::Input => {
            evidence.push(
                "The input was non-finite before any layer ran; everything downstream inherits it."
                    .to_owned(),
            );
            Cause::NonFiniteInput
        }
        Role::Logits => {
            evidence.push(format!(
                "Every tensor before `{}` is finite: the logits overflowed upstream of the loss \
                 ({} holds at most {}).",
                found.tensor,
                found.dtype,
                fmt_value(found.dtype.max_value(), found.dtype)
            ));
            Cause::LogitsOutOfRange
        }
        Role::Probabilities | Role::Loss if mismatch.is_some() => {
            if let Some(m) = &mismatch {
                evidence.push(format!(
                    "`{}` holds {} at row {}, column {} (logit {}) where the stable softmax \
                     (lse::softmax) gives {}: exp(x)/sum(exp(x)) without the max shift.",
                    m.tensor,
                    m.value,
                    m.row,
                    m.column,
                    fmt_value(m.logit, logits_dtype),
                    fmt_value(m.expected, DType::F32)
                ));
            }
            if let Some(r) = range.as_ref().filter(|r| r.exceeds_threshold) {
                evidence.push(exceeds_sentence(r));
            }
            Cause::NaiveSoftmaxSignature
        }
        Role::Probabilities | Role::Loss
            if logits_finite && range.as_ref().is_some_and(|r| r.exceeds_threshold) =>
        {
            if let Some(r) = &range {
                evidence.push(exceeds_sentence(r));
            }
            Cause::LogitsOutOfRange
        }
        Role::Gradient if loss_fault.is_none() => {
            evidence.push(match tensors.iter().find(|t| t.role() == Role::Loss) {
                Some(l) => format!(
                    "The loss `{}` is finite{}; the backward pass produced the first \
                         non-finite value.",
                    l.name(),
                    l.get(0, 0)
                        .filter(|_| l.len() == 1)
                        .map(|v| format!(" ({})", fmt_value(v, l.dtype())))
                        .unwrap_or_default()
                ),
                None => "No loss tensor was given; every tensor before the gradient is finite."
                    .to_owned(),
            });
            Cause::GradientExploded
        }
        _ => {
            if let Some(r) = range.as_ref().filter(|r| r.exceeds_threshold) {
                evidence.push(exceeds_sentence(r));
            }
            Cause::Unknown
        }
    };

    let top_logits = logits.and_then(|l| {
        let (row, chosen_by) = offending_row(offender, &found, l, mismatch.as_ref(), &range)?;
        Some(TopLogits {
            tensor: l.name().to_owned(),
            dtype: l.dtype(),
            row,
            chosen_by,
            entries: top_k(&l.row(row)?),
        })
    });

    TriageReport {
        tensors: tensors.len(),
        first_non_finite: Some(found),
        non_finite_tensors,
        cause: Some(cause),
        advice: Some(cause.advice()),
        evidence,
        top_logits,
        logits: range,
        naive_softmax: mismatch,
    }
}

fn exceeds_sentence(r: &LogitRange) -> String {
    format!(
        "The largest logit, {} at row {}, column {} of `{}`, exceeds {}'s naive exp limit {:.2}: \
         exp of it is inf in {}.",
        fmt_value(r.largest.unwrap_or(f64::NAN), r.dtype),
        r.row,
        r.column,
        r.tensor,
        r.dtype,
        r.naive_exp_threshold,
        r.dtype
    )
}

/// The largest logit of `logits` against its dtype's naive-exp threshold.
fn logit_range(logits: &TensorView<'_>) -> LogitRange {
    let dtype = logits.dtype();
    let threshold = dtype.exp_overflow_threshold();
    let largest = logits.data().largest();
    let (index, value) = largest.map_or((0, None), |(i, v)| (i, Some(v)));
    LogitRange {
        tensor: logits.name().to_owned(),
        dtype,
        largest: value,
        row: index / logits.columns(),
        column: index % logits.columns(),
        naive_exp_threshold: threshold,
        exceeds_threshold: value.is_some_and(|v| v > threshold),
    }
}

/// The row of `logits` to show for the first fault `found` of `offender`.
fn offending_row(
    offender: &TensorView<'_>,
    found: &NonFiniteValue,
    logits: &TensorView<'_>,
    mismatch: Option<&SoftmaxMismatch>,
    range: &Option<LogitRange>,
) -> Option<(usize, RowChoice)> {
    let rows = logits.rows();
    let corresponding = match offender.role() {
        Role::Logits if offender.name() == logits.name() => {
            return Some((found.row, RowChoice::OffendingEntry))
        }
        Role::Input => (offender.rows() == rows).then_some(found.row),
        Role::Loss if offender.len() == rows => Some(found.index),
        Role::Loss => (offender.rows() == rows).then_some(found.row),
        _ => {
            (offender.rows() == rows && offender.columns() == logits.columns()).then_some(found.row)
        }
    };
    if let Some(row) = corresponding {
        return Some((row, RowChoice::CorrespondingRow));
    }
    if let Some(m) = mismatch {
        return Some((m.row, RowChoice::NaiveSoftmaxMismatch));
    }
    range
        .as_ref()
        .filter(|r| r.largest.is_some())
        .map(|r| (r.row, RowChoice::LargestLogit))
}

/// The [`TOP_K`] largest entries of `row`, largest first (NaN, then `+inf`, then by value).
fn top_k(row: &[f64]) -> Vec<LogitEntry> {
    let order = |a: &f64, b: &f64| {
        if ranks_above(*a, *b) {
            Ordering::Less
        } else if ranks_above(*b, *a) {
            Ordering::Greater
        } else {
            Ordering::Equal
        }
    };
    let mut entries: Vec<LogitEntry> = row
        .iter()
        .enumerate()
        .map(|(column, &value)| LogitEntry { column, value })
        .collect();
    entries.sort_by(|a, b| order(&a.value, &b.value));
    entries.truncate(TOP_K);
    entries
}

/// The first entry where `probs` shows the fingerprint of a naive softmax of `logits`.
fn naive_fingerprint(logits: &TensorView<'_>, probs: &TensorView<'_>) -> Option<SoftmaxMismatch> {
    if probs.columns() != logits.columns() || probs.len() != logits.len() {
        return None;
    }
    let columns = logits.columns();
    let tiny = probs.dtype().min_positive_normal();
    let mut expected = vec![0.0f64; columns];
    for row in 0..logits.rows() {
        let (x, p) = (logits.row(row)?, probs.row(row)?);
        let suspicious = x
            .iter()
            .zip(&p)
            .any(|(&xj, &pj)| xj.is_finite() && (!pj.is_finite() || pj == 0.0));
        if !suspicious || crate::softmax(&x, columns, &mut expected).is_err() {
            continue;
        }
        let hit = (0..columns).find(|&j| {
            x[j].is_finite()
                && expected[j].is_finite()
                && (!p[j].is_finite() || (p[j] == 0.0 && expected[j] >= tiny))
        });
        if let Some(column) = hit {
            return Some(SoftmaxMismatch {
                tensor: probs.name().to_owned(),
                row,
                column,
                logit: x[column],
                value: p[column],
                expected: expected[column],
            });
        }
    }
    None
}

impl fmt::Display for TriageReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(found) = &self.first_non_finite else {
            writeln!(
                f,
                "NaN triage: all {} tensors are finite (healthy step).",
                self.tensors
            )?;
            if let Some(r) = &self.logits {
                write_range(f, r)?;
            }
            return Ok(());
        };
        writeln!(
            f,
            "NaN triage: `{}` ({}, {}) went non-finite first: {} at row {}, column {}.",
            found.tensor, found.role, found.dtype, found.value, found.row, found.column
        )?;
        if self.non_finite_tensors.len() > 1 {
            writeln!(
                f,
                "Non-finite tensors, in order: {}.",
                self.non_finite_tensors.join(", ")
            )?;
        }
        if let Some(cause) = self.cause {
            writeln!(f, "Likely cause: {}.", cause.description())?;
        }
        for line in &self.evidence {
            writeln!(f, "  - {line}")?;
        }
        if let Some(top) = &self.top_logits {
            write!(
                f,
                "Top {} logits of `{}` ({}) row {} ({}):",
                top.entries.len(),
                top.tensor,
                top.dtype,
                top.row,
                top.chosen_by.describe()
            )?;
            for (i, e) in top.entries.iter().enumerate() {
                let sep = if i == 0 { " " } else { ", " };
                write!(f, "{sep}[{}] {}", e.column, fmt_value(e.value, top.dtype))?;
            }
            writeln!(f)?;
        }
        if let Some(r) = &self.logits {
            write_range(f, r)?;
        }
        if let Some(advice) = self.advice {
            writeln!(f, "What to do: {advice}")?;
        }
        Ok(())
    }
}

fn write_range(f: &mut fmt::Formatter<'_>, r: &LogitRange) -> fmt::Result {
    let Some(largest) = r.largest else {
        return writeln!(f, "Logits `{}` are empty.", r.tensor);
    };
    write!(
        f,
        "Largest logit of `{}`: {} at row {}, column {}",
        r.tensor,
        fmt_value(largest, r.dtype),
        r.row,
        r.column
    )?;
    if !largest.is_finite() {
        return writeln!(f, ".");
    }
    write!(
        f,
        "; {} naive exp limit {:.2}",
        r.dtype, r.naive_exp_threshold
    )?;
    if r.exceeds_threshold {
        writeln!(f, ": a naive softmax overflows here.")
    } else {
        writeln!(f, ".")
    }
}
