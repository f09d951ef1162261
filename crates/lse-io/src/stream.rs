//! Reading tensors from a file piece by piece: the header is parsed and checked against the
//! file's length when the file is opened, and the elements are read on demand, any run of them
//! at a time, with positioned reads (`pread`) into a buffer the caller reuses.
//!
//! The file is not memory-mapped, on purpose: a mapped file that another process truncates
//! raises `SIGBUS` on the next access to a page past its new end, which kills the process. A
//! positioned read of the same bytes returns short instead, and [`TensorFile::read`] turns that
//! into [`ReadError::Shrunk`]. From the page cache a `pread` costs one copy, the same as the
//! decoding pass that follows a mapping.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::layout::element_count;
use super::npy::{self, ReadOptions};
use super::{safetensors, Encoding, Format, FormatError, TensorData};

/// One tensor of a [`TensorFile`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// Its name (`None` for the array of a `.npy` file).
    pub name: Option<String>,
    /// Its dimensions (empty for a 0-d array).
    pub shape: Vec<usize>,
    /// The element type as the file writes it (`<f4`, `BF16`, …).
    pub stored_as: String,
    /// How its elements are stored; `Err` for a type the readers do not decode (safetensors
    /// `BOOL`, 8-bit floats…).
    pub encoding: Result<Encoding, FormatError>,
    /// True for a `.npy` array in Fortran (column-major) order.
    pub fortran_order: bool,
    /// Where its data starts, in bytes from the start of the file.
    pub start: u64,
}

impl TensorInfo {
    /// The number of elements.
    pub fn len(&self) -> usize {
        // The readers checked that the data of the shape lies in the file.
        element_count(&self.shape).unwrap_or(0)
    }

    /// True when the tensor has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Its size in bytes (0 for an encoding that is not read).
    pub fn byte_len(&self) -> u64 {
        let size = self.encoding.as_ref().map_or(0, Encoding::size);
        self.len() as u64 * size as u64
    }
}

/// An open tensor file whose header has been read and checked.
#[derive(Debug)]
pub struct TensorFile {
    file: File,
    /// The file's length when it was opened.
    pub len: u64,
    /// Its format.
    pub format: Format,
    /// Its tensors (one for `.npy`; every entry, in data order, for safetensors).
    pub tensors: Vec<TensorInfo>,
}

/// Why elements could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// The file is shorter than when it was opened: it was truncated while being read.
    Shrunk {
        /// The bytes the read needed, counted from the start of the file.
        needed: u64,
        /// The length the file had when it was opened.
        opened_with: u64,
    },
    /// The elements read are not valid (an integer out of range).
    Format(FormatError),
    /// The operating system failed the read.
    Io(io::Error),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Shrunk {
                needed,
                opened_with,
            } => write!(
                f,
                "the file shrank while being read: it had {opened_with} bytes when opened, and \
                 ends before byte {needed}"
            ),
            ReadError::Format(e) => e.fmt(f),
            ReadError::Io(e) => write!(f, "cannot read: {e}"),
        }
    }
}

impl std::error::Error for ReadError {}

/// How a file could not be opened.
#[derive(Debug)]
pub enum OpenError {
    /// The file is malformed.
    Format(FormatError),
    /// The operating system failed to open or read it.
    Io(io::Error),
}

impl From<ReadError> for OpenError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Format(e) => OpenError::Format(e),
            ReadError::Io(e) => OpenError::Io(e),
            shrunk @ ReadError::Shrunk { .. } => OpenError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                shrunk.to_string(),
            )),
        }
    }
}

/// The first bytes read to find a header's length.
const HEAD: u64 = 4096;

impl TensorFile {
    /// Opens `path` as `format` and reads and checks its header (the `.npy` header, or the
    /// safetensors JSON and every entry's offsets) against the file's length.
    ///
    /// # Errors
    /// [`OpenError::Io`] when the file cannot be opened or read; [`OpenError::Format`] with the
    /// errors of [`npy::parse_layout`] or [`safetensors::parse_header`].
    pub fn open(path: &Path, format: Format, options: ReadOptions) -> Result<Self, OpenError> {
        let file = File::open(path).map_err(OpenError::Io)?;
        let len = file.metadata().map_err(OpenError::Io)?.len();
        let mut this = TensorFile {
            file,
            len,
            format,
            tensors: Vec::new(),
        };
        let mut head = Vec::new();
        this.read_bytes(0, HEAD.min(len), &mut head)?;
        let end = match format {
            Format::Npy => npy::header_end(&head),
            Format::Safetensors => safetensors::header_end(&head, len),
        }
        .map_err(OpenError::Format)?;
        if end > len {
            return Err(OpenError::Format(FormatError::Truncated {
                what: "the header",
                needed: end,
                available: len,
            }));
        }
        if end > head.len() as u64 {
            this.read_bytes(0, end, &mut head)?;
        }
        this.tensors = match format {
            Format::Npy => {
                let layout = npy::parse_layout(&head, len, options).map_err(OpenError::Format)?;
                vec![TensorInfo {
                    name: None,
                    shape: layout.shape,
                    stored_as: layout.header.descr,
                    encoding: Ok(layout.encoding),
                    fortran_order: layout.header.fortran_order,
                    start: layout.header.data_offset as u64,
                }]
            }
            Format::Safetensors => {
                let header = safetensors::parse_header(&head, len).map_err(OpenError::Format)?;
                header
                    .entries
                    .into_iter()
                    .map(|e| TensorInfo {
                        encoding: e.encoding(),
                        start: header.data_start + e.data_offsets.0 as u64,
                        name: Some(e.name),
                        shape: e.shape,
                        stored_as: e.dtype,
                        fortran_order: false,
                    })
                    .collect()
            }
        };
        Ok(this)
    }

    /// Reads bytes `start..end` of the file into `buf` (resized to fit).
    fn read_bytes(&self, start: u64, end: u64, buf: &mut Vec<u8>) -> Result<(), ReadError> {
        let count = usize::try_from(end - start).map_err(|_| {
            ReadError::Io(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "a read larger than this machine can address",
            ))
        })?;
        buf.resize(count, 0);
        match self.file.read_exact_at(buf, start) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(ReadError::Shrunk {
                needed: end,
                opened_with: self.len,
            }),
            Err(e) => Err(ReadError::Io(e)),
        }
    }

    /// Elements `first..first + count` of `tensor` (in the file's order), decoded; `buf` is
    /// scratch space for the raw bytes, kept between calls to save allocations.
    ///
    /// # Errors
    /// [`ReadError::Shrunk`] when the file no longer holds those bytes; [`ReadError::Io`];
    /// [`ReadError::Format`] for an encoding the readers do not decode or an integer out of
    /// range.
    ///
    /// # Panics
    /// When `first + count` exceeds the tensor's length (a caller's bug).
    pub fn read(
        &self,
        tensor: &TensorInfo,
        first: usize,
        count: usize,
        buf: &mut Vec<u8>,
    ) -> Result<TensorData, ReadError> {
        assert!(
            first
                .checked_add(count)
                .is_some_and(|end| end <= tensor.len()),
            "elements {first}..+{count} of a tensor of {}",
            tensor.len()
        );
        let encoding = tensor.encoding.clone().map_err(ReadError::Format)?;
        let size = encoding.size() as u64;
        let start = tensor.start + first as u64 * size;
        self.read_bytes(start, start + count as u64 * size, buf)?;
        encoding.decode(buf).map_err(ReadError::Format)
    }
}
