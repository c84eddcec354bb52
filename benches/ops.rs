//! Criterion: each fused op against the same math composed from candle ops
//! (sym_kl, mixout, perturbation, adapter),
//! on the CPU always and on CUDA device 0 when built with `cuda` and a GPU is
//! present. Throughput is the minimum bytes the op must move.
use candle_core::{DType, Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tunefuse::bench::{ascent_step_composed, mixout_composed, sym_kl_composed};
use tunefuse::ops::mixout::{dropout, mixout, Rng};
use tunefuse::ops::perturb::{
    ascent_step, noise_init, AscentStep, Granularity, Noise, Norm, StepMode,
};
use tunefuse::ops::sym_kl::{sym_kl, SymKlOptions};

fn devices() -> Vec<(&'static str, Device)> {
    let mut d = vec![("cpu", Device::Cpu)];
    match tunefuse::cuda_device(0) {
        Ok(c) => d.push(("cuda", c)),
        Err(e) => eprintln!("benches: CUDA skipped ({e})"),
    }
    d
}

fn sync(dev: &Device) {
    dev.synchronize().unwrap();
}

fn bench_sym_kl(c: &mut Criterion) {
    for (name, dev) in devices() {
        let (rows, v) = if dev.is_cuda() {
            (16384, 30522)
        } else {
            (32, 30522)
        };
        let mut g = c.benchmark_group(format!("sym_kl fwd+bwd/{name}"));
        for dtype in [DType::F32, DType::BF16] {
            let a = Var::from_tensor(
                &Tensor::randn(0f32, 3.0, (rows, v), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let b = Var::from_tensor(
                &Tensor::randn(0f32, 3.0, (rows, v), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            g.throughput(Throughput::Bytes(
                (4 * rows * v * dtype.size_in_bytes()) as u64,
            ));
            let id = format!("{rows}x{v}/{dtype:?}");
            g.bench_function(BenchmarkId::new("fused", &id), |bch| {
                bch.iter(|| {
                    sym_kl(a.as_tensor(), b.as_tensor(), &SymKlOptions::default())
                        .unwrap()
                        .backward()
                        .unwrap();
                    sync(&dev);
                })
            });
            g.bench_function(BenchmarkId::new("candle composed", &id), |bch| {
                bch.iter(|| {
                    sym_kl_composed(a.as_tensor(), b.as_tensor())
                        .unwrap()
                        .backward()
                        .unwrap();
                    sync(&dev);
                })
            });
        }
        g.finish();
    }
}

fn bench_mixout(c: &mut Criterion) {
    for (name, dev) in devices() {
        let n = if dev.is_cuda() {
            110_000_000
        } else {
            1_000_000
        };
        let mut g = c.benchmark_group(format!("mixout fwd+bwd/{name}"));
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.02, n, &dev).unwrap()).unwrap();
        let u = Tensor::randn(0f32, 0.02, n, &dev).unwrap();
        let up = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
        g.throughput(Throughput::Bytes((5 * n * 4) as u64));
        let rng = Rng { seed: 1, offset: 0 };
        // Backward from a given upstream gradient: ⟨y, up⟩ has ∂/∂y = up.
        g.bench_function(BenchmarkId::new("fused", n), |bch| {
            bch.iter(|| {
                let y = mixout(w.as_tensor(), &u, 0.1, rng, true).unwrap();
                (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
                sync(&dev);
            })
        });
        g.bench_function(BenchmarkId::new("candle composed", n), |bch| {
            bch.iter(|| {
                let y = mixout_composed(w.as_tensor(), &u, 0.1).unwrap();
                (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
                sync(&dev);
            })
        });
        g.finish();

        let mut g = c.benchmark_group(format!("dropout fwd/{name}"));
        let x = Tensor::randn(0f32, 1.0, (32, 128, 768), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        g.throughput(Throughput::Bytes((2 * x.elem_count() * 2) as u64));
        g.bench_function(BenchmarkId::new("fused", "32x128x768/bf16"), |bch| {
            bch.iter(|| {
                dropout(&x, 0.1, rng, true).unwrap();
                sync(&dev);
            })
        });
        g.bench_function(
            BenchmarkId::new("candle composed", "32x128x768/bf16"),
            |bch| {
                bch.iter(|| {
                    candle_nn::ops::dropout(&x, 0.1).unwrap();
                    sync(&dev);
                })
            },
        );
        g.finish();
    }
}

fn bench_perturb(c: &mut Criterion) {
    for (name, dev) in devices() {
        let (b, l, h) = if dev.is_cuda() {
            (32, 512, 768)
        } else {
            (4, 128, 768)
        };
        let id = format!("{b}x{l}x{h}");
        let mask = Tensor::ones((b, l), DType::F32, &dev).unwrap();
        let mut g = c.benchmark_group(format!("ascent step pgd l2 token/{name}"));
        for dtype in [DType::F32, DType::BF16] {
            let delta = Tensor::randn(0f32, 0.01, (b, l, h), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let grad = Tensor::randn(0f32, 1.0, (b, l, h), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            g.throughput(Throughput::Bytes(
                (3 * b * l * h * dtype.size_in_bytes()) as u64,
            ));
            let s = AscentStep {
                eta: 1e-3,
                norm: Norm::L2,
                granularity: Granularity::Token,
                mode: StepMode::Pgd { eps: Some(1e-2) },
            };
            g.bench_function(
                BenchmarkId::new("fused", format!("{id}/{dtype:?}")),
                |bch| {
                    bch.iter(|| {
                        ascent_step(&delta, &grad, &mask, &s).unwrap();
                        sync(&dev);
                    })
                },
            );
            let maskd = mask.to_dtype(dtype).unwrap();
            g.bench_function(
                BenchmarkId::new("candle composed", format!("{id}/{dtype:?}")),
                |bch| {
                    bch.iter(|| {
                        ascent_step_composed(&delta, &grad, &maskd, 1e-3, 1e-2).unwrap();
                        sync(&dev);
                    })
                },
            );
        }
        g.finish();
        let mut g = c.benchmark_group(format!("noise init normal/{name}"));
        g.throughput(Throughput::Bytes((b * l * h * 4) as u64));
        g.bench_function(BenchmarkId::new("fused", &id), |bch| {
            bch.iter(|| {
                noise_init(
                    &[b, l, h],
                    &mask,
                    Noise::Normal { sigma: 1e-5 },
                    DType::F32,
                    Rng { seed: 1, offset: 0 },
                )
                .unwrap();
                sync(&dev);
            })
        });
        g.bench_function(BenchmarkId::new("candle composed", &id), |bch| {
            bch.iter(|| {
                (Tensor::randn(0f32, 1e-5, (b, l, h), &dev)
                    .unwrap()
                    .broadcast_mul(&mask.unsqueeze(2).unwrap()))
                .unwrap();
                sync(&dev);
            })
        });
        g.finish();
    }
}

fn bench_adapter(c: &mut Criterion) {
    // The cases of `tunefuse bench` (fused and candle-composed), so the two
    // harnesses time the same thing.
    for (name, dev) in devices() {
        let mut g = c.benchmark_group(format!("adapter fwd+bwd/{name}"));
        for mut case in tunefuse::bench::adapter_cases(&dev).unwrap() {
            g.throughput(Throughput::Bytes(case.bytes as u64));
            let id = format!("{}/{:?}", case.shape, case.dtype);
            g.bench_function(BenchmarkId::new(case.op, &id), |bch| {
                bch.iter(|| {
                    (case.run)().unwrap();
                    sync(&dev);
                })
            });
        }
        g.finish();
    }
}

criterion_group! {
    name = ops;
    config = Criterion::default().sample_size(10);
    targets = bench_sym_kl, bench_mixout, bench_perturb, bench_adapter
}
criterion_main!(ops);
