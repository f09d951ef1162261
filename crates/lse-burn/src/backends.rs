//! The backends with `lse`'s kernels on their own memory: the CPU backends, whose tensors live
//! on the host. The CubeCL backends take the trait's default methods (a read back).

// burn 0.22 deprecates burn-ndarray in favour of burn-flex; its users are still served.
#![allow(deprecated)]

use std::borrow::Cow;

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Flex, NdArray};
use burn::tensor::{bf16, f16, DType};
use burn_ndarray::NdArrayTensor;

use crate::host::{Floats, HostRead, ReadBack};
use crate::LseBackend;

/// burn-flex: a contiguous tensor's bytes are read in place.
#[doc(hidden)]
pub struct FlexRead;

impl HostRead<Flex> for FlexRead {
    fn floats(tensor: &FloatTensor<Flex>) -> Floats<'_> {
        let borrowed = match tensor.dtype() {
            DType::F64 => tensor
                .as_slice::<f64>()
                .map(|v| Floats::F64(Cow::Borrowed(v))),
            DType::F32 => tensor
                .as_slice::<f32>()
                .map(|v| Floats::F32(Cow::Borrowed(v))),
            DType::F16 => tensor
                .as_slice::<f16>()
                .map(|v| Floats::F16(Cow::Borrowed(v))),
            DType::BF16 => tensor
                .as_slice::<bf16>()
                .map(|v| Floats::BF16(Cow::Borrowed(v))),
            _ => None,
        };
        borrowed.unwrap_or_else(|| <ReadBack as HostRead<Flex>>::floats(tensor))
    }
}

/// burn-ndarray (`f32` and `f64`): an array in standard (row-major) layout is read in place.
#[doc(hidden)]
pub struct NdArrayRead;

impl HostRead<NdArray> for NdArrayRead {
    fn floats(tensor: &FloatTensor<NdArray>) -> Floats<'_> {
        let borrowed = match tensor {
            NdArrayTensor::F64(s) => s.view().to_slice().map(|v| Floats::F64(Cow::Borrowed(v))),
            NdArrayTensor::F32(s) => s.view().to_slice().map(|v| Floats::F32(Cow::Borrowed(v))),
            _ => None,
        };
        borrowed.unwrap_or_else(|| <ReadBack as HostRead<NdArray>>::floats(tensor))
    }
}

/// Where each backend's tensors are read: in place on the CPU backends, read back elsewhere.
/// A backend of your own implements it with [`ReadBack`](crate::ReadBack) and then
/// [`LseBackend`] with no methods.
pub trait HostBacked: Backend {
    /// How this backend's tensors reach `lse`'s kernels.
    #[doc(hidden)]
    type Read: HostRead<Self>;
}

impl HostBacked for Flex {
    type Read = FlexRead;
}
impl LseBackend for Flex {}

impl HostBacked for NdArray {
    type Read = NdArrayRead;
}
impl LseBackend for NdArray {}

#[cfg(feature = "wgpu")]
impl HostBacked for burn::backend::Cube {
    type Read = ReadBack;
}
#[cfg(feature = "wgpu")]
impl LseBackend for burn::backend::Cube {}

// The routing backends never run a kernel themselves: they forward to the backend underneath.
impl HostBacked for burn::backend::Dispatch {
    type Read = ReadBack;
}
impl<B: Backend, C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy> HostBacked
    for burn::backend::Autodiff<B, C>
{
    type Read = ReadBack;
}
