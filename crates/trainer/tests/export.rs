//! `facerec export`, proved against independent implementations:
//!
//! - `.safetensors`: the exported file is loaded (with `strict=True`, after a key/shape/dtype check
//!   against the `state_dict`) into the independent PyTorch iResNet / MobileFaceNet of
//!   `data-scripts/backbone_oracle.py` (written from SPEC 1(d) and docs/backbones.md), and its
//!   eval-mode embeddings equal our backbone's to 1e-5;
//! - TorchScript: the exported module, loaded with `tch::CModule`, gives our backbone's embeddings
//!   to 1e-5 on an input the exporter never saw (another batch size);
//! - the model is random but every BN layer has non-trivial running statistics (and a non-zero
//!   `num_batches_tracked`), so an export that dropped or mis-named a buffer would fail.
//!
//! Also: the export refuses a checkpoint of another model, and a TorchScript module that does not
//! reproduce our embeddings is not written.
//!
//! Without `FACEREC_PYTHON` the two parity checks use the frozen answers (the oracle's and the
//! TorchScript module's embeddings, `data-scripts/fixtures/{backbone_oracle,export_model}-*.json`,
//! keyed by the digests of the weights and the input); only the refusal test, which needs a module
//! file that Python writes, is skipped.

mod common;

use facerec_backbone::{build, BackboneConfig, IResNetConfig, MobileFaceNetConfig};
use facerec_testkit::{fill_seeded, floats, oracle, oracle_with, python, randn};
use facerec_trainer::commands::export::{self, Exportable};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

const ORACLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../data-scripts/backbone_oracle.py"
);
/// Our float32 embeddings against another float32 run of the same network, or against the
/// float64 answer of the oracle, relative to the largest embedding entry: float32 rounding grows
/// with the values (the small MobileFaceNet's entries reach 1e4), wrong weights move them by O(1).
const RTOL: f64 = 1e-5;

/// Asserts `|ours - theirs| <= RTOL * max(1, max |ours|)` elementwise, and that `ours` is not
/// degenerate.
fn assert_same_embeddings(what: &str, ours: &Tensor, theirs: &Tensor) {
    let diff = max_abs_diff(ours, theirs);
    let scale = f64::try_from(ours.abs().max()).unwrap();
    eprintln!("{what}: max |diff| {diff:e} (embedding scale {scale:.3})");
    assert!(scale > 0.1, "{what}: degenerate embeddings");
    assert!(
        diff <= RTOL * scale.max(1.0),
        "{what}: max |diff| {diff:e} at embedding scale {scale:e}"
    );
}

fn small_iresnet() -> BackboneConfig {
    BackboneConfig::Iresnet(IResNetConfig {
        depth: None,
        layers: Some([2, 1, 1, 1]),
        widths: [8, 16, 16, 32],
        embedding_size: 16,
        dropout: 0.0,
        input_size: 40,
        channels_last: false,
    })
}

fn small_mbf() -> BackboneConfig {
    BackboneConfig::Mobilefacenet(MobileFaceNetConfig {
        embedding_size: 16,
        blocks: [1, 2, 1, 1],
        scale: 1,
        input_size: 32,
        channels_last: false,
    })
}

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

/// A run directory as `facerec train` writes it (config.toml with `[model]`, model.safetensors)
/// holding a random model whose BN statistics and PReLU slopes are off their init: three
/// training-mode passes (so `num_batches_tracked` is 3), then every float variable replaced by
/// seeded draws (`testkit::fill_seeded`: the same bits on every machine, whatever the order the
/// tests run in, so the oracle's answer can be frozen under the weights' digests).
fn make_run(dir: &Path, cfg: &BackboneConfig, seed: u64) {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = build(&vs.root(), cfg);
    let s = cfg.input_size();
    for k in 0..3 {
        let x = input(seed + 100 + k, 6, s);
        let _ = tch::no_grad(|| model.forward_t(&x, true));
    }
    fill_seeded(&vs, seed);
    common::save_run_dir(dir, cfg, &vs);
}

/// A float32 batch `[n, 3, s, s]` of seeded draws, `0.5 z`.
fn input(seed: u64, n: i64, s: i64) -> Tensor {
    (randn(seed, &[n, 3, s, s]) * 0.5).to_kind(Kind::Float)
}

/// Digests of a safetensors file's tensors, by name.
fn file_digests(path: &Path) -> Value {
    let mut file = Tensor::read_safetensors(path).unwrap();
    file.sort_by(|a, b| a.0.cmp(&b.0));
    Value::Object(
        file.iter()
            .map(|(k, t)| (k.clone(), Value::String(oracle::tensor_digest(t))))
            .collect(),
    )
}

