//! Timing: one call, best and median of repeats, and the copy bandwidth the rates are
//! compared with.

use std::hint::black_box;
use std::time::Instant;

use rayon::prelude::*;

use crate::error::Result;
/// Timed copies of the copy-bandwidth measurement (the best counts).
pub(super) const COPY_PASSES: usize = 5;
/// Bytes per chunk of the parallel copies.
const COPY_CHUNK: usize = 1 << 20;
/// The shortest time a call is taken to last, so that rates stay finite.
const MIN_SECONDS: f64 = 1e-9;

/// `dst.copy_from_slice(src)` by the threads of the current rayon pool, in chunks of about
/// [`COPY_CHUNK`] bytes.
pub(super) fn par_copy<T: Copy + Send + Sync>(dst: &mut [T], src: &[T]) {
    let chunk = (COPY_CHUNK / std::mem::size_of::<T>().max(1)).max(1);
    dst.par_chunks_mut(chunk)
        .zip(src.par_chunks(chunk))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

/// The copy bandwidth of the current rayon pool in 10⁹ bytes per second: a buffer of `bytes`
/// bytes copied into another, best of [`COPY_PASSES`] after a warm-up, counting bytes read plus
/// bytes written.
pub(super) fn copy_bandwidth(bytes: usize) -> f64 {
    let mut src = vec![0u8; bytes];
    // Non-zero data, written so that every page is really mapped.
    src.par_chunks_mut(COPY_CHUNK)
        .enumerate()
        .for_each(|(i, c)| c.fill((i as u8) | 1));
    let mut dst = vec![0u8; bytes];
    par_copy(&mut dst, &src); // warm-up: maps the destination's pages
    let best = (0..COPY_PASSES)
        .map(|_| {
            let start = Instant::now();
            par_copy(&mut dst, &src);
            black_box(&mut dst);
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    2.0 * bytes as f64 / best.max(MIN_SECONDS) / 1e9
}

/// Seconds taken by `call` (its result kept from the optimiser).
pub(super) fn timed<T>(call: impl FnOnce() -> lse::Result<T>) -> Result<f64> {
    let start = Instant::now();
    let out = call()?;
    let seconds = start.elapsed().as_secs_f64();
    black_box(out);
    Ok(seconds.max(MIN_SECONDS))
}

/// The best and the median of `times` (not empty).
pub(super) fn best_and_median(mut times: Vec<f64>) -> (f64, f64) {
    times.sort_by(f64::total_cmp);
    let n = times.len();
    let median = if n % 2 == 1 {
        times[n / 2]
    } else {
        (times[n / 2 - 1] + times[n / 2]) / 2.0
    };
    (times[0], median)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(best_and_median(vec![3.0, 1.0, 2.0]), (1.0, 2.0));
        assert_eq!(best_and_median(vec![4.0, 1.0, 2.0, 3.0]), (1.0, 2.5));
        assert_eq!(best_and_median(vec![5.0]), (5.0, 5.0));
    }
}
