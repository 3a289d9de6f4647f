//! Training configuration: TOML with `deny_unknown_fields` everywhere, `extends = "base.toml"`,
//! and `--set a.b=value` overrides, resolved into one [`Config`] that is echoed at start and written
//! next to the checkpoints.
//!
//! The embedded default (`configs/default.toml`) is what `cargo xtask train` runs with no arguments.

use anyhow::{bail, Context, Result};
use facerec_backbone::BackboneConfig;
use facerec_loss_heads::{HeadConfig, PartialFcConfig};

/// How the classifier's rows are placed over the processes of a run (`classifier.sharding`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Sharding {
    /// Rank r holds only its contiguous block of class rows (and their optimiser state); the
    /// embeddings are gathered and the softmax is computed across ranks (docs/distributed.md).
    ModelParallel,
    /// Every rank holds the whole classifier; its gradients are averaged (data parallel).
    Replicated,
}

/// What the optimiser does to the classifier rows a Partial FC step did not sample
/// (`partial_fc.optimizer_semantics`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerSemantics {
    /// Unsampled rows keep their weights, momentum and weight decay untouched (facerec's default).
    #[default]
    V1,
    /// arcface_torch's `partial_fc_v2`: every row gets momentum and weight decay every step (an
    /// unsampled row's gradient is zero).
    V2,
}

/// `[partial_fc]`: the sampler's settings (`facerec-loss-heads`' [`PartialFcConfig`]) and what the
/// optimiser does to the rows a step did not sample.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PartialFcSettings {
    /// Fraction of the classes kept per step, in `(0, 1]` (per rank's block under model
    /// parallel). Default 1.0.
    #[serde(default = "default_sample_rate")]
    pub sample_rate: f64,
    /// Seed of the sampler's generator. Default 0.
    #[serde(default)]
    pub seed: u64,
    /// `"v1"` (default) or `"v2"`: see [`OptimizerSemantics`].
    #[serde(default)]
    pub optimizer_semantics: OptimizerSemantics,
}

fn default_sample_rate() -> f64 {
    1.0
}

impl Default for PartialFcSettings {
    fn default() -> Self {
        PartialFcSettings {
            sample_rate: default_sample_rate(),
            seed: 0,
            optimizer_semantics: OptimizerSemantics::V1,
        }
    }
}

impl PartialFcSettings {
    /// The sampler's config.
    pub fn sampler(&self) -> PartialFcConfig {
        PartialFcConfig {
            sample_rate: self.sample_rate,
            seed: self.seed,
        }
    }

    /// Whether the optimiser restricts a step to the sampled rows (sampling on, semantics v1).
    pub fn masks_rows(&self) -> bool {
        self.sample_rate < 1.0 && self.optimizer_semantics == OptimizerSemantics::V1
    }
}
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The embedded default configuration.
pub const DEFAULT_CONFIG: &str = include_str!("../configs/default.toml");

/// A whole training run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Seed for weights, data order, augmentation and margins. Default 2048 (arcface_torch).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Parent folder of run directories. Default `runs`.
    #[serde(default = "default_output_dir")]
    pub output_dir: PathBuf,
    /// Run name; the run directory is `<output_dir>/<run_name>-<UTC time>`. Default `run`.
    #[serde(default = "default_run_name")]
    pub run_name: String,
    /// Training data.
    pub data: SourceConfig,
    /// How every image becomes the model input (training data, evaluation targets, and `facerec
    /// eval` / `facerec cluster` on the trained model).
    #[serde(default)]
    pub input: InputConfig,
    /// The cosine classifier that owns the class weights.
    #[serde(default)]
    pub classifier: ClassifierConfig,
    /// Backbone.
    pub model: BackboneConfig,
    /// Margin head on the cosine classifier.
    pub head: HeadConfig,
    /// Partial FC class sampling (arcface_torch `sample_rate`).
    #[serde(default)]
    pub partial_fc: PartialFcSettings,
    /// Optimiser.
    #[serde(default)]
    pub optim: OptimConfig,
    /// Learning-rate schedule.
    #[serde(default)]
    pub schedule: ScheduleConfig,
    /// Loop settings.
    pub train: TrainConfig,
    /// The training loader: augmentation, P x K batches, decoding threads (`facerec_data`'s own
    /// options type, deserialised as it is).
    #[serde(default)]
    pub loader: facerec_data::LoaderOptions,
    /// Image augmentation in the data workers: crop, resampling, blur, colour, grayscale,
    /// erasing (`facerec_data::AugmentConfig`, every probability 0 by default, as arcface_torch).
    #[serde(default)]
    pub augment: facerec_data::AugmentConfig,
    /// Verification targets.
    #[serde(default)]
    pub eval: EvalConfig,
    /// Periodic checkpoints for `--resume`.
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// Fine-tuning from existing backbone weights.
    #[serde(default)]
    pub init: InitConfig,
    /// CoReFace contrastive regularization (docs/coreface.md); absent = plain margin softmax.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coreface: Option<facerec_contrastive_regularizer::CoReFaceConfig>,
    /// Cluster-guided ArcFace (docs/cluster-guided.md); absent = plain margin softmax.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_guided: Option<crate::objective::cluster_guided::ClusterGuidedConfig>,
}

fn default_seed() -> u64 {
    2048
}
fn default_output_dir() -> PathBuf {
    PathBuf::from("runs")
}
fn default_run_name() -> String {
    "run".into()
}

