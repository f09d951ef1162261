//! lse-burn's cross-entropy beside burn's own `CrossEntropyLoss`, forward and backward through
//! burn's autodiff on the same logits, in one run; prints each one's median time and the ratio.
//!
//! ```text
//! cargo run --release --no-default-features --example bench -- [--rows 4096] [--classes 32000] [--repeats 5]
//! ```
//! (from `crates/lse-burn`; burn-flex, the CPU backend, with all cores.)

use std::time::Instant;

use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::{Device, Distribution, Int, Tensor};
use lse_burn::{cross_entropy, CrossEntropyOptions};

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (mut rows, mut classes, mut repeats) = (4096usize, 32_000usize, 5usize);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || -> Result<usize, Box<dyn std::error::Error>> {
            Ok(args.next().ok_or("a flag needs a number")?.parse()?)
        };
        match arg.as_str() {
            "--rows" => rows = value()?,
            "--classes" => classes = value()?,
            "--repeats" => repeats = value()?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let device = Device::flex().autodiff();
    device.seed(1);
    let logits = Tensor::<2>::random([rows, classes], Distribution::Normal(0.0, 4.0), &device);
    let targets =
        Tensor::<1, Int>::random([rows], Distribution::Uniform(0.0, classes as f64), &device);
    let burn_loss = CrossEntropyLossConfig::new().init(&device);
    let options = CrossEntropyOptions::default();

    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for _ in 0..repeats {
        // Alternate, so both see the same machine state.
        let x = logits.clone().detach().require_grad();
        let start = Instant::now();
        let loss = cross_entropy(x.clone(), targets.clone(), &options)?;
        let grad = x.grad(&loss.backward()).expect("tracked");
        let _ = grad.into_data();
        ours.push(start.elapsed().as_secs_f64());

        let x = logits.clone().detach().require_grad();
        let start = Instant::now();
        let loss = burn_loss.forward(x.clone(), targets.clone());
        let grad = x.grad(&loss.backward()).expect("tracked");
        let _ = grad.into_data();
        theirs.push(start.elapsed().as_secs_f64());
    }
    let (ours, theirs) = (median(ours), median(theirs));
    let gb = (rows * classes * 4) as f64 / 1e9;
    println!(
        "cross-entropy forward + backward, {rows} x {classes} f32, burn-flex, median of {repeats}:"
    );
    println!(
        "  lse-burn              {:8.1} ms  ({:.2} GB/s of logits)",
        ours * 1e3,
        gb / ours
    );
    println!(
        "  burn CrossEntropyLoss {:8.1} ms  ({:.2} GB/s of logits)",
        theirs * 1e3,
        gb / theirs
    );
    println!("  ratio (burn / lse-burn): {:.2}x", theirs / ours);
    Ok(())
}
