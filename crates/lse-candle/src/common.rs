//! What every op shares: error messages, the device check, dtype dispatch, reading contiguous
//! CPU storage, and moving a dimension last so that the kernels see `rows × classes`.

use std::borrow::Cow;

use candle_core::{CpuStorage, DType, Device, DeviceLocation, Error, Layout, Result, Tensor};

/// Below this many bytes an output buffer is allocated the ordinary way.
const HUGE_PAGE_MIN_BYTES: usize = 4 << 20;

/// A zero-filled buffer of `len` elements for a logits-sized output.
///
/// Fresh memory from the allocator is faulted in 4 KiB at a time by whatever first writes it;
/// for a 4096 × 32000 `f32` gradient that costs more than the fused kernel itself (measured
/// 170 ms against 78 ms on the 2-core machine). On Linux a large buffer is therefore marked for
/// transparent huge pages before its first touch (2 MiB faults: 24 ms for the same buffer);
/// elsewhere, or when the kernel declines, it is an ordinary zeroed allocation.
///
/// # Panics
/// When `len` elements overflow `isize::MAX` bytes, or the allocation fails (as `vec!` does).
pub(crate) fn zeroed_buffer<E: lse::Element>(len: usize) -> Vec<E> {
    let layout = std::alloc::Layout::array::<E>(len).expect("buffer size overflows isize");
    if layout.size() < HUGE_PAGE_MIN_BYTES {
        return vec![E::zero(); len];
    }
    // SAFETY: `layout` is non-empty; all-zero bits are +0.0 in each of the four element types
    // (`Element` is sealed to them); `Vec` frees with `Layout::array::<E>(len)`, the same layout.
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout);
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        advise_huge_pages(ptr, layout.size());
        Vec::from_raw_parts(ptr.cast::<E>(), len, len)
    }
}

