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
