//! Printing numbers with exactly the digits their dtype needs, aligned tables that fit an
//! 80–100 column terminal, and wrapped paragraphs.

use lse::Element;

/// The width the output aims to stay within (a 100-column terminal, with a margin).
pub const WIDTH: usize = 96;

/// The shortest decimal that reads back (decimal → `f64` → `E`, correctly rounded) as exactly `v`:
/// `0.1` for the `f16` nearest 0.1, `6.1e-6`, `inf`, `-inf`, `NaN`.
pub fn shortest<E: Element>(v: E) -> String {
    let x = v.to_f64();
    if let Some(s) = special(x) {
        return s;
    }
    (1..=17)
        .map(|p| scientific(x, p))
        .find(|s| reads_back::<E>(s, v))
        .map_or_else(|| x.to_string(), |s| layout(&s))
}

/// Like [`shortest`], but where `v` is not exactly `input` (the value `v` was rounded from), with
/// enough digits to show that it differs: the `f16` nearest 0.1 prints as `0.09998`, not `0.1`.
pub fn distinguishing<E: Element>(v: E, input: f64) -> String {
    let x = v.to_f64();
    if x == input || special(x).is_some() {
        return shortest(v);
    }
    (1..=17)
        .map(|p| scientific(x, p))
        .find(|s| reads_back::<E>(s, v) && s.parse::<f64>().ok() != Some(input))
        .map_or_else(|| x.to_string(), |s| layout(&s))
}

fn special(x: f64) -> Option<String> {
    if x.is_nan() {
        Some("NaN".into())
    } else if x.is_infinite() {
        Some(if x > 0.0 { "inf" } else { "-inf" }.into())
    } else if x == 0.0 {
        Some(if x.is_sign_negative() { "-0" } else { "0" }.into())
    } else {
        None
    }
}

/// `x` in scientific notation with `p` significant digits (`1.25e3`).
fn scientific(x: f64, p: usize) -> String {
    format!("{:.*e}", p - 1, x)
}

fn reads_back<E: Element>(s: &str, v: E) -> bool {
    s.parse::<f64>().is_ok_and(|r| E::from_f64(r) == v)
}

/// Turns `d.ddde±x` into plain decimal notation for exponents in -4..=6, and into a compact
/// scientific form (`6.1e-6`, `1e10`) otherwise.
fn layout(sci: &str) -> String {
    let (mantissa, exp) = sci.split_once('e').expect("scientific notation");
    let exp: i32 = exp.parse().expect("integer exponent");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let digits = digits.trim_end_matches('0');
    let digits = if digits.is_empty() { "0" } else { digits };
    let body = if (-4..=6).contains(&exp) {
        if exp >= 0 {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                format!("{digits}{}", "0".repeat(int_len - digits.len()))
            } else {
                format!("{}.{}", &digits[..int_len], &digits[int_len..])
            }
        } else {
            format!("0.{}{digits}", "0".repeat((-exp - 1) as usize))
        }
    } else if digits.len() == 1 {
        format!("{digits}e{exp}")
    } else {
        format!("{}.{}e{exp}", &digits[..1], &digits[1..])
    };
    format!("{sign}{body}")
}

/// One cell of a table: its text and, optionally, why it is marked.
#[derive(Clone, Debug)]
pub struct Cell {
    /// The printed value.
    pub text: String,
    /// The marker it contributes to the end of its line (`overflow: inf`, `NaN`, …).
    pub mark: Option<&'static str>,
}

impl Cell {
    /// An unmarked cell.
    pub fn plain(text: String) -> Self {
        Cell { text, mark: None }
    }
}

/// A line of a [`Table`].
#[derive(Clone, Debug)]
pub enum Line {
    /// A label and one cell per column; the markers of its cells trail the line.
    Cells(String, Vec<Cell>),
    /// A label and one value, printed in the first column.
    Scalar(String, Cell),
    /// Free text, printed as is (under the first chunk of columns only).
    Text(String),
}

/// A table with one column per class: labels on the left, right-aligned values, and markers such
/// as `<- overflow: inf` at the end of a line. Too many columns for [`WIDTH`] are split into
/// chunks printed one after the other.
#[derive(Clone, Debug, Default)]
pub struct Table {
    /// The column headers.
    pub headers: Vec<String>,
    /// The header of the label column.
    pub corner: String,
    /// The lines, top to bottom.
    pub lines: Vec<Line>,
}

