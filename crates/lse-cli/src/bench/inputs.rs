//! The benchmark's inputs: seeded random logits, targets and class weights, the same for any
//! thread count.

use lse::Element;
use rayon::prelude::*;

/// Elements per chunk of the parallel random fill (each chunk has its own random stream, so the
/// data does not depend on the thread count).
const FILL_CHUNK: usize = 1 << 16;
/// The seed of the inputs.
const SEED: u64 = 0x6c73_655f_6265_6e63;
/// The standard deviation of the logits.
pub(super) const LOGIT_SCALE: f64 = 3.0;

/// The splitmix64 generator: a small, fast, well-mixed stream of 64-bit values.
#[derive(Clone, Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    /// The stream of chunk `chunk` of input `stream` (a different stream per chunk, so that a
    /// parallel fill gives the same data whatever the thread count).
    fn for_chunk(stream: u64, chunk: usize) -> Self {
        let mut mixer = SplitMix64(SEED ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        let base = mixer.next_u64();
        let mut rng = SplitMix64(base ^ (chunk as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        rng.next_u64();
        rng
    }

    /// The next value of the stream.
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in the open interval (0, 1).
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
    }

    /// Two independent N(0, 1) values (Box–Muller).
    fn normal_pair(&mut self) -> (f64, f64) {
        let r = (-2.0 * self.uniform().ln()).sqrt();
        let theta = std::f64::consts::TAU * self.uniform();
        (r * theta.cos(), r * theta.sin())
    }

    /// Uniform in `0..n` (multiply-shift; the bias is below 2⁻³² for any `n` that fits memory).
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

/// `len` values N(0, 1) · `scale` of stream `stream`, in parallel chunks.
pub(super) fn normal_vec<E: Element>(len: usize, stream: u64, scale: f64) -> Vec<E> {
    let mut data = vec![E::zero(); len];
    data.par_chunks_mut(FILL_CHUNK)
        .enumerate()
        .for_each(|(chunk, values)| {
            let mut rng = SplitMix64::for_chunk(stream, chunk);
            for pair in values.chunks_mut(2) {
                let (a, b) = rng.normal_pair();
                pair[0] = E::from_f64(a * scale);
                if let Some(v) = pair.get_mut(1) {
                    *v = E::from_f64(b * scale);
                }
            }
        });
    data
}

/// `rows` class targets uniform in `0..classes`.
/// Probability targets: the softmax of each row of N(0, 1) · [`LOGIT_SCALE`] logits of stream 4.
pub(super) fn soft_targets<E: Element>(rows: usize, classes: usize) -> Vec<E> {
    let logits = normal_vec::<E>(rows * classes, 4, LOGIT_SCALE);
    let mut soft = vec![E::zero(); rows * classes];
    lse::softmax(&logits, classes, &mut soft).expect("finite logits");
    soft
}

/// Class weights `2^U(−1, 1)` (stream 5).
pub(super) fn class_weights(classes: usize) -> Vec<f64> {
    let mut rng = SplitMix64::for_chunk(5, 0);
    (0..classes)
        .map(|_| (2.0 * rng.uniform() - 1.0).exp2())
        .collect()
}

pub(super) fn targets(rows: usize, classes: usize) -> Vec<i64> {
    let mut data = vec![0i64; rows];
    data.par_chunks_mut(FILL_CHUNK)
        .enumerate()
        .for_each(|(chunk, values)| {
            let mut rng = SplitMix64::for_chunk(3, chunk);
            for v in values {
                *v = rng.below(classes) as i64;
            }
        });
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_inputs_are_deterministic_and_plausible() {
        let a: Vec<f32> = normal_vec(100_003, 1, LOGIT_SCALE);
        let b: Vec<f32> = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| normal_vec(100_003, 1, LOGIT_SCALE));
        assert_eq!(a, b);
        let n = a.len() as f64;
        let mean = a.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = a
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 0.05, "{mean}");
        assert!((var.sqrt() - LOGIT_SCALE).abs() < 0.05, "{var}");
        let t = targets(10_000, 7);
        assert!(t.iter().all(|&c| (0..7).contains(&c)));
        assert!((0..7).all(|c| t.contains(&c)));
    }
}
