//! Values that follow from the math: reductions to NormFace, the ArcFace target logit on both
//! sides of θ + m = π for each gradient mode, untouched non-target logits, easy margin,
//! a hand-computed cross-entropy, and the cosine classifier.

use facerec_loss_heads::{
    cross_entropy, ArcFaceConfig, ArcFaceGradient, CosFaceConfig, CosineClassifier, HeadConfig,
    NormFaceConfig,
};
use facerec_testkit::gradcheck::{analytic_gradients, compare};
use std::f64::consts::PI;
use tch::{nn, Device, Kind, Tensor};

const S: f64 = 64.0;
const M: f64 = 0.5;
const MODES: [ArcFaceGradient; 3] = [
    ArcFaceGradient::Exact,
    ArcFaceGradient::EasyMargin,
    ArcFaceGradient::Detached,
];

/// Target cosines covering: near 1, moderate, exactly 0, negative with θ + m < π, and past the
/// threshold (acos(−0.95) + 0.5 ≈ 3.32 > π).
const TARGETS: [f64; 5] = [0.97, 0.3, 0.0, -0.2, -0.95];
const LABELS: [i64; 5] = [0, 2, 1, 3, 0];
const C: i64 = 4;

/// `[5, 4]` f64 cosines with `TARGETS` at `LABELS` and distinct non-target values in (−1, 1).
fn cos_and_labels() -> (Tensor, Tensor) {
    let mut v: Vec<f64> = (0..5 * C)
        .map(|k| ((k * 37 % 19) as f64 / 9.5 - 1.0) * 0.9)
        .collect();
    for (i, (&t, &y)) in TARGETS.iter().zip(&LABELS).enumerate() {
        v[i * C as usize + y as usize] = t;
    }
    (
        Tensor::from_slice(&v).view([5, C]),
        Tensor::from_slice(&LABELS),
    )
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.detach().to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

fn arcface(m: f64, gradient: ArcFaceGradient) -> HeadConfig {
    HeadConfig::Arcface(ArcFaceConfig { s: S, m, gradient })
}

/// Logits and the gradient of `cross_entropy` w.r.t. the cosines, for comparing heads.
fn logits_and_grad(cfg: &HeadConfig) -> (Tensor, Tensor) {
    let (cos, labels) = cos_and_labels();
    let cos = cos.set_requires_grad(true);
    let logits = cfg.build().logits(&cos, &labels);
    let grad = analytic_gradients(&cross_entropy(&logits, &labels), &[&cos]).remove(0);
    (logits.detach(), grad)
}

/// Expected ArcFace target value `φ(c)/1` (before ×s) for each gradient mode, from θ = acos(c).
fn arcface_target(c: f64, m: f64, mode: ArcFaceGradient) -> f64 {
    let theta = c.acos();
    match mode {
        ArcFaceGradient::Exact if theta + m >= PI => c - m * m.sin(),
        ArcFaceGradient::EasyMargin if c <= 0.0 => c,
        _ => (theta + m).cos(),
    }
}

#[test]
fn margin_zero_reduces_to_normface() {
    let (normface, normface_grad) = logits_and_grad(&HeadConfig::Normface(NormFaceConfig { s: S }));
    let mut heads: Vec<HeadConfig> = MODES.iter().map(|&g| arcface(0.0, g)).collect();
    heads.push(HeadConfig::Cosface(CosFaceConfig { s: S, m: 0.0 }));
    for cfg in heads {
        let (logits, grad) = logits_and_grad(&cfg);
        compare(&format!("{cfg:?} logits"), &logits, &normface, 1e-12, 0.0).unwrap();
        compare(
            &format!("{cfg:?} grad"),
            &grad,
            &normface_grad,
            1e-12,
            1e-10,
        )
        .unwrap();
    }
}

#[test]
fn arcface_target_logit_and_untouched_non_targets() {
    let (cos, _) = cos_and_labels();
    let cos_v = to_vec(&cos);
    for mode in MODES {
        let (logits, _) = logits_and_grad(&arcface(M, mode));
        let z = to_vec(&logits);
        for (k, (&zk, &ck)) in z.iter().zip(&cos_v).enumerate() {
            let (i, j) = (k / C as usize, (k % C as usize) as i64);
            let expected = if j == LABELS[i] {
                S * arcface_target(ck, M, mode)
            } else {
                S * ck
            };
            assert!(
                (zk - expected).abs() < 1e-9,
                "{mode:?} [{i},{j}] cos {ck}: {zk} vs {expected}"
            );
        }
    }
}

#[test]
fn arcface_modes_differ_exactly_where_the_math_says() {
    // Past π − m: exact uses the fallback s·(c − m·sin m), detached wraps to s·cos(θ + m).
    let row = 4;
    let c = TARGETS[row];
    assert!(c.acos() + M > PI);
    let at = |mode| to_vec(&logits_and_grad(&arcface(M, mode)).0)[row * C as usize];
    assert!((at(ArcFaceGradient::Exact) - S * (c - M * M.sin())).abs() < 1e-9);
    assert!((at(ArcFaceGradient::Detached) - S * (c.acos() + M).cos()).abs() < 1e-9);
    // The fallback is below cos(θ+m) = −1 at the threshold: the documented discontinuity.
    assert!((PI - M).cos() - M * M.sin() < -1.0);
}

#[test]
fn easy_margin_leaves_non_positive_cosines_unchanged() {
    let (logits, grad) = logits_and_grad(&arcface(M, ArcFaceGradient::EasyMargin));
    let (normface, _) = logits_and_grad(&HeadConfig::Normface(NormFaceConfig { s: S }));
    for (i, &c) in TARGETS.iter().enumerate() {
        let (z, z0) = (logits.get(i as i64), normface.get(i as i64));
        let y = LABELS[i];
        if c <= 0.0 {
            assert!(z.equal(&z0), "row {i} (cos {c}) changed");
        } else {
            assert!(
                z.double_value(&[y]) < z0.double_value(&[y]),
                "row {i}: margin missing"
            );
        }
    }
    // Gradient w.r.t. a non-positive target cosine is NormFace's at the same logits: s(p − 1)/B.
    let p = logits.softmax(-1, Kind::Double);
    for (i, &c) in TARGETS.iter().enumerate().filter(|(_, &c)| c <= 0.0) {
        let expected = S * (p.double_value(&[i as i64, LABELS[i]]) - 1.0) / TARGETS.len() as f64;
        let got = grad.double_value(&[i as i64, LABELS[i]]);
        assert!(
            (got - expected).abs() < 1e-12,
            "row {i} (cos {c}): {got} vs {expected}"
        );
    }
}

#[test]
fn cosface_subtracts_margin_from_target_only() {
    let (cos, _) = cos_and_labels();
    let (logits, _) = logits_and_grad(&HeadConfig::Cosface(CosFaceConfig { s: S, m: 0.35 }));
    let onehot = Tensor::from_slice(&LABELS).one_hot(C).to_kind(Kind::Double);
    compare("cosface", &logits, &((cos - onehot * 0.35) * S), 1e-12, 0.0).unwrap();
}

#[test]
fn cross_entropy_hand_computed_2x3() {
    // Row 0: z = [1, 2, 3], y = 2: ln(e + e² + e³) − 3 = ln(1 + e⁻¹ + e⁻²).
    // Row 1: z = [1, 0, −1], y = 1: ln(e + 1 + e⁻¹) − 0 = 1 + ln(1 + e⁻¹ + e⁻²).
    let a = (1.0 + (-1f64).exp() + (-2f64).exp()).ln();
    let expected = (a + 1.0 + a) / 2.0;
    assert!((expected - 0.907_605_964_444_380_4).abs() < 1e-15);
    let labels = Tensor::from_slice(&[2i64, 1]);
    let z = Tensor::from_slice(&[1.0, 2.0, 3.0, 1.0, 0.0, -1.0]).view([2, 3]);
    for kind in [Kind::Double, Kind::Float] {
        let loss = cross_entropy(&z.to_kind(kind), &labels);
        assert_eq!(loss.size(), Vec::<i64>::new(), "scalar loss");
        assert_eq!(loss.kind(), kind);
        let tol = if kind == Kind::Double { 1e-14 } else { 1e-6 };
        assert!(
            (loss.double_value(&[]) - expected).abs() < tol,
            "{kind:?}: {loss:?}"
        );
    }
}

#[test]
#[should_panic(expected = "Int64")]
fn cross_entropy_rejects_int32_labels() {
    let z = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu));
    let _ = cross_entropy(&z, &Tensor::from_slice(&[0i32, 1]));
}

