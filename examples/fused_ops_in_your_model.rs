//! tunefuse's fused ops inside someone else's candle model and training
//! loop: a small bag-of-embeddings classifier with a bottleneck adapter
//! (`ops::adapter::adapter_fast`, the fused kernel on CUDA), trained with
//! candle-nn's own AdamW on cross-entropy plus SMART's smoothness penalty,
//! built from tunefuse's perturbation (`ops::Perturbation`: noise, then one
//! ascent step on the embeddings) and fused symmetric KL (`ops::sym_kl`).
//!
//! The task is synthetic: the label is the most frequent of three token
//! groups in a sequence. The program prints the loss and accuracy per
//! epoch and exits with an error if the model has not learnt the task.
//!
//! `cargo run --release --example fused_ops_in_your_model [-- --device cuda]`
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{Module, Optimizer, VarBuilder, VarMap};
use tunefuse::ops::adapter::{adapter_fast, Act, AdapterWeights};
use tunefuse::ops::{
    kl, sym_kl, AscentStep, Granularity, Noise, Norm, Perturbation, Reduction, Rng, StepMode,
    SymKlGrad, SymKlOptions,
};

const VOCAB: usize = 30;
const HIDDEN: usize = 32;
const LEN: usize = 12;
const CLASSES: usize = 3;

/// The user's model: embeddings, an adapter on them, mean pooling, a linear
/// classifier. Its forward starts from embeddings so that SMART can perturb
/// them.
struct Model {
    emb: candle_nn::Embedding,
    down: Tensor,
    up: Tensor,
    head: candle_nn::Linear,
}

impl Model {
    fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            emb: candle_nn::embedding(VOCAB, HIDDEN, vb.pp("emb"))?,
            down: vb.get_with_hints(
                (8, HIDDEN),
                "adapter.down",
                candle_nn::init::DEFAULT_KAIMING_NORMAL,
            )?,
            up: vb.get_with_hints((HIDDEN, 8), "adapter.up", candle_nn::Init::Const(0.0))?,
            head: candle_nn::linear(HIDDEN, CLASSES, vb.pp("head"))?,
        })
    }

    fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.emb.forward(ids)
    }

    fn forward_embeddings(&self, e: &Tensor) -> tunefuse::Result<Tensor> {
        let w = AdapterWeights {
            w_down: self.down.clone(),
            b_down: None,
            w_up: self.up.clone(),
            b_up: None,
            act: Act::GeluErf,
            scale: 1.0,
        };
        // x + up(gelu(down(x))) over every token, in one fused op on CUDA.
        let h = adapter_fast(e, &w, None)?;
        Ok(self.head.forward(&h.mean(1)?)?)
    }
}

/// Sequences whose label is the most frequent token group (ids mod 3).
fn data(n: usize, seed: u64, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let mut ids = Vec::with_capacity(n * LEN);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let mut counts = [0usize; CLASSES];
        for t in 0..LEN as u64 {
            let w = tunefuse::philox::group(seed, i, t);
            // Each sequence leans towards one group, so the task is learnable.
            let lean = (i % CLASSES as u64) as u32;
            let id = if w[0].is_multiple_of(2) {
                lean + CLASSES as u32 * (w[1] % (VOCAB / CLASSES) as u32)
            } else {
                w[1] % VOCAB as u32
            };
            counts[(id % CLASSES as u32) as usize] += 1;
            ids.push(id);
        }
        let best = (0..CLASSES)
            .max_by_key(|&c| (counts[c], CLASSES - c))
            .unwrap();
        labels.push(best as u32);
    }
    Ok((
        Tensor::from_vec(ids, (n, LEN), device)?,
        Tensor::new(labels, device)?,
    ))
}

fn accuracy(model: &Model, ids: &Tensor, labels: &Tensor) -> tunefuse::Result<f64> {
    let logits = model.forward_embeddings(&model.embed(ids)?)?;
    let pred = logits.argmax(D::Minus1)?;
    let right = pred
        .eq(labels)?
        .to_dtype(DType::F32)?
        .mean_all()?
        .to_scalar::<f32>()?;
    Ok(f64::from(right))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cuda = std::env::args().any(|a| a == "cuda");
    let device = if cuda {
        Device::new_cuda(0)?
    } else {
        Device::Cpu
    };
    let varmap = VarMap::new();
    let model = Model::new(VarBuilder::from_varmap(&varmap, DType::F32, &device))?;
    let mut opt = candle_nn::AdamW::new(
        varmap.all_vars(),
        candle_nn::ParamsAdamW {
            lr: 3e-3,
            ..Default::default()
        },
    )?;
    let (train_ids, train_y) = data(512, 1, &device)?;
    let (dev_ids, dev_y) = data(256, 2, &device)?;
    // SMART as in smart-pytorch: N(0, 1e-5²) noise, one normalised ascent
    // step of the embeddings' perturbation, penalty weight λ = 1.
    let smart = Perturbation {
        noise: Noise::Normal { sigma: 1e-5 },
        step: AscentStep {
            eta: 1e-3,
            norm: Norm::Linf,
            granularity: Granularity::Token,
            mode: StepMode::NormalizedStep { eps0: 1e-6 },
        },
        steps: 1,
    };
    let mut rng = Rng { seed: 7, offset: 0 };
    let start = accuracy(&model, &dev_ids, &dev_y)?;
    let batch = 32;
    for epoch in 0..8 {
        let (mut total, mut penalty_total) = (0.0, 0.0);
        for b in 0..512 / batch {
            let ids = train_ids.narrow(0, b * batch, batch)?;
            let y = train_y.narrow(0, b * batch, batch)?;
            let e = model.embed(&ids)?;
            let clean = model.forward_embeddings(&e)?;
            let ce = candle_nn::loss::cross_entropy(&clean, &y)?;
            let mask = Tensor::ones((batch, LEN), DType::F32, &device)?;
            // The ascent: the gradient of KL(clean ‖ perturbed) with
            // respect to the perturbation alone.
            let target = clean.detach();
            let e_fixed = e.detach();
            let perturbed = smart.run(e.dims(), &mask, DType::F32, &mut rng, |delta| {
                let d = Var::from_tensor(delta)?;
                let adv = model.forward_embeddings(&(&e_fixed + d.as_tensor())?)?;
                let loss = kl(&adv, &target, Reduction::BatchMean, None)?;
                let grads = loss.backward()?;
                Ok(grads
                    .get(d.as_tensor())
                    .expect("δ takes part in the loss")
                    .clone())
            })?;
            let adv = model.forward_embeddings(&(&e + &perturbed.delta)?)?;
            let opts = SymKlOptions {
                grad: SymKlGrad::Detached,
                ..Default::default()
            };
            let penalty = sym_kl(&adv, &clean, &opts)?;
            let loss = (&ce + &penalty)?;
            opt.backward_step(&loss)?;
            total += f64::from(ce.to_scalar::<f32>()?);
            penalty_total += f64::from(penalty.to_scalar::<f32>()?);
        }
        let acc = accuracy(&model, &dev_ids, &dev_y)?;
        let n = (512 / batch) as f64;
        println!(
            "epoch {epoch}: cross-entropy {:.4}, SMART penalty {:.2e}, dev accuracy {acc:.3}",
            total / n,
            penalty_total / n
        );
    }
    let end = accuracy(&model, &dev_ids, &dev_y)?;
    if end < 0.8 || end <= start {
        return Err(format!(
            "the model did not learn the task: dev accuracy {start:.3} -> {end:.3}"
        )
        .into());
    }
    println!("dev accuracy {start:.3} -> {end:.3}");
    Ok(())
}