fn facerec(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_facerec"))
        .args(args)
        .output()
        .expect("cannot start facerec")
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    f64::try_from(
        (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
            .abs()
            .max(),
    )
    .unwrap()
}

/// Exports `cfg`'s run to safetensors through the binary and checks the file against the oracle.
fn check_safetensors(cfg: &BackboneConfig) {
    let dir = tempfile::tempdir().unwrap();
    make_run(dir.path(), cfg, 11);
    let out = dir.path().join("exported.safetensors");
    let o = facerec(&[
        "export",
        "--model",
        p(dir.path()),
        "--format",
        "safetensors",
        "--out",
        p(&out),
    ]);
    assert!(
        o.status.success(),
        "export failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    // The file: arcface_torch buffers with PyTorch's kinds, statistics off their init.
    let file: BTreeMap<String, Tensor> = Tensor::read_safetensors(&out)
        .unwrap()
        .into_iter()
        .collect();
    let m = Exportable::load(dir.path(), None).unwrap();
    assert_eq!(file.len(), m.vs.variables().len());
    let mut nbt = 0;
    for (name, t) in &file {
        if name.ends_with("num_batches_tracked") {
            assert_eq!((t.kind(), t.dim()), (Kind::Int64, 0), "{name}");
            assert_eq!(
                i64::try_from(t).unwrap(),
                3,
                "{name}: three training passes"
            );
            nbt += 1;
        } else {
            assert_eq!(t.kind(), Kind::Float, "{name}");
        }
        if name.ends_with("running_var") {
            assert!(max_abs_diff(t, &t.ones_like()) > 0.05, "{name} is trivial");
        }
    }
    assert!(nbt > 5);

    // The independent PyTorch model with these weights gives our embeddings (live, or frozen
    // under the digests of the exported file and the input).
    let x = input(21, 5, cfg.input_size());
    let ours = m.embed(&x);
    let mut args = vec!["embed".to_string()];
    args.extend(arch_args(cfg));
    let request =
        json!({"args": args, "weights": file_digests(&out), "input": oracle::tensor_digest(&x)});
    let answer = oracle_with("backbone_oracle.py", &request, |py| {
        let (input, result) = (dir.path().join("x.npz"), dir.path().join("o.npz"));
        Tensor::write_npz(&[("input", &x)], &input).unwrap();
        let mut args = vec![ORACLE.to_string()];
        args.extend(args_of(&request));
        for (flag, path) in [("--weights", &out), ("--input", &input), ("--out", &result)] {
            args.extend([flag.to_string(), path.display().to_string()]);
        }
        let o = Command::new(py).args(&args).output().unwrap();
        assert!(
            o.status.success(),
            "oracle failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let theirs: BTreeMap<String, Tensor> =
            Tensor::read_npz(&result).unwrap().into_iter().collect();
        json!({"embedding": floats_of(&theirs["embedding"])})
    });
    let theirs = Tensor::from_slice(&floats(&answer["embedding"])).view(ours.size().as_slice());
    assert_same_embeddings(&format!("{cfg:?}: PyTorch oracle (float64)"), &ours, &theirs);
}

/// The `args` of a request, as strings.
fn args_of(request: &Value) -> Vec<String> {
    request["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

/// A tensor's values as f64, row-major.
fn floats_of(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

#[test]
fn safetensors_export_loads_into_independent_pytorch_iresnet() {
    check_safetensors(&small_iresnet());
}

#[test]
fn safetensors_export_loads_into_independent_pytorch_mobilefacenet() {
    check_safetensors(&small_mbf());
}

/// TorchScript through the binary (which needs `py`) into `dir/model.pt`.
fn export_torchscript(py: &Path, dir: &Path) -> PathBuf {
    let out = dir.join("model.pt");
    let o = Command::new(env!("CARGO_BIN_EXE_facerec"))
        .args([
            "export",
            "--model",
            p(dir),
            "--format",
            "torchscript",
            "--out",
            p(&out),
            "--python",
            p(py),
        ])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "export failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("max |embedding difference|"), "{stdout}");
    out
}

/// TorchScript through the binary, then checked here with CModule on a new batch size: live, or
/// the module's embeddings frozen under the digests of the run's weights and the input.
fn check_torchscript(cfg: &BackboneConfig) {
    let dir = tempfile::tempdir().unwrap();
    make_run(dir.path(), cfg, 12);
    let m = Exportable::load(dir.path(), None).unwrap();
    let x = input(22, 7, cfg.input_size());
    let ours = m.embed(&x);
    let request = json!({
        "args": arch_args(cfg),
        "weights": file_digests(&dir.path().join("model.safetensors")),
        "input": oracle::tensor_digest(&x),
    });
    let answer = oracle_with("export_model.py", &request, |py| {
        let out = export_torchscript(py, dir.path());
        let mut module = tch::CModule::load(&out).unwrap();
        module.set_eval();
        // The module as users run it (float32) gives our embeddings ...
        let theirs = tch::no_grad(|| module.forward_ts(&[&x]).unwrap());
        assert_same_embeddings(&format!("{cfg:?}: TorchScript (float32)"), &ours, &theirs);
        // ... and the answer frozen is the same module in float64, which rounds the same way on
        // any CPU (float32 kernels do not).
        module.to(Device::Cpu, Kind::Double, false);
        let exact = tch::no_grad(|| module.forward_ts(&[x.to_kind(Kind::Double)]).unwrap());
        json!({"embedding": floats_of(&exact)})
    });
    let theirs = Tensor::from_slice(&floats(&answer["embedding"])).view(ours.size().as_slice());
    assert_same_embeddings(&format!("{cfg:?}: TorchScript (float64)"), &ours, &theirs);
}

#[test]
fn torchscript_export_matches_our_backbone() {
    check_torchscript(&small_iresnet());
    check_torchscript(&small_mbf());
}

/// The exporter's own check and its refusal need the module file, which only Python writes (the
/// TorchScript format is a runtime dependency on Python, not an oracle): skipped without it.
#[test]
fn torchscript_export_refuses_a_module_that_differs() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    make_run(dir.path(), &small_iresnet(), 12);
    let module = export_torchscript(&py, dir.path());

    // A module of other weights is caught by the exporter's own check...
    let other = tempfile::tempdir().unwrap();
    make_run(other.path(), &small_iresnet(), 99);
    let m_other = Exportable::load(other.path(), None).unwrap();
    let diff = export::torchscript_max_abs_diff(&module, &m_other).unwrap();
    assert!(diff > 1e-3, "different weights, yet max |diff| {diff:e}");
    // ...and a failed check writes nothing (a negative tolerance makes any module fail).
    let refused = dir.path().join("refused.pt");
    let o = facerec(&[
        "export",
        "--model",
        p(dir.path()),
        "--format",
        "torchscript",
        "--out",
        p(&refused),
        "--python",
        p(&py),
        "--tolerance=-1",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("differ from our backbone") && err.contains("nothing was written"),
        "{err}"
    );
    assert!(!refused.exists() && !dir.path().join(".refused.pt.partial").exists());
}

#[test]
fn export_refuses_a_checkpoint_of_another_model() {
    let dir = tempfile::tempdir().unwrap();
    make_run(dir.path(), &small_iresnet(), 5);
    // The config now describes a wider network than the checkpoint holds, and one more block.
    let wider = BackboneConfig::Iresnet(IResNetConfig {
        layers: Some([2, 2, 1, 1]),
        widths: [8, 16, 16, 64],
        ..match small_iresnet() {
            BackboneConfig::Iresnet(c) => c,
            _ => unreachable!(),
        }
    });
    let cfg = dir.path().join("wider.toml");
    std::fs::write(
        &cfg,
        format!("[model]\n{}", toml::to_string(&wider).unwrap()),
    )
    .unwrap();
    let out = dir.path().join("x.safetensors");
    let o = facerec(&[
        "export",
        "--model",
        p(dir.path()),
        "--config",
        p(&cfg),
        "--format",
        "safetensors",
        "--out",
        p(&out),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("model.safetensors") && err.contains("wider.toml"),
        "{err}"
    );
    assert!(
        err.contains("missing keys") && err.contains("layer2.1.conv1.weight"),
        "{err}"
    );
    assert!(err.contains("layer4.0.conv1.weight: shape"), "{err}");
    assert!(!out.exists());

    // A missing run directory is named.
    let o = facerec(&[
        "export",
        "--model",
        "/no/such/run",
        "--format",
        "safetensors",
        "--out",
        p(&out),
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("/no/such/run"));

    // The input is a named option, as for eval and cluster: the old positional form is refused
    // with the usage naming --model, and writes nothing.
    let o = facerec(&[
        "export",
        p(dir.path()),
        "--format",
        "safetensors",
        "--out",
        p(&out),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--model"), "{err}");
    assert!(!out.exists());
}
