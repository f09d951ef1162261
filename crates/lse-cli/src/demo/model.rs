//! The model of `lse demo`: a one-hidden-layer MLP in `f32`, with hand-written matmuls.
//!
//! Weights, activations and parameter gradients are `f32`; the caller rounds the logits into the
//! low-precision dtype and hands back the gradient with respect to them.

use super::data::{Rng, Samples};

/// `input → hidden (ReLU) → classes`, weights row-major: `w1` is `dim × hidden`, `w2` is
/// `hidden × classes`.
#[derive(Clone, Debug, PartialEq)]
pub struct Mlp {
    /// Input features.
    pub dim: usize,
    /// Hidden units.
    pub hidden: usize,
    /// Classes (logits per row).
    pub classes: usize,
    /// Parameters: `w1`, `b1`, `w2`, `b2`.
    pub params: Params,
}

/// The four parameter tensors (or their gradients, or their momenta).
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    /// First layer weights, `dim × hidden`.
    pub w1: Vec<f32>,
    /// First layer bias, `hidden`.
    pub b1: Vec<f32>,
    /// Output layer weights, `hidden × classes`.
    pub w2: Vec<f32>,
    /// Output layer bias, `classes`.
    pub b2: Vec<f32>,
}

impl Params {
    /// All zero, shaped for `dim → hidden → classes`.
    pub fn zeros(dim: usize, hidden: usize, classes: usize) -> Self {
        Params {
            w1: vec![0.0; dim * hidden],
            b1: vec![0.0; hidden],
            w2: vec![0.0; hidden * classes],
            b2: vec![0.0; classes],
        }
    }

    /// The tensors with their names and row lengths (for the loss scaler's report).
    pub fn named_mut(
        &mut self,
        hidden: usize,
        classes: usize,
    ) -> [(&'static str, &mut [f32], usize); 4] {
        let b1_len = self.b1.len();
        let b2_len = self.b2.len();
        [
            ("grad_w1", &mut self.w1[..], hidden),
            ("grad_b1", &mut self.b1[..], b1_len),
            ("grad_w2", &mut self.w2[..], classes),
            ("grad_b2", &mut self.b2[..], b2_len),
        ]
    }

    fn tensors(&self) -> [&[f32]; 4] {
        [&self.w1, &self.b1, &self.w2, &self.b2]
    }

    fn tensors_mut(&mut self) -> [&mut Vec<f32>; 4] {
        [&mut self.w1, &mut self.b1, &mut self.w2, &mut self.b2]
    }

    /// The number of values.
    pub fn len(&self) -> usize {
        self.tensors().iter().map(|t| t.len()).sum()
    }

    /// The number of NaN or infinite values.
    pub fn non_finite(&self) -> usize {
        self.tensors()
            .iter()
            .map(|t| t.iter().filter(|v| !v.is_finite()).count())
            .sum()
    }
}

/// The state of the Adam optimizer: first and second moments, and the number of updates.
#[derive(Clone, Debug)]
pub struct Adam {
    m: Params,
    v: Params,
    t: i32,
}

impl Adam {
    /// A fresh optimizer for a model `dim → hidden → classes`.
    pub fn new(dim: usize, hidden: usize, classes: usize) -> Self {
        Adam {
            m: Params::zeros(dim, hidden, classes),
            v: Params::zeros(dim, hidden, classes),
            t: 0,
        }
    }
}

/// Scratch buffers of one step, reused from step to step.
#[derive(Clone, Debug, Default)]
pub struct Activations {
    /// Hidden activations after the ReLU, `rows × hidden`.
    pub h: Vec<f32>,
    /// Logits in `f32`, `rows × classes`.
    pub z: Vec<f32>,
    /// Gradient with respect to the hidden pre-activations, `rows × hidden`.
    dh: Vec<f32>,
}

/// `y += a · x`.
#[inline]
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// `Σ a_i b_i` with eight partial sums (vectorizes; the order is fixed, so results are
/// reproducible).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

impl Mlp {
    /// He-initialised first layer (`N(0, 2/dim)`), an output layer drawn from
    /// `N(0, (out_scale² / hidden))`, zero biases; from the initialisation stream of `rng`.
    pub fn new(rng: &mut Rng, dim: usize, hidden: usize, classes: usize, out_scale: f64) -> Self {
        let mut params = Params::zeros(dim, hidden, classes);
        let s1 = (2.0 / dim as f64).sqrt();
        params
            .w1
            .iter_mut()
            .for_each(|w| *w = (s1 * rng.normal()) as f32);
        let s2 = out_scale / (hidden as f64).sqrt();
        params
            .w2
            .iter_mut()
            .for_each(|w| *w = (s2 * rng.normal()) as f32);
        Mlp {
            dim,
            hidden,
            classes,
            params,
        }
    }

