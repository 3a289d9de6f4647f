//! Parity of the clustering metrics with the independent numpy oracle
//! `data-scripts/clustering_oracle.py` (pair loops and per-item BCubed, written from the
//! definitions), on random labelings of many shapes, including degenerate ones.

use facerec_clustering::evaluate;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

fn oracle(request: &Value) -> Value {
    facerec_testkit::oracle("clustering_oracle.py", request)
}

#[test]
fn metrics_match_the_numpy_oracle() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut cases: Vec<(Vec<i64>, Vec<i64>)> = vec![
        (vec![0, 0, 1, 1, 1, 2], vec![0, 0, 0, 1, 1, 2]),
        (vec![0, 1, 2, 3], vec![0, 0, 1, 1]),
        (vec![0, 0, 0, 0], vec![0, 0, 1, 1]),
        (vec![5, 5], vec![1, 1]),
        (vec![3], vec![9]),
    ];
    for _ in 0..20 {
        let n = rng.gen_range(2..120);
        let kt = rng.gen_range(1..12);
        let kp = rng.gen_range(1..15);
        let truth: Vec<i64> = (0..n).map(|_| rng.gen_range(0..kt)).collect();
        // Mostly agreeing predictions with noise, with arbitrary (non-contiguous) label ids.
        let pred: Vec<i64> = truth
            .iter()
            .map(|&t| {
                if rng.gen_bool(0.7) {
                    100 + 3 * t
                } else {
                    rng.gen_range(0..kp) * 7
                }
            })
            .collect();
        cases.push((pred, truth));
    }
    let req = json!({"cases": cases.iter().map(|(p, t)| json!({"pred": p, "truth": t})).collect::<Vec<_>>()});
    let ans = oracle(&req);
    for (i, ((p, t), o)) in cases
        .iter()
        .zip(ans["cases"].as_array().unwrap())
        .enumerate()
    {
        let m = evaluate(p, t).unwrap();
        for (name, v) in [
            ("pairwise_precision", m.pairwise_precision),
            ("pairwise_recall", m.pairwise_recall),
            ("pairwise_f", m.pairwise_f),
            ("bcubed_precision", m.bcubed_precision),
            ("bcubed_recall", m.bcubed_recall),
            ("bcubed_f", m.bcubed_f),
            ("nmi", m.nmi),
            ("nmi_sqrt", m.nmi_sqrt),
        ] {
            let e = o[name].as_f64().unwrap();
            assert!(
                (v - e).abs() <= 1e-10,
                "case {i} {name}: {v} vs oracle {e} ({p:?} / {t:?})"
            );
        }
    }
}
