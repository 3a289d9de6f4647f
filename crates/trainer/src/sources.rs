//! The training data of a run: the configured source opened for the model's input size, its labels
//! checked against the classifier, the batch loader over it, and the un-augmented view that
//! objectives embed (cluster refreshes).

use crate::config::{Config, SourceConfig};
use anyhow::{bail, Context, Result};
use facerec_data::{
    shared_data, Fit, ImageFolder, Loader, RecOptions, RecordIo, Source, SyntheticConfig,
    SyntheticFaces,
};
use facerec_evaluation::images::{decode_all, normalize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Device, Tensor};

/// Open a source for images of side `size`, fitted by `fit` (the config's `input.fit`). `Ok(None)`
/// when shared data is absent and `required` is false. Errors name `key`, the config key of the
/// source.
pub fn open_source(
    cfg: &SourceConfig,
    size: usize,
    fit: Fit,
    workspace: &Path,
    seed: u64,
    key: &str,
    required: bool,
) -> Result<Option<Arc<dyn Source>>> {
    Ok(Some(match cfg {
        SourceConfig::Synthetic {
            identities,
            images_per_identity,
            first_identity,
        } => Arc::new(
            SyntheticFaces::new(SyntheticConfig {
                identities: *identities,
                images_per_identity: *images_per_identity,
                image_size: size,
                seed,
                first_identity: *first_identity,
            })
            .with_context(|| format!("config key `{key}`"))?,
        ),
        SourceConfig::ImageFolder { root, classes } => Arc::new(
            ImageFolder::open(root, size, classes.as_deref())
                .with_context(|| format!("config key `{key}.root`"))?
                .with_fit(fit),
        ),
        SourceConfig::Rec {
            path,
            policy,
            size_policy,
            max_skipped_fraction,
        } => Arc::new(
            RecordIo::open(
                path,
                size,
                RecOptions {
                    policy: *policy,
                    size: *size_policy,
                    fit,
                    max_skipped_fraction: *max_skipped_fraction,
                },
            )
            .with_context(|| format!("config key `{key}` (path, policy, max_skipped_fraction)"))?,
        ),
        SourceConfig::Bin { .. } | SourceConfig::LfwPairs { .. } => {
            bail!("config key `{key}`: a pair list cannot be opened as a labelled source")
        }
        SourceConfig::Orl { classes, data_dir } => {
            let dir = match data_dir.clone().or_else(|| shared_data::locate(workspace)) {
                Some(d) => d,
                None if required => bail!("config key `{key}`: the ORL archive was not found (set `data_dir`, FACEREC_SHARED_DATA, or put ../shared/data beside the workspace)"),
                None => return Ok(None),
            };
            let root = shared_data::unpack(
                &dir,
                "orl_faces.tar.gz",
                &workspace.join("target/shared-data"),
            )
            .with_context(|| format!("config key `{key}`"))?;
            Arc::new(
                ImageFolder::open(&root, size, classes.as_deref())
                    .with_context(|| format!("config key `{key}.classes`"))?
                    .with_fit(fit),
            )
        }
    }))
}

/// Check every label of `source` against the classifier size, naming the first bad item.
pub fn check_labels(source: &dyn Source, num_classes: usize) -> Result<()> {
    for i in 0..source.len() {
        let label = source.label(i);
        if label >= num_classes {
            bail!(
                "{}: label {label} is outside the class range 0..{num_classes} (config key `classifier.num_classes` = {num_classes}, the data has {} classes)",
                source.describe(i),
                source.num_classes()
            );
        }
    }
    Ok(())
}

/// The loader of the training batches: `[loader]`'s options, `[augment]`, `train.batch_size`,
/// `workers` decoding threads (resolved), the run's seed.
pub fn training_loader(cfg: &Config, source: Arc<dyn Source>, workers: usize) -> Loader {
    let loader = facerec_data::LoaderConfig {
        augment: cfg.augment.clone(),
        ..cfg.loader.config(cfg.train.batch_size, cfg.seed, workers)
    };
    Loader::new(source, loader)
}

/// The training source as objectives see it (decoded without augmentation).
pub struct SourceSet {
    /// The training source.
    pub source: Arc<dyn Source>,
    /// Image side.
    pub size: usize,
    /// Decoding threads.
    pub threads: usize,
    /// Where the batches go.
    pub device: Device,
}

impl crate::objective::TrainingSet for SourceSet {
    fn len(&self) -> usize {
        self.source.len()
    }
    fn label(&self, i: usize) -> usize {
        self.source.label(i)
    }
    fn images(&self, idx: &[usize]) -> Result<Tensor> {
        let u8 = decode_all(
            idx.len(),
            self.size,
            self.threads,
            &|k| self.source.load(idx[k]),
            &|| {},
        )?;
        Ok(normalize(&u8.to_device(self.device)))
    }
}

/// The workspace: the current directory when `../shared/data` is beside it, else the source tree
/// this binary was built from.
pub fn default_workspace() -> PathBuf {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    if cwd.join("../shared/data").is_dir() || cwd.join("Cargo.toml").is_file() {
        return cwd;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}
