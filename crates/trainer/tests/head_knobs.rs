//! Head knobs that must not lie: the shipped ElasticFace "+" recipes say what they are (the
//! reproduction recipes use what the released models used, `code_faithful` and σ = 0.02 for Cos+,
//! SPEC 2(b), 2(d); the `_paper` recipes the paper's reading, `paper_intent` and σ = 0.025 for
//! Cos+); SphereFace's `s` works with `scale = "fixed"` and is an error otherwise; under
//! `[cluster_guided]` a `[head]` value the cluster-guided head would ignore is an error; library
//! validation errors reach the user as `config key `head.<field>``.

use facerec_loss_heads::{HeadConfig, PlusAssignment};
use facerec_trainer::Config;
use std::path::Path;

fn head(recipe: &str) -> (PlusAssignment, f64, f64) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs/recipes")
        .join(recipe);
    let cfg = Config::load(Some(&path), &[]).unwrap_or_else(|e| panic!("{recipe}: {e:#}"));
    let p = match &cfg.head {
        HeadConfig::ElasticArcPlus(c) => c.params(),
        HeadConfig::ElasticCosPlus(c) => c.params(),
        other => panic!("{recipe}: not an ElasticFace \"+\" head: {other:?}"),
    };
    (p.plus.expect("a \"+\" variant"), p.m, p.sigma)
}

#[test]
fn elasticface_plus_recipes_reproduce_the_released_models_or_say_paper() {
    use PlusAssignment::{CodeFaithful, PaperIntent};
    assert_eq!(
        head("ms1mv2_r100_elasticface_arc_plus.toml"),
        (CodeFaithful, 0.5, 0.0175)
    );
    assert_eq!(
        head("ms1mv2_r100_elasticface_cos_plus.toml"),
        (CodeFaithful, 0.35, 0.02)
    );
    assert_eq!(
        head("ms1mv2_r100_elasticface_arc_plus_paper.toml"),
        (PaperIntent, 0.5, 0.0175)
    );
    assert_eq!(
        head("ms1mv2_r100_elasticface_cos_plus_paper.toml"),
        (PaperIntent, 0.35, 0.025)
    );
}

fn load_error(overrides: &[&str]) -> String {
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    format!(
        "{:#}",
        Config::load(None, &o).expect_err("an invalid config")
    )
}

#[test]
fn sphereface_s_works_with_a_fixed_scale_and_is_an_error_otherwise() {
    use facerec_loss_heads::SphereFaceScale;
    let ok = |o: &[&str]| {
        Config::load(None, &o.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    };
    let cfg = ok(&["head.type=sphereface"]);
    let HeadConfig::Sphereface(c) = &cfg.head else {
        panic!("{:?}", cfg.head)
    };
    assert_eq!((c.scale, c.s), (SphereFaceScale::FeatureNorm, 64.0));
    let cfg = ok(&["head.type=sphereface", "head.scale=fixed", "head.s=30.0"]);
    let HeadConfig::Sphereface(c) = &cfg.head else {
        panic!("{:?}", cfg.head)
    };
    assert_eq!((c.scale, c.s), (SphereFaceScale::Fixed, 30.0));
    let e = load_error(&["head.type=sphereface", "head.s=30.0"]);
    assert!(
        e.starts_with("config key `head.s`:") && e.contains("scale = \"fixed\""),
        "{e}"
    );
}

#[test]
fn library_validation_errors_name_the_config_key() {
    let e = load_error(&["head.m=3.5"]);
    assert!(
        e.starts_with("config key `head.m`: must be in [0, π)"),
        "{e}"
    );
    let e = load_error(&["partial_fc.sample_rate=1.5"]);
    assert!(
        e.starts_with("config key `partial_fc.sample_rate`: must be in (0, 1]"),
        "{e}"
    );
    let e = load_error(&["head.type=elastic_cos", "head.sigma=0.5"]);
    assert!(e.starts_with("config key `head.sigma`: must be"), "{e}");
}

#[test]
fn cluster_guided_rejects_head_values_it_would_ignore() {
    // The default config's head is ArcFace with s = 32 (m 0.3, here set to the cluster-guided
    // default m0 = 0.5): the cluster-guided margin must agree.
    let base = [
        "cluster_guided.refresh_every_epochs=1",
        "cluster_guided.margin.s=32.0",
        "head.m=0.5",
    ];
    let ok: Vec<String> = base.iter().map(|s| s.to_string()).collect();
    Config::load(None, &ok).unwrap();
    for (extra, key) in [
        ("head.s=16.0", "config key `head.s`:"),
        ("head.m=0.4", "config key `head.m`:"),
        ("head.gradient=detached", "config key `head.gradient`:"),
        ("cluster_guided.margin.m0=0.45", "config key `head.m`:"),
    ] {
        let e = load_error(&[base[0], base[1], base[2], extra]);
        assert!(e.starts_with(key), "{extra}: {e}");
    }
}

/// Sub-center ArcFace's `k` and MagFace's norm interval reach the user by their config keys;
/// cluster-guided ArcFace refuses the sub-center head (its tables use the classifier rows as
/// class centres).
#[test]
fn subcenter_and_magface_errors_name_the_config_key() {
    let e = load_error(&["head.type=subcenter_arcface", "head.k=0"]);
    assert!(
        e.starts_with("config key `head.k`: must be in [1, 64]"),
        "{e}"
    );
    let e = load_error(&["head.type=magface", "head.u_a=5.0"]);
    assert!(
        e.starts_with("config key `head.u_a`: must be finite and > l_a"),
        "{e}"
    );
    let e = load_error(&[
        "head.type=subcenter_arcface",
        "cluster_guided.refresh_every_epochs=1",
    ]);
    assert!(
        e.starts_with("config key `head.type`: [cluster_guided] trains its own"),
        "{e}"
    );
}
