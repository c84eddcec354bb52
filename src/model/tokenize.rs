//! Tokenisation with a Hugging Face `tokenizer.json`: single sentences or
//! pairs, truncation to a maximum length, and dynamic padding (each batch is
//! padded to its own longest row, not to the file's fixed length).
use std::path::Path;

use candle_core::{Device, Tensor};
use tokenizers::{Tokenizer, TruncationParams};

use crate::error::{format_err, io_err, param_err, Result};

/// A padded batch of pre-split sentences with its word alignment.
#[derive(Debug)]
pub struct WordBatch {
    /// The padded batch.
    pub batch: Batch,
    /// Per row and token, the index of the word it belongs to (`None`: a
    /// special token or padding).
    pub word_ids: Vec<Vec<Option<usize>>>,
    /// Per row, the words truncation cut off.
    pub lost: Vec<usize>,
}

/// A text to encode: raw, or already split into words.
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    /// Raw text, split into words by the tokenizer's pre-tokenizer.
    Text(&'a str),
    /// Words (a CoNLL sentence).
    Words(&'a [String]),
}

/// One encoded text (or pair), unpadded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Token types.
    pub types: Vec<u32>,
    /// Per token, (sequence, word) of the word it belongs to; `None` for a
    /// special token.
    pub words: Vec<Option<(usize, usize)>>,
}

/// A tokenizer that pads each batch to its longest row (rounded up to a
/// multiple, [`TextTokenizer::set_pad_multiple`]).
pub struct TextTokenizer {
    inner: Tokenizer,
    pad_id: u32,
    /// Batches pad to a multiple of this (1: to the longest row).
    pad_multiple: usize,
    /// The truncation length: no batch pads past it.
    max_len: usize,
}

/// One padded batch: ids, token types and attention mask, all `[B, L]` u32.
#[derive(Debug)]
pub struct Batch {
    /// Token ids.
    pub ids: Tensor,
    /// Token types (0 for the first text, 1 for the second).
    pub token_types: Tensor,
    /// 1 for tokens, 0 for padding.
    pub mask: Tensor,
}

