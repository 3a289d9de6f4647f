//! Parity of the ROC / TAR@FAR / AUC / EER code with the independent numpy oracle
//! `data-scripts/roc_oracle.py` on random score sets (with and without tied scores, balanced and very
//! imbalanced classes). Without `FACEREC_PYTHON` the oracle's frozen answers
//! (`data-scripts/fixtures/roc_oracle-*.json`) are used; the ROC arrays are kept there as exact
//! fingerprints (length, FNV digest of the bit patterns, samples).

use std::process::Command;

use facerec_evaluation::roc::{Roc, FAR_TARGETS};
use facerec_testkit::{oracle, oracle_with};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

/// The oracle's answer for one case, live or frozen (`testkit::oracle_with`, keyed by the digests
/// of the inputs). The long FPR / TPR arrays are kept as exact fingerprints.
fn roc_oracle(scores: &[f64], labels: &[bool], fars: &[f64]) -> serde_json::Value {
    let label_bytes: Vec<u8> = labels.iter().map(|&b| b as u8).collect();
    let request = json!({
        "scores": oracle::f64_digest(scores),
        "labels": oracle::digest(&label_bytes),
        "n": scores.len(),
        "fars": fars,
    });
    oracle_with("roc_oracle.py", &request, |py| {
        let dir = tempfile::tempdir().unwrap();
        let (s, l) = (dir.path().join("s.f64"), dir.path().join("l.u8"));
        std::fs::write(
            &s,
            scores
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect::<Vec<u8>>(),
        )
        .unwrap();
        std::fs::write(&l, &label_bytes).unwrap();
        let mut cmd = Command::new(py);
        cmd.arg(oracle::script_path("roc_oracle.py"))
            .arg(&s)
            .arg(&l);
        for f in fars {
            cmd.arg(format!("{f:e}"));
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "oracle failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for key in ["fpr_bits", "tpr_bits"] {
            v[key] = oracle::bits_fingerprint(&bits(&v[key]));
        }
        v
    })
}

fn bits(v: &serde_json::Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

fn to_bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Genuine scores ~ N(shift, 1)-like, impostors ~ N(0, 1)-like (sums of uniforms); `levels > 0` quantises
/// scores to that many steps per unit, so many scores tie.
fn case(n: usize, p_genuine: f64, shift: f64, levels: f64, seed: u64) -> (Vec<f64>, Vec<bool>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut s = Vec::with_capacity(n);
    let mut g = Vec::with_capacity(n);
    for _ in 0..n {
        let genuine = rng.gen_bool(p_genuine);
        let z: f64 = (0..4).map(|_| rng.gen_range(-1.0..1.0)).sum::<f64>();
        let mut v = z + if genuine { shift } else { 0.0 };
        if levels > 0.0 {
            v = (v * levels).round() / levels;
        }
        s.push(v);
        g.push(genuine);
    }
    (s, g)
}

#[test]
fn matches_numpy_oracle() {
    let fars: Vec<f64> = FAR_TARGETS.iter().copied().chain([0.3, 0.5]).collect();
    let cases = [
        case(300, 0.5, 1.5, 0.0, 1),
        case(5000, 0.5, 1.0, 10.0, 2),
        case(40000, 0.01, 2.5, 0.0, 3),
        case(20000, 0.2, 2.0, 50.0, 4),
        case(2000, 0.5, 0.0, 3.0, 5),
    ];
    for (k, (s, g)) in cases.iter().enumerate() {
        let roc = Roc::new(s, g).unwrap();
        let o = roc_oracle(s, g, &fars);
        oracle::assert_bits_fingerprint(
            &format!("case {k}: fpr"),
            &to_bits(&roc.fpr),
            &o["fpr_bits"],
        );
        oracle::assert_bits_fingerprint(
            &format!("case {k}: tpr"),
            &to_bits(&roc.tpr),
            &o["tpr_bits"],
        );
        let rep = roc.report(&fars);
        let got = |f: fn(&facerec_evaluation::roc::TarAtFar) -> f64| -> Vec<u64> {
            rep.tar_at_far.iter().map(|t| f(t).to_bits()).collect()
        };
        assert_eq!(got(|t| t.tar), bits(&o["tar_bits"]), "case {k}: tar");
        assert_eq!(
            got(|t| t.far_actual),
            bits(&o["far_actual_bits"]),
            "case {k}: far"
        );
        // Thresholds by value: -0.0 and 0.0 form one run of equal scores, either may represent it.
        let thr: Vec<f64> = bits(&o["threshold_bits"])
            .into_iter()
            .map(f64::from_bits)
            .collect();
        let got_thr: Vec<f64> = rep.tar_at_far.iter().map(|t| t.threshold).collect();
        assert_eq!(got_thr, thr, "case {k}: threshold");
        assert_eq!(
            got(|t| t.tar_at_or_below),
            bits(&o["tar_le_bits"]),
            "case {k}: tar <="
        );
        let (auc, eer) = (o["auc"].as_f64().unwrap(), o["eer"].as_f64().unwrap());
        assert!(
            (rep.auc - auc).abs() < 1e-12,
            "case {k}: auc {} vs {auc}",
            rep.auc
        );
        assert!(
            (rep.eer - eer).abs() < 1e-12,
            "case {k}: eer {} vs {eer}",
            rep.eer
        );
        eprintln!(
            "case {k}: {} points, AUC {:.6}, EER {:.6}, TAR@1e-3 {:.6}",
            roc.fpr.len(),
            rep.auc,
            rep.eer,
            rep.tar_at_far[3].tar
        );
    }
}
