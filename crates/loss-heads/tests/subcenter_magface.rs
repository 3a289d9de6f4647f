//! Sub-center ArcFace and MagFace: f64 central-difference gradient checks through embedding ->
//! CosineClassifier (K sub-centres) -> head -> loss (MagFace: through the feature norm as well),
//! parity with the independent oracle `data-scripts/heads_oracle.py` (`embedding_heads`: loss,
//! pooled cosines and the gradients w.r.t. the embeddings and the class weights), the special
//! cases they reduce to (K = 1 and K identical sub-centres are ArcFace; MagFace with l_m = u_m and
//! λ_g = 0 is ArcFace), Partial FC over sub-centres, and the fused loss plus the norm penalty (what
//! the trainer computes) against the head's own training loss.

use facerec_loss_heads::{
    cross_entropy, margin_cross_entropy_with_norms, ArcFace, ArcFaceConfig, ArcFaceGradient,
    CosineClassifier, HeadConfig, MagFace, MagFaceConfig, MarginHead, PartialFc,
    SubCenterArcFaceConfig,
};
use facerec_testkit::gradcheck::{check_gradients, GradCheck};
use facerec_testkit::{floats, randn};
use serde_json::{json, Value};
use tch::{nn, Device, Kind, Tensor};

const B: i64 = 6;
const C: i64 = 5;
const D: i64 = 8;
const LABELS: [i64; B as usize] = [0, 1, 2, 3, 4, 1];

