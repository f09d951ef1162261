//! `lse eval` of the row ops (logsumexp, softmax, log_softmax, cross_entropy): the input read
//! a chunk of rows at a time, the outputs written as each chunk is computed.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::path::{Path, PathBuf};

use lse::{
    bf16, f16, ChunkedCrossEntropy, CrossEntropyOptions, DType, Element, GradOutput, LseError,
    NonFinite,
};
use lse_io::layout::without_axis;
use lse_io::npy::{self, Bf16Descr};
use lse_io::stream::TensorInfo;
use lse_io::{shape_string, FloatElement, Format, NpyElement};

use crate::error::{CliError, Result};
use crate::format::shortest;
use crate::input::{self, ClassLayout, IgnoreIndex, Opened, Pick, RowChunks};

use super::args::{Args, Op, ReductionArg};

/// A temporary file beside `path` that becomes `path` once complete.
fn partial_path(path: &Path) -> PathBuf {
    path.with_file_name(format!(
        ".{}.lse-partial-{}",
        path.file_name()
            .map_or_else(|| "out".into(), |n| n.to_string_lossy()),
        std::process::id()
    ))
}

/// Renames each `(partial, path)` over its path; on an error (or `result` being one) removes
/// the partial files that are left.
fn complete<T>(result: Result<T>, files: &[(&Path, &Path)]) -> Result<T> {
    let done = result.and_then(|value| {
        for (partial, path) in files {
            std::fs::rename(partial, path)
                .map_err(|e| input::file_error(path, format!("cannot write: {e}")))?;
        }
        Ok(value)
    });
    done.inspect_err(|_| {
        for (partial, _) in files {
            let _ = std::fs::remove_file(partial);
        }
    })
}

/// The logits `lse eval` reads: the opened file (one tensor picked), its class layout, and how
/// its bf16 elements are described in the `.npy` outputs.
struct LogitsInput {
    opened: Opened,
    layout: ClassLayout,
    bf16: Bf16Descr,
}

impl LogitsInput {
    /// Opens `args.input()` and picks the tensor `--tensor` names (or the only float one).
    fn open(args: &Args) -> Result<Self> {
        let pick = args.tensor.as_deref().map_or(Pick::OnlyFloat, Pick::Named);
        let opened = input::open_logits(args.input(), pick, args.void_as_bf16)?;
        let Some(tensor) = opened.tensors.first() else {
            return Err(CliError::Other("no tensor was read".to_owned()));
        };
        let layout = ClassLayout::new(args.input(), &tensor.shape, args.axis)?;
        let bf16 = match opened.file.format {
            Format::Npy => Bf16Descr::of_descr(&tensor.stored_as).unwrap_or_default(),
            Format::Safetensors => Bf16Descr::Void,
        };
        Ok(LogitsInput {
            opened,
            layout,
            bf16,
        })
    }

    /// The picked tensor (`open` made sure there is one).
    fn tensor(&self) -> &TensorInfo {
        &self.opened.tensors[0]
    }
}

/// The input as the summary names it: the file, and the tensor when it has a name.
fn source(args: &Args, tensor: &TensorInfo) -> String {
    match &tensor.name {
        Some(n) => format!("{}, tensor {n:?}", args.input().display()),
        None => args.input().display().to_string(),
    }
}

/// `cross_entropy`, streamed: the input is read a chunk of rows at a time (`--chunk-bytes`) and
/// each chunk's gradient written as soon as it is computed. The mean's denominator comes from
/// the targets alone, so a chunk's gradient is final when written; the loss is summed in row
/// order: the outputs are bit for bit those of one library call over the whole tensor.
pub(super) fn run_cross_entropy(args: &Args, out: &mut String) -> Result<u8> {
    let input = LogitsInput::open(args)?;
    let (opened, layout, bf16, tensor) = (&input.opened, &input.layout, input.bf16, input.tensor());
    let ignore = args.ignore_index.unwrap_or(IgnoreIndex(Some(-100)));
    let Some(targets) = &args.targets else {
        return Err(CliError::usage("--op cross_entropy needs --targets FILE"));
    };
    let targets = input::targets(targets, layout, ignore)?;
    let weights = match &args.weights {
        Some(path) => Some(input::weights(path, layout.classes, args.void_as_bf16)?),
        None => None,
    };
    let options = args.cross_entropy_options(ignore.0, weights.as_deref());
    let mut chunks = opened.row_chunks(tensor, layout, args.chunk_bytes);
    let loss_partial = partial_path(&args.out);
    let grad_partial = args.grad.as_deref().map(partial_path);
    let stream = CrossEntropyStream {
        args,
        shape: &tensor.shape,
        layout,
        targets: &targets,
        options: &options,
        bf16,
        out: &loss_partial,
        grad: grad_partial.as_deref(),
    };
    let dtype = tensor.encoding.as_ref().ok().and_then(|e| e.dtype());
    let result = match dtype {
        Some(DType::F64) => stream.run::<f64>(&mut chunks),
        Some(DType::F32) => stream.run::<f32>(&mut chunks),
        Some(DType::F16) => stream.run::<f16>(&mut chunks),
        Some(DType::BF16) => stream.run::<bf16>(&mut chunks),
        None => Err(CliError::Other(
            "integer tensors are not logits (rejected when read)".to_owned(),
        )),
    };
    let mut files = vec![(loss_partial.as_path(), args.out.as_path())];
    if let (Some(partial), Some(path)) = (&grad_partial, &args.grad) {
        files.push((partial.as_path(), path.as_path()));
    }
    let written = complete(result, &files)?;
    let source = source(args, tensor);
    let _ = writeln!(
        out,
        "{} of {source} ({}, {})",
        args.op.name(),
        dtype.map_or("?", |d| d.name()),
        layout.describe()
    );
    let _ = writeln!(out, "  {}", written.loss_line);
    let _ = writeln!(out, "  wrote {}: {}", args.out.display(), written.out);
    if let (Some(path), Some(what)) = (&args.grad, &written.grad) {
        let _ = writeln!(out, "  wrote {}: {what}", path.display());
    }
    Ok(0)
}

