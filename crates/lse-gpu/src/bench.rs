//! Kernel-only timing: the fused cross-entropy forward + gradient against a device copy of the
//! same buffer (`lse-gpu bench`). Inputs stay on the device; only the kernels are timed.

use std::time::Instant;

use crate::element::GpuElement;
use crate::kernels::{self, CeParamsLaunch, CUBE_UNITS, STAT_WORDS};
use crate::ops::{arg, cube_count, element_cubes, units};
use crate::{Error, Gpu};

/// One bench result.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchReport {
    /// Logits per second through the fused cross-entropy forward + gradient, in billions.
    pub giga_elements_per_second: f64,
    /// The bytes the kernels move per second (two reads and one write of the logits) over the
    /// bytes per second of a device copy (one read, one write) of the same buffer.
    pub fraction_of_copy_bandwidth: f64,
    /// The copy's bandwidth, GB/s.
    pub copy_gigabytes_per_second: f64,
}

impl Gpu {
    fn sync(&self) -> Result<(), Error> {
        cubecl::future::block_on(self.client.sync()).map_err(|e| Error::Device(format!("{e:?}")))
    }

    /// Times `repeats` runs of the cross-entropy forward + gradient over `rows × classes`
    /// logits of `E` (class targets, no options), and as many copies of the logits.
    ///
    /// # Errors
    /// [`Error::Device`].
    ///
    /// # Panics
    /// When the CubeCL runtime does.
    pub fn bench_cross_entropy<E: GpuElement>(
        &self,
        rows: usize,
        classes: usize,
        repeats: usize,
    ) -> Result<BenchReport, Error> {
        let elements = rows * classes;
        let logits: Vec<E> = (0..elements)
            .map(|i| E::from_f64(((i * 7919) % 1000) as f64 / 100.0 - 5.0))
            .collect();
        let words = E::pack(&logits);
        let n = words.len();
        let x = self.upload(&words);
        let targets: Vec<u32> = (0..rows).map(|r| (r % classes) as u32).collect();
        let t = self.upload(&targets);
        let w = self.upload_f32(&[1.0]);
        let caller = self.upload_f32(&vec![1.0; rows]);
        let stats = self.words(rows * STAT_WORDS);
        let (loss, lse) = (self.words(rows), self.words(rows));
        let grad = self.words(n);
        let copy = self.words(n);
        // The probability-target buffers of `ce_grad`, never read for class targets.
        let unused = self.words(1);
        let params = || CeParamsLaunch::new(0.0, 0.0, 0.0, 0);
        let fused = || {
            kernels::ce_stats::launch(
                &self.client,
                cube_count(rows),
                units(),
                arg(&x, n),
                arg(&t, rows),
                arg(&w, 1),
                arg(&stats, rows * STAT_WORDS),
                arg(&loss, rows),
                arg(&lse, rows),
                rows,
                classes,
                params(),
                E::CODE,
                CUBE_UNITS,
            );
            kernels::ce_grad::launch(
                &self.client,
                element_cubes(n),
                units(),
                arg(&x, n),
                arg(&stats, rows * STAT_WORDS),
                arg(&t, rows),
                arg(&unused, 1),
                arg(&unused, 1),
                arg(&w, 1),
                arg(&caller, rows),
                arg(&grad, n),
                elements,
                classes,
                1.0 / rows as f32,
                params(),
                E::CODE,
                false,
            );
        };
        let copied = || {
            kernels::copy::launch(
                &self.client,
                element_cubes(n),
                units(),
                arg(&x, n),
                arg(&copy, n),
            );
        };
        let time = |f: &dyn Fn()| -> Result<f64, Error> {
            f(); // compile and warm up
            self.sync()?;
            let start = Instant::now();
            for _ in 0..repeats {
                f();
            }
            self.sync()?;
            Ok(start.elapsed().as_secs_f64() / repeats as f64)
        };
        let t_fused = time(&fused)?;
        let t_copy = time(&copied)?;
        let bytes = (n * 4) as f64;
        let copy_rate = 2.0 * bytes / t_copy;
        Ok(BenchReport {
            giga_elements_per_second: elements as f64 / t_fused / 1e9,
            fraction_of_copy_bandwidth: (3.0 * bytes / t_fused) / copy_rate,
            copy_gigabytes_per_second: copy_rate / 1e9,
        })
    }
}
