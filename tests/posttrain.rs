//! Masked-LM post-training: the masking never chooses special tokens or
//! non-candidates and hits its rates over many draws, whole words share one
//! draw, the loss is the cross-entropy of the chosen tokens only (against
//! a brute-force computation over every position), distant labelling and
//! the candidate file; `posttrain` writes a model directory that loads as
//! a base model and keeps its masked-LM head, lowers the MLM loss, and
//! refuses bad settings with a message naming them.
mod common;

use std::path::Path;

use candle_core::{DType, Device, D};
use tunefuse::model::{Bert, Encoded, Outputs, TextTokenizer};
use tunefuse::train::mlm::{
    distant_candidates, load_head, log_prior, mask, read_candidates, Draws, Masking, MlmBatch,
    MlmHead,
};
use tunefuse::train::ner::Sentence;
use tunefuse::train::posttrain::{posttrain, Settings};

const MASK: u32 = 103;
const VOCAB: usize = 30522;

/// 2,000 rows of 12 tokens: [CLS], ten word pieces of five two-piece
/// words, [SEP] (sequence 0).
fn synthetic() -> Encoded {
    let mut words = vec![None];
    for w in 0..5 {
        words.push(Some((0, w)));
        words.push(Some((0, w)));
    }
    words.push(None);
    Encoded {
        ids: (1000..1012).collect(),
        types: vec![0; 12],
        words,
    }
}

#[test]
fn candidate_masking_spares_specials_and_non_candidates_and_hits_its_rates() {
    let enc = synthetic();
    // Words 1 and 3 are candidates.
    let cand = |(_, w): (usize, usize)| w == 1 || w == 3;
    let m = Masking {
        rate: 0.15,
        whole_word: false,
    };
    let mut draws = Draws::new(7, 0);
    let (mut chosen, mut masked, mut random, mut kept) = (0usize, 0usize, 0usize, 0usize);
    let rows = 20_000;
    for _ in 0..rows {
        let r = mask(&enc, &cand, &m, MASK, VOCAB, &mut draws);
        for (i, label) in r.labels.iter().enumerate() {
            let is_cand = enc.words[i].is_some_and(cand);
            match label {
                None => assert_eq!(r.ids[i], enc.ids[i], "an unchosen token changed"),
                Some(t) => {
                    assert!(is_cand, "token {i} chosen but not a candidate (or special)");
                    assert_eq!(*t, enc.ids[i], "the label is the original id");
                    chosen += 1;
                    if r.ids[i] == MASK {
                        masked += 1;
                    } else if r.ids[i] == enc.ids[i] {
                        kept += 1;
                    } else {
                        random += 1;
                    }
                }
            }
        }
    }
    // 4 candidate tokens per row; binomial standard errors are ~0.1 % here.
    let rate = chosen as f64 / (4 * rows) as f64;
    assert!((rate - 0.15).abs() < 0.006, "chosen rate {rate}");
    let f = |n: usize| n as f64 / chosen as f64;
    assert!((f(masked) - 0.8).abs() < 0.015, "mask share {}", f(masked));
    // A random replacement equals the original once in 30,522 draws.
    assert!(
        (f(random) - 0.1).abs() < 0.012,
        "random share {}",
        f(random)
    );
    assert!((f(kept) - 0.1).abs() < 0.012, "kept share {}", f(kept));
}

#[test]
fn whole_word_masking_chooses_every_piece_of_a_word_together() {
    let enc = synthetic();
    let m = Masking {
        rate: 0.3,
        whole_word: true,
    };
    let mut draws = Draws::new(3, 1);
    let mut words_chosen = 0;
    for _ in 0..2_000 {
        let r = mask(&enc, &|_| true, &m, MASK, VOCAB, &mut draws);
        assert!(
            r.labels[0].is_none() && r.labels[11].is_none(),
            "a special token was chosen"
        );
        for w in 0..5 {
            let (a, b) = (1 + 2 * w, 2 + 2 * w);
            assert_eq!(
                r.labels[a].is_some(),
                r.labels[b].is_some(),
                "word {w} split"
            );
            words_chosen += usize::from(r.labels[a].is_some());
        }
    }
    let rate = words_chosen as f64 / 10_000.0;
    assert!((rate - 0.3).abs() < 0.015, "word rate {rate}");
}

