//! The margin state (a `VarStore` buffer that checkpoints carry), the moving-average direction,
//! and the embedding augmentation (`dropout_views`) with a real backbone split.

use facerec_backbone::{build, BackboneConfig, IResNetConfig};
use facerec_contrastive_regularizer::{
    dropout_views, AdaptiveMarginConfig, CoReFace, CoReFaceConfig, ContrastiveRegularizer,
    MarginConfig, MomentumOn,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

/// Views from a fixed ChaCha stream (libtorch's global generator is shared by parallel tests).
fn batch(seed: u64) -> (Tensor, Tensor, Tensor) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut g = || {
        let v: Vec<f32> = (0..40).map(|_| rng.sample(StandardNormal)).collect();
        Tensor::from_slice(&v).view([8, 5])
    };
    let v1 = g();
    let v2 = &v1 + g() * 0.5;
    (v1, v2, Tensor::from_slice(&[0i64, 1, 0, 2, 3, 1, 4, 5]))
}

fn scalar(t: &Tensor) -> f64 {
    t.double_value(&[])
}

#[test]
fn margin_is_a_checkpointed_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.safetensors");
    let vs = nn::VarStore::new(Device::Cpu);
    let mut reg = CoReFace::new(&(vs.root() / "coreface"), &CoReFaceConfig::default());
    assert_eq!(scalar(reg.margin_state()), 0.0);
    assert!(
        vs.trainable_variables().is_empty(),
        "the margin does not train"
    );
    let mut last = 0.0;
    for step in 0..3 {
        let (v1, v2, y) = batch(step);
        last = scalar(&reg.forward(&v1, &v2, &y).margin);
    }
    assert_ne!(last, 0.0);
    // The VarStore variable is the state (same storage).
    assert_eq!(scalar(&vs.variables()["coreface.margin"]), last);
    vs.save(&path).unwrap();

    let mut vs2 = nn::VarStore::new(Device::Cpu);
    let mut reg2 = CoReFace::new(&(vs2.root() / "coreface"), &CoReFaceConfig::default());
    vs2.load(&path).unwrap();
    assert_eq!(scalar(reg2.margin_state()), last);
    // A resumed regularizer continues exactly like the original.
    let (v1, v2, y) = batch(9);
    let a = reg.forward(&v1, &v2, &y);
    let b = reg2.forward(&v1, &v2, &y);
    assert_eq!(scalar(&a.margin), scalar(&b.margin));
    assert_eq!(scalar(&a.loss), scalar(&b.loss));
}

#[test]
fn moving_average_direction() {
    let adaptive = |momentum, momentum_on| CoReFaceConfig {
        margin: MarginConfig::Adaptive(AdaptiveMarginConfig {
            momentum,
            momentum_on,
        }),
        ..Default::default()
    };
    let (v1, v2, y) = batch(1);
    let run = |cfg: &CoReFaceConfig, prev: f64| {
        let mut reg = CoReFace::standalone(cfg, Device::Cpu, Kind::Float);
        reg.set_margin(prev);
        let out = reg.forward(&v1, &v2, &y);
        (scalar(&out.margin), scalar(&out.batch_gap))
    };
    let prev = 0.123;
    // Weight on the batch: the released code.
    let (m, gap) = run(&adaptive(0.99, MomentumOn::Batch), prev);
    assert!((m - (0.99 * gap + 0.01 * prev)).abs() < 1e-6, "{m} {gap}");
    // Weight on the state: textbook EMA.
    let (m, gap) = run(&adaptive(0.99, MomentumOn::State), prev);
    assert!((m - (0.99 * prev + 0.01 * gap)).abs() < 1e-6, "{m} {gap}");
    // Extremes: momentum 1 on the batch is the per-batch gap; on the state, a frozen margin.
    let (m, gap) = run(&adaptive(1.0, MomentumOn::Batch), prev);
    assert!((m - gap).abs() < 1e-7);
    let (m, _) = run(&adaptive(1.0, MomentumOn::State), prev);
    assert!((m - prev).abs() < 1e-7);
    // The gap is mean(positive − hardest negative) and positive.
    let mut reg = CoReFace::standalone(&CoReFaceConfig::default(), Device::Cpu, Kind::Float);
    let out = reg.forward(&v1, &v2, &y);
    let gap = scalar(&out.batch_gap);
    assert!((gap - (scalar(&out.positive_cos) - scalar(&out.hardest_negative_cos))).abs() < 1e-6);
    assert!(
        gap > 0.0,
        "views 0.5 noise apart must be closer than other images"
    );
}

