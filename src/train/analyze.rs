//! What fine-tuning changed: the fine-tuned checkpoint against its
//! pretrained base on the same inputs.
//! - Per layer (0: the embeddings output, l: encoder layer l), linear CKA
//!   (Kornblith et al. 2019) between the two models' token representations
//!   over every real token, as Merchant et al. (2020) compare layers before
//!   and after fine-tuning, and the mean cosine distance of the token
//!   vectors.
//! - Per layer and head, the Jensen–Shannon divergence (base 2, in [0, 1])
//!   between the two models' attention distributions of each real query
//!   token over the real keys, averaged over tokens and sentences (Zhao &
//!   Bethard, ACL 2020).
//!
//! CKA is accumulated from sums (Σxyᵀ, Σx, Σy, n per layer), so any number
//! of examples needs only three H×H matrices a layer.
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use serde::Serialize;

use super::evaluate::checkpoint_run;
use crate::error::{param_err, Result};
use crate::model::{Bert, Outputs};

/// One layer's change.
#[derive(Clone, Debug, Serialize)]
pub struct LayerChange {
    /// 0: the embeddings output; l: encoder layer l (1-based).
    pub layer: usize,
    /// Linear CKA of the pretrained and fine-tuned token representations
    /// (1: the same up to rotation and scale).
    pub cka: f64,
    /// Mean over tokens of 1 − cos(pretrained, fine-tuned).
    pub cosine_distance: f64,
}

/// The analysis of one checkpoint.
#[derive(Clone, Debug, Serialize)]
pub struct Analysis {
    /// Examples read.
    pub examples: usize,
    /// Real tokens compared.
    pub tokens: usize,
    /// Per layer, the embeddings output first.
    pub layers: Vec<LayerChange>,
    /// `[layer][head]`: mean JS divergence (bits) of the attention
    /// distributions, encoder layers bottom first.
    pub attention_js: Vec<Vec<f64>>,
}

/// Linear CKA from accumulated sums of paired rows x (dimension p) and y
/// (dimension q): `sxy` = Σ x yᵀ `[p, q]`, `sxx` = Σ x xᵀ, `syy` = Σ y yᵀ,
/// `sx` = Σ x, `sy` = Σ y over `n` rows. With the centred cross-covariances
/// C, CKA = ‖C_xy‖²_F / (‖C_xx‖_F·‖C_yy‖_F).
pub fn linear_cka_from_sums(
    sxy: &Tensor,
    sxx: &Tensor,
    syy: &Tensor,
    sx: &Tensor,
    sy: &Tensor,
    n: usize,
) -> Result<f64> {
    if n < 2 {
        return Err(param_err("cka", "needs at least two rows"));
    }
    let n = n as f64;
    let centre = |s: &Tensor, a: &Tensor, b: &Tensor| -> Result<Tensor> {
        let outer = a.unsqueeze(1)?.matmul(&b.unsqueeze(0)?)?;
        Ok((s - (outer / n)?)?)
    };
    let fro2 = |t: &Tensor| -> Result<f64> { Ok(t.sqr()?.sum_all()?.to_scalar::<f64>()?) };
    let cxy = fro2(&centre(sxy, sx, sy)?)?;
    let cxx = fro2(&centre(sxx, sx, sx)?)?.sqrt();
    let cyy = fro2(&centre(syy, sy, sy)?)?.sqrt();
    if cxx == 0.0 || cyy == 0.0 {
        return Err(param_err(
            "cka",
            "a representation is constant over the rows: CKA is undefined",
        ));
    }
    Ok(cxy / (cxx * cyy))
}

/// Linear CKA of paired rows `x` `[n, p]` and `y` `[n, q]`.
pub fn linear_cka(x: &Tensor, y: &Tensor) -> Result<f64> {
    let n = x.dim(0)?;
    if y.dim(0)? != n {
        return Err(param_err("cka", format!("{n} rows against {}", y.dim(0)?)));
    }
    let mut sums = Sums::new(x.dim(1)?, y.dim(1)?, x.device())?;
    sums.add(x, y)?;
    sums.cka()
}

/// Running sums of paired rows for CKA (and the cosine distance, when
/// both sides have one width).
struct Sums {
    sxy: Tensor,
    sxx: Tensor,
    syy: Tensor,
    sx: Tensor,
    sy: Tensor,
    n: usize,
    cos: f64,
}

impl Sums {
    fn new(p: usize, q: usize, device: &Device) -> Result<Self> {
        let z = |d: &[usize]| Tensor::zeros(d, DType::F64, device);
        Ok(Self {
            sxy: z(&[p, q])?,
            sxx: z(&[p, p])?,
            syy: z(&[q, q])?,
            sx: z(&[p])?,
            sy: z(&[q])?,
            n: 0,
            cos: 0.0,
        })
    }

    /// Linear CKA of the rows added so far.
    fn cka(&self) -> Result<f64> {
        linear_cka_from_sums(&self.sxy, &self.sxx, &self.syy, &self.sx, &self.sy, self.n)
    }

