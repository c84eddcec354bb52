//! The encoder families against transformers: tiny randomly initialised
//! RoBERTa, ELECTRA, DistilBERT, DeBERTa-v2 (relative attention with
//! log buckets, both relative terms) and ModernBERT (rotary positions, a
//! global layer and two sliding-window layers whose window the longest
//! sequence exceeds, GeGLU, mean pooling) sequence classifiers from
//! `../shared/golden/encoders` (saved by transformers, with its float32
//! outputs on padded id sequences), loaded through their own names. The
//! embedding output, the last hidden states and the logits of the family's
//! own head must agree at about 1e-5. An unsupported family is refused
//! with a message that names it.
mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::{golden, json_matrix};
use tunefuse::model::{Bert, Outputs};

fn dir(name: &str) -> PathBuf {
    std::env::var_os("TUNEFUSE_GOLDEN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/golden"))
        .join("encoders")
        .join(name)
}

fn u32_matrix(v: &serde_json::Value) -> Tensor {
    let m: Vec<Vec<u32>> = json_matrix(v)
        .iter()
        .map(|r| r.iter().map(|&x| x as u32).collect())
        .collect();
    Tensor::new(m, &Device::Cpu).unwrap()
}

/// Worst |a − b| over the real tokens of each row (`want[b][t][h]`).
fn worst_on_tokens(got: &Tensor, want: &serde_json::Value) -> f64 {
    let got: Vec<Vec<Vec<f32>>> = got.to_vec3().unwrap();
    let mut worst = 0f64;
    for (b, rows) in want.as_array().unwrap().iter().enumerate() {
        for (t, row) in json_matrix(rows).iter().enumerate() {
            for (h, w) in row.iter().enumerate() {
                worst = worst.max((f64::from(got[b][t][h]) - w).abs());
            }
        }
    }
    worst
}

fn check_family(name: &str, label_layer: &str) {
    let g = &golden("encoders/encoders.json")["models"][name];
    let d = dir(name);
    let vm = candle_nn::VarMap::new();
    let bert = Bert::from_pretrained(&d, &vm, DType::F32, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let ids = u32_matrix(&g["input_ids"]);
    let mask = u32_matrix(&g["attention_mask"]);
    let emb = bert.forward_embeddings(&ids, None).unwrap();
    let e = worst_on_tokens(&emb, &g["first_hidden_state"]);
    let out = bert
        .forward_from_embeddings(&emb, &mask, Outputs::default())
        .unwrap();
    let h = worst_on_tokens(&out.last_hidden, &g["last_hidden_state"]);
    // The family's head: the dense layer on the pooled states (loaded as
    // the encoder's pooler), its activation (and norm), then the label layer.
    let pooled = bert
        .pool(&out.last_hidden, &mask)
        .unwrap()
        .expect("head dense layer");
    let st = candle_core::safetensors::load(d.join("model.safetensors"), &Device::Cpu).unwrap();
    let w = &st[&format!("{label_layer}.weight")];
    let b = &st[&format!("{label_layer}.bias")];
    let logits: Vec<Vec<f32>> = pooled
        .matmul(&w.t().unwrap())
        .unwrap()
        .broadcast_add(b)
        .unwrap()
        .to_vec2()
        .unwrap();
    let want = json_matrix(&g["logits"]);
    let l = logits
        .iter()
        .flatten()
        .zip(want.iter().flatten())
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .fold(0.0, f64::max);
    println!("{name}: embeddings {e:.2e}, last hidden {h:.2e}, logits {l:.2e}");
    assert!(
        e < 1e-5 && h < 1e-5 && l < 1e-5,
        "{name}: {e:.2e} {h:.2e} {l:.2e}"
    );
}

#[test]
fn roberta_matches_transformers() {
    check_family("roberta", "classifier.out_proj");
}

#[test]
fn electra_matches_transformers() {
    check_family("electra", "classifier.out_proj");
}

#[test]
fn distilbert_matches_transformers() {
    check_family("distilbert", "classifier");
}

#[test]
fn deberta_v2_matches_transformers() {
    check_family("deberta_v2", "classifier");
}

#[test]
fn modernbert_matches_transformers() {
    check_family("modernbert", "classifier");
}

#[test]
fn unsupported_families_are_refused_by_name() {
    let scratch = common::scratch("families-refused");
    let d = scratch.path().join("deberta-v1");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(
        dir("modernbert").join("model.safetensors"),
        d.join("model.safetensors"),
    )
    .unwrap();
    let cfg = serde_json::json!({
        "model_type": "deberta", "vocab_size": 1000, "hidden_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
    });
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    let vm = candle_nn::VarMap::new();
    let e = Bert::from_pretrained(&d, &vm, DType::F32, &Device::Cpu)
        .expect_err("DeBERTa v1 should be refused")
        .to_string();
    assert!(
        e.contains("\"deberta\"") && e.contains("not supported") && e.contains("modernbert"),
        "{e}"
    );
}

/// ModernBERT's configuration errors name the field.
#[test]
fn modernbert_config_errors_name_the_field() {
    let scratch = common::scratch("families-modernbert-cfg");
    let base: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir("modernbert").join("config.json")).unwrap(),
    )
    .unwrap();
    for (key, value, says) in [
        ("local_attention", serde_json::json!(7), "local_attention"),
        (
            "classifier_pooling",
            serde_json::json!("max"),
            "classifier_pooling",
        ),
        (
            "layer_types",
            serde_json::json!(["full_attention"]),
            "layer_types",
        ),
        (
            "layer_types",
            serde_json::json!(["full_attention", "chunked", "full_attention"]),
            "chunked",
        ),
        (
            "rope_parameters",
            serde_json::json!({"full_attention": {"rope_type": "yarn", "rope_theta": 1e4}}),
            "yarn",
        ),
    ] {
        let mut cfg = base.clone();
        cfg[key] = value;
        let p = scratch.path().join("config.json");
        std::fs::write(&p, cfg.to_string()).unwrap();
        let e = tunefuse::model::BertConfig::from_file(&p)
            .expect_err(key)
            .to_string();
        assert!(e.contains(says), "{key}: {e}");
    }
}

