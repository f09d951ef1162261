//! Tensors in files for lse's tools (the `lse` command, the MPI and GPU examples, the fuzz
//! targets): [`npy`] (NumPy's `.npy`, read and written, `bf16` included) and [`safetensors`]
//! (read); [`stream`] reads either a piece at a time (positioned reads), for files larger than
//! memory.
//!
//! A reader takes the whole file as a byte slice and returns a [`Tensor`]: its shape, its elements
//! in row-major (C) order and what the file called their type. Sizes declared by a file (shape,
//! header length, data offsets) are checked against the slice's length with overflow-checked
//! arithmetic before anything is allocated, so the memory a read takes is bounded by the file's
//! own size.

pub mod layout;
pub mod npy;
pub mod safetensors;
pub mod stream;

use core::fmt;

use lse::{bf16, f16, DType};

/// The file format a tensor was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// NumPy's `.npy`.
    Npy,
    /// Hugging Face's `.safetensors`.
    Safetensors,
}

impl Format {
    /// The format of a file, from its extension (`.npy`, `.safetensors`; any case).
    pub fn from_path(path: &std::path::Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?;
        if ext.eq_ignore_ascii_case("npy") {
            Some(Format::Npy)
        } else if ext.eq_ignore_ascii_case("safetensors") {
            Some(Format::Safetensors)
        } else {
            None
        }
    }

    /// The lowercase name (`npy`, `safetensors`).
    pub const fn name(self) -> &'static str {
        match self {
            Format::Npy => "npy",
            Format::Safetensors => "safetensors",
        }
    }
}

/// The elements of a tensor, in row-major order.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    /// `f64` elements.
    F64(Vec<f64>),
    /// `f32` elements.
    F32(Vec<f32>),
    /// `f16` elements.
    F16(Vec<f16>),
    /// `bf16` elements.
    BF16(Vec<bf16>),
    /// Integer elements of any width and signedness, widened to `i64`.
    Int(Vec<i64>),
}

impl TensorData {
    /// The number of elements.
    pub fn len(&self) -> usize {
        match self {
            TensorData::F64(v) => v.len(),
            TensorData::F32(v) => v.len(),
            TensorData::F16(v) => v.len(),
            TensorData::BF16(v) => v.len(),
            TensorData::Int(v) => v.len(),
        }
    }

    /// True when there is no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The float dtype of the elements; `None` for integers.
    pub fn dtype(&self) -> Option<DType> {
        match self {
            TensorData::F64(_) => Some(DType::F64),
            TensorData::F32(_) => Some(DType::F32),
            TensorData::F16(_) => Some(DType::F16),
            TensorData::BF16(_) => Some(DType::BF16),
            TensorData::Int(_) => None,
        }
    }

    /// The float elements widened to `f64` (exact); `None` for integers.
    pub fn to_f64(&self) -> Option<Vec<f64>> {
        use lse::Element;
        fn widen<E: Element>(v: &[E]) -> Vec<f64> {
            v.iter().map(|x| x.to_f64()).collect()
        }
        match self {
            TensorData::F64(v) => Some(v.clone()),
            TensorData::F32(v) => Some(widen(v)),
            TensorData::F16(v) => Some(widen(v)),
            TensorData::BF16(v) => Some(widen(v)),
            TensorData::Int(_) => None,
        }
    }
}

/// What an element type is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    Float,
    BFloat,
    Signed,
    Unsigned,
}

/// How the elements of a tensor are stored in a file: kind, size in bytes, byte order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Encoding {
    pub(crate) kind: Kind,
    pub(crate) size: usize,
    pub(crate) big_endian: bool,
}

impl Encoding {
    /// Little-endian `bf16`.
    pub(crate) const BF16_LE: Encoding = Encoding {
        kind: Kind::BFloat,
        size: 2,
        big_endian: false,
    };

    /// Bytes per element.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The float dtype of the elements; `None` for integers.
    pub fn dtype(&self) -> Option<DType> {
        match (self.kind, self.size) {
            (Kind::Float, 8) => Some(DType::F64),
            (Kind::Float, 4) => Some(DType::F32),
            (Kind::Float, _) => Some(DType::F16),
            (Kind::BFloat, _) => Some(DType::BF16),
            _ => None,
        }
    }

    /// True when the stored byte order is this machine's: floats are then copied as they are.
    fn native(&self) -> bool {
        self.big_endian == cfg!(target_endian = "big")
    }

