//! The BERT encoder (Hugging Face layout and tensor names) with the hooks of
//! robust and parameter-efficient fine-tuning: input-embedding access for
//! perturbations, adapter and LoRA insertion, mixout and freezing of every
//! named dense layer, fused dropout, and optional attention probabilities
//! and per-layer hidden states for analysis.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Init, VarBuilder, VarMap};

use super::config::{Activation, BertConfig, LayerAttention};
use super::family::{Family, HeadSpec};
use super::layers::{activation, Adapter, AdapterPlacement, Dense, LayerNorm, Lora, Stream};
use crate::error::{format_err, io_err, shape_err, Result};

/// Embeddings: word + position + token type, LayerNorm, dropout, and
/// ELECTRA's projection to the encoder's width.
#[derive(Debug)]
pub struct Embeddings {
    /// `word_embeddings.weight`, `[vocab, E]` (E: the embedding width).
    pub word: Tensor,
    /// None for DeBERTa without absolute positions (v3).
    pub position: Option<Tensor>,
    /// None for a family without token types (DistilBERT).
    pub token_type: Option<Tensor>,
    /// The embeddings' LayerNorm, over E.
    pub norm: LayerNorm,
    /// ELECTRA's `embeddings_project`, when its embeddings are narrower
    /// than the encoder.
    pub project: Option<Dense>,
    /// The position of the first token (RoBERTa: the padding id + 1).
    pub position_offset: usize,
    /// No gradients reach the tables (freezing, gradual unfreezing).
    pub frozen: bool,
}

/// DeBERTa's disentangled relative attention: a table of relative-position
/// embeddings (`encoder.rel_embeddings`, 2·span rows, normalised by
/// `encoder.LayerNorm`) that each layer projects with its own query and key
/// projections, adding content→position and position→content terms to the
/// attention scores.
#[derive(Debug)]
pub struct Relative {
    /// `encoder.rel_embeddings.weight`, `[2·span, H]`.
    pub embeddings: Tensor,
    /// `encoder.LayerNorm` over the table (`norm_rel_ebd = "layer_norm"`).
    pub norm: Option<LayerNorm>,
    /// Rows per side: relative positions are clamped to [−span, span).
    pub span: usize,
    /// Log buckets (DeBERTa-v2's `position_buckets`; 0: none).
    pub buckets: usize,
    /// The largest relative distance the log buckets cover.
    pub max_position: usize,
    /// The content→position term is on.
    pub c2p: bool,
    /// The position→content term is on.
    pub p2c: bool,
    /// No gradients reach the table (it freezes with the embeddings).
    pub frozen: bool,
}

impl Relative {
    /// DeBERTa's bucketed relative position of query i and key j
    /// (`make_log_bucket_position`, in f32 as transformers computes it).
    fn bucket(&self, rel: i64) -> i64 {
        if self.buckets == 0 {
            return rel;
        }
        let mid = (self.buckets / 2) as i64;
        let abs = if rel < mid && rel > -mid {
            mid - 1
        } else {
            rel.abs()
        };
        if abs <= mid {
            return rel;
        }
        let log = ((abs as f32 / mid as f32).ln()
            / ((self.max_position as f32 - 1.0) / mid as f32).ln()
            * (mid - 1) as f32)
            .ceil()
            + mid as f32;
        (log * rel.signum() as f32) as i64
    }

    /// The gather indices of the two terms for `b` rows of `heads` heads,
    /// `[b, heads, L, L]` (one copy per batch and head, as `gather` takes
    /// them): content→position `clamp(bucket(q − k) + span)` and
    /// position→content, laid out by key row, `[k, q] = clamp(span −
    /// bucket(k − q))`.
    fn indices(
        &self,
        b: usize,
        heads: usize,
        l: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let span = self.span as i64;
        let clamp = |v: i64| v.clamp(0, 2 * span - 1) as u32;
        let mut c2p = Vec::with_capacity(l * l);
        let mut p2c = Vec::with_capacity(l * l);
        for a in 0..l as i64 {
            for b in 0..l as i64 {
                c2p.push(clamp(self.bucket(a - b) + span));
                p2c.push(clamp(span - self.bucket(a - b)));
            }
        }
        let expand = |v: Vec<u32>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, (1, 1, l, l), device)?
                .broadcast_as((b, heads, l, l))?
                .contiguous()?)
        };
        Ok((expand(c2p)?, expand(p2c)?))
    }
}

/// What every layer's relative terms share in one forward pass.
struct RelativeInputs {
    /// The normalised table `[2·span, H]` in the activations' dtype.
    table: Tensor,
    /// [`Relative::indices`], built once for all layers.
    c2p: Tensor,
    p2c: Tensor,
}

/// The rotary tables of one base θ, `[L, dh]` in f32: cos and sin of
/// position · θ^(−2j/dh), the halves repeated (transformers' layout).
struct Rotary {
    theta: f64,
    cos: Tensor,
    sin: Tensor,
}

/// What the layers of one forward pass share: DeBERTa's relative terms,
/// the rotary tables and the sliding-window scores (ModernBERT).
#[derive(Default)]
struct Shared {
    relative: Option<RelativeInputs>,
    rotary: Vec<Rotary>,
    /// `(half window, [1, 1, L, L])`: 0 inside the window, [`MASKED`] outside.
    windows: Vec<(usize, Tensor)>,
}

/// Rotates the pairs (j, j + dh/2) of every head vector of `x`
/// `[B, heads, L, dh]` by the angles of `r` (transformers'
/// `apply_rotary_pos_emb`: `x·cos + rotate_half(x)·sin`, in f32).
fn rotate(x: &Tensor, r: &Rotary) -> Result<Tensor> {
    let dt = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let half = x.dim(D::Minus1)? / 2;
    let (x1, x2) = (x.narrow(3, 0, half)?, x.narrow(3, half, half)?);
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
    let y = (x.broadcast_mul(&r.cos)? + rotated.broadcast_mul(&r.sin)?)?;
    Ok(y.to_dtype(dt)?)
}

