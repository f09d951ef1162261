//! One generic test for every dtype, and short names for the contract's special values.

/// Instantiates each generic test `fn name<E: Element>()` for the four dtypes, as
/// `name::f64`, `name::f32`, `name::f16` and `name::bf16`, so a failure names its dtype.
#[macro_export]
macro_rules! all_dtypes {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn f64() {
                super::$name::<f64>()
            }
            #[test]
            fn f32() {
                super::$name::<f32>()
            }
            #[test]
            fn f16() {
                super::$name::<$crate::__lse::f16>()
            }
            #[test]
            fn bf16() {
                super::$name::<$crate::__lse::bf16>()
            }
        }
    )*};
}

/// Short names for the special values the contract is about.
pub const NEG: f64 = f64::NEG_INFINITY;
/// `+inf`.
pub const INF: f64 = f64::INFINITY;
/// NaN.
pub const NAN: f64 = f64::NAN;

/// The statistics dtype (loss, logsumexp) of `E`.
pub type Stat<E> = <E as lse::Element>::Stat;
