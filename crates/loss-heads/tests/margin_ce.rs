//! `margin_cross_entropy` (the fused loss) against the unfused `cross_entropy(head.logits(..))`:
//! same value and same gradients in f64 for every head and gradient mode, over cosine leaves
//! (targets in every regime: well aligned, negative, past the ArcFace threshold), over the full
//! classifier path, with feature norms (SphereFace's A-Softmax, gradient w.r.t. the norms too),
//! over a Partial FC subset, and for softmax over the linear classifier; f32 agreement; the
//! fallback for heads without the row-scaled form; and finite-difference gradient checks of the
//! fused loss itself.

use facerec_loss_heads::{
    cross_entropy, margin_cross_entropy, margin_cross_entropy_with_norms, ClassifierKind,
    CosineClassifier, HeadConfig, LinearClassifier, MarginHead, PartialFc, PartialFcConfig,
};
use facerec_testkit::gradcheck::{analytic_gradients, check_gradients, compare, GradCheck};
use std::cell::RefCell;

use facerec_testkit::randn;
use tch::{nn, Device, Kind, Tensor};

const B: i64 = 6;
const C: i64 = 9;
const D: i64 = 8;

/// Every head and mode, by its TOML (scales small enough that no probability underflows).
const HEADS: &[&str] = &[
    r#"type = "softmax""#,
    r#"type = "normface"
       s = 8.0"#,
    r#"type = "normface""#,
    r#"type = "cosface"
       s = 8.0"#,
    r#"type = "arcface"
       s = 8.0"#,
    r#"type = "arcface""#,
    r#"type = "arcface"
       s = 8.0
       gradient = "easy_margin""#,
    r#"type = "arcface"
       s = 8.0
       gradient = "detached""#,
    r#"type = "combined"
       s = 8.0"#,
    r#"type = "combined"
       s = 8.0
       m1 = 1.35
       m2 = 0.25
       m3 = 0.1"#,
    r#"type = "combined"
       s = 8.0
       m1 = 1.35
       m2 = 0.25
       m3 = 0.1
       gradient = "easy_margin""#,
    r#"type = "combined"
       s = 8.0
       gradient = "detached""#,
    r#"type = "sphereface"
       s = 8.0"#,
    r#"type = "sphereface"
       s = 8.0
       m = 3"#,
    r#"type = "elastic_arc"
       s = 8.0"#,
    r#"type = "elastic_cos"
       s = 8.0"#,
    r#"type = "elastic_arc_plus"
       s = 8.0"#,
    r#"type = "elastic_arc_plus"
       s = 8.0
       assignment = "code_faithful""#,
    r#"type = "elastic_cos_plus"
       s = 8.0"#,
    r#"type = "elastic_cos_plus"
       s = 8.0
       assignment = "code_faithful""#,
];

fn heads() -> Vec<HeadConfig> {
    HEADS
        .iter()
        .map(|t| toml::from_str::<HeadConfig>(t).unwrap_or_else(|e| panic!("{t}: {e}")))
        .collect()
}

fn labels() -> Tensor {
    Tensor::from_slice(&[0i64, 3, 3, 8, 5, 1])
}

/// `[B, C]` cosines in (−1, 1) whose targets are 0.9, 0.55, −0.3, −0.95 (past cos(π − 0.5)),
/// 0.1 and −0.6.
fn cosines() -> Tensor {
    let cos = randn(7, &[B, C]).tanh() * 0.9;
    let targets = Tensor::from_slice(&[0.9, 0.55, -0.3, -0.95, 0.1, -0.6]).view([B, 1]);
    cos.scatter(1, &labels().view([B, 1]), &targets)
}

fn both(a: &Tensor, b: &Tensor, what: &str) {
    compare(what, a, b, 1e-13, 1e-11).unwrap_or_else(|e| panic!("{e:#}"));
}

/// Value and gradients of `fused` and `unfused` (each re-evaluated at the same head step) agree.
fn assert_same(
    what: &str,
    head: &mut dyn MarginHead,
    inputs: &[&Tensor],
    fused: &dyn Fn(&dyn MarginHead) -> Tensor,
    unfused: &dyn Fn(&dyn MarginHead) -> Tensor,
) {
    head.set_step(41);
    let a = fused(head);
    head.set_step(41);
    let b = unfused(head);
    assert_eq!(a.kind(), b.kind(), "{what}");
    assert_eq!(a.size(), Vec::<i64>::new(), "{what}: scalar");
    both(&a.detach(), &b.detach(), &format!("{what}: loss"));
    let ga = analytic_gradients(&a, inputs);
    let gb = analytic_gradients(&b, inputs);
    for (k, (ga, gb)) in ga.iter().zip(&gb).enumerate() {
        both(ga, gb, &format!("{what}: gradient {k}"));
    }
}