#[test]
fn the_loss_is_the_cross_entropy_of_the_chosen_tokens_only() {
    let dir = common::scratch("mlm-loss");
    let model = common::tiny_model_dir(dir.path());
    let vm = candle_nn::VarMap::new();
    let bert = Bert::from_pretrained(&model, &vm, DType::F32, &Device::Cpu).unwrap();
    let head = MlmHead::new(&vm, &bert.config, &Device::Cpu).unwrap();
    let tok = TextTokenizer::from_file(&model.join("tokenizer.json"), 32).unwrap();
    let texts = ["the film is a quiet triumph", "bad", "a b c d e f g h"];
    let mut draws = Draws::new(1, 2);
    let m = Masking {
        rate: 0.5,
        whole_word: false,
    };
    let rows: Vec<_> = texts
        .iter()
        .map(|t| {
            let e = tok
                .encode_spans(tunefuse::model::Input::Text(t), None)
                .unwrap();
            mask(&e, &|_| true, &m, MASK, VOCAB, &mut draws)
        })
        .collect();
    let mb = MlmBatch::new(&tok, &rows, &Device::Cpu).unwrap();
    assert!(mb.chosen > 0);
    let b = &mb.batch;
    let out = bert
        .forward(&b.ids, Some(&b.token_types), &b.mask, Outputs::default())
        .unwrap();
    let loss: f32 = mb
        .loss(&bert, &head, &out.last_hidden)
        .unwrap()
        .unwrap()
        .to_scalar()
        .unwrap();
    // Brute force: logits at every position, the NLL summed where a label is.
    let (bs, l, h) = out.last_hidden.dims3().unwrap();
    let all = head
        .logits(&bert, &out.last_hidden.reshape((bs * l, h)).unwrap())
        .unwrap();
    let logp = candle_nn::ops::log_softmax(&all, D::Minus1)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let (mut sum, mut n) = (0f64, 0usize);
    for (r, row) in rows.iter().enumerate() {
        for (i, t) in row.labels.iter().enumerate() {
            if let Some(t) = t {
                sum -= logp[r * l + i][*t as usize] as f64;
                n += 1;
            }
        }
    }
    assert_eq!(n, mb.chosen);
    let want = sum / n as f64;
    assert!(
        (loss as f64 - want).abs() < 1e-4 * want.abs(),
        "{loss} vs {want}"
    );
    // A batch with nothing chosen has no loss (rather than a NaN mean).
    let none = Masking {
        rate: 1e-9,
        whole_word: false,
    };
    let e = tok
        .encode_spans(tunefuse::model::Input::Text("bad"), None)
        .unwrap();
    let r = mask(&e, &|_| true, &none, MASK, VOCAB, &mut draws);
    let mb = MlmBatch::new(&tok, &[r], &Device::Cpu).unwrap();
    let out = bert
        .forward(
            &mb.batch.ids,
            Some(&mb.batch.token_types),
            &mb.batch.mask,
            Outputs::default(),
        )
        .unwrap();
    assert!(mb.loss(&bert, &head, &out.last_hidden).unwrap().is_none());
}

fn words(s: &str) -> Vec<String> {
    s.split(' ').map(String::from).collect()
}

#[test]
fn distant_labelling_marks_spans_equal_to_training_mentions() {
    let train = vec![Sentence {
        words: words("Familial breast cancer and ataxia"),
        tags: words("O B-Disease I-Disease O B-Disease"),
    }];
    let corpus = vec![
        words("no Breast Cancer here but breast pain"),
        words("ataxia"),
    ];
    let got = distant_candidates(&train, &corpus);
    assert_eq!(
        got,
        vec![
            vec![false, true, true, false, false, false, false],
            vec![true]
        ]
    );
}

#[test]
fn the_candidate_file_must_match_the_corpus() {
    let dir = common::scratch("cand");
    let corpus = vec![words("a b"), words("c")];
    let p = dir.path().join("c.txt");
    std::fs::write(&p, "1\n0\n\n1\n").unwrap();
    assert_eq!(
        read_candidates(&p, &corpus).unwrap(),
        vec![vec![true, false], vec![true]]
    );
    std::fs::write(&p, "1\n0\n1\n\n1\n").unwrap();
    let e = read_candidates(&p, &corpus).unwrap_err().to_string();
    assert!(e.contains("line 4") && e.contains("3 flags"), "{e}");
    std::fs::write(&p, "1\nx\n").unwrap();
    let e = read_candidates(&p, &corpus).unwrap_err().to_string();
    assert!(e.contains("line 2") && e.contains("\"x\""), "{e}");
    std::fs::write(&p, "1\n0\n").unwrap();
    let e = read_candidates(&p, &corpus).unwrap_err().to_string();
    assert!(e.contains("1 sentences") && e.contains("has 2"), "{e}");
}

