//! # lse-mpi — vocabulary-parallel cross-entropy over MPI, one collective per forward
//!
//! When the classes of every row are split across processes (tensor-parallel training splits the
//! language-model head and so its logits), each rank holds the columns `[start, stop)` of every
//! row. Megatron-LM's vocab-parallel cross-entropy then issues three all-reduces per forward (the
//! max, the target logit, the sum of exponentials). Here each rank reduces its columns to one
//! [`RowPartial`] per row ([`lse::sharded`]), and **one** `MPI_Allreduce` with a user-defined
//! commutative operation ([`RowPartial::merge`]) gives every rank the merged row; the loss, and
//! each rank's own columns of the gradient, follow with no further communication.
//!
//! The merge is commutative to the bit, so every reduction algorithm that combines the same
//! operands on every rank — all of Open MPI's all-reduce algorithms do, by exchanging results or
//! by pairwise symmetric steps — leaves every rank with bitwise the same merged partials, hence
//! bitwise the same loss. The results equal the one-process result within the bounds that
//! `lse::sharded` states (one ulp of `f32` and of `f64`); for the vocab-split fused linear
//! cross-entropy ([`VocabParallel::linear_cross_entropy_with_grad`]), those its docs state.
//!
//! Errors never leave a rank waiting: a rank whose own arguments are bad still joins the
//! collective (with [`RowPartial::FAILED_SHARD`]) and every other rank returns
//! [`Error::PeerFailed`]; errors in the logits' values travel in the partials and every rank
//! returns the same one. A rank that panics should take the job down with it:
//! [`abort_on_panic`] installs a hook that calls `MPI_Abort`.
//!
//! ```no_run
//! use lse_mpi::VocabParallel;
//! use mpi::traits::*;
//!
//! let universe = mpi::initialize().unwrap();
//! lse_mpi::abort_on_panic();
//! let world = universe.world();
//! let split = VocabParallel::evenly(&world, 32000)?;
//! let rows = 4;
//! let logits = vec![0.0f32; rows * split.shard().width()]; // this rank's columns
//! let targets = vec![7i64; rows]; // global class indices, the same on every rank
//! let mut grad = vec![0.0f32; logits.len()];
//! let out = split.cross_entropy_with_grad(
//!     &logits, &targets, &Default::default(), lse::GradOutput::Scalar(1.0), &mut grad,
//! )?;
//! assert!((out.loss - (32000f32).ln()).abs() < 1e-4);
//! # Ok::<(), lse_mpi::Error>(())
//! ```

// Outside the workspace (it needs MPI), so the workspace's `[workspace.lints]` are restated.
#![warn(missing_docs, clippy::missing_errors_doc, clippy::missing_panics_doc)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use lse::sharded::{self, LinearShardGradients, RowPartial, Shard, ShardTargets};
use lse::{
    CrossEntropyOptions, CrossEntropyOutput, Element, GradOutput, LinearCrossEntropyOptions,
    LinearGradients, LinearHead, LseError, NonFinite,
};
use mpi::collective::{SystemOperation, UserOperation};
use mpi::datatype::{DatatypeRef, UserDatatype};
use mpi::traits::{Communicator, CommunicatorCollectives, Equivalence};

