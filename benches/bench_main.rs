//! facerec's criterion benchmarks: one entry, topic modules, names prefixed by device.
//! Run with `cargo xtask bench` (add a filter such as `cargo xtask bench arcface`).
//!
//! Each comparison runs our code and a reference formulation side by side in the same run, so the
//! ratio is measured under the same conditions. Numbers are recorded in docs/benchmarks.md.

use criterion::{criterion_group, criterion_main, Criterion};
use facerec_loss_heads::{cross_entropy, margin_cross_entropy, ArcFaceConfig, Gce, HeadConfig};
use tch::{Device, Kind, Tensor};

/// The reference formulation (arcface_torch style): `acos` and `cos` over the whole `[B, C]`
/// matrix, margin added through a one-hot mask, with the threshold fallback.
fn reference_arcface(cos: &Tensor, labels: &Tensor, s: f64, m: f64) -> Tensor {
    let c = cos.clamp(-1.0 + 1e-7, 1.0 - 1e-7);
    let onehot = c.zeros_like().scatter_value(1, &labels.unsqueeze(1), 1.0);
    let theta = c.acos();
    let phi = (&theta + &onehot * m).cos();
    let th = (std::f64::consts::PI - m).cos();
    let mm = (std::f64::consts::PI - m).sin() * m;
    let fallback = &c - &onehot * mm;
    let out = phi.where_self(&c.gt(th), &fallback);
    out * s
}

fn arcface(c: &mut Criterion) {
    let device = Device::cuda_if_available();
    let prefix = if device.is_cuda() { "cuda" } else { "cpu" };
    let head = HeadConfig::Arcface(ArcFaceConfig {
        s: 64.0,
        m: 0.5,
        ..Default::default()
    })
    .build();
    for (b, classes) in [(128i64, 10_000i64), (128, 100_000)] {
        tch::manual_seed(0);
        let cos =
            (Tensor::rand([b, classes], (Kind::Float, device)) * 2.0 - 1.0).set_requires_grad(true);
        let labels = Tensor::randint(classes, [b], (Kind::Int64, device));
        // Same numbers first: the comparison is only fair if both compute the same logits.
        let ours = head.logits(&cos, &labels);
        let reference = reference_arcface(&cos, &labels, 64.0, 0.5);
        let diff = f64::try_from((&ours - &reference).abs().max()).unwrap();
        assert!(
            diff < 1e-2,
            "the two formulations differ by {diff} (logit scale 64)"
        );
        let mut group = c.benchmark_group(format!("{prefix}/arcface_fwd_bwd/B{b}xC{classes}"));
        group.sample_size(20);
        let sync = || {
            if device.is_cuda() {
                tch::Cuda::synchronize(0);
            }
        };
        group.bench_function("facerec_fused", |bench| {
            bench.iter(|| {
                let loss = margin_cross_entropy(head.as_ref(), &cos, &labels);
                loss.backward();
                sync();
            })
        });
        group.bench_function("facerec_unfused", |bench| {
            bench.iter(|| {
                let loss = cross_entropy(&head.logits(&cos, &labels), &labels);
                loss.backward();
                sync();
            })
        });
        group.bench_function("reference_full_matrix", |bench| {
            bench.iter(|| {
                let loss = cross_entropy(&reference_arcface(&cos, &labels, 64.0, 0.5), &labels);
                loss.backward();
                sync();
            })
        });
        group.finish();
    }
}

/// Reference formulation of the combined margin (MXNet graph): acos, `m1·θ + m2` at the target
/// through a one-hot, cos and `− m3` over the whole matrix.
fn reference_combined(cos: &Tensor, labels: &Tensor, s: f64, m: (f64, f64, f64)) -> Tensor {
    let c = cos.clamp(-1.0 + 1e-7, 1.0 - 1e-7);
    let onehot = c.zeros_like().scatter_value(1, &labels.unsqueeze(1), 1.0);
    let theta = c.acos() * (&onehot * (m.0 - 1.0) + 1.0) + &onehot * m.1;
    (theta.cos() - onehot * m.2) * s
}

/// Reference formulation of ElasticFace-Arc (released header): margins `N(m, σ)` scattered into a
/// one-hot, acos and cos over the whole matrix.
fn reference_elastic_arc(cos: &Tensor, labels: &Tensor, s: f64, m: f64, sigma: f64) -> Tensor {
    let b = labels.size()[0];
    let margin = Tensor::randn([b, 1], (cos.kind(), cos.device())) * sigma + m;
    let m_hot = cos.zeros_like().scatter(1, &labels.unsqueeze(1), &margin);
    (cos.clamp(-1.0, 1.0).acos() + m_hot).cos() * s
}