fn corpus_file(dir: &Path, name: &str, lines: &[&str]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, lines.join("\n")).unwrap();
    p.to_string_lossy().into_owned()
}

fn settings(model: &Path, out: &Path, corpora: Vec<String>) -> Settings {
    Settings {
        model: model.to_path_buf(),
        output: out.to_path_buf(),
        corpora,
        epochs: 6,
        batch_size: 8,
        lr: 2e-3,
        max_len: 24,
        device: tunefuse::train::config::DeviceKind::Cpu,
        log_every: 3,
        ..Default::default()
    }
}

const BOOKS: [&str; 8] = [
    "a gripping novel with a slow start",
    "the author writes with great warmth",
    "i could not put this book down",
    "the plot of the story drags in the middle",
    "a classic of the genre worth reading twice",
    "the characters are thin and the prose is flat",
    "her best book so far",
    "the chapters are short and the pages fly",
];
const KITCHEN: [&str; 8] = [
    "the blender broke after a week",
    "this pan heats evenly and cleans easily",
    "the knife holds its edge",
    "the lid does not fit the pot",
    "a sturdy kettle that boils fast",
    "the toaster burns one side of the bread",
    "dishwasher safe and easy to store",
    "the handle gets hot on the stove",
];

#[test]
fn posttrain_writes_a_model_that_loads_keeps_its_head_and_lowers_the_loss() {
    let dir = common::scratch("posttrain");
    let model = common::tiny_model_dir(dir.path());
    let books = corpus_file(dir.path(), "books.txt", &BOOKS);
    let kitchen = corpus_file(dir.path(), "kitchen.txt", &KITCHEN);
    let out = dir.path().join("post");
    // Sixteen texts seen 25 times at a high rate: the tiny model starts at
    // the uniform loss ln 30522 ≈ 10.3 and memorises them.
    let s = Settings {
        domain_task: true,
        epochs: 25,
        lr: 1e-2,
        log_every: 10,
        ..settings(&model, &out, vec![books.clone(), kitchen.clone()])
    };
    let rep = posttrain(s, |_| {}).unwrap();
    assert_eq!(rep.steps, 50);
    assert!(!rep.head_loaded, "the tiny model has no masked-LM head");
    let first = rep.losses.first().unwrap();
    let last = rep.losses.last().unwrap();
    assert!(first.2.is_some(), "the domain loss is reported");
    assert!(
        last.1 < first.1 - 1.0,
        "the masked-LM loss did not fall: {:?}",
        rep.losses
    );
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "posttrain.json",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "BertForMaskedLM");
    // The directory is a base model (the head is set aside), its encoder
    // changed; the masked-LM head is read back by the next post-training.
    let vm = candle_nn::VarMap::new();
    let b = Bert::from_pretrained(&out, &vm, DType::F32, &Device::Cpu).unwrap();
    let vm0 = candle_nn::VarMap::new();
    let b0 = Bert::from_pretrained(&model, &vm0, DType::F32, &Device::Cpu).unwrap();
    let diff = (&b.embeddings.word - &b0.embeddings.word)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff > 0.0, "post-training left the word embeddings alone");
    let stored =
        candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(stored.contains_key("bert.encoder.layer.0.attention.self.query.weight"));
    let bias = &stored["cls.predictions.bias"];
    let head = MlmHead::new(&vm, &b.config, &Device::Cpu).unwrap();
    assert!(load_head(&vm, &out, b.family).unwrap());
    let d = (&head.bias - bias)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(d, 0.0);
    let again = Settings {
        epochs: 1,
        ..settings(&out, &dir.path().join("post2"), vec![books])
    };
    assert!(posttrain(again, |_| {}).unwrap().head_loaded);
    // An existing output is not replaced without --overwrite.
    let e = posttrain(settings(&model, &out, vec![kitchen]), |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("not empty") && e.contains("--overwrite"), "{e}");
}

