//! `tunefuse export`: a `best/` checkpoint as a Hugging Face model
//! directory that `AutoModelForSequenceClassification.from_pretrained`
//! loads and that predicts what tunefuse predicts.
//!
//! The directory holds `config.json` (the base model's, with
//! `architectures` the family's sequence-classification class, e.g.
//! `BertForSequenceClassification`, and `id2label`, `label2id`,
//! `problem_type`), `model.safetensors` (f32, under transformers' names of
//! that class, see [`crate::model::family`]; `format = pt` in the metadata,
//! as transformers expects) and the base model's tokenizer files.
//!
//! What can be exported: a run whose head is the family's own
//! classification head, i.e. `pooling = "pooler"` (the dense layer on the
//! first token, the family's activation, dropout, linear). A head that
//! reads \[CLS\] or the mean directly has no counterpart in transformers
//! and is refused with that reason. LoRA is merged into the weights it
//! updates (`W + (α/r)·B·A`, with `merge`), or written as a PEFT adapter
//! directory (`adapter_config.json`, `adapter_model.safetensors`, the head
//! as `modules_to_save`) that `PeftModel.from_pretrained` puts on the base
//! model. Bottleneck adapters add modules that transformers' classes do
//! not have, and are refused. Mixout, SMART, R3F, FreeLB and the
//! Bregman term change only how the weights were trained.
use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::checkpoint::{self, atomic_dir};
use super::config::Config;
use super::methods::{LoraConfig, Method};
use super::task::HeadKind;
use crate::error::{format_err, io_err, param_err, Result};
use crate::model::{Family, Pooling};

/// What an export wrote.
#[derive(Debug)]
pub struct Exported {
    /// Tensors written.
    pub tensors: usize,
    /// The label names, in index order (`id2label`).
    pub labels: Vec<String>,
    /// LoRA updates merged into their weights.
    pub merged: usize,
    /// Written as a PEFT LoRA adapter directory.
    pub peft: bool,
}

/// The tokenizer files transformers reads, copied when the base has them.
const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "added_tokens.json",
];

