//! The synthetic task of `lse demo`: Gaussian clusters, one per class, drawn from a seed.

/// A small deterministic random number generator (splitmix64): the same seed gives the same
/// stream on every run and platform.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
    /// The second value of the last Box–Muller pair, not yet handed out.
    spare: Option<f64>,
}

impl Rng {
    /// A generator for stream `stream` of `seed`: different streams of one seed are independent
    /// (the task, the training set, the held-out set, the initialisation and the batch order each
    /// have their own).
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut rng = Rng {
            state: seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03),
            spare: None,
        };
        // Decorrelate nearby seeds.
        rng.next_u64();
        rng
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `(0, 1)`: 53 random bits, never exactly 0.
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let radius = (-2.0 * self.uniform().ln()).sqrt();
        let angle = core::f64::consts::TAU * self.uniform();
        self.spare = Some(radius * angle.sin());
        radius * angle.cos()
    }

    /// Uniform in `0..n` (`n > 0`), by rejection: no modulo bias.
    pub fn below(&mut self, n: usize) -> usize {
        let n = n as u64;
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let v = self.next_u64();
            if v < zone {
                return (v % n) as usize;
            }
        }
    }

    /// A uniformly random permutation of `0..n` (Fisher–Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            p.swap(i, self.below(i + 1));
        }
        p
    }
}

/// The streams of one seed.
pub mod stream {
    /// The class centres.
    pub const TASK: u64 = 1;
    /// The training samples.
    pub const TRAIN: u64 = 2;
    /// The held-out samples.
    pub const HELD_OUT: u64 = 3;
    /// The initial weights.
    pub const INIT: u64 = 4;
    /// The batch order.
    pub const ORDER: u64 = 5;
}

/// `classes` Gaussian clusters in `dim` dimensions: class `c` has a centre `μ_c` whose
/// coordinates are drawn from `N(0, spread²)`, and its samples are `μ_c + N(0, I)`.
#[derive(Clone, Debug)]
pub struct Task {
    /// Input features.
    pub dim: usize,
    /// Classes.
    pub classes: usize,
    /// The centres, `classes × dim`, row-major.
    centres: Vec<f32>,
}

/// Samples of a [`Task`]: inputs `len × dim` (row-major) and their classes.
#[derive(Clone, Debug)]
pub struct Samples {
    /// Inputs, row-major.
    pub x: Vec<f32>,
    /// Class of each row.
    pub y: Vec<i64>,
}

impl Samples {
    /// The number of samples.
    pub fn len(&self) -> usize {
        self.y.len()
    }
}

impl Task {
    /// The task of `seed`.
    pub fn new(seed: u64, classes: usize, dim: usize, spread: f64) -> Self {
        let mut rng = Rng::new(seed, stream::TASK);
        let centres = (0..classes * dim)
            .map(|_| (spread * rng.normal()) as f32)
            .collect();
        Task {
            dim,
            classes,
            centres,
        }
    }

    /// `per_class` samples of every class, in a random order, from stream `stream` of `seed`.
    pub fn sample(&self, seed: u64, stream: u64, per_class: usize) -> Samples {
        let mut rng = Rng::new(seed, stream);
        let n = per_class * self.classes;
        let order = rng.permutation(n);
        let mut x = Vec::with_capacity(n * self.dim);
        let mut y = Vec::with_capacity(n);
        for i in order {
            let class = i % self.classes;
            let centre = &self.centres[class * self.dim..(class + 1) * self.dim];
            x.extend(centre.iter().map(|&m| m + rng.normal() as f32));
            y.push(class as i64);
        }
        Samples { x, y }
    }

    /// The accuracy of the Bayes-optimal rule on `samples` (the nearest true centre; the classes
    /// are equally likely and share one covariance): what no classifier can beat on average.
    pub fn nearest_centre_accuracy(&self, samples: &Samples) -> f64 {
        let correct = samples
            .x
            .chunks_exact(self.dim)
            .zip(&samples.y)
            .filter(|(row, &y)| {
                let distance = |c: usize| -> f32 {
                    let centre = &self.centres[c * self.dim..(c + 1) * self.dim];
                    row.iter().zip(centre).map(|(a, b)| (a - b) * (a - b)).sum()
                };
                let best = (0..self.classes)
                    .map(|c| (c, distance(c)))
                    .min_by(|a, b| a.1.total_cmp(&b.1))
                    .map_or(0, |(c, _)| c);
                best as i64 == y
            })
            .count();
        correct as f64 / samples.len().max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_deterministic_and_distinct() {
        let a: Vec<u64> = (0..4).map(|_| Rng::new(7, 1).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(Rng::new(7, 1).next_u64(), Rng::new(7, 2).next_u64());
        assert_ne!(Rng::new(7, 1).next_u64(), Rng::new(8, 1).next_u64());
        let mut rng = Rng::new(1, 1);
        let mut p = rng.permutation(50);
        p.sort_unstable();
        assert_eq!(p, (0..50).collect::<Vec<_>>());
        let mean = (0..10_000).map(|_| rng.normal()).sum::<f64>() / 10_000.0;
        assert!(mean.abs() < 0.05, "{mean}");
    }

    #[test]
    fn samples_are_balanced_and_separable() {
        let task = Task::new(3, 10, 8, 2.0);
        let s = task.sample(3, stream::TRAIN, 20);
        assert_eq!((s.len(), s.x.len()), (200, 1600));
        for c in 0..10 {
            assert_eq!(s.y.iter().filter(|&&y| y == c).count(), 20);
        }
        assert!(task.nearest_centre_accuracy(&s) > 0.9);
    }
}
