//! What lse's test suites share, in one place instead of copies: the random generator
//! ([`rng::Rng`]), the 192-bit oracle ([`oracle`]) and the accuracy measurement built on it
//! ([`measure`], and the tests themselves as [`accuracy_tests!`]), the cross-entropy option sets
//! ([`options`]), and [`all_dtypes!`], which runs one generic test for each of lse's four
//! dtypes. A dev-dependency of every crate of the repository; never published.

// A test kit: its functions fail a test by panicking (astro-float allocation, a broken
// invariant of the oracle); a `# Panics` section on each would only say so again.
#![allow(clippy::missing_panics_doc)]

mod accuracy_tests;
mod dtypes;
pub mod measure;
pub mod options;
pub mod oracle;
pub mod rng;

pub use dtypes::{Stat, INF, NAN, NEG};
#[doc(hidden)]
pub use lse as __lse;
