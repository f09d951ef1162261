//! `lse explain`: one table per dtype and row that puts the textbook softmax next to the stable
//! one, number by number, and marks where the textbook one breaks.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use lse::{CrossEntropyOptions, DType, Element, NonFinite, Reduction, Targets};

use crate::dtype::{dispatch, parse_selection, DTypeSelection, PerDType};
use crate::error::Result;
use crate::format::{distinguishing, rows as row_list, shortest, wrap, Cell, Line, Table};
use crate::rows::{parse_rows, Row};

/// The rows shown when none are given: an ordinary row, one that overflows a naive softmax in
/// every dtype, and a small one.
pub const DEFAULT_ROWS: [&str; 3] = ["2,1,0.1", "1000,1,-1000", "3,2,1"];

/// The long help of `lse explain`.
pub const LONG_ABOUT: &str = "\
Show, number by number, where the textbook softmax breaks and the stable one does not.

Each row of logits is rounded into each dtype and pushed through two implementations:

  naive   exp(x_i) / sum_j exp(x_j), -log of that for the cross-entropy, every operation
          rounded to the dtype, as a hand-written training loop computes it;
  stable  the lse library: shift by the row max m, sum exp(x_j - m) (every term <= 1) and use
          log1p, so finite logits give finite results.

For every dtype and row the table shows the logits as stored in the dtype (with a note where
rounding changed them, e.g. 1e5 is inf in f16), the naive exp(x), the shifted exp(x - m), the
naive softmax, cross-entropy CE(y) = -log softmax(x)_y for every target class y (column y) and
logsumexp, then the stable softmax, log_softmax, CE(y) and logsumexp. A naive value is marked
at the end of its line ('<- overflow: inf', '<- NaN', '<- underflow: 0') where it is inf, NaN,
or 0 and the stable value is not. A summary per dtype closes the output.

The stable ops reject NaN and +inf logits by default; here they are run with
NonFinite::Propagate so that such rows still print (as NaN).";

/// Examples, after the help of `lse explain`.
pub const AFTER_HELP: &str = "\
Examples:
  lse explain                              the default rows, every dtype
  lse explain --dtype f16 12,0             exp(12) already overflows f16
  lse explain 1000,999 -1000,-1000         overflow, and underflow of every exp to 0
  lse explain --dtype bf16 2,1,0.1 1e5,0   rounding into bf16";

/// Arguments of `lse explain`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Rows of logits, one per argument, comma-separated (e.g. 2,1,0.1 -1000,1,inf); all rows
    /// must have the same length. Default: 2,1,0.1 1000,1,-1000 3,2,1
    #[arg(value_name = "LOGITS", allow_hyphen_values = true)]
    pub logits: Vec<String>,

    /// The dtype to compute in: f64, f32, f16, bf16, or all (widest first)
    #[arg(
        long,
        short,
        value_name = "DTYPE",
        default_value = "all",
        value_parser = parse_selection
    )]
    pub dtype: DTypeSelection,
}

/// Runs `lse explain`, appending its report to `out`.
///
/// # Errors
/// A usage error for unparsable or ragged rows; library errors are not expected (the stable ops
/// run with [`NonFinite::Propagate`]) but are passed on rather than unwrapped.
pub fn run(args: &Args, out: &mut String) -> Result<()> {
    let texts: Vec<String> = if args.logits.is_empty() {
        DEFAULT_ROWS.iter().map(|s| (*s).to_owned()).collect()
    } else {
        args.logits.clone()
    };
    let rows = parse_rows(&texts)?;
    out.push_str(&wrap(
        "Naive softmax (exp(x) / sum exp(x), every operation rounded to the dtype) next to the \
         stable one of the lse library. m = max(x). Column i is class i; in the CE(y) lines it \
         is the target y, with CE(y) = -log softmax(x)_y. '<-' marks a naive value that is inf, \
         NaN or 0 where the stable value is not.",
        0,
        0,
    ));
    let mut summary = Vec::new();
    for dtype in args.dtype.dtypes() {
        out.push('\n');
        let findings = dispatch(dtype, Explain { rows: &rows, out })?;
        summary.push(findings.sentence(dtype));
    }
    out.push_str("\nSummary:\n");
    for sentence in summary {
        out.push_str(&wrap(&sentence, 2, 4));
    }
    Ok(())
}