/// One encoder layer.
#[derive(Debug)]
pub struct Layer {
    /// `attention.self.query`, `[H, H]`.
    pub query: Dense,
    /// `attention.self.key`, `[H, H]`.
    pub key: Dense,
    /// `attention.self.value`, `[H, H]`.
    pub value: Dense,
    /// `attention.output.dense`, `[H, H]`.
    pub attn_out: Dense,
    /// `attention.output.LayerNorm`: after the attention's residual, or
    /// before the attention in a pre-norm family (ModernBERT's `attn_norm`,
    /// absent in its first layer).
    pub attn_norm: Option<LayerNorm>,
    /// `intermediate.dense`, `[I, H]`, then the activation (a gated
    /// unit's: `[2·I, H]`, see [`BertConfig::gated`]).
    pub intermediate: Dense,
    /// `output.dense`, `[H, I]`.
    pub output: Dense,
    /// `output.LayerNorm`: after the feed-forward residual, or before the
    /// feed-forward block in a pre-norm family (ModernBERT's `mlp_norm`).
    pub out_norm: LayerNorm,
    /// Rotary positions and a sliding window, where the family has them.
    pub attention: LayerAttention,
    /// Houlsby adapter after the attention output projection.
    pub attn_adapter: Option<Adapter>,
    /// Adapter after the feed-forward output (Houlsby and Pfeiffer).
    pub ffn_adapter: Option<Adapter>,
}

impl Layer {
    /// The six dense layers, in order: query, key, value, attention output,
    /// intermediate, output.
    pub fn dense_mut(&mut self) -> [&mut Dense; 6] {
        [
            &mut self.query,
            &mut self.key,
            &mut self.value,
            &mut self.attn_out,
            &mut self.intermediate,
            &mut self.output,
        ]
    }
}

/// What the encoder returns.
#[derive(Debug)]
pub struct EncoderOutput {
    /// `[B, L, H]`.
    pub last_hidden: Tensor,
    /// The embeddings output and every layer's output (L + 1 tensors), when asked.
    pub hidden_states: Option<Vec<Tensor>>,
    /// Attention probabilities `[B, heads, L, L]` per layer, when asked.
    pub attentions: Option<Vec<Tensor>>,
}

/// Which extra outputs to return.
#[derive(Clone, Copy, Debug, Default)]
pub struct Outputs {
    /// The embedding output and every layer's output.
    pub hidden_states: bool,
    /// Every layer's attention probabilities (before dropout).
    pub attentions: bool,
}

/// The BERT encoder.
#[derive(Debug)]
pub struct Bert {
    /// The configuration it was built from (dropouts may be changed before
    /// training).
    pub config: BertConfig,
    /// The family its checkpoint's names and head follow.
    pub family: Family,
    /// Word, position and token-type tables and their LayerNorm.
    pub embeddings: Embeddings,
    /// The encoder layers, bottom first.
    pub layers: Vec<Layer>,
    /// DeBERTa's relative attention.
    pub relative: Option<Relative>,
    /// `pooler.dense` when the checkpoint has one: BERT's pooler, or the
    /// dense layer of the family's classification head (see
    /// [`super::family`]).
    pub pooler: Option<Dense>,
    /// The LayerNorm after the pooler's activation (ModernBERT's head).
    pub pooler_norm: Option<LayerNorm>,
    /// The LayerNorm after the last layer of a pre-norm family.
    pub final_norm: Option<LayerNorm>,
    /// The family's classification head (pooling, bias, activation, norm).
    pub head: HeadSpec,
    act: Activation,
    /// Dropout / mixout stream and train/eval mode.
    pub stream: Stream,
}

/// Names in a checkpoint that are buffers, not parameters.
const IGNORED: [&str; 1] = ["embeddings.position_ids"];

/// Score added to masked attention positions (finite in f16).
const MASKED: f64 = -30000.0;

