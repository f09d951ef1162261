//! The `ndarray` entry points agree with the slice API, for any memory layout.
#![cfg(feature = "ndarray")]

use lse::{nd, CrossEntropyOptions, GradOutput, LseError, Targets};
use ndarray::{Array2, ShapeBuilder};

fn sample() -> Array2<f32> {
    Array2::from_shape_fn((3, 4), |(r, c)| {
        (r as f32 * 7.5 - c as f32 * 3.25).sin() * 40.0
    })
}

#[test]
fn standard_and_transposed_layouts_match_the_slice_api() {
    let x = sample();
    let flat: Vec<f32> = x.iter().copied().collect();
    let mut expected = vec![0f32; 12];
    lse::softmax(&flat, 4, &mut expected).unwrap();

    // A column-major copy of the same logical array takes the copying path.
    let mut fortran = Array2::<f32>::zeros((3, 4).f());
    fortran.assign(&x);
    assert!(fortran.as_slice().is_none());

    for input in [x.view(), fortran.view()] {
        let mut out = Array2::<f32>::zeros((3, 4));
        nd::softmax(input, out.view_mut()).unwrap();
        assert_eq!(out.iter().copied().collect::<Vec<_>>(), expected);
        // And a column-major output is written through a buffer.
        let mut out_f = Array2::<f32>::zeros((3, 4).f());
        nd::softmax(input, out_f.view_mut()).unwrap();
        assert_eq!(out_f, out);
    }

    let mut expected_log = vec![0f32; 12];
    lse::log_softmax(&flat, 4, &mut expected_log).unwrap();
    let mut out = Array2::<f32>::zeros((3, 4));
    nd::log_softmax(fortran.view(), out.view_mut()).unwrap();
    assert_eq!(out.iter().copied().collect::<Vec<_>>(), expected_log);

    let mut expected_lse = vec![0f32; 3];
    lse::logsumexp(&flat, 4, &mut expected_lse).unwrap();
    assert_eq!(
        nd::logsumexp(fortran.view()).unwrap().to_vec(),
        expected_lse
    );
}

#[test]
fn cross_entropy_matches_the_slice_api() {
    let x = sample();
    let flat: Vec<f32> = x.iter().copied().collect();
    let targets = [1i64, -100, 3];
    let options = CrossEntropyOptions {
        label_smoothing: 0.1,
        ..Default::default()
    };
    let mut expected_grad = vec![0f32; 12];
    let expected = lse::cross_entropy_with_grad(
        &flat,
        4,
        Targets::Classes(&targets),
        &options,
        GradOutput::Scalar(1.0),
        &mut expected_grad,
    )
    .unwrap();
    let mut grad = Array2::<f32>::zeros((3, 4).f());
    let got = nd::cross_entropy_with_grad(
        x.t().t(),
        Targets::Classes(&targets),
        &options,
        GradOutput::Scalar(1.0),
        grad.view_mut(),
    )
    .unwrap();
    assert_eq!(got, expected);
    assert_eq!(grad.iter().copied().collect::<Vec<_>>(), expected_grad);
    let forward = nd::cross_entropy(x.view(), Targets::Classes(&targets), &options).unwrap();
    assert_eq!(forward.loss, expected.loss);
}

#[test]
fn shape_mismatch_is_a_typed_error() {
    let x = sample();
    let mut out = Array2::<f32>::zeros((4, 3));
    let err = nd::softmax(x.view(), out.view_mut()).unwrap_err();
    assert_eq!(
        err,
        LseError::ShapeMismatch {
            what: "output",
            expected: [3, 4],
            actual: [4, 3]
        }
    );
    assert!(out.iter().all(|&v| v == 0.0), "nothing written on error");
}
