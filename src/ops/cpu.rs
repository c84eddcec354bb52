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

/// A CPU storage of a float `dtype` from f64 values (rounded once).
pub(crate) fn from_f64(vals: Vec<f64>, dtype: DType) -> CpuStorage {
    match dtype {
        DType::F64 => CpuStorage::F64(vals),
        DType::F32 => CpuStorage::F32(vals.into_iter().map(|v| v as f32).collect()),
        DType::BF16 => CpuStorage::BF16(vals.into_iter().map(half::bf16::from_f64).collect()),
        DType::F16 => CpuStorage::F16(vals.into_iter().map(half::f16::from_f64).collect()),
        _ => unreachable!("float dtypes are checked by the public functions"),
    }
}
