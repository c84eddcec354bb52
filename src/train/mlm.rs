//! Masked-language-model training: the prediction head, the masking and
//! the loss, shared by post-training (`tunefuse posttrain`: BERT-DAAT's
//! domain post-training, Tri-Train's candidate-masked pre-fine-tuning) and
//! by the MLM term of unsupervised clustering fine-tuning.
//!
//! **Head.** BERT's `BertLMPredictionHead`: `LayerNorm(act(dense(h)))`,
//! then the word-embedding table as the decoder (tied weights) plus a bias
//! per vocabulary entry. It is loaded from the checkpoint when the
//! checkpoint has one (`cls.predictions.*` for BERT, `lm_head.*` for
//! RoBERTa and XLM-R) and initialised otherwise (N(0, 0.02) weights, unit
//! LayerNorm, zero biases: BERT's initialiser), and saved under the same
//! names, so that transformers' `…ForMaskedLM` reads it back.
//!
//! **Masking** ([`mask`]): BERT's rule as transformers'
//! `DataCollatorForLanguageModeling` applies it: each token (or, with
//! `whole_word`, each word) is chosen with probability `rate`; a chosen
//! token becomes the mask token 80 % of the time, a token drawn uniformly
//! from the vocabulary 10 %, and stays itself 10 %; the label of a chosen
//! token is its original id, and no other token has a label. Special
//! tokens are never chosen. With candidates (Tri-Train), the probability of
//! a word is `rate × candidate(word)`: a non-candidate is never chosen.
//!
//! **Loss** ([`MlmBatch::loss`]): the logits are computed only at the
//! chosen positions (a `[M, V]` matrix, M ≈ 15 % of the tokens, rather than
//! `[B·L, V]`), and their mean cross-entropy is the loss.
use std::collections::HashSet;
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Init, VarBuilder, VarMap};

use super::ner::Sentence;
use super::optim::Param;
use crate::error::{format_err, param_err, Result};
use crate::model::bert::load_into;
use crate::model::config::Activation;
use crate::model::layers::{activation, linear};
use crate::model::{Bert, BertConfig, Dense, Encoded, Family, TextTokenizer};
use crate::philox;

/// The varmap prefix of the head's parameters.
pub const PREFIX: &str = "mlm";

/// The masked-LM prediction head (see the module docs).
#[derive(Debug)]
pub struct MlmHead {
    /// `mlm.dense.*`: `[E, H]` (E: the embedding width).
    pub dense: Dense,
    /// `mlm.LayerNorm.*`, over E.
    pub norm: crate::model::layers::LayerNorm,
    /// `mlm.bias`: `[V]`, the decoder's bias.
    pub bias: Tensor,
    act: Activation,
}

