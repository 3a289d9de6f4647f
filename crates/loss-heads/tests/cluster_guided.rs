//! Cluster-guided ArcFace (`src/cluster_guided.rs`, our reading of SPEC 4(c)): reduction to
//! ArcFace at zero slope, finite-difference gradient checks in f64, parity with the independent
//! torch oracle `data-scripts/cluster_guided_oracle.py` (head in the three gradient modes, the
//! margin-from-hardness rule), the signed margin rule, and the margin table as a checkpointed
//! buffer. (Hardness, centres, `L_scc`, `L_align` and re-imprinting are tested in
//! `crates/clustering/tests/cluster_guided.rs`; the `[cluster_guided]` table in the trainer.)

use facerec_loss_heads::{
    cross_entropy, margins_from_hardness, ArcFace, ArcFaceConfig, ArcFaceGradient,
    ClusterGuidedArcFace, ClusterMarginConfig, CosineClassifier, MarginHead, MarginSign,
};
use facerec_testkit::gradcheck::{check_gradients, GradCheck};
use facerec_testkit::{floats, randn};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use tch::{nn, Device, Kind, Tensor};

const MODES: [ArcFaceGradient; 3] = [
    ArcFaceGradient::Exact,
    ArcFaceGradient::EasyMargin,
    ArcFaceGradient::Detached,
];

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
    (
        Tensor::from_slice(&v).view([b as i64, c as i64]),
        Tensor::from_slice(&labels),
        margins,
    )
}

#[test]
fn zero_slope_is_exactly_arcface() {
    // Any hardness (seen or unseen): with slope 0 every margin is m0.
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut hardness: Vec<f64> = (0..5).map(|_| rng.gen_range(0.0..1.0)).collect();
    hardness[3] = f64::NAN;
    let cfg = ClusterMarginConfig {
        slope: 0.0,
        ..Default::default()
    };
    let margins = margins_from_hardness(&hardness, &cfg);
    assert!(margins.iter().all(|&m| m == 0.5), "{margins:?}");
    let (cos, labels, _) = cos_fixture();
    for gradient in MODES {
        let vs = nn::VarStore::new(Device::Cpu);
        let mut head = ClusterGuidedArcFace::new(
            &(vs.root() / "head"),
            5,
            &ClusterMarginConfig {
                slope: 0.0,
                gradient,
                ..Default::default()
            },
        );
        head.set_margins(&margins);
        let arc = ArcFace::new(&ArcFaceConfig {
            s: 64.0,
            m: 0.5,
            gradient,
        });
        let c1 = cos.set_requires_grad(true);
        let z1 = head.logits(&c1, &labels);
        let z2 = arc.logits(&c1, &labels);
        assert!(
            z1.allclose(&z2, 1e-13, 1e-13, false),
            "{gradient:?}: logits"
        );
        let g1 = Tensor::run_backward(&[cross_entropy(&z1, &labels)], &[&c1], false, false);
        let g2 = Tensor::run_backward(&[cross_entropy(&z2, &labels)], &[&c1], false, false);
        assert!(
            g1[0].allclose(&g2[0], 1e-12, 1e-13, false),
            "{gradient:?}: gradient"
        );
    }
}

#[test]
fn head_gradients_match_finite_differences() {
    let (b, c, d) = (5, 6, 8);
    for gradient in MODES {
        let mut vs = nn::VarStore::new(Device::Cpu);
        vs.set_kind(Kind::Double);
        let classifier = CosineClassifier::new(&(vs.root() / "fc"), c, d);
        let w = randn(2, &[c, d]);
        let mut weight = classifier.weight().shallow_clone();
        tch::no_grad(|| weight.copy_(&w));
        let emb = randn(3, &[b, d]).set_requires_grad(true);
        let labels = Tensor::from_slice(&[0i64, 2, 5, 1, 2]);
        let m = Tensor::from_slice(&[0.3, 0.45, 0.7, 0.5, 0.55, 0.62]);
        let head = ClusterGuidedArcFace::with_margins(m, 8.0, gradient);
        let f = || cross_entropy(&head.logits(&classifier.cosines(&emb), &labels), &labels);
        if gradient == ArcFaceGradient::Detached {
            continue; // a straight-through estimator: autograd is not the derivative of f
        }
        check_gradients(
            f,
            &[("emb", &emb), ("weight", classifier.weight())],
            &GradCheck::default(),
        )
        .unwrap_or_else(|e| panic!("{gradient:?}: {e:#}"));
    }
}

