//! Parity of `verify` with the independent numpy oracle `data-scripts/verification_oracle.py` on random
//! embeddings (several seeds, pair counts divisible by 10 and not). Without `FACEREC_PYTHON` the
//! oracle's frozen answers (`data-scripts/fixtures/verification_oracle-*.json`) are used.

use std::process::Command;

use facerec_evaluation::{val_at_far, verification::squared_distances, verify};
use facerec_testkit::{oracle, oracle_with};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

fn unit(v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / n).collect()
}

/// 2P unit rows: genuine pairs are a direction plus noise of a random strength, impostors independent, so
/// distances spread over [0, 4] and the classes overlap.
fn random_case(pairs: usize, dim: usize, seed: u64) -> (Vec<f32>, Vec<bool>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let p_same = rng.gen_range(0.3..0.7);
    let (mut emb, mut issame) = (Vec::new(), Vec::new());
    for _ in 0..pairs {
        let same = rng.gen_bool(p_same);
        let a: Vec<f32> = (0..dim).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let b: Vec<f32> = if same {
            let s: f32 = rng.gen_range(0.2..2.0);
            a.iter()
                .map(|x| x + s * rng.gen_range(-1.0f32..1.0))
                .collect()
        } else {
            (0..dim).map(|_| rng.gen_range(-1.0..1.0)).collect()
        };
        let (a, b) = (unit(a), unit(b));
        emb.extend(a);
        emb.extend(b);
        issame.push(same);
    }
    (emb, issame)
}

/// Tie-heavy case: rows from a few fixed unit vectors, so many distances sit exactly on grid values
/// (0, 2 and 4 exactly; 0.4 and 0.8 up to rounding) and the strict `d < tau` rule matters.
fn ties_case(pairs: usize, seed: u64) -> (Vec<f32>, Vec<bool>) {
    const V: [[f32; 2]; 6] = [
        [1.0, 0.0],
        [0.8, 0.6],
        [0.6, 0.8],
        [0.0, 1.0],
        [-1.0, 0.0],
        [0.0, -1.0],
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut emb, mut issame) = (Vec::new(), Vec::new());
    for _ in 0..pairs {
        let j = rng.gen_range(0..V.len());
        emb.extend(V[0]);
        emb.extend(V[j]);
        issame.push(rng.gen_bool(if j < 3 { 0.8 } else { 0.3 }));
    }
    (emb, issame)
}

/// The oracle's answer (small: fold values and means), live or frozen (`testkit::oracle_with`,
/// keyed by the digests of the inputs).
fn run_oracle(emb: &[f32], issame: &[bool], dim: usize, folds: usize) -> serde_json::Value {
    let emb_bytes: Vec<u8> = emb.iter().flat_map(|x| x.to_le_bytes()).collect();
    let same_bytes: Vec<u8> = issame.iter().map(|&b| u8::from(b)).collect();
    let request = json!({
        "emb": oracle::digest(&emb_bytes),
        "issame": oracle::digest(&same_bytes),
        "pairs": issame.len(),
        "dim": dim,
        "folds": folds,
    });
    oracle_with("verification_oracle.py", &request, |py| {
        let dir = tempfile::tempdir().unwrap();
        let (e, s) = (dir.path().join("emb.f32"), dir.path().join("issame.u8"));
        std::fs::write(&e, &emb_bytes).unwrap();
        std::fs::write(&s, &same_bytes).unwrap();
        let out = Command::new(py)
            .arg(oracle::script_path("verification_oracle.py"))
            .args([e.as_os_str(), s.as_os_str()])
            .args([dim.to_string(), "--folds".into(), folds.to_string()])
            .output()
            .expect("run oracle");
        assert!(
            out.status.success(),
            "oracle failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("oracle JSON")
    })
}

fn bits(v: &serde_json::Value, key: &str) -> Vec<f64> {
    v["bits"][key]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| f64::from_bits(b.as_u64().unwrap()))
        .collect()
}

#[test]
fn verify_matches_numpy_oracle() {
    // (pairs, dim, seed, folds)
    let cases = [
        (600, 8, 1, 10),
        (457, 8, 2, 10),
        (600, 16, 3, 10),
        (1203, 4, 4, 10),
        (91, 8, 5, 7),
        (40, 8, 6, 1),
    ];
    let tie_cases = [(500, 0, 7, 10), (333, 0, 8, 10)];
    for (pairs, dim, seed, folds) in cases.into_iter().chain(tie_cases) {
        let ties = dim == 0;
        let (emb, issame, dim) = if ties {
            let (e, s) = ties_case(pairs, seed);
            (e, s, 2)
        } else {
            let (e, s) = random_case(pairs, dim, seed);
            (e, s, dim)
        };
        let ours = verify(&emb, dim, &issame, folds);
        let vf = val_at_far(&squared_distances(&emb, dim), &issame, folds, 1e-3);
        let or = run_oracle(&emb, &issame, dim, folds);
        let ctx = format!("pairs {pairs} dim {dim} seed {seed} folds {folds} ties {ties}");
        assert_eq!(
            or["num_pairs"].as_u64().unwrap() as usize,
            ours.num_pairs,
            "{ctx}"
        );
        assert_eq!(bits(&or, "fold_accuracies"), ours.fold_accuracies, "{ctx}");
        assert_eq!(bits(&or, "fold_thresholds"), ours.fold_thresholds, "{ctx}");
        assert_eq!(
            bits(&or, "fold_val_thresholds"),
            vf.fold_thresholds,
            "{ctx}"
        );
        assert_eq!(bits(&or, "fold_val"), vf.fold_val, "{ctx}");
        assert_eq!(bits(&or, "fold_far"), vf.fold_far, "{ctx}");
        let close = |key: &str, ours: f64, tol: f64| {
            let o = or[key].as_f64().unwrap();
            assert!(
                (o - ours).abs() <= tol,
                "{ctx}: {key} oracle {o} ours {ours}"
            );
        };
        close("accuracy_mean", ours.accuracy_mean, 1e-12);
        close("accuracy_std", ours.accuracy_std, 1e-12);
        close("val_mean", ours.val_mean, 1e-12);
        close("val_std", ours.val_std, 1e-12);
        close("far_mean", ours.far_mean, 1e-12);
        // A random case must exercise the procedure: overlapping classes and an interpolated VAL.
        if ties {
            continue;
        }
        assert!(
            ours.accuracy_mean > 0.6 && ours.accuracy_mean < 1.0,
            "{ctx}: {}",
            ours.accuracy_mean
        );
        assert!(
            vf.fold_thresholds.iter().all(|&t| t > 0.0),
            "{ctx}: {:?}",
            vf.fold_thresholds
        );
        eprintln!(
            "{ctx}: acc {:.4} +- {:.4}, val {:.4}, thresholds {:?}",
            ours.accuracy_mean, ours.accuracy_std, ours.val_mean, ours.fold_thresholds
        );
    }
}