/// What a vocabulary-parallel call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// This rank's arguments or the logits' values (the same error on every rank for the
    /// latter).
    #[error(transparent)]
    Lse(#[from] LseError),
    /// Another rank could not compute its partials (its own call returned the reason); this
    /// rank's outputs are unspecified.
    #[error("another rank's arguments were bad: see the error on that rank")]
    PeerFailed,
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = core::result::Result<T, E>;

/// [`RowPartial`] as MPI sees it: one derived datatype of 13 `f64` and 5 `u64`, the layout
/// [`RowPartial`] documents.
#[derive(Clone, Copy, Debug)]
#[repr(transparent)]
struct Wire(RowPartial);

// Layout: `RowPartial` is `#[repr(C)]`, `F64_FIELDS` f64 then `U64_FIELDS` u64, `BYTES` long.
const _: () = assert!(core::mem::size_of::<RowPartial>() == RowPartial::BYTES);

unsafe impl Equivalence for Wire {
    type Out = DatatypeRef<'static>;

    fn equivalent_datatype() -> Self::Out {
        // One committed datatype per process (MPI must be initialised by then), never freed.
        static DATATYPE: OnceLock<UserDatatype> = OnceLock::new();
        DATATYPE
            .get_or_init(|| {
                UserDatatype::structured(
                    &[RowPartial::F64_FIELDS as i32, RowPartial::U64_FIELDS as i32],
                    &[0, 8 * RowPartial::F64_FIELDS as mpi::Address],
                    &[f64::equivalent_datatype(), u64::equivalent_datatype()],
                )
            })
            .as_ref()
    }
}

fn as_wire(p: &[RowPartial]) -> &[Wire] {
    // SAFETY: `Wire` is `repr(transparent)` over `RowPartial`.
    unsafe { core::slice::from_raw_parts(p.as_ptr().cast(), p.len()) }
}

fn as_wire_mut(p: &mut [RowPartial]) -> &mut [Wire] {
    // SAFETY: as `as_wire`.
    unsafe { core::slice::from_raw_parts_mut(p.as_mut_ptr().cast(), p.len()) }
}

/// Installs a panic hook that prints the panic (the default hook's message) and then calls
/// `MPI_Abort` on `MPI_COMM_WORLD`, so that the other ranks do not wait forever in a collective
/// for a rank that has died. Call it once after `mpi::initialize`.
///
/// # Panics
/// Never.
pub fn abort_on_panic() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        // SAFETY: MPI is initialised (the caller's contract) and MPI_Abort does not return.
        unsafe {
            mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, 101);
        }
    }));
}

/// A write pass of [`lse::sharded`] over one shard's columns (softmax, log_softmax).
type WritePass<E> = fn(&[E], Shard, &[RowPartial], &mut [E], NonFinite) -> lse::Result<()>;

/// The split-vocabulary operations of one rank over a communicator: this rank holds columns
/// [`Self::shard`] of every row.
///
/// Every rank of the communicator must make the same calls in the same order (they are
/// collective), with the same targets, options and row count; the logits (and gradient and
/// outputs) are this rank's columns, row-major.
pub struct VocabParallel<'c, C: Communicator> {
    comm: &'c C,
    shard: Shard,
    collectives: AtomicU64,
}

impl<'c, C: Communicator> VocabParallel<'c, C> {
    /// This rank holds `shard`. The shards of the ranks must tile the classes; a class that no
    /// rank holds is reported as [`LseError::UncoveredTarget`] when it is a target.
    pub fn new(comm: &'c C, shard: Shard) -> Self {
        Self {
            comm,
            shard,
            collectives: AtomicU64::new(0),
        }
    }

    /// Near-equal shards of `classes` by rank ([`Shard::split_evenly`]).
    ///
    /// # Errors
    /// [`LseError::EmptyClasses`] when `classes == 0`.
    pub fn evenly(comm: &'c C, classes: usize) -> Result<Self> {
        let shard = Shard::split_evenly(comm.rank() as usize, comm.size() as usize, classes)?;
        Ok(Self::new(comm, shard))
    }

    /// This rank's columns.
    pub fn shard(&self) -> Shard {
        self.shard
    }

    /// The number of collective operations this object has issued: one per call, except the
    /// linear cross-entropy's (one per chunk, and one for `dH`).
    pub fn collectives(&self) -> u64 {
        self.collectives.load(Ordering::Relaxed)
    }

