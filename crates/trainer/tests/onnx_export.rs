//! `facerec export --format onnx`, proved in an independent runtime: the file the binary writes
//! is run by onnxruntime (`data-scripts/onnx_runtime.py`, CPU, graph optimisations off and at
//! onnxruntime's default) on real face images (LFW, aligned 112x112, from `../shared/data`) and
//! its embeddings must equal our
//! backbone's eval-mode forward to 1e-4 (max absolute difference), at batch 1 and batch 3 from
//! the same file (the batch axis is dynamic).
//!
//! Networks: iResNet-18, a small iResNet, MobileFaceNet (`mbf`) and ViT (`vit_t`).
//!
//! The models are random but not trivial: convs are re-drawn with unit gain, every BN layer has
//! running statistics from training-mode passes over real faces, then perturbed, and the PReLU
//! slopes and BN affine parameters are off their init; so a layer missing from the graph, a
//! transposed weight or a swapped statistic changes the embedding far beyond the tolerance
//! (checked: a model with other weights differs by more than 1e-2).
//!
//! Also: a run directory without its config is refused with the file named, and nothing is
//! written. Requirements: `$FACEREC_PYTHON` with onnxruntime (installed by `cargo xtask setup`)
//! and `../shared/data`; both fail the test loudly on CI and skip it elsewhere.

mod common;