#[test]
fn classifier_cosines_match_normalised_dot_products() {
    let vs = nn::VarStore::new(Device::Cpu);
    let clf = CosineClassifier::new(&vs.root(), 3, 4);
    assert_eq!(clf.num_classes(), 3);
    let emb_v = [1.0f32, 2.0, -1.0, 0.5, -3.0, 0.0, 1.0, 1.0];
    let emb = Tensor::from_slice(&emb_v).view([2, 4]);
    let cos = clf.cosines(&emb);
    assert_eq!(cos.size(), [2, 3]);
    let w = to_vec(clf.weight());
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    for i in 0..2 {
        let e: Vec<f64> = emb_v[i * 4..i * 4 + 4].iter().map(|&x| x as f64).collect();
        for j in 0..3 {
            let wj = &w[j * 4..j * 4 + 4];
            let dot: f64 = e.iter().zip(wj).map(|(a, b)| a * b).sum();
            let expected = dot / (norm(&e) * norm(wj));
            let got = cos.double_value(&[i as i64, j as i64]);
            assert!(
                (got - expected).abs() < 1e-5,
                "[{i},{j}] {got} vs {expected}"
            );
        }
    }
}

#[test]
fn classifier_clamps_parallel_vectors_to_one() {
    let vs = nn::VarStore::new(Device::Cpu);
    let clf = CosineClassifier::new(&vs.root(), 64, 512);
    let emb = clf.weight().detach() * 3.7;
    let cos = clf.cosines(&emb);
    assert!(cos.max().double_value(&[]) <= 1.0);
    assert!(cos.min().double_value(&[]) >= -1.0);
    let diag = cos.diagonal(0, 0, 1);
    assert!((diag - 1.0).abs().max().double_value(&[]) < 1e-5);
}

