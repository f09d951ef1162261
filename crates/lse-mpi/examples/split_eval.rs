//! `lse eval --op cross_entropy`, split over the ranks of `mpirun -np K`: every rank reads the
//! full logits (.npy or .safetensors; classes on the last axis), keeps its own near-equal column
//! range (uneven when K does not divide the classes), and the ranks compute the loss and the
//! gradient with one all-reduce. Rank 0 writes the loss and the gathered full gradient as `.npy`
//! in the formats `lse eval` writes, so the two can be held against each other — `--check-loss`
//! and `--check-grad` do that on rank 0 (loss within 2 ulp, gradient within 2 ulp of each row's
//! largest entry) and exit 1 when they disagree.
//!
//! ```text
//! split_eval --make-demo DIR            # logits.npy, targets.npy, weights.npy (no MPI needed)
//! mpirun -np 3 split_eval DIR/logits.npy --targets DIR/targets.npy --label-smoothing 0.1 \
//!        --out split_loss.npy --grad split_grad.npy
//! lse eval --op cross_entropy DIR/logits.npy --targets DIR/targets.npy --label-smoothing 0.1 \
//!        --out loss.npy --grad grad.npy
//! mpirun -np 3 split_eval ... --check-loss loss.npy --check-grad grad.npy
//! ```
//!
//! Any error prints one line on stderr and aborts the job with status 2.

use std::path::{Path, PathBuf};

use clap::Parser;
use lse::sharded::Shard;
use lse::{CrossEntropyOptions, DType, GradOutput, NonFinite, Reduction};
use lse_io::npy::{self, Bf16Descr, ReadOptions};
use lse_io::{safetensors, FloatElement, Format, Tensor, TensorData};
use lse_mpi::VocabParallel;
use mpi::datatype::PartitionMut;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

#[derive(Debug, Parser)]
#[command(about = "lse eval --op cross_entropy over the ranks of mpirun, one all-reduce")]
struct Args {
    /// The logits: a .npy or .safetensors file, classes on the last axis
    #[arg(value_name = "INPUT", required_unless_present = "make_demo")]
    input: Option<PathBuf>,
    /// The tensor of a .safetensors file (default: its only float tensor)
    #[arg(long)]
    tensor: Option<String>,
    /// Read a .npy with the 2-byte void descr '<V2' as bf16
    #[arg(long)]
    void_as_bf16: bool,
    /// Class indices (.npy of integers), one per row
    #[arg(long, required_unless_present = "make_demo")]
    targets: Option<PathBuf>,
    /// The target value of ignored rows, or 'none'
    #[arg(long, default_value = "-100", allow_negative_numbers = true)]
    ignore_index: String,
    /// Label smoothing in [0, 1], spread over the live classes of the whole row
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f64,
    /// z-loss coefficient >= 0
    #[arg(long, default_value_t = 0.0)]
    z_loss: f64,
    /// Soft-capping: logits become cap * tanh(x / cap)
    #[arg(long)]
    softcap: Option<f64>,
    /// Per-class weights (.npy of floats, one per class)
    #[arg(long)]
    weights: Option<PathBuf>,
    /// none, sum or mean
    #[arg(long, default_value = "mean")]
    reduction: String,
    /// error or propagate
    #[arg(long, default_value = "error")]
    non_finite: String,
    /// Where rank 0 writes the loss (.npy)
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where rank 0 writes the gathered gradient (.npy)
    #[arg(long)]
    grad: Option<PathBuf>,
    /// `lse eval`'s loss output to compare with (rank 0)
    #[arg(long)]
    check_loss: Option<PathBuf>,
    /// `lse eval`'s gradient output to compare with (rank 0)
    #[arg(long)]
    check_grad: Option<PathBuf>,
    /// Write a demo input (logits.npy f32 64×1000 with masks, ignored rows and large logits,
    /// targets.npy, weights.npy) into this directory and exit
    #[arg(long, value_name = "DIR")]
    make_demo: Option<PathBuf>,
}

type Failure = String;

fn read_tensor(path: &Path, name: Option<&str>, void_as_bf16: bool) -> Result<Tensor, Failure> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let fail = |e: lse_io::FormatError| format!("{}: {e}", path.display());
    match Format::from_path(path) {
        Some(Format::Npy) => Ok(npy::parse(&bytes, ReadOptions { void_as_bf16 })
            .map_err(fail)?
            .tensor),
        Some(Format::Safetensors) => {
            let file = safetensors::parse(&bytes).map_err(fail)?;
            let name = match name {
                Some(n) => n.to_owned(),
                None => {
                    let floats: Vec<String> = file
                        .names()
                        .into_iter()
                        .filter(|n| file.entry(n).is_ok_and(|e| e.is_float()))
                        .collect();
                    match floats.as_slice() {
                        [only] => only.clone(),
                        _ => {
                            return Err(format!(
                                "{}: name the tensor with --tensor ({floats:?})",
                                path.display()
                            ))
                        }
                    }
                }
            };
            file.tensor(&name).map_err(fail)
        }
        None => Err(format!(
            "{}: not a .npy or .safetensors file",
            path.display()
        )),
    }
}