/// Reference formulation of SphereFace (m = 4, PyTorch port): Chebyshev `cos 4θ`, θ, k and ψ over
/// the whole matrix, the target taken through a one-hot.
fn reference_sphereface(cos: &Tensor, labels: &Tensor, s: f64, lambda: f64) -> Tensor {
    let c = cos.clamp(-1.0, 1.0);
    let c2 = c.square();
    let cos4 = &c2 * &c2 * 8.0 - &c2 * 8.0 + 1.0;
    let k = (c.acos().detach() * (4.0 / std::f64::consts::PI)).floor();
    let sign = k.remainder(2.0) * -2.0 + 1.0;
    let psi = cos4 * sign - &k * 2.0;
    let onehot = c
        .zeros_like()
        .scatter_value(1, &labels.unsqueeze(1), 1.0)
        .to_kind(Kind::Bool);
    ((&c * lambda + psi) / (1.0 + lambda)).where_self(&onehot, &c) * s
}

/// Reference formulation of the current arcface_torch ArcFace (`detached` mode): in-place
/// `arccos_`/`cos_` of the whole clamp output under `no_grad`, margin by index assignment.
fn reference_arcface_detached(cos: &Tensor, labels: &Tensor, s: f64, m: f64) -> Tensor {
    let idx = labels.unsqueeze(1);
    let mut logits = cos.shallow_clone();
    tch::no_grad(|| {
        let target = logits.gather(1, &idx, false).acos() + m;
        let _ = logits.acos_();
        let _ = logits.scatter_(1, &idx, &target);
        let _ = logits.cos_();
    });
    logits * s
}

/// Every head, forward + backward from `[B, C]` scores through the fused `margin_cross_entropy`
/// (the trainer's path), at both bench-losses shapes; the heads whose reference computes
/// transcendental functions over the whole matrix are paired with that reference formulation (written in tch here; `cargo xtask bench-losses` compares with PyTorch).
fn margin_heads(c: &mut Criterion) {
    let device = Device::cuda_if_available();
    let prefix = if device.is_cuda() { "cuda" } else { "cpu" };
    let sync = || {
        if device.is_cuda() {
            tch::Cuda::synchronize(0);
        }
    };
    // ArcFace `exact` has its own group above.
    let heads: Vec<_> = facerec_benches::head_cases()
        .into_iter()
        .filter(|(name, ..)| *name != "arcface")
        .collect();
    type Reference = Box<dyn Fn(&Tensor, &Tensor) -> Tensor>;
    for (b, classes) in [(128i64, 10_000i64), (512, 100_000)] {
        tch::manual_seed(0);
        let raw =
            (Tensor::rand([b, classes], (Kind::Float, device)) * 2.0 - 1.0).set_requires_grad(true);
        let labels = Tensor::randint(classes, [b], (Kind::Int64, device));
        let mut group = c.benchmark_group(format!("{prefix}/heads_fwd_bwd/B{b}xC{classes}"));
        group.sample_size(10);
        for (name, cfg, step) in &heads {
            let mut head = cfg.build();
            head.set_step(*step);
            group.bench_function(format!("{name}/facerec"), |bench| {
                bench.iter(|| {
                    let cos = raw.clamp(-1.0, 1.0);
                    let loss = margin_cross_entropy(head.as_ref(), &cos, &labels);
                    let _ = Tensor::run_backward(&[&loss], &[&raw], false, false);
                    sync();
                })
            });
            let reference: Option<Reference> = match *name {
                "sphereface" => Some(Box::new(|c, y| reference_sphereface(c, y, 64.0, 5.0))),
                "arcface_detached" => {
                    Some(Box::new(|c, y| reference_arcface_detached(c, y, 64.0, 0.5)))
                }
                "combined" => Some(Box::new(|c, y| {
                    reference_combined(c, y, 64.0, (1.0, 0.3, 0.2))
                })),
                "elastic_arc" => Some(Box::new(|c, y| {
                    reference_elastic_arc(c, y, 64.0, 0.5, 0.05)
                })),
                _ => None,
            };
            if let Some(reference) = reference {
                group.bench_function(format!("{name}/reference_full_matrix"), |bench| {
                    bench.iter(|| {
                        let cos = raw.clamp(-1.0, 1.0);
                        let loss = cross_entropy(&reference(&cos, &labels), &labels);
                        let _ = Tensor::run_backward(&[&loss], &[&raw], false, false);
                        sync();
                    })
                });
            }
        }
        group.finish();
    }
}

