//! Reordering the elements of a row-major tensor: moving one axis to the end and back (the class
//! axis of `lse audit --axis` / `lse eval --axis`), and Fortran order to C order.
//!
//! Every function checks that the data fills the shape and returns a new buffer of the same size:
//! a copy never allocates more than its input holds.

use super::FormatError;

/// The number of elements of `shape` (1 for `[]`), or `None` when it overflows `usize`.
pub fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

fn check<T>(data: &[T], shape: &[usize]) -> Result<(), FormatError> {
    if element_count(shape) == Some(data.len()) {
        Ok(())
    } else {
        Err(FormatError::ShapeMismatch {
            shape: shape.to_vec(),
            len: data.len(),
        })
    }
}

/// `(outer, classes, inner)`: the products of the dimensions before `axis`, of `axis` and after it.
fn split(shape: &[usize], axis: usize) -> Option<(usize, usize, usize)> {
    let classes = *shape.get(axis)?;
    let outer = element_count(&shape[..axis])?;
    let inner = element_count(&shape[axis + 1..])?;
    Some((outer, classes, inner))
}

/// `shape` without `axis`: the shape of one value per row (logsumexp, loss) when `axis` is the
/// class axis.
pub fn without_axis(shape: &[usize], axis: usize) -> Vec<usize> {
    shape
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != axis)
        .map(|(_, &d)| d)
        .collect()
}

/// The elements of a row-major tensor of `shape` reordered so that `axis` is the last axis: the
/// rows (each `shape[axis]` long) then come in the row-major order of [`without_axis`].
/// With `axis` already last this is a plain copy.
///
/// # Errors
/// [`FormatError::ShapeMismatch`] when `data` does not fill `shape` or `axis` is not an axis of it.
pub fn move_axis_to_last<T: Copy>(
    data: &[T],
    shape: &[usize],
    axis: usize,
) -> Result<Vec<T>, FormatError> {
    swap_class_axis(data, shape, axis, Direction::ToLast)
}

/// The inverse of [`move_axis_to_last`]: `data` holds rows of `shape[axis]` elements in the order
/// of [`without_axis`]`(shape, axis)`; the result is the row-major tensor of `shape`.
///
/// # Errors
/// [`FormatError::ShapeMismatch`] when `data` does not fill `shape` or `axis` is not an axis of it.
pub fn move_last_to_axis<T: Copy>(
    data: &[T],
    shape: &[usize],
    axis: usize,
) -> Result<Vec<T>, FormatError> {
    swap_class_axis(data, shape, axis, Direction::FromLast)
}

/// Which way [`swap_class_axis`] moves the class axis.
#[derive(Clone, Copy)]
enum Direction {
    /// From `axis` to the last axis ([`move_axis_to_last`]).
    ToLast,
    /// From the last axis back to `axis` ([`move_last_to_axis`]).
    FromLast,
}

/// The shared body of [`move_axis_to_last`] and [`move_last_to_axis`]. Around `axis` the tensor
/// is `outer` blocks of `classes × inner` elements (`inner × classes` with the classes last);
/// moving the class axis either way transposes each block.
fn swap_class_axis<T: Copy>(
    data: &[T],
    shape: &[usize],
    axis: usize,
    direction: Direction,
) -> Result<Vec<T>, FormatError> {
    check(data, shape)?;
    let (outer, classes, inner) = split(shape, axis).ok_or_else(|| FormatError::ShapeMismatch {
        shape: shape.to_vec(),
        len: data.len(),
    })?;
    // Empty data may declare huge dimensions beside a zero: loop over nothing.
    if inner == 1 || data.is_empty() {
        return Ok(data.to_vec());
    }
    // Each block is `rows × cols` in `data` and `cols × rows` in the result.
    let (rows, cols) = match direction {
        Direction::ToLast => (classes, inner),
        Direction::FromLast => (inner, classes),
    };
    let mut out = Vec::with_capacity(data.len());
    for o in 0..outer {
        let block = &data[o * rows * cols..(o + 1) * rows * cols];
        for j in 0..cols {
            out.extend((0..rows).map(|i| block[i * cols + j]));
        }
    }
    Ok(out)
}

/// The elements of a Fortran-order (column-major) tensor of `shape` in row-major order.
///
/// # Errors
/// [`FormatError::ShapeMismatch`] when `data` does not fill `shape`.
pub fn fortran_to_c<T: Copy>(data: &[T], shape: &[usize]) -> Result<Vec<T>, FormatError> {
    check(data, shape)?;
    if shape.len() < 2 || data.is_empty() {
        return Ok(data.to_vec());
    }
    // Column-major strides; walk the row-major index like an odometer, last digit fastest.
    let mut strides = Vec::with_capacity(shape.len());
    let mut stride = 1;
    for &d in shape {
        strides.push(stride);
        stride *= d;
    }
    let mut index = vec![0usize; shape.len()];
    let mut offset = 0usize;
    let mut out = Vec::with_capacity(data.len());
    for _ in 0..data.len() {
        out.push(data[offset]);
        for k in (0..shape.len()).rev() {
            index[k] += 1;
            offset += strides[k];
            if index[k] < shape[k] {
                break;
            }
            offset -= shape[k] * strides[k];
            index[k] = 0;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_moves_round_trip() {
        // shape (2, 3, 4): element value = its row-major index.
        let shape = [2, 3, 4];
        let data: Vec<u32> = (0..24).collect();
        let moved = move_axis_to_last(&data, &shape, 1).unwrap();
        // Row (o=0, i=1) holds the classes c = 0..3 at index c*4 + 1.
        assert_eq!(&moved[3..6], &[1, 5, 9]);
        assert_eq!(move_last_to_axis(&moved, &shape, 1).unwrap(), data);
        let moved0 = move_axis_to_last(&data, &shape, 0).unwrap();
        assert_eq!(&moved0[..2], &[0, 12]);
        assert_eq!(move_last_to_axis(&moved0, &shape, 0).unwrap(), data);
        assert_eq!(move_axis_to_last(&data, &shape, 2).unwrap(), data);
        assert_eq!(without_axis(&shape, 1), [2, 4]);
        assert!(move_axis_to_last(&data, &shape, 3).is_err());
        assert!(move_axis_to_last(&data[1..], &shape, 0).is_err());
        // Zero elements with huge dimensions: no loop over the dimensions.
        let huge = [1 << 40, 3, 0];
        assert!(move_axis_to_last::<u8>(&[], &huge, 1).unwrap().is_empty());
        assert!(move_last_to_axis::<u8>(&[], &huge, 1).unwrap().is_empty());
    }

    #[test]
    fn fortran_order_becomes_c_order() {
        // A (2, 3) array [[0, 1, 2], [3, 4, 5]] stored column-major.
        let f = [0, 3, 1, 4, 2, 5];
        assert_eq!(fortran_to_c(&f, &[2, 3]).unwrap(), [0, 1, 2, 3, 4, 5]);
        // (2, 2, 2): F-order offset of (i, j, k) is i + 2j + 4k.
        let f: Vec<u32> = (0..8).collect();
        let c = fortran_to_c(&f, &[2, 2, 2]).unwrap();
        assert_eq!(c, [0, 4, 2, 6, 1, 5, 3, 7]);
        assert_eq!(fortran_to_c::<u8>(&[], &[0, 5]).unwrap(), Vec::<u8>::new());
        assert!(element_count(&[1 << 40, 1 << 40]).is_none());
    }
}
