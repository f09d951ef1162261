//! The accuracy tests proper, for one kernel family: lse's `tests/accuracy.rs` runs them on the
//! dispatched kernel and `tests/accuracy_scalar.rs` on the scalar reference.

/// Defines the accuracy tests (docs/numerics.md's targets against the 192-bit oracle, through
/// [`crate::measure`]) in the calling test file, measuring the kernel family `$kernel` (an
/// `lse::Kernel`). The caller depends on `lse`.
#[macro_export]
macro_rules! accuracy_tests {
    ($kernel:expr) => {
        use std::sync::OnceLock;

        use lse::{bf16, f16, CrossEntropyOptions, DType, Element, Reduction, Targets};
        use $crate::measure::{self, Op, Plan, Report};
        use $crate::oracle::{self, big, to_f64, ulp_error, CeSpec, ExactRow};

        /// The measurement, shared by every test of this file (the first test to ask computes it, on all
        /// cores; the others wait for it instead of repeating the oracle's work).
        fn report() -> &'static Report {
            static REPORT: OnceLock<Report> = OnceLock::new();
            REPORT.get_or_init(|| {
                lse::set_kernel($kernel);
                eprintln!(
                    "accuracy measured on the {} kernel",
                    lse::active_kernel().name()
                );
                measure::run(&Plan::from_environment())
            })
        }

        /// Asserts the docs/numerics.md target of every (dtype, distribution) cell of `ops`, listing all
        /// failing cells with their worst input at once.
        fn assert_targets(ops: &[Op]) {
            let report = report();
            let failures = report.failures(ops);
            assert!(
                failures.is_empty(),
                "{} cell(s) above the docs/numerics.md target:\n{}",
                failures.len(),
                failures.join("\n")
            );
        }

        #[test]
        fn accuracy_matches_arbitrary_precision_oracle_logsumexp() {
            // f32/f16/bf16 input: f32 output ≤ 2 ulp. f64: ≤ 2κ ulp, κ the condition number of
            // m + log1p(s') (κ = 1 when the row max is ≥ 0).
            assert_targets(&[Op::LogSumExp]);
        }

        #[test]
        fn accuracy_matches_arbitrary_precision_oracle_log_softmax() {
            // Every entry, the max entry (−log1p(s'), tiny for confident rows) included.
            assert_targets(&[Op::LogSoftmax]);
        }

        #[test]
        fn accuracy_matches_arbitrary_precision_oracle_softmax() {
            assert_targets(&[Op::Softmax]);
        }

        #[test]
        fn accuracy_matches_arbitrary_precision_oracle_cross_entropy_loss() {
            // Per-row losses, tiny ones (even rows target the argmax) included.
            assert_targets(&[Op::CeLoss]);
        }

        #[test]
        fn accuracy_matches_arbitrary_precision_oracle_cross_entropy_grad() {
            assert_targets(&[Op::CeGrad]);
        }

        #[test]
        fn accuracy_matches_arbitrary_precision_oracle_cross_entropy_options() {
            // Label smoothing, class weights, z-loss, soft-capping and all of them together; failures
            // are listed per option variant (worst over all distributions) to pin them on one option.
            let failures = report().variant_failures();
            assert!(
                failures.is_empty(),
                "{} option variant(s) above the docs/numerics.md target:\n{}",
                failures.len(),
                failures.join("\n")
            );
        }

        /// `log1p(e^-30) = e^-30 − e^-60/2 + …` rounded to f64: CE([30, 0], target 0) and
        /// −log_softmax([30, 0])[0]. (`e^-30` alone, 9.357622968840175e-14, is 4.7e-14 too large
        /// relative: invisible in f32, 200 ulp in f64.)
        const TINY_LOSS_30: f64 = 9.357_622_968_839_737e-14;

        #[test]
        fn accuracy_matches_arbitrary_precision_oracle_tiny_losses() {
            // docs/numerics.md: with log(1 + s') instead of log1p(s') these come out 0 (PyTorch's answer).
            fn check<E: Element>(gap: f64) {
                let logits = [E::from_f64(gap), E::from_f64(0.0)];
                let x = [logits[0].to_f64(), logits[1].to_f64()];
                let exact = ExactRow::new(&x);
                let ce = exact.ce(&CeSpec {
                    target: Some(0),
                    ..CeSpec::default()
                });
                let opts = CrossEntropyOptions {
                    reduction: Reduction::None,
                    ..Default::default()
                };
                let out = lse::cross_entropy(&logits, 2, Targets::Classes(&[0]), &opts).unwrap();
                let loss: f64 = out.row_loss.unwrap()[0].into();
                let stat = <E::Stat as Element>::DTYPE;
                let err = ulp_error(loss, &ce.loss, stat);
                assert!(
                    err <= 2.0,
                    "{} CE([{gap}, 0], 0): expected {:e}, got {loss:e} ({err} ulp of {stat})",
                    E::DTYPE,
                    to_f64(&ce.loss)
                );
                let mut ls = [E::zero(); 2];
                lse::log_softmax(&logits, 2, &mut ls).unwrap();
                let bound = if E::DTYPE == DType::F16 || E::DTYPE == DType::BF16 {
                    1.0
                } else {
                    2.0
                };
                let err = ulp_error(ls[0].to_f64(), &exact.log_softmax(0), E::DTYPE);
                assert!(
                    err <= bound,
                    "{} log_softmax([{gap}, 0])[0]: expected {:e}, got {:e} ({err} ulp)",
                    E::DTYPE,
                    to_f64(&exact.log_softmax(0)),
                    ls[0].to_f64()
                );
            }
            // The example of docs/numerics.md, by value.
            let opts = CrossEntropyOptions {
                reduction: Reduction::None,
                ..Default::default()
            };
            let out =
                lse::cross_entropy(&[30.0f32, 0.0], 2, Targets::Classes(&[0]), &opts).unwrap();
            let loss = out.row_loss.unwrap()[0];
            let err = ulp_error(f64::from(loss), &big(TINY_LOSS_30), DType::F32);
            assert!(
                err <= 2.0,
                "f32 CE([30, 0], 0) = {loss:e}, want 9.3576e-14 ({err} ulp)"
            );
            for gap in [30.0, 60.0, 100.0] {
                check::<f32>(gap);
                check::<bf16>(gap);
                check::<f64>(gap);
            }
            // f16 logits: the loss is an f32 output, so even tiny f16 losses are measured in f32 ulps.
            for gap in [8.0, 11.0, 16.0] {
                check::<f16>(gap);
            }
            check::<f64>(700.0);
        }
    };
}
