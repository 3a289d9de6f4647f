//! `facerec` subcommands other than `train`: one file each, with a clap `Args` struct and `run(args)`.
//! (`dry_run` is the `train --dry-run` report, called from `train`'s arguments.)

pub mod align;
pub mod cluster;
pub mod compare;
pub mod dry_run;
pub mod embed;
pub mod eval;
pub mod export;
pub mod identify;
pub mod loaded_model;
pub mod plot;
pub mod prep;

use anyhow::{Context, Result};
use facerec_backbone::BackboneConfig;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};

/// The checkpoint and config paths for a run directory or a `.safetensors` file.
pub fn model_files(model: &Path, config: Option<&Path>) -> (PathBuf, PathBuf) {
    let (weights, default_cfg) = if model.is_dir() {
        (model.join("model.safetensors"), model.join("config.toml"))
    } else {
        let dir = model.parent().unwrap_or(Path::new("."));
        (model.to_path_buf(), dir.join("config.toml"))
    };
    (
        weights,
        config.map(Path::to_path_buf).unwrap_or(default_cfg),
    )
}

/// Read the `[model]` table of a config file.
pub fn read_model_config(path: &Path) -> Result<BackboneConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the model config {} (set --config)", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let value = table
        .get("model")
        .cloned()
        .with_context(|| format!("{} has no [model] table", path.display()))?;
    let cfg: BackboneConfig = value
        .try_into()
        .with_context(|| format!("{}: the [model] table", path.display()))?;
    cfg.validate()
        .with_context(|| format!("{}: the [model] table", path.display()))?;
    Ok(cfg)
}

/// The fit rule of the `[input]` table of a config file (`facerec_data::Fit::Stretch` when the table
/// or the key is absent, as for runs written before it existed).
pub fn read_input_fit(path: &Path) -> Result<facerec_data::Fit> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the model config {} (set --config)", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    match table.get("input") {
        None => Ok(facerec_data::Fit::default()),
        Some(v) => {
            let input: crate::config::InputConfig = v
                .clone()
                .try_into()
                .with_context(|| format!("{}: the [input] table", path.display()))?;
            Ok(input.fit)
        }
    }
}

/// `--device` parsed and checked, and libtorch's intra-op threads set from `--threads` (0 = all
/// cores): `(device, threads)`.
pub fn init_device(spec: &str, threads: usize) -> Result<(tch::Device, usize)> {
    let device = crate::device::parse_device(spec).context("--device")?;
    crate::device::check_available(device)?;
    let threads = match threads {
        0 => facerec_data::cores(),
        t => t,
    };
    tch::set_num_threads(threads as i32);
    Ok((device, threads))
}

/// The progress bar of the commands that walk a set of images (`{msg} [bar] pos/len rate eta`).
pub(crate) fn progress_bar(len: u64, msg: String) -> ProgressBar {
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template("{msg:<28} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    b.set_message(msg);
    b
}
