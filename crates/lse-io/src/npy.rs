//! NumPy's `.npy` format, versions 1.0, 2.0 and 3.0: reading ([`parse`]) and writing
//! ([`encode`]).
//!
//! A file is the magic string `\x93NUMPY`, two version bytes, the header length (2 bytes
//! little-endian in version 1.0, 4 bytes in 2.0 and 3.0), the header — a Python dict literal
//! `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }` padded with spaces and ended by
//! `\n` so that the data starts at a multiple of 64 bytes — and the raw elements.
//!
//! Element types read: `f8`, `f4`, `f2` (either byte order), the signed and unsigned integers of
//! 1, 2, 4 and 8 bytes (widened to `i64`), and `bf16`, which is not a NumPy type. A `bf16` array is
//! recognised by the descr `'bfloat16'` (what a header written with `str(a.dtype)` of an
//! `ml_dtypes.bfloat16` array holds; NumPy loads it once `ml_dtypes` is imported), or, only with
//! [`ReadOptions::void_as_bf16`], by the 2-byte void descr `'<V2'` that `np.save` itself writes for
//! `ml_dtypes.bfloat16` (and for any other 2-byte opaque data, hence the opt-in). [`encode`]
//! writes `bf16` with either descr ([`Bf16Descr`]).

use super::layout::{element_count, fortran_to_c};
use super::{
    array, shape_string, Encoding, Format, FormatError, Kind, NpyElement, Tensor, TensorData,
};

/// The magic string every `.npy` file starts with.
pub const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// How the data of a `.npy` file is aligned: NumPy pads the header so that the data starts at a
/// multiple of this many bytes.
pub const ALIGNMENT: usize = 64;

/// The deepest nesting of tuples, lists and dicts the header parser accepts.
const MAX_DEPTH: usize = 16;

/// The most dimensions an array may have (NumPy's own limit).
const MAX_DIMS: usize = 64;

/// How a `bf16` array is described in a `.npy` header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Bf16Descr {
    /// `'<V2'`: 2-byte void, what `np.save` writes for `ml_dtypes.bfloat16`. Loads in any NumPy
    /// as opaque 2-byte records; `a.view(ml_dtypes.bfloat16)` gives the numbers back. Read back
    /// as `bf16` only with [`ReadOptions::void_as_bf16`].
    #[default]
    Void,
    /// `'bfloat16'`: the name of the `ml_dtypes` type; unambiguous, and loads in NumPy once
    /// `ml_dtypes` is imported.
    Named,
}

impl Bf16Descr {
    /// The descr string written.
    pub const fn descr(self) -> &'static str {
        match self {
            Bf16Descr::Void => "<V2",
            Bf16Descr::Named => "bfloat16",
        }
    }

    /// How `descr` describes `bf16`, if it is one of the descrs read as `bf16`.
    pub fn of_descr(descr: &str) -> Option<Bf16Descr> {
        match descr {
            "bfloat16" => Some(Bf16Descr::Named),
            "<V2" | "|V2" | ">V2" | "=V2" | "V2" => Some(Bf16Descr::Void),
            _ => None,
        }
    }
}

/// Options of [`parse`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadOptions {
    /// Read a 2-byte void descr (`'<V2'`, `'|V2'`) as `bf16`; without it such a file is a
    /// [`FormatError::AmbiguousVoid`].
    pub void_as_bf16: bool,
}

/// The dict of a `.npy` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The format version (major, minor).
    pub version: (u8, u8),
    /// The element type (`'<f4'`, …), as written.
    pub descr: String,
    /// True when the data is in column-major (Fortran) order.
    pub fortran_order: bool,
    /// The dimensions, as declared (not yet checked against the data).
    pub shape: Vec<u64>,
    /// Where the data starts, in bytes from the start of the file.
    pub data_offset: usize,
}