impl Bert {
    /// A randomly initialised encoder whose parameters live in `varmap`
    /// under the Hugging Face names (BERT init: N(0, 0.02) weights).
    pub fn new(
        config: &BertConfig,
        varmap: &VarMap,
        dtype: DType,
        device: &Device,
        pooler: bool,
    ) -> Result<Self> {
        config.validate()?;
        let vb = VarBuilder::from_varmap(varmap, dtype, device);
        let init = Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let (h, eps) = (config.hidden_size, config.layer_norm_eps);
        let family = config.family()?;
        let head = config.head()?;
        let width = config.embedding_width();
        let (norm_bias, attn_bias, mlp_bias) = (
            config.norm_has_bias(),
            config.attention_has_bias(),
            config.mlp_has_bias(),
        );
        let dense = |vb: &VarBuilder, name: &str, din: usize, dout: usize, bias: bool| {
            let v = vb.pp(name);
            Ok::<_, crate::error::Error>(Dense {
                name: format!("{}.{name}", vb.prefix()),
                weight: v.get_with_hints((dout, din), "weight", init)?,
                bias: if bias {
                    Some(v.get_with_hints(dout, "bias", Init::Const(0.0))?)
                } else {
                    None
                },
                frozen: false,
                mixout: None,
                lora: None,
            })
        };
        let e = vb.pp("embeddings");
        let embeddings = Embeddings {
            word: e.get_with_hints((config.vocab_size, width), "word_embeddings.weight", init)?,
            position: if config.absolute_positions() {
                Some(e.get_with_hints(
                    (config.max_position_embeddings, width),
                    "position_embeddings.weight",
                    init,
                )?)
            } else {
                None
            },
            token_type: if config.type_vocab_size > 0 {
                Some(e.get_with_hints(
                    (config.type_vocab_size, width),
                    "token_type_embeddings.weight",
                    init,
                )?)
            } else {
                None
            },
            norm: LayerNorm::new_with(&e, width, eps, norm_bias)?,
            project: if width != h {
                Some(dense(&vb, "embeddings_project", width, h, true)?)
            } else {
                None
            },
            position_offset: family.position_offset(config.pad_token_id),
            frozen: false,
        };
        let mut layers = Vec::new();
        for i in 0..config.num_hidden_layers {
            let l = vb.pp(format!("encoder.layer.{i}"));
            let (att, selfa, out) = (
                l.pp("attention.output"),
                l.pp("attention.self"),
                l.pp("output"),
            );
            let i_size = config.intermediate_size;
            let i_out = if config.gated() { 2 * i_size } else { i_size };
            layers.push(Layer {
                query: dense(&selfa, "query", h, h, attn_bias)?,
                key: dense(&selfa, "key", h, h, attn_bias)?,
                value: dense(&selfa, "value", h, h, attn_bias)?,
                attn_out: dense(&att, "dense", h, h, attn_bias)?,
                // ModernBERT's first layer takes the normalised embeddings
                // as they are.
                attn_norm: if config.pre_norm() && i == 0 {
                    None
                } else {
                    Some(LayerNorm::new_with(&att, h, eps, norm_bias)?)
                },
                intermediate: dense(&l.pp("intermediate"), "dense", h, i_out, mlp_bias)?,
                output: dense(&out, "dense", i_size, h, mlp_bias)?,
                out_norm: LayerNorm::new_with(&out, h, eps, norm_bias)?,
                attention: config.layer_attention(i)?,
                attn_adapter: None,
                ffn_adapter: None,
            });
        }
        let (pooler, pooler_norm) = if pooler {
            let p = vb.pp("pooler");
            let norm = match head.norm {
                Some((eps, bias)) => Some(LayerNorm::new_with(&p, h, eps, bias)?),
                None => None,
            };
            (Some(dense(&p, "dense", h, h, head.bias)?), norm)
        } else {
            (None, None)
        };
        let final_norm = if config.pre_norm() {
            Some(LayerNorm::new_with(
                &vb.pp("encoder.final_norm"),
                h,
                eps,
                norm_bias,
            )?)
        } else {
            None
        };
        let relative = if config.relative_attention {
            let (c2p, p2c) = config.relative_terms()?;
            let span = config.relative_span();
            let enc = vb.pp("encoder");
            Some(Relative {
                embeddings: enc.get_with_hints((2 * span, h), "rel_embeddings.weight", init)?,
                norm: if config
                    .norm_rel_ebd
                    .as_deref()
                    .is_some_and(|n| n.contains("layer_norm"))
                {
                    Some(LayerNorm::new(&enc, h, eps)?)
                } else {
                    None
                },
                span,
                buckets: config.position_buckets.max(0) as usize,
                max_position: config.relative_max_position(),
                c2p,
                p2c,
                frozen: false,
            })
        } else {
            None
        };
        Ok(Self {
            config: config.clone(),
            family,
            embeddings,
            layers,
            relative,
            pooler,
            pooler_norm,
            final_norm,
            head,
            act: config.activation()?,
            stream: Stream::new(0),
        })
    }

    /// Loads a Hugging Face model directory of any supported family (`config.json`,
    /// `model.safetensors`): builds the encoder in `varmap` and copies the
    /// checkpoint into it. Names are the family's (`model_type` in
    /// `config.json`), with or without its prefix (`bert.`, `roberta.`, …),
    /// mapped to the encoder's by [`Family::internal_names`]; a pooler is
    /// built when the checkpoint has one (or its head's dense layer). Missing, unexpected and
    /// mis-shaped tensors are one error listing them all.
    pub fn from_pretrained(
        dir: &Path,
        varmap: &VarMap,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if !dir.is_dir() {
            return Err(io_err(
                dir,
                "no such directory (--model must be a Hugging Face model directory)",
            ));
        }
        let config = BertConfig::from_file(&dir.join("config.json"))?;
        let path = dir.join("model.safetensors");
        if !path.exists() {
            return Err(io_err(
                &path,
                "no such file (expected a Hugging Face model directory)",
            ));
        }
        let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
            .map_err(|e| format_err(&path, format!("not a readable safetensors file: {e}")))?;
        let tensors = config.family()?.internal_names(tensors)?;
        // A configuration that describes a much larger model than the
        // checkpoint holds (a mistyped intermediate_size, a layer count off
        // by orders of magnitude) is refused before anything is allocated,
        // which could otherwise abort the process. Smaller mismatches are
        // reported tensor by tensor by load_into.
        let stored: u128 = tensors.values().map(|t| t.elem_count() as u128).sum();
        let wanted = config.parameter_count();
        if wanted > 2 * stored + (1 << 20) {
            return Err(format_err(
                &dir.join("config.json"),
                format!(
                    "describes a model of {wanted} parameters ({:.1} GB in f32) but {} holds \
                     {stored}: {}; refusing to allocate it",
                    wanted as f64 * 4e-9,
                    path.display(),
                    config.sizes()
                ),
            ));
        }
        let pooler = tensors.contains_key("pooler.dense.weight");
        let model = Self::new(&config, varmap, dtype, device, pooler)?;
        load_into(varmap, &tensors, &path, &|_| true)?;
        Ok(model)
    }

