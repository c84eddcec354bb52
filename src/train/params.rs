//! The trainable set: which parameters the optimiser updates and which
//! layers take gradients (the one place that decides what is frozen), and
//! the seeded initialisation of the parameters a checkpoint did not
//! provide.
use std::collections::HashMap;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;

use super::objective::ModelTransform;
use super::optim::Param;
use crate::error::Result;
use crate::model::Bert;
use crate::ops::mixout::Rng;

/// What is frozen, decided once from the methods and the unfreezing
/// schedule: a transform that freezes the backbone (adapters, LoRA), or
/// gradual unfreezing (ULMFiT), never both (the configuration refuses it).
#[derive(Clone, Copy, Debug)]
pub enum Freezing {
    /// Every parameter trains.
    None,
    /// The backbone is frozen for the whole run.
    Backbone {
        /// Its LayerNorms still train.
        layernorm: bool,
    },
    /// Stage s trains the top s + 1 layers (and the head).
    Gradual {
        /// Optimiser steps per stage (None: an epoch).
        every_steps: Option<u64>,
    },
    /// Units `from..=to` (0: the embeddings, i: encoder layer i − 1) of a
    /// model of `layers` layers are frozen for the whole run
    /// ([`Freezing::layers`]).
    Units {
        /// The first frozen unit.
        from: usize,
        /// The last frozen unit.
        to: usize,
        /// The model's encoder layers.
        layers: usize,
    },
}

impl Freezing {
    /// What `cfg` freezes in a model of `layers` encoder layers:
    /// `frozen_backbone` when a method freezes it
    /// ([`super::methods::Props`]), else `freeze_layers` ([`Freezing::layers`]),
    /// else gradual unfreezing (the configuration refuses the combinations).
    pub fn new(
        frozen_backbone: bool,
        transforms: &[Box<dyn ModelTransform>],
        cfg: &super::config::Config,
        layers: usize,
    ) -> Result<Self> {
        Ok(if frozen_backbone {
            Freezing::Backbone {
                layernorm: transforms.iter().any(|t| t.trains_layernorm()),
            }
        } else if cfg.freeze_layers != 0 {
            Freezing::layers(cfg.freeze_layers, layers)?
        } else if cfg.gradual_unfreezing {
            Freezing::Gradual {
                every_steps: cfg.unfreeze_every_steps,
            }
        } else {
            Freezing::None
        })
    }

    /// `freeze_layers = k` of a model with `layers` encoder layers: +k
    /// freezes the embeddings and the k lowest layers, −k the k highest;
    /// an error when |k| exceeds the layer count.
    pub fn layers(k: i64, layers: usize) -> Result<Self> {
        let n = k.unsigned_abs() as usize;
        if n > layers {
            return Err(crate::error::param_err(
                "freeze_layers",
                format!("{k} asks for {n} of a model of {layers} layers"),
            ));
        }
        Ok(match k {
            0 => Freezing::None,
            k if k > 0 => Freezing::Units {
                from: 0,
                to: n,
                layers,
            },
            _ => Freezing::Units {
                from: layers - n + 1,
                to: layers,
                layers,
            },
        })
    }

    /// Before the transforms add their parameters (which stay trainable).
    pub fn apply_initial(&self, bert: &mut Bert) -> Result<()> {
        if let Freezing::Units { from, to, .. } = *self {
            for unit in from..=to {
                bert.set_frozen(unit, true)?;
            }
        }
        if let Freezing::Backbone { layernorm } = *self {
            bert.freeze_all()?;
            if layernorm {
                for n in bert.layer_norms_mut() {
                    n.frozen = false;
                }
            }
        }
        Ok(())
    }

    /// Before each optimiser step (gradual unfreezing's stages).
    pub fn apply_at(&self, bert: &mut Bert, epoch: usize, step: u64) -> Result<()> {
        let Freezing::Gradual { every_steps } = *self else {
            return Ok(());
        };
        let stage = match every_steps {
            Some(n) => (step / n.max(1)) as usize,
            None => epoch,
        };
        let l = bert.layers.len();
        for unit in 0..=l {
            bert.set_frozen(unit, unit + stage < l)?;
        }
        Ok(())
    }

    /// Whether the optimiser updates `name` (a parameter of the backbone,
    /// the head, or a transform's). `head`: the head's name prefixes; the
    /// encoder's pooler trains only when the head pools through it.
    fn trains(&self, name: &str, transforms: &[Box<dyn ModelTransform>], head: &[&str]) -> bool {
        let in_head = head.iter().any(|h| name.starts_with(h));
        if name.starts_with("pooler.") {
            return in_head;
        }
        match *self {
            Freezing::Backbone { layernorm } => {
                transforms.iter().any(|t| t.owns(name))
                    || in_head
                    || (layernorm && name.contains("LayerNorm"))
            }
            Freezing::Units { from, to, layers } => {
                in_head || unit_of(name, layers).is_none_or(|u| !(from..=to).contains(&u))
            }
            Freezing::None | Freezing::Gradual { .. } => true,
        }
    }
}

