//! The clustering side of cluster-guided training (our reading of SPEC 4): finite-difference
//! gradient checks in f64 (L_scc, L_align), parity with the independent torch oracle
//! `data-scripts/cluster_guided_oracle.py` (both losses, per-identity statistics,
//! re-imprinting), behaviour on planted data, and the config pieces. The head and its margin rule
//! are tested in `crates/loss-heads/tests/cluster_guided.rs`; the `[cluster_guided]` table and
//! the composition of both crates in `crates/trainer/src/objective/cluster_guided/config.rs`.

use facerec_clustering::cluster_guided::*;
use facerec_testkit::gradcheck::{check_gradients, GradCheck};
use facerec_testkit::{floats, randn};
use serde_json::{json, Value};
use tch::{nn, Device, Kind, Tensor};

fn to_vec(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.detach().to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

fn rows(t: &Tensor) -> Value {
    let (_, d) = t.size2().unwrap();
    json!(to_vec(t)
        .chunks(d as usize)
        .map(|c| c.to_vec())
        .collect::<Vec<_>>())
}

fn close(what: &str, a: &[f64], e: &[f64], tol: f64) {
    assert_eq!(a.len(), e.len(), "{what}: length");
    let scale = e.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-300);
    for (i, (x, y)) in a.iter().zip(e).enumerate() {
        let ok = (x.is_nan() && y.is_nan()) || (x - y).abs() <= tol * (y.abs() + 1e-3 * scale);
        assert!(ok, "{what}[{i}]: {x} vs oracle {y}");
    }
}

fn oracle(request: &Value) -> Value {
    facerec_testkit::oracle("cluster_guided_oracle.py", request)
}

fn centres_fixture(c: i64, d: i64, invalid: &[i64]) -> ClusterCentres {
    let mu = randn(7, &[c, d]);
    let mu = &mu / mu.norm_scalaropt_dim(2, [1], true);
    let mut valid = vec![1.0f64; c as usize];
    for &i in invalid {
        valid[i as usize] = 0.0;
    }
    ClusterCentres::from_tensors(mu, &Tensor::from_slice(&valid))
}

#[test]
fn scc_and_align_gradients_match_finite_differences() {
    let (b, c, d) = (7, 6, 5);
    let centres = centres_fixture(c, d, &[4]);
    let emb = randn(8, &[b, d]).set_requires_grad(true);
    let labels = Tensor::from_slice(&[0i64, 1, 1, 4, 2, 0, 3]);
    let extra = Tensor::from_slice(&[5i64, 2]);
    check_gradients(
        || scc_loss(&emb, &labels, &centres, 4.0, Some(&extra)),
        &[("emb", &emb)],
        &GradCheck::default(),
    )
    .unwrap();
    let weight = randn(9, &[c, d]).set_requires_grad(true);
    check_gradients(
        || align_loss(&weight, &labels, &centres),
        &[("weight", &weight)],
        &GradCheck::default(),
    )
    .unwrap();
    // Only the batch's valid identities receive an alignment gradient.
    let g = Tensor::run_backward(
        &[align_loss(&weight, &labels, &centres)],
        &[&weight],
        false,
        false,
    );
    let row_norm = to_vec(&g[0].norm_scalaropt_dim(2, [1], false));
    assert!(
        row_norm[4] == 0.0 && row_norm[5] == 0.0 && row_norm[0] > 0.0,
        "{row_norm:?}"
    );
    // No valid centre at all: 0, finite gradient.
    let none = centres_fixture(c, d, &[0, 1, 2, 3, 4, 5]);
    let l = scc_loss(&emb, &labels, &none, 4.0, None);
    assert_eq!(l.double_value(&[]), 0.0);
    let g = Tensor::run_backward(&[l], &[&emb], false, false);
    assert_eq!(g[0].isfinite().all().int64_value(&[]), 1);
}

