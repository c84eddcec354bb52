//! BERT configuration, read from a Hugging Face `config.json`.
use std::path::Path;

use serde::Deserialize;

use super::family::{Family, HeadActivation, HeadSpec};
use crate::error::{Error, Result};

/// The activation of the feed-forward block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `gelu` in Hugging Face: the exact, erf-based GELU.
    GeluErf,
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    /// `relu`.
    Relu,
    /// `silu` / `swish`.
    Silu,
}

/// How one layer attends beyond BERT's global, position-free attention.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LayerAttention {
    /// The rotary base θ when queries and keys are rotated (ModernBERT).
    pub rotary_theta: Option<f64>,
    /// A sliding window: a token attends to the tokens at most this many
    /// positions away (ModernBERT's local layers).
    pub half_window: Option<usize>,
}

/// The fields of a Hugging Face `config.json` the encoder uses, for every
/// family of [`super::family::Family`] (DistilBERT's own spellings, `dim`,
/// `n_layers`, …, read as aliases).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct BertConfig {
    /// `bert`, `roberta`, `xlm-roberta`, `electra` or `distilbert`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Rows of the word-embedding table.
    pub vocab_size: usize,
    /// H, the width of every layer (DistilBERT: `dim`).
    #[serde(alias = "dim")]
    pub hidden_size: usize,
    /// The number of encoder layers (DistilBERT: `n_layers`).
    #[serde(alias = "n_layers")]
    pub num_hidden_layers: usize,
    /// Heads per attention layer; H must be a multiple (DistilBERT: `n_heads`).
    #[serde(alias = "n_heads")]
    pub num_attention_heads: usize,
    /// I, the feed-forward width (DistilBERT: `hidden_dim`).
    #[serde(alias = "hidden_dim")]
    pub intermediate_size: usize,
    /// ELECTRA: the width of the embeddings, projected to `hidden_size`
    /// by `embeddings_project` when the two differ.
    #[serde(default)]
    pub embedding_size: Option<usize>,
    /// DistilBERT's fixed sinusoidal positions (not supported).
    #[serde(default)]
    pub sinusoidal_pos_embds: bool,
    /// The feed-forward activation: `gelu`, `gelu_new`, `relu`, `silu`
    /// (DistilBERT: `activation`; ModernBERT: `hidden_activation`, the
    /// activation of its gated unit).
    #[serde(
        default = "default_act",
        alias = "activation",
        alias = "hidden_activation"
    )]
    pub hidden_act: String,
    /// Dropout on the embeddings and every residual branch, in [0, 1).
    #[serde(default = "default_dropout", alias = "dropout")]
    pub hidden_dropout_prob: f64,
    /// Dropout on the attention probabilities, in [0, 1).
    #[serde(default = "default_dropout", alias = "attention_dropout")]
    pub attention_probs_dropout_prob: f64,
    /// Rows of the position table (RoBERTa's start after the padding id).
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    /// Rows of the token-type table (0: none, DistilBERT and DeBERTa-v3).
    #[serde(default = "default_types")]
    pub type_vocab_size: usize,
    /// ε of every LayerNorm (ModernBERT: `norm_eps`).
    #[serde(default = "default_eps", alias = "norm_eps")]
    pub layer_norm_eps: f64,
    /// The padding token's id.
    #[serde(default)]
    pub pad_token_id: u32,
    /// DeBERTa-v2/v3: disentangled relative attention.
    #[serde(default)]
    pub relative_attention: bool,
    /// DeBERTa: log-bucketed relative positions (0 or less: none).
    #[serde(default)]
    pub position_buckets: i64,
    /// DeBERTa: the largest relative distance (below 1: max_position_embeddings).
    #[serde(default = "minus_one")]
    pub max_relative_positions: i64,
    /// DeBERTa: the relative terms, `["p2c", "c2p"]` or `"p2c|c2p"`.
    #[serde(default)]
    pub pos_att_type: Option<serde_json::Value>,
    /// DeBERTa: absolute position embeddings added to the input (v3: false).
    #[serde(default)]
    pub position_biased_input: Option<bool>,
    /// DeBERTa: `layer_norm` normalises the relative embeddings.
    #[serde(default)]
    pub norm_rel_ebd: Option<String>,
    /// DeBERTa: the relative terms use the layer's own query and key
    /// projections (the only form supported).
    #[serde(default)]
    pub share_att_key: bool,
    /// DeBERTa's convolution beside the first layer (not supported).
    #[serde(default)]
    pub conv_kernel_size: usize,
    /// ModernBERT: every n-th layer (from the first) attends globally,
    /// the others within the sliding window (when `layer_types` is absent).
    #[serde(default)]
    pub global_attn_every_n_layers: usize,
    /// ModernBERT: the sliding window's width; a token of a local layer
    /// attends to the tokens at most `local_attention / 2` positions away.
    #[serde(default)]
    pub local_attention: usize,
    /// ModernBERT: `full_attention` or `sliding_attention` per layer.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// ModernBERT: the rotary base per layer type
    /// (`{"full_attention": {"rope_theta": …, "rope_type": "default"}, …}`).
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    /// ModernBERT (older configurations): the global layers' rotary base.
    #[serde(default)]
    pub global_rope_theta: Option<f64>,
    /// ModernBERT (older configurations): the local layers' rotary base.
    #[serde(default)]
    pub local_rope_theta: Option<f64>,
    /// Whether the LayerNorms have a bias (ModernBERT's default: no).
    #[serde(default)]
    pub norm_bias: Option<bool>,
    /// Whether the attention projections have biases (ModernBERT's default: no).
    #[serde(default)]
    pub attention_bias: Option<bool>,
    /// Whether the feed-forward layers have biases (ModernBERT's default: no).
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    /// Whether the classification head's dense layer has a bias
    /// (ModernBERT's default: no).
    #[serde(default)]
    pub classifier_bias: Option<bool>,
    /// ModernBERT: the head pools `cls` (the first token) or `mean`.
    #[serde(default)]
    pub classifier_pooling: Option<String>,
    /// ModernBERT: the activation of the head's dense layer.
    #[serde(default)]
    pub classifier_activation: Option<String>,
    /// ModernBERT: dropout on the embeddings (the residual branches take
    /// `mlp_dropout`, read as `hidden_dropout_prob`).
    #[serde(default)]
    pub embedding_dropout: Option<f64>,
}