/// A labelled image source. Internally tagged: `type = "synthetic" | "image_folder" | "orl" | "rec"`
/// (training or evaluation), or `"bin" | "lfw_pairs"` (evaluation only: fixed pair lists).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// Procedurally generated identities (nothing downloaded).
    Synthetic {
        /// Number of identities.
        identities: usize,
        /// Images per identity.
        images_per_identity: usize,
        /// First identity id; sets with disjoint id ranges share no identity. Default 0.
        #[serde(default)]
        first_identity: u64,
    },
    /// One sub-folder per identity (PNG, PGM, JPEG).
    ImageFolder {
        /// The folder holding one sub-folder per identity.
        root: PathBuf,
        /// Only these sub-folders, labels in this order. Default: all, natural sort.
        #[serde(default)]
        classes: Option<Vec<String>>,
    },
    /// ORL faces from the shared real-data folder (`../shared/data/orl_faces.tar.gz`), unpacked on
    /// first use into `target/shared-data`.
    Orl {
        /// Identity folders to use (`s1` .. `s40`). Default: all 40.
        #[serde(default)]
        classes: Option<Vec<String>>,
        /// Folder holding `orl_faces.tar.gz`. Default: `$FACEREC_SHARED_DATA`, else `../shared/data`.
        #[serde(default)]
        data_dir: Option<PathBuf>,
    },
    /// insightface / MXNet RecordIO: a folder with `train.rec`, `train.idx`, `property`, or a `.rec`
    /// file (see docs/data.md).
    Rec {
        /// The folder or `.rec` file.
        path: PathBuf,
        /// Bad records: `"error"` (default) stops naming file, key and byte offset; `"skip"` counts,
        /// logs and leaves them out.
        #[serde(default)]
        policy: facerec_data::BadRecordPolicy,
        /// Images whose size differs from the model input: `"resize"` (default: fitted by
        /// `input.fit`) or `"strict"` (a bad record).
        #[serde(default)]
        size_policy: facerec_data::SizePolicy,
        /// Under `policy = "skip"`: the run stops when more than this fraction of the image records
        /// is left out (when the set opens, plus distinct images that fail to decode). In [0, 1].
        /// Default 0.01.
        #[serde(default = "default_max_skipped_fraction")]
        max_skipped_fraction: f64,
    },
    /// An insightface verification pack (`lfw.bin`, `cfp_fp.bin`, ...): its own pairs, in order.
    /// Evaluation only.
    Bin {
        /// The `.bin` file.
        path: PathBuf,
    },
    /// An LFW-style `pairs.txt` (View 1 or View 2) over an image folder `<Name>/<Name>_NNNN.ext`.
    /// Evaluation only.
    LfwPairs {
        /// The pair list.
        pairs: PathBuf,
        /// The image folder.
        images: PathBuf,
    },
}

fn default_max_skipped_fraction() -> f64 {
    facerec_data::DEFAULT_MAX_SKIPPED_FRACTION
}

/// The one image path's settings (see `facerec_data::input` and docs/data.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    /// How an image that is not `model.input_size` square is fitted: `"stretch"` (default: both
    /// sides resized, nothing cut) or `"center_crop"` (short side resized, centre kept). Used for the
    /// training data and every evaluation target alike; `facerec eval` and `facerec cluster` read it
    /// from the run's config.toml.
    #[serde(default)]
    pub fit: facerec_data::Fit,
}

impl SourceConfig {
    /// Whether this source is a fixed pair list (usable for evaluation only).
    pub fn is_pair_list(&self) -> bool {
        matches!(
            self,
            SourceConfig::Bin { .. } | SourceConfig::LfwPairs { .. }
        )
    }
}

/// The classifier (weight matrix) between the embedding and the margin head.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ClassifierConfig {
    /// Number of classes. Default: the training source's class count. Every label must be below it.
    #[serde(default)]
    pub num_classes: Option<usize>,
    /// `"model_parallel"` or `"replicated"` (see [`Sharding`]). Default: model parallel when the
    /// run has more than one process, replicated for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sharding: Option<Sharding>,
}

impl ClassifierConfig {
    /// The sharding of a run of `world` processes.
    pub fn sharding_for(&self, world: usize) -> Sharding {
        self.sharding.unwrap_or(if world > 1 {
            Sharding::ModelParallel
        } else {
            Sharding::Replicated
        })
    }
}

/// Optimiser. Two parameter groups: the backbone (`weight_decay`) and the classifier
/// (`classifier_weight_decay`, default: the same). Gradient clipping (`train.grad_clip`) applies
/// to the backbone only, as in arcface_torch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum OptimConfig {
    /// SGD with momentum and L2 weight decay (`torch.optim.SGD`).
    Sgd {
        /// Base learning rate. Default 0.1.
        #[serde(default = "default_lr")]
        lr: f64,
        /// Momentum. Default 0.9.
        #[serde(default = "default_momentum")]
        momentum: f64,
        /// L2 weight decay of the backbone. Default 5e-4.
        #[serde(default = "default_wd")]
        weight_decay: f64,
        /// L2 weight decay of the classifier. Default: `weight_decay`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        classifier_weight_decay: Option<f64>,
        /// Nesterov momentum. Default false.
        #[serde(default)]
        nesterov: bool,
    },
    /// AdamW with decoupled weight decay (`torch.optim.AdamW`).
    Adamw {
        /// Base learning rate. Default 1e-3.
        #[serde(default = "default_adamw_lr")]
        lr: f64,
        /// First-moment decay. Default 0.9.
        #[serde(default = "default_beta1")]
        beta1: f64,
        /// Second-moment decay. Default 0.999.
        #[serde(default = "default_beta2")]
        beta2: f64,
        /// Denominator epsilon. Default 1e-8.
        #[serde(default = "default_eps")]
        eps: f64,
        /// Decoupled weight decay of the backbone. Default 0.05.
        #[serde(default = "default_adamw_wd")]
        weight_decay: f64,
        /// Decoupled weight decay of the classifier. Default: `weight_decay`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        classifier_weight_decay: Option<f64>,
    },
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig::Sgd {
            lr: default_lr(),
            momentum: default_momentum(),
            weight_decay: default_wd(),
            classifier_weight_decay: None,
            nesterov: false,
        }
    }
}

