//! Trains a small candle MLP with `lse_candle::cross_entropy` on a synthetic, non-linearly
//! separable task, and checks that the loss falls.
//!
//! ```text
//! cargo run --release -p lse-candle --example train_mlp
//! cargo run --release -p lse-candle --example train_mlp -- --linear-head
//! ```
//!
//! With `--linear-head` the last layer goes through `lse_candle::linear_cross_entropy`: the loss
//! and the gradients of the hidden states, the head's weight and its bias come from the fused
//! call, which never holds the logits (this small example still forms them to print the
//! accuracy).
//!
//! The task: 8-dimensional points, 4 classes given by the signs of `x0·x1` and `x2 + x3²  − 1`
//! (an XOR-like rule no linear model can learn). One sample in ten is "unlabeled" and carries the
//! ignore index; the loss uses label smoothing and a small z-loss.

use candle_core::{bail, DType, Device, Result, Tensor, D};
use candle_nn::{linear, Linear, Module, Optimizer, VarBuilder, VarMap};
use lse_candle::{cross_entropy, linear_cross_entropy, CrossEntropyOptions};

const FEATURES: usize = 8;
const HIDDEN: usize = 64;
const CLASSES: usize = 4;
const SAMPLES: usize = 1024;
const STEPS: usize = 300;
const PRINT_EVERY: usize = 25;

/// A deterministic stream of values in [-1.5, 1.5] (no RNG dependency, same data every run).
fn points(n: usize) -> Vec<f32> {
    let mut s: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * 1.5
        })
        .collect()
}

fn label(x: &[f32]) -> i64 {
    let a = x[0] * x[1] > 0.0;
    let b = x[2] + x[3] * x[3] - 1.0 > 0.0;
    i64::from(a) * 2 + i64::from(b)
}

struct Mlp {
    l1: Linear,
    l2: Linear,
    l3: Linear,
}

impl Mlp {
    fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            l1: linear(FEATURES, HIDDEN, vb.pp("l1"))?,
            l2: linear(HIDDEN, HIDDEN, vb.pp("l2"))?,
            l3: linear(HIDDEN, CLASSES, vb.pp("l3"))?,
        })
    }
}

impl Mlp {
    /// The hidden states the last layer (the head) reads.
    fn hidden(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.l1.forward(xs)?.relu()?;
        self.l2.forward(&h)?.relu()
    }
}

fn main() -> Result<()> {
    let linear_head = std::env::args().any(|a| a == "--linear-head");
    let dev = Device::Cpu;
    let data = points(SAMPLES * FEATURES);
    let labels: Vec<i64> = data
        .chunks_exact(FEATURES)
        .enumerate()
        .map(|(i, x)| if i % 10 == 9 { -100 } else { label(x) })
        .collect();
    let xs = Tensor::from_vec(data, (SAMPLES, FEATURES), &dev)?;
    let ys = Tensor::from_vec(labels.clone(), SAMPLES, &dev)?;

    let varmap = VarMap::new();
    let model = Mlp::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
    let params = candle_nn::ParamsAdamW {
        lr: 1e-2,
        weight_decay: 1e-4,
        ..Default::default()
    };
    let mut opt = candle_nn::AdamW::new(varmap.all_vars(), params)?;
    let options = CrossEntropyOptions {
        label_smoothing: 0.05,
        z_loss: 1e-4,
        ..Default::default()
    };

    let mut first = None;
    let mut last = f32::NAN;
    for step in 0..=STEPS {
        let hidden = model.hidden(&xs)?;
        let logits = model.l3.forward(&hidden)?;
        let loss = if linear_head {
            let head = &model.l3;
            linear_cross_entropy(&hidden, head.weight(), head.bias(), &ys, &options)?
        } else {
            cross_entropy(&logits, &ys, &options)?
        };
        last = loss.to_scalar::<f32>()?;
        first.get_or_insert(last);
        if step % PRINT_EVERY == 0 {
            let predicted: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
            let (right, counted) = predicted
                .iter()
                .zip(&labels)
                .filter(|(_, &y)| y >= 0)
                .fold((0, 0), |(r, n), (&p, &y)| {
                    (r + usize::from(i64::from(p) == y), n + 1)
                });
            println!(
                "step {step:4}  loss {last:.4}  accuracy {:.1}%",
                100.0 * right as f64 / counted as f64
            );
        }
        if step < STEPS {
            opt.backward_step(&loss)?;
        }
    }
    let first = first.unwrap_or(f32::NAN);
    println!("loss {first:.4} -> {last:.4}");
    if last.is_nan() || last >= 0.5 * first {
        bail!("the loss did not fall enough: {first} -> {last}");
    }
    Ok(())
}
