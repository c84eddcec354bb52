//! Philox4x32-10 (Salmon et al., SC'11), the counter-based RNG behind mixout,
//! dropout and the perturbation noise. The CPU code here and
//! `kernels/common.cuh` produce the same bits for the same (seed, offset).
//!
//! Mapping used by every op: element `i` of a call takes word `i % 4` of the
//! block for counter `offset + i / 4` (a 64-bit number in counter words 0–1,
//! words 2–3 zero) under key `(seed as u32, (seed >> 32) as u32)`. A caller
//! that makes several calls with one seed advances `offset` by
//! [`counters_for`]`(n)` per call so no bits are reused.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Philox4x32 with 10 rounds: counter and key to four random words.
pub fn philox4x32_10(mut c: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut k0, mut k1) = (key[0], key[1]);
    for _ in 0..10 {
        let p0 = u64::from(M0) * u64::from(c[0]);
        let p1 = u64::from(M1) * u64::from(c[2]);
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0];
        k0 = k0.wrapping_add(W0);
        k1 = k1.wrapping_add(W1);
    }
    c
}

/// The four words for group `g` (elements `4g..4g+3`) of a call.
pub fn group(seed: u64, offset: u64, g: u64) -> [u32; 4] {
    let c = offset.wrapping_add(g);
    philox4x32_10(
        [c as u32, (c >> 32) as u32, 0, 0],
        [seed as u32, (seed >> 32) as u32],
    )
}

/// The random word of element `i`.
pub fn word(seed: u64, offset: u64, i: u64) -> u32 {
    group(seed, offset, i / 4)[(i % 4) as usize]
}

/// Counter values one call over `n` elements consumes.
pub fn counters_for(n: usize) -> u64 {
    n.div_ceil(4) as u64
}

/// Integer threshold for "keep with probability 1 − p": an element is kept
/// when `(word >> 8) >= keep_threshold(p)`. Exact on CPU and GPU.
pub fn keep_threshold(p: f64) -> u32 {
    (p * (1u64 << 24) as f64).ceil() as u32
}

/// Whether element `i` is kept (mask value 1).
pub fn keep(seed: u64, offset: u64, i: u64, threshold: u32) -> bool {
    kept(word(seed, offset, i), threshold)
}

/// The keep rule on a drawn word: its top 24 bits against the threshold.
pub fn kept(word: u32, threshold: u32) -> bool {
    (word >> 8) >= threshold
}

/// Fills `out` with the words of elements `first..first + out.len()` of a
/// call (`first` a multiple of 4): one Philox block per four elements, where
/// [`word`] computes a block per element.
pub fn fill_words(seed: u64, offset: u64, first: u64, out: &mut [u32]) {
    debug_assert!(first.is_multiple_of(4), "fill_words: first = {first}");
    for (g, chunk) in out.chunks_mut(4).enumerate() {
        let w = group(seed, offset, first / 4 + g as u64);
        chunk.copy_from_slice(&w[..chunk.len()]);
    }
}

/// Uniform in [0, 1) with 24 random bits: exactly `(word >> 8) · 2⁻²⁴`.
pub fn uniform(w: u32) -> f32 {
    (w >> 8) as f32 * (1.0 / (1u32 << 24) as f32)
}
