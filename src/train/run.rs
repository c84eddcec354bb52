//! Assembly of a run: data, the encoder with its task head, the methods'
//! model transforms, the trainable set, the optimiser and the objective.
use candle_core::{DType, Device};
use candle_nn::VarMap;

use super::config::{Config, Precision};
use super::data::{self, Dataset, Split, Task};
use super::methods::{self, Built};
use super::objective::{Batch, ModelTransform, Objective, Plain, TaskModel};
use super::optim::{AdamW, AdamWParams};
use super::params::{self, Freezing};
use super::task::TaskHead;
use crate::error::{io_err, param_err, Result};
use crate::model::{Bert, TextTokenizer};
use crate::ops::mixout::Rng;

/// The model, head, optimiser and objective of a run.
pub struct Run {
    /// The validated configuration.
    pub cfg: Config,
    /// The encoder with the methods' transforms applied.
    pub bert: Bert,
    /// The task head.
    pub head: TaskHead,
    /// Every parameter, under its Hugging Face-style name.
    pub varmap: VarMap,
    /// The checkpoint's tokenizer, truncating to `max_len`.
    pub tok: TextTokenizer,
    /// The optimiser over the trainable parameters.
    pub opt: AdamW,
    /// The training set (empty in a checkpoint's evaluation run).
    pub train: Dataset,
    /// The evaluation set.
    pub eval: Dataset,
    /// The loss: estimator plus the methods' terms.
    pub objective: Objective,
    /// What is frozen, and gradual unfreezing's stages.
    pub freezing: Freezing,
    /// Where the run computes.
    pub device: Device,
    /// The random stream of the input perturbations.
    pub noise: Rng,
    /// Where a step's perturbation draws start, in device memory on CUDA
    /// (as [`crate::model::Stream::begin_step`] for dropout).
    pub noise_anchor: crate::model::StepAnchor,
    /// The steps captured as CUDA graphs ([`Config::cuda_graph`]).
    #[cfg(feature = "cuda")]
    pub(crate) graphs: super::graph::StepGraphs,
    /// [`super::checkpoint::fingerprint`] of the base model, recorded with
    /// every `best/` checkpoint so it finds its base again.
    pub base_fingerprint: String,
}

impl Run {
    /// Validates, loads data, model and tokenizer, applies the methods.
    pub fn new(cfg: Config) -> Result<Self> {
        cfg.validate()?;
        let (train, eval) = load_sets(&cfg, None)?;
        Self::with_data(cfg, train, eval)
    }

    /// The run of a saved checkpoint, for evaluation and prediction: only
    /// the evaluation split is read. The training set is empty and carries
    /// the checkpoint's label names, which size the head, so neither the
    /// training file nor the task's training split needs to be there.
    pub fn for_checkpoint(cfg: Config, labels: Vec<String>) -> Result<Self> {
        cfg.validate()?;
        let (train, eval) = load_sets(&cfg, Some(labels))?;
        Self::with_data(cfg, train, eval)
    }

