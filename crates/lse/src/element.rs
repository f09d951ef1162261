//! The dtypes `lse` works on, behind one [`Element`] trait.
//!
//! Kernels widen every element to `f64`, compute there, and round the result once into the output
//! dtype. The trait therefore only needs to say how to widen, how to round back, and which dtype
//! holds the statistics (loss, logsumexp) of a row.

use core::fmt;
use core::str::FromStr;

use half::{bf16, f16};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f64 {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// The floating-point dtypes `lse` accepts: `f64`, `f32`, [`half::f16`] and [`half::bf16`].
///
/// The trait is sealed: the numerics of every op are tested for exactly these four types.
pub trait Element:
    Copy + Send + Sync + PartialEq + PartialOrd + fmt::Debug + fmt::Display + 'static + sealed::Sealed
{
    /// The dtype of per-row statistics (logsumexp, loss): `f64` for `f64` input, `f32` otherwise.
    type Stat: Stat;

    /// The runtime tag of this type.
    const DTYPE: DType;

    /// The largest finite value of the type.
    const MAX: Self;

    /// The value widened to `f64` (exact for every supported type).
    fn to_f64(self) -> f64;

    /// `value` rounded to the nearest representable value, ties to even; rounds exactly once.
    fn from_f64(value: f64) -> Self;

    /// Like [`Element::from_f64`], but a finite `value` beyond the type's range becomes `±MAX`
    /// instead of `±inf`.
    ///
    /// Used for results whose exact value is finite but larger than the dtype can hold (the
    /// log-softmax of `-MAX` next to `+MAX`): the output stays finite, as the contract promises.
    #[inline]
    fn from_f64_saturating(value: f64) -> Self {
        let max = Self::MAX.to_f64();
        if value.is_finite() {
            Self::from_f64(value.clamp(-max, max))
        } else {
            Self::from_f64(value)
        }
    }

    /// Positive zero.
    #[inline]
    fn zero() -> Self {
        Self::from_f64(0.0)
    }
}

/// The dtypes of statistics: `f32` and `f64`.
pub trait Stat: Element<Stat = Self> + Into<f64> {}
impl Stat for f32 {}
impl Stat for f64 {}

impl Element for f64 {
    type Stat = f64;
    const DTYPE: DType = DType::F64;
    const MAX: Self = f64::MAX;
    #[inline]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline]
    fn from_f64(value: f64) -> Self {
        value
    }
}

impl Element for f32 {
    type Stat = f32;
    const DTYPE: DType = DType::F32;
    const MAX: Self = f32::MAX;
    #[inline]
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    #[inline]
    fn from_f64(value: f64) -> Self {
        value as f32
    }
}

impl Element for f16 {
    type Stat = f32;
    const DTYPE: DType = DType::F16;
    const MAX: Self = f16::MAX;
    #[inline]
    fn to_f64(self) -> f64 {
        f64::from(self.to_f32())
    }
    #[inline]
    fn from_f64(value: f64) -> Self {
        f16::from_f32(f32_round_to_odd(value))
    }
}

impl Element for bf16 {
    type Stat = f32;
    const DTYPE: DType = DType::BF16;
    const MAX: Self = bf16::MAX;
    #[inline]
    fn to_f64(self) -> f64 {
        f64::from(self.to_f32())
    }
    #[inline]
    fn from_f64(value: f64) -> Self {
        bf16::from_f32(f32_round_to_odd(value))
    }
}

/// `value` rounded to `f32` with round-to-odd: truncate, then set the last bit if anything was lost.
///
/// Rounding an `f64` to a 16-bit type through `f32` with round-to-nearest twice can be off by one
/// (double rounding); round-to-odd in the middle step keeps the second rounding correct because
/// `f32` carries more than two extra bits for both `f16` and `bf16`.
#[inline]
fn f32_round_to_odd(value: f64) -> f32 {
    let nearest = value as f32;
    if !nearest.is_finite() || f64::from(nearest) == value {
        return nearest;
    }
    // Step back toward zero if rounding went away from it, so `toward_zero` is the truncation.
    let toward_zero = if f64::from(nearest).abs() > value.abs() {
        f32::from_bits(nearest.to_bits() - 1)
    } else {
        nearest
    };
    f32::from_bits(toward_zero.to_bits() | 1)
}

/// Runtime tag for the four supported dtypes.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE binary64.
    F64,
    /// IEEE binary32.
    F32,
    /// IEEE binary16 (10-bit mantissa, max 65504).
    F16,
    /// bfloat16 (7-bit mantissa, the exponent range of `f32`).
    BF16,
}

