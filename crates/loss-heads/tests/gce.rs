//! GCE (`src/gce.rs`): oracle parity with `data-scripts/gce_oracle.py` (f64 1e-5, f32 1e-4
//! relative; loss and gradients w.r.t. embeddings and class weights, with and without prototype
//! replacement); f64 finite-difference gradient checks; the reduction to margin softmax (ArcFace,
//! CosFace) at `ω = 0`; brute-force agreement of the fast `O(BC + B²)` computation with a plain
//! loop; stability at `s = 64` with cosines at ±1 in f32 and f64; the seeded replacement draw;
//! Partial FC; the config.

use facerec_loss_heads::{
    cross_entropy, ArcFaceConfig, ArcFaceGradient, CosFaceConfig, CosineClassifier, Gce, GceConfig,
    HeadConfig, MarginForm, OutGradient, OutWeight, PairwiseConfig, PartialFc, PartialFcConfig,
    Replacement, SelfPair,
};
use facerec_testkit::gradcheck::{check_gradients, GradCheck};
use facerec_testkit::{floats, randn_vec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::f64::consts::PI;
use tch::{nn, Device, Kind, Tensor};

const B: i64 = 6;
const C: i64 = 5;
const D: i64 = 8;
/// Classes 0 and 1 occur twice (replaceable), 3 and 4 once, 2 not at all.
const LABELS: [i64; 6] = [0, 1, 1, 3, 0, 4];

fn to_vec(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.detach().to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

/// Embeddings `[B, D]` and a classifier whose prototypes lean towards their samples, in `kind`.
struct Fixture {
    _vs: nn::VarStore,
    classifier: CosineClassifier,
    emb: Tensor,
    labels: Tensor,
}

fn emb_values() -> Vec<f64> {
    randn_vec(11, (B * D) as usize)
}

fn weight_values() -> Vec<f64> {
    let emb = emb_values();
    let noise = randn_vec(12, (C * D) as usize);
    let mut w = noise.iter().map(|v| 0.8 * v).collect::<Vec<_>>();
    for (i, &y) in LABELS.iter().enumerate() {
        for d in 0..D as usize {
            w[y as usize * D as usize + d] += emb[i * D as usize + d];
        }
    }
    w
}

fn fixture(kind: Kind) -> Fixture {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let classifier = CosineClassifier::new(&vs.root(), C, D);
    vs.set_kind(kind);
    let mut weight = classifier.weight().shallow_clone();
    let w = Tensor::from_slice(&weight_values())
        .view([C, D])
        .to_kind(kind);
    tch::no_grad(|| weight.copy_(&w));
    let emb = Tensor::from_slice(&emb_values())
        .view([B, D])
        .to_kind(kind)
        .set_requires_grad(true);
    Fixture {
        _vs: vs,
        classifier,
        emb,
        labels: Tensor::from_slice(&LABELS),
    }
}

fn replacement() -> Replacement {
    Replacement {
        classes: vec![0, 1],
        samples: vec![4, 1],
        copies: Vec::new(),
    }
}

impl Fixture {
    fn loss(&self, gce: &Gce, rep: &Replacement) -> Tensor {
        let cos = self.classifier.cosines(&self.emb);
        gce.loss_with_replacement(&cos, &self.labels, &self.emb, rep)
    }

    fn grads(&self, gce: &Gce, rep: &Replacement) -> (f64, Vec<f64>, Vec<f64>) {
        let loss = self.loss(gce, rep);
        let g = Tensor::run_backward(
            &[&loss],
            &[&self.emb, self.classifier.weight()],
            false,
            false,
        );
        (loss.double_value(&[]), to_vec(&g[0]), to_vec(&g[1]))
    }
}

/// The configurations every proof runs over (name, config, replacement).
fn cases(s: f64) -> Vec<(String, GceConfig, Replacement)> {
    // The live out-sample gradient (the true gradient of the value); the default, detached, is
    // checked against the oracle in `gce_matches_the_oracle_at_the_lfw_recipe_values`.
    let base = GceConfig {
        s,
        out_gradient: OutGradient::Live,
        ..Default::default()
    };
    let none = Replacement::default();
    let mut v = vec![
        (
            "default, no replacement".to_string(),
            base.clone(),
            none.clone(),
        ),
        ("default, replacement".into(), base.clone(), replacement()),
        (
            "live replacement, keep_prototype".into(),
            GceConfig {
                pairwise: PairwiseConfig {
                    detach: false,
                    ..Default::default()
                },
                ..base.clone()
            },
            replacement(),
        ),
        (
            "live replacement, drop".into(),
            GceConfig {
                pairwise: PairwiseConfig {
                    detach: false,
                    self_pair: SelfPair::Drop,
                    ..Default::default()
                },
                ..base.clone()
            },
            replacement(),
        ),
        (
            "additive margins, omega 1, same_class_out".into(),
            GceConfig {
                target_form: MarginForm::Additive,
                m_t: 0.35,
                nontarget_form: MarginForm::Additive,
                m_n: 0.15,
                out_weight: OutWeight::Value(1.0),
                same_class_out: true,
                ..base.clone()
            },
            replacement(),
        ),
        (
            "easy margin, omega 0.3, term 1 only".into(),
            GceConfig {
                gradient: ArcFaceGradient::EasyMargin,
                out_weight: OutWeight::Value(0.3),
                term1_weight: 1.0,
                term2_weight: 0.0,
                ..base.clone()
            },
            none.clone(),
        ),
        (
            "angular m_n 0.3, term 2 only, drop".into(),
            GceConfig {
                m_n: 0.3,
                term1_weight: 0.0,
                term2_weight: 1.0,
                pairwise: PairwiseConfig {
                    self_pair: SelfPair::Drop,
                    ..Default::default()
                },
                ..base.clone()
            },
            replacement(),
        ),
    ];
    // The detached ArcFace treatment is not the gradient of its forward value: oracle only.
    v.push((
        "detached gradient".into(),
        GceConfig {
            gradient: ArcFaceGradient::Detached,
            ..base
        },
        replacement(),
    ));
    v
}

fn oracle(request: &Value) -> Value {
    facerec_testkit::oracle("gce_oracle.py", request)
}

/// `|a − e| ≤ rtol·|e| + rtol·1e-2·max|e|` (an absolute floor scaled to the largest entry).
fn check(what: &str, actual: &[f64], expected: &[f64], rtol: f64) {
    facerec_testkit::assert_close(what, actual, expected, rtol, 0.0);
}

/// Loss and gradients w.r.t. embeddings and weights against the oracle, s = 64 and s = 16,
/// f64 and f32.
#[test]
fn gce_matches_the_oracle() {
    let rows = |v: Vec<f64>, n: i64| json!(v.chunks(n as usize).collect::<Vec<_>>());
    let mut ours = Vec::new();
    let mut request = Vec::new();
    for kind in [Kind::Double, Kind::Float] {
        let fx = fixture(kind);
        for s in [64.0, 16.0] {
            for (name, cfg, rep) in cases(s) {
                let gce = Gce::new(&cfg);
                ours.push((format!("{name} s={s} {kind:?}"), kind, fx.grads(&gce, &rep)));
                request.push(json!({
                    "dtype": if kind == Kind::Double { "float64" } else { "float32" },
                    "emb": rows(to_vec(&fx.emb), D),
                    "weight": rows(to_vec(fx.classifier.weight()), D),
                    "labels": LABELS,
                    "cfg": serde_json::to_value(&cfg).unwrap(),
                    "replacement": { "classes": rep.classes, "samples": rep.samples },
                }));
            }
        }
    }
    let answer = oracle(&json!({ "cases": request }));
    let answers = answer["cases"].as_array().unwrap();
    assert_eq!(answers.len(), ours.len());
    for ((name, kind, (loss, ge, gw)), ans) in ours.iter().zip(answers) {
        let rtol = if *kind == Kind::Double { 1e-5 } else { 1e-4 };
        check(
            &format!("{name}: loss"),
            &[*loss],
            &[ans["loss"].as_f64().unwrap()],
            rtol,
        );
        check(
            &format!("{name}: d/demb"),
            ge,
            &floats(&ans["grad_emb"]),
            rtol,
        );
        check(
            &format!("{name}: d/dweight"),
            gw,
            &floats(&ans["grad_weight"]),
            rtol,
        );
    }
    eprintln!("{} GCE cases match the oracle", ours.len());
}

/// The shipped LFW recipe's GCE (`s = 32`, `m_t = 0.5`, `m_n = 0.1`, `ω = 1/(B − 1)`) at a
/// realistic class count, C = 1,000, B = 16 (three classes twice, one three times): loss and
/// gradients against `data-scripts/gce_oracle.py` (its row-at-a-time enumeration), with and
/// without replacement, live and detached out-sample sums, f64 (1e-5) and f32 (1e-4). The
/// class-weight gradient is compared on 23 rows (the batch's 11 classes and 12 others; the
/// oracle returns only those, to keep its frozen answer small). Prototypes lean towards their
/// samples, so target cosines sit well above the non-targets (about ±0.25), as in training.
#[test]
fn gce_matches_the_oracle_at_the_lfw_recipe_values() {
    const BB: i64 = 16;
    const CC: i64 = 1000;
    const DD: i64 = 16;
    let labels: Vec<i64> = vec![0, 1, 1, 3, 0, 999, 500, 3, 42, 42, 42, 7, 640, 128, 9, 77];
    let emb_v = randn_vec(21, (BB * DD) as usize);
    let mut w_v = randn_vec(22, (CC * DD) as usize);
    for (i, &y) in labels.iter().enumerate() {
        for d in 0..DD as usize {
            w_v[y as usize * DD as usize + d] += 1.2 * emb_v[i * DD as usize + d];
        }
    }
    let recipe = GceConfig {
        s: 32.0,
        m_t: 0.5,
        m_n: 0.1,
        out_gradient: OutGradient::Live,
        ..Default::default()
    };
    assert_eq!(
        recipe.out_weight,
        OutWeight::Rule(facerec_loss_heads::OutWeightRule::InverseBatch)
    );
    let rep = Replacement {
        classes: vec![1, 42],
        samples: vec![2, 9],
        copies: Vec::new(),
    };
    let configs = [
        (
            "recipe, no replacement",
            recipe.clone(),
            Replacement::default(),
        ),
        ("recipe, replacement", recipe.clone(), rep.clone()),
        (
            "recipe, live replacement, drop",
            GceConfig {
                pairwise: PairwiseConfig {
                    detach: false,
                    self_pair: SelfPair::Drop,
                    ..Default::default()
                },
                ..recipe.clone()
            },
            rep.clone(),
        ),
        (
            "recipe, out-sample sums detached, replacement",
            GceConfig {
                out_gradient: OutGradient::Detached,
                ..recipe.clone()
            },
            rep,
        ),
    ];
    let rows = |v: Vec<f64>, n: i64| json!(v.chunks(n as usize).collect::<Vec<_>>());
    let mut weight_rows: Vec<i64> = labels.clone();
    weight_rows.sort_unstable();
    weight_rows.dedup();
    weight_rows.extend([2, 4, 5, 100, 250, 333, 498, 501, 700, 871, 998, 6]);
    let pick = |g: &Tensor| to_vec(&g.index_select(0, &Tensor::from_slice(&weight_rows)));
    let (mut ours, mut request) = (Vec::new(), Vec::new());
    for kind in [Kind::Double, Kind::Float] {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let classifier = CosineClassifier::new(&vs.root(), CC, DD);
        vs.set_kind(kind);
        let mut weight = classifier.weight().shallow_clone();
        let w = Tensor::from_slice(&w_v).view([CC, DD]).to_kind(kind);
        tch::no_grad(|| weight.copy_(&w));
        let emb = Tensor::from_slice(&emb_v)
            .view([BB, DD])
            .to_kind(kind)
            .set_requires_grad(true);
        let labels_t = Tensor::from_slice(&labels);
        for (name, cfg, rep) in &configs {
            let gce = Gce::new(cfg);
            let cos = classifier.cosines(&emb);
            let loss = gce.loss_with_replacement(&cos, &labels_t, &emb, rep);
            let g = Tensor::run_backward(&[&loss], &[&emb, classifier.weight()], false, false);
            ours.push((
                format!("{name} {kind:?}"),
                kind,
                loss.double_value(&[]),
                to_vec(&g[0]),
                pick(&g[1]),
            ));
            request.push(json!({
                "dtype": if kind == Kind::Double { "float64" } else { "float32" },
                "emb": rows(to_vec(&emb), DD),
                "weight": rows(to_vec(classifier.weight()), DD),
                "labels": labels,
                "cfg": serde_json::to_value(cfg).unwrap(),
                "replacement": { "classes": rep.classes, "samples": rep.samples },
                "grad_weight_rows": weight_rows,
            }));
        }
        // The regime the fixture is meant to have.
        let cos = classifier.cosines(&emb);
        let t = to_vec(&cos.gather(1, &labels_t.view([BB, 1]), false));
        let mean_t = t.iter().sum::<f64>() / t.len() as f64;
        assert!((0.4..0.9).contains(&mean_t), "mean target cosine {mean_t}");
    }
    let answer = oracle(&json!({ "cases": request }));
    let answers = answer["cases"].as_array().unwrap();
    assert_eq!(answers.len(), ours.len());
    for ((name, kind, loss, ge, gw), ans) in ours.iter().zip(answers) {
        let rtol = if *kind == Kind::Double { 1e-5 } else { 1e-4 };
        let expected = ans["loss"].as_f64().unwrap();
        check(&format!("{name}: loss"), &[*loss], &[expected], rtol);
        check(
            &format!("{name}: d/demb"),
            ge,
            &floats(&ans["grad_emb"]),
            rtol,
        );
        check(
            &format!("{name}: d/dweight"),
            gw,
            &floats(&ans["grad_weight"]),
            rtol,
        );
        eprintln!("{name}: loss {loss:.6} (oracle {expected:.6})");
    }
}

/// `out_gradient = "detached"` (the default since issue 17; it was `"live"`, which fails this test)
/// keeps the loss value, and the gradient that reaches sample `k`'s similarities is exactly that
/// of its own two terms, `(w1·L1_k + w2·L2_k)/B`, differentiated with the live head (its `terms`)
/// and read at row `k`; under `"live"` row `k` also receives the other anchors' gradient, so the
/// two differ.
#[test]
fn detached_out_sums_keep_the_value_and_localise_the_gradient() {
    let (b, c) = (10, 40);
    let labels: Vec<i64> = vec![0, 3, 3, 7, 12, 12, 12, 20, 33, 39];
    let labels = Tensor::from_slice(&labels);
    let base = random_cos(5, b, c, -0.4, 0.9);
    let live = Gce::new(&GceConfig {
        s: 32.0,
        out_gradient: OutGradient::Live,
        ..Default::default()
    });
    // The default config: the detached out-sample sums.
    let det = Gce::new(&GceConfig {
        s: 32.0,
        ..Default::default()
    });
    let cos = base.copy().set_requires_grad(true);
    let l_det = det.loss(&cos, &labels);
    let g_det = Tensor::run_backward(&[&l_det], &[&cos], false, false).remove(0);
    let cos2 = base.copy().set_requires_grad(true);
    let l_live = live.loss(&cos2, &labels);
    let g_live = Tensor::run_backward(&[&l_live], &[&cos2], false, false).remove(0);
    let (vd, vl) = (l_det.double_value(&[]), l_live.double_value(&[]));
    assert!((vd - vl).abs() <= 1e-12 * vl.abs(), "value {vd} vs {vl}");
    let mut max_diff_live = 0.0f64;
    for k in 0..b {
        let cos3 = base.copy().set_requires_grad(true);
        let (l1, l2) = live.terms(&cos3, &labels, None);
        let own = (l1.get(k) * 0.5 + l2.get(k) * 0.5) / b as f64;
        let g_own = Tensor::run_backward(&[&own], &[&cos3], false, false).remove(0);
        let expected = to_vec(&g_own.get(k));
        check(
            &format!("row {k}"),
            &to_vec(&g_det.get(k)),
            &expected,
            1e-10,
        );
        let lv = to_vec(&g_live.get(k));
        let d = lv
            .iter()
            .zip(&expected)
            .map(|(a, e)| (a - e).abs())
            .fold(0.0, f64::max);
        max_diff_live = max_diff_live.max(d);
    }
    assert!(
        max_diff_live > 1e-3,
        "live gradient should differ: {max_diff_live}"
    );
}

/// Finite differences in f64 through embeddings -> classifier -> (replacement) -> GCE.
#[test]
fn gce_gradients_match_finite_differences() {
    let fx = fixture(Kind::Double);
    for (name, cfg, rep) in cases(16.0) {
        // Detached parts (the ArcFace `detached` treatment, a detached replacement feature) are
        // not the gradient of the forward value; the oracle checks those.
        if cfg.gradient == ArcFaceGradient::Detached || (cfg.pairwise.detach && !rep.is_empty()) {
            continue;
        }
        let gce = Gce::new(&cfg);
        let inputs = [("emb", &fx.emb), ("weight", fx.classifier.weight())];
        check_gradients(|| fx.loss(&gce, &rep), &inputs, &GradCheck::default())
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    }
}

fn random_cos(seed: u64, b: i64, c: i64, lo: f64, hi: f64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f64> = (0..b * c).map(|_| rng.gen_range(lo..hi)).collect();
    Tensor::from_slice(&v).view([b, c])
}

/// `ω = 0`, no replacement, no non-target margin: the loss and its gradient are those of the
/// existing margin heads' cross-entropy (ArcFace in every gradient mode; CosFace).
#[test]
fn omega_zero_is_margin_softmax() {
    let labels = Tensor::from_slice(&[3i64, 0, 7, 7, 2, 9, 1, 0]);
    let cos = random_cos(5, 8, 10, -0.95, 0.95).set_requires_grad(true);
    for s in [64.0, 30.0] {
        let mut pairs: Vec<(GceConfig, HeadConfig)> = Vec::new();
        for g in [
            ArcFaceGradient::Exact,
            ArcFaceGradient::EasyMargin,
            ArcFaceGradient::Detached,
        ] {
            pairs.push((
                GceConfig {
                    s,
                    gradient: g,
                    ..Default::default()
                },
                HeadConfig::Arcface(ArcFaceConfig {
                    s,
                    m: 0.5,
                    gradient: g,
                }),
            ));
        }
        pairs.push((
            GceConfig {
                s,
                m_t: 0.35,
                target_form: MarginForm::Additive,
                ..Default::default()
            },
            HeadConfig::Cosface(CosFaceConfig { s, m: 0.35 }),
        ));
        for (mut cfg, head) in pairs {
            cfg.m_n = 0.0;
            cfg.out_weight = OutWeight::Value(0.0);
            cfg.pairwise.rate = 0.0;
            for (w1, w2) in [(0.5, 0.5), (1.0, 0.0), (0.0, 1.0)] {
                cfg.term1_weight = w1;
                cfg.term2_weight = w2;
                let mut gce = Gce::new(&cfg);
                gce.set_step(3);
                let ours = gce.step_loss(
                    &cos,
                    &labels,
                    &Tensor::zeros([8, 4], (Kind::Double, Device::Cpu)),
                );
                let theirs = cross_entropy(&head.build().logits(&cos, &labels), &labels);
                let g1 = Tensor::run_backward(&[&ours], &[&cos], false, false);
                let g2 = Tensor::run_backward(&[&theirs], &[&cos], false, false);
                let what = format!("{cfg:?} vs {head:?}");
                check(
                    &what,
                    &[ours.double_value(&[])],
                    &[theirs.double_value(&[])],
                    1e-12,
                );
                check(&what, &to_vec(&g1[0]), &to_vec(&g2[0]), 1e-10);
            }
        }
    }
}

/// GCE through the `MarginHead` trait: `training_loss` is `step_loss`; the logits' cross-entropy is GCE
/// at ω = 0 without replacement, and with m_n = 0 the logits are ArcFace's.
#[test]
fn margin_head_interface() {
    use facerec_loss_heads::MarginHead;
    let labels = Tensor::from_slice(&[3i64, 0, 7, 7, 2, 9, 1, 0]);
    let cos = random_cos(8, 8, 10, -0.95, 0.95);
    let emb = Tensor::from_slice(&randn_vec(9, (8 * 4) as usize)).view([8, 4]);
    let norms = emb.norm_scalaropt_dim(2, [1], false);
    let cfg = GceConfig {
        pairwise: PairwiseConfig {
            rate: 1.0,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut direct = Gce::new(&cfg);
    let mut boxed: Box<dyn MarginHead> = Box::new(Gce::new(&cfg));
    direct.set_step(7);
    boxed.set_step(7);
    let a = direct.step_loss(&cos, &labels, &emb).double_value(&[]);
    let b = boxed
        .training_loss(&cos, &labels, &emb, &norms)
        .double_value(&[]);
    assert_eq!(a, b);
    let zero = Gce::new(&GceConfig {
        out_weight: OutWeight::Value(0.0),
        ..cfg.clone()
    });
    let ce = cross_entropy(&zero.logits(&cos, &labels), &labels).double_value(&[]);
    check(
        "logits CE",
        &[ce],
        &[zero.loss(&cos, &labels).double_value(&[])],
        1e-12,
    );
    let arc = Gce::new(&GceConfig { m_n: 0.0, ..cfg });
    let want = HeadConfig::Arcface(ArcFaceConfig::default())
        .build()
        .logits(&cos, &labels);
    check(
        "logits",
        &to_vec(&arc.logits(&cos, &labels)),
        &to_vec(&want),
        1e-12,
    );
    // The default `loss` of the other heads is their cross-entropy.
    let mut head = HeadConfig::Arcface(ArcFaceConfig::default()).build();
    let l = head
        .training_loss(&cos, &labels, &emb, &norms)
        .double_value(&[]);
    check(
        "default loss",
        &[l],
        &[cross_entropy(&want, &labels).double_value(&[])],
        1e-15,
    );
}

/// Plain-loop GCE over a cosine matrix (SPEC 5 written as sums, stable logsumexp), per sample.
fn naive_terms(
    cos: &[f64],
    c: usize,
    labels: &[i64],
    valid: &[bool],
    cfg: &GceConfig,
) -> (Vec<f64>, Vec<f64>) {
    let b = labels.len();
    let s = cfg.s;
    let tgt = |x: f64| match cfg.target_form {
        MarginForm::Additive => x - cfg.m_t,
        MarginForm::Angular => {
            let m = cfg.m_t;
            if x > (PI - m).cos() {
                (x.clamp(-1.0 + 1e-7, 1.0 - 1e-7).acos() + m).cos()
            } else {
                x - m * m.sin()
            }
        }
    };
    let non = |x: f64| match cfg.nontarget_form {
        MarginForm::Additive => x + cfg.m_n,
        MarginForm::Angular => (x.clamp(-1.0 + 1e-7, 1.0 - 1e-7).acos() - cfg.m_n)
            .max(0.0)
            .cos(),
    };
    let omega = match cfg.out_weight {
        OutWeight::Value(w) => w,
        OutWeight::Rule(_) => 1.0 / (b as f64 - 1.0),
    };
    let lse = |v: &[f64]| {
        let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
    };
    let t: Vec<f64> = (0..b)
        .map(|k| tgt(cos[k * c + labels[k] as usize]))
        .collect();
    let negs = |k: usize| -> Vec<f64> {
        (0..c)
            .filter(|&j| j as i64 != labels[k])
            .map(|j| s * non(cos[k * c + j]))
            .collect()
    };
    let out = |i: usize| -> Vec<usize> {
        if omega == 0.0 {
            return vec![];
        }
        (0..b)
            .filter(|&k| k != i && (cfg.same_class_out || labels[k] != labels[i]))
            .collect()
    };
    let (mut l1, mut l2) = (Vec::new(), Vec::new());
    for i in 0..b {
        let mut v1 = vec![0.0];
        v1.extend(negs(i).iter().map(|n| n - s * t[i]));
        for k in out(i) {
            v1.extend(negs(k).iter().map(|n| n + omega.ln() - s * t[i]));
        }
        l1.push(lse(&v1));
        let mut pos = vec![-s * t[i]];
        pos.extend(
            out(i)
                .into_iter()
                .filter(|&k| valid[k])
                .map(|k| -s * t[k] + omega.ln()),
        );
        let mut v2 = vec![0.0];
        for n in negs(i) {
            v2.extend(pos.iter().map(|p| n + p));
        }
        l2.push(lse(&v2));
    }
    (l1, l2)
}

/// The fast computation agrees with the plain loop, per sample, on small random inputs,
/// including extreme cosines (±1) at s = 64 and a drop mask.
#[test]
fn fast_terms_match_a_plain_loop() {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    for trial in 0..12u64 {
        let b = rng.gen_range(2..9usize);
        let c = rng.gen_range(2..12usize);
        let labels: Vec<i64> = (0..b).map(|_| rng.gen_range(0..c as i64)).collect();
        let mut cos: Vec<f64> = (0..b * c).map(|_| rng.gen_range(-1.0..1.0)).collect();
        if trial % 3 == 0 {
            for x in cos.iter_mut() {
                *x = if rng.gen::<bool>() { 1.0 } else { -1.0 };
            }
        }
        let valid: Vec<bool> = (0..b).map(|k| trial % 2 == 0 || k % 3 != 1).collect();
        // At exactly ±1 the eps clamps (1e-7 on the cosine, 1e-7 under the square root of the
        // sine) of the two computations differ by O(s·1e-7); elsewhere they agree to rounding.
        let rtol = if trial % 3 == 0 { 2e-6 } else { 1e-12 };
        let mut cfgs = cases(64.0).into_iter().map(|c| c.1).collect::<Vec<_>>();
        cfgs.retain(|c| c.gradient == ArcFaceGradient::Exact);
        for cfg in cfgs {
            let gce = Gce::new(&cfg);
            let cos_t = Tensor::from_slice(&cos).view([b as i64, c as i64]);
            let valid_t =
                Tensor::from_slice(&valid.iter().map(|&v| v as i64 as f64).collect::<Vec<_>>());
            let (l1, l2) = gce.terms(&cos_t, &Tensor::from_slice(&labels), Some(&valid_t));
            let (e1, e2) = naive_terms(&cos, c, &labels, &valid, &cfg);
            let what = format!("trial {trial} {cfg:?}");
            check(&format!("{what} L1"), &to_vec(&l1), &e1, rtol);
            check(&format!("{what} L2"), &to_vec(&l2), &e2, rtol);
        }
    }
}

/// s = 64 with every cosine at ±1 (targets at −1 against non-targets at +1 and the reverse),
/// f32 and f64: finite loss and gradients, the f32 loss within 3e-5 (relative) of the f64 one, and the
/// value of the worst rows equal to the plain loop's.
#[test]
fn stable_at_s64_with_extreme_cosines() {
    let (b, c) = (6i64, 9i64);
    let labels: Vec<i64> = vec![0, 0, 4, 4, 8, 2];
    let mut v = Vec::new();
    for i in 0..b {
        for j in 0..c {
            let target = labels[i as usize] == j;
            let hard = i % 2 == 0;
            v.push(if target == hard { -1.0 } else { 1.0 });
        }
    }
    for cfg in cases(64.0).into_iter().map(|c| c.1) {
        let gce = Gce::new(&cfg);
        let mut losses = Vec::new();
        for kind in [Kind::Double, Kind::Float] {
            let cos = Tensor::from_slice(&v)
                .view([b, c])
                .to_kind(kind)
                .set_requires_grad(true);
            let loss = gce.loss(&cos, &Tensor::from_slice(&labels));
            let g = Tensor::run_backward(&[&loss], &[&cos], false, false);
            assert!(loss.double_value(&[]).is_finite(), "{cfg:?} {kind:?}");
            assert_eq!(
                g[0].isfinite().all().int64_value(&[]),
                1,
                "{cfg:?} {kind:?}: {:?}",
                g[0]
            );
            losses.push(loss.double_value(&[]));
        }
        assert!(losses[0] > 50.0, "hard rows must cost ~s: {losses:?}");
        // The only f32/f64 gap is the eps clamp at ±1 (`1 − 1e-7` rounds in f32, which moves
        // sin θ from 4.5e-4 to 4.9e-4: s·sin(m)·4e-5 per wrapped target).
        check(
            &format!("{cfg:?} f32 vs f64"),
            &[losses[1]],
            &[losses[0]],
            3e-5,
        );
        if cfg.gradient != ArcFaceGradient::Exact {
            continue; // the plain loop implements the exact treatment only
        }
        let (e1, e2) = naive_terms(&v, c as usize, &labels, &[true; 6], &cfg);
        let expected: f64 = e1
            .iter()
            .zip(&e2)
            .map(|(a, b)| cfg.term1_weight * a + cfg.term2_weight * b)
            .sum::<f64>()
            / b as f64;
        // The eps clamps differ by O(s·1e-7) at exactly ±1 (see the plain-loop test).
        check(&format!("{cfg:?} vs loop"), &[losses[0]], &[expected], 1e-6);
    }
}

/// The replaced column is the similarity to the chosen sample's feature, except the self-pair.
#[test]
fn replacement_rewrites_columns_and_keeps_the_self_pair() {
    let fx = fixture(Kind::Double);
    let cos = fx.classifier.cosines(&fx.emb);
    let gce = Gce::new(&GceConfig::default());
    let rep = replacement();
    let (new, valid) = gce.replace_prototypes(&cos, &fx.emb, &rep);
    assert_eq!(to_vec(&valid), vec![1.0; B as usize]);
    let x = &fx.emb / fx.emb.norm_scalaropt_dim(2, [1], true);
    let pair = x.matmul(&x.tr());
    for (&c, &j) in rep.classes.iter().zip(&rep.samples) {
        for i in 0..B {
            let got = new.double_value(&[i, c]);
            let want = if i == j {
                cos.double_value(&[i, c])
            } else {
                pair.double_value(&[i, j])
            };
            assert!(
                (got - want).abs() < 1e-12,
                "S[{i},{c}] = {got}, want {want}"
            );
        }
    }
    // Untouched columns.
    for c in [2, 3, 4] {
        for i in 0..B {
            assert_eq!(new.double_value(&[i, c]), cos.double_value(&[i, c]));
        }
    }
    let drop = Gce::new(&GceConfig {
        pairwise: PairwiseConfig {
            self_pair: SelfPair::Drop,
            ..Default::default()
        },
        ..Default::default()
    });
    let (_, valid) = drop.replace_prototypes(&cos, &fx.emb, &rep);
    assert_eq!(to_vec(&valid), vec![1.0, 0.0, 1.0, 1.0, 0.0, 1.0]);
}

/// The draw depends only on (seed, step, labels); rate 1 replaces every eligible class by one of
/// its own samples; `min_count` is respected.
#[test]
fn replacement_draw_is_seeded_and_eligible() {
    // A P x K batch: 8 identities x 4 images, interleaved.
    let labels: Vec<i64> = (0..32).map(|k| 10 + (k % 8) * 3).collect();
    let labels_t = Tensor::from_slice(&labels);
    let draw = |seed: u64, step: u64, rate: f64, min_count: usize, labels: &Tensor| {
        let mut gce = Gce::new(&GceConfig {
            pairwise: PairwiseConfig {
                rate,
                min_count,
                seed,
                ..Default::default()
            },
            ..Default::default()
        });
        gce.set_step(step);
        gce.draw_replacement(labels)
    };
    let a = draw(1, 5, 0.5, 2, &labels_t);
    assert_eq!(a, draw(1, 5, 0.5, 2, &labels_t), "same seed and step");
    let steps: Vec<Replacement> = (0..20).map(|s| draw(1, s, 0.5, 2, &labels_t)).collect();
    assert!(
        steps.iter().any(|r| r != &a),
        "the draw must change with the step"
    );
    let sizes: usize = steps.iter().map(|r| r.classes.len()).sum();
    assert!(
        (40..=120).contains(&sizes),
        "rate 0.5 of 8 classes x 20 steps: {sizes}"
    );
    let all = draw(2, 0, 1.0, 2, &labels_t);
    assert_eq!(all.classes, (0..8).map(|k| 10 + 3 * k).collect::<Vec<_>>());
    for (&c, &j) in all.classes.iter().zip(&all.samples) {
        assert_eq!(labels[j as usize], c, "sample {j} must belong to class {c}");
    }
    // Singletons are not eligible under min_count 2, and are under 1.
    let single = Tensor::from_slice(&[1i64, 2, 2, 3]);
    assert_eq!(draw(0, 0, 1.0, 2, &single).classes, vec![2]);
    assert_eq!(draw(0, 0, 1.0, 1, &single).classes, vec![1, 2, 3]);
    assert!(draw(0, 0, 0.0, 1, &single).is_empty());
}

/// Over a Partial FC subset: scores against `W[index]` with remapped labels; replacements are
/// drawn in the remapped column space; unsampled class rows get an exactly zero gradient; the
/// loss equals GCE over the full matrix restricted to the sampled columns.
#[test]
fn works_over_a_partial_fc_subset() {
    let (classes, d) = (40i64, 8i64);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let clf = CosineClassifier::new(&vs.root(), classes, d);
    vs.set_kind(Kind::Double);
    let labels = Tensor::from_slice(&[3i64, 3, 17, 17, 25, 25, 39, 39]);
    let emb = Tensor::from_slice(&randn_vec(31, (8 * d) as usize))
        .view([8, d])
        .set_requires_grad(true);
    let mut pfc = PartialFc::new(&PartialFcConfig {
        sample_rate: 0.25,
        seed: 4,
    });
    pfc.set_step(0);
    let sampled = pfc.sample(&labels, classes);
    assert_eq!(sampled.len(), 10);
    let mut gce = Gce::new(&GceConfig {
        pairwise: PairwiseConfig {
            rate: 1.0,
            detach: false,
            ..Default::default()
        },
        ..Default::default()
    });
    gce.set_step(0);
    let rep = gce.draw_replacement(&sampled.labels);
    assert_eq!(rep.classes.len(), 4);
    let cos = clf.cosines_sampled(&emb, &sampled);
    let loss = gce.loss_with_replacement(&cos, &sampled.labels, &emb, &rep);
    let full = clf.cosines(&emb).index_select(1, &sampled.index);
    let same = gce.loss_with_replacement(&full, &sampled.labels, &emb, &rep);
    check(
        "partial fc",
        &[loss.double_value(&[])],
        &[same.double_value(&[])],
        1e-12,
    );
    let g = Tensor::run_backward(&[&loss], &[clf.weight()], false, false);
    let row_norm = to_vec(&g[0].norm_scalaropt_dim(2, [1], false));
    let sampled_rows = to_vec(&sampled.index);
    for (c, n) in row_norm.iter().enumerate() {
        if !sampled_rows.contains(&(c as f64)) {
            assert_eq!(*n, 0.0, "unsampled row {c}");
        }
    }
    assert!(row_norm.iter().all(|n| n.is_finite()));
}

#[test]
fn config_defaults_parse_and_validation() {
    let cfg: GceConfig = toml::from_str("").unwrap();
    assert_eq!(cfg, GceConfig::default());
    assert_eq!(cfg.s, 64.0);
    assert_eq!(cfg.out_weight.value(129), 1.0 / 128.0);
    let cfg: GceConfig = toml::from_str(
        "s = 32.0\nout_weight = 0.25\ntarget_form = \"additive\"\nm_t = 0.35\n\
         [pairwise]\nrate = 0.5\nself_pair = \"drop\"\ndetach = false\n",
    )
    .unwrap();
    assert_eq!(cfg.out_weight, OutWeight::Value(0.25));
    assert_eq!(cfg.pairwise.self_pair, SelfPair::Drop);
    cfg.validate().unwrap();
    assert!(toml::from_str::<GceConfig>("margin = 1.0").is_err());
    assert!(toml::from_str::<GceConfig>("[pairwise]\nprob = 1.0").is_err());
    assert!(toml::from_str::<GceConfig>("out_weight = \"inverse\"").is_err());
    let bad = |cfg: GceConfig, key: &str| {
        let e = format!("{:#}", cfg.validate().unwrap_err());
        assert!(e.starts_with(key), "{e}");
    };
    bad(
        GceConfig {
            s: 0.0,
            ..Default::default()
        },
        "s ",
    );
    bad(
        GceConfig {
            m_n: 4.0,
            ..Default::default()
        },
        "m_n ",
    );
    bad(
        GceConfig {
            out_weight: OutWeight::Value(-1.0),
            ..Default::default()
        },
        "out_weight ",
    );
    bad(
        GceConfig {
            pairwise: PairwiseConfig {
                rate: 1.5,
                ..Default::default()
            },
            ..Default::default()
        },
        "pairwise.rate ",
    );
    bad(
        GceConfig {
            term1_weight: 0.0,
            term2_weight: 0.0,
            ..Default::default()
        },
        "term1_weight",
    );
}