    /// Names of every dense layer (for mixout, LoRA targets, analyses).
    pub fn dense_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .layers
            .iter()
            .flat_map(|l| {
                [
                    &l.query,
                    &l.key,
                    &l.value,
                    &l.attn_out,
                    &l.intermediate,
                    &l.output,
                ]
                .map(|d| d.name.clone())
            })
            .collect();
        v.extend(self.pooler.iter().map(|d| d.name.clone()));
        v
    }

    /// Mutable access to every dense layer of the encoder.
    pub fn dense_layers_mut(&mut self) -> Vec<&mut Dense> {
        let mut v: Vec<&mut Dense> = self.layers.iter_mut().flat_map(|l| l.dense_mut()).collect();
        v.extend(self.pooler.as_mut());
        v
    }

    /// Mixout with probability `p` on every dense weight of the encoder,
    /// towards its current (pretrained) value.
    pub fn enable_mixout(&mut self, p: f64) -> Result<()> {
        if !(0.0..1.0).contains(&p) {
            return Err(crate::error::param_err(
                "mixout",
                format!("p must be in [0, 1), got {p}"),
            ));
        }
        for d in self.dense_layers_mut() {
            d.mixout = Some((d.weight.detach().copy()?, p));
        }
        Ok(())
    }

    /// Freezes (or unfreezes) the embeddings (`unit = 0`) or encoder layer
    /// `unit - 1`: its parameters get no gradients.
    pub fn set_frozen(&mut self, unit: usize, frozen: bool) -> Result<()> {
        if unit == 0 {
            self.embeddings.frozen = frozen;
            self.embeddings.norm.frozen = frozen;
            // DeBERTa's relative-position table freezes with the embeddings.
            if let Some(r) = &mut self.relative {
                r.frozen = frozen;
                if let Some(n) = &mut r.norm {
                    n.frozen = frozen;
                }
            }
            if let Some(p) = &mut self.embeddings.project {
                p.frozen = frozen;
            }
            return Ok(());
        }
        let n = self.layers.len();
        let l = self.layers.get_mut(unit - 1).ok_or_else(|| {
            crate::error::param_err(
                "freeze",
                format!("unit {unit} out of range (0 = embeddings, 1..={n} = layers)"),
            )
        })?;
        for d in l.dense_mut() {
            d.frozen = frozen;
        }
        if let Some(n) = &mut l.attn_norm {
            n.frozen = frozen;
        }
        l.out_norm.frozen = frozen;
        // A pre-norm family's final norm belongs to its last layer.
        if unit == n {
            if let Some(f) = &mut self.final_norm {
                f.frozen = frozen;
            }
        }
        Ok(())
    }

    /// Every LayerNorm of the encoder (the pooler's aside): the
    /// embeddings', DeBERTa's relative table's, each layer's and a
    /// pre-norm family's final one.
    pub fn layer_norms_mut(&mut self) -> Vec<&mut LayerNorm> {
        let mut v = vec![&mut self.embeddings.norm];
        v.extend(self.relative.as_mut().and_then(|r| r.norm.as_mut()));
        for l in &mut self.layers {
            v.extend(l.attn_norm.as_mut());
            v.push(&mut l.out_norm);
        }
        v.extend(self.final_norm.as_mut());
        v
    }

    /// Freezes the whole encoder (adapters, LoRA and heads stay trainable).
    pub fn freeze_all(&mut self) -> Result<()> {
        self.set_all_frozen(true)
    }

    /// Freezes (or unfreezes) the whole encoder: the embeddings, every layer
    /// and the pooler (adapters, LoRA and heads are not touched).
    pub fn set_all_frozen(&mut self, frozen: bool) -> Result<()> {
        for u in 0..=self.layers.len() {
            self.set_frozen(u, frozen)?;
        }
        if let Some(p) = &mut self.pooler {
            p.frozen = frozen;
        }
        if let Some(n) = &mut self.pooler_norm {
            n.frozen = frozen;
        }
        Ok(())
    }

    /// Adds bottleneck adapters (parameters `…adapter.{down,up}.*` in `varmap`).
    pub fn add_adapters(
        &mut self,
        varmap: &VarMap,
        placement: AdapterPlacement,
        r: usize,
        scale: f64,
    ) -> Result<()> {
        let (dtype, device) = (
            self.embeddings.word.dtype(),
            self.embeddings.word.device().clone(),
        );
        let vb = VarBuilder::from_varmap(varmap, dtype, &device);
        let (h, act) = (self.config.hidden_size, self.act);
        // A bottleneck no wider than the layer; also bounds what is
        // allocated before anything is.
        if r == 0 || r > h {
            return Err(crate::error::param_err(
                "adapter",
                format!("r must be in 1..={h} (the model's hidden size), got {r}"),
            ));
        }
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = vb.pp(format!("encoder.layer.{i}"));
            if placement == AdapterPlacement::Houlsby {
                l.attn_adapter = Some(Adapter::new(
                    &p.pp("attention.output.adapter"),
                    h,
                    r,
                    act,
                    scale,
                )?);
            }
            l.ffn_adapter = Some(Adapter::new(&p.pp("output.adapter"), h, r, act, scale)?);
        }
        Ok(())
    }

    /// Adds LoRA deltas to the dense layers whose name ends with one of
    /// `targets` (e.g. `["query", "value"]`): parameters `<name>.lora_{A,B}`.
    pub fn add_lora(
        &mut self,
        varmap: &VarMap,
        targets: &[&str],
        r: usize,
        alpha: f64,
    ) -> Result<usize> {
        let (dtype, device) = (
            self.embeddings.word.dtype(),
            self.embeddings.word.device().clone(),
        );
        let vb = VarBuilder::from_varmap(varmap, dtype, &device);
        let mut n = 0;
        for d in self.dense_layers_mut() {
            if targets.iter().any(|t| {
                d.name.ends_with(&format!(".{t}")) || d.name.ends_with(&format!(".{t}.dense"))
            }) {
                let (dout, din) = d.weight.dims2()?;
                // A low-rank delta: r above min(in, out) adds nothing a
                // full-rank one lacks, and bounds what is allocated.
                if r == 0 || r > din.min(dout) {
                    return Err(crate::error::param_err(
                        "lora",
                        format!(
                            "r must be in 1..={} (the smaller side of {}: {dout}x{din}), got {r}",
                            din.min(dout),
                            d.name
                        ),
                    ));
                }
                d.lora = Some(Lora::new(&vb.pp(&d.name), din, dout, r, alpha)?);
                n += 1;
            }
        }
        if n == 0 {
            return Err(crate::error::param_err(
                "lora",
                format!("no dense layer matches the targets {targets:?}"),
            ));
        }
        Ok(n)
    }

    /// The embeddings output `[B, L, H]` for token ids `[B, L]` (u32) and
    /// token types (zeros when `None`): where SMART adds its perturbation.
    pub fn forward_embeddings(&self, ids: &Tensor, token_types: Option<&Tensor>) -> Result<Tensor> {
        self.embed_words(&self.word_embeddings(ids)?, token_types)
    }

    /// The rows of the word-embedding table for token ids `[B, L]` (u32):
    /// `[B, L, E]`, before positions, token types and the LayerNorm (what
    /// transformers calls the input embeddings, where Kong et al. perturb).
    pub fn word_embeddings(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2().map_err(|_| {
            shape_err(
                "bert",
                format!("token ids must be [B, L], got {:?}", ids.dims()),
            )
        })?;
        let e = &self.embeddings;
        let table = if e.frozen {
            e.word.detach()
        } else {
            e.word.clone()
        };
        Ok(table.embedding(&ids.flatten_all()?)?.reshape((b, l, ()))?)
    }

    /// The embeddings output from word embeddings `[B, L, E]` (see
    /// [`Bert::word_embeddings`]): positions and token types added, the
    /// LayerNorm, dropout and ELECTRA's projection.
    pub fn embed_words(&self, words: &Tensor, token_types: Option<&Tensor>) -> Result<Tensor> {
        let (b, l, _) = words.dims3().map_err(|_| {
            shape_err(
                "bert",
                format!("word embeddings must be [B, L, E], got {:?}", words.dims()),
            )
        })?;
        let e = &self.embeddings;
        if l + e.position_offset > self.config.max_position_embeddings {
            return Err(shape_err(
                "bert",
                format!(
                    "sequence length {l} exceeds max_position_embeddings {}{}",
                    self.config.max_position_embeddings,
                    if e.position_offset > 0 {
                        format!(" less the first position {}", e.position_offset)
                    } else {
                        String::new()
                    }
                ),
            ));
        }
        let frz = |t: &Tensor| if e.frozen { t.detach() } else { t.clone() };
        let mut x = match &e.position {
            Some(p) => words.broadcast_add(&frz(p).narrow(0, e.position_offset, l)?)?,
            None => words.clone(),
        };
        if let Some(tt) = &e.token_type {
            let types = match token_types {
                Some(t) => frz(tt).embedding(&t.flatten_all()?)?.reshape((b, l, ()))?,
                None => frz(tt)
                    .get(0)?
                    .reshape((1, 1, ()))?
                    .broadcast_as(x.dims())?,
            };
            x = x.add(&types)?;
        }
        let x = e.norm.forward(&x, &self.stream)?;
        let x = match self.stream.compute_dtype() {
            Some(dt) => x.to_dtype(dt)?,
            None => x,
        };
        let p = (self.config.embedding_dropout).unwrap_or(self.config.hidden_dropout_prob);
        let x = self.stream.dropout(&x, p)?;
        match &e.project {
            Some(p) => p.forward(&x, &self.stream),
            None => Ok(x),
        }
    }

    /// The encoder from given input embeddings `[B, L, H]` and an attention
    /// mask `[B, L]` (1 = token, 0 = padding; any dtype).
    pub fn forward_from_embeddings(
        &self,
        embeds: &Tensor,
        attention_mask: &Tensor,
        want: Outputs,
    ) -> Result<EncoderOutput> {
        let (b, l, h) = embeds.dims3().map_err(|_| {
            shape_err(
                "bert",
                format!("embeddings must be [B, L, H], got {:?}", embeds.dims()),
            )
        })?;
        if h != self.config.hidden_size || attention_mask.dims() != [b, l] {
            return Err(shape_err(
                "bert",
                format!(
                    "embeddings {:?} and mask {:?} do not fit hidden size {}",
                    embeds.dims(),
                    attention_mask.dims(),
                    self.config.hidden_size
                ),
            ));
        }
        let dtype = embeds.dtype();
        // [B, 1, 1, L]: 0 for tokens, MASKED for padding.
        let bias = ((attention_mask.to_dtype(DType::F32)? - 1.0)? * -MASKED)?
            .to_dtype(dtype)?
            .reshape((b, 1, 1, l))?;
        let mut shared = Shared {
            rotary: self.rotary_tables(l, embeds.device())?,
            windows: self.window_scores(l, dtype, embeds.device())?,
            ..Shared::default()
        };
        shared.relative = match &self.relative {
            None => None,
            Some(r) => {
                let t = if r.frozen {
                    r.embeddings.detach()
                } else {
                    r.embeddings.clone()
                };
                let t = match &r.norm {
                    Some(n) => n.forward(&t, &self.stream)?,
                    None => t,
                };
                let t = self
                    .stream
                    .dropout(&t.to_dtype(dtype)?, self.config.hidden_dropout_prob)?;
                let heads = self.config.num_attention_heads;
                let (c2p, p2c) = r.indices(b, heads, l, embeds.device())?;
                Some(RelativeInputs { table: t, c2p, p2c })
            }
        };
        let mut x = embeds.clone();
        let mut hidden = want.hidden_states.then(|| vec![x.clone()]);
        let mut attns = want.attentions.then(Vec::new);
        for layer in &self.layers {
            let (y, probs) = self.layer_forward(layer, &x, &bias, &shared, want.attentions)?;
            x = y;
            if let Some(hs) = hidden.as_mut() {
                hs.push(x.clone());
            }
            if let (Some(a), Some(p)) = (attns.as_mut(), probs) {
                a.push(p);
            }
        }
        if let Some(n) = &self.final_norm {
            x = n.forward(&x, &self.stream)?;
            // As transformers reports it, the last hidden state is the
            // normalised one.
            if let Some(last) = hidden.as_mut().and_then(|hs| hs.last_mut()) {
                *last = x.clone();
            }
        }
        Ok(EncoderOutput {
            last_hidden: x,
            hidden_states: hidden,
            attentions: attns,
        })
    }

    /// Embeddings then encoder.
    pub fn forward(
        &self,
        ids: &Tensor,
        token_types: Option<&Tensor>,
        attention_mask: &Tensor,
        want: Outputs,
    ) -> Result<EncoderOutput> {
        let e = self.forward_embeddings(ids, token_types)?;
        self.forward_from_embeddings(&e, attention_mask, want)
    }

    /// The rotary tables of the layers' distinct bases for `l` positions
    /// (none for a family without rotary positions), computed in f32 as
    /// transformers does.
    fn rotary_tables(&self, l: usize, device: &Device) -> Result<Vec<Rotary>> {
        let dh = self.config.hidden_size / self.config.num_attention_heads;
        let mut out: Vec<Rotary> = Vec::new();
        for theta in self.layers.iter().filter_map(|x| x.attention.rotary_theta) {
            if out.iter().any(|r| r.theta == theta) {
                continue;
            }
            let inv: Vec<f32> = (0..dh / 2)
                .map(|j| 1.0 / (theta as f32).powf((2 * j) as f32 / dh as f32))
                .collect();
            let (mut cos, mut sin) = (Vec::with_capacity(l * dh), Vec::with_capacity(l * dh));
            for p in 0..l {
                for _ in 0..2 {
                    for f in &inv {
                        let a = p as f32 * f;
                        cos.push(a.cos());
                        sin.push(a.sin());
                    }
                }
            }
            out.push(Rotary {
                theta,
                cos: Tensor::from_vec(cos, (l, dh), device)?,
                sin: Tensor::from_vec(sin, (l, dh), device)?,
            });
        }
        Ok(out)
    }

    /// The sliding-window scores of the layers' distinct windows, for
    /// sequences of `l` tokens: none where a window covers every pair.
    fn window_scores(
        &self,
        l: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Vec<(usize, Tensor)>> {
        let mut out: Vec<(usize, Tensor)> = Vec::new();
        for w in self.layers.iter().filter_map(|x| x.attention.half_window) {
            if w + 1 >= l || out.iter().any(|(v, _)| *v == w) {
                continue;
            }
            let v: Vec<f32> = (0..l * l)
                .map(|k| {
                    let (i, j) = (k / l, k % l);
                    if i.abs_diff(j) > w {
                        MASKED as f32
                    } else {
                        0.0
                    }
                })
                .collect();
            let t = Tensor::from_vec(v, (1, 1, l, l), device)?.to_dtype(dtype)?;
            out.push((w, t));
        }
        Ok(out)
    }

    /// One encoder layer; with `want_probs`, also its attention
    /// probabilities (before dropout).
    fn layer_forward(
        &self,
        layer: &Layer,
        input: &Tensor,
        bias: &Tensor,
        shared: &Shared,
        want_probs: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let s = &self.stream;
        let pre_norm = self.config.pre_norm();
        // A pre-norm layer attends to its normalised input and adds the
        // result to the input itself.
        let normed;
        let x = match (&layer.attn_norm, pre_norm) {
            (Some(n), true) => {
                normed = n.forward(input, s)?;
                &normed
            }
            _ => input,
        };
        let (b, l, h) = x.dims3()?;
        let heads = self.config.num_attention_heads;
        let dh = h / heads;
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, l, heads, dh))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let drop = self.config.attention_probs_dropout_prob;
        // Plain attention (no rotary, window or relative terms, no
        // probabilities asked for) is one op on the layers' [B, L, H]
        // outputs where the stream fuses: no head split, no batched GEMMs,
        // and the three projections as one layer where they combine.
        let plain = layer.attention.rotary_theta.is_none()
            && layer.attention.half_window.is_none()
            && (shared.relative.is_none() || self.relative.is_none())
            && !want_probs;
        let projections = [&layer.query, &layer.key, &layer.value];
        let fused = if plain {
            let scale = 1.0 / (dh as f64).sqrt();
            s.self_attention(projections, x, bias, heads, scale, drop)?
        } else {
            None
        };
        let (ctx, probs) = match fused {
            Some(ctx) => (ctx, None),
            None => {
                let [q, k, v] = projections.map(|d| d.forward(x, s));
                self.attend(
                    layer,
                    (split(q?)?, split(k?)?, split(v?)?),
                    bias,
                    shared,
                    want_probs,
                )?
            }
        };
        self.layer_rest(layer, input, ctx, probs)
    }

    /// The composed attention of a layer on the heads of q, k, v
    /// `[B, heads, L, dh]`: its context `[B, L, H]` and, with `want_probs`,
    /// its probabilities.
    fn attend(
        &self,
        layer: &Layer,
        (mut q, mut k, v): (Tensor, Tensor, Tensor),
        bias: &Tensor,
        shared: &Shared,
        want_probs: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let s = &self.stream;
        let (b, heads, l, dh) = q.dims4()?;
        let h = heads * dh;
        if let Some(theta) = layer.attention.rotary_theta {
            let r = shared
                .rotary
                .iter()
                .find(|r| r.theta == theta)
                .expect("a table per base");
            q = rotate(&q, r)?;
            k = rotate(&k, r)?;
        }
        // With the fused ops (CUDA), k's transposed view goes to the GEMM as
        // it is (a transposed operand), not copied; the CPU path keeps the
        // copy, and with it the results of earlier versions bit for bit.
        let kt = if s.fused_for(&k) {
            k.t()?
        } else {
            k.t()?.contiguous()?
        };
        let mut scores = q.matmul(&kt)?;
        if let Some(w) = layer.attention.half_window {
            // Added before the op's scaling: MASKED·scale is still far
            // below any real score, and stays finite in f16.
            if let Some((_, t)) = shared.windows.iter().find(|(v, _)| *v == w) {
                scores = scores.broadcast_add(t)?;
            }
        }
        let mut terms = 1.0;
        if let (Some(ri), Some(r)) = (&shared.relative, &self.relative) {
            // The table through this layer's own query and key projections,
            // per head: [1, heads, 2·span, dh].
            let rows = ri.table.dim(0)?;
            let per_head = |t: Tensor| -> Result<Tensor> {
                Ok(t.reshape((1, rows, heads, dh))?
                    .transpose(1, 2)?
                    .contiguous()?)
            };
            let gather = |t: &Tensor, idx: &Tensor| -> Result<Tensor> {
                Ok(t.contiguous()?.gather(idx, 3)?)
            };
            if r.c2p {
                let pk = per_head(layer.key.forward(&ri.table, s)?)?;
                let c2p = q.broadcast_matmul(&pk.t()?)?;
                scores = (scores + gather(&c2p, &ri.c2p)?)?;
                terms += 1.0;
            }
            if r.p2c {
                let pq = per_head(layer.query.forward(&ri.table, s)?)?;
                let p2c = k.broadcast_matmul(&pq.t()?)?;
                scores = (scores + gather(&p2c, &ri.p2c)?.transpose(2, 3)?)?;
                terms += 1.0;
            }
        }
        // DeBERTa scales by √(dh·(1 + number of relative terms)).
        let (scale, drop) = (
            1.0 / (dh as f64 * terms).sqrt(),
            self.config.attention_probs_dropout_prob,
        );
        // The scale, the mask, softmax and dropout in one op; the
        // probabilities before dropout (for `Outputs::attentions`) are the
        // same op without dropout, then the same dropout draws.
        let (p, probs) = if want_probs {
            let probs = s.attention_probs(&scores, bias, scale, 0.0)?;
            (s.dropout(&probs, drop)?, Some(probs))
        } else {
            (s.attention_probs(&scores, bias, scale, drop)?, None)
        };
        let ctx = p
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, l, h))?;
        Ok((ctx, probs))
    }

    /// The rest of a layer after its attention's context: the output
    /// projection, the residuals, the norms and the feed-forward unit.
    fn layer_rest(
        &self,
        layer: &Layer,
        input: &Tensor,
        ctx: Tensor,
        probs: Option<Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let s = &self.stream;
        let pre_norm = self.config.pre_norm();
        let drop = self.config.attention_probs_dropout_prob;
        let hidden_p = self.config.hidden_dropout_prob;
        // ModernBERT drops the attention output at the attention rate.
        let out_p = if pre_norm { drop } else { hidden_p };
        // dropout + residual add in one op where nothing sits between them.
        let a_out = layer.attn_out.forward(&ctx, s)?;
        let h1 = match &layer.attn_adapter {
            Some(ad) => (ad.forward(&s.dropout(&a_out, out_p)?, s)? + input)?,
            None => s.dropout_add(&a_out, input, out_p)?,
        };
        if pre_norm {
            let m = layer.out_norm.forward(&h1, s)?;
            let i = self.feed_forward_inner(&layer.intermediate.forward(&m, s)?)?;
            // ModernBERT's dropout is on the gated unit, before `Wo`.
            let mut o = layer.output.forward(&s.dropout(&i, hidden_p)?, s)?;
            if let Some(ad) = &layer.ffn_adapter {
                o = ad.forward(&o, s)?;
            }
            return Ok(((h1 + o)?, probs));
        }
        let attn_norm = layer
            .attn_norm
            .as_ref()
            .expect("post-norm layers have both norms");
        let h1 = attn_norm.forward(&h1, s)?;
        let i = self.feed_forward_inner(&layer.intermediate.forward(&h1, s)?)?;
        let o = layer.output.forward(&i, s)?;
        let h2 = match &layer.ffn_adapter {
            Some(ad) => (ad.forward(&s.dropout(&o, hidden_p)?, s)? + &h1)?,
            None => s.dropout_add(&o, &h1, hidden_p)?,
        };
        Ok((layer.out_norm.forward(&h2, s)?, probs))
    }

    /// The activation of the feed-forward unit on the intermediate
    /// layer's output: `act(u)`, or for a gated unit `act(u₁)·u₂` of its
    /// halves (ModernBERT's GeGLU).
    fn feed_forward_inner(&self, u: &Tensor) -> Result<Tensor> {
        let s = &self.stream;
        if !self.config.gated() {
            return activation(u, self.act, s);
        }
        let half = u.dim(D::Minus1)? / 2;
        let (x, gate) = (
            u.narrow(D::Minus1, 0, half)?,
            u.narrow(D::Minus1, half, half)?,
        );
        Ok((activation(&x.contiguous()?, self.act, s)? * gate)?)
    }

    /// The family's head before its label layer, when the model has the
    /// dense layer: `act(pooler.dense([CLS]))` (BERT's pooler: tanh), or
    /// ModernBERT's `norm(act(dense(pool)))` over the first token or the
    /// mean over `mask` `[B, L]`.
    pub fn pool(&self, last_hidden: &Tensor, mask: &Tensor) -> Result<Option<Tensor>> {
        match &self.pooler {
            None => Ok(None),
            Some(p) => Ok(Some(super::heads::family_pool(
                last_hidden,
                mask,
                p,
                self.pooler_norm.as_ref(),
                &self.head,
                &self.stream,
            )?)),
        }
    }
}

