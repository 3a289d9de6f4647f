//! `facerec export --model RUN_DIR --format safetensors|torchscript|onnx --out FILE`: the trained
//! backbone in a form other tools load (see `docs/export.md`).
//!
//! - `safetensors`: the backbone `state_dict` with arcface_torch key names (`conv1.weight`,
//!   `layer1.0.bn1.running_mean`, `features.num_batches_tracked`, ...), float32 parameters and BN
//!   running statistics, Int64 scalar `num_batches_tracked` buffers, exactly as PyTorch's
//!   `state_dict()` of the arcface_torch model holds them. The checkpoint is first checked against
//!   the backbone its config builds (no missing, unexpected or mis-shaped key), and the written file
//!   is read back and compared bit for bit.
//! - `torchscript`: tch cannot script a Rust module, so the independent PyTorch definition of the
//!   network (`data-scripts/backbone_oracle.py`, written from the SPEC) is loaded with these weights
//!   by `data-scripts/export_model.py`, put in eval mode and scripted with `torch.jit.script`. The
//!   result is then loaded here with `tch::CModule` and its embeddings are compared with our
//!   [`Backbone`] on the same input; the export fails (and writes nothing) when the largest absolute
//!   difference exceeds the tolerance (default 1e-5).
//!
//! - `onnx`: the eval-mode graph (opset 17, dynamic batch axis, arcface_torch's input convention),
//!   written in Rust by the backbone itself ([`Backbone::to_onnx`], on `facerec-onnx`); no
//!   Python. Its parity with our forward is proved in onnxruntime by
//!   `crates/trainer/tests/onnx_export.rs`, not at export time (the binary has no ONNX runtime).
//!
//! The TorchScript scripts are compiled into the binary and written to a temporary folder at export time, so
//! the command does not depend on the source tree; the Python interpreter is `--python`, else
//! `$FACEREC_PYTHON` (set by `cargo xtask`), else `python3`, and needs torch (2.13.0 is the version
//! this workspace pins).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use facerec_backbone::{Backbone, BackboneConfig};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

/// The independent PyTorch network definition (SPEC 1(d), docs/backbones.md).
const ORACLE_PY: &str = include_str!("../../../../data-scripts/backbone_oracle.py");
/// Loads a `.safetensors` into it and writes TorchScript (or ONNX).
const EXPORT_PY: &str = include_str!("../../../../data-scripts/export_model.py");

/// Largest absolute embedding difference accepted between the TorchScript module and our backbone.
pub const DEFAULT_TOLERANCE: f64 = 1e-5;

/// Export format.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `.safetensors` with arcface_torch `state_dict` key names.
    Safetensors,
    /// A TorchScript module (`torch.jit.load` / `tch::CModule::load`), eval mode.
    Torchscript,
    /// An ONNX model (opset 17), eval mode, dynamic batch axis.
    Onnx,
}

/// `facerec export` options.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// A run directory (`config.toml` + `model.safetensors`) or a model `.safetensors` file.
    #[arg(long, value_name = "RUN_DIR|MODEL.safetensors")]
    pub model: PathBuf,
    /// The config holding the `[model]` table. Default: `config.toml` in the run directory, or
    /// beside the `.safetensors` file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum)]
    pub format: Format,
    /// Output file (written through a temporary file and a rename).
    #[arg(long)]
    pub out: PathBuf,
    /// Python with torch, for `--format torchscript`. Default `$FACEREC_PYTHON`, else `python3`.
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// TorchScript check: largest accepted absolute difference of the embeddings.
    #[arg(long, default_value_t = DEFAULT_TOLERANCE)]
    pub tolerance: f64,
}

/// A backbone loaded on the CPU in float32 from a checked checkpoint.
pub struct Exportable {
    pub backbone: Backbone,
    pub config: BackboneConfig,
    /// The checkpoint read.
    pub weights: PathBuf,
    /// The config the `[model]` table came from.
    pub config_file: PathBuf,
    pub vs: nn::VarStore,
}