impl TextTokenizer {
    /// Loads `tokenizer.json`, switches its fixed padding off and truncates
    /// to `max_len` tokens (pairs: longest first).
    pub fn from_file(path: &Path, max_len: usize) -> Result<Self> {
        if max_len < 2 {
            return Err(param_err(
                "tokenizer",
                format!("max_len must be at least 2, got {max_len}"),
            ));
        }
        if !path.exists() {
            return Err(io_err(path, "no such file"));
        }
        let mut inner = Tokenizer::from_file(path)
            .map_err(|e| format_err(path, format!("not a tokenizer.json: {e}")))?;
        // The padding id: the file's padding settings, else its pad token
        // (`[PAD]` in BERT's vocabularies, `<pad>` in RoBERTa's, where it is
        // 1), else 0.
        let pad_id = inner
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| inner.token_to_id("[PAD]"))
            .or_else(|| inner.token_to_id("<pad>"))
            .unwrap_or(0);
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| format_err(path, format!("truncation: {e}")))?;
        Ok(Self {
            inner,
            pad_id,
            pad_multiple: 1,
            max_len,
        })
    }

    /// Pads every batch to a multiple of `m` tokens (at most the
    /// truncation length): a few batch shapes instead of one per longest
    /// row, as a CUDA graph per shape and GEMM tile sizes want. Padding is
    /// masked: the real tokens' values do not depend on it (beyond the
    /// order of sums over the padded rows, whose terms are zero). 1 (the
    /// default): to the longest row.
    pub fn set_pad_multiple(&mut self, m: usize) -> Result<()> {
        if m == 0 {
            return Err(param_err("tokenizer", "pad_to_multiple must be at least 1"));
        }
        self.pad_multiple = m;
        Ok(())
    }

    /// The padded length of a batch whose longest row has `longest` tokens.
    pub fn padded_len(&self, longest: usize) -> usize {
        let up = longest.div_ceil(self.pad_multiple) * self.pad_multiple;
        up.min(self.max_len.max(longest))
    }

    /// The largest id this tokenizer can produce, plus one (added tokens
    /// included).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Refuses a model whose tables this tokenizer's output would index
    /// past: an id at or above `vocab_size`, or a position at or above
    /// `max_position_embeddings` (`max_len` tokens). Found here rather than
    /// as an out-of-range gather in the first batch that reaches it.
    pub fn check_fits(
        &self,
        config: &crate::model::BertConfig,
        max_len: usize,
        model_dir: &Path,
    ) -> Result<()> {
        let cfg = model_dir.join("config.json");
        if self.vocab_size() > config.vocab_size {
            return Err(format_err(
                &cfg,
                format!(
                    "vocab_size {} is smaller than the {} tokens of {}",
                    config.vocab_size,
                    self.vocab_size(),
                    model_dir.join("tokenizer.json").display()
                ),
            ));
        }
        // RoBERTa's positions start after the padding id.
        let first = config.family()?.position_offset(config.pad_token_id);
        let room = config.max_position_embeddings.saturating_sub(first);
        if max_len > room {
            return Err(format_err(
                &cfg,
                format!(
                    "max_position_embeddings {}{} leaves room for {room} tokens, fewer than \
                     max_len {max_len}: lower max_len to at most {room}",
                    config.max_position_embeddings,
                    if first > 0 {
                        format!(" (positions start at {first})")
                    } else {
                        String::new()
                    }
                ),
            ));
        }
        Ok(())
    }

    /// A batch of pre-split sentences (token classification), padded to
    /// its longest row, with each row's word ids (`None`: a special token
    /// or padding) and the number of words each row lost to truncation.
    pub fn batch_words(&self, sents: &[&[String]], device: &Device) -> Result<WordBatch> {
        let mut enc = Vec::with_capacity(sents.len());
        let (mut word_ids, mut lost) = (vec![], vec![]);
        for words in sents {
            let e = self
                .inner
                .encode(*words, true)
                .map_err(|e| param_err("tokenizer", format!("cannot encode {words:?}: {e}")))?;
            let ids: Vec<Option<usize>> = e
                .get_word_ids()
                .iter()
                .map(|w| w.map(|w| w as usize))
                .collect();
            let kept = ids.iter().flatten().max().map_or(0, |m| m + 1);
            lost.push(words.len() - kept.min(words.len()));
            word_ids.push(ids);
            enc.push((e.get_ids().to_vec(), e.get_type_ids().to_vec()));
        }
        Ok(WordBatch {
            batch: self.pad(&enc, device)?,
            word_ids,
            lost,
        })
    }

    /// One text (or a pair) as token ids, token types and, per token, the
    /// word it belongs to as (sequence, word) (`None` for special tokens):
    /// what masked-LM masking needs to spare special tokens and to mask
    /// whole words. Raw text is split into words by the tokenizer's
    /// pre-tokenizer; pre-split words keep their own indices.
    pub fn encode_spans<'a>(&self, a: Input<'a>, b: Option<Input<'a>>) -> Result<Encoded> {
        use tokenizers::{EncodeInput, InputSequence};
        fn seq(x: Input<'_>) -> InputSequence<'_> {
            match x {
                Input::Text(t) => t.into(),
                Input::Words(w) => w.into(),
            }
        }
        let input: EncodeInput<'a> = match b {
            None => seq(a).into(),
            Some(b) => (seq(a), seq(b)).into(),
        };
        let e = self
            .inner
            .encode(input, true)
            .map_err(|e| param_err("tokenizer", format!("cannot encode {a:?}: {e}")))?;
        let seqs = e.get_sequence_ids();
        let words = e
            .get_word_ids()
            .iter()
            .zip(seqs)
            .zip(e.get_special_tokens_mask())
            .map(|((w, s), special)| match (w, s) {
                (Some(w), Some(s)) if *special == 0 => Some((s, *w as usize)),
                _ => None,
            })
            .collect();
        Ok(Encoded {
            ids: e.get_ids().to_vec(),
            types: e.get_type_ids().to_vec(),
            words,
        })
    }

    /// The id of the mask token (`[MASK]`, or RoBERTa's `<mask>`); an error
    /// when the vocabulary has neither.
    pub fn mask_id(&self) -> Result<u32> {
        self.inner
            .token_to_id("[MASK]")
            .or_else(|| self.inner.token_to_id("<mask>"))
            .ok_or_else(|| {
                param_err(
                    "tokenizer",
                    "the vocabulary has no mask token ([MASK] or <mask>): masked-LM training                      needs one",
                )
            })
    }

    /// Rows of (ids, token types) padded to the longest into one batch.
    pub fn pad_rows(&self, rows: &[(Vec<u32>, Vec<u32>)], device: &Device) -> Result<Batch> {
        self.pad(rows, device)
    }

    /// Token ids of single sentences or (first, second) pairs, unpadded.
    pub fn encode(&self, texts: &[(&str, Option<&str>)]) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
        let mut out = Vec::with_capacity(texts.len());
        for &(a, b) in texts {
            let enc = match b {
                None => self.inner.encode(a, true),
                Some(b) => self.inner.encode((a, b), true),
            }
            .map_err(|e| param_err("tokenizer", format!("cannot encode {a:?}: {e}")))?;
            out.push((enc.get_ids().to_vec(), enc.get_type_ids().to_vec()));
        }
        Ok(out)
    }

    /// A batch padded to its longest row.
    pub fn batch(&self, texts: &[(&str, Option<&str>)], device: &Device) -> Result<Batch> {
        Ok(self.batch_with(texts, &[], device)?.0)
    }

    /// [`TextTokenizer::batch`] with `extra` values (a classification
    /// batch's labels) in the same buffer, so the same single upload
    /// carries them; returned as a `[extra.len()]` view of it.
    pub fn batch_with(
        &self,
        texts: &[(&str, Option<&str>)],
        extra: &[u32],
        device: &Device,
    ) -> Result<(Batch, Tensor)> {
        self.pad_with(&self.encode(texts)?, extra, device)
    }

    /// Encoded rows padded to the longest ([`TextTokenizer::padded_len`]).
    fn pad(&self, enc: &[(Vec<u32>, Vec<u32>)], device: &Device) -> Result<Batch> {
        Ok(self.pad_with(enc, &[], device)?.0)
    }

    /// [`TextTokenizer::pad`] with `extra` values after the rows in the
    /// same buffer (see [`TextTokenizer::batch_with`]).
    fn pad_with(
        &self,
        enc: &[(Vec<u32>, Vec<u32>)],
        extra: &[u32],
        device: &Device,
    ) -> Result<(Batch, Tensor)> {
        if enc.is_empty() {
            return Err(param_err("tokenizer", "empty batch"));
        }
        let l = self.padded_len(enc.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0));
        let b = enc.len();
        // Ids, types and mask (and the extra values) in one buffer,
        // uploaded at once: on a GPU one host-to-device copy instead of
        // three or four (each a driver call and an allocation); each is a
        // view of it.
        let n = b * l;
        let mut all = vec![0u32; 3 * n + extra.len()];
        all[3 * n..].copy_from_slice(extra);
        let (ids, rest) = all.split_at_mut(n);
        let (types, rest) = rest.split_at_mut(n);
        let mask = &mut rest[..n];
        ids.fill(self.pad_id);
        for (r, (i, t)) in enc.iter().enumerate() {
            ids[r * l..r * l + i.len()].copy_from_slice(i);
            types[r * l..r * l + t.len()].copy_from_slice(t);
            mask[r * l..r * l + i.len()].iter_mut().for_each(|m| *m = 1);
        }
        let all = Tensor::from_vec(all, 3 * n + extra.len(), device)?;
        let part = |i: usize| all.narrow(0, i * n, n)?.reshape((b, l));
        Ok((
            Batch {
                ids: part(0)?,
                token_types: part(1)?,
                mask: part(2)?,
            },
            all.narrow(0, 3 * n, extra.len())?,
        ))
    }

    /// Whether the file's own padding is off (it always is after loading).
    pub fn padding_switched_off(&self) -> bool {
        self.inner.get_padding().is_none()
    }
}
