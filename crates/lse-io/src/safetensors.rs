//! Hugging Face's `.safetensors` format: reading.
//!
//! A file is an 8-byte little-endian header length `n`, `n` bytes of JSON — an object mapping
//! each tensor name to `{"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}`, plus an
//! optional `"__metadata__"` object of strings — and the data section. Offsets are relative to the
//! data section; the tensors, sorted by offset, must tile it exactly, and each must take
//! `shape`'s product × the dtype's size bytes. [`parse`] checks all of it (the same rules as the
//! reference implementation) before any tensor is decoded, and [`Safetensors::tensor`] decodes
//! one tensor at a time. Each entry is read as the `safetensors` crate's own `TensorInfo`
//! (dtype names and sizes come from there); the checks against the file are made here, so that
//! an error names the tensor, its offsets and what the file holds.

use safetensors::tensor::{Dtype, TensorInfo};
use serde::Deserialize;
use serde_json::Value;

use super::layout::element_count;
use super::{array, shape_string, Encoding, Format, FormatError, Kind, Tensor};

/// The largest header the reference implementation accepts (100 MB).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// One tensor's entry in the header, validated against the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The tensor's name.
    pub name: String,
    /// Its dtype as the file writes it (`F32`, `BF16`, `I64`, …).
    pub dtype: String,
    /// Its dimensions.
    pub shape: Vec<usize>,
    /// Its bytes: `begin..end` of the data section.
    pub data_offsets: (usize, usize),
    /// The size of one element in bits (4 for `F4`).
    pub bits: usize,
}

impl Entry {
    /// True for the float dtypes `lse` works on: `F64`, `F32`, `F16`, `BF16`.
    pub fn is_float(&self) -> bool {
        matches!(self.dtype.as_str(), "F64" | "F32" | "F16" | "BF16")
    }

    /// How the elements are stored: the float dtypes and the integers (little-endian).
    ///
    /// # Errors
    /// [`FormatError::UnsupportedDtype`] for `BOOL`, complex and the 4-, 6- and 8-bit floats.
    pub fn encoding(&self) -> Result<Encoding, FormatError> {
        let (kind, size) = match self.dtype.as_str() {
            "F64" => (Kind::Float, 8),
            "F32" => (Kind::Float, 4),
            "F16" => (Kind::Float, 2),
            "BF16" => (Kind::BFloat, 2),
            "I8" => (Kind::Signed, 1),
            "U8" => (Kind::Unsigned, 1),
            "I16" => (Kind::Signed, 2),
            "U16" => (Kind::Unsigned, 2),
            "I32" => (Kind::Signed, 4),
            "U32" => (Kind::Unsigned, 4),
            "I64" => (Kind::Signed, 8),
            "U64" => (Kind::Unsigned, 8),
            other => {
                return Err(FormatError::UnsupportedDtype {
                    dtype: other.to_owned(),
                    reason: "supported: F64, F32, F16, BF16 and the integer types".to_owned(),
                })
            }
        };
        Ok(Encoding {
            kind,
            size,
            big_endian: false,
        })
    }
}

/// A parsed safetensors file: its entries, in the order of their data, and the data section.
#[derive(Clone, Debug)]
pub struct Safetensors<'a> {
    /// The tensors, sorted by their data offsets.
    pub entries: Vec<Entry>,
    /// The `__metadata__` object, if any.
    pub metadata: Vec<(String, String)>,
    data: &'a [u8],
}

/// The header of a safetensors file, checked against the file's length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The tensors, sorted by their data offsets.
    pub entries: Vec<Entry>,
    /// The `__metadata__` object, if any.
    pub metadata: Vec<(String, String)>,
    /// Where the data section starts, in bytes from the start of the file.
    pub data_start: u64,
}

fn bad(message: impl Into<String>) -> FormatError {
    FormatError::BadHeader {
        format: Format::Safetensors,
        message: message.into(),
    }
}

/// Parses and validates the header of a whole safetensors file; decodes no tensor.
///
/// # Errors
/// [`FormatError::Truncated`] (shorter than the 8-byte length), [`FormatError::HeaderTooLong`]
/// (a header length beyond the end of the file), [`FormatError::BadHeader`] (not UTF-8, not JSON,
/// a malformed entry, an unknown dtype, a header over [`MAX_HEADER_LEN`]),
/// [`FormatError::SizeOverflow`], [`FormatError::BadOffsets`] (offsets out of the data section,
/// overlapping, leaving gaps, or not the tensor's size) and [`FormatError::SizeMismatch`] (data
/// after the last tensor).
pub fn parse(bytes: &[u8]) -> Result<Safetensors<'_>, FormatError> {
    let Header {
        entries,
        metadata,
        data_start,
    } = parse_header(bytes, bytes.len() as u64)?;
    Ok(Safetensors {
        entries,
        metadata,
        // `parse_header` checked that the data section lies within the file.
        data: &bytes[data_start as usize..],
    })
}