impl Exportable {
    /// Build the backbone from the config's `[model]` table and load the checkpoint into it. The
    /// checkpoint must hold exactly the backbone's keys with its shapes (the error lists missing,
    /// unexpected and mis-shaped keys), floating-point tensors for parameters and statistics and
    /// Int64 `num_batches_tracked`. Parameters are cast to float32.
    pub fn load(model: &Path, config: Option<&Path>) -> Result<Self> {
        let (weights, config_file) = super::model_files(model, config);
        ensure!(
            weights.is_file(),
            "model checkpoint {} does not exist",
            weights.display()
        );
        let cfg = super::read_model_config(&config_file)?;
        let mut vs = nn::VarStore::new(Device::Cpu);
        let backbone = facerec_backbone::build(&vs.root(), &cfg);
        let file: BTreeMap<String, Tensor> = Tensor::read_safetensors(&weights)
            .with_context(|| format!("reading {} as safetensors", weights.display()))?
            .into_iter()
            .collect();
        let ours = vs.variables();
        let missing: Vec<&String> = ours.keys().filter(|k| !file.contains_key(*k)).collect();
        let unexpected: Vec<&String> = file.keys().filter(|k| !ours.contains_key(*k)).collect();
        let mut problems = Vec::new();
        if !missing.is_empty() {
            problems.push(format!("missing keys {missing:?}"));
        }
        if !unexpected.is_empty() {
            problems.push(format!("unexpected keys {unexpected:?}"));
        }
        for (k, t) in &ours {
            let Some(f) = file.get(k) else { continue };
            if f.size() != t.size() {
                problems.push(format!(
                    "{k}: shape {:?} in the file, {:?} in the model",
                    f.size(),
                    t.size()
                ));
            }
            let int_buffer = k.ends_with("num_batches_tracked");
            let kind_ok = if int_buffer {
                f.kind() == Kind::Int64
            } else {
                f.is_floating_point()
            };
            if !kind_ok {
                let want = if int_buffer {
                    "Int64"
                } else {
                    "floating point"
                };
                problems.push(format!(
                    "{k}: kind {:?} in the file, {want} expected",
                    f.kind()
                ));
            }
        }
        if !problems.is_empty() {
            bail!(
                "{} does not fit the backbone of {} ({:?}): {}",
                weights.display(),
                config_file.display(),
                cfg,
                problems.join("; ")
            );
        }
        vs.load(&weights)
            .with_context(|| format!("loading {}", weights.display()))?;
        vs.float();
        Ok(Exportable {
            backbone,
            config: cfg,
            weights,
            config_file,
            vs,
        })
    }

    /// The `state_dict` as written: every variable, sorted by name.
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        let vars: BTreeMap<String, Tensor> = self.vs.variables().into_iter().collect();
        vars.into_iter().collect()
    }

    /// Eval-mode embeddings.
    ///
    /// # Shapes
    /// `x`: `[B, 3, S, S]` float in `[-1, 1]`; returns `[B, D]`.
    pub fn embed(&self, x: &Tensor) -> Tensor {
        let _guard = tch::no_grad_guard();
        self.backbone.forward_t(x, false)
    }
}

/// A temporary sibling of `out` with the same extension, and the rename into place.
fn tmp_sibling(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    out.with_file_name(format!(".{name}.partial"))
}

fn rename_into_place(tmp: &Path, out: &Path) -> Result<()> {
    std::fs::rename(tmp, out)
        .with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))
}

/// Write the backbone `state_dict` to `out` as safetensors, read it back and check it bit for bit.
pub fn write_safetensors(m: &Exportable, out: &Path) -> Result<()> {
    let sd = m.state_dict();
    let tmp = tmp_sibling(out);
    Tensor::write_safetensors(&sd, &tmp).with_context(|| format!("writing {}", tmp.display()))?;
    let back: BTreeMap<String, Tensor> = Tensor::read_safetensors(&tmp)
        .with_context(|| format!("reading back {}", tmp.display()))?
        .into_iter()
        .collect();
    ensure!(
        back.len() == sd.len(),
        "{}: {} tensors written, {} read back",
        tmp.display(),
        sd.len(),
        back.len()
    );
    for (k, t) in &sd {
        let b = back
            .get(k)
            .with_context(|| format!("{}: {k} was not written", tmp.display()))?;
        ensure!(
            b.kind() == t.kind() && b.equal(t),
            "{}: {k} differs after reading back",
            tmp.display()
        );
    }
    rename_into_place(&tmp, out)
}

/// The Python interpreter: `explicit`, else `$FACEREC_PYTHON`, else `python3`.
pub fn python_interpreter(explicit: Option<&Path>) -> PathBuf {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("FACEREC_PYTHON").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("python3"))
}

/// A deterministic probe batch in `[-1, 1]` (its own generator: the global seed is untouched).
///
/// # Shapes
/// Returns `[batch, 3, size, size]` float.
pub fn probe_input(batch: i64, size: i64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x5eed_e4b0);
    let n = (batch * 3 * size * size) as usize;
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    Tensor::from_slice(&v).view([batch, 3, size, size])
}

