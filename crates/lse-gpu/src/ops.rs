//! The operations: `lse`'s checks and policies on the host, the kernels on the device.
//!
//! Each call uploads its inputs, runs a read pass (one cube per row: row stats, faults) and reads
//! back the few stat words per row; a row fault under the error policy becomes `lse`'s typed
//! error naming row, column and value, and nothing is written to the caller's buffers. Otherwise
//! a write pass (one unit per output word) fills the output, which is read back.

use cubecl::prelude::*;
use cubecl::server::Handle;
use lse::{
    ChunkedCrossEntropy, CompensatedSum, CrossEntropyOptions, CrossEntropyOutput, Element,
    EmptyMean, GradOutput, LseError, NonFinite, Reduction,
};

use crate::element::{GpuElement, StorageDType};
use crate::kernels::{self, CeParamsLaunch, CUBE_UNITS, STAT_WORDS};
use crate::{Error, Gpu};

/// Rows of a row-major buffer, with `lse`'s errors.
fn row_count(what: &'static str, len: usize, classes: usize) -> Result<usize, LseError> {
    if classes == 0 {
        return Err(LseError::EmptyClasses);
    }
    if !len.is_multiple_of(classes) {
        return Err(LseError::RaggedRows { what, len, classes });
    }
    Ok(len / classes)
}

fn expect_len(what: &'static str, expected: usize, actual: usize) -> Result<(), LseError> {
    if expected == actual {
        Ok(())
    } else {
        Err(LseError::LengthMismatch {
            what,
            expected,
            actual,
        })
    }
}

/// Cubes for `n` pieces of work, in x then y (x is at most 65535 on some APIs).
pub(crate) fn cube_count(n: usize) -> CubeCount {
    let x = n.clamp(1, 65_535);
    CubeCount::Static(x as u32, n.div_ceil(x).max(1) as u32, 1)
}

/// Cubes of [`CUBE_UNITS`] units for `n` units of elementwise work.
pub(crate) fn element_cubes(n: usize) -> CubeCount {
    cube_count(n.div_ceil(CUBE_UNITS as usize))
}

pub(crate) fn units() -> CubeDim {
    CubeDim::new_1d(CUBE_UNITS)
}

/// A kernel argument over the `len` words of `handle`.
pub(crate) fn arg(handle: &Handle, len: usize) -> BufferArg {
    // SAFETY: every handle here was created with at least `len` words (`upload`/`words`).
    unsafe { BufferArg::from_raw_parts(handle.clone(), len) }
}

/// What the read pass of logsumexp / softmax / log_softmax leaves.
struct RowStats {
    /// The per-row stats on the device, for the write pass.
    stats: Handle,
    /// The per-row logsumexp (`f32` bits) on the device.
    lse: Handle,
    /// The first row holding NaN or `+inf`: (row, column).
    bad: Option<(usize, usize)>,
}

impl Gpu {
    pub(crate) fn upload(&self, words: &[u32]) -> Handle {
        self.client.create_from_slice(u32::as_bytes(words))
    }

    pub(crate) fn upload_f32(&self, values: &[f32]) -> Handle {
        self.client.create_from_slice(f32::as_bytes(values))
    }

    pub(crate) fn words(&self, len: usize) -> Handle {
        self.client.empty(len.max(1) * 4)
    }

    fn read(&self, handle: Handle) -> Result<Vec<u32>, Error> {
        let bytes = self
            .client
            .read_one(handle)
            .map_err(|e| Error::Device(format!("{e:?}")))?;
        Ok(u32::from_bytes(&bytes).to_vec())
    }

    /// The read pass of logsumexp / softmax / log_softmax over `words` words of logits of
    /// dtype `code`.
    fn row_stats(
        &self,
        x: &Handle,
        words: usize,
        rows: usize,
        classes: usize,
        code: u32,
    ) -> Result<RowStats, Error> {
        let stats = self.words(rows * STAT_WORDS);
        let lse = self.words(rows);
        kernels::row_stats::launch(
            &self.client,
            cube_count(rows),
            units(),
            arg(x, words),
            arg(&stats, rows * STAT_WORDS),
            arg(&lse, rows),
            rows,
            classes,
            code,
            CUBE_UNITS,
        );
        let stat_words = self.read(stats.clone())?;
        let bad = stat_words
            .chunks_exact(STAT_WORDS)
            .position(|s| s[3] == kernels::FAULT_NON_FINITE)
            .map(|r| (r, stat_words[r * STAT_WORDS + 4] as usize));
        Ok(RowStats { stats, lse, bad })
    }

