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
/// A backend of your own implements it with `KERNELS_ON_HOST = false` and
/// [`ReadBack`](crate::ReadBack), and then [`LseBackend`] with no methods.
pub trait HostBacked: Backend {
    /// `true` on a backend whose tensors live in host memory: `lse`'s CPU kernels run on them.
    /// `false`: the operations are composed of the backend's own tensor operations.
    const KERNELS_ON_HOST: bool;
    /// How this backend's tensors reach `lse`'s kernels (the linear loss reads back when the
    /// kernels are not on the host).
    #[doc(hidden)]
    type Read: HostRead<Self>;
}

impl HostBacked for Flex {
    const KERNELS_ON_HOST: bool = true;
    type Read = FlexRead;
}
impl LseBackend for Flex {}

impl HostBacked for NdArray {
    const KERNELS_ON_HOST: bool = true;
    type Read = NdArrayRead;
}
impl LseBackend for NdArray {}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
impl HostBacked for burn::backend::Cube {
    const KERNELS_ON_HOST: bool = false;
    type Read = ReadBack;
}

/// burn's CubeCL backend (wgpu, CUDA, ROCm): the cross-entropy, softmax, log_softmax and
/// logsumexp run lse-gpu's kernels on the tensors' own buffers (the logits, outputs and
/// gradients never leave the device; targets, per-row stats and losses do, a few words per
/// row). `f64`, which lse-gpu does not store, reads back to the host (composing burn's own `f64`
/// ops is no way out: its `f64` `exp` on wgpu is wrong, `exp(0)` gave 5.3e-315 on llvmpipe with
/// burn 0.22.1). The linear loss reads back.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
impl LseBackend for burn::backend::Cube {
    fn lse_logsumexp(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match cube::storage(&x) {
            Some(dtype) => cube::logsumexp(x, dtype),
            None => crate::host::logsumexp::<Self, ReadBack>(x),
        }
    }

    fn lse_softmax(x: FloatTensor<Self>, log: bool) -> FloatTensor<Self> {
        match cube::storage(&x) {
            Some(dtype) => cube::softmax(x, dtype, log),
            None => crate::host::softmax::<Self, ReadBack>(x, log),
        }
    }

    fn lse_softmax_backward(
        y: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        log: bool,
    ) -> FloatTensor<Self> {
        match cube::storage(&y) {
            Some(dtype) => cube::softmax_backward(y, dy, dtype, log),
            None => crate::host::softmax_backward::<Self, ReadBack>(y, dy, log),
        }
    }

    fn lse_cross_entropy(
        logits: FloatTensor<Self>,
        targets: burn::backend::tensor::IntTensor<Self>,
        options: crate::CrossEntropyOptions,
    ) -> FloatTensor<Self> {
        cube::cross_entropy(logits, targets, &options, false).0
    }

