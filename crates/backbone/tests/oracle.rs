//! Parity with the independent PyTorch oracle `data-scripts/backbone_oracle.py` (written from SPEC
//! 1(d) and docs/backbones.md): parameter names and shapes equal the oracle's `state_dict` keys
//! (`num_batches_tracked` included), trainable counts agree, and with the same weights the forward
//! pass (eval and train mode) and the updated BN buffers agree in float64. Without
//! `FACEREC_PYTHON` the oracle's frozen answers (`data-scripts/fixtures/backbone_oracle-*.json`)
//! are used: key lists as digests, the state after a train pass as a sketch
//! (`testkit::oracle::sketch`).

use facerec_backbone::{build, BackboneConfig, IResNetConfig, MobileFaceNetConfig};
use facerec_testkit::{fill_seeded, floats, oracle, oracle_with, randn};
use serde_json::{json, Value};
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
        BackboneConfig::Vit(_) => panic!("the ViT has its own oracle (data-scripts/vit_oracle.py)"),
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

/// `name[d0,d1,...]` lines, sorted: the key list as one text, for its digest.
fn keys_text(keys: &BTreeMap<String, Vec<i64>>) -> String {
    keys.iter().map(|(k, s)| format!("{k}{s:?}\n")).collect()
}

/// Asserts names, shapes and trainable count equal the oracle's; returns the trainable count.
/// The oracle's answer is live (compared key by key, then reduced) or frozen (`testkit::
/// oracle_with`): the key list is kept as a count and a digest of [`keys_text`].
fn check_keys(cfg: &BackboneConfig) -> i64 {
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = build(&vs.root(), cfg);
    let (ours, trainable) = our_keys(&vs);
    let mut args = vec!["keys".to_string()];
    args.extend(arch_args(cfg));
    let request = json!({"args": args});
    let j = oracle_with("backbone_oracle.py", &request, |py| {
        let j: Value = serde_json::from_str(&run_oracle(py, &args)).unwrap();
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
        json!({
            "keys": theirs.len(),
            "keys_fnv": oracle::digest(keys_text(&theirs).as_bytes()),
            "trainable": j["trainable"],
            "total": j["total"],
        })
    });
    assert_eq!(ours.len() as u64, j["keys"].as_u64().unwrap(), "key count");
    assert_eq!(
        oracle::digest(keys_text(&ours).as_bytes()),
        j["keys_fnv"].as_str().unwrap(),
        "names or shapes differ from the oracle's (run with FACEREC_PYTHON for the list)"
    );
    assert_eq!(
        trainable,
        j["trainable"].as_i64().unwrap(),
        "trainable parameter count"
    );
    trainable
}

#[test]
fn iresnet_r18_r50_keys_and_counts_match_oracle() {
    check_keys(&BackboneConfig::Iresnet(IResNetConfig::r18()));
    let r50 = check_keys(&BackboneConfig::Iresnet(IResNetConfig::r50()));
    // Published arcface_torch figure: iResNet-50 has 43.6M parameters.
    assert!(
        (r50 as f64 - 43.6e6).abs() < 0.05e6,
        "r50 has {r50} trainable parameters"
    );
}

#[test]
fn mobilefacenet_keys_and_counts_match_oracle() {
    check_keys(&BackboneConfig::Mobilefacenet(
        MobileFaceNetConfig::default(),
    ));
    let residual_first = MobileFaceNetConfig {
        blocks: [2, 1, 1, 1],
        ..Default::default()
    };
    check_keys(&BackboneConfig::Mobilefacenet(residual_first));
}

/// `|a − b| ≤ 1e-9 · max(1, max |b|)` element-wise, naming `what`.
fn close(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.size(), b.size(), "{what}: shape");
    let err = f64::try_from((a - b).abs().max()).unwrap();
    let scale = f64::try_from(b.abs().max()).unwrap().max(1.0);
    assert!(
        err <= 1e-9 * scale,
        "{what}: max |diff| {err:e} (scale {scale})"
    );
}

/// The float entries of a state, concatenated in name order (`num_batches_tracked` left out).
fn state_values(state: &BTreeMap<String, Tensor>) -> Vec<f64> {
    state
        .iter()
        .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
        .flat_map(|(_, t)| Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap())
        .collect()
}