impl MlmHead {
    /// A head in `varmap` for an encoder of `config` (BERT's initialiser
    /// for the dense layer's weight, unit LayerNorm, zero biases).
    pub fn new(varmap: &VarMap, config: &BertConfig, device: &Device) -> Result<Self> {
        let vb = VarBuilder::from_varmap(varmap, DType::F32, device).pp(PREFIX);
        let e = config.embedding_width();
        let d = vb.pp("dense");
        let weight = d.get_with_hints(
            (e, config.hidden_size),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        let dense = Dense {
            name: format!("{PREFIX}.dense"),
            weight,
            bias: Some(d.get_with_hints(e, "bias", Init::Const(0.0))?),
            frozen: false,
            mixout: None,
            lora: None,
        };
        let norm = crate::model::layers::LayerNorm::new(&vb, e, config.layer_norm_eps)?;
        let bias = vb.get_with_hints(config.vocab_size, "bias", Init::Const(0.0))?;
        Ok(Self {
            dense,
            norm,
            bias,
            act: config.activation()?,
        })
    }

    /// Logits `[N, V]` (f32) of hidden states `[N, H]`: the transform, then
    /// the encoder's word-embedding table as the decoder.
    pub fn logits(&self, bert: &Bert, rows: &Tensor) -> Result<Tensor> {
        let s = &bert.stream;
        let x = self.dense.forward(rows, s)?;
        let x = activation(&x, self.act, s)?;
        let x = self.norm.forward(&x, s)?;
        let word = s.compute_weight(&bert.embeddings.word, x.dtype())?;
        let word = if bert.embeddings.frozen {
            word.detach()
        } else {
            word
        };
        let bias = s.compute_weight(&self.bias, x.dtype())?;
        Ok(linear(&x, &word, Some(&bias))?.to_dtype(DType::F32)?)
    }
}

/// The log unigram probabilities of the tokens of `texts` (special tokens
/// excluded, add-one smoothed over `vocab` entries; ids beyond `vocab`
/// ignored): a new decoder bias whose softmax is the corpus's token
/// frequencies, where masked-LM training starts from them.
pub fn log_prior(texts: &[Encoded], vocab: usize) -> Vec<f32> {
    let mut counts = vec![1u64; vocab];
    for e in texts {
        for (id, w) in e.ids.iter().zip(&e.words) {
            if w.is_some() {
                if let Some(c) = counts.get_mut(*id as usize) {
                    *c += 1;
                }
            }
        }
    }
    let total: u64 = counts.iter().sum();
    let ln_total = (total as f64).ln();
    counts
        .iter()
        .map(|&c| ((c as f64).ln() - ln_total) as f32)
        .collect()
}

/// The head's names in a checkpoint of `family`: (the varmap's, the
/// checkpoint's). An error for a family whose masked-LM head is not mapped.
pub fn checkpoint_names(family: Family) -> Result<Vec<(String, String)>> {
    let (dense, norm, bias) = match family {
        Family::Bert => (
            "cls.predictions.transform.dense.",
            "cls.predictions.transform.LayerNorm.",
            "cls.predictions.bias",
        ),
        Family::Roberta | Family::XlmRoberta => {
            ("lm_head.dense.", "lm_head.layer_norm.", "lm_head.bias")
        }
        f => {
            return Err(param_err(
                "mlm",
                format!(
                    "masked-LM training supports BERT, RoBERTa and XLM-R checkpoints; the \
                     masked-LM head of {} is not mapped",
                    f.architecture()
                ),
            ))
        }
    };
    let mut out = vec![];
    for p in ["weight", "bias"] {
        out.push((format!("{PREFIX}.dense.{p}"), format!("{dense}{p}")));
        out.push((format!("{PREFIX}.LayerNorm.{p}"), format!("{norm}{p}")));
    }
    out.push((format!("{PREFIX}.bias"), bias.to_string()));
    Ok(out)
}

/// Loads the head from the model directory `dir` when its
/// `model.safetensors` holds one (every tensor of
/// [`checkpoint_names`]); returns whether it did. A head present in part
/// is an error naming what is missing.
pub fn load_head(varmap: &VarMap, dir: &Path, family: Family) -> Result<bool> {
    let path = dir.join("model.safetensors");
    let names = checkpoint_names(family)?;
    let stored = candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| format_err(&path, format!("not a readable safetensors file: {e}")))?;
    let found: Vec<&(String, String)> = names
        .iter()
        .filter(|(_, c)| stored.contains_key(c))
        .collect();
    if found.is_empty() {
        return Ok(false);
    }
    if found.len() < names.len() {
        let missing: Vec<&str> = names
            .iter()
            .filter(|(_, c)| !stored.contains_key(c))
            .map(|(_, c)| c.as_str())
            .collect();
        return Err(format_err(
            &path,
            format!(
                "holds part of a masked-LM head: {} missing",
                missing.join(", ")
            ),
        ));
    }
    let tensors = names
        .iter()
        .map(|(ours, theirs)| (ours.clone(), stored[theirs].clone()))
        .collect();
    load_into(varmap, &tensors, &path, &|n| {
        n.starts_with(&format!("{PREFIX}."))
    })?;
    Ok(true)
}

/// The head's tensors under `family`'s checkpoint names, for saving.
pub fn head_tensors(varmap: &VarMap, family: Family) -> Result<Vec<(String, Tensor)>> {
    let data = varmap.data().lock().unwrap();
    checkpoint_names(family)?
        .into_iter()
        .map(|(ours, theirs)| {
            let v = data
                .get(&ours)
                .ok_or_else(|| param_err("mlm", format!("no variable {ours}")))?;
            Ok((theirs, v.as_tensor().to_dtype(DType::F32)?))
        })
        .collect()
}

/// The encoder of `model` in `varmap` on `device` with its tokenizer
/// (truncating to `max_len`), bf16 activations where `precision` asks for
/// them, and the dropout stream seeded by `seed`: how the masked-LM loops
/// (`posttrain`, `cluster`) start.
pub fn load_encoder(
    model: &Path,
    varmap: &VarMap,
    device: &Device,
    max_len: usize,
    precision: super::config::Precision,
    seed: u64,
) -> Result<(Bert, TextTokenizer)> {
    use super::config::Precision;
    let bert = Bert::from_pretrained(model, varmap, DType::F32, device)?;
    let tok = TextTokenizer::from_file(&model.join("tokenizer.json"), max_len)?;
    tok.check_fits(&bert.config, max_len, model)?;
    let bf16 = match precision {
        Precision::Bf16 => true,
        Precision::F32 => false,
        Precision::Auto => device.is_cuda(),
    };
    bert.stream
        .set_compute_dtype(bf16.then_some(DType::BF16), true);
    bert.stream
        .set_position(crate::ops::mixout::Rng { seed, offset: 0 });
    Ok((bert, tok))
}

