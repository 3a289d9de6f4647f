//! The ONNX graph of every preset (iResNet 18, 34, 50, 100, 200; MobileFaceNet `mbf` and
//! `mbf_large`; ViT `vit_t`, `vit_s`, `vit_b`) has the nodes the architecture implies, counted
//! from the block counts by hand, and its initializers hold exactly the model's float values
//! (every parameter and running statistic, nothing else; for the ViT all but the training-only
//! `mask_token`, plus one scale and two ReLU6 bounds per block). Numerical parity in onnxruntime is proved in
//! `crates/trainer/tests/onnx_export.rs`.

use facerec_backbone::{build, BackboneConfig, IResNetConfig, MobileFaceNetConfig, ViTConfig};
use std::collections::BTreeMap;
use tch::{nn, Device};

fn counts(cfg: &BackboneConfig) -> (BTreeMap<String, usize>, usize, usize) {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = build(&vs.root(), cfg);
    let g = model.onnx_graph(cfg.input_size());
    let mut ops = BTreeMap::new();
    for op in g.op_types() {
        *ops.entry(op.to_string()).or_insert(0) += 1;
    }
    let floats: usize = vs
        .variables()
        .iter()
        .filter(|(k, _)| !k.ends_with("num_batches_tracked") && *k != "mask_token")
        .map(|(_, t)| t.numel())
        .sum();
    (ops, g.num_weights(), floats)
}

fn expect(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

#[test]
fn every_iresnet_preset_has_the_nodes_of_its_blocks() {
    for depth in [18, 34, 50, 100, 200] {
        let c = IResNetConfig {
            depth: Some(depth),
            ..IResNetConfig::r50()
        };
        let n: usize = c.blocks().iter().sum();
        let (ops, weights, floats) = counts(&BackboneConfig::Iresnet(c));
        // Stem conv + 2 per block + 4 downsample convs (every stage opens with stride 2); BN:
        // stem + 3 per block + 4 downsample + bn2 + features; PReLU: stem + 1 per block.
        let want = expect(&[
            ("Add", n),
            ("BatchNormalization", 1 + 3 * n + 4 + 2),
            ("Conv", 1 + 2 * n + 4),
            ("Flatten", 1),
            ("Gemm", 1),
            ("PRelu", 1 + n),
        ]);
        assert_eq!(ops, want, "iresnet{depth}");
        assert_eq!(weights, floats, "iresnet{depth}: initializer values");
    }
}

#[test]
fn mobilefacenet_presets_have_the_nodes_of_their_blocks() {
    for (name, c) in [
        ("mbf", MobileFaceNetConfig::default()),
        ("mbf_large", MobileFaceNetConfig::large()),
    ] {
        let [b0, b1, b2, b3] = c.blocks;
        // Units (conv + BN each): stem, stage 1 (one unit, or b0 residual DepthWise of 3 units),
        // 3 strided DepthWise and b1 + b2 + b3 residual DepthWise of 3 units, conv_sep, GDC.
        let stage1 = if b0 == 1 { 1 } else { 3 * b0 };
        let residual = b1 + b2 + b3 + if b0 == 1 { 0 } else { b0 };
        let units = 1 + stage1 + 3 * 3 + 3 * (b1 + b2 + b3) + 1 + 1;
        // Every unit has PReLU except the third of each DepthWise and the GDC.
        let depthwise = 3 + residual;
        let (ops, weights, floats) = counts(&BackboneConfig::Mobilefacenet(c));
        let want = expect(&[
            ("Add", residual),
            ("BatchNormalization", units + 1),
            ("Conv", units),
            ("Flatten", 1),
            ("Gemm", 1),
            ("PRelu", units - depthwise - 1),
        ]);
        assert_eq!(ops, want, "{name}");
        assert_eq!(weights, floats, "{name}: initializer values");
    }
}

#[test]
fn vit_presets_have_the_nodes_of_their_blocks() {
    for name in ["vit_t", "vit_s", "vit_b"] {
        let c = ViTConfig::preset(name).unwrap();
        let n = c.depth;
        let (ops, weights, floats) = counts(&BackboneConfig::Vit(c));
        // Per block: 4 Linears on tokens (qkv, proj, fc1, fc2) as Transpose + MatMul (+ Add for
        // the 3 with bias), 2 attention MatMuls, 2 LayerNorms, 2 residual Adds, 3 Gathers, 2
        // Reshapes, 3 more Transposes (heads, k, context), Mul, Softmax, Clip. Outside: the patch
        // conv, its Reshape and Transpose, the position Add, the final LayerNorm, Flatten, two
        // Gemms and two BatchNormalizations.
        let want = expect(&[
            ("Add", 3 * n + 2 * n + 1),
            ("BatchNormalization", 2),
            ("Clip", n),
            ("Conv", 1),
            ("Flatten", 1),
            ("Gather", 3 * n),
            ("Gemm", 2),
            ("LayerNormalization", 2 * n + 1),
            ("MatMul", 4 * n + 2 * n),
            ("Mul", n),
            ("Reshape", 2 * n + 1),
            ("Softmax", n),
            ("Transpose", 4 * n + 3 * n + 1),
        ]);
        assert_eq!(ops, want, "{name}");
        assert_eq!(weights, floats + 3 * n, "{name}: initializer values");
    }
}