#[test]
fn dropout_views_draw_two_independent_masks() {
    tch::manual_seed(3);
    let h = Tensor::rand([64, 200], (Kind::Double, Device::Cpu)) + 0.5;
    let p = 0.6;
    let (a, b) = dropout_views(&h, p, |x| x.shallow_clone());
    for v in [&a, &b] {
        let ratio = v / &h;
        let kept = ratio.gt(0.0);
        // Kept entries are scaled by 1 / (1 − p), dropped ones are 0.
        let scaled = (&ratio - 1.0 / (1.0 - p)).abs().lt(1e-12);
        assert!(kept.eq_tensor(&scaled).all().int64_value(&[]) == 1);
        let frac = f64::try_from(kept.to_kind(Kind::Double).mean(Kind::Double)).unwrap();
        assert!((frac - (1.0 - p)).abs() < 0.02, "keep fraction {frac}");
    }
    let agree = f64::try_from(
        a.gt(0.0)
            .eq_tensor(&b.gt(0.0))
            .to_kind(Kind::Double)
            .mean(Kind::Double),
    )
    .unwrap();
    // Independent masks agree on p² + (1 − p)² = 0.52 of the entries.
    assert!((agree - 0.52).abs() < 0.02, "mask agreement {agree}");
    let (a, b) = dropout_views(&h, 0.0, |x| x.shallow_clone());
    assert!(a.equal(&h) && b.equal(&h));
}

/// With a real backbone: p = 0 gives two views equal to the single training forward; evaluation is
/// the ordinary eval forward; with p > 0 the views differ and both reach the trunk's gradient.
#[test]
fn views_through_a_backbone_neck() {
    let cfg = BackboneConfig::Iresnet(IResNetConfig {
        depth: None,
        layers: Some([1, 1, 1, 1]),
        widths: [8, 8, 16, 16],
        embedding_size: 16,
        dropout: 0.0,
        input_size: 32,
        channels_last: false,
    });
    let vs = nn::VarStore::new(Device::Cpu);
    let model = build(&vs.root(), &cfg);
    tch::manual_seed(5);
    let x = Tensor::rand([6, 3, 32, 32], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    let trunk = model.forward_trunk_t(&x, true);
    let (a, b) = dropout_views(&trunk, 0.0, |h| model.forward_neck_t(h, true));
    let whole = model.forward_t(&x, true);
    assert!(a.allclose(&whole, 1e-6, 1e-6, false) && b.allclose(&whole, 1e-6, 1e-6, false));
    let (a, b) = dropout_views(&trunk, 0.6, |h| model.forward_neck_t(h, true));
    assert!(!a.allclose(&b, 1e-3, 1e-3, false));
    let mut reg = CoReFace::standalone(&CoReFaceConfig::default(), Device::Cpu, Kind::Float);
    let y = Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2]);
    reg.forward(&a, &b, &y).loss.backward();
    let g = vs.variables()["conv1.weight"].grad();
    assert!(f64::try_from(g.abs().sum(Kind::Float)).unwrap() > 0.0);
    let eval = tch::no_grad(|| model.forward_neck_t(&model.forward_trunk_t(&x, false), false));
    let want = tch::no_grad(|| model.forward_t(&x, false));
    assert!(eval.equal(&want));
}
