//! PyTorch `.pt` state dicts in: the test venv's torch writes a backbone with `torch.save`
//! (`data-scripts/torch_save_model.py`, the independent oracle networks) as a plain state dict,
//! with DistributedDataParallel's `module.` prefix, and as arcface_torch's training checkpoint;
//! `init.from` (`checkpoint::init_backbone`) and `eval --model` (`LoadedModel::load`) read it
//! without Python and the embeddings agree with PyTorch's (exactly for `init.from`; to f32 rounding
//! for `eval --model`, which folds the BatchNorms). Bad input: a file that is not a state
//! dict, another architecture, a truncated file: errors naming the file and the key.

use facerec_backbone::{build, BackboneConfig, IResNetConfig, ViTConfig};
use facerec_testkit::python;
use facerec_trainer::checkpoint::init_backbone;
use facerec_trainer::commands::loaded_model::LoadedModel;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../data-scripts/torch_save_model.py"
);

fn run_script(py: &Path, req: serde_json::Value) {
    let mut child = Command::new(py)
        .arg(SCRIPT)
        .stdin(Stdio::piped())
        .spawn()
        .expect("starting the torch.save script");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(req.to_string().as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "{SCRIPT} failed");
}

/// iResNet-18's block layout with narrow stages at 56 px.
fn r18_small() -> BackboneConfig {
    BackboneConfig::Iresnet(IResNetConfig {
        depth: None,
        layers: Some([2, 2, 2, 2]),
        widths: [16, 32, 64, 128],
        embedding_size: 64,
        dropout: 0.0,
        input_size: 56,
        channels_last: false,
    })
}

fn vit_small() -> BackboneConfig {
    BackboneConfig::Vit(ViTConfig {
        embed_dim: 32,
        depth: 2,
        num_heads: 4,
        patch_size: 8,
        input_size: 56,
        embedding_size: 64,
        ..ViTConfig::vit_t()
    })
}

/// Writes `W.pt` (wrapped as `wrap`), the input and PyTorch's embedding into `dir`; returns the
/// `.pt` path, the input and the embedding.
fn saved(
    py: &Path,
    dir: &Path,
    cfg: &BackboneConfig,
    wrap: Option<&str>,
) -> (std::path::PathBuf, Tensor, Tensor) {
    let s = cfg.input_size();
    let x = Tensor::rand([4, 3, s, s], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    let (pt, input, emb) = (dir.join("W.pt"), dir.join("x.npz"), dir.join("e.npz"));
    Tensor::write_npz(&[("input", &x)], &input).unwrap();
    run_script(
        py,
        serde_json::json!({"model": cfg, "out": pt, "input": input, "emb": emb, "wrap": wrap}),
    );
    let theirs = Tensor::read_npz(&emb).unwrap().remove(0).1;
    (pt, x, theirs)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    f64::try_from((a - b).abs().max()).unwrap()
}

#[test]
fn torch_save_state_dicts_load_and_embed_like_pytorch() {
    let Some(py) = python() else { return };
    for (cfg, wrap) in [
        (r18_small(), None),
        (r18_small(), Some("module")),
        (vit_small(), Some("checkpoint")),
        (vit_small(), None),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (pt, x, theirs) = saved(&py, dir.path(), &cfg, wrap);
        // init.from
        let vs = nn::VarStore::new(Device::Cpu);
        let model = build(&vs.root(), &cfg);
        let report = init_backbone(&vs, &pt, true).unwrap();
        assert!(report.is_exact(), "{wrap:?}: {}", report.describe());
        let ours = tch::no_grad(|| model.forward_t(&x, false));
        let d = max_diff(&ours, &theirs);
        eprintln!(
            "{:?} {wrap:?}: init.from max |ours - PyTorch| = {d:e}",
            cfg.input_size()
        );
        assert!(d < 1e-5, "{cfg:?} {wrap:?}: max |diff| {d:e}");
        // eval --model W.pt --config config.toml
        let config = dir.path().join("config.toml");
        let mut table = toml::Table::new();
        table.insert("model".into(), toml::Value::try_from(&cfg).unwrap());
        std::fs::write(&config, toml::to_string(&table).unwrap()).unwrap();
        // `LoadedModel` folds the BatchNorms (f32 rounding: compared relative to the output).
        let loaded = LoadedModel::load(&pt, Some(&config), Device::Cpu).unwrap();
        assert!(loaded.fold.is_some_and(|r| r.folded > 0));
        let ours = tch::no_grad(|| loaded.backbone.forward_t(&x, false));
        let scale = f64::try_from(theirs.abs().max()).unwrap();
        let rel = max_diff(&ours, &theirs) / scale;
        eprintln!(
            "    eval --model max |ours - PyTorch| / max |PyTorch| = {rel:e} (max {scale:.3e})"
        );
        assert!(rel < 1e-5, "{cfg:?} {wrap:?} (eval): relative diff {rel:e}");
    }
}

#[test]
fn bad_pt_files_are_named_errors() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let err = |path: &Path, cfg: &BackboneConfig| {
        let vs = nn::VarStore::new(Device::Cpu);
        let _m = build(&vs.root(), cfg);
        format!("{:#}", init_backbone(&vs, path, true).unwrap_err())
    };
    // Not a state dict.
    for bad in ["not_a_state_dict", "a_module"] {
        let p = dir.path().join(format!("{bad}.pt"));
        run_script(&py, serde_json::json!({"bad": bad, "out": p}));
        let e = err(&p, &r18_small());
        assert!(
            e.contains(&format!("{bad}.pt")) && e.contains("not a"),
            "{e}"
        );
        if bad == "not_a_state_dict" {
            assert!(e.contains("key `epoch`"), "{e}");
        }
    }
    // Another architecture: the first differing key with both shapes.
    let (pt, _, _) = saved(&py, dir.path(), &r18_small(), None);
    let wider = BackboneConfig::Iresnet(IResNetConfig {
        widths: [8, 32, 64, 128],
        ..match r18_small() {
            BackboneConfig::Iresnet(c) => c,
            _ => unreachable!(),
        }
    });
    let e = err(&pt, &wider);
    assert!(
        e.contains("W.pt") && e.contains("`bn1.bias` has shape [16] in the file, [8] in the model"),
        "{e}"
    );
    let e = err(&pt, &vit_small());
    assert!(
        e.contains("W.pt") && e.contains("missing keys: blocks.0"),
        "{e}"
    );
    // Truncated: the end of the archive (its directory) is gone.
    let bytes = std::fs::read(&pt).unwrap();
    let cut = dir.path().join("cut.pt");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = err(&cut, &r18_small());
    assert!(e.contains("cut.pt") && e.contains("truncated"), "{e}");
    // A storage that lies past the end: the directory kept, the data cut short.
    let mut holed = bytes.clone();
    let start = holed.len() / 3;
    holed.drain(start..start + 1024);
    let p = dir.path().join("holed.pt");
    std::fs::write(&p, &holed).unwrap();
    let e = err(&p, &r18_small());
    assert!(e.contains("holed.pt"), "{e}");
}
