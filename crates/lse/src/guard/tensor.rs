//! A type-erased, named view of one tensor, for the guard, the triage and the loss scaler.

use core::fmt;
use core::ops::Range;

use serde::{Deserialize, Serialize};

use crate::element::{DType, Element};

mod sealed {
    /// Keeps [`super::ElementSlice`] implemented only for the slices of `lse`'s dtypes.
    pub trait Sealed {}
    impl<E: crate::Element> Sealed for [E] {}
    impl<T: Sealed + ?Sized> Sealed for &T {}
}

/// What a tensor is in the training step; it decides what counts as non-finite and how the
/// triage reads the tensor.
///
/// Serialized in lowercase (`"input"`, `"logits"`, …).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The input batch (features, embeddings) as the data loader produced it.
    Input,
    /// Raw logits. `-inf` is a mask here, not a fault: only NaN and `+inf` are non-finite.
    Logits,
    /// Probabilities (a softmax output).
    Probabilities,
    /// A loss: one scalar or one value per row.
    Loss,
    /// A gradient (of the logits or of a parameter).
    Gradient,
    /// Any other tensor (an activation, an intermediate).
    Other,
}

impl Role {
    /// The lowercase name used in reports and JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Role::Input => "input",
            Role::Logits => "logits",
            Role::Probabilities => "probabilities",
            Role::Loss => "loss",
            Role::Gradient => "gradient",
            Role::Other => "other",
        }
    }

    /// Whether `-inf` is an ordinary value for this role: true only for [`Role::Logits`], where
    /// `-inf` is how masks are written. For every other role `-inf` is non-finite like NaN and
    /// `+inf`.
    pub const fn allows_negative_infinity(self) -> bool {
        matches!(self, Role::Logits)
    }

    /// Whether `value` is a fault for a tensor of this role: NaN and `±inf`, except `-inf` for
    /// [`Role::Logits`].
    pub fn is_fault(self, value: f64) -> bool {
        is_fault(value, self.allows_negative_infinity())
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A slice of any `lse` dtype, behind an object-safe interface: implemented for `[E]` for every
/// [`Element`] type `E` (and for references to such slices). Sealed: it cannot be implemented
/// outside `lse`.
///
/// Every method reads values widened to `f64` (exact for all four dtypes). The scanning methods
/// run one monomorphized pass over the data, so they cost no dynamic call per element.
pub trait ElementSlice: sealed::Sealed + Send + Sync {
    /// The number of elements.
    fn len(&self) -> usize;

    /// Whether the slice has no elements.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The dtype of the elements.
    fn dtype(&self) -> DType;

    /// Element `index` widened to `f64`, or `None` when `index` is out of bounds.
    fn value(&self, index: usize) -> Option<f64>;

    /// The elements in `range`, widened to `f64`, or `None` when the range is out of bounds.
    fn widen(&self, range: Range<usize>) -> Option<Vec<f64>>;

    /// The index and value of the first element that is NaN or `±inf` — with `-inf` skipped when
    /// `allow_negative_infinity` is set (masked logits) — or `None` when there is none.
    fn first_non_finite(&self, allow_negative_infinity: bool) -> Option<(usize, f64)>;

    /// The index and value of the largest element, where NaN ranks above `+inf` and `+inf` above
    /// every finite value (the entries a triage wants to see first); the first one on ties.
    /// `None` for an empty slice.
    fn largest(&self) -> Option<(usize, f64)>;
}

/// NaN and `+inf` always, `-inf` unless it is allowed (as a mask).
#[inline]
fn is_fault(value: f64, allow_negative_infinity: bool) -> bool {
    value.is_nan()
        || value == f64::INFINITY
        || (value == f64::NEG_INFINITY && !allow_negative_infinity)
}

/// `a` ranks above `b` in the triage order: NaN > `+inf` > finite, descending > `-inf`.
pub(crate) fn ranks_above(a: f64, b: f64) -> bool {
    match (a.is_nan(), b.is_nan()) {
        (true, false) => true,
        (_, true) => false,
        (false, false) => a > b,
    }
}

impl<E: Element> ElementSlice for [E] {
    #[inline]
    fn len(&self) -> usize {
        <[E]>::len(self)
    }

    #[inline]
    fn dtype(&self) -> DType {
        E::DTYPE
    }

    #[inline]
    fn value(&self, index: usize) -> Option<f64> {
        self.get(index).map(|x| x.to_f64())
    }

    fn widen(&self, range: Range<usize>) -> Option<Vec<f64>> {
        self.get(range)
            .map(|s| s.iter().map(|x| x.to_f64()).collect())
    }

    fn first_non_finite(&self, allow_negative_infinity: bool) -> Option<(usize, f64)> {
        self.iter().enumerate().find_map(|(i, x)| {
            let v = x.to_f64();
            is_fault(v, allow_negative_infinity).then_some((i, v))
        })
    }

    fn largest(&self) -> Option<(usize, f64)> {
        let mut best: Option<(usize, f64)> = None;
        for (i, x) in self.iter().enumerate() {
            let v = x.to_f64();
            match best {
                Some((_, b)) if !ranks_above(v, b) => {}
                _ => best = Some((i, v)),
            }
        }
        best
    }
}

impl<T: ElementSlice + ?Sized> ElementSlice for &T {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn dtype(&self) -> DType {
        (**self).dtype()
    }
    fn value(&self, index: usize) -> Option<f64> {
        (**self).value(index)
    }
    fn widen(&self, range: Range<usize>) -> Option<Vec<f64>> {
        (**self).widen(range)
    }
    fn first_non_finite(&self, allow_negative_infinity: bool) -> Option<(usize, f64)> {
        (**self).first_non_finite(allow_negative_infinity)
    }
    fn largest(&self) -> Option<(usize, f64)> {
        (**self).largest()
    }
}

/// A tensor shape that does not describe its buffer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TensorShapeError {
    /// `columns` is 0: no row can be formed (use `columns = len` for a 1-D tensor).
    #[error("tensor `{tensor}` ({len} elements) was given 0 columns: columns must be at least 1")]
    ZeroColumns {
        /// The tensor's name.
        tensor: String,
        /// Its length.
        len: usize,
    },
    /// The length is not a whole number of rows.
    #[error("tensor `{tensor}` has {len} elements, which is not a multiple of {columns} columns")]
    Ragged {
        /// The tensor's name.
        tensor: String,
        /// Its length.
        len: usize,
        /// The column count given.
        columns: usize,
    },
}

