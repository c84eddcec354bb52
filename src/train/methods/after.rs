//! Domain-adversarial fine-tuning: AFTER (Vernikos et al., Findings 2020;
//! reference GeorgeVern/AFTERV1.0) and the adversarial stage of BERT-DAAT
//! (Du et al., ACL 2020), both DANN (Ganin & Lempitsky 2015) on the encoder.
//!
//! Each micro-batch of the main task is paired with as many unlabelled
//! texts of an auxiliary corpus (another domain: AFTER's auxiliary data,
//! DAAT's target domain), read in a seeded shuffle of their own,
//! independently of the main epochs. Both batches' sentence vectors (the
//! \[CLS\] hidden state, or the mean over tokens with `pooling = "mean"`)
//! pass through the gradient-reversal op into a linear domain classifier
//! (`domain.classifier`, 2 outputs: main 0, auxiliary 1). The term is the
//! mean of the two batches' domain cross-entropies: the classifier learns to
//! tell the domains apart, while the encoder receives −λ times the
//! gradient, and learns to make them indistinguishable.
//!
//! λ is constant (AFTER: 0.1) or, with `anneal`, `λ·(2/(1 + e^(−γp)) − 1)`
//! over training progress p (DANN's schedule, γ = 10, as DAAT uses it).
//!
//! Departures from the reference: the auxiliary batch is as large as the
//! main micro-batch (AFTER splits one batch in halves: the same ratio), and
//! the sentence vector is the hidden state rather than BERT's pooler
//! output, which a sentence-embedding checkpoint does not have.
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{param_err, Result};
use crate::model::bert::{first_token, mean_pool};
use crate::model::{Dense, Outputs, Pooling, TextTokenizer};
use crate::ops::{dann_lambda, grad_reverse};
use crate::train::data;
use crate::train::objective::{Ctx, Term, TermEnv, TermOut};
use crate::train::posttrain::{read_corpus, Text};
use crate::train::task::cross_entropy;

/// AFTER's settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AfterConfig {
    /// The auxiliary corpus: a task of the data folder with an optional
    /// split (`amazon:kitchen`, `agnews@dev`), or a text file with one text
    /// a line. Its labels are not read.
    pub aux: String,
    /// λ, the scale of the reversed gradient (AFTER: 0.1).
    pub lambda: f64,
    /// DANN's annealing of λ over training progress.
    pub anneal: bool,
    /// γ of the annealing.
    pub gamma: f64,
}

impl Default for AfterConfig {
    fn default() -> Self {
        Self {
            aux: String::new(),
            lambda: 0.1,
            anneal: false,
            gamma: 10.0,
        }
    }
}

impl AfterConfig {
    /// λ at training progress `p` in [0, 1]: `lambda`, or with `anneal`
    /// `lambda·(2/(1 + e^(−γp)) − 1)`.
    pub fn lambda_at(&self, p: f64) -> f64 {
        if self.anneal {
            self.lambda * dann_lambda(p, self.gamma)
        } else {
            self.lambda
        }
    }

    /// An auxiliary corpus named; λ and γ finite and ≥ 0.
    pub fn validate(&self) -> Result<()> {
        if self.aux.trim().is_empty() {
            return Err(param_err(
                "after",
                "needs an auxiliary corpus: --set after.aux=<task[@split] or text file> \
                 (e.g. amazon:kitchen)",
            ));
        }
        for (k, v) in [("lambda", self.lambda), ("gamma", self.gamma)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(param_err(
                    "after",
                    format!("{k} must be a finite number >= 0, got {v}"),
                ));
            }
        }
        Ok(())
    }
}

/// The term (see the module docs).
pub struct After {
    cfg: AfterConfig,
    head: Option<Dense>,
    tok: Option<TextTokenizer>,
    texts: Vec<String>,
    mean: bool,
    seed: u64,
    order: Vec<usize>,
    /// Texts of the current pass already used.
    cursor: usize,
    /// Passes over the auxiliary corpus begun.
    pass: u64,
    /// Micro-batches done, and the run's total (the annealing's progress).
    done: u64,
    total: u64,
    device: Device,
}

impl After {
    /// A term with these settings.
    pub fn new(cfg: AfterConfig) -> Self {
        Self {
            cfg,
            head: None,
            tok: None,
            texts: vec![],
            mean: false,
            seed: 0,
            order: vec![],
            cursor: 0,
            pass: 0,
            done: 0,
            total: 1,
            device: Device::Cpu,
        }
    }

    /// λ at the current progress (micro-batches done over the run's).
    pub fn lambda(&self) -> f64 {
        self.cfg
            .lambda_at(self.done as f64 / self.total.max(1) as f64)
    }