#[test]
fn classifier_weight_is_named_weight_and_initialised_n0_001() {
    let vs = nn::VarStore::new(Device::Cpu);
    let _clf = CosineClassifier::new(&(vs.root() / "fc"), 1000, 64);
    let vars = vs.variables();
    let w = vars.get("fc.weight").expect("variable fc.weight");
    assert_eq!(w.size(), [1000, 64]);
    assert!(w.requires_grad());
    let (mean, std) = (
        w.mean(Kind::Double).double_value(&[]),
        w.std(true).double_value(&[]),
    );
    // 64 000 samples: the standard error of the mean is 4e-5, of the std about 3e-5.
    assert!(mean.abs() < 3e-4, "mean {mean}");
    assert!((std - 0.01).abs() < 3e-4, "std {std}");
}

#[test]
fn heads_keep_the_cosine_kind_and_shape() {
    let (cos, labels) = cos_and_labels();
    let cos = cos.to_kind(Kind::Float);
    for cfg in [
        HeadConfig::Normface(NormFaceConfig::default()),
        HeadConfig::Cosface(CosFaceConfig::default()),
        HeadConfig::Arcface(ArcFaceConfig::default()),
    ] {
        let z = cfg.build().logits(&cos, &labels);
        assert_eq!((z.size(), z.kind()), (cos.size(), Kind::Float), "{cfg:?}");
    }
}

// ---- Combined margin, ElasticFace, SphereFace, Partial FC -------------------------------------

use facerec_loss_heads::{
    CombinedConfig, ElasticArcConfig, ElasticCosConfig, ElasticFace, ElasticKind, ElasticParams,
    MarginHead, PartialFc, PartialFcConfig, PlusAssignment, SphereFace, SphereFaceConfig,
    SphereFaceScale,
};

