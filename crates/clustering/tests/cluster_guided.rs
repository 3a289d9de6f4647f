//! The cluster-guided pieces (our reading of SPEC 4): reduction to ArcFace at zero slope,
//! finite-difference gradient checks in f64 (head, L_scc, L_align), parity with the independent
//! torch oracle `data-scripts/cluster_guided_oracle.py` (head, both losses, per-identity
//! statistics, margins, re-imprinting), behaviour on planted data, and the config.

use facerec_clustering::cluster_guided::*;
use facerec_loss_heads::gradcheck::{check_gradients, GradCheck};
use facerec_loss_heads::{
    cross_entropy, ArcFace, ArcFaceConfig, ArcFaceGradient, CosineClassifier, MarginHead,
};
use facerec_testkit::floats;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde_json::{json, Value};
use tch::{nn, Device, Kind, Tensor};

const MODES: [ArcFaceGradient; 3] =
    [ArcFaceGradient::Exact, ArcFaceGradient::EasyMargin, ArcFaceGradient::Detached];

fn randn(seed: u64, shape: [i64; 2]) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f64> = (0..shape[0] * shape[1]).map(|_| rng.sample(StandardNormal)).collect();
    Tensor::from_slice(&v).view(shape)
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.detach().to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

fn rows(t: &Tensor) -> Value {
    let (_, d) = t.size2().unwrap();
    json!(to_vec(t).chunks(d as usize).map(|c| c.to_vec()).collect::<Vec<_>>())
}

fn close(what: &str, a: &[f64], e: &[f64], tol: f64) {
    assert_eq!(a.len(), e.len(), "{what}: length");
    let scale = e.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-300);
    for (i, (x, y)) in a.iter().zip(e).enumerate() {
        let ok = (x.is_nan() && y.is_nan()) || (x - y).abs() <= tol * (y.abs() + 1e-3 * scale);
        assert!(ok, "{what}[{i}]: {x} vs oracle {y}");
    }
}

fn oracle(request: &Value) -> Option<Value> {
    facerec_testkit::oracle("cluster_guided_oracle.py", request)
}

/// f64 cosines covering the regimes: aligned, moderate, near 0, negative, past the threshold.
fn cos_fixture() -> (Tensor, Tensor, Vec<f64>) {
    let (b, c) = (6, 5);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let labels = [0i64, 3, 4, 2, 3, 1];
    let targets = [0.93, 0.41, 0.05, -0.3, -0.95, 0.66];
    let mut v: Vec<f64> = (0..b * c).map(|_| rng.gen_range(-0.8..0.8)).collect();
    for i in 0..b {
        v[i * c + labels[i] as usize] = targets[i];
    }
    let margins = vec![0.35, 0.62, 0.5, 0.44, 0.7];
    (Tensor::from_slice(&v).view([b as i64, c as i64]), Tensor::from_slice(&labels), margins)
}

#[test]
fn zero_slope_is_exactly_arcface() {
    // Refresh statistics on random data; with slope 0 every margin is m0 whatever the hardness.
    let emb = randn(1, [40, 8]);
    let labels: Vec<i64> = (0..40).map(|i| i % 5).collect();
    let cfg = ClusterGuidedConfig {
        margin: ClusterMarginConfig { slope: 0.0, ..Default::default() },
        ..Default::default()
    };
    let stats = cluster_statistics(&emb, &labels, 5, &cfg);
    let margins = margins_from_hardness(&stats.hardness, &cfg.margin);
    assert!(margins.iter().all(|&m| m == 0.5), "{margins:?}");
    let (cos, labels, _) = cos_fixture();
    for gradient in MODES {
        let vs = nn::VarStore::new(Device::Cpu);
        let mut head = ClusterGuidedArcFace::new(
            &(vs.root() / "head"),
            5,
            &ClusterMarginConfig { slope: 0.0, gradient, ..Default::default() },
        );
        head.set_margins(&margins);
        let arc = ArcFace::new(&ArcFaceConfig { s: 64.0, m: 0.5, gradient });
        let c1 = cos.set_requires_grad(true);
        let z1 = head.logits(&c1, &labels);
        let z2 = arc.logits(&c1, &labels);
        assert!(z1.allclose(&z2, 1e-13, 1e-13, false), "{gradient:?}: logits");
        let g1 = Tensor::run_backward(&[cross_entropy(&z1, &labels)], &[&c1], false, false);
        let g2 = Tensor::run_backward(&[cross_entropy(&z2, &labels)], &[&c1], false, false);
        assert!(g1[0].allclose(&g2[0], 1e-12, 1e-13, false), "{gradient:?}: gradient");
    }
}