/// Checks that a buffer of `len` elements splits into rows of `columns`.
pub(crate) fn check_shape(
    tensor: &str,
    len: usize,
    columns: usize,
) -> Result<(), TensorShapeError> {
    if columns == 0 {
        Err(TensorShapeError::ZeroColumns {
            tensor: tensor.to_owned(),
            len,
        })
    } else if !len.is_multiple_of(columns) {
        Err(TensorShapeError::Ragged {
            tensor: tensor.to_owned(),
            len,
            columns,
        })
    } else {
        Ok(())
    }
}

/// A named, typed, row-major view of one tensor of any dtype.
///
/// A training step mixes dtypes (an `f32` input batch, `f16` logits, an `f32` loss, `bf16`
/// gradients). [`TensorView`] erases the dtype behind the object-safe [`ElementSlice`] trait, so
/// that tensors of any [`Element`] type can sit in one list, and gives them a name, a [`Role`] and
/// a row-major shape (`rows × columns`) so that a finding can be reported as *which tensor, which
/// row, which column, which value*.
///
/// ```
/// use lse::guard::{Role, TensorView};
/// use lse::f16;
///
/// let logits = [f16::from_f32(1.0), f16::NEG_INFINITY, f16::NAN, f16::from_f32(2.0)];
/// let view = TensorView::new("logits", Role::Logits, &logits, 2)?;
/// let bad = view.first_non_finite().expect("the NaN");
/// assert_eq!((bad.row, bad.column), (1, 0)); // the -inf at (0, 1) is a mask, not a fault
/// # Ok::<(), lse::guard::TensorShapeError>(())
/// ```
pub struct TensorView<'a> {
    name: &'a str,
    role: Role,
    data: Box<dyn ElementSlice + 'a>,
    columns: usize,
}

impl<'a> TensorView<'a> {
    /// A view of `data` (`rows × columns`, row-major) named `name`. Use `columns = data.len()` for
    /// a 1-D tensor (a bias, a per-row loss read as one row) or `columns = 1` for one value per
    /// row.
    ///
    /// # Errors
    /// [`TensorShapeError::ZeroColumns`] when `columns` is 0, [`TensorShapeError::Ragged`] when
    /// `data.len()` is not a multiple of `columns`.
    ///
    /// # Panics
    /// Never.
    pub fn new<E: Element>(
        name: &'a str,
        role: Role,
        data: &'a [E],
        columns: usize,
    ) -> Result<Self, TensorShapeError> {
        Self::boxed(name, role, Box::new(data), columns)
    }