    /// Decodes `bytes` (a whole number of elements; a partial element at the end is ignored)
    /// into tensor data.
    ///
    /// # Errors
    /// [`FormatError::IntegerOutOfRange`] for an unsigned 64-bit value above `i64::MAX` (its
    /// index counted from the start of `bytes`).
    pub fn decode(&self, bytes: &[u8]) -> Result<TensorData, FormatError> {
        let el = self;
        // The byte order is chosen outside the loop, so that the little-endian one compiles to
        // a plain copy (a per-element branch kept it scalar: a third of an audit's time).
        macro_rules! each {
            ($n:literal, |$a:ident| $value:expr) => {
                if el.big_endian {
                    let flip = |c: &[u8]| {
                        let mut a: [u8; $n] = array(c);
                        a.reverse();
                        a
                    };
                    bytes
                        .chunks_exact($n)
                        .map(|c| {
                            let $a = flip(c);
                            $value
                        })
                        .collect()
                } else {
                    bytes
                        .chunks_exact($n)
                        .map(|c| {
                            let $a: [u8; $n] = array(c);
                            $value
                        })
                        .collect()
                }
            };
        }
        Ok(match (el.kind, el.size) {
            (Kind::Float, 8) if el.native() => TensorData::F64(copied(bytes)),
            (Kind::Float, 4) if el.native() => TensorData::F32(copied(bytes)),
            (Kind::Float, _) if el.native() => TensorData::F16(copied(bytes)),
            (Kind::BFloat, _) if el.native() => TensorData::BF16(copied(bytes)),
            (Kind::Float, 8) => TensorData::F64(each!(8, |a| f64::from_le_bytes(a))),
            (Kind::Float, 4) => TensorData::F32(each!(4, |a| f32::from_le_bytes(a))),
            (Kind::Float, _) => TensorData::F16(each!(2, |a| f16::from_le_bytes(a))),
            (Kind::BFloat, _) => TensorData::BF16(each!(2, |a| bf16::from_le_bytes(a))),
            (Kind::Signed, 1) => TensorData::Int(each!(1, |a| i64::from(i8::from_le_bytes(a)))),
            (Kind::Signed, 2) => TensorData::Int(each!(2, |a| i64::from(i16::from_le_bytes(a)))),
            (Kind::Signed, 4) => TensorData::Int(each!(4, |a| i64::from(i32::from_le_bytes(a)))),
            (Kind::Signed, _) => TensorData::Int(each!(8, |a| i64::from_le_bytes(a))),
            (Kind::Unsigned, 1) => TensorData::Int(each!(1, |a| i64::from(a[0]))),
            (Kind::Unsigned, 2) => TensorData::Int(each!(2, |a| i64::from(u16::from_le_bytes(a)))),
            (Kind::Unsigned, 4) => TensorData::Int(each!(4, |a| i64::from(u32::from_le_bytes(a)))),
            (Kind::Unsigned, _) => {
                let wide: Vec<u64> = each!(8, |a| u64::from_le_bytes(a));
                let narrow = wide
                    .iter()
                    .enumerate()
                    .map(|(index, &value)| {
                        i64::try_from(value)
                            .map_err(|_| FormatError::IntegerOutOfRange { index, value })
                    })
                    .collect::<Result<Vec<i64>, _>>()?;
                TensorData::Int(narrow)
            }
        })
    }
}

/// A tensor read from a file.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// The dimensions; empty for a 0-d array (one element).
    pub shape: Vec<usize>,
    /// The elements in row-major order (`shape`'s product of them).
    pub data: TensorData,
    /// The element type as the file wrote it: a `.npy` descr (`<f4`, `bfloat16`, `<V2`) or a
    /// safetensors dtype (`F32`, `BF16`).
    pub stored_as: String,
    /// The format it was read from.
    pub format: Format,
}

/// An element type that `.npy` files can hold and [`npy::encode`] can write: the four float
/// dtypes of `lse`, plus `i64` and `i32` (class-index targets).
pub trait NpyElement: Copy + sealed::Sealed {
    /// Bytes per element.
    const SIZE: usize;

    /// The `.npy` descr that [`npy::encode`] writes (`<f4`, …); `bf16` is written as `style` says.
    fn descr(style: npy::Bf16Descr) -> &'static str;

    /// Appends the little-endian bytes of `self` to `out`.
    fn put_le(self, out: &mut Vec<u8>);
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f64 {}
    impl Sealed for f32 {}
    impl Sealed for lse::f16 {}
    impl Sealed for lse::bf16 {}
    impl Sealed for i64 {}
    impl Sealed for i32 {}
}