    /// The write pass of softmax (`op`) or log_softmax over logits `x` on the device; returns
    /// the output's words and the first row holding NaN or `+inf` (its values are NaN).
    #[allow(clippy::too_many_arguments)]
    fn normalize_words(
        &self,
        x: &Handle,
        words: usize,
        len: usize,
        classes: usize,
        code: u32,
        op: u32,
    ) -> Result<(Handle, Option<(usize, usize)>), Error> {
        let rows = len / classes;
        let RowStats { stats, bad, .. } = self.row_stats(x, words, rows, classes, code)?;
        let y = self.words(words);
        kernels::normalize::launch(
            &self.client,
            element_cubes(words),
            units(),
            arg(x, words),
            arg(&stats, rows * STAT_WORDS),
            arg(&y, words),
            len,
            classes,
            code,
            op,
        );
        Ok((y, bad))
    }

    /// The backward pass of softmax (`op`) or log_softmax from `y` and `dy` on the device.
    #[allow(clippy::too_many_arguments)]
    fn backward_words(
        &self,
        yh: &Handle,
        dyh: &Handle,
        words: usize,
        len: usize,
        classes: usize,
        code: u32,
        op: u32,
    ) -> Handle {
        let rows = len / classes;
        let dots = self.words(rows);
        kernels::backward_dot::launch(
            &self.client,
            cube_count(rows),
            units(),
            arg(yh, words),
            arg(dyh, words),
            arg(&dots, rows),
            rows,
            classes,
            code,
            op,
            CUBE_UNITS,
        );
        let out = self.words(words);
        kernels::backward::launch(
            &self.client,
            element_cubes(words),
            units(),
            arg(yh, words),
            arg(dyh, words),
            arg(&dots, rows),
            arg(&out, words),
            len,
            classes,
            code,
            op,
        );
        out
    }

    /// `logsumexp` of each row of logits already on the device (`len` elements of `dtype`,
    /// row-major `rows × classes`, packed as [`GpuElement`] packs them): the `rows` values as
    /// a new `f32` buffer, and the first row holding NaN or `+inf` as (row, column) (its value
    /// is NaN or `+inf`).
    ///
    /// # Errors
    /// [`Error::Input`] for shapes, [`Error::Device`].
    ///
    /// # Panics
    /// When the CubeCL runtime does, or when `logits` holds fewer than `len` elements.
    pub fn logsumexp_resident(
        &self,
        logits: &Handle,
        dtype: StorageDType,
        len: usize,
        classes: usize,
    ) -> Result<(Handle, Option<(usize, usize)>), Error> {
        let rows = row_count("logits", len, classes)?;
        let stats = self.row_stats(logits, dtype.words(len), rows, classes, dtype.code())?;
        Ok((stats.lse, stats.bad))
    }

    /// `softmax` (`log_softmax` when `log`) of each row of logits already on the device (as
    /// [`Self::logsumexp_resident`]): a new buffer of the logits' dtype and layout, and the
    /// first row holding NaN or `+inf` (that row's values are NaN).
    ///
    /// # Errors
    /// [`Error::Input`] for shapes, [`Error::Device`].
    ///
    /// # Panics
    /// As [`Self::logsumexp_resident`].
    pub fn softmax_resident(
        &self,
        logits: &Handle,
        dtype: StorageDType,
        len: usize,
        classes: usize,
        log: bool,
    ) -> Result<(Handle, Option<(usize, usize)>), Error> {
        row_count("logits", len, classes)?;
        let op = if log {
            kernels::LOG_SOFTMAX
        } else {
            kernels::SOFTMAX
        };
        self.normalize_words(logits, dtype.words(len), len, classes, dtype.code(), op)
    }

    /// The gradient of `softmax` (`log_softmax` when `log`) from its output `y` and the
    /// incoming gradient `dy`, both on the device (as [`Self::logsumexp_resident`]): a new
    /// buffer of their dtype and layout.
    ///
    /// # Errors
    /// [`Error::Input`] for shapes.
    ///
    /// # Panics
    /// As [`Self::logsumexp_resident`].
    pub fn softmax_backward_resident(
        &self,
        y: &Handle,
        dy: &Handle,
        dtype: StorageDType,
        len: usize,
        classes: usize,
        log: bool,
    ) -> Result<Handle, Error> {
        row_count("forward output", len, classes)?;
        let op = if log {
            kernels::LOG_SOFTMAX
        } else {
            kernels::SOFTMAX
        };
        Ok(self.backward_words(y, dy, dtype.words(len), len, classes, dtype.code(), op))
    }