/// A tiny random model of `family` in that family's own names and config
/// keys, with MiniLM's tokenizer (so text tokenises): what a user's
/// checkpoint of the family looks like to the loader.
fn tiny_family_dir(parent: &std::path::Path, family: tunefuse::model::Family) -> PathBuf {
    use tunefuse::model::Family;
    let base = common::tiny_model_dir(parent);
    let (model_type, pad) = match family {
        Family::Bert => ("bert", 0),
        Family::Roberta => ("roberta", 1),
        Family::XlmRoberta => ("xlm-roberta", 1),
        Family::Electra => ("electra", 0),
        Family::DistilBert => ("distilbert", 0),
        Family::DebertaV2 => ("deberta-v2", 0),
        Family::ModernBert => ("modernbert", 0),
    };
    let d = parent.join(format!("tiny-{model_type}"));
    std::fs::create_dir_all(&d).unwrap();
    let cfg = match family {
        Family::DistilBert => serde_json::json!({
            "model_type": "distilbert", "vocab_size": 30522, "dim": 32, "n_layers": 2,
            "n_heads": 4, "hidden_dim": 64, "activation": "gelu", "dropout": 0.1,
            "attention_dropout": 0.1, "max_position_embeddings": 64, "pad_token_id": 0,
        }),
        Family::DebertaV2 => serde_json::json!({
            "model_type": "deberta-v2", "vocab_size": 30522, "hidden_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
            "max_position_embeddings": 64, "pad_token_id": 0, "type_vocab_size": 0,
            "relative_attention": true, "position_buckets": 16, "max_relative_positions": -1,
            "pos_att_type": ["p2c", "c2p"], "position_biased_input": false,
            "norm_rel_ebd": "layer_norm", "share_att_key": true, "layer_norm_eps": 1e-7,
        }),
        // Windows of ±2 tokens in the local layers, so that short
        // sentences cross them.
        Family::ModernBert => serde_json::json!({
            "model_type": "modernbert", "vocab_size": 30522, "hidden_size": 32,
            "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 48,
            "max_position_embeddings": 64, "pad_token_id": 0, "global_attn_every_n_layers": 3,
            "local_attention": 4, "classifier_pooling": "mean", "norm_eps": 1e-5,
            "global_rope_theta": 160000.0, "local_rope_theta": 10000.0,
            "mlp_dropout": 0.1, "attention_dropout": 0.1,
        }),
        _ => serde_json::json!({
            "model_type": model_type, "vocab_size": 30522, "hidden_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
            "max_position_embeddings": 64, "pad_token_id": pad,
            "type_vocab_size": if family == Family::Roberta { 1 } else { 2 },
            "embedding_size": if family == Family::Electra { 16 } else { 32 },
        }),
    };
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    let bc = tunefuse::model::BertConfig::from_file(&d.join("config.json")).unwrap();
    let vm = candle_nn::VarMap::new();
    Bert::new(&bc, &vm, DType::F32, &Device::Cpu, false).unwrap();
    // Values from a fixed stream, written under the family's names.
    let data = vm.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut internal = Vec::new();
    for (i, n) in names.into_iter().enumerate() {
        let v = &data[n];
        let vals = common::randn(v.elem_count(), 500 + i as u64, 0.05);
        let vals: Vec<f64> = if n.contains("LayerNorm") && n.ends_with("weight") {
            vals.iter().map(|x| 1.0 + x).collect()
        } else {
            vals
        };
        internal.push((
            n.clone(),
            common::tensor(&vals, v.dims(), DType::F32, &Device::Cpu),
        ));
    }
    let named: std::collections::HashMap<String, Tensor> = family
        .tensors_to_hf(internal)
        .unwrap()
        .into_iter()
        .collect();
    candle_core::safetensors::save(&named, d.join("model.safetensors")).unwrap();
    std::fs::copy(base.join("tokenizer.json"), d.join("tokenizer.json")).unwrap();
    d
}