    /// The next `n` auxiliary texts, starting a new seeded pass when the
    /// current one runs out.
    fn next_texts(&mut self, n: usize) -> Vec<String> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if self.cursor >= self.order.len() {
                self.order = (0..self.texts.len()).collect();
                data::shuffle(&mut self.order, self.seed ^ (0xAF7E_0000 + self.pass));
                self.pass += 1;
                self.cursor = 0;
            }
            out.push(self.texts[self.order[self.cursor]].clone());
            self.cursor += 1;
        }
        out
    }

    fn pool(&self, h: &Tensor, mask: &Tensor) -> Result<Tensor> {
        if self.mean {
            mean_pool(h, mask)
        } else {
            first_token(h)
        }
    }
}

/// The spec's task name (`amazon:kitchen@dev` → `amazon:kitchen`).
fn task_of(spec: &str) -> &str {
    spec.rsplit_once('@').map_or(spec, |(t, _)| t)
}

impl Term for After {
    fn name(&self) -> &'static str {
        "after"
    }

    fn setup(&mut self, env: &TermEnv<'_>) -> Result<()> {
        let vb = candle_nn::VarBuilder::from_varmap(env.varmap, DType::F32, env.device);
        let h = env.bert.config.hidden_size;
        self.head = Some(Dense::new(&vb, "domain.classifier", h, 2)?);
        self.mean = env.cfg.pooling == Pooling::Mean;
        self.seed = env.cfg.seed;
        self.total = env.micro_batches.max(1);
        self.device = env.device.clone();
        // A checkpoint's evaluation run trains nothing: the corpus is not
        // needed (nor, perhaps, there), and evaluating on the auxiliary
        // corpus's own task is the point of domain adaptation.
        if env.micro_batches == 0 {
            return Ok(());
        }
        let main = env.cfg.task.to_ascii_lowercase();
        if !main.is_empty() && task_of(&self.cfg.aux).eq_ignore_ascii_case(&main) {
            return Err(param_err(
                "after",
                format!(
                    "the auxiliary corpus {:?} is the main task's own data: it must come from \
                     another domain",
                    self.cfg.aux
                ),
            ));
        }
        let corpus = read_corpus(&self.cfg.aux, env.cfg.data_dir.as_deref())?;
        self.texts = corpus
            .texts
            .into_iter()
            .map(|t| match t {
                Text::Raw(s) => s,
                Text::Words(w) => w.join(" "),
            })
            .collect();
        self.tok = Some(TextTokenizer::from_file(
            &env.cfg.model.join("tokenizer.json"),
            env.cfg.max_len,
        )?);
        Ok(())
    }

    fn prefixes(&self) -> Vec<&'static str> {
        vec!["domain."]
    }

    fn term(&mut self, ctx: &mut Ctx<'_>) -> Result<TermOut> {
        let lambda = self.lambda();
        let n = ctx.batch.ids.dim(0)?;
        let aux = self.next_texts(n);
        let (Some(head), Some(tok)) = (&self.head, &self.tok) else {
            return Err(param_err(
                "after",
                "the term was not set up before training",
            ));
        };
        let pairs: Vec<(&str, Option<&str>)> = aux.iter().map(|t| (t.as_str(), None)).collect();
        let ab = tok.batch(&pairs, &self.device)?;
        let bert = ctx.model.bert;
        let h_main = ctx.clean_hidden()?;
        let h_aux = bert
            .forward(&ab.ids, Some(&ab.token_types), &ab.mask, Outputs::default())?
            .last_hidden;
        let s = &bert.stream;
        let z_main = grad_reverse(&self.pool(&h_main, &ctx.batch.mask)?, lambda)?;
        let z_aux = grad_reverse(&self.pool(&h_aux, &ab.mask)?, lambda)?;
        let zeros = Tensor::zeros(n, DType::U32, &self.device)?;
        let ones = Tensor::ones(n, DType::U32, &self.device)?;
        let l_main = cross_entropy(&head.forward(&z_main, s)?, &zeros, 0.0)?;
        let l_aux = cross_entropy(&head.forward(&z_aux, s)?, &ones, 0.0)?;
        let loss = ((l_main + l_aux)? * 0.5)?;
        self.done += 1;
        Ok(TermOut {
            value: loss.detach(),
            loss: Some(loss),
        })
    }

    fn state(&self, _params: &[crate::train::optim::Param]) -> Vec<(String, Tensor)> {
        let v = [self.cursor as f64, self.pass as f64, self.done as f64];
        match Tensor::new(&v, &Device::Cpu) {
            Ok(t) => vec![("after.position".into(), t)],
            Err(_) => vec![],
        }
    }

    fn load_state(
        &mut self,
        _params: &[crate::train::optim::Param],
        get: &dyn Fn(&str) -> Result<Tensor>,
    ) -> Result<()> {
        let v = get("after.position")?
            .to_device(&Device::Cpu)?
            .to_vec1::<f64>()?;
        let (cursor, pass, done) = (v[0] as usize, v[1] as u64, v[2] as u64);
        // The order of the pass in progress, as it was drawn.
        if pass > 0 {
            self.order = (0..self.texts.len()).collect();
            data::shuffle(&mut self.order, self.seed ^ (0xAF7E_0000 + pass - 1));
        }
        self.cursor = cursor;
        self.pass = pass;
        self.done = done;
        Ok(())
    }
}
