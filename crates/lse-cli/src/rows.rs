//! Logits given on the command line: one row per argument, comma-separated.

use crate::error::{CliError, Result};

/// One row of logits as typed and as `f64` (which holds every input exactly enough: the values are
/// then rounded once into each dtype).
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// The numbers as written (`1e5`, `-inf`).
    pub text: Vec<String>,
    /// The numbers parsed.
    pub values: Vec<f64>,
}

/// Parses rows such as `2,1,0.1` or `-1000,inf,nan` (`inf`, `-inf`, `nan`, `infinity` in any
/// case; spaces around numbers allowed). Every row must have the same, non-zero, length.
///
/// # Errors
/// A one-line [`CliError::Usage`] naming the row and the value that is wrong.
pub fn parse_rows(args: &[String]) -> Result<Vec<Row>> {
    let rows = args
        .iter()
        .enumerate()
        .map(|(r, arg)| parse_row(r, arg))
        .collect::<Result<Vec<_>>>()?;
    if let Some(first) = rows.first() {
        if let Some((r, row)) = rows
            .iter()
            .enumerate()
            .find(|(_, row)| row.values.len() != first.values.len())
        {
            return Err(CliError::usage(format!(
                "rows must all have the same length: row 1 has {} values, row {} ({:?}) has {}",
                first.values.len(),
                r + 1,
                args[r],
                row.values.len()
            )));
        }
    }
    Ok(rows)
}

fn parse_row(r: usize, arg: &str) -> Result<Row> {
    if arg.trim().is_empty() {
        return Err(CliError::usage(format!("row {} is empty", r + 1)));
    }
    let mut row = Row {
        text: Vec::new(),
        values: Vec::new(),
    };
    for (c, field) in arg.split(',').enumerate() {
        let field = field.trim();
        let value = field.parse::<f64>().map_err(|_| {
            let hint = if field.starts_with("--") {
                " (an unknown option?)"
            } else {
                ""
            };
            CliError::usage(format!(
                "row {} ({arg:?}), value {}: cannot parse {field:?} as a number{hint}",
                r + 1,
                c + 1
            ))
        })?;
        row.text.push(field.to_owned());
        row.values.push(value);
    }
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn parses_numbers_and_specials() {
        let rows = parse_rows(&args(&["2, 1,0.1", "-1000,inf,NaN", "1e5,-inf,-0"])).unwrap();
        assert_eq!(rows[0].values, [2.0, 1.0, 0.1]);
        assert_eq!(rows[1].values[0], -1000.0);
        assert_eq!(rows[1].values[1], f64::INFINITY);
        assert!(rows[1].values[2].is_nan());
        assert_eq!(rows[2].values[1], f64::NEG_INFINITY);
        assert_eq!(rows[2].text, ["1e5", "-inf", "-0"]);
    }

    #[test]
    fn rejects_bad_rows() {
        for bad in [&["1,2", "3"][..], &["1,x"], &["1,,2"], &[""]] {
            let e = parse_rows(&args(bad)).unwrap_err().to_string();
            assert!(!e.contains('\n'), "{e}");
        }
        assert!(parse_rows(&args(&["1,2", "3"]))
            .unwrap_err()
            .to_string()
            .contains("same length"));
    }
}