/// What went wrong in one dtype, row by row (0-based row indices).
#[derive(Debug, Default)]
struct Findings {
    /// Finite logits that became ±inf when rounded into the dtype.
    to_inf: BTreeSet<usize>,
    /// Nonzero logits that became 0.
    to_zero: BTreeSet<usize>,
    /// Naive exp overflowed (and the shifted one did not).
    exp_overflow: BTreeSet<usize>,
    /// Naive exp underflowed to 0 (and the shifted one did not).
    exp_underflow: BTreeSet<usize>,
    /// Per naive quantity: the marks seen and the rows they were seen in.
    naive: [(&'static str, Vec<&'static str>, BTreeSet<usize>); 3],
    /// Rows with a non-finite logit after rounding.
    non_finite_input: BTreeSet<usize>,
    /// Rows of finite logits where a stable result is not finite (never expected).
    stable_broken: BTreeSet<usize>,
}

const SOFTMAX: usize = 0;
const CE: usize = 1;
const LOGSUMEXP: usize = 2;

const OVERFLOW: &str = "overflow: inf";
const NEG_OVERFLOW: &str = "overflow: -inf";
const NEG_UNDERFLOW: &str = "underflow: -inf";
const UNDERFLOW: &str = "underflow: 0";
const NAN: &str = "NaN";

impl Findings {
    fn new() -> Self {
        Findings {
            naive: [
                ("softmax", Vec::new(), BTreeSet::new()),
                ("CE(y)", Vec::new(), BTreeSet::new()),
                ("logsumexp", Vec::new(), BTreeSet::new()),
            ],
            ..Findings::default()
        }
    }

    /// Records the marks of one naive quantity in row `r`.
    fn naive(&mut self, quantity: usize, r: usize, cells: &[Cell]) {
        let (_, marks, rows) = &mut self.naive[quantity];
        for m in cells.iter().filter_map(|c| c.mark) {
            if !marks.contains(&m) {
                marks.push(m);
            }
            rows.insert(r);
        }
    }

    /// One sentence: what went wrong in `dtype`, naive then stable.
    fn sentence(&self, dtype: DType) -> String {
        let mut parts = Vec::new();
        if !self.to_inf.is_empty() {
            parts.push(format!(
                "logits beyond ±{} become ±inf in {dtype} ({})",
                approx(dtype.max_value()),
                row_list(self.to_inf.iter().copied())
            ));
        }
        if !self.to_zero.is_empty() {
            parts.push(format!(
                "nonzero logits round to 0 in {dtype} ({})",
                row_list(self.to_zero.iter().copied())
            ));
        }
        if !self.exp_overflow.is_empty() {
            parts.push(format!(
                "naive exp overflows for logits > {:.2} ({})",
                dtype.exp_overflow_threshold(),
                row_list(self.exp_overflow.iter().copied())
            ));
        }
        if !self.exp_underflow.is_empty() {
            parts.push(format!(
                "naive exp underflows to 0 where exp(x - m) does not ({})",
                row_list(self.exp_underflow.iter().copied())
            ));
        }
        let broken: Vec<_> = self.naive.iter().filter(|q| !q.2.is_empty()).collect();
        if !broken.is_empty() {
            let same_rows = broken.iter().all(|q| q.2 == broken[0].2);
            let items: Vec<String> = broken
                .iter()
                .map(|(name, marks, rows)| {
                    let what: Vec<&str> = marks.iter().map(|m| short_mark(m)).collect();
                    let what = what.join(" and ");
                    if same_rows {
                        format!("{name} {what}")
                    } else {
                        format!("{name} {what} ({})", row_list(rows.iter().copied()))
                    }
                })
                .collect();
            let mut text = format!("naive {}", items.join(", "));
            if same_rows {
                let _ = write!(text, " ({})", row_list(broken[0].2.iter().copied()));
            }
            parts.push(text);
        }
        if parts.is_empty() {
            parts.push("naive and stable agree (no overflow, underflow or NaN)".to_owned());
        }
        let stable = if !self.stable_broken.is_empty() {
            format!(
                "stable results NOT finite in {} of finite logits (unexpected: a bug in lse)",
                row_list(self.stable_broken.iter().copied())
            )
        } else if !self.non_finite_input.is_empty() {
            let verb = if self.non_finite_input.len() == 1 {
                "holds"
            } else {
                "hold"
            };
            format!(
                "stable results finite on every row of finite logits; {} {verb} inf or NaN in \
                 {dtype}, which lse rejects by default (NaN, +inf; shown propagated) or treats \
                 as a mask (-inf)",
                row_list(self.non_finite_input.iter().copied())
            )
        } else {
            "stable results finite everywhere".to_owned()
        };
        format!("{dtype}: {}; {stable}.", parts.join("; "))
    }
}

