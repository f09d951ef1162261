//! The file inputs of `lse audit` and `lse eval`: logits from `.npy` or `.safetensors`, class
//! targets and class weights from `.npy`, and the class axis; and writing `.npy` outputs.

use std::path::{Path, PathBuf};

use lse_io::layout::{element_count, move_axis_to_last, move_last_to_axis};
use lse_io::npy::{self, ReadOptions};
use lse_io::stream::{OpenError, ReadError, TensorFile, TensorInfo};
use lse_io::{shape_string, FloatElement, Format, FormatError, Tensor, TensorData};

use crate::error::{CliError, Result};

/// The value of `--ignore-index`: a class target that marks a row as ignored, or `none`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IgnoreIndex(pub Option<i64>);

/// The clap value parser of `--ignore-index`: an integer, or `none`.
pub fn parse_ignore_index(s: &str) -> Result<IgnoreIndex, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(IgnoreIndex(None));
    }
    s.trim()
        .parse::<i64>()
        .map(|v| IgnoreIndex(Some(v)))
        .map_err(|_| format!("{s:?} is not an integer or 'none'"))
}

/// A `CliError::File` for `path`.
pub fn file_error(path: &Path, message: impl Into<String>) -> CliError {
    CliError::File {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn format_error(path: &Path) -> impl Fn(FormatError) -> CliError + '_ {
    move |error| CliError::Format {
        path: path.to_path_buf(),
        error,
    }
}

/// The whole file.
pub fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| file_error(path, format!("cannot read: {e}")))
}

/// Writes `bytes` to `path`.
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| file_error(path, format!("cannot write: {e}")))
}

/// The format of `path`: from its extension, else from its first bytes (the `.npy` magic).
fn format_of(path: &Path) -> Result<Format> {
    if let Some(f) = Format::from_path(path) {
        return Ok(f);
    }
    let mut magic = [0u8; npy::MAGIC.len()];
    let read = std::fs::File::open(path).and_then(|mut f| {
        use std::io::Read;
        f.read(&mut magic)
    });
    match read {
        Ok(n) if magic[..n] == npy::MAGIC[..] => Ok(Format::Npy),
        Ok(_) => Err(file_error(
            path,
            "unknown format: name the file .npy or .safetensors",
        )),
        Err(e) => Err(file_error(path, format!("cannot read: {e}"))),
    }
}

/// Which tensors of a file to take as logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick<'a> {
    /// The tensor of this name (`--tensor`; safetensors only).
    Named(&'a str),
    /// Every float tensor of a safetensors file.
    AllFloat,
    /// The only float tensor of a safetensors file; an error listing them when there are more.
    OnlyFloat,
}

/// A file of logits, opened: its header read and checked, no element read yet.
#[derive(Debug)]
pub struct Opened {
    /// The file.
    pub path: PathBuf,
    /// The open file and all its tensors.
    pub file: TensorFile,
    /// The tensors picked as logits (float tensors).
    pub tensors: Vec<TensorInfo>,
    /// Tensors of a safetensors file that were not picked because they are not float: (name,
    /// dtype).
    pub skipped: Vec<(String, String)>,
}

/// A `CliError` for an element read that failed.
fn read_error(path: &Path, error: ReadError) -> CliError {
    match error {
        ReadError::Format(error) => CliError::Format {
            path: path.to_path_buf(),
            error,
        },
        other => file_error(path, other.to_string()),
    }
}