impl OptimConfig {
    /// The base learning rate.
    pub fn lr(&self) -> f64 {
        match self {
            OptimConfig::Sgd { lr, .. } | OptimConfig::Adamw { lr, .. } => *lr,
        }
    }

    /// Weight decay of the backbone and of the classifier.
    pub fn weight_decays(&self) -> (f64, f64) {
        match self {
            OptimConfig::Sgd {
                weight_decay,
                classifier_weight_decay,
                ..
            }
            | OptimConfig::Adamw {
                weight_decay,
                classifier_weight_decay,
                ..
            } => (
                *weight_decay,
                classifier_weight_decay.unwrap_or(*weight_decay),
            ),
        }
    }

    /// The optimiser's update rule.
    pub fn rule(&self) -> crate::optim::Rule {
        match self {
            OptimConfig::Sgd {
                momentum, nesterov, ..
            } => crate::optim::Rule::Sgd {
                momentum: *momentum,
                nesterov: *nesterov,
            },
            OptimConfig::Adamw {
                beta1, beta2, eps, ..
            } => crate::optim::Rule::AdamW {
                beta1: *beta1,
                beta2: *beta2,
                eps: *eps,
            },
        }
    }

    fn validate(&self) -> Result<()> {
        let lr = self.lr();
        if !(lr > 0.0 && lr.is_finite()) {
            bail!("config key `optim.lr`: must be a positive number, got {lr}");
        }
        let (wd, cwd) = self.weight_decays();
        if !(wd >= 0.0) {
            bail!("config key `optim.weight_decay`: must be >= 0, got {wd}");
        }
        if !(cwd >= 0.0) {
            bail!("config key `optim.classifier_weight_decay`: must be >= 0, got {cwd}");
        }
        match self {
            OptimConfig::Sgd {
                momentum, nesterov, ..
            } => {
                if !(0.0..1.0).contains(momentum) {
                    bail!("config key `optim.momentum`: must be in [0, 1), got {momentum}");
                }
                if *nesterov && *momentum == 0.0 {
                    bail!("config key `optim.nesterov`: Nesterov needs momentum > 0");
                }
            }
            OptimConfig::Adamw {
                beta1, beta2, eps, ..
            } => {
                for (k, v) in [("beta1", beta1), ("beta2", beta2)] {
                    if !(0.0..1.0).contains(v) {
                        bail!("config key `optim.{k}`: must be in [0, 1), got {v}");
                    }
                }
                if !(*eps > 0.0) {
                    bail!("config key `optim.eps`: must be > 0, got {eps}");
                }
            }
        }
        Ok(())
    }
}
fn default_lr() -> f64 {
    0.1
}
fn default_momentum() -> f64 {
    0.9
}
fn default_wd() -> f64 {
    5e-4
}
fn default_adamw_lr() -> f64 {
    1e-3
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}
fn default_adamw_wd() -> f64 {
    0.05
}

/// Periodic checkpoints (`<run dir>/checkpoints/step-NNNNNNNN/`), each holding everything
/// `--resume` needs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Write one every this many optimiser steps; 0 = at the end of every epoch. A final one is
    /// always written. Default 0.
    #[serde(default)]
    pub every_steps: usize,
    /// Keep the newest this many (older ones are deleted after a new one is complete). Default 3.
    #[serde(default = "default_keep")]
    pub keep: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            every_steps: 0,
            keep: default_keep(),
        }
    }
}
fn default_keep() -> usize {
    3
}

/// Fine-tuning: backbone weights to start from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InitConfig {
    /// A `.safetensors` backbone state dict (ours, or arcface_torch's `state_dict` exported to
    /// safetensors; a `module.` prefix from DataParallel is stripped), a run directory, or a
    /// checkpoint directory. Only backbone weights are loaded. Default: none (random init).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<PathBuf>,
    /// Fail when the file lacks a backbone key (missing keys are always listed). Unexpected keys
    /// are listed and ignored. Default true.
    #[serde(default = "yes")]
    pub strict: bool,
    /// Also load the classifier (`classifier.safetensors` beside the backbone file; names and
    /// shapes must match exactly), e.g. to start CoReFace from an ArcFace run. The optimiser and
    /// schedule still start fresh. Default false.
    #[serde(default)]
    pub classifier: bool,
}

/// The defaults of the field attributes (`strict` true): also what an absent `[init]` gives.
impl Default for InitConfig {
    fn default() -> Self {
        InitConfig {
            from: None,
            strict: true,
            classifier: false,
        }
    }
}

/// Learning-rate schedule, evaluated at every optimiser step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ScheduleConfig {
    /// arcface_torch's PolynomialLRWarmup: linear warm-up, then `base * (1 - t)^power`.
    Poly {
        /// Warm-up steps. Default 0.
        #[serde(default)]
        warmup_steps: usize,
        /// Power. Default 1.
        #[serde(default = "one")]
        power: f64,
    },
    /// Linear warm-up, then half a cosine down to `min_lr_ratio * base`.
    Cosine {
        /// Warm-up steps. Default 0.
        #[serde(default)]
        warmup_steps: usize,
        /// Final lr as a fraction of the base lr. Default 0.
        #[serde(default)]
        min_lr_ratio: f64,
    },
    /// Multiply by `gamma` at each epoch milestone (ElasticFace / CoReFace recipes).
    Multistep {
        /// Warm-up steps. Default 0.
        #[serde(default)]
        warmup_steps: usize,
        /// Epochs (0-based) at whose start the lr drops.
        milestones: Vec<usize>,
        /// Factor per milestone. Default 0.1.
        #[serde(default = "default_gamma")]
        gamma: f64,
    },
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig::Poly {
            warmup_steps: 0,
            power: 1.0,
        }
    }
}
fn one() -> f64 {
    1.0
}
fn default_gamma() -> f64 {
    0.1
}

