//! The ViT backbone: config presets and TOML, masking and drop path by their definitions, and
//! parity with the independent PyTorch oracle `data-scripts/vit_oracle.py` (through
//! `testkit::oracle`, frozen in `data-scripts/fixtures/vit_oracle-*.json`): state-dict keys,
//! shapes and trainable counts of `vit_t`/`vit_s`/`vit_b`, and with the same weights the eval,
//! train and masked-train outputs of a small ViT in float64.

use facerec_backbone::vit::drop_path;
use facerec_backbone::{build, Backbone, BackboneConfig, ViTConfig};
use facerec_testkit::{oracle, randn};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

fn toml_cfg(s: &str) -> anyhow::Result<BackboneConfig> {
    #[derive(serde::Deserialize)]
    struct Doc {
        model: BackboneConfig,
    }
    let doc: Doc = toml::from_str(s)?;
    doc.model.validate()?;
    Ok(doc.model)
}

/// Five by five tokens of width 16 (patch 4 on 22 px: the last 2 pixel rows and columns are not
/// seen, as with patch 9 on 112), two blocks of 4 heads, embedding 8.
fn small() -> ViTConfig {
    ViTConfig {
        embed_dim: 16,
        depth: 2,
        num_heads: 4,
        patch_size: 4,
        input_size: 22,
        embedding_size: 8,
        mask_ratio: 0.3,
        drop_path_rate: 0.0,
        ..ViTConfig::vit_t()
    }
}

fn vit_of(model: &Backbone) -> &facerec_backbone::ViT {
    match model {
        Backbone::ViT(m) => m,
        _ => panic!("not a ViT"),
    }
}

#[test]
fn presets_and_toml() {
    let t = ViTConfig::vit_t();
    assert_eq!((t.embed_dim, t.depth, t.num_heads, t.patch_size), (256, 12, 8, 9));
    assert_eq!((t.num_patches(), t.mlp_hidden()), (144, 1024));
    assert_eq!((t.drop_path_rate, t.mask_ratio), (0.1, 0.1));
    let b = ViTConfig::vit_b();
    assert_eq!((b.embed_dim, b.depth), (512, 24));
    assert_eq!(b.drop_path_at(0), 0.0);
    assert!((b.drop_path_at(23) - 0.1).abs() < 1e-15);

    let c = toml_cfg("[model]\ntype = \"vit\"\npreset = \"vit_s\"\nmask_ratio = 0.0\n").unwrap();
    let want = ViTConfig {
        mask_ratio: 0.0,
        ..ViTConfig::vit_s()
    };
    assert_eq!(c, BackboneConfig::Vit(want.clone()));
    assert_eq!(
        toml_cfg("[model]\ntype = \"vit\"\n").unwrap(),
        BackboneConfig::Vit(ViTConfig::vit_t())
    );
    // The written form (every field, no preset) reads back to the same config.
    let text = toml::to_string(&BackboneConfig::Vit(want.clone())).unwrap();
    assert!(!text.contains("preset"), "{text}");
    let back: BackboneConfig = toml::from_str(&text).unwrap();
    assert_eq!(back, BackboneConfig::Vit(want));

    let err = |s: &str| format!("{:#}", toml_cfg(s).unwrap_err());
    let e = err("[model]\ntype = \"vit\"\npreset = \"vit_q\"\n");
    assert!(e.contains("model.preset: `vit_q` is not one of vit_t"), "{e}");
    let e = err("[model]\ntype = \"vit\"\nembed_dmi = 3\n");
    assert!(e.contains("embed_dmi"), "{e}");
    let e = err("[model]\ntype = \"vit\"\nnum_heads = 7\n");
    assert!(e.contains("model.num_heads: 7 must divide model.embed_dim 256"), "{e}");
    let e = err("[model]\ntype = \"vit\"\nmask_ratio = 1.0\n");
    assert!(e.contains("model.mask_ratio"), "{e}");
    let e = err("[model]\ntype = \"vit\"\npatch_size = 200\n");
    assert!(e.contains("model.patch_size"), "{e}");
}