fn options<'w>(
    args: &Args,
    weights: Option<&'w [f64]>,
) -> Result<CrossEntropyOptions<'w>, Failure> {
    Ok(CrossEntropyOptions {
        ignore_index: match args.ignore_index.as_str() {
            "none" => None,
            s => Some(s.parse().map_err(|e| format!("--ignore-index {s}: {e}"))?),
        },
        weights,
        label_smoothing: args.label_smoothing,
        z_loss: args.z_loss,
        softcap: args.softcap,
        reduction: match args.reduction.as_str() {
            "none" => Reduction::None,
            "sum" => Reduction::Sum,
            "mean" => Reduction::Mean,
            s => return Err(format!("--reduction {s}: none, sum or mean")),
        },
        non_finite: match args.non_finite.as_str() {
            "error" => NonFinite::Error,
            "propagate" => NonFinite::Propagate,
            s => return Err(format!("--non-finite {s}: error or propagate")),
        },
        ..Default::default()
    })
}

/// Distance in ulps of a `bits`-bit significand.
fn ulps(a: f64, b: f64, bits: i32) -> f64 {
    if a == b || (a.is_nan() && b.is_nan()) {
        return 0.0;
    }
    let scale = a.abs().max(b.abs()).max(f64::MIN_POSITIVE);
    (a - b).abs() / 2f64.powi(scale.log2().floor() as i32 - (bits - 1))
}

fn significand_bits(dtype: DType) -> i32 {
    match dtype {
        DType::F64 => 53,
        DType::F32 => 24,
        DType::F16 => 11,
        DType::BF16 => 8,
    }
}

/// The split cross-entropy of one dtype; returns false when a check failed.
fn run<E: FloatElement>(
    world: &SimpleCommunicator,
    args: &Args,
    tensor: &Tensor,
    x: Vec<E>,
) -> Result<bool, Failure> {
    let shape = &tensor.shape;
    let classes = *shape.last().ok_or("the logits must have a class axis")?;
    let rows = x.len().checked_div(classes).unwrap_or(0);
    let targets = match read_tensor(args.targets.as_deref().unwrap(), None, false)?.data {
        TensorData::Int(t) => t,
        _ => return Err("--targets must hold integers".into()),
    };
    let weights = match &args.weights {
        Some(p) => Some(
            read_tensor(p, None, args.void_as_bf16)?
                .data
                .to_f64()
                .ok_or("--weights must hold floats")?,
        ),
        None => None,
    };
    let opts = options(args, weights.as_deref())?;
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    let shard = Shard::split_evenly(rank, size, classes).map_err(|e| e.to_string())?;
    let local: Vec<E> = x
        .chunks(classes.max(1))
        .flat_map(|r| r[shard.start()..shard.stop()].to_vec())
        .collect();
    let split = VocabParallel::new(world, shard);
    let mut grad = vec![E::zero(); local.len()];
    let out = split
        .cross_entropy_with_grad(&local, &targets, &opts, GradOutput::default(), &mut grad)
        .map_err(|e| e.to_string())?;

    // The full gradient on rank 0, in f64 (exact for every dtype).
    let mine: Vec<f64> = grad.iter().map(|g| g.to_f64()).collect();
    let root = world.process_at_rank(0);
    let full = if rank == 0 {
        let counts: Vec<i32> = (0..size)
            .map(|r| (rows * Shard::split_evenly(r, size, classes).unwrap().width()) as i32)
            .collect();
        let displs: Vec<i32> = counts
            .iter()
            .scan(0, |at, &c| {
                let d = *at;
                *at += c;
                Some(d)
            })
            .collect();
        let mut gathered = vec![0.0f64; rows * classes];
        let mut partition = PartitionMut::new(&mut gathered[..], counts, &displs[..]);
        root.gather_varcount_into_root(&mine[..], &mut partition);
        // Rank-major blocks → row-major rows.
        let mut full = vec![E::zero(); rows * classes];
        let mut at = 0;
        for r in 0..size {
            let s = Shard::split_evenly(r, size, classes).unwrap();
            for row in 0..rows {
                for c in s.start()..s.stop() {
                    full[row * classes + c] = E::from_f64(gathered[at]);
                    at += 1;
                }
            }
        }
        Some(full)
    } else {
        root.gather_varcount_into(&mine[..]);
        None
    };
    let Some(full) = full else {
        return Ok(true);
    };

    // Rank 0: write and compare, as `lse eval` writes.
    let stat_bits = if E::DTYPE == DType::F64 { 53 } else { 24 };
    let losses: Vec<f64> = match &out.row_loss {
        Some(r) if opts.reduction == Reduction::None => r.iter().map(|&l| l.into()).collect(),
        _ => vec![out.loss.into()],
    };
    let loss_shape: Vec<usize> = if opts.reduction == Reduction::None {
        shape[..shape.len() - 1].to_vec()
    } else {
        vec![]
    };
    let bf16 = match tensor.format {
        Format::Npy => Bf16Descr::of_descr(&tensor.stored_as).unwrap_or_default(),
        Format::Safetensors => Bf16Descr::Void,
    };
    let write = |path: &Path, bytes: Result<Vec<u8>, _>| -> Result<(), Failure> {
        let bytes = bytes.map_err(|e: lse_io::FormatError| e.to_string())?;
        std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))
    };
    if let Some(path) = &args.out {
        if stat_bits == 53 {
            write(path, npy::encode(&loss_shape, &losses, bf16))?;
        } else {
            let l: Vec<f32> = losses.iter().map(|&v| v as f32).collect();
            write(path, npy::encode(&loss_shape, &l, bf16))?;
        }
    }
    if let Some(path) = &args.grad {
        write(path, npy::encode(shape, &full, bf16))?;
    }
    println!(
        "{} ranks, {rows}x{classes} {:?}: loss {} (one all-reduce: {} collective)",
        size,
        E::DTYPE,
        losses
            .iter()
            .map(|l| format!("{l:e}"))
            .collect::<Vec<_>>()
            .join(" "),
        split.collectives()
    );
    let mut ok = true;
    if let Some(path) = &args.check_loss {
        let reference = read_tensor(path, None, false)?
            .data
            .to_f64()
            .ok_or("loss: floats")?;
        let worst = losses
            .iter()
            .zip(&reference)
            .map(|(&a, &b)| ulps(a, b, stat_bits))
            .fold(0.0, f64::max);
        ok &= reference.len() == losses.len() && worst <= 2.0;
        println!("loss vs {}: {worst} ulp (bound 2)", path.display());
    }
    if let Some(path) = &args.check_grad {
        let reference = read_tensor(path, None, args.void_as_bf16)?
            .data
            .to_f64()
            .ok_or("grad: floats")?;
        let bits = significand_bits(E::DTYPE);
        let mut worst = 0.0f64;
        for (g, w) in full
            .chunks(classes.max(1))
            .zip(reference.chunks(classes.max(1)))
        {
            let peak = w.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            for (a, &b) in g.iter().zip(w) {
                worst = worst.max(ulps(peak + (a.to_f64() - b).abs(), peak, bits));
            }
        }
        ok &= reference.len() == full.len() && worst <= 2.0;
        println!(
            "gradient vs {}: {worst} ulp of each row's largest entry (bound 2)",
            path.display()
        );
    }
    Ok(ok)
}

