//! One batch's objective: the task loss as an [`Estimator`] estimates it,
//! plus the weighted losses of the [`Term`]s, each logged under its own
//! name. The methods see the model only through [`Ctx`]: the batch, the
//! input embeddings, "forward from embeddings" and the clean outputs
//! (computed once, on first request, whoever asks first), the trained
//! parameters and the perturbations' random stream.
use candle_core::backprop::GradStore;
use candle_core::Tensor;
use candle_nn::VarMap;

use super::optim::Param;
use super::task::TaskHead;
use crate::error::Result;
use crate::model::{Bert, Outputs};
use crate::ops::mixout::Rng;

/// One batch on the device, plus its labels.
pub struct Batch {
    /// Token ids `[B, L]` (u32).
    pub ids: Tensor,
    /// Token types `[B, L]`.
    pub types: Tensor,
    /// Attention mask `[B, L]`: 1 for tokens, 0 for padding.
    pub mask: Tensor,
    /// Class indices `[B]` (u32), or regression targets `[B]` (f32).
    pub labels: Tensor,
}

/// The encoder and its head: the model a run trains.
pub struct TaskModel<'a> {
    /// The encoder.
    pub bert: &'a Bert,
    /// The task head on its last hidden states.
    pub head: &'a TaskHead,
}

impl TaskModel<'_> {
    /// The input embeddings of a batch (before the encoder layers).
    pub fn embed(&self, b: &Batch) -> Result<Tensor> {
        self.bert.forward_embeddings(&b.ids, Some(&b.types))
    }

    /// The head's outputs from input embeddings.
    pub fn forward(&self, embeds: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = self.hidden(embeds, mask)?;
        self.head.forward(&h, mask, &self.bert.stream)
    }

    /// The encoder's last hidden states `[B, L, H]` from input embeddings.
    pub fn hidden(&self, embeds: &Tensor, mask: &Tensor) -> Result<Tensor> {
        Ok(self
            .bert
            .forward_from_embeddings(embeds, mask, Outputs::default())?
            .last_hidden)
    }
}

/// What a method may use to compute its part of one batch's objective.
pub struct Ctx<'a> {
    /// The encoder and head.
    pub model: TaskModel<'a>,
    /// The batch the objective is computed on.
    pub batch: &'a Batch,
    /// The optimised parameters (in the optimiser's order).
    pub params: &'a [Param],
    /// The random stream of the input perturbations (noise, initial δ),
    /// shared by the methods in registry order.
    pub noise: &'a mut Rng,
    embeds: Option<Tensor>,
    clean_hidden: Option<Tensor>,
    clean: Option<Tensor>,
}

impl<'a> Ctx<'a> {
    /// A context for one batch; the embeddings and clean outputs are
    /// computed on first request.
    pub fn new(
        model: TaskModel<'a>,
        batch: &'a Batch,
        params: &'a [Param],
        noise: &'a mut Rng,
    ) -> Self {
        Self {
            model,
            batch,
            params,
            noise,
            embeds: None,
            clean_hidden: None,
            clean: None,
        }
    }

    /// The task head.
    pub fn head(&self) -> &TaskHead {
        self.model.head
    }

    /// The head's divergence between outputs `a` and `b` over the rows
    /// this batch counts (every example; for token classification every
    /// labelled token): see [`TaskHead::divergence`].
    pub fn divergence(
        &self,
        a: &Tensor,
        b: &Tensor,
        grad: crate::ops::sym_kl::SymKlGrad,
        reduction: crate::ops::sym_kl::Reduction,
        weight: f64,
    ) -> Result<Tensor> {
        let rows = self.head().divergence_rows(&self.batch.labels)?;
        self.head()
            .divergence(a, b, grad, reduction, weight, rows.as_ref())
    }

    /// The loss an adversarial ascent climbs, over the rows this batch
    /// counts: see [`TaskHead::ascent_loss`].
    pub fn ascent_loss(&self, adv: &Tensor, target: &Tensor) -> Result<Tensor> {
        let rows = self.head().divergence_rows(&self.batch.labels)?;
        self.head().ascent_loss(adv, target, rows.as_ref())
    }

    /// The batch's input embeddings (in the graph), computed once.
    pub fn embeds(&mut self) -> Result<Tensor> {
        if self.embeds.is_none() {
            self.embeds = Some(self.model.embed(self.batch)?);
        }
        Ok(self.embeds.clone().expect("just set"))
    }

    /// The encoder's last hidden states on the unperturbed input (in the
    /// graph), computed once: what [`Ctx::clean`]'s head reads.
    pub fn clean_hidden(&mut self) -> Result<Tensor> {
        if self.clean_hidden.is_none() {
            let e = self.embeds()?;
            self.clean_hidden = Some(self.model.hidden(&e, &self.batch.mask)?);
        }
        Ok(self.clean_hidden.clone().expect("just set"))
    }

    /// The outputs on the unperturbed input (in the graph), computed once.
    pub fn clean(&mut self) -> Result<Tensor> {
        if self.clean.is_none() {
            let h = self.clean_hidden()?;
            let m = &self.model;
            self.clean = Some(m.head.forward(&h, &self.batch.mask, &m.bert.stream)?);
        }
        Ok(self.clean.clone().expect("just set"))
    }

    /// The head's outputs from (perturbed) input embeddings.
    pub fn forward(&self, embeds: &Tensor) -> Result<Tensor> {
        self.model.forward(embeds, &self.batch.mask)
    }
}

/// A term's contribution to one batch's objective.
pub struct TermOut {
    /// The weighted loss added to the objective; `None` when the term was
    /// skipped for this batch (it then logs NaN).
    pub loss: Option<Tensor>,
    /// The unweighted value, detached, for the log.
    pub value: Tensor,
}

