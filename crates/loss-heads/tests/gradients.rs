//! Gradient checks in f64 through the full path embedding -> CosineClassifier -> head ->
//! cross_entropy, w.r.t. both the embeddings and the class weight, for every head and every
//! ArcFace gradient mode; the combined margin, SphereFace (fixed scale and feature norms, several
//! annealing steps), every ElasticFace variant and "+" assignment (margins held fixed), softmax
//! through the linear classifier, and heads over a Partial FC subset; plus the checker's own
//! self-tests.

use facerec_loss_heads::{
    cross_entropy, ArcFaceConfig, ArcFaceGradient, CombinedConfig, CosFaceConfig, CosineClassifier,
    ElasticFace, ElasticKind, ElasticParams, HeadConfig, LinearClassifier, MarginHead,
    NormFaceConfig, PartialFc, PartialFcConfig, PlusAssignment, SoftmaxConfig, SphereFaceConfig,
};
use facerec_testkit::gradcheck::{
    analytic_gradients, check_gradients, compare, numerical_gradient, GradCheck,
};
use facerec_testkit::randn;
use tch::{nn, Device, Kind, Tensor};

const B: i64 = 4;
const C: i64 = 6;
const D: i64 = 8;
const S: f64 = 8.0;
const M_ARC: f64 = 0.5;
const OPTS: (Kind, Device) = (Kind::Double, Device::Cpu);

/// f64 embeddings and classifier whose target cosines cover the regimes that matter: close to the
/// class (≈ 0.9), past the ArcFace threshold (≈ −0.95 < cos(π − 0.5) ≈ −0.878), and two others.
struct Fixture {
    _vs: nn::VarStore,
    classifier: CosineClassifier,
    emb: Tensor,
    labels: Tensor,
}

fn fixture() -> Fixture {
    let mut vs = nn::VarStore::new(Device::Cpu);
    vs.set_kind(Kind::Double);
    let classifier = CosineClassifier::new(&vs.root(), C, D);
    let emb = randn(1, &[B, D]);
    let scale = Tensor::from_slice(&[1.5, -3.0, 0.0, 0.7, 0.0, 0.0]).view([C, 1]);
    let emb_c = Tensor::cat(&[&emb, &Tensor::zeros([C - B, D], OPTS)], 0);
    let w = emb_c * scale + randn(2, &[C, D]);
    let mut weight = classifier.weight().shallow_clone();
    tch::no_grad(|| weight.copy_(&w));
    let emb = emb.set_requires_grad(true);
    let labels = Tensor::from_slice(&[0i64, 1, 2, 3]);
    let fx = Fixture {
        _vs: vs,
        classifier,
        emb,
        labels,
    };
    fx.assert_away_from_kinks();
    fx
}

impl Fixture {
    fn cosines(&self) -> Tensor {
        self.classifier.cosines(&self.emb)
    }

    fn target_cosines(&self) -> Vec<f64> {
        let t = self.cosines().gather(1, &self.labels.view([B, 1]), false);
        Vec::<f64>::try_from(t.detach().flatten(0, -1)).unwrap()
    }

    /// The precondition of every check here: no target cosine near a non-differentiable point
    /// (the ArcFace threshold, the easy-margin switch at 0, the clamps at ±1), and both ArcFace
    /// branches exercised.
    fn assert_away_from_kinks(&self) {
        let t = self.target_cosines();
        let th = (std::f64::consts::PI - M_ARC).cos();
        for &c in &t {
            let gap = [(c - th).abs(), c.abs(), 1.0 - c.abs()]
                .into_iter()
                .fold(f64::MAX, f64::min);
            assert!(
                gap > 0.02,
                "fixture target cosine {c} too close to a kink ({t:?})"
            );
        }
        assert!(
            t.iter().any(|&c| c < th),
            "fixture must exercise the fallback branch: {t:?}"
        );
        assert!(
            t.iter().any(|&c| c > 0.5),
            "fixture needs a well-aligned sample: {t:?}"
        );
    }

    fn loss(&self, head: &dyn MarginHead) -> Tensor {
        cross_entropy(&head.logits(&self.cosines(), &self.labels), &self.labels)
    }

