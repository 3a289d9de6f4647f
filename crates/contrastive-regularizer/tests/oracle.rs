//! Parity with the independent oracle `data-scripts/coreface_oracle.py` (torch, written from SPEC
//! 3(b) with per-entry Python loops): loss, margin, batch gap, the mean positive and hardest
//! negative cosines and the gradients w.r.t. both views, in f64 (1e-5 relative), for every
//! protocol and margin setting, over three consecutive steps so the margin state's moving average
//! is checked too; plus one f32 case (1e-4). Labels repeat (three images of identity 0, two of
//! identity 1), so the supervised mask is exercised. Both hardest-negative rules are checked, on
//! batches where they disagree, and gradient accumulation (several micro-batches per step, the
//! margin stored once per step).

use facerec_contrastive_regularizer::{
    AdaptiveMarginConfig, CoReFace, CoReFaceConfig, ContrastiveRegularizer, FixedMarginConfig,
    HardestNegative, MarginConfig, MomentumOn, Protocol,
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

/// One micro-batch: `(view 1, view 2, labels)`, `B x D` row-major.
type Batch = (Vec<f64>, Vec<f64>, Vec<i64>);

/// The default batches: step `t`'s views from [`views`] with `LABELS[t]`.
fn default_batch(t: usize) -> Batch {
    let (v1, v2) = views(t);
    (v1, v2, LABELS[t].to_vec())
}

struct Case {
    cfg: CoReFaceConfig,
    kind: Kind,
    /// `batches[t]`: the micro-batches of step `t`; one each means plain `forward` calls and the
    /// oracle's flat step form.
    batches: Vec<Vec<Batch>>,
}

impl Case {
    /// Three steps of one default batch each.
    fn plain(cfg: CoReFaceConfig, kind: Kind) -> Self {
        let batches = (0..STEPS).map(|t| vec![default_batch(t)]).collect();
        Case { cfg, kind, batches }
    }

    fn request(&self) -> Value {
        let batch =
            |(v1, v2, labels): &Batch| json!({"v1": rows(v1), "v2": rows(v2), "labels": labels});
        let steps: Vec<Value> = self
            .batches
            .iter()
            .map(|micro| match micro.as_slice() {
                [one] => batch(one),
                many => json!({"micro": many.iter().map(batch).collect::<Vec<_>>()}),
            })
            .collect();
        json!({
            "protocol": serde_json::to_value(self.cfg.protocol).unwrap(),
            "s": self.cfg.s,
            "margin": serde_json::to_value(&self.cfg.margin).unwrap(),
            "hardest_negative": serde_json::to_value(self.cfg.hardest_negative).unwrap(),
            "steps": steps,
        })
    }

    fn name(&self) -> String {
        format!(
            "{:?} s={} {:?} {:?} {:?}",
            self.cfg.protocol, self.cfg.s, self.cfg.margin, self.cfg.hardest_negative, self.kind
        )
    }

    fn compare(&self, answer: &Value, rtol: f64) {
        let mut reg = CoReFace::standalone(&self.cfg, Device::Cpu, self.kind);
        for (t, micro) in self.batches.iter().enumerate() {
            let before = to_vec(reg.margin_state());
            let mut last_margin = Vec::new();
            for (k, (v1, v2, labels)) in micro.iter().enumerate() {
                let mk = |v: &[f64]| {
                    Tensor::from_slice(v)
                        .view([labels.len() as i64, D as i64])
                        .to_kind(self.kind)
                        .set_requires_grad(true)
                };
                let (x1, x2) = (mk(v1), mk(v2));
                let labels = Tensor::from_slice(labels);
                let out = if micro.len() == 1 {
                    reg.forward(&x1, &x2, &labels)
                } else {
                    reg.forward_micro_batch(&x1, &x2, &labels)
                };
                let g = Tensor::run_backward(&[&out.loss], &[&x1, &x2], false, false);
                let e = if micro.len() == 1 {
                    &answer["steps"][t]
                } else {
                    &answer["steps"][t]["micro"][k]
                };
                let what = format!("{} step {t} micro-batch {k}", self.name());
                let scalar = |key: &str| [e[key].as_f64().unwrap()];
                check(
                    &format!("{what} loss"),
                    &to_vec(&out.loss),
                    &scalar("loss"),
                    rtol,
                );
                check(
                    &format!("{what} margin"),
                    &to_vec(&out.margin),
                    &scalar("margin"),
                    rtol,
                );
                check(
                    &format!("{what} batch_gap"),
                    &to_vec(&out.batch_gap),
                    &scalar("batch_gap"),
                    rtol,
                );
                check(
                    &format!("{what} positive_cos"),
                    &to_vec(&out.positive_cos),
                    &scalar("positive_cos"),
                    rtol,
                );
                check(
                    &format!("{what} hardest_negative_cos"),
                    &to_vec(&out.hardest_negative_cos),
                    &scalar("hardest_negative_cos"),
                    rtol,
                );
                check(
                    &format!("{what} grad_v1"),
                    &to_vec(&g[0]),
                    &floats(&e["grad_v1"]),
                    rtol,
                );
                check(
                    &format!("{what} grad_v2"),
                    &to_vec(&g[1]),
                    &floats(&e["grad_v2"]),
                    rtol,
                );
                if micro.len() > 1 {
                    // Within a step the state does not move.
                    assert_eq!(
                        to_vec(reg.margin_state()),
                        before,
                        "{what}: the state moved before end_step"
                    );
                }
                last_margin = to_vec(&out.margin);
            }
            if micro.len() > 1 {
                reg.end_step();
            }
            // The state holds the margin of the step's last micro-batch.
            check(
                &format!("{} step {t} state", self.name()),
                &to_vec(reg.margin_state()),
                &last_margin,
                1e-6,
            );
        }
    }
}

/// Runs `cases` through the oracle (or its frozen answer) and compares.
fn compare_all(cases: &[Case]) -> Value {
    let request = json!({"cases": cases.iter().map(Case::request).collect::<Vec<_>>()});
    let answer = oracle(&request);
    for (case, ans) in cases.iter().zip(answer["cases"].as_array().unwrap()) {
        let rtol = if case.kind == Kind::Double {
            1e-5
        } else {
            1e-4
        };
        case.compare(ans, rtol);
    }
    answer
}

/// A batch of `b <= D + 1` images of distinct identities whose view-1 embeddings are the
/// vertices of a regular simplex (pairwise cosine `−1/(b − 1)`, in the first `b − 1` dimensions),
/// view 2 the same plus small noise: every negative cosine is below 0, so the two hardest-negative
/// rules disagree on every row.
fn simplex_batch(b: usize, seed: u64) -> Batch {
    assert!(b <= D + 1);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // Centred standard basis vectors of R^b, which live in a (b − 1)-dimensional subspace; embed
    // that subspace isometrically in the first dimensions of R^D by a Gram–Schmidt basis.
    let centred: Vec<Vec<f64>> = (0..b)
        .map(|i| {
            (0..b)
                .map(|j| if i == j { 1.0 } else { 0.0 } - 1.0 / b as f64)
                .collect()
        })
        .collect();
    let mut basis: Vec<Vec<f64>> = Vec::new();
    for v in &centred {
        let mut u = v.clone();
        for q in &basis {
            let dot: f64 = u.iter().zip(q).map(|(a, b)| a * b).sum();
            u.iter_mut().zip(q).for_each(|(a, b)| *a -= dot * b);
        }
        let norm = u.iter().map(|a| a * a).sum::<f64>().sqrt();
        if norm > 1e-9 {
            basis.push(u.iter().map(|a| a / norm).collect());
        }
    }
    assert!(basis.len() < D + 1);
    let mut v1 = Vec::with_capacity(b * D);
    for v in &centred {
        for d in 0..D {
            v1.push(
                basis
                    .get(d)
                    .map_or(0.0, |q| v.iter().zip(q).map(|(a, b)| a * b).sum()),
            );
        }
    }
    let v2 = v1
        .iter()
        .map(|x| x + 0.05 * rng.sample::<f64, _>(StandardNormal))
        .collect();
    (v1, v2, (0..b as i64).map(|i| 20 + i).collect())
}

#[test]
fn every_protocol_and_margin_setting_matches_the_oracle() {
    let mut cases = Vec::new();
    for protocol in [Protocol::OneWay, Protocol::BothWays, Protocol::TwoN] {
        for margin in margins() {
            for s in [64.0, 10.0] {
                let cfg = CoReFaceConfig {
                    protocol,
                    s,
                    margin: margin.clone(),
                    ..Default::default()
                };
                cases.push(Case::plain(cfg, Kind::Double));
            }
        }
        let cfg = CoReFaceConfig {
            protocol,
            ..Default::default()
        };
        cases.push(Case::plain(cfg, Kind::Float));
    }
    let answer = compare_all(&cases);
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

/// Both hardest-negative rules against the oracle, on steps where every negative cosine is below
/// 0 (a simplex batch, where the rules disagree on every row) and on the default batches with
/// repeated identities (where a masked 0 is in most rows); the released rule's gap is the mean
/// positive cosine on the simplex batch (its hardest negative is the positive's 0).
#[test]
fn both_hardest_negative_rules_match_the_oracle() {
    let mut cases = Vec::new();
    for protocol in [Protocol::OneWay, Protocol::BothWays, Protocol::TwoN] {
        for hardest_negative in [HardestNegative::Negatives, HardestNegative::PositiveAsZero] {
            let cfg = CoReFaceConfig {
                protocol,
                hardest_negative,
                ..Default::default()
            };
            let batches = vec![
                vec![simplex_batch(5, 1)],
                vec![default_batch(0)],
                vec![simplex_batch(7, 2)],
            ];
            cases.push(Case {
                cfg,
                kind: Kind::Double,
                batches,
            });
        }
    }
    let answer = compare_all(&cases);
    let step0 = |c: usize, key: &str| answer["cases"][c]["steps"][0][key].as_f64().unwrap();
    for pair in (0..cases.len()).step_by(2) {
        let (ours, released) = (pair, pair + 1);
        assert!(
            step0(ours, "hardest_negative_cos") < -0.05,
            "{}",
            cases[ours].name()
        );
        assert_eq!(
            step0(released, "hardest_negative_cos"),
            0.0,
            "{}",
            cases[released].name()
        );
        assert!((step0(released, "batch_gap") - step0(released, "positive_cos")).abs() < 1e-12);
        assert!(step0(ours, "batch_gap") > step0(released, "batch_gap") + 0.05);
        assert!(
            (step0(ours, "loss") - step0(released, "loss")).abs() > 1e-3,
            "the rule must reach the loss"
        );
    }
}

/// Gradient accumulation: three micro-batches per step over two steps (batches of different
/// sizes, so the row-weighted step gap differs from a plain mean of micro-batch gaps), both
/// moving-average directions; the state moves only at `end_step`.
#[test]
fn micro_batches_update_the_margin_once_per_step() {
    let mut cases = Vec::new();
    for protocol in [Protocol::OneWay, Protocol::TwoN] {
        for momentum_on in [MomentumOn::Batch, MomentumOn::State] {
            let cfg = CoReFaceConfig {
                protocol,
                margin: MarginConfig::Adaptive(AdaptiveMarginConfig {
                    momentum: 0.7,
                    momentum_on,
                }),
                ..Default::default()
            };
            let batches = vec![
                vec![default_batch(0), default_batch(1), simplex_batch(4, 3)],
                vec![default_batch(2), simplex_batch(6, 4), default_batch(0)],
            ];
            cases.push(Case {
                cfg,
                kind: Kind::Double,
                batches,
            });
        }
    }
    let answer = compare_all(&cases);
    // The micro-batches of a step see different margins (the step's gap so far).
    let m = |k: usize| {
        answer["cases"][0]["steps"][0]["micro"][k]["margin"]
            .as_f64()
            .unwrap()
    };
    assert!((m(0) - m(1)).abs() > 1e-6 && (m(1) - m(2)).abs() > 1e-6);
}
