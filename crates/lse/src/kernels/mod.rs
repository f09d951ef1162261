//! Row kernels, apart from the public API: a read pass that folds a row into its
//! [`RowState`](crate::RowState), then a write pass that produces outputs from that state.
//!
//! [`scalar`] is the portable implementation and the reference that any vectorised kernel is
//! tested against. It widens every element to `f64`, where the differences `x − m` of `f32`, `f16`
//! and `bf16` inputs are exact, and rounds each result once into the output dtype.
//!
//! Which implementation runs is chosen once per process from the CPU's features
//! ([`Kernel::Auto`]); [`set_kernel`] pins one, for tests that compare the two paths and for
//! benchmarks that measure them.

use std::sync::atomic::{AtomicU8, Ordering};

pub(crate) mod scalar;

/// A family of row kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// The fastest kernel this CPU supports (the default).
    Auto,
    /// The portable scalar reference: every element widened to `f64`, each result rounded once.
    Scalar,
    /// x86-64 AVX2 + FMA (+ F16C for `f16`), selected only where the CPU has them.
    Avx2,
}

impl Kernel {
    /// The lower-case name (`auto`, `scalar`, `avx2`).
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Auto => "auto",
            Kernel::Scalar => "scalar",
            Kernel::Avx2 => "avx2",
        }
    }
}

const AUTO: u8 = 0;
const SCALAR: u8 = 1;
const AVX2: u8 = 2;

static REQUESTED: AtomicU8 = AtomicU8::new(AUTO);

/// Pins the kernel family for the whole process (default [`Kernel::Auto`]).
///
/// Requesting [`Kernel::Avx2`] on a CPU without AVX2 and FMA falls back to the scalar kernel;
/// [`active_kernel`] says what runs. Results differ between families only by the rounding of
/// intermediate values (both meet the same accuracy bounds); for one family they are bitwise
/// identical whatever the number of threads.
pub fn set_kernel(kernel: Kernel) {
    let code = match kernel {
        Kernel::Auto => AUTO,
        Kernel::Scalar => SCALAR,
        Kernel::Avx2 => AVX2,
    };
    REQUESTED.store(code, Ordering::Relaxed);
}

/// The kernel family that runs now: [`Kernel::Scalar`] or [`Kernel::Avx2`].
pub fn active_kernel() -> Kernel {
    match REQUESTED.load(Ordering::Relaxed) {
        SCALAR => Kernel::Scalar,
        _ if avx2_available() => Kernel::Avx2,
        _ => Kernel::Scalar,
    }
}

/// AVX2 + FMA + F16C, detected once.
fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static DETECTED: OnceLock<bool> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