    /// `logsumexp` of every row of `logits` (`rows × classes`) into `out` (`rows` values), as
    /// [`lse::logsumexp_with`].
    ///
    /// # Errors
    /// As [`lse::logsumexp_with`] ([`Error::Input`]), and [`Error::Device`] when the device
    /// fails. `out` is written only on success.
    ///
    /// # Panics
    /// When the CubeCL runtime does (a kernel it cannot compile for this device).
    pub fn logsumexp<E: GpuElement>(
        &self,
        logits: &[E],
        classes: usize,
        out: &mut [f32],
        policy: NonFinite,
    ) -> Result<(), Error> {
        let rows = row_count("logits", logits.len(), classes)?;
        expect_len("logsumexp output", rows, out.len())?;
        if rows == 0 {
            return Ok(());
        }
        let words = E::pack(logits);
        let x = self.upload(&words);
        let RowStats { lse, bad, .. } = self.row_stats(&x, words.len(), rows, classes, E::CODE)?;
        if let (Some((row, column)), NonFinite::Error) = (bad, policy) {
            return Err(non_finite_logit(logits, classes, row, column).into());
        }
        for (o, bits) in out.iter_mut().zip(self.read(lse)?) {
            *o = f32::from_bits(bits);
        }
        Ok(())
    }

    /// `softmax` of every row, as [`lse::softmax_with`].
    ///
    /// # Errors
    /// As [`lse::softmax_with`] ([`Error::Input`]), and [`Error::Device`]. `out` is written
    /// only on success.
    ///
    /// # Panics
    /// When the CubeCL runtime does.
    pub fn softmax<E: GpuElement>(
        &self,
        logits: &[E],
        classes: usize,
        out: &mut [E],
        policy: NonFinite,
    ) -> Result<(), Error> {
        self.normalize(logits, classes, out, policy, kernels::SOFTMAX)
    }

    /// `log_softmax` of every row, as [`lse::log_softmax_with`].
    ///
    /// # Errors
    /// As [`lse::log_softmax_with`] ([`Error::Input`]), and [`Error::Device`]. `out` is
    /// written only on success.
    ///
    /// # Panics
    /// When the CubeCL runtime does.
    pub fn log_softmax<E: GpuElement>(
        &self,
        logits: &[E],
        classes: usize,
        out: &mut [E],
        policy: NonFinite,
    ) -> Result<(), Error> {
        self.normalize(logits, classes, out, policy, kernels::LOG_SOFTMAX)
    }

    fn normalize<E: GpuElement>(
        &self,
        logits: &[E],
        classes: usize,
        out: &mut [E],
        policy: NonFinite,
        op: u32,
    ) -> Result<(), Error> {
        let rows = row_count("logits", logits.len(), classes)?;
        expect_len("output", logits.len(), out.len())?;
        if rows == 0 {
            return Ok(());
        }
        let words = E::pack(logits);
        let x = self.upload(&words);
        let (y, bad) = self.normalize_words(&x, words.len(), logits.len(), classes, E::CODE, op)?;
        if let (Some((row, column)), NonFinite::Error) = (bad, policy) {
            return Err(non_finite_logit(logits, classes, row, column).into());
        }
        out.copy_from_slice(&E::unpack(&self.read(y)?, logits.len()));
        Ok(())
    }

    /// The gradient of `softmax`: `dx = y (dy − Σ y dy)` from its output `y`, as
    /// [`lse::softmax_backward`].
    ///
    /// # Errors
    /// As [`lse::softmax_backward`] ([`Error::Input`]), and [`Error::Device`].
    ///
    /// # Panics
    /// When the CubeCL runtime does.
    pub fn softmax_backward<E: GpuElement>(
        &self,
        y: &[E],
        dy: &[E],
        classes: usize,
        dx: &mut [E],
    ) -> Result<(), Error> {
        self.backward(y, dy, classes, dx, kernels::SOFTMAX)
    }

    /// The gradient of `log_softmax`: `dx = dy − exp(y) Σ dy` from its output `y`, as
    /// [`lse::log_softmax_backward`].
    ///
    /// # Errors
    /// As [`lse::log_softmax_backward`] ([`Error::Input`]), and [`Error::Device`].
    ///
    /// # Panics
    /// When the CubeCL runtime does.
    pub fn log_softmax_backward<E: GpuElement>(
        &self,
        y: &[E],
        dy: &[E],
        classes: usize,
        dx: &mut [E],
    ) -> Result<(), Error> {
        self.backward(y, dy, classes, dx, kernels::LOG_SOFTMAX)
    }

