//! Fail-fast finiteness checks: the schedule, the error, and the cost when inactive.

use lse::guard::{FiniteGuard, GuardError, Role, Schedule, TensorShapeError, TensorView};
use lse::{bf16, f16, DType};

#[test]
fn first_n_then_every_kth_checks_exactly_those_batches() {
    let schedule = Schedule::FirstThenEvery { first: 3, every: 5 };
    let mut guard = FiniteGuard::new(schedule);
    // A tensor that is NaN at every batch: a check fails exactly when it runs.
    let logits = [0.0f32, 1.0, f32::NAN, 2.0];
    let mut failed = Vec::new();
    for batch in 0..=21 {
        guard.begin_batch(batch);
        let active = guard.is_active();
        match guard.check_slice("logits", Role::Logits, &logits, 2) {
            Err(GuardError::NonFinite { batch: b, .. }) => {
                assert!(active);
                assert_eq!(b, batch);
                failed.push(batch);
            }
            Ok(()) => assert!(!active, "batch {batch} was active but passed"),
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(failed, [0, 1, 2, 5, 10, 15, 20]);
    assert_eq!(guard.batches_checked(), 7);
    assert_eq!(guard.tensors_checked(), 7, "inactive batches read nothing");

    let checked = |s: Schedule| (0..12).filter(|&b| s.is_active(b)).collect::<Vec<_>>();
    assert_eq!(checked(Schedule::Always), (0..12).collect::<Vec<_>>());
    assert_eq!(checked(Schedule::Never), Vec::<u64>::new());
    assert_eq!(
        checked(Schedule::FirstThenEvery { first: 2, every: 0 }),
        [0, 1]
    );
    assert_eq!(
        checked(Schedule::FirstThenEvery { first: 0, every: 4 }),
        [0, 4, 8]
    );
    assert_eq!(
        checked(Schedule::FirstThenEvery { first: 6, every: 4 }),
        [0, 1, 2, 3, 4, 5, 8]
    );
}

#[test]
fn the_error_names_tensor_batch_row_column_and_value() {
    let mut guard = FiniteGuard::new(Schedule::Always);
    guard.begin_batch(7);
    // 3 rows × 4 classes of f16 logits; the output layer overflowed at row 1, column 2.
    let mut logits = vec![f16::from_f32(0.5); 12];
    logits[4 + 2] = f16::INFINITY;
    logits[4 + 3] = f16::NAN;
    let err = guard
        .check_slice("head.logits", Role::Logits, &logits, 4)
        .unwrap_err();
    assert_eq!(
        err,
        GuardError::NonFinite {
            tensor: "head.logits".into(),
            role: Role::Logits,
            dtype: DType::F16,
            batch: 7,
            row: 1,
            column: 2,
            value: f64::INFINITY,
        }
    );
    let msg = err.to_string();
    for needle in [
        "`head.logits`",
        "batch 7",
        "row 1",
        "column 2",
        "inf",
        "f16",
    ] {
        assert!(msg.contains(needle), "{needle:?} missing from {msg:?}");
    }

    let err = guard.check_loss("loss", f64::NAN).unwrap_err();
    assert!(
        matches!(&err, GuardError::NonFinite { tensor, row: 0, column: 0, value, .. }
            if tensor == "loss" && value.is_nan()),
        "{err}"
    );
    assert!(err.to_string().contains("NaN"), "{err}");
    assert!(guard.check_loss("loss", 2.5).is_ok());
}

#[test]
fn negative_infinity_is_a_mask_only_in_logits() {
    let mut guard = FiniteGuard::new(Schedule::Always);
    let masked = [0.0f32, f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY];
    assert!(guard
        .check_slice("logits", Role::Logits, &masked, 2)
        .is_ok());
    let err = guard
        .check_slice("grad", Role::Gradient, &masked, 2)
        .unwrap_err();
    assert!(matches!(
        err,
        GuardError::NonFinite {
            row: 0,
            column: 1,
            ..
        }
    ));
}

#[test]
fn inactive_batches_never_fail_even_on_nan() {
    let mut guard = FiniteGuard::new(Schedule::FirstThenEvery {
        first: 1,
        every: 100,
    });
    let nan = [bf16::NAN; 4];
    for batch in 1..100 {
        guard.begin_batch(batch);
        assert!(!guard.is_active());
        assert!(guard.check_slice("x", Role::Input, &nan, 2).is_ok());
        assert!(guard.check_loss("loss", f64::NAN).is_ok());
        // Even a bad shape is not looked at on an inactive batch.
        assert!(guard.check_slice("x", Role::Input, &nan, 3).is_ok());
    }
    assert_eq!(guard.tensors_checked(), 0);
    let mut never = FiniteGuard::new(Schedule::Never);
    assert!(never.check_slice("x", Role::Input, &nan, 2).is_ok());
}

#[test]
fn check_all_reports_the_first_bad_tensor_in_order() {
    let mut guard = FiniteGuard::new(Schedule::Always);
    guard.begin_batch(3);
    let input = [1.0f32, 2.0, 3.0, 4.0];
    let logits = [f16::from_f32(1.0), f16::NAN];
    let grad = [f64::INFINITY; 2];
    let tensors = [
        TensorView::new("input", Role::Input, &input, 2).unwrap(),
        TensorView::new("logits", Role::Logits, &logits, 2).unwrap(),
        TensorView::new("grad", Role::Gradient, &grad, 2).unwrap(),
    ];
    let err = guard.check_all(&tensors).unwrap_err();
    assert!(
        matches!(&err, GuardError::NonFinite { tensor, batch: 3, row: 0, column: 1, .. } if tensor == "logits"),
        "{err}"
    );
}

#[test]
fn a_bad_shape_is_a_typed_error() {
    let mut guard = FiniteGuard::new(Schedule::Always);
    let x = [0.0f32; 5];
    let err = guard.check_slice("x", Role::Input, &x, 2).unwrap_err();
    assert!(matches!(
        err,
        GuardError::Shape(TensorShapeError::Ragged {
            len: 5,
            columns: 2,
            ..
        })
    ));
    assert!(err.to_string().contains("`x`"), "{err}");
}