/// Every parameter of `varmap` for the optimiser, sorted by name: those
/// under one of `heads` (new parameters) at `head_lr`, the rest at `lr`;
/// no weight decay on biases and LayerNorms.
pub fn all_params(varmap: &VarMap, heads: &[&str], lr: f64, head_lr: f64) -> Vec<Param> {
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    names
        .into_iter()
        .map(|n| Param {
            name: n.clone(),
            var: data[n].clone(),
            lr_scale: if heads.iter().any(|h| n.starts_with(h)) {
                head_lr / lr
            } else {
                1.0
            },
            decay: !(n.ends_with("bias") || n.contains("LayerNorm")),
            anchor: None,
        })
        .collect()
}

/// How tokens are chosen for prediction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Masking {
    /// The probability of choosing a token (or word): BERT's 0.15.
    pub rate: f64,
    /// Choose whole words (every subword of a chosen word).
    pub whole_word: bool,
}

impl Masking {
    /// `rate` in (0, 1]; otherwise an error naming it.
    pub fn validate(&self) -> Result<()> {
        if !(self.rate > 0.0 && self.rate <= 1.0) {
            return Err(param_err(
                "mask_rate",
                format!("must be in (0, 1], got {}", self.rate),
            ));
        }
        Ok(())
    }
}

/// A counter-based random stream (Philox): the same seed gives the same
/// draws on every machine.
#[derive(Clone, Debug)]
pub struct Draws {
    seed: u64,
    stream: u64,
    next: u64,
}

impl Draws {
    /// The stream `stream` of `seed`.
    pub fn new(seed: u64, stream: u64) -> Self {
        Self {
            seed,
            stream,
            next: 0,
        }
    }

    /// A uniform 32-bit word.
    pub fn word(&mut self) -> u32 {
        let w = philox::word(self.seed, self.stream, self.next);
        self.next += 1;
        w
    }

    /// Uniform in [0, 1), 24 random bits.
    pub fn uniform(&mut self) -> f64 {
        philox::uniform(self.word()) as f64
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        let w = (u64::from(self.word()) << 32) | u64::from(self.word());
        (w % n as u64) as usize
    }
}

/// One masked text: the ids the encoder reads and, per token, the id to
/// predict (`None`: not chosen).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Masked {
    /// Input ids after masking.
    pub ids: Vec<u32>,
    /// Token types, as encoded.
    pub types: Vec<u32>,
    /// The original id of each chosen token.
    pub labels: Vec<Option<u32>>,
}

/// Masks one encoded text by `m` (see the module docs). `candidate(word)`
/// tells whether a word (sequence, index) may be chosen; `vocab` bounds the
/// random replacements.
pub fn mask(
    enc: &Encoded,
    candidate: &dyn Fn((usize, usize)) -> bool,
    m: &Masking,
    mask_id: u32,
    vocab: usize,
    draws: &mut Draws,
) -> Masked {
    let mut ids = enc.ids.clone();
    let mut labels = vec![None; ids.len()];
    // Whole words: one draw per word, at its first subword.
    let mut word_choice: Option<((usize, usize), bool)> = None;
    for (i, w) in enc.words.iter().enumerate() {
        let Some(w) = *w else { continue };
        if !candidate(w) {
            continue;
        }
        let chosen = if m.whole_word {
            match word_choice {
                Some((prev, c)) if prev == w => c,
                _ => {
                    let c = draws.uniform() < m.rate;
                    word_choice = Some((w, c));
                    c
                }
            }
        } else {
            draws.uniform() < m.rate
        };
        if !chosen {
            continue;
        }
        labels[i] = Some(enc.ids[i]);
        let r = draws.uniform();
        if r < 0.8 {
            ids[i] = mask_id;
        } else if r < 0.9 {
            ids[i] = draws.below(vocab) as u32;
        }
    }
    Masked {
        ids,
        types: enc.types.clone(),
        labels,
    }
}

/// A padded batch of masked texts with the flat positions `[M]` of the
/// chosen tokens in `[B·L]` and their targets `[M]`.
pub struct MlmBatch {
    /// The padded inputs.
    pub batch: crate::model::Batch,
    /// Positions of the chosen tokens in the flattened `[B·L]` batch
    /// (`None` when no token was chosen).
    pub positions: Option<Tensor>,
    /// Their original ids.
    pub targets: Option<Tensor>,
    /// How many tokens were chosen.
    pub chosen: usize,
}