    /// The collective alone: every rank's `partials` (from [`lse::sharded`]'s `*_partials`
    /// functions) merged row by row into `partials` on every rank, with one all-reduce — for
    /// callers that compute the partials themselves.
    ///
    /// # Errors
    /// [`Error::PeerFailed`] when another rank sent [`RowPartial::FAILED_SHARD`] rows.
    ///
    /// # Panics
    /// Never (MPI errors abort the job, MPI's default).
    pub fn all_reduce(&self, partials: &mut [RowPartial]) -> Result<()> {
        self.merge(partials, Ok(()))
    }

    /// The one collective: every rank's partials merged row by row, into `partials` on every
    /// rank. `local` holds this rank's outcome of step 1: on error, this rank sends
    /// [`RowPartial::FAILED_SHARD`] rows so that the others learn of it from this same call.
    fn merge(&self, partials: &mut [RowPartial], local: lse::Result<()>) -> Result<()> {
        if local.is_err() {
            partials.fill(RowPartial::FAILED_SHARD);
        }
        let op = UserOperation::commutative(|from, into| {
            // The datatype is `Wire`'s (checked by `downcast`), a transparent `RowPartial`.
            let from: &[Wire] = from.downcast().expect("all-reduce of RowPartial rows");
            let into: &mut [Wire] = into.downcast().expect("all-reduce of RowPartial rows");
            for (a, b) in into.iter_mut().zip(from) {
                a.0 = a.0.merge(b.0);
            }
        });
        let send = partials.to_vec();
        self.comm
            .all_reduce_into(as_wire(&send), as_wire_mut(partials), &op);
        self.collectives.fetch_add(1, Ordering::Relaxed);
        local?;
        if partials.iter().any(RowPartial::is_failed) {
            return Err(Error::PeerFailed);
        }
        Ok(())
    }

    /// The merged partials of a cross-entropy over this rank's `logits`.
    fn cross_entropy_merged<E: Element>(
        &self,
        logits: &[E],
        targets: &[i64],
        options: &CrossEntropyOptions<'_>,
    ) -> Result<Vec<RowPartial>> {
        let mut partials = vec![RowPartial::EMPTY; targets.len()];
        let local =
            sharded::cross_entropy_partials(logits, self.shard, targets, options, &mut partials);
        self.merge(&mut partials, local)?;
        Ok(partials)
    }

    /// The cross-entropy loss of rows split across the ranks, the same on every rank (bitwise),
    /// with one all-reduce.
    ///
    /// `logits` are this rank's `targets.len() × shard.width()` columns; `targets` the global
    /// class indices (the same on every rank); `options` as [`lse::cross_entropy`]'s (the same
    /// on every rank), with `weights` over all classes, label smoothing over the whole row's
    /// live classes; probability targets and logit statistics are not offered.
    ///
    /// # Errors
    /// [`Error::Lse`] with what [`lse::sharded::cross_entropy_partials`] and
    /// [`lse::sharded::cross_entropy_finish`] report (the same on every rank when it comes
    /// from the logits' values), [`Error::PeerFailed`] when another rank's arguments were bad.
    ///
    /// # Panics
    /// Never (MPI errors abort the job, MPI's default).
    pub fn cross_entropy<E: Element>(
        &self,
        logits: &[E],
        targets: &[i64],
        options: &CrossEntropyOptions<'_>,
    ) -> Result<CrossEntropyOutput<E::Stat>> {
        let merged = self.cross_entropy_merged(logits, targets, options)?;
        Ok(sharded::cross_entropy_finish::<E>(
            &merged,
            self.shard.classes(),
            targets,
            options,
        )?)
    }

