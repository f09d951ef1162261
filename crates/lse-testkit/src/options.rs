//! The cross-entropy option sets the suites share.

use lse::{CrossEntropyOptions, Reduction};

/// Every option the split (sharded) cross-entropy has a meaning for, alone and then all together
/// under a sum, each keeping the per-row losses and logsumexps so that rows can be compared:
/// the sets of the one-process split tests and of the MPI tests. `weights` has one weight per
/// class.
pub fn split_option_sets(weights: &[f64]) -> Vec<(&'static str, CrossEntropyOptions<'_>)> {
    let base = CrossEntropyOptions {
        keep_row_loss: true,
        keep_row_lse: true,
        ..Default::default()
    };
    vec![
        ("plain", base),
        (
            "smoothing 0.1",
            CrossEntropyOptions {
                label_smoothing: 0.1,
                ..base
            },
        ),
        (
            "class weights",
            CrossEntropyOptions {
                weights: Some(weights),
                ..base
            },
        ),
        (
            "z-loss 1e-4",
            CrossEntropyOptions {
                z_loss: 1e-4,
                ..base
            },
        ),
        (
            "softcap 30",
            CrossEntropyOptions {
                softcap: Some(30.0),
                ..base
            },
        ),
        (
            "everything, sum",
            CrossEntropyOptions {
                label_smoothing: 0.1,
                weights: Some(weights),
                z_loss: 1e-4,
                softcap: Some(30.0),
                reduction: Reduction::Sum,
                ..base
            },
        ),
    ]
}