macro_rules! npy_element {
    ($t:ty, $descr:literal, |$x:ident| $bytes:expr) => {
        impl NpyElement for $t {
            const SIZE: usize = core::mem::size_of::<$t>();
            fn descr(_: npy::Bf16Descr) -> &'static str {
                $descr
            }
            fn put_le(self, out: &mut Vec<u8>) {
                let $x = self;
                out.extend_from_slice(&$bytes);
            }
        }
    };
}

npy_element!(f64, "<f8", |x| x.to_le_bytes());
npy_element!(f32, "<f4", |x| x.to_le_bytes());
npy_element!(f16, "<f2", |x| x.to_le_bytes());
npy_element!(i64, "<i8", |x| x.to_le_bytes());
npy_element!(i32, "<i4", |x| x.to_le_bytes());

impl NpyElement for bf16 {
    const SIZE: usize = 2;
    fn descr(style: npy::Bf16Descr) -> &'static str {
        style.descr()
    }
    fn put_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

/// A float element type that a [`TensorData`] can hold: lets generic code take its elements out
/// and put results back.
pub trait FloatElement: lse::Element + NpyElement {
    /// The elements of `data` when they are of this type; `data` back otherwise.
    ///
    /// # Errors
    /// `data` itself, unchanged, when it holds another type.
    fn take(data: TensorData) -> Result<Vec<Self>, TensorData>;

    /// `values` wrapped as tensor data.
    fn wrap(values: Vec<Self>) -> TensorData;
}

macro_rules! float_element {
    ($t:ty, $variant:ident) => {
        impl FloatElement for $t {
            fn take(data: TensorData) -> Result<Vec<Self>, TensorData> {
                match data {
                    TensorData::$variant(v) => Ok(v),
                    other => Err(other),
                }
            }
            fn wrap(values: Vec<Self>) -> TensorData {
                TensorData::$variant(values)
            }
        }
    };
}

float_element!(f64, F64);
float_element!(f32, F32);
float_element!(f16, F16);
float_element!(bf16, BF16);

/// Everything that can be wrong with a tensor file, or with a tensor handed to a writer.
///
/// Each variant prints as one line that says what is wrong and where.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FormatError {
    /// The file ends before `what` is complete.
    Truncated {
        /// The part that is cut off (`"the magic string"`, `"the header"`, …).
        what: &'static str,
        /// The bytes it needs, counted from the start of the file.
        needed: u64,
        /// The length of the file.
        available: u64,
    },
    /// The file does not start with the magic string of its format.
    BadMagic {
        /// The format expected.
        format: Format,
        /// The first bytes found (at most 8).
        found: Vec<u8>,
    },
    /// An `.npy` format version this reader does not know (it knows 1.0, 2.0 and 3.0).
    UnsupportedVersion {
        /// Major version byte.
        major: u8,
        /// Minor version byte.
        minor: u8,
    },
    /// The header (the Python dict of `.npy`, the JSON of safetensors) is malformed.
    BadHeader {
        /// The format.
        format: Format,
        /// What is wrong.
        message: String,
    },
    /// An element type the readers do not support (complex, strings, structured, 8-bit floats…).
    UnsupportedDtype {
        /// The type as the file writes it.
        dtype: String,
        /// Why it is not supported, or what it is.
        reason: String,
    },
    /// A `.npy` descr of 2-byte void (`<V2`, `|V2`): what `np.save` writes for
    /// `ml_dtypes.bfloat16`, but any 2-byte opaque data looks the same, so it is read as `bf16`
    /// only when asked to ([`npy::ReadOptions::void_as_bf16`]).
    AmbiguousVoid {
        /// The descr found.
        descr: String,
    },
    /// The shape declares more elements or bytes than a `usize` holds.
    SizeOverflow {
        /// The declared dimensions.
        shape: Vec<u64>,
        /// Bytes per element.
        element_size: u64,
    },
    /// The data section's length is not what the header declares.
    SizeMismatch {
        /// What was measured (`"shape (2, 3) of '<f4'"`).
        what: String,
        /// The bytes declared.
        expected: u64,
        /// The bytes present.
        actual: u64,
    },
    /// A safetensors header length that is larger than the file.
    HeaderTooLong {
        /// The declared header length.
        declared: u64,
        /// The bytes that follow the length field.
        available: u64,
    },
    /// A safetensors tensor whose `data_offsets` are not a valid range of the data section.
    BadOffsets {
        /// The tensor.
        tensor: String,
        /// The declared start.
        start: u64,
        /// The declared end.
        end: u64,
        /// What is wrong with them.
        message: String,
    },
    /// A tensor name the file does not hold.
    NoSuchTensor {
        /// The name asked for.
        name: String,
        /// The names the file holds.
        available: Vec<String>,
    },
    /// An unsigned 64-bit value too large for `i64`.
    IntegerOutOfRange {
        /// Its position in the flat data.
        index: usize,
        /// The value.
        value: u64,
    },
    /// A writer or layout function was given data whose length does not match the shape.
    ShapeMismatch {
        /// The shape.
        shape: Vec<usize>,
        /// The number of elements given.
        len: usize,
    },
}

