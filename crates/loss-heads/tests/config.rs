//! `HeadConfig` from TOML: defaults, tags, validation messages naming the key, unknown keys.

use facerec_loss_heads::{
    ArcFaceConfig, ArcFaceGradient, CosFaceConfig, HeadConfig, NormFaceConfig,
};
use serde::{Deserialize, Serialize};

/// The shape the trainer's config has around the head: a `[head]` table.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Root {
    head: HeadConfig,
}

fn parse(body: &str) -> Result<HeadConfig, toml::de::Error> {
    toml::from_str::<Root>(&format!("[head]\n{body}")).map(|r| r.head)
}

fn validation_error(body: &str) -> String {
    let cfg = parse(body).expect("parses");
    format!(
        "{:#}",
        cfg.validate()
            .expect_err(&format!("{body:?} must be rejected"))
    )
}

#[test]
fn defaults_per_head() {
    assert_eq!(
        parse("type = \"normface\"").unwrap(),
        HeadConfig::Normface(NormFaceConfig { s: 64.0 })
    );
    assert_eq!(
        parse("type = \"cosface\"").unwrap(),
        HeadConfig::Cosface(CosFaceConfig { s: 64.0, m: 0.35 })
    );
    let arc = ArcFaceConfig {
        s: 64.0,
        m: 0.5,
        gradient: ArcFaceGradient::Exact,
    };
    assert_eq!(
        parse("type = \"arcface\"").unwrap(),
        HeadConfig::Arcface(arc.clone())
    );
    assert_eq!(HeadConfig::default(), HeadConfig::Arcface(arc));
    HeadConfig::default().validate().unwrap();
}

#[test]
fn explicit_values_and_gradient_modes() {
    for (name, mode) in [
        ("exact", ArcFaceGradient::Exact),
        ("easy_margin", ArcFaceGradient::EasyMargin),
        ("detached", ArcFaceGradient::Detached),
    ] {
        let cfg = parse(&format!(
            "type = \"arcface\"\ns = 30\nm = 0.4\ngradient = \"{name}\""
        ))
        .unwrap();
        assert_eq!(
            cfg,
            HeadConfig::Arcface(ArcFaceConfig {
                s: 30.0,
                m: 0.4,
                gradient: mode
            })
        );
        cfg.validate().unwrap();
    }
    let cos = parse("type = \"cosface\"\nm = 0.4").unwrap();
    assert_eq!(cos, HeadConfig::Cosface(CosFaceConfig { s: 64.0, m: 0.4 }));
}

#[test]
fn round_trips_through_toml() {
    let head = HeadConfig::Arcface(ArcFaceConfig {
        s: 32.0,
        m: 0.45,
        gradient: ArcFaceGradient::EasyMargin,
    });
    let text = toml::to_string(&Root { head: head.clone() }).unwrap();
    assert!(
        text.contains("type = \"arcface\"") && text.contains("gradient = \"easy_margin\""),
        "{text}"
    );
    assert_eq!(toml::from_str::<Root>(&text).unwrap().head, head);
}

#[test]
fn bad_margins_name_the_field_m() {
    for body in [
        "type = \"arcface\"\nm = -0.1",
        "type = \"arcface\"\nm = 3.1416",
        "type = \"arcface\"\nm = nan",
        "type = \"cosface\"\nm = -0.01",
        "type = \"cosface\"\nm = 2.0",
    ] {
        let e = validation_error(body);
        assert!(e.starts_with("m must be in"), "{body:?}: {e}");
    }
    assert!(validation_error("type = \"arcface\"\nm = 3.2").contains("[0, π)"));
}

#[test]
fn bad_scales_name_the_field_s() {
    for head in ["normface", "cosface", "arcface"] {
        for s in ["0.0", "-1.0", "inf", "nan"] {
            let body = format!("type = \"{head}\"\ns = {s}");
            let e = validation_error(&body);
            assert!(e.starts_with("s must be finite and > 0"), "{body:?}: {e}");
        }
    }
}

#[test]
fn unknown_key_fails_naming_the_key() {
    for (body, key) in [
        ("type = \"arcface\"\nmargin = 0.5", "margin"),
        (
            "type = \"cosface\"\nm = 0.35\ngradient = \"exact\"",
            "gradient",
        ),
        ("type = \"normface\"\nm = 0.1", "`m`"),
    ] {
        let e = parse(body).expect_err(body).to_string();
        assert!(
            e.contains("unknown field") && e.contains(key),
            "{body:?}: {e}"
        );
    }
}

