//! The `tunefuse` command line.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tunefuse::bench;
use tunefuse::train::trainer::{Config, Event, HeadKind, Reading, Run};

#[derive(Parser)]
#[command(
    name = "tunefuse",
    version,
    about = "Fused kernels for robust and parameter-efficient fine-tuning"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    /// CUDA device 0 when present, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

#[derive(Subcommand)]
enum Cmd {
    /// Time the fused ops against the copy-bandwidth floor and print one table.
    Bench {
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceArg,
        /// PyTorch peer timings (JSON from bench/torch_peers.py) to add to the table.
        #[arg(long)]
        peers: Option<PathBuf>,
        /// Also write the measured rows as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Only the cases whose label ("op shape dtype", e.g.
        /// "adapter fwd+bwd 16384x768") contains this text, e.g. to profile
        /// one under ncu.
        #[arg(long)]
        only: Option<String>,
    },
    /// Fine-tune a pretrained BERT model on a task.
    Finetune(Box<FinetuneArgs>),
    /// Pool-based active learning: fine-tune on a few labelled examples,
    /// score the unlabelled rest of the training set, label the top
    /// `--query`, repeat; writes active.json (resumable at a round
    /// boundary) and the learning curve (curve.png, curve.svg). Every
    /// `finetune` flag sets the rounds' fine-tuning.
    Active(Box<ActiveArgs>),
    /// Continue masked-LM training of a model on unlabelled text and write
    /// a model directory that `--model` accepts: BERT-DAAT's post-training
    /// (two domains or more, `--domain-task`), Tri-Train's candidate-masked
    /// pre-fine-tuning (`--candidates`).
    Posttrain(Box<PosttrainArgs>),
    /// Unsupervised fine-tuning for text clustering: k-means on the
    /// pretrained sentence vectors, then DEC (KL to a sharpened target) with
    /// a masked-LM term; ACC and NMI before and after when labels are given.
    /// Writes cluster.json and assignments.txt to --output.
    Cluster(Box<ClusterArgs>),
    /// Meta Fine-Tuning's meta-learner: train on the pooled labelled data of
    /// several domains with typicality-weighted cross-entropy and the
    /// domain-corruption loss, and write a model directory; then fine-tune
    /// each domain from it (`finetune --model <dir>`).
    Mft(Box<MftArgs>),
    /// The learning curves of active-learning runs (folders named
    /// `<name>-s<seed>` holding active.json): mean ± std over seeds of the
    /// metric at each label count, per name, as a table, JSON and a plot.
    Curves {
        /// Folders of active-learning runs (or folders holding them).
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// Write the curves as JSON here, and plot them to the same stem
        /// (.png, .svg).
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Evaluate a checkpoint written by `finetune` (its `best/` directory).
    Eval {
        #[arg(long)]
        checkpoint: PathBuf,
        /// Task to evaluate on (default: the checkpoint's).
        #[arg(long)]
        task: Option<String>,
        #[arg(long, default_value = "dev", conflicts_with = "file")]
        split: String,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// A data file (CSV, TSV, JSON Lines) in the columns of the
        /// checkpoint's own training file, evaluated instead of its dev split.
        #[arg(long, conflicts_with = "task")]
        file: Option<PathBuf>,
        /// The base model directory, when it is no longer where the
        /// checkpoint records it (checked against its fingerprint).
        #[arg(long)]
        base_model: Option<PathBuf>,
        /// Out-of-distribution tasks whose test sets are scored against the
        /// evaluation split (e.g. trec,snli,agnews): AUROC, AUPR, FPR at 95 %
        /// TPR and NBAUCC of the largest probability.
        #[arg(long, value_delimiter = ',')]
        ood: Vec<String>,
        /// Score at most this many examples of each OOD set (seeded subsample).
        #[arg(long)]
        ood_examples: Option<usize>,
        /// Monte-Carlo dropout: average the probabilities of this many
        /// passes with dropout on.
        #[arg(long, default_value_t = 1)]
        mc_dropout: usize,
        /// Ignore the temperature `calibrate` stored with the checkpoint.
        #[arg(long)]
        no_temperature: bool,
        /// Write confidence histograms (in-distribution and each OOD set)
        /// to this path stem (.png and .svg).
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Token classification: entity F1 on this many random halves of
        /// the split (mean, std), and on mentions seen / unseen in training.
        #[arg(long, default_value_t = 0)]
        resplits: usize,
    },
    /// Compare a checkpoint with its pretrained base on the same inputs:
    /// per-layer linear CKA, RSA and cosine distance of token
    /// representations, the layer × layer CKA matrix, per-head JS
    /// divergence of attention distributions, optionally the layer ablation.
    Analyze {
        #[arg(long)]
        checkpoint: PathBuf,
        /// The split of the checkpoint's task to read.
        #[arg(long, default_value = "dev", conflicts_with = "file")]
        split: String,
        /// A data file in the columns of the checkpoint's own files.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Read at most this many examples.
        #[arg(long, default_value_t = 256)]
        examples: usize,
        /// The base model directory, when it has moved.
        #[arg(long)]
        base_model: Option<PathBuf>,
        /// The data folder (default: the one the checkpoint records, else
        /// $TUNEFUSE_DATA).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Tokens sampled for RSA and the layer × layer CKA matrix.
        #[arg(long, default_value_t = 1024)]
        sample_tokens: usize,
        /// Also the layer ablation: the metric on the whole evaluation
        /// split with the top n layers pretrained again, n = 0 … layers.
        #[arg(long)]
        ablate: bool,
        /// Write the numbers (JSON, CSV) and the plots (PNG, SVG) here.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Linear probes on every layer's [CLS] and mean-pooled vectors of a
    /// checkpoint and of its pretrained base: test accuracy per layer on a
    /// SentEval-style task (sentlen, bshift, wc) built from the data
    /// folder's sentences, or on a SentEval probing file.
    Probe {
        #[arg(long)]
        checkpoint: PathBuf,
        /// sentlen, bshift or wc, built from --sentences.
        #[arg(long, default_value = "sentlen", conflicts_with = "senteval")]
        task: String,
        /// A SentEval probing file (`tr|va|te<TAB>label<TAB>sentence`).
        #[arg(long)]
        senteval: Option<PathBuf>,
        /// The tasks whose texts the probing task is built from.
        #[arg(long, value_delimiter = ',', default_value = "sst2,agnews")]
        sentences: Vec<String>,
        /// The data folder (default: $TUNEFUSE_DATA).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Examples to build for the probe's training split.
        #[arg(long, default_value_t = 2000)]
        train: usize,
        /// … its dev split (chooses the probe's training step).
        #[arg(long, default_value_t = 500)]
        dev: usize,
        /// … its test split (the reported accuracy).
        #[arg(long, default_value_t = 500)]
        test: usize,
        /// The number of words of the word-content task.
        #[arg(long, default_value_t = 30)]
        words: usize,
        /// Seeds the construction.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// The base model directory, when it has moved.
        #[arg(long)]
        base_model: Option<PathBuf>,
        /// Write <task>.json, .csv, .png and .svg here.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Fit a temperature (Guo et al. 2017) on a split of a checkpoint's
    /// task (or a file) by minimising the NLL, and store it in the
    /// checkpoint directory (temperature.json), where `eval` applies it.
    Calibrate {
        #[arg(long)]
        checkpoint: PathBuf,
        /// The split to fit on (fit on dev, evaluate on test where the task
        /// has both).
        #[arg(long, default_value = "dev", conflicts_with = "file")]
        split: String,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// A data file in the columns of the checkpoint's own files.
        #[arg(long)]
        file: Option<PathBuf>,
        /// The base model directory, when it has moved.
        #[arg(long)]
        base_model: Option<PathBuf>,
    },
    /// Write a checkpoint (`best/`) as a Hugging Face model directory that
    /// transformers' AutoModelForSequenceClassification loads: config.json
    /// with the labels, model.safetensors under transformers' names, the
    /// tokenizer. Needs a run trained with `--set pooling=pooler`.
    Export {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        output: PathBuf,
        /// Fold LoRA updates into the weights they change (a whole model);
        /// without it a LoRA run is written as a PEFT adapter directory.
        #[arg(long)]
        merge: bool,
        /// Replace a non-empty output directory.
        #[arg(long)]
        overwrite: bool,
        /// The base model directory, when it is no longer where the
        /// checkpoint records it (checked against its fingerprint).
        #[arg(long)]
        base_model: Option<PathBuf>,
    },
    /// Class probabilities (or regression values) of a checkpoint on a data
    /// file in its run's columns, one JSON line per example.
    Predict {
        #[arg(long)]
        checkpoint: PathBuf,
        /// A CSV, TSV or JSON Lines file in the columns of the checkpoint's
        /// own training file.
        #[arg(long)]
        file: PathBuf,
        /// The base model directory, when it is no longer where the
        /// checkpoint records it (checked against its fingerprint).
        #[arg(long)]
        base_model: Option<PathBuf>,
    },
    /// Copy a Hugging Face model directory with its weights cast to another
    /// dtype (e.g. bf16, to halve what travels to a GPU machine).
    ConvertCheckpoint {
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
        /// f32, bf16 or f16.
        #[arg(long, default_value = "bf16")]
        dtype: String,
    },
    /// The results table of a grid of fine-tuning runs (scripts/results.sh):
    /// mean ± std over seeds of dev accuracy and ECE per method (Pearson and
    /// MSE, in a second table, for regression runs).
    Results {
        /// Folders of runs named `<method>-s<seed>`.
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
    },
    /// Count what each method's training step asks of the GPU (launches,
    /// memsets, copies, allocations, events, syncs, cuBLAS calls) under the
    /// census library: run it through scripts/step-census.sh.
    #[cfg(feature = "cuda")]
    Census {
        /// Hugging Face BERT directory (all-MiniLM-L6-v2 for the recorded census).
        #[arg(long)]
        model: PathBuf,
        /// The data folder (default: $TUNEFUSE_DATA).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        /// Steps run before counting (module loads, first allocations).
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Steps counted.
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// Only these cases (repeatable; default: all).
        #[arg(long)]
        case: Vec<String>,
        /// Day and commit of the measurement, for the record.
        #[arg(long, default_value = "")]
        stamp: String,
        /// Write the census as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Fail when any count rises above this recorded census.
        #[arg(long)]
        check: Option<PathBuf>,
        /// Fail when any count differs from this census (e.g. the
        /// interposed real driver against the stand-in's record).
        #[arg(long, conflicts_with = "check")]
        agree: Option<PathBuf>,
    },
    /// Print the table from saved results (`bench --json`) and PyTorch peers.
    Table {
        #[arg(long)]
        ours: PathBuf,
        #[arg(long)]
        peers: Option<PathBuf>,
    },
}

/// `finetune` flags; each overrides the TOML config, which overrides the defaults.
#[derive(clap::Args)]
struct FinetuneArgs {
    /// Hugging Face model directory (config.json, model.safetensors, tokenizer.json) of BERT, RoBERTa, XLM-RoBERTa, ELECTRA or DistilBERT.
    #[arg(long)]
    model: Option<PathBuf>,
    /// sst2, cola, rte, mrpc, amazon:<domain>, trec, snli, agnews, sst5, cr,
    /// mpqa, subj; ner:conll2003, ner:ncbi-disease, ner:sciie (named
    /// entities: a tag per word, selected on entity F1); or files (the
    /// default with --train-file).
    #[arg(long)]
    task: Option<String>,
    /// The data folder of the built-in tasks (default: $TUNEFUSE_DATA).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Your own training data: a .csv, .tsv or .jsonl file with a header
    /// (CSV/TSV) or one object per line (JSON Lines).
    #[arg(long)]
    train_file: Option<PathBuf>,
    /// Your own evaluation data (the dev split), in the training file's columns.
    #[arg(long)]
    dev_file: Option<PathBuf>,
    /// Your own test data (evaluated on with `--set eval_split=test`).
    #[arg(long)]
    test_file: Option<PathBuf>,
    /// The text column (default: sentence1, else the first non-label column).
    #[arg(long)]
    text_column: Option<String>,
    /// A second text column for pair tasks (default: sentence2 with sentence1).
    #[arg(long)]
    text_pair_column: Option<String>,
    /// The label column (default: label).
    #[arg(long)]
    label_column: Option<String>,
    /// The label set in index order, comma-separated (default: the training
    /// file's labels, sorted).
    #[arg(long, value_delimiter = ',')]
    labels: Option<Vec<String>>,
    /// Where the run writes its config, metrics, summary, checkpoints and
    /// plots (default: runs/out).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Comma-separated: vanilla (none), smart, r3f, freelb, bregman,
    /// manifold, mixout, adapter, lora. A method the config file lists keeps its settings.
    #[arg(long)]
    method: Option<String>,
    /// Any setting, as `key=value` (repeatable): `lr=2e-5`,
    /// `smart.lambda=2`, `schedule.warmup=0.06`, `precision=f32`. Applied
    /// after the config file and the other flags.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Model-selection metric: accuracy, macro_f1, f1, mcc (classification);
    /// pearson, spearman (regression); entity_f1, accuracy (token tasks).
    #[arg(long)]
    metric: Option<String>,
    /// Regression on the label index as a real-valued score (e.g. SST-5's
    /// 0–4 scale): one-output head, MSE, squared-error smoothness terms;
    /// selects on pearson unless --metric says otherwise.
    #[arg(long, conflicts_with = "score")]
    regression: bool,
    /// Score the label scale as R2BERT does (e.g. SST-5's 0–4): sigmoid of
    /// a linear layer, targets index / (labels − 1), τ_e·MSE +
    /// (1 − τ_e)·ListNet (`--set score_ranking=false`: MSE alone); selects
    /// on quadratic weighted kappa unless --metric says otherwise.
    #[arg(long)]
    score: bool,
    /// A TOML file with any of the run's settings.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue the run in --output from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Replace the run recorded in --output (a new run refuses to).
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// Passes over the training set (default 3).
    #[arg(long, allow_hyphen_values = true)]
    epochs: Option<usize>,
    /// Peak learning rate (default 1e-4). A negative value is read as a
    /// value (and refused with the allowed range), not as a flag.
    #[arg(long, allow_hyphen_values = true)]
    lr: Option<f64>,
    /// Examples per forward/backward batch; an optimiser step takes
    /// `grad_accum` of them (default 16).
    #[arg(long, allow_hyphen_values = true)]
    batch_size: Option<usize>,
    /// Seeds the subsample, the shuffling, the new parameters' initialisation
    /// (head, adapters, LoRA) and every random draw (dropout, mixout,
    /// perturbations) (default 1).
    #[arg(long, allow_hyphen_values = true)]
    seed: Option<u64>,
    /// Subsample the training set to N examples.
    #[arg(long, allow_hyphen_values = true)]
    train_examples: Option<usize>,
    /// Longest tokenised input; longer ones are truncated (default 128).
    #[arg(long, allow_hyphen_values = true)]
    max_len: Option<usize>,
    /// cpu, cuda or auto.
    #[arg(long)]
    device: Option<String>,
    /// Report the wall time of each training-step phase (synchronises the
    /// device at every phase boundary, so the run is slower).
    #[arg(long)]
    phase_times: bool,
    /// On CUDA, capture the training step as a CUDA graph per batch shape
    /// and replay it (the methods it covers: see the config's `cuda_graph`;
    /// pad batches with `--set pad_to_multiple=16` so the shapes repeat).
    #[arg(long)]
    cuda_graph: bool,
}

/// `cluster` flags.
#[derive(clap::Args)]
struct ClusterArgs {
    #[arg(long)]
    model: PathBuf,
    /// Where cluster.json and assignments.txt go.
    #[arg(long)]
    output: PathBuf,
    /// A set of the data folder's clustering/stc: SearchSnippets,
    /// StackOverflow or Biomedical (texts and labels).
    #[arg(long, conflicts_with_all = ["texts", "labels"])]
    stc: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// A text file, one text a line.
    #[arg(long)]
    texts: Option<PathBuf>,
    /// Its labels, one a line (used for the scores only).
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Clusters (default: the number of distinct labels).
    #[arg(long)]
    clusters: Option<usize>,
    /// At most this many texts (a seeded draw).
    #[arg(long)]
    max_texts: Option<usize>,
    /// DEC steps (0: k-means on the pretrained vectors only).
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// The encoder's peak learning rate.
    #[arg(long, default_value_t = 1e-5)]
    lr: f64,
    /// The learning rate of the cluster centres and the masked-LM head.
    #[arg(long, default_value_t = 1e-3)]
    head_lr: f64,
    /// Steps between refreshes of DEC's target distribution.
    #[arg(long, default_value_t = 100)]
    update_interval: usize,
    /// Stop when fewer than this fraction of texts changed cluster.
    #[arg(long, default_value_t = 0.001)]
    tol: f64,
    /// Student's t degrees of freedom of the soft assignments.
    #[arg(long, default_value_t = 1.0)]
    alpha: f64,
    /// Weight of the masked-LM term (0: DEC alone).
    #[arg(long, default_value_t = 1.0)]
    mlm_weight: f64,
    #[arg(long, default_value_t = 0.15)]
    mask_rate: f64,
    /// k-means starts (the lowest inertia kept).
    #[arg(long, default_value_t = 10)]
    n_init: usize,
    #[arg(long, default_value_t = 64)]
    max_len: usize,
    #[command(flatten)]
    job: JobArgs,
}

/// `mft` flags.
#[derive(clap::Args)]
struct MftArgs {
    #[arg(long)]
    model: PathBuf,
    /// The new model directory.
    #[arg(long)]
    output: PathBuf,
    /// Two or more classification tasks with the same labels, one per
    /// domain (amazon:books,amazon:dvd,amazon:electronics); their training
    /// splits are pooled.
    #[arg(long, value_delimiter = ',', required = true)]
    domains: Vec<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Weight of the domain-corruption loss.
    #[arg(long, default_value_t = 0.1)]
    corruption_weight: f64,
    /// Plain cross-entropy instead of the typicality-weighted one.
    #[arg(long)]
    no_typicality: bool,
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[arg(long, default_value_t = 2e-5)]
    lr: f64,
    /// Learning rate of the new heads (default: --lr).
    #[arg(long)]
    head_lr: Option<f64>,
    #[arg(long, default_value_t = 128)]
    max_len: usize,
    /// At most this many examples of each domain (a seeded draw).
    #[arg(long)]
    max_examples: Option<usize>,
    #[arg(long, default_value_t = 20)]
    log_every: usize,
    #[command(flatten)]
    job: JobArgs,
}

/// `posttrain` flags.
#[derive(clap::Args)]
struct PosttrainArgs {
    /// The model directory to start from (BERT, RoBERTa or XLM-R).
    #[arg(long)]
    model: PathBuf,
    /// The new model directory.
    #[arg(long)]
    output: PathBuf,
    /// Unlabelled text, one domain per corpus: a task of the data folder
    /// with an optional split (`amazon:kitchen`, `amazon:books@dev`,
    /// `ner:ncbi-disease@train`; labels are ignored), or a text file with
    /// one text a line. Repeat or separate with commas.
    #[arg(long, value_delimiter = ',', required = true)]
    corpus: Vec<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Which words may be masked: `all`; `distant:<token task>` (words in a
    /// span equal, ignoring case, to an entity mention of that task's
    /// training split: Tri-Train's distant labelling); or a file of per-word
    /// 0/1 flags in the corpus's CoNLL layout.
    #[arg(long, default_value = "all")]
    candidates: String,
    /// The probability of masking a token (or candidate word).
    #[arg(long, default_value_t = 0.15)]
    mask_rate: f64,
    /// Mask whole words (every subword of a chosen word).
    #[arg(long)]
    whole_word: bool,
    /// BERT-DAAT's domain-distinguishing task on `[CLS] A [SEP] B` pairs
    /// (needs two corpora or more).
    #[arg(long)]
    domain_task: bool,
    /// The domain task's weight in the loss.
    #[arg(long, default_value_t = 1.0)]
    domain_weight: f64,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[arg(long, default_value_t = 5e-5)]
    lr: f64,
    /// Peak learning rate of the new heads (masked-LM, domain classifier);
    /// default: --lr. A model without a masked-LM head starts with a random
    /// one: a higher rate (1e-3) lets it learn before it steers the encoder.
    #[arg(long)]
    head_lr: Option<f64>,
    /// Train only the heads (encoder and embeddings frozen) for this many
    /// first steps, then everything with a fresh optimiser and schedule: a
    /// random masked-LM head's first gradients otherwise damage the encoder.
    #[arg(long, default_value_t = 0)]
    head_warmup_steps: u64,
    /// Start a new masked-LM head's bias at zero (uniform predictions)
    /// instead of the corpus's log token frequencies.
    #[arg(long)]
    no_prior_bias: bool,
    /// Fraction of the steps of linear warm-up (then linear decay).
    #[arg(long, default_value_t = 0.1)]
    warmup: f64,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Gradient clipping by global norm (0: none).
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// Tokens per input (truncated beyond).
    #[arg(long, default_value_t = 128)]
    max_len: usize,
    /// At most this many texts of each corpus (a seeded draw).
    #[arg(long)]
    max_texts: Option<usize>,
    /// Report the loss every this many steps.
    #[arg(long, default_value_t = 20)]
    log_every: usize,
    #[command(flatten)]
    job: JobArgs,
}

/// `active` flags: the acquisition loop's, then every `finetune` flag.
#[derive(clap::Args)]
struct ActiveArgs {
    /// random, least_confidence, margin, entropy or bald.
    #[arg(long, default_value = "random")]
    strategy: String,
    /// Labelled examples before the first round (a seeded draw from the
    /// training set).
    #[arg(long, default_value_t = 10)]
    start: usize,
    /// Examples labelled per round.
    #[arg(long, default_value_t = 100)]
    query: usize,
    /// Acquisition rounds (the run trains rounds + 1 models); may grow on
    /// --resume to extend a finished run.
    #[arg(long, default_value_t = 9)]
    rounds: usize,
    /// Score at most this many unlabelled examples a round (a seeded draw).
    #[arg(long, default_value_t = 20_000)]
    pool_cap: usize,
    /// BALD's Monte-Carlo dropout passes.
    #[arg(long, default_value_t = 50)]
    passes: usize,
    /// Where BALD's dropout acts: head (features computed once, only the
    /// head's dropout re-run) or full (every dropout, full passes).
    #[arg(long, default_value = "head")]
    mc_scope: String,
    #[command(flatten)]
    finetune: FinetuneArgs,
}

fn finetune_config(a: &FinetuneArgs) -> Result<Config, String> {
    let mut cfg = match &a.config {
        Some(p) => Config::from_file(p, Reading::Strict).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    let err = |e: tunefuse::Error| e.to_string();
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = &a.$f { cfg.$f = v.clone().into(); } )* };
    }
    set!(model, task, output, epochs, lr, batch_size, seed, max_len);
    if let Some(d) = &a.device {
        cfg.set(&format!("device={d}")).map_err(err)?;
    }
    if a.data_dir.is_some() {
        cfg.data_dir = a.data_dir.clone();
    }
    macro_rules! set_some {
        ($($f:ident),*) => { $( if a.$f.is_some() { cfg.$f = a.$f.clone(); } )* };
    }
    set_some!(
        train_file,
        dev_file,
        test_file,
        text_column,
        text_pair_column,
        label_column,
        labels
    );
    if a.train_file.is_some() && a.task.is_none() {
        cfg.task = tunefuse::train::config::FILES_TASK.into();
    }
    if a.train_examples.is_some() {
        cfg.train_examples = a.train_examples;
    }
    cfg.phase_times |= a.phase_times;
    cfg.cuda_graph |= a.cuda_graph;
    cfg.overwrite |= a.overwrite;
    // A token task (named entities) implies the token head and selects on
    // entity F1, unless the flags below say otherwise.
    let token_task = cfg.data_files().is_none()
        && cfg
            .task
            .parse::<tunefuse::train::data::Task>()
            .is_ok_and(|t| t.is_token_task());
    if token_task && cfg.head == HeadKind::Classification {
        cfg.head = HeadKind::Token;
        if cfg.metric == tunefuse::train::trainer::Metric::Accuracy {
            cfg.metric = tunefuse::train::trainer::Metric::EntityF1;
        }
    }
    if a.score && cfg.head != HeadKind::Score {
        cfg.head = HeadKind::Score;
        cfg.metric = tunefuse::train::trainer::Metric::Qwk;
    }
    if a.regression && cfg.head != HeadKind::Regression {
        cfg.head = HeadKind::Regression;
        cfg.metric = tunefuse::train::trainer::Metric::Pearson;
    }
    if let Some(m) = &a.metric {
        cfg.set(&format!("metric={m}")).map_err(err)?;
    }
    if let Some(m) = &a.method {
        cfg.set_methods(m).map_err(err)?;
    }
    for s in &a.set {
        cfg.set(s).map_err(err)?;
    }
    if cfg.model.as_os_str().is_empty() {
        return Err("--model is required (a Hugging Face BERT directory; scripts/fetch-model.sh prints one)".into());
    }
    Ok(cfg)
}

/// A progress bar on a terminal, plain log lines otherwise.
fn progress() -> impl FnMut(Event<'_>) {
    use std::io::IsTerminal;
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps {elapsed} (eta {eta}) {msg}",
            )
            .expect("a valid template"),
        );
        b
    });
    move |e| match (e, &bar) {
        (
            Event::Step {
                step,
                total,
                loss,
                lr,
                examples_per_s,
                ..
            },
            Some(b),
        ) => {
            b.set_length(total);
            b.set_position(step);
            if let Some(loss) = loss {
                b.set_message(format!(
                    "loss {loss:.4} lr {lr:.2e} {examples_per_s:.1} ex/s"
                ));
            }
        }
        (
            Event::Step {
                step,
                total,
                epoch,
                loss: Some(loss),
                lr,
                examples_per_s,
                logged: true,
            },
            None,
        ) => {
            eprintln!("step {step}/{total} epoch {epoch} loss {loss:.4} lr {lr:.2e} {examples_per_s:.1} ex/s")
        }
        (Event::Step { .. }, None) => {}
        (Event::Message(m), Some(b)) => b.println(m),
        (Event::Message(m), None) => eprintln!("{m}"),
    }
}

