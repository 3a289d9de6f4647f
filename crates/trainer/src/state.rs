//! The state of a run that a checkpoint holds (weights, optimiser, scaler, counters), how it is
//! built, restored from a checkpoint or initialised from another model, and the facts a checkpoint
//! must agree with before a run may continue from it.

use crate::amp::{GradScaler, Precision};
use crate::checkpoint::{self, DataOrder, Meta};
use crate::config::{Config, OptimConfig};
use crate::model::Model;
use crate::objective::Objective;
use crate::optim::{Optimizer, ParamGroup};
use anyhow::{bail, Context, Result};
use facerec_backbone::Backbone;
use facerec_loss_heads::{ClassShard, Classifier};
use std::path::{Path, PathBuf};
use tch::{nn, Device, Tensor};

/// Index of the classifier's parameter group in the optimiser (the backbone's is 0).
pub const CLASSIFIER_GROUP: usize = 1;

/// The model, optimiser and counters of a run: what a checkpoint holds.
pub struct State {
    /// Backbone variables.
    pub backbone_vs: nn::VarStore,
    /// Classifier variables.
    pub head_vs: nn::VarStore,
    /// The backbone.
    pub backbone: Backbone,
    /// The classifier.
    pub classifier: Classifier,
    /// The optimiser (group 0 backbone, group [`CLASSIFIER_GROUP`] classifier).
    pub opt: Optimizer,
    /// The fp16 loss scaler.
    pub scaler: GradScaler,
    /// The backbone's trainable parameters (what gradient clipping sees).
    pub backbone_params: Vec<Tensor>,
    /// Optimiser steps taken.
    pub step: usize,
    /// Current epoch.
    pub epoch: usize,
    /// Micro-batches of the current epoch consumed.
    pub batch_in_epoch: usize,
    /// Steps skipped by the NaN guard.
    pub skipped: usize,
    /// Skipped steps in a row.
    pub consecutive_bad: usize,
    /// Best accuracy per evaluation target.
    pub best: Vec<f64>,
    /// Model parallel: the block of class rows this rank's classifier holds (`None`: the whole
    /// classifier).
    pub shard: Option<ClassShard>,
}

impl State {
    /// A fresh state for `cfg` on `device` with `num_classes` classifier rows.
    pub fn new(cfg: &Config, num_classes: usize, device: Device) -> Self {
        let backbone_vs = nn::VarStore::new(device);
        let backbone = facerec_backbone::build(&backbone_vs.root(), &cfg.model);
        let head_vs = nn::VarStore::new(device);
        let classifier = Classifier::new(
            &head_vs.root(),
            cfg.head.classifier_kind(),
            num_classes as i64,
            cfg.model.embedding_size(),
        );
        let (wd_backbone, wd_classifier) = cfg.optim.weight_decays();
        let backbone_params = backbone_vs.trainable_variables();
        let opt = Optimizer::new(
            vec![
                ParamGroup::new(
                    backbone_params.iter().map(|t| t.shallow_clone()).collect(),
                    wd_backbone,
                ),
                ParamGroup::new(head_vs.trainable_variables(), wd_classifier),
            ],
            cfg.optim.rule(),
        );
        let scaler = GradScaler::new(cfg.train.scaler, cfg.train.precision == Precision::Fp16);
        State {
            backbone_vs,
            head_vs,
            backbone,
            classifier,
            opt,
            scaler,
            backbone_params,
            step: 0,
            epoch: 0,
            batch_in_epoch: 0,
            skipped: 0,
            consecutive_bad: 0,
            best: Vec::new(),
            shard: None,
        }
    }

    /// A fresh state whose classifier is `shard`'s block of `num_classes` rows (model parallel,
    /// initialised world-size independently: `model_parallel::init_block`), or the whole
    /// classifier when `shard` is `None`.
    pub fn new_sharded(
        cfg: &Config,
        num_classes: usize,
        shard: Option<ClassShard>,
        device: Device,
    ) -> Self {
        let Some(shard) = shard else {
            return Self::new(cfg, num_classes, device);
        };
        let mut st = Self::new(cfg, shard.len as usize, device);
        crate::model_parallel::init_block(
            &st.head_vs,
            cfg.head.classifier_kind(),
            shard,
            cfg.model.embedding_size(),
            cfg.seed,
        );
        st.shard = Some(shard);
        st
    }

    /// This rank's rows of a whole classifier file (`None`: all of them).
    fn rows(&self) -> Option<(i64, i64, i64)> {
        self.row_block().map(crate::model_parallel::rows)
    }

    /// Model parallel: the block of weight rows this rank holds (its class block times the
    /// classifier's rows per class, `model_parallel::row_block`); `None` when replicated.
    pub fn row_block(&self) -> Option<ClassShard> {
        let k = self.classifier.rows_per_class();
        self.shard.map(|s| crate::model_parallel::row_block(s, k))
    }

