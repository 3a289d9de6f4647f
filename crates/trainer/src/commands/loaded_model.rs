//! A trained backbone loaded for the commands that embed images (`eval`, `embed`, `cluster`, the
//! 1:N search): built from the `[model]` table of the run's config, its weights loaded, and its
//! eval-mode forward on raw image batches.

use anyhow::{ensure, Context, Result};
use facerec_backbone::{Backbone, BackboneConfig};
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
    _vs: nn::VarStore,
}

impl LoadedModel {
    /// Build the backbone from the `[model]` table of the config and load the weights.
    pub fn load(model: &Path, config: Option<&Path>, device: Device) -> Result<Self> {
        let (checkpoint, config_file) = super::model_files(model, config);
        ensure!(
            checkpoint.is_file(),
            "model checkpoint {} does not exist",
            checkpoint.display()
        );
        let cfg = super::read_model_config(&config_file)?;
        let fit = super::read_input_fit(&config_file)?;
        let mut vs = nn::VarStore::new(device);
        let backbone = facerec_backbone::build(&vs.root(), &cfg);
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
        Ok(Self {
            backbone,
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