    /// A view of a type-erased slice (see [`TensorView::new`]).
    ///
    /// # Errors
    /// As [`TensorView::new`].
    ///
    /// # Panics
    /// Never.
    pub fn from_dyn(
        name: &'a str,
        role: Role,
        data: &'a dyn ElementSlice,
        columns: usize,
    ) -> Result<Self, TensorShapeError> {
        Self::boxed(name, role, Box::new(data), columns)
    }

    /// Checks the shape, then wraps `data`: the one constructor both public ones go through.
    fn boxed(
        name: &'a str,
        role: Role,
        data: Box<dyn ElementSlice + 'a>,
        columns: usize,
    ) -> Result<Self, TensorShapeError> {
        check_shape(name, data.len(), columns)?;
        Ok(TensorView {
            name,
            role,
            data,
            columns,
        })
    }

    /// A one-element view of a scalar (a reduced loss), shape `1 × 1`.
    pub fn scalar<E: Element>(name: &'a str, role: Role, value: &'a E) -> Self {
        TensorView {
            name,
            role,
            data: Box::new(core::slice::from_ref(value)),
            columns: 1,
        }
    }

    /// The tensor's name.
    pub fn name(&self) -> &'a str {
        self.name
    }

    /// The tensor's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The dtype of the elements.
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    /// The type-erased elements.
    pub fn data(&self) -> &dyn ElementSlice {
        &*self.data
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The number of columns (the length of a row).
    pub fn columns(&self) -> usize {
        self.columns
    }

    /// The number of rows.
    pub fn rows(&self) -> usize {
        self.data.len() / self.columns
    }

    /// The element at `(row, column)`, widened to `f64`; `None` out of bounds.
    pub fn get(&self, row: usize, column: usize) -> Option<f64> {
        if column >= self.columns {
            return None;
        }
        let index = row.checked_mul(self.columns)?.checked_add(column)?;
        self.data.value(index)
    }

    /// Row `row`, widened to `f64`; `None` out of bounds.
    pub fn row(&self, row: usize) -> Option<Vec<f64>> {
        let start = row.checked_mul(self.columns)?;
        self.data.widen(start..start.checked_add(self.columns)?)
    }

    /// The first non-finite entry in row-major order, or `None` when the tensor is finite.
    ///
    /// NaN, `+inf` and `-inf` are non-finite, except `-inf` in a [`Role::Logits`] tensor, which is
    /// a mask (the contract of every `lse` op). One pass over the data; stops at the first hit.
    pub fn first_non_finite(&self) -> Option<NonFiniteValue> {
        let allow = self.role.allows_negative_infinity();
        let (index, value) = self.data.first_non_finite(allow)?;
        Some(self.locate(index, value))
    }

    /// A [`NonFiniteValue`] record for element `index` of this tensor holding `value`.
    pub(crate) fn locate(&self, index: usize, value: f64) -> NonFiniteValue {
        NonFiniteValue {
            tensor: self.name.to_owned(),
            role: self.role,
            dtype: self.dtype(),
            index,
            row: index / self.columns,
            column: index % self.columns,
            value,
        }
    }
}

impl fmt::Debug for TensorView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TensorView")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("dtype", &self.dtype())
            .field("rows", &self.rows())
            .field("columns", &self.columns)
            .finish()
    }
}

/// Where a tensor holds a non-finite value: the tensor, its role and dtype, the flat index, the
/// row (`index / columns`), the column (`index % columns`) and the value.
///
/// In JSON, a non-finite `value` is written as the string `"NaN"`, `"inf"` or `"-inf"` (JSON has
/// no such numbers).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NonFiniteValue {
    /// The tensor's name.
    pub tensor: String,
    /// The tensor's role.
    pub role: Role,
    /// The tensor's dtype.
    pub dtype: DType,
    /// The flat, row-major index of the entry.
    pub index: usize,
    /// Its row.
    pub row: usize,
    /// Its column.
    pub column: usize,
    /// The value found, widened to `f64`.
    #[serde(serialize_with = "json_f64::serialize")]
    pub value: f64,
}