#[test]
fn head_gradients_match_finite_differences() {
    let (b, c, d) = (5, 6, 8);
    for gradient in MODES {
        let mut vs = nn::VarStore::new(Device::Cpu);
        vs.set_kind(Kind::Double);
        let classifier = CosineClassifier::new(&(vs.root() / "fc"), c, d);
        let w = randn(2, [c, d]);
        let mut weight = classifier.weight().shallow_clone();
        tch::no_grad(|| weight.copy_(&w));
        let emb = randn(3, [b, d]).set_requires_grad(true);
        let labels = Tensor::from_slice(&[0i64, 2, 5, 1, 2]);
        let m = Tensor::from_slice(&[0.3, 0.45, 0.7, 0.5, 0.55, 0.62]);
        let head = ClusterGuidedArcFace::with_margins(m, 8.0, gradient);
        let f = || cross_entropy(&head.logits(&classifier.cosines(&emb), &labels), &labels);
        if gradient == ArcFaceGradient::Detached {
            continue; // a straight-through estimator: autograd is not the derivative of f
        }
        check_gradients(f, &[("emb", &emb), ("weight", classifier.weight())], &GradCheck::default())
            .unwrap_or_else(|e| panic!("{gradient:?}: {e:#}"));
    }
}

fn centres_fixture(c: i64, d: i64, invalid: &[i64]) -> ClusterCentres {
    let mu = randn(7, [c, d]);
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
    let emb = randn(8, [b, d]).set_requires_grad(true);
    let labels = Tensor::from_slice(&[0i64, 1, 1, 4, 2, 0, 3]);
    let extra = Tensor::from_slice(&[5i64, 2]);
    check_gradients(
        || scc_loss(&emb, &labels, &centres, 4.0, Some(&extra)),
        &[("emb", &emb)],
        &GradCheck::default(),
    )
    .unwrap();
    let weight = randn(9, [c, d]).set_requires_grad(true);
    check_gradients(
        || align_loss(&weight, &labels, &centres),
        &[("weight", &weight)],
        &GradCheck::default(),
    )
    .unwrap();
    // Only the batch's valid identities receive an alignment gradient.
    let g = Tensor::run_backward(&[align_loss(&weight, &labels, &centres)], &[&weight], false, false);
    let row_norm = to_vec(&g[0].norm_scalaropt_dim(2, [1], false));
    assert!(row_norm[4] == 0.0 && row_norm[5] == 0.0 && row_norm[0] > 0.0, "{row_norm:?}");
    // No valid centre at all: 0, finite gradient.
    let none = centres_fixture(c, d, &[0, 1, 2, 3, 4, 5]);
    let l = scc_loss(&emb, &labels, &none, 4.0, None);
    assert_eq!(l.double_value(&[]), 0.0);
    let g = Tensor::run_backward(&[l], &[&emb], false, false);
    assert_eq!(g[0].isfinite().all().int64_value(&[]), 1);
}