/// Parses the magic string, version and header of a `.npy` file.
///
/// # Errors
/// [`FormatError::Truncated`], [`FormatError::BadMagic`], [`FormatError::UnsupportedVersion`] or
/// [`FormatError::BadHeader`].
pub fn parse_header(bytes: &[u8]) -> Result<Header, FormatError> {
    let available = bytes.len() as u64;
    let prefix = &bytes[..bytes.len().min(MAGIC.len())];
    if prefix != &MAGIC[..prefix.len()] {
        return Err(FormatError::BadMagic {
            format: Format::Npy,
            found: bytes[..bytes.len().min(8)].to_vec(),
        });
    }
    if bytes.len() < 8 {
        return Err(FormatError::Truncated {
            what: "the magic string and version",
            needed: 8,
            available,
        });
    }
    let version = (bytes[6], bytes[7]);
    let (len_bytes, utf8) = match version {
        (1, 0) => (2, false),
        (2, 0) => (4, false),
        (3, 0) => (4, true),
        (major, minor) => return Err(FormatError::UnsupportedVersion { major, minor }),
    };
    let start = 8 + len_bytes;
    if bytes.len() < start {
        return Err(FormatError::Truncated {
            what: "the header length",
            needed: start as u64,
            available,
        });
    }
    let header_len = if len_bytes == 2 {
        u64::from(u16::from_le_bytes(array(&bytes[8..10])))
    } else {
        u64::from(u32::from_le_bytes(array(&bytes[8..12])))
    };
    let end = start as u64 + header_len;
    if end > available {
        return Err(FormatError::Truncated {
            what: "the header",
            needed: end,
            available,
        });
    }
    // `end <= bytes.len()`, so it fits a usize.
    let data_offset = end as usize;
    let raw = &bytes[start..data_offset];
    let text: String = if utf8 {
        std::str::from_utf8(raw)
            .map_err(|e| bad_header(format!("not UTF-8: {e}")))?
            .to_owned()
    } else {
        // Versions 1 and 2 are latin-1.
        raw.iter().map(|&b| char::from(b)).collect()
    };
    let (descr, fortran_order, shape) = header_dict(&text)?;
    Ok(Header {
        version,
        descr,
        fortran_order,
        shape,
        data_offset,
    })
}

fn bad_header(message: impl Into<String>) -> FormatError {
    FormatError::BadHeader {
        format: Format::Npy,
        message: message.into(),
    }
}

fn element(descr: &str, options: ReadOptions) -> Result<Encoding, FormatError> {
    let unsupported = |reason: &str| FormatError::UnsupportedDtype {
        dtype: descr.to_owned(),
        reason: reason.to_owned(),
    };
    if descr == "bfloat16" {
        return Ok(Encoding::BF16_LE);
    }
    let (order, rest) = match descr.as_bytes().first() {
        Some(&c @ (b'<' | b'>' | b'|' | b'=')) => (c, &descr[1..]),
        _ => (b'=', descr),
    };
    let mut chars = rest.chars();
    let code = chars.next().ok_or_else(|| unsupported("empty type code"))?;
    let size: usize = chars.as_str().parse().map_err(|_| {
        unsupported("not a simple NumPy type code such as '<f4' (named or structured types are not supported)")
    })?;
    let big_endian = order == b'>';
    let (kind, sizes): (Kind, &[usize]) = match code {
        'f' => (Kind::Float, &[2, 4, 8]),
        'i' => (Kind::Signed, &[1, 2, 4, 8]),
        'u' => (Kind::Unsigned, &[1, 2, 4, 8]),
        'V' if size == 2 && options.void_as_bf16 => (Kind::BFloat, &[2]),
        'V' if size == 2 => {
            return Err(FormatError::AmbiguousVoid {
                descr: descr.to_owned(),
            })
        }
        'V' => return Err(unsupported("opaque (void) data")),
        'b' | '?' => return Err(unsupported("booleans")),
        'c' => return Err(unsupported("complex numbers")),
        'S' | 'a' | 'U' => return Err(unsupported("strings")),
        'O' => return Err(unsupported("Python objects")),
        'M' | 'm' => return Err(unsupported("dates or time deltas")),
        _ => return Err(unsupported("unknown type code")),
    };
    if !sizes.contains(&size) {
        let reason = match kind {
            Kind::Float => "floats of 2, 4 or 8 bytes are supported",
            _ => "integers of 1, 2, 4 or 8 bytes are supported",
        };
        return Err(unsupported(reason));
    }
    Ok(Encoding {
        kind,
        size,
        big_endian,
    })
}

