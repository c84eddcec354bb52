//! Building blocks with the hooks robust fine-tuning needs: a dense layer
//! that can be frozen, mixed out towards its pretrained weight, or given a
//! LoRA delta; bottleneck adapters (both through the adapter op: the fused
//! kernels on CUDA, candle's gemm on the CPU); LayerNorm; and the per-model
//! random stream for dropout and mixout.
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use candle_core::{DType, Tensor, TensorId, Var};
use candle_nn::{Init, VarBuilder};

use super::config::Activation;
use crate::ops::adapter::{adapter_fast, Act, AdapterWeights};
use crate::ops::mixout::{dropout, dropout_add, mixout, Rng};
use crate::philox;
use crate::Result;

/// Train/eval mode and the Philox stream that dropout and mixout draw from:
/// every call takes fresh counters, so a run is reproducible from its seed.
#[derive(Debug)]
pub struct Stream {
    train: Cell<bool>,
    seed: Cell<u64>,
    offset: Cell<u64>,
    /// Activation dtype (mixed precision: bf16 activations over f32 master
    /// weights); `None` = the weights' dtype.
    compute: Cell<Option<DType>>,
    /// Mixed precision's weight copies in the compute dtype, by master
    /// weight (see [`Stream::compute_weight`]); `None` when turned off.
    shadows: RefCell<Option<HashMap<TensorId, Shadow>>>,
    /// Copies a packed copy replaced ([`Stream::compute_packed`]): a
    /// forward made earlier in the same step may have used them, so the
    /// next [`Stream::route_grads`] still files their gradients, then
    /// drops them.
    retired: RefCell<Vec<Shadow>>,
    /// Off inside [`Stream::without_weight_grads`].
    weight_grads: Cell<bool>,
    /// Whether layers use the fused activation and attention-probability
    /// ops; `None`: on CUDA only (see [`Stream::set_fused_ops`]).
    fused: Cell<Option<bool>>,
    /// Where a training step's draws start, in device memory on CUDA
    /// ([`Stream::begin_step`]).
    anchor: RefCell<StepAnchor>,
    /// Counts the changes to the set of weight copies (one made, packed or
    /// dropped): see [`Stream::copies_generation`].
    copies_generation: Cell<u64>,
}

/// A training step's Philox start held in device memory on CUDA (see
/// `cuda::PhiloxAnchor`, with the `cuda` feature): between [`StepAnchor::begin`] and
/// [`StepAnchor::end`] the draws keyed by the seed pass offsets relative to
/// the step's start, so that their kernels' arguments repeat at every step
/// of one shape (what a captured CUDA graph replays); the draws are the
/// same. On other devices it does nothing.
#[derive(Debug, Default)]
pub struct StepAnchor {
    #[cfg(feature = "cuda")]
    inner: Option<crate::cuda::PhiloxAnchor>,
}

impl StepAnchor {
    /// Starts a step on `device` whose draws keyed by `rng.seed` begin at
    /// `rng.offset`.
    pub fn begin(&mut self, device: &candle_core::Device, rng: Rng) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let candle_core::Device::Cuda(dev) = device {
            if self.inner.is_none() {
                self.inner = Some(crate::cuda::PhiloxAnchor::new(dev)?);
            }
            let a = self.inner.as_mut().expect("set above");
            a.begin(rng.seed, rng.offset)?;
        }
        #[cfg(not(feature = "cuda"))]
        let _ = (device, rng);
        Ok(())
    }

    /// Ends the step, whose draws reached `rng.offset` (one launch on
    /// CUDA, which moves the device counter past them).
    pub fn end(&mut self, rng: Rng) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(a) = self.inner.as_mut() {
            a.end(rng.offset)?;
        }
        #[cfg(not(feature = "cuda"))]
        let _ = rng;
        Ok(())
    }

    /// A step that a replayed CUDA graph runs on `device`, starting at
    /// `rng` and drawing `draws` counters as the step it was captured from
    /// did: begun as any step, then ended with only the host's record
    /// moving (the graph moves the device counter itself). Returns where
    /// the stream stands after it.
    pub fn replayed(&mut self, device: &candle_core::Device, rng: Rng, draws: u64) -> Result<Rng> {
        self.begin(device, rng)?;
        let after = Rng {
            offset: rng.offset + draws,
            ..rng
        };
        #[cfg(feature = "cuda")]
        if let Some(a) = self.inner.as_mut() {
            a.end_replayed(after.offset)?;
        }
        Ok(after)
    }
}

/// Restores weight gradients when dropped ([`Stream::without_weight_grads`]).
pub struct WeightGradsOff<'a> {
    stream: &'a Stream,
    was: bool,
}

impl Drop for WeightGradsOff<'_> {
    fn drop(&mut self) {
        self.stream.weight_grads.set(self.was);
    }
}

/// A master weight and its copy in the compute dtype.
#[derive(Debug)]
pub struct Shadow {
    /// The f32 master weight the optimiser updates.
    pub master: Tensor,
    /// Its copy in the compute dtype, refreshed after each step: of this
    /// master alone, or packed with other masters' copies (see `row`).
    pub copy: Var,
    /// `Some(r)`: the copy is shared by the masters of a fused layer
    /// ([`Stream::compute_packed`]), stacked along dimension 0, and this
    /// master's copy is its rows from `r` on.
    pub row: Option<usize>,
}

impl Shadow {
    /// This master's copy: the copy, or its rows of a packed one (a view).
    pub fn view(&self) -> Result<Tensor> {
        let t = self.copy.as_tensor();
        Ok(match self.row {
            None => t.clone(),
            Some(r) => t.narrow(0, r, self.master.dim(0)?)?,
        })
    }
}

impl Stream {
    /// A stream in evaluation mode, f32, drawing from `seed` at offset 0.
    pub fn new(seed: u64) -> Self {
        Self {
            train: Cell::new(false),
            seed: Cell::new(seed),
            offset: Cell::new(0),
            compute: Cell::new(None),
            shadows: RefCell::new(None),
            retired: RefCell::new(Vec::new()),
            weight_grads: Cell::new(true),
            copies_generation: Cell::new(0),
            fused: Cell::new(None),
            anchor: RefCell::new(StepAnchor::default()),
        }
    }