/// Asks Linux to back the whole pages inside `[ptr, ptr + len)` with huge pages (advice only:
/// a refusal changes nothing but speed).
fn advise_huge_pages(ptr: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = (ptr as usize).next_multiple_of(PAGE);
        let end = (ptr as usize + len) / PAGE * PAGE;
        if end > start {
            // SAFETY: the range lies inside one live allocation; MADV_HUGEPAGE changes no contents.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len);
}

/// A candle error carrying an [`lse::LseError`]'s message unchanged, prefixed by the op's name.
pub(crate) fn lse_error(op: &str, err: lse::LseError) -> Error {
    Error::Msg(format!("lse-candle {op}: {err}")).bt()
}

/// A candle error with `message`, prefixed by the op's name.
pub(crate) fn op_error(op: &str, message: impl std::fmt::Display) -> Error {
    Error::Msg(format!("lse-candle {op}: {message}")).bt()
}

/// The message for an op called on a device that `lse-candle` has no kernel for.
///
/// `device` is a human-readable device name (`"CUDA"`, `"Metal"`, `"Cuda { gpu_id: 0 }"`).
pub(crate) fn unsupported_device_message(op: &str, device: &str) -> String {
    format!(
        "lse-candle {op}: no kernel for device {device} yet; only the CPU is supported. \
         Move the tensors with `.to_device(&Device::Cpu)` (lse-candle never falls back \
         to the CPU silently)"
    )
}

/// The error of an op run on a device it has no kernel for (the message of
/// [`unsupported_device_message`]).
pub(crate) fn no_kernel<T>(op: &str, device: &str) -> Result<T> {
    Err(Error::Msg(unsupported_device_message(op, device)))
}

/// The `cuda_fwd` and `metal_fwd` of a CPU-only custom op, both failing with [`no_kernel`].
///
/// `|this| op` names the op for the message (`this` is `self`); one identifier per input of the
/// op (`CustomOp1`: one, `CustomOp2`: two) names its unused storage argument.
macro_rules! cpu_only {
    (|$this:pat_param| $op:expr, $($input:ident),+) => {
        $crate::common::cpu_only!(@fwd cuda_fwd, CudaStorage, "CUDA", |$this| $op, $($input),+);
        $crate::common::cpu_only!(@fwd metal_fwd, MetalStorage, "Metal", |$this| $op, $($input),+);
    };
    (@fwd $fwd:ident, $storage:ident, $device:literal, |$this:pat_param| $op:expr, $($input:ident),+) => {
        fn $fwd(
            &self,
            $($input: &candle_core::$storage, _: &candle_core::Layout),+
        ) -> candle_core::Result<(candle_core::$storage, candle_core::Shape)> {
            let $this = self;
            $crate::common::no_kernel($op, $device)
        }
    };
}
pub(crate) use cpu_only;

/// The internal error of a backward kernel handed `got` incoming gradients for `rows` rows.
pub(crate) fn grad_count_error(op: &str, got: usize, rows: usize) -> Error {
    op_error(
        op,
        format!("internal error: {got} output gradients for {rows} rows"),
    )
}

/// The readable name of a device location.
pub(crate) fn device_name(location: DeviceLocation) -> String {
    match location {
        DeviceLocation::Cpu => "CPU".to_owned(),
        DeviceLocation::Cuda { gpu_id } => format!("CUDA (gpu {gpu_id})"),
        DeviceLocation::Metal { gpu_id } => format!("Metal (gpu {gpu_id})"),
    }
}

/// Fails unless `tensor` lives on the CPU.
pub(crate) fn ensure_cpu(op: &str, tensor: &Tensor) -> Result<()> {
    match tensor.device() {
        Device::Cpu => Ok(()),
        other => Err(Error::Msg(unsupported_device_message(
            op,
            &device_name(other.location()),
        ))
        .bt()),
    }
}

/// The error of a floating-point op on a dtype other than f32, f64, f16, bf16.
pub(crate) fn unsupported_dtype(op: &str, what: &str, dtype: DType) -> Error {
    op_error(
        op,
        format!(
            "{what} have dtype {}, expected one of f32, f64, f16, bf16",
            dtype.as_str()
        ),
    )
}

/// Calls `$f::<T>($args)` with `T` the Rust type of the float dtype `$dtype`, or returns the
/// unsupported-dtype error.
macro_rules! dispatch_float {
    ($op:expr, $what:expr, $dtype:expr, $f:ident ( $($arg:expr),* $(,)? )) => {
        match $dtype {
            candle_core::DType::F32 => $f::<f32>($($arg),*),
            candle_core::DType::F64 => $f::<f64>($($arg),*),
            candle_core::DType::F16 => $f::<lse::f16>($($arg),*),
            candle_core::DType::BF16 => $f::<lse::bf16>($($arg),*),
            other => Err($crate::common::unsupported_dtype($op, $what, other)),
        }
    };
}
pub(crate) use dispatch_float;

/// The contiguous elements of `storage` seen through `layout`.
///
/// The public functions make every tensor contiguous before an op sees it, so a strided layout
/// here is an internal error, reported rather than read wrongly.
pub(crate) fn contiguous_slice<'a, T: candle_core::WithDType>(
    op: &str,
    what: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<&'a [T]> {
    let data = storage.as_slice::<T>()?;
    layout
        .contiguous_offsets()
        .and_then(|(start, end)| data.get(start..end))
        .ok_or_else(|| op_error(op, format!("internal error: {what} is not contiguous")))
}

/// `(rows, classes)` of a 2-D layout.
pub(crate) fn rows_classes(op: &str, layout: &Layout) -> Result<(usize, usize)> {
    match *layout.dims() {
        [rows, classes] => Ok((rows, classes)),
        ref dims => Err(op_error(
            op,
            format!("internal error: expected a 2-D tensor, got shape {dims:?}"),
        )),
    }
}

/// Class-index targets of any integer dtype as `i64`, borrowed when they already are.
pub(crate) fn class_targets<'a>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<Cow<'a, [i64]>> {
    fn widen<T: candle_core::WithDType + Into<i64>>(
        op: &str,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> Result<Cow<'static, [i64]>> {
        let s = contiguous_slice::<T>(op, "targets", storage, layout)?;
        Ok(Cow::Owned(s.iter().map(|&v| v.into()).collect()))
    }
    match storage {
        CpuStorage::I64(_) => Ok(Cow::Borrowed(contiguous_slice::<i64>(
            op, "targets", storage, layout,
        )?)),
        CpuStorage::U32(_) => widen::<u32>(op, storage, layout),
        CpuStorage::U8(_) => widen::<u8>(op, storage, layout),
        CpuStorage::I32(_) => widen::<i32>(op, storage, layout),
        CpuStorage::I16(_) => widen::<i16>(op, storage, layout),
        other => Err(op_error(
            op,
            format!(
                "class-index targets have dtype {}, expected one of i64, u32, u8, i32, i16",
                candle_core::backend::BackendStorage::dtype(other).as_str()
            ),
        )),
    }
}