#[test]
fn unknown_type_and_mode_fail_naming_the_value() {
    // (`magface` was the unknown name here until the head existed.)
    let e = parse("type = \"sphereface2\"").unwrap_err().to_string();
    assert!(e.contains("sphereface2"), "{e}");
    let e = parse("type = \"arcface\"\ngradient = \"threshold\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("threshold"), "{e}");
    assert!(parse("s = 64.0").unwrap_err().to_string().contains("type"));
}

#[test]
#[should_panic(expected = "m must be in")]
fn build_panics_on_invalid_config() {
    HeadConfig::Arcface(ArcFaceConfig {
        m: 4.0,
        ..Default::default()
    })
    .build();
}

#[test]
fn new_heads_defaults() {
    use facerec_loss_heads::{
        CombinedConfig, ElasticArcConfig, ElasticArcPlusConfig, ElasticCosConfig,
        ElasticCosPlusConfig, PlusAssignment, SoftmaxConfig, SphereFaceConfig, SphereFaceScale,
    };
    assert_eq!(
        parse("type = \"softmax\"").unwrap(),
        HeadConfig::Softmax(SoftmaxConfig {})
    );
    assert_eq!(
        parse("type = \"sphereface\"").unwrap(),
        HeadConfig::Sphereface(SphereFaceConfig {
            m: 4,
            scale: SphereFaceScale::FeatureNorm,
            s: 64.0,
            lambda_base: 1000.0,
            lambda_gamma: 0.12,
            lambda_power: 1.0,
            lambda_min: 5.0
        })
    );
    assert_eq!(
        parse("type = \"combined\"").unwrap(),
        HeadConfig::Combined(CombinedConfig {
            s: 64.0,
            m1: 1.0,
            m2: 0.3,
            m3: 0.2,
            gradient: ArcFaceGradient::Exact
        })
    );
    let p = |body: &str| match parse(body).unwrap() {
        HeadConfig::ElasticArc(c) => c.params(),
        HeadConfig::ElasticCos(c) => c.params(),
        HeadConfig::ElasticArcPlus(c) => c.params(),
        HeadConfig::ElasticCosPlus(c) => c.params(),
        other => panic!("{other:?}"),
    };
    let arc = p("type = \"elastic_arc\"");
    assert_eq!((arc.s, arc.m, arc.sigma, arc.plus), (64.0, 0.5, 0.05, None));
    let cos = p("type = \"elastic_cos\"");
    assert_eq!((cos.m, cos.sigma, cos.plus), (0.35, 0.05, None));
    let arcp = p("type = \"elastic_arc_plus\"");
    assert_eq!(
        (arcp.m, arcp.sigma, arcp.plus),
        (0.5, 0.0175, Some(PlusAssignment::PaperIntent))
    );
    let cosp = p("type = \"elastic_cos_plus\"\nassignment = \"code_faithful\"\nsigma = 0.02");
    assert_eq!(
        (cosp.m, cosp.sigma, cosp.plus),
        (0.35, 0.02, Some(PlusAssignment::CodeFaithful))
    );
    assert_eq!(
        ElasticCosPlusConfig::default().params(),
        p("type = \"elastic_cos_plus\"")
    );
    assert_eq!(ElasticArcConfig::default().params(), arc);
    assert_eq!(ElasticCosConfig::default().params(), cos);
    assert_eq!(ElasticArcPlusConfig::default().params(), arcp);
    for body in [
        "type = \"softmax\"",
        "type = \"sphereface\"",
        "type = \"combined\"",
        "type = \"elastic_arc\"",
        "type = \"elastic_cos_plus\"",
    ] {
        parse(body).unwrap().validate().unwrap();
    }
}

#[test]
fn new_heads_bad_values_name_the_field() {
    for (body, key) in [
        ("type = \"combined\"\nm1 = 0.0", "m1 "),
        ("type = \"combined\"\nm2 = 3.2", "m2 "),
        ("type = \"combined\"\nm3 = -0.1", "m3 "),
        ("type = \"combined\"\ns = 0", "s "),
        ("type = \"sphereface\"\nm = 0", "m "),
        ("type = \"sphereface\"\nm = 9", "m "),
        ("type = \"sphereface\"\nlambda_min = -1", "lambda_min "),
        ("type = \"sphereface\"\nlambda_gamma = nan", "lambda_gamma "),
        ("type = \"elastic_arc\"\nsigma = -0.01", "sigma "),
        ("type = \"elastic_cos\"\nsigma = 0.2", "sigma "),
        ("type = \"elastic_arc_plus\"\nm = 3.5", "m "),
        ("type = \"elastic_cos_plus\"\nm = 2.5", "m "),
    ] {
        let e = validation_error(body);
        assert!(e.starts_with(key), "{body:?}: {e}");
    }
    for (body, key) in [
        ("type = \"softmax\"\ns = 64", "`s`"),
        (
            "type = \"elastic_arc\"\nassignment = \"paper_intent\"",
            "assignment",
        ),
        ("type = \"sphereface\"\nlambda = 5", "lambda"),
    ] {
        let e = parse(body).expect_err(body).to_string();
        assert!(
            e.contains("unknown field") && e.contains(key),
            "{body:?}: {e}"
        );
    }
    let e = parse("type = \"elastic_arc_plus\"\nassignment = \"random\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("random"), "{e}");
}

#[test]
fn partial_fc_config() {
    use facerec_loss_heads::PartialFcConfig;
    let c: PartialFcConfig = toml::from_str("").unwrap();
    assert_eq!(
        c,
        PartialFcConfig {
            sample_rate: 1.0,
            seed: 0
        }
    );
    c.validate().unwrap();
    for r in ["0.0", "1.5", "nan", "-0.2"] {
        let c: PartialFcConfig = toml::from_str(&format!("sample_rate = {r}")).unwrap();
        let e = format!("{:#}", c.validate().unwrap_err());
        assert!(e.starts_with("sample_rate must be"), "{e}");
    }
    assert!(toml::from_str::<PartialFcConfig>("rate = 0.1").is_err());
}

#[test]
fn curricularface_and_adaface_parse_with_defaults_and_name_bad_keys() {
    use facerec_loss_heads::{AdaFaceConfig, CurricularFaceConfig};
    assert_eq!(
        parse("type = \"curricularface\"").unwrap(),
        HeadConfig::Curricularface(CurricularFaceConfig {
            s: 64.0,
            m: 0.5,
            alpha: 0.01
        })
    );
    assert_eq!(
        parse("type = \"adaface\"\nm = 0.3").unwrap(),
        HeadConfig::Adaface(AdaFaceConfig {
            s: 64.0,
            m: 0.3,
            h: 0.333,
            alpha: 0.01
        })
    );
    assert!(validation_error("type = \"curricularface\"\nalpha = 1.5")
        .starts_with("alpha must be in [0, 1]"));
    assert!(
        validation_error("type = \"curricularface\"\nm = 3.2").starts_with("m must be in [0, π)")
    );
    assert!(validation_error("type = \"adaface\"\nh = 0.0").starts_with("h must be in (0, 10]"));
    assert!(validation_error("type = \"adaface\"\nm = 1.5").starts_with("m must be in [0, 1]"));
    let err = parse("type = \"adaface\"\nmomentum = 0.9")
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown field `momentum`"), "{err}");
}

#[test]
fn subcenter_arcface_and_magface_parse_with_defaults_and_name_bad_keys() {
    use facerec_loss_heads::{ClassifierKind, MagFaceConfig, SubCenterArcFaceConfig};
    let sub = parse("type = \"subcenter_arcface\"").unwrap();
    assert_eq!(
        sub,
        HeadConfig::SubcenterArcface(SubCenterArcFaceConfig {
            k: 3,
            s: 64.0,
            m: 0.5,
            gradient: ArcFaceGradient::Exact
        })
    );
    assert_eq!(sub.classifier_kind(), ClassifierKind::SubCenter(3));
    let sub =
        parse("type = \"subcenter_arcface\"\nk = 2\nm = 0.4\ngradient = \"detached\"").unwrap();
    assert_eq!(sub.classifier_kind(), ClassifierKind::SubCenter(2));
    assert_eq!(sub.classifier_kind().rows_per_class(), 2);
    assert!(
        validation_error("type = \"subcenter_arcface\"\nk = 0").starts_with("k must be in [1, 64]")
    );
    assert!(validation_error("type = \"subcenter_arcface\"\nm = 3.5")
        .starts_with("m must be in [0, π)"));
    let mag = parse("type = \"magface\"").unwrap();
    assert_eq!(
        mag,
        HeadConfig::Magface(MagFaceConfig {
            s: 64.0,
            l_a: 10.0,
            u_a: 110.0,
            l_m: 0.45,
            u_m: 0.8,
            lambda_g: 35.0
        })
    );
    assert_eq!(mag.classifier_kind(), ClassifierKind::Cosine);
    assert!(validation_error("type = \"magface\"\nu_a = 5.0")
        .starts_with("u_a must be finite and > l_a"));
    assert!(
        validation_error("type = \"magface\"\nl_a = 0.0").starts_with("l_a must be finite and > 0")
    );
    assert!(
        validation_error("type = \"magface\"\nu_m = 0.3").starts_with("u_m must be in [l_m, π)")
    );
    assert!(validation_error("type = \"magface\"\nlambda_g = -1.0").starts_with("lambda_g must be"));
    for (ty, key) in [("magface", "m"), ("subcenter_arcface", "sub_centers")] {
        let err = parse(&format!("type = \"{ty}\"\n{key} = 1.0"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("unknown field `{key}`")), "{err}");
    }
}
