//! CurricularFace and AdaFace: f64 central-difference gradient checks through embedding ->
//! CosineClassifier -> head -> cross-entropy (at several `t` / norm statistics), the special cases
//! they reduce to (ArcFace, CosFace, closed forms), the once-per-step statistics under gradient
//! accumulation, and the state round trip.

use facerec_loss_heads::{
    cross_entropy, AdaFace, AdaFaceConfig, ArcFace, ArcFaceConfig, CosFace, CosFaceConfig,
    CosineClassifier, CurricularFace, CurricularFaceConfig, MarginHead,
};
use facerec_testkit::gradcheck::{check_gradients, GradCheck};
use facerec_testkit::randn;
use std::collections::HashMap;
use tch::{nn, Device, Kind, Tensor};

const B: i64 = 5;
const C: i64 = 7;
const D: i64 = 8;

fn vals(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.detach().to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

/// Embeddings `[B, D]` and a cosine classifier whose rows 0..B lean towards the embeddings (so
/// some targets are well aligned), in f64.
fn fixture(seed: u64) -> (nn::VarStore, CosineClassifier, Tensor, Tensor) {
    let mut vs = nn::VarStore::new(Device::Cpu);
    vs.set_kind(Kind::Double);
    let classifier = CosineClassifier::new(&vs.root(), C, D);
    let emb = randn(seed, &[B, D]);
    let lean = Tensor::cat(
        &[
            &emb * 1.2,
            Tensor::zeros([C - B, D], (Kind::Double, Device::Cpu)),
        ],
        0,
    );
    let mut w = classifier.weight().shallow_clone();
    tch::no_grad(|| w.copy_(&(lean + randn(seed + 100, &[C, D]))));
    let labels = Tensor::from_slice(&[0i64, 1, 2, 3, 4]);
    (vs, classifier, emb.set_requires_grad(true), labels)
}

fn curricular(t: f64) -> CurricularFace {
    let mut h = CurricularFace::new(&CurricularFaceConfig {
        s: 8.0,
        ..Default::default()
    });
    h.set_t(t);
    h
}

/// The smallest distance of a non-target cosine to its row's target `φ` (the hard-negative switch).
fn gap_to_switch(cos: &Tensor, labels: &Tensor, m: f64) -> f64 {
    let c = vals(cos);
    let l = vals(&labels.to_kind(Kind::Double));
    let mut gap = f64::MAX;
    for i in 0..B as usize {
        let y = l[i] as usize;
        let cy = c[i * C as usize + y];
        let phi = (cy.acos() + m).cos();
        for j in 0..C as usize {
            if j != y {
                gap = gap.min((c[i * C as usize + j] - phi).abs());
            }
        }
    }
    gap
}

#[test]
fn curricularface_full_path_gradients() {
    let mut hard_seen = false;
    for seed in [1u64, 3, 5] {
        let (_vs, cl, emb, labels) = fixture(seed);
        let cos = cl.cosines(&emb);
        assert!(
            gap_to_switch(&cos, &labels, 0.5) > 1e-3,
            "seed {seed}: a cosine sits on the switch"
        );
        let probe = curricular(0.0).logits(&cos, &labels);
        hard_seen |= probe
            .ne_tensor(&(&cos * 8.0))
            .sum(Kind::Int64)
            .int64_value(&[])
            > B;
        for t in [0.0, 0.3, 0.8] {
            let head = curricular(t);
            let inputs = [("emb", &emb), ("weight", cl.weight())];
            check_gradients(
                || cross_entropy(&head.logits(&cl.cosines(&emb), &labels), &labels),
                &inputs,
                &GradCheck::default(),
            )
            .unwrap_or_else(|e| panic!("seed {seed} t {t}: {e:#}"));
        }
    }
    assert!(hard_seen, "the fixtures must contain hard negatives");
}

#[test]
fn adaface_full_path_gradients_with_fixed_norms() {
    let (_vs, cl, emb, labels) = fixture(4);
    // Norms spanning ẑ = −1 (clipped), inside, and +1 (clipped) at μ = 10, σ = 2, h = 0.333.
    let norms = Tensor::from_slice(&[0.5, 8.0, 10.0, 14.0, 40.0]);
    let mut head = AdaFace::new(&AdaFaceConfig {
        s: 8.0,
        ..Default::default()
    });
    head.set_statistics(10.0, 2.0);
    let zhat = vals(&head.normalised_norms(&norms));
    assert_eq!(zhat[0], -1.0);
    assert_eq!(zhat[4], 1.0);
    assert!(
        zhat[1] > -1.0 && zhat[1] < 0.0 && zhat[3] > 0.0 && zhat[3] < 1.0,
        "{zhat:?}"
    );
    let inputs = [("emb", &emb), ("weight", cl.weight())];
    check_gradients(
        || {
            cross_entropy(
                &head.logits_with_norms(&cl.cosines(&emb), &labels, &norms),
                &labels,
            )
        },
        &inputs,
        &GradCheck::default(),
    )
    .unwrap();
    // The norms are detached: norms that require a gradient get none.
    let n = norms.set_requires_grad(true);
    let loss = cross_entropy(
        &head.logits_with_norms(&cl.cosines(&emb), &labels, &n),
        &labels,
    );
    let g = Tensor::run_backward(&[loss], &[&n], false, true);
    assert!(!g[0].defined() || g[0].abs().max().double_value(&[]) == 0.0);
}

/// Cosines `[2, 4]`, labels `[1, 2]`.
fn small_cos() -> (Tensor, Tensor) {
    let cos = Tensor::from_slice(&[0.2, 0.7, -0.1, 0.4, -0.6, 0.0, 0.9, 0.75]).view([2, 4]);
    (cos, Tensor::from_slice(&[1i64, 2]))
}

#[test]
fn curricularface_without_hard_negatives_at_t0_is_arcface() {
    // Row targets 0.7 and 0.9: φ = cos(acos(.) + 0.5) ≈ 0.284 and 0.569; make every negative easy.
    let cos = Tensor::from_slice(&[0.2, 0.7, -0.1, 0.25, -0.6, 0.0, 0.9, 0.5]).view([2, 4]);
    let labels = Tensor::from_slice(&[1i64, 2]);
    let arc = ArcFace::new(&ArcFaceConfig {
        s: 8.0,
        ..Default::default()
    })
    .logits(&cos, &labels);
    for t in [0.0, 0.4] {
        // Without hard negatives t does not matter.
        let z = curricular(t).logits(&cos, &labels);
        assert!(
            z.allclose(&arc, 1e-14, 1e-14, false),
            "t {t}: {z:?} vs {arc:?}"
        );
    }
}

#[test]
fn curricularface_hard_negatives_are_modulated_by_t() {
    let (cos, labels) = small_cos();
    let c = vals(&cos);
    let phi = [(0.7f64.acos() + 0.5).cos(), (0.9f64.acos() + 0.5).cos()];
    for t in [0.0, 0.35, 1.0] {
        let z = vals(&curricular(t).logits(&cos, &labels));
        for i in 0..2 {
            for j in 0..4 {
                let k = i * 4 + j;
                let want = if j == [1, 2][i] {
                    phi[i]
                } else if c[k] > phi[i] {
                    c[k] * (t + c[k])
                } else {
                    c[k]
                };
                assert!(
                    (z[k] - 8.0 * want).abs() < 1e-12,
                    "t {t} ({i},{j}): {} vs {}",
                    z[k],
                    8.0 * want
                );
            }
        }
    }
    // The example has hard negatives in both rows (0.4 > 0.284, 0.75 > 0.569).
    assert!(c[3] > phi[0] && c[7] > phi[1]);
}

#[test]
fn adaface_reduces_to_cosface_arcface_and_the_high_quality_form() {
    let (cos, labels) = small_cos();
    let m = 0.4;
    let mut head = AdaFace::new(&AdaFaceConfig {
        s: 8.0,
        m,
        ..Default::default()
    });
    head.set_statistics(10.0, 2.0);
    let cosface = CosFace::new(&CosFaceConfig { s: 8.0, m }).logits(&cos, &labels);
    let arcface = ArcFace::new(&ArcFaceConfig {
        s: 8.0,
        m,
        ..Default::default()
    })
    .logits(&cos, &labels);
    // ẑ = 0: CosFace m (norms at the mean; and without norms).
    let at_mean = head.logits_with_norms(&cos, &labels, &Tensor::from_slice(&[10.0, 10.0]));
    assert!(
        at_mean.allclose(&cosface, 1e-14, 1e-14, false),
        "{at_mean:?} vs {cosface:?}"
    );
    assert!(head
        .logits(&cos, &labels)
        .allclose(&cosface, 1e-14, 1e-14, false));
    // ẑ = −1: ArcFace m.
    let low = head.logits_with_norms(&cos, &labels, &Tensor::from_slice(&[0.01, 1.0]));
    assert!(
        low.allclose(&arcface, 1e-13, 1e-13, false),
        "{low:?} vs {arcface:?}"
    );
    // ẑ = +1: cos(θ − m) − 2m.
    let high = vals(&head.logits_with_norms(&cos, &labels, &Tensor::from_slice(&[50.0, 99.0])));
    for (k, cy) in [(1usize, 0.7f64), (6, 0.9)] {
        let want = 8.0 * ((cy.acos() - m).cos() - 2.0 * m);
        assert!((high[k] - want).abs() < 1e-12, "{} vs {want}", high[k]);
    }
    // Non-targets are s·cos in every case.
    let c = vals(&cos);
    for k in [0usize, 2, 3, 4, 5, 7] {
        assert_eq!(high[k], 8.0 * c[k]);
    }
}

#[test]
fn curricularface_t_moves_once_per_step_from_every_micro_batch() {
    let (cos, labels) = small_cos();
    let dummy = Tensor::zeros([2, 1], (Kind::Double, Device::Cpu));
    let norms = Tensor::ones([2], (Kind::Double, Device::Cpu));
    let mut full = curricular(0.2);
    let _ = full.training_loss(&cos, &labels, &dummy, &norms);
    assert_eq!(full.t(), 0.2, "t must not move before end_step");
    full.end_step();
    let want = 0.01 * (0.7 + 0.9) / 2.0 + 0.99 * 0.2;
    assert!((full.t() - want).abs() < 1e-15, "{} vs {want}", full.t());
    // Two micro-batches of one row each = one step over both rows.
    let mut acc = curricular(0.2);
    for i in 0..2 {
        let _ = acc.training_loss(
            &cos.narrow(0, i, 1),
            &labels.narrow(0, i, 1),
            &dummy,
            &norms,
        );
    }
    acc.end_step();
    assert!((acc.t() - want).abs() < 1e-15);
    // A step without a loss leaves t alone.
    acc.end_step();
    assert!((acc.t() - want).abs() < 1e-15);
}

#[test]
fn adaface_statistics_move_once_per_step_from_every_micro_batch() {
    let (cos, labels) = small_cos();
    let dummy = Tensor::zeros([2, 1], (Kind::Double, Device::Cpu));
    let norms = Tensor::from_slice(&[12.0, 30.0]);
    let (mean, std) = (21.0, (2.0f64 * 81.0).sqrt()); // unbiased std of {12, 30}
    let want = (0.01 * mean + 0.99 * 20.0, 0.01 * std + 0.99 * 100.0);
    let mut full = AdaFace::new(&AdaFaceConfig::default());
    let _ = full.training_loss(&cos, &labels, &dummy, &norms);
    assert_eq!(full.statistics(), (20.0, 100.0));
    full.end_step();
    let mut acc = AdaFace::new(&AdaFaceConfig::default());
    for i in 0..2 {
        let _ = acc.training_loss(
            &cos.narrow(0, i, 1),
            &labels.narrow(0, i, 1),
            &dummy,
            &norms.narrow(0, i, 1),
        );
    }
    acc.end_step();
    for got in [full.statistics(), acc.statistics()] {
        assert!(
            (got.0 - want.0).abs() < 1e-12 && (got.1 - want.1).abs() < 1e-12,
            "{got:?} vs {want:?}"
        );
    }
}

#[test]
fn head_state_round_trips_and_rejects_bad_entries() {
    let mut a = curricular(0.123);
    let mut b = curricular(0.0);
    b.load_state(a.state().into_iter().collect()).unwrap();
    assert_eq!(b.t(), 0.123);
    let err = format!("{:#}", b.load_state(HashMap::new()).unwrap_err());
    assert!(err.contains("`t`"), "{err}");
    let mut extra: HashMap<String, Tensor> = a.state().into_iter().collect();
    extra.insert("bogus".into(), Tensor::from(1.0));
    let err = format!("{:#}", a.load_state(extra).unwrap_err());
    assert!(err.contains("`bogus`"), "{err}");

    let mut x = AdaFace::new(&AdaFaceConfig::default());
    x.set_statistics(17.5, 3.25);
    let mut y = AdaFace::new(&AdaFaceConfig::default());
    y.load_state(x.state().into_iter().collect()).unwrap();
    assert_eq!(y.statistics(), (17.5, 3.25));
    let mut partial: HashMap<String, Tensor> = x.state().into_iter().collect();
    partial.remove("norm_std");
    let err = format!("{:#}", y.load_state(partial).unwrap_err());
    assert!(err.contains("norm_std"), "{err}");
}
