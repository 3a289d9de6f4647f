//! Parity with the independent PyTorch oracle `data-scripts/backbone_oracle.py` (written from SPEC
//! 1(d) and docs/backbones.md): parameter names and shapes equal the oracle's `state_dict` keys
//! (`num_batches_tracked` included), trainable counts agree, and with the same weights the forward
//! pass (eval and train mode) and the updated BN buffers agree in float64.

use facerec_backbone::{build, BackboneConfig, IResNetConfig, MobileFaceNetConfig};
use facerec_testkit::python;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

const ORACLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../data-scripts/backbone_oracle.py"
);

/// Oracle command-line arguments describing `cfg`.
fn arch_args(cfg: &BackboneConfig) -> Vec<String> {
    let list = |v: &[i64]| v.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    let mut a: Vec<String> = match cfg {
        BackboneConfig::Iresnet(c) => {
            let mut a = vec![
                "--arch".into(),
                "iresnet".into(),
                "--widths".into(),
                list(&c.widths),
            ];
            match (c.depth, c.layers) {
                (Some(d), _) => a.extend(["--depth".into(), d.to_string()]),
                (_, Some(l)) => a.extend(["--layers".into(), list(&l.map(|n| n as i64))]),
                _ => unreachable!(),
            }
            a
        }
        BackboneConfig::Mobilefacenet(c) => vec![
            "--arch".into(),
            "mbf".into(),
            "--blocks".into(),
            list(&c.blocks.map(|n| n as i64)),
            "--scale".into(),
            c.scale.to_string(),
        ],
        // The ViT has its own oracle (data-scripts/vit_oracle.py, crates/backbone/tests/vit.rs).
        BackboneConfig::Vit(_) => unreachable!("this test builds iResNet and MobileFaceNet only"),
    };
    a.extend(["--emb".into(), cfg.embedding_size().to_string()]);
    a.extend(["--input-size".into(), cfg.input_size().to_string()]);
    a
}

fn run_oracle(py: &Path, args: &[String]) -> String {
    let out = Command::new(py)
        .arg(ORACLE)
        .args(args)
        .output()
        .expect("cannot start the oracle");
    assert!(
        out.status.success(),
        "oracle {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Our variables as name -> shape, and the trainable parameter count.
fn our_keys(vs: &nn::VarStore) -> (BTreeMap<String, Vec<i64>>, i64) {
    let keys = vs
        .variables()
        .into_iter()
        .map(|(k, t)| (k, t.size()))
        .collect();
    let trainable = vs
        .trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum();
    (keys, trainable)
}

/// Asserts names, shapes and trainable count equal the oracle's; returns the trainable count.
fn check_keys(py: &Path, cfg: &BackboneConfig) -> i64 {
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = build(&vs.root(), cfg);
    let (ours, trainable) = our_keys(&vs);
    let mut args = vec!["keys".to_string()];
    args.extend(arch_args(cfg));
    let j: serde_json::Value = serde_json::from_str(&run_oracle(py, &args)).unwrap();
    let theirs: BTreeMap<String, Vec<i64>> = j["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|kv| {
            let shape = kv[1]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_i64().unwrap())
                .collect();
            (kv[0].as_str().unwrap().to_string(), shape)
        })
        .collect();
    let missing: Vec<_> = theirs.keys().filter(|k| !ours.contains_key(*k)).collect();
    let extra: Vec<_> = ours.keys().filter(|k| !theirs.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}\nextra {extra:?}"
    );
    assert_eq!(ours, theirs, "shapes differ");
    assert_eq!(
        trainable,
        j["trainable"].as_i64().unwrap(),
        "trainable parameter count"
    );
    trainable
}

#[test]
fn iresnet_r18_r50_keys_and_counts_match_oracle() {
    let Some(py) = python() else { return };
    check_keys(&py, &BackboneConfig::Iresnet(IResNetConfig::r18()));
    let r50 = check_keys(&py, &BackboneConfig::Iresnet(IResNetConfig::r50()));
    // Published arcface_torch figure: iResNet-50 has 43.6M parameters.
    assert!(
        (r50 as f64 - 43.6e6).abs() < 0.05e6,
        "r50 has {r50} trainable parameters"
    );
}

