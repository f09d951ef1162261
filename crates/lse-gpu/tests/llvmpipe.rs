//! The GPU kernels against `lse`'s CPU results, on whatever adapter wgpu finds first (in CI:
//! Mesa's llvmpipe). No adapter is a failure, not a skip.
//!
//! Bounds are in units in the last place of the storage dtype (ulps), measured on llvmpipe
//! (LLVM 15, AMD EPYC) and written down in docs/gpu.md; `LSE_GPU_REPORT=1` prints the worst
//! case of each check.

use half::{bf16, f16};
use lse::{
    CrossEntropyOptions, DType, EmptyMean, GradOutput, LseError, NonFinite, Reduction, Targets,
};
use lse_gpu::{Error, Gpu, GpuElement};

fn gpu() -> Gpu {
    let gpu = Gpu::new().expect("no GPU adapter: install Mesa's mesa-vulkan-drivers");
    eprintln!("adapter: {:?}", gpu.adapter());
    gpu
}

/// A deterministic generator (xorshift), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A row of `n` logits: ordinary values, a spread of scales, a few masks (never all).
    fn logits<E: GpuElement>(&mut self, n: usize, scale: f64, masks: bool) -> Vec<E> {
        (0..n)
            .map(|i| {
                if masks && i % 7 == 3 {
                    E::from_f64(f64::NEG_INFINITY)
                } else {
                    E::from_f64((self.next() * 2.0 - 1.0) * scale)
                }
            })
            .collect()
    }
}

/// The distance in ulps of the dtype between two values of it (0 for equal, NaN = NaN).
fn ulps<E: GpuElement>(a: E, b: E) -> u64 {
    let (a, b) = (a.to_f64(), b.to_f64());
    if a.is_nan() || b.is_nan() {
        return if a.is_nan() && b.is_nan() {
            0
        } else {
            u64::MAX
        };
    }
    if a == b {
        return 0;
    }
    let ordered = |v: f64| -> i64 {
        let bits = i64::from(E::pack(&[E::from_f64(v)])[0] & width_mask::<E>());
        let sign = 1i64 << (bit_width::<E>() - 1);
        if bits & sign != 0 {
            -(bits & (sign - 1))
        } else {
            bits
        }
    };
    ordered(a).abs_diff(ordered(b))
}

fn bit_width<E: GpuElement>() -> u32 {
    if E::DTYPE == DType::F32 {
        32
    } else {
        16
    }
}

fn width_mask<E: GpuElement>() -> u32 {
    if E::DTYPE == DType::F32 {
        u32::MAX
    } else {
        0xffff
    }
}

fn report(what: &str, worst: u64) {
    if std::env::var_os("LSE_GPU_REPORT").is_some() {
        eprintln!("{what}: worst {worst}");
    }
}

/// Worst ulp distance between two buffers.
fn worst<E: GpuElement>(got: &[E], want: &[E]) -> u64 {
    got.iter()
        .zip(want)
        .map(|(&g, &w)| ulps(g, w))
        .max()
        .unwrap_or(0)
}

/// Row lengths: single-column, shorter than a cube, not a multiple of it, long.
const LENGTHS: [usize; 6] = [1, 7, 256, 333, 1000, 4099];

fn forward_ops<E: GpuElement>(bound: u64) {
    let gpu = gpu();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for &classes in &LENGTHS {
        for scale in [1.0, 30.0, 1e4] {
            let rows = 5;
            let masks = classes > 1;
            let x: Vec<E> = (0..rows)
                .flat_map(|_| rng.logits::<E>(classes, scale, masks))
                .collect();
            let allow: Vec<_> = x.chunks(classes).map(rounding_allowance).collect();
            let worst_beyond = |got: &[E], want: &[E], pick: &dyn Fn(usize, usize) -> f64| {
                let mut w = 0;
                for (i, (&g, &c)) in got.iter().zip(want).enumerate() {
                    w = w.max(ulps_beyond(g, c, pick(i / classes, i % classes)));
                }
                w
            };
            let (mut cpu, mut dev) = (vec![E::zero(); x.len()], vec![E::zero(); x.len()]);
            lse::softmax(&x, classes, &mut cpu).unwrap();
            gpu.softmax(&x, classes, &mut dev, NonFinite::Error)
                .unwrap();
            let w = worst_beyond(&dev, &cpu, &|r, c| allow[r].0[c]);
            report(
                &format!("{:?} softmax K={classes} scale={scale}", E::DTYPE),
                w,
            );
            assert!(w <= bound, "softmax K={classes} scale={scale}: {w} ulps");

            lse::log_softmax(&x, classes, &mut cpu).unwrap();
            gpu.log_softmax(&x, classes, &mut dev, NonFinite::Error)
                .unwrap();
            let w = worst_beyond(&dev, &cpu, &|r, c| allow[r].1[c]);
            report(
                &format!("{:?} log_softmax K={classes} scale={scale}", E::DTYPE),
                w,
            );
            assert!(
                w <= bound,
                "log_softmax K={classes} scale={scale}: {w} ulps"
            );

            let (mut cpu_lse, mut dev_lse) = (vec![0f32; rows], vec![0f32; rows]);
            lse::logsumexp(&x, classes, &mut cpu_lse).unwrap();
            gpu.logsumexp(&x, classes, &mut dev_lse, NonFinite::Error)
                .unwrap();
            let w = (0..rows)
                .map(|r| ulps_beyond(dev_lse[r], cpu_lse[r], allow[r].2))
                .max()
                .unwrap_or(0);
            report(
                &format!("{:?} logsumexp K={classes} scale={scale}", E::DTYPE),
                w,
            );
            assert!(
                w <= LSE_BOUND,
                "logsumexp K={classes} scale={scale}: {w} ulps"
            );
        }
    }
}