/// Every family trains with the methods that apply to it: SMART with LoRA
/// and the family's own head, then export (merged) to that family's
/// transformers class with its names; adapters and mixout train too.
#[test]
fn every_family_trains_and_exports() {
    use tunefuse::model::Family;
    let dir = common::scratch("families-train");
    let data = common::labelled_csv(dir.path(), &["a fine film,pos", "a dull film,neg"], 16);
    let bin = env!("CARGO_BIN_EXE_tunefuse");
    for family in [
        Family::Roberta,
        Family::XlmRoberta,
        Family::Electra,
        Family::DistilBert,
        Family::DebertaV2,
        Family::ModernBert,
    ] {
        let model = tiny_family_dir(dir.path(), family);
        for (tag, extra) in [
            (
                "smart-lora",
                &["--method", "smart,lora", "--set", "pooling=pooler"][..],
            ),
            (
                "adapter",
                &["--method", "adapter", "--set", "adapter.r=4"][..],
            ),
            ("mixout", &["--method", "mixout"][..]),
        ] {
            let out = dir.path().join(format!("{family:?}-{tag}"));
            let a = common::own_data_args(&model, &data, &data, &out, extra);
            let o = std::process::Command::new(bin).args(&a).output().unwrap();
            assert!(
                o.status.success(),
                "{family:?} {tag}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let hf = dir.path().join(format!("{family:?}-hf"));
        let best = dir.path().join(format!("{family:?}-smart-lora/best"));
        let o = std::process::Command::new(bin)
            .args(["export", "--merge", "--checkpoint"])
            .arg(&best)
            .arg("--output")
            .arg(&hf)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["architectures"][0], family.architecture());
        let st =
            candle_core::safetensors::load(hf.join("model.safetensors"), &Device::Cpu).unwrap();
        let mut names: Vec<&String> = st.keys().collect();
        names.sort();
        let prefix = family.prefix();
        assert!(
            names.iter().all(|n| n.starts_with(prefix)
                || n.starts_with("classifier")
                || n.starts_with("pre_classifier")
                || (family == Family::DebertaV2 && n.starts_with("pooler."))
                || (family == Family::ModernBert && n.starts_with("head."))),
            "{names:?}"
        );
        let head = match family {
            Family::DebertaV2 => vec![
                "classifier.bias",
                "classifier.weight",
                "pooler.dense.bias",
                "pooler.dense.weight",
            ],
            Family::DistilBert => vec![
                "classifier.bias",
                "classifier.weight",
                "pre_classifier.bias",
                "pre_classifier.weight",
            ],
            Family::ModernBert => vec![
                "classifier.bias",
                "classifier.weight",
                "head.dense.weight",
                "head.norm.weight",
                "model.layers.0.attn.Wqkv.weight",
                "model.final_norm.weight",
            ],
            _ => vec![
                "classifier.dense.bias",
                "classifier.dense.weight",
                "classifier.out_proj.bias",
                "classifier.out_proj.weight",
            ],
        };
        for h in head {
            assert!(st.contains_key(h), "{family:?}: {h} in {names:?}");
        }
        // The export loads back as a base model of the same family.
        let vm = candle_nn::VarMap::new();
        let back = Bert::from_pretrained(&hf, &vm, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(back.family, family);
    }
}

/// With LoRA's `layernorm`, DeBERTa's norm of its relative-position table
/// trains with the backbone's other LayerNorms (it froze with the table).
#[test]
fn deberta_relative_norm_trains_with_the_layernorms() {
    use tunefuse::model::Family;
    let dir = common::scratch("families-deberta-ln");
    let model = tiny_family_dir(dir.path(), Family::DebertaV2);
    let data = common::labelled_csv(dir.path(), &["a fine film,pos", "a dull film,neg"], 16);
    let out = dir.path().join("run");
    let a = common::own_data_args(
        &model,
        &data,
        &data,
        &out,
        &[
            "--method",
            "lora",
            "--set",
            "lora.layernorm=true",
            "--lr",
            "1e-2",
        ],
    );
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_tunefuse"))
        .args(&a)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let load = |p: PathBuf| candle_core::safetensors::load(p, &Device::Cpu).unwrap();
    let (base, best) = (
        load(model.join("model.safetensors")),
        load(out.join("best/model.safetensors")),
    );
    let moved = common::max_abs_diff(
        &common::to_f64(&best["encoder.LayerNorm.weight"]),
        &common::to_f64(&base["deberta.encoder.LayerNorm.weight"]),
    );
    assert!(moved > 0.0, "encoder.LayerNorm did not train");
}