#[test]
fn every_head_matches_the_unfused_loss_on_cosine_leaves() {
    facerec_loss_heads::margin_ce::set_fused_min_elements(0);
    let y = labels();
    for cfg in heads() {
        let mut head = cfg.build();
        let cos = cosines().set_requires_grad(true);
        assert_same(
            &format!("{cfg:?}"),
            head.as_mut(),
            &[&cos],
            &|h| margin_cross_entropy(h, &cos, &y),
            &|h| cross_entropy(&h.logits(&cos, &y), &y),
        );
    }
}

#[test]
fn every_head_matches_with_feature_norms_including_the_norm_gradient() {
    facerec_loss_heads::margin_ce::set_fused_min_elements(0);
    let y = labels();
    let norms = (randn(9, &[B]).abs() * 3.0 + 2.0).set_requires_grad(true);
    for cfg in heads() {
        let mut head = cfg.build();
        let cos = cosines().set_requires_grad(true);
        // SphereFace scales by the norms; the others ignore them (no gradient reaches `norms`).
        let inputs: Vec<&Tensor> = if matches!(cfg, HeadConfig::Sphereface(_)) {
            vec![&cos, &norms]
        } else {
            vec![&cos]
        };
        assert_same(
            &format!("{cfg:?} with norms"),
            head.as_mut(),
            &inputs,
            &|h| margin_cross_entropy_with_norms(h, &cos, &y, &norms),
            &|h| cross_entropy(&h.logits_with_norms(&cos, &y, &norms), &y),
        );
    }
}

/// Embeddings and a classifier in f64, with the SphereFace norms taken from the embeddings.
struct Full {
    _vs: nn::VarStore,
    classifier: CosineClassifier,
    emb: Tensor,
}

fn full() -> Full {
    let mut vs = nn::VarStore::new(Device::Cpu);
    vs.set_kind(Kind::Double);
    let classifier = CosineClassifier::new(&vs.root(), C, D);
    let mut w = classifier.weight().shallow_clone();
    tch::no_grad(|| w.copy_(&randn(3, &[C, D])));
    let emb = (randn(4, &[B, D]) * 1.5).set_requires_grad(true);
    Full {
        _vs: vs,
        classifier,
        emb,
    }
}

#[test]
fn every_head_matches_through_the_classifier_and_over_a_partial_fc_subset() {
    facerec_loss_heads::margin_ce::set_fused_min_elements(0);
    let fx = full();
    let y = labels();
    let mut pfc = PartialFc::new(&PartialFcConfig {
        sample_rate: 0.5,
        seed: 11,
    });
    let sampled = pfc.sample(&y, C);
    assert!(sampled.len() < C, "a proper subset");
    let inputs = [&fx.emb, fx.classifier.weight()];
    let norms = || fx.emb.norm_scalaropt_dim(2, [1], false);
    for cfg in heads()
        .into_iter()
        .filter(|c| c.classifier_kind() == ClassifierKind::Cosine)
    {
        let mut head = cfg.build();
        assert_same(
            &format!("{cfg:?} full"),
            head.as_mut(),
            &inputs,
            &|h| margin_cross_entropy_with_norms(h, &fx.classifier.cosines(&fx.emb), &y, &norms()),
            &|h| {
                let cos = fx.classifier.cosines(&fx.emb);
                cross_entropy(&h.logits_with_norms(&cos, &y, &norms()), &y)
            },
        );
        let yl = &sampled.labels;
        assert_same(
            &format!("{cfg:?} partial fc"),
            head.as_mut(),
            &inputs,
            &|h| {
                let cos = fx.classifier.cosines_sampled(&fx.emb, &sampled);
                margin_cross_entropy_with_norms(h, &cos, yl, &norms())
            },
            &|h| {
                let cos = fx.classifier.cosines_sampled(&fx.emb, &sampled);
                cross_entropy(&h.logits_with_norms(&cos, yl, &norms()), yl)
            },
        );
    }
}

