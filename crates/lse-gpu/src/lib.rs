//! # lse-gpu — `lse`'s kernels on GPUs, written once in CubeCL
//!
//! logsumexp, softmax, log_softmax (and their backward) and the fused cross-entropy forward and
//! gradient over class or probability targets, as [CubeCL](https://github.com/tracel-ai/cubecl) kernels: one
//! source for Vulkan, Metal, DX12 and WebGPU (through wgpu), CUDA and ROCm. Storage is `f32`,
//! [`half::f16`] or [`half::bf16`]; arithmetic is `f32`. The semantics are `lse`'s: the same
//! checks, policies and typed errors ([`lse::LseError`]), the loss in the log1p form
//! `(m − x_y) + log1p(s')`, masks and non-finite values recognised by their bits.
//!
//! ```no_run
//! use lse_gpu::Gpu;
//! let gpu = Gpu::new()?;
//! let logits = [1000.0f32, 1.0, -1000.0, 2.0, 1.0, 0.1];
//! let mut out = [0.0f32; 2];
//! gpu.logsumexp(&logits, 3, &mut out, lse::NonFinite::Error)?;
//! # Ok::<(), lse_gpu::Error>(())
//! ```
//!
//! Tests run on Mesa's software Vulkan driver (llvmpipe); see `docs/gpu.md` for what that
//! proves and what it cannot.

#![warn(missing_docs, clippy::missing_errors_doc, clippy::missing_panics_doc)]

mod bench;
mod device;
mod element;
mod kernels;
mod ops;

pub use bench::BenchReport;
pub use device::{adapters, Adapter, Gpu};
pub use element::{GpuElement, StorageDType};

/// What can go wrong in a GPU call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Bad input: the error `lse` gives for the same call on the CPU.
    #[error(transparent)]
    Input(#[from] lse::LseError),
    /// No adapter with this index (none at all: no GPU driver, not even a software one).
    #[error("no GPU adapter {index}: wgpu finds {found} (install a Vulkan driver, e.g. Mesa's mesa-vulkan-drivers)")]
    NoAdapter {
        /// The adapter asked for.
        index: usize,
        /// How many there are.
        found: usize,
    },
    /// An option the GPU kernels do not implement.
    #[error("{0} is not supported on the GPU")]
    Unsupported(&'static str),
    /// The device failed (a read-back error).
    #[error("device error: {0}")]
    Device(String),
}