impl MlmBatch {
    /// Pads `rows` into one batch on `device`.
    pub fn new(tok: &TextTokenizer, rows: &[Masked], device: &Device) -> Result<Self> {
        let pairs: Vec<(Vec<u32>, Vec<u32>)> = rows
            .iter()
            .map(|r| (r.ids.clone(), r.types.clone()))
            .collect();
        let batch = tok.pad_rows(&pairs, device)?;
        let l = batch.ids.dim(1)?;
        let (mut pos, mut tgt) = (vec![], vec![]);
        for (r, row) in rows.iter().enumerate() {
            for (i, t) in row.labels.iter().enumerate() {
                if let Some(t) = t {
                    pos.push((r * l + i) as u32);
                    tgt.push(*t);
                }
            }
        }
        let chosen = pos.len();
        let (positions, targets) = if chosen == 0 {
            (None, None)
        } else {
            (
                Some(Tensor::from_vec(pos, chosen, device)?),
                Some(Tensor::from_vec(tgt, chosen, device)?),
            )
        };
        Ok(Self {
            batch,
            positions,
            targets,
            chosen,
        })
    }

    /// The mean cross-entropy of the chosen tokens, from the encoder's last
    /// hidden states `[B, L, H]` of this batch (`None` when none was
    /// chosen).
    pub fn loss(&self, bert: &Bert, head: &MlmHead, hidden: &Tensor) -> Result<Option<Tensor>> {
        let (Some(pos), Some(tgt)) = (&self.positions, &self.targets) else {
            return Ok(None);
        };
        let (b, l, h) = hidden.dims3()?;
        let rows = hidden.reshape((b * l, h))?.index_select(pos, 0)?;
        let logits = head.logits(bert, &rows)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let nll = logp.gather(&tgt.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
        Ok(Some(nll.mean_all()?))
    }
}

/// Tri-Train's default candidates by distant labelling: a word of an
/// unlabelled sentence is a candidate when it lies in a span whose words
/// equal (ignoring case) those of an entity mention of the labelled
/// `train` sentences. Returns one flag per word of each of `sentences`.
pub fn distant_candidates(train: &[Sentence], sentences: &[Vec<String>]) -> Vec<Vec<bool>> {
    let mut mentions: HashSet<Vec<String>> = HashSet::new();
    for s in train {
        for (_, a, b) in super::ner::entities(std::slice::from_ref(&s.tags)) {
            mentions.insert(s.words[a..=b].iter().map(|w| w.to_lowercase()).collect());
        }
    }
    let longest = mentions.iter().map(Vec::len).max().unwrap_or(0);
    sentences
        .iter()
        .map(|words| {
            let lower: Vec<String> = words.iter().map(|w| w.to_lowercase()).collect();
            let mut flags = vec![false; words.len()];
            for i in 0..lower.len() {
                for n in 1..=longest.min(lower.len() - i) {
                    if mentions.contains(&lower[i..i + n]) {
                        flags[i..i + n].iter_mut().for_each(|f| *f = true);
                    }
                }
            }
            flags
        })
        .collect()
}

/// Reads per-word candidate flags: one `0` or `1` a line for each word of
/// `sentences`, a blank line after each sentence (the layout of a CoNLL
/// file). Errors name the line: a value other than 0 / 1, or a sentence or
/// word count that differs from the corpus's.
pub fn read_candidates(path: &Path, sentences: &[Vec<String>]) -> Result<Vec<Vec<bool>>> {
    let text = std::fs::read_to_string(path).map_err(|e| crate::error::io_err(path, e))?;
    let mut out: Vec<Vec<bool>> = vec![];
    let mut cur: Vec<bool> = vec![];
    let close = |cur: &mut Vec<bool>, out: &mut Vec<Vec<bool>>, line: usize| -> Result<()> {
        if cur.is_empty() {
            return Ok(());
        }
        let s = out.len();
        let want = sentences.get(s).map(Vec::len);
        if want != Some(cur.len()) {
            return Err(format_err(
                path,
                format!(
                    "line {line}: sentence {} has {} flags, the corpus's has {}",
                    s + 1,
                    cur.len(),
                    want.map_or("no such sentence".to_string(), |w| format!("{w} words"))
                ),
            ));
        }
        out.push(std::mem::take(cur));
        Ok(())
    };
    let mut n = 0;
    for (i, line) in text.lines().enumerate() {
        n = i + 1;
        match line.trim() {
            "" => close(&mut cur, &mut out, n)?,
            "0" => cur.push(false),
            "1" => cur.push(true),
            other => {
                return Err(format_err(
                    path,
                    format!("line {n}: expected 0 or 1, got {other:?}"),
                ))
            }
        }
    }
    close(&mut cur, &mut out, n + 1)?;
    if out.len() != sentences.len() {
        return Err(format_err(
            path,
            format!(
                "has flags for {} sentences, the corpus has {}",
                out.len(),
                sentences.len()
            ),
        ));
    }
    Ok(out)
}
