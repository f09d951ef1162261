//! The one seam between `lse` and a matrix-product crate: `dst ← [dst +] lhs · rhs` on strided
//! `f32` or `f64` views (the dtype of a row's statistics, [`Stat`]). Everything above it (the fused linear cross-entropy) speaks in [`MatRef`] and
//! [`MatMut`]; swapping the crate means rewriting [`product`] alone.
//!
//! Today it is [`gemm`] (with its AVX-512 kernels, chosen at run time): at the linear
//! cross-entropy's shapes it ran as fast as `faer` and is the crate `candle` already uses.
//! Its result does not depend on the number of threads: threads share out blocks of `dst`, and
//! each element's sum over `k` runs in the same order, in blocks whose size depends on the shape
//! and the caches alone (`tests/linear_cross_entropy.rs` checks it bit for bit).

use crate::element::Stat;

/// A read-only `rows × cols` view: element `(i, j)` is `data[i·row_stride + j·col_stride]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MatRef<'a, A> {
    data: &'a [A],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a, A> MatRef<'a, A> {
    /// The row-major `rows × cols` matrix at the start of `data`.
    ///
    /// # Panics
    /// When `data` is shorter than `rows · cols`.
    pub(crate) fn row_major(data: &'a [A], rows: usize, cols: usize) -> Self {
        assert!(data.len() >= rows * cols, "matrix view past its buffer");
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// Columns `first_col..first_col + cols` of the row-major `rows × row_stride` matrix `data`.
    ///
    /// # Panics
    /// When the block does not lie inside `data`.
    pub(crate) fn columns(
        data: &'a [A],
        rows: usize,
        row_stride: usize,
        first_col: usize,
        cols: usize,
    ) -> Self {
        assert!(first_col + cols <= row_stride && data.len() >= rows * row_stride);
        Self {
            data: &data[first_col..],
            rows,
            cols,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose (no copy).
    pub(crate) fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }
}

/// A writable `rows × cols` view with rows `row_stride` apart (columns contiguous): a block of
/// columns of a row-major matrix.
#[derive(Debug)]
pub(crate) struct MatMut<'a, A> {
    data: &'a mut [A],
    rows: usize,
    cols: usize,
    row_stride: usize,
}

impl<'a, A> MatMut<'a, A> {
    /// Columns `first_col..first_col + cols` of the row-major `rows × row_stride` matrix `data`.
    ///
    /// # Panics
    /// When the block does not lie inside `data`.
    pub(crate) fn columns(
        data: &'a mut [A],
        rows: usize,
        row_stride: usize,
        first_col: usize,
        cols: usize,
    ) -> Self {
        assert!(first_col + cols <= row_stride && data.len() >= rows * row_stride);
        Self {
            data: &mut data[first_col..],
            rows,
            cols,
            row_stride,
        }
    }

    /// The row-major `rows × cols` matrix at the start of `data`.
    ///
    /// # Panics
    /// When `data` is shorter than `rows · cols`.
    pub(crate) fn row_major(data: &'a mut [A], rows: usize, cols: usize) -> Self {
        Self::columns(data, rows, cols, 0, cols)
    }
}

/// `dst ← lhs · rhs`, or `dst ← dst + lhs · rhs` when `accumulate`, on rayon's current pool.
///
/// # Panics
/// When the shapes do not chain (`lhs` is `m × k`, `rhs` `k × n`, `dst` `m × n`).
pub(crate) fn product<A: Stat>(
    dst: MatMut<'_, A>,
    lhs: MatRef<'_, A>,
    rhs: MatRef<'_, A>,
    accumulate: bool,
) {
    let (m, n, k) = (dst.rows, dst.cols, lhs.cols);
    assert!(
        lhs.rows == m && rhs.rows == k && rhs.cols == n,
        "matrix product of {}×{} by {}×{} into {}×{}",
        lhs.rows,
        lhs.cols,
        rhs.rows,
        rhs.cols,
        m,
        n
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // An empty sum: gemm is not asked to handle it.
        if !accumulate {
            for row in dst.data.chunks_mut(dst.row_stride).take(m) {
                row[..n].fill(A::zero());
            }
        }
        return;
    }
    let stride = |s: usize| isize::try_from(s).expect("stride fits isize");
    // SAFETY: every view was checked on construction to lie inside its slice (a view's last
    // element `(rows−1)·row_stride + (cols−1)·col_stride` is in bounds), `dst` is borrowed
    // mutably and so overlaps neither operand, and gemm reads `dst` only when `read_dst`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            1,
            stride(dst.row_stride),
            accumulate,
            lhs.data.as_ptr(),
            stride(lhs.col_stride),
            stride(lhs.row_stride),
            rhs.data.as_ptr(),
            stride(rhs.col_stride),
            stride(rhs.row_stride),
            A::from_f64(1.0),
            A::from_f64(1.0),
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
}