#[test]
fn parity_with_the_torch_oracle() {
    let (b, c, d) = (7i64, 6i64, 5i64);
    let centres = centres_fixture(c, d, &[4]);
    let emb = randn(8, &[b, d]);
    let sl = vec![0i64, 1, 1, 4, 2, 0, 3];
    let weight = randn(9, &[c, d]) * 0.3;
    // Statistics input: 3 identities, one split into two directions, one tight, one unseen.
    let semb = randn(10, &[24, 6]);
    let slabels: Vec<i64> = (0..24).map(|i| [0, 1, 3][i % 3]).collect();
    let mut req = json!({"scc": [], "align": [], "stats": [], "reimprint": []});
    req["scc"] = json!([
        {"emb": rows(&emb), "labels": sl, "centres": rows(centres.centres()), "valid": to_vec(centres.valid()), "scale": 4.0, "extra": [5, 2]},
        {"emb": rows(&emb), "labels": sl, "centres": rows(centres.centres()), "valid": to_vec(centres.valid()), "scale": 32.0, "extra": []}
    ]);
    req["align"] = json!([{"weight": rows(&weight), "labels": sl, "centres": rows(centres.centres()), "valid": to_vec(centres.valid())}]);
    let stat_cases = [
        (
            ClassClustering::Threshold { tau: 0.1 },
            Hardness::KnnPurity { k: 3 },
            "knn_purity",
            Some(0.1),
        ),
        (
            ClassClustering::Threshold { tau: 0.3 },
            Hardness::DominantFraction,
            "dominant_fraction",
            Some(0.3),
        ),
        (
            ClassClustering::None,
            Hardness::MeanCosine,
            "mean_cosine",
            None,
        ),
    ];
    for (_, _, name, tau) in &stat_cases {
        req["stats"].as_array_mut().unwrap().push(json!({"emb": rows(&semb), "labels": slabels, "num_classes": 5, "tau": tau, "hardness": name, "k": 3}));
    }
    for norm in ["unit", "keep"] {
        req["reimprint"].as_array_mut().unwrap().push(json!({"weight": rows(&weight), "centres": rows(centres.centres()), "valid": to_vec(centres.valid()), "beta": 0.3, "norm": norm}));
    }
    let ans = oracle(&req);

    let lb = Tensor::from_slice(&sl);
    for (i, (scale, extra)) in [(4.0, Some(Tensor::from_slice(&[5i64, 2]))), (32.0, None)]
        .into_iter()
        .enumerate()
    {
        let e = emb.set_requires_grad(true);
        let loss = scc_loss(&e, &lb, &centres, scale, extra.as_ref());
        let g = Tensor::run_backward(&[&loss], &[&e], false, false);
        let o = &ans["scc"][i];
        close(
            "scc loss",
            &[loss.double_value(&[])],
            &[o["loss"].as_f64().unwrap()],
            1e-10,
        );
        close("scc grad", &to_vec(&g[0]), &floats(&o["grad_emb"]), 1e-9);
    }
    let w = weight.set_requires_grad(true);
    let loss = align_loss(&w, &lb, &centres);
    let g = Tensor::run_backward(&[&loss], &[&w], false, false);
    close(
        "align loss",
        &[loss.double_value(&[])],
        &[ans["align"][0]["loss"].as_f64().unwrap()],
        1e-10,
    );
    close(
        "align grad",
        &to_vec(&g[0]),
        &floats(&ans["align"][0]["grad_weight"]),
        1e-9,
    );

    for (i, (clustering, hardness, name, _)) in stat_cases.iter().enumerate() {
        let s = cluster_statistics(&semb, &slabels, 5, *clustering, *hardness);
        let o = &ans["stats"][i];
        close(
            &format!("{name} centres"),
            &to_vec(&s.centres_cd),
            &floats(&o["centres"]),
            1e-10,
        );
        close(
            &format!("{name} hardness"),
            &s.hardness,
            &floats(&o["hardness"]),
            1e-10,
        );
        let dom: Vec<f64> = s.dominant_sizes.iter().map(|&x| x as f64).collect();
        close(
            &format!("{name} dominant"),
            &dom,
            &floats(&o["dominant"]),
            0.0,
        );
    }
    for (i, norm) in [ReimprintNorm::Unit, ReimprintNorm::Keep]
        .into_iter()
        .enumerate()
    {
        let w = weight.copy();
        let n = reimprint(&w, &centres, 0.3, norm);
        assert_eq!(n, 5);
        close(
            "reimprint",
            &to_vec(&w),
            &floats(&ans["reimprint"][i]["weight"]),
            1e-12,
        );
    }
}

/// Identity 0: 10 points around one direction; identity 1: 5 + 5 points around two opposite-ish
/// directions (hard to cluster); identity 2 unseen.
fn planted() -> (Tensor, Vec<i64>) {
    let d = 16;
    let a = randn(20, &[1, d]);
    let b1 = randn(21, &[1, d]);
    let b2 = randn(22, &[1, d]);
    let noise = randn(23, &[20, d]) * 0.1;
    let base = Tensor::cat(
        &[a.repeat([10, 1]), b1.repeat([5, 1]), b2.repeat([5, 1])],
        0,
    );
    let labels = [vec![0i64; 10], vec![1i64; 10]].concat();
    (base + noise, labels)
}