    fn check(&self, cfg: HeadConfig) {
        let head = cfg.build();
        let inputs = [("emb", &self.emb), ("weight", self.classifier.weight())];
        check_gradients(|| self.loss(head.as_ref()), &inputs, &GradCheck::default())
            .unwrap_or_else(|e| panic!("{cfg:?}: {e:#}"));
    }
}

fn arcface(gradient: ArcFaceGradient) -> HeadConfig {
    HeadConfig::Arcface(ArcFaceConfig {
        s: S,
        m: M_ARC,
        gradient,
    })
}

#[test]
fn normface_full_path_gradients() {
    fixture().check(HeadConfig::Normface(NormFaceConfig { s: S }));
}

#[test]
fn cosface_full_path_gradients() {
    fixture().check(HeadConfig::Cosface(CosFaceConfig { s: S, m: 0.35 }));
}

#[test]
fn arcface_exact_full_path_gradients() {
    fixture().check(arcface(ArcFaceGradient::Exact));
}

#[test]
fn arcface_easy_margin_full_path_gradients() {
    fixture().check(arcface(ArcFaceGradient::EasyMargin));
}

#[test]
fn arcface_exact_default_scale_full_path_gradients() {
    fixture().check(HeadConfig::Arcface(ArcFaceConfig {
        s: 64.0,
        ..Default::default()
    }));
}

/// `s·(softmax(z) − onehot)/B`, with `z` the head's (margin) logits, as a constant.
fn softmax_minus_onehot(logits: &Tensor, labels: &Tensor) -> Tensor {
    let p = logits.detach().softmax(-1, Kind::Double);
    (p - labels.one_hot(C).to_kind(Kind::Double)) * (S / B as f64)
}

#[test]
fn arcface_detached_gradient_wrt_cos_is_softmax_minus_onehot() {
    let fx = fixture();
    assert_detached_gradient(&fx, &arcface(ArcFaceGradient::Detached));
}

/// A detached-margin head's `dL/dcos` is NormFace's at the margin logits: `s·(softmax(z) − onehot)/B`.
fn assert_detached_gradient(fx: &Fixture, cfg: &HeadConfig) {
    let head = cfg.build();
    let cos = fx.cosines().detach().set_requires_grad(true);
    let logits = head.logits(&cos, &fx.labels);
    let grad = analytic_gradients(&cross_entropy(&logits, &fx.labels), &[&cos]);
    compare(
        "detached dL/dcos",
        &grad[0],
        &softmax_minus_onehot(&logits, &fx.labels),
        1e-13,
        1e-10,
    )
    .unwrap();
}

/// Full path: autograd through the detached head must equal the finite-difference gradient of
/// `Σ g ⊙ cos(emb, W)` with `g = s·(softmax(z) − onehot)/B` held fixed (chain rule through the
/// classifier with the analytic upstream gradient).
#[test]
fn arcface_detached_full_path_gradients() {
    let fx = fixture();
    let head = arcface(ArcFaceGradient::Detached).build();
    let g = softmax_minus_onehot(&head.logits(&fx.cosines(), &fx.labels), &fx.labels);
    let analytic = analytic_gradients(&fx.loss(head.as_ref()), &[&fx.emb, fx.classifier.weight()]);
    let surrogate = || (&g * fx.cosines()).sum(Kind::Double);
    let opts = GradCheck::default();
    for (name, x, a) in [
        ("emb", &fx.emb, &analytic[0]),
        ("weight", fx.classifier.weight(), &analytic[1]),
    ] {
        let numeric = numerical_gradient(&surrogate, x, opts.eps);
        compare(name, a, &numeric, opts.atol, opts.rtol).unwrap();
    }
}