/// The demo input: f32 logits 64×1000 with a masked block, ignored rows, ±1e4 and 1e30 rows.
fn make_demo(dir: &Path) -> Result<(), Failure> {
    let (rows, classes) = (64usize, 1000usize);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut x = vec![0.0f32; rows * classes];
    let mut t = vec![0i64; rows];
    for r in 0..rows {
        let scale = match r % 8 {
            5 => 1e4,
            6 => 1e30,
            _ => 8.0,
        };
        for c in 0..classes {
            x[r * classes + c] = ((next() - 0.5) * scale) as f32;
        }
        if r % 8 == 3 {
            // The first 600 classes masked: a whole shard under 2 and 3 ranks.
            x[r * classes..r * classes + 600].fill(f32::NEG_INFINITY);
        }
        t[r] = match r % 8 {
            3 => 600 + (next() * 400.0) as i64,
            7 => -100,
            _ => (next() * classes as f64) as i64,
        };
    }
    let w: Vec<f32> = (0..classes).map(|_| (0.25 + 2.0 * next()) as f32).collect();
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let put = |name: &str, bytes: Vec<u8>| {
        std::fs::write(dir.join(name), bytes).map_err(|e| e.to_string())
    };
    let fail = |e: lse_io::FormatError| e.to_string();
    put(
        "logits.npy",
        npy::encode(&[rows, classes], &x, Bf16Descr::default()).map_err(fail)?,
    )?;
    put(
        "targets.npy",
        npy::encode(&[rows], &t, Bf16Descr::default()).map_err(fail)?,
    )?;
    put(
        "weights.npy",
        npy::encode(&[classes], &w, Bf16Descr::default()).map_err(fail)?,
    )?;
    Ok(())
}

fn main() {
    let args = Args::parse();
    if let Some(dir) = &args.make_demo {
        if let Err(e) = make_demo(dir) {
            eprintln!("split_eval: {e}");
            std::process::exit(2);
        }
        return;
    }
    let universe = mpi::initialize().expect("MPI initialises once");
    lse_mpi::abort_on_panic();
    let world = universe.world();
    let result = read_tensor(
        args.input.as_deref().unwrap(),
        args.tensor.as_deref(),
        args.void_as_bf16,
    )
    .and_then(|tensor| match tensor.data.clone() {
        TensorData::F64(v) => run(&world, &args, &tensor, v),
        TensorData::F32(v) => run(&world, &args, &tensor, v),
        TensorData::F16(v) => run(&world, &args, &tensor, v),
        TensorData::BF16(v) => run(&world, &args, &tensor, v),
        TensorData::Int(_) => Err("the logits must be floats".into()),
    });
    match result {
        Ok(true) => {}
        Ok(false) => {
            eprintln!("split_eval: the split result is outside the bound");
            world.abort(1);
        }
        Err(e) => {
            eprintln!("split_eval: rank {}: {e}", world.rank());
            world.abort(2);
        }
    }
}