fn short_mark(mark: &str) -> &str {
    match mark {
        OVERFLOW => "inf",
        NEG_OVERFLOW | NEG_UNDERFLOW => "-inf",
        UNDERFLOW => "0 where the stable value is not",
        other => other,
    }
}

/// The mark of a naive value next to its stable counterpart: set where the naive value is NaN,
/// ±inf or 0 and the stable one is not.
fn mark(naive: f64, stable: f64) -> Option<&'static str> {
    if stable.is_nan() {
        None
    } else if naive.is_nan() {
        Some(NAN)
    } else if naive == f64::INFINITY && stable != naive {
        Some(OVERFLOW)
    } else if naive == f64::NEG_INFINITY && stable != naive {
        Some(NEG_UNDERFLOW)
    } else if naive == 0.0 && stable != 0.0 {
        Some(UNDERFLOW)
    } else {
        None
    }
}

/// Naive values as cells, each marked against its stable counterpart.
fn marked<E: Element, S: Element>(naive: &[E], stable: &[S]) -> Vec<Cell> {
    naive
        .iter()
        .zip(stable)
        .map(|(&n, &s)| Cell {
            text: shortest(n),
            mark: mark(n.to_f64(), s.to_f64()),
        })
        .collect()
}

fn plain<E: Element>(values: &[E]) -> Vec<Cell> {
    values.iter().map(|&v| Cell::plain(shortest(v))).collect()
}

/// The part of `lse explain` that is generic over the dtype.
struct Explain<'a> {
    rows: &'a [Row],
    out: &'a mut String,
}

impl PerDType for Explain<'_> {
    type Output = Result<Findings>;

    fn run<E: Element>(self) -> Result<Findings> {
        let dtype = E::DTYPE;
        let stat = <E::Stat as Element>::DTYPE;
        let mut header = format!(
            "== {dtype} ==  max {}; naive exp(x) is inf for x > {:.2}",
            approx(dtype.max_value()),
            dtype.exp_overflow_threshold()
        );
        if stat != dtype {
            let _ = write!(header, "; logsumexp and CE in {stat}");
        }
        self.out.push_str(&header);
        self.out.push('\n');
        let mut findings = Findings::new();
        for (r, row) in self.rows.iter().enumerate() {
            self.out.push('\n');
            explain_row::<E>(r, self.rows.len(), row, &mut findings, self.out)?;
        }
        Ok(findings)
    }
}