/// Exact mode, closed form: `∂L/∂c_y = s·(p_y − 1)/B · dφ/dc` with `dφ/dc = sin(θ+m)/sin θ` when
/// `θ + m < π` and 1 on the fallback; non-target entries get `s·p_j/B`.
#[test]
fn arcface_exact_gradient_wrt_cos_matches_closed_form() {
    let fx = fixture();
    let head = arcface(ArcFaceGradient::Exact).build();
    let cos = fx.cosines().detach().set_requires_grad(true);
    let logits = head.logits(&cos, &fx.labels);
    let grad = analytic_gradients(&cross_entropy(&logits, &fx.labels), &[&cos]);
    let dphi: Vec<f64> = fx
        .target_cosines()
        .iter()
        .map(|&c| {
            let theta = c.acos();
            if theta + M_ARC < std::f64::consts::PI {
                (theta + M_ARC).sin() / theta.sin()
            } else {
                1.0
            }
        })
        .collect();
    let chain = Tensor::ones([B, C], OPTS).scatter(
        1,
        &fx.labels.view([B, 1]),
        &Tensor::from_slice(&dphi).view([B, 1]),
    );
    let expected = softmax_minus_onehot(&logits, &fx.labels) * chain;
    compare("dL/dcos", &grad[0], &expected, 1e-12, 1e-9).unwrap();
}

#[test]
fn checker_accepts_correct_gradient() {
    let x = Tensor::randn([3, 2], OPTS).set_requires_grad(true);
    check_gradients(
        || x.pow_tensor_scalar(3).sum(Kind::Double),
        &[("x", &x)],
        &GradCheck::default(),
    )
    .unwrap();
}

/// `x.detach()·x` has autograd gradient `x` but true gradient `2x`: the checker must fail.
#[test]
fn checker_rejects_wrong_gradient() {
    let x = (Tensor::rand([3, 2], OPTS) + 0.5).set_requires_grad(true);
    let err = check_gradients(
        || (x.detach() * &x).sum(Kind::Double),
        &[("x", &x)],
        &GradCheck::default(),
    )
    .expect_err("a wrong gradient must be rejected");
    assert!(err.to_string().contains("d loss / d x"), "{err}");
}

#[test]
fn numerical_gradient_restores_input_bit_exactly() {
    let x = Tensor::randn([5], OPTS).set_requires_grad(true);
    let before = x.detach().copy();
    let g = numerical_gradient(&|| x.sin().sum(Kind::Double), &x, 1e-6);
    assert!(x.detach().equal(&before));
    compare("d sin", &g, &before.cos(), 1e-8, 1e-6).unwrap();
}

/// Fails when any fixture target cosine lies within 0.02 of `kinks` (where a head switches branch).
fn assert_away_from(fx: &Fixture, kinks: &[f64], what: &str) {
    for c in fx.target_cosines() {
        for k in kinks {
            assert!(
                (c - k).abs() > 0.02,
                "{what}: target cosine {c} near kink {k}"
            );
        }
    }
}

fn combined(m1: f64, m2: f64, m3: f64, gradient: ArcFaceGradient) -> HeadConfig {
    HeadConfig::Combined(CombinedConfig {
        s: S,
        m1,
        m2,
        m3,
        gradient,
    })
}

#[test]
fn combined_full_path_gradients_every_mode() {
    let fx = fixture();
    // (1, 0.3, 0.2) would put its threshold (−0.955) next to the fixture's −0.947: use m2 = 0.2.
    for (m1, m2, m3) in [
        (1.0, 0.2, 0.2),
        (1.35, 0.0, 0.0),
        (0.9, 0.4, 0.15),
        (1.2, 0.2, 0.1),
    ] {
        let th = ((std::f64::consts::PI - m2) / m1).cos();
        assert_away_from(&fx, &[th, 0.0], "combined");
        for g in [ArcFaceGradient::Exact, ArcFaceGradient::EasyMargin] {
            fx.check(combined(m1, m2, m3, g));
        }
        assert_detached_gradient(&fx, &combined(m1, m2, m3, ArcFaceGradient::Detached));
    }
}

#[test]
fn sphereface_full_path_gradients_with_scale_and_norms() {
    let fx = fixture();
    for m in [4u32, 2, 3] {
        for step in [0u64, 200, 1_000_000] {
            let cfg = SphereFaceConfig {
                m,
                s: S,
                ..Default::default()
            };
            let mut head = HeadConfig::Sphereface(cfg).build();
            head.set_step(step);
            let inputs = [("emb", &fx.emb), ("weight", fx.classifier.weight())];
            check_gradients(|| fx.loss(head.as_ref()), &inputs, &GradCheck::default())
                .unwrap_or_else(|e| panic!("sphereface m={m} step={step}: {e:#}"));
            // The paper's form: the feature norm ‖x‖ scales each row (differentiated too).
            let with_norms = || {
                let norms = fx.emb.norm_scalaropt_dim(2, [1], false);
                let z = head.logits_with_norms(&fx.cosines(), &fx.labels, &norms);
                cross_entropy(&z, &fx.labels)
            };
            check_gradients(with_norms, &inputs, &GradCheck::default())
                .unwrap_or_else(|e| panic!("sphereface m={m} step={step} norms: {e:#}"));
        }
    }
}