/// The training loop.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Epochs over the training data.
    pub epochs: usize,
    /// Batch size.
    pub batch_size: usize,
    /// Clip the backbone's gradient L2 norm to this value (arcface_torch: 5). 0 disables. Default 5.
    #[serde(default = "default_clip")]
    pub grad_clip: f64,
    /// A log line every this many steps. Default 20.
    #[serde(default = "default_log_every")]
    pub log_every: usize,
    /// libtorch intra-op threads; 0 = automatic (all cores on CPU, 1 when the model runs on CUDA).
    /// Default 0.
    #[serde(default)]
    pub threads: usize,
    /// Stop after this many consecutive non-finite losses. Default 20.
    #[serde(default = "default_max_nan")]
    pub max_nonfinite_steps: usize,
    /// `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when available). Default `auto`.
    #[serde(default = "default_device")]
    pub device: String,
    /// Micro-batches whose gradients are summed before one optimiser step (the loss of each is
    /// divided by this). The schedule counts optimiser steps. Default 1.
    #[serde(default = "default_accumulation")]
    pub grad_accumulation: usize,
    /// Mixed precision: `"off"` (default), `"fp16"` (CUDA autocast for backbone trunk and classifier
    /// matmul, dynamic loss scaling) or `"bf16"` (the same autocast in bf16, no loss scaling).
    #[serde(default)]
    pub precision: crate::amp::Precision,
    /// The fp16 loss scaler.
    #[serde(default)]
    pub scaler: crate::amp::ScalerConfig,
}
fn default_accumulation() -> usize {
    1
}
fn default_clip() -> f64 {
    5.0
}
fn default_log_every() -> usize {
    20
}
fn yes() -> bool {
    true
}
fn default_max_nan() -> usize {
    20
}
fn default_device() -> String {
    "auto".into()
}

/// Verification during and after training.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Evaluate every this many steps as well as at the end; 0 = only at the end. Default 0.
    #[serde(default)]
    pub every_steps: usize,
    /// Seed for the pair sets. Default 7.
    #[serde(default = "default_pair_seed")]
    pub pair_seed: u64,
    /// Evaluation batch size. Default 128.
    #[serde(default = "default_eval_batch")]
    pub batch_size: usize,
    /// Targets, each verified on a balanced pair set (all same-identity pairs, as many seeded
    /// different-identity pairs).
    #[serde(default)]
    pub targets: Vec<EvalTarget>,
}
impl Default for EvalConfig {
    /// The serde defaults (an absent `[eval]` table): batch size 128, not a derived 0.
    fn default() -> Self {
        EvalConfig {
            every_steps: 0,
            pair_seed: default_pair_seed(),
            batch_size: default_eval_batch(),
            targets: Vec::new(),
        }
    }
}

fn default_pair_seed() -> u64 {
    7
}
fn default_eval_batch() -> usize {
    128
}

/// One verification target.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalTarget {
    /// Name used in logs and the summary.
    pub name: String,
    /// The images, e.g. `source = { type = "orl", classes = ["s31", "s32"] }`.
    pub source: SourceConfig,
    /// Fail when the data is missing (otherwise the target is skipped with a note). Default false.
    #[serde(default)]
    pub required: bool,
}

/// Names the config key of a library's validation error. Library errors start with the field of
/// their own table (`m must be in [0, π), got 3.5`); under `table` that reads
/// ``config key `head.m`: must be in [0, π), got 3.5``. Other messages get the table as context.
pub(crate) fn at_key(table: &str, result: Result<()>) -> Result<()> {
    result.map_err(|e| {
        let msg = format!("{e:#}");
        let is_field = |f: &str| {
            !f.is_empty()
                && f.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
        };
        match msg.split_once(' ') {
            Some((field, rest)) if is_field(field) && rest.starts_with("must ") => {
                anyhow::anyhow!("config key `{table}.{field}`: {rest}")
            }
            _ => anyhow::anyhow!("config key `{table}`: {msg}"),
        }
    })
}

/// `[head] type = "sphereface"`: the trainer always hands the head the feature norms, so `s` acts
/// only with `scale = "fixed"`; a non-default `s` with `scale = "feature_norm"` would do nothing.
fn check_sphereface_scale(head: &HeadConfig) -> Result<()> {
    use facerec_loss_heads::{SphereFaceConfig, SphereFaceScale};
    if let HeadConfig::Sphereface(c) = head {
        if c.scale == SphereFaceScale::FeatureNorm && c.s != SphereFaceConfig::default().s {
            bail!(
                "config key `head.s`: {} has no effect with head.scale = \"feature_norm\" (each row is scaled by its feature norm, the paper's A-Softmax); set head.scale = \"fixed\" to train with s = {}",
                c.s,
                c.s
            );
        }
    }
    Ok(())
}