    /// Whether the layers use the fused ops ([`crate::ops::adapter::activation`],
    /// [`crate::ops::attention_probs`]) or the compositions of candle's ops
    /// they replace. By default (`None`) the fused ops on CUDA, where they
    /// save about a dozen launches per layer, and the compositions on the
    /// CPU, where the fused ops' reference implementations (per element, f32
    /// or f64) train about 9 % slower than candle's vectorised ops and the
    /// results stay those of earlier versions. `Some(true)` forces the fused
    /// ops (the tests compare the two on the CPU).
    pub fn set_fused_ops(&self, on: Option<bool>) {
        self.fused.set(on)
    }

    /// Whether the fused ops apply to `x` (see [`Stream::set_fused_ops`]):
    /// chosen for its device, and with a kernel for its dtype (every dtype
    /// on the CPU; f32, bf16, f16 on CUDA).
    pub fn fused_for(&self, x: &Tensor) -> bool {
        let cuda = x.device().is_cuda();
        let kernel = !cuda || x.dtype() != DType::F64;
        self.fused.get().unwrap_or(cuda) && kernel
    }

    /// Until the guard is dropped, the layers use their weights detached:
    /// a backward pass through forwards made meanwhile computes gradients
    /// for the inputs only (SMART's ascent needs the perturbation's
    /// gradient, not the weights': their GEMMs, bias and LayerNorm
    /// reductions are skipped). The values are unchanged.
    pub fn without_weight_grads(&self) -> WeightGradsOff<'_> {
        let was = self.weight_grads.replace(false);
        WeightGradsOff { stream: self, was }
    }

    /// Whether layers let gradients reach their weights (see
    /// [`Stream::without_weight_grads`]).
    pub fn weight_grads(&self) -> bool {
        self.weight_grads.get()
    }

    /// `w` as a layer uses it: detached when it is `frozen` or weight
    /// gradients are off.
    fn use_weight(&self, w: Tensor, frozen: bool) -> Tensor {
        if frozen || !self.weight_grads() {
            w.detach()
        } else {
            w
        }
    }
    /// Sets the activation dtype (e.g. bf16 on CUDA with f32 weights), and
    /// whether weights keep a copy in it ([`Stream::compute_weight`]).
    pub fn set_compute_dtype(&self, dtype: Option<DType>, shadows: bool) {
        self.compute.set(dtype);
        *self.shadows.borrow_mut() = (dtype.is_some() && shadows).then(HashMap::new);
        self.copies_changed();
        self.retired.borrow_mut().clear();
    }

    /// Weight `w` (a master weight as the layer holds it) in dtype `dt`.
    ///
    /// Under mixed precision every use of an f32 weight needs it in bf16.
    /// Cast per use, that is one cast kernel per weight in the forward and
    /// one for its gradient (bf16 back to f32) in the backward, every step.
    /// With shadows on, the weight instead gets a persistent bf16 copy, a
    /// variable of its own, made here on first use: the forward reads the
    /// copy, the backward leaves the weight's gradient (bf16, exactly the
    /// value the cast's backward would widen) on the copy, and
    /// [`Stream::route_grads`] files it under the master. The optimiser
    /// rewrites the copy from the new master in the same pass
    /// (`crate::ops::adamw::multi`), so the copy stays `bf16(master)`.
    ///
    /// The one rule: whatever writes a master weight other than the
    /// optimiser (loading a checkpoint, swapping in other values) calls
    /// [`Stream::refresh_shadows`] before the next forward.
    ///
    /// Within one backward pass, the gradients of two uses of a weight sum
    /// in bf16 on the copy (as PyTorch's autocast sums them on its cached
    /// cast), where per-use casts summed them in f32; with one use per
    /// backward (vanilla, adapters, LoRA) the result is bit-identical.
    pub fn compute_weight(&self, w: &Tensor, dt: DType) -> Result<Tensor> {
        if w.dtype() == dt {
            return Ok(w.clone());
        }
        let mut guard = self.shadows.borrow_mut();
        let Some(map) = guard.as_mut() else {
            return Ok(w.to_dtype(dt)?);
        };
        // Only variables (master weights) have copies: a computed weight
        // (mixout's mix) is cast per use.
        if !w.is_variable() {
            return Ok(w.to_dtype(dt)?);
        }
        if let Some(s) = map.get(&w.id()) {
            if s.copy.dtype() == dt {
                return s.view();
            }
            return Ok(w.to_dtype(dt)?);
        }
        let copy = Var::from_tensor(&w.detach().to_dtype(dt)?)?;
        let out = copy.as_tensor().clone();
        map.insert(
            w.id(),
            Shadow {
                master: w.clone(),
                copy,
                row: None,
            },
        );
        self.copies_changed();
        Ok(out)
    }

    /// Master weights `ws` (equal sizes past dimension 0) stacked along
    /// dimension 0 in dtype `dt`: the weight of a fused layer, e.g. the
    /// query, key and value projections as one GEMM ([`fused_forward`]).
    ///
    /// With weight copies on ([`Stream::compute_weight`]) the stack is one
    /// persistent copy whose rows are the masters' copies: the optimiser
    /// rewrites each master's rows in place, the backward leaves one
    /// gradient for the stack, and [`Stream::route_grads`] files its rows
    /// under the masters (views, no copy). Nothing is concatenated per
    /// step. Masters that had copies of their own lose them to the stack
    /// (a later single use reads its rows). Otherwise (no copies, or a
    /// weight not a variable) the weights are concatenated per call.
    pub fn compute_packed(&self, ws: &[&Tensor], dt: DType) -> Result<Tensor> {
        let packable = ws.iter().all(|w| w.is_variable() && w.dtype() != dt);
        let mut guard = self.shadows.borrow_mut();
        let map = match guard.as_mut() {
            Some(map) if packable && !ws.is_empty() => map,
            _ => {
                drop(guard);
                let parts = ws
                    .iter()
                    .map(|w| self.compute_weight(w, dt))
                    .collect::<Result<Vec<_>>>()?;
                return Ok(Tensor::cat(&parts, 0)?);
            }
        };
        // Already packed, in this order and dtype: each master's rows of
        // the first master's copy, which they fill exactly.
        let rows = |w: &Tensor| w.dims().first().copied().unwrap_or(0);
        let packed = map
            .get(&ws[0].id())
            .filter(|s| s.row == Some(0) && s.copy.dtype() == dt)
            .map(|s| s.copy.as_tensor().clone());
        if let Some(c) = packed {
            let mut row = 0;
            let hit = ws.iter().all(|w| {
                let at = row;
                row += rows(w);
                map.get(&w.id())
                    .is_some_and(|s| s.row == Some(at) && s.copy.as_tensor().id() == c.id())
            });
            if hit && c.dims().first() == Some(&row) {
                return Ok(c);
            }
        }
        let parts = ws
            .iter()
            .map(|w| w.detach().to_dtype(dt))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let copy = Var::from_tensor(&Tensor::cat(&parts, 0)?)?;
        let mut row = 0;
        let mut retired = self.retired.borrow_mut();
        for w in ws {
            let old = map.insert(
                w.id(),
                Shadow {
                    master: (*w).clone(),
                    copy: copy.clone(),
                    row: Some(row),
                },
            );
            retired.extend(old);
            row += rows(w);
        }
        self.copies_changed();
        Ok(copy.as_tensor().clone())
    }

    fn copies_changed(&self) {
        self.copies_generation.set(self.copies_generation.get() + 1);
    }

    /// A number that changes whenever a weight copy is made, packed with
    /// others or dropped. The optimiser rewrites the copies that exist when
    /// it plans its step; a captured CUDA graph repeats the plan it was
    /// captured with, so it is stale once this number moves (a copy made
    /// by an evaluation, a fused layer's weights packed by a shape that
    /// first took the fused path).
    pub fn copies_generation(&self) -> u64 {
        self.copies_generation.get()
    }

    /// The compute-dtype copy of master weight `master`, if it has one
    /// (a view of a packed copy for a fused layer's weight).
    pub fn shadow_of(&self, master: &Tensor) -> Option<Tensor> {
        let guard = self.shadows.borrow();
        let s = guard.as_ref()?.get(&master.id())?;
        s.view().ok()
    }

    /// Rewrites every copy from its master (after a write to the masters
    /// other than the optimiser's step).
    pub fn refresh_shadows(&self) -> Result<()> {
        let guard = self.shadows.borrow();
        let Some(map) = guard.as_ref() else {
            return Ok(());
        };
        let pairs: Vec<(&Tensor, &Var, Option<usize>)> =
            map.values().map(|s| (&s.master, &s.copy, s.row)).collect();
        crate::ops::cast_into(&pairs)
    }

    /// Moves the gradients that a backward pass left on weight copies to
    /// their master weights (added, in the master's dtype, to a gradient
    /// the master got directly). Call on every `GradStore` from a
    /// backward pass before reading parameter gradients from it.
    pub fn route_grads(&self, grads: &mut candle_core::backprop::GradStore) -> Result<()> {
        let guard = self.shadows.borrow();
        let Some(map) = guard.as_ref() else {
            return Ok(());
        };
        // A packed copy's gradient serves all its masters: removed after.
        let mut packed = Vec::new();
        let retired = std::mem::take(&mut *self.retired.borrow_mut());
        let entries = retired
            .iter()
            .map(|s| (s.master.id(), s))
            .chain(map.iter().map(|(id, s)| (*id, s)));
        for (id, s) in entries {
            let g = match s.row {
                None => grads.remove(s.copy.as_tensor()),
                Some(r) => {
                    let c = s.copy.as_tensor();
                    if !packed.iter().any(|p: &Tensor| p.id() == c.id()) {
                        packed.push(c.clone());
                    }
                    match grads.get(c) {
                        Some(g) => Some(g.narrow(0, r, s.master.dim(0)?)?),
                        None => None,
                    }
                }
            };
            let Some(g) = g else {
                continue;
            };
            let g = match grads.get_id(id) {
                None => g,
                Some(direct) => {
                    let dt = s.master.dtype();
                    (direct.to_dtype(dt)? + g.to_dtype(dt)?)?
                }
            };
            grads.insert_id(id, g);
        }
        for c in packed {
            grads.remove(&c);
        }
        Ok(())
    }

    /// The dtype activations are computed in (None: the weights' own, f32).
    pub fn compute_dtype(&self) -> Option<DType> {
        self.compute.get()
    }
    /// Whether the model is in training mode (dropout and mixout on).
    pub fn train(&self) -> bool {
        self.train.get()
    }
    /// Training mode on or off (`predict` turns it off, MC dropout on).
    pub fn set_train(&self, on: bool) {
        self.train.set(on)
    }
    /// The (seed, offset) position, for checkpoints.
    pub fn position(&self) -> Rng {
        Rng {
            seed: self.seed.get(),
            offset: self.offset.get(),
        }
    }
    /// Moves the stream to a saved position (resuming a checkpoint).
    pub fn set_position(&self, r: Rng) {
        self.seed.set(r.seed);
        self.offset.set(r.offset);
    }
    /// Starts a training step on `device`. On CUDA the step's draws then
    /// take their Philox start from a counter in device memory and pass
    /// offsets relative to it (`cuda::PhiloxAnchor`), so that
    /// their kernels' arguments repeat from one step to the next of the
    /// same shape (what a captured CUDA graph replays); the draws are the
    /// same. Elsewhere nothing changes.
    pub fn begin_step(&self, device: &candle_core::Device) -> Result<()> {
        self.anchor.borrow_mut().begin(device, self.position())
    }

    /// Ends the step begun by [`Stream::begin_step`] (one launch on CUDA
    /// that moves the device counter past the step's draws).
    pub fn end_step(&self) -> Result<()> {
        self.anchor.borrow_mut().end(self.position())
    }

    /// A step that a replayed CUDA graph runs on `device`, drawing `draws`
    /// counters as the step it was captured from did: the stream moves
    /// past them as if the step's draws had been taken here
    /// ([`StepAnchor::replayed`]).
    pub fn replayed_step(&self, device: &candle_core::Device, draws: u64) -> Result<()> {
        let after = self
            .anchor
            .borrow_mut()
            .replayed(device, self.position(), draws)?;
        self.offset.set(after.offset);
        Ok(())
    }

    /// The stream for one call over `n` elements.
    pub fn take(&self, n: usize) -> Rng {
        let r = self.position();
        self.offset.set(r.offset + philox::counters_for(n));
        r
    }
    /// Dropout with probability `p` in train mode; identity otherwise.
    pub fn dropout(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        if !self.train() || p == 0.0 {
            return Ok(x.clone());
        }
        dropout(x, p, self.take(x.elem_count()), true)
    }

    /// `dropout(x, p) + r` with [`Stream::dropout`]'s draws, in one op
    /// ([`crate::ops::dropout_add`], equal bit for bit to the two composed);
    /// `x + r` outside train mode or for p = 0.
    pub fn dropout_add(&self, x: &Tensor, r: &Tensor, p: f64) -> Result<Tensor> {
        if !self.train() || p == 0.0 {
            return Ok((x + r)?);
        }
        dropout_add(x, r, p, self.take(x.elem_count()), true)
    }

    /// The attention probabilities `softmax(scores·scale + bias)` with
    /// [`Stream::dropout`]'s dropout (the same draws): in one op
    /// ([`crate::ops::attention_probs`]) where the stream uses fused ops,
    /// else composed (the scale, the mask add, [`softmax_last_dim`],
    /// dropout).
    pub fn attention_probs(
        &self,
        scores: &Tensor,
        bias: &Tensor,
        scale: f64,
        p: f64,
    ) -> Result<Tensor> {
        if !self.fused_for(scores) {
            let probs = softmax_last_dim(&(scores * scale)?.broadcast_add(bias)?)?;
            return self.dropout(&probs, p);
        }
        let drop = (self.train() && p != 0.0).then(|| (p, self.take(scores.elem_count())));
        crate::ops::attention_probs(scores, bias, scale, drop)
    }

    /// Multi-head attention `dropout(softmax(q·kᵀ·scale + bias))·v` on the
    /// Self-attention of `x` `[B, L, H_in]` through its query, key and
    /// value layers in one op ([`crate::ops::self_attention()`]), with the
    /// dropout draws of [`Stream::attention_probs`] on the `[B, heads, L,
    /// L]` scores; `None` where the stream does not use fused ops or the
    /// sequence does not fit the op's CUDA kernels
    /// ([`crate::ops::self_attention::fits`]): the caller then composes it.
    ///
    /// Where the three layers can run as one ([`fused_forward`]: no LoRA,
    /// no mixout in training, frozen alike) they do, and the op reads their
    /// packed `[B, L, 3H]` output
    /// ([`crate::ops::self_attention::self_attention_packed`]): one GEMM
    /// forward and two backward where three layers take three and six, and
    /// the gradient of `x` comes out of one GEMM instead of three GEMMs and
    /// two adds.
    pub fn self_attention(
        &self,
        layers: [&Dense; 3],
        x: &Tensor,
        bias: &Tensor,
        heads: usize,
        scale: f64,
        p: f64,
    ) -> Result<Option<Tensor>> {
        let (b, l, _) = x.dims3()?;
        let h = layers[0].weight.dim(0)?;
        if !self.fused_for(x) || heads == 0 || !crate::ops::self_attention::fits(l, h / heads) {
            return Ok(None);
        }
        // Drawn after the projections: their mixout draws come first, on
        // either path.
        let drop = || (self.train() && p != 0.0).then(|| (p, self.take(b * heads * l * l)));
        // The packed op splits its input in three equal parts.
        let equal = layers.iter().all(|d| d.weight.dim(0).ok() == Some(h));
        let packed = if equal {
            fused_forward(&layers, x, self)?
        } else {
            None
        };
        if let Some(qkv) = packed {
            return Ok(Some(crate::ops::self_attention::self_attention_packed(
                &qkv,
                bias,
                heads,
                scale,
                drop(),
            )?));
        }
        let [q, k, v] = layers.map(|d| d.forward(x, self));
        let (q, k, v) = (q?, k?, v?);
        Ok(Some(crate::ops::self_attention(
            &q,
            &k,
            &v,
            bias,
            heads,
            scale,
            drop(),
        )?))
    }
}