#[test]
fn head_and_margins_match_the_torch_oracle() {
    let (cos, labels, margins) = cos_fixture();
    let mut req = json!({"head": [], "margins": []});
    for mode in ["exact", "easy_margin", "detached"] {
        req["head"].as_array_mut().unwrap().push(json!({"cos": rows(&cos), "labels": to_vec(&labels.to_kind(Kind::Double)).iter().map(|&x| x as i64).collect::<Vec<_>>(),
            "margins": margins, "s": 64.0, "mode": mode}));
    }
    let hard = vec![Some(0.1), None, Some(0.9), Some(0.4), Some(0.0)];
    let margin_cases = [
        ("harder_larger", MarginSign::HarderLarger, 0.2),
        ("harder_smaller", MarginSign::HarderSmaller, 0.5),
        ("harder_larger", MarginSign::HarderLarger, 0.0),
    ];
    for (sign, _, slope) in margin_cases {
        req["margins"].as_array_mut().unwrap().push(json!({"hardness": hard, "m0": 0.5, "slope": slope, "m_min": 0.3, "m_max": 0.7, "sign": sign}));
    }
    let ans = facerec_testkit::oracle("cluster_guided_oracle.py", &req);

    for (i, mode) in MODES.iter().enumerate() {
        let head = ClusterGuidedArcFace::with_margins(Tensor::from_slice(&margins), 64.0, *mode);
        let x = cos.set_requires_grad(true);
        let loss = cross_entropy(&head.logits(&x, &labels), &labels);
        let g = Tensor::run_backward(&[&loss], &[&x], false, false);
        let o = &ans["head"][i];
        close(
            &format!("head {mode:?} loss"),
            &[loss.double_value(&[])],
            &[o["loss"].as_f64().unwrap()],
            1e-10,
        );
        close(
            &format!("head {mode:?} grad"),
            &to_vec(&g[0]),
            &floats(&o["grad_cos"]),
            1e-9,
        );
    }
    let hard_rs: Vec<f64> = hard.iter().map(|h| h.unwrap_or(f64::NAN)).collect();
    for (i, (_, sign, slope)) in margin_cases.into_iter().enumerate() {
        let cfg = ClusterMarginConfig {
            slope,
            sign,
            ..Default::default()
        };
        close(
            "margins",
            &margins_from_hardness(&hard_rs, &cfg),
            &floats(&ans["margins"][i]["margins"]),
            1e-14,
        );
    }
}

#[test]
fn harder_identity_gets_the_signed_margin() {
    // Identity 1 harder than identity 0, identity 2 unseen.
    let hardness = [0.05, 0.5, f64::NAN];
    let m = margins_from_hardness(&hardness, &ClusterMarginConfig::default());
    assert!(m[1] > 0.5 && m[0] < 0.5 && m[2] == 0.5, "{m:?}");
    let m = margins_from_hardness(
        &hardness,
        &ClusterMarginConfig {
            sign: MarginSign::HarderSmaller,
            ..Default::default()
        },
    );
    assert!(m[1] < 0.5 && m[0] > 0.5, "{m:?}");
    // m0 ± slope·(h − h̄), clipped: h̄ = 0.275, 0.5 + 0.2·0.225 = 0.545.
    let m = margins_from_hardness(&hardness, &ClusterMarginConfig::default());
    assert!(
        (m[1] - 0.545).abs() < 1e-15 && (m[0] - 0.455).abs() < 1e-15,
        "{m:?}"
    );
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
    close(
        "loaded margins",
        &to_vec(head2.margins()),
        &[0.3, 0.4, 0.6, 0.7],
        1e-7,
    );
    std::fs::remove_dir_all(&dir).ok();
    // Over a class subset the plain `logits` refuses; `logits_for_classes` takes global ids.
    let cos = Tensor::zeros([2, 2], (Kind::Float, Device::Cpu));
    let local = Tensor::from_slice(&[0i64, 1]);
    let global = Tensor::from_slice(&[3i64, 0]);
    let z = head2.logits_for_classes(&cos, &local, &global);
    let expect = [
        64.0 * (std::f64::consts::FRAC_PI_2 + 0.7).cos(),
        0.0,
        0.0,
        64.0 * (std::f64::consts::FRAC_PI_2 + 0.3).cos(),
    ];
    close("subset logits", &to_vec(&z), &expect, 1e-5);
    assert!(std::panic::catch_unwind(|| head2.logits(&cos, &local)).is_err());
}

#[test]
fn margin_config_defaults_and_errors_name_the_field() {
    let cfg: ClusterMarginConfig = toml::from_str("").unwrap();
    assert_eq!(cfg, ClusterMarginConfig::default());
    cfg.validate().unwrap();
    let cfg: ClusterMarginConfig =
        toml::from_str("slope = 0.0\nsign = \"harder_smaller\"\ngradient = \"detached\"").unwrap();
    assert_eq!(
        (cfg.slope, cfg.sign, cfg.gradient),
        (0.0, MarginSign::HarderSmaller, ArcFaceGradient::Detached)
    );
    assert!(toml::from_str::<ClusterMarginConfig>("m = 0.5").is_err());
    for (cfg, start) in [
        (
            ClusterMarginConfig {
                m0: 0.8,
                ..Default::default()
            },
            "need 0 <= m_min <= m0 <= m_max",
        ),
        (
            ClusterMarginConfig {
                s: 0.0,
                ..Default::default()
            },
            "s must be",
        ),
        (
            ClusterMarginConfig {
                slope: -1.0,
                ..Default::default()
            },
            "slope must be",
        ),
    ] {
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.starts_with(start), "{e}");
    }
}