#[test]
fn parity_with_the_torch_oracle() {
    let (cos, labels, margins) = cos_fixture();
    let (b, c, d) = (7i64, 6i64, 5i64);
    let centres = centres_fixture(c, d, &[4]);
    let emb = randn(8, [b, d]);
    let sl = vec![0i64, 1, 1, 4, 2, 0, 3];
    let weight = randn(9, [c, d]) * 0.3;
    // Statistics input: 3 identities, one split into two directions, one tight, one unseen.
    let semb = randn(10, [24, 6]);
    let slabels: Vec<i64> = (0..24).map(|i| [0, 1, 3][i % 3]).collect();
    let mut req = json!({"head": [], "scc": [], "align": [], "stats": [], "margins": [], "reimprint": []});
    for mode in ["exact", "easy_margin", "detached"] {
        req["head"].as_array_mut().unwrap().push(json!({"cos": rows(&cos), "labels": to_vec(&labels.to_kind(Kind::Double)).iter().map(|&x| x as i64).collect::<Vec<_>>(),
            "margins": margins, "s": 64.0, "mode": mode}));
    }
    req["scc"] = json!([
        {"emb": rows(&emb), "labels": sl, "centres": rows(centres.centres()), "valid": to_vec(centres.valid()), "scale": 4.0, "extra": [5, 2]},
        {"emb": rows(&emb), "labels": sl, "centres": rows(centres.centres()), "valid": to_vec(centres.valid()), "scale": 32.0, "extra": []}
    ]);
    req["align"] = json!([{"weight": rows(&weight), "labels": sl, "centres": rows(centres.centres()), "valid": to_vec(centres.valid())}]);
    let stat_cases = [
        (ClassClustering::Threshold { tau: 0.1 }, Hardness::KnnPurity { k: 3 }, "knn_purity", Some(0.1)),
        (ClassClustering::Threshold { tau: 0.3 }, Hardness::DominantFraction, "dominant_fraction", Some(0.3)),
        (ClassClustering::None, Hardness::MeanCosine, "mean_cosine", None),
    ];
    for (_, _, name, tau) in &stat_cases {
        req["stats"].as_array_mut().unwrap().push(json!({"emb": rows(&semb), "labels": slabels, "num_classes": 5, "tau": tau, "hardness": name, "k": 3}));
    }
    let hard = vec![Some(0.1), None, Some(0.9), Some(0.4), Some(0.0)];
    for (sign, slope) in [("harder_larger", 0.2), ("harder_smaller", 0.5), ("harder_larger", 0.0)] {
        req["margins"].as_array_mut().unwrap().push(json!({"hardness": hard, "m0": 0.5, "slope": slope, "m_min": 0.3, "m_max": 0.7, "sign": sign}));
    }
    for norm in ["unit", "keep"] {
        req["reimprint"].as_array_mut().unwrap().push(json!({"weight": rows(&weight), "centres": rows(centres.centres()), "valid": to_vec(centres.valid()), "beta": 0.3, "norm": norm}));
    }
    let Some(ans) = oracle(&req) else { return };

    for (i, mode) in MODES.iter().enumerate() {
        let head = ClusterGuidedArcFace::with_margins(Tensor::from_slice(&margins), 64.0, *mode);
        let x = cos.set_requires_grad(true);
        let loss = cross_entropy(&head.logits(&x, &labels), &labels);
        let g = Tensor::run_backward(&[&loss], &[&x], false, false);
        let o = &ans["head"][i];
        close(&format!("head {mode:?} loss"), &[loss.double_value(&[])], &[o["loss"].as_f64().unwrap()], 1e-10);
        close(&format!("head {mode:?} grad"), &to_vec(&g[0]), &floats(&o["grad_cos"]), 1e-9);
    }
    let lb = Tensor::from_slice(&sl);
    for (i, (scale, extra)) in [(4.0, Some(Tensor::from_slice(&[5i64, 2]))), (32.0, None)].into_iter().enumerate() {
        let e = emb.set_requires_grad(true);
        let loss = scc_loss(&e, &lb, &centres, scale, extra.as_ref());
        let g = Tensor::run_backward(&[&loss], &[&e], false, false);
        let o = &ans["scc"][i];
        close("scc loss", &[loss.double_value(&[])], &[o["loss"].as_f64().unwrap()], 1e-10);
        close("scc grad", &to_vec(&g[0]), &floats(&o["grad_emb"]), 1e-9);
    }
    let w = weight.set_requires_grad(true);
    let loss = align_loss(&w, &lb, &centres);
    let g = Tensor::run_backward(&[&loss], &[&w], false, false);
    close("align loss", &[loss.double_value(&[])], &[ans["align"][0]["loss"].as_f64().unwrap()], 1e-10);
    close("align grad", &to_vec(&g[0]), &floats(&ans["align"][0]["grad_weight"]), 1e-9);

    for (i, (clustering, hardness, name, _)) in stat_cases.iter().enumerate() {
        let cfg = ClusterGuidedConfig { clustering: *clustering, hardness: *hardness, ..Default::default() };
        let s = cluster_statistics(&semb, &slabels, 5, &cfg);
        let o = &ans["stats"][i];
        close(&format!("{name} centres"), &to_vec(&s.centres_cd), &floats(&o["centres"]), 1e-10);
        close(&format!("{name} hardness"), &s.hardness, &floats(&o["hardness"]), 1e-10);
        let dom: Vec<f64> = s.dominant_sizes.iter().map(|&x| x as f64).collect();
        close(&format!("{name} dominant"), &dom, &floats(&o["dominant"]), 0.0);
    }
    let hard_rs: Vec<f64> = hard.iter().map(|h| h.unwrap_or(f64::NAN)).collect();
    for (i, (sign, slope)) in [(MarginSign::HarderLarger, 0.2), (MarginSign::HarderSmaller, 0.5), (MarginSign::HarderLarger, 0.0)].into_iter().enumerate() {
        let cfg = ClusterMarginConfig { slope, sign, ..Default::default() };
        close("margins", &margins_from_hardness(&hard_rs, &cfg), &floats(&ans["margins"][i]["margins"]), 1e-14);
    }
    for (i, norm) in [ReimprintNorm::Unit, ReimprintNorm::Keep].into_iter().enumerate() {
        let w = weight.copy();
        let n = reimprint(&w, &centres, 0.3, norm);
        assert_eq!(n, 5);
        close("reimprint", &to_vec(&w), &floats(&ans["reimprint"][i]["weight"]), 1e-12);
    }
}