/// What rounding `x − m` once in `f32` costs, per element of a row, as absolute errors of
/// softmax, log_softmax and the row's logsumexp: `exp(x_j − m)` inherits `|x_j − m| · 2^-24`
/// relative, and `s'` (so log1p(s')) the sum of those, `A = 2^-24 Σ_j p_j |x_j − m|`. The CPU
/// adds that rounding error back (two-sum in `f64`); a shader cannot count on doing so, since
/// compilers reassociate float arithmetic (Mesa does), so the tests allow it and count the
/// ulps beyond it. See docs/gpu.md.
fn rounding_allowance<E: GpuElement>(row: &[E]) -> (Vec<f64>, Vec<f64>, f64) {
    let m = row
        .iter()
        .map(|v| v.to_f64())
        .fold(f64::NEG_INFINITY, f64::max);
    let unit = 2f64.powi(-24);
    let live = |v: f64| v > f64::NEG_INFINITY;
    let total: f64 = row
        .iter()
        .map(|v| v.to_f64())
        .filter(|&v| live(v))
        .map(|v| (v - m).exp())
        .sum();
    let row_term: f64 = row
        .iter()
        .map(|v| v.to_f64())
        .filter(|&v| live(v))
        .map(|v| (v - m).exp() / total * (m - v) * unit)
        .sum();
    let softmax = row
        .iter()
        .map(|v| v.to_f64())
        .map(|v| {
            if live(v) {
                (v - m).exp() / total * ((m - v) * unit + row_term)
            } else {
                0.0
            }
        })
        .collect();
    let log_softmax = row
        .iter()
        .map(|v| v.to_f64())
        .map(|v| {
            if live(v) {
                (m - v) * unit + row_term
            } else {
                0.0
            }
        })
        .collect();
    (softmax, log_softmax, row_term)
}

/// The ulps between `got` and `want` beyond an absolute `allowed`.
fn ulps_beyond<E: GpuElement>(got: E, want: E, allowed: f64) -> u64 {
    let (g, w) = (got.to_f64(), want.to_f64());
    if g.is_nan() || w.is_nan() || g.is_infinite() || w.is_infinite() {
        return ulps(got, want);
    }
    let excess = ((g - w).abs() - allowed).max(0.0);
    ulps(E::from_f64(w + excess.copysign(g - w)), want)
}

/// logsumexp is an `f32` statistic for every storage dtype.
const LSE_BOUND: u64 = 4;

#[test]
fn forward_f32() {
    forward_ops::<f32>(4);
}

#[test]
fn forward_f16() {
    forward_ops::<f16>(1);
}

#[test]
fn forward_bf16() {
    forward_ops::<bf16>(1);
}

fn backward_ops<E: GpuElement>(bound: u64) {
    let gpu = gpu();
    let mut rng = Rng(7);
    for &classes in &LENGTHS {
        let rows = 3;
        let x: Vec<E> = (0..rows)
            .flat_map(|_| rng.logits::<E>(classes, 5.0, false))
            .collect();
        let dy: Vec<E> = (0..x.len())
            .map(|_| E::from_f64(rng.next() - 0.5))
            .collect();
        let mut y = vec![E::zero(); x.len()];
        let (mut cpu, mut dev) = (vec![E::zero(); x.len()], vec![E::zero(); x.len()]);

        lse::softmax(&x, classes, &mut y).unwrap();
        lse::softmax_backward(&y, &dy, classes, &mut cpu).unwrap();
        gpu.softmax_backward(&y, &dy, classes, &mut dev).unwrap();
        let w = worst_relative(&dev, &cpu);
        report(&format!("{:?} softmax_backward K={classes}", E::DTYPE), w);
        assert!(w <= bound, "softmax_backward K={classes}: {w}");

        lse::log_softmax(&x, classes, &mut y).unwrap();
        lse::log_softmax_backward(&y, &dy, classes, &mut cpu).unwrap();
        gpu.log_softmax_backward(&y, &dy, classes, &mut dev)
            .unwrap();
        let w = worst_relative(&dev, &cpu);
        report(
            &format!("{:?} log_softmax_backward K={classes}", E::DTYPE),
            w,
        );
        assert!(w <= bound, "log_softmax_backward K={classes}: {w}");
    }
}

/// Ulps, but a difference below the row's largest magnitude times the dtype's epsilon counts as
/// 0: a backward subtracts (`dy − dot`), so an element near 0 has only absolute accuracy.
fn worst_relative<E: GpuElement>(got: &[E], want: &[E]) -> u64 {
    let scale = want.iter().map(|v| v.to_f64().abs()).fold(0.0, f64::max);
    let floor = scale * E::DTYPE.unit_roundoff() * 8.0;
    got.iter()
        .zip(want)
        .map(|(&g, &w)| {
            if (g.to_f64() - w.to_f64()).abs() <= floor {
                0
            } else {
                ulps(g, w)
            }
        })
        .max()
        .unwrap_or(0)
}

#[test]
fn backward_f32() {
    backward_ops::<f32>(16);
}

#[test]
fn backward_f16() {
    backward_ops::<f16>(1);
}

#[test]
fn backward_bf16() {
    backward_ops::<bf16>(1);
}