    /// The forward pass of `x` (`rows × dim`): hidden activations into `acts.h`, `f32` logits
    /// into `acts.z`.
    pub fn forward(&self, x: &[f32], acts: &mut Activations) {
        let (d, hd, c) = (self.dim, self.hidden, self.classes);
        let rows = x.len() / d;
        let p = &self.params;
        acts.h.resize(rows * hd, 0.0);
        acts.z.resize(rows * c, 0.0);
        for ((xr, hr), zr) in x
            .chunks_exact(d)
            .zip(acts.h.chunks_exact_mut(hd))
            .zip(acts.z.chunks_exact_mut(c))
        {
            hr.copy_from_slice(&p.b1);
            for (&xv, w) in xr.iter().zip(p.w1.chunks_exact(hd)) {
                axpy(xv, w, hr);
            }
            hr.iter_mut().for_each(|v| *v = v.max(0.0));
            zr.copy_from_slice(&p.b2);
            for (&hv, w) in hr.iter().zip(p.w2.chunks_exact(c)) {
                axpy(hv, w, zr);
            }
        }
    }

    /// The backward pass: parameter gradients of a batch into `grads` (overwritten), from the
    /// inputs `x`, the activations of [`Mlp::forward`] and the gradient `gz` with respect to the
    /// logits (`rows × classes`, `f32`).
    ///
    /// NaN and infinities propagate as in any framework: a product with a non-finite gradient is
    /// non-finite even where the activation is 0; the ReLU's backward selects (0 where the unit
    /// was off).
    pub fn backward(&self, x: &[f32], acts: &mut Activations, gz: &[f32], grads: &mut Params) {
        let (d, hd, c) = (self.dim, self.hidden, self.classes);
        let rows = x.len() / d;
        for t in grads.tensors_mut() {
            t.fill(0.0);
        }
        acts.dh.resize(rows * hd, 0.0);
        let p = &self.params;
        for (((xr, hr), gr), dhr) in x
            .chunks_exact(d)
            .zip(acts.h.chunks_exact(hd))
            .zip(gz.chunks_exact(c))
            .zip(acts.dh.chunks_exact_mut(hd))
        {
            axpy(1.0, gr, &mut grads.b2);
            for ((&hv, gw), (w, dh)) in hr
                .iter()
                .zip(grads.w2.chunks_exact_mut(c))
                .zip(p.w2.chunks_exact(c).zip(dhr.iter_mut()))
            {
                axpy(hv, gr, gw);
                let back = dot(gr, w);
                *dh = if hv > 0.0 { back } else { 0.0 };
            }
            axpy(1.0, dhr, &mut grads.b1);
            for (&xv, gw) in xr.iter().zip(grads.w1.chunks_exact_mut(hd)) {
                axpy(xv, dhr, gw);
            }
        }
    }