use facerec_backbone::{build, BackboneConfig, IResNetConfig, MobileFaceNetConfig, ViTConfig};
use facerec_data::input::{read_to_input, to_input_tensor};
use facerec_data::Fit;
use facerec_testkit::{python, require};
use facerec_trainer::commands::export::Exportable;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-4;
const RUNTIME: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../data-scripts/onnx_runtime.py"
);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The interpreter, if it has onnxruntime (fails on CI when not).
fn runtime() -> Option<PathBuf> {
    let py = python()?;
    let ok = Command::new(&py)
        .args([RUNTIME, "check"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    require(ok.then_some(py), "onnxruntime in $FACEREC_PYTHON")
}

/// The first `n` aligned LFW faces (sorted by path) as `[n, 3, size, size]` in [-1, 1], through
/// the one image path (decode, gray to RGB, fit, normalise).
fn faces(n: usize, size: usize) -> Option<Tensor> {
    let ws = workspace();
    let data = facerec_data::shared_data::for_tests(&ws)?;
    let root = facerec_data::shared_data::unpack(
        &data,
        "lfw_gray_112_aligned.tar.gz",
        &ws.join("target/shared-data"),
    )
    .unwrap();
    let mut people: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    people.sort();
    let mut files = Vec::new();
    for person in people {
        let mut imgs: Vec<PathBuf> = std::fs::read_dir(&person)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        imgs.sort();
        files.extend(imgs);
        if files.len() >= n {
            break;
        }
    }
    let mut bytes = Vec::new();
    for f in &files[..n] {
        bytes.extend(read_to_input(f, size, Fit::Stretch).unwrap());
    }
    Some(to_input_tensor(&bytes, n, size, Device::Cpu))
}

fn small_iresnet() -> BackboneConfig {
    BackboneConfig::Iresnet(IResNetConfig {
        depth: None,
        layers: Some([2, 1, 1, 1]),
        widths: [8, 16, 16, 32],
        embedding_size: 16,
        dropout: 0.4,
        input_size: 56,
        channels_last: false,
    })
}

/// A run directory (config.toml + model.safetensors) holding a random model of `cfg` with
/// realistic statistics (see the module docs), calibrated on `calib`.
fn make_run(dir: &Path, cfg: &BackboneConfig, seed: i64, calib: &Tensor) {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = build(&vs.root(), cfg);
    tch::no_grad(|| {
        for (name, mut t) in vs.variables() {
            if t.dim() == 4 {
                // Unit-gain conv weights: N(0, 1 / fan_in).
                let fan_in: i64 = t.size()[1..].iter().product();
                t.copy_(&(Tensor::randn_like(&t) / (fan_in as f64).sqrt()));
            } else if name.ends_with("prelu.weight")
                || (name.ends_with("layers.2.weight") && t.dim() == 1)
            {
                t.copy_(&(Tensor::rand_like(&t) * 0.3 + 0.1));
            }
        }
    });
    for _ in 0..5 {
        let _ = tch::no_grad(|| model.forward_t(calib, true));
    }
    tch::no_grad(|| {
        for (name, mut t) in vs.variables() {
            if name.ends_with("running_var") {
                let _ = t.g_mul_(&(Tensor::rand_like(&t) * 0.4 + 0.8));
            } else if name.ends_with("running_mean") || name.ends_with(".bias") {
                let _ = t.g_add_(&(Tensor::randn_like(&t) * 0.05));
            } else if name.ends_with("bn1.weight")
                || name.ends_with("bn2.weight")
                || name.ends_with("bn3.weight")
            {
                let _ = t.g_mul_(&(Tensor::rand_like(&t) * 0.4 + 0.8));
            }
        }
    });
    common::save_run_dir(dir, cfg, &vs);
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

fn max_abs(t: &Tensor) -> f64 {
    f64::try_from(t.to_kind(Kind::Double).abs().max()).unwrap()
}

/// Export `cfg` through the binary, run the file in onnxruntime on 1 and 3 real faces and compare
/// with our forward. Returns the largest difference over both batches.
fn check(py: &Path, name: &str, cfg: &BackboneConfig, seed: i64) -> Option<f64> {
    let s = cfg.input_size() as usize;
    let x = faces(11, s)?;
    let (calib, probe) = (x.narrow(0, 3, 8), x.narrow(0, 0, 3));
    let dir = tempfile::tempdir().unwrap();
    make_run(dir.path(), cfg, seed, &calib);
    let out = dir.path().join("model.onnx");
    let o = facerec(&[
        "export",
        "--model",
        p(dir.path()),
        "--format",
        "onnx",
        "--out",
        p(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(
        said.contains("ONNX opset 17") && said.contains("input `input`"),
        "{said}"
    );
    assert!(!dir.path().join(".model.onnx.partial").exists());

    let ours = Exportable::load(dir.path(), None).unwrap();
    let mut args = vec![RUNTIME.to_string(), "run".into(), p(&out).into()];
    let mut pairs = Vec::new();
    for b in [1i64, 3] {
        let xb = probe.narrow(0, 0, b);
        let (i, o) = (
            dir.path().join(format!("x{b}.npy")),
            dir.path().join(format!("y{b}.npy")),
        );
        xb.write_npy(&i).unwrap();
        args.extend([p(&i).to_string(), p(&o).to_string()]);
        pairs.push((xb, o));
    }
    let run = Command::new(py).args(&args).output().unwrap();
    assert!(
        run.status.success(),
        "onnxruntime failed on {}:\n{}",
        out.display(),
        String::from_utf8_lossy(&run.stderr)
    );
    let meta: serde_json::Value =
        serde_json::from_slice(run.stdout.trim_ascii()).expect("one JSON line");
    let d = cfg.embedding_size();
    assert_eq!(meta["input"], "input");
    assert_eq!(meta["output"], "embedding");
    assert_eq!(meta["input_shape"], serde_json::json!(["batch", 3, s, s]));
    assert_eq!(meta["output_shape"], serde_json::json!(["batch", d]));
    assert_eq!(meta["runs"], serde_json::json!([[1, d], [3, d]]));

    let mut worst = 0f64;
    for (xb, o) in &pairs {
        let mine = ours.embed(xb);
        let opt = o.with_file_name(format!(
            "{}_opt.npy",
            o.file_stem().unwrap().to_str().unwrap()
        ));
        for (level, file) in [("optimisations off", o), ("default optimisations", &opt)] {
            let theirs = Tensor::read_npy(file).unwrap();
            assert_eq!(theirs.size(), mine.size());
            let diff = max_abs(&(theirs - &mine));
            eprintln!(
                "{name}: batch {}, {level}: max |onnxruntime - ours| = {diff:.3e} (max |embedding| {:.3})",
                xb.size()[0],
                max_abs(&mine)
            );
            assert!(
                diff < TOL,
                "{name} ({level}): max |diff| {diff:e} >= {TOL:e}"
            );
            worst = worst.max(diff);
        }
    }

    // The comparison can fail: a model with other weights is far off.
    let other_dir = tempfile::tempdir().unwrap();
    make_run(other_dir.path(), cfg, seed + 1, &calib);
    let other = Exportable::load(other_dir.path(), None).unwrap();
    let theirs = Tensor::read_npy(&pairs[1].1).unwrap();
    let off = max_abs(&(theirs - other.embed(&pairs[1].0)));
    assert!(off > 1e-2, "{name}: another model differs by only {off:e}");
    Some(worst)
}

#[test]
fn onnx_iresnet18_matches_our_forward_in_onnxruntime() {
    let Some(py) = runtime() else { return };
    let cfg = BackboneConfig::Iresnet(IResNetConfig::r18());
    check(&py, "iresnet18 (112)", &cfg, 18);
}

#[test]
fn onnx_small_iresnet_matches_our_forward_in_onnxruntime() {
    let Some(py) = runtime() else { return };
    check(
        &py,
        "iresnet [2,1,1,1] (56, dropout 0.4)",
        &small_iresnet(),
        3,
    );
}

#[test]
fn onnx_mobilefacenet_matches_our_forward_in_onnxruntime() {
    let Some(py) = runtime() else { return };
    let cfg = BackboneConfig::Mobilefacenet(MobileFaceNetConfig::default());
    check(&py, "mobilefacenet (mbf, 112)", &cfg, 7);
}

#[test]
fn onnx_vit_t_matches_our_forward_in_onnxruntime() {
    let Some(py) = runtime() else { return };
    let cfg = BackboneConfig::Vit(ViTConfig::vit_t());
    check(&py, "vit_t (112, patch 9)", &cfg, 11);
}

#[test]
fn onnx_export_of_a_run_without_its_config_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_iresnet();
    let calib = Tensor::rand([4, 3, 56, 56], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    make_run(dir.path(), &cfg, 1, &calib);
    std::fs::remove_file(dir.path().join("config.toml")).unwrap();
    let out = dir.path().join("m.onnx");
    let o = facerec(&[
        "export",
        "--model",
        p(dir.path()),
        "--format",
        "onnx",
        "--out",
        p(&out),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    let want = dir.path().join("config.toml");
    assert!(err.contains(p(&want)), "{err}");
    assert!(!out.exists() && !dir.path().join(".m.onnx.partial").exists());
    let listed: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(
        listed.len(),
        1,
        "only model.safetensors is left: {listed:?}"
    );
}
