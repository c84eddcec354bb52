//! The encoder families loaded into the one BERT-shaped encoder: BERT,
//! RoBERTa, XLM-RoBERTa, ELECTRA (the discriminator), DistilBERT and
//! DeBERTa-v2/v3 share its layer (post-LayerNorm self-attention and
//! feed-forward blocks) and differ in names, positions, token types, an
//! embedding projection, DeBERTa's relative attention (see
//! [`super::bert::Relative`]) and the classification head. ModernBERT
//! puts the same parts in another order (pre-LayerNorm blocks with a final
//! LayerNorm, rotary positions, local and global layers, a gated
//! feed-forward unit; see [`super::config::BertConfig::pre_norm`]): its
//! fused `Wqkv` projection is split into the encoder's query, key and
//! value on loading and joined again on export, its pre-attention and
//! pre-feed-forward norms are the encoder's `attention.output.LayerNorm`
//! and `output.LayerNorm` (the first layer has no pre-attention norm), and
//! its final norm is `encoder.final_norm.LayerNorm`. A family maps its Hugging Face tensor names to
//! the encoder's (BERT's, without a prefix) and back, so every method
//! (perturbations of the embedding output, adapters, LoRA, mixout,
//! freezing) addresses the same layers in every family.
//!
//! The classification head of each family is one dense layer on the first
//! token, an activation and a linear layer to the labels: BERT's pooler
//! (tanh), RoBERTa's `classifier.dense` (tanh), ELECTRA's
//! `classifier.dense` (GELU), DistilBERT's `pre_classifier` (ReLU),
//! DeBERTa's `pooler.dense` (GELU); ModernBERT's head pools the first
//! token or the mean (`classifier_pooling`) and follows its dense layer and
//! activation by a LayerNorm (`head.norm`). The dense layer lives under
//! the encoder's name `pooler.dense` (ModernBERT's norm under
//! `pooler.LayerNorm`), the label layer under `classifier`.
use std::collections::HashMap;

use candle_core::Tensor;

use super::config::Activation;
use super::layers::{activation, Stream};
use crate::error::{param_err, Result};

/// An encoder family, from `config.json`'s `model_type`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Family {
    /// `bert` (and BERT-shaped models such as MiniLM).
    #[default]
    Bert,
    /// `roberta`: positions from the padding id + 1, one token type.
    Roberta,
    /// `xlm-roberta`: RoBERTa's layout with a multilingual vocabulary.
    XlmRoberta,
    /// `electra` (the discriminator): embeddings projected to the hidden size.
    Electra,
    /// `distilbert`: its own layer names and config keys, no token types.
    DistilBert,
    /// DeBERTa-v2 and v3: disentangled relative attention, no absolute
    /// positions (v3), no token types.
    DebertaV2,
    /// `modernbert`: pre-LayerNorm, rotary positions, alternating global
    /// and sliding-window attention, GeGLU, no biases, no token types.
    ModernBert,
}

/// The activation of a family's classification head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadActivation {
    /// BERT's pooler, RoBERTa's classification head.
    Tanh,
    /// The exact (erf) GELU: ELECTRA's and DeBERTa's heads.
    GeluErf,
    /// DistilBERT's `pre_classifier`.
    Relu,
    /// The tanh approximation of GELU (a ModernBERT head's `gelu_new`).
    GeluTanh,
    /// SiLU (a ModernBERT head's `silu`).
    Silu,
}

impl HeadActivation {
    /// The activation on `x` (the model's fused op where it has one).
    pub fn apply(self, x: &Tensor, s: &Stream) -> Result<Tensor> {
        match self {
            HeadActivation::Tanh => Ok(x.tanh()?),
            HeadActivation::GeluErf => activation(x, Activation::GeluErf, s),
            HeadActivation::Relu => activation(x, Activation::Relu, s),
            HeadActivation::GeluTanh => activation(x, Activation::GeluTanh, s),
            HeadActivation::Silu => activation(x, Activation::Silu, s),
        }
    }

    /// The activation of transformers' name for it (`ACT2FN`'s keys).
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "tanh" => HeadActivation::Tanh,
            "gelu" => HeadActivation::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" => HeadActivation::GeluTanh,
            "relu" => HeadActivation::Relu,
            "silu" | "swish" => HeadActivation::Silu,
            _ => return None,
        })
    }
}

/// A family's sequence-classification head before its label layer:
/// `norm(act(dense(pool(hidden))))`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HeadSpec {
    /// The activation after the dense layer.
    pub act: HeadActivation,
    /// Pool by the mean over real tokens (ModernBERT's `mean`), not the
    /// first token.
    pub mean: bool,
    /// The dense layer has a bias.
    pub bias: bool,
    /// A LayerNorm after the activation (ModernBERT): its ε and whether it
    /// has a bias.
    pub norm: Option<(f64, bool)>,
}