fn assert_same(what: &str, a: &HeadConfig, b: &HeadConfig) {
    let (la, ga) = logits_and_grad(a);
    let (lb, gb) = logits_and_grad(b);
    compare(&format!("{what} logits"), &la, &lb, 1e-12, 1e-12).unwrap();
    compare(&format!("{what} grad"), &ga, &gb, 1e-12, 1e-10).unwrap();
}

#[test]
fn combined_reduces_to_arcface_cosface_and_normface() {
    for g in MODES {
        let c = |m1, m2, m3| {
            HeadConfig::Combined(CombinedConfig {
                s: S,
                m1,
                m2,
                m3,
                gradient: g,
            })
        };
        assert_same("(1, 0.5, 0)", &c(1.0, 0.5, 0.0), &arcface(0.5, g));
        assert_same(
            "(1, 0, 0)",
            &c(1.0, 0.0, 0.0),
            &HeadConfig::Normface(NormFaceConfig { s: S }),
        );
    }
    let c = HeadConfig::Combined(CombinedConfig {
        s: S,
        m1: 1.0,
        m2: 0.0,
        m3: 0.35,
        gradient: ArcFaceGradient::Exact,
    });
    assert_same(
        "(1, 0, 0.35)",
        &c,
        &HeadConfig::Cosface(CosFaceConfig { s: S, m: 0.35 }),
    );
}

/// arcface_torch drops m2 when m3 > 0; ours must not: z_y = s·(cos(m1·θ + m2) − m3) everywhere
/// below the threshold, for m1 = 1 and m1 ≠ 1.
#[test]
fn combined_keeps_every_margin() {
    let (cos, _) = cos_and_labels();
    let cos_v = to_vec(&cos);
    for (m1, m2, m3) in [(1.0, 0.3, 0.2), (1.3, 0.2, 0.1), (0.8, 0.0, 0.3)] {
        let cfg = HeadConfig::Combined(CombinedConfig {
            s: S,
            m1,
            m2,
            m3,
            gradient: ArcFaceGradient::Exact,
        });
        let z = to_vec(&logits_and_grad(&cfg).0);
        let theta_star = (PI - m2) / m1;
        for (i, &y) in LABELS.iter().enumerate() {
            let k = i * C as usize + y as usize;
            let theta = cos_v[k].acos();
            let expected = if theta < theta_star {
                S * ((m1 * theta + m2).cos() - m3)
            } else {
                S * (cos_v[k] - (PI - theta_star) * theta_star.sin() - m3)
            };
            assert!(
                (z[k] - expected).abs() < 1e-9,
                "({m1},{m2},{m3}) row {i}: {} vs {expected}",
                z[k]
            );
        }
    }
}

fn elastic(kind: ElasticKind, sigma: f64, plus: Option<PlusAssignment>) -> ElasticFace {
    let m = if kind == ElasticKind::Arc { 0.5 } else { 0.35 };
    ElasticFace::new(&ElasticParams {
        kind,
        s: S,
        m,
        sigma,
        seed: 11,
        plus,
    })
}

#[test]
fn elastic_with_sigma_zero_is_arcface_or_cosface() {
    let (cos, labels) = cos_and_labels();
    let plus = [
        None,
        Some(PlusAssignment::PaperIntent),
        Some(PlusAssignment::CodeFaithful),
    ];
    for (kind, reference) in [
        (ElasticKind::Arc, arcface(0.5, ArcFaceGradient::Exact)),
        (
            ElasticKind::Cos,
            HeadConfig::Cosface(CosFaceConfig { s: S, m: 0.35 }),
        ),
    ] {
        let expected = reference.build();
        let grad_of = |head: &dyn MarginHead| {
            let c = cos.shallow_clone().set_requires_grad(true);
            let z = head.logits(&c, &labels);
            let g = analytic_gradients(&cross_entropy(&z, &labels), &[&c]).remove(0);
            (z.detach(), g)
        };
        let (ze, ge) = grad_of(expected.as_ref());
        for p in plus {
            let (z, g) = grad_of(&elastic(kind, 0.0, p));
            compare(&format!("{kind:?} {p:?} logits"), &z, &ze, 1e-12, 1e-12).unwrap();
            compare(&format!("{kind:?} {p:?} grad"), &g, &ge, 1e-12, 1e-10).unwrap();
        }
    }
    // The same through the configs.
    let cfg = HeadConfig::ElasticArc(ElasticArcConfig {
        s: S,
        sigma: 0.0,
        ..Default::default()
    });
    assert_same(
        "elastic_arc sigma 0",
        &cfg,
        &arcface(0.5, ArcFaceGradient::Exact),
    );
    let cfg = HeadConfig::ElasticCos(ElasticCosConfig {
        s: S,
        sigma: 0.0,
        ..Default::default()
    });
    assert_same(
        "elastic_cos sigma 0",
        &cfg,
        &HeadConfig::Cosface(CosFaceConfig { s: S, m: 0.35 }),
    );
}

