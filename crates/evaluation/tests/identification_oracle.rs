//! Parity of the 1:N identification metrics (CMC, TPIR at FPIR, identity templates) with the
//! independent oracle `data-scripts/identification_oracle.py` (torch + numpy), on random embeddings:
//! 40 gallery identities of 3 images each, 300 probes of which 100 are of identities outside the
//! gallery, embeddings near their identity's centre so that ranks spread over 1..10.

use facerec_evaluation::identification::{identify, identity_templates, similarity};
use facerec_testkit::{assert_close, floats, oracle, randn_vec};
use serde_json::json;
use tch::Tensor;

fn rows(v: &[f64], d: usize) -> Vec<Vec<f64>> {
    v.chunks(d)
        .map(|c| c.iter().map(|x| (x * 1e6).round() / 1e6).collect())
        .collect()
}

#[test]
fn cmc_and_tpir_match_the_oracle() {
    let (d, ids, per, probes) = (16usize, 60usize, 3usize, 300usize);
    let centres = randn_vec(1, ids * d);
    let noise = randn_vec(2, (ids * per + probes) * d);
    let pick = randn_vec(3, probes);
    let emb = |id: usize, k: usize| -> Vec<f64> {
        (0..d)
            .map(|j| centres[id * d + j] + 0.9 * noise[k * d + j])
            .collect()
    };
    // Gallery: identities 0..40; probes of identities 0..60 (40..60 are non-mated).
    let (mut g, mut gl) = (Vec::new(), Vec::new());
    for id in 0..40 {
        for k in 0..per {
            g.extend(emb(id, id * per + k));
            gl.push(id as i64);
        }
    }
    let (mut p, mut pl) = (Vec::new(), Vec::new());
    for (i, r) in pick.iter().enumerate() {
        let id = ((r.abs() * 1e4) as usize) % ids;
        p.extend(emb(id, ids * per + i));
        pl.push(id as i64);
    }
    let (g, p) = (rows(&g, d), rows(&p, d));
    let (ranks, fpirs) = ([1usize, 2, 5, 10], [1e-2, 0.05, 0.1, 0.3]);
    let answer = oracle(
        "identification_oracle.py",
        &json!({"gallery_emb": g, "gallery_labels": gl, "probe_emb": p, "probe_labels": pl,
                "ranks": ranks, "fpirs": fpirs}),
    );
    let flat = |r: &[Vec<f64>]| Tensor::from_slice(&r.concat()).view([r.len() as i64, d as i64]);
    let (labels, templ) = identity_templates(&flat(&g), &gl);
    let scores = similarity(&flat(&p), &templ);
    let r = identify(&scores, &labels, &pl, &ranks, &fpirs).unwrap();
    assert_eq!(r.gallery as u64, answer["gallery"].as_u64().unwrap());
    assert_eq!(r.mated as u64, answer["mated"].as_u64().unwrap());
    assert_eq!(r.non_mated as u64, answer["non_mated"].as_u64().unwrap());
    assert!(
        r.mated > 100 && r.non_mated > 50,
        "{} {}",
        r.mated,
        r.non_mated
    );
    let cmc: Vec<f64> = r.cmc.iter().map(|c| c.rate).collect();
    assert_close("CMC", &cmc, &floats(&answer["cmc"]), 1e-12, 0.0);
    assert!(
        cmc[0] > 0.2 && cmc[0] < 0.95,
        "rank-1 {} should be informative",
        cmc[0]
    );
    let tpir: Vec<f64> = r.tpir_at_fpir.iter().map(|t| t.tpir).collect();
    assert_close("TPIR", &tpir, &floats(&answer["tpir"]), 1e-12, 0.0);
    let ach: Vec<f64> = r.tpir_at_fpir.iter().map(|t| t.achieved_fpir).collect();
    assert_close(
        "achieved FPIR",
        &ach,
        &floats(&answer["achieved_fpir"]),
        1e-12,
        0.0,
    );
    let thr: Vec<f64> = r.tpir_at_fpir.iter().map(|t| t.threshold).collect();
    let want: Vec<f64> = answer["threshold"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap_or(f64::NEG_INFINITY))
        .collect();
    for (a, b) in thr.iter().zip(&want) {
        // Templates are kept in f32: thresholds agree to its rounding.
        assert!(
            (a - b).abs() < 1e-6 || a == b,
            "threshold {thr:?} vs {want:?}"
        );
    }
}