impl BertConfig {
    /// How many parameters a BERT of this shape has (the pooler included),
    /// saturating: the size a model built from this configuration allocates.
    pub fn parameter_count(&self) -> u128 {
        let (h, i) = (self.hidden_size as u128, self.intermediate_size as u128);
        let positions = if self.absolute_positions() {
            self.max_position_embeddings as u128
        } else {
            0
        };
        // A gated unit's first layer has two halves.
        let i_in = if self.gated() { 2 * i } else { i };
        let embeddings = (self.vocab_size as u128 + positions + self.type_vocab_size as u128)
            .saturating_mul(h)
            .saturating_add(2 * h);
        let layer = (4 * (h * h + h) + 2 * h)
            .saturating_add(i_in.saturating_mul(h).saturating_add(i_in))
            .saturating_add(h.saturating_mul(i).saturating_add(h))
            .saturating_add(2 * h);
        embeddings
            .saturating_add(layer.saturating_mul(self.num_hidden_layers as u128))
            .saturating_add(h * h + h)
    }
}

impl BertConfig {
    /// The sizes that set the parameter count, for error messages: a
    /// mistyped field is the usual reason a model is far too large.
    pub fn sizes(&self) -> String {
        format!(
            "hidden_size {}, intermediate_size {}, num_hidden_layers {}, vocab_size {}, \
             max_position_embeddings {}",
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.vocab_size,
            self.max_position_embeddings
        )
    }

    /// Bytes a fine-tuning run holds per parameter on the host, before any
    /// activation: f32 weights, their gradients, AdamW's two moments and
    /// the pretrained copy the run keeps (for RecAdam, Bregman and the
    /// analyses).
    pub const TRAIN_BYTES_PER_PARAM: u128 = 20;

    /// Refuses a model whose training state alone needs more than
    /// `available` bytes, naming both: an allocation that large would abort
    /// the process rather than fail with an error. `config` is the file
    /// the sizes come from.
    pub fn check_fits_in(&self, available: u64, config: &Path) -> Result<()> {
        let needed = self.parameter_count() * Self::TRAIN_BYTES_PER_PARAM;
        if needed <= u128::from(available) {
            return Ok(());
        }
        Err(Error::Format {
            path: config.display().to_string(),
            msg: format!(
                "a model of {} parameters ({}) needs about {:.1} GB of memory to fine-tune \
                 (weights, gradients, AdamW's moments, the pretrained copy) and {:.1} GB are \
                 available; use a smaller model or a machine with more memory",
                self.parameter_count(),
                self.sizes(),
                needed as f64 / 1e9,
                available as f64 / 1e9
            ),
        })
    }
}