/// Every combination of the class-target options against the CPU: loss, row losses, row
/// logsumexp and gradient.
/// The device's z-loss term (from its row lse, a few `f32` ulps each) against the CPU's.
fn assert_z_term(what: &str, dev: f32, cpu: f32) {
    let (dev, cpu) = (f64::from(dev), f64::from(cpu));
    let r = if cpu == 0.0 {
        dev.abs()
    } else {
        ((dev - cpu) / cpu).abs()
    };
    assert!(r < 1e-6, "{what}: z-loss term {dev} vs {cpu}");
}

fn cross_entropy_options<E: GpuElement>(grad_bound: u64) {
    let gpu = gpu();
    let mut rng = Rng(42);
    let classes = 333;
    let rows = 9;
    let x: Vec<E> = (0..rows)
        .flat_map(|r| rng.logits::<E>(classes, if r % 3 == 0 { 1e3 } else { 8.0 }, r % 2 == 0))
        .collect();
    // Targets on live classes (masks sit at i % 7 == 3), one ignored row.
    let targets: Vec<i64> = (0..rows as i64)
        .map(|r| {
            if r == 4 {
                -100
            } else {
                (r * 37 + 1) % classes as i64
            }
        })
        .map(|t| if t >= 0 && t % 7 == 3 { t + 1 } else { t })
        .collect();
    let weights: Vec<f64> = (0..classes).map(|c| 0.25 + (c % 5) as f64 * 0.5).collect();
    let mut worst_loss = 0.0f64;
    let mut worst_grad = 0;
    for weighted in [false, true] {
        for smoothing in [0.0, 0.1] {
            for z_loss in [0.0, 1e-4] {
                for softcap in [None, Some(30.0)] {
                    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                        let options = CrossEntropyOptions {
                            weights: weighted.then_some(weights.as_slice()),
                            label_smoothing: smoothing,
                            z_loss,
                            softcap,
                            reduction,
                            keep_row_loss: true,
                            keep_row_lse: true,
                            ..Default::default()
                        };
                        let what = format!("{options:?}");
                        let mut cpu_grad = vec![E::zero(); x.len()];
                        let cpu = lse::cross_entropy_with_grad(
                            &x,
                            classes,
                            Targets::Classes(&targets),
                            &options,
                            GradOutput::Scalar(1.0),
                            &mut cpu_grad,
                        )
                        .unwrap();
                        let mut dev_grad = vec![E::zero(); x.len()];
                        let dev = gpu
                            .cross_entropy(
                                &x,
                                classes,
                                &targets,
                                &options,
                                GradOutput::Scalar(1.0),
                                Some(&mut dev_grad),
                            )
                            .unwrap();
                        assert_eq!(dev.denominator, cpu.denominator);
                        assert_eq!(dev.counted_rows, cpu.counted_rows);
                        let rel = |a: f32, b: f32| {
                            ((f64::from(a) - f64::from(b)) / f64::from(b).abs().max(1e-30)).abs()
                        };
                        let r = rel(dev.loss, cpu.loss);
                        worst_loss = worst_loss.max(r);
                        assert!(r < 4e-7, "{what}: loss {} vs {}", dev.loss, cpu.loss);
                        assert_z_term(&what, dev.z_loss, cpu.z_loss);
                        for (row, (d, c)) in dev
                            .row_loss
                            .as_ref()
                            .unwrap()
                            .iter()
                            .zip(cpu.row_loss.as_ref().unwrap())
                            .enumerate()
                        {
                            let r = if *c == 0.0 {
                                f64::from(d.abs())
                            } else {
                                rel(*d, *c)
                            };
                            assert!(r < 4e-7, "{what}: row {row} loss {d} vs {c}");
                        }
                        let (dl, cl) = (dev.row_lse.unwrap(), cpu.row_lse.unwrap());
                        assert!(
                            worst(&dl, &cl) <= LSE_BOUND,
                            "{what}: row lse {dl:?} vs {cl:?}"
                        );
                        let w = worst_relative(&dev_grad, &cpu_grad);
                        worst_grad = worst_grad.max(w);
                        assert!(w <= grad_bound, "{what}: gradient {w} ulps");
                    }
                }
            }
        }
    }
    report(
        &format!("{:?} cross-entropy loss (relative)", E::DTYPE),
        (worst_loss * 1e9) as u64,
    );
    report(
        &format!("{:?} cross-entropy gradient", E::DTYPE),
        worst_grad,
    );
}

#[test]
fn cross_entropy_f32() {
    cross_entropy_options::<f32>(16);
}

#[test]
fn cross_entropy_f16() {
    cross_entropy_options::<f16>(1);
}

#[test]
fn cross_entropy_bf16() {
    cross_entropy_options::<bf16>(1);
}

/// A confident row: the loss keeps its digits (log1p form), where `lse − x_y` would give 0.
#[test]
fn confident_row_keeps_digits() {
    let gpu = gpu();
    let x = [30.0f32, 0.0, -10_000.0, -10_000.0];
    let options = CrossEntropyOptions::default();
    let dev = gpu
        .cross_entropy(&x, 4, &[0], &options, GradOutput::Scalar(1.0), None)
        .unwrap();
    let want = (-30.0f64).exp().ln_1p(); // 9.3576e-14
    assert!(
        ((f64::from(dev.loss) - want) / want).abs() < 1e-6,
        "{} vs {want}",
        dev.loss
    );
}