impl TermOut {
    /// A term that adds nothing this batch and logs `value` (0 for a
    /// weight of 0, NaN for a batch it had to skip).
    pub fn skipped(value: f32, device: &candle_core::Device) -> Result<Self> {
        Ok(Self {
            loss: None,
            value: Tensor::new(value, device)?,
        })
    }
}

/// What a term may build on before training: the run's settings, the
/// encoder, the tokenizer and the parameter store (for parameters of its
/// own, under the prefixes it declares in [`Term::prefixes`]).
pub struct TermEnv<'a> {
    /// The run's configuration.
    pub cfg: &'a super::config::Config,
    /// The encoder (transforms applied).
    pub bert: &'a Bert,
    /// The run's tokenizer.
    pub tok: &'a crate::model::TextTokenizer,
    /// Where new parameters go.
    pub varmap: &'a VarMap,
    /// Where the run computes.
    pub device: &'a candle_core::Device,
    /// Micro-batches the run will train on (progress schedules).
    pub micro_batches: u64,
}

/// A method that adds a weighted loss (SMART's smoothness, R3F, Bregman).
pub trait Term {
    /// The name its value is logged under in `metrics.jsonl`.
    fn name(&self) -> &'static str;
    /// Its loss for the batch in `ctx` (weighted, in the graph) and the
    /// value to log, or [`TermOut::skipped`].
    fn term(&mut self, ctx: &mut Ctx<'_>) -> Result<TermOut>;
    /// Before the trainable set is chosen: reads what the term needs and
    /// creates its parameters (AFTER's domain classifier).
    fn setup(&mut self, _env: &TermEnv<'_>) -> Result<()> {
        Ok(())
    }
    /// Name prefixes of the parameters [`Term::setup`] created (trained
    /// whatever is frozen).
    fn prefixes(&self) -> Vec<&'static str> {
        vec![]
    }
    /// After every optimiser step (Bregman's θ̃ follows θ).
    fn after_step(&mut self, _params: &[Param]) -> Result<()> {
        Ok(())
    }
    /// Created once the trainable set is known, before the first step.
    fn start(&mut self, _params: &[Param]) -> Result<()> {
        Ok(())
    }
    /// State that checkpoints save, by key.
    fn state(&self, _params: &[Param]) -> Vec<(String, Tensor)> {
        vec![]
    }
    /// Restores [`Term::state`]; `get` fetches a saved tensor by key or
    /// fails naming it.
    fn load_state(
        &mut self,
        _params: &[Param],
        _get: &dyn Fn(&str) -> Result<Tensor>,
    ) -> Result<()> {
        Ok(())
    }
}

/// How the task loss of a batch is estimated, with parameter gradients of
/// passes the estimator already back-propagated.
pub struct Estimate {
    /// The task loss (in the graph).
    pub loss: Tensor,
    /// Gradients of passes already back-propagated, to add to the loss's.
    pub grads: Option<GradStore>,
}

/// A method that replaces how the task loss is estimated (FreeLB).
pub trait Estimator {
    /// The batch's task loss as this estimator estimates it.
    fn task_loss(&mut self, ctx: &mut Ctx<'_>) -> Result<Estimate>;
}

/// The task loss on the clean outputs.
pub struct Plain;

impl Estimator for Plain {
    fn task_loss(&mut self, ctx: &mut Ctx<'_>) -> Result<Estimate> {
        let out = ctx.clean()?;
        Ok(Estimate {
            loss: ctx.head().loss(&out, &ctx.batch.labels)?,
            grads: None,
        })
    }
}

/// A method that changes the model (mixout, adapters, LoRA) and owns the
/// parameters it creates.
pub trait ModelTransform {
    /// Changes `bert`, creating any new parameters in `varmap`.
    fn apply(&self, bert: &mut Bert, varmap: &VarMap) -> Result<()>;
    /// Whether `name` is one of the parameters this transform created.
    fn owns(&self, _name: &str) -> bool {
        false
    }
    /// With the backbone frozen: also train its LayerNorms.
    fn trains_layernorm(&self) -> bool {
        false
    }
    /// The dropout the run uses unless it sets one (mixout: none).
    fn default_dropout(&self) -> Option<f64> {
        None
    }
}

/// One batch's objective, built by [`Objective::loss`].
pub struct BatchLoss {
    /// What the backward pass runs on; its value is the whole objective.
    pub loss: Tensor,
    /// Each term's value, in [`Objective::names`] order.
    pub values: Vec<Tensor>,
    /// Parameter gradients of passes already back-propagated (FreeLB's
    /// ascent passes), to add to those of `loss`.
    pub grads: Option<GradStore>,
}

/// The estimator and the terms of a run.
pub struct Objective {
    /// How the task loss is estimated ([`Plain`] without FreeLB).
    pub estimator: Box<dyn Estimator>,
    /// The weighted terms, in registry order.
    pub terms: Vec<Box<dyn Term>>,
}

impl Objective {
    /// The terms' names, in the order their values are logged.
    pub fn names(&self) -> Vec<&'static str> {
        self.terms.iter().map(|t| t.name()).collect()
    }

    /// The estimated task loss plus every term's weighted loss, in order.
    pub fn loss(&mut self, ctx: &mut Ctx<'_>) -> Result<BatchLoss> {
        let est = self.estimator.task_loss(ctx)?;
        let mut loss = est.loss;
        let mut values = Vec::with_capacity(self.terms.len());
        for t in &mut self.terms {
            let out = t.term(ctx)?;
            if let Some(l) = out.loss {
                loss = (loss + l)?;
            }
            values.push(out.value);
        }
        Ok(BatchLoss {
            loss,
            values,
            grads: est.grads,
        })
    }
}
