//! A training loop wired with the three guards: f16 logits and gradients (as in mixed-precision
//! training), the fused cross-entropy gathering logit statistics for the monitor, a finiteness
//! guard on the first batches, and a dynamic loss scaler that skips overflowing steps.
//!
//! `cargo run --release -p lse --example guarded_training`
//!
//! The model is softmax regression on a synthetic task: 16 features, 10 classes, labels from a
//! hidden linear teacher.

use lse::guard::{FiniteGuard, LogitMonitor, LossScaler, MonitorConfig, Role, Schedule};
use lse::{cross_entropy_with_grad, f16, CrossEntropyOptions, GradOutput, Reduction, Targets};

const FEATURES: usize = 16;
const CLASSES: usize = 10;
const BATCH: usize = 64;

/// Deterministic values in [-1, 1) (splitmix64).
fn noise(state: &mut u64) -> f32 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// `x · w` for a batch (`rows × FEATURES` times `FEATURES × CLASSES`), rounded to f16.
fn logits(x: &[f32], w: &[f32]) -> Vec<f16> {
    x.chunks(FEATURES)
        .flat_map(|row| {
            (0..CLASSES).map(move |c| {
                f16::from_f32((0..FEATURES).map(|f| row[f] * w[f * CLASSES + c]).sum())
            })
        })
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut seed = 7u64;
    let teacher: Vec<f32> = (0..FEATURES * CLASSES)
        .map(|_| noise(&mut seed) * 3.0)
        .collect();
    let mut weights = vec![0f32; FEATURES * CLASSES];

    let mut guard = FiniteGuard::new(Schedule::FirstThenEvery {
        first: 20,
        every: 50,
    });
    let mut monitor = LogitMonitor::new(MonitorConfig::default())?;
    let mut scaler = LossScaler::default();
    // A summed loss: its scaled gradients are large enough to overflow f16 at the initial scale.
    let options = CrossEntropyOptions {
        label_smoothing: 0.05,
        reduction: Reduction::Sum,
        keep_logit_stats: true,
        ..Default::default()
    };
    let (mut skipped, mut warnings, mut correct) = (0, 0, 0);

    for step in 0..400u64 {
        let x: Vec<f32> = (0..BATCH * FEATURES)
            .map(|_| noise(&mut seed) * 2.0)
            .collect();
        let y: Vec<i64> = logits(&x, &teacher)
            .chunks(CLASSES)
            .map(|row| {
                (0..CLASSES)
                    .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                    .unwrap_or(0) as i64
            })
            .collect();

        guard.begin_batch(step);
        guard.check_slice("inputs", Role::Input, &x, FEATURES)?;
        let z = logits(&x, &weights);
        guard.check_slice("logits", Role::Logits, &z, CLASSES)?;

        // The loss is scaled through the incoming gradient: d(scale · loss)/dz, in f16.
        let mut grad_z = vec![f16::ZERO; z.len()];
        let grad_out = GradOutput::Scalar(scaler.scale() as f32);
        let mut out = cross_entropy_with_grad(
            &z,
            CLASSES,
            Targets::Classes(&y),
            &options,
            grad_out,
            &mut grad_z,
        )?;
        guard.check_loss("loss", f64::from(out.loss))?;
        if let Some(stats) = out.logit_stats.take() {
            let raised = monitor.record(step, stats);
            if warnings == 0 {
                raised
                    .iter()
                    .for_each(|w| println!("first monitor warning: {w}"));
            }
            warnings += raised.len();
        }
        if step >= 300 {
            // Held-out accuracy: these batches are fresh draws, scored before the update.
            let predicted = z.chunks(CLASSES).map(|row| {
                (0..CLASSES)
                    .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                    .unwrap_or(0) as i64
            });
            correct += predicted.zip(&y).filter(|(p, t)| p == *t).count();
        }

        // dW = xᵀ · dz, kept in f16 like the rest of the backward pass: it can overflow.
        let mut grad_w: Vec<f16> = (0..FEATURES * CLASSES)
            .map(|i| {
                let (f, c) = (i / CLASSES, i % CLASSES);
                f16::from_f32(
                    (0..BATCH)
                        .map(|r| x[r * FEATURES + f] * grad_z[r * CLASSES + c].to_f32())
                        .sum(),
                )
            })
            .collect();
        let mut unscale = scaler.unscaler();
        unscale.apply("grad_w", &mut grad_w, CLASSES)?;
        let report = unscale.finish();
        if report.skipped || step % 100 == 0 {
            println!("loss {:8.4} | {report}", out.loss / BATCH as f32);
        }
        if report.skipped {
            skipped += 1;
        } else {
            let lr = 0.5 / BATCH as f32;
            weights
                .iter_mut()
                .zip(&grad_w)
                .for_each(|(w, g)| *w -= lr * g.to_f32());
        }
    }
    println!(
        "skipped steps: {skipped}, final scale: {}, monitor events: {warnings}, \
         held-out accuracy (last 100 batches): {:.1}%",
        scaler.scale(),
        100.0 * correct as f64 / (100 * BATCH) as f64
    );
    Ok(())
}
