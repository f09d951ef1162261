//! Row kernels, apart from the public API: a read pass that folds a row into its
//! [`RowState`](crate::RowState), then a write pass that produces outputs from that state.
//!
//! [`scalar`] is the portable implementation and the reference that any vectorised kernel is
//! tested against. It widens every element to `f64`, where the differences `x − m` of `f32`, `f16`
//! and `bf16` inputs are exact, and rounds each result once into the output dtype.

pub(crate) mod scalar;