/// Opens the logits of `path`: reads and checks the header, picks the tensors.
///
/// # Errors
/// [`CliError::Format`] for a malformed file or a non-float tensor, [`CliError::Usage`] for a
/// `--tensor` that does not fit the file, [`CliError::File`] for a file that cannot be read.
pub fn open_logits(path: &Path, pick: Pick<'_>, void_as_bf16: bool) -> Result<Opened> {
    let to_error = format_error(path);
    let format = format_of(path)?;
    if let (Format::Npy, Pick::Named(name)) = (format, pick) {
        return Err(CliError::usage(format!(
            "--tensor {name:?}: a .npy file holds one unnamed array; --tensor is for \
             .safetensors files"
        )));
    }
    let file =
        TensorFile::open(path, format, ReadOptions { void_as_bf16 }).map_err(|e| match e {
            OpenError::Format(e) => to_error(e),
            OpenError::Io(e) => file_error(path, format!("cannot read: {e}")),
        })?;
    let (tensors, skipped) = match format {
        Format::Npy => (
            vec![float_only(path, &file.tensors[0])?.clone()],
            Vec::new(),
        ),
        Format::Safetensors => {
            let (float, other): (Vec<_>, Vec<_>) = file.tensors.iter().partition(|t| is_float(t));
            let name = |t: &TensorInfo| t.name.clone().unwrap_or_default();
            let listing = |tensors: &[&TensorInfo]| {
                tensors
                    .iter()
                    .map(|t| format!("{:?} ({} {})", name(t), t.stored_as, shape_string(&t.shape)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let picked: Vec<TensorInfo> = match pick {
                Pick::Named(wanted) => {
                    let Some(t) = file
                        .tensors
                        .iter()
                        .find(|t| t.name.as_deref() == Some(wanted))
                    else {
                        return Err(to_error(FormatError::NoSuchTensor {
                            name: wanted.to_owned(),
                            available: file.tensors.iter().map(name).collect(),
                        }));
                    };
                    vec![float_only(path, t)
                        .map_err(|e| tensor_context(e, wanted))?
                        .clone()]
                }
                _ if float.is_empty() => {
                    let all: Vec<_> = file.tensors.iter().collect();
                    let holds = if all.is_empty() {
                        "no tensor at all".to_owned()
                    } else {
                        listing(&all)
                    };
                    return Err(file_error(
                        path,
                        format!("no float tensor (F64, F32, F16, BF16) to use as logits; the file holds {holds}"),
                    ));
                }
                Pick::OnlyFloat if float.len() > 1 => {
                    return Err(CliError::usage(format!(
                        "{} holds {} float tensors; choose one with --tensor: {}",
                        path.display(),
                        float.len(),
                        listing(&float)
                    )));
                }
                Pick::OnlyFloat | Pick::AllFloat => float.into_iter().cloned().collect(),
            };
            let skipped = match pick {
                Pick::Named(_) => Vec::new(),
                _ => other
                    .iter()
                    .map(|t| (name(t), t.stored_as.clone()))
                    .collect(),
            };
            (picked, skipped)
        }
    };
    Ok(Opened {
        path: path.to_path_buf(),
        file,
        tensors,
        skipped,
    })
}

/// True for a tensor of f64, f32, f16 or bf16 elements.
fn is_float(tensor: &TensorInfo) -> bool {
    tensor.encoding.as_ref().is_ok_and(|e| e.dtype().is_some())
}

impl Opened {
    /// The whole tensor `tensor`, in row-major order.
    ///
    /// # Errors
    /// A file error when the file shrank or cannot be read.
    pub fn read_all(&self, tensor: &TensorInfo) -> Result<Tensor> {
        let mut buf = Vec::new();
        let data = self
            .file
            .read(tensor, 0, tensor.len(), &mut buf)
            .map_err(|e| read_error(&self.path, e))?;
        drop(buf);
        let data = if tensor.fortran_order {
            npy::reorder(data, &tensor.shape).map_err(format_error(&self.path))?
        } else {
            data
        };
        Ok(Tensor {
            shape: tensor.shape.clone(),
            data,
            stored_as: tensor.stored_as.clone(),
            format: self.file.format,
        })
    }

    /// The rows of `tensor` (class axis last), read a
    /// chunk of about `chunk_bytes` of the file at a time.
    pub fn row_chunks<'a>(
        &'a self,
        tensor: &'a TensorInfo,
        layout: &'a ClassLayout,
        chunk_bytes: usize,
    ) -> RowChunks<'a> {
        // Around the class axis the tensor is (outer, classes, inner): each outer index is a
        // contiguous block of `inner` rows. A chunk is a whole number of blocks.
        let inner = element_count(&layout.shape[layout.axis + 1..]).unwrap_or(1);
        let block = layout.classes * inner;
        let size = tensor.encoding.as_ref().map_or(1, |e| e.size());
        let blocks = layout.rows.checked_div(inner).unwrap_or(0);
        let per_chunk = if tensor.fortran_order {
            // Fortran-order rows are strided over the whole file: read it at once.
            blocks
        } else {
            (chunk_bytes / (block * size).max(1)).clamp(1, blocks.max(1))
        };
        RowChunks {
            opened: self,
            tensor,
            layout,
            inner,
            block,
            blocks,
            per_chunk,
            next: 0,
            buf: Vec::new(),
        }
    }
}

/// The rows of a tensor, a chunk at a time: see [`Opened::row_chunks`].
pub struct RowChunks<'a> {
    opened: &'a Opened,
    tensor: &'a TensorInfo,
    layout: &'a ClassLayout,
    /// Rows per outer index.
    inner: usize,
    /// Elements per outer index.
    block: usize,
    /// Outer indices.
    blocks: usize,
    /// Outer indices per chunk.
    per_chunk: usize,
    /// The next outer index.
    next: usize,
    buf: Vec<u8>,
}