/// Identity 0: 10 points around one direction; identity 1: 5 + 5 points around two opposite-ish
/// directions (hard to cluster); identity 2 unseen.
fn planted() -> (Tensor, Vec<i64>) {
    let d = 16;
    let a = randn(20, [1, d]);
    let b1 = randn(21, [1, d]);
    let b2 = randn(22, [1, d]);
    let noise = randn(23, [20, d]) * 0.1;
    let base = Tensor::cat(&[a.repeat([10, 1]), b1.repeat([5, 1]), b2.repeat([5, 1])], 0);
    let labels = [vec![0i64; 10], vec![1i64; 10]].concat();
    (base + noise, labels)
}

#[test]
fn split_identity_is_harder_and_gets_the_signed_margin() {
    let (emb, labels) = planted();
    for hardness in [Hardness::DominantFraction, Hardness::MeanCosine] {
        let cfg = ClusterGuidedConfig { hardness, ..Default::default() };
        let s = cluster_statistics(&emb, &labels, 3, &cfg);
        assert!(s.hardness[1] > s.hardness[0] + 0.1, "{hardness:?}: {:?}", s.hardness);
        assert!(s.hardness[2].is_nan());
        assert_eq!(s.class_sizes, [10, 10, 0]);
        if hardness == Hardness::DominantFraction {
            assert_eq!(s.dominant_sizes, [10, 5, 0]);
        }
        let m = margins_from_hardness(&s.hardness, &cfg.margin);
        assert!(m[1] > 0.5 && m[0] < 0.5 && m[2] == 0.5, "{m:?}");
        let m = margins_from_hardness(
            &s.hardness,
            &ClusterMarginConfig { sign: MarginSign::HarderSmaller, ..Default::default() },
        );
        assert!(m[1] < 0.5 && m[0] > 0.5, "{m:?}");
    }
}