/// Largest absolute difference between the embeddings of the TorchScript module at `path` and our
/// backbone on [`probe_input`] (batch 3). Errors when the module cannot be loaded or run, returns a
/// different shape, or either output is not finite.
pub fn torchscript_max_abs_diff(path: &Path, m: &Exportable) -> Result<f64> {
    let mut module = tch::CModule::load(path)
        .with_context(|| format!("loading TorchScript {}", path.display()))?;
    module.set_eval();
    let x = probe_input(3, m.config.input_size());
    let ours = m.embed(&x);
    let theirs = {
        let _guard = tch::no_grad_guard();
        module
            .forward_ts(&[&x])
            .with_context(|| format!("running TorchScript {}", path.display()))?
    };
    ensure!(
        theirs.size() == ours.size(),
        "{}: embeddings of shape {:?}, our backbone gives {:?}",
        path.display(),
        theirs.size(),
        ours.size()
    );
    let finite = |t: &Tensor| bool::try_from(t.isfinite().all()).unwrap_or(false);
    ensure!(
        finite(&ours) && finite(&theirs),
        "{}: non-finite embeddings",
        path.display()
    );
    Ok(f64::try_from(
        (theirs.to_kind(Kind::Double) - ours.to_kind(Kind::Double))
            .abs()
            .max(),
    )?)
}

/// Script the model with PyTorch (see the module docs), verify it against our backbone, then move
/// it to `out`. Returns the largest absolute embedding difference.
pub fn write_torchscript(m: &Exportable, out: &Path, python: &Path, tolerance: f64) -> Result<f64> {
    let dir = tempfile::tempdir().context("creating a temporary folder")?;
    std::fs::write(dir.path().join("backbone_oracle.py"), ORACLE_PY)?;
    let script = dir.path().join("export_model.py");
    std::fs::write(&script, EXPORT_PY)?;
    let weights = dir.path().join("model.safetensors");
    write_safetensors(m, &weights)?;
    #[derive(serde::Serialize)]
    struct Doc<'a> {
        model: &'a BackboneConfig,
    }
    let config = dir.path().join("config.toml");
    std::fs::write(&config, toml::to_string(&Doc { model: &m.config })?)?;
    let tmp = tmp_sibling(out);
    let output = Command::new(python)
        .arg(&script)
        .arg("torchscript")
        .arg("--config")
        .arg(&config)
        .arg("--weights")
        .arg(&weights)
        .arg("--out")
        .arg(&tmp)
        .output()
        .with_context(|| {
            format!(
                "starting {} (set --python or FACEREC_PYTHON)",
                python.display()
            )
        })?;
    if !output.status.success() {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "{} export_model.py torchscript failed ({}):\n{}",
            python.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let diff = torchscript_max_abs_diff(&tmp, m);
    let diff = match diff {
        Ok(d) if d <= tolerance => d,
        Ok(d) => {
            let _ = std::fs::remove_file(&tmp);
            bail!(
                "the TorchScript module's embeddings differ from our backbone's by up to {d:e} (> {tolerance:e}); nothing was written to {}",
                out.display()
            );
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    rename_into_place(&tmp, out)?;
    Ok(diff)
}

/// Write the backbone's eval-mode ONNX graph to `out` (temporary file and rename). Returns the
/// number of bytes written.
pub fn write_onnx(m: &Exportable, out: &Path) -> Result<usize> {
    let bytes = m.backbone.to_onnx(m.config.input_size());
    let tmp = tmp_sibling(out);
    if let Err(e) = std::fs::write(&tmp, &bytes) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", tmp.display()));
    }
    rename_into_place(&tmp, out)?;
    Ok(bytes.len())
}

/// Run `facerec export`.
pub fn run(args: Args) -> Result<()> {
    let m = Exportable::load(&args.model, args.config.as_deref())?;
    if let Some(parent) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        ensure!(
            parent.is_dir(),
            "the output folder {} does not exist",
            parent.display()
        );
    }
    let n: i64 = m.vs.variables().values().map(|t| t.numel() as i64).sum();
    match args.format {
        Format::Safetensors => {
            write_safetensors(&m, &args.out)?;
            println!(
                "wrote {} ({} tensors, {n} values, arcface_torch key names) from {}",
                args.out.display(),
                m.vs.variables().len(),
                m.weights.display()
            );
        }
        Format::Torchscript => {
            let python = python_interpreter(args.python.as_deref());
            let diff = write_torchscript(&m, &args.out, &python, args.tolerance)?;
            println!(
                "wrote {} (TorchScript, eval mode, input [B, 3, {s}, {s}] in [-1, 1]) from {}; max |embedding difference| vs our backbone {diff:.3e} (tolerance {:e})",
                args.out.display(),
                m.weights.display(),
                args.tolerance,
                s = m.config.input_size()
            );
        }
        Format::Onnx => {
            let bytes = write_onnx(&m, &args.out)?;
            println!(
                "wrote {} (ONNX opset {}, eval mode, {bytes} bytes): input `{}` [batch, 3, {s}, {s}] float32 RGB (x / 255 - 0.5) / 0.5, output `{}` [batch, {}] not normalised; from {}",
                args.out.display(),
                facerec_onnx::OPSET,
                facerec_backbone::onnx::INPUT,
                facerec_backbone::onnx::OUTPUT,
                m.config.embedding_size(),
                m.weights.display(),
                s = m.config.input_size()
            );
        }
    }
    Ok(())
}
