//! Trains a small classifier with burn whose loss is lse-burn's fused linear cross-entropy:
//! the head's logits are never formed during training. Prints the loss as it goes and the
//! accuracy on held-out points at the end.
//!
//! ```text
//! cargo run --release -p lse-burn --example train -- --backend cpu|wgpu [--steps 300]
//! ```
//! (from `crates/lse-burn`, which is outside the workspace: `cargo run --release --example
//! train -- --backend cpu`.)
//!
//! The data: `CLASSES` clusters in `DIM` dimensions, each point its cluster's centre plus noise.

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use lse_burn::{linear_cross_entropy, CrossEntropyOptions, LinearCrossEntropyOptions};

const DIM: usize = 16;
const HIDDEN: usize = 64;
const CLASSES: usize = 10;
const BATCH: usize = 256;

#[derive(Module, Debug)]
struct Model {
    body: Linear,
    activation: Relu,
    /// The head, `CLASSES × HIDDEN` as a language model stores it.
    head: Param<Tensor<2>>,
}

impl Model {
    fn new(device: &Device) -> Self {
        let scale = (1.0 / HIDDEN as f64).sqrt();
        Self {
            body: LinearConfig::new(DIM, HIDDEN).init(device),
            activation: Relu::new(),
            head: Param::from_tensor(Tensor::random(
                [CLASSES, HIDDEN],
                Distribution::Uniform(-scale, scale),
                device,
            )),
        }
    }

    fn features(&self, x: Tensor<2>) -> Tensor<2> {
        self.activation.forward(self.body.forward(x))
    }
}

/// A batch of points and their classes, from a fixed generator.
struct Data {
    centres: Vec<f32>,
    state: u64,
}

impl Data {
    fn new(seed: u64) -> Self {
        let mut data = Self {
            centres: Vec::new(),
            state: seed,
        };
        data.centres = (0..CLASSES * DIM).map(|_| data.uniform() * 1.5).collect();
        data
    }

    /// A value in [-1, 1) (splitmix64).
    fn uniform(&mut self) -> f32 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn batch(&mut self, rows: usize, device: &Device) -> (Tensor<2>, Tensor<1, Int>) {
        let mut x = Vec::with_capacity(rows * DIM);
        let mut y = Vec::with_capacity(rows);
        for r in 0..rows {
            let class = r % CLASSES;
            y.push(class as i64);
            for d in 0..DIM {
                x.push(self.centres[class * DIM + d] + self.uniform() * 1.5);
            }
        }
        (
            Tensor::from_data(TensorData::new(x, [rows, DIM]), device),
            Tensor::from_data(TensorData::new(y, [rows]), device),
        )
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut backend = String::from("cpu");
    let mut steps = 300usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--backend" => backend = args.next().ok_or("--backend needs cpu or wgpu")?,
            "--steps" => steps = args.next().ok_or("--steps needs a number")?.parse()?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let device = match backend.as_str() {
        "cpu" => Device::flex(),
        #[cfg(feature = "wgpu")]
        "wgpu" => Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
        other => {
            return Err(format!("--backend {other}: cpu or wgpu (with the wgpu feature)").into())
        }
    };
    let device = device.autodiff();
    device.seed(7);

    let mut model = Model::new(&device);
    let mut optimizer = AdamConfig::new().init();
    let mut data = Data::new(42);
    let options = LinearCrossEntropyOptions {
        cross_entropy: CrossEntropyOptions {
            label_smoothing: 0.05,
            ..Default::default()
        },
        ..Default::default()
    };
    for step in 1..=steps {
        let (x, y) = data.batch(BATCH, &device);
        let features = model.features(x);
        let loss = linear_cross_entropy(features, model.head.val(), None, y, &options)?;
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        if step == 1 || step % 50 == 0 || step == steps {
            println!("step {step:4}  loss {:.4}", loss.into_scalar::<f32>());
        }
        model = optimizer.step(1e-2, model, grads);
    }

    let (x, y) = data.batch(2_000, &device.clone().without_autodiff());
    let model = model.valid();
    let logits = model.features(x).matmul(model.head.val().transpose());
    let predicted = logits.argmax(1).reshape([2_000]);
    let correct = predicted.equal(y).int().sum().into_scalar::<i64>();
    let accuracy = correct as f64 / 2_000.0;
    println!(
        "backend {backend}: held-out accuracy {:.1} % after {steps} steps",
        accuracy * 100.0
    );
    if accuracy < 0.9 {
        return Err(format!("accuracy {accuracy:.3} is below 0.9: training did not learn").into());
    }
    Ok(())
}
