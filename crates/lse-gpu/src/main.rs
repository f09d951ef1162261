//! `lse-gpu`: the GPU kernels from the command line.
//!
//! ```text
//! lse-gpu devices                          adapters wgpu finds: index, name, backend, type
//! lse-gpu bench [--device N] [--rows R] [--classes K] [--dtype f32|f16|bf16] [--repeats N]
//! lse-gpu eval --op OP INPUT --out OUT.npy [--device N] [lse eval's options]
//! ```
//!
//! `eval` is `lse eval` for logsumexp, softmax, log_softmax and cross_entropy on the device: the
//! same arguments, inputs (`.npy`, `.safetensors`) and outputs (`.npy` of the same dtypes and
//! shapes); any error prints one line and exits with status 2, as `lse eval` does.
//!
//! `bench` times the fused cross-entropy forward + gradient on the device (inputs resident,
//! kernels only) and prints G elem/s and the fraction of the device's measured copy bandwidth.
//! On llvmpipe (a CPU) the figure is a sanity check, not a GPU's speed.

use std::process::ExitCode;

use half::{bf16, f16};
use lse_gpu::{adapters, Gpu};

mod eval;

const USAGE: &str = "usage: lse-gpu devices\n       lse-gpu bench [--device N] [--rows R] [--classes K] [--dtype f32|f16|bf16] [--repeats N]\n       lse-gpu eval --op OP INPUT --out OUT.npy [--device N] [lse eval's options]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("eval") {
        return match eval::run(&args[1..]) {
            Ok(summary) => {
                print!("{summary}");
                ExitCode::SUCCESS
            }
            Err(eval::EvalError(message)) => {
                eprintln!("lse-gpu eval: error: {message}");
                ExitCode::from(2)
            }
        };
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("lse-gpu: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<(), String> {
    match args.first().map(String::as_str) {
        Some("devices") => {
            let found = adapters();
            if found.is_empty() {
                return Err(
                    "no adapter (install a Vulkan driver, e.g. mesa-vulkan-drivers)".into(),
                );
            }
            for (i, a) in found.iter().enumerate() {
                println!("{i}\t{}\t{}\t{}", a.name, a.backend, a.device_type);
            }
            Ok(())
        }
        Some("bench") => bench(&args[1..]),
        _ => Err(USAGE.into()),
    }
}

/// The value after `--name`, parsed, or `default`.
fn option<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> Result<T, String> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .ok_or(format!("{name} needs a value\n{USAGE}")),
    }
}

fn bench(args: &[String]) -> Result<(), String> {
    let device = option(args, "--device", 0usize)?;
    let rows = option(args, "--rows", 512usize)?;
    let classes = option(args, "--classes", 32_768usize)?;
    let repeats = option(args, "--repeats", 10usize)?.max(1);
    let dtype = option(args, "--dtype", "f32".to_string())?;
    let gpu = Gpu::with_adapter(device).map_err(|e| e.to_string())?;
    let report = match dtype.as_str() {
        "f32" => gpu.bench_cross_entropy::<f32>(rows, classes, repeats),
        "f16" => gpu.bench_cross_entropy::<f16>(rows, classes, repeats),
        "bf16" => gpu.bench_cross_entropy::<bf16>(rows, classes, repeats),
        other => return Err(format!("unknown dtype {other}\n{USAGE}")),
    }
    .map_err(|e| e.to_string())?;
    println!(
        "{}: cross-entropy forward + gradient, {rows} x {classes} {dtype}: {:.3} G elem/s, \
         {:.0}% of the measured copy bandwidth ({:.1} GB/s)",
        gpu.describe(),
        report.giga_elements_per_second,
        100.0 * report.fraction_of_copy_bandwidth,
        report.copy_gigabytes_per_second,
    );
    Ok(())
}