impl Table {
    /// Renders the table with `indent` spaces before every line.
    pub fn render(&self, indent: usize, out: &mut String) {
        let pad = " ".repeat(indent);
        let label_width = self
            .lines
            .iter()
            .filter_map(|l| match l {
                Line::Cells(label, _) | Line::Scalar(label, _) => Some(label.len()),
                Line::Text(_) => None,
            })
            .chain([self.corner.len()])
            .max()
            .unwrap_or(0);
        let columns = self.headers.len();
        // Each column as wide as its widest value, plus two spaces.
        let widths: Vec<usize> = (0..columns)
            .map(|j| {
                let cells = self.lines.iter().filter_map(|l| match l {
                    Line::Cells(_, cells) => cells.get(j),
                    Line::Scalar(_, c) if j == 0 => Some(c),
                    _ => None,
                });
                cells
                    .map(|c| c.text.len())
                    .chain([self.headers[j].len()])
                    .max()
                    .unwrap_or(1)
                    + 2
            })
            .collect();
        // Consecutive columns that fit beside the labels (at least one per chunk).
        let room = WIDTH.saturating_sub(indent + label_width);
        let mut chunks = Vec::new();
        let mut start = 0;
        while start < columns {
            let mut end = start + 1;
            let mut used = widths[start];
            while end < columns && used + widths[end] <= room {
                used += widths[end];
                end += 1;
            }
            chunks.push(start..end);
            start = end;
        }
        if chunks.is_empty() {
            chunks.push(0..0);
        }
        for (chunk, range) in chunks.into_iter().enumerate() {
            let (start, end) = (range.start, range.end);
            if chunk > 0 {
                out.push('\n');
            }
            let mut header = format!("{pad}{:<label_width$}", self.corner);
            for (h, w) in self.headers[start..end].iter().zip(&widths[start..end]) {
                header.push_str(&format!("{h:>w$}"));
            }
            push_line(out, &header);
            for line in &self.lines {
                match line {
                    Line::Cells(label, cells) => {
                        let cells = &cells[start.min(cells.len())..end.min(cells.len())];
                        let mut s = format!("{pad}{label:<label_width$}");
                        for (c, w) in cells.iter().zip(&widths[start..end]) {
                            s.push_str(&format!("{:>w$}", c.text));
                        }
                        let marks = marks(cells.iter().filter_map(|c| c.mark));
                        if !marks.is_empty() {
                            s.push_str(&format!("   <- {marks}"));
                        }
                        push_line(out, &s);
                    }
                    Line::Scalar(label, c) if chunk == 0 => {
                        let w = widths.first().copied().unwrap_or(0);
                        let mut s = format!("{pad}{label:<label_width$}{:>w$}", c.text);
                        if let Some(m) = c.mark {
                            s.push_str(&format!("   <- {m}"));
                        }
                        push_line(out, &s);
                    }
                    Line::Text(text) if chunk == 0 => push_line(out, &format!("{pad}{text}")),
                    Line::Scalar(..) | Line::Text(_) => {}
                }
            }
        }
    }
}

/// The distinct markers, in the order they first appear, joined with `, `.
fn marks<'a>(all: impl Iterator<Item = &'a str>) -> String {
    let mut seen: Vec<&str> = Vec::new();
    for m in all {
        if !seen.contains(&m) {
            seen.push(m);
        }
    }
    seen.join(", ")
}

fn push_line(out: &mut String, line: &str) {
    out.push_str(line.trim_end());
    out.push('\n');
}

