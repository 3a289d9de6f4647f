//! Parity with the independent oracle `data-scripts/heads_oracle.py` (torch, written from SPEC 1
//! and 2 the way the reference code computes: acos/cos over the whole matrix, one-hot masks).
//!
//! Every head and mode, in f64 (1e-5 relative) and f32 (1e-4 relative): loss, logits and the
//! gradient w.r.t. the cosines; the elastic margins after the "+" assignment; the linear
//! (softmax) classifier's gradients w.r.t. embeddings, weight and bias; and Partial FC's index and
//! remapped labels for a given uniform draw. One Python process answers all cases.

use facerec_loss_heads::{
    cross_entropy, ArcFaceConfig, ArcFaceGradient, CombinedConfig, CosFaceConfig, ElasticArcConfig,
    ElasticArcPlusConfig, ElasticCosConfig, ElasticCosPlusConfig, ElasticFace, HeadConfig,
    LinearClassifier, NormFaceConfig, PartialFc, PlusAssignment, SoftmaxConfig, SphereFaceConfig,
};
use facerec_testkit::floats;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use tch::{nn, Device, Kind, Tensor};

const B: usize = 6;
const C: usize = 7;
/// Target cosines: well aligned, moderate, near 0 (not on it), negative, past the ArcFace
/// threshold cos(π − 0.5) ≈ −0.878, and a sixth; all distinct (no ties in the "+" ranking) and
/// away from every piecewise boundary of the heads below.
const TARGETS: [f64; B] = [0.93, 0.41, 0.05, -0.3, -0.93, 0.66];
const LABELS: [i64; B] = [0, 3, 6, 2, 3, 5];

fn oracle(request: &Value) -> Value {
    facerec_testkit::oracle("heads_oracle.py", request)
}

fn cos_values() -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut v: Vec<f64> = (0..B * C).map(|_| rng.gen_range(-0.8..0.8)).collect();
    for i in 0..B {
        v[i * C + LABELS[i] as usize] = TARGETS[i];
    }
    v
}