/// Masking by its definition: the trunk output has exactly `L - floor(L (1 - r))` positions equal
/// to `mask_token` per image, at the positions of largest noise; eval mode never masks.
#[test]
fn masking_fills_the_dropped_positions_with_the_mask_token() {
    tch::manual_seed(1);
    let cfg = small();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = build(&vs.root(), &BackboneConfig::Vit(cfg.clone()));
    let m = vit_of(&model);
    let (b, l, d) = (3, cfg.num_patches(), cfg.embed_dim);
    assert_eq!(m.kept_tokens(), 17, "floor(25 * 0.7)");
    let x = Tensor::rand([b, 3, 22, 22], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    let noise = Tensor::rand([b, l], (Kind::Float, Device::Cpu));
    let out = tch::no_grad(|| m.forward_trunk_masked(&x, Some(&noise), true, None)).view([b, l, d]);
    let is_mask = out.eq_tensor(&m.mask_token).all_dim(-1, false); // [B, L]
    let dropped = noise.argsort(1, true).narrow(1, 0, l - m.kept_tokens());
    for i in 0..b {
        assert_eq!(i64::try_from(is_mask.get(i).sum(Kind::Int64)).unwrap(), l - 17);
        let at = is_mask.get(i).index_select(0, &dropped.get(i));
        assert!(bool::try_from(at.all()).unwrap(), "image {i}: masked where the noise is largest");
    }
    let eval = tch::no_grad(|| m.forward_trunk_amp(&x, false, None)).view([b, l, d]);
    assert!(!bool::try_from(eval.eq_tensor(&m.mask_token).all_dim(-1, false).any()).unwrap());
    // The random trunk masks the same count.
    let train = tch::no_grad(|| m.forward_trunk_amp(&x, true, None)).view([b, l, d]);
    let n = train.eq_tensor(&m.mask_token).all_dim(-1, false).sum(Kind::Int64);
    assert_eq!(i64::try_from(n).unwrap(), b * (l - 17));
}

/// Drop path keeps a whole image's branch (scaled by 1 / keep) or drops it; eval is identity.
#[test]
fn drop_path_per_image() {
    tch::manual_seed(2);
    let x = Tensor::ones([4000, 3, 2], (Kind::Double, Device::Cpu));
    let y = drop_path(&x, 0.25, true);
    let per_image = y.amin(&[1i64, 2][..], false);
    assert!(y.eq_tensor(&per_image.view([-1, 1, 1]).expand_as(&y)).all().int64_value(&[]) == 1);
    let kept = f64::try_from(per_image.gt(0.0).to_kind(Kind::Double).mean(Kind::Double)).unwrap();
    assert!((kept - 0.75).abs() < 0.03, "kept fraction {kept}");
    let values: Vec<f64> = Vec::try_from(per_image.unique_dim(0, true, false, false).0).unwrap();
    assert_eq!(values.len(), 2);
    assert!(values[0] == 0.0 && (values[1] - 1.0 / 0.75).abs() < 1e-12);
    assert!(drop_path(&x, 0.25, false).equal(&x));
}

fn arch(cfg: &ViTConfig) -> Value {
    json!({
        "embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads,
        "mlp_ratio": cfg.mlp_ratio, "patch_size": cfg.patch_size, "input_size": cfg.input_size,
        "embedding_size": cfg.embedding_size, "qkv_bias": cfg.qkv_bias, "mask_ratio": cfg.mask_ratio,
    })
}

#[test]
fn preset_keys_and_counts_match_oracle() {
    for cfg in [ViTConfig::vit_t(), ViTConfig::vit_s(), ViTConfig::vit_b()] {
        let vs = nn::VarStore::new(Device::Cpu);
        let _m = build(&vs.root(), &BackboneConfig::Vit(cfg.clone()));
        let ours: BTreeMap<String, Vec<i64>> =
            vs.variables().into_iter().map(|(k, t)| (k, t.size())).collect();
        let trainable: i64 = vs.trainable_variables().iter().map(|t| t.numel() as i64).sum();
        let j = oracle("vit_oracle.py", &json!({"cmd": "keys", "arch": arch(&cfg)}));
        let theirs: BTreeMap<String, Vec<i64>> = j["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|kv| {
                let shape = kv[1].as_array().unwrap().iter().map(|d| d.as_i64().unwrap());
                (kv[0].as_str().unwrap().to_string(), shape.collect())
            })
            .collect();
        let missing: Vec<_> = theirs.keys().filter(|k| !ours.contains_key(*k)).collect();
        let extra: Vec<_> = ours.keys().filter(|k| !theirs.contains_key(*k)).collect();
        assert!(missing.is_empty() && extra.is_empty(), "missing {missing:?}\nextra {extra:?}");
        assert_eq!(ours, theirs, "shapes differ");
        assert_eq!(trainable, j["trainable"].as_i64().unwrap(), "{cfg:?}");
        eprintln!("{} blocks x {}: {trainable} trainable parameters", cfg.depth, cfg.embed_dim);
    }
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

#[test]
fn forward_matches_oracle_in_f64() {
    let cfg = small();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = build(&vs.root(), &BackboneConfig::Vit(cfg.clone()));
    vs.double();
    // Every value from the seeded ChaCha stream, so the request (and its fixture) is fixed.
    let mut params = serde_json::Map::new();
    let sorted: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    tch::no_grad(|| {
        for (seed, (name, mut t)) in sorted.into_iter().enumerate() {
            if name.ends_with("num_batches_tracked") {
                params.insert(name, json!(0));
                continue;
            }
            let r = randn(100 + seed as u64, &t.size());
            let v = if name.ends_with("running_var") {
                r.abs() + 0.5
            } else if name.ends_with("norm1.weight") || name.ends_with("norm2.weight") {
                r * 0.1 + 1.0
            } else {
                r * 0.3
            };
            t.copy_(&v);
            params.insert(name, json!(Vec::<f64>::try_from(v.flatten(0, -1)).unwrap()));
        }
    });
    let b = 3;
    let x = randn(7, &[b, 3, 22, 22]);
    let noise = randn(8, &[b, cfg.num_patches()]);
    let m = vit_of(&model);
    let (eval_out, train_out, masked_out) = tch::no_grad(|| {
        let e = model.forward_t(&x, false);
        let t = m.forward_neck_t(&m.forward_trunk_masked(&x, None, true, None), true);
        let k = m.forward_neck_t(&m.forward_trunk_masked(&x, Some(&noise), true, None), true);
        (e, t, k)
    });
    let flat = |t: &Tensor| Vec::<f64>::try_from(t.flatten(0, -1)).unwrap();
    let req = json!({
        "cmd": "forward", "arch": arch(&cfg), "params": params, "batch": b,
        "input": flat(&x), "noise": flat(&noise),
    });
    let j = oracle("vit_oracle.py", &req);
    for (what, ours) in [("eval_out", &eval_out), ("train_out", &train_out), ("masked_out", &masked_out)] {
        let theirs = floats(&j[what]);
        let ours = flat(ours);
        assert_eq!(ours.len(), (b * cfg.embedding_size) as usize);
        let err = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        let scale = theirs.iter().map(|v| v.abs()).fold(1.0, f64::max);
        eprintln!("{what}: max |ours - oracle| = {err:e} (max |value| {scale:.3})");
        assert!(err <= 1e-10 * scale, "{what}: max |diff| {err:e}");
    }
    // Masking changes the answer (the comparison above is not vacuous).
    assert!(f64::try_from((&masked_out - &train_out).abs().max()).unwrap() > 1e-3);
}