/// The flags every standalone training command shares (`posttrain`,
/// `cluster`, `mft`): the seed, where and in what precision it runs, and
/// whether it may replace its output.
#[derive(clap::Args)]
struct JobArgs {
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// cpu, cuda or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// auto (bf16 on CUDA), f32 or bf16.
    #[arg(long, default_value = "auto")]
    precision: String,
    /// Replace a non-empty output directory.
    #[arg(long)]
    overwrite: bool,
}

impl JobArgs {
    fn device(&self) -> Result<tunefuse::train::config::DeviceKind, String> {
        let s = &self.device;
        serde_json::from_value(serde_json::json!(s))
            .map_err(|_| format!("--device: cpu, cuda or auto, got {s:?}"))
    }

    fn precision(&self) -> Result<tunefuse::train::config::Precision, String> {
        let s = &self.precision;
        serde_json::from_value(serde_json::json!(s))
            .map_err(|_| format!("--precision: auto, f32 or bf16, got {s:?}"))
    }
}

fn main() -> ExitCode {
    // Page faults were about a quarter of a CPU run's time: see the function's docs.
    tunefuse::keep_freed_memory();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tunefuse: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.cmd {
        Cmd::Bench {
            device,
            peers,
            json,
            only,
        } => {
            let peers = peers
                .map(|p| bench::load_peers(&p))
                .transpose()?
                .unwrap_or_default();
            let dev = match device {
                DeviceArg::Cpu => candle_core::Device::Cpu,
                DeviceArg::Cuda => tunefuse::cuda_device(0).map_err(|e| {
                    format!("no CUDA device ({e}); build with `--features cuda` on a machine with a GPU, or use --device cpu")
                })?,
                DeviceArg::Auto => tunefuse::cuda_if_available().map_err(|e| e.to_string())?,
            };
            let name = bench::device_name(&dev);
            eprintln!("tunefuse bench on {name}");
            let copy = bench::copy_bandwidth(&dev).map_err(|e| e.to_string())?;
            let rows = bench::run_all(&dev, only.as_deref(), |what| {
                eprintln!("  timing {what} ...")
            })
            .map_err(|e| e.to_string())?;
            print!("{}", bench::table(&name, copy, &rows, &peers));
            if let Some(path) = json {
                let doc = serde_json::json!({ "device": name, "copy_gbps": copy, "results": rows });
                std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap())
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            }
            Ok(())
        }
        Cmd::Finetune(a) => {
            let cfg = finetune_config(&a)?;
            tunefuse::interrupt::install();
            let mut run = Run::new(cfg).map_err(|e| e.to_string())?;
            eprintln!(
                "fine-tuning on {}: {} train examples, {} eval examples, {} trainable tensors",
                run.cfg.task,
                run.train.examples.len(),
                run.eval.examples.len(),
                run.opt.params.len()
            );
            if run.cfg.head == HeadKind::Token {
                for (what, ds) in [("training", &run.train), ("evaluation", &run.eval)] {
                    let (n, words) = run.truncated_words(ds).map_err(|e| e.to_string())?;
                    if n > 0 {
                        eprintln!(
                            "warning: max_len {} truncates {n} {what} sentences ({words} words: \
                             not trained on / predicted O); raise --max-len to keep them",
                            run.cfg.max_len
                        );
                    }
                }
            }
            let s = run.fit(a.resume, progress()).map_err(|e| match e {
                tunefuse::Error::Interrupted(m) => format!("{m}:\n  {}", resume_command()),
                e => e.to_string(),
            })?;
            let last = if s.last.accuracy.is_nan() {
                s.last.brief()
            } else {
                format!("{}, NLL {:.4}", s.last.brief(), s.last.nll)
            };
            println!(
                "{}: best {} {:.4} at step {}; final dev {last} ({:.0} s)",
                s.task, s.metric, s.best, s.best_step, s.seconds
            );
            if let Some(phases) = &s.phase_ms {
                println!("wall time per optimiser step, by phase (device synchronised at each):");
                for (phase, ms) in phases {
                    println!("  {ms:9.3} ms  {phase}");
                }
            }
            Ok(())
        }
        Cmd::Active(a) => {
            let cfg = finetune_config(&a.finetune)?;
            let err = |e: tunefuse::Error| e.to_string();
            let settings = tunefuse::train::active::Settings {
                strategy: a.strategy.parse().map_err(err)?,
                start: a.start,
                query: a.query,
                rounds: a.rounds,
                pool_cap: Some(a.pool_cap),
                passes: a.passes,
                scope: a.mc_scope.parse().map_err(err)?,
            };
            tunefuse::interrupt::install();
            let rec =
                tunefuse::train::active::active_learn(cfg, settings, a.finetune.resume, progress())
                    .map_err(|e| match e {
                        tunefuse::Error::Interrupted(m) => format!("{m}:\n  {}", resume_command()),
                        e => e.to_string(),
                    })?;
            println!("round  labels  {:>9}  acquired classes", rec.metric);
            for r in &rec.rounds {
                println!(
                    "{:5}  {:6}  {:9.4}  {:?}",
                    r.round, r.labels, r.metric, r.acquired_classes
                );
            }
            Ok(())
        }
        Cmd::Cluster(a) => {
            let err = |e: tunefuse::Error| e.to_string();
            let (texts, labels) = match (&a.stc, a.texts) {
                (Some(name), _) => {
                    let set = tunefuse::train::cluster::STC
                        .iter()
                        .find(|s| s.eq_ignore_ascii_case(name))
                        .ok_or_else(|| {
                            format!(
                                "--stc: {name:?} is not one of {}",
                                tunefuse::train::cluster::STC.join(", ")
                            )
                        })?;
                    let dir = tunefuse::train::data::data_dir(a.data_dir.as_deref())
                        .map_err(err)?
                        .join("clustering/stc");
                    (
                        dir.join(format!("{set}.txt")),
                        Some(dir.join(format!("{set}_gnd.txt"))),
                    )
                }
                (None, Some(t)) => (t, a.labels),
                (None, None) => return Err("give --stc NAME or --texts FILE".into()),
            };
            let settings = tunefuse::train::cluster::Settings {
                model: a.model,
                output: a.output,
                texts,
                labels,
                clusters: a.clusters,
                max_texts: a.max_texts,
                steps: a.steps,
                batch_size: a.batch_size,
                lr: a.lr,
                head_lr: a.head_lr,
                update_interval: a.update_interval,
                tol: a.tol,
                alpha: a.alpha,
                mlm_weight: a.mlm_weight,
                mask_rate: a.mask_rate,
                n_init: a.n_init,
                max_len: a.max_len,
                seed: a.job.seed,
                device: a.job.device()?,
                precision: a.job.precision()?,
                overwrite: a.job.overwrite,
            };
            tunefuse::interrupt::install();
            let r = tunefuse::train::cluster::cluster(settings, progress()).map_err(err)?;
            let show = |s: Option<tunefuse::train::cluster::Scores>| {
                s.map_or("-".to_string(), |s| {
                    format!("ACC {:.4}  NMI {:.4}", s.acc, s.nmi)
                })
            };
            println!(
                "{} texts, {} clusters, {} DEC steps, {:.0} s",
                r.texts, r.clusters, r.steps, r.seconds
            );
            println!("k-means, pretrained vectors:  {}", show(r.kmeans_before));
            if r.steps > 0 {
                println!("DEC assignments, fine-tuned:  {}", show(r.dec_after));
                println!("k-means, fine-tuned vectors:  {}", show(r.kmeans_after));
            }
            Ok(())
        }
        Cmd::Mft(a) => {
            let settings = tunefuse::train::mft::Settings {
                model: a.model,
                output: a.output,
                domains: a.domains,
                data_dir: a.data_dir,
                corruption_weight: a.corruption_weight,
                typicality: !a.no_typicality,
                epochs: a.epochs,
                batch_size: a.batch_size,
                lr: a.lr,
                head_lr: a.head_lr,
                max_len: a.max_len,
                max_examples: a.max_examples,
                seed: a.job.seed,
                device: a.job.device()?,
                precision: a.job.precision()?,
                log_every: a.log_every,
                overwrite: a.job.overwrite,
            };
            tunefuse::interrupt::install();
            let r = tunefuse::train::mft::meta_finetune(settings, progress())
                .map_err(|e| e.to_string())?;
            println!(
                "{} steps, typicality weights {:.3} / {:.3} / {:.3} (min / mean / max), {:.0} s",
                r.steps, r.weights.0, r.weights.1, r.weights.2, r.seconds
            );
            Ok(())
        }
        Cmd::Posttrain(a) => {
            let err = |e: tunefuse::Error| e.to_string();
            let (device, precision) = (a.job.device()?, a.job.precision()?);
            let settings = tunefuse::train::posttrain::Settings {
                model: a.model,
                output: a.output,
                corpora: a.corpus,
                data_dir: a.data_dir,
                candidates: a.candidates.parse().map_err(err)?,
                mask_rate: a.mask_rate,
                whole_word: a.whole_word,
                domain_task: a.domain_task,
                domain_weight: a.domain_weight,
                epochs: a.epochs,
                batch_size: a.batch_size,
                lr: a.lr,
                head_lr: a.head_lr,
                head_warmup_steps: a.head_warmup_steps,
                prior_bias: !a.no_prior_bias,
                warmup: a.warmup,
                weight_decay: a.weight_decay,
                clip: a.clip,
                max_len: a.max_len,
                max_texts: a.max_texts,
                seed: a.job.seed,
                device,
                precision,
                log_every: a.log_every,
                overwrite: a.job.overwrite,
            };
            tunefuse::interrupt::install();
            let rep = tunefuse::train::posttrain::posttrain(settings, progress()).map_err(err)?;
            println!(
                "{} steps, {} tokens predicted, last masked-LM loss {:.4}, {:.0} s",
                rep.steps,
                rep.predicted_tokens,
                rep.losses.last().map_or(f64::NAN, |l| l.1),
                rep.seconds
            );
            Ok(())
        }
        Cmd::Curves { dirs, output } => {
            let curves =
                tunefuse::train::active::collect_curves(&dirs).map_err(|e| e.to_string())?;
            print!("{}", tunefuse::train::active::curves_table(&curves));
            if let Some(path) = output {
                tunefuse::train::active::write_curves(&path, &curves).map_err(|e| e.to_string())?;
            }
            Ok(())
        }
        Cmd::Eval {
            checkpoint,
            task,
            split,
            data_dir,
            file,
            base_model,
            ood,
            ood_examples,
            mc_dropout,
            no_temperature,
            plot,
            resplits,
        } => {
            let opts = tunefuse::train::evaluate::EvalOptions {
                ood,
                ood_examples,
                mc_dropout,
                temperature: !no_temperature,
                plot,
                resplits,
            };
            let report = tunefuse::train::evaluate::report_checkpoint(
                &checkpoint,
                task.as_deref(),
                &split,
                data_dir.as_deref(),
                file.as_deref(),
                base_model.as_deref(),
                &opts,
            )
            .map_err(|e| e.to_string())?;
            println!("{}", serde_json::to_string_pretty(&report).unwrap());
            Ok(())
        }
        Cmd::Probe {
            checkpoint,
            task,
            senteval,
            sentences,
            data_dir,
            train,
            dev,
            test,
            words,
            seed,
            base_model,
            output,
        } => {
            use tunefuse::train::probing;
            let err = |e: tunefuse::Error| e.to_string();
            let set = match &senteval {
                Some(f) => probing::read_senteval(f).map_err(err)?,
                None => {
                    let dir = tunefuse::train::data::data_dir(data_dir.as_deref()).map_err(err)?;
                    let tasks = sentences
                        .iter()
                        .map(|t| t.parse())
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(err)?;
                    let texts = probing::task_sentences(&tasks, &dir).map_err(err)?;
                    probing::build(
                        task.parse().map_err(err)?,
                        &texts,
                        (train, dev, test),
                        words,
                        seed,
                    )
                    .map_err(err)?
                }
            };
            eprintln!(
                "probing {}: {} labels, {}/{}/{} examples",
                set.name,
                set.labels.len(),
                set.train.len(),
                set.dev.len(),
                set.test.len()
            );
            let r = probing::probe_checkpoint(
                &checkpoint,
                &set,
                data_dir.as_deref(),
                base_model.as_deref(),
            )
            .map_err(err)?;
            if let Some(dir) = &output {
                probing::write_probe(dir, &r).map_err(err)?;
            }
            eprintln!(
                "test accuracy (majority {:.3}): layer, pretrained [CLS], mean; fine-tuned [CLS], mean",
                r.majority
            );
            for (p, f) in r.pretrained.iter().zip(&r.fine_tuned) {
                eprintln!(
                    "  {:>2}  {:.3}  {:.3}  {:.3}  {:.3}",
                    p.layer, p.cls, p.mean, f.cls, f.mean
                );
            }
            println!("{}", serde_json::to_string_pretty(&r).unwrap());
            Ok(())
        }
        Cmd::Analyze {
            checkpoint,
            split,
            file,
            examples,
            base_model,
            sample_tokens,
            ablate,
            output,
            data_dir,
        } => {
            let a = tunefuse::train::analyze::analyze_checkpoint(
                &checkpoint,
                &split,
                file.as_deref(),
                data_dir.as_deref(),
                base_model.as_deref(),
                tunefuse::train::analyze::AnalyzeOptions {
                    examples,
                    sample_tokens,
                    ablate,
                },
            )
            .map_err(|e| e.to_string())?;
            if let Some(dir) = &output {
                tunefuse::train::analyze::write_analysis(dir, &a).map_err(|e| e.to_string())?;
            }
            eprintln!(
                "{} examples, {} tokens ({} sampled for RSA): layer, linear CKA, RSA, cosine \
                 distance, mean attention JS",
                a.examples, a.tokens, a.sample_tokens
            );
            for l in &a.layers {
                let js = match l.layer {
                    0 => String::from("-"),
                    i => {
                        let row = &a.attention_js[i - 1];
                        format!("{:.4}", row.iter().sum::<f64>() / row.len().max(1) as f64)
                    }
                };
                eprintln!(
                    "  {:>2}  {:.4}  {:.4}  {:.4}  {js}",
                    l.layer, l.cka, l.rsa, l.cosine_distance
                );
            }
            for x in &a.ablation {
                eprintln!(
                    "top {} layers pretrained again: {} {:.4}",
                    x.restored, a.metric, x.metric
                );
            }
            println!("{}", serde_json::to_string_pretty(&a).unwrap());
            Ok(())
        }
        Cmd::Calibrate {
            checkpoint,
            split,
            data_dir,
            file,
            base_model,
        } => {
            let t = tunefuse::train::evaluate::calibrate_checkpoint(
                &checkpoint,
                &split,
                data_dir.as_deref(),
                file.as_deref(),
                base_model.as_deref(),
            )
            .map_err(|e| e.to_string())?;
            eprintln!(
                "temperature {:.4} on {} examples of {}: NLL {:.4} -> {:.4}, ECE {:.4} -> {:.4}; \
                 stored in {}",
                t.temperature,
                t.examples,
                t.fitted_on,
                t.nll_before,
                t.nll_after,
                t.ece_before,
                t.ece_after,
                checkpoint
                    .join(tunefuse::train::evaluate::TEMPERATURE_FILE)
                    .display()
            );
            println!("{}", serde_json::to_string_pretty(&t).unwrap());
            Ok(())
        }
        Cmd::Export {
            checkpoint,
            output,
            merge,
            overwrite,
            base_model,
        } => {
            let e = tunefuse::train::export::export(
                &checkpoint,
                base_model.as_deref(),
                &output,
                merge,
                overwrite,
            )
            .map_err(|e| e.to_string())?;
            println!(
                "wrote {} ({}{} tensors, labels {:?}{})",
                output.display(),
                if e.peft { "a PEFT LoRA adapter, " } else { "" },
                e.tensors,
                e.labels,
                if e.merged > 0 {
                    format!(", {} LoRA updates merged", e.merged)
                } else {
                    String::new()
                }
            );
            Ok(())
        }
        Cmd::Predict {
            checkpoint,
            file,
            base_model,
        } => {
            let rows = tunefuse::train::evaluate::predict_checkpoint(
                &checkpoint,
                &file,
                base_model.as_deref(),
            )
            .map_err(|e| e.to_string())?;
            let mut out = std::io::stdout().lock();
            for r in rows {
                use std::io::Write;
                writeln!(out, "{}", serde_json::to_string(&r).unwrap())
                    .map_err(|e| format!("cannot write the predictions: {e}"))?;
            }
            Ok(())
        }
        Cmd::ConvertCheckpoint {
            input,
            output,
            dtype,
        } => {
            let dtype = match dtype.as_str() {
                "f32" => candle_core::DType::F32,
                "bf16" => candle_core::DType::BF16,
                "f16" => candle_core::DType::F16,
                other => return Err(format!("unknown dtype {other:?}: f32, bf16 or f16")),
            };
            tunefuse::model::bert::convert_checkpoint(&input, &output, dtype)
                .map_err(|e| e.to_string())?;
            eprintln!("wrote {}", output.display());
            Ok(())
        }
        Cmd::Results { dirs } => {
            for dir in dirs {
                let runs = tunefuse::train::report::collect(&dir).map_err(|e| e.to_string())?;
                if runs.is_empty() {
                    return Err(format!(
                        "no finished runs (summary.json) under {}",
                        dir.display()
                    ));
                }
                println!("{}\n", dir.display());
                print!("{}", tunefuse::train::report::table(&runs));
            }
            Ok(())
        }
        #[cfg(feature = "cuda")]
        Cmd::Census {
            model,
            data_dir,
            batch_size,
            warmup,
            steps,
            case,
            stamp,
            json,
            check,
            agree,
        } => census(
            &model, data_dir, batch_size, warmup, steps, &case, stamp, json, check, agree,
        ),
        Cmd::Table { ours, peers } => {
            let peers = peers
                .map(|p| bench::load_peers(&p))
                .transpose()?
                .unwrap_or_default();
            let (name, copy, rows) = bench::load_ours(&ours)?;
            print!("{}", bench::table(&name, copy, &rows, &peers));
            Ok(())
        }
    }
}