    /// One Adam step (`β1 = 0.9`, `β2 = 0.999`, `ε = 1e-8`, bias-corrected; `t` counts the
    /// updates applied, from 1), with the moments in `state`.
    pub fn adam(&mut self, grads: &Params, state: &mut Adam, lr: f32) {
        const B1: f32 = 0.9;
        const B2: f32 = 0.999;
        const EPS: f32 = 1e-8;
        state.t += 1;
        let c1 = 1.0 - B1.powi(state.t);
        let c2 = 1.0 - B2.powi(state.t);
        for (((theta, g), m), v) in self
            .params
            .tensors_mut()
            .into_iter()
            .zip(grads.tensors())
            .zip(state.m.tensors_mut())
            .zip(state.v.tensors_mut())
        {
            for (((p, &g), m), v) in theta.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                *m = B1 * *m + (1.0 - B1) * g;
                *v = B2 * *v + (1.0 - B2) * g * g;
                *p -= lr * (*m / c1) / ((*v / c2).sqrt() + EPS);
            }
        }
    }

    /// The fraction of `samples` whose largest logit is at their class.
    pub fn accuracy(&self, samples: &Samples) -> f64 {
        let mut acts = Activations::default();
        let mut correct = 0usize;
        for (x, y) in samples.x.chunks(256 * self.dim).zip(samples.y.chunks(256)) {
            self.forward(x, &mut acts);
            correct += acts
                .z
                .chunks_exact(self.classes)
                .zip(y)
                .filter(|(row, &y)| argmax(row) == Some(y as usize))
                .count();
        }
        correct as f64 / samples.len().max(1) as f64
    }
}

/// The index of the largest value (the first on ties); `None` when a value is NaN or the row is
/// empty (a NaN model predicts nothing).
pub fn argmax(row: &[f32]) -> Option<usize> {
    if row.iter().any(|v| v.is_nan()) {
        return None;
    }
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    (!row.is_empty()).then_some(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loss `Σ_r Σ_c gz_rc · z_rc` of the network: its gradient is what `backward` computes.
    fn probe(m: &Mlp, x: &[f32], gz: &[f32]) -> f64 {
        let mut acts = Activations::default();
        m.forward(x, &mut acts);
        acts.z
            .iter()
            .zip(gz)
            .map(|(&z, &g)| f64::from(z) * f64::from(g))
            .sum()
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::new(1, 1);
        let m = Mlp::new(&mut rng, 5, 7, 4, 1.0);
        let mut m = Mlp {
            params: Params {
                b1: (0..7).map(|i| 0.1 * i as f32 - 0.3).collect(),
                b2: vec![0.5, -0.5, 0.25, 0.0],
                ..m.params
            },
            ..m
        };
        let x: Vec<f32> = (0..15).map(|_| rng.normal() as f32).collect();
        let gz: Vec<f32> = (0..12).map(|_| rng.normal() as f32).collect();
        let mut acts = Activations::default();
        let mut grads = Params::zeros(5, 7, 4);
        m.forward(&x, &mut acts);
        m.backward(&x, &mut acts, &gz, &mut grads);
        let analytic = grads.clone();
        let h = 1e-3f32;
        for t in 0..4 {
            for i in 0..m.params.tensors()[t].len() {
                let orig = m.params.tensors()[t][i];
                m.params.tensors_mut()[t][i] = orig + h;
                let up = probe(&m, &x, &gz);
                m.params.tensors_mut()[t][i] = orig - h;
                let down = probe(&m, &x, &gz);
                m.params.tensors_mut()[t][i] = orig;
                let numeric = (up - down) / (2.0 * f64::from(h));
                let got = f64::from(analytic.tensors()[t][i]);
                assert!(
                    (numeric - got).abs() < 1e-2 * (1.0 + got.abs()),
                    "tensor {t} index {i}: {got} vs {numeric}"
                );
            }
        }
    }

    #[test]
    fn dot_and_argmax() {
        let a: Vec<f32> = (0..19).map(|i| i as f32).collect();
        assert_eq!(dot(&a, &a), (0..19).map(|i| (i * i) as f32).sum::<f32>());
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), Some(1));
        assert_eq!(argmax(&[1.0, f32::NAN]), None);
        assert_eq!(argmax(&[]), None);
    }
}