/// Copies `tensors` into the variables of `varmap` whose names `select`
/// accepts: every selected variable must be present with its shape, and
/// every tensor must be used (buffers in `IGNORED` aside).
pub fn load_into(
    varmap: &VarMap,
    tensors: &HashMap<String, Tensor>,
    path: &Path,
    select: &dyn Fn(&str) -> bool,
) -> Result<()> {
    let data = varmap.data().lock().unwrap();
    let vars: BTreeMap<&String, &candle_core::Var> =
        data.iter().filter(|(k, _)| select(k)).collect();
    let mut missing = Vec::new();
    let mut shapes = Vec::new();
    let mut dtypes = Vec::new();
    for (name, var) in &vars {
        match tensors.get(*name) {
            None => missing.push((*name).clone()),
            Some(t) if t.dims() != var.dims() => shapes.push(format!(
                "{name}: checkpoint {:?}, model {:?}",
                t.dims(),
                var.dims()
            )),
            // A parameter stored as integers is not a weight: casting it
            // would train on something else without a word.
            Some(t) if !t.dtype().is_float() => dtypes.push(format!("{name}: {:?}", t.dtype())),
            Some(_) => {}
        }
    }
    if !dtypes.is_empty() {
        return Err(format_err(
            path,
            format!(
                "parameters must be stored as a float dtype (f32, f16, bf16, f64); {} are not: {}",
                dtypes.len(),
                first_few(&dtypes, "; ")
            ),
        ));
    }
    // A NaN or an infinity in a weight would only show as a diverged first
    // step, blaming the learning rate.
    let mut bad = Vec::new();
    for name in vars.keys() {
        if let Some(t) = tensors.get(*name) {
            if t.dims() == vars[name].dims() && !all_finite(t)? {
                bad.push((*name).clone());
            }
        }
    }
    if !bad.is_empty() {
        return Err(format_err(
            path,
            format!(
                "{} tensors hold NaN or infinite values: {}",
                bad.len(),
                first_few(&bad, ", ")
            ),
        ));
    }
    let mut extra: Vec<&String> = tensors
        .keys()
        .filter(|k| !vars.contains_key(k) && !IGNORED.contains(&k.as_str()))
        .collect();
    extra.sort();
    if !missing.is_empty() || !shapes.is_empty() || !extra.is_empty() {
        let mut msg = String::from("checkpoint does not match the model:");
        if !missing.is_empty() {
            msg.push_str(&format!(
                "\n  missing ({}): {}",
                missing.len(),
                first_few(&missing, ", ")
            ));
        }
        if !extra.is_empty() {
            msg.push_str(&format!(
                "\n  unexpected ({}): {}",
                extra.len(),
                first_few(&extra, ", ")
            ));
        }
        if !shapes.is_empty() {
            msg.push_str(&format!(
                "\n  mis-shaped ({}): {}",
                shapes.len(),
                first_few(&shapes, "; ")
            ));
        }
        return Err(format_err(path, msg));
    }
    for (name, var) in vars {
        let t = &tensors[name];
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    Ok(())
}

/// Whether every element of `t` is finite: 0·x is 0 for a finite x and
/// NaN for an infinity or a NaN, so one sum tells (one read back).
pub fn all_finite(t: &Tensor) -> Result<bool> {
    let zeros = t.to_dtype(DType::F32)?.affine(0.0, 0.0)?;
    Ok(zeros.sum_all()?.to_scalar::<f32>()? == 0.0)
}

/// Checks a tensor read from a checkpoint against the parameter it will
/// replace: the same shape and dtype, and finite. The error names `path`
/// and `key`.
pub fn check_stored(path: &Path, key: &str, t: &Tensor, like: &Tensor) -> Result<()> {
    let why = if t.dims() != like.dims() {
        format!("has shape {:?}, the model's is {:?}", t.dims(), like.dims())
    } else if t.dtype() != like.dtype() {
        format!(
            "is stored as {:?}, the run's parameters are {:?}",
            t.dtype(),
            like.dtype()
        )
    } else if !all_finite(t)? {
        "holds NaN or infinite values".into()
    } else {
        return Ok(());
    };
    Err(format_err(path, format!("{key} {why}")))
}

/// The first five of `items` joined by `sep`, and how many more: an error
/// about a whole checkpoint stays a few lines long.
fn first_few<S: AsRef<str>>(items: &[S], sep: &str) -> String {
    const SHOWN: usize = 5;
    let head: Vec<&str> = items.iter().take(SHOWN).map(AsRef::as_ref).collect();
    let mut s = head.join(sep);
    if items.len() > SHOWN {
        s.push_str(&format!("{sep}… and {} more", items.len() - SHOWN));
    }
    s
}

/// The first (\[CLS\]) token's states `[B, H]` of `hidden` `[B, L, H]`.
pub fn first_token(hidden: &Tensor) -> Result<Tensor> {
    Ok(hidden.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?)
}

/// Mean of `hidden` `[B, L, H]` over the tokens where `mask` `[B, L]` is 1.
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.to_dtype(hidden.dtype())?.unsqueeze(2)?;
    let sum = hidden.broadcast_mul(&m)?.sum(1)?;
    let count = m.sum(1)?.clamp(1.0, f64::INFINITY)?;
    Ok(sum.broadcast_div(&count)?)
}