/// A parsed `.npy` file: its header and its elements.
#[derive(Clone, Debug, PartialEq)]
pub struct NpyArray {
    /// The header.
    pub header: Header,
    /// The tensor, in row-major order whatever the file's order.
    pub tensor: Tensor,
}

/// Where a `.npy` file's data is and how to read it: its header checked against the file's
/// length, without reading the data.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    /// The header.
    pub header: Header,
    /// The dimensions (each fits a `usize`, and so do their product and its size in bytes).
    pub shape: Vec<usize>,
    /// How the elements are stored.
    pub encoding: Encoding,
}

/// The length of the magic string, version, header length and header of a `.npy` file whose
/// first bytes are `head` (at least the first 12, or the whole file when shorter): the bytes
/// [`parse_layout`] needs to see.
///
/// # Errors
/// As [`parse_header`] for the magic string, the version and the header length.
pub fn header_end(head: &[u8]) -> Result<u64, FormatError> {
    match parse_header(head) {
        Ok(header) => Ok(header.data_offset as u64),
        Err(FormatError::Truncated {
            what: "the header",
            needed,
            ..
        }) => Ok(needed),
        Err(e) => Err(e),
    }
}

/// Parses the header of a `.npy` file of `file_len` bytes whose first bytes are `head` (all of
/// its header: [`header_end`] bytes, or the whole file when shorter) and checks the size it
/// declares against `file_len`. Reads no element.
///
/// # Errors
/// Those of [`parse_header`]; [`FormatError::UnsupportedDtype`] and
/// [`FormatError::AmbiguousVoid`] for the element type; [`FormatError::SizeOverflow`] and
/// [`FormatError::SizeMismatch`] for the size.
pub fn parse_layout(
    head: &[u8],
    file_len: u64,
    options: ReadOptions,
) -> Result<Layout, FormatError> {
    let header = parse_header(head)?;
    let encoding = element(&header.descr, options)?;
    let overflow = || FormatError::SizeOverflow {
        shape: header.shape.clone(),
        element_size: encoding.size as u64,
    };
    let shape = header
        .shape
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| overflow()))
        .collect::<Result<Vec<usize>, _>>()?;
    let count = element_count(&shape).ok_or_else(overflow)?;
    let expected = count.checked_mul(encoding.size).ok_or_else(overflow)?;
    let actual = file_len.saturating_sub(header.data_offset as u64);
    if actual != expected as u64 {
        return Err(FormatError::SizeMismatch {
            what: format!("shape {} of '{}'", shape_string(&shape), header.descr),
            expected: expected as u64,
            actual,
        });
    }
    Ok(Layout {
        header,
        shape,
        encoding,
    })
}

/// Parses a whole `.npy` file.
///
/// The size the header declares (shape × element size, overflow-checked) must equal the bytes
/// that follow the header, exactly; only then are the elements decoded (Fortran-order data is
/// reordered to row-major). Integers are widened to `i64`.
///
/// # Errors
/// Those of [`parse_layout`]; [`FormatError::IntegerOutOfRange`] for a `u8` value above
/// `i64::MAX`.
pub fn parse(bytes: &[u8], options: ReadOptions) -> Result<NpyArray, FormatError> {
    let Layout {
        header,
        shape,
        encoding,
    } = parse_layout(bytes, bytes.len() as u64, options)?;
    let data = encoding.decode(&bytes[header.data_offset..])?;
    let data = if header.fortran_order {
        reorder(data, &shape)?
    } else {
        data
    };
    let tensor = Tensor {
        shape,
        data,
        stored_as: header.descr.clone(),
        format: Format::Npy,
    };
    Ok(NpyArray { header, tensor })
}