/// Dense layers `ds` that take the same input, as one: `x·[W₁; W₂; …]ᵀ +
/// [b₁; b₂; …]`, their outputs side by side in the last dimension (the
/// weights stacked by [`Stream::compute_packed`]). The value of each part
/// is the layer's own (each output column is the same dot product); the
/// gradient of `x` sums the parts' contributions inside one GEMM. `None`
/// where the layers do not combine: a LoRA delta, mixout in training,
/// frozen and trainable mixed, a bias on some only, different input sizes.
pub fn fused_forward(ds: &[&Dense], x: &Tensor, s: &Stream) -> Result<Option<Tensor>> {
    let Some(first) = ds.first() else {
        return Ok(None);
    };
    let din = first.weight.dim(1)?;
    for d in ds {
        if d.lora.is_some()
            || (d.mixout.is_some() && s.train())
            || d.frozen != first.frozen
            || d.bias.is_some() != first.bias.is_some()
            || d.weight.rank() != 2
            || d.weight.dim(1)? != din
        {
            return Ok(None);
        }
    }
    let dt = x.dtype();
    let ws: Vec<&Tensor> = ds.iter().map(|d| &d.weight).collect();
    let w = s.use_weight(s.compute_packed(&ws, dt)?, first.frozen);
    let b = match ds
        .iter()
        .map(|d| d.bias.as_ref())
        .collect::<Option<Vec<_>>>()
    {
        Some(bs) => Some(s.use_weight(s.compute_packed(&bs, dt)?, first.frozen)),
        None => None,
    };
    Ok(Some(linear_on(x, &w, b.as_ref(), s)?))
}

