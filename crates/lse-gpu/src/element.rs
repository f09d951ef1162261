//! The storage dtypes: how a slice of elements becomes the `u32` words the kernels read.

use half::{bf16, f16};

use crate::kernels;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// An element type the GPU kernels store: `f32`, [`f16`](half::f16) and [`bf16`], with `f32`
/// arithmetic.
///
/// Every buffer goes to the device as `u32` words of bits (16-bit types two to a word, element
/// `2k` in the low half), so no device needs a 16-bit type of its own.
pub trait GpuElement: lse::Element<Stat = f32> + sealed::Sealed {
    /// The kernels' comptime code for this dtype.
    #[doc(hidden)]
    const CODE: u32;

    /// The bits of `values` as words.
    fn pack(values: &[Self]) -> Vec<u32>;

    /// The first `len` elements held in `words`.
    fn unpack(words: &[u32], len: usize) -> Vec<Self>;
}

impl GpuElement for f32 {
    const CODE: u32 = kernels::F32;

    fn pack(values: &[Self]) -> Vec<u32> {
        values.iter().map(|v| v.to_bits()).collect()
    }

    fn unpack(words: &[u32], len: usize) -> Vec<Self> {
        words[..len].iter().map(|&w| f32::from_bits(w)).collect()
    }
}

/// Two 16-bit patterns to a word, the first in the low half.
fn pack_halves(bits: impl ExactSizeIterator<Item = u16>) -> Vec<u32> {
    let mut words = vec![0u32; bits.len().div_ceil(2)];
    for (i, b) in bits.enumerate() {
        words[i / 2] |= u32::from(b) << ((i % 2) * 16);
    }
    words
}

fn unpack_halves(words: &[u32], len: usize) -> impl Iterator<Item = u16> + '_ {
    (0..len).map(|i| (words[i / 2] >> ((i % 2) * 16)) as u16)
}

impl GpuElement for f16 {
    const CODE: u32 = kernels::F16;

    fn pack(values: &[Self]) -> Vec<u32> {
        pack_halves(values.iter().map(|v| v.to_bits()))
    }

    fn unpack(words: &[u32], len: usize) -> Vec<Self> {
        unpack_halves(words, len).map(f16::from_bits).collect()
    }
}

impl GpuElement for bf16 {
    const CODE: u32 = kernels::BF16;

    fn pack(values: &[Self]) -> Vec<u32> {
        pack_halves(values.iter().map(|v| v.to_bits()))
    }

    fn unpack(words: &[u32], len: usize) -> Vec<Self> {
        unpack_halves(words, len).map(bf16::from_bits).collect()
    }
}

/// A storage dtype chosen at run time (a tensor another crate made): what [`GpuElement`] is at
/// compile time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageDType {
    /// `f32`, one to a word.
    F32,
    /// `f16`, two to a word.
    F16,
    /// `bf16`, two to a word.
    BF16,
}

impl StorageDType {
    /// The dtype of `E`.
    pub fn of<E: GpuElement>() -> Self {
        match E::CODE {
            kernels::F16 => Self::F16,
            kernels::BF16 => Self::BF16,
            _ => Self::F32,
        }
    }

    pub(crate) fn code(self) -> u32 {
        match self {
            Self::F32 => kernels::F32,
            Self::F16 => kernels::F16,
            Self::BF16 => kernels::BF16,
        }
    }

    /// Words holding `len` elements.
    pub fn words(self, len: usize) -> usize {
        match self {
            Self::F32 => len,
            Self::F16 | Self::BF16 => len.div_ceil(2),
        }
    }

    /// Element `index` of `words`, widened (NaN when `words` is too short).
    pub(crate) fn value(self, words: &[u32], index: usize) -> f64 {
        let word = |i: usize| words.get(i).copied();
        let half = |i: usize| word(i / 2).map(|w| (w >> ((i % 2) * 16)) as u16);
        let value = match self {
            Self::F32 => word(index).map(|w| f64::from(f32::from_bits(w))),
            Self::F16 => half(index).map(|b| f16::from_bits(b).to_f64()),
            Self::BF16 => half(index).map(|b| bf16::from_bits(b).to_f64()),
        };
        value.unwrap_or(f64::NAN)
    }
}