/// `data` (Fortran order of `shape`) in row-major order.
///
/// # Errors
/// [`FormatError::ShapeMismatch`] when `data` does not fill `shape`.
pub fn reorder(data: TensorData, shape: &[usize]) -> Result<TensorData, FormatError> {
    Ok(match data {
        TensorData::F64(v) => TensorData::F64(fortran_to_c(&v, shape)?),
        TensorData::F32(v) => TensorData::F32(fortran_to_c(&v, shape)?),
        TensorData::F16(v) => TensorData::F16(fortran_to_c(&v, shape)?),
        TensorData::BF16(v) => TensorData::BF16(fortran_to_c(&v, shape)?),
        TensorData::Int(v) => TensorData::Int(fortran_to_c(&v, shape)?),
    })
}

/// The bytes of a `.npy` file (format version 1.0, or 2.0 when the header needs more than
/// 65535 bytes) holding `data` with `shape`, row-major, little-endian: the header is the dict
/// `{'descr': …, 'fortran_order': False, 'shape': …, }` padded with spaces and a final `\n` so
/// that the data starts at a multiple of [`ALIGNMENT`] bytes, as NumPy writes it. A 0-d array has
/// shape `()` and one element. `bf16` data is described as `bf16` says.
///
/// # Errors
/// [`FormatError::ShapeMismatch`] when `data.len()` is not the product of `shape`.
pub fn encode<E: NpyElement>(
    shape: &[usize],
    data: &[E],
    bf16: Bf16Descr,
) -> Result<Vec<u8>, FormatError> {
    if element_count(shape) != Some(data.len()) {
        return Err(FormatError::ShapeMismatch {
            shape: shape.to_vec(),
            len: data.len(),
        });
    }
    let mut out = encode_header::<E>(shape, bf16);
    out.reserve(data.len() * E::SIZE);
    for &x in data {
        x.put_le(&mut out);
    }
    Ok(out)
}

/// The header of the file [`encode`] writes for `shape` (magic string, version, length and the
/// padded dict): the elements follow it, little-endian, row-major.
pub fn encode_header<E: NpyElement>(shape: &[usize], bf16: Bf16Descr) -> Vec<u8> {
    let dict = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {}, }}",
        E::descr(bf16),
        shape_string(shape)
    );
    // magic + version + length field, then the dict, spaces and '\n'.
    let (version, len_bytes) = if 10 + dict.len() < 65536 - ALIGNMENT {
        (1u8, 2)
    } else {
        (2u8, 4)
    };
    let prefix = MAGIC.len() + 2 + len_bytes;
    let total = (prefix + dict.len() + 1).div_ceil(ALIGNMENT) * ALIGNMENT;
    let header_len = total - prefix;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[version, 0]);
    if len_bytes == 2 {
        // Fits: checked above.
        out.extend_from_slice(&(header_len as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&(header_len as u32).to_le_bytes());
    }
    out.extend_from_slice(dict.as_bytes());
    out.resize(total - 1, b' ');
    out.push(b'\n');
    out
}

// ---------------------------------------------------------------------------------------------
// The header: a Python literal.

/// A Python literal of the header.
#[derive(Clone, Debug, PartialEq)]
enum Py {
    Str(String),
    Bool(bool),
    None,
    Int(i128),
    Tuple(Vec<Py>),
    List(Vec<Py>),
    Dict(Vec<(Py, Py)>),
}

impl Py {
    fn kind(&self) -> &'static str {
        match self {
            Py::Str(_) => "a string",
            Py::Bool(_) => "a bool",
            Py::None => "None",
            Py::Int(_) => "an integer",
            Py::Tuple(_) => "a tuple",
            Py::List(_) => "a list",
            Py::Dict(_) => "a dict",
        }
    }
}

