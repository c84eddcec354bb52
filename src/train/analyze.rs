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
//! - On a sample of the tokens (the first `sample_tokens` real tokens read),
//!   per layer RSA (representational similarity analysis, as Merchant et
//!   al. use it): the Pearson correlation of the two models' pairwise
//!   cosine-distance matrices over the sampled tokens; and the layer × layer
//!   matrix of linear CKA between every pretrained layer and every
//!   fine-tuned one.
//! - Optionally, Merchant et al.'s layer ablation: the top n fine-tuned
//!   layers replaced by the pretrained ones, n = 0 … L, and the task metric
//!   of each on the evaluation split.
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
    /// RSA of the two models' representations of the sampled tokens.
    pub rsa: f64,
}

/// The task metric with the top `restored` layers pretrained again.
#[derive(Clone, Debug, Serialize)]
pub struct Ablation {
    /// Encoder layers (counted from the top) replaced by the pretrained ones.
    pub restored: usize,
    /// The selection metric on the evaluation split.
    pub metric: f64,
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
    /// Tokens in the sample of RSA and the layer × layer matrix.
    pub sample_tokens: usize,
    /// `[pretrained layer][fine-tuned layer]`: linear CKA on the sampled
    /// tokens, the embeddings output first.
    pub cka_matrix: Vec<Vec<f64>>,
    /// The selection metric's name (of the ablation).
    pub metric: String,
    /// The layer ablation, when asked for: `restored` = 0 … layers.
    pub ablation: Vec<Ablation>,
}