/// The host memory available to a new allocation (`MemAvailable` of
/// `/proc/meminfo`), where the system says.
pub fn available_host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn minus_one() -> i64 {
    -1
}
fn default_model_type() -> String {
    "bert".into()
}
fn default_act() -> String {
    "gelu".into()
}
fn default_dropout() -> f64 {
    0.1
}
fn default_positions() -> usize {
    512
}
fn default_types() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

impl BertConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.display().to_string(),
            msg: e.to_string(),
        })?;
        let format = |e: serde_json::Error| Error::Format {
            path: path.display().to_string(),
            msg: e.to_string(),
        };
        let mut raw: serde_json::Value = serde_json::from_str(&text).map_err(format)?;
        if raw["model_type"] == "modernbert" {
            // ModernBERT's residual dropout is `mlp_dropout`, and its
            // dropouts default to 0 (BERT's to 0.1).
            if let Some(o) = raw.as_object_mut() {
                let mlp = o.get("mlp_dropout").cloned().unwrap_or(0.0.into());
                o.entry("hidden_dropout_prob").or_insert(mlp);
                o.entry("attention_dropout").or_insert(0.0.into());
            }
        }
        let mut cfg: BertConfig = serde_json::from_value(raw).map_err(format)?;
        // DistilBERT and ModernBERT have no token types.
        if matches!(cfg.model_type.as_str(), "distilbert" | "modernbert") {
            cfg.type_vocab_size = 0;
        }
        cfg.validate().map_err(|e| Error::Format {
            path: path.display().to_string(),
            msg: e.to_string(),
        })?;
        Ok(cfg)
    }

    /// BERT-base (110M parameters), for benchmarks without weights.
    pub fn bert_base() -> Self {
        Self {
            model_type: default_model_type(),
            embedding_size: None,
            sinusoidal_pos_embds: false,
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: default_act(),
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
            relative_attention: false,
            position_buckets: 0,
            max_relative_positions: -1,
            pos_att_type: None,
            position_biased_input: None,
            norm_rel_ebd: None,
            share_att_key: false,
            conv_kernel_size: 0,
            global_attn_every_n_layers: 0,
            local_attention: 0,
            layer_types: None,
            rope_parameters: None,
            global_rope_theta: None,
            local_rope_theta: None,
            norm_bias: None,
            attention_bias: None,
            mlp_bias: None,
            classifier_bias: None,
            classifier_pooling: None,
            classifier_activation: None,
            embedding_dropout: None,
        }
    }

    /// DeBERTa's relative terms: (content→position, position→content).
    pub fn relative_terms(&self) -> Result<(bool, bool)> {
        let names: Vec<String> = match &self.pos_att_type {
            None | Some(serde_json::Value::Null) => vec![],
            Some(serde_json::Value::String(s)) => {
                s.split('|').map(|t| t.trim().to_lowercase()).collect()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_lowercase))
                .collect(),
            Some(other) => {
                return Err(Error::Param {
                    op: "bert config",
                    msg: format!("pos_att_type must be a list or \"p2c|c2p\", got {other}"),
                })
            }
        };
        if let Some(bad) = names.iter().find(|n| !["c2p", "p2c"].contains(&n.as_str())) {
            return Err(Error::Param {
                op: "bert config",
                msg: format!("pos_att_type {bad:?} is not supported (c2p, p2c)"),
            });
        }
        Ok((
            names.iter().any(|n| n == "c2p"),
            names.iter().any(|n| n == "p2c"),
        ))
    }

    /// Whether absolute position embeddings are added to the input (all
    /// families but DeBERTa with `position_biased_input = false`).
    pub fn absolute_positions(&self) -> bool {
        !self.modern() && self.position_biased_input.unwrap_or(true)
    }

    /// ModernBERT: pre-LayerNorm blocks, rotary positions, a gated
    /// feed-forward unit, bias-free layers by default.
    fn modern(&self) -> bool {
        self.model_type == "modernbert"
    }

    /// Whether each block normalises its input (ModernBERT: pre-LayerNorm,
    /// with a final LayerNorm after the last layer) rather than its output
    /// after the residual (BERT's post-LayerNorm).
    pub fn pre_norm(&self) -> bool {
        self.modern()
    }

    /// Whether the feed-forward unit is gated (ModernBERT's GeGLU):
    /// `intermediate.dense` has 2·I outputs, `act(first half) · second half`.
    pub fn gated(&self) -> bool {
        self.modern()
    }

    /// Whether the LayerNorms have biases (`norm_bias`; ModernBERT: no).
    pub fn norm_has_bias(&self) -> bool {
        self.norm_bias.unwrap_or(!self.modern())
    }

    /// Whether the attention projections have biases (`attention_bias`).
    pub fn attention_has_bias(&self) -> bool {
        self.attention_bias.unwrap_or(!self.modern())
    }

    /// Whether the feed-forward layers have biases (`mlp_bias`).
    pub fn mlp_has_bias(&self) -> bool {
        self.mlp_bias.unwrap_or(!self.modern())
    }

    /// How layer `i` attends: rotary positions (ModernBERT, with the base
    /// of the layer's type) and a sliding window (its local layers).
    pub fn layer_attention(&self, i: usize) -> Result<LayerAttention> {
        if !self.modern() {
            return Ok(LayerAttention::default());
        }
        let bad = |msg: String| Error::Param {
            op: "bert config",
            msg,
        };
        let kind = match &self.layer_types {
            Some(t) => t
                .get(i)
                .ok_or_else(|| {
                    bad(format!(
                        "layer_types has {} entries for {} layers",
                        t.len(),
                        self.num_hidden_layers
                    ))
                })?
                .clone(),
            None if self.global_attn_every_n_layers == 0 => {
                return Err(bad(
                    "ModernBERT needs layer_types or global_attn_every_n_layers > 0".into(),
                ))
            }
            None if i.is_multiple_of(self.global_attn_every_n_layers) => "full_attention".into(),
            None => "sliding_attention".into(),
        };
        let (global, fallback) = match kind.as_str() {
            "full_attention" => (true, self.global_rope_theta.unwrap_or(160_000.0)),
            "sliding_attention" => (false, self.local_rope_theta.unwrap_or(10_000.0)),
            other => {
                return Err(bad(format!(
                    "layer_types[{i}] is {other:?}: full_attention or sliding_attention"
                )))
            }
        };
        let theta = match self.rope_parameters.as_ref().map(|r| &r[kind.as_str()]) {
            None | Some(serde_json::Value::Null) => fallback,
            Some(p) => {
                let t = p["rope_type"].as_str().unwrap_or("default");
                if t != "default" {
                    return Err(bad(format!(
                        "rope_parameters.{kind}.rope_type {t:?} is not supported (default)"
                    )));
                }
                p["rope_theta"].as_f64().unwrap_or(fallback)
            }
        };
        if !(theta.is_finite() && theta > 1.0) {
            return Err(bad(format!(
                "the rotary base of {kind} must be a finite number > 1, got {theta}"
            )));
        }
        if !global && (self.local_attention < 2 || self.local_attention % 2 == 1) {
            return Err(bad(format!(
                "local_attention must be an even number ≥ 2, got {}",
                self.local_attention
            )));
        }
        Ok(LayerAttention {
            rotary_theta: Some(theta),
            half_window: (!global).then_some(self.local_attention / 2),
        })
    }

    /// The family's sequence-classification head: what it pools, the
    /// dense layer's bias and activation, and ModernBERT's LayerNorm.
    pub fn head(&self) -> Result<HeadSpec> {
        let family = self.family()?;
        if !self.modern() {
            return Ok(HeadSpec {
                act: family.head_activation(),
                mean: false,
                bias: true,
                norm: None,
            });
        }
        let bad = |msg: String| Error::Param {
            op: "bert config",
            msg,
        };
        let mean = match self.classifier_pooling.as_deref().unwrap_or("cls") {
            "cls" => false,
            "mean" => true,
            other => {
                return Err(bad(format!(
                    "classifier_pooling {other:?} is not supported (cls, mean)"
                )))
            }
        };
        let name = self.classifier_activation.as_deref().unwrap_or("gelu");
        let act = HeadActivation::from_name(name).ok_or_else(|| {
            bad(format!(
                "classifier_activation {name:?} is not supported (gelu, gelu_new, relu, silu, tanh)"
            ))
        })?;
        Ok(HeadSpec {
            act,
            mean,
            bias: self.classifier_bias.unwrap_or(false),
            norm: Some((self.layer_norm_eps, self.norm_has_bias())),
        })
    }

    /// DeBERTa: the largest relative distance (`max_relative_positions`,
    /// or `max_position_embeddings` when below 1).
    pub fn relative_max_position(&self) -> usize {
        if self.max_relative_positions > 0 {
            self.max_relative_positions as usize
        } else {
            self.max_position_embeddings
        }
    }

    /// DeBERTa: the number of relative-embedding rows per side (the
    /// buckets, or every distance without them).
    pub fn relative_span(&self) -> usize {
        if self.position_buckets > 0 {
            self.position_buckets as usize
        } else {
            self.relative_max_position()
        }
    }

    /// The feed-forward activation of `hidden_act`; an error naming the
    /// supported ones for any other.
    pub fn activation(&self) -> Result<Activation> {
        match self.hidden_act.as_str() {
            "gelu" => Ok(Activation::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
            "relu" => Ok(Activation::Relu),
            "silu" | "swish" => Ok(Activation::Silu),
            other => Err(Error::Param {
                op: "bert config",
                msg: format!("unsupported hidden_act {other:?} (gelu, gelu_new, relu, silu)"),
            }),
        }
    }

    /// The encoder family of `model_type`.
    pub fn family(&self) -> Result<Family> {
        Family::from_model_type(&self.model_type)
    }

    /// The width of the embedding tables (ELECTRA's may be narrower than
    /// the encoder).
    pub fn embedding_width(&self) -> usize {
        self.embedding_size.unwrap_or(self.hidden_size)
    }

    /// Checks the sizes (positive, H a multiple of the heads), the
    /// dropouts, ε, the activation and the family's own settings; each
    /// error names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| {
            Err(Error::Param {
                op: "bert config",
                msg,
            })
        };
        let family = self.family()?;
        if family == Family::DebertaV2 {
            if self.relative_attention && !self.share_att_key {
                return bad(
                    "DeBERTa with share_att_key = false (separate position projections) is \
                     not supported; DeBERTa-v3 shares them"
                        .into(),
                );
            }
            if self.conv_kernel_size > 0 {
                return bad(
                    "DeBERTa's convolution layer (conv_kernel_size > 0) is not supported".into(),
                );
            }
            if self.embedding_size.is_some_and(|e| e != self.hidden_size) {
                return bad("DeBERTa with embedding_size != hidden_size is not supported".into());
            }
            self.relative_terms()?;
        }
        if self.modern() {
            if self.hidden_size / self.num_attention_heads.max(1) % 2 == 1 {
                return bad(format!(
                    "rotary positions need an even head size, got hidden_size {} / {} heads",
                    self.hidden_size, self.num_attention_heads
                ));
            }
            for i in 0..self.num_hidden_layers {
                self.layer_attention(i)?;
            }
            self.head()?;
            if let Some(p) = self.embedding_dropout {
                if !(0.0..1.0).contains(&p) {
                    return bad(format!("embedding_dropout must be in [0, 1), got {p}"));
                }
            }
        }
        if self.sinusoidal_pos_embds {
            return bad(
                "sinusoidal_pos_embds (DistilBERT's fixed positions) is not supported".into(),
            );
        }
        if self.embedding_size == Some(0) {
            return bad("embedding_size must be positive".into());
        }
        if self.hidden_size == 0
            || self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return bad(format!(
                "hidden_size {} must be a positive multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        for (name, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
        ] {
            if !(0.0..1.0).contains(&p) {
                return bad(format!("{name} must be in [0, 1), got {p}"));
            }
        }
        if self.vocab_size == 0
            || self.num_hidden_layers == 0
            || self.intermediate_size == 0
            || self.max_position_embeddings == 0
        {
            return bad("vocab_size, num_hidden_layers, intermediate_size and max_position_embeddings must be positive".into());
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps.is_finite()) {
            return bad(format!(
                "layer_norm_eps must be a finite number > 0, got {}",
                self.layer_norm_eps
            ));
        }
        self.activation().map(|_| ())
    }
}