/// `x·Wᵀ + b` over the last dimension of `x` (any leading shape), in the
/// dtype of `x`. When `W` and `b` take no gradient (a frozen layer: the
/// backbone under adapters or LoRA, gradual unfreezing, SMART's ascent
/// pass) but `x` does, the product is an op of `x` alone (`FrozenMatmul`)
/// whose backward computes `dx = g·W` only: candle's matmul backward would
/// also compute the weight's gradient (a second GEMM of the same size),
/// only to have it dropped.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    linear_impl(x, w, b, false)
}

/// [`linear`] as a layer on `s` runs it: where the stream uses fused ops, a
/// trainable product has its own backward too (`Matmul`), which writes the
/// weight's gradient in the weight's layout (`gᵀ·x`, `[out, in]`) where
/// candle's matmul backward writes the transpose's (`xᵀ·g`), which the
/// optimiser's multi-tensor kernels then copy: one layout copy saved per
/// layer and step.
pub fn linear_on(x: &Tensor, w: &Tensor, b: Option<&Tensor>, s: &Stream) -> Result<Tensor> {
    linear_impl(x, w, b, s.fused_for(x))
}

fn linear_impl(x: &Tensor, w: &Tensor, b: Option<&Tensor>, own_backward: bool) -> Result<Tensor> {
    let frozen = !w.track_op() && b.is_none_or(|b| !b.track_op());
    if !(frozen && x.track_op()) {
        return linear_value(x, w, b, own_backward);
    }
    let dims = x.dims().to_vec();
    let (din, dout) = (dims[dims.len() - 1], w.dim(0)?);
    let rows = x.elem_count() / din.max(1);
    if w.dims() != [dout, din] {
        return Err(crate::error::shape_err(
            "linear",
            format!("weight {:?} for inputs {:?}", w.dims(), dims),
        ));
    }
    if b.is_some_and(|b| b.dims() != [dout]) {
        return Err(crate::error::shape_err(
            "linear",
            format!("bias {:?} for {dout} outputs", b.map(|b| b.dims())),
        ));
    }
    // Cast once (mixed precision): the value and the backward share it.
    let w = w.to_dtype(x.dtype())?.contiguous()?;
    let b = b.map(|b| b.to_dtype(x.dtype())).transpose()?;
    let y = x.reshape((rows, din))?.apply_op1(FrozenMatmul(w, b))?;
    let mut out = dims;
    *out.last_mut().unwrap() = dout;
    Ok(y.reshape(out)?)
}