#[test]
fn centres_state_ema_and_reimprint_behave() {
    let (emb, labels) = planted();
    let cfg = ClusterGuidedConfig::default();
    let stats = cluster_statistics(&emb, &labels, 3, &cfg);
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
    let mean = xn.narrow(0, 0, 2).mean_dim([0].as_slice(), false, Kind::Float);
    let expect = &mean / mean.norm();
    assert!(centres.centres().get(0).allclose(&expect, 1e-5, 1e-6, false));
    assert!(!centres.centres().get(0).allclose(&before, 1e-6, 1e-6, false));
    assert_eq!(centres.centres().get(2).abs().sum(Kind::Double).double_value(&[]), 0.0);
    // Re-imprinting with beta 1 writes the centres (unit norm) into the valid rows only.
    let w = Tensor::ones([3, 16], (Kind::Float, Device::Cpu)) * 3.0;
    assert_eq!(reimprint(&w, &centres, 1.0, ReimprintNorm::Unit), 2);
    assert!(w.narrow(0, 0, 2).allclose(&centres.centres().narrow(0, 0, 2), 1e-6, 1e-6, false));
    assert!(w.get(2).equal(&(Tensor::ones([16], (Kind::Float, Device::Cpu)) * 3.0)));
}

#[test]
fn head_margin_table_is_a_checkpointed_buffer() {
    let vs = nn::VarStore::new(Device::Cpu);
    let mut head = ClusterGuidedArcFace::new(&(vs.root() / "head"), 4, &Default::default());
    assert_eq!(to_vec(head.margins()), [0.5; 4]);
    head.set_margins(&[0.3, 0.4, 0.6, 0.7]);
    let dir = std::env::temp_dir().join(format!("cg-head-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("head.safetensors");
    vs.save(&file).unwrap();
    let mut vs2 = nn::VarStore::new(Device::Cpu);
    let head2 = ClusterGuidedArcFace::new(&(vs2.root() / "head"), 4, &Default::default());
    vs2.load(&file).unwrap();
    close("loaded margins", &to_vec(head2.margins()), &[0.3, 0.4, 0.6, 0.7], 1e-7);
    std::fs::remove_dir_all(&dir).ok();
    // Over a class subset the plain `logits` refuses; `logits_for_classes` takes global ids.
    let cos = Tensor::zeros([2, 2], (Kind::Float, Device::Cpu));
    let local = Tensor::from_slice(&[0i64, 1]);
    let global = Tensor::from_slice(&[3i64, 0]);
    let z = head2.logits_for_classes(&cos, &local, &global);
    let expect = [64.0 * (std::f64::consts::FRAC_PI_2 + 0.7).cos(), 0.0, 0.0, 64.0 * (std::f64::consts::FRAC_PI_2 + 0.3).cos()];
    close("subset logits", &to_vec(&z), &expect, 1e-5);
    assert!(std::panic::catch_unwind(|| head2.logits(&cos, &local)).is_err());
}

#[test]
fn config_defaults_and_errors() {
    let cfg: ClusterGuidedConfig = toml::from_str("").unwrap();
    assert_eq!(cfg, ClusterGuidedConfig::default());
    cfg.validate().unwrap();
    let cfg: ClusterGuidedConfig = toml::from_str(
        "refresh_every_epochs = 2\nsamples_per_class = 8\n[clustering]\ntype = \"none\"\n\
         [hardness]\ntype = \"mean_cosine\"\n[margin]\nslope = 0.0\nsign = \"harder_smaller\"\n\
         [scc]\nweight = 0.5\nema = 0.9\n[align]\nmode = \"both\"\nnorm = \"keep\"\n",
    )
    .unwrap();
    assert_eq!(cfg.clustering, ClassClustering::None);
    assert!(cfg.align.uses_loss() && cfg.align.uses_reimprint());
    assert!(toml::from_str::<ClusterGuidedConfig>("refresh = 2").is_err());
    assert!(toml::from_str::<ClusterGuidedConfig>("[margin]\nm = 0.5").is_err());
    let bad = ClusterGuidedConfig {
        margin: ClusterMarginConfig { m0: 0.8, ..Default::default() },
        ..Default::default()
    };
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("cluster_guided.margin"), "{e}");
    // Stratified subset: at most n per class, deterministic, sorted.
    let labels: Vec<i64> = (0..50).map(|i| i % 4).collect();
    let s = stratified_subset(&labels, 3, 7);
    assert_eq!(s.len(), 12);
    assert_eq!(s, stratified_subset(&labels, 3, 7));
    assert!(s.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(stratified_subset(&labels, 0, 7).len(), 50);
}
