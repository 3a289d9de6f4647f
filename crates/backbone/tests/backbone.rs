//! Shapes, train/eval behaviour, initialisation statistics and preset sizes of the backbones
//! (no Python needed; the oracle comparisons live in `oracle.rs`).

use facerec_backbone::{
    build, Backbone, BackboneConfig, IResNet, IResNetConfig, MobileFaceNetConfig,
};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

mod common;
use common::{images, max_diff, small};

#[test]
fn r18_at_112_gives_512_embeddings() {
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg = BackboneConfig::Iresnet(IResNetConfig::r18());
    let model = build(&vs.root(), &cfg);
    assert!(matches!(model, Backbone::IResNet(_)));
    let fc = vs.variables()["fc.weight"].size();
    assert_eq!(fc, [512, 512 * 7 * 7]);
    let y = tch::no_grad(|| model.forward_t(&images(2, 112), false));
    assert_eq!(y.size(), [2, 512]);
    assert_eq!(y.kind(), Kind::Float);
}

#[test]
fn small_custom_at_56_gives_128_embeddings() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = build(&vs.root(), &BackboneConfig::Iresnet(small()));
    // 56 -> 28 -> 14 -> 7 -> 4.
    assert_eq!(vs.variables()["fc.weight"].size(), [128, 128 * 4 * 4]);
    assert_eq!(vs.variables()["conv1.weight"].size(), [16, 3, 3, 3]);
    assert_eq!(
        vs.variables()["layer4.0.downsample.0.weight"].size(),
        [128, 64, 1, 1]
    );
    let y = model.forward_t(&images(3, 56), true);
    assert_eq!(y.size(), [3, 128]);
    // Gradients reach the stem.
    y.square().sum(Kind::Float).backward();
    let g = vs.variables()["conv1.weight"].grad();
    assert!(f64::try_from(g.abs().sum(Kind::Float)).unwrap() > 0.0);
}

#[test]
fn train_and_eval_differ_only_by_batch_norm_and_dropout() {
    let vs = nn::VarStore::new(Device::Cpu);
    let mut model = IResNet::new(&vs.root(), &small());
    let x = images(4, 56);
    let _guard = tch::no_grad_guard();
    let eval_a = model.forward_t(&x, false);
    let eval_b = model.forward_t(&x, false);
    assert_eq!(max_diff(&eval_a, &eval_b), 0.0, "eval is deterministic");
    let train_a = model.forward_t(&x, true);
    let train_b = model.forward_t(&x, true);
    assert!(
        max_diff(&train_a, &train_b) < 1e-5,
        "train without dropout is deterministic"
    );
    assert!(
        max_diff(&train_a, &eval_a) > 1e-2,
        "train uses batch statistics"
    );
    // In training mode `features` standardises each embedding dimension over the batch.
    let mean = train_a.mean_dim(0, false, Kind::Float);
    let bias = &vs.variables()["features.bias"];
    assert!(max_diff(&mean, bias) < 1e-4);
    // Eval uses the running statistics that the two training passes moved.
    let eval_c = model.forward_t(&x, false);
    assert!(max_diff(&eval_c, &eval_a) > 1e-4);
    // Dropout acts in training mode only.
    model.dropout = 0.5;
    assert_eq!(max_diff(&model.forward_t(&x, false), &eval_c), 0.0);
    let drop_a = model.forward_t(&x, true);
    let drop_b = model.forward_t(&x, true);
    assert!(max_diff(&drop_a, &drop_b) > 1e-3);
}

/// Mean and standard deviation over all values of the variables whose names satisfy `pick`.
fn stats(vs: &nn::VarStore, pick: impl Fn(&str) -> bool) -> (f64, f64, usize) {
    let ts: Vec<Tensor> = vs
        .variables()
        .into_iter()
        .filter(|(k, _)| pick(k))
        .map(|(_, t)| t.flatten(0, -1))
        .collect();
    assert!(!ts.is_empty());
    let all = Tensor::cat(&ts, 0);
    let mean = f64::try_from(all.mean(Kind::Double)).unwrap();
    let std = f64::try_from(all.std(true)).unwrap();
    (mean, std, ts.len())
}