    /// Adds the rows of `x` `[n, p]` and `y` `[n, q]`.
    fn add(&mut self, x: &Tensor, y: &Tensor) -> Result<()> {
        let (x, y) = (x.to_dtype(DType::F64)?, y.to_dtype(DType::F64)?);
        self.n += x.dim(0)?;
        self.sxy = (&self.sxy + x.t()?.matmul(&y)?)?;
        self.sxx = (&self.sxx + x.t()?.matmul(&x)?)?;
        self.syy = (&self.syy + y.t()?.matmul(&y)?)?;
        self.sx = (&self.sx + x.sum(0)?)?;
        self.sy = (&self.sy + y.sum(0)?)?;
        if x.dim(1)? != y.dim(1)? {
            return Ok(());
        }
        let dot = (&x * &y)?.sum(1)?;
        let norms =
            (x.sqr()?.sum(1)?.sqrt()? * y.sqr()?.sum(1)?.sqrt()?)?.clamp(1e-12, f64::INFINITY)?;
        let cos = (dot / norms)?
            .affine(-1.0, 1.0)?
            .sum_all()?
            .to_scalar::<f64>()?;
        self.cos += cos;
        Ok(())
    }
}

/// Mean JS divergence (bits) per head between attention distributions
/// `p`, `q` `[B, heads, L, L]` over the real query tokens, keys restricted
/// by the padding (the masked keys hold ~0 probability in both): returns
/// the per-head sums over real queries of this batch.
fn js_per_head(p: &Tensor, q: &Tensor, mask: &Tensor) -> Result<Vec<f64>> {
    let (p, q) = (p.to_dtype(DType::F64)?, q.to_dtype(DType::F64)?);
    let m = ((&p + &q)? * 0.5)?;
    // x·log2(x / m), 0 where x is 0.
    let kl = |x: &Tensor| -> Result<Tensor> {
        let ratio = (x / m.clamp(1e-300, f64::INFINITY)?)?.clamp(1e-300, f64::INFINITY)?;
        Ok((x * (ratio.log()? / std::f64::consts::LN_2)?)?.sum(D::Minus1)?)
    };
    let js = ((kl(&p)? + kl(&q)?)? * 0.5)?; // [B, heads, L]
    let qmask = mask.to_dtype(DType::F64)?.unsqueeze(1)?; // [B, 1, L]
    let per_head = js.broadcast_mul(&qmask)?.sum(2)?.sum(0)?; // [heads]
    Ok(per_head.to_vec1()?)
}

/// Compares a `best/` checkpoint with its pretrained base on at most
/// `examples` examples of `split` of its task (or of `file`): see the
/// module docs. `base`: the base model, when it has moved.
pub fn analyze_checkpoint(
    dir: &Path,
    split: &str,
    file: Option<&Path>,
    base: Option<&Path>,
    examples: usize,
) -> Result<Analysis> {
    if examples == 0 {
        return Err(param_err("analyze", "--examples must be at least 1"));
    }
    let run = checkpoint_run(dir, None, split.parse()?, None, file, base)?;
    let varmap = candle_nn::VarMap::new();
    let pre = Bert::from_pretrained(&run.cfg.model, &varmap, DType::F32, &run.device)?;
    if pre.layers.len() != run.bert.layers.len() {
        return Err(param_err(
            "analyze",
            "the base model and the checkpoint have different layer counts",
        ));
    }
    let was = run.bert.stream.train();
    run.bert.stream.set_train(false);
    let want = Outputs {
        hidden_states: true,
        attentions: true,
    };
    let h = run.bert.config.hidden_size;
    let heads = run.bert.config.num_attention_heads;
    let n_layers = run.bert.layers.len();
    let mut sums = (0..=n_layers)
        .map(|_| Sums::new(h, h, &run.device))
        .collect::<Result<Vec<_>>>()?;
    let mut js = vec![vec![0.0; heads]; n_layers];
    let (mut tokens, mut read) = (0usize, 0usize);
    let n = run.eval.examples.len().min(examples);
    let idx: Vec<usize> = (0..n).collect();
    let result = (|| -> Result<()> {
        for chunk in idx.chunks(32) {
            let b = run.batch(&run.eval, chunk)?;
            let ft = run.bert.forward(&b.ids, Some(&b.types), &b.mask, want)?;
            let pt = pre.forward(&b.ids, Some(&b.types), &b.mask, want)?;
            let mask: Vec<Vec<u32>> = b.mask.to_dtype(DType::U32)?.to_vec2()?;
            let rows: Vec<u32> = mask
                .iter()
                .flatten()
                .enumerate()
                .filter(|(_, &m)| m != 0)
                .map(|(i, _)| i as u32)
                .collect();
            let rows = Tensor::new(rows.as_slice(), &run.device)?;
            let (fh, ph) = (
                ft.hidden_states.expect("asked for"),
                pt.hidden_states.expect("asked for"),
            );
            for (l, (x, y)) in ph.iter().zip(&fh).enumerate() {
                let pick =
                    |t: &Tensor| -> Result<Tensor> { Ok(t.flatten_to(1)?.index_select(&rows, 0)?) };
                sums[l].add(&pick(x)?, &pick(y)?)?;
            }
            let (fa, pa) = (
                ft.attentions.expect("asked for"),
                pt.attentions.expect("asked for"),
            );
            for (l, (p, q)) in pa.iter().zip(&fa).enumerate() {
                for (k, v) in js_per_head(p, q, &b.mask)?.into_iter().enumerate() {
                    js[l][k] += v;
                }
            }
            tokens += rows.dim(0)?;
            read += chunk.len();
        }
        Ok(())
    })();
    run.bert.stream.set_train(was);
    result?;
    let layers = sums
        .iter()
        .enumerate()
        .map(|(layer, s)| {
            Ok(LayerChange {
                layer,
                cka: s.cka()?,
                cosine_distance: s.cos / tokens as f64,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    for row in &mut js {
        for v in row.iter_mut() {
            *v /= tokens as f64;
        }
    }
    Ok(Analysis {
        examples: read,
        tokens,
        layers,
        attention_js: js,
    })
}
