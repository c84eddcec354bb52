//! Building blocks with the hooks robust fine-tuning needs: a dense layer
//! that can be frozen, mixed out towards its pretrained weight, or given a
//! LoRA delta; bottleneck adapters (both through the adapter op: the fused
//! kernels on CUDA, candle's gemm on the CPU); LayerNorm; and the per-model
//! random stream for dropout and mixout.
use std::cell::Cell;

use candle_core::{DType, Tensor};
use candle_nn::{Init, VarBuilder};

use super::config::Activation;
use crate::ops::adapter::{adapter_fast, Act, AdapterWeights};
use crate::ops::mixout::{dropout, mixout, Rng};
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
    /// weights, cast per use); `None` = the weights' dtype.
    compute: Cell<Option<DType>>,
}

impl Stream {
    pub fn new(seed: u64) -> Self {
        Self {
            train: Cell::new(false),
            seed: Cell::new(seed),
            offset: Cell::new(0),
            compute: Cell::new(None),
        }
    }
    /// Sets the activation dtype (e.g. bf16 on CUDA with f32 weights).
    pub fn set_compute_dtype(&self, dtype: Option<DType>) {
        self.compute.set(dtype)
    }
    pub fn compute_dtype(&self) -> Option<DType> {
        self.compute.get()
    }
    pub fn train(&self) -> bool {
        self.train.get()
    }
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
    pub fn set_position(&self, r: Rng) {
        self.seed.set(r.seed);
        self.offset.set(r.offset);
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
}

/// `x·Wᵀ + b` over the last dimension of `x` (any leading shape), in the
/// dtype of `x`. When `W` and `b` take no gradient (a frozen layer: the
/// backbone under adapters or LoRA, gradual unfreezing) but `x` does, the
/// backward computes `dx = g·W` alone: candle's matmul backward would also
/// compute the weight's gradient (a second GEMM of the same size) and add it
/// into a zeroed buffer, only to have it dropped.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let frozen = !w.track_op() && b.is_none_or(|b| !b.track_op());
    if !(frozen && x.track_op()) {
        return linear_value(x, w, b);
    }
    // Cast once (mixed precision): the value and the backward share it.
    let w = w.to_dtype(x.dtype())?;
    let y = linear_value(&x.detach(), &w, b)?;
    let xdims = x.dims().to_vec();
    value_with_grad(x, y, move |_, g| {
        let dout = w.dim(0)?;
        g.reshape((g.elem_count() / dout.max(1), dout))?
            .matmul(&w)?
            .reshape(xdims.as_slice())
    })
}

fn linear_value(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (din, dout) = (dims[dims.len() - 1], w.dim(0)?);
    let rows = x.elem_count() / din.max(1);
    // Weights are cast to the activations' dtype (a no-op unless mixed
    // precision keeps f32 master weights under bf16 activations).
    let y = x
        .reshape((rows, din))?
        .matmul(&w.to_dtype(x.dtype())?.t()?)?;
    let y = match b {
        Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
        None => y,
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
/// (candle's softmax) or a forward whose autograd backward does too much (a
/// frozen layer's matmul) gets a hand-written backward.
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

/// The activation (one implementation, [`Act::apply`], for the encoder and
/// the adapters).
pub fn activation(x: &Tensor, act: Activation) -> Result<Tensor> {
    Act::from(act).apply(x)
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
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

impl Lora {
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

    fn weights(&self, dtype: DType) -> Result<AdapterWeights> {
        Ok(AdapterWeights {
            w_down: self.a.to_dtype(dtype)?,
            b_down: None,
            w_up: self.b.to_dtype(dtype)?,
            b_up: None,
            act: Act::Identity,
            scale: self.scale,
        })
    }

    /// The delta alone: `s·(x·Aᵀ)·Bᵀ`, `[.., out]` for x `[.., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        *dims.last_mut().unwrap() = self.b.dim(0)?;
        let zero = Tensor::zeros(dims, x.dtype(), x.device())?;
        self.add_to(x, &zero)
    }

    /// `base + s·(x·Aᵀ)·Bᵀ` in one fused op (base: the frozen layer's output).
    pub fn add_to(&self, x: &Tensor, base: &Tensor) -> Result<Tensor> {
        adapter_fast(x, &self.weights(x.dtype())?, Some(base))
    }
}

/// A dense layer addressed by its Hugging Face name (e.g.
/// `encoder.layer.3.attention.self.query`).
#[derive(Clone, Debug)]
pub struct Dense {
    pub name: String,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// Gradients stop here (frozen backbone, gradual unfreezing).
    pub frozen: bool,
    /// Mixout towards this pretrained weight with probability p (train mode).
    pub mixout: Option<(Tensor, f64)>,
    pub lora: Option<Lora>,
}

impl Dense {
    pub fn new(vb: &VarBuilder, name: &str, din: usize, dout: usize) -> Result<Self> {
        let vb = vb.pp(name);
        let bound = 1.0 / (din as f64).sqrt();
        let weight = vb.get_with_hints(
            (dout, din),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        let bias = vb.get_with_hints(
            dout,
            "bias",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        Ok(Self {
            name: name.to_string(),
            weight,
            bias: Some(bias),
            frozen: false,
            mixout: None,
            lora: None,
        })
    }

    pub fn forward(&self, x: &Tensor, s: &Stream) -> Result<Tensor> {
        let (mut w, b) = if self.frozen {
            (self.weight.detach(), self.bias.as_ref().map(|b| b.detach()))
        } else {
            (self.weight.clone(), self.bias.clone())
        };
        if let (Some((pre, p)), true) = (&self.mixout, s.train()) {
            w = mixout(&w, pre, *p, s.take(w.elem_count()), true)?;
        }
        let y = linear(x, &w, b.as_ref())?;
        match &self.lora {
            Some(l) => l.add_to(x, &y),
            None => Ok(y),
        }
    }
}

/// LayerNorm over the last dimension with HF names `LayerNorm.weight/bias`.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
    pub frozen: bool,
}

impl LayerNorm {
    pub fn new(vb: &VarBuilder, size: usize, eps: f64) -> Result<Self> {
        let vb = vb.pp("LayerNorm");
        Ok(Self {
            weight: vb.get_with_hints(size, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(size, "bias", Init::Const(0.0))?,
            eps,
            frozen: false,
        })
    }

    /// The fused [`crate::ops::layer_norm`] (f32 statistics, the f32
    /// weights used as they are, y rounded once to x's dtype).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (w, b) = if self.frozen {
            (self.weight.detach(), self.bias.detach())
        } else {
            (self.weight.clone(), self.bias.clone())
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
    pub b_down: Tensor,
    /// `[d, r]`.
    pub w_up: Tensor,
    pub b_up: Tensor,
    pub act: Activation,
    pub scale: f64,
}

impl Adapter {
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
    /// (f32 master weights are cast under mixed precision).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let w = AdapterWeights {
            w_down: self.w_down.to_dtype(dt)?,
            b_down: Some(self.b_down.to_dtype(dt)?),
            w_up: self.w_up.to_dtype(dt)?,
            b_up: Some(self.b_up.to_dtype(dt)?),
            act: self.act.into(),
            scale: self.scale,
        };
        adapter_fast(x, &w, None)
    }
}
