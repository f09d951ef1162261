//! The accuracy tests of `accuracy.rs` (docs/numerics.md, against the 192-bit oracle) on the scalar
//! reference kernel, pinned with `lse::set_kernel`: both kernel families must meet the targets.

// The kernel family measured here.
lse_testkit::accuracy_tests!(lse::Kernel::Scalar);