/// Extreme logits: the kernels stay finite and right where the naive control overflows.
#[test]
fn extreme_logits_and_the_naive_control() {
    let gpu = gpu();
    let x = [100.0f32, 99.0, -5.0, 1e4, 1e4 - 1.0, 0.0];
    let mut cpu = [0.0f32; 6];
    lse::softmax(&x, 3, &mut cpu).unwrap();
    let mut dev = [0.0f32; 6];
    gpu.softmax(&x, 3, &mut dev, NonFinite::Error).unwrap();
    assert!(worst(&dev, &cpu) <= 4, "{dev:?} vs {cpu:?}");
    let mut naive = [0.0f32; 6];
    gpu.naive_softmax(&x, 3, &mut naive).unwrap();
    assert!(
        worst(&naive, &cpu) > 4,
        "the naive control must fail this check: {naive:?}"
    );
    assert!(naive.iter().any(|v| v.is_nan()), "{naive:?}");
    // On ordinary logits the control agrees: it is a working softmax, not a broken one.
    let calm = [1.0f32, 2.0, 3.0];
    let (mut c, mut n) = ([0.0f32; 3], [0.0f32; 3]);
    lse::softmax(&calm, 3, &mut c).unwrap();
    gpu.naive_softmax(&calm, 3, &mut n).unwrap();
    assert!(worst(&n, &c) <= 4, "{n:?} vs {c:?}");
}

/// Masks: a masked logit gets probability 0 and log-probability `-inf`; a fully masked row is
/// all 0 / all `-inf` with logsumexp `-inf`.
#[test]
fn masks_by_bits() {
    let gpu = gpu();
    let ninf = f32::NEG_INFINITY;
    let x = [1.0f32, ninf, 2.0, ninf, ninf, ninf];
    let (mut cpu, mut dev) = ([0.0f32; 6], [0.0f32; 6]);
    lse::softmax(&x, 3, &mut cpu).unwrap();
    gpu.softmax(&x, 3, &mut dev, NonFinite::Error).unwrap();
    assert_eq!(dev[1], 0.0);
    assert_eq!(&dev[3..], &[0.0; 3]);
    assert!(worst(&dev, &cpu) <= 4);
    lse::log_softmax(&x, 3, &mut cpu).unwrap();
    gpu.log_softmax(&x, 3, &mut dev, NonFinite::Error).unwrap();
    assert_eq!(dev[1], ninf);
    assert_eq!(&dev[3..], &[ninf; 3]);
    assert!(worst(&dev, &cpu) <= 4);
    let mut lse = [0.0f32; 2];
    gpu.logsumexp(&x, 3, &mut lse, NonFinite::Error).unwrap();
    assert_eq!(lse[1], ninf);
}

/// NaN and `+inf` come back as `lse`'s error naming row, column and value; the output buffer is
/// not touched; under `Propagate` the row is NaN and the others are right.
#[test]
fn non_finite_policies() {
    let gpu = gpu();
    for bad in [f32::NAN, f32::INFINITY] {
        for op in 0..3 {
            let mut x = vec![0.5f32; 12];
            x[2 * 4 + 1] = bad;
            let sentinel = vec![7.0f32; 12];
            let mut out = sentinel.clone();
            let err = match op {
                0 => gpu.softmax(&x, 4, &mut out, NonFinite::Error),
                1 => gpu.log_softmax(&x, 4, &mut out, NonFinite::Error),
                _ => gpu.logsumexp(&x, 4, &mut out[..3], NonFinite::Error),
            }
            .unwrap_err();
            let Error::Input(LseError::NonFinite {
                row, column, value, ..
            }) = err
            else {
                panic!("{err:?}")
            };
            assert_eq!((row, column), (2, 1));
            assert!(value.is_nan() == bad.is_nan() && (value.is_nan() || value == f64::INFINITY));
            assert_eq!(out, sentinel, "output written on error");
        }
        // Same error as the CPU's, in f16 and bf16 too.
        let x16: Vec<f16> = [0.5, 0.5, 0.5, 0.5, bad, 0.5]
            .iter()
            .map(|&v| f16::from_f32(v))
            .collect();
        let mut o = vec![f16::ZERO; 6];
        let cpu = lse::softmax(&x16, 3, &mut o.clone()).unwrap_err();
        let Error::Input(dev) = gpu.softmax(&x16, 3, &mut o, NonFinite::Error).unwrap_err() else {
            panic!()
        };
        assert_eq!(format!("{dev}"), format!("{cpu}"));
        let xb: Vec<bf16> = [0.5, 0.5, 0.5, bad, 0.5, 0.5]
            .iter()
            .map(|&v| bf16::from_f32(v))
            .collect();
        let cpu = lse::log_softmax(&xb, 3, &mut [bf16::ZERO; 6]).unwrap_err();
        let Error::Input(dev) = gpu
            .log_softmax(&xb, 3, &mut [bf16::ZERO; 6], NonFinite::Error)
            .unwrap_err()
        else {
            panic!()
        };
        assert_eq!(format!("{dev}"), format!("{cpu}"));
    }
    // Propagate: the bad row is NaN, the others as the CPU's.
    let mut x = vec![0.25f32; 9];
    x[4] = f32::NAN;
    let (mut cpu, mut dev) = (vec![0.0f32; 9], vec![0.0f32; 9]);
    lse::softmax_with(&x, 3, &mut cpu, NonFinite::Propagate).unwrap();
    gpu.softmax(&x, 3, &mut dev, NonFinite::Propagate).unwrap();
    assert!(dev[3..6].iter().all(|v| v.is_nan()));
    assert!(worst(&dev, &cpu) <= 4, "{dev:?} vs {cpu:?}");
}