/// `text` wrapped at word boundaries to [`WIDTH`] columns; the first line is indented by `indent`
/// spaces, the others by `hang`.
pub fn wrap(text: &str, indent: usize, hang: usize) -> String {
    let mut out = String::new();
    let mut line = " ".repeat(indent);
    for word in text.split_whitespace() {
        if !line.trim().is_empty() && line.len() + 1 + word.len() > WIDTH {
            out.push_str(&line);
            out.push('\n');
            line = " ".repeat(hang);
        } else if !line.trim().is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    out.push_str(&line);
    out.push('\n');
    out
}

/// `"row 2"`, `"rows 1, 3"` (1-based) for a set of 0-based row indices.
pub fn rows(indices: impl IntoIterator<Item = usize>) -> String {
    let v: Vec<String> = indices.into_iter().map(|r| (r + 1).to_string()).collect();
    match v.len() {
        1 => format!("row {}", v[0]),
        _ => format!("rows {}", v.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lse::{bf16, f16};

    #[test]
    fn shortest_uses_the_dtype_precision() {
        assert_eq!(shortest(f16::from_f32(0.1)), "0.1");
        assert_eq!(shortest(0.1f32), "0.1");
        assert_eq!(shortest(0.1f64), "0.1");
        assert_eq!(shortest(1.0f64 / 3.0), "0.3333333333333333");
        assert_eq!(shortest(f16::MAX), "65500");
        assert_eq!(shortest(f16::from_f32(6.1035e-5)), "6.104e-5");
        assert_eq!(shortest(1e10f64), "1e10");
        assert_eq!(shortest(-1000.0f32), "-1000");
        assert_eq!(shortest(0.00025f32), "0.00025");
        assert_eq!(shortest(f32::INFINITY), "inf");
        assert_eq!(shortest(f64::NEG_INFINITY), "-inf");
        assert_eq!(shortest(f32::NAN), "NaN");
        assert_eq!(shortest(bf16::from_f32(1000.0)), "1000");
        assert_eq!(shortest(-0.0f64), "-0");
        for &v in &[0.1f64, 1.0 / 3.0, 6.02e23, 5e-324, 123456.789, -2.5e-7] {
            assert_eq!(shortest(v).parse::<f64>().unwrap(), v);
        }
    }

    #[test]
    fn distinguishing_shows_rounding() {
        let v = <f16 as Element>::from_f64(0.1);
        assert_eq!(distinguishing(v, 0.1), "0.09998");
        assert_eq!(distinguishing(v, v.to_f64()), "0.1");
        assert_eq!(distinguishing(<f16 as Element>::from_f64(1e5), 1e5), "inf");
        assert_eq!(distinguishing(2.0f32, 2.0), "2");
        let w = <bf16 as Element>::from_f64(0.1);
        assert_eq!(distinguishing(w, 0.1), "0.1001");
    }

    #[test]
    fn tables_align_and_mark() {
        let table = Table {
            corner: "i".into(),
            headers: vec!["0".into(), "1".into()],
            lines: vec![
                Line::Cells(
                    "exp(x)".into(),
                    vec![
                        Cell {
                            text: "inf".into(),
                            mark: Some("overflow: inf"),
                        },
                        Cell::plain("2.719".into()),
                    ],
                ),
                Line::Scalar("logsumexp".into(), Cell::plain("1000".into())),
            ],
        };
        let mut out = String::new();
        table.render(2, &mut out);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "  i             0      1");
        assert_eq!(lines[1], "  exp(x)      inf  2.719   <- overflow: inf");
        assert_eq!(lines[2], "  logsumexp  1000");
        // Too many columns for one line: chunks of columns, scalars and text in the first only.
        let wide = Table {
            corner: "i".into(),
            headers: (0..30).map(|i| i.to_string()).collect(),
            lines: vec![
                Line::Cells(
                    "x".into(),
                    (0..30).map(|i| Cell::plain(format!("{i}.5"))).collect(),
                ),
                Line::Scalar("m".into(), Cell::plain("29.5".into())),
            ],
        };
        let mut out = String::new();
        wide.render(2, &mut out);
        assert!(out.lines().all(|l| l.len() <= WIDTH), "{out}");
        assert_eq!(out.matches("29.5").count(), 2, "{out}");
        assert_eq!(out.matches("  m ").count(), 1, "{out}");
        assert!(out.lines().filter(|l| l.starts_with("  i ")).count() >= 2);
    }

    #[test]
    fn wrapping_and_row_lists() {
        let text = "word ".repeat(40);
        let wrapped = wrap(&text, 2, 4);
        assert!(wrapped.lines().all(|l| l.len() <= WIDTH));
        assert!(wrapped.starts_with("  word"));
        assert!(wrapped.lines().nth(1).unwrap().starts_with("    word"));
        assert_eq!(rows([1]), "row 2");
        assert_eq!(rows([0, 2]), "rows 1, 3");
    }
}