impl DType {
    /// All four dtypes, widest first.
    pub const ALL: [DType; 4] = [DType::F64, DType::F32, DType::F16, DType::BF16];

    /// The lowercase name used on the command line and in reports (`f64`, `f32`, `f16`, `bf16`).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F64 => "f64",
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// The largest finite value of the dtype.
    pub fn max_value(self) -> f64 {
        match self {
            DType::F64 => f64::MAX,
            DType::F32 => f64::from(f32::MAX),
            DType::F16 => f64::from(f16::MAX.to_f32()),
            DType::BF16 => f64::from(bf16::MAX.to_f32()),
        }
    }

    /// `ln(max_value)`: the largest `x` for which a naive `exp(x)` in this dtype is still finite
    /// (about 11.09 for `f16`, 88.72 for `f32` and `bf16`, 709.78 for `f64`).
    pub fn exp_overflow_threshold(self) -> f64 {
        self.max_value().ln()
    }

    /// Unit roundoff `u = 2^-p` of the dtype (half the distance from 1 to the next value).
    pub fn unit_roundoff(self) -> f64 {
        match self {
            DType::F64 => f64::EPSILON / 2.0,
            DType::F32 => f64::from(f32::EPSILON) / 2.0,
            DType::F16 => f64::from(f16::EPSILON.to_f32()) / 2.0,
            DType::BF16 => f64::from(bf16::EPSILON.to_f32()) / 2.0,
        }
    }

    /// The smallest positive normal value of the dtype.
    pub fn min_positive_normal(self) -> f64 {
        match self {
            DType::F64 => f64::MIN_POSITIVE,
            DType::F32 => f64::from(f32::MIN_POSITIVE),
            DType::F16 => f64::from(f16::MIN_POSITIVE.to_f32()),
            DType::BF16 => f64::from(bf16::MIN_POSITIVE.to_f32()),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The error of parsing a [`DType`] from a string.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown dtype {0:?}: expected one of f64, f32, f16, bf16")]
pub struct ParseDTypeError(pub String);

impl FromStr for DType {
    type Err = ParseDTypeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DType::ALL
            .into_iter()
            .find(|d| d.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| ParseDTypeError(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The correctly rounded f16 of `v`, found by brute force over the neighbouring f16 values.
    fn nearest_f16_brute(v: f64) -> f16 {
        let guess = f16::from_f32(v as f32);
        let candidates = [
            f16::from_bits(guess.to_bits().wrapping_sub(1)),
            guess,
            f16::from_bits(guess.to_bits().wrapping_add(1)),
        ];
        let mut best = guess;
        for c in candidates {
            let (dc, db) = ((c.to_f64() - v).abs(), (best.to_f64() - v).abs());
            if dc < db || (dc == db && c.to_bits() & 1 == 0) {
                best = c;
            }
        }
        best
    }

    #[test]
    fn half_rounding_from_f64_is_correct_where_double_rounding_is_not() {
        // 1 + 2^-11 + 2^-40: just above the f16 tie between 1 and 1 + 2^-10. Rounding to f32
        // first lands exactly on the tie, and ties-to-even then goes down: wrong.
        let v = 1.0 + 2f64.powi(-11) + 2f64.powi(-40);
        assert_eq!(
            f16::from_f32(v as f32),
            f16::ONE,
            "double rounding goes down"
        );
        assert_eq!(<f16 as Element>::from_f64(v), nearest_f16_brute(v));
        assert_eq!(<f16 as Element>::from_f64(v).to_f64(), 1.0 + 2f64.powi(-10));
        let w = 1.0 + 2f64.powi(-8) + 2f64.powi(-40);
        assert_eq!(<bf16 as Element>::from_f64(w).to_f64(), 1.0 + 2f64.powi(-7));
    }

    #[test]
    fn saturating_keeps_finite_results_finite() {
        assert_eq!(f32::from_f64_saturating(-1e300), f32::MIN);
        assert_eq!(<f16 as Element>::from_f64_saturating(1e6), f16::MAX);
        assert!(f32::from_f64_saturating(f64::NAN).is_nan());
        assert_eq!(
            f32::from_f64_saturating(f64::NEG_INFINITY),
            f32::NEG_INFINITY
        );
    }

    #[test]
    fn dtype_names_round_trip() {
        for d in DType::ALL {
            assert_eq!(d.name().parse::<DType>(), Ok(d));
        }
        assert!("f8".parse::<DType>().is_err());
        assert!((DType::F16.exp_overflow_threshold() - 11.0898).abs() < 1e-4);
        assert!((DType::F32.exp_overflow_threshold() - 88.7228).abs() < 1e-4);
    }
}