/// Same weights in both frameworks: eval output, train output and BN buffers after one train pass.
/// Weights and input are seeded draws (`testkit::fill_seeded`, `testkit::randn`), BN buffers and
/// the frozen `features.weight` off their init. The oracle's answer is live (compared tensor by
/// tensor, then reduced) or frozen (`testkit::oracle_with`, keyed by the digests of weights and
/// input): the outputs in full, the state after the train pass as a sketch.
fn check_forward(cfg: &BackboneConfig, batch: i64, seed: u64) {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = build(&vs.root(), cfg);
    vs.double();
    fill_seeded(&vs, seed);
    let s = cfg.input_size();
    let x = randn(seed + 1_000_000, &[batch, 3, s, s]) * 0.5;
    // Deep copies: the train pass updates the BN buffers in place.
    let before: BTreeMap<String, Tensor> = vs
        .variables()
        .into_iter()
        .map(|(k, t)| (k, t.copy()))
        .collect();
    let (eval_out, train_out) =
        tch::no_grad(|| (model.forward_t(&x, false), model.forward_t(&x, true)));
    let after: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();

    let mut args = vec!["forward".to_string()];
    args.extend(arch_args(cfg));
    let params: serde_json::Map<String, Value> = before
        .iter()
        .map(|(k, t)| (k.clone(), Value::String(oracle::tensor_digest(t))))
        .collect();
    let request = json!({"args": args, "params": params, "input": oracle::tensor_digest(&x)});
    let answer = oracle_with("backbone_oracle.py", &request, |py| {
        let dir = tempfile::tempdir().unwrap();
        let (params, input, out) = (
            dir.path().join("p.npz"),
            dir.path().join("x.npz"),
            dir.path().join("o.npz"),
        );
        let named: Vec<(&String, &Tensor)> = before.iter().collect();
        Tensor::write_npz(&named, &params).unwrap();
        Tensor::write_npz(&[("input", &x)], &input).unwrap();
        let mut args = args.clone();
        for (flag, p) in [("--params", &params), ("--input", &input), ("--out", &out)] {
            args.extend([flag.to_string(), p.display().to_string()]);
        }
        run_oracle(py, &args);
        let theirs: BTreeMap<String, Tensor> =
            Tensor::read_npz(&out).unwrap().into_iter().collect();
        close("eval output", &eval_out, &theirs["eval_out"]);
        close("train output", &train_out, &theirs["train_out"]);
        let state: BTreeMap<String, Tensor> = theirs
            .iter()
            .filter_map(|(k, t)| Some((k.strip_prefix("state/")?.to_string(), t.shallow_clone())))
            .collect();
        for (name, ours) in &after {
            close(name, ours, &state[name]);
        }
        let nbt: Vec<i64> = state
            .iter()
            .filter(|(k, _)| k.ends_with("num_batches_tracked"))
            .map(|(_, t)| i64::try_from(t).unwrap())
            .collect();
        let flat = |t: &Tensor| Vec::<f64>::try_from(t.flatten(0, -1)).unwrap();
        json!({
            "entries": theirs.len(),
            "eval_out": flat(&theirs["eval_out"]),
            "train_out": flat(&theirs["train_out"]),
            "state": oracle::sketch(&state_values(&state)),
            "num_batches_tracked": nbt,
        })
    });
    assert_eq!(eval_out.size(), [batch, cfg.embedding_size()]);
    assert_eq!(
        after.len() + 2,
        answer["entries"].as_u64().unwrap() as usize
    );
    let as_tensor = |v: &Value| Tensor::from_slice(&floats(v)).view(eval_out.size().as_slice());
    close("eval output", &eval_out, &as_tensor(&answer["eval_out"]));
    close("train output", &train_out, &as_tensor(&answer["train_out"]));
    oracle::assert_sketch(
        "state after the train pass",
        &state_values(&after),
        &answer["state"],
        1e-9,
    );
    let ours_nbt: Vec<i64> = after
        .iter()
        .filter(|(k, _)| k.ends_with("num_batches_tracked"))
        .map(|(_, t)| i64::try_from(t).unwrap())
        .collect();
    assert!(ours_nbt.iter().all(|&n| n == 1), "{ours_nbt:?}");
    assert_eq!(
        answer["num_batches_tracked"],
        json!(ours_nbt),
        "num_batches_tracked (oracle)"
    );
}

#[test]
fn iresnet_forward_matches_oracle() {
    // Two blocks in layer1 (identity shortcut), odd side 40 -> 20 -> 10 -> 5 -> 3.
    let cfg = IResNetConfig {
        depth: None,
        layers: Some([2, 1, 1, 1]),
        widths: [8, 16, 16, 32],
        embedding_size: 16,
        dropout: 0.0,
        input_size: 40,
        channels_last: false,
    };
    check_forward(&BackboneConfig::Iresnet(cfg), 4, 7);
}

#[test]
fn mobilefacenet_forward_matches_oracle() {
    for (k, (blocks, scale)) in [([1, 2, 1, 1], 2), ([2, 1, 1, 1], 1)]
        .into_iter()
        .enumerate()
    {
        let cfg = MobileFaceNetConfig {
            embedding_size: 16,
            blocks,
            scale,
            input_size: 64,
            channels_last: false,
        };
        check_forward(&BackboneConfig::Mobilefacenet(cfg), 3, 17 + 1000 * k as u64);
    }
}