/// Spearman rank correlation of two samples without ties.
fn spearman(a: &[f64], b: &[f64]) -> f64 {
    let rank = |v: &[f64]| {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
        let mut r = vec![0.0; v.len()];
        for (k, &i) in idx.iter().enumerate() {
            r[i] = k as f64;
        }
        r
    };
    let (ra, rb) = (rank(a), rank(b));
    let n = a.len() as f64;
    let d2: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - y).powi(2)).sum();
    1.0 - 6.0 * d2 / (n * (n * n - 1.0))
}

#[test]
fn plus_paper_intent_is_anti_sorted_and_code_faithful_is_not() {
    let b = 128;
    let mut code_rhos = Vec::new();
    for batch in 0..20 {
        tch::manual_seed(batch);
        let target = Tensor::rand([b], (Kind::Double, Device::Cpu)) * 2.0 - 1.0;
        let paper = elastic(ElasticKind::Arc, 0.05, Some(PlusAssignment::PaperIntent));
        let code = elastic(ElasticKind::Arc, 0.05, Some(PlusAssignment::CodeFaithful));
        let draw = Tensor::from_slice(&paper.draw(b as usize));
        let t = to_vec(&target);
        let mp = to_vec(&paper.assign(&draw, &target));
        let mc = to_vec(&code.assign(&draw, &target));
        let rho = spearman(&t, &mp);
        assert!((rho + 1.0).abs() < 1e-12, "paper intent: Spearman {rho}");
        // Both hand out the same multiset.
        let sorted = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v
        };
        assert_eq!(sorted(&mp), sorted(&mc));
        assert_eq!(sorted(&mp), sorted(&to_vec(&draw)));
        code_rhos.push(spearman(&t, &mc));
    }
    let mean = code_rhos.iter().sum::<f64>() / code_rhos.len() as f64;
    // Under independence the mean of 20 Spearmans at B = 128 has sd ≈ 0.02.
    assert!(
        mean.abs() < 0.15,
        "code-faithful mean Spearman {mean} ({code_rhos:?})"
    );
    assert!(code_rhos.iter().all(|r| *r > -0.9), "{code_rhos:?}");
}