/// `x·Wᵀ` for `x` `[m, k]` and a weight `W` `[n, k]` on storages: the GEMM
/// of `x.matmul(&W.t())` (candle's storage-level matmul with W's
/// transposed layout).
fn gemm_xwt<S: candle_core::backend::BackendStorage>(
    x: &S,
    xl: &candle_core::Layout,
    w: &S,
    wl: &candle_core::Layout,
) -> candle_core::Result<(S, candle_core::Shape)> {
    let (m, k) = xl.shape().dims2()?;
    let n = wl.dims()[0];
    let y = x.matmul(w, (1, m, n, k), xl, &wl.transpose(0, 1)?)?;
    Ok((y, (m, n).into()))
}

/// `x·Wᵀ + b` on storages: [`gemm_xwt`], then candle's broadcast add of
/// `b` `[n]` when there is one (the ops of `x.matmul(&W.t())?.broadcast_add(b)`).
fn gemm_bias<S: candle_core::backend::BackendStorage>(
    x: (&S, &candle_core::Layout),
    w: (&S, &candle_core::Layout),
    b: Option<(&S, &candle_core::Layout)>,
) -> candle_core::Result<(S, candle_core::Shape)> {
    let (y, shape) = gemm_xwt(x.0, x.1, w.0, w.1)?;
    let Some((b, bl)) = b else {
        return Ok((y, shape));
    };
    let (m, n) = shape.dims2()?;
    let yl = candle_core::Layout::contiguous((m, n));
    let y = y.binary_impl::<candle_core::op::Add>(b, &yl, &bl.broadcast_as((m, n))?)?;
    Ok((y, shape))
}

/// [`gemm_bias`] on the GPU: with a bias and half-precision operands one
/// cuBLASLt GEMM whose epilogue adds the bias (`crate::cuda::linear_bias_lt`:
/// one launch instead of two, and one rounding of the biased sum), else the
/// GEMM and the add.
#[cfg(feature = "cuda")]
fn gemm_bias_cuda(
    x: (&candle_core::CudaStorage, &candle_core::Layout),
    w: (&candle_core::CudaStorage, &candle_core::Layout),
    b: Option<(&candle_core::CudaStorage, &candle_core::Layout)>,
) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
    if let Some(b) = b {
        if let Some(y) = crate::cuda::linear_bias_lt(x, w, b)? {
            let (m, n) = (x.1.dims()[0], w.1.dims()[0]);
            return Ok((y, (m, n).into()));
        }
    }
    gemm_bias(x, w, b)
}

/// `x·Wᵀ` for `x` `[m, k]` and a trainable weight `W` `[n, k]`: the value
/// of `x.matmul(&W.t())` bit for bit, and the backward `dx = g·W`,
/// `dW = gᵀ·x` (contiguous in W's layout).
struct Matmul;

impl candle_core::CustomOp2 for Matmul {
    fn name(&self) -> &'static str {
        "tunefuse-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        w: &candle_core::CpuStorage,
        wl: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        gemm_xwt(x, xl, w, wl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &candle_core::Layout,
        w: &candle_core::CudaStorage,
        wl: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        gemm_xwt(x, xl, w, wl)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.track_op().then(|| g.matmul(w)).transpose()?;
        let dw = w.track_op().then(|| g.t()?.matmul(x)).transpose()?;
        Ok((dx, dw))
    }
}

/// `x·Wᵀ + b` for `x` `[m, k]`, a trainable weight `W` `[n, k]` and bias
/// `b` `[n]` in one op: on the CPU the value of `x.matmul(&W.t())?
/// .broadcast_add(b)` bit for bit; on the GPU in half precision one GEMM
/// with the bias in its epilogue ([`gemm_bias_cuda`]). Backward: `dx = g·W`,
/// `dW = gᵀ·x` (in W's layout, as [`Matmul`]) and `db = Σ_rows g` (the sum
/// candle's broadcast add backward takes; on the GPU in half precision the
/// epilogue of dW's GEMM, [`linear_grads_cuda`]).
struct MatmulBias;