/// The table of one row in the dtype `E`.
fn explain_row<E: Element>(
    r: usize,
    rows: usize,
    row: &Row,
    findings: &mut Findings,
    out: &mut String,
) -> Result<()> {
    let n = row.values.len();
    let dtype = E::DTYPE;
    let stat = <E::Stat as Element>::DTYPE;
    let x: Vec<E> = row.values.iter().map(|&v| E::from_f64(v)).collect();
    let m = x
        .iter()
        .map(|v| v.to_f64())
        .fold(f64::NEG_INFINITY, f64::max);

    // The textbook formulas, every operation rounded to `E`.
    let exp: Vec<E> = x.iter().map(|&v| lse::naive::exp(v)).collect();
    let shifted: Vec<E> = x
        .iter()
        .map(|&v| lse::naive::exp(E::from_f64(v.to_f64() - m)))
        .collect();
    let mut naive_p = vec![E::zero(); n];
    lse::naive::softmax(&x, n, &mut naive_p)?;
    let mut naive_lse = [E::zero()];
    lse::naive::logsumexp(&x, n, &mut naive_lse)?;
    let mut naive_ce = vec![E::zero(); n];
    let mut grad = vec![E::zero(); n];
    for (y, loss) in naive_ce.chunks_exact_mut(1).enumerate() {
        lse::naive::cross_entropy(&x, n, &[y as i64], loss, &mut grad)?;
    }

    // The library, propagating NaN and +inf instead of rejecting them so that every row prints.
    let mut p = vec![E::zero(); n];
    lse::softmax_with(&x, n, &mut p, NonFinite::Propagate)?;
    let mut log_p = vec![E::zero(); n];
    lse::log_softmax_with(&x, n, &mut log_p, NonFinite::Propagate)?;
    let mut stable_lse = [<E::Stat as Element>::zero()];
    lse::logsumexp_with(&x, n, &mut stable_lse, NonFinite::Propagate)?;
    // One copy of the row per target class: the loss of target y is row y's loss.
    let copies = x.repeat(n);
    let targets: Vec<i64> = (0..n as i64).collect();
    let options = CrossEntropyOptions {
        reduction: Reduction::None,
        keep_row_loss: true,
        non_finite: NonFinite::Propagate,
        ..CrossEntropyOptions::default()
    };
    let stable_ce = lse::cross_entropy(&copies, n, Targets::Classes(&targets), &options)?
        .row_loss
        .unwrap_or_default();

    // The logits as stored in `E`, and what rounding did to them.
    let mut x_cells = Vec::with_capacity(n);
    let mut notes = Vec::new();
    for (i, (&v, (&input, text))) in x.iter().zip(row.values.iter().zip(&row.text)).enumerate() {
        let stored = v.to_f64();
        let mark = if input.is_finite() && stored.is_infinite() {
            findings.to_inf.insert(r);
            notes.push(format!(
                "x[{i}] = {text} is beyond the {dtype} range (max {}): it becomes {}",
                approx(dtype.max_value()),
                shortest(v)
            ));
            Some(if stored > 0.0 { OVERFLOW } else { NEG_OVERFLOW })
        } else if input != 0.0 && stored == 0.0 {
            findings.to_zero.insert(r);
            notes.push(format!(
                "x[{i}] = {text} is below the smallest {dtype}: it becomes 0"
            ));
            Some(UNDERFLOW)
        } else {
            if input.is_finite() && stored != input {
                notes.push(format!(
                    "x[{i}] = {text} is not exactly representable in {dtype}: it rounds to {}",
                    distinguishing(v, input)
                ));
            }
            None
        };
        x_cells.push(Cell {
            text: distinguishing(v, input),
            mark,
        });
    }
    const MAX_NOTES: usize = 4;
    if notes.len() > MAX_NOTES {
        let more = notes.len() - (MAX_NOTES - 1);
        notes.truncate(MAX_NOTES - 1);
        notes.push(format!("... and {more} more rounded values"));
    }

    let exp_cells = marked(&exp, &shifted);
    if exp_cells.iter().any(|c| c.mark == Some(OVERFLOW)) {
        findings.exp_overflow.insert(r);
    }
    if exp_cells.iter().any(|c| c.mark == Some(UNDERFLOW)) {
        findings.exp_underflow.insert(r);
    }
    let p_cells = marked(&naive_p, &p);
    findings.naive(SOFTMAX, r, &p_cells);
    let ce_cells = marked(&naive_ce, &stable_ce);
    findings.naive(CE, r, &ce_cells);
    let lse_cell = marked(&naive_lse, &stable_lse).remove(0);
    findings.naive(LOGSUMEXP, r, std::slice::from_ref(&lse_cell));

    if x.iter().any(|v| !v.to_f64().is_finite()) {
        findings.non_finite_input.insert(r);
    } else {
        let stable = p.iter().chain(&log_p).map(|v| v.to_f64());
        let stats = stable_ce.iter().chain(&stable_lse).map(|v| v.to_f64());
        if stable.chain(stats).any(|v| !v.is_finite()) {
            findings.stable_broken.insert(r);
        }
    }

    let tag = if stat == dtype {
        String::new()
    } else {
        format!(" [{stat}]")
    };
    let mut lines = vec![Line::Cells(format!("x in {dtype}"), x_cells)];
    lines.extend(notes.into_iter().map(|s| Line::Text(format!("  {s}"))));
    lines.extend([
        Line::Cells("naive exp(x)".into(), exp_cells),
        Line::Cells("shifted exp(x - m)".into(), plain(&shifted)),
        Line::Cells("naive softmax".into(), p_cells),
        Line::Cells("naive CE(y)".into(), ce_cells),
        Line::Scalar("naive logsumexp".into(), lse_cell),
        Line::Cells("stable softmax".into(), plain(&p)),
        Line::Cells("stable log_softmax".into(), plain(&log_p)),
        Line::Cells(format!("stable CE(y){tag}"), plain(&stable_ce)),
        Line::Scalar(
            format!("stable logsumexp{tag}"),
            Cell::plain(shortest(stable_lse[0])),
        ),
    ]);
    let table = Table {
        corner: "i".into(),
        headers: (0..n).map(|i| i.to_string()).collect(),
        lines,
    };
    let _ = writeln!(
        out,
        "row {}/{rows}: [{}]   m = max(x) = {}",
        r + 1,
        abbreviate(&row.text.join(", "), 60),
        shortest(E::from_f64(m))
    );
    table.render(2, out);
    Ok(())
}