    /// [`Self::cross_entropy`] and the gradient of this rank's columns into `grad` (the shape of
    /// `logits`), from the same one all-reduce.
    ///
    /// # Errors
    /// As [`Self::cross_entropy`], and those of [`lse::cross_entropy_with_grad`] for `grad`
    /// and `grad_output`. On error `grad` is unspecified.
    ///
    /// # Panics
    /// Never.
    pub fn cross_entropy_with_grad<E: Element>(
        &self,
        logits: &[E],
        targets: &[i64],
        options: &CrossEntropyOptions<'_>,
        grad_output: GradOutput<'_, E::Stat>,
        grad: &mut [E],
    ) -> Result<CrossEntropyOutput<E::Stat>> {
        let merged = self.cross_entropy_merged(logits, targets, options)?;
        Ok(sharded::cross_entropy_shard_grad(
            logits,
            self.shard,
            &merged,
            targets,
            options,
            grad_output,
            grad,
        )?)
    }

    /// The vocab-split fused linear cross-entropy: the loss of the logits `hidden · Wᵀ + b`
    /// where this rank holds rows [`Self::shard`] of `W` (`head.weight`, `shard.width() × dim`)
    /// and of the bias, and `hidden` (`rows × dim`) is the same on every rank. `targets` are
    /// every row's global class (the same on every rank) or this rank's columns of the
    /// probability targets ([`ShardTargets`]). The loss is the same on every rank (bitwise).
    ///
    /// **Collectives:** one all-reduce of [`RowPartial`]s per chunk of rows (the chunks of
    /// [`lse::linear_cross_entropy`] at `options.budget_bytes`, sized for all `classes`, so the
    /// same on every rank: `counted_rows.div_ceil(chunk_rows)` of them, none when every row is
    /// ignored). Not one per call: that would need every chunk's partials before any gradient,
    /// hence either the whole `rows × width` logits held (what the fused op exists to avoid) or
    /// the product `H·W_shardᵀ` computed twice. [`Self::collectives`] counts them.
    ///
    /// See [`lse::sharded::linear_cross_entropy_shard`] for the algebra and its bounds.
    ///
    /// # Errors
    /// [`Error::Lse`] with what [`lse::linear_cross_entropy`] reports (every rank alike for the
    /// options, targets, `hidden` and the logits' values; a bad `W`/`b` of this rank names its
    /// global row or class), [`Error::PeerFailed`] when another rank's own arguments were bad.
    ///
    /// # Panics
    /// Never (MPI errors abort the job, MPI's default).
    pub fn linear_cross_entropy<E: Element>(
        &self,
        hidden: &[E],
        head: LinearHead<'_, E>,
        targets: ShardTargets<'_, E>,
        options: &LinearCrossEntropyOptions<'_>,
    ) -> Result<CrossEntropyOutput<E::Stat>> {
        sharded::linear_cross_entropy_shard(
            hidden,
            head,
            self.shard,
            targets,
            options,
            GradOutput::default(),
            None,
            |partials: &mut [RowPartial]| self.merge(partials, Ok(())),
        )
    }