/// The cross-entropy's errors are `lse`'s: NaN logit, masked target, target out of range,
/// empty mean; and its propagate policies give the CPU's NaN / `+inf` rows.
/// What the kernels do not compute is refused, never returned empty.
#[test]
fn argmax_and_logit_scale_are_not_offered_on_the_gpu() {
    let gpu = gpu();
    let x = vec![0.5f32; 8];
    let options = CrossEntropyOptions {
        keep_row_argmax: true,
        ..Default::default()
    };
    let dev = gpu
        .cross_entropy(&x, 4, &[0, 1], &options, GradOutput::Scalar(1.0), None)
        .unwrap_err();
    assert!(
        matches!(dev, Error::Unsupported("keep_row_argmax")),
        "{dev:?}"
    );
    let options = CrossEntropyOptions {
        logit_scale: 0.5,
        ..Default::default()
    };
    let dev = gpu
        .cross_entropy(&x, 4, &[0, 1], &options, GradOutput::Scalar(1.0), None)
        .unwrap_err();
    assert!(matches!(dev, Error::Unsupported("logit_scale")), "{dev:?}");
}

#[test]
fn cross_entropy_errors_and_policies() {
    let gpu = gpu();
    let options = CrossEntropyOptions::default();
    let mut x = vec![0.5f32; 12];
    x[2 * 4 + 3] = f32::NAN;
    let targets = [0i64, 1, 2];
    let cpu = lse::cross_entropy(&x, 4, Targets::Classes(&targets), &options).unwrap_err();
    let sentinel = vec![3.0f32; 12];
    let mut grad = sentinel.clone();
    let dev = gpu
        .cross_entropy(
            &x,
            4,
            &targets,
            &options,
            GradOutput::Scalar(1.0),
            Some(&mut grad),
        )
        .unwrap_err();
    assert!(
        matches!(&dev, Error::Input(e) if e.to_string() == cpu.to_string()),
        "{dev:?}"
    );
    assert_eq!(grad, sentinel);

    // Target mass on a masked class.
    let mut x = vec![0.5f32; 12];
    x[4 + 1] = f32::NEG_INFINITY;
    let cpu = lse::cross_entropy(&x, 4, Targets::Classes(&targets), &options).unwrap_err();
    let dev = gpu
        .cross_entropy(&x, 4, &targets, &options, GradOutput::Scalar(1.0), None)
        .unwrap_err();
    assert!(
        matches!(
            &dev,
            Error::Input(LseError::MaskedTarget { row: 1, class: 1 })
        ),
        "{dev:?}"
    );
    assert_eq!(dev.to_string(), cpu.to_string());

    // Out of range, and an empty mean under the error policy.
    let dev = gpu
        .cross_entropy(&x, 4, &[0, 4, 1], &options, GradOutput::Scalar(1.0), None)
        .unwrap_err();
    assert!(
        matches!(
            dev,
            Error::Input(LseError::TargetOutOfRange {
                row: 1,
                value: 4,
                classes: 4
            })
        ),
        "{dev:?}"
    );
    let empty = CrossEntropyOptions {
        empty_mean: EmptyMean::Error,
        ..options
    };
    let dev = gpu
        .cross_entropy(&x, 4, &[-100; 3], &empty, GradOutput::Scalar(1.0), None)
        .unwrap_err();
    assert!(
        matches!(dev, Error::Input(LseError::EmptyMean { rows: 3 })),
        "{dev:?}"
    );

    // Propagate: the CPU's loss (NaN or +inf), rows and gradient.
    for (bad_at, bad) in [(2, f32::NAN), (4 + 1, f32::NEG_INFINITY)] {
        let mut x: Vec<f32> = (0..12).map(|i| (i as f32 * 0.37).sin()).collect();
        x[bad_at] = bad;
        let propagate = CrossEntropyOptions {
            non_finite: NonFinite::Propagate,
            reduction: Reduction::None,
            ..options
        };
        let (mut cg, mut dg) = (vec![0.0f32; 12], vec![0.0f32; 12]);
        let cpu = lse::cross_entropy_with_grad(
            &x,
            4,
            Targets::Classes(&targets),
            &propagate,
            GradOutput::Scalar(1.0),
            &mut cg,
        )
        .unwrap();
        let dev = gpu
            .cross_entropy(
                &x,
                4,
                &targets,
                &propagate,
                GradOutput::Scalar(1.0),
                Some(&mut dg),
            )
            .unwrap();
        let (dr, cr) = (dev.row_loss.unwrap(), cpu.row_loss.unwrap());
        for (d, c) in dr.iter().zip(&cr) {
            assert!(
                (d.is_nan() && c.is_nan()) || d == c || ((d - c) / c).abs() < 1e-6,
                "{dr:?} vs {cr:?}"
            );
        }
        assert!(worst(&dg, &cg) <= 16, "{dg:?} vs {cg:?}");
    }
}

/// Empty-mean policies: all rows ignored gives the CPU's loss (0 or NaN) and a zero gradient.
#[test]
fn empty_mean_policies() {
    let gpu = gpu();
    let x = vec![1.0f32; 8];
    for policy in [EmptyMean::Zero, EmptyMean::Nan] {
        let options = CrossEntropyOptions {
            empty_mean: policy,
            ..Default::default()
        };
        let mut grad = vec![5.0f32; 8];
        let dev = gpu
            .cross_entropy(
                &x,
                4,
                &[-100, -100],
                &options,
                GradOutput::Scalar(1.0),
                Some(&mut grad),
            )
            .unwrap();
        let cpu = lse::cross_entropy(&x, 4, Targets::Classes(&[-100, -100]), &options).unwrap();
        assert_eq!(dev.loss.to_bits(), cpu.loss.to_bits());
        assert!(grad.iter().all(|&g| g == 0.0));
    }
}

