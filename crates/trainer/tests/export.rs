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

use facerec_backbone::{build, BackboneConfig, IResNetConfig, MobileFaceNetConfig};
use facerec_testkit::python;
use facerec_trainer::commands::export::{self, Exportable};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

const ORACLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../data-scripts/backbone_oracle.py"
);
const TOL: f64 = 1e-5;

fn small_iresnet() -> BackboneConfig {
    BackboneConfig::Iresnet(IResNetConfig {
        depth: None,
        layers: Some([2, 1, 1, 1]),
        widths: [8, 16, 16, 32],
        embedding_size: 16,
        dropout: 0.0,
        input_size: 40,
    })
}

fn small_mbf() -> BackboneConfig {
    BackboneConfig::Mobilefacenet(MobileFaceNetConfig {
        embedding_size: 16,
        blocks: [1, 2, 1, 1],
        scale: 1,
        input_size: 32,
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
        // The ViT has its own oracle (data-scripts/vit_oracle.py, crates/backbone/tests/vit.rs).
        BackboneConfig::Vit(_) => unreachable!("this test builds iResNet and MobileFaceNet only"),
    };
    a.extend(["--emb".into(), cfg.embedding_size().to_string()]);
    a.extend(["--input-size".into(), cfg.input_size().to_string()]);
    a
}

/// A run directory as `facerec train` writes it (config.toml with `[model]`, model.safetensors)
/// holding a random model whose BN statistics and PReLU slopes are off their init: a few
/// training-mode passes over random batches, then perturbed weights, biases and statistics.
fn make_run(dir: &Path, cfg: &BackboneConfig, seed: i64) {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = build(&vs.root(), cfg);
    let s = cfg.input_size();
    for _ in 0..3 {
        let x = Tensor::rand([6, 3, s, s], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
        let _ = tch::no_grad(|| model.forward_t(&x, true));
    }
    tch::no_grad(|| {
        for (name, mut t) in vs.variables() {
            if name.ends_with("running_var") {
                let _ = t.g_mul_(&(Tensor::rand_like(&t) + 0.5));
            } else if name.ends_with("running_mean") || (t.dim() == 1 && t.is_floating_point()) {
                let _ = t.g_add_(&(Tensor::randn_like(&t) * 0.1));
            }
        }
    });
    #[derive(serde::Serialize)]
    struct Doc<'a> {
        model: &'a BackboneConfig,
    }
    std::fs::write(
        dir.join("config.toml"),
        toml::to_string(&Doc { model: cfg }).unwrap(),
    )
    .unwrap();
    vs.save(dir.join("model.safetensors")).unwrap();
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
fn check_safetensors(py: &Path, cfg: &BackboneConfig) {
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

    // The independent PyTorch model with these weights gives our embeddings.
    let x = Tensor::rand(
        [5, 3, cfg.input_size(), cfg.input_size()],
        (Kind::Float, Device::Cpu),
    ) * 2.0
        - 1.0;
    let (input, result) = (dir.path().join("x.npz"), dir.path().join("o.npz"));
    Tensor::write_npz(&[("input", &x)], &input).unwrap();
    let mut args = vec![ORACLE.to_string(), "embed".into()];
    args.extend(arch_args(cfg));
    for (flag, path) in [("--weights", &out), ("--input", &input), ("--out", &result)] {
        args.extend([flag.to_string(), path.display().to_string()]);
    }
    let o = Command::new(py).args(&args).output().unwrap();
    assert!(
        o.status.success(),
        "oracle failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let theirs: BTreeMap<String, Tensor> = Tensor::read_npz(&result).unwrap().into_iter().collect();
    let ours = m.embed(&x);
    let diff = max_abs_diff(&ours, &theirs["embedding"]);
    let scale = f64::try_from(ours.abs().max()).unwrap();
    eprintln!("{cfg:?}: safetensors max |diff| {diff:e} (embedding scale {scale:.3})");
    assert!(scale > 0.1, "degenerate embeddings");
    assert!(diff <= TOL, "PyTorch oracle vs ours: max |diff| {diff:e}");
}

#[test]
fn safetensors_export_loads_into_independent_pytorch_iresnet() {
    let Some(py) = python() else { return };
    check_safetensors(&py, &small_iresnet());
}

#[test]
fn safetensors_export_loads_into_independent_pytorch_mobilefacenet() {
    let Some(py) = python() else { return };
    check_safetensors(&py, &small_mbf());
}

/// TorchScript through the binary, then checked here with CModule on a new batch size.
fn check_torchscript(py: &Path, cfg: &BackboneConfig) -> PathBuf {
    let dir = tempfile::tempdir().unwrap().keep();
    make_run(&dir, cfg, 12);
    let out = dir.join("model.pt");
    let o = Command::new(env!("CARGO_BIN_EXE_facerec"))
        .args([
            "export",
            "--model",
            p(&dir),
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

    let m = Exportable::load(&dir, None).unwrap();
    let mut module = tch::CModule::load(&out).unwrap();
    module.set_eval();
    let s = cfg.input_size();
    let x = Tensor::rand([7, 3, s, s], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    let theirs = tch::no_grad(|| module.forward_ts(&[&x]).unwrap());
    let diff = max_abs_diff(&m.embed(&x), &theirs);
    eprintln!("{cfg:?}: TorchScript max |diff| {diff:e}");
    assert!(diff <= TOL, "TorchScript vs ours: max |diff| {diff:e}");
    dir
}

#[test]
fn torchscript_export_matches_our_backbone() {
    let Some(py) = python() else { return };
    let dir = check_torchscript(&py, &small_iresnet());
    check_torchscript(&py, &small_mbf());

    // A module of other weights is caught by the exporter's own check...
    let other = tempfile::tempdir().unwrap();
    make_run(other.path(), &small_iresnet(), 99);
    let m_other = Exportable::load(other.path(), None).unwrap();
    let diff = export::torchscript_max_abs_diff(&dir.join("model.pt"), &m_other).unwrap();
    assert!(diff > 1e-3, "different weights, yet max |diff| {diff:e}");
    // ...and a failed check writes nothing (a negative tolerance makes any module fail).
    let refused = dir.join("refused.pt");
    let o = facerec(&[
        "export",
        "--model",
        p(&dir),
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
    assert!(!refused.exists() && !dir.join(".refused.pt.partial").exists());
    let _ = std::fs::remove_dir_all(&dir);
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