/// DistilBERT's layer names and the encoder's, inside `…layer.{i}.`.
const DISTILBERT_LAYER: [(&str, &str); 8] = [
    ("attention.q_lin.", "attention.self.query."),
    ("attention.k_lin.", "attention.self.key."),
    ("attention.v_lin.", "attention.self.value."),
    ("attention.out_lin.", "attention.output.dense."),
    ("sa_layer_norm.", "attention.output.LayerNorm."),
    ("ffn.lin1.", "intermediate.dense."),
    ("ffn.lin2.", "output.dense."),
    ("output_layer_norm.", "output.LayerNorm."),
];

/// DeBERTa's layer names and the encoder's, inside `…layer.{i}.`.
const DEBERTA_LAYER: [(&str, &str); 3] = [
    ("attention.self.query_proj.", "attention.self.query."),
    ("attention.self.key_proj.", "attention.self.key."),
    ("attention.self.value_proj.", "attention.self.value."),
];

/// ModernBERT's layer names and the encoder's, inside `…layers.{i}.`
/// (`attn.Wqkv` is split into query, key and value by
/// [`Family::internal_names`]).
const MODERNBERT_LAYER: [(&str, &str); 6] = [
    ("attn.Wqkv.", "attention.self.qkv."),
    ("attn.Wo.", "attention.output.dense."),
    ("attn_norm.", "attention.output.LayerNorm."),
    ("mlp.Wi.", "intermediate.dense."),
    ("mlp.Wo.", "output.dense."),
    ("mlp_norm.", "output.LayerNorm."),
];

/// ModernBERT's names outside its layers and the encoder's.
const MODERNBERT_OTHER: [(&str, &str); 3] = [
    ("embeddings.tok_embeddings.", "embeddings.word_embeddings."),
    ("embeddings.norm.", "embeddings.LayerNorm."),
    ("final_norm.", "encoder.final_norm.LayerNorm."),
];

/// The encoder's name part of a fused query-key-value projection, while
/// a checkpoint's tensors are renamed.
const QKV: &str = ".attention.self.qkv.";

/// The three parts of [`QKV`], in the order they are stacked.
const QKV_PARTS: [&str; 3] = [
    ".attention.self.query.",
    ".attention.self.key.",
    ".attention.self.value.",
];

/// The model types that load.
pub const SUPPORTED: &str =
    "bert, roberta, xlm-roberta, electra, distilbert, deberta-v2, modernbert";

impl Family {
    /// The family of `config.json`'s `model_type`; an error naming the
    /// supported types for any other.
    pub fn from_model_type(t: &str) -> Result<Self> {
        Ok(match t {
            "bert" => Family::Bert,
            "roberta" => Family::Roberta,
            "xlm-roberta" => Family::XlmRoberta,
            "electra" => Family::Electra,
            "distilbert" => Family::DistilBert,
            "deberta-v2" => Family::DebertaV2,
            "modernbert" => Family::ModernBert,
            other => {
                return Err(param_err(
                    "model",
                    format!(
                        "model_type {other:?} is not supported: tunefuse loads {SUPPORTED} \
                         (DeBERTa v1 is not implemented yet)"
                    ),
                ))
            }
        })
    }