#[test]
fn elastic_full_path_gradients_every_variant() {
    let fx = fixture();
    let draw = [0.62, 0.41, 0.55, 0.47];
    let plus = [
        None,
        Some(PlusAssignment::PaperIntent),
        Some(PlusAssignment::CodeFaithful),
    ];
    for kind in [ElasticKind::Arc, ElasticKind::Cos] {
        for p in plus {
            let params = ElasticParams {
                kind,
                s: S,
                m: 0.5,
                sigma: 0.1,
                seed: 0,
                plus: p,
            };
            let head = ElasticFace::new(&params);
            // Per-sample ArcFace thresholds cos(π − e) for every value of the draw.
            let kinks: Vec<f64> = draw.iter().map(|e| -f64::cos(*e)).collect();
            if kind == ElasticKind::Arc {
                assert_away_from(&fx, &kinks, "elastic arc");
            }
            let loss = || {
                cross_entropy(
                    &head.logits_with_draw(&fx.cosines(), &fx.labels, &draw),
                    &fx.labels,
                )
            };
            let inputs = [("emb", &fx.emb), ("weight", fx.classifier.weight())];
            check_gradients(loss, &inputs, &GradCheck::default())
                .unwrap_or_else(|e| panic!("{params:?}: {e:#}"));
        }
    }
}

#[test]
fn softmax_linear_classifier_gradients() {
    let mut vs = nn::VarStore::new(Device::Cpu);
    vs.set_kind(Kind::Double);
    let clf = LinearClassifier::new(&vs.root(), C, D);
    let emb = randn(5, &[B, D]).set_requires_grad(true);
    let labels = Tensor::from_slice(&[0i64, 1, 2, 3]);
    let head = HeadConfig::Softmax(SoftmaxConfig {}).build();
    let loss = || cross_entropy(&head.logits(&clf.scores(&emb), &labels), &labels);
    let inputs = [
        ("emb", &emb),
        ("weight", clf.weight()),
        ("bias", clf.bias()),
    ];
    check_gradients(loss, &inputs, &GradCheck::default()).unwrap();
}

#[test]
fn heads_over_a_partial_fc_subset_gradients() {
    let fx = fixture();
    // Labels 0..4 are positives; a rate of 5/6 keeps one random negative of {4, 5}.
    let mut pfc = PartialFc::new(&PartialFcConfig {
        sample_rate: 5.0 / 6.0,
        seed: 3,
    });
    let sampled = pfc.sample(&fx.labels, C);
    assert_eq!(sampled.len(), 5);
    let heads = [
        HeadConfig::Normface(NormFaceConfig { s: S }),
        HeadConfig::Cosface(CosFaceConfig { s: S, m: 0.35 }),
        arcface(ArcFaceGradient::Exact),
        combined(1.0, 0.3, 0.2, ArcFaceGradient::Exact),
        HeadConfig::Sphereface(SphereFaceConfig {
            s: S,
            ..Default::default()
        }),
    ];
    for cfg in heads {
        let head = cfg.build();
        let loss = || {
            let cos = fx.classifier.cosines_sampled(&fx.emb, &sampled);
            cross_entropy(&head.logits(&cos, &sampled.labels), &sampled.labels)
        };
        let inputs = [("emb", &fx.emb), ("weight", fx.classifier.weight())];
        check_gradients(loss, &inputs, &GradCheck::default())
            .unwrap_or_else(|e| panic!("{cfg:?}: {e:#}"));
        // The unsampled row has exactly zero gradient.
        let g = analytic_gradients(&loss(), &[fx.classifier.weight()]).remove(0);
        let mask = sampled.row_mask(C, Kind::Double);
        assert_eq!((g * (mask.neg() + 1.0)).abs().max().double_value(&[]), 0.0);
    }
}