impl RowChunks<'_> {
    /// The file bytes of one row.
    pub fn row_bytes(&self) -> u64 {
        let size = self.tensor.encoding.as_ref().map_or(0, |e| e.size());
        (self.layout.classes * size) as u64
    }

    /// `rows` (values of whole rows of a chunk, class axis last) back in the input's layout
    /// (the inverse of the reordering of [`RowChunks::next_chunk`]).
    ///
    /// # Errors
    /// An internal error when `rows` is not a whole number of the tensor's blocks of rows.
    pub fn to_input_layout<T: Copy>(&self, rows: Vec<T>) -> Result<Vec<T>> {
        if self.inner == 1 {
            return Ok(rows);
        }
        let mut shape = vec![rows.len() / self.block.max(1)];
        shape.extend_from_slice(&self.layout.shape[self.layout.axis..]);
        move_last_to_axis(&rows, &shape, 1).map_err(|e| CliError::Other(e.to_string()))
    }

    /// The next chunk of rows (`rows × classes`, class axis last), or `None` after the last.
    ///
    /// # Errors
    /// A file error when the file shrank or cannot be read; an internal error when the
    /// elements are not of type `E`.
    pub fn next_chunk<E: FloatElement>(&mut self) -> Result<Option<Vec<E>>> {
        if self.next >= self.blocks {
            return Ok(None);
        }
        let count = self.per_chunk.min(self.blocks - self.next);
        let path = &self.opened.path;
        let data = if self.tensor.fortran_order {
            self.opened.read_all(self.tensor)?.data
        } else {
            self.opened
                .file
                .read(
                    self.tensor,
                    self.next * self.block,
                    count * self.block,
                    &mut self.buf,
                )
                .map_err(|e| read_error(path, e))?
        };
        self.next += count;
        let values = E::take(data)
            .map_err(|_| CliError::Other("the elements are not of the type asked for".into()))?;
        if self.inner == 1 {
            return Ok(Some(values));
        }
        let mut shape = vec![count];
        shape.extend_from_slice(&self.layout.shape[self.layout.axis..]);
        move_axis_to_last(&values, &shape, 1)
            .map(Some)
            .map_err(|e| CliError::Other(e.to_string()))
    }
}

/// Reads the logits of `path` whole (every picked tensor), with their names (`None` for a
/// `.npy` file).
///
/// # Errors
/// Those of [`open_logits`] and [`Opened::read_all`].
pub fn logits(
    path: &Path,
    pick: Pick<'_>,
    void_as_bf16: bool,
) -> Result<Vec<(Option<String>, Tensor)>> {
    let opened = open_logits(path, pick, void_as_bf16)?;
    opened
        .tensors
        .iter()
        .map(|t| Ok((t.name.clone(), opened.read_all(t)?)))
        .collect()
}

fn tensor_context(e: CliError, name: &str) -> CliError {
    match e {
        CliError::File { path, message } => CliError::File {
            path,
            message: format!("tensor {name:?}: {message}"),
        },
        other => other,
    }
}

fn float_only<'t>(path: &Path, tensor: &'t TensorInfo) -> Result<&'t TensorInfo> {
    if let Err(e) = &tensor.encoding {
        return Err(format_error(path)(e.clone()));
    }
    if !is_float(tensor) {
        return Err(file_error(
            path,
            format!(
                "logits must be floats (f64, f32, f16, bf16), but the elements are {:?}",
                tensor.stored_as
            ),
        ));
    }
    Ok(tensor)
}

/// Where the classes are in a tensor, and its rows once the class axis is moved last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassLayout {
    /// The tensor's shape (`[1]` for a 0-d array: one row of one class).
    pub shape: Vec<usize>,
    /// The class axis (non-negative).
    pub axis: usize,
    /// Rows: every element of the other axes.
    pub rows: usize,
    /// Classes per row.
    pub classes: usize,
}

