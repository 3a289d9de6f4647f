//! One training run: open the data, build backbone + cosine classifier + margin head, train with
//! SGD and the schedule, verify on the configured targets, and write the run directory
//! (`config.toml`, `model.safetensors`, `classifier.safetensors`, `metrics.jsonl`, `training.log`,
//! `summary.json`).

use crate::config::{Config, EvalTarget, OptimConfig, SourceConfig};
use crate::device::{check_available, parse_device};
use crate::log::{Logger, Progress};
use crate::amp::{GradScaler, Precision};
use crate::checkpoint::{self, DataOrder, Meta};
use crate::optim::{clip_grad_norm, Optimizer, ParamGroup};
use crate::schedule::Schedule;
use anyhow::{bail, Context, Result};
use facerec_backbone::Backbone;
use facerec_data::{shared_data, thread_split, Fit, ImageFolder, Sampler, Loader, LoaderConfig, RecOptions, RecordIo, Source, SyntheticConfig, SyntheticFaces};
use facerec_evaluation::images::{decode_all, normalize};
use facerec_evaluation::{balanced_pairs, verify_images, BinPack, LfwPairs, PairSet, VerificationReport};
use facerec_loss_heads::Classifier;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tch::{nn, nn::ModuleT, Device, Tensor};

/// Index of the classifier's parameter group in the optimiser (the backbone's is 0).
const CLASSIFIER_GROUP: usize = 1;

/// Where the run looks for the workspace (for `../shared/data` and `target/shared-data`).
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The workspace root.
    pub workspace: PathBuf,
    /// Print the resolved config at start.
    pub echo_config: bool,
    /// Continue the run in this directory from its newest checkpoint.
    pub resume: Option<PathBuf>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions { workspace: default_workspace(), echo_config: true, resume: None }
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

/// Verification result of one target.
#[derive(Debug, Clone, Serialize)]
pub struct TargetResult {
    /// The target's name.
    pub name: String,
    /// Identities (0 for a fixed pair list, `.bin` or `pairs.txt`, whose identities are not known).
    pub identities: usize,
    /// Images.
    pub images: usize,
    /// The model's verification.
    pub model: VerificationReport,
    /// Mean L2 norm of the un-normalised embeddings.
    pub xnorm: f64,
    /// The same pairs verified on raw pixels (cosine of the flattened, flip-summed input).
    pub raw_pixels: VerificationReport,
}

/// What a run reports.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// The run directory.
    pub run_dir: PathBuf,
    /// Optimiser steps taken.
    pub steps: usize,
    /// Steps skipped by the NaN guard.
    pub skipped_steps: usize,
    /// Wall time of the training loop (evaluation excluded), seconds.
    pub train_seconds: f64,
    /// Mean training loss over the last logging window.
    pub final_loss: f64,
    /// Final verification per target.
    pub targets: Vec<TargetResult>,
    /// Targets skipped because their data is missing.
    pub skipped_targets: Vec<String>,
}

/// An evaluation set held in memory: Uint8 images `[N, 3, S, S]` (normalised batch by batch) and
/// the pairs over them.
struct EvalSet {
    name: String,
    images: Tensor,
    identities: usize,
    pairs: PairSet,
    raw_pixels: VerificationReport,
}