    /// The model, head, optimiser and objective of `cfg` over loaded data.
    pub(crate) fn with_data(cfg: Config, train: Dataset, eval: Dataset) -> Result<Self> {
        let device = cfg.device.device()?;
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            if !cfg.model.join(f).exists() {
                return Err(io_err(
                    &cfg.model.join(f),
                    format!(
                        "missing: --model must be a Hugging Face model directory with \
                         config.json, model.safetensors and tokenizer.json{}",
                        if f == "tokenizer.json" {
                            " (the fast tokenizer's file: transformers writes it with \
                             AutoTokenizer.from_pretrained(name).save_pretrained(dir))"
                        } else {
                            ""
                        }
                    ),
                ));
            }
        }
        let mut methods = cfg.methods.clone();
        methods.sort_by_key(methods::Method::rank);
        let mut transforms: Vec<Box<dyn ModelTransform>> = vec![];
        let mut objective = Objective {
            estimator: Box::new(Plain),
            terms: vec![],
        };
        for m in &methods {
            match m.build() {
                Built::Term(t) => objective.terms.push(t),
                Built::Estimator(e) => objective.estimator = e,
                Built::Transform(t) => transforms.push(t),
            }
        }
        // On the CPU the training state lives in host memory: a model that
        // cannot fit is refused before its weights are read.
        if !device.is_cuda() {
            if let Some(avail) = crate::model::config::available_host_memory() {
                let path = cfg.model.join("config.json");
                crate::model::BertConfig::from_file(&path)?.check_fits_in(avail, &path)?;
            }
        }
        let varmap = VarMap::new();
        let mut bert = Bert::from_pretrained(&cfg.model, &varmap, DType::F32, &device)?;
        let base_fingerprint = super::checkpoint::fingerprint(&cfg.model)?;
        let mut tok = TextTokenizer::from_file(&cfg.model.join("tokenizer.json"), cfg.max_len)?;
        tok.check_fits(&bert.config, cfg.max_len, &cfg.model)?;
        tok.set_pad_multiple(cfg.pad_to_multiple)?;
        let method_dropout = transforms.iter().find_map(|t| t.default_dropout());
        let hidden = cfg
            .dropout
            .or(method_dropout)
            .unwrap_or(bert.config.hidden_dropout_prob);
        bert.config.hidden_dropout_prob = hidden;
        // A rate set for the run is the embeddings' too (ModernBERT's
        // configuration has its own).
        if cfg.dropout.or(method_dropout).is_some() {
            bert.config.embedding_dropout = None;
        }
        bert.config.attention_probs_dropout_prob = cfg
            .dropout
            .or(method_dropout)
            .unwrap_or(bert.config.attention_probs_dropout_prob);
        bert.stream.set_position(Rng {
            seed: cfg.seed,
            offset: 0,
        });
        let bf16 = match cfg.precision {
            Precision::Bf16 => true,
            Precision::F32 => false,
            Precision::Auto => device.is_cuda(),
        };
        // Persistent bf16 weight copies (`Stream::compute_weight`), unless
        // `TUNEFUSE_CAST_PER_USE` is set: a diagnostic switch back to one
        // cast per weight use, which the tests compare against.
        let copies = std::env::var_os("TUNEFUSE_CAST_PER_USE").is_none();
        bert.stream
            .set_compute_dtype(bf16.then_some(DType::BF16), copies);
        let pretrained = params::snapshot(&varmap)?;
        let freezing = Freezing::new(
            methods::freezes_backbone(&methods),
            &transforms,
            &cfg,
            bert.layers.len(),
        )?;
        freezing.apply_initial(&mut bert)?;
        for t in &transforms {
            t.apply(&mut bert, &varmap)?;
        }
        let head = TaskHead::new(
            cfg.head,
            &varmap,
            bert.config.hidden_size,
            train.labels.len(),
            cfg.pooling,
            bert.head,
            hidden,
            cfg.label_smoothing,
            cfg.score_ranking,
            &device,
        )?;
        let micro_batches =
            (train.examples.len().div_ceil(cfg.batch_size.max(1)) * cfg.epochs) as u64;
        for t in &mut objective.terms {
            t.setup(&super::objective::TermEnv {
                cfg: &cfg,
                bert: &bert,
                tok: &tok,
                varmap: &varmap,
                device: &device,
                micro_batches,
            })?;
        }
        params::init_new(&varmap, &pretrained, cfg.seed)?;
        let mut trained_prefixes = head.prefixes();
        for t in &objective.terms {
            trained_prefixes.extend(t.prefixes());
        }
        let params = params::trainable(
            &varmap,
            &pretrained,
            freezing,
            &transforms,
            &trained_prefixes,
            cfg.layer_lr_decay,
            bert.layers.len(),
        );
        let opt = AdamW::new(
            params,
            AdamWParams {
                lr: cfg.lr,
                weight_decay: cfg.weight_decay,
                ..Default::default()
            },
            cfg.recadam,
        )?;
        for t in &mut objective.terms {
            t.start(&opt.params)?;
        }
        let noise = Rng {
            seed: cfg.seed ^ 0x005e_ed0f_5a77,
            offset: 0,
        };
        Ok(Self {
            cfg,
            bert,
            head,
            varmap,
            tok,
            opt,
            train,
            eval,
            objective,
            freezing,
            device,
            noise,
            noise_anchor: Default::default(),
            #[cfg(feature = "cuda")]
            graphs: Default::default(),
            base_fingerprint,
        })
    }

    /// The encoder and its head.
    pub fn model(&self) -> TaskModel<'_> {
        TaskModel {
            bert: &self.bert,
            head: &self.head,
        }
    }

    /// Token classification: the sentences of `ds` that `max_len`
    /// truncates, and the words they lose (no label is trained on them,
    /// and evaluation predicts `O` for them).
    pub fn truncated_words(&self, ds: &Dataset) -> Result<(usize, usize)> {
        let (mut sentences, mut words) = (0, 0);
        for chunk in ds.examples.chunks(256) {
            let sents: Vec<&[String]> = chunk.iter().map(|e| e.words.as_slice()).collect();
            for lost in self
                .tok
                .batch_words(&sents, &candle_core::Device::Cpu)?
                .lost
            {
                sentences += usize::from(lost > 0);
                words += lost;
            }
        }
        Ok((sentences, words))
    }

    /// The words of examples `idx` of `ds` (token classification)
    /// tokenised on the device, with their word ids.
    pub fn word_batch(&self, ds: &Dataset, idx: &[usize]) -> Result<crate::model::WordBatch> {
        self.word_batch_on(ds, idx, &self.device)
    }

    fn word_batch_on(
        &self,
        ds: &Dataset,
        idx: &[usize],
        device: &Device,
    ) -> Result<crate::model::WordBatch> {
        let sents: Vec<&[String]> = idx
            .iter()
            .map(|&i| ds.examples[i].words.as_slice())
            .collect();
        self.tok.batch_words(&sents, device)
    }

    /// Examples `idx` of `ds` tokenised on the device, with their labels.
    pub fn batch(&self, ds: &Dataset, idx: &[usize]) -> Result<Batch> {
        self.batch_on(ds, idx, &self.device)
    }

    /// [`Run::batch`] on `device` (the host's copy of a batch that a
    /// replayed CUDA graph reads from fixed device buffers).
    pub fn batch_on(&self, ds: &Dataset, idx: &[usize], device: &Device) -> Result<Batch> {
        if let TaskHead::Tokens { .. } = self.head {
            // Each word's tag on its first subword, −1 elsewhere.
            let crate::model::WordBatch {
                batch: b, word_ids, ..
            } = self.word_batch_on(ds, idx, device)?;
            let l = b.ids.dim(1)?;
            let mut labels = vec![-1f32; idx.len() * l];
            for (r, (&i, w)) in idx.iter().zip(&word_ids).enumerate() {
                let aligned = super::ner::align_first_subword(w, &ds.examples[i].tags);
                for (t, tag) in aligned.into_iter().enumerate() {
                    if let Some(c) = tag {
                        labels[r * l + t] = c as f32;
                    }
                }
            }
            return Ok(Batch {
                ids: b.ids,
                types: b.token_types,
                mask: b.mask,
                labels: candle_core::Tensor::from_vec(labels, (idx.len(), l), device)?,
            });
        }
        let texts: Vec<(&str, Option<&str>)> = idx
            .iter()
            .map(|&i| (ds.examples[i].text.as_str(), ds.examples[i].pair.as_deref()))
            .collect();
        // Class indices travel in the tokens' upload (other labels are
        // f32 and go on their own).
        let (b, labels) = if let TaskHead::Classify { .. } = self.head {
            self.tok
                .batch_with(&texts, &TaskHead::class_ids(ds, idx), device)?
        } else {
            let b = self.tok.batch(&texts, device)?;
            let labels = self.head.labels(ds, idx, device)?;
            (b, labels)
        };
        Ok(Batch {
            ids: b.ids,
            types: b.token_types,
            mask: b.mask,
            labels,
        })
    }
}