    fn backward<E: GpuElement>(
        &self,
        y: &[E],
        dy: &[E],
        classes: usize,
        dx: &mut [E],
        op: u32,
    ) -> Result<(), Error> {
        let rows = row_count("forward output", y.len(), classes)?;
        expect_len("output gradient", y.len(), dy.len())?;
        expect_len("input gradient", y.len(), dx.len())?;
        if rows == 0 {
            return Ok(());
        }
        let (y_words, dy_words) = (E::pack(y), E::pack(dy));
        let (yh, dyh) = (self.upload(&y_words), self.upload(&dy_words));
        let out = self.backward_words(&yh, &dyh, y_words.len(), y.len(), classes, E::CODE, op);
        dx.copy_from_slice(&E::unpack(&self.read(out)?, y.len()));
        Ok(())
    }

    /// The cross-entropy of `logits` (`rows × classes`) against class `targets`, fused with its
    /// gradient when `grad` is given: [`lse::cross_entropy_with_grad`]'s semantics (every option
    /// of [`CrossEntropyOptions`] but `keep_logit_stats`, `keep_row_argmax` and `logit_scale`),
    /// computed in `f32` on the device. Row losses are reduced on the host in row order, in
    /// `f64`.
    ///
    /// # Errors
    /// As [`lse::cross_entropy_with_grad`] ([`Error::Input`]: shapes, options, weights, targets,
    /// the incoming gradient, NaN/`+inf` logits and masked targets under
    /// [`NonFinite::Error`], the empty mean under [`EmptyMean::Error`]);
    /// [`Error::Unsupported`] for `keep_logit_stats`, `keep_row_argmax` and `logit_scale`;
    /// [`Error::Device`]. `grad` is written only on success; no input is modified.
    ///
    /// # Panics
    /// When the CubeCL runtime does.
    pub fn cross_entropy<E: GpuElement>(
        &self,
        logits: &[E],
        classes: usize,
        targets: &[i64],
        options: &CrossEntropyOptions<'_>,
        grad_output: GradOutput<'_, f32>,
        grad: Option<&mut [E]>,
    ) -> Result<CrossEntropyOutput<f32>, Error> {
        let rows = row_count("logits", logits.len(), classes)?;
        expect_len("targets", rows, targets.len())?;
        check_ce_call(logits, grad.as_deref(), options)?;
        // `lse`'s own checks of everything but the logits, and the mean's denominator.
        let checked =
            ChunkedCrossEntropy::<E>::new(classes, targets, options, grad_output)?.finish();
        if rows == 0 {
            return Ok(checked);
        }
        let call = CeCall::upload(self, logits, classes, options);
        let value_at = |row: usize, column: usize| logits[row * classes + column].to_f64();
        let (out, grad_handle) = self.class_cross_entropy(
            call,
            targets,
            checked,
            grad_output,
            grad.is_some(),
            &value_at,
        )?;
        if let (Some(grad), Some(handle)) = (grad, grad_handle) {
            grad.copy_from_slice(&E::unpack(&self.read(handle)?, logits.len()));
        }
        Ok(out)
    }

    /// The class-target cross-entropy of a call whose logits are on the device: the read pass,
    /// then [`Self::finish_cross_entropy`]. `checked` is `lse`'s check of everything but the
    /// logits; `value_at` reads a logit for an error message.
    fn class_cross_entropy(
        &self,
        call: CeCall<'_>,
        targets: &[i64],
        checked: CrossEntropyOutput<f32>,
        grad_output: GradOutput<'_, f32>,
        with_grad: bool,
        value_at: &dyn Fn(usize, usize) -> f64,
    ) -> Result<(CrossEntropyOutput<f32>, Option<Handle>), Error> {
        let (rows, classes, options) = (call.rows, call.classes, call.options);
        let target_words: Vec<u32> = targets
            .iter()
            .map(|&t| {
                if Some(t) == options.ignore_index {
                    kernels::IGNORED_TARGET
                } else {
                    u32::try_from(t).unwrap_or(u32::MAX - 1)
                }
            })
            .collect();
        let t = self.upload(&target_words);
        kernels::ce_stats::launch(
            &self.client,
            cube_count(rows),
            units(),
            arg(&call.x, call.words),
            arg(&t, rows),
            arg(&call.weights, call.weight_count),
            arg(&call.stats, rows * STAT_WORDS),
            arg(&call.row_loss, rows),
            arg(&call.row_lse, rows),
            rows,
            classes,
            call.params(),
            call.code,
            CUBE_UNITS,
        );
        let targets_of = CeTargets::Classes(&t);
        let stat_words = self.read(call.stats.clone())?;
        if let Some(row) = stat_words
            .chunks_exact(STAT_WORDS)
            .position(|s| s[3] == kernels::FAULT_TARGET_RANGE)
        {
            // Unreachable after `lse`'s checks; a device-side target buffer would land here.
            return Err(LseError::TargetOutOfRange {
                row,
                value: targets[row],
                classes,
            }
            .into());
        }
        self.finish_cross_entropy(
            call,
            &stat_words,
            None,
            targets_of,
            checked,
            grad_output,
            with_grad,
            value_at,
        )
    }