/// Parses the header dict into (descr, fortran_order, shape).
fn header_dict(text: &str) -> Result<(String, bool, Vec<u64>), FormatError> {
    let mut p = Parser { s: text, pos: 0 };
    let value = p.value(0)?;
    p.skip_space();
    if p.pos != text.len() {
        return Err(p.error("unexpected text after the dict"));
    }
    let Py::Dict(entries) = value else {
        return Err(bad_header(format!(
            "the header is {}, not a dict",
            value.kind()
        )));
    };
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    for (key, value) in entries {
        let Py::Str(key) = key else {
            return Err(bad_header(format!("a key is {}, not a string", key.kind())));
        };
        let slot_taken = match key.as_str() {
            "descr" => descr.replace(value).is_some(),
            "fortran_order" => fortran.replace(value).is_some(),
            "shape" => shape.replace(value).is_some(),
            other => return Err(bad_header(format!("unexpected key {other:?}"))),
        };
        if slot_taken {
            return Err(bad_header(format!("key {key:?} appears twice")));
        }
    }
    let missing = |k: &str| bad_header(format!("no {k:?} key"));
    let descr = match descr.ok_or_else(|| missing("descr"))? {
        Py::Str(s) => s,
        Py::List(_) => {
            return Err(FormatError::UnsupportedDtype {
                dtype: "(structured)".to_owned(),
                reason: "structured arrays (record types) are not supported".to_owned(),
            })
        }
        other => {
            return Err(bad_header(format!(
                "'descr' is {}, not a string",
                other.kind()
            )))
        }
    };
    let fortran_order = match fortran.ok_or_else(|| missing("fortran_order"))? {
        Py::Bool(b) => b,
        other => {
            return Err(bad_header(format!(
                "'fortran_order' is {}, not True or False",
                other.kind()
            )))
        }
    };
    let shape = match shape.ok_or_else(|| missing("shape"))? {
        Py::Tuple(dims) => dims,
        other => {
            return Err(bad_header(format!(
                "'shape' is {}, not a tuple",
                other.kind()
            )))
        }
    };
    if shape.len() > MAX_DIMS {
        return Err(bad_header(format!(
            "'shape' has {} dimensions, more than NumPy's {MAX_DIMS}",
            shape.len()
        )));
    }
    let shape = shape
        .into_iter()
        .map(|d| match d {
            Py::Int(n) => u64::try_from(n)
                .map_err(|_| bad_header(format!("dimension {n} is negative or too large"))),
            other => Err(bad_header(format!(
                "a dimension is {}, not an integer",
                other.kind()
            ))),
        })
        .collect::<Result<Vec<u64>, _>>()?;
    Ok((descr, fortran_order, shape))
}