/// Open a source for images of side `size`, fitted by `fit` (the config's `input.fit`). `Ok(None)`
/// when shared data is absent and `required` is false.
pub fn open_source(cfg: &SourceConfig, size: usize, fit: Fit, workspace: &Path, seed: u64, key: &str, required: bool) -> Result<Option<Arc<dyn Source>>> {
    Ok(Some(match cfg {
        SourceConfig::Synthetic { identities, images_per_identity, first_identity } => Arc::new(
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
        SourceConfig::Rec { path, policy, size_policy, max_skipped_fraction } => Arc::new(
            RecordIo::open(path, size, RecOptions { policy: *policy, size: *size_policy, fit, max_skipped_fraction: *max_skipped_fraction })
                .with_context(|| format!("config key `{key}` (path, policy, max_skipped_fraction)"))?,
        ),
        SourceConfig::Bin { .. } | SourceConfig::LfwPairs { .. } => {
            bail!("config key `{key}`: a pair list cannot be opened as a labelled source")
        }
        SourceConfig::Orl { classes, data_dir } => {
            let dir = match data_dir.clone().or_else(|| shared_data::locate(workspace)) {
                Some(d) => d,
                None if required => bail!(
                    "config key `{key}`: the ORL archive was not found (set `data_dir`, FACEREC_SHARED_DATA, or put ../shared/data beside the workspace)"
                ),
                None => return Ok(None),
            };
            let root = shared_data::unpack(&dir, "orl_faces.tar.gz", &workspace.join("target/shared-data"))
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
fn check_labels(source: &dyn Source, num_classes: usize) -> Result<()> {
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

fn raw_pixel_model(x_u8: &Tensor) -> Tensor {
    normalize(x_u8).flatten(1, -1)
}

/// Images `[N, 3, S, S]` Uint8 (fitted by `fit`, as the training data) and the pairs to verify with
/// their folds, for one target. `Ok(None)` when its shared data is missing and it is not required.
fn load_eval_target(t: &EvalTarget, key: &str, size: usize, fit: Fit, seed: u64, pair_seed: u64, workspace: &Path) -> Result<Option<(Tensor, PairSet, usize)>> {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let none = &|| {};
    Ok(Some(match &t.source {
        SourceConfig::Bin { path } => {
            let pack = BinPack::read(path).with_context(|| format!("config key `{key}.path`"))?;
            let images = pack.decode(size as u32, fit, threads, none).with_context(|| format!("decoding {}", path.display()))?;
            (images, pack.pair_set(), 0)
        }
        SourceConfig::LfwPairs { pairs, images } => {
            let set = LfwPairs::read(pairs)
                .and_then(|p| p.resolve(images))
                .with_context(|| format!("config key `{key}`"))?;
            (set.decode(size as u32, fit, threads, none)?, set.pairs, 0)
        }
        other => {
            let Some(source) = open_source(other, size, fit, workspace, seed, key, t.required)? else {
                return Ok(None);
            };
            let images = decode_all(source.len(), size, threads, &|i| source.load(i), none)?;
            let labels: Vec<usize> = (0..source.len()).map(|i| source.label(i)).collect();
            (images, PairSet::contiguous(balanced_pairs(&labels, pair_seed)), source.num_classes())
        }
    }))
}

fn load_eval_sets(cfg: &Config, size: usize, opts: &RunOptions, logger: &mut Logger) -> Result<(Vec<EvalSet>, Vec<String>)> {
    let mut sets = Vec::new();
    let mut skipped = Vec::new();
    for (i, t) in cfg.eval.targets.iter().enumerate() {
        let key = format!("eval.targets[{i}].source");
        let loaded = load_eval_target(t, &key, size, cfg.input.fit, cfg.seed ^ 0x5eed, cfg.eval.pair_seed, &opts.workspace)
            .with_context(|| format!("loading eval target `{}`", t.name))?;
        let Some((images, pairs, identities)) = loaded else {
            logger.line(&format!("eval target `{}` skipped: its data was not found", t.name));
            skipped.push(t.name.clone());
            continue;
        };
        if pairs.len() < 20 {
            bail!("eval target `{}` yields only {} pairs; it needs identities with 2+ images", t.name, pairs.len());
        }
        let (raw_pixels, _) = verify_images(&raw_pixel_model, &images, &pairs, cfg.eval.batch_size)
            .with_context(|| format!("eval target `{}`", t.name))?;
        logger.line(&format!(
            "eval target `{}`: {} identities, {} images, {} pairs; raw-pixel accuracy {:.4} ± {:.4}",
            t.name,
            identities,
            images.size()[0],
            pairs.len(),
            raw_pixels.accuracy_mean,
            raw_pixels.accuracy_std
        ));
        sets.push(EvalSet { name: t.name.clone(), images, identities, pairs, raw_pixels });
    }
    Ok((sets, skipped))
}

fn evaluate(backbone: &Backbone, device: Device, sets: &[EvalSet], batch: usize) -> Vec<TargetResult> {
    let model = |x_u8: &Tensor| backbone.forward_t(&normalize(&x_u8.to_device(device)), false).to_device(Device::Cpu);
    sets.iter()
        .map(|s| {
            // Checked when the set was loaded (the raw-pixel verification ran on the same pairs).
            let (report, xnorm) = verify_images(&model, &s.images, &s.pairs, batch).expect("pairs and batch size checked when the set was loaded");
            TargetResult {
                name: s.name.clone(),
                identities: s.identities,
                images: s.images.size()[0] as usize,
                model: report,
                xnorm,
                raw_pixels: s.raw_pixels.clone(),
            }
        })
        .collect()
}

/// The model, optimiser and counters of a run: what a checkpoint holds.
struct State {
    backbone_vs: nn::VarStore,
    head_vs: nn::VarStore,
    backbone: Backbone,
    classifier: Classifier,
    opt: Optimizer,
    scaler: GradScaler,
    step: usize,
    epoch: usize,
    batch_in_epoch: usize,
    skipped: usize,
    consecutive_bad: usize,
    best: Vec<f64>,
}

/// Everything fixed for the run that a checkpoint must agree with.
struct RunFacts<'a> {
    cfg: &'a Config,
    num_classes: usize,
    images: usize,
    batches_per_epoch: usize,
}

impl RunFacts<'_> {
    fn meta(&self, s: &State, order_fingerprint: u64) -> Meta {
        Meta {
            format: checkpoint::FORMAT,
            step: s.step,
            epoch: s.epoch,
            batch_in_epoch: s.batch_in_epoch,
            seed: self.cfg.seed,
            num_classes: self.num_classes,
            data: DataOrder { images: self.images, batches_per_epoch: self.batches_per_epoch, order_fingerprint },
            model: model_toml(self.cfg),
            optimizer: optimizer_name(self.cfg).into(),
            scaler: s.scaler.state(),
            skipped_steps: s.skipped,
            consecutive_bad: s.consecutive_bad,
            best: s.best.clone(),
            config: self.cfg.to_toml(),
        }
    }

    /// Refuse a checkpoint written for another model, class count, optimiser or data.
    fn check(&self, meta: &Meta, dir: &Path, fingerprint_of: impl Fn(usize) -> u64) -> Result<()> {
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
        if meta.data.images != self.images || meta.data.batches_per_epoch != self.batches_per_epoch || meta.data.order_fingerprint != fingerprint_of(meta.epoch) {
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

fn model_toml(cfg: &Config) -> String {
    toml::to_string(&cfg.model).unwrap_or_default()
}

fn optimizer_name(cfg: &Config) -> &'static str {
    match cfg.optim {
        OptimConfig::Sgd { .. } => "sgd",
        OptimConfig::Adamw { .. } => "adamw",
    }
}

/// Seed of the torch generator for step `step` (dropout): a function of (seed, step) only, so a
/// resumed run draws what the uninterrupted one drew.
fn step_seed(seed: u64, step: usize) -> i64 {
    (seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ step as u64) as i64 & i64::MAX
}

/// Train as `cfg` says (or continue the run in `opts.resume`). Returns the summary; everything is
/// also written to the run directory.
pub fn train(cfg: &Config, opts: &RunOptions) -> Result<RunSummary> {
    let device = parse_device(&cfg.train.device)?;
    check_available(device)?;
    if cfg.train.precision.is_reduced() && !device.is_cuda() {
        bail!("config key `train.precision`: fp16/bf16 autocast needs a CUDA device (train.device resolved to {device:?}); use \"off\" on CPU");
    }
    let size = cfg.model.input_size() as usize;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let split = thread_split(cores, device.is_cuda());
    let threads = if cfg.train.threads > 0 { cfg.train.threads } else { split.torch_threads };
    let workers = if cfg.train.workers > 0 { cfg.train.workers } else { split.decode_workers };
    tch::set_num_threads(threads as i32);
    tch::manual_seed(cfg.seed as i64);

    // Open everything that can fail on bad input before creating or touching the run directory.
    let source = open_source(&cfg.data, size, cfg.input.fit, &opts.workspace, cfg.seed, "data", true)?.expect("required source");
    let num_classes = cfg.classifier.num_classes.unwrap_or(source.num_classes());
    check_labels(source.as_ref(), num_classes)?;
    crate::memory::check_classifier_fits(cfg, num_classes, device, &crate::memory::class_count_origin(cfg))?;
    let loader = Loader::new(
        source.clone(),
        LoaderConfig {
            batch_size: cfg.train.batch_size,
            shuffle: true,
            drop_last: true,
            flip: cfg.train.flip,
            max_shift: cfg.train.max_shift,
            workers,
            prefetch: cfg.train.prefetch,
            seed: cfg.seed,
            sampler: match cfg.train.images_per_identity {
                0 => Sampler::Uniform,
                k => Sampler::IdentityBalanced { k },
            },
        },
    );
    let batches_per_epoch = loader.batches_per_epoch();
    let accumulation = cfg.train.grad_accumulation;
    let steps_per_epoch = batches_per_epoch / accumulation;
    if steps_per_epoch == 0 {
        bail!(
            "config key `train.batch_size`: {} x train.grad_accumulation {accumulation} is larger than the training set ({} images)",
            cfg.train.batch_size,
            source.len()
        );
    }
    let facts = RunFacts { cfg, num_classes, images: source.len(), batches_per_epoch };
    let resume_from = match &opts.resume {
        Some(run_dir) => {
            let dir = checkpoint::latest(run_dir)?;
            let meta = checkpoint::read_meta(&dir)?;
            facts.check(&meta, &dir, |e| checkpoint::fingerprint(&loader.epoch_order(e)))?;
            Some((run_dir.clone(), dir, meta))
        }
        None => None,
    };

    let backbone_vs = nn::VarStore::new(device);
    let backbone = facerec_backbone::build(&backbone_vs.root(), &cfg.model);
    let head_vs = nn::VarStore::new(device);
    let classifier = Classifier::new(&head_vs.root(), &cfg.head, num_classes as i64, cfg.model.embedding_size());
    let (wd_backbone, wd_classifier) = cfg.optim.weight_decays();
    let backbone_params = backbone_vs.trainable_variables();
    let opt = Optimizer::new(
        vec![
            ParamGroup::new(backbone_params.iter().map(|t| t.shallow_clone()).collect(), wd_backbone),
            ParamGroup::new(head_vs.trainable_variables(), wd_classifier),
        ],
        cfg.optim.rule(),
    );
    let scaler = GradScaler::new(cfg.train.scaler, cfg.train.precision == Precision::Fp16);
    let mut st = State {
        backbone_vs,
        head_vs,
        backbone,
        classifier,
        opt,
        scaler,
        step: 0,
        epoch: 0,
        batch_in_epoch: 0,
        skipped: 0,
        consecutive_bad: 0,
        best: Vec::new(),
    };
    let mut objective = crate::objective::build(cfg, num_classes as i64, device);
    let mut init_report = None;
    if let Some((_, dir, meta)) = &resume_from {
        objective.load_state(checkpoint::read_objective(dir)?).with_context(|| format!("{}", dir.join("objective.safetensors").display()))?;
        checkpoint::load_exact(&st.backbone_vs, &dir.join("model.safetensors"), "checkpoint's backbone")?;
        checkpoint::load_exact(&st.head_vs, &dir.join("classifier.safetensors"), "checkpoint's classifier")?;
        st.opt.load_state(checkpoint::read_optimizer(dir)?).with_context(|| format!("{}", dir.join("optimizer.safetensors").display()))?;
        st.scaler.load_state(meta.scaler);
        (st.step, st.epoch, st.batch_in_epoch) = (meta.step, meta.epoch, meta.batch_in_epoch);
        (st.skipped, st.consecutive_bad, st.best) = (meta.skipped_steps, meta.consecutive_bad, meta.best.clone());
    } else if let Some(from) = &cfg.init.from {
        init_report = Some((from.clone(), checkpoint::init_backbone(&st.backbone_vs, from, cfg.init.strict)?));
        if cfg.init.classifier {
            checkpoint::init_classifier(&st.head_vs, from)?;
        }
    }

    let run_dir = match &resume_from {
        Some((run_dir, ..)) => run_dir.clone(),
        None => crate::log::new_run_dir(&cfg.output_dir, &cfg.run_name).context("config key `output_dir`")?,
    };
    let mut logger = Logger::open(&run_dir, resume_from.is_some())?;
    if resume_from.is_none() {
        crate::log::write_atomic(&run_dir.join("config.toml"), cfg.to_toml().as_bytes())?;
    }
    if opts.echo_config {
        logger.line(&format!("resolved config:\n{}", cfg.to_toml()));
    }
    logger.line(&format!(
        "run directory {}; device {device:?}; {threads} libtorch threads, {workers} data workers",
        run_dir.display()
    ));
    if let Some((_, dir, meta)) = &resume_from {
        logger.line(&format!("resumed from {} at global step {} (epoch {}, batch {})", dir.display(), meta.step, meta.epoch, meta.batch_in_epoch));
    }
    if let Some((from, report)) = &init_report {
        logger.line(&format!("backbone initialised from {}: {}", from.display(), report.describe()));
        if cfg.init.classifier {
            logger.line("classifier initialised from the same folder (init.classifier)");
        }
    }
    logger.line(&format!("training data: {} images of {} identities; classifier over {num_classes} classes", source.len(), source.num_classes()));
    let (eval_sets, skipped_targets) = load_eval_sets(cfg, size, opts, &mut logger)?;
    st.best.resize(eval_sets.len(), 0.0);

    let total_steps = steps_per_epoch * cfg.train.epochs;
    let schedule = Schedule::new(cfg.schedule.clone(), cfg.optim.lr(), total_steps, steps_per_epoch);
    let n_params: i64 = backbone_params.iter().map(|t| t.numel() as i64).sum();
    logger.line(&format!(
        "backbone: {n_params} trainable parameters; {steps_per_epoch} steps per epoch ({batches_per_epoch} batches, accumulation {accumulation}), {total_steps} steps in all; optimizer {}",
        optimizer_name(cfg)
    ));
    let ckpt_parent = run_dir.join("checkpoints");
    let training_set = SourceSet { source: source.clone(), size, threads: cores, device };
    let save = |st: &State, objective: &dyn crate::objective::Objective, order_fp: u64| -> Result<PathBuf> {
        checkpoint::save(&ckpt_parent, &facts.meta(st, order_fp), &st.backbone_vs, &st.head_vs, &st.opt, &objective.state(), cfg.checkpoint.keep)
    };

    let mut progress = Progress::new(total_steps as u64);
    progress.set(st.step as u64);
    let mut window = Window::default();
    let mut final_loss = f64::NAN;
    let started = Instant::now();
    let mut eval_seconds = 0.0;
    let start_step = st.step;
    while st.epoch < cfg.train.epochs {
        let epoch = st.epoch;
        let order_fp = checkpoint::fingerprint(&loader.epoch_order(epoch));
        let mut batches = loader.epoch(epoch, st.batch_in_epoch);
        let r0 = Instant::now();
        if let Some(note) = objective.begin_epoch(epoch, &st.model(cfg.train.precision, num_classes as i64), &training_set)? {
            logger.line(&format!("epoch {epoch}: {note} ({:.1} s)", r0.elapsed().as_secs_f64()));
        }
        // Micro-batches of this epoch that make whole optimiser steps (leftovers are dropped).
        let usable = steps_per_epoch * accumulation;
        loop {
            let lr = schedule.lr(st.step);
            tch::manual_seed(step_seed(cfg.seed, st.step));
            objective.begin_step(st.step, st.epoch);
            st.opt.zero_grad();
            let mut loss_v = 0.0;
            let mut row_mask: Option<Tensor> = None;
            let mut extra: Vec<(&'static str, f64)> = Vec::new();
            for _ in 0..accumulation {
                let wait_start = Instant::now();
                let batch = batches.next().context("the loader ended early")?.with_context(|| format!("loading a batch in epoch {epoch}"))?;
                let t0 = Instant::now();
                window.wait += (t0 - wait_start).as_secs_f64();
                let (x, y) = batch.to_tensors(device);
                let model = st.model(cfg.train.precision, num_classes as i64);
                let micro = objective.loss(&model, &x, &y);
                let loss = micro.loss / accumulation as f64;
                st.scaler.scale_loss(&loss).backward();
                loss_v += f64::try_from(&loss).unwrap_or(f64::NAN);
                row_mask = match (row_mask.take(), micro.row_mask) {
                    (Some(a), Some(b)) => Some(a.maximum(&b)),
                    (a, b) => a.or(b),
                };
                extra = micro.metrics;
                window.samples += batch.len();
                window.busy += t0.elapsed().as_secs_f64();
                st.batch_in_epoch += 1;
            }
            let t1 = Instant::now();
            // Only the sampled rows (and their optimiser state) may change in this step.
            st.opt.set_row_mask(CLASSIFIER_GROUP, row_mask);
            st.scaler.unscale(st.opt.params());
            let finite = loss_v.is_finite() && st.opt.grads_finite();
            let collapsed = st.scaler.update(finite);
            if finite {
                st.consecutive_bad = 0;
                if cfg.train.grad_clip > 0.0 {
                    clip_grad_norm(&backbone_params, cfg.train.grad_clip);
                }
                st.opt.step(lr);
                window.loss += loss_v;
                window.steps += 1;
            } else {
                st.skipped += 1;
                st.consecutive_bad += 1;
                logger.line(&format!("step {}: non-finite loss or gradient (loss {loss_v}); step skipped; grad scale now {}", st.step, st.scaler.scale()));
            }
            st.step += 1;
            if st.batch_in_epoch >= usable {
                st.epoch += 1;
                st.batch_in_epoch = 0;
            }
            let order_now = if st.batch_in_epoch == 0 { checkpoint::fingerprint(&loader.epoch_order(st.epoch)) } else { order_fp };
            if !finite && (st.consecutive_bad >= cfg.train.max_nonfinite_steps || collapsed) {
                let dir = save(&st, objective.as_ref(), order_now)?;
                let why = if collapsed {
                    format!("the fp16 loss scale fell to train.scaler.min_scale ({})", cfg.train.scaler.min_scale)
                } else {
                    format!("{} consecutive non-finite steps (train.max_nonfinite_steps)", st.consecutive_bad)
                };
                logger.line(&format!("stopping: {why}"));
                bail!("{why}; stopped at global step {}; the last good state is checkpointed in {} (lower optim.lr or check the data, then --resume)", st.step, dir.display());
            }
            window.busy += t1.elapsed().as_secs_f64();
            progress.set(st.step as u64);
            if st.step % cfg.train.log_every.max(1) == 0 || st.step == total_steps {
                final_loss = window.loss / window.steps.max(1) as f64;
                let elapsed = window.busy + window.wait;
                let mut record = serde_json::json!({
                    "kind": "train", "step": st.step, "epoch": epoch, "loss": final_loss, "lr": lr,
                    "samples_per_sec": window.samples as f64 / elapsed.max(1e-9),
                    "data_wait_fraction": window.wait / elapsed.max(1e-9),
                    "skipped_steps": st.skipped,
                    "skipped_images": loader.skipped(),
                });
                if st.scaler.enabled() {
                    record["grad_scale"] = serde_json::json!(st.scaler.scale());
                }
                for (k, v) in &extra {
                    record[*k] = serde_json::json!(v);
                }
                let eta = progress.eta_seconds((st.step - start_step) as u64, (total_steps - start_step) as u64);
                logger.train_line(&record, total_steps, eta, st.scaler.enabled(), &progress);
                window = Window::default();
            }
            let epoch_done = st.batch_in_epoch == 0;
            let every = cfg.checkpoint.every_steps;
            if st.step < total_steps && ((every > 0 && st.step % every == 0) || (every == 0 && epoch_done)) {
                save(&st, objective.as_ref(), order_now)?;
            }
            if cfg.eval.every_steps > 0 && st.step % cfg.eval.every_steps == 0 && st.step < total_steps {
                let e0 = Instant::now();
                let results = evaluate(&st.backbone, device, &eval_sets, cfg.eval.batch_size);
                eval_seconds += e0.elapsed().as_secs_f64();
                for (r, b) in results.iter().zip(st.best.iter_mut()) {
                    *b = b.max(r.model.accuracy_mean);
                    logger.eval_line(st.step, r, *b, &progress);
                }
            }
            if epoch_done {
                break;
            }
        }
    }
    progress.finish();
    if loader.skipped() > 0 {
        logger.line(&format!("{} unreadable images were skipped (data.policy = \"skip\"); see the messages above", loader.skipped()));
    }
    let train_seconds = started.elapsed().as_secs_f64() - eval_seconds;
    let targets = evaluate(&st.backbone, device, &eval_sets, cfg.eval.batch_size);
    for (r, b) in targets.iter().zip(st.best.iter_mut()) {
        *b = b.max(r.model.accuracy_mean);
        logger.eval_line(st.step, r, *b, &progress);
    }
    save(&st, objective.as_ref(), checkpoint::fingerprint(&loader.epoch_order(st.epoch)))?;
    checkpoint::save_varstore(&st.backbone_vs, &run_dir.join("model.safetensors"))?;
    checkpoint::save_varstore(&st.head_vs, &run_dir.join("classifier.safetensors"))?;
    let summary = RunSummary {
        run_dir: run_dir.clone(),
        steps: st.step,
        skipped_steps: st.skipped,
        train_seconds,
        final_loss,
        targets,
        skipped_targets,
    };
    crate::log::write_atomic(&run_dir.join("summary.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
    logger.summary(&summary);
    Ok(summary)
}

impl State {
    fn model(&self, precision: Precision, num_classes: i64) -> crate::objective::Model<'_> {
        crate::objective::Model { backbone: &self.backbone, classifier: &self.classifier, precision, num_classes }
    }
}

/// The training source as objectives see it (decoded without augmentation).
struct SourceSet {
    source: Arc<dyn Source>,
    size: usize,
    threads: usize,
    device: Device,
}

impl crate::objective::TrainingSet for SourceSet {
    fn len(&self) -> usize {
        self.source.len()
    }
    fn label(&self, i: usize) -> usize {
        self.source.label(i)
    }
    fn images(&self, idx: &[usize]) -> Result<Tensor> {
        let u8 = decode_all(idx.len(), self.size, self.threads, &|k| self.source.load(idx[k]), &|| {})?;
        Ok(normalize(&u8.to_device(self.device)))
    }
}

/// Counters of one logging window.
#[derive(Default)]
struct Window {
    loss: f64,
    steps: usize,
    samples: usize,
    busy: f64,
    wait: f64,
}
