//! Parity with the independent oracle `data-scripts/coreface_oracle.py` (torch, written from SPEC
//! 3(b) with per-entry Python loops): loss, margin, batch gap and the gradients w.r.t. both views,
//! in f64 (1e-5 relative), for every protocol and margin setting, over three consecutive steps so
//! the margin state's moving average is checked too; plus one f32 case (1e-4). Labels repeat
//! (three images of identity 0, two of identity 1), so the supervised mask is exercised.

use facerec_contrastive_regularizer::{
    AdaptiveMarginConfig, CoReFace, CoReFaceConfig, ContrastiveRegularizer, FixedMarginConfig,
    MarginConfig, MomentumOn, Protocol,
};
use facerec_testkit::floats;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

const B: usize = 8;
const D: usize = 6;
const STEPS: usize = 3;
const LABELS: [[i64; B]; STEPS] = [
    [0, 1, 0, 2, 3, 1, 0, 4],
    [5, 5, 6, 7, 8, 9, 10, 11],
    [2, 2, 2, 2, 3, 3, 4, 4],
];

fn oracle(request: &Value) -> Value {
    facerec_testkit::oracle("coreface_oracle.py", request)
}

/// View 2 is view 1 plus noise, so positives are well aligned (as two dropout views are) and the
/// gaps are not trivially negative.
fn views(step: usize) -> (Vec<f64>, Vec<f64>) {
    let mut rng = ChaCha8Rng::seed_from_u64(100 + step as u64);
    let v1: Vec<f64> = (0..B * D).map(|_| rng.sample(StandardNormal)).collect();
    let v2: Vec<f64> = v1
        .iter()
        .map(|x| x + 0.8 * rng.sample::<f64, _>(StandardNormal))
        .collect();
    (v1, v2)
}

fn rows(v: &[f64]) -> Value {
    json!(v.chunks(D).collect::<Vec<_>>())
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.detach().to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

/// `|a − e| ≤ rtol·|e| + rtol·1e-2·max|e| + 1e-13` (an absolute floor scaled to the largest
/// entry, and one for rounding noise when a saturated softmax makes every gradient ~1e-16).
fn check(what: &str, actual: &[f64], expected: &[f64], rtol: f64) {
    facerec_testkit::assert_close(what, actual, expected, rtol, 1e-13);
}

fn margins() -> Vec<MarginConfig> {
    let adaptive = |momentum, momentum_on| {
        MarginConfig::Adaptive(AdaptiveMarginConfig {
            momentum,
            momentum_on,
        })
    };
    vec![
        adaptive(0.99, MomentumOn::Batch),
        adaptive(0.7, MomentumOn::Batch),
        adaptive(0.99, MomentumOn::State),
        adaptive(0.6, MomentumOn::State),
        MarginConfig::Fixed(FixedMarginConfig { m: 0.0 }),
        MarginConfig::Fixed(FixedMarginConfig { m: 0.25 }),
    ]
}

struct Case {
    cfg: CoReFaceConfig,
    kind: Kind,
}

impl Case {
    fn request(&self) -> Value {
        let steps: Vec<Value> = (0..STEPS)
            .map(|t| {
                let (v1, v2) = views(t);
                json!({"v1": rows(&v1), "v2": rows(&v2), "labels": LABELS[t]})
            })
            .collect();
        json!({
            "protocol": serde_json::to_value(self.cfg.protocol).unwrap(),
            "s": self.cfg.s,
            "margin": serde_json::to_value(&self.cfg.margin).unwrap(),
            "steps": steps,
        })
    }

    fn name(&self) -> String {
        format!(
            "{:?} s={} {:?} {:?}",
            self.cfg.protocol, self.cfg.s, self.cfg.margin, self.kind
        )
    }

    fn compare(&self, answer: &Value, rtol: f64) {
        let mut reg = CoReFace::standalone(&self.cfg, Device::Cpu, self.kind);
        for t in 0..STEPS {
            let (v1, v2) = views(t);
            let mk = |v: &[f64]| {
                Tensor::from_slice(v)
                    .view([B as i64, D as i64])
                    .to_kind(self.kind)
                    .set_requires_grad(true)
            };
            let (x1, x2) = (mk(&v1), mk(&v2));
            let labels = Tensor::from_slice(&LABELS[t]);
            let out = reg.forward(&x1, &x2, &labels);
            let g = Tensor::run_backward(&[&out.loss], &[&x1, &x2], false, false);
            let e = &answer["steps"][t];
            let what = format!("{} step {t}", self.name());
            check(&format!("{what} loss"), &to_vec(&out.loss), &[e["loss"].as_f64().unwrap()], rtol);
            check(&format!("{what} margin"), &to_vec(&out.margin), &[e["margin"].as_f64().unwrap()], rtol);
            check(
                &format!("{what} batch_gap"),
                &to_vec(&out.batch_gap),
                &[e["batch_gap"].as_f64().unwrap()],
                rtol,
            );
            check(&format!("{what} grad_v1"), &to_vec(&g[0]), &floats(&e["grad_v1"]), rtol);
            check(&format!("{what} grad_v2"), &to_vec(&g[1]), &floats(&e["grad_v2"]), rtol);
            // The state holds the margin used in this step.
            check(&format!("{what} state"), &to_vec(reg.margin_state()), &to_vec(&out.margin), 1e-6);
        }
    }
}

#[test]
fn every_protocol_and_margin_setting_matches_the_oracle() {
    let mut cases = Vec::new();
    for protocol in [Protocol::OneWay, Protocol::BothWays, Protocol::TwoN] {
        for margin in margins() {
            for s in [64.0, 10.0] {
                cases.push(Case {
                    cfg: CoReFaceConfig {
                        protocol,
                        s,
                        margin: margin.clone(),
                        ..Default::default()
                    },
                    kind: Kind::Double,
                });
            }
        }
        cases.push(Case {
            cfg: CoReFaceConfig {
                protocol,
                ..Default::default()
            },
            kind: Kind::Float,
        });
    }
    let request = json!({"cases": cases.iter().map(Case::request).collect::<Vec<_>>()});
    let answer = oracle(&request);
    for (case, ans) in cases.iter().zip(answer["cases"].as_array().unwrap()) {
        let rtol = if case.kind == Kind::Double { 1e-5 } else { 1e-4 };
        case.compare(ans, rtol);
    }
    // The f64 cases differ from each other (a broken setting cannot hide behind a shared value).
    let mut losses: Vec<f64> = cases
        .iter()
        .zip(answer["cases"].as_array().unwrap())
        .filter(|(c, _)| c.kind == Kind::Double)
        .map(|(_, a)| a["steps"][2]["loss"].as_f64().unwrap())
        .collect();
    let n = losses.len();
    losses.sort_by(f64::total_cmp);
    losses.dedup_by(|a, b| (*a - *b).abs() < 1e-9 * b.abs().max(1e-300));
    assert_eq!(losses.len(), n, "two settings gave the same loss");
    eprintln!("{} oracle cases x {STEPS} steps agree", cases.len());
}