    /// The prefix of the encoder's tensors in a checkpoint with a task head.
    pub fn prefix(self) -> &'static str {
        match self {
            Family::Bert => "bert.",
            Family::Roberta | Family::XlmRoberta => "roberta.",
            Family::Electra => "electra.",
            Family::DistilBert => "distilbert.",
            Family::DebertaV2 => "deberta.",
            Family::ModernBert => "model.",
        }
    }

    /// transformers' sequence-classification class.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Bert => "BertForSequenceClassification",
            Family::Roberta => "RobertaForSequenceClassification",
            Family::XlmRoberta => "XLMRobertaForSequenceClassification",
            Family::Electra => "ElectraForSequenceClassification",
            Family::DistilBert => "DistilBertForSequenceClassification",
            Family::DebertaV2 => "DebertaV2ForSequenceClassification",
            Family::ModernBert => "ModernBertForSequenceClassification",
        }
    }

    /// The modules of the family's classification head in transformers'
    /// class: what a PEFT adapter saves beside its LoRA matrices.
    pub fn head_modules(self) -> &'static [&'static str] {
        match self {
            Family::Bert => &["bert.pooler", "classifier"],
            Family::Roberta | Family::XlmRoberta | Family::Electra => &["classifier"],
            Family::DistilBert => &["pre_classifier", "classifier"],
            Family::DebertaV2 => &["pooler", "classifier"],
            Family::ModernBert => &["head", "classifier"],
        }
    }

    /// The position of the first token: RoBERTa counts positions from the
    /// padding id + 1 (its `create_position_ids_from_input_ids`, for
    /// right-padded rows); the others from 0.
    pub fn position_offset(self, pad_token_id: u32) -> usize {
        match self {
            Family::Roberta | Family::XlmRoberta => pad_token_id as usize + 1,
            _ => 0,
        }
    }

    /// The activation of the family's classification head (ModernBERT's
    /// default; its configuration names its own, see
    /// [`super::config::BertConfig::head`]).
    pub fn head_activation(self) -> HeadActivation {
        match self {
            Family::Bert | Family::Roberta | Family::XlmRoberta => HeadActivation::Tanh,
            Family::Electra | Family::DebertaV2 | Family::ModernBert => HeadActivation::GeluErf,
            Family::DistilBert => HeadActivation::Relu,
        }
    }

    /// The head's dense layer in a checkpoint with a task head (outside the
    /// prefix); BERT's pooler is inside it.
    fn head_dense(self) -> Option<&'static str> {
        match self {
            Family::Bert => None,
            Family::Roberta | Family::XlmRoberta | Family::Electra => Some("classifier.dense."),
            Family::DistilBert => Some("pre_classifier."),
            // ContextPooler, outside the `deberta.` prefix.
            Family::DebertaV2 => Some("pooler.dense."),
            // The prediction head, shared by the masked-LM and the
            // classification classes.
            Family::ModernBert => Some("head.dense."),
        }
    }

    /// The LayerNorm of the head after its activation (ModernBERT's).
    fn head_norm(self) -> Option<&'static str> {
        (self == Family::ModernBert).then_some("head.norm.")
    }

    /// Whether the family stores query, key and value as one tensor
    /// (ModernBERT's `Wqkv`): a part of it has no module name of its own.
    pub fn fused_qkv(self) -> bool {
        self == Family::ModernBert
    }

    /// The label layer in a checkpoint with a task head.
    fn head_out(self) -> &'static str {
        match self {
            Family::Roberta | Family::XlmRoberta | Family::Electra => "classifier.out_proj.",
            _ => "classifier.",
        }
    }

    /// The encoder's name of a tensor named `name` inside the family's
    /// prefix (or in a checkpoint without a task head).
    pub fn body_to_internal(self, name: &str) -> String {
        for (theirs, ours) in self.other_names() {
            if let Some(param) = name.strip_prefix(theirs) {
                return format!("{ours}{param}");
            }
        }
        if let Some((layers, map)) = self.layer_names() {
            if let Some(rest) = name.strip_prefix(layers) {
                if let Some((i, tail)) = rest.split_once('.') {
                    for (theirs, ours) in map {
                        if let Some(param) = tail.strip_prefix(theirs) {
                            return format!("encoder.layer.{i}.{ours}{param}");
                        }
                    }
                }
            }
        }
        name.to_string()
    }

    /// The family's names outside its layers that differ from BERT's
    /// (theirs, the encoder's).
    fn other_names(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Family::ModernBert => &MODERNBERT_OTHER,
            _ => &[],
        }
    }

    /// Where a family's layers are and the names that differ from BERT's.
    fn layer_names(self) -> Option<(&'static str, &'static [(&'static str, &'static str)])> {
        match self {
            Family::DistilBert => Some(("transformer.layer.", &DISTILBERT_LAYER)),
            Family::DebertaV2 => Some(("encoder.layer.", &DEBERTA_LAYER)),
            Family::ModernBert => Some(("layers.", &MODERNBERT_LAYER)),
            _ => None,
        }
    }

    /// The encoder's name of a head tensor outside the prefix: the head's
    /// dense layer becomes `pooler.dense.*`; the label layer and other
    /// heads (masked LM, ELECTRA's discriminator) have none.
    pub fn head_to_internal(self, name: &str) -> Option<String> {
        if let Some(p) = self.head_norm().and_then(|n| name.strip_prefix(n)) {
            return Some(format!("pooler.LayerNorm.{p}"));
        }
        let d = self.head_dense()?;
        name.strip_prefix(d).map(|p| format!("pooler.dense.{p}"))
    }

    /// A checkpoint's tensors under the encoder's names. A checkpoint of a
    /// model with a task head (`BertForSequenceClassification`,
    /// `RobertaForMaskedLM`, a tunefuse export) keeps the encoder under
    /// the family's prefix (`bert.`, `roberta.`, …); its sequence-
    /// classification head's dense layer is kept as `pooler.dense`, and the
    /// label layer and other heads (masked LM, ELECTRA's discriminator)
    /// are left out, as transformers' base models do. A base model's own
    /// pooler gives way to the head's dense layer when a checkpoint has
    /// both (RoBERTa).
    ///
    /// A fused query-key-value tensor (ModernBERT's `Wqkv`, `[3·H, …]`) is
    /// split into three along its first dimension; one whose first
    /// dimension is not a multiple of 3 is an error naming it.
    pub fn internal_names(
        self,
        tensors: HashMap<String, Tensor>,
    ) -> Result<HashMap<String, Tensor>> {
        let prefix = self.prefix();
        let headed = tensors.keys().any(|k| k.starts_with(prefix));
        let head_dense = headed && tensors.keys().any(|k| self.head_to_internal(k).is_some());
        let mut out = HashMap::with_capacity(tensors.len());
        for (k, v) in tensors {
            let name = match k.strip_prefix(prefix) {
                Some(body) => self.body_to_internal(body),
                None if headed => match self.head_to_internal(&k) {
                    Some(n) => n,
                    None => continue,
                },
                None => self.body_to_internal(&k),
            };
            if head_dense && name.starts_with("pooler.") && k.starts_with(prefix) {
                continue;
            }
            if name.contains(QKV) {
                let rows = v.dim(0)?;
                if rows % 3 != 0 {
                    return Err(param_err(
                        "model",
                        format!("{k} has {rows} rows: a fused query-key-value projection has 3·H"),
                    ));
                }
                for (i, part) in QKV_PARTS.iter().enumerate() {
                    let t = v.narrow(0, i * rows / 3, rows / 3)?.contiguous()?;
                    out.insert(name.replace(QKV, part), t);
                }
            } else {
                out.insert(name, v);
            }
        }
        Ok(out)
    }

    /// The encoder's tensors under the Hugging Face names of the family's
    /// sequence-classification model ([`Family::to_hf`]), with query, key
    /// and value joined into one tensor where the family fuses them. A
    /// part without its two siblings is an error naming it.
    pub fn tensors_to_hf(self, tensors: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>> {
        if !self.fused_qkv() {
            return Ok(tensors
                .into_iter()
                .map(|(k, v)| (self.to_hf(&k), v))
                .collect());
        }
        let mut parts: HashMap<String, [Option<Tensor>; 3]> = HashMap::new();
        let mut out = Vec::with_capacity(tensors.len());
        for (k, v) in tensors {
            match QKV_PARTS.iter().position(|p| k.contains(p)) {
                Some(i) => {
                    let fused = k.replace(QKV_PARTS[i], QKV);
                    parts.entry(fused).or_default()[i] = Some(v);
                }
                None => out.push((self.to_hf(&k), v)),
            }
        }
        for (fused, [q, k, v]) in parts {
            let (Some(q), Some(k), Some(v)) = (q, k, v) else {
                return Err(param_err(
                    "export",
                    format!("{fused}: query, key and value must all be present to join them"),
                ));
            };
            out.push((self.to_hf(&fused), Tensor::cat(&[q, k, v], 0)?));
        }
        Ok(out)
    }

    /// The Hugging Face name, in the family's sequence-classification
    /// model, of the encoder's tensor `internal`.
    /// For a family that fuses query, key and value, the name of a part
    /// is that of the fused tensor (see [`Family::tensors_to_hf`]).
    pub fn to_hf(self, internal: &str) -> String {
        if self.fused_qkv() {
            if let Some(p) = QKV_PARTS.iter().find(|p| internal.contains(**p)) {
                return self.to_hf(&internal.replace(p, QKV));
            }
        }
        if let (Some(n), Some(p)) = (self.head_norm(), internal.strip_prefix("pooler.LayerNorm.")) {
            return format!("{n}{p}");
        }
        for (theirs, ours) in self.other_names() {
            if let Some(param) = internal.strip_prefix(ours) {
                return format!("{}{theirs}{param}", self.prefix());
            }
        }
        if let Some(p) = internal.strip_prefix("pooler.dense.") {
            return match self.head_dense() {
                Some(d) => format!("{d}{p}"),
                None => format!("{}pooler.dense.{p}", self.prefix()),
            };
        }
        if let Some(p) = internal.strip_prefix("classifier.") {
            return format!("{}{p}", self.head_out());
        }
        if let Some((layers, map)) = self.layer_names() {
            if let Some(rest) = internal.strip_prefix("encoder.layer.") {
                if let Some((i, tail)) = rest.split_once('.') {
                    for (theirs, ours) in map {
                        if let Some(param) = tail.strip_prefix(ours) {
                            return format!("{}{layers}{i}.{theirs}{param}", self.prefix());
                        }
                    }
                }
            }
        }
        format!("{}{internal}", self.prefix())
    }
}