/// Row-wise L2 normalisation of `[B, H]`.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let n = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    Ok(x.broadcast_div(&n)?)
}

/// Copies a model directory (`config.json`, `tokenizer.json`,
/// `model.safetensors`) to `output` with the floating-point tensors cast to
/// `dtype`. The safetensors file is written to a temporary name and renamed.
pub fn convert_checkpoint(input: &Path, output: &Path, dtype: DType) -> Result<()> {
    if !input.is_dir() {
        return Err(io_err(
            input,
            "no such directory (--input must be a Hugging Face BERT directory)",
        ));
    }
    // Copying a file onto itself truncates it: the input would be lost.
    if output.exists() && std::fs::canonicalize(output).ok() == std::fs::canonicalize(input).ok() {
        return Err(io_err(
            output,
            "--output is the --input directory: write the converted copy elsewhere",
        ));
    }
    std::fs::create_dir_all(output).map_err(|e| io_err(output, e))?;
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(input.join(f), output.join(f)).map_err(|e| io_err(&input.join(f), e))?;
    }
    let path = input.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| format_err(&path, format!("not a readable safetensors file: {e}")))?;
    let cast: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, t)| {
            Ok((
                k,
                if t.dtype().is_float() {
                    t.to_dtype(dtype)?
                } else {
                    t
                },
            ))
        })
        .collect::<Result<_>>()?;
    let tmp = output.join("model.safetensors.tmp");
    candle_core::safetensors::save(&cast, &tmp).map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, output.join("model.safetensors")).map_err(|e| io_err(output, e))
}