    /// Continue from the checkpoint in `dir` (whose `meta` has been checked): weights, optimiser,
    /// scaler, counters and the objective's state.
    pub fn restore(
        &mut self,
        dir: &Path,
        meta: &Meta,
        objective: &mut dyn Objective,
    ) -> Result<()> {
        objective
            .load_state(checkpoint::read_objective(dir)?)
            .with_context(|| format!("{}", dir.join("objective.safetensors").display()))?;
        checkpoint::load_exact(
            &self.backbone_vs,
            &dir.join("model.safetensors"),
            "checkpoint's backbone",
        )?;
        checkpoint::load_exact_rows(
            &self.head_vs,
            &dir.join("classifier.safetensors"),
            "checkpoint's classifier",
            self.rows(),
        )?;
        let opt_file = dir.join("optimizer.safetensors");
        let mut opt_state = checkpoint::read_optimizer(dir)?;
        if let Some(shard) = self.row_block() {
            opt_state = crate::model_parallel::narrow_optimizer_state(
                opt_state,
                CLASSIFIER_GROUP,
                shard,
                &opt_file,
            )?;
        }
        self.opt
            .load_state(opt_state)
            .with_context(|| format!("{}", opt_file.display()))?;
        self.scaler.load_state(meta.scaler);
        (self.step, self.epoch, self.batch_in_epoch) = (meta.step, meta.epoch, meta.batch_in_epoch);
        // A resumed run starts a new count of consecutive non-finite steps: the user resumes after
        // changing something (a lower optim.lr), and the count of the old settings would stop the
        // new ones after a single bad step. The total of skipped steps carries on.
        (self.skipped, self.consecutive_bad, self.best) =
            (meta.skipped_steps, 0, meta.best.clone());
        Ok(())
    }

    /// Fine-tuning: the backbone (and with `init.classifier` the classifier) from `init.from`.
    /// Returns the line to log, `None` without `init.from`.
    pub fn initialise(&mut self, cfg: &Config) -> Result<Option<String>> {
        let Some(from) = &cfg.init.from else {
            return Ok(None);
        };
        let report = checkpoint::init_backbone(&self.backbone_vs, from, cfg.init.strict)?;
        let mut line = format!(
            "backbone initialised from {}: {}",
            from.display(),
            report.describe()
        );
        if cfg.init.classifier {
            checkpoint::init_classifier_rows(&self.head_vs, from, self.rows())?;
            line.push_str("\nclassifier initialised from the same folder (init.classifier)");
        }
        Ok(Some(line))
    }

    /// Copies of the backbone's and the classifier's non-trainable variables (BatchNorm running
    /// statistics and batch counters), taken before a step's forward pass: a skipped step puts
    /// them back with [`State::restore_buffers`], so the state after it is the last good one.
    pub fn snapshot_buffers(&self) -> Vec<(Tensor, Tensor)> {
        let _guard = tch::no_grad_guard();
        [&self.backbone_vs, &self.head_vs]
            .into_iter()
            .flat_map(|vs| vs.variables().into_values())
            .filter(|t| !t.requires_grad())
            .map(|t| {
                let copy = t.copy();
                (t, copy)
            })
            .collect()
    }

    /// Put back the values of [`State::snapshot_buffers`] (in place, so every module keeps
    /// seeing the same tensors).
    pub fn restore_buffers(snapshot: &mut [(Tensor, Tensor)]) {
        let _guard = tch::no_grad_guard();
        for (var, saved) in snapshot.iter_mut() {
            var.copy_(saved);
        }
    }

    /// The modules in `precision`, for the objective and the evaluation.
    pub fn model(&self, precision: Precision, num_classes: usize) -> Model<'_> {
        Model::new(
            &self.backbone,
            &self.classifier,
            num_classes as i64,
            precision,
        )
    }
}

/// Everything fixed for the run that a checkpoint must agree with.
pub struct RunFacts<'a> {
    /// The resolved config.
    pub cfg: &'a Config,
    /// Classifier rows.
    pub num_classes: usize,
    /// Training images.
    pub images: usize,
    /// Micro-batches per epoch.
    pub batches_per_epoch: usize,
    /// Processes of the data-parallel run.
    pub world_size: usize,
}

