//! Choosing dtypes on the command line and running generic code once per dtype.

use lse::{bf16, f16, DType, Element};

/// The value of a `--dtype` option: one dtype or all four.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DTypeSelection {
    /// `all`: every dtype, widest first.
    All,
    /// One dtype.
    One(DType),
}

impl DTypeSelection {
    /// The selected dtypes, widest first.
    pub fn dtypes(self) -> Vec<DType> {
        match self {
            DTypeSelection::All => DType::ALL.to_vec(),
            DTypeSelection::One(d) => vec![d],
        }
    }
}

/// The clap value parser of `--dtype` (`f64`, `f32`, `f16`, `bf16` or `all`, any case).
pub fn parse_selection(s: &str) -> Result<DTypeSelection, String> {
    if s.eq_ignore_ascii_case("all") {
        return Ok(DTypeSelection::All);
    }
    s.parse::<DType>()
        .map(DTypeSelection::One)
        .map_err(|_| format!("unknown dtype {s:?}: expected one of f64, f32, f16, bf16, all"))
}

/// A computation written once, generically over the element type, and run for a runtime
/// [`DType`] by [`dispatch`].
pub trait PerDType {
    /// What the computation returns.
    type Output;
    /// Runs the computation for the element type `E`.
    fn run<E: Element>(self) -> Self::Output;
}

/// Runs `job` with the element type named by `dtype`: the only place that maps a runtime dtype to
/// a Rust type.
pub fn dispatch<J: PerDType>(dtype: DType, job: J) -> J::Output {
    match dtype {
        DType::F64 => job.run::<f64>(),
        DType::F32 => job.run::<f32>(),
        DType::F16 => job.run::<f16>(),
        DType::BF16 => job.run::<bf16>(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selections_parse() {
        assert_eq!(parse_selection("ALL"), Ok(DTypeSelection::All));
        assert_eq!(
            parse_selection("bf16"),
            Ok(DTypeSelection::One(DType::BF16))
        );
        assert!(parse_selection("f8").unwrap_err().contains("f8"));
        assert_eq!(DTypeSelection::All.dtypes(), DType::ALL.to_vec());
    }

    #[test]
    fn dispatch_picks_the_type() {
        struct Name;
        impl PerDType for Name {
            type Output = DType;
            fn run<E: Element>(self) -> DType {
                E::DTYPE
            }
        }
        for d in DType::ALL {
            assert_eq!(dispatch(d, Name), d);
        }
    }
}