/// `logsumexp`, `softmax` and `log_softmax`, whose rows are independent: the input is read and
/// the output written a chunk of rows at a time (`--chunk-bytes`), so memory follows the chunk,
/// not the file. The output goes to a temporary file beside `--out`, renamed over it once
/// complete (removed on error).
pub(super) fn run_per_row(args: &Args, out: &mut String) -> Result<u8> {
    let input = LogitsInput::open(args)?;
    let (opened, layout, bf16, tensor) = (&input.opened, &input.layout, input.bf16, input.tensor());
    let mut chunks = opened.row_chunks(tensor, layout, args.chunk_bytes);
    let partial = partial_path(&args.out);
    let dtype = tensor.encoding.as_ref().ok().and_then(|e| e.dtype());
    let stream = PerRow {
        args,
        shape: &tensor.shape,
        layout,
        bf16,
        path: &partial,
    };
    let written = match dtype {
        Some(DType::F64) => stream.run::<f64>(&mut chunks),
        Some(DType::F32) => stream.run::<f32>(&mut chunks),
        Some(DType::F16) => stream.run::<f16>(&mut chunks),
        Some(DType::BF16) => stream.run::<bf16>(&mut chunks),
        None => Err(CliError::Other(
            "integer tensors are not logits (rejected when read)".to_owned(),
        )),
    };
    let what = complete(written, &[(&partial, &args.out)])?;
    let source = source(args, tensor);
    let _ = writeln!(
        out,
        "{} of {source} ({}, {})",
        args.op.name(),
        dtype.map_or("?", |d| d.name()),
        layout.describe()
    );
    let _ = writeln!(out, "  wrote {}: {what}", args.out.display());
    Ok(0)
}

/// A library error about a chunk whose first row is `first`, with its row counted in the whole
/// tensor.
fn in_tensor(e: LseError, first: usize) -> CliError {
    e.in_whole(first, 0).into()
}

/// One streamed per-row evaluation: everything but the logits' element type.
struct PerRow<'a> {
    args: &'a Args,
    /// The input's shape as read (empty for a 0-d array).
    shape: &'a [usize],
    layout: &'a ClassLayout,
    bf16: Bf16Descr,
    /// Where the output is written until it is complete.
    path: &'a Path,
}

impl PerRow<'_> {
    /// Evaluates the op chunk by chunk into `self.path`; returns what was written.
    fn run<E: FloatElement>(&self, chunks: &mut RowChunks<'_>) -> Result<String>
    where
        E::Stat: NpyElement,
    {
        let policy = NonFinite::from(self.args.non_finite);
        let classes = self.layout.classes;
        let create =
            |e: std::io::Error| input::file_error(&self.args.out, format!("cannot write: {e}"));
        let mut file = BufWriter::new(File::create(self.path).map_err(create)?);
        let (shape, header, role) = match self.args.op {
            Op::Logsumexp => {
                let shape = without_axis(&self.layout.shape, self.layout.axis);
                let header = npy::encode_header::<E::Stat>(&shape, self.bf16);
                (shape, header, "logsumexp per row")
            }
            op => (
                self.shape.to_vec(),
                npy::encode_header::<E>(self.shape, self.bf16),
                op.name(),
            ),
        };
        file.write_all(&header).map_err(create)?;
        let mut bytes = Vec::new();
        let mut first_row = 0;
        while let Some(rows) = chunks.next_chunk::<E>()? {
            let count = rows.len() / classes;
            bytes.clear();
            // A row that the library rejects is named by its row in the whole tensor.
            let at = |e| in_tensor(e, first_row);
            match self.args.op {
                Op::Logsumexp => {
                    let mut lse = vec![E::Stat::zero(); count];
                    lse::logsumexp_with(&rows, classes, &mut lse, policy).map_err(at)?;
                    lse.iter().for_each(|x| x.put_le(&mut bytes));
                }
                op => {
                    let mut p = vec![E::zero(); rows.len()];
                    if op == Op::Softmax {
                        lse::softmax_with(&rows, classes, &mut p, policy).map_err(at)?;
                    } else {
                        lse::log_softmax_with(&rows, classes, &mut p, policy).map_err(at)?;
                    }
                    let p = chunks.to_input_layout(p)?;
                    p.iter().for_each(|x| x.put_le(&mut bytes));
                }
            }
            file.write_all(&bytes).map_err(create)?;
            first_row += count;
        }
        file.flush().map_err(create)?;
        let descr = match self.args.op {
            Op::Logsumexp => E::Stat::descr(self.bf16),
            _ => E::descr(self.bf16),
        };
        Ok(format!("{role}, '{descr}' {}", shape_string(&shape)))
    }
}

