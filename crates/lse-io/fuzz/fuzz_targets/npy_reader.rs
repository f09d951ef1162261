//! The `.npy` reader on arbitrary bytes: it must never panic, never allocate more than the input
//! holds, and whatever it accepts must re-encode to a file that reads back the same.

#![no_main]

use libfuzzer_sys::fuzz_target;
use lse_io::layout::{move_axis_to_last, move_last_to_axis};
use lse_io::npy::{self, Bf16Descr, ReadOptions};
use lse_io::{Tensor, TensorData};

/// The tensor encoded as `.npy` (row-major), bf16 described as `style`.
fn encode(t: &Tensor, style: Bf16Descr) -> Vec<u8> {
    let shape = &t.shape;
    let bytes = match &t.data {
        TensorData::F64(v) => npy::encode(shape, v, style),
        TensorData::F32(v) => npy::encode(shape, v, style),
        TensorData::F16(v) => npy::encode(shape, v, style),
        TensorData::BF16(v) => npy::encode(shape, v, style),
        TensorData::Int(v) => npy::encode(shape, v, style),
    };
    bytes.expect("a tensor the reader returned fills its shape")
}

/// Moves every axis to the end and back: the identity.
fn axes_round_trip<T: Copy + PartialEq + core::fmt::Debug>(data: &[T], shape: &[usize]) {
    for axis in 0..shape.len() {
        let moved = move_axis_to_last(data, shape, axis).expect("data fills the shape");
        assert_eq!(moved.len(), data.len());
        let back = move_last_to_axis(&moved, shape, axis).expect("data fills the shape");
        assert!(back == data, "axis {axis} round trip");
    }
}

fuzz_target!(|bytes: &[u8]| {
    for void_as_bf16 in [false, true] {
        let Ok(array) = npy::parse(bytes, ReadOptions { void_as_bf16 }) else {
            continue;
        };
        let t = &array.tensor;
        let count: usize = t.shape.iter().product();
        assert_eq!(count, t.data.len(), "elements fill the shape");
        // Read -> write -> read -> write is a fixed point (compared as bytes, so NaN too).
        let style = Bf16Descr::of_descr(&array.header.descr).unwrap_or_default();
        let once = encode(t, style);
        let header = npy::parse_header(&once).expect("the writer writes a valid header");
        assert_eq!(header.data_offset % npy::ALIGNMENT, 0, "data aligned");
        let again = npy::parse(&once, ReadOptions { void_as_bf16: true })
            .expect("what the writer writes, the reader reads");
        assert_eq!(again.tensor.shape, t.shape);
        assert!(
            encode(&again.tensor, style) == once,
            "re-encoding is stable"
        );
        match &t.data {
            TensorData::Int(v) => axes_round_trip(v, &t.shape),
            TensorData::F16(v) => {
                axes_round_trip(&v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), &t.shape)
            }
            TensorData::F32(v) => {
                axes_round_trip(&v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), &t.shape)
            }
            _ => {}
        }
    }
});
