//! CPU-storage helpers shared by the reference implementations.
use candle_core::{CpuStorage, DType, Layout, WithDType};

/// The elements of a contiguous layout; an error naming the strides otherwise.
pub(crate) fn contiguous<'a, T: WithDType>(v: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("input must be contiguous, got strides {:?}", l.stride()),
    }
}

/// A float storage's elements as f64.
pub(crate) fn to_f64(s: &CpuStorage, l: &Layout) -> candle_core::Result<Vec<f64>> {
    fn conv<T: WithDType>(v: &[T], l: &Layout) -> candle_core::Result<Vec<f64>> {
        Ok(contiguous(v, l)?.iter().map(|x| x.to_f64()).collect())
    }
    match s {
        CpuStorage::F32(v) => conv(v, l),
        CpuStorage::F64(v) => conv(v, l),
        CpuStorage::BF16(v) => conv(v, l),
        CpuStorage::F16(v) => conv(v, l),
        CpuStorage::U8(v) => conv(v, l),
        CpuStorage::U32(v) => conv(v, l),
        CpuStorage::I64(v) => conv(v, l),
        _ => candle_core::bail!("unsupported dtype for a CPU reference"),
    }
}

/// An f32 / bf16 / f16 storage's elements as f32 (exact): the arithmetic
/// type of the ops whose reference computes in f32 below f64.
pub(crate) fn to_f32(s: &CpuStorage, l: &Layout) -> candle_core::Result<Vec<f32>> {
    Ok(match s {
        CpuStorage::F32(v) => contiguous(v, l)?.to_vec(),
        CpuStorage::BF16(v) => contiguous(v, l)?.iter().map(|x| x.to_f32()).collect(),
        CpuStorage::F16(v) => contiguous(v, l)?.iter().map(|x| x.to_f32()).collect(),
        other => candle_core::bail!(
            "expected f32, bf16 or f16, got {:?}",
            candle_core::backend::BackendStorage::dtype(other)
        ),
    })
}

/// A CPU storage of a float `dtype` from f64 values, each rounded once to
/// nearest-even, as the kernels' `__float2bfloat16_rn` / `__float2half_rn`
/// round their f32 results (an f32 value passes through unchanged).
///
/// Not `half::{bf16, f16}::from_f64`: half 2.7 drops the low 32 bits of the
/// f64 before rounding, so a value just above a tie (e.g. the f32
/// 1 + 2⁻⁸ + 2⁻²³) rounds down to even, one unit off. The GPU run of
/// 2026-11-26 found it as bf16 mixout and noise differing from the kernels.
pub(crate) fn from_f64(vals: Vec<f64>, dtype: DType) -> CpuStorage {
    match dtype {
        DType::F64 => CpuStorage::F64(vals),
        DType::F32 => CpuStorage::F32(vals.into_iter().map(|v| v as f32).collect()),
        DType::BF16 => CpuStorage::BF16(vals.into_iter().map(bf16_rn).collect()),
        DType::F16 => CpuStorage::F16(vals.into_iter().map(f16_rn).collect()),
        _ => unreachable!("float dtypes are checked by the public functions"),
    }
}

/// `x` rounded once to bf16, nearest-even.
pub(crate) fn bf16_rn(x: f64) -> half::bf16 {
    half::bf16::from_f32(round_to_odd_f32(x))
}

/// `x` rounded once to f16, nearest-even.
pub(crate) fn f16_rn(x: f64) -> half::f16 {
    half::f16::from_f32(round_to_odd_f32(x))
}

/// `x` as f32 rounded to odd: an exact value is kept, an inexact one becomes
/// its truncation with the last bit set. Rounding that to nearest-even in a
/// format with at least two fewer significand bits (bf16: 8, f16: 11, against
/// f32's 24, subnormals included) gives the same result as rounding `x`
/// directly (Boldo & Melquiond, "Emulation of FMA and correctly rounded sums:
/// proved algorithms using rounding to odd", 2008).
fn round_to_odd_f32(x: f64) -> f32 {
    let r = x as f32;
    if !r.is_finite() || r as f64 == x {
        return r; // NaN, beyond f32's range (bf16 and f16 overflow too), or exact
    }
    // Sign-magnitude bits: one step down the bit pattern is one ulp towards 0.
    let t = if (r as f64).abs() > x.abs() {
        r.to_bits() - 1
    } else {
        r.to_bits()
    };
    f32::from_bits(t | 1)
}

#[cfg(test)]
mod tests {
    use super::{bf16_rn, f16_rn};

    /// The nearest of the two neighbours in the format (ties to the even
    /// pattern), found by bisection over the ordered bit patterns.
    /// `x` > 0 below the format's largest finite value, `max` its pattern.
    fn nearest<T: Copy>(x: f64, max: u16, from_bits: fn(u16) -> T, to: fn(T) -> f64) -> u16 {
        let (mut lo, mut hi) = (0u16, max);
        if x >= to(from_bits(hi)) {
            return hi; // not reached: the values stay below the maximum
        }
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if to(from_bits(mid)) <= x {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let (a, b) = (to(from_bits(lo)), to(from_bits(hi)));
        match (x - a).partial_cmp(&(b - x)).unwrap() {
            std::cmp::Ordering::Less => lo,
            std::cmp::Ordering::Greater => hi,
            std::cmp::Ordering::Equal => {
                if lo % 2 == 0 {
                    lo
                } else {
                    hi
                }
            }
        }
    }

    #[test]
    fn rounding_from_f64_is_correct() {
        // Deterministic values over many binades, incl. near-ties built by
        // adding a tiny sticky part to midpoints.
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut checked = 0;
        for i in 0..200_000 {
            let m = (next() >> 11) as f64 / (1u64 << 53) as f64 + 1.0;
            let e = (next() % 60) as i32 - 40;
            let mut x = m * 2f64.powi(e);
            if i % 3 == 0 {
                // a bf16 / f16 midpoint plus or minus a sliver
                let b = half::bf16::from_f64(x).to_f64();
                let up = f64::from_bits(b.to_bits() + (1u64 << 45));
                x = (b + up) / 2.0 + if i % 2 == 0 { 1e-9 * b } else { -1e-9 * b };
            }
            let bf = nearest(x, 0x7f7f, half::bf16::from_bits, half::bf16::to_f64);
            assert_eq!(bf16_rn(x).to_bits(), bf, "bf16 of {x:e}");
            assert_eq!(bf16_rn(-x).to_bits(), bf | 0x8000, "bf16 of {:e}", -x);
            if x < 65504.0 {
                let h = nearest(x, 0x7bff, half::f16::from_bits, half::f16::to_f64);
                assert_eq!(f16_rn(x).to_bits(), h, "f16 of {x:e}");
                checked += 1;
            }
        }
        assert!(checked > 100_000);
        // The case half's from_f64 gets wrong: just above a bf16 tie.
        let x = 1.0 + 2f64.powi(-8) + 2f64.powi(-23);
        assert_eq!(bf16_rn(x).to_f64(), 1.0 + 2f64.powi(-7));
        assert_eq!(
            half::bf16::from_f64(x).to_f64(),
            1.0,
            "half 2.7's behaviour"
        );
    }
}