#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
fn census(
    model: &std::path::Path,
    data_dir: Option<PathBuf>,
    batch_size: usize,
    warmup: usize,
    steps: usize,
    only: &[String],
    stamp: String,
    json: Option<PathBuf>,
    check: Option<PathBuf>,
    agree: Option<PathBuf>,
) -> Result<(), String> {
    use tunefuse::census::{self, Compare};
    let cases: Vec<&census::Case> = census::CASES
        .iter()
        .filter(|c| only.is_empty() || only.iter().any(|o| o == c.name))
        .collect();
    if let Some(o) = only
        .iter()
        .find(|o| !census::CASES.iter().any(|c| c.name == o.as_str()))
    {
        let names: Vec<&str> = census::CASES.iter().map(|c| c.name).collect();
        return Err(format!(
            "no census case {o:?}; the cases are {}",
            names.join(", ")
        ));
    }
    let how = if agree.is_some() {
        Compare::Differs
    } else {
        Compare::Rises
    };
    let recorded = check
        .or(agree)
        .map(|p| -> Result<census::Census, String> {
            let text = std::fs::read_to_string(&p)
                .map_err(|e| format!("cannot read {}: {e}", p.display()))?;
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))
        })
        .transpose()?;
    let mode = census::read().map_err(|e| e.to_string())?.mode;
    let mut out = census::Census {
        mode,
        stamp,
        machine: census::machine(),
        warmup,
        steps,
        cases: vec![],
    };
    for c in cases {
        eprintln!("census: {} ({} steps)", c.name, warmup + steps);
        out.cases.push(
            census::run_case(c, model, data_dir.clone(), batch_size, warmup, steps)
                .map_err(|e| format!("census case {}: {e}", c.name))?,
        );
    }
    print!("{}", census::table(&out));
    if let Some(p) = &json {
        std::fs::write(p, serde_json::to_string_pretty(&out).unwrap() + "\n")
            .map_err(|e| format!("cannot write {}: {e}", p.display()))?;
    }
    if let Some(mut rec) = recorded {
        // With --case, only the cases measured are compared.
        if !only.is_empty() {
            rec.cases.retain(|c| only.contains(&c.name));
        }
        let diffs = census::differences(&rec, &out, how);
        let what = match how {
            Compare::Rises => "rose above",
            Compare::Differs => "differs from",
        };
        if !diffs.is_empty() {
            return Err(format!(
                "the step census {what} the recorded one ({}, {}):\n  {}",
                rec.mode,
                rec.stamp,
                diffs.join("\n  ")
            ));
        }
        eprintln!(
            "census: no count {what} the recorded census ({}, {})",
            rec.mode, rec.stamp
        );
    }
    Ok(())
}

/// This process's command line with `--resume` (and without `--overwrite`):
/// what continues an interrupted run.
fn resume_command() -> String {
    let mut args: Vec<String> = std::env::args()
        .filter(|a| a != "--overwrite" && a != "--resume")
        .collect();
    args.push("--resume".into());
    args.iter()
        .map(|a| {
            if a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