#[test]
fn candidate_masking_runs_on_a_token_corpus() {
    let dir = common::scratch("posttrain-ner");
    let model = common::tiny_model_dir(dir.path());
    let s = Settings {
        data_dir: Some(common::data_root()),
        candidates: "distant:ner:ncbi-disease".parse().unwrap(),
        max_texts: Some(40),
        epochs: 1,
        ..settings(
            &model,
            &dir.path().join("tri"),
            vec!["ner:ncbi-disease@dev".into()],
        )
    };
    let rep = posttrain(s, |_| {}).unwrap();
    assert!(
        rep.candidate_words > 0.0 && rep.candidate_words < 0.5,
        "{}",
        rep.candidate_words
    );
    assert!(rep.predicted_tokens > 0);
}

#[test]
fn bad_settings_are_refused_with_their_name() {
    let dir = common::scratch("posttrain-bad");
    let model = common::tiny_model_dir(dir.path());
    let books = corpus_file(dir.path(), "books.txt", &BOOKS);
    let empty = corpus_file(dir.path(), "empty.txt", &["", "  "]);
    let out = dir.path().join("o");
    let err = |s: Settings| posttrain(s, |_| {}).unwrap_err().to_string();
    let e = err(Settings {
        domain_task: true,
        ..settings(&model, &out, vec![books.clone()])
    });
    assert!(e.contains("domain") && e.contains("two corpora"), "{e}");
    let e = err(settings(&model, &out, vec![empty]));
    assert!(e.contains("holds no text"), "{e}");
    let e = err(Settings {
        mask_rate: 0.0,
        ..settings(&model, &out, vec![books.clone()])
    });
    assert!(e.contains("mask_rate"), "{e}");
    let e = err(Settings {
        candidates: "distant:sst2".parse().unwrap(),
        ..settings(&model, &out, vec![books.clone()])
    });
    assert!(e.contains("per word"), "{e}");
    let e = err(Settings {
        domain_weight: f64::NAN,
        ..settings(&model, &out, vec![books.clone(), books.clone()])
    });
    assert!(e.contains("domain_weight"), "{e}");
    let e = err(settings(&model, &out, vec!["nosuchtask".into()]));
    assert!(e.contains("neither a file nor a task"), "{e}");
    let e = "distant"
        .parse::<tunefuse::train::posttrain::Candidates>()
        .unwrap_err();
    assert!(e.to_string().contains("distant:<token task>"), "{e}");
    assert!(!out.exists(), "a refused run wrote its output");
}