/// Bitwise the same run to run (a fixed merge tree, no atomics).
#[test]
fn bitwise_reproducible() {
    let gpu = gpu();
    let mut rng = Rng(3);
    let classes = 5000;
    let x: Vec<f32> = (0..4)
        .flat_map(|_| rng.logits::<f32>(classes, 20.0, true))
        .collect();
    let targets = [0i64, 1, 2, 4];
    let options = CrossEntropyOptions {
        label_smoothing: 0.1,
        ..Default::default()
    };
    let run = || {
        let mut grad = vec![0.0f32; x.len()];
        let out = gpu
            .cross_entropy(
                &x,
                classes,
                &targets,
                &options,
                GradOutput::Scalar(1.0),
                Some(&mut grad),
            )
            .unwrap();
        let mut soft = vec![0.0f32; x.len()];
        gpu.softmax(&x, classes, &mut soft, NonFinite::Error)
            .unwrap();
        (
            out.loss.to_bits(),
            grad.iter().map(|g| g.to_bits()).collect::<Vec<_>>(),
            soft.iter().map(|g| g.to_bits()).collect::<Vec<_>>(),
        )
    };
    assert_eq!(run(), run());
}

/// The kernels' own `exp` and `ln` are within 2 ulps of the correctly rounded value over the
/// range the kernels use, on any device; the device's own are measured and reported (on
/// llvmpipe they are what made the kernels carry their own, see docs/gpu.md).
#[test]
fn own_transcendentals_are_accurate() {
    let gpu = gpu();
    let xs: Vec<f32> = (0..20_000)
        .map(|i| -103.0 + 103.0 * 1.0001 * (i as f32) / 20_000.0)
        .chain((0..2_000).map(|i| (i as f32) * 0.04))
        .collect();
    let got = gpu.transcendentals(&xs).unwrap();
    let (mut device_exp, mut own_exp, mut device_ln, mut own_ln) = (0, 0, 0, 0);
    for (&x, [dexp, oexp, dln, oln]) in xs.iter().zip(got) {
        let want_exp = (f64::from(x)).exp() as f32;
        let want_ln = (f64::from(x.abs() + 1.0)).ln() as f32;
        // Below f32's normal range an ulp is absolute: count from the smallest normal.
        let floor = f32::MIN_POSITIVE;
        let exp_ulps = |v: f32| {
            if want_exp < floor && v < floor {
                ((v - want_exp).abs() / f32::from_bits(1)) as u64
            } else {
                ulps(v, want_exp)
            }
        };
        if exp_ulps(oexp) > 2 && std::env::var_os("LSE_GPU_REPORT").is_some() {
            eprintln!(
                "own exp({x}) = {oexp:e} vs {want_exp:e}: {}",
                exp_ulps(oexp)
            );
        }
        device_exp = device_exp.max(exp_ulps(dexp));
        own_exp = own_exp.max(exp_ulps(oexp));
        device_ln = device_ln.max(ulps(dln, want_ln));
        own_ln = own_ln.max(ulps(oln, want_ln));
    }
    eprintln!(
        "{}: exp device {device_exp} ulps, own {own_exp}; ln device {device_ln} ulps, own {own_ln}",
        gpu.describe()
    );
    assert!(own_exp <= 2, "own exp: {own_exp} ulps");
    assert!(own_ln <= 2, "own ln: {own_ln} ulps");
}

// ---------------------------------------------------------------------------------------------
// Probability targets.