/// A large bound for people: `65504`, `3.40e38`.
fn approx(v: f64) -> String {
    if v.abs() < 1e6 {
        shortest(v)
    } else {
        format!("{v:.2e}")
    }
}

/// `text`, cut to at most `max` characters with `...` where it was cut.
fn abbreviate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let head: String = text.chars().take(max.saturating_sub(3)).collect();
        format!("{head}...")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_only_where_naive_breaks_and_stable_does_not() {
        assert_eq!(mark(f64::INFINITY, 1000.0), Some(OVERFLOW));
        assert_eq!(mark(f64::NAN, 1.0), Some(NAN));
        assert_eq!(mark(0.0, 6.1e-6), Some(UNDERFLOW));
        assert_eq!(mark(f64::NEG_INFINITY, -999.3), Some(NEG_UNDERFLOW));
        assert_eq!(mark(0.0, 0.0), None);
        assert_eq!(mark(f64::NAN, f64::NAN), None);
        assert_eq!(mark(f64::NEG_INFINITY, f64::NEG_INFINITY), None);
        assert_eq!(mark(0.5, 0.5), None);
    }

    #[test]
    fn abbreviates_long_rows() {
        assert_eq!(abbreviate("1, 2", 60), "1, 2");
        assert_eq!(abbreviate(&"9".repeat(100), 10), "9999999...");
    }
}