#[test]
fn elastic_draws_are_seeded_per_step_and_have_the_stated_law() {
    let mut a = elastic(ElasticKind::Cos, 0.05, None);
    let mut b = elastic(ElasticKind::Cos, 0.05, None);
    assert_eq!(a.draw(8), b.draw(8), "same seed, same stream");
    assert_ne!(a.draw(8), a.draw(8), "every call draws afresh");
    a.set_step(41);
    let x = a.draw(8);
    b.set_step(40);
    let _ = b.draw(100);
    b.set_step(41);
    assert_eq!(
        x,
        b.draw(8),
        "the draw of a step depends only on (seed, step)"
    );
    a.set_step(42);
    assert_ne!(x, a.draw(8));
    let v = a.draw(20_000);
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let sd = (v.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt();
    // Standard errors: 0.05/sqrt(20000) ≈ 3.5e-4 for the mean, ≈ 2.5e-4 for the sd.
    assert!(
        (mean - 0.35).abs() < 2e-3 && (sd - 0.05).abs() < 2e-3,
        "mean {mean}, sd {sd}"
    );
    // Through the trait: two calls give different logits, a re-seeded step repeats them.
    let (cos, labels) = cos_and_labels();
    a.set_step(7);
    let z1 = a.logits(&cos, &labels);
    let z2 = a.logits(&cos, &labels);
    a.set_step(7);
    assert!(!z1.equal(&z2) && z1.equal(&a.logits(&cos, &labels)));
}

#[test]
fn sphereface_lambda_schedule_and_psi() {
    let cfg = SphereFaceConfig::default();
    let mut head = SphereFace::new(&cfg);
    assert_eq!(head.lambda(), 1000.0);
    for (step, expected) in [
        (0u64, 1000.0),
        (1, 1000.0 / 1.12),
        (100, 1000.0 / 13.0),
        (10_000, 5.0),
    ] {
        head.set_step(step);
        assert!(
            (head.lambda() - expected).abs() < 1e-9,
            "step {step}: {}",
            head.lambda()
        );
    }
    // ψ(θ) = (−1)^k cos(4θ) − 2k is continuous and decreasing from 1 to −7 over [0, π].
    let theta: Vec<f64> = (0..=2000).map(|k| k as f64 * PI / 2000.0).collect();
    let c = Tensor::from_slice(&theta.iter().map(|t| t.cos()).collect::<Vec<_>>());
    let psi = to_vec(&head.psi(&c));
    for (t, p) in theta.iter().zip(&psi) {
        let k = ((4.0 * t / PI).floor()).min(3.0);
        let expected = (-1f64).powi(k as i32) * (4.0 * t).cos() - 2.0 * k;
        assert!((p - expected).abs() < 1e-6, "θ {t}: {p} vs {expected}");
    }
    assert!(
        psi.windows(2).all(|w| w[1] <= w[0] + 1e-9),
        "ψ must decrease"
    );
    assert!((psi[0] - 1.0).abs() < 1e-9 && (psi[2000] + 7.0).abs() < 1e-6);
    // With λ → ∞ the target is the plain cosine (softmax start of the annealing).
    let huge = SphereFaceConfig {
        lambda_base: 1e12,
        lambda_gamma: 0.0,
        s: S,
        ..Default::default()
    };
    assert_same_logits(
        &HeadConfig::Sphereface(huge),
        &HeadConfig::Normface(NormFaceConfig { s: S }),
        1e-9,
    );
}

fn assert_same_logits(a: &HeadConfig, b: &HeadConfig, atol: f64) {
    compare(
        "logits",
        &logits_and_grad(a).0,
        &logits_and_grad(b).0,
        atol,
        0.0,
    )
    .unwrap();
}

/// `scale = "fixed"`: the feature norms are ignored and every row is scaled by `s` (bit for bit
/// the logits without norms); `feature_norm` scales row `i` by `‖x_i‖` instead.
#[test]
fn sphereface_fixed_scale_ignores_the_feature_norms() {
    let cos = Tensor::from_slice(&[0.3, -0.2, 0.9, 0.1, 0.5, -0.7]).view([2, 3]);
    let labels = Tensor::from_slice(&[2i64, 0]);
    let norms = Tensor::from_slice(&[3.0, 0.5]);
    let fixed = SphereFace::new(&SphereFaceConfig {
        scale: SphereFaceScale::Fixed,
        s: 30.0,
        ..Default::default()
    });
    let z = fixed.logits_with_norms(&cos, &labels, &norms);
    assert!(z.equal(&fixed.logits(&cos, &labels)));
    let by_norm = SphereFace::new(&SphereFaceConfig {
        s: 30.0,
        ..Default::default()
    });
    let zn = by_norm.logits_with_norms(&cos, &labels, &norms);
    // Row i of the feature-norm logits is (‖x_i‖ / s) times row i of the fixed-scale ones.
    let ratio = (&zn / &z).to_kind(Kind::Double);
    let expect =
        Tensor::from_slice(&[0.1, 0.1, 0.1, 0.5 / 30.0, 0.5 / 30.0, 0.5 / 30.0]).view([2, 3]);
    assert!(ratio.allclose(&expect, 1e-12, 1e-12, false), "{ratio:?}");
}

#[test]
fn partial_fc_rate_one_equals_the_full_classifier() {
    let mut vs = nn::VarStore::new(Device::Cpu);
    vs.set_kind(Kind::Double);
    let clf = CosineClassifier::new(&vs.root(), 50, 16);
    let emb = Tensor::randn([12, 16], (Kind::Double, Device::Cpu));
    let labels = Tensor::from_slice(&[3i64, 49, 0, 3, 17, 8, 8, 21, 30, 1, 2, 44]);
    let mut pfc = PartialFc::new(&PartialFcConfig {
        sample_rate: 1.0,
        seed: 5,
    });
    let s = pfc.sample(&labels, 50);
    assert!(s
        .index
        .equal(&Tensor::arange(50, (Kind::Int64, Device::Cpu))));
    assert!(s.labels.equal(&labels));
    for cfg in [
        arcface(0.5, ArcFaceGradient::Exact),
        HeadConfig::Cosface(CosFaceConfig::default()),
    ] {
        let head = cfg.build();
        let full = cross_entropy(&head.logits(&clf.cosines(&emb), &labels), &labels);
        let sampled = cross_entropy(
            &head.logits(&clf.cosines_sampled(&emb, &s), &s.labels),
            &s.labels,
        );
        let gf = analytic_gradients(&full, &[clf.weight()]).remove(0);
        let gs = analytic_gradients(&sampled, &[clf.weight()]).remove(0);
        assert_eq!(full.double_value(&[]), sampled.double_value(&[]));
        compare("rate 1 grad", &gs, &gf, 0.0, 0.0).unwrap();
    }
}

#[test]
fn partial_fc_keeps_positives_samples_uniformly_and_remaps() {
    let labels = Tensor::from_slice(&[7i64, 7, 93, 0, 41, 99]);
    let num_classes = 100;
    let mut pfc = PartialFc::new(&PartialFcConfig {
        sample_rate: 0.2,
        seed: 9,
    });
    let mut hits = vec![0usize; num_classes as usize];
    let rounds = 400;
    for step in 0..rounds {
        pfc.set_step(step);
        let s = pfc.sample(&labels, num_classes);
        let index: Vec<i64> = Vec::try_from(&s.index).unwrap();
        assert_eq!(index.len(), 20);
        assert!(index.windows(2).all(|w| w[0] < w[1]), "sorted, unique");
        for p in [0, 7, 41, 93, 99] {
            assert!(index.contains(&p), "positive {p} missing");
        }
        // index[remapped label] is the original label.
        assert!(s.index.index_select(0, &s.labels).equal(&labels));
        for i in index {
            hits[i as usize] += 1;
        }
        let mask = s.row_mask(num_classes, Kind::Float);
        assert_eq!(mask.sum(Kind::Double).double_value(&[]), 20.0);
    }
    // Each of the 95 negatives is picked with probability 15/95 per step: about 63 of 400
    // (binomial sd ≈ 7.3); 30..100 is a > 4.5 sd band.
    let negatives: Vec<usize> = (0..100)
        .filter(|c| ![0, 7, 41, 93, 99].contains(c))
        .collect();
    for c in negatives {
        assert!(
            (30..100).contains(&hits[c]),
            "class {c} picked {} times",
            hits[c]
        );
    }
    // Reproducible per (seed, step).
    pfc.set_step(3);
    let a = pfc.sample(&labels, num_classes);
    pfc.set_step(3);
    assert!(a.index.equal(&pfc.sample(&labels, num_classes).index));
    // Fewer slots than positives: the positives alone.
    let mut tiny = PartialFc::new(&PartialFcConfig {
        sample_rate: 0.01,
        seed: 0,
    });
    let s = tiny.sample(&labels, num_classes);
    assert!(s.index.equal(&Tensor::from_slice(&[0i64, 7, 41, 93, 99])));
}