    /// [`Self::cross_entropy`] on logits already on the device: `logits` holds `len` elements
    /// of `dtype`, row-major `rows × classes`, in `u32` words as [`GpuElement`] packs them (a
    /// contiguous `f32`, `f16` or `bf16` tensor of another CubeCL user, such as burn, is
    /// already so). Returns the loss and, when `with_grad`, the gradient as a new device buffer
    /// of the logits' dtype and layout; the logits never leave the device (the row losses and
    /// per-row stats do: a few words per row).
    ///
    /// # Errors
    /// As [`Self::cross_entropy`]; a NaN or `+inf` logit under [`NonFinite::Error`] reads the
    /// logits back to name its value.
    ///
    /// # Panics
    /// When the CubeCL runtime does, or when `logits` holds fewer than `len` elements.
    #[allow(clippy::too_many_arguments)]
    pub fn cross_entropy_resident(
        &self,
        logits: &Handle,
        dtype: StorageDType,
        len: usize,
        classes: usize,
        targets: &[i64],
        options: &CrossEntropyOptions<'_>,
        grad_output: GradOutput<'_, f32>,
        with_grad: bool,
    ) -> Result<(CrossEntropyOutput<f32>, Option<Handle>), Error> {
        let rows = row_count("logits", len, classes)?;
        expect_len("targets", rows, targets.len())?;
        check_offered(options)?;
        let checked =
            ChunkedCrossEntropy::<f32>::new(classes, targets, options, grad_output)?.finish();
        if rows == 0 {
            return Ok((checked, with_grad.then(|| self.words(0))));
        }
        let call = CeCall::resident(self, logits.clone(), dtype, len, classes, options);
        let value_at = |row: usize, column: usize| {
            let words = self.read(logits.clone()).unwrap_or_default();
            dtype.value(&words, row * classes + column)
        };
        self.class_cross_entropy(call, targets, checked, grad_output, with_grad, &value_at)
    }

    /// The cross-entropy of `logits` (`rows × classes`) against probability targets
    /// `probabilities` (`rows × classes`, row-major, the logits' dtype), fused with its gradient
    /// when `grad` is given: [`lse::cross_entropy_with_grad`] with [`lse::Targets::Probabilities`]
    /// (any finite values; class weights, label smoothing, z-loss, soft-cap, the reductions —
    /// the mean divides by the row count — and the NaN/`+inf` policies; there is no ignore
    /// index), computed in `f32` on the device; `Σ_c w_c q_c` of each row and the reduction of
    /// the row losses on the host, in `f64`.
    ///
    /// # Errors
    /// As [`lse::cross_entropy_with_grad`] ([`Error::Input`]: shapes, options, weights, the
    /// incoming gradient, [`LseError::BadProbability`] for the first non-finite target of the
    /// first faulty row, NaN/`+inf` logits and target mass on a masked (`-inf`) logit under
    /// [`NonFinite::Error`]); [`Error::Unsupported`] for `keep_logit_stats`, `keep_row_argmax`
    /// and `logit_scale`; [`Error::Device`]. `grad` is written only on success; no input is modified.
    ///
    /// # Panics
    /// When the CubeCL runtime does.
    pub fn cross_entropy_probabilities<E: GpuElement>(
        &self,
        logits: &[E],
        classes: usize,
        probabilities: &[E],
        options: &CrossEntropyOptions<'_>,
        grad_output: GradOutput<'_, f32>,
        grad: Option<&mut [E]>,
    ) -> Result<CrossEntropyOutput<f32>, Error> {
        let rows = row_count("logits", logits.len(), classes)?;
        expect_len("probability targets", logits.len(), probabilities.len())?;
        check_ce_call(logits, grad.as_deref(), options)?;
        let checked = ChunkedCrossEntropy::<E>::with_probabilities(
            classes,
            probabilities,
            options,
            grad_output,
        )?
        .finish();
        if rows == 0 {
            return Ok(checked);
        }
        // The targets on the host: the first non-finite one (an error whatever the logits hold,
        // found before the row's logits are looked at, as on the CPU) and each row's weighted
        // mass `Σ_c w_c q_c`, in `f64`.
        let mut bad_target = None;
        let kept: Vec<f32> = probabilities
            .chunks_exact(classes)
            .enumerate()
            .map(|(row, q)| {
                let mut mass = CompensatedSum::ZERO;
                for (column, v) in q.iter().enumerate() {
                    let value = v.to_f64();
                    if !value.is_finite() && bad_target.is_none() {
                        bad_target = Some((row, LseError::BadProbability { row, column, value }));
                    }
                    mass.add(options.weights.map_or(1.0, |w| w[column]) * value);
                }
                mass.value() as f32
            })
            .collect();
        if options.non_finite == NonFinite::Propagate {
            if let Some((_, error)) = bad_target {
                return Err(error.into());
            }
        }
        let call = CeCall::upload(self, logits, classes, options);
        let q_words = E::pack(probabilities);
        let q = self.upload(&q_words);
        let kept = self.upload_f32(&kept);
        kernels::ce_prob_stats::launch(
            &self.client,
            cube_count(rows),
            units(),
            arg(&call.x, call.words),
            arg(&q, q_words.len()),
            arg(&kept, rows),
            arg(&call.weights, call.weight_count),
            arg(&call.stats, rows * STAT_WORDS),
            arg(&call.row_loss, rows),
            arg(&call.row_lse, rows),
            rows,
            classes,
            call.params(),
            E::CODE,
            CUBE_UNITS,
        );
        let stat_words = self.read(call.stats.clone())?;
        let value_at = |row: usize, column: usize| logits[row * classes + column].to_f64();
        let (out, grad_handle) = self.finish_cross_entropy(
            call,
            &stat_words,
            bad_target,
            CeTargets::Probabilities {
                q: &q,
                words: q_words.len(),
                kept: &kept,
            },
            checked,
            grad_output,
            grad.is_some(),
            &value_at,
        )?;
        if let (Some(grad), Some(handle)) = (grad, grad_handle) {
            grad.copy_from_slice(&E::unpack(&self.read(handle)?, logits.len()));
        }
        Ok(out)
    }