impl Config {
    /// Parse and validate a TOML document (after `extends` and overrides were applied).
    pub fn from_value(value: toml::Value) -> Result<Self> {
        if let Some(train) = value.get("train").and_then(toml::Value::as_table) {
            for key in [
                "flip",
                "max_shift",
                "images_per_identity",
                "workers",
                "prefetch",
            ] {
                if train.contains_key(key) {
                    bail!("config key `train.{key}`: the loader's options moved to their own table; write `[loader] {key} = ...` (or `--set loader.{key}=...`)");
                }
            }
        }
        let mut cfg: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            anyhow::anyhow!("config key `{path}`: {}", e.into_inner())
        })?;
        cfg.resolve_coreface_init()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// `coreface.init_from = P` is read as `[init] from = P, classifier = true` (backbone and
    /// classifier of an ArcFace run, as the published CoReFace run started from one); both keys
    /// stay in the resolved config. Setting `init.from` to another path is an error.
    fn resolve_coreface_init(&mut self) -> Result<()> {
        let Some(from) = self.coreface.as_ref().and_then(|c| c.init_from.as_ref()) else {
            return Ok(());
        };
        let from = PathBuf::from(from);
        match &self.init.from {
            Some(other) if *other != from => bail!(
                "config key `coreface.init_from`: {} and init.from = {} are both set; keep one (coreface.init_from is init.from with init.classifier = true)",
                from.display(),
                other.display()
            ),
            _ => {
                self.init.from = Some(from);
                self.init.classifier = true;
            }
        }
        Ok(())
    }

    /// Load the embedded default, or `path`, then apply `--set key=value` overrides.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let mut value = match path {
            Some(p) => load_with_extends(p, 0)?,
            None => parse_toml(DEFAULT_CONFIG, Path::new("<embedded default>"))?,
        };
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        Self::from_value(value)
    }

    /// Check the values serde cannot check. Errors name the key.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        at_key("head", self.head.validate())?;
        check_sphereface_scale(&self.head)?;
        at_key("partial_fc", self.partial_fc.sampler().validate())?;
        self.validate_train()?;
        self.optim.validate()?;
        self.validate_methods()?;
        check_source(&self.data, "data")?;
        if self.data.is_pair_list() {
            bail!("config key `data.type`: a pair list (bin, lfw_pairs) has no identity labels to train on; use it in [[eval.targets]]");
        }
        for (i, t) in self.eval.targets.iter().enumerate() {
            check_source(&t.source, &format!("eval.targets[{i}].source"))?;
        }
        Ok(())
    }

    /// `[train]`, `[loader]`, `[checkpoint]`, `[eval]` sizes and `classifier.num_classes`.
    fn validate_train(&self) -> Result<()> {
        let t = &self.train;
        if t.epochs == 0 {
            bail!("config key `train.epochs`: must be at least 1");
        }
        if t.batch_size == 0 {
            bail!("config key `train.batch_size`: must be at least 1");
        }
        if self.loader.images_per_identity > 0
            && !t.batch_size.is_multiple_of(self.loader.images_per_identity)
        {
            bail!(
                "config key `loader.images_per_identity`: train.batch_size {} is not a multiple of {}",
                t.batch_size,
                self.loader.images_per_identity
            );
        }
        if t.grad_clip < 0.0 || !t.grad_clip.is_finite() {
            bail!("config key `train.grad_clip`: must be a finite number >= 0");
        }
        crate::device::parse_device(&t.device).context("config key `train.device`")?;
        if t.grad_accumulation == 0 {
            bail!("config key `train.grad_accumulation`: must be at least 1");
        }
        if t.max_nonfinite_steps == 0 {
            bail!("config key `train.max_nonfinite_steps`: must be at least 1 (the number of consecutive non-finite steps after which the run stops)");
        }
        let sc = &t.scaler;
        if !(sc.init_scale >= sc.min_scale
            && sc.min_scale > 0.0
            && sc.growth_factor > 1.0
            && sc.backoff_factor > 0.0
            && sc.backoff_factor < 1.0
            && sc.growth_interval > 0)
        {
            bail!("config key `train.scaler`: need init_scale >= min_scale > 0, growth_factor > 1, 0 < backoff_factor < 1, growth_interval >= 1");
        }
        if self.checkpoint.keep == 0 {
            bail!("config key `checkpoint.keep`: must be at least 1 (the newest checkpoint is what --resume needs)");
        }
        if self.eval.batch_size == 0 {
            bail!("config key `eval.batch_size`: must be at least 1");
        }
        if self.loader.prefetch == 0 {
            bail!("config key `loader.prefetch`: must be at least 1 (batches decoded ahead)");
        }
        self.augment.validate().context("config key `augment`")?;
        if let Some(0) = self.classifier.num_classes {
            bail!("config key `classifier.num_classes`: must be at least 1");
        }
        Ok(())
    }

    /// The methods' own tables and how they combine with `[head]` and `[model]`.
    fn validate_methods(&self) -> Result<()> {
        if let Some(cg) = &self.cluster_guided {
            cg.validate()?;
            if self.coreface.is_some() {
                bail!("config key `cluster_guided`: cannot be combined with [coreface] (choose one method)");
            }
            cg.check_head(&self.head)?;
        }
        if let Some(cf) = &self.coreface {
            cf.validate()?;
            if matches!(&self.model, BackboneConfig::Iresnet(c) if c.dropout != 0.0) {
                bail!("config key `model.dropout`: must be 0 with [coreface], which applies `coreface.warmup_dropout` and `coreface.dropout` to the trunk features itself");
            }
            if let Some(from) = &cf.init_from {
                if self.init.from.as_deref() != Some(Path::new(from)) || !self.init.classifier {
                    bail!("config key `coreface.init_from`: means init.from = {from:?} with init.classifier = true, but [init] says otherwise (Config::load resolves it; set both or neither)");
                }
            }
        }
        if let HeadConfig::Gce(g) = &self.head {
            // GCE's prototype replacement needs a class present min_count times in a batch.
            let pw = &g.pairwise;
            if pw.rate > 0.0 && pw.min_count >= 2 && self.loader.images_per_identity < pw.min_count
            {
                let batches = match self.loader.images_per_identity {
                    0 => "uniform batches (loader.images_per_identity = 0) almost never hold"
                        .to_string(),
                    k => format!("batches of {k} images per identity never hold"),
                };
                bail!(
                    "config key `loader.images_per_identity`: head.pairwise.rate = {} replaces the prototype of a class only when a batch holds head.pairwise.min_count = {} distinct images of it, which {batches}; set loader.images_per_identity >= {} (P x K batches) or head.pairwise.rate = 0",
                    pw.rate,
                    pw.min_count,
                    pw.min_count
                );
            }
        }
        Ok(())
    }

    /// The resolved configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a Config always serialises")
    }
}

