//! `tunefuse export`: the directory has transformers' layout and names, and
//! a forward pass written the way transformers' BertForSequenceClassification
//! computes (encoder, tanh of the pooler on [CLS], linear) over the exported
//! weights alone gives the probabilities `tunefuse predict` gives for the
//! checkpoint: for full fine-tuning and for merged LoRA. What cannot be
//! exported is refused with the reason.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device};
use common::{max_abs_diff, scratch, tiny_model_dir, to_f64};
use tunefuse::model::{Bert, Outputs, TextTokenizer};

const BIN: &str = env!("CARGO_BIN_EXE_tunefuse");

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "tunefuse {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn refused(args: &[&str]) -> String {
    let o = run(args);
    assert!(!o.status.success(), "tunefuse {args:?} should fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Three-label training and dev files.
fn data(dir: &Path) -> (PathBuf, PathBuf) {
    let mut train = String::from("text,label\n");
    for i in 0..24 {
        let (t, l) = [
            ("great, would buy again", "good"),
            ("broke after a day", "bad"),
            ("it is a product", "meh"),
        ][i % 3];
        train.push_str(&format!("\"{t} {i}\",{l}\n"));
    }
    let dev = "text,label\n\"great, truly\",good\nbroke at once,bad\nit is,meh\nfine I guess,meh\n";
    let (t, d) = (dir.join("train.csv"), dir.join("dev.csv"));
    std::fs::write(&t, train).unwrap();
    std::fs::write(&d, dev).unwrap();
    (t, d)
}

fn finetune(model: &Path, train: &Path, dev: &Path, out: &Path, extra: &[&str]) {
    let mut more = vec!["--set", "pooling=pooler", "--lr", "1e-3"];
    more.extend(extra);
    let a = common::own_data_args(model, train, dev, out, &more);
    ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
}

/// transformers' BertForSequenceClassification forward in eval mode, over
/// the exported directory's files only.
fn hf_style_probs(export: &Path, texts: &[&str]) -> Vec<Vec<f64>> {
    let vm = candle_nn::VarMap::new();
    let bert = Bert::from_pretrained(export, &vm, DType::F32, &Device::Cpu).unwrap();
    let tok = TextTokenizer::from_file(&export.join("tokenizer.json"), 16).unwrap();
    let pairs: Vec<(&str, Option<&str>)> = texts.iter().map(|t| (*t, None)).collect();
    let b = tok.batch(&pairs, &Device::Cpu).unwrap();
    let out = bert
        .forward(&b.ids, Some(&b.token_types), &b.mask, Outputs::default())
        .unwrap();
    let pooled = bert
        .pool(&out.last_hidden, &b.mask)
        .unwrap()
        .expect("exported pooler");
    let st =
        candle_core::safetensors::load(export.join("model.safetensors"), &Device::Cpu).unwrap();
    let logits = pooled
        .matmul(&st["classifier.weight"].t().unwrap())
        .unwrap()
        .broadcast_add(&st["classifier.bias"])
        .unwrap();
    candle_nn::ops::softmax_last_dim(&logits)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn predicted(checkpoint: &Path, file: &Path) -> (Vec<String>, Vec<Vec<f64>>) {
    let out = ok(&[
        "predict",
        "--checkpoint",
        &s(checkpoint),
        "--file",
        &s(file),
    ]);
    out.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["text"].as_str().unwrap().to_string(),
                v["probabilities"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p.as_f64().unwrap())
                    .collect(),
            )
        })
        .unzip()
}

fn check_same_predictions(checkpoint: &Path, export: &Path, dev: &Path) {
    let (texts, ours) = predicted(checkpoint, dev);
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let theirs = hf_style_probs(export, &texts);
    assert_eq!(ours.len(), theirs.len());
    for (a, b) in ours.iter().zip(&theirs) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }
    // Not a constant model: the check would pass for any weights that all
    // give one output.
    assert!(
        ours.iter().any(|p| (p[0] - ours[0][0]).abs() > 1e-4),
        "{ours:?}"
    );
}