fn vals(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.detach().to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

fn labels() -> Tensor {
    Tensor::from_slice(&LABELS)
}

/// A classifier of `C` classes x `k` sub-centres in f64 whose weights are `w` (`[C·k, D]`).
fn classifier(k: i64, w: &Tensor) -> (nn::VarStore, CosineClassifier) {
    let mut vs = nn::VarStore::new(Device::Cpu);
    vs.set_kind(Kind::Double);
    let cl = CosineClassifier::with_sub_centres(&vs.root(), C, k, D);
    let mut weight = cl.weight().shallow_clone();
    tch::no_grad(|| weight.copy_(w));
    (vs, cl)
}

/// Sub-centre weights `[C·k, D]` where one sub-centre of each labelled class leans towards the
/// samples of that class (so some targets are well aligned and the max picks it).
fn sub_centre_weights(seed: u64, k: i64, emb: &Tensor) -> Tensor {
    let w = randn(seed, &[C * k, D]);
    let _guard = tch::no_grad_guard();
    for (i, &y) in LABELS.iter().enumerate().step_by(2) {
        let mut row = w.get(y * k + (i as i64 % k));
        let _ = row.g_add_(&(emb.get(i as i64) * 1.5));
    }
    w
}

/// The smallest gap between the best and second-best sub-centre of any (sample, class) pair.
fn max_gap(cl: &CosineClassifier, emb: &Tensor, k: i64) -> f64 {
    let unit = |x: &Tensor| x / x.norm_scalaropt_dim(2, [1], true);
    let all = unit(emb).matmul(&unit(cl.weight()).tr()).view([B, C, k]);
    let (sorted, _) = all.sort(2, true);
    let gap = sorted.select(2, 0) - sorted.select(2, 1);
    gap.min().double_value(&[])
}

fn arcface(s: f64, m: f64, gradient: ArcFaceGradient) -> ArcFace {
    ArcFace::new(&ArcFaceConfig { s, m, gradient })
}

#[test]
fn subcenter_arcface_full_path_gradients() {
    let mut unused_seen = false;
    for (seed, k) in [(1u64, 3i64), (2, 2), (3, 4)] {
        let emb = randn(seed + 10, &[B, D]);
        let (_vs, cl) = classifier(k, &sub_centre_weights(seed, k, &emb));
        assert!(
            max_gap(&cl, &emb, k) > 1e-4,
            "seed {seed}: a tie between sub-centres"
        );
        let emb = emb.set_requires_grad(true);
        let labels = labels();
        // Exact and easy-margin autograd (the detached mode is a straight-through estimator by
        // design: its gradient is not the derivative of its value).
        for gradient in [ArcFaceGradient::Exact, ArcFaceGradient::EasyMargin] {
            let head = arcface(8.0, 0.5, gradient);
            let inputs = [("emb", &emb), ("weight", cl.weight())];
            check_gradients(
                || cross_entropy(&head.logits(&cl.cosines(&emb), &labels), &labels),
                &inputs,
                &GradCheck::default(),
            )
            .unwrap_or_else(|e| panic!("seed {seed} k {k} {gradient:?}: {e:#}"));
        }
        // Only the closest sub-centre of each (sample, class) pair receives a gradient: with B
        // samples at most B·C of the C·k rows' per-sample contributions are non-zero, and a
        // sub-centre no sample is closest to gets none at all.
        let head = arcface(8.0, 0.5, ArcFaceGradient::Exact);
        let loss = cross_entropy(&head.logits(&cl.cosines(&emb), &labels), &labels);
        let g = Tensor::run_backward(&[loss], &[cl.weight()], false, false).remove(0);
        let unit = |x: &Tensor| x / x.norm_scalaropt_dim(2, [1], true);
        let nearest = unit(&emb.detach())
            .matmul(&unit(cl.weight()).tr())
            .view([B, C, k])
            .argmax(2, false); // [B, C]
        let mut used = vec![false; (C * k) as usize];
        for row in vals(&nearest).chunks(C as usize) {
            for (c, &j) in row.iter().enumerate() {
                used[c * k as usize + j as usize] = true;
            }
        }
        let norms = vals(&g.norm_scalaropt_dim(2, [1], false));
        for (r, (&n, &u)) in norms.iter().zip(&used).enumerate() {
            assert!(
                u || n == 0.0,
                "k {k}: row {r} is nobody's nearest but has gradient {n}"
            );
        }
        unused_seen |= used.iter().any(|u| !u);
    }
    assert!(
        unused_seen,
        "the fixtures should leave some sub-centre unused"
    );
}

#[test]
fn one_or_identical_sub_centres_are_arcface() {
    let emb = randn(21, &[B, D]).set_requires_grad(true);
    let base = randn(22, &[C, D]);
    let labels = labels();
    let head = arcface(16.0, 0.5, ArcFaceGradient::Exact);
    let (_v1, plain) = classifier(1, &base);
    let loss1 = cross_entropy(&head.logits(&plain.cosines(&emb), &labels), &labels);
    let g1 = Tensor::run_backward(&[&loss1], &[&emb, plain.weight()], false, false);
    // K = 3 copies of each class row: the same cosines, loss and embedding gradient; the copies'
    // weight gradients (the max splits a tie evenly) sum to the single row's.
    let k = 3;
    let copies = base.repeat_interleave_self_int(k, Some(0), None);
    let (_v3, sub) = classifier(k, &copies);
    let cos3 = sub.cosines(&emb);
    assert_eq!(cos3.size(), [B, C]);
    assert!(cos3.allclose(&plain.cosines(&emb), 1e-14, 1e-14, false));
    let loss3 = cross_entropy(&head.logits(&cos3, &labels), &labels);
    assert!((loss3.double_value(&[]) - loss1.double_value(&[])).abs() < 1e-13);
    let g3 = Tensor::run_backward(&[&loss3], &[&emb, sub.weight()], false, false);
    assert!(g3[0].allclose(&g1[0], 1e-12, 1e-14, false));
    let summed = g3[1]
        .view([C, k, D])
        .sum_dim_intlist([1i64].as_slice(), false, Kind::Double);
    assert!(
        summed.allclose(&g1[1], 1e-12, 1e-14, false),
        "{summed:?} vs {:?}",
        g1[1]
    );
    // The config's head is that ArcFace, on the classifier kind with k rows per class.
    let cfg = HeadConfig::SubcenterArcface(SubCenterArcFaceConfig {
        k,
        s: 16.0,
        ..Default::default()
    });
    let z = cfg.build().logits(&cos3, &labels);
    assert!(z.allclose(&head.logits(&cos3, &labels), 0.0, 0.0, false));
}

#[test]
fn partial_fc_samples_every_sub_centre_of_a_class() {
    let k = 3;
    let emb = randn(31, &[B, D]).set_requires_grad(true);
    let (_vs, cl) = classifier(k, &randn(32, &[C * k, D]));
    let labels = Tensor::from_slice(&[0i64, 3, 3, 0, 0, 3]);
    let mut pfc = PartialFc::new(&facerec_loss_heads::PartialFcConfig {
        sample_rate: 0.6,
        seed: 5,
    });
    pfc.set_step(2);
    let sampled = pfc.sample(&labels, C);
    let index = vals(&sampled.index);
    assert_eq!(index.len(), 3, "{index:?}");
    let cos = cl.cosines_sampled(&emb, &sampled);
    let full = cl.cosines(&emb).index_select(1, &sampled.index);
    assert!(cos.allclose(&full, 1e-14, 1e-15, false));
    let head = arcface(8.0, 0.5, ArcFaceGradient::Exact);
    let loss = cross_entropy(&head.logits(&cos, &sampled.labels), &sampled.labels);
    let g = Tensor::run_backward(&[loss], &[cl.weight()], false, false).remove(0);
    let row_norms = vals(&g.norm_scalaropt_dim(2, [1], false));
    let mask = vals(&sampled.row_mask_of_rows(C, k, Kind::Double));
    assert_eq!(mask.len(), (C * k) as usize);
    for r in 0..(C * k) as usize {
        let class_sampled = index.contains(&((r / k as usize) as f64));
        assert_eq!(mask[r] == 1.0, class_sampled, "row {r}");
        if !class_sampled {
            assert_eq!(row_norms[r], 0.0, "row {r} of an unsampled class moved");
        }
    }
}

fn magface(s: f64, l_a: f64, u_a: f64, lambda_g: f64) -> MagFace {
    MagFace::new(&MagFaceConfig {
        s,
        l_a,
        u_a,
        lambda_g,
        ..Default::default()
    })
}

/// Embeddings whose rows have the norms `norms` (directions random), and class rows leaning
/// towards some of them.
fn scaled_embeddings(seed: u64, norms: &[f64]) -> (Tensor, Tensor) {
    let dir = randn(seed, &[B, D]);
    let unit = &dir / dir.norm_scalaropt_dim(2, [1], true);
    let emb = unit * Tensor::from_slice(norms).view([B, 1]);
    let w = randn(seed + 1, &[C, D]);
    let _guard = tch::no_grad_guard();
    for (i, &y) in LABELS.iter().enumerate().step_by(2) {
        let mut row = w.get(y);
        let _ = row.g_add_(&(dir.get(i as i64) * 1.5));
    }
    (emb, w)
}

#[test]
fn magface_full_path_gradients_through_the_norms() {
    // l_a = 1, u_a = 6: norms below, inside and above the interval (away from its ends).
    let norms = [0.5, 1.7, 2.9, 4.2, 5.5, 7.5];
    for seed in [41u64, 43] {
        let (emb, w) = scaled_embeddings(seed, &norms);
        let (_vs, cl) = classifier(1, &w);
        let emb = emb.set_requires_grad(true);
        let labels = labels();
        for lambda_g in [0.0, 2.0] {
            let head = magface(8.0, 1.0, 6.0, lambda_g);
            let inputs = [("emb", &emb), ("weight", cl.weight())];
            check_gradients(
                || {
                    let n = emb.norm_scalaropt_dim(2, [1], false);
                    let z = head.logits_with_norms(&cl.cosines(&emb), &labels, &n);
                    match head.norm_penalty(&n) {
                        Some(p) => cross_entropy(&z, &labels) + p,
                        None => cross_entropy(&z, &labels),
                    }
                },
                &inputs,
                &GradCheck::default(),
            )
            .unwrap_or_else(|e| panic!("seed {seed} λ_g {lambda_g}: {e:#}"));
        }
        // The margin's dependence on the norm carries a gradient (compare with the same margins
        // held constant): the radial component of dL/demb differs inside [l_a, u_a] only.
        let head = magface(8.0, 1.0, 6.0, 0.0);
        let n = emb.norm_scalaropt_dim(2, [1], false);
        let loss = cross_entropy(
            &head.logits_with_norms(&cl.cosines(&emb), &labels, &n),
            &labels,
        );
        let g = Tensor::run_backward(&[loss], &[&emb], false, false).remove(0);
        let nd = n.detach();
        let loss_c = cross_entropy(
            &head.logits_with_norms(&cl.cosines(&emb), &labels, &nd),
            &labels,
        );
        let gc = Tensor::run_backward(&[loss_c], &[&emb], false, false).remove(0);
        let radial = |g: &Tensor| {
            vals(&(g * &emb.detach()).sum_dim_intlist([1i64].as_slice(), false, Kind::Double))
        };
        let (r, rc) = (radial(&g), radial(&gc));
        for i in 0..B as usize {
            let inside = norms[i] > 1.0 && norms[i] < 6.0;
            assert_eq!(
                (r[i] - rc[i]).abs() > 1e-9,
                inside,
                "row {i}: {} vs {}",
                r[i],
                rc[i]
            );
        }
    }
}

#[test]
fn magface_margins_regulariser_and_special_cases() {
    let head = MagFace::new(&MagFaceConfig::default());
    let a = Tensor::from_slice(&[5.0, 10.0, 60.0, 110.0, 200.0]);
    let m = vals(&head.margins(&a));
    let want = [0.45, 0.45, 0.45 + 0.35 * 0.5, 0.8, 0.8];
    for (x, y) in m.iter().zip(want) {
        assert!((x - y).abs() < 1e-15, "{m:?}");
    }
    let g = vals(&head.regulariser(&a));
    for (x, ai) in g.iter().zip([10.0f64, 10.0, 60.0, 110.0, 110.0]) {
        assert!((x - (1.0 / ai + ai / 12100.0)).abs() < 1e-15);
    }
    let p = head.norm_penalty(&a).unwrap().double_value(&[]);
    let mean_g: f64 = g.iter().sum::<f64>() / 5.0;
    assert!((p - 35.0 * mean_g).abs() < 1e-12);
    // l_m = u_m = m and λ_g = 0: ArcFace m, whatever the norms; no penalty.
    let cos = Tensor::from_slice(&[0.2, 0.7, -0.1, 0.4, -0.95, 0.0, 0.9, 0.75]).view([2, 4]);
    let labels = Tensor::from_slice(&[1i64, 0]);
    let flat = MagFace::new(&MagFaceConfig {
        s: 8.0,
        l_m: 0.5,
        u_m: 0.5,
        lambda_g: 0.0,
        ..Default::default()
    });
    let arc = arcface(8.0, 0.5, ArcFaceGradient::Exact).logits(&cos, &labels);
    let z = flat.logits_with_norms(&cos, &labels, &Tensor::from_slice(&[3.0, 70.0]));
    assert!(z.allclose(&arc, 1e-14, 1e-14, false), "{z:?} vs {arc:?}");
    assert!(flat
        .norm_penalty(&Tensor::from_slice(&[3.0, 70.0]))
        .is_none());
    // Without norms every row gets l_m; the target past π − m falls back to cos θ − m·sin m.
    let z = vals(&head.logits(&cos, &labels));
    let m = 0.45f64;
    assert!((z[1] - 64.0 * (0.7f64.acos() + m).cos()).abs() < 1e-12);
    assert!(
        (z[4] - 64.0 * (-0.95 - m * m.sin())).abs() < 1e-12,
        "{}",
        z[4]
    );
    assert_eq!(z[0], 64.0 * 0.2);
}

#[test]
fn magface_fused_loss_plus_penalty_equals_the_training_loss() {
    facerec_loss_heads::margin_ce::set_fused_min_elements(0);
    let (emb, w) = scaled_embeddings(51, &[0.5, 1.7, 2.9, 4.2, 5.5, 7.5]);
    let (_vs, cl) = classifier(1, &w);
    let emb = emb.set_requires_grad(true);
    let labels = labels();
    let mut head = magface(8.0, 1.0, 6.0, 2.0);
    let run = |fused: bool, head: &mut MagFace| {
        let n = emb.norm_scalaropt_dim(2, [1], false);
        let cos = cl.cosines(&emb);
        let loss = if fused {
            margin_cross_entropy_with_norms(&*head, &cos, &labels, &n)
                + head.norm_penalty(&n).unwrap()
        } else {
            head.training_loss(&cos, &labels, &emb, &n)
        };
        let g = Tensor::run_backward(&[&loss], &[&emb, cl.weight()], false, false);
        (loss.double_value(&[]), g)
    };
    let (l0, g0) = run(false, &mut head);
    let (l1, g1) = run(true, &mut head);
    assert!((l0 - l1).abs() < 1e-12 * l0.abs().max(1.0), "{l0} vs {l1}");
    for (a, b) in g0.iter().zip(&g1) {
        assert!(a.allclose(b, 1e-10, 1e-12, false), "{a:?} vs {b:?}");
    }
}

/// `data-scripts/heads_oracle.py` (`embedding_heads`): sub-center ArcFace at K = 2 and 3 (exact
/// and detached) and MagFace at the paper's defaults (norms 5..130: clamped at both ends) and at
/// a small scale, in f64 (1e-6 relative) and f32 (1e-4): loss, pooled cosines, dL/demb, dL/dW.
#[test]
fn subcenter_and_magface_match_the_oracle() {
    let mut cases: Vec<(String, HeadConfig, Tensor, Tensor)> = Vec::new();
    for (k, gradient, seed) in [
        (3i64, ArcFaceGradient::Exact, 61u64),
        (2, ArcFaceGradient::Detached, 62),
        (3, ArcFaceGradient::EasyMargin, 63),
    ] {
        let emb = randn(seed, &[B, D]);
        let w = sub_centre_weights(seed + 1, k, &emb);
        let cfg = HeadConfig::SubcenterArcface(SubCenterArcFaceConfig {
            k,
            s: 64.0,
            m: 0.5,
            gradient,
        });
        cases.push((format!("subcenter k={k} {gradient:?}"), cfg, emb, w));
    }
    let paper = MagFaceConfig::default();
    let (emb, w) = scaled_embeddings(64, &[5.0, 12.0, 33.0, 71.0, 104.0, 130.0]);
    cases.push((
        "magface paper defaults".into(),
        HeadConfig::Magface(paper),
        emb,
        w,
    ));
    let small = MagFaceConfig {
        s: 16.0,
        l_a: 1.0,
        u_a: 6.0,
        l_m: 0.3,
        u_m: 0.7,
        lambda_g: 3.0,
    };
    let (emb, w) = scaled_embeddings(65, &[0.5, 1.7, 2.9, 4.2, 5.5, 7.5]);
    cases.push(("magface small".into(), HeadConfig::Magface(small), emb, w));

    let mut request = Vec::new();
    let mut ours = Vec::new();
    for kind in [Kind::Double, Kind::Float] {
        for (name, cfg, emb, w) in &cases {
            let rows = |t: &Tensor| {
                let v = vals(t);
                let n = t.size()[1] as usize;
                json!(v.chunks(n).collect::<Vec<_>>())
            };
            request.push(json!({
                "head": serde_json::to_value(cfg).unwrap(),
                "dtype": if kind == Kind::Double { "float64" } else { "float32" },
                "emb": rows(emb),
                "weight": rows(w),
                "labels": LABELS,
            }));
            let k = cfg.classifier_kind().rows_per_class();
            let mut vs = nn::VarStore::new(Device::Cpu);
            vs.set_kind(kind);
            let cl = CosineClassifier::with_sub_centres(&vs.root(), C, k, D);
            let mut weight = cl.weight().shallow_clone();
            tch::no_grad(|| weight.copy_(&w.to_kind(kind)));
            let e = emb.to_kind(kind).set_requires_grad(true);
            let mut head = cfg.build();
            let cos = cl.cosines(&e);
            let n = e.norm_scalaropt_dim(2, [1], false);
            let loss = head.training_loss(&cos, &labels(), &e, &n);
            assert_eq!(loss.kind(), kind, "{name}");
            let g = Tensor::run_backward(&[&loss], &[&e, cl.weight()], false, false);
            ours.push((
                format!("{name} {kind:?}"),
                kind,
                loss.double_value(&[]),
                vals(&cos),
                vals(&g[0]),
                vals(&g[1]),
            ));
        }
    }
    let answer: Value =
        facerec_testkit::oracle("heads_oracle.py", &json!({ "embedding_heads": request }));
    let answers = answer["embedding_heads"].as_array().unwrap();
    assert_eq!(answers.len(), ours.len());
    for ((name, kind, loss, cos, ge, gw), ans) in ours.iter().zip(answers) {
        let rtol = if *kind == Kind::Double { 1e-6 } else { 1e-4 };
        let check = |what: &str, a: &[f64], e: &[f64]| {
            facerec_testkit::assert_close(&format!("{name} {what}"), a, e, rtol, 0.0)
        };
        check("loss", &[*loss], &[ans["loss"].as_f64().unwrap()]);
        check("cos", cos, &floats(&ans["cos"]));
        check("dL/demb", ge, &floats(&ans["grad_emb"]));
        check("dL/dW", gw, &floats(&ans["grad_weight"]));
    }
    eprintln!("{} sub-center / MagFace cases match the oracle", ours.len());
}