/// Exports the `best/` checkpoint in `checkpoint` to `output` (see the
/// module docs). `output` must not exist or be empty, unless `overwrite`.
/// `base`: the base model directory, when it is not where the checkpoint
/// records it.
pub fn export(
    checkpoint: &Path,
    base: Option<&Path>,
    output: &Path,
    merge: bool,
    overwrite: bool,
) -> Result<Exported> {
    let rec = checkpoint::read_checkpoint(checkpoint, base)?;
    let cfg = &rec.cfg;
    let base = &rec.base;
    let base_cfg = crate::model::BertConfig::from_file(&base.join("config.json"))?;
    let family = base_cfg.family()?;
    let bad = |m: String| Err(param_err("export", m));
    if cfg.head == HeadKind::Token {
        return bad(
            "token classification checkpoints are not exported yet (transformers' \
             …ForTokenClassification layout)"
                .into(),
        );
    }
    if cfg.head == HeadKind::Score {
        return bad(
            "a score head ends in a sigmoid that transformers' sequence-classification \
             heads do not have: it cannot be exported to them"
                .into(),
        );
    }
    if cfg.pooling != Pooling::Pooler {
        return bad(format!(
            "this run's head reads {} directly, and transformers' {} passes the pooled \
             hidden state through its head's dense layer and activation first, so no \
             transformers model computes what it computes; train with --set \
             pooling=pooler to export",
            match cfg.pooling {
                Pooling::Mean => "the mean of the hidden states",
                _ => "the [CLS] hidden state",
            },
            family.architecture()
        ));
    }
    let mut lora = None;
    for m in &cfg.methods {
        match m {
            Method::Adapter(_) => {
                return bad("bottleneck adapters add modules that transformers' \
                            …ForSequenceClassification classes do not have; they cannot be \
                            exported to them"
                    .into())
            }
            Method::Lora(c) => lora = Some(c.clone()),
            _ => {}
        }
    }
    if merge && lora.is_none() {
        return bad("--merge folds LoRA updates into the weights, and this run has no LoRA".into());
    }
    if output.exists()
        && !overwrite
        && std::fs::read_dir(output)
            .map_err(|e| io_err(output, e))?
            .next()
            .is_some()
    {
        return Err(io_err(
            output,
            "exists and is not empty: choose a new directory, or pass --overwrite to replace it",
        ));
    }
    let load = |p: &Path| {
        candle_core::safetensors::load(p, &Device::Cpu)
            .map_err(|e| format_err(p, format!("not a readable safetensors file: {e}")))
    };
    let trained_path = checkpoint.join("model.safetensors");
    // The head under the classifier's name whether it classifies or
    // regresses (transformers' classes call both `classifier`).
    let trained: HashMap<String, Tensor> = load(&trained_path)?
        .into_iter()
        .map(|(k, v)| match k.strip_prefix("regressor.") {
            Some(h) => (format!("classifier.{h}"), v),
            None => (k, v),
        })
        .collect();
    // A PEFT adapter holds only what was trained: the base is not read.
    if let (Some(l), false) = (&lora, merge) {
        return write_peft(output, base, family, l, trained, &trained_path, &rec.labels);
    }
    // The encoder's tensors under the names tunefuse uses (see
    // `model::family`), the base's own classification dense layer included.
    let mut tensors = family.internal_names(load(&base.join("model.safetensors"))?)?;
    tensors.remove("embeddings.position_ids");
    let mut lora_parts: HashMap<String, (Option<Tensor>, Option<Tensor>)> = HashMap::new();
    for (k, v) in trained {
        if let Some(layer) = k.strip_suffix(".lora_A") {
            lora_parts.entry(layer.to_string()).or_default().0 = Some(v);
        } else if let Some(layer) = k.strip_suffix(".lora_B") {
            lora_parts.entry(layer.to_string()).or_default().1 = Some(v);
        } else {
            let head = k.starts_with("classifier.") || k.starts_with("pooler.");
            if !head && !tensors.contains_key(&k) {
                return Err(format_err(
                    &trained_path,
                    format!(
                        "holds {k}, which the base model {} does not have",
                        base.display()
                    ),
                ));
            }
            tensors.insert(k, v);
        }
    }
    let mut merged = 0;
    for (layer, parts) in lora_parts {
        let (Some(a), Some(b)) = parts else {
            return Err(format_err(
                &trained_path,
                format!("holds only one of {layer}.lora_A and {layer}.lora_B"),
            ));
        };
        let key = format!("{layer}.weight");
        let w = tensors.get(&key).ok_or_else(|| {
            format_err(
                &trained_path,
                format!("has a LoRA update of {layer}, which the base model lacks"),
            )
        })?;
        let scale = lora.as_ref().map(|c| c.alpha / c.r as f64).ok_or_else(|| {
            format_err(
                &trained_path,
                format!("has a LoRA update of {layer}, and the run's config lists no lora"),
            )
        })?;
        let delta = (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * scale)?;
        let w = (w.to_dtype(DType::F32)? + delta)?;
        tensors.insert(key, w);
        merged += 1;
    }
    let head = base_cfg.head()?;
    let mut need = vec!["pooler.dense.weight", "classifier.weight"];
    if head.bias {
        need.push("pooler.dense.bias");
    }
    if head.norm.is_some() {
        need.push("pooler.LayerNorm.weight");
    }
    for need in need {
        if !tensors.contains_key(need) {
            return Err(format_err(&trained_path, format!("lacks {need}")));
        }
    }
    let out: Vec<(String, Tensor)> = tensors
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    let out = family.tensors_to_hf(out)?;
    let config = hf_config(base, cfg, &rec.labels, family)?;
    let n = out.len();
    write_dir(
        output,
        base,
        &out,
        "model.safetensors",
        &[("config.json", config)],
    )?;
    Ok(Exported {
        tensors: n,
        labels: rec.labels,
        merged,
        peft: false,
    })
}

/// Fills `output` atomically: the tensors (f32, `format = pt`) as
/// `weights`, the JSON files, the base model's tokenizer files.
pub(crate) fn write_dir(
    output: &Path,
    base: &Path,
    tensors: &[(String, Tensor)],
    weights: &str,
    json: &[(&str, serde_json::Value)],
) -> Result<()> {
    atomic_dir(output, |tmp| {
        let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        safetensors::serialize_to_file(
            tensors.iter().map(|(k, v)| (k.as_str(), v)),
            Some(meta),
            &tmp.join(weights),
        )
        .map_err(|e| io_err(tmp, e))?;
        for (name, value) in json {
            let text = serde_json::to_string_pretty(value).expect("JSON values serialise");
            std::fs::write(tmp.join(name), text).map_err(|e| io_err(tmp, e))?;
        }
        for f in TOKENIZER_FILES {
            let src = base.join(f);
            if src.exists() {
                std::fs::copy(&src, tmp.join(f)).map_err(|e| io_err(&src, e))?;
            }
        }
        Ok(())
    })
}