/// What a streamed cross-entropy wrote: the loss line of the summary, and what each output
/// holds.
struct CrossEntropyWritten {
    loss_line: String,
    out: String,
    grad: Option<String>,
}

/// One streamed cross-entropy: everything but the logits' element type.
struct CrossEntropyStream<'a> {
    args: &'a Args,
    /// The input's shape as read (empty for a 0-d array).
    shape: &'a [usize],
    layout: &'a ClassLayout,
    targets: &'a [i64],
    options: &'a CrossEntropyOptions<'a>,
    bf16: Bf16Descr,
    /// Where the loss is written until it is complete.
    out: &'a Path,
    /// Where the gradient is written until it is complete, when asked for.
    grad: Option<&'a Path>,
}

impl CrossEntropyStream<'_> {
    /// Runs the rows chunk by chunk, the gradient into `self.grad` as it comes, then writes the
    /// loss into `self.out`.
    fn run<E: FloatElement>(&self, chunks: &mut RowChunks<'_>) -> Result<CrossEntropyWritten>
    where
        E::Stat: NpyElement,
    {
        let layout = self.layout;
        let create = |path: &Path| {
            let path = path.to_path_buf();
            move |e: std::io::Error| input::file_error(&path, format!("cannot write: {e}"))
        };
        let mut ce = ChunkedCrossEntropy::<E>::new(
            layout.classes,
            self.targets,
            self.options,
            GradOutput::Scalar(E::Stat::from_f64(1.0)),
        )?;
        let mut grad_file = match (self.grad, &self.args.grad) {
            (Some(partial), Some(path)) => {
                let at = create(path);
                let mut file = BufWriter::new(File::create(partial).map_err(&at)?);
                file.write_all(&npy::encode_header::<E>(self.shape, self.bf16))
                    .map_err(&at)?;
                Some((file, at))
            }
            _ => None,
        };
        let mut bytes = Vec::new();
        while let Some(rows) = chunks.next_chunk::<E>()? {
            match &mut grad_file {
                Some((file, at)) => {
                    let mut g = vec![E::zero(); rows.len()];
                    ce.next_rows(&rows, Some(&mut g))?;
                    let g = chunks.to_input_layout(g)?;
                    bytes.clear();
                    g.iter().for_each(|x| x.put_le(&mut bytes));
                    file.write_all(&bytes).map_err(&*at)?;
                }
                None => ce.next_rows(&rows, None)?,
            }
        }
        let grad = match grad_file {
            Some((mut file, at)) => {
                file.flush().map_err(&at)?;
                Some(format!(
                    "gradient, '{}' {}",
                    E::descr(self.bf16),
                    shape_string(self.shape)
                ))
            }
            None => None,
        };
        let result = ce.finish();
        let reduction = self.args.reduction.unwrap_or_default();
        let ignored = layout.rows - result.counted_rows;
        let how = match reduction {
            ReductionArg::None => "sum of the row losses",
            ReductionArg::Sum => "sum",
            ReductionArg::Mean => "mean",
        };
        let loss_line = format!(
            "loss ({how} over {} counted of {} rows, {ignored} ignored): {}",
            result.counted_rows,
            layout.rows,
            shortest(result.loss)
        );
        let (shape, values, role) = match (reduction, &result.row_loss) {
            (ReductionArg::None, Some(losses)) => (
                without_axis(&layout.shape, layout.axis),
                losses.as_slice(),
                "loss per row",
            ),
            _ => (Vec::new(), std::slice::from_ref(&result.loss), "loss"),
        };
        let encoded = npy::encode(&shape, values, self.bf16)
            .map_err(|e| CliError::Other(format!("cannot encode the {role}: {e}")))?;
        std::fs::write(self.out, encoded).map_err(create(&self.args.out))?;
        Ok(CrossEntropyWritten {
            loss_line,
            out: format!(
                "{role}, '{}' {}",
                E::Stat::descr(self.bf16),
                shape_string(&shape)
            ),
            grad,
        })
    }
}