impl ClassLayout {
    /// The layout of `shape` with class axis `axis` (negative counts from the end).
    ///
    /// # Errors
    /// A usage error for an axis out of range; a file error for an empty class axis.
    pub fn new(path: &Path, shape: &[usize], axis: i64) -> Result<Self> {
        let shape: Vec<usize> = if shape.is_empty() {
            vec![1]
        } else {
            shape.to_vec()
        };
        let ndim = shape.len() as i64;
        let resolved = if axis < 0 { axis + ndim } else { axis };
        if !(0..ndim).contains(&resolved) {
            return Err(CliError::usage(format!(
                "--axis {axis} is out of range for {} of shape {} ({ndim} dimension{})",
                path.display(),
                shape_string(&shape),
                if ndim == 1 { "" } else { "s" }
            )));
        }
        let axis = resolved as usize;
        let classes = shape[axis];
        if classes == 0 {
            return Err(file_error(
                path,
                format!(
                    "the class axis {axis} of shape {} is empty: there are no classes",
                    shape_string(&shape)
                ),
            ));
        }
        // The data fills the shape (checked by the reader), so the product fits.
        let rows = element_count(&shape).unwrap_or(0) / classes;
        Ok(Self {
            shape,
            axis,
            rows,
            classes,
        })
    }

    /// "shape (4, 3), class axis 1".
    pub fn describe(&self) -> String {
        format!(
            "shape {}, class axis {}",
            shape_string(&self.shape),
            self.axis
        )
    }
}

/// Reads class-index targets: a `.npy` of integers, one per row.
///
/// # Errors
/// A file error for a file that is not a `.npy` of integers, holds a number of targets other than
/// `layout.rows`, or holds a target that is neither a class (`0..classes`) nor the ignore index.
pub fn targets(path: &Path, layout: &ClassLayout, ignore: IgnoreIndex) -> Result<Vec<i64>> {
    let bytes = read(path)?;
    if Format::from_path(path) == Some(Format::Safetensors) {
        return Err(file_error(
            path,
            "targets must be a .npy file of class indices",
        ));
    }
    let array = npy::parse(&bytes, ReadOptions::default()).map_err(format_error(path))?;
    let TensorData::Int(values) = array.tensor.data else {
        return Err(file_error(
            path,
            format!(
                "targets must be integer class indices, but the elements are {:?}",
                array.tensor.stored_as
            ),
        ));
    };
    if values.len() != layout.rows {
        return Err(file_error(
            path,
            format!(
                "{} targets (shape {}) for {} rows: the logits have {}; give one class index per row",
                values.len(),
                shape_string(&array.tensor.shape),
                layout.rows,
                layout.describe()
            ),
        ));
    }
    let classes = layout.classes;
    if let Some((row, &value)) = values
        .iter()
        .enumerate()
        .find(|&(_, &t)| Some(t) != ignore.0 && !usize::try_from(t).is_ok_and(|c| c < classes))
    {
        let ignore = match ignore.0 {
            Some(i) => format!("the ignore index is {i}"),
            None => "no ignore index".to_owned(),
        };
        return Err(file_error(
            path,
            format!(
                "target {value} at row {row} is out of range for {classes} classes (valid: 0 to {}; {ignore})",
                classes - 1
            ),
        ));
    }
    Ok(values)
}

/// Reads class weights: a `.npy` of floats, one per class (a 2-byte void descr is `bf16` when
/// `void_as_bf16`).
///
/// # Errors
/// A file error for a file that is not a `.npy` of floats or holds other than `classes` values.
pub fn weights(path: &Path, classes: usize, void_as_bf16: bool) -> Result<Vec<f64>> {
    let bytes = read(path)?;
    let array = npy::parse(&bytes, ReadOptions { void_as_bf16 }).map_err(format_error(path))?;
    let values = array.tensor.data.to_f64().ok_or_else(|| {
        file_error(
            path,
            format!(
                "class weights must be floats, but the elements are {:?}",
                array.tensor.stored_as
            ),
        )
    })?;
    if values.len() != classes {
        return Err(file_error(
            path,
            format!(
                "{} class weights (shape {}) for {classes} classes; give one weight per class",
                values.len(),
                shape_string(&array.tensor.shape)
            ),
        ));
    }
    Ok(values)
}