/// A LoRA run as a PEFT adapter directory (`adapter_config.json`,
/// `adapter_model.safetensors`): the LoRA matrices under PEFT's names
/// (`base_model.model.<module>.lora_A.weight`), the trained head as
/// `modules_to_save`. Refused when the run trained anything else of the
/// encoder (LayerNorms), which a LoRA adapter cannot carry.
fn write_peft(
    output: &Path,
    base: &Path,
    family: Family,
    lora: &LoraConfig,
    trained: HashMap<String, Tensor>,
    trained_path: &Path,
    labels: &[String],
) -> Result<Exported> {
    let module = |internal: &str| -> String {
        let hf = family.to_hf(&format!("{internal}.weight"));
        hf.strip_suffix(".weight").unwrap_or(&hf).to_string()
    };
    let mut out = vec![];
    let mut targets = std::collections::BTreeSet::new();
    for (k, v) in trained {
        let lora_matrix = k.ends_with(".lora_A") || k.ends_with(".lora_B");
        if family.fused_qkv() && lora_matrix && k.contains(".attention.self.") {
            return Err(format_err(
                trained_path,
                format!(
                    "holds a LoRA update of {}, a part of {}'s fused Wqkv projection, which a \
                     PEFT adapter cannot address: pass --merge to write a whole model instead",
                    k.rsplit_once('.').map_or(k.as_str(), |(l, _)| l),
                    family.architecture()
                ),
            ));
        }
        let name = if let Some(layer) = k.strip_suffix(".lora_A") {
            targets.insert(module(layer));
            format!("base_model.model.{}.lora_A.weight", module(layer))
        } else if let Some(layer) = k.strip_suffix(".lora_B") {
            format!("base_model.model.{}.lora_B.weight", module(layer))
        } else if k.starts_with("classifier.") || k.starts_with("pooler.") {
            format!("base_model.model.{}", family.to_hf(&k))
        } else {
            return Err(format_err(
                trained_path,
                format!(
                    "holds {k}, trained beside LoRA, which a PEFT LoRA adapter cannot carry: \
                     pass --merge to write a whole model instead"
                ),
            ));
        };
        out.push((name, v.to_dtype(DType::F32)?));
    }
    let base_path = std::fs::canonicalize(base).map_err(|e| io_err(base, e))?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": base_path,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "modules_to_save": family.head_modules(),
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
    });
    let n = out.len();
    write_dir(
        output,
        base,
        &out,
        "adapter_model.safetensors",
        &[("adapter_config.json", config)],
    )?;
    Ok(Exported {
        tensors: n,
        labels: labels.to_vec(),
        merged: 0,
        peft: true,
    })
}

/// The base model's `config.json` with the classification fields.
fn hf_config(
    base: &Path,
    cfg: &Config,
    labels: &[String],
    family: Family,
) -> Result<serde_json::Value> {
    let path = base.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| io_err(&path, e))?;
    let mut c: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format_err(&path, e.to_string()))?;
    let obj = c
        .as_object_mut()
        .ok_or_else(|| format_err(&path, "is not a JSON object"))?;
    let names: Vec<String> = match cfg.head {
        HeadKind::Regression | HeadKind::Score => vec!["LABEL_0".into()],
        HeadKind::Classification | HeadKind::Token => labels.to_vec(),
    };
    let id2label: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), l.clone().into()))
        .collect();
    let label2id: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .enumerate()
        .map(|(i, l)| (l.clone(), i.into()))
        .collect();
    obj.insert(
        "architectures".into(),
        serde_json::json!([family.architecture()]),
    );
    obj.insert("id2label".into(), id2label.into());
    obj.insert("label2id".into(), label2id.into());
    obj.insert(
        "problem_type".into(),
        match cfg.head {
            HeadKind::Regression | HeadKind::Score => "regression",
            HeadKind::Classification | HeadKind::Token => "single_label_classification",
        }
        .into(),
    );
    obj.insert("torch_dtype".into(), "float32".into());
    obj.remove("_name_or_path");
    Ok(c)
}