/// RSA of paired rows `x` `[n, p]` and `y` `[n, q]`: the Pearson
/// correlation, over the pairs i < j, of 1 − cos(xᵢ, xⱼ) and
/// 1 − cos(yᵢ, yⱼ).
pub fn rsa(x: &Tensor, y: &Tensor) -> Result<f64> {
    let n = x.dim(0)?;
    if y.dim(0)? != n {
        return Err(param_err("rsa", format!("{n} rows against {}", y.dim(0)?)));
    }
    if n < 3 {
        return Err(param_err("rsa", "needs at least three rows"));
    }
    let distances = |t: &Tensor| -> Result<Vec<f64>> {
        let t = t.to_dtype(DType::F64)?;
        let norm = t
            .sqr()?
            .sum_keepdim(1)?
            .sqrt()?
            .clamp(1e-12, f64::INFINITY)?;
        let u = t.broadcast_div(&norm)?;
        let d = u.matmul(&u.t()?)?.affine(-1.0, 1.0)?.to_vec2::<f64>()?;
        Ok((0..n).flat_map(|i| d[i][i + 1..].to_vec()).collect())
    };
    let (a, b) = (distances(x)?, distances(y)?);
    super::metrics::pearson(&a, &b)
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

/// What `analyze` reads and computes beyond the per-layer CKA, distance
/// and attention JS.
#[derive(Clone, Copy, Debug)]
pub struct AnalyzeOptions {
    /// Read at most this many examples.
    pub examples: usize,
    /// Tokens sampled for RSA and the layer × layer CKA matrix (their
    /// pairwise distances are an n × n matrix).
    pub sample_tokens: usize,
    /// Run the layer ablation (one evaluation of the whole evaluation
    /// split per layer).
    pub ablate: bool,
}

impl Default for AnalyzeOptions {
    fn default() -> Self {
        Self {
            examples: 256,
            sample_tokens: 1024,
            ablate: false,
        }
    }
}

/// Compares a `best/` checkpoint with its pretrained base on examples of
/// `split` of its task (or of `file`): see the module docs. `data_dir`:
/// the data folder, when not the one the checkpoint records; `base`: the
/// base model, when it has moved.
pub fn analyze_checkpoint(
    dir: &Path,
    split: &str,
    file: Option<&Path>,
    data_dir: Option<&Path>,
    base: Option<&Path>,
    opts: AnalyzeOptions,
) -> Result<Analysis> {
    if opts.examples == 0 {
        return Err(param_err("analyze", "--examples must be at least 1"));
    }
    if opts.sample_tokens < 3 {
        return Err(param_err(
            "analyze",
            "--sample-tokens must be at least 3 (RSA correlates pairwise distances)",
        ));
    }
    let examples = opts.examples;
    let run = checkpoint_run(dir, None, split.parse()?, data_dir, file, base)?;
    let varmap = candle_nn::VarMap::new();
    let pre = Bert::from_pretrained(&run.cfg.model, &varmap, DType::F32, &run.device)?;
    let (a, b) = (&pre.config, &run.bert.config);
    let shape =
        |c: &crate::model::BertConfig| (c.num_hidden_layers, c.hidden_size, c.num_attention_heads);
    if pre.layers.len() != run.bert.layers.len() || shape(a) != shape(b) {
        return Err(param_err(
            "analyze",
            format!(
                "the base model {} ({} layers, hidden {}, {} heads) is not the checkpoint's \
                 architecture ({} layers, hidden {}, {} heads)",
                run.cfg.model.display(),
                pre.layers.len(),
                a.hidden_size,
                a.num_attention_heads,
                run.bert.layers.len(),
                b.hidden_size,
                b.num_attention_heads
            ),
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
    // (pretrained, fine-tuned) rows of the sampled tokens, per layer.
    let mut sample: Vec<(Vec<Tensor>, Vec<Tensor>)> = vec![(vec![], vec![]); n_layers + 1];
    let mut sampled = 0usize;
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
            // Detached: the running sums and the token sample would
            // otherwise keep every chunk's forward graph alive.
            let detach = |v: Vec<Tensor>| v.iter().map(Tensor::detach).collect::<Vec<_>>();
            let (fh, ph) = (
                detach(ft.hidden_states.expect("asked for")),
                detach(pt.hidden_states.expect("asked for")),
            );
            let take = (opts.sample_tokens - sampled).min(rows.dim(0)?);
            for (l, (x, y)) in ph.iter().zip(&fh).enumerate() {
                let pick =
                    |t: &Tensor| -> Result<Tensor> { Ok(t.flatten_to(1)?.index_select(&rows, 0)?) };
                let (x, y) = (pick(x)?, pick(y)?);
                sums[l].add(&x, &y)?;
                if take > 0 {
                    sample[l].0.push(x.narrow(0, 0, take)?);
                    sample[l].1.push(y.narrow(0, 0, take)?);
                }
            }
            sampled += take;
            let (fa, pa) = (
                detach(ft.attentions.expect("asked for")),
                detach(pt.attentions.expect("asked for")),
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
    if sampled < 3 {
        return Err(param_err(
            "analyze",
            format!("the examples read hold {sampled} tokens: RSA needs at least 3"),
        ));
    }
    let sample = sample
        .into_iter()
        .map(|(x, y)| Ok((Tensor::cat(&x, 0)?, Tensor::cat(&y, 0)?)))
        .collect::<Result<Vec<_>>>()?;
    let layers = sums
        .iter()
        .zip(&sample)
        .enumerate()
        .map(|(layer, (s, (x, y)))| {
            Ok(LayerChange {
                layer,
                cka: s.cka()?,
                cosine_distance: s.cos / tokens as f64,
                rsa: rsa(x, y)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let cka_matrix = sample
        .iter()
        .map(|(x, _)| {
            sample
                .iter()
                .map(|(_, y)| linear_cka(x, y))
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<Vec<_>>>()?;
    let ablation = if opts.ablate {
        ablate(&run, &varmap)?
    } else {
        vec![]
    };
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
        sample_tokens: sampled,
        cka_matrix,
        metric: run.cfg.metric.name().to_string(),
        ablation,
    })
}

/// Merchant et al.'s layer ablation: the metric on the whole evaluation
/// split with the top n encoder layers' parameters set back to the
/// pretrained ones (`base`), n = 0 … layers. A method's own parameters in a
/// restored layer (adapters, LoRA) are zeroed, which removes their
/// contribution. Leaves `run` with every layer restored.
fn ablate(run: &crate::train::run::Run, base: &candle_nn::VarMap) -> Result<Vec<Ablation>> {
    let metric = run.cfg.metric;
    let mut out = vec![Ablation {
        restored: 0,
        metric: run.evaluate(&run.eval)?.0.get(metric),
    }];
    let n_layers = run.bert.layers.len();
    let pretrained = base.data().lock().expect("varmap lock").clone();
    let ours = run.varmap.data().lock().expect("varmap lock").clone();
    for n in 1..=n_layers {
        let prefix = format!("encoder.layer.{}.", n_layers - n);
        for (name, var) in ours.iter().filter(|(k, _)| k.starts_with(&prefix)) {
            match pretrained.get(name) {
                Some(p) => var.set(&p.as_tensor().to_dtype(var.dtype())?)?,
                None => var.set(&var.as_tensor().zeros_like()?)?,
            }
        }
        run.bert.stream.refresh_shadows()?;
        out.push(Ablation {
            restored: n,
            metric: run.evaluate(&run.eval)?.0.get(metric),
        });
    }
    Ok(out)
}

/// Writes an analysis into `dir`: analysis.json; layers.csv (layer, CKA,
/// RSA, cosine distance), attention_js.csv (layer × head), cka_matrix.csv
/// (pretrained layer × fine-tuned layer), ablation.csv when there is one;
/// and as PNG and SVG: layers (the per-layer measures), attention_js and
/// cka_matrix (heatmaps), ablation (the metric by restored layers).
pub fn write_analysis(dir: &Path, a: &Analysis) -> Result<()> {
    use super::checkpoint::atomic_write;
    use super::plots::{plot_curves, plot_heatmap, Series};
    std::fs::create_dir_all(dir).map_err(|e| crate::error::io_err(dir, e))?;
    atomic_write(
        &dir.join("analysis.json"),
        serde_json::to_string_pretty(a).unwrap().as_bytes(),
    )?;
    let grid = |header: &str, rows: &[Vec<f64>]| -> String {
        let mut t = format!("{header}\n");
        for (i, r) in rows.iter().enumerate() {
            let cells: Vec<String> = r.iter().map(|v| format!("{v}")).collect();
            t.push_str(&format!("{i},{}\n", cells.join(",")));
        }
        t
    };
    let layer_rows: Vec<Vec<f64>> = a
        .layers
        .iter()
        .map(|l| vec![l.cka, l.rsa, l.cosine_distance])
        .collect();
    atomic_write(
        &dir.join("layers.csv"),
        grid("layer,cka,rsa,cosine_distance", &layer_rows).as_bytes(),
    )?;
    let heads = a.attention_js.first().map_or(0, Vec::len);
    let head_cols: Vec<String> = (0..heads).map(|h| format!("head{h}")).collect();
    // Encoder layers count from 1 in the file, as in the table.
    let js_text = grid(&format!("layer,{}", head_cols.join(",")), &a.attention_js);
    let js_text: String = js_text
        .lines()
        .enumerate()
        .map(|(i, l)| match (i, l.split_once(',')) {
            (0, _) | (_, None) => format!("{l}\n"),
            (_, Some((n, rest))) => format!("{},{rest}\n", n.parse::<usize>().unwrap_or(0) + 1),
        })
        .collect();
    atomic_write(&dir.join("attention_js.csv"), js_text.as_bytes())?;
    let cols: Vec<String> = (0..a.cka_matrix.len()).map(|l| format!("ft{l}")).collect();
    atomic_write(
        &dir.join("cka_matrix.csv"),
        grid(
            &format!("pretrained_layer,{}", cols.join(",")),
            &a.cka_matrix,
        )
        .as_bytes(),
    )?;
    let per_layer = |name: &str, f: fn(&LayerChange) -> f64| Series {
        name: name.to_string(),
        points: a
            .layers
            .iter()
            .map(|l| (l.layer as f64, f(l), 0.0))
            .collect(),
    };
    plot_curves(
        &dir.join("layers"),
        "pretrained vs fine-tuned, per layer",
        "layer (0: embeddings)",
        &[
            per_layer("linear CKA", |l| l.cka),
            per_layer("RSA", |l| l.rsa),
            per_layer("cosine distance", |l| l.cosine_distance),
        ],
    )?;
    plot_heatmap(
        &dir.join("attention_js"),
        "attention JS divergence (bits)",
        ("head", "encoder layer (bottom: 1)"),
        &a.attention_js,
    )?;
    plot_heatmap(
        &dir.join("cka_matrix"),
        "linear CKA",
        ("fine-tuned layer", "pretrained layer"),
        &a.cka_matrix,
    )?;
    if !a.ablation.is_empty() {
        let mut t = format!("restored,{}\n", a.metric);
        for x in &a.ablation {
            t.push_str(&format!("{},{}\n", x.restored, x.metric));
        }
        atomic_write(&dir.join("ablation.csv"), t.as_bytes())?;
        plot_curves(
            &dir.join("ablation"),
            &format!("{} with the top layers pretrained again", a.metric),
            "top layers restored",
            &[Series {
                name: String::new(),
                points: a
                    .ablation
                    .iter()
                    .map(|x| (x.restored as f64, x.metric, 0.0))
                    .collect(),
            }],
        )?;
    }
    Ok(())
}
