//! The encoder families loaded into the one BERT-shaped encoder: BERT,
//! RoBERTa, XLM-RoBERTa, ELECTRA (the discriminator), DistilBERT and
//! DeBERTa-v2/v3 share its layer (post-LayerNorm self-attention and
//! feed-forward blocks) and differ in names, positions, token types, an
//! embedding projection, DeBERTa's relative attention (see
//! [`super::bert::Relative`]) and the classification head. A family maps its Hugging Face tensor names to
//! the encoder's (BERT's, without a prefix) and back, so every method
//! (perturbations of the embedding output, adapters, LoRA, mixout,
//! freezing) addresses the same layers in every family.
//!
//! The classification head of each family is one dense layer on the first
//! token, an activation and a linear layer to the labels: BERT's pooler
//! (tanh), RoBERTa's `classifier.dense` (tanh), ELECTRA's
//! `classifier.dense` (GELU), DistilBERT's `pre_classifier` (ReLU),
//! DeBERTa's `pooler.dense` (GELU). The
//! dense layer lives under the encoder's name `pooler.dense`, the label
//! layer under `classifier`.
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
}

impl HeadActivation {
    /// The activation on `x` (the model's fused op where it has one).
    pub fn apply(self, x: &Tensor, s: &Stream) -> Result<Tensor> {
        match self {
            HeadActivation::Tanh => Ok(x.tanh()?),
            HeadActivation::GeluErf => activation(x, Activation::GeluErf, s),
            HeadActivation::Relu => activation(x, Activation::Relu, s),
        }
    }
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

/// The model types that load.
pub const SUPPORTED: &str = "bert, roberta, xlm-roberta, electra, distilbert, deberta-v2";

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
            other => {
                return Err(param_err(
                    "model",
                    format!(
                        "model_type {other:?} is not supported: tunefuse loads {SUPPORTED} \
                         (ModernBERT and DeBERTa v1 are not implemented yet)"
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

    /// The activation of the family's classification head.
    pub fn head_activation(self) -> HeadActivation {
        match self {
            Family::Bert | Family::Roberta | Family::XlmRoberta => HeadActivation::Tanh,
            Family::Electra | Family::DebertaV2 => HeadActivation::GeluErf,
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
        }
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

    /// Where a family's layers are and the names that differ from BERT's.
    fn layer_names(self) -> Option<(&'static str, &'static [(&'static str, &'static str)])> {
        match self {
            Family::DistilBert => Some(("transformer.layer.", &DISTILBERT_LAYER)),
            Family::DebertaV2 => Some(("encoder.layer.", &DEBERTA_LAYER)),
            _ => None,
        }
    }

    /// The encoder's name of a head tensor outside the prefix: the head's
    /// dense layer becomes `pooler.dense.*`; the label layer and other
    /// heads (masked LM, ELECTRA's discriminator) have none.
    pub fn head_to_internal(self, name: &str) -> Option<String> {
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
    pub fn internal_names(self, tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
        let prefix = self.prefix();
        let headed = tensors.keys().any(|k| k.starts_with(prefix));
        let head_dense = headed && tensors.keys().any(|k| self.head_to_internal(k).is_some());
        tensors
            .into_iter()
            .filter_map(|(k, v)| {
                let name = match k.strip_prefix(prefix) {
                    Some(body) => self.body_to_internal(body),
                    None if headed => return self.head_to_internal(&k).map(|n| (n, v)),
                    None => self.body_to_internal(&k),
                };
                if head_dense && name.starts_with("pooler.") {
                    return None;
                }
                Some((name, v))
            })
            .collect()
    }

    /// The Hugging Face name, in the family's sequence-classification
    /// model, of the encoder's tensor `internal`.
    pub fn to_hf(self, internal: &str) -> String {
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