#[test]
fn iresnet_init_follows_arcface_torch() {
    let vs = nn::VarStore::new(Device::Cpu);
    let _m = build(&vs.root(), &BackboneConfig::Iresnet(IResNetConfig::r18()));
    let vars = vs.variables();
    let is_bn = |k: &str| {
        let stem = k.rsplit_once('.').unwrap().0;
        stem.ends_with("bn1")
            || stem.ends_with("bn2")
            || stem.ends_with("bn3")
            || stem.ends_with("downsample.1")
            || stem == "features"
    };
    let mut bn = 0;
    for (k, t) in &vars {
        if !is_bn(k) {
            continue;
        }
        let want = match k.rsplit_once('.').unwrap().1 {
            "weight" | "running_var" => 1.0,
            "bias" | "running_mean" | "num_batches_tracked" => 0.0,
            other => panic!("unexpected BN variable {other}"),
        };
        let t = t.to_kind(Kind::Double);
        assert_eq!(f64::try_from(t.min()).unwrap(), want, "{k}");
        assert_eq!(f64::try_from(t.max()).unwrap(), want, "{k}");
        bn += 1;
    }
    // 3 per block + downsample per stage + bn1, bn2, features; 5 variables each.
    assert_eq!(bn, 5 * (3 * 8 + 4 + 3));
    assert_eq!(vars["layer1.0.bn1.num_batches_tracked"].kind(), Kind::Int64);
    assert_eq!(vars["layer1.0.bn1.num_batches_tracked"].dim(), 0);

    let (mean, std, n) = stats(&vs, |k| {
        k.ends_with("conv1.weight")
            || k.ends_with("conv2.weight")
            || k.ends_with("downsample.0.weight")
    });
    assert_eq!(n, 1 + 2 * 8 + 4);
    assert!(
        mean.abs() < 1e-3 && (std - 0.1).abs() < 1e-3,
        "conv N(0, 0.1): mean {mean} std {std}"
    );
    let (mean, std, _) = stats(&vs, |k| k.ends_with("prelu.weight"));
    assert!(mean == 0.25 && std == 0.0);
    // PyTorch Linear: U(-b, b) with b = 1/sqrt(fan_in); std b/sqrt(3).
    let b = 1.0 / (512.0f64 * 49.0).sqrt();
    let b_f32 = b * (1.0 + 1e-6); // the bound rounded to f32
    let w = &vars["fc.weight"];
    assert!(f64::try_from(w.abs().max()).unwrap() <= b_f32);
    let (_, std, _) = stats(&vs, |k| k == "fc.weight");
    assert!((std / (b / 3f64.sqrt()) - 1.0).abs() < 0.01, "fc std {std}");
    assert!(f64::try_from(vars["fc.bias"].abs().max()).unwrap() <= b_f32);

    // Trainable: everything but buffers and the frozen `features.weight`.
    assert!(!vars["features.weight"].requires_grad());
    assert!(vars["features.bias"].requires_grad());
    assert!(!vars["bn2.running_mean"].requires_grad());
    let trainable = vs.trainable_variables().len();
    assert_eq!(trainable, vars.len() - 3 * bn / 5 - 1);
}

#[test]
fn mobilefacenet_shape_and_init() {
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg = BackboneConfig::Mobilefacenet(MobileFaceNetConfig::default());
    let model = build(&vs.root(), &cfg);
    assert!(matches!(model, Backbone::MobileFaceNet(_)));
    let y = tch::no_grad(|| model.forward_t(&images(2, 112), false));
    assert_eq!(y.size(), [2, 512]);
    let vars = vs.variables();
    // GDC: a 7x7 depthwise conv over the 512-channel 7x7 map.
    assert_eq!(
        vars["features.layers.0.layers.0.weight"].size(),
        [512, 1, 7, 7]
    );
    assert_eq!(vars["features.layers.2.weight"].size(), [512, 512]);
    assert!(vars["features.layers.3.weight"].requires_grad());
    // Kaiming normal, fan-out, ReLU gain: std sqrt(2 / (out * k * k)).
    let (mean, std, _) = stats(&vs, |k| k == "layers.3.layers.0.layers.0.layers.0.weight");
    let want = (2.0f64 / 128.0).sqrt();
    assert!(
        mean.abs() < 0.01 && (std / want - 1.0).abs() < 0.05,
        "std {std} want {want}"
    );
    let (_, std, _) = stats(&vs, |k| k == "conv_sep.layers.0.weight");
    let want = (2.0f64 / 512.0).sqrt();
    assert!((std / want - 1.0).abs() < 0.05, "std {std} want {want}");
}

#[test]
fn deep_presets_have_the_arcface_torch_block_counts() {
    for (cfg, blocks) in [
        (IResNetConfig::r34(), [3, 4, 6, 3]),
        (IResNetConfig::r100(), [3, 13, 30, 3]),
        (IResNetConfig::r200(), [6, 26, 60, 6]),
    ] {
        let vs = nn::VarStore::new(Device::Cpu);
        let _m = build(&vs.root(), &BackboneConfig::Iresnet(cfg.clone()));
        let vars = vs.variables();
        for (i, &n) in blocks.iter().enumerate() {
            let count = vars
                .keys()
                .filter(|k| {
                    k.starts_with(&format!("layer{}.", i + 1)) && k.ends_with(".bn1.weight")
                })
                .count();
            assert_eq!(count, n, "{cfg:?} stage {}", i + 1);
            assert!(vars.contains_key(&format!("layer{}.0.downsample.0.weight", i + 1)));
            assert!(!vars.contains_key(&format!("layer{}.1.downsample.0.weight", i + 1)));
        }
        let params: i64 = vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum();
        // Closed form: stem, per block 2 convs + 3 BN + PReLU, downsample per stage, head.
        let w = cfg.widths;
        let mut want = 27 * w[0] + 3 * w[0];
        let mut c_in = w[0];
        for (&n, &c) in blocks.iter().zip(&w) {
            for j in 0..n {
                want += 9 * c_in * c + 9 * c * c + 2 * c_in + 5 * c;
                if j == 0 {
                    want += c_in * c + 2 * c;
                }
                c_in = c;
            }
        }
        want += 2 * w[3] + (w[3] * 49 + 1) * 512 + 512;
        assert_eq!(params, want, "{cfg:?}");
    }
}