#[test]
fn the_cli_posttrains() {
    let dir = common::scratch("posttrain-cli");
    let model = common::tiny_model_dir(dir.path());
    let books = corpus_file(dir.path(), "books.txt", &BOOKS);
    let out = dir.path().join("cli");
    let o = common::cli(&[
        "posttrain",
        "--model",
        model.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--corpus",
        &books,
        "--device",
        "cpu",
        "--max-len",
        "24",
        "--batch-size",
        "4",
        "--whole-word",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("2 steps"), "{stdout}");
    assert!(out.join("model.safetensors").exists());
}

/// The largest change of any encoder tensor between two model directories'
/// weights (names both share, the masked-LM head's `cls.` excluded), and
/// the largest absolute encoder value of the first.
fn encoder_moved(before: &Path, after: &Path) -> (f32, f32) {
    let load = |d: &Path| candle_core::safetensors::load(d.join("model.safetensors"), &Device::Cpu);
    // A base checkpoint may or may not prefix its names with `bert.`.
    let strip = |m: std::collections::HashMap<String, candle_core::Tensor>| {
        m.into_iter()
            .map(|(k, t)| (k.strip_prefix("bert.").unwrap_or(&k).to_string(), t))
            .collect::<std::collections::HashMap<_, _>>()
    };
    let (a, b) = (strip(load(before).unwrap()), strip(load(after).unwrap()));
    let (mut moved, mut largest, mut shared) = (0f32, 0f32, 0);
    for (k, t) in &a {
        let Some(u) = b.get(k) else { continue };
        if k.starts_with("cls.") {
            continue;
        }
        shared += 1;
        let (t, u) = (common::to_f64(t), common::to_f64(u));
        moved = moved.max(common::max_abs_diff(&t, &u) as f32);
        largest = largest.max(t.iter().fold(0f64, |m, x| m.max(x.abs())) as f32);
    }
    assert!(shared > 10, "only {shared} encoder tensors in common");
    (moved, largest)
}

/// The warm-up's observable promise: the encoder (embeddings included)
/// does not move while the heads learn. (That no gradient is even computed
/// for it, `Bert::set_all_frozen`, saves time and is not observable here.)
#[test]
fn head_warmup_moves_only_the_heads_until_its_last_step() {
    let dir = common::scratch("posttrain-warm");
    let model = common::tiny_model_dir(dir.path());
    let books = corpus_file(dir.path(), "books.txt", &BOOKS);
    let kitchen = corpus_file(dir.path(), "kitchen.txt", &KITCHEN);
    // 16 texts in batches of 8 for 6 epochs: 12 steps. Eleven head-only
    // steps leave the encoder one fresh AdamW step at the full rate (no
    // warm-up), which moves no weight by more than lr·(1 + decay·|θ|).
    let lr = 2e-3;
    let run = |warm: u64, name: &str| {
        let out = dir.path().join(name);
        let s = Settings {
            domain_task: true,
            head_lr: Some(2e-2),
            head_warmup_steps: warm,
            warmup: 0.0,
            lr,
            ..settings(&model, &out, vec![books.clone(), kitchen.clone()])
        };
        let rep = posttrain(s, |_| {}).unwrap();
        assert_eq!(rep.steps, 12);
        (out, rep)
    };
    let (warm_out, warm_rep) = run(11, "warm");
    let (moved, largest) = encoder_moved(&model, &warm_out);
    let bound = (lr * (1.0 + 0.01 * f64::from(largest))) as f32 * 1.001;
    assert!(
        moved > 0.0 && moved <= bound,
        "after 11 head-only steps and one full step the encoder moved by {moved} (bound {bound})"
    );
    // The heads learned meanwhile: the masked-LM loss fell.
    let (first, last) = (
        warm_rep.losses.first().unwrap(),
        warm_rep.losses.last().unwrap(),
    );
    assert!(last.1 < first.1, "{:?}", warm_rep.losses);
    // Without the warm-up the same run moves the encoder by several steps.
    let (plain_out, _) = run(0, "plain");
    let (plain_moved, _) = encoder_moved(&model, &plain_out);
    assert!(
        plain_moved > 3.0 * bound,
        "twelve full steps moved the encoder by only {plain_moved}"
    );
    // A warm-up as long as the run is refused before training.
    let e = posttrain(
        Settings {
            head_warmup_steps: 12,
            ..settings(&model, &dir.path().join("all-warm"), vec![books, kitchen])
        },
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("head_warmup_steps") && e.contains("12"), "{e}");
}

#[test]
fn a_new_head_starts_from_the_corpus_token_frequencies() {
    let dir = common::scratch("posttrain-prior");
    let model = common::tiny_model_dir(dir.path());
    let books = corpus_file(dir.path(), "books.txt", &BOOKS);
    let tok = TextTokenizer::from_file(&model.join("tokenizer.json"), 24).unwrap();
    let enc: Vec<Encoded> = BOOKS
        .iter()
        .map(|t| {
            tok.encode_spans(tunefuse::model::Input::Text(t), None)
                .unwrap()
        })
        .collect();
    let vocab = 30522;
    let prior = log_prior(&enc, vocab);
    let total: f64 = prior.iter().map(|&l| f64::from(l).exp()).sum();
    assert!((total - 1.0).abs() < 1e-4, "the prior sums to {total}");
    // "the" is the commonest word of the corpus; [CLS] is never counted.
    let the = tok
        .encode_spans(tunefuse::model::Input::Text("the"), None)
        .unwrap()
        .ids[1];
    let cls = enc[0].ids[0];
    assert!(enc[0].words[0].is_none());
    let max = prior.iter().cloned().fold(f32::MIN, f32::max);
    assert_eq!(
        prior[the as usize], max,
        "\"the\" is not the commonest token"
    );
    assert_eq!(
        prior[cls as usize],
        prior.iter().cloned().fold(f32::MAX, f32::min)
    );
    // The first masked-LM loss is lower from the prior than from zeros.
    let first = |prior_bias: bool, name: &str| {
        let s = Settings {
            prior_bias,
            epochs: 1,
            log_every: 1,
            ..settings(&model, &dir.path().join(name), vec![books.clone()])
        };
        posttrain(s, |_| {}).unwrap().losses[0].1
    };
    let (with, without) = (first(true, "prior"), first(false, "flat"));
    assert!(
        with < without - 1.0,
        "first masked-LM loss {with} from the prior, {without} from zeros"
    );
}