/// A shape written as Python writes a tuple: `()`, `(3,)`, `(2, 3)`.
pub fn shape_string<T: fmt::Display>(shape: &[T]) -> String {
    match shape {
        [] => "()".to_owned(),
        [one] => format!("({one},)"),
        _ => {
            let dims: Vec<String> = shape.iter().map(ToString::to_string).collect();
            format!("({})", dims.join(", "))
        }
    }
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatError::Truncated {
                what,
                needed,
                available,
            } => write!(
                f,
                "truncated file: {what} needs {needed} bytes, the file has {available}"
            ),
            FormatError::BadMagic { format, found } => {
                let found: String = found.iter().flat_map(|b| b.escape_ascii()).map(char::from).collect();
                match format {
                    Format::Npy => write!(
                        f,
                        "not a .npy file: it starts with b\"{found}\", not the magic string \\x93NUMPY"
                    ),
                    Format::Safetensors => write!(f, "not a safetensors file: it starts with b\"{found}\""),
                }
            }
            FormatError::UnsupportedVersion { major, minor } => write!(
                f,
                "unsupported .npy format version {major}.{minor} (known: 1.0, 2.0, 3.0)"
            ),
            FormatError::BadHeader { format, message } => {
                write!(f, "malformed {} header: {message}", format.name())
            }
            FormatError::UnsupportedDtype { dtype, reason } => {
                write!(f, "unsupported element type {dtype:?}: {reason}")
            }
            FormatError::AmbiguousVoid { descr } => write!(
                f,
                "element type {descr:?} is 2-byte opaque data: np.save writes ml_dtypes.bfloat16 \
                 this way, but other 2-byte data looks the same; pass --void-as-bf16 to read it \
                 as bf16 (or save with descr 'bfloat16')"
            ),
            FormatError::SizeOverflow {
                shape,
                element_size,
            } => write!(
                f,
                "shape {} of {element_size}-byte elements is larger than this machine can address",
                shape_string(shape)
            ),
            FormatError::SizeMismatch {
                what,
                expected,
                actual,
            } => write!(
                f,
                "{what}: the header declares {expected} bytes of data, the file holds {actual}"
            ),
            FormatError::HeaderTooLong {
                declared,
                available,
            } => write!(
                f,
                "the header length {declared} is larger than the rest of the file ({available} bytes)"
            ),
            FormatError::BadOffsets {
                tensor,
                start,
                end,
                message,
            } => write!(
                f,
                "tensor {tensor:?}: data_offsets [{start}, {end}] {message}"
            ),
            FormatError::NoSuchTensor { name, available } => {
                write!(f, "no tensor named {name:?}; the file holds ")?;
                if available.is_empty() {
                    f.write_str("no tensor")
                } else {
                    let names: Vec<String> = available.iter().map(|n| format!("{n:?}")).collect();
                    f.write_str(&names.join(", "))
                }
            }
            FormatError::IntegerOutOfRange { index, value } => write!(
                f,
                "element {index} is {value}, larger than the largest i64"
            ),
            FormatError::ShapeMismatch { shape, len } => write!(
                f,
                "{len} elements do not fill shape {}",
                shape_string(shape)
            ),
        }
    }
}

impl std::error::Error for FormatError {}

/// The first `N` bytes of `bytes` as an array (`bytes` must hold at least `N`; callers pass
/// `chunks_exact(N)` chunks).
#[inline]
/// The whole elements of `bytes`, stored in this machine's byte order, as floats: one copy
/// (element by element, the decode was a fifth of an audit's time).
fn copied<T: lse::Element>(bytes: &[u8]) -> Vec<T> {
    let n = bytes.len() / size_of::<T>();
    let mut out = Vec::<T>::with_capacity(n);
    // SAFETY: `out` has room for `n` elements, `bytes` holds `n · size_of::<T>()` bytes, and
    // every bit pattern is a value of the four float types.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            out.as_mut_ptr().cast::<u8>(),
            n * size_of::<T>(),
        );
        out.set_len(n);
    }
    out
}

pub(crate) fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut a = [0; N];
    a.copy_from_slice(&bytes[..N]);
    a
}