    /// [`Self::linear_cross_entropy`] and its gradients: `grads.hidden` gets the whole `∂/∂H`
    /// (`rows × dim`, the same on every rank), `grads.weight` and `grads.bias` this rank's rows
    /// of `∂/∂W` and classes of `∂/∂b`.
    ///
    /// **Collectives:** those of [`Self::linear_cross_entropy`], then one all-reduce sum of the
    /// ranks' shares `G·W_shard` of `dH` (`rows × dim` values of the working dtype: `f32`, `f64`
    /// for `f64`), rounded once into `E`
    /// (none when every row is ignored). `dW` and `db` need no communication.
    ///
    /// # Errors
    /// As [`Self::linear_cross_entropy`], and those of [`lse::linear_cross_entropy_with_grad`]
    /// for `grad_output` and the gradient buffers' lengths. On error the gradient buffers are
    /// unspecified.
    ///
    /// # Panics
    /// Never (MPI errors abort the job, MPI's default).
    pub fn linear_cross_entropy_with_grad<E: Element>(
        &self,
        hidden: &[E],
        head: LinearHead<'_, E>,
        targets: ShardTargets<'_, E>,
        options: &LinearCrossEntropyOptions<'_>,
        grad_output: GradOutput<'_, E::Stat>,
        grads: LinearGradients<'_, E>,
    ) -> Result<CrossEntropyOutput<E::Stat>>
    where
        E::Stat: Equivalence,
    {
        let mut share = vec![E::Stat::zero(); grads.hidden.len()];
        let out = sharded::linear_cross_entropy_shard(
            hidden,
            head,
            self.shard,
            targets,
            options,
            grad_output,
            Some(LinearShardGradients {
                hidden: &mut share,
                weight: grads.weight,
                bias: grads.bias,
            }),
            |partials: &mut [RowPartial]| self.merge(partials, Ok(())),
        )?;
        // Every rank got here (an error above is every rank's): no counted row, no share.
        let ignore = options.cross_entropy.ignore_index;
        let counted = match targets {
            ShardTargets::Classes(t) => t.iter().any(|&t| Some(t) != ignore),
            ShardTargets::Probabilities { rows, .. } => rows > 0,
        };
        if counted {
            let mut sum = vec![E::Stat::zero(); share.len()];
            self.comm
                .all_reduce_into(&share[..], &mut sum[..], SystemOperation::sum());
            self.collectives.fetch_add(1, Ordering::Relaxed);
            share = sum;
        }
        for (d, &s) in grads.hidden.iter_mut().zip(&share) {
            *d = E::from_f64(s.into());
        }
        Ok(out)
    }

    /// The merged partials of logsumexp-family rows (`rows` of them).
    fn state_merged<E: Element>(&self, logits: &[E], rows: usize) -> Result<Vec<RowPartial>> {
        let mut partials = vec![RowPartial::EMPTY; rows];
        let local = sharded::logsumexp_partials(logits, self.shard, &mut partials);
        self.merge(&mut partials, local)?;
        Ok(partials)
    }

    /// Each row's logsumexp over all ranks' columns into `out` (one value per row), the same on
    /// every rank.
    ///
    /// # Errors
    /// [`LseError::LengthMismatch`] for shapes, [`LseError::NonFinite`] (global column) under
    /// [`NonFinite::Error`], [`Error::PeerFailed`].
    ///
    /// # Panics
    /// Never.
    pub fn logsumexp<E: Element>(
        &self,
        logits: &[E],
        out: &mut [E::Stat],
        policy: NonFinite,
    ) -> Result<()> {
        let merged = self.state_merged(logits, out.len())?;
        Ok(sharded::logsumexp_finish::<E>(&merged, out, policy)?)
    }

    /// This rank's columns of each row's softmax over all ranks' columns, into `out` (the shape
    /// of `logits`, `rows` rows).
    ///
    /// # Errors
    /// As [`Self::logsumexp`].
    ///
    /// # Panics
    /// Never.
    pub fn softmax<E: Element>(
        &self,
        logits: &[E],
        rows: usize,
        out: &mut [E],
        policy: NonFinite,
    ) -> Result<()> {
        self.write_pass(logits, rows, out, policy, sharded::softmax_shard)
    }

    /// This rank's columns of each row's log_softmax, as [`Self::softmax`].
    ///
    /// # Errors
    /// As [`Self::logsumexp`].
    ///
    /// # Panics
    /// Never.
    pub fn log_softmax<E: Element>(
        &self,
        logits: &[E],
        rows: usize,
        out: &mut [E],
        policy: NonFinite,
    ) -> Result<()> {
        self.write_pass(logits, rows, out, policy, sharded::log_softmax_shard)
    }

    /// The collective, then `pass` over this rank's columns.
    fn write_pass<E: Element>(
        &self,
        logits: &[E],
        rows: usize,
        out: &mut [E],
        policy: NonFinite,
        pass: WritePass<E>,
    ) -> Result<()> {
        let merged = self.state_merged(logits, rows)?;
        Ok(pass(logits, self.shard, &merged, out, policy)?)
    }
}
