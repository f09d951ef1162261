//! Issue 14's "own trait or pulp": one read-pass body (row max, then Σ exp(x − m) with a
//! Cody–Waite exp whose 2^k is built from exponent bits) written three ways, timed in one run:
//! - `pulp`: pulp's generic `Simd` trait alone (it has no integer shift, so 2^k's bits are
//!   formed with its 32-bit multiply by 2^23);
//! - `pulp+ext`: pulp plus an extension trait that supplies the shift (`vpslld`) for `V4`;
//! - `own`: the same operations on raw AVX-512 intrinsics under one `#[target_feature]` entry,
//!   which is what lse's own `Isa` trait compiles to.
//!
//! Run: `cargo run --release` (AVX-512 machine). Prints G elem/s, best of 50, per variant.
use pulp::{Simd, WithSimd};
use std::arch::x86_64::*;
use std::time::Instant;

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23: x + MAGIC − MAGIC rounds x to an integer
const POLY: [f32; 6] = [1.0, 1.0, 0.5, 0.166_666_67, 0.041_666_67, 0.008_333_33];

/// 2^k lanes from the integer `k` held in the low bits of `k + MAGIC + 127` (as f32 bits).
trait Pow2: Simd {
    fn pow2(self, biased: Self::f32s) -> Self::f32s;
}

/// pulp alone: shift left by 23 as a multiply by 2^23.
fn pow2_generic<S: Simd>(s: S, biased: S::f32s) -> S::f32s {
    let bits = s.transmute_u32s_f32s(biased);
    s.transmute_f32s_u32s(s.mul_u32s(bits, s.splat_u32s(1 << 23)))
}

impl Pow2 for pulp::x86::V4 {
    #[inline(always)]
    fn pow2(self, biased: Self::f32s) -> Self::f32s {
        let v: __m512i = pulp::cast(biased);
        pulp::cast(unsafe { _mm512_slli_epi32::<23>(v) })
    }
}

#[inline(always)]
fn exp_sum_body<S: Simd>(s: S, x: &[f32], pow2: impl Fn(S, S::f32s) -> S::f32s) -> f32 {
    let (head, _tail) = S::as_simd_f32s(x); // rows here are whole vectors
    let mut hi = s.splat_f32s(f32::NEG_INFINITY);
    for &v in head {
        hi = s.max_f32s(hi, v);
    }
    let m = s.reduce_max_f32s(hi);
    let (neg_m, magic) = (s.splat_f32s(-m), s.splat_f32s(MAGIC));
    let mut sum = s.splat_f32s(0.0);
    for &v in head {
        let d = s.add_f32s(v, neg_m);
        let k = s.sub_f32s(s.mul_add_f32s(d, s.splat_f32s(LOG2E), magic), magic);
        let r = s.mul_add_f32s(k, s.splat_f32s(-LN2_HI), d);
        let r = s.mul_add_f32s(k, s.splat_f32s(-LN2_LO), r);
        let mut p = s.splat_f32s(POLY[5]);
        for &c in POLY[..5].iter().rev() {
            p = s.mul_add_f32s(p, r, s.splat_f32s(c));
        }
        let k = s.max_f32s(k, s.splat_f32s(-126.0));
        let scale = pow2(s, s.add_f32s(k, s.splat_f32s(MAGIC + 127.0)));
        sum = s.mul_add_f32s(p, scale, sum);
    }
    s.reduce_sum_f32s(sum)
}

struct Generic<'a>(&'a [f32]);
impl WithSimd for Generic<'_> {
    type Output = f32;
    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) -> f32 {
        exp_sum_body(s, self.0, pow2_generic::<S>)
    }
}

fn extended(v4: pulp::x86::V4, x: &[f32]) -> f32 {
    struct Op<'a>(&'a [f32], pulp::x86::V4);
    impl WithSimd for Op<'_> {
        type Output = f32;
        #[inline(always)]
        fn with_simd<S: Simd>(self, _s: S) -> f32 {
            exp_sum_body(self.1, self.0, <pulp::x86::V4 as Pow2>::pow2)
        }
    }
    Simd::vectorize(v4, Op(x, v4))
}

#[target_feature(enable = "avx512f")]
unsafe fn own(x: &[f32]) -> f32 {
    let p = x.as_ptr();
    let n = x.len() / 16;
    let mut hi = _mm512_set1_ps(f32::NEG_INFINITY);
    for i in 0..n {
        hi = _mm512_max_ps(hi, _mm512_loadu_ps(p.add(16 * i)));
    }
    let m = _mm512_reduce_max_ps(hi);
    let (neg_m, magic) = (_mm512_set1_ps(-m), _mm512_set1_ps(MAGIC));
    let mut sum = _mm512_setzero_ps();
    for i in 0..n {
        let d = _mm512_add_ps(_mm512_loadu_ps(p.add(16 * i)), neg_m);
        let k = _mm512_sub_ps(_mm512_fmadd_ps(d, _mm512_set1_ps(LOG2E), magic), magic);
        let r = _mm512_fmadd_ps(k, _mm512_set1_ps(-LN2_HI), d);
        let r = _mm512_fmadd_ps(k, _mm512_set1_ps(-LN2_LO), r);
        let mut q = _mm512_set1_ps(POLY[5]);
        for &c in POLY[..5].iter().rev() {
            q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(c));
        }
        let k = _mm512_max_ps(k, _mm512_set1_ps(-126.0));
        let biased = _mm512_add_ps(k, _mm512_set1_ps(MAGIC + 127.0));
        let scale = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_castps_si512(biased)));
        sum = _mm512_fmadd_ps(q, scale, sum);
    }
    _mm512_reduce_add_ps(sum)
}

fn time(name: &str, x: &[f32], rows: usize, f: impl Fn(&[f32]) -> f32) -> f32 {
    let cols = x.len() / rows;
    let mut best = f64::INFINITY;
    let mut total = 0.0;
    for _ in 0..50 {
        let t = Instant::now();
        for r in x.chunks(cols) {
            total += f(r);
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!("{name:9} {:6.2} G elem/s", x.len() as f64 / best / 1e9);
    total
}

fn main() {
    let v4 = pulp::x86::V4::try_new().expect("AVX-512 (x86-64-v4) CPU");
    let arch = pulp::Arch::new();
    for (rows, cols) in [(32, 32000), (1024, 1008)] {
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 1000) as f32 * 0.02 - 10.0)
            .collect();
        println!("{rows}x{cols} (one thread; in cache: rows of L2 size or less)");
        let a = time("pulp", &x, rows, |r| arch.dispatch(Generic(r)));
        let b = time("pulp+ext", &x, rows, |r| extended(v4, r));
        let c = time("own", &x, rows, |r| unsafe { own(r) });
        assert!(
            (a - c).abs() <= 1e-3 * c.abs() && (b - c).abs() <= 1e-3 * c.abs(),
            "{a} {b} {c}"
        );
    }
}
