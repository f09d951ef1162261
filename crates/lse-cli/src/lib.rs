//! The file formats of the `lse` command line, as a library: reading tensors from `.npy` and
//! `.safetensors` files and writing `.npy` files.
//!
//! The `lse` binary (`lse audit`, `lse eval`) uses these modules; they are a library so that the
//! fuzz targets (`crates/lse-cli/fuzz`) and the integration tests can call the readers on
//! arbitrary bytes. Every reader checks every size the file declares against the file's length
//! before it allocates anything, so a malformed or hostile file gives a
//! [`tensor_file::FormatError`], never a panic or a huge allocation. The readers take a byte
//! slice holding the whole file, or (for files larger than memory) its header only:
//! [`tensor_file::stream`] then reads the elements a piece at a time.

#![warn(missing_docs, clippy::missing_errors_doc, clippy::missing_panics_doc)]

pub mod tensor_file;