impl RunFacts<'_> {
    /// The checkpoint metadata of `s`, whose current epoch order has `order_fingerprint`.
    pub fn meta(&self, s: &State, order_fingerprint: u64) -> Meta {
        Meta {
            format: checkpoint::FORMAT,
            step: s.step,
            epoch: s.epoch,
            batch_in_epoch: s.batch_in_epoch,
            seed: self.cfg.seed,
            num_classes: self.num_classes,
            data: DataOrder {
                images: self.images,
                batches_per_epoch: self.batches_per_epoch,
                order_fingerprint,
            },
            model: model_toml(self.cfg),
            optimizer: optimizer_name(self.cfg).into(),
            scaler: s.scaler.state(),
            skipped_steps: s.skipped,
            consecutive_bad: s.consecutive_bad,
            best: s.best.clone(),
            config: self.cfg.to_toml(),
            world_size: self.world_size,
            checksums: Default::default(),
            segments: Vec::new(),
        }
    }

    /// Refuse a checkpoint written for another model, class count, optimiser or data.
    pub fn check(
        &self,
        meta: &Meta,
        dir: &Path,
        fingerprint_of: impl Fn(usize) -> u64,
    ) -> Result<()> {
        let at = dir.display();
        if meta.num_classes != self.num_classes {
            bail!(
                "config key `classifier.num_classes`: the checkpoint {at} was trained with {} classes, this config gives {}; a resumed run cannot change the classifier (start a new run with `init.from` to fine-tune)",
                meta.num_classes,
                self.num_classes
            );
        }
        if meta.model != model_toml(self.cfg) {
            bail!("config key `model`: the checkpoint {at} was written for another backbone:\n{}\nthis config has:\n{}", meta.model, model_toml(self.cfg));
        }
        if meta.optimizer != optimizer_name(self.cfg) {
            bail!("config key `optim.type`: the checkpoint {at} holds {} state, this config asks for {}", meta.optimizer, optimizer_name(self.cfg));
        }
        if meta.seed != self.cfg.seed {
            bail!("config key `seed`: the checkpoint {at} used seed {}, this config {}; the data order would not continue", meta.seed, self.cfg.seed);
        }
        let then = meta.world_size * accumulation_of(&meta.config);
        let now = self.world_size * self.cfg.train.grad_accumulation;
        if then != now {
            bail!(
                "config key `train.grad_accumulation`: the checkpoint {at} was written by {} processes x accumulation {} ({then} micro-batches of {} images per step); with {} processes this run needs train.grad_accumulation = {} to continue the same steps (--set train.grad_accumulation=N), and {then} must be divisible by the number of processes",
                meta.world_size,
                accumulation_of(&meta.config),
                self.cfg.train.batch_size,
                self.world_size,
                then as f64 / self.world_size as f64
            );
        }
        // The position must be one this run can reach: the step matches the epoch and batch, and
        // lies within the run (an edited or foreign meta.json is refused).
        let file = dir.join("meta.json");
        let per_step = now.max(1);
        let steps_per_epoch = self.batches_per_epoch / per_step;
        let total = steps_per_epoch * self.cfg.train.epochs;
        if meta.epoch > self.cfg.train.epochs || meta.step > total {
            bail!(
                "{}: step {} (epoch {}) lies beyond this run ({total} steps, train.epochs = {}); the file was edited or belongs to another run",
                file.display(),
                meta.step,
                meta.epoch,
                self.cfg.train.epochs
            );
        }
        if meta.batch_in_epoch > self.batches_per_epoch
            || meta.step != meta.epoch * steps_per_epoch + meta.batch_in_epoch / per_step
        {
            bail!(
                "{}: step {} does not match epoch {} and batch {} ({steps_per_epoch} steps per epoch); the file was edited or belongs to another run",
                file.display(),
                meta.step,
                meta.epoch,
                meta.batch_in_epoch
            );
        }
        if meta.data.images != self.images
            || meta.data.batches_per_epoch != self.batches_per_epoch
            || meta.data.order_fingerprint != fingerprint_of(meta.epoch)
        {
            bail!(
                "config key `data`: the training data changed since the checkpoint {at} ({} images, {} batches per epoch then; {} images, {} batches now, or another order); resuming would not continue the same run",
                meta.data.images,
                meta.data.batches_per_epoch,
                self.images,
                self.batches_per_epoch
            );
        }
        Ok(())
    }
}

/// The checkpoint a resumed run continues from: the run directory, the checkpoint folder and its
/// metadata.
pub struct ResumePoint {
    /// The run directory (logs and results are appended there).
    pub run_dir: PathBuf,
    /// The newest checkpoint folder.
    pub dir: PathBuf,
    /// Its metadata, already checked against the run's facts.
    pub meta: Meta,
    /// Warnings to log: newer checkpoint folders passed over, a checkpoint without checksums.
    pub notes: Vec<String>,
    /// Settings that differ from the checkpoint's config (harmless ones, and with
    /// `--allow-changes` those that break an exact resume).
    pub changes: Vec<crate::config::ResumeChange>,
}

/// `train.grad_accumulation` of a checkpoint's resolved config (1 when absent).
fn accumulation_of(config_toml: &str) -> usize {
    let value: Option<toml::Value> = toml::from_str(config_toml).ok();
    value
        .as_ref()
        .and_then(|v| v.get("train")?.get("grad_accumulation")?.as_integer())
        .map_or(1, |n| n.max(1) as usize)
}

fn model_toml(cfg: &Config) -> String {
    toml::to_string(&cfg.model).unwrap_or_default()
}

/// `sgd` or `adamw`.
pub fn optimizer_name(cfg: &Config) -> &'static str {
    match cfg.optim {
        OptimConfig::Sgd { .. } => "sgd",
        OptimConfig::Adamw { .. } => "adamw",
    }
}
