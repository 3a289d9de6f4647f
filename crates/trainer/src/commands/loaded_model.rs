//! A trained backbone loaded for the commands that embed images (`eval`, `embed`, `cluster`, the
//! 1:N search): built from the `[model]` table of the run's config, its weights loaded, and its
//! eval-mode forward on raw image batches.
//!
//! The BatchNorms that follow a convolution or a linear layer are folded into it at load time
//! (`facerec_backbone::fold`: the same embeddings to f32 rounding, fewer passes over the
//! activations; `docs/backbones.md`). `FACEREC_FOLD_BN=off` keeps them.

use anyhow::{bail, ensure, Context, Result};
use facerec_backbone::{Backbone, BackboneConfig, FoldReport};
use facerec_data::Fit;
use facerec_evaluation::images::normalize;
use std::path::{Path, PathBuf};
use tch::{nn, nn::ModuleT, Device, Tensor};

/// A loaded backbone with what it was loaded from.
pub struct LoadedModel {
    pub backbone: Backbone,
    pub config: BackboneConfig,
    /// The fit rule the model was trained with (`[input] fit` of its config).
    pub fit: Fit,
    pub checkpoint: PathBuf,
    pub config_file: PathBuf,
    pub device: Device,
    /// What BatchNorm folding did (`None`: turned off by `FACEREC_FOLD_BN=off`).
    pub fold: Option<FoldReport>,
    _vs: nn::VarStore,
}

/// The opt-out of BatchNorm folding: `FACEREC_FOLD_BN=off` (or `0`) keeps every BatchNorm;
/// `on` (or `1`, or unset) folds.
pub const FOLD_ENV: &str = "FACEREC_FOLD_BN";

/// Whether `$FACEREC_FOLD_BN` asks for folding (the default).
pub fn fold_wanted() -> Result<bool> {
    match std::env::var(FOLD_ENV) {
        Err(_) => Ok(true),
        Ok(v) => match v.as_str() {
            "on" | "1" => Ok(true),
            "off" | "0" => Ok(false),
            other => bail!("{FOLD_ENV}={other}: expected `on` or `off`"),
        },
    }
}

impl LoadedModel {
    /// Build the backbone from the `[model]` table of the config, load the weights and fold its
    /// BatchNorms (unless `FACEREC_FOLD_BN=off`).
    pub fn load(model: &Path, config: Option<&Path>, device: Device) -> Result<Self> {
        let (checkpoint, config_file) = super::model_files(model, config);
        ensure!(
            checkpoint.is_file(),
            "model checkpoint {} does not exist",
            checkpoint.display()
        );
        let cfg = super::read_model_config(&config_file)?;
        let fit = super::read_input_fit(&config_file)?;
        let fold = fold_wanted()?;
        let mut vs = nn::VarStore::new(device);
        let mut backbone = facerec_backbone::build(&vs.root(), &cfg);
        let context = || {
            format!(
                "loading {} into a backbone built from {}",
                checkpoint.display(),
                config_file.display()
            )
        };
        if crate::torch_pt::is_torch_file(&checkpoint) {
            // A PyTorch state dict (arcface_torch's `model.pt`): exactly the model's keys and
            // shapes once the `module.`/`backbone.` prefixes are stripped.
            let file = crate::checkpoint::read_weights(&checkpoint).with_context(context)?;
            let report = crate::checkpoint::KeyReport::compare(&file, &vs.variables());
            ensure!(
                report.is_exact(),
                "{}: does not fit the backbone built from {} ({})",
                checkpoint.display(),
                config_file.display(),
                report.describe()
            );
            crate::checkpoint::copy_into(&vs, &file);
        } else {
            vs.load(&checkpoint).with_context(context)?;
        }
        let fold = fold.then(|| backbone.fold_batch_norms());
        Ok(Self {
            backbone,
            fold,
            config: cfg,
            fit,
            checkpoint,
            config_file,
            device,
            _vs: vs,
        })
    }

    /// Side of the model's square input.
    pub fn input_size(&self) -> u32 {
        self.config.input_size() as u32
    }

    /// Eval-mode forward of a Uint8 `[b, 3, S, S]` batch (normalised here) on the model's device; the
    /// embeddings come back on the CPU.
    ///
    /// # Shapes
    /// `x`: `[b, 3, S, S]`; returns `[b, D]` Float.
    pub fn embed(&self, x: &Tensor) -> Tensor {
        self.backbone
            .forward_t(&normalize(&x.to_device(self.device)), false)
            .to_device(Device::Cpu)
    }
}
