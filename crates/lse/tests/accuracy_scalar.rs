//! The accuracy tests of `accuracy.rs` (docs/numerics.md, against the 192-bit oracle) on the scalar
//! reference kernel, pinned with `lse::set_kernel`: both kernel families must meet the targets.

/// The kernel family measured here.
const KERNEL: lse::Kernel = lse::Kernel::Scalar;

include!("support/accuracy_tests.rs");
