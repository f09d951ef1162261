//! The file inputs of `lse audit` and `lse eval`: logits from `.npy` or `.safetensors`, class
//! targets and class weights from `.npy`, and the class axis; and writing `.npy` outputs.

use std::borrow::Cow;
use std::path::Path;

use lse_cli::tensor_file::layout::{element_count, move_axis_to_last, move_last_to_axis};
use lse_cli::tensor_file::npy::{self, ReadOptions};
use lse_cli::tensor_file::{safetensors, shape_string, Format, FormatError, Tensor, TensorData};

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
fn format_of(path: &Path, bytes: &[u8]) -> Result<Format> {
    if let Some(f) = Format::from_path(path) {
        return Ok(f);
    }
    if bytes.starts_with(npy::MAGIC) {
        return Ok(Format::Npy);
    }
    Err(file_error(
        path,
        "unknown format: name the file .npy or .safetensors",
    ))
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

/// Logits read from a file.
#[derive(Debug)]
pub struct Loaded {
    /// The format of the file.
    pub format: Format,
    /// The tensors picked, with their names (`None` for a `.npy` file).
    pub tensors: Vec<(Option<String>, Tensor)>,
    /// Tensors of a safetensors file that were not picked because they are not float: (name,
    /// dtype).
    pub skipped: Vec<(String, String)>,
}

/// Reads the logits of `path` (whose contents are `bytes`).
///
/// # Errors
/// [`CliError::Format`] for a malformed file or a non-float tensor, [`CliError::Usage`] for a
/// `--tensor` that does not fit the file.
pub fn logits(path: &Path, bytes: &[u8], pick: Pick<'_>, void_as_bf16: bool) -> Result<Loaded> {
    let to_error = format_error(path);
    match format_of(path, bytes)? {
        Format::Npy => {
            if let Pick::Named(name) = pick {
                return Err(CliError::usage(format!(
                    "--tensor {name:?}: a .npy file holds one unnamed array; --tensor is for \
                     .safetensors files"
                )));
            }
            let array = npy::parse(bytes, ReadOptions { void_as_bf16 }).map_err(&to_error)?;
            let tensor = float_only(path, array.tensor)?;
            Ok(Loaded {
                format: Format::Npy,
                tensors: vec![(None, tensor)],
                skipped: Vec::new(),
            })
        }
        Format::Safetensors => {
            let file = safetensors::parse(bytes).map_err(&to_error)?;
            let (float, other): (Vec<_>, Vec<_>) = file.entries.iter().partition(|e| e.is_float());
            let listing = |entries: &[&safetensors::Entry]| {
                entries
                    .iter()
                    .map(|e| format!("{:?} ({} {})", e.name, e.dtype, shape_string(&e.shape)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let names: Vec<String> = match pick {
                Pick::Named(name) => vec![file.entry(name).map_err(&to_error)?.name.clone()],
                _ if float.is_empty() => {
                    let all: Vec<_> = file.entries.iter().collect();
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
                Pick::OnlyFloat | Pick::AllFloat => float.iter().map(|e| e.name.clone()).collect(),
            };
            let tensors = names
                .into_iter()
                .map(|name| {
                    let tensor = file.tensor(&name).map_err(&to_error)?;
                    let tensor = float_only(path, tensor).map_err(|e| tensor_context(e, &name))?;
                    Ok((Some(name), tensor))
                })
                .collect::<Result<Vec<_>>>()?;
            let skipped = match pick {
                Pick::Named(_) => Vec::new(),
                _ => other
                    .iter()
                    .map(|e| (e.name.clone(), e.dtype.clone()))
                    .collect(),
            };
            Ok(Loaded {
                format: Format::Safetensors,
                tensors,
                skipped,
            })
        }
    }
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

fn float_only(path: &Path, tensor: Tensor) -> Result<Tensor> {
    if tensor.data.dtype().is_none() {
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

    /// `data` (row-major in `self.shape`) with the class axis moved last: `rows × classes`.
    /// Borrowed as it is when the class axis is already last (no copy); a copy otherwise.
    ///
    /// # Errors
    /// Never for data that fills the shape.
    pub fn rows_of<'a, T: Copy>(&self, data: &'a [T]) -> Result<Cow<'a, [T]>> {
        if self.axis + 1 == self.shape.len() {
            return Ok(Cow::Borrowed(data));
        }
        move_axis_to_last(data, &self.shape, self.axis)
            .map(Cow::Owned)
            .map_err(|e| CliError::Other(e.to_string()))
    }

    /// The inverse of [`ClassLayout::rows_of`]: `rows × classes` data back in `self.shape`
    /// (moved when the class axis is not last).
    ///
    /// # Errors
    /// Never for data of `rows × classes` elements.
    pub fn to_input_layout<T: Copy>(&self, rows: Vec<T>) -> Result<Vec<T>> {
        if self.axis + 1 == self.shape.len() {
            return Ok(rows);
        }
        move_last_to_axis(&rows, &self.shape, self.axis).map_err(|e| CliError::Other(e.to_string()))
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