#[test]
fn softmax_matches_over_the_linear_classifier() {
    facerec_loss_heads::margin_ce::set_fused_min_elements(0);
    let mut vs = nn::VarStore::new(Device::Cpu);
    vs.set_kind(Kind::Double);
    let clf = LinearClassifier::new(&vs.root(), C, D);
    let emb = randn(5, &[B, D]).set_requires_grad(true);
    let y = labels();
    let mut head = HeadConfig::Softmax(Default::default()).build();
    assert_same(
        "softmax linear",
        head.as_mut(),
        &[&emb, clf.weight(), clf.bias()],
        &|h| margin_cross_entropy(h, &clf.scores(&emb), &y),
        &|h| cross_entropy(&h.logits(&clf.scores(&emb), &y), &y),
    );
}

#[test]
fn f32_matches_the_unfused_loss() {
    facerec_loss_heads::margin_ce::set_fused_min_elements(0);
    let y = labels();
    for cfg in heads() {
        let mut head = cfg.build();
        let cos = cosines().to_kind(Kind::Float).set_requires_grad(true);
        head.set_step(5);
        let a = margin_cross_entropy(head.as_ref(), &cos, &y);
        head.set_step(5);
        let b = cross_entropy(&head.logits(&cos, &y), &y);
        assert_eq!(a.kind(), Kind::Float);
        compare("f32 loss", &a, &b, 1e-6, 1e-5).unwrap();
        let ga = analytic_gradients(&a, &[&cos]).remove(0);
        let gb = analytic_gradients(&b, &[&cos]).remove(0);
        compare(&format!("{cfg:?} f32 gradient"), &ga, &gb, 1e-7, 1e-4).unwrap();
    }
}

#[test]
fn value_without_autograd_matches() {
    facerec_loss_heads::margin_ce::set_fused_min_elements(0);
    let y = labels();
    let cos = cosines();
    for cfg in heads() {
        let mut head = cfg.build();
        head.set_step(2);
        let a = tch::no_grad(|| margin_cross_entropy(head.as_ref(), &cos, &y));
        head.set_step(2);
        let b = cross_entropy(&head.logits(&cos, &y), &y);
        assert!(!a.requires_grad());
        both(&a, &b, &format!("{cfg:?} no_grad"));
    }
}

/// A head that does not promise the row-scaled form (it mixes columns) takes the unfused path.
#[derive(Debug)]
struct ColumnMixing;

impl MarginHead for ColumnMixing {
    fn logits(&self, cos_bc: &Tensor, _labels_b: &Tensor) -> Tensor {
        cos_bc * 4.0 + cos_bc.mean_dim(Some([1i64].as_slice()), true, Kind::Double)
    }
}

#[test]
fn heads_without_the_row_scaled_form_fall_back() {
    facerec_loss_heads::margin_ce::set_fused_min_elements(0);
    let y = labels();
    let mut head = ColumnMixing;
    let cos = cosines().set_requires_grad(true);
    assert_same(
        "fallback",
        &mut head,
        &[&cos],
        &|h| margin_cross_entropy(h, &cos, &y),
        &|h| cross_entropy(&h.logits(&cos, &y), &y),
    );
}

/// Finite differences of the fused loss through the classifier (every mode with a true gradient;
/// the `detached` modes are by design not the derivative of their loss, and are covered by the
/// comparisons with the unfused path above).
#[test]
fn fused_loss_passes_finite_difference_checks() {
    facerec_loss_heads::margin_ce::set_fused_min_elements(0);
    let fx = full();
    let y = labels();
    let inputs = [("emb", &fx.emb), ("weight", fx.classifier.weight())];
    for cfg in heads() {
        let detached = format!("{cfg:?}").contains("Detached");
        if detached || cfg.classifier_kind() == ClassifierKind::Linear {
            continue;
        }
        // ElasticFace draws its margins per call: every evaluation re-seeds to the same step.
        let head = RefCell::new(cfg.build());
        let f = || {
            head.borrow_mut().set_step(3);
            let head = head.borrow();
            let norms = fx.emb.norm_scalaropt_dim(2, [1], false);
            margin_cross_entropy_with_norms(
                head.as_ref(),
                &fx.classifier.cosines(&fx.emb),
                &y,
                &norms,
            )
        };
        check_gradients(f, &inputs, &GradCheck::default())
            .unwrap_or_else(|e| panic!("{cfg:?}: {e:#}"));
    }
}