    fn lse_cross_entropy_with_grad(
        logits: FloatTensor<Self>,
        targets: burn::backend::tensor::IntTensor<Self>,
        options: crate::CrossEntropyOptions,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (loss, grad) = cube::cross_entropy(logits, targets, &options, true);
        (loss, grad.expect("asked for"))
    }
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod cube {
    use burn::backend::tensor::{FloatTensor, IntTensor};
    use burn::backend::{Cube, TensorMetadata};
    use burn::tensor::{DType, Shape};
    use burn_cubecl::cubecl::server::Handle;
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::tensor::CubeTensor;
    use lse::{GradOutput, NonFinite, Reduction};
    use lse_gpu::{Gpu, StorageDType};

    use crate::host::{self, ReadBack};

    /// The dtypes lse-gpu's kernels store.
    pub(super) fn storage(x: &CubeTensor) -> Option<StorageDType> {
        match x.dtype {
            DType::F32 => Some(StorageDType::F32),
            DType::F16 => Some(StorageDType::F16),
            DType::BF16 => Some(StorageDType::BF16),
            _ => None,
        }
    }

    /// A new tensor over `handle`, a buffer lse-gpu wrote for `like`'s device.
    fn wrap(like: &CubeTensor, handle: Handle, shape: Shape, dtype: DType) -> CubeTensor {
        CubeTensor::new_contiguous(
            like.client.clone(),
            like.device.clone(),
            shape,
            handle,
            dtype,
        )
    }

    const DEVICE: &str = "the public function checked the input, and the device runs";

    pub(super) fn logsumexp(x: CubeTensor, dtype: StorageDType) -> CubeTensor {
        let shape = x.shape();
        let (rows, classes) = (shape.as_slice()[0], shape.as_slice()[1]);
        let x = into_contiguous(x);
        let gpu = Gpu::from_client(x.client.clone());
        let (lse, _) = gpu
            .logsumexp_resident(&x.handle, dtype, shape.num_elements(), classes)
            .expect(DEVICE);
        wrap(&x, lse, Shape::from([rows]), DType::F32)
    }

    pub(super) fn softmax(x: CubeTensor, dtype: StorageDType, log: bool) -> CubeTensor {
        let shape = x.shape();
        let classes = shape.as_slice()[1];
        let x = into_contiguous(x);
        let gpu = Gpu::from_client(x.client.clone());
        let (y, _) = gpu
            .softmax_resident(&x.handle, dtype, shape.num_elements(), classes, log)
            .expect(DEVICE);
        wrap(&x, y, shape, x.dtype)
    }

    pub(super) fn softmax_backward(
        y: CubeTensor,
        dy: CubeTensor,
        dtype: StorageDType,
        log: bool,
    ) -> CubeTensor {
        let shape = y.shape();
        let classes = shape.as_slice()[1];
        let (y, dy) = (into_contiguous(y), into_contiguous(dy));
        // The incoming gradient in the output's dtype, as the kernels read both alike.
        let dy = if dy.dtype == y.dtype {
            dy
        } else {
            <Cube as burn::backend::ops::FloatTensorOps<Cube>>::float_cast(dy, y.dtype.into())
        };
        let gpu = Gpu::from_client(y.client.clone());
        let dx = gpu
            .softmax_backward_resident(
                &y.handle,
                &dy.handle,
                dtype,
                shape.num_elements(),
                classes,
                log,
            )
            .expect(DEVICE);
        wrap(&y, dx, shape, y.dtype)
    }

    /// The cross-entropy with lse-gpu's kernels for `f32`, `f16` and `bf16` logits; `f64`
    /// (which they do not store) reads back to the host.
    pub(super) fn cross_entropy(
        logits: FloatTensor<Cube>,
        targets: IntTensor<Cube>,
        options: &crate::CrossEntropyOptions,
        with_grad: bool,
    ) -> (FloatTensor<Cube>, Option<FloatTensor<Cube>>) {
        let Some(dtype) = storage(&logits) else {
            return host::cross_entropy::<Cube, ReadBack>(logits, targets, options, with_grad);
        };
        let shape = logits.shape();
        let (len, classes) = (shape.num_elements(), shape.as_slice()[1]);
        let logits: CubeTensor = into_contiguous(logits);
        let targets = host::targets::<Cube>(targets);
        let mut core = options.as_lse();
        core.non_finite = NonFinite::Propagate;
        let gpu = Gpu::from_client(logits.client.clone());
        let (out, grad) = gpu
            .cross_entropy_resident(
                &logits.handle,
                dtype,
                len,
                classes,
                &targets,
                &core,
                GradOutput::Scalar(1.0),
                with_grad,
            )
            .expect(DEVICE);
        let loss = match out.row_loss {
            Some(rows) if core.reduction == Reduction::None => rows,
            _ => vec![out.loss],
        };
        let loss_len = loss.len();
        let grad = grad.map(|handle| wrap(&logits, handle, shape, logits.dtype));
        (
            host::upload::<Cube, f32>(loss, [loss_len], &logits.device),
            grad,
        )
    }
}

// The routing backends never run a kernel themselves: they forward to the backend underneath.
impl HostBacked for burn::backend::Dispatch {
    const KERNELS_ON_HOST: bool = false;
    type Read = ReadBack;
}
impl<B: Backend, C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy> HostBacked
    for burn::backend::Autodiff<B, C>
{
    const KERNELS_ON_HOST: bool = false;
    type Read = ReadBack;
}