#[test]
fn mobilefacenet_keys_and_counts_match_oracle() {
    let Some(py) = python() else { return };
    check_keys(
        &py,
        &BackboneConfig::Mobilefacenet(MobileFaceNetConfig::default()),
    );
    let residual_first = MobileFaceNetConfig {
        blocks: [2, 1, 1, 1],
        ..Default::default()
    };
    check_keys(&py, &BackboneConfig::Mobilefacenet(residual_first));
}

/// Same weights in both frameworks: eval output, train output and BN buffers after one train pass.
fn check_forward(py: &Path, cfg: &BackboneConfig, batch: i64) {
    tch::manual_seed(7);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = build(&vs.root(), cfg);
    vs.double();
    // Move BN buffers and the frozen `features.weight` off their init so the check sees them.
    tch::no_grad(|| {
        for (_, mut t) in vs.variables() {
            if t.is_floating_point() && !t.requires_grad() {
                let _ = t.g_add_(&(Tensor::rand_like(&t) * 0.5));
            } else if t.dim() == 1 {
                // BN weights/biases, PReLU slopes, fc bias.
                let _ = t.g_add_(&(Tensor::randn_like(&t) * 0.1));
            }
        }
    });
    let s = cfg.input_size();
    let x = Tensor::rand([batch, 3, s, s], (Kind::Double, Device::Cpu)) * 2.0 - 1.0;
    let dir = tempfile::tempdir().unwrap();
    let (params, input, out) = (
        dir.path().join("p.npz"),
        dir.path().join("x.npz"),
        dir.path().join("o.npz"),
    );
    let before: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    Tensor::write_npz(&before, &params).unwrap();
    Tensor::write_npz(&[("input", &x)], &input).unwrap();

    let (eval_out, train_out) =
        tch::no_grad(|| (model.forward_t(&x, false), model.forward_t(&x, true)));
    let mut args = vec!["forward".to_string()];
    args.extend(arch_args(cfg));
    for (flag, p) in [("--params", &params), ("--input", &input), ("--out", &out)] {
        args.extend([flag.to_string(), p.display().to_string()]);
    }
    run_oracle(py, &args);
    let theirs: BTreeMap<String, Tensor> = Tensor::read_npz(&out).unwrap().into_iter().collect();

    let close = |what: &str, a: &Tensor, b: &Tensor| {
        assert_eq!(a.size(), b.size(), "{what}: shape");
        let err = f64::try_from((a - b).abs().max()).unwrap();
        let scale = f64::try_from(b.abs().max()).unwrap().max(1.0);
        assert!(
            err <= 1e-9 * scale,
            "{what}: max |diff| {err:e} (scale {scale})"
        );
    };
    assert_eq!(eval_out.size(), [batch, cfg.embedding_size()]);
    close("eval output", &eval_out, &theirs["eval_out"]);
    close("train output", &train_out, &theirs["train_out"]);
    let after = vs.variables();
    assert_eq!(after.len() + 2, theirs.len());
    for (name, ours) in &after {
        let want = &theirs[&format!("state/{name}")];
        if name.ends_with("num_batches_tracked") {
            assert_eq!(i64::try_from(ours).unwrap(), 1, "{name}");
            assert_eq!(i64::try_from(want).unwrap(), 1, "{name} (oracle)");
        } else {
            close(name, ours, want);
        }
    }
}

#[test]
fn iresnet_forward_matches_oracle() {
    let Some(py) = python() else { return };
    // Two blocks in layer1 (identity shortcut), odd side 40 -> 20 -> 10 -> 5 -> 3.
    let cfg = IResNetConfig {
        depth: None,
        layers: Some([2, 1, 1, 1]),
        widths: [8, 16, 16, 32],
        embedding_size: 16,
        dropout: 0.0,
        input_size: 40,
    };
    check_forward(&py, &BackboneConfig::Iresnet(cfg), 4);
}

#[test]
fn mobilefacenet_forward_matches_oracle() {
    let Some(py) = python() else { return };
    for (blocks, scale) in [([1, 2, 1, 1], 2), ([2, 1, 1, 1], 1)] {
        let cfg = MobileFaceNetConfig {
            embedding_size: 16,
            blocks,
            scale,
            input_size: 64,
        };
        check_forward(&py, &BackboneConfig::Mobilefacenet(cfg), 3);
    }
}
