//! The fused AdamW step (`ops::adamw_step`) on the CPU: bit for bit the
//! composed candle update it replaced (so CPU training runs are unchanged),
//! through `train::optim::AdamW` with clipping scale, RecAdam, weight decay
//! and layer-wise rates; and clear errors on bad input.
mod common;

use candle_core::{DType, Device, Tensor, Var};
use tunefuse::bench::adamw_composed;
use tunefuse::ops::{adamw_state, adamw_step, AdamWStep};
use tunefuse::train::optim::{clip_scale, grad_norm, AdamW, AdamWParams, Param, RecAdam};

fn bits(t: &Tensor) -> Vec<u64> {
    match t.dtype() {
        DType::F32 => t
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits() as u64)
            .collect(),
        _ => t
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect(),
    }
}

fn randn(n: usize, seed: u64, scale: f64, dtype: DType, shape: &[usize]) -> Tensor {
    common::tensor(&common::randn(n, seed, scale), shape, dtype, &Device::Cpu)
}

#[test]
fn fused_step_equals_the_composed_update_bit_for_bit() {
    let shapes: [&[usize]; 4] = [&[1], &[7], &[3, 5], &[33, 17]];
    let mut cases = 0;
    for dtype in [DType::F32, DType::F64] {
        for (si, shape) in shapes.iter().enumerate() {
            let n: usize = shape.iter().product();
            for variant in 0..8u64 {
                let (scale, recadam, decay) =
                    (variant & 1 != 0, variant & 2 != 0, variant & 4 != 0);
                let seed = 100 * si as u64 + variant;
                let p = randn(n, seed, 1.0, dtype, shape);
                let anchor = randn(n, seed + 7, 1.0, dtype, shape);
                let fused_p = Var::from_tensor(&p).unwrap();
                let state = adamw_state(&p).unwrap();
                let (mut cp, mut cm, mut cv) =
                    (p.clone(), p.zeros_like().unwrap(), p.zeros_like().unwrap());
                for t in 1..=4i32 {
                    // Gradients over many magnitudes, some exactly zero.
                    let mut g = common::randn(n, seed * 31 + t as u64, 10f64.powi(t - 3));
                    g.iter_mut().step_by(5).for_each(|x| *x = 0.0);
                    let g = common::tensor(&g, shape, dtype, &Device::Cpu);
                    let k =
                        scale.then(|| Tensor::new(0.37f64 + 0.1 * t as f64, &Device::Cpu).unwrap());
                    let c = common::adamw_test_step(t, decay, recadam);
                    let a = recadam.then_some(&anchor);
                    adamw_step(fused_p.as_tensor(), &state, &g, k.as_ref(), a, &c).unwrap();
                    (cp, cm, cv) = adamw_composed(&cp, &cm, &cv, &g, k.as_ref(), a, &c).unwrap();
                    let what = format!("{dtype:?} {shape:?} variant {variant} step {t}");
                    assert_eq!(bits(fused_p.as_tensor()), bits(&cp), "parameter, {what}");
                    assert_eq!(bits(&state.get(0).unwrap()), bits(&cm), "m, {what}");
                    assert_eq!(bits(&state.get(1).unwrap()), bits(&cv), "v, {what}");
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 2 * 4 * 8 * 4);
}

#[test]
fn a_view_is_updated_in_place_and_nothing_else() {
    // A parameter that is a contiguous view at an offset of a larger tensor:
    // only its elements change.
    let big = Var::from_tensor(&randn(20, 5, 1.0, DType::F32, &[20])).unwrap();
    let before = big.as_tensor().to_vec1::<f32>().unwrap();
    let view = big.as_tensor().narrow(0, 3, 9).unwrap();
    let state = adamw_state(&view).unwrap();
    let g = randn(9, 6, 1.0, DType::F32, &[9]);
    let c = AdamWStep {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        c1: 0.1,
        c2: 0.001,
        lr: 0.1,
        decay: None,
        recadam: None,
    };
    let (want, _, _) = adamw_composed(
        &view.copy().unwrap(),
        &Tensor::zeros(9, DType::F32, &Device::Cpu).unwrap(),
        &Tensor::zeros(9, DType::F32, &Device::Cpu).unwrap(),
        &g,
        None,
        None,
        &c,
    )
    .unwrap();
    adamw_step(&view, &state, &g, None, None, &c).unwrap();
    let after = big.as_tensor().to_vec1::<f32>().unwrap();
    assert_eq!(&after[..3], &before[..3]);
    assert_eq!(&after[12..], &before[12..]);
    assert_eq!(after[3..12].to_vec(), want.to_vec1::<f32>().unwrap());
}

/// Three parameters with different groups, trained for a few steps through
/// `AdamW` with the clipping scale: equal to the composed update driven the
/// same way.
#[test]
fn optimiser_with_clipping_equals_the_composed_update() {
    let shapes: [&[usize]; 3] = [&[4, 6], &[6], &[3]];
    let vars: Vec<Var> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Var::from_tensor(&randn(s.iter().product(), i as u64, 1.0, DType::F32, s)).unwrap()
        })
        .collect();
    let anchors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().copy().unwrap()).collect();
    let params = vars
        .iter()
        .enumerate()
        .map(|(i, v)| Param {
            name: format!("p{i}"),
            var: v.clone(),
            lr_scale: [1.0, 0.5, 2.0][i],
            decay: i != 1,
            // The third is "new" (no pretrained value): plain AdamW under RecAdam.
            anchor: (i < 2).then(|| anchors[i].clone()),
        })
        .collect();
    let hp = AdamWParams {
        lr: 1e-2,
        ..Default::default()
    };
    let rec = RecAdam {
        k: 0.5,
        t0: 3.0,
        gamma: 100.0,
    };
    let mut opt = AdamW::new(params, hp, Some(rec)).unwrap();
    let mut oracle: Vec<(Tensor, Tensor, Tensor)> = vars
        .iter()
        .map(|v| {
            let t = v.as_tensor().copy().unwrap();
            (t.clone(), t.zeros_like().unwrap(), t.zeros_like().unwrap())
        })
        .collect();
    let x = randn(5 * 4, 99, 1.0, DType::F32, &[5, 4]);
    for t in 1..=6u64 {
        // loss = Σ (x·W + b)·scale + c·Σb, large enough that clipping acts.
        let w = vars[0].as_tensor();
        let y = x
            .matmul(w)
            .unwrap()
            .broadcast_add(vars[1].as_tensor())
            .unwrap();
        let loss = ((y.sum_all().unwrap() * (20.0 * t as f64)).unwrap()
            + vars[2].as_tensor().sqr().unwrap().sum_all().unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        let norm = grad_norm(&grads, &opt.params).unwrap();
        let k = clip_scale(&norm, 1.0).unwrap().unwrap();
        assert!(k.to_scalar::<f64>().unwrap() < 1.0, "clipping should act");
        let lr = 1e-2;
        opt.step(&grads, lr, Some(&k)).unwrap();
        for (i, v) in vars.iter().enumerate() {
            let (th, m, vv) = &oracle[i];
            let g = grads.get(v.as_tensor()).unwrap();
            let lr_i = lr * [1.0, 0.5, 2.0][i];
            let lam = rec.lambda(t);
            let c = AdamWStep {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                c1: 1.0 - 0.9f64.powi(t as i32),
                c2: 1.0 - 0.999f64.powi(t as i32),
                lr: lr_i,
                decay: (i != 1).then_some(lr_i * 0.01),
                recadam: (i < 2).then_some((lam, (1.0 - lam) * rec.gamma)),
            };
            oracle[i] =
                adamw_composed(th, m, vv, g, Some(&k), (i < 2).then(|| &anchors[i]), &c).unwrap();
            assert_eq!(bits(v.as_tensor()), bits(&oracle[i].0), "p{i} step {t}");
        }
    }
    // The checkpoint view of the state: m and v in the parameters' shapes.
    let st = opt.state().unwrap();
    assert_eq!(st["m.p0"].dims(), &[4, 6]);
    assert_eq!(bits(&st["v.p2"]), bits(&oracle[2].2));
    // And restoring it gives the same next step.
    let mut again = AdamW::new(
        vars.iter()
            .enumerate()
            .map(|(i, v)| Param {
                name: format!("p{i}"),
                var: Var::from_tensor(v.as_tensor()).unwrap(),
                lr_scale: 1.0,
                decay: true,
                anchor: None,
            })
            .collect(),
        hp,
        None,
    )
    .unwrap();
    again.load_state(&st, 6).unwrap();
    let st2 = again.state().unwrap();
    for (key, t) in &st {
        assert_eq!(bits(t), bits(&st2[key]), "{key}");
    }
}

#[test]
fn bad_input_is_refused_with_a_clear_error() {
    let dev = Device::Cpu;
    let p = Tensor::zeros(6, DType::F32, &dev).unwrap();
    let st = adamw_state(&p).unwrap();
    let g = Tensor::ones(6, DType::F32, &dev).unwrap();
    let c = AdamWStep {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        c1: 0.1,
        c2: 0.001,
        lr: 0.1,
        decay: None,
        recadam: None,
    };
    let err = |r: tunefuse::Result<()>| r.unwrap_err().to_string();
    let e = err(adamw_step(
        &p,
        &st,
        &Tensor::ones(5, DType::F32, &dev).unwrap(),
        None,
        None,
        &c,
    ));
    assert!(e.contains("gradient has shape [5]"), "{e}");
    let e = err(adamw_step(
        &p,
        &Tensor::zeros((2, 5), DType::F32, &dev).unwrap(),
        &g,
        None,
        None,
        &c,
    ));
    assert!(e.contains("state must be"), "{e}");
    let ph = p.to_dtype(DType::BF16).unwrap();
    let e = err(adamw_step(
        &ph,
        &adamw_state(&ph).unwrap(),
        &g,
        None,
        None,
        &c,
    ));
    assert!(e.contains("BF16") && e.contains("f32 or f64"), "{e}");
    let e = err(adamw_step(
        &p,
        &st,
        &g,
        Some(&Tensor::ones(2, DType::F32, &dev).unwrap()),
        None,
        &c,
    ));
    assert!(e.contains("scale must have one element"), "{e}");
    let e = err(adamw_step(&p, &st, &g, None, Some(&p), &c));
    assert!(e.contains("anchor"), "{e}");
    let bad = AdamWStep { beta1: 1.0, ..c };
    let e = err(adamw_step(&p, &st, &g, None, None, &bad));
    assert!(e.contains("out of range"), "{e}");
    let bad = AdamWStep { lr: f64::NAN, ..c };
    assert!(adamw_step(&p, &st, &g, None, None, &bad).is_err());
    // The parameter may not be its own anchor (in-place aliasing).
    let rec = AdamWStep {
        recadam: Some((0.5, 1.0)),
        ..c
    };
    let e = err(adamw_step(&p, &st, &g, None, Some(&p), &rec));
    assert!(e.contains("parameter shares memory"), "{e}");
    let e = err(adamw_step(&p, &st, &st.get(0).unwrap(), None, None, &c));
    assert!(e.contains("state shares memory"), "{e}");
    // Nothing above touched the parameter or its state.
    assert_eq!(p.to_vec1::<f32>().unwrap(), vec![0.0; 6]);
    assert_eq!(
        st.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![0.0; 12]
    );
}