    /// The rest of a cross-entropy call after its read pass: the first faulty row's error
    /// (`bad_target`: a row whose targets are bad, checked before that row's logits), the row
    /// losses, the gradient's write pass and the reduction of `lse`'s `Batch::finish`.
    #[allow(clippy::too_many_arguments)]
    fn finish_cross_entropy(
        &self,
        call: CeCall<'_>,
        stat_words: &[u32],
        bad_target: Option<(usize, LseError)>,
        targets: CeTargets<'_>,
        checked: CrossEntropyOutput<f32>,
        grad_output: GradOutput<'_, f32>,
        with_grad: bool,
        value_at: &dyn Fn(usize, usize) -> f64,
    ) -> Result<(CrossEntropyOutput<f32>, Option<Handle>), Error> {
        let CeCall {
            rows,
            classes,
            options,
            ..
        } = call;
        let error_policy = options.non_finite == NonFinite::Error;
        for (row, s) in stat_words.chunks_exact(STAT_WORDS).enumerate() {
            if let Some((bad_row, _)) = &bad_target {
                if *bad_row == row {
                    let (_, error) = bad_target.expect("just matched");
                    return Err(error.into());
                }
            }
            if !error_policy {
                continue;
            }
            let column = s[4] as usize;
            match s[3] {
                kernels::FAULT_NON_FINITE => {
                    return Err(LseError::NonFinite {
                        what: "logit",
                        row,
                        column,
                        value: value_at(row, column),
                    }
                    .into())
                }
                kernels::FAULT_MASKED_TARGET => {
                    return Err(LseError::MaskedTarget { row, class: column }.into())
                }
                _ => {}
            }
        }
        let denominator = checked.denominator;
        let empty_mean = options.reduction == Reduction::Mean && denominator == 0.0;
        let keep_rows = options.keep_row_loss || options.reduction == Reduction::None;
        let row_loss: Vec<f32> = self
            .read(call.row_loss.clone())?
            .into_iter()
            .map(f32::from_bits)
            .collect();

        let mut grad = None;
        if with_grad {
            let reduction = match options.reduction {
                Reduction::Mean if empty_mean => 0.0,
                Reduction::Mean => (1.0 / denominator).min(f64::from(f32::MAX)) as f32,
                Reduction::Sum | Reduction::None => 1.0,
            };
            let caller: Vec<f32> = match grad_output {
                GradOutput::Scalar(g) => vec![g; rows],
                GradOutput::PerRow(gs) => gs.to_vec(),
            };
            let c = self.upload_f32(&caller);
            let out = self.words(call.words);
            // The buffers of the other kind of target: a word that is never read.
            let unused = self.words(1);
            let (t, q, q_len, kept, probabilities) = match targets {
                CeTargets::Classes(t) => (t, &unused, 1, &unused, false),
                CeTargets::Probabilities { q, words, kept } => (&unused, q, words, kept, true),
            };
            kernels::ce_grad::launch(
                &self.client,
                element_cubes(call.words),
                units(),
                arg(&call.x, call.words),
                arg(&call.stats, rows * STAT_WORDS),
                arg(t, if probabilities { 1 } else { rows }),
                arg(q, q_len),
                arg(kept, if probabilities { rows } else { 1 }),
                arg(&call.weights, call.weight_count),
                arg(&c, rows),
                arg(&out, call.words),
                call.len,
                classes,
                reduction,
                call.params(),
                call.code,
                probabilities,
            );
            grad = Some(out);
        }

        // The reduction of `lse`'s `Batch::finish`, over the device's row losses.
        let any_non_finite = row_loss.iter().any(|l| !l.is_finite());
        let reduce = |terms: &mut dyn Iterator<Item = f64>| {
            let mut total = CompensatedSum::ZERO;
            terms.for_each(|t| total.add(t));
            let sum = total.value();
            let reduced = match options.reduction {
                Reduction::Mean if empty_mean => match options.empty_mean {
                    EmptyMean::Nan => f64::NAN,
                    _ if sum.is_nan() => f64::NAN,
                    _ => 0.0,
                },
                Reduction::Mean => sum / denominator,
                Reduction::Sum | Reduction::None => sum,
            };
            if any_non_finite {
                reduced
            } else {
                reduced.clamp(-f64::MAX, f64::MAX)
            }
        };
        let loss = reduce(&mut row_loss.iter().map(|&l| f64::from(l)));
        let row_lse: Option<Vec<f32>> = if options.keep_row_lse || options.z_loss > 0.0 {
            Some(
                self.read(call.row_lse)?
                    .into_iter()
                    .map(f32::from_bits)
                    .collect(),
            )
        } else {
            None
        };
        // The z-loss term from the row lse: NaN for a NaN row; none for an ignored row (lse NaN,
        // loss 0) or a fully masked one (lse -inf).
        let z_loss = match &row_lse {
            Some(lse) if options.z_loss > 0.0 => reduce(&mut row_loss.iter().zip(lse).map(
                |(&loss, &lse)| match f64::from(lse) {
                    _ if loss.is_nan() => f64::NAN,
                    lse if lse.is_nan() || lse == f64::NEG_INFINITY => 0.0,
                    lse => (options.z_loss * lse * lse).min(f64::MAX),
                },
            )),
            _ => 0.0,
        };
        let out = CrossEntropyOutput {
            loss: f32::from_f64_saturating(loss),
            row_loss: keep_rows.then_some(row_loss),
            row_lse: row_lse.filter(|_| options.keep_row_lse),
            z_loss: f32::from_f64_saturating(z_loss),
            ..checked
        };
        Ok((out, grad))
    }