#[test]
fn split_identity_is_harder() {
    let (emb, labels) = planted();
    for hardness in [Hardness::DominantFraction, Hardness::MeanCosine] {
        let s = cluster_statistics(&emb, &labels, 3, ClassClustering::default(), hardness);
        assert!(
            s.hardness[1] > s.hardness[0] + 0.1,
            "{hardness:?}: {:?}",
            s.hardness
        );
        assert!(s.hardness[2].is_nan());
        assert_eq!(s.class_sizes, [10, 10, 0]);
        if hardness == Hardness::DominantFraction {
            assert_eq!(s.dominant_sizes, [10, 5, 0]);
        }
    }
}

#[test]
fn centres_state_ema_and_reimprint_behave() {
    let (emb, labels) = planted();
    let stats = cluster_statistics(&emb, &labels, 3, Default::default(), Default::default());
    let vs = nn::VarStore::new(Device::Cpu);
    let mut centres = ClusterCentres::new(&(vs.root() / "cluster"), 3, 16);
    centres.set(&stats);
    assert_eq!(to_vec(centres.valid()), [1.0, 1.0, 0.0]);
    let names: Vec<String> = vs.variables().keys().cloned().collect();
    assert!(names.contains(&"cluster.centres".to_string()), "{names:?}");
    assert_eq!(vs.trainable_variables().len(), 0);
    // EMA with alpha 0 moves the centre to the batch mean of its identity; unseen stays zero.
    let before = centres.centres().get(0).copy();
    let x = emb.narrow(0, 0, 3).to_kind(Kind::Float);
    let lb = Tensor::from_slice(&[0i64, 0, 2]);
    centres.ema_update(&x, &lb, 0.0);
    let xn = &x / x.norm_scalaropt_dim(2, [1], true);
    let mean = xn
        .narrow(0, 0, 2)
        .mean_dim([0].as_slice(), false, Kind::Float);
    let expect = &mean / mean.norm();
    assert!(centres
        .centres()
        .get(0)
        .allclose(&expect, 1e-5, 1e-6, false));
    assert!(!centres
        .centres()
        .get(0)
        .allclose(&before, 1e-6, 1e-6, false));
    assert_eq!(
        centres
            .centres()
            .get(2)
            .abs()
            .sum(Kind::Double)
            .double_value(&[]),
        0.0
    );
    // Re-imprinting with beta 1 writes the centres (unit norm) into the valid rows only.
    let w = Tensor::ones([3, 16], (Kind::Float, Device::Cpu)) * 3.0;
    assert_eq!(reimprint(&w, &centres, 1.0, ReimprintNorm::Unit), 2);
    assert!(w
        .narrow(0, 0, 2)
        .allclose(&centres.centres().narrow(0, 0, 2), 1e-6, 1e-6, false));
    assert!(w
        .get(2)
        .equal(&(Tensor::ones([16], (Kind::Float, Device::Cpu)) * 3.0)));
}

#[test]
fn config_pieces_defaults_and_errors_name_the_field() {
    let c: ClassClustering = toml::from_str("type = \"none\"").unwrap();
    assert_eq!(c, ClassClustering::None);
    let h: Hardness = toml::from_str("type = \"mean_cosine\"").unwrap();
    assert_eq!(h, Hardness::MeanCosine);
    let a: AlignConfig = toml::from_str("mode = \"both\"\nnorm = \"keep\"").unwrap();
    assert!(a.uses_loss() && a.uses_reimprint());
    let e = ClassClustering::Threshold { tau: 1.5 }
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("tau must be"), "{e}");
    let e = Hardness::KnnPurity { k: 0 }
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("k must be"), "{e}");
    let e = SccConfig {
        ema: Some(1.0),
        ..Default::default()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("ema must be"), "{e}");
    let e = AlignConfig {
        beta: 2.0,
        ..Default::default()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("beta must be"), "{e}");
}

#[test]
fn stratified_subset_is_per_class_deterministic_and_sorted() {
    // Stratified subset: at most n per class, deterministic, sorted.
    let labels: Vec<i64> = (0..50).map(|i| i % 4).collect();
    let s = stratified_subset(&labels, 3, 7);
    assert_eq!(s.len(), 12);
    assert_eq!(s, stratified_subset(&labels, 3, 7));
    assert!(s.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(stratified_subset(&labels, 0, 7).len(), 50);
}