fn check_source(source: &SourceConfig, key: &str) -> Result<()> {
    if let SourceConfig::Rec {
        max_skipped_fraction: f,
        ..
    } = source
    {
        if !(0.0..=1.0).contains(f) {
            bail!("config key `{key}.max_skipped_fraction`: must be in [0, 1], got {f}");
        }
    }
    if let SourceConfig::Synthetic {
        identities,
        images_per_identity,
        ..
    } = source
    {
        if *identities < 2 {
            bail!("config key `{key}.identities`: need at least 2 identities");
        }
        if *images_per_identity < 2 {
            bail!("config key `{key}.images_per_identity`: need at least 2 images per identity");
        }
    }
    Ok(())
}

fn parse_toml(text: &str, origin: &Path) -> Result<toml::Value> {
    let table: toml::Table =
        toml::from_str(text).with_context(|| format!("parsing TOML in {}", origin.display()))?;
    Ok(toml::Value::Table(table))
}

/// Read a config file, following `extends = "base.toml"` (relative to the file) up to 8 levels.
fn load_with_extends(path: &Path, depth: usize) -> Result<toml::Value> {
    if depth > 8 {
        bail!(
            "{}: `extends` nests more than 8 levels (a cycle?)",
            path.display()
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    let mut value = parse_toml(&text, path)?;
    let extends = value.as_table_mut().and_then(|t| t.remove("extends"));
    match extends {
        None => Ok(value),
        Some(toml::Value::String(base)) => {
            let mut merged = if base == "default" {
                parse_toml(DEFAULT_CONFIG, Path::new("<embedded default>"))?
            } else {
                let base_path = path.parent().unwrap_or(Path::new(".")).join(base);
                load_with_extends(&base_path, depth + 1)
                    .with_context(|| format!("in `extends` of {}", path.display()))?
            };
            merge(&mut merged, value);
            Ok(merged)
        }
        Some(other) => bail!(
            "{}: `extends` must be a string, got {other}",
            path.display()
        ),
    }
}

/// Deep-merge `top` into `base`: tables merge key by key, anything else replaces.
/// A table that changes its `type` replaces the base table whole (its other keys belong to
/// another variant).
fn merge(base: &mut toml::Value, top: toml::Value) {
    match (base, top) {
        (toml::Value::Table(b), toml::Value::Table(t)) => {
            let retyped = matches!((b.get("type"), t.get("type")), (Some(x), Some(y)) if x != y);
            if retyped {
                *b = t;
                return;
            }
            for (k, v) in t {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, t) => *b = t,
    }
}

/// Apply one `a.b.c=value` override. The value is read as a TOML value (`0.1`, `true`, `[1, 2]`,
/// `"text"`); anything that does not parse as one is taken as a string.
pub fn apply_override(root: &mut toml::Value, spec: &str) -> Result<()> {
    let (key, raw) = spec
        .split_once('=')
        .with_context(|| format!("--set `{spec}`: expected key=value"))?;
    let key = key.trim();
    if key.is_empty() {
        bail!("--set `{spec}`: empty key");
    }
    let value = parse_scalar(raw.trim());
    let parts: Vec<&str> = key.split('.').collect();
    let mut node = root;
    for part in &parts[..parts.len() - 1] {
        let table = node
            .as_table_mut()
            .with_context(|| format!("--set `{spec}`: `{part}` is not inside a table"))?;
        node = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
    }
    let table = node.as_table_mut().with_context(|| {
        format!(
            "--set `{spec}`: parent of `{}` is not a table",
            parts[parts.len() - 1]
        )
    })?;
    let last = parts[parts.len() - 1].to_string();
    // Changing a tagged table's `type` drops the old variant's keys.
    if last == "type" && table.get("type") != Some(&value) {
        table.clear();
    }
    table.insert(last, value);
    Ok(())
}

fn parse_scalar(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

/// Keys that may change on `--resume` without `--allow-changes`: they never change what a step
/// computes (cadences, evaluation, where output goes, loader threads, the NaN guard's patience), or,
/// for `train.epochs`, only the run's length (the learning-rate schedule is laid over the new total
/// from the resumed step on), for `train.grad_accumulation` only as far as the resume check lets it
/// (processes x accumulation must stay the same: the same steps on another number of processes).
/// A key matches an entry or lies under it.
pub const HARMLESS_ON_RESUME: [&str; 10] = [
    "train.epochs",
    "train.grad_accumulation",
    "train.log_every",
    "train.max_nonfinite_steps",
    "eval",
    "checkpoint",
    "loader.workers",
    "loader.prefetch",
    "output_dir",
    "run_name",
];

/// One setting that differs between the config a checkpoint was written under and the config of
/// the run resuming from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeChange {
    /// Dotted key (`optim.lr`, `eval.targets`).
    pub key: String,
    /// The value before, as TOML (`(absent)` when the key was not there).
    pub before: String,
    /// The value now.
    pub after: String,
    /// Whether the change breaks an exact resume (not in [`HARMLESS_ON_RESUME`]).
    pub breaking: bool,
}

impl ResumeChange {
    /// `key: before -> after`.
    pub fn describe(&self) -> String {
        format!("{}: {} -> {}", self.key, self.before, self.after)
    }
}

/// The settings that differ between `before` (a checkpoint's resolved config, TOML) and `now`,
/// ordered by key. Tables are compared key by key; arrays (of tables too) as one value.
pub fn resume_changes(before: &str, now: &Config) -> Result<Vec<ResumeChange>> {
    let before: toml::Value =
        toml::from_str(before).context("the checkpoint's resolved config (meta.json `config`)")?;
    let now: toml::Value = toml::from_str(&now.to_toml()).expect("a Config round-trips TOML");
    let (mut a, mut b) = (Default::default(), Default::default());
    flatten("", &before, &mut a);
    flatten("", &now, &mut b);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let absent = "(absent)".to_string();
    Ok(keys
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| ResumeChange {
            key: k.clone(),
            before: a.get(k).unwrap_or(&absent).clone(),
            after: b.get(k).unwrap_or(&absent).clone(),
            breaking: !HARMLESS_ON_RESUME
                .iter()
                .any(|h| k == h || k.starts_with(&format!("{h}."))),
        })
        .collect())
}

fn flatten(prefix: &str, v: &toml::Value, out: &mut std::collections::BTreeMap<String, String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_parses_and_validates() {
        let cfg = Config::load(None, &[]).unwrap();
        assert!(cfg.train.epochs > 0);
        // Round trip: the resolved TOML written to the run directory reads back to the same config.
        let again = Config::from_value(toml::Value::Table(toml::from_str(&cfg.to_toml()).unwrap()))
            .unwrap();
        assert_eq!(cfg, again);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::load(None, &["optim.lrr=0.2".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("optim") && err.contains("lrr"), "{err}");
        let err = Config::load(None, &["train.epochs=0".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("train.epochs"), "{err}");
    }

    #[test]
    fn init_is_strict_unless_asked() {
        // No `[init]` at all (the embedded default has none), an `[init]` without `strict`, and
        // the struct's own default all mean strict, as docs/configuration.md says.
        assert!(Config::load(None, &[]).unwrap().init.strict);
        assert!(
            Config::load(None, &["init.classifier=false".into()])
                .unwrap()
                .init
                .strict
        );
        assert!(InitConfig::default().strict);
        assert!(
            !Config::load(None, &["init.strict=false".into()])
                .unwrap()
                .init
                .strict
        );
    }

    #[test]
    fn zero_nonfinite_budget_is_refused() {
        let err = Config::load(None, &["train.max_nonfinite_steps=0".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("train.max_nonfinite_steps"), "{err}");
        assert!(Config::load(None, &["train.max_nonfinite_steps=1".into()]).is_ok());
    }

    #[test]
    fn augment_table_reaches_the_loader_and_bad_values_name_the_key() {
        let cfg = Config::load(
            None,
            &[
                "augment.blur_p=0.3".into(),
                "augment.crop_scale=[0.5, 1.0]".into(),
            ],
        )
        .unwrap();
        assert_eq!(cfg.augment.blur_p, 0.3);
        assert_eq!(cfg.augment.crop_scale, [0.5, 1.0]);
        // Off unless a config asks for it; the embedded default asks (its run transfers to real
        // faces with it, docs/results.md), the real-face recipes extending it switch it off again.
        assert!(!facerec_data::AugmentConfig::default().is_active());
        assert!(Config::load(None, &[]).unwrap().augment.is_active());
        let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        for recipe in ["orl.toml", "lfw-view1.toml"] {
            let cfg = Config::load(Some(&configs.join(recipe)), &[]).unwrap();
            assert!(
                !cfg.augment.is_active(),
                "{recipe} inherits the default's augmentation"
            );
        }
        let err = format!(
            "{:#}",
            Config::load(None, &["augment.erase_p=1.5".into()]).unwrap_err()
        );
        assert!(
            err.contains("config key `augment`: erase_p must be a probability"),
            "{err}"
        );
        let err = format!(
            "{:#}",
            Config::load(None, &["augment.blurr_p=0.1".into()]).unwrap_err()
        );
        assert!(err.contains("blurr_p"), "{err}");
    }

    #[test]
    fn overrides_parse_types() {
        let cfg = Config::load(
            None,
            &[
                "optim.lr=0.05".into(),
                "loader.flip=false".into(),
                "run_name=abc".into(),
            ],
        )
        .unwrap();
        assert_eq!(cfg.optim.lr(), 0.05);
        assert!(!cfg.loader.flip);
        assert_eq!(cfg.run_name, "abc");
    }

    #[test]
    fn changing_type_drops_old_variant_keys() {
        let cfg = Config::load(
            None,
            &["data.type=image_folder".into(), "data.root=/x".into()],
        )
        .unwrap();
        assert_eq!(
            cfg.data,
            SourceConfig::ImageFolder {
                root: "/x".into(),
                classes: None
            }
        );
    }

    #[test]
    fn extends_merges_over_base() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("base.toml"), DEFAULT_CONFIG).unwrap();
        std::fs::write(
            dir.path().join("child.toml"),
            "extends = \"base.toml\"\n[train]\nepochs = 1\n",
        )
        .unwrap();
        let cfg = Config::load(Some(&dir.path().join("child.toml")), &[]).unwrap();
        let base = Config::load(None, &[]).unwrap();
        assert_eq!(cfg.train.epochs, 1);
        assert_eq!(cfg.train.batch_size, base.train.batch_size);
        assert_eq!(cfg.model, base.model);
    }

    /// Sizes are validated at the boundary (`eval.batch_size = 0` used to panic in the evaluation
    /// crate's embedding loop).
    #[test]
    fn zero_sizes_and_bad_fractions_are_named() {
        for (set, key) in [
            ("eval.batch_size=0", "eval.batch_size"),
            ("loader.prefetch=0", "loader.prefetch"),
            ("train.batch_size=0", "train.batch_size"),
        ] {
            let err = Config::load(None, &[set.into()]).unwrap_err().to_string();
            assert!(err.contains(key), "{set}: {err}");
        }
        let rec = [
            "data.type=rec".to_string(),
            "data.path=/x".into(),
            "data.max_skipped_fraction=1.5".into(),
        ];
        let err = Config::load(None, &rec).unwrap_err().to_string();
        assert!(err.contains("data.max_skipped_fraction"), "{err}");
        let cfg = Config::load(None, &rec[..2]).unwrap();
        assert!(
            matches!(cfg.data, SourceConfig::Rec { max_skipped_fraction, .. } if max_skipped_fraction == 0.01)
        );
        // A config without an [eval] table gets the documented defaults (the derived Default gave
        // batch_size 0).
        let mut value = toml::Value::Table(toml::from_str(DEFAULT_CONFIG).unwrap());
        value.as_table_mut().unwrap().remove("eval");
        let cfg = Config::from_value(value).unwrap();
        assert_eq!((cfg.eval.batch_size, cfg.eval.pair_seed), (128, 7));
        // The fit rule: stretch by default, center_crop on request, anything else named.
        assert_eq!(
            Config::load(None, &[]).unwrap().input.fit,
            facerec_data::Fit::Stretch
        );
        let cfg = Config::load(None, &["input.fit=center_crop".into()]).unwrap();
        assert_eq!(cfg.input.fit, facerec_data::Fit::CenterCrop);
        let err = Config::load(None, &["input.fit=crop".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("input.fit"), "{err}");
    }

    #[test]
    fn missing_file_is_named() {
        let err = format!(
            "{:#}",
            Config::load(Some(Path::new("/no/such.toml")), &[]).unwrap_err()
        );
        assert!(err.contains("/no/such.toml"), "{err}");
    }

    /// GCE's prototype replacement is refused where batches cannot hold a class twice.
    #[test]
    fn gce_pairwise_needs_identity_balanced_batches() {
        let load = |sets: &[&str]| {
            Config::load(
                None,
                &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
        };
        let err = format!("{:#}", load(&["head.type=gce"]).unwrap_err());
        assert!(
            err.contains("loader.images_per_identity")
                && err.contains("head.pairwise.rate")
                && err.contains("uniform"),
            "{err}"
        );
        let err = format!(
            "{:#}",
            load(&["head.type=gce", "loader.images_per_identity=1"]).unwrap_err()
        );
        assert!(
            err.contains("loader.images_per_identity") && err.contains("never"),
            "{err}"
        );
        let err = format!(
            "{:#}",
            load(&[
                "head.type=gce",
                "loader.images_per_identity=2",
                "head.pairwise.min_count=4"
            ])
            .unwrap_err()
        );
        assert!(err.contains("head.pairwise.min_count = 4"), "{err}");
        load(&["head.type=gce", "loader.images_per_identity=2"]).unwrap();
        load(&["head.type=gce", "head.pairwise.rate=0.0"]).unwrap();
        load(&["head.type=gce", "head.pairwise.min_count=1"]).unwrap();
    }

    /// `coreface.init_from` is `init.from` with `init.classifier = true`.
    #[test]
    fn coreface_init_from_is_init_from_with_the_classifier() {
        let load = |sets: &[&str]| {
            Config::load(
                None,
                &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
        };
        let cfg = load(&["model.dropout=0.0", "coreface.init_from=runs/arcface"]).unwrap();
        assert_eq!(cfg.init.from.as_deref(), Some(Path::new("runs/arcface")));
        assert!(cfg.init.classifier);
        let again = Config::from_value(toml::Value::Table(toml::from_str(&cfg.to_toml()).unwrap()))
            .unwrap();
        assert_eq!(cfg, again);
        load(&[
            "model.dropout=0.0",
            "coreface.init_from=runs/arcface",
            "init.from=runs/arcface",
        ])
        .unwrap();
        let err = format!(
            "{:#}",
            load(&[
                "model.dropout=0.0",
                "coreface.init_from=runs/a",
                "init.from=runs/b"
            ])
            .unwrap_err()
        );
        assert!(
            err.contains("coreface.init_from") && err.contains("init.from"),
            "{err}"
        );
        // Built by hand without the resolution: refused, not ignored.
        let mut cfg = load(&["model.dropout=0.0", "coreface.start_epoch=0"]).unwrap();
        cfg.coreface.as_mut().unwrap().init_from = Some("runs/a".into());
        let err = format!("{:#}", cfg.validate().unwrap_err());
        assert!(err.contains("coreface.init_from"), "{err}");
    }

    /// Every shipped config (CPU configs and published recipes) parses and validates.
    #[test]
    fn shipped_configs_validate() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut n = 0;
        for dir in [
            root.clone(),
            root.join("recipes"),
            root.join("orl-methods"),
            root.join("lfw-methods"),
        ] {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "toml") {
                    let cfg = Config::load(Some(&path), &[])
                        .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                    assert!(cfg.train.epochs > 0);
                    n += 1;
                }
            }
        }
        assert!(n >= 30, "only {n} configs found");
        let r100 = Config::load(
            Some(&root.join("recipes/ms1mv2_r100_elasticface_arc_plus.toml")),
            &[],
        )
        .unwrap();
        assert_eq!(r100.classifier.num_classes, Some(85742));
        assert_eq!(r100.train.batch_size * r100.train.grad_accumulation, 512);
        assert_eq!(
            r100.schedule,
            ScheduleConfig::Multistep {
                warmup_steps: 0,
                milestones: vec![7, 13, 19, 24],
                gamma: 0.1
            }
        );
    }
}