/// The training and evaluation sets of `cfg`, subsampled as it says. With
/// `labels` (a checkpoint's), only the evaluation split is read and the
/// training set is those labels without examples.
pub(crate) fn load_sets(cfg: &Config, labels: Option<Vec<String>>) -> Result<(Dataset, Dataset)> {
    let checkpoint = labels.is_some();
    let labels_only = |name: &str, labels: Vec<String>| Dataset {
        name: name.to_string(),
        labels,
        examples: vec![],
    };
    let (mut train, mut eval, source) = match cfg.data_files() {
        Some(files) => {
            let name = files
                .train
                .file_stem()
                .map_or("files".into(), |s| s.to_string_lossy().into_owned());
            // The training set's labels (a checkpoint's, or those the
            // training file holds) are what the evaluation file is read
            // against: the training file is read at most once.
            let train = match labels {
                Some(l) => labels_only(&name, l),
                None => files.load(Split::Train, &name)?,
            };
            let eval = files.load_against(cfg.eval_split, &name, &train.labels)?;
            (train, eval, "its data files".to_string())
        }
        None => {
            let dir = data::data_dir(cfg.data_dir.as_deref())?;
            let task: Task = cfg.task.parse()?;
            let train = match labels {
                Some(l) => labels_only(&cfg.task, l),
                None => data::load(&task, Split::Train, &dir)?,
            };
            (
                train,
                data::load(&task, cfg.eval_split, &dir)?,
                dir.display().to_string(),
            )
        }
    };
    if let Some(n) = cfg.eval_examples {
        eval = eval.subsample(n, cfg.seed);
    }
    if !checkpoint {
        if let Some(k) = cfg.k_per_class {
            train = train.k_per_class(k, cfg.seed)?;
        }
        if let Some(n) = cfg.train_examples {
            train = train.subsample(n, cfg.seed);
        }
    }
    let sets = [
        ("training", &train, cfg.train_examples),
        ("evaluation", &eval, cfg.eval_examples),
    ];
    for (what, set, n) in sets.into_iter().skip(usize::from(checkpoint)) {
        if set.examples.is_empty() {
            return Err(param_err(
                "data",
                format!(
                    "the {what} set of {} in {} is empty{}",
                    cfg.task,
                    source,
                    match n {
                        Some(0) => format!(
                            " ({}_examples = 0)",
                            if what == "training" { "train" } else { "eval" }
                        ),
                        _ if what == "training" && cfg.k_per_class.is_some() => {
                            " (after k_per_class)".to_string()
                        }
                        _ => " (the data file holds no example)".to_string(),
                    }
                ),
            ));
        }
    }
    Ok((train, eval))
}