/// Rows of probability targets for `x`: a soft distribution, a one-hot row, a row with nearly
/// all mass on one class, a row of uneven values that do not sum to 1; 0 on masked classes.
fn probability_rows<E: GpuElement>(rng: &mut Rng, x: &[E], classes: usize) -> Vec<E> {
    x.chunks_exact(classes)
        .enumerate()
        .flat_map(|(r, row)| {
            let live: Vec<bool> = row.iter().map(|v| v.to_f64() > f64::NEG_INFINITY).collect();
            let first_live = live.iter().position(|&l| l).unwrap_or(0);
            let raw: Vec<f64> = (0..classes)
                .map(|c| match r % 4 {
                    0 => rng.next(),
                    1 => f64::from(u8::from(c == (r * 37 + first_live) % classes && live[c])),
                    2 if c == first_live => 1.0,
                    2 => 1e-4 * rng.next(),
                    _ => rng.next() * rng.next() * 3.0,
                })
                .zip(&live)
                .map(|(v, &l)| if l { v } else { 0.0 })
                .collect();
            let total: f64 = raw.iter().sum::<f64>().max(1e-300);
            let scale = if r % 4 == 3 { 1.0 } else { 1.0 / total };
            raw.into_iter()
                .map(|v| E::from_f64(v * scale))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every combination of the options that apply to probability targets against the CPU, on
/// rows of ordinary, large (±1e3) and extreme (±1e4) logits with masks: loss, row losses, row
/// logsumexp and gradient.
fn cross_entropy_probability_options<E: GpuElement>(loss_bound: f64, grad_bound: u64) {
    let gpu = gpu();
    let mut rng = Rng(7);
    let classes = 333;
    let rows = 12;
    let x: Vec<E> = (0..rows)
        .flat_map(|r| {
            let scale = [8.0, 1e3, 1e4][r % 3];
            rng.logits::<E>(classes, scale, r % 2 == 0)
        })
        .collect();
    let q = probability_rows(&mut rng, &x, classes);
    let weights: Vec<f64> = (0..classes).map(|c| 0.25 + (c % 5) as f64 * 0.5).collect();
    let (mut worst_loss, mut worst_grad, mut worst_lse) = (0.0f64, 0, 0);
    for weighted in [false, true] {
        for smoothing in [0.0, 0.1] {
            for z_loss in [0.0, 1e-4] {
                for softcap in [None, Some(30.0)] {
                    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                        let options = CrossEntropyOptions {
                            weights: weighted.then_some(weights.as_slice()),
                            label_smoothing: smoothing,
                            z_loss,
                            softcap,
                            reduction,
                            keep_row_loss: true,
                            keep_row_lse: true,
                            ..Default::default()
                        };
                        let what = format!("{:?} {options:?}", E::DTYPE);
                        let mut cpu_grad = vec![E::zero(); x.len()];
                        let cpu = lse::cross_entropy_with_grad(
                            &x,
                            classes,
                            Targets::Probabilities(&q),
                            &options,
                            GradOutput::Scalar(1.0),
                            &mut cpu_grad,
                        )
                        .unwrap();
                        let mut dev_grad = vec![E::zero(); x.len()];
                        let dev = gpu
                            .cross_entropy_probabilities(
                                &x,
                                classes,
                                &q,
                                &options,
                                GradOutput::Scalar(1.0),
                                Some(&mut dev_grad),
                            )
                            .unwrap();
                        assert_eq!(dev.denominator, cpu.denominator);
                        assert_eq!(dev.counted_rows, cpu.counted_rows);
                        let rel = |a: f32, b: f32| {
                            ((f64::from(a) - f64::from(b)) / f64::from(b).abs().max(1e-30)).abs()
                        };
                        let r = rel(dev.loss, cpu.loss);
                        worst_loss = worst_loss.max(r);
                        assert!(r < loss_bound, "{what}: loss {} vs {}", dev.loss, cpu.loss);
                        assert_z_term(&what, dev.z_loss, cpu.z_loss);
                        for (row, (d, c)) in dev
                            .row_loss
                            .as_ref()
                            .unwrap()
                            .iter()
                            .zip(cpu.row_loss.as_ref().unwrap())
                            .enumerate()
                        {
                            let r = rel(*d, *c);
                            worst_loss = worst_loss.max(r);
                            assert!(r < loss_bound, "{what}: row {row} loss {d} vs {c}");
                        }
                        let (dl, cl) = (dev.row_lse.unwrap(), cpu.row_lse.unwrap());
                        worst_lse = worst_lse.max(worst(&dl, &cl));
                        assert!(
                            worst(&dl, &cl) <= LSE_BOUND,
                            "{what}: row lse {dl:?} vs {cl:?}"
                        );
                        let w = worst_relative(&dev_grad, &cpu_grad);
                        worst_grad = worst_grad.max(w);
                        assert!(w <= grad_bound, "{what}: gradient {w} ulps");
                    }
                }
            }
        }
    }
    report(
        &format!("{:?} probability CE loss (relative, 1e-9)", E::DTYPE),
        (worst_loss * 1e9) as u64,
    );
    report(&format!("{:?} probability CE row lse", E::DTYPE), worst_lse);
    report(
        &format!("{:?} probability CE gradient", E::DTYPE),
        worst_grad,
    );
}

#[test]
fn cross_entropy_probabilities_f32() {
    cross_entropy_probability_options::<f32>(4e-7, 24);
}

#[test]
fn cross_entropy_probabilities_f16() {
    cross_entropy_probability_options::<f16>(4e-7, 1);
}

#[test]
fn cross_entropy_probabilities_bf16() {
    cross_entropy_probability_options::<bf16>(4e-7, 1);
}

/// A confident row keeps its digits with probability targets too (the log1p form): the loss
/// of `[30, 0, −1e4, −1e4]` against `[1, 0, 0, 0]` is `log1p(e⁻³⁰) = 9.3576e-14`, and a soft
/// target's loss matches an `f64` oracle. The naive `f32` form `Σ q_c (lse − x_c)` gives 0 for
/// the first and fails the same check.
#[test]
fn confident_probability_row_keeps_digits() {
    let gpu = gpu();
    let x = [
        30.0f32, 0.0, -1e4, -1e4, /* row 1 */ 30.0, 0.0, -1e4, -1e4,
    ];
    let q = [1.0f32, 0.0, 0.0, 0.0, /* row 1 */ 0.75, 0.25, 0.0, 0.0];
    let options = CrossEntropyOptions {
        reduction: Reduction::None,
        ..Default::default()
    };
    let dev = gpu
        .cross_entropy_probabilities(&x, 4, &q, &options, GradOutput::Scalar(1.0), None)
        .unwrap();
    // f64, in the log1p form (`lse − x_c` in f64 would itself lose the digits of row 0).
    let oracle = |row: usize| {
        let xs = &x[row * 4..row * 4 + 4];
        let m = 30.0f64;
        let log1p_rest = xs
            .iter()
            .map(|&v| (f64::from(v) - m).exp())
            .filter(|&e| e < 1.0)
            .sum::<f64>()
            .ln_1p();
        xs.iter()
            .zip(&q[row * 4..row * 4 + 4])
            .map(|(&v, &p)| f64::from(p) * ((m - f64::from(v)) + log1p_rest))
            .sum::<f64>()
    };
    let rows = dev.row_loss.unwrap();
    let close = |got: f64, want: f64| ((got - want) / want).abs() < 1e-6;
    for (row, &got) in rows.iter().enumerate() {
        assert!(
            close(f64::from(got), oracle(row)),
            "row {row}: {got} vs {}",
            oracle(row)
        );
    }
    // The control: the naive f32 `lse − x_y` of row 0.
    let naive_lse = x[..4].iter().map(|v| v.exp()).sum::<f32>().ln();
    let naive = naive_lse - x[0];
    assert!(
        !close(f64::from(naive), oracle(0)),
        "the naive control must fail: {naive}"
    );
}

/// Bad probability targets and the logits' faults come back as `lse`'s errors, from the same
/// row the CPU names (targets before logits within a row); nothing is written to the gradient;
/// under `Propagate` a bad target is still an error, NaN logits give NaN rows and mass on a
/// masked class a `+inf` row, as on the CPU.
#[test]
fn cross_entropy_probability_errors_and_policies() {
    let gpu = gpu();
    let x: Vec<f32> = (0..12).map(|i| (i as f32 * 0.37).sin()).collect();
    let q = vec![0.25f32; 12];
    let sentinel = vec![3.0f32; 12];
    let both = |x: &[f32], q: &[f32], options: &CrossEntropyOptions| {
        let mut cg = vec![0.0f32; 12];
        let cpu = lse::cross_entropy_with_grad(
            x,
            4,
            Targets::Probabilities(q),
            options,
            GradOutput::Scalar(1.0),
            &mut cg,
        );
        let mut dg = sentinel.clone();
        let dev = gpu.cross_entropy_probabilities(
            x,
            4,
            q,
            options,
            GradOutput::Scalar(1.0),
            Some(&mut dg),
        );
        (cpu, cg, dev, dg)
    };
    let error = CrossEntropyOptions::default();
    let propagate = CrossEntropyOptions {
        non_finite: NonFinite::Propagate,
        reduction: Reduction::None,
        ..Default::default()
    };
    // A NaN or infinite target: BadProbability naming row, column and value, either policy.
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut q = q.clone();
        q[4 + 2] = bad;
        for options in [&error, &propagate] {
            let (cpu, _, dev, dg) = both(&x, &q, options);
            let cpu = cpu.unwrap_err();
            let dev = dev.unwrap_err();
            assert!(
                matches!(
                    dev,
                    Error::Input(LseError::BadProbability {
                        row: 1,
                        column: 2,
                        ..
                    })
                ),
                "{dev:?}"
            );
            assert_eq!(dev.to_string(), cpu.to_string());
            assert_eq!(dg, sentinel, "gradient written on error");
        }
    }
    // The first faulty row wins; within a row the targets come first.
    let mut xq = x.clone();
    xq[1] = f32::NAN; // row 0
    let mut qq = q.clone();
    qq[4 + 3] = f32::NAN; // row 1
    let (cpu, _, dev, _) = both(&xq, &qq, &error);
    let dev = dev.unwrap_err();
    assert!(
        matches!(
            dev,
            Error::Input(LseError::NonFinite {
                row: 0,
                column: 1,
                ..
            })
        ),
        "{dev:?}"
    );
    assert_eq!(dev.to_string(), cpu.unwrap_err().to_string());
    let mut qq = q.clone();
    qq[3] = f32::NAN; // row 0, with the NaN logit
    let (cpu, _, dev, _) = both(&xq, &qq, &error);
    let dev = dev.unwrap_err();
    assert!(
        matches!(
            dev,
            Error::Input(LseError::BadProbability {
                row: 0,
                column: 3,
                ..
            })
        ),
        "{dev:?}"
    );
    assert_eq!(dev.to_string(), cpu.unwrap_err().to_string());
    // Mass on a masked class; none there is fine (and under smoothing ε = 1 none is kept).
    let mut xm = x.clone();
    xm[8 + 1] = f32::NEG_INFINITY;
    let (cpu, _, dev, dg) = both(&xm, &q, &error);
    let dev = dev.unwrap_err();
    assert!(
        matches!(
            dev,
            Error::Input(LseError::MaskedTarget { row: 2, class: 1 })
        ),
        "{dev:?}"
    );
    assert_eq!(dev.to_string(), cpu.unwrap_err().to_string());
    assert_eq!(dg, sentinel);
    let mut qm = q.clone();
    qm[8 + 1] = 0.0;
    let (cpu, cg, dev, dg) = both(&xm, &qm, &error);
    let (cpu, dev) = (cpu.unwrap(), dev.unwrap());
    assert!(
        ((dev.loss - cpu.loss) / cpu.loss).abs() < 4e-7,
        "{} vs {}",
        dev.loss,
        cpu.loss
    );
    assert!(worst_relative(&dg, &cg) <= 24, "{dg:?} vs {cg:?}");
    assert_eq!(dg[8 + 1], 0.0);
    // Propagate: NaN rows and +inf rows as the CPU's; the gradient as the CPU's.
    for (xp, what) in [(&xq, "NaN logit"), (&xm, "masked class with mass")] {
        let (cpu, cg, dev, dg) = both(xp, &q, &propagate);
        let (cpu, dev) = (cpu.unwrap(), dev.unwrap());
        let (dr, cr) = (dev.row_loss.unwrap(), cpu.row_loss.unwrap());
        for (d, c) in dr.iter().zip(&cr) {
            assert!(
                (d.is_nan() && c.is_nan()) || d == c || ((d - c) / c).abs() < 4e-7,
                "{what}: {dr:?} vs {cr:?}"
            );
        }
        assert!(worst(&dg, &cg) <= 24, "{what}: {dg:?} vs {cg:?}");
    }
    // Shapes: probability targets of another length, as the CPU says it.
    let dev = gpu
        .cross_entropy_probabilities(&x, 4, &q[..8], &error, GradOutput::Scalar(1.0), None)
        .unwrap_err();
    let cpu = lse::cross_entropy(&x, 4, Targets::Probabilities(&q[..8]), &error).unwrap_err();
    assert_eq!(dev.to_string(), cpu.to_string());
}