#[test]
fn full_finetune_exports_with_transformers_names_and_predictions() {
    let dir = scratch("export-full");
    let model = tiny_model_dir(dir.path());
    let (train, dev) = data(dir.path());
    let out = dir.path().join("run");
    finetune(&model, &train, &dev, &out, &[]);
    let export = dir.path().join("hf");
    ok(&[
        "export",
        "--checkpoint",
        &s(&out.join("best")),
        "--output",
        &s(&export),
    ]);

    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(export.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["architectures"][0], "BertForSequenceClassification");
    assert_eq!(
        cfg["id2label"],
        serde_json::json!({"0": "bad", "1": "good", "2": "meh"})
    );
    assert_eq!(
        cfg["label2id"],
        serde_json::json!({"bad": 0, "good": 1, "meh": 2})
    );
    assert_eq!(cfg["problem_type"], "single_label_classification");
    assert_eq!(cfg["hidden_size"], 32, "the base model's own settings kept");
    assert!(export.join("tokenizer.json").exists());

    // Names: the base's, under `bert.`, plus the pooler and the classifier.
    let base =
        candle_core::safetensors::load(model.join("model.safetensors"), &Device::Cpu).unwrap();
    let exported =
        candle_core::safetensors::load(export.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut want: Vec<String> = base.keys().map(|k| format!("bert.{k}")).collect();
    want.extend(
        [
            "bert.pooler.dense.weight",
            "bert.pooler.dense.bias",
            "classifier.weight",
            "classifier.bias",
        ]
        .map(String::from),
    );
    want.sort();
    let mut got: Vec<String> = exported.keys().cloned().collect();
    got.sort();
    assert_eq!(got, want);
    // transformers reads the `format` metadata.
    let bytes = std::fs::read(export.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header["__metadata__"]["format"], "pt");
    // The trained values, not the base's.
    let trained =
        candle_core::safetensors::load(out.join("best/model.safetensors"), &Device::Cpu).unwrap();
    let diff = max_abs_diff(
        &to_f64(&exported["bert.encoder.layer.0.attention.self.query.weight"]),
        &to_f64(&trained["encoder.layer.0.attention.self.query.weight"]),
    );
    assert_eq!(diff, 0.0);

    check_same_predictions(&out.join("best"), &export, &dev);

    // An existing export is not replaced without --overwrite.
    let e = refused(&[
        "export",
        "--checkpoint",
        &s(&out.join("best")),
        "--output",
        &s(&export),
    ]);
    assert!(e.contains("not empty") && e.contains("--overwrite"), "{e}");
    ok(&[
        "export",
        "--checkpoint",
        &s(&out.join("best")),
        "--output",
        &s(&export),
        "--overwrite",
    ]);
    // The export is a base model tunefuse fine-tunes from (its head left out).
    let again = dir.path().join("again");
    finetune(&export, &train, &dev, &again, &[]);
}

#[test]
fn lora_merges_and_what_cannot_be_exported_is_refused() {
    let dir = scratch("export-lora");
    let model = tiny_model_dir(dir.path());
    let (train, dev) = data(dir.path());
    let out = dir.path().join("lora");
    finetune(
        &model,
        &train,
        &dev,
        &out,
        &["--method", "lora", "--set", "lora.alpha=32"],
    );
    let best = out.join("best");
    let export = dir.path().join("hf-lora");
    // Without --merge: a PEFT adapter directory, PEFT's names and config.
    let peft = dir.path().join("peft");
    let said = ok(&["export", "--checkpoint", &s(&best), "--output", &s(&peft)]);
    assert!(said.contains("PEFT"), "{said}");
    let ac: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(peft.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(ac["peft_type"], "LORA");
    assert_eq!(ac["task_type"], "SEQ_CLS");
    assert_eq!(
        (ac["r"].as_u64(), ac["lora_alpha"].as_f64()),
        (Some(8), Some(32.0))
    );
    assert_eq!(
        ac["modules_to_save"],
        serde_json::json!(["bert.pooler", "classifier"])
    );
    assert_eq!(
        ac["target_modules"].as_array().unwrap().len(),
        6,
        "query and value of 3 layers"
    );
    let st = candle_core::safetensors::load(peft.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    let mut names: Vec<&String> = st.keys().collect();
    names.sort();
    assert!(
        st.contains_key("base_model.model.bert.encoder.layer.1.attention.self.value.lora_A.weight"),
        "{names:?}"
    );
    assert!(
        st.contains_key("base_model.model.bert.pooler.dense.weight"),
        "{names:?}"
    );
    assert!(
        st.contains_key("base_model.model.classifier.weight"),
        "{names:?}"
    );
    assert_eq!(names.len(), 6 * 2 + 4, "{names:?}");
    let said = ok(&[
        "export",
        "--checkpoint",
        &s(&best),
        "--output",
        &s(&export),
        "--merge",
    ]);
    assert!(said.contains("6 LoRA updates merged"), "{said}");
    // W + (α/r)·B·A, computed here from the two files.
    let base =
        candle_core::safetensors::load(model.join("model.safetensors"), &Device::Cpu).unwrap();
    let t = candle_core::safetensors::load(best.join("model.safetensors"), &Device::Cpu).unwrap();
    let e_ =
        candle_core::safetensors::load(export.join("model.safetensors"), &Device::Cpu).unwrap();
    let l = "encoder.layer.1.attention.self.value";
    let want = (&base[&format!("{l}.weight")]
        + (t[&format!("{l}.lora_B")]
            .matmul(&t[&format!("{l}.lora_A")])
            .unwrap()
            * (32.0 / 8.0))
            .unwrap())
    .unwrap();
    let diff = max_abs_diff(&to_f64(&want), &to_f64(&e_[&format!("bert.{l}.weight")]));
    assert!(diff < 1e-6, "{diff}");
    let b_norm = to_f64(&t[&format!("{l}.lora_B")])
        .iter()
        .fold(0.0, |m: f64, x| m.max(x.abs()));
    assert!(
        b_norm > 0.0,
        "LoRA's B moved from zero, so the merge changes the weight"
    );
    check_same_predictions(&best, &export, &dev);

    // A head without the pooler, and adapters, are refused with the reason.
    let cls = dir.path().join("cls");
    finetune(&model, &train, &dev, &cls, &["--set", "pooling=cls"]);
    let e = refused(&[
        "export",
        "--checkpoint",
        &s(&cls.join("best")),
        "--output",
        &s(&dir.path().join("x")),
    ]);
    assert!(e.contains("pooling=pooler") && e.contains("[CLS]"), "{e}");
    let ad = dir.path().join("adapter");
    finetune(
        &model,
        &train,
        &dev,
        &ad,
        &["--method", "adapter", "--set", "adapter.r=8"],
    );
    let e = refused(&[
        "export",
        "--checkpoint",
        &s(&ad.join("best")),
        "--output",
        &s(&dir.path().join("y")),
    ]);
    assert!(e.contains("adapters"), "{e}");
}

/// A checkpoint finds its base model after the run and the model moved
/// together (the path relative to the checkpoint), refuses a different
/// model at the recorded path, naming what it looked at, and takes
/// `--base-model`.
#[test]
fn checkpoints_find_a_moved_base_model_and_refuse_another() {
    let dir = scratch("export-base");
    let home = dir.path().join("a");
    std::fs::create_dir_all(&home).unwrap();
    let model = tiny_model_dir(&home);
    let (train, dev) = data(dir.path());
    let out = home.join("run");
    finetune(&model, &train, &dev, &out, &[]);
    let eval = |best: &Path, extra: &[&str]| {
        let mut a = vec!["eval", "--checkpoint", best.to_str().unwrap()];
        a.extend(extra);
        run(&a)
    };
    let before = ok(&["eval", "--checkpoint", &s(&out.join("best"))]);
    // Move the run and the model together.
    let moved = dir.path().join("b");
    std::fs::rename(&home, &moved).unwrap();
    let best = moved.join("run/best");
    let o = eval(&best, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8(o.stdout).unwrap(), before);
    // Another model of the same shape where the run points.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(moved.join("tiny-bert").join(f), other.join(f)).unwrap();
    }
    let mut st = std::fs::read(moved.join("tiny-bert/model.safetensors")).unwrap();
    let n = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    st[8 + n..].reverse();
    std::fs::write(other.join("model.safetensors"), &st).unwrap();
    std::fs::remove_dir_all(moved.join("tiny-bert")).unwrap();
    std::fs::rename(&other, moved.join("tiny-bert")).unwrap();
    let o = eval(&best, &[]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && e.contains("not found")
            && e.contains("a different model")
            && e.contains("--base-model"),
        "{e}"
    );
    // The right model, given explicitly.
    let right = dir.path().join("right");
    let back = tiny_model_dir(&right);
    let o = eval(&best, &["--base-model", back.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8(o.stdout).unwrap(), before);
}