/// The length of the header-length field and the header of a safetensors file of `file_len`
/// bytes whose first bytes are `head` (at least 8, or the whole file when shorter): the bytes
/// [`parse_header`] needs to see.
///
/// # Errors
/// [`FormatError::Truncated`] (shorter than the 8-byte length), [`FormatError::HeaderTooLong`],
/// [`FormatError::BadHeader`] for a header over [`MAX_HEADER_LEN`].
pub fn header_end(head: &[u8], file_len: u64) -> Result<u64, FormatError> {
    if head.len() < 8 {
        return Err(FormatError::Truncated {
            what: "the 8-byte header length",
            needed: 8,
            available: file_len.min(head.len() as u64),
        });
    }
    let declared = u64::from_le_bytes(array(&head[..8]));
    let available = file_len.saturating_sub(8);
    if declared > available {
        return Err(FormatError::HeaderTooLong {
            declared,
            available,
        });
    }
    if declared > MAX_HEADER_LEN {
        return Err(bad(format!(
            "the header is {declared} bytes, more than the format's limit of {MAX_HEADER_LEN}"
        )));
    }
    Ok(8 + declared)
}

/// Parses and validates the header of a safetensors file of `file_len` bytes whose first
/// [`header_end`] bytes (at least) are `head`: every check of [`parse`], with the data section's
/// length taken from `file_len`. Reads no tensor.
///
/// # Errors
/// Those of [`parse`].
pub fn parse_header(head: &[u8], file_len: u64) -> Result<Header, FormatError> {
    let end = header_end(head, file_len)?;
    // `end <= file_len` (checked) and `head` holds the header (the caller's part), so
    // `end <= head.len()` fits a usize; a short `head` is a truncated header.
    let Some(raw) = usize::try_from(end).ok().and_then(|end| head.get(8..end)) else {
        return Err(FormatError::Truncated {
            what: "the header",
            needed: end,
            available: head.len() as u64,
        });
    };
    let data_len = file_len.saturating_sub(end);
    let text = std::str::from_utf8(raw).map_err(|e| bad(format!("not UTF-8: {e}")))?;
    let json: Value = serde_json::from_str(text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let Value::Object(map) = json else {
        return Err(bad("the header is not a JSON object"));
    };
    let mut entries = Vec::with_capacity(map.len());
    let mut metadata = Vec::new();
    for (name, value) in map {
        if name == "__metadata__" {
            // `null` is no metadata, as in the reference implementation.
            if value.is_null() {
                continue;
            }
            let Value::Object(m) = value else {
                return Err(bad("\"__metadata__\" is not an object"));
            };
            for (k, v) in m {
                let Value::String(v) = v else {
                    return Err(bad(format!("metadata {k:?} is not a string")));
                };
                metadata.push((k, v));
            }
            continue;
        }
        entries.push(entry(name, &value)?);
    }
    entries.sort_by_key(|e| e.data_offsets);
    let mut start = 0usize;
    for e in &entries {
        let (begin, end) = e.data_offsets;
        let offsets_error = |message: String| FormatError::BadOffsets {
            tensor: e.name.clone(),
            start: begin as u64,
            end: end as u64,
            message,
        };
        if end as u64 > data_len {
            return Err(offsets_error(format!(
                "lie outside the data section ({data_len} bytes)"
            )));
        }
        if end < begin {
            return Err(offsets_error("end before they begin".to_owned()));
        }
        if begin != start {
            return Err(offsets_error(format!(
                "should begin at {start}, where the previous tensor ends (tensors must tile the \
                 data section without gaps or overlaps)"
            )));
        }
        let bits = e.bits;
        let overflow = || FormatError::SizeOverflow {
            shape: e.shape.iter().map(|&d| d as u64).collect(),
            element_size: (bits / 8) as u64,
        };
        let count = element_count(&e.shape).ok_or_else(overflow)?;
        let size_bits = count.checked_mul(bits).ok_or_else(overflow)?;
        if size_bits % 8 != 0 {
            return Err(offsets_error(format!(
                "hold {} elements of {} bits: not a whole number of bytes",
                count, bits
            )));
        }
        if end - begin != size_bits / 8 {
            return Err(offsets_error(format!(
                "hold {} bytes, but shape {} of {} takes {}",
                end - begin,
                shape_string(&e.shape),
                e.dtype,
                size_bits / 8
            )));
        }
        start = end;
    }
    if start as u64 != data_len {
        return Err(FormatError::SizeMismatch {
            what: "data section".to_owned(),
            expected: start as u64,
            actual: data_len,
        });
    }
    Ok(Header {
        entries,
        metadata,
        data_start: end,
    })
}

/// One header entry, read as the format's own `TensorInfo` (not yet checked against the data
/// section).
fn entry(name: String, value: &Value) -> Result<Entry, FormatError> {
    // An unknown dtype by its name alone (serde's message would list every known one).
    if let Some(Value::String(dtype)) = value.get("dtype") {
        if Dtype::deserialize(Value::String(dtype.clone())).is_err() {
            return Err(bad(format!("tensor {name:?} has unknown dtype {dtype:?}")));
        }
    }
    let info = TensorInfo::deserialize(value).map_err(|e| bad(format!("tensor {name:?}: {e}")))?;
    Ok(Entry {
        name,
        dtype: info.dtype.to_string(),
        bits: info.dtype.bitsize(),
        shape: info.shape,
        data_offsets: info.data_offsets,
    })
}

impl Safetensors<'_> {
    /// The names of the tensors, in the order of their data.
    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.name.clone()).collect()
    }

    /// The entry of the tensor called `name`.
    ///
    /// # Errors
    /// [`FormatError::NoSuchTensor`], listing the names the file holds.
    pub fn entry(&self, name: &str) -> Result<&Entry, FormatError> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| FormatError::NoSuchTensor {
                name: name.to_owned(),
                available: self.names(),
            })
    }

    /// The raw little-endian bytes of the tensor called `name`.
    ///
    /// # Errors
    /// [`FormatError::NoSuchTensor`].
    pub fn bytes(&self, name: &str) -> Result<&[u8], FormatError> {
        let (begin, end) = self.entry(name)?.data_offsets;
        // Checked against the data section by `parse`.
        Ok(&self.data[begin..end])
    }

    /// Decodes the tensor called `name`: floats as they are, integers widened to `i64`.
    ///
    /// # Errors
    /// [`FormatError::NoSuchTensor`]; [`FormatError::UnsupportedDtype`] for `BOOL`, complex and
    /// the 4-, 6- and 8-bit floats; [`FormatError::IntegerOutOfRange`] for a `U64` above
    /// `i64::MAX`.
    pub fn tensor(&self, name: &str) -> Result<Tensor, FormatError> {
        let e = self.entry(name)?;
        let bytes = self.bytes(name)?;
        let data = e.encoding()?.decode(bytes)?;
        Ok(Tensor {
            shape: e.shape.clone(),
            data,
            stored_as: e.dtype.clone(),
            format: Format::Safetensors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TensorData;

    fn file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn reads_tensors_in_offset_order() {
        let data: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .chain(7i64.to_le_bytes())
            .collect();
        let h = r#"{"t":{"dtype":"I64","shape":[1],"data_offsets":[8,16]},
                    "x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
                    "__metadata__":{"format":"pt"}}"#;
        let bytes = file(h, &data);
        let f = parse(&bytes).unwrap();
        assert_eq!(f.names(), ["x", "t"]);
        assert_eq!(f.metadata, [("format".to_owned(), "pt".to_owned())]);
        assert_eq!(
            f.tensor("x").unwrap().data,
            TensorData::F32(vec![1.5, -2.0])
        );
        assert_eq!(f.tensor("t").unwrap().data, TensorData::Int(vec![7]));
        let e = f.tensor("y").unwrap_err().to_string();
        assert!(e.contains("\"x\", \"t\""), "{e}");
    }

    /// A file with one tensor "x" of `dtype`, `shape` and `data_offsets` (JSON texts) and
    /// `len` zero bytes of data.
    fn one_tensor(dtype: &str, shape: &str, data_offsets: &str, len: usize) -> Vec<u8> {
        let header = format!(
            r#"{{"x":{{"dtype":"{dtype}","shape":{shape},"data_offsets":{data_offsets}}}}}"#
        );
        file(&header, &vec![0; len])
    }

    #[test]
    fn rejects_malformed_files() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![1, 0, 0], "truncated"),
            (
                file("{}", &[]).into_iter().take(9).collect(),
                "larger than the rest",
            ),
            (file("{not json", &[]), "invalid JSON"),
            (file("[1]", &[]), "not a JSON object"),
            (one_tensor("F32", "[2]", "[0,8]", 4), "outside"),
            (one_tensor("F32", "[2]", "[0,4]", 4), "takes 8"),
            (one_tensor("F32", "[1]", "[4,8]", 8), "begin at 0"),
            (one_tensor("F32", "[1]", "[0,4]", 8), "the file holds 8"),
            (one_tensor("Q8", "[1]", "[0,1]", 1), "unknown dtype"),
            (
                one_tensor("F32", "[-1]", "[0,4]", 4),
                "tensor \"x\": invalid value: integer `-1`",
            ),
            (
                one_tensor("F32", "[1]", "[0]", 4),
                "tensor \"x\": invalid length 1",
            ),
            (
                file(r#"{"x":{"dtype":"F32","data_offsets":[0,4]}}"#, &[0; 4]),
                "tensor \"x\": missing field `shape`",
            ),
            (
                one_tensor("F32", "[1099511627776,1099511627776]", "[0,4]", 4),
                "larger than this machine",
            ),
        ];
        for (bytes, want) in cases {
            let e = parse(&bytes).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} does not contain {want:?}");
            assert!(!e.contains('\n'), "{e}");
        }
        let huge = u64::MAX.to_le_bytes();
        assert!(matches!(
            parse(&huge),
            Err(FormatError::HeaderTooLong { .. })
        ));
        let f8 = one_tensor("F8_E4M3", "[2]", "[0,2]", 2);
        let parsed = parse(&f8).unwrap();
        let e = parsed.tensor("x").unwrap_err();
        assert!(matches!(e, FormatError::UnsupportedDtype { .. }));
    }
}