    /// The naive `exp(x) / Σ exp(x)` in `f32`: a control that overflows to NaN once a logit
    /// passes 88.7, for tests that must be able to fail. Not for use.
    ///
    /// # Errors
    /// Shapes ([`Error::Input`]), [`Error::Device`].
    ///
    /// # Panics
    /// When the CubeCL runtime does.
    pub fn naive_softmax(
        &self,
        logits: &[f32],
        classes: usize,
        out: &mut [f32],
    ) -> Result<(), Error> {
        let rows = row_count("logits", logits.len(), classes)?;
        expect_len("output", logits.len(), out.len())?;
        if rows == 0 {
            return Ok(());
        }
        let words = f32::pack(logits);
        let x = self.upload(&words);
        let y = self.words(words.len());
        kernels::naive_softmax::launch(
            &self.client,
            cube_count(rows),
            units(),
            arg(&x, words.len()),
            arg(&y, words.len()),
            rows,
            classes,
            CUBE_UNITS,
        );
        out.copy_from_slice(&f32::unpack(&self.read(y)?, logits.len()));
        Ok(())
    }
}

impl Gpu {
    /// For each `x`: the device's `exp(x)`, the kernels' `exp(x)`, the device's `ln(|x| + 1)`
    /// and the kernels' `ln(|x| + 1)`, as `f32`: how far the device's own transcendentals are
    /// from correctly rounded, and the kernels' (docs/gpu.md).
    ///
    /// # Errors
    /// [`Error::Device`].
    ///
    /// # Panics
    /// When the CubeCL runtime does.
    #[doc(hidden)]
    pub fn transcendentals(&self, x: &[f32]) -> Result<Vec<[f32; 4]>, Error> {
        if x.is_empty() {
            return Ok(Vec::new());
        }
        let input = self.upload_f32(x);
        let out = self.words(4 * x.len());
        kernels::transcendentals::launch(
            &self.client,
            element_cubes(x.len()),
            units(),
            arg(&input, x.len()),
            arg(&out, 4 * x.len()),
        );
        let words = self.read(out)?;
        Ok(words
            .chunks_exact(4)
            .map(|w| [0, 1, 2, 3].map(|k| f32::from_bits(w[k])))
            .collect())
    }
}

