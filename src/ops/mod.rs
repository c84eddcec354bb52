//! Fused ops: one module per op, each with a public function, a candle
//! custom op whose `cpu_fwd` is the reference, the CUDA launch and backward.
pub mod adamw;
pub mod adapter;
mod cpu;
pub mod layer_norm;
pub mod mixout;
pub mod perturb;
pub mod sym_kl;

pub use adamw::{adamw_state, adamw_step, AdamWStep};
pub use layer_norm::layer_norm;
pub use mixout::{dropout, mixout, Rng};
pub use perturb::{
    ascent_step, noise_init, AscentStep, Granularity, Noise, Norm, Perturbation, StepMode,
};
pub use sym_kl::{kl, sym_kl, Reduction, SymKlGrad, SymKlOptions};

/// The dtype the ops (and the model's closed-form gradients) carry their
/// arithmetic in for tensors of `dtype`: f64 for f64, f32 for everything else.
pub fn wide_dtype(dtype: candle_core::DType) -> candle_core::DType {
    if dtype == candle_core::DType::F64 {
        candle_core::DType::F64
    } else {
        candle_core::DType::F32
    }
}