/// A recursive-descent parser of the Python literals a header holds.
struct Parser<'a> {
    s: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn error(&self, what: &str) -> FormatError {
        bad_header(format!("{what} at byte {} of the header", self.pos))
    }

    fn peek(&self) -> Option<char> {
        self.s[self.pos..].chars().next()
    }

    fn skip_space(&mut self) {
        while let Some(c) = self.peek().filter(|c| c.is_whitespace()) {
            self.pos += c.len_utf8();
        }
    }

    fn eat(&mut self, c: char) -> bool {
        self.skip_space();
        if self.peek() == Some(c) {
            self.pos += c.len_utf8();
            true
        } else {
            false
        }
    }

    fn value(&mut self, depth: usize) -> Result<Py, FormatError> {
        if depth > MAX_DEPTH {
            return Err(self.error("nesting too deep"));
        }
        self.skip_space();
        match self.peek() {
            None => Err(self.error("unexpected end")),
            Some(q @ ('\'' | '"')) => self.string(q),
            Some('(') => self.sequence('(', ')', depth).map(Py::Tuple),
            Some('[') => self.sequence('[', ']', depth).map(Py::List),
            Some('{') => self.dict(depth),
            Some(c) if c.is_ascii_digit() || c == '-' || c == '+' => self.int(),
            Some(c) if c.is_ascii_alphabetic() => {
                let start = self.pos;
                while self
                    .peek()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                {
                    self.pos += 1;
                }
                match &self.s[start..self.pos] {
                    "True" => Ok(Py::Bool(true)),
                    "False" => Ok(Py::Bool(false)),
                    "None" => Ok(Py::None),
                    word => Err(bad_header(format!("unexpected name {word:?}"))),
                }
            }
            Some(c) => Err(self.error(&format!("unexpected {c:?}"))),
        }
    }

    fn string(&mut self, quote: char) -> Result<Py, FormatError> {
        self.pos += 1;
        let mut out = String::new();
        loop {
            let c = self
                .peek()
                .ok_or_else(|| self.error("unterminated string"))?;
            self.pos += c.len_utf8();
            match c {
                c if c == quote => return Ok(Py::Str(out)),
                '\\' => {
                    let e = self
                        .peek()
                        .ok_or_else(|| self.error("unterminated string"))?;
                    match e {
                        '\\' | '\'' | '"' => {
                            self.pos += 1;
                            out.push(e);
                        }
                        _ => return Err(self.error("unsupported escape in a string")),
                    }
                }
                c => out.push(c),
            }
        }
    }

    fn int(&mut self) -> Result<Py, FormatError> {
        let start = self.pos;
        if matches!(self.peek(), Some('-' | '+')) {
            self.pos += 1;
        }
        let digits = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        if self.pos == digits {
            return Err(self.error("a sign without digits"));
        }
        let text = &self.s[start..self.pos];
        // Python 2 headers write long integers as `3L`.
        if self.peek() == Some('L') {
            self.pos += 1;
        }
        text.parse::<i128>()
            .map(Py::Int)
            .map_err(|_| bad_header(format!("integer {text} is too large")))
    }

    fn sequence(&mut self, open: char, close: char, depth: usize) -> Result<Vec<Py>, FormatError> {
        self.eat(open);
        let mut items = Vec::new();
        loop {
            if self.eat(close) {
                return Ok(items);
            }
            items.push(self.value(depth + 1)?);
            if !self.eat(',') {
                if self.eat(close) {
                    return Ok(items);
                }
                return Err(self.error(&format!("expected ',' or '{close}'")));
            }
        }
    }

    fn dict(&mut self, depth: usize) -> Result<Py, FormatError> {
        self.eat('{');
        let mut entries = Vec::new();
        loop {
            if self.eat('}') {
                return Ok(Py::Dict(entries));
            }
            let key = self.value(depth + 1)?;
            if !self.eat(':') {
                return Err(self.error("expected ':'"));
            }
            let value = self.value(depth + 1)?;
            entries.push((key, value));
            if !self.eat(',') {
                if self.eat('}') {
                    return Ok(Py::Dict(entries));
                }
                return Err(self.error("expected ',' or '}'"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lse::bf16;

    fn file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn round_trips_every_dtype() {
        let shape = [2, 3];
        let f: Vec<f32> = vec![1.0, -2.5, f32::INFINITY, f32::NAN, 0.0, -0.0];
        let bytes = encode(&shape, &f, Bf16Descr::Void).unwrap();
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let a = parse(&bytes, ReadOptions::default()).unwrap();
        assert_eq!(a.header.data_offset % ALIGNMENT, 0);
        assert_eq!(a.tensor.shape, shape);
        let TensorData::F32(back) = a.tensor.data else {
            panic!("not f32")
        };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back), bits(&f));

        let b: Vec<bf16> = f.iter().map(|&x| bf16::from_f32(x)).collect();
        for style in [Bf16Descr::Void, Bf16Descr::Named] {
            let bytes = encode(&shape, &b, style).unwrap();
            let opts = ReadOptions { void_as_bf16: true };
            let a = parse(&bytes, opts).unwrap();
            assert_eq!(a.header.descr, style.descr());
            assert_eq!(Bf16Descr::of_descr(&a.header.descr), Some(style));
            let TensorData::BF16(back) = a.tensor.data else {
                panic!("not bf16")
            };
            assert_eq!(
                back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
        }
        let void = encode(&shape, &b, Bf16Descr::Void).unwrap();
        assert!(matches!(
            parse(&void, ReadOptions::default()),
            Err(FormatError::AmbiguousVoid { .. })
        ));
        let scalar = encode(&[], &[7i64], Bf16Descr::Void).unwrap();
        let a = parse(&scalar, ReadOptions::default()).unwrap();
        assert_eq!(a.tensor.shape, Vec::<usize>::new());
        assert_eq!(a.tensor.data, TensorData::Int(vec![7]));
    }

    #[test]
    fn reads_headers_numpy_writes() {
        // Key order, Python 2 longs, big-endian data, Fortran order, version 2.
        let data: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|x| x.to_be_bytes())
            .collect();
        let h = "{'shape': (2L, 3L), 'fortran_order': True, 'descr': '>f4'}   \n";
        let a = parse(&file(h, &data), ReadOptions::default()).unwrap();
        assert_eq!(
            a.tensor.data,
            TensorData::F32(vec![1.0, 3.0, 5.0, 2.0, 4.0, 6.0])
        );
        let ints: Vec<u8> = [1u16, 65535].iter().flat_map(|x| x.to_le_bytes()).collect();
        let a = parse(
            &file(
                "{\"descr\": \"<u2\", \"fortran_order\": False, \"shape\": (2,)}",
                &ints,
            ),
            ReadOptions::default(),
        )
        .unwrap();
        assert_eq!(a.tensor.data, TensorData::Int(vec![1, 65535]));
        let big = u64::MAX.to_le_bytes();
        let e = parse(
            &file(
                "{'descr': '<u8', 'fortran_order': False, 'shape': (1,)}",
                &big,
            ),
            ReadOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(e, FormatError::IntegerOutOfRange { .. }), "{e}");
    }

    #[test]
    fn rejects_malformed_files() {
        let ok = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,)}";
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"PK\x03\x04".to_vec(), "not a .npy"),
            (b"\x93NUM".to_vec(), "truncated"),
            (b"\x93NUMPY\x09\x00".to_vec(), "version 9.0"),
            (file(ok, &[0; 7]), "declares 8 bytes"),
            (file(ok, &[0; 9]), "declares 8 bytes"),
            (file("{'descr': '<c8', 'fortran_order': False, 'shape': (1,)}", &[0; 8]), "complex"),
            (file("{'descr': '<f4', 'fortran_order': False}", &[]), "no \"shape\""),
            (file("{'descr': '<f4', 'fortran_order': False, 'shape': (-1,)}", &[]), "negative"),
            (file("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}", &[]), "unexpected key"),
            (file("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,)}", &[]), "structured"),
            (
                file("{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776, 1099511627776)}", &[0; 8]),
                "larger than this machine",
            ),
            (file("{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776, 1048576)}", &[0; 8]), "declares"),
            (file(&"(".repeat(100), &[]), "too deep"),
            (file("{'descr': '<f4'", &[]), "expected ','"),
            (file("{'descr': '<f4', ", &[]), "unexpected end"),
        ];
        for (bytes, want) in cases {
            let e = parse(&bytes, ReadOptions::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e:?} does not contain {want:?}");
            assert!(!e.contains('\n'));
        }
        let mut long = MAGIC.to_vec();
        long.extend_from_slice(&[1, 0, 0xff, 0xff, b'{']);
        let e = parse(&long, ReadOptions::default()).unwrap_err();
        assert!(
            matches!(e, FormatError::Truncated { needed: 65545, .. }),
            "{e}"
        );
    }
}
