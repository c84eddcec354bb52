//! Fused ops: one module per op, each with a public function, a candle
//! custom op whose `cpu_fwd` is the reference, the CUDA launch and backward.
pub mod adamw;
pub mod adapter;
pub mod attention;
mod cpu;
pub mod grad_reverse;
pub mod layer_norm;
pub mod mixout;
pub mod perturb;
pub mod self_attention;
pub mod sym_kl;

pub use adamw::{adamw_state, adamw_step, AdamWStep};
pub use attention::attention_probs;
pub use grad_reverse::{dann_lambda, grad_reverse};
pub use layer_norm::layer_norm;
pub use mixout::{dropout, dropout_add, mixout, Rng};
pub use perturb::{
    ascent_step, noise_init, AscentStep, Granularity, Noise, Norm, Perturbation, StepMode,
};
pub use self_attention::self_attention;
pub use sym_kl::{kl, sym_kl, Reduction, SymKlGrad, SymKlOptions};

/// The address of a tensor's storage: equal for views of one allocation
/// (an operand that an in-place op must not share, the buffers a CUDA
/// graph's inputs are written into).
pub(crate) fn storage_addr(t: &candle_core::Tensor) -> usize {
    let (s, _) = t.storage_and_layout();
    &*s as *const candle_core::Storage as usize
}

/// The dtype the ops (and the model's closed-form gradients) carry their
/// arithmetic in for tensors of `dtype`: f64 for f64, f32 for everything else.
pub fn wide_dtype(dtype: candle_core::DType) -> candle_core::DType {
    if dtype == candle_core::DType::F64 {
        candle_core::DType::F64
    } else {
        candle_core::DType::F32
    }
}

/// `copy ← master` converted to the copy's dtype, for every pair, in place
/// (mixed precision's weight copies, `crate::model::Stream`): one launch
/// for all of them on CUDA, a cast and a copy per pair otherwise. A pair
/// `(master, copy, Some(r))` writes the master into the copy's rows from
/// `r` on (a copy packed for a fused layer); `None`, the whole copy.
pub fn cast_into(
    pairs: &[(&candle_core::Tensor, &candle_core::Var, Option<usize>)],
) -> crate::Result<()> {
    #[cfg(feature = "cuda")]
    {
        // Each master's part of its copy, as a view.
        let views = pairs
            .iter()
            .map(|(m, c, r)| match r {
                None => Ok(c.as_tensor().clone()),
                Some(r) => c.narrow(0, *r, m.dim(0)?),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let ts: Vec<_> = pairs
            .iter()
            .zip(&views)
            .map(|((m, _, _), c)| (*m, c))
            .collect();
        if adamw::multi::cast_multi(&ts)? {
            return Ok(());
        }
    }
    for (master, copy, row) in pairs {
        let value = master.detach().to_dtype(copy.dtype())?;
        match row {
            None => copy.set(&value)?,
            Some(r) => copy.as_tensor().slice_set(&value, 0, *r)?,
        }
    }
    Ok(())
}