/// A copy of every parameter's value: taken after loading the checkpoint,
/// before any transform, it tells pretrained from new parameters and gives
/// RecAdam its anchors.
pub fn snapshot(varmap: &VarMap) -> Result<HashMap<String, Tensor>> {
    varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().detach().copy()?)))
        .collect()
}

/// The optimiser's parameters, sorted by name, with their learning-rate
/// multipliers (discriminative rates), weight decay and RecAdam anchors.
pub fn trainable(
    varmap: &VarMap,
    pretrained: &HashMap<String, Tensor>,
    freezing: Freezing,
    transforms: &[Box<dyn ModelTransform>],
    head_prefix: &[&str],
    layer_lr_decay: Option<f64>,
    layers: usize,
) -> Vec<Param> {
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    names
        .into_iter()
        .filter(|n| freezing.trains(n, transforms, head_prefix))
        .map(|n| Param {
            name: n.clone(),
            var: data[n].clone(),
            lr_scale: layer_lr_decay
                .map_or(1.0, |xi| xi.powi((layers - layer_of(n, layers)) as i32)),
            decay: !(n.ends_with("bias") || n.contains("LayerNorm")),
            anchor: pretrained.get(n).cloned(),
        })
        .collect()
}

/// The unit of [`Bert::set_frozen`] a backbone parameter freezes with: 0
/// for the embeddings (with ELECTRA's projection and DeBERTa's
/// relative-position table and its norm), i + 1 for encoder layer i,
/// `layers` for a pre-norm family's final norm; None for the rest (head,
/// pooler, a transform's parameters).
fn unit_of(name: &str, layers: usize) -> Option<usize> {
    if name.contains(".adapter.") || name.contains(".lora_") {
        return None;
    }
    if [
        "embeddings.",
        "embeddings_project.",
        "encoder.rel_embeddings.",
        "encoder.LayerNorm.",
    ]
    .iter()
    .any(|p| name.starts_with(p))
    {
        return Some(0);
    }
    if name.starts_with("encoder.final_norm.") {
        return Some(layers);
    }
    let i = name.strip_prefix("encoder.layer.")?.split('.').next()?;
    i.parse::<usize>().ok().map(|i| i + 1)
}

/// Layer index of a parameter for discriminative rates: embeddings 0,
/// encoder layer i → i + 1, everything above the encoder → `layers`.
fn layer_of(name: &str, layers: usize) -> usize {
    if name.starts_with("embeddings.") {
        return 0;
    }
    name.strip_prefix("encoder.layer.")
        .and_then(|r| r.split('.').next())
        .and_then(|i| i.parse::<usize>().ok())
        .map_or(layers, |i| i + 1)
}

/// Seeded initialisation of the parameters the checkpoint did not provide
/// (head, adapters, LoRA), so a run is reproducible from its seed: biases
/// and LoRA's B zero, LoRA's A uniform ±1/√fan_in (Kaiming-uniform, a = √5),
/// adapter weights N(0, 1e-3) (adapter-bert), other weights N(0, 0.02)
/// (BERT's initializer range).
pub fn init_new(varmap: &VarMap, pretrained: &HashMap<String, Tensor>, seed: u64) -> Result<()> {
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data
        .keys()
        .filter(|k| !pretrained.contains_key(*k))
        .collect();
    names.sort();
    for (i, name) in names.into_iter().enumerate() {
        let var = &data[name];
        let n = var.elem_count();
        let fan_in = var.dims().last().copied().unwrap_or(1).max(1) as f64;
        // One Philox stream per parameter: key = seed, counters from i << 40.
        let rng = Rng {
            seed,
            offset: (i as u64) << 40,
        };
        let normal = |std: f64| -> Vec<f64> {
            (0..n as u64)
                .map(|k| {
                    let w = crate::philox::group(rng.seed, rng.offset, k);
                    let u1 = (f64::from(w[0] >> 8) + 1.0) / f64::from(1u32 << 24);
                    let u2 = f64::from(w[1] >> 8) / f64::from(1u32 << 24);
                    std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
                })
                .collect()
        };
        let vals: Vec<f64> = if name.ends_with("bias") || name.ends_with("lora_B") {
            vec![0.0; n]
        } else if name.ends_with("lora_A") {
            let b = 1.0 / fan_in.sqrt();
            (0..n as u64)
                .map(|k| {
                    (2.0 * f64::from(crate::philox::uniform(crate::philox::word(
                        rng.seed, rng.offset, k,
                    ))) - 1.0)
                        * b
                })
                .collect()
        } else if name.contains("adapter") {
            normal(1e-3)
        } else {
            normal(0.02)
        };
        let t = Tensor::from_vec(vals, var.shape(), &Device::Cpu)?
            .to_dtype(var.dtype())?
            .to_device(var.device())?;
        var.set(&t)?;
    }
    Ok(())
}