/// Where `dim` of a `rank`-dimensional tensor goes when it is moved last: the permutation that
/// keeps the other dimensions in order, or `None` when `dim` already is last.
pub(crate) fn last_permutation(rank: usize, dim: usize) -> Option<Vec<usize>> {
    (dim + 1 != rank).then(|| {
        (0..rank)
            .filter(|&d| d != dim)
            .chain(std::iter::once(dim))
            .collect()
    })
}

/// The inverse of [`last_permutation`]: puts the last dimension back at `dim`.
pub(crate) fn restore_permutation(rank: usize, dim: usize) -> Vec<usize> {
    // Permuted dims are [0..dim, dim+1..rank, dim]; original d < dim sits at d, d > dim at d - 1.
    (0..rank)
        .map(|d| match d.cmp(&dim) {
            std::cmp::Ordering::Less => d,
            std::cmp::Ordering::Equal => rank - 1,
            std::cmp::Ordering::Greater => d - 1,
        })
        .collect()
}

/// `xs` as a contiguous `rows × classes` tensor with `dim` as the classes, plus the shape of
/// the other dimensions in their original order. Recorded for backpropagation (permute,
/// contiguous and reshape all have a backward in candle); a contiguous 2-D `xs` with `dim = 1`
/// comes back as itself.
///
/// # Errors
/// Only candle's own errors (none expected for a valid `dim`).
pub(crate) fn to_rows(xs: &Tensor, dim: usize) -> Result<(Tensor, Vec<usize>)> {
    let dims = xs.dims();
    let classes = dims[dim];
    let outer: Vec<usize> = dims
        .iter()
        .enumerate()
        .filter_map(|(d, &n)| (d != dim).then_some(n))
        .collect();
    let rows = outer.iter().product::<usize>();
    let moved = match last_permutation(dims.len(), dim) {
        Some(perm) => xs.permute(perm)?,
        None => xs.clone(),
    };
    let moved = moved.contiguous()?;
    // A reshape is recorded even when it changes nothing, and every recorded op costs a
    // logits-sized gradient accumulation in candle's backward pass: skip it when possible.
    let rows_view = if moved.dims() == [rows, classes] {
        moved
    } else {
        moved.reshape((rows, classes))?
    };
    Ok((rows_view, outer))
}

/// The inverse of [`to_rows`] for an output of the same `rows × classes` shape.
///
/// # Errors
/// When `ys` is not 2-D (an internal error).
pub(crate) fn from_rows(ys: &Tensor, dim: usize, outer: &[usize]) -> Result<Tensor> {
    let classes = ys.dim(1)?;
    let mut moved_shape = outer.to_vec();
    moved_shape.push(classes);
    let rank = moved_shape.len();
    let ys = if ys.dims() == moved_shape.as_slice() {
        ys.clone()
    } else {
        ys.reshape(moved_shape)?
    };
    match last_permutation(rank, dim) {
        Some(_) => ys.permute(restore_permutation(rank, dim)),
        None => Ok(ys),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_message_names_op_and_device() {
        let m = unsupported_device_message(
            "cross_entropy",
            &device_name(DeviceLocation::Cuda { gpu_id: 1 }),
        );
        assert!(m.contains("cross_entropy"), "{m}");
        assert!(m.contains("CUDA (gpu 1)"), "{m}");
        assert!(m.contains("never falls back"), "{m}");
        let m = unsupported_device_message("softmax", "Metal");
        assert!(
            m.starts_with("lse-candle softmax: no kernel for device Metal"),
            "{m}"
        );
        assert_eq!(
            device_name(DeviceLocation::Metal { gpu_id: 0 }),
            "Metal (gpu 0)"
        );
        assert_eq!(device_name(DeviceLocation::Cpu), "CPU");
    }

    #[test]
    fn permutations_invert() {
        for rank in 1..6 {
            for dim in 0..rank {
                let shape: Vec<usize> = (0..rank).map(|d| d + 2).collect();
                let xs = Tensor::zeros(shape.clone(), DType::F32, &Device::Cpu).expect("zeros");
                let (rows, outer) = to_rows(&xs, dim).expect("to_rows");
                assert_eq!(rows.dims(), [outer.iter().product::<usize>(), shape[dim]]);
                let back = from_rows(&rows, dim, &outer).expect("from_rows");
                assert_eq!(back.dims(), shape.as_slice());
            }
        }
        assert_eq!(last_permutation(4, 1), Some(vec![0, 2, 3, 1]));
        assert_eq!(restore_permutation(4, 1), vec![0, 3, 1, 2]);
        assert_eq!(last_permutation(3, 2), None);
    }
}