/// GCE written the straightforward way (the `gce` reference of bench_losses_reference.py):
/// margins through acos/cos of the whole matrix and one-hot masks, row sums and out-sample sums in
/// the linear domain after a global max shift, a `[B, B]` mask product. ω = 1/(B − 1).
fn reference_gce(cos: &Tensor, labels: &Tensor, s: f64, m_t: f64, m_n: f64) -> Tensor {
    use std::f64::consts::PI;
    let b = labels.size()[0];
    let onehot = cos
        .zeros_like()
        .scatter_value(1, &labels.unsqueeze(1), 1.0)
        .to_kind(Kind::Bool);
    let theta = cos.clamp(-1.0 + 1e-7, 1.0 - 1e-7).acos();
    let (th, mm) = ((PI - m_t).cos(), (PI - m_t).sin() * m_t);
    let tgt = (&theta + m_t).cos().where_self(&cos.gt(th), &(cos - mm));
    let non = (&theta - m_n).clamp_min(0.0).cos();
    let t = (tgt * onehot.to_kind(cos.kind())).sum_dim_intlist(1, false, cos.kind());
    let z = (non * s).masked_fill(&onehot, f64::NEG_INFINITY);
    let zmax = z.max().detach();
    let r = (&z - &zmax).exp().sum_dim_intlist(1, false, cos.kind());
    let out = labels
        .view([b, 1])
        .ne_tensor(&labels.view([1, b]))
        .to_kind(cos.kind())
        * (1.0 / (b - 1) as f64);
    let neg = &r + out.matmul(&r);
    let l1 = (neg.log() + &zmax - &t * s).softplus();
    let st = &t * (-s);
    let tmax = st.max().detach();
    let p = (&st - &tmax).exp();
    let pos = &p + out.matmul(&p);
    let l2 = (r.log() + &zmax + pos.log() + &tmax).softplus();
    ((l1 + l2) * 0.5).mean(cos.kind())
}

/// GCE forward + backward from `[B, C]` scores at both bench-losses shapes: ours (angular and
/// additive margins), the straightforward reference, and ArcFace + CE (the margin softmax GCE
/// reduces to at ω = 0) for scale. No prototype replacement (no embeddings here).
fn gce(c: &mut Criterion) {
    let device = Device::cuda_if_available();
    let prefix = if device.is_cuda() { "cuda" } else { "cpu" };
    let sync = || {
        if device.is_cuda() {
            tch::Cuda::synchronize(0);
        }
    };
    let arcface = HeadConfig::Arcface(ArcFaceConfig::default()).build();
    for (b, classes) in [(128i64, 10_000i64), (512, 100_000)] {
        tch::manual_seed(0);
        let raw =
            (Tensor::rand([b, classes], (Kind::Float, device)) * 2.0 - 1.0).set_requires_grad(true);
        let labels = Tensor::randint(classes, [b], (Kind::Int64, device));
        let mut group = c.benchmark_group(format!("{prefix}/gce_fwd_bwd/B{b}xC{classes}"));
        group.sample_size(10);
        for (name, cfg) in facerec_benches::gce_cases() {
            let loss_fn = Gce::new(&cfg);
            if name == "gce" {
                // Same numbers first: the comparison is only fair if both compute the same loss.
                let cos = raw.clamp(-1.0, 1.0);
                let ours = loss_fn.loss(&cos, &labels).double_value(&[]);
                let theirs = reference_gce(&cos, &labels, 64.0, 0.5, 0.1).double_value(&[]);
                assert!(
                    (ours - theirs).abs() <= 1e-3 * theirs.abs(),
                    "GCE: ours {ours}, reference {theirs}"
                );
            }
            group.bench_function(format!("{name}/facerec"), |bench| {
                bench.iter(|| {
                    let cos = raw.clamp(-1.0, 1.0);
                    let loss = loss_fn.loss(&cos, &labels);
                    let _ = Tensor::run_backward(&[&loss], &[&raw], false, false);
                    sync();
                })
            });
        }
        group.bench_function("gce/reference_straightforward", |bench| {
            bench.iter(|| {
                let cos = raw.clamp(-1.0, 1.0);
                let loss = reference_gce(&cos, &labels, 64.0, 0.5, 0.1);
                let _ = Tensor::run_backward(&[&loss], &[&raw], false, false);
                sync();
            })
        });
        group.bench_function("arcface_ce/facerec", |bench| {
            bench.iter(|| {
                let cos = raw.clamp(-1.0, 1.0);
                let loss = cross_entropy(&arcface.logits(&cos, &labels), &labels);
                let _ = Tensor::run_backward(&[&loss], &[&raw], false, false);
                sync();
            })
        });
        group.finish();
    }
}

criterion_group!(benches, arcface, margin_heads, gce);
criterion_main!(benches);