impl candle_core::CustomOp3 for MatmulBias {
    fn name(&self) -> &'static str {
        "tunefuse-matmul-bias"
    }

    fn cpu_fwd(
        &self,
        x: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        w: &candle_core::CpuStorage,
        wl: &candle_core::Layout,
        b: &candle_core::CpuStorage,
        bl: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        gemm_bias((x, xl), (w, wl), Some((b, bl)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &candle_core::Layout,
        w: &candle_core::CudaStorage,
        wl: &candle_core::Layout,
        b: &candle_core::CudaStorage,
        bl: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        gemm_bias_cuda((x, xl), (w, wl), Some((b, bl)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = x.track_op().then(|| g.matmul(w)).transpose()?;
        #[cfg(feature = "cuda")]
        if w.track_op() && b.track_op() {
            if let Some(p) = linear_grads_cuda(x, &g.contiguous()?)? {
                let nk = w.elem_count();
                let dw = p.narrow(0, 0, nk)?.reshape(w.shape())?;
                return Ok((dx, Some(dw), Some(p.narrow(0, nk, b.elem_count())?)));
            }
        }
        let dw = w.track_op().then(|| g.t()?.matmul(x)).transpose()?;
        let db = b.track_op().then(|| g.sum(0)).transpose()?;
        Ok((dx, dw, db))
    }
}

/// `[dW (n·k), db (n)]` of a dense layer for x `[m, k]` and the incoming
/// gradient g `[m, n]` from one cuBLASLt GEMM with the bias gradient in its
/// epilogue (`crate::cuda::linear_grads_lt`); `None` off the GPU or where
/// that does not apply (the caller composes `gᵀ·x` and `Σ_rows g`).
#[cfg(feature = "cuda")]
fn linear_grads_cuda(x: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let (xs, xl) = x.storage_and_layout();
    let (gs, gl) = g.storage_and_layout();
    let (candle_core::Storage::Cuda(xc), candle_core::Storage::Cuda(gc)) = (&*xs, &*gs) else {
        return Ok(None);
    };
    let Some(out) = crate::cuda::linear_grads_lt((xc, xl), (gc, gl))? else {
        return Ok(None);
    };
    let len = x.dim(1)? * g.dim(1)? + g.dim(1)?;
    Ok(Some(Tensor::from_storage(
        candle_core::Storage::Cuda(out),
        len,
        candle_core::op::BackpropOp::none(),
        false,
    )))
}

/// `x·Wᵀ + b` for `x` `[m, k]`, a weight `W` `[n, k]` and a bias `b` `[n]`
/// that take no gradient, as an op of `x` alone: the same GEMM and
/// broadcast add as `x.matmul(&W.t())?.broadcast_add(b)` (candle's
/// storage-level ops, with W's transposed and b's broadcast layouts; on the
/// GPU in half precision one GEMM with the bias in its epilogue,
/// [`gemm_bias_cuda`]), and a backward `dx = g·W` only.
struct FrozenMatmul(Tensor, Option<Tensor>);

impl FrozenMatmul {
    /// The product on `x`'s storage, `W`'s storage of the same backend
    /// taken out by `pick`.
    fn product<S: candle_core::backend::BackendStorage>(
        &self,
        x: &S,
        xl: &candle_core::Layout,
        pick: impl Fn(&candle_core::Storage) -> Option<&S>,
        gemm: impl Fn(
            (&S, &candle_core::Layout),
            (&S, &candle_core::Layout),
            Option<(&S, &candle_core::Layout)>,
        ) -> candle_core::Result<(S, candle_core::Shape)>,
    ) -> candle_core::Result<(S, candle_core::Shape)> {
        let (ws, wl) = self.0.storage_and_layout();
        let Some(w) = pick(&ws) else {
            candle_core::bail!("linear: the weight is on another device than the input")
        };
        let Some(bias) = &self.1 else {
            return gemm((x, xl), (w, wl), None);
        };
        let (bs, bl) = bias.storage_and_layout();
        let Some(b) = pick(&bs) else {
            candle_core::bail!("linear: the bias is on another device than the input")
        };
        gemm((x, xl), (w, wl), Some((b, bl)))
    }
}

impl candle_core::CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "tunefuse-frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        self.product(
            s,
            l,
            |st| match st {
                candle_core::Storage::Cpu(c) => Some(c),
                _ => None,
            },
            gemm_bias,
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        self.product(
            s,
            l,
            |st| match st {
                candle_core::Storage::Cuda(c) => Some(c),
                _ => None,
            },
            gemm_bias_cuda,
        )
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(g.matmul(&self.0)?))
    }
}

fn linear_value(x: &Tensor, w: &Tensor, b: Option<&Tensor>, own_backward: bool) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (din, dout) = (dims[dims.len() - 1], w.dim(0)?);
    let rows = x.elem_count() / din.max(1);
    // Weights are cast to the activations' dtype (a no-op unless mixed
    // precision keeps f32 master weights under bf16 activations).
    let x2 = x.reshape((rows, din))?;
    let w = w.to_dtype(x.dtype())?;
    let b = b.map(|b| b.to_dtype(x.dtype())).transpose()?;
    let y = match (own_backward && w.dims() == [dout, din], b) {
        (true, Some(b)) if b.dims() == [dout] => {
            x2.contiguous()?
                .apply_op3(&w.contiguous()?, &b.contiguous()?, MatmulBias)?
        }
        (true, None) => x2.contiguous()?.apply_op2(&w.contiguous()?, Matmul)?,
        (_, b) => {
            let y = x2.matmul(&w.t()?)?;
            match b {
                Some(b) => y.broadcast_add(&b)?,
                None => y,
            }
        }
    };
    let mut out = dims;
    *out.last_mut().unwrap() = dout;
    Ok(y.reshape(out)?)
}

/// Softmax over the last dimension, differentiable: the forward value is
/// candle's fused `softmax_last_dim` (one kernel, but no backward of its
/// own), and the backward is the closed form `dx = y·(g − Σ g·y)` over the
/// row, computed in f32 (f64 for f64). Candle's composed softmax (max, sub,
/// exp, sum, div) costs five passes forward and about a dozen backward,
/// most of them on the `[B, heads, L, L]` scores, the gradient through the
/// max included, which is zero in total.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let y = candle_nn::ops::softmax_last_dim(&x.detach())?;
    if !x.track_op() {
        return Ok(y);
    }
    value_with_grad(x, y, |y, g| {
        let dtype = y.dtype();
        let wide = crate::ops::wide_dtype(dtype);
        let (y, g) = (y.to_dtype(wide)?, g.to_dtype(wide)?);
        let dot = (&g * &y)?.sum_keepdim(candle_core::D::Minus1)?;
        (g.broadcast_sub(&dot)? * y)?.to_dtype(dtype)
    })
}