impl fmt::Display for NonFiniteValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at row {}, column {} of `{}` ({}, {})",
            self.value, self.row, self.column, self.tensor, self.role, self.dtype
        )
    }
}

/// `value` (an element of a `dtype` tensor, widened to `f64`) written as briefly as its dtype
/// allows: the shortest decimal that round-trips in `f32` for the 32- and 16-bit dtypes (whose
/// values are all exact `f32`s), in `f64` for `f64`; exponent notation beyond `[1e-4, 1e6)`.
pub(crate) fn fmt_value(value: f64, dtype: DType) -> String {
    let magnitude = value.abs();
    let exponent = value.is_finite() && value != 0.0 && !(1e-4..1e6).contains(&magnitude);
    match (dtype, exponent) {
        (DType::F64, false) => format!("{value}"),
        (DType::F64, true) => format!("{value:e}"),
        (_, false) => format!("{}", value as f32),
        (_, true) => format!("{:e}", value as f32),
    }
}

/// Serializes `f64` so that non-finite values survive JSON: finite values as numbers, NaN as
/// `"NaN"`, infinities as `"inf"` / `"-inf"` (serde_json would write `null`).
pub(crate) mod json_f64 {
    use serde::Serializer;

    /// Serializes one `f64` (see the module docs).
    pub(crate) fn serialize<S: Serializer>(value: &f64, serializer: S) -> Result<S::Ok, S::Error> {
        if value.is_finite() {
            serializer.serialize_f64(*value)
        } else if value.is_nan() {
            serializer.serialize_str("NaN")
        } else if *value > 0.0 {
            serializer.serialize_str("inf")
        } else {
            serializer.serialize_str("-inf")
        }
    }

    /// Serializes an optional `f64` (see the module docs).
    pub(crate) fn serialize_option<S: Serializer>(
        value: &Option<f64>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(v) => serialize(v, serializer),
            None => serializer.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    #[test]
    fn roles_and_masks() {
        assert!(!Role::Logits.is_fault(f64::NEG_INFINITY));
        assert!(Role::Gradient.is_fault(f64::NEG_INFINITY));
        assert!(Role::Logits.is_fault(f64::NAN));
        assert!(!Role::Loss.is_fault(3.0));
    }

    #[test]
    fn views_of_every_dtype_locate_the_first_fault() {
        let a = [0.0f64, 1.0, f64::INFINITY, f64::NAN];
        let b = [0.0f32, f32::NEG_INFINITY, 2.0, f32::NAN];
        let c = [f16::ZERO, f16::ONE, f16::ONE, f16::NAN];
        let d = [bf16::ZERO, bf16::INFINITY, bf16::ONE, bf16::ONE];
        let views = [
            TensorView::new("a", Role::Other, &a, 2).unwrap(),
            TensorView::new("b", Role::Logits, &b, 2).unwrap(),
            TensorView::new("c", Role::Gradient, &c, 4).unwrap(),
            TensorView::new("d", Role::Input, &d, 1).unwrap(),
        ];
        let found: Vec<_> = views
            .iter()
            .map(|v| v.first_non_finite().map(|e| (e.row, e.column)))
            .collect();
        assert_eq!(
            found,
            [Some((1, 0)), Some((1, 1)), Some((0, 3)), Some((1, 0))]
        );
        assert_eq!(views[2].dtype(), DType::F16);
        let row = views[0].row(1).unwrap();
        assert!(row[0] == f64::INFINITY && row[1].is_nan());
        assert_eq!(views[0].row(2), None);
        assert_eq!(views[3].get(1, 0), Some(f64::INFINITY));
        assert_eq!(views[3].get(0, 1), None);
        assert!(b.largest().is_some_and(|(i, v)| i == 3 && v.is_nan()));
        assert_eq!(a[..2].largest(), Some((1, 1.0)));
    }

    #[test]
    fn shapes_are_checked() {
        let x = [1.0f32; 6];
        assert!(matches!(
            TensorView::new("x", Role::Other, &x, 0),
            Err(TensorShapeError::ZeroColumns { len: 6, .. })
        ));
        assert!(matches!(
            TensorView::new("x", Role::Other, &x, 4),
            Err(TensorShapeError::Ragged { columns: 4, .. })
        ));
        let loss = 2.5f32;
        assert_eq!(TensorView::scalar("loss", Role::Loss, &loss).rows(), 1);
    }
}
