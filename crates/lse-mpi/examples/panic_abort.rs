//! A rank that panics before a collective takes the whole job down (`MPI_Abort` from
//! [`lse_mpi::abort_on_panic`]) instead of leaving the other ranks waiting in it forever.
//! `.ci/run` runs it under `mpirun -np 2` in a timeout and expects a failure, not a timeout.

use lse_mpi::VocabParallel;

fn main() {
    let universe = mpi::initialize().expect("MPI initialises once");
    lse_mpi::abort_on_panic();
    let world = universe.world();
    let split = VocabParallel::evenly(&world, 10).expect("10 classes");
    let logits = vec![0.0f32; split.shard().width()];
    if mpi::traits::Communicator::rank(&world) == 1 {
        panic!("rank 1 fails before the collective, on purpose");
    }
    // Rank 0 waits here for rank 1, which never comes: only MPI_Abort ends the job.
    let out = split.cross_entropy(&logits, &[3], &Default::default());
    println!("unreachable under 2 ranks: {out:?}");
}