/// The backward of [`value_with_grad`]: `(y, g) ↦ dx`.
type Backward = dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + Send + Sync;

/// `y`, computed without autograd, as a function of `x` for the backward
/// pass: the result has `y`'s value (one copy) and sends `bwd(y, g)` to `x`
/// as its gradient. How a fused forward without a backward of its own
/// (candle's softmax) gets a hand-written backward.
fn value_with_grad(
    x: &Tensor,
    y: Tensor,
    bwd: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    // The op copies y's storage whole: give it a compact one.
    let y = if y.is_contiguous() && y.layout().start_offset() == 0 {
        y
    } else {
        y.force_contiguous()?
    };
    Ok(x.apply_op2(&y, GradOf(Box::new(bwd)))?)
}

/// The op behind [`value_with_grad`]: returns its second input, sends the
/// gradient to its first.
struct GradOf(Box<Backward>);

impl candle_core::CustomOp2 for GradOf {
    fn name(&self) -> &'static str {
        "tunefuse-grad-of"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        y: &candle_core::CpuStorage,
        yl: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        Ok((y.try_clone(yl)?, yl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
        y: &candle_core::CudaStorage,
        yl: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        Ok((y.try_clone(yl)?, yl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some((self.0)(res, grad)?), None))
    }
}

/// The activation: the fused op where the stream uses fused ops and the
/// dtype has a kernel, else [`Act::apply`] (the adapters' composition).
pub fn activation(x: &Tensor, act: Activation, s: &Stream) -> Result<Tensor> {
    let a = Act::from(act);
    if s.fused_for(x) {
        crate::ops::adapter::activation(x, a)
    } else {
        a.apply(x)
    }
}

impl From<Activation> for Act {
    fn from(a: Activation) -> Act {
        match a {
            Activation::GeluErf => Act::GeluErf,
            Activation::GeluTanh => Act::GeluTanh,
            Activation::Relu => Act::Relu,
            Activation::Silu => Act::Silu,
        }
    }
}

/// A LoRA delta `s·(x·Aᵀ)·Bᵀ`, A `[r, in]` (Kaiming-uniform), B `[out, r]`
/// (zero, so a new LoRA leaves its layer unchanged), s = α/r (Hu et al.
/// 2021).
#[derive(Clone, Debug)]
pub struct Lora {
    /// A, `[r, in]`: `lora_A`.
    pub a: Tensor,
    /// B, `[out, r]`: `lora_B`.
    pub b: Tensor,
    /// s = α / r.
    pub scale: f64,
}

impl Lora {
    /// `lora_A` and `lora_B` under `vb` for a layer of `din` inputs and
    /// `dout` outputs, rank `r`, scale α/r; r = 0 is an error.
    pub fn new(vb: &VarBuilder, din: usize, dout: usize, r: usize, alpha: f64) -> Result<Self> {
        if r == 0 {
            return Err(crate::error::param_err("lora", "rank r must be at least 1"));
        }
        if !alpha.is_finite() {
            return Err(crate::error::param_err(
                "lora",
                format!("alpha must be finite, got {alpha}"),
            ));
        }
        let bound = 1.0 / (din as f64).sqrt();
        let a = vb.get_with_hints(
            (r, din),
            "lora_A",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        let b = vb.get_with_hints((dout, r), "lora_B", Init::Const(0.0))?;
        Ok(Self {
            a,
            b,
            scale: alpha / r as f64,
        })
    }

    fn weights(&self, dtype: DType, s: &Stream) -> Result<AdapterWeights> {
        Ok(AdapterWeights {
            w_down: s.use_weight(s.compute_weight(&self.a, dtype)?, false),
            b_down: None,
            w_up: s.use_weight(s.compute_weight(&self.b, dtype)?, false),
            b_up: None,
            act: Act::Identity,
            scale: self.scale,
        })
    }

    /// The delta alone: `s·(x·Aᵀ)·Bᵀ`, `[.., out]` for x `[.., in]`.
    pub fn forward(&self, x: &Tensor, s: &Stream) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        *dims.last_mut().unwrap() = self.b.dim(0)?;
        let zero = Tensor::zeros(dims, x.dtype(), x.device())?;
        self.add_to(x, &zero, s)
    }