/// The gradient buffer's length and the options the GPU kernels lack, checked before anything
/// is uploaded.
fn check_ce_call<E: GpuElement>(
    logits: &[E],
    grad: Option<&[E]>,
    options: &CrossEntropyOptions<'_>,
) -> Result<(), Error> {
    if let Some(g) = grad {
        expect_len("gradient", logits.len(), g.len())?;
    }
    check_offered(options)
}

/// The options the GPU kernels do not implement, refused by name (never ignored).
fn check_offered(options: &CrossEntropyOptions<'_>) -> Result<(), Error> {
    let unsupported = [
        (options.keep_logit_stats, "keep_logit_stats"),
        (options.keep_row_argmax, "keep_row_argmax"),
        (options.logit_scale != 1.0, "logit_scale"),
    ];
    match unsupported.into_iter().find(|&(asked, _)| asked) {
        Some((_, name)) => Err(Error::Unsupported(name)),
        None => Ok(()),
    }
}

/// The device buffers of one cross-entropy call, shared by both kinds of target and by logits
/// uploaded from the host or already on the device.
struct CeCall<'a> {
    rows: usize,
    classes: usize,
    /// Elements of the logits.
    len: usize,
    /// The logits' dtype, as the kernels take it.
    code: u32,
    options: &'a CrossEntropyOptions<'a>,
    x: Handle,
    words: usize,
    weights: Handle,
    weight_count: usize,
    stats: Handle,
    row_loss: Handle,
    row_lse: Handle,
}

impl<'a> CeCall<'a> {
    /// Uploads the logits, then as [`Self::resident`].
    fn upload<E: GpuElement>(
        gpu: &Gpu,
        logits: &[E],
        classes: usize,
        options: &'a CrossEntropyOptions<'a>,
    ) -> Self {
        let words = E::pack(logits);
        let x = gpu.upload(&words);
        Self::resident(
            gpu,
            x,
            StorageDType::of::<E>(),
            logits.len(),
            classes,
            options,
        )
    }

    /// Uploads the class weights and makes the per-row buffers for logits `x` on the device.
    fn resident(
        gpu: &Gpu,
        x: Handle,
        dtype: StorageDType,
        len: usize,
        classes: usize,
        options: &'a CrossEntropyOptions<'a>,
    ) -> Self {
        let rows = len / classes;
        let weights: Vec<f32> = options
            .weights
            .map_or_else(|| vec![1.0], |w| w.iter().map(|&v| v as f32).collect());
        Self {
            rows,
            classes,
            len,
            code: dtype.code(),
            options,
            x,
            words: dtype.words(len),
            weights: gpu.upload_f32(&weights),
            weight_count: weights.len(),
            stats: gpu.words(rows * STAT_WORDS),
            row_loss: gpu.words(rows),
            row_lse: gpu.words(rows),
        }
    }

    /// The options as the kernels take them.
    fn params(&self) -> CeParamsLaunch {
        let o = self.options;
        CeParamsLaunch::new(
            o.label_smoothing as f32,
            o.z_loss as f32,
            o.softcap.map_or(0.0, |c| c as f32),
            u32::from(o.weights.is_some()),
        )
    }
}

/// The targets' device buffers, for the gradient's write pass.
enum CeTargets<'h> {
    /// One word per row: a class, or [`kernels::IGNORED_TARGET`].
    Classes(&'h Handle),
    /// The probability targets (`words` words) and each row's `Σ_c w_c q_c`.
    Probabilities {
        q: &'h Handle,
        words: usize,
        kept: &'h Handle,
    },
}

/// `lse`'s error for a NaN or `+inf` logit, its value read from the caller's logits.
fn non_finite_logit<E: GpuElement>(
    logits: &[E],
    classes: usize,
    row: usize,
    column: usize,
) -> LseError {
    LseError::NonFinite {
        what: "logit",
        row,
        column,
        value: logits[row * classes + column].to_f64(),
    }
}