fn rows(v: &[f64], n: usize) -> Value {
    json!(v.chunks(n).collect::<Vec<_>>())
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.detach().to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

/// `|a − e| ≤ rtol·|e| + rtol·atol_scale·max|e|`: relative, with an absolute floor scaled to the
/// largest entry (gradient entries of far-off classes are ~e^-60 and only meaningful absolutely).
fn check(what: &str, actual: &[f64], expected: &[f64], rtol: f64) {
    facerec_testkit::assert_close(what, actual, expected, rtol, 0.0);
}

struct HeadCase {
    name: String,
    cfg: HeadConfig,
    kind: Kind,
    step: u64,
    norms: Option<Vec<f64>>,
    draw: Option<Vec<f64>>,
}

impl HeadCase {
    fn request(&self) -> Value {
        let mut r = json!({
            "head": serde_json::to_value(&self.cfg).unwrap(),
            "dtype": if self.kind == Kind::Double { "float64" } else { "float32" },
            "cos": rows(&cos_values(), C),
            "labels": LABELS,
            "step": self.step,
        });
        if let Some(n) = &self.norms {
            r["norms"] = json!(n);
        }
        if let Some(d) = &self.draw {
            r["draw"] = json!(d);
        }
        r
    }

    /// Loss, logits, dL/dcos and (elastic) margins from the crate.
    fn ours(&self) -> (f64, Vec<f64>, Vec<f64>, Option<Vec<f64>>) {
        let cos = Tensor::from_slice(&cos_values())
            .view([B as i64, C as i64])
            .to_kind(self.kind)
            .set_requires_grad(true);
        let labels = Tensor::from_slice(&LABELS);
        let mut margins = None;
        let logits = match (&self.cfg, &self.draw) {
            (cfg, Some(draw)) => {
                let params = match cfg {
                    HeadConfig::ElasticArc(c) => c.params(),
                    HeadConfig::ElasticCos(c) => c.params(),
                    HeadConfig::ElasticArcPlus(c) => c.params(),
                    HeadConfig::ElasticCosPlus(c) => c.params(),
                    other => panic!("draw for {other:?}"),
                };
                let head = ElasticFace::new(&params);
                let t = cos
                    .detach()
                    .gather(1, &labels.view([B as i64, 1]), false)
                    .view([B as i64]);
                let d = Tensor::from_slice(draw).to_kind(self.kind);
                margins = Some(to_vec(&head.assign(&d, &t)));
                head.logits_with_draw(&cos, &labels, draw)
            }
            (cfg, None) => {
                let mut head = cfg.build();
                head.set_step(self.step);
                match &self.norms {
                    Some(n) => head.logits_with_norms(
                        &cos,
                        &labels,
                        &Tensor::from_slice(n).to_kind(self.kind),
                    ),
                    None => head.logits(&cos, &labels),
                }
            }
        };
        assert_eq!(logits.kind(), self.kind, "{}", self.name);
        let loss = cross_entropy(&logits, &labels);
        let grad = Tensor::run_backward(&[&loss], &[&cos], false, false).remove(0);
        (
            loss.double_value(&[]),
            to_vec(&logits),
            to_vec(&grad),
            margins,
        )
    }
}

/// Name, config, step, feature norms (SphereFace) and whether the head draws margins (elastic).
type ConfigCase = (String, HeadConfig, u64, Option<Vec<f64>>, bool);

fn head_configs() -> Vec<ConfigCase> {
    let mut v: Vec<ConfigCase> = Vec::new();
    let mut add = |name: &str, cfg: HeadConfig| v.push((name.into(), cfg, 0, None, false));
    add("softmax", HeadConfig::Softmax(SoftmaxConfig {}));
    add("normface", HeadConfig::Normface(NormFaceConfig { s: 30.0 }));
    add(
        "cosface",
        HeadConfig::Cosface(CosFaceConfig { s: 64.0, m: 0.35 }),
    );
    for g in [
        ArcFaceGradient::Exact,
        ArcFaceGradient::EasyMargin,
        ArcFaceGradient::Detached,
    ] {
        add(
            &format!("arcface {g:?}"),
            HeadConfig::Arcface(ArcFaceConfig {
                s: 64.0,
                m: 0.5,
                gradient: g,
            }),
        );
        for (m1, m2, m3) in [
            (1.0, 0.3, 0.2),
            (1.35, 0.0, 0.0),
            (0.9, 0.4, 0.15),
            (1.2, 0.2, 0.1),
        ] {
            add(
                &format!("combined ({m1}, {m2}, {m3}) {g:?}"),
                HeadConfig::Combined(CombinedConfig {
                    s: 32.0,
                    m1,
                    m2,
                    m3,
                    gradient: g,
                }),
            );
        }
    }
    for (m, step) in [(4, 0), (4, 50), (4, 100_000), (2, 10)] {
        let cfg = HeadConfig::Sphereface(SphereFaceConfig {
            m,
            s: 16.0,
            ..Default::default()
        });
        v.push((
            format!("sphereface m={m} step={step}"),
            cfg.clone(),
            step,
            None,
            false,
        ));
        let norms = vec![3.0, 0.5, 12.0, 7.5, 1.25, 20.0];
        v.push((
            format!("sphereface m={m} step={step} norms"),
            cfg,
            step,
            Some(norms),
            false,
        ));
    }
    let elastic: [(&str, HeadConfig); 6] = [
        (
            "elastic_arc",
            HeadConfig::ElasticArc(ElasticArcConfig {
                sigma: 0.1,
                ..Default::default()
            }),
        ),
        (
            "elastic_cos",
            HeadConfig::ElasticCos(ElasticCosConfig::default()),
        ),
        (
            "elastic_arc_plus paper",
            HeadConfig::ElasticArcPlus(ElasticArcPlusConfig {
                sigma: 0.1,
                ..Default::default()
            }),
        ),
        (
            "elastic_arc_plus code",
            HeadConfig::ElasticArcPlus(ElasticArcPlusConfig {
                sigma: 0.1,
                assignment: PlusAssignment::CodeFaithful,
                ..Default::default()
            }),
        ),
        (
            "elastic_cos_plus paper",
            HeadConfig::ElasticCosPlus(ElasticCosPlusConfig::default()),
        ),
        (
            "elastic_cos_plus code",
            HeadConfig::ElasticCosPlus(ElasticCosPlusConfig {
                assignment: PlusAssignment::CodeFaithful,
                ..Default::default()
            }),
        ),
    ];
    for (name, cfg) in elastic {
        v.push((name.into(), cfg, 0, None, true));
    }
    v
}

/// One Python process (importing torch takes seconds) answers all three groups.
#[test]
fn heads_linear_classifier_and_partial_fc_match_the_oracle() {
    let (heads_req, heads_check) = heads_cases();
    let (linear_req, linear_check) = linear_cases();
    let (pfc_req, pfc_check) = partial_fc_cases();
    let request = json!({ "heads": heads_req, "linear": linear_req, "partial_fc": pfc_req });
    let answer = oracle(&request);
    heads_check(&answer["heads"]);
    linear_check(&answer["linear"]);
    pfc_check(&answer["partial_fc"]);
}

type Checker = Box<dyn FnOnce(&Value)>;

fn heads_cases() -> (Vec<Value>, Checker) {
    let mut cases = Vec::new();
    for kind in [Kind::Double, Kind::Float] {
        for (k, (name, cfg, step, norms, elastic)) in head_configs().into_iter().enumerate() {
            // A fixed draw with a wide spread so the "+" permutation is visible in the logits.
            let draw = elastic.then(|| {
                let mut rng = ChaCha8Rng::seed_from_u64(100 + k as u64);
                (0..B)
                    .map(|_| rng.gen_range(0.2..0.6))
                    .collect::<Vec<f64>>()
            });
            cases.push(HeadCase {
                name: format!("{name} {kind:?}"),
                cfg,
                kind,
                step,
                norms,
                draw,
            });
        }
    }
    let request = cases.iter().map(HeadCase::request).collect();
    (
        request,
        Box::new(move |answer: &Value| check_heads(&cases, answer)),
    )
}

fn check_heads(cases: &[HeadCase], answer: &Value) {
    let answers = answer.as_array().unwrap();
    assert_eq!(answers.len(), cases.len());
    for (case, ans) in cases.iter().zip(answers) {
        let rtol = if case.kind == Kind::Double {
            1e-5
        } else {
            1e-4
        };
        let (loss, logits, grad, margins) = case.ours();
        check(
            &format!("{} loss", case.name),
            &[loss],
            &[ans["loss"].as_f64().unwrap()],
            rtol,
        );
        check(
            &format!("{} logits", case.name),
            &logits,
            &floats(&ans["logits"]),
            rtol,
        );
        check(
            &format!("{} dL/dcos", case.name),
            &grad,
            &floats(&ans["grad_cos"]),
            rtol,
        );
        if let Some(m) = margins {
            check(
                &format!("{} margins", case.name),
                &m,
                &floats(&ans["margins"]),
                rtol,
            );
        }
    }
    eprintln!("{} head cases match the oracle", cases.len());
}

fn linear_cases() -> (Vec<Value>, Checker) {
    let (b, c, d) = (5i64, 9i64, 4i64);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let emb: Vec<f64> = (0..b * d).map(|_| rng.gen_range(-2.0..2.0)).collect();
    let labels = [1i64, 8, 0, 4, 4];
    let bound = 1.0 / (d as f64).sqrt(); // nn.Linear's init range
    let weight: Vec<f64> = (0..c * d).map(|_| rng.gen_range(-bound..bound)).collect();
    let bias: Vec<f64> = (0..c).map(|_| rng.gen_range(-bound..bound)).collect();
    let mut cases = Vec::new();
    let mut request = Vec::new();
    for kind in [Kind::Double, Kind::Float] {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let clf = LinearClassifier::new(&vs.root(), c, d);
        // Fixed parameters (not libtorch's global generator), so the request and its frozen
        // answer are the same in every run.
        tch::no_grad(|| {
            clf.weight()
                .shallow_clone()
                .copy_(&Tensor::from_slice(&weight).view([c, d]));
            clf.bias().shallow_clone().copy_(&Tensor::from_slice(&bias));
        });
        vs.set_kind(kind);
        let e = Tensor::from_slice(&emb)
            .view([b, d])
            .to_kind(kind)
            .set_requires_grad(true);
        let y = Tensor::from_slice(&labels);
        let head = HeadConfig::Softmax(SoftmaxConfig {}).build();
        let loss = cross_entropy(&head.logits(&clf.scores(&e), &y), &y);
        let g = Tensor::run_backward(&[&loss], &[&e, clf.weight(), clf.bias()], false, false);
        request.push(json!({
            "dtype": if kind == Kind::Double { "float64" } else { "float32" },
            "emb": rows(&emb, d as usize),
            "weight": rows(&to_vec(clf.weight()), d as usize),
            "bias": to_vec(clf.bias()),
            "labels": labels,
        }));
        cases.push((
            kind,
            loss.double_value(&[]),
            g.iter().map(to_vec).collect::<Vec<_>>(),
        ));
    }
    let check = move |answer: &Value| {
        for ((kind, loss, g), ans) in cases.iter().zip(answer.as_array().unwrap()) {
            let rtol = if *kind == Kind::Double { 1e-5 } else { 1e-4 };
            check(
                "softmax loss",
                &[*loss],
                &[ans["loss"].as_f64().unwrap()],
                rtol,
            );
            for (k, key) in ["grad_emb", "grad_weight", "grad_bias"].iter().enumerate() {
                check(
                    &format!("softmax {key} {kind:?}"),
                    &g[k],
                    &floats(&ans[*key]),
                    rtol,
                );
            }
        }
    };
    (request, Box::new(check))
}

fn partial_fc_cases() -> (Vec<Value>, Checker) {
    let mut request = Vec::new();
    let mut ours = Vec::new();
    for (seed, classes, num_sample, labels) in [
        (1u64, 20i64, 8i64, vec![3i64, 17, 3, 0, 9]),
        (2, 20, 3, vec![3, 17, 3, 0, 9]),
        (3, 50, 50, vec![49, 1, 2, 2]),
        (4, 1000, 100, (0..64).map(|k| (k * 37) % 1000).collect()),
    ] {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let u: Vec<f32> = (0..classes).map(|_| rng.gen()).collect();
        let s = PartialFc::sample_with_uniform(
            &Tensor::from_slice(&labels),
            num_sample,
            &Tensor::from_slice(&u),
        );
        ours.push((to_vec(&s.index), to_vec(&s.labels)));
        request.push(json!({ "labels": labels, "u": u, "num_sample": num_sample }));
    }
    let check = move |answer: &Value| {
        let answers = answer.as_array().unwrap();
        assert_eq!(answers.len(), ours.len());
        for (k, ((index, labels), ans)) in ours.iter().zip(answers).enumerate() {
            assert_eq!(index, &floats(&ans["index"]), "case {k}: index");
            assert_eq!(labels, &floats(&ans["labels"]), "case {k}: labels");
        }
    };
    (request, Box::new(check))
}

/// CurricularFace at several `t` and AdaFace at several norm statistics (with and without
/// norms), f64 and f32: loss, logits and dL/dcos against the oracle. The state reaches the heads
/// through [`facerec_loss_heads::MarginHead::load_state`], as from a checkpoint.
#[test]
fn stateful_heads_match_the_oracle() {
    use facerec_loss_heads::{AdaFaceConfig, CurricularFaceConfig};
    use std::collections::HashMap;
    let norms = vec![3.0, 0.5, 12.0, 7.5, 1.25, 20.0];
    type Case<'a> = (String, HeadConfig, Vec<(&'a str, f64)>, Option<Vec<f64>>);
    let mut cases: Vec<Case> = Vec::new();
    for t in [0.0, 0.4, 0.9] {
        let cfg = HeadConfig::Curricularface(CurricularFaceConfig {
            s: 64.0,
            m: 0.5,
            alpha: 0.01,
        });
        cases.push((format!("curricularface t={t}"), cfg, vec![("t", t)], None));
    }
    for (mean, std) in [(20.0, 100.0), (10.0, 2.0), (8.0, 5.0)] {
        let cfg = HeadConfig::Adaface(AdaFaceConfig {
            s: 64.0,
            m: 0.4,
            h: 0.333,
            alpha: 0.01,
        });
        let state = vec![("norm_mean", mean), ("norm_std", std)];
        cases.push((
            format!("adaface μ={mean} σ={std}"),
            cfg.clone(),
            state.clone(),
            Some(norms.clone()),
        ));
        cases.push((
            format!("adaface μ={mean} σ={std} no norms"),
            cfg,
            state,
            None,
        ));
    }
    let mut request = Vec::new();
    let mut ours = Vec::new();
    for kind in [Kind::Double, Kind::Float] {
        for (name, cfg, state, norms) in &cases {
            let mut r = json!({
                "head": serde_json::to_value(cfg).unwrap(),
                "dtype": if kind == Kind::Double { "float64" } else { "float32" },
                "cos": rows(&cos_values(), C),
                "labels": LABELS,
                "step": 0,
                "state": state.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            });
            if let Some(n) = norms {
                r["norms"] = json!(n);
            }
            request.push(r);
            let mut head = cfg.build();
            let st: HashMap<String, Tensor> = state
                .iter()
                .map(|(k, v)| (k.to_string(), Tensor::from(*v)))
                .collect();
            head.load_state(st).unwrap();
            let cos = Tensor::from_slice(&cos_values())
                .view([B as i64, C as i64])
                .to_kind(kind)
                .set_requires_grad(true);
            let labels = Tensor::from_slice(&LABELS);
            let logits = match norms {
                Some(n) => {
                    head.logits_with_norms(&cos, &labels, &Tensor::from_slice(n).to_kind(kind))
                }
                None => head.logits(&cos, &labels),
            };
            assert_eq!(logits.kind(), kind, "{name}");
            let loss = cross_entropy(&logits, &labels);
            let grad = Tensor::run_backward(&[&loss], &[&cos], false, false).remove(0);
            ours.push((
                format!("{name} {kind:?}"),
                kind,
                loss.double_value(&[]),
                to_vec(&logits),
                to_vec(&grad),
            ));
        }
    }
    let answer = oracle(&json!({ "heads": request }));
    let answers = answer["heads"].as_array().unwrap();
    assert_eq!(answers.len(), ours.len());
    for ((name, kind, loss, logits, grad), ans) in ours.iter().zip(answers) {
        let rtol = if *kind == Kind::Double { 1e-5 } else { 1e-4 };
        check(
            &format!("{name} loss"),
            &[*loss],
            &[ans["loss"].as_f64().unwrap()],
            rtol,
        );
        check(
            &format!("{name} logits"),
            logits,
            &floats(&ans["logits"]),
            rtol,
        );
        check(
            &format!("{name} dL/dcos"),
            grad,
            &floats(&ans["grad_cos"]),
            rtol,
        );
    }
    eprintln!("{} stateful head cases match the oracle", ours.len());
}