    /// `base + s·(x·Aᵀ)·Bᵀ` in one fused op (base: the frozen layer's output).
    pub fn add_to(&self, x: &Tensor, base: &Tensor, s: &Stream) -> Result<Tensor> {
        adapter_fast(x, &self.weights(x.dtype(), s)?, Some(base))
    }
}

/// A dense layer addressed by its Hugging Face name (e.g.
/// `encoder.layer.3.attention.self.query`).
#[derive(Clone, Debug)]
pub struct Dense {
    /// The Hugging Face name (`encoder.layer.3.attention.self.query`).
    pub name: String,
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`; None for a layer without one (ModernBERT's).
    pub bias: Option<Tensor>,
    /// Gradients stop here (frozen backbone, gradual unfreezing).
    pub frozen: bool,
    /// Mixout towards this pretrained weight with probability p (train mode).
    pub mixout: Option<(Tensor, f64)>,
    /// A LoRA delta added to the output.
    pub lora: Option<Lora>,
}

impl Dense {
    /// `name.weight` `[dout, din]` (Kaiming normal) and `name.bias`
    /// (uniform ±1/√din, as torch's `nn.Linear`) under `vb`.
    pub fn new(vb: &VarBuilder, name: &str, din: usize, dout: usize) -> Result<Self> {
        Self::new_with(vb, name, din, dout, true)
    }

    /// As [`Dense::new`], without the bias when `bias` is false.
    pub fn new_with(
        vb: &VarBuilder,
        name: &str,
        din: usize,
        dout: usize,
        bias: bool,
    ) -> Result<Self> {
        let vb = vb.pp(name);
        let bound = 1.0 / (din as f64).sqrt();
        let weight = vb.get_with_hints(
            (dout, din),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        let bias = if bias {
            Some(vb.get_with_hints(
                dout,
                "bias",
                Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            )?)
        } else {
            None
        };
        Ok(Self {
            name: name.to_string(),
            weight,
            bias,
            frozen: false,
            mixout: None,
            lora: None,
        })
    }

    /// `x·Wᵀ + b` with mixout (training mode), frozen weights detached
    /// and the LoRA delta added; in `x`'s dtype.
    pub fn forward(&self, x: &Tensor, s: &Stream) -> Result<Tensor> {
        let dt = x.dtype();
        // Mixout mixes the master weight (its result is cast per use).
        let mixing = self.mixout.as_ref().filter(|_| s.train());
        let mut w = match mixing {
            Some(_) => self.weight.clone(),
            None => s.compute_weight(&self.weight, dt)?,
        };
        let mut b = match &self.bias {
            Some(b) => Some(s.compute_weight(b, dt)?),
            None => None,
        };
        w = s.use_weight(w, self.frozen);
        b = b.map(|b| s.use_weight(b, self.frozen));
        if let Some((pre, p)) = mixing {
            w = mixout(&w, pre, *p, s.take(w.elem_count()), true)?;
        }
        let y = linear_on(x, &w, b.as_ref(), s)?;
        match &self.lora {
            Some(l) => l.add_to(x, &y, s),
            None => Ok(y),
        }
    }
}

/// LayerNorm over the last dimension with HF names `LayerNorm.weight/bias`.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    /// γ, `[size]`.
    pub weight: Tensor,
    /// β, `[size]`; None for a norm without one (ModernBERT's).
    pub bias: Option<Tensor>,
    /// Added to the variance.
    pub eps: f64,
    /// No gradients reach γ and β.
    pub frozen: bool,
    /// The zeros the fused op takes in place of a missing β (a constant,
    /// not a parameter).
    zero_bias: Option<Tensor>,
}

impl LayerNorm {
    /// `LayerNorm.weight` (ones) and `LayerNorm.bias` (zeros) under `vb`.
    pub fn new(vb: &VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Self::new_with(vb, size, eps, true)
    }

    /// As [`LayerNorm::new`], without the bias when `bias` is false.
    pub fn new_with(vb: &VarBuilder, size: usize, eps: f64, bias: bool) -> Result<Self> {
        let vb = vb.pp("LayerNorm");
        let weight = vb.get_with_hints(size, "weight", Init::Const(1.0))?;
        let (bias, zero_bias) = if bias {
            (
                Some(vb.get_with_hints(size, "bias", Init::Const(0.0))?),
                None,
            )
        } else {
            (None, Some(weight.zeros_like()?))
        };
        Ok(Self {
            weight,
            bias,
            eps,
            frozen: false,
            zero_bias,
        })
    }

    /// The fused [`crate::ops::layer_norm()`] (f32 statistics, the f32
    /// weights used as they are, y rounded once to x's dtype).
    pub fn forward(&self, x: &Tensor, s: &Stream) -> Result<Tensor> {
        let w = s.use_weight(self.weight.clone(), self.frozen);
        let b = match (&self.bias, &self.zero_bias) {
            (Some(b), _) => s.use_weight(b.clone(), self.frozen),
            (None, Some(z)) => z.clone(),
            (None, None) => self.weight.zeros_like()?,
        };
        crate::ops::layer_norm(x, &w, &b, self.eps)
    }
}

/// Where bottleneck adapters go in each layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterPlacement {
    /// After the attention output projection and after the feed-forward
    /// output, each before its residual LayerNorm (Houlsby et al. 2019).
    Houlsby,
    /// After the feed-forward output only (Pfeiffer et al. 2021).
    Pfeiffer,
}

/// A bottleneck adapter `x + s·(act(x·W_dᵀ + b_d)·W_uᵀ + b_u)` (Houlsby et
/// al. 2019) through the adapter op. Init as adapter-bert: weights N(0, 1e-3),
/// biases zero, so a new adapter is near the identity. Parameters are named
/// `down.{weight,bias}` and `up.{weight,bias}` under the builder's prefix.
#[derive(Clone, Debug)]
pub struct Adapter {
    /// `[r, d]`.
    pub w_down: Tensor,
    /// `[r]`.
    pub b_down: Tensor,
    /// `[d, r]`.
    pub w_up: Tensor,
    /// `[d]`.
    pub b_up: Tensor,
    /// The bottleneck's activation (the model's).
    pub act: Activation,
    /// The scale s of the adapter's output.
    pub scale: f64,
}

impl Adapter {
    /// `down.*` and `up.*` under `vb` for width `d` and bottleneck `r`;
    /// r = 0 is an error.
    pub fn new(vb: &VarBuilder, d: usize, r: usize, act: Activation, scale: f64) -> Result<Self> {
        if r == 0 {
            return Err(crate::error::param_err(
                "adapter",
                "bottleneck r must be at least 1",
            ));
        }
        let init = Init::Randn {
            mean: 0.0,
            stdev: 1e-3,
        };
        let (down, up) = (vb.pp("down"), vb.pp("up"));
        Ok(Self {
            w_down: down.get_with_hints((r, d), "weight", init)?,
            b_down: down.get_with_hints(r, "bias", Init::Const(0.0))?,
            w_up: up.get_with_hints((d, r), "weight", init)?,
            b_up: up.get_with_hints(d, "bias", Init::Const(0.0))?,
            act,
            scale,
        })
    }

    /// `x + s·(act(x·W_dᵀ + b_d)·W_uᵀ + b_u)` for x `[.., d]`, in x's dtype
    /// (f32 master weights through [`Stream::compute_weight`] under mixed
    /// precision).
    pub fn forward(&self, x: &Tensor, s: &Stream) -> Result<Tensor> {
        let dt = x.dtype();
        let w =
            |t: &Tensor| -> Result<Tensor> { Ok(s.use_weight(s.compute_weight(t, dt)?, false)) };
        let w = AdapterWeights {
            w_down: w(&self.w_down)?,
            b_down: Some(w(&self.b_down)?),
            w_up: w(&self.w_up)?,
            b_up: Some(w(&self.b_up)?),
            act: self.act.into(),
            scale: self.scale,
        };
        adapter_fast(x, &w, None)
    }
}
