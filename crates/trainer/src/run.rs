//! One training run, as a few named steps: [`train`] prepares the run (data, model, resume or
//! fine-tuning, run directory, evaluation sets), then [`Trainer::run_epoch`] takes optimiser steps
//! (`step.rs`) and, after each, guards against non-finite steps, logs, checkpoints and evaluates;
//! [`Trainer::finish`] evaluates, writes the model and `summary.json`.
//!
//! The run directory holds `config.toml`, `model.safetensors`, `classifier.safetensors`,
//! `metrics.jsonl`, `training.log`, `summary.json` and `checkpoints/`.
//!
//! A resumed run appends to the record: `metrics.jsonl` loses only the records after the step it
//! resumes from (trained again), gains a `kind = "resume"` record naming every changed setting,
//! `config.toml` is rewritten to what runs from then on (the one before kept as
//! `config-until-step-N.toml`), and `summary.json` counts every segment. A run that fails before
//! its first step removes its directory; one that fails later leaves `failed.txt` there.

use crate::checkpoint;
use crate::config::Config;
use crate::device::{check_available, parse_device};
use crate::eval_sets::{self, EvalSet};
use crate::log::{Logger, Progress};
use crate::objective::Objective;
use crate::schedule::Schedule;
use crate::sources::{check_labels, default_workspace, open_source, training_loader, SourceSet};
use crate::state::{optimizer_name, ResumePoint, RunFacts, State};
use crate::step::{StepOutcome, StepPlan, Window};
use crate::summary::RunSummary;
use crate::world::World;
use anyhow::{bail, Context, Result};
use facerec_data::{thread_split, Loader, Source};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Tensor};

/// Where the run looks for the workspace (for `../shared/data` and `target/shared-data`).
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The workspace root.
    pub workspace: PathBuf,
    /// Print the resolved config at start.
    pub echo_config: bool,
    /// Continue the run in this directory from its newest checkpoint.
    pub resume: Option<PathBuf>,
    /// With `resume`: continue from this checkpoint (`step-N` or `N`) instead of the newest; the
    /// newer ones are set aside (`checkpoints/discarded-step-N`).
    pub resume_from: Option<String>,
    /// With `resume`: accept settings that break an exact resume (they are recorded).
    pub allow_changes: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            workspace: default_workspace(),
            echo_config: true,
            resume: None,
            resume_from: None,
            allow_changes: false,
        }
    }
}

/// Train as `cfg` says (or continue the run in `opts.resume`). Returns the summary; everything is
/// also written to the run directory.
pub fn train(cfg: &Config, opts: &RunOptions) -> Result<RunSummary> {
    let mut trainer = Trainer::prepare(cfg, opts)?;
    let result = (|| {
        while trainer.st.epoch < cfg.train.epochs {
            trainer.run_epoch()?;
        }
        trainer.finish()
    })();
    if let Err(e) = &result {
        trainer.failed(e);
    }
    result
}

/// Libtorch threads and data workers: `train.threads` / `loader.workers`, or the automatic split of
/// this process's share of the cores (the processes of a data-parallel run on one machine share
/// them equally).
fn threads_and_workers(cfg: &Config, device: Device, world: &World) -> (usize, usize) {
    let cores = (facerec_data::cores() / world.local_size()).max(1);
    let split = thread_split(cores, device.is_cuda());
    let threads = if cfg.train.threads > 0 {
        cfg.train.threads
    } else {
        split.torch_threads
    };
    let workers = if cfg.loader.workers > 0 {
        cfg.loader.workers
    } else {
        split.decode_workers
    };
    (threads, workers)
}

/// A run in progress: everything the loop reads and changes.
struct Trainer<'a> {
    cfg: &'a Config,
    facts: RunFacts<'a>,
    device: Device,
    world: World,
    loader: Rc<Loader>,
    training_set: SourceSet,
    st: State,
    objective: Box<dyn Objective>,
    schedule: Schedule,
    total_steps: usize,
    steps_per_epoch: usize,
    run_dir: PathBuf,
    logger: Logger,
    progress: Progress,
    eval_sets: Vec<EvalSet>,
    skipped_targets: Vec<String>,
    window: Window,
    final_loss: f64,
    started: Instant,
    eval_seconds: f64,
    start_step: usize,
    /// The segments before this one (from the checkpoint resumed from).
    past_segments: Vec<checkpoint::Segment>,
    resumed: bool,
}

impl<'a> Trainer<'a> {
    /// Open everything that can fail on bad input, then the run directory, then the evaluation
    /// sets: a bad config or dataset never leaves a run directory behind.
    fn prepare(cfg: &'a Config, opts: &RunOptions) -> Result<Self> {
        let (device, world) = join_world(cfg)?;
        if cfg.train.precision.is_reduced() && !device.is_cuda() {
            bail!("config key `train.precision`: fp16/bf16 autocast needs a CUDA device (train.device resolved to {device:?}); use \"off\" on CPU");
        }
        let (threads, workers) = threads_and_workers(cfg, device, &world);
        tch::set_num_threads(threads as i32);
        tch::manual_seed(cfg.seed as i64);
        let data = TrainingData::open(cfg, opts, device, &world, workers)?;
        let facts = RunFacts {
            cfg,
            num_classes: data.num_classes,
            images: data.source.len(),
            batches_per_epoch: data.loader.batches_per_epoch(),
            world_size: world.size(),
        };
        let resume = match &opts.resume {
            Some(run_dir) => Some(find_resume_point(&facts, &data.loader, run_dir, opts)?),
            None => None,
        };
        let shard = crate::model_parallel::shard_of(cfg, data.num_classes, &world)?;
        let mut st = State::new_sharded(cfg, data.num_classes, shard, device);
        let mut objective = crate::objective::build(cfg, data.num_classes as i64, shard, device);
        let init_line = match &resume {
            Some(r) => {
                st.restore(&r.dir, &r.meta, objective.as_mut())?;
                None
            }
            None => st.initialise(cfg)?,
        };
        if shard.is_some() {
            // Model parallel: each rank's classifier is its own block (the same rows whatever
            // the world size), only the backbone is shared.
            world.broadcast_from_main(&[&st.backbone_vs])?;
        } else {
            world.broadcast_from_main(&[&st.backbone_vs, &st.head_vs])?;
        }

        let (run_dir, mut logger) = open_run_dir(cfg, resume.as_ref(), &world)?;
        let total_steps = data.steps_per_epoch * cfg.train.epochs;
        let last_loss = match &resume {
            Some(r) if world.is_main() => record_resume(cfg, r, &mut logger, total_steps)?,
            _ => None,
        };
        let schedule = Schedule::new(
            cfg.schedule.clone(),
            cfg.optim.lr(),
            total_steps,
            data.steps_per_epoch,
        );
        let mut progress = if world.is_main() {
            Progress::new(total_steps as u64)
        } else {
            Progress::hidden()
        };
        progress.set(st.step as u64);
        let start_step = st.step;
        let size = cfg.model.input_size() as usize;
        let training_set = SourceSet {
            source: data.source.clone(),
            size,
            threads: facerec_data::cores(),
            device,
        };
        let mut trainer = Trainer {
            cfg,
            facts,
            device,
            world,
            loader: data.loader,
            training_set,
            st,
            objective,
            schedule,
            total_steps,
            steps_per_epoch: data.steps_per_epoch,
            run_dir,
            logger,
            progress,
            eval_sets: Vec::new(),
            skipped_targets: Vec::new(),
            window: Window::default(),
            final_loss: last_loss.unwrap_or(f64::NAN),
            started: Instant::now(),
            eval_seconds: 0.0,
            start_step,
            past_segments: resume.as_ref().map(past_segments).unwrap_or_default(),
            resumed: resume.is_some(),
        };
        trainer.log_start(
            opts,
            resume.as_ref(),
            init_line.as_deref(),
            (threads, workers),
        );
        if let Err(e) = trainer.load_eval_sets(&opts.workspace) {
            trainer.failed(&e);
            return Err(e);
        }
        trainer.started = Instant::now();
        Ok(trainer)
    }

    /// After an error: a fresh run that took no step removes its run directory (nothing in it is
    /// worth keeping); otherwise `failed.txt` says where and why the run stopped.
    fn failed(&mut self, err: &anyhow::Error) {
        if !self.world.is_main() {
            return;
        }
        let dir = &self.run_dir;
        if !self.resumed
            && self.st.step == 0
            && checkpoint::list(&dir.join("checkpoints")).map_or(true, |l| l.is_empty())
        {
            if std::fs::remove_dir_all(dir).is_ok() {
                eprintln!(
                    "removed the run directory {} (the run failed before its first step)",
                    dir.display()
                );
            }
            return;
        }
        let text = format!(
            "failed at global step {} of {}: {err:#}\n",
            self.st.step, self.total_steps
        );
        if let Err(e) = crate::log::write_atomic(&dir.join("failed.txt"), text.as_bytes()) {
            eprintln!("warning: could not mark the run failed: {e:#}");
        }
        self.logger.line(&format!(
            "run failed; see {}",
            dir.join("failed.txt").display()
        ));
    }

    /// The run's segments up to now, the current one ending at the current step.
    fn segments_now(&self) -> Vec<checkpoint::Segment> {
        let mut all = self.past_segments.clone();
        all.push(checkpoint::Segment {
            from_step: self.start_step,
            to_step: self.st.step,
            train_seconds: Some(self.started.elapsed().as_secs_f64() - self.eval_seconds),
        });
        all
    }

    /// The run's opening lines: the config, where it runs, what it continues from, the data.
    fn log_start(
        &mut self,
        opts: &RunOptions,
        resume: Option<&ResumePoint>,
        init_line: Option<&str>,
        (threads, workers): (usize, usize),
    ) {
        let (cfg, log) = (self.cfg, &mut self.logger);
        if opts.echo_config {
            log.line(&format!("resolved config:\n{}", cfg.to_toml()));
        }
        log.line(&format!(
            "run directory {}; device {:?}; {threads} libtorch threads, {workers} data workers",
            self.run_dir.display(),
            self.device
        ));
        let (world, accumulation) = (self.world.size(), cfg.train.grad_accumulation);
        if world > 1 {
            log.line(&format!(
                "data parallel: {world} processes; global batch {} ({} per process x accumulation {accumulation})",
                world * cfg.train.batch_size * accumulation,
                cfg.train.batch_size
            ));
        }
        if let Some(shard) = self.st.shard {
            log.line(&format!(
                "model-parallel classifier (classifier.sharding): {world} blocks of {} classes; rank 0 holds rows [{}, {})",
                shard.num_classes,
                shard.start,
                shard.end()
            ));
        }
        if let Some(r) = resume {
            for note in &r.notes {
                log.line(note);
            }
            log.line(&format!(
                "resumed from {} at global step {} (epoch {}, batch {})",
                r.dir.display(),
                r.meta.step,
                r.meta.epoch,
                r.meta.batch_in_epoch
            ));
            if r.meta.consecutive_bad > 0 {
                log.line(&format!(
                    "the checkpoint ends {} consecutive non-finite steps; the count starts again from 0 (train.max_nonfinite_steps = {} more allowed)",
                    r.meta.consecutive_bad, cfg.train.max_nonfinite_steps
                ));
            }
        }
        if let Some(line) = init_line {
            log.line(line);
        }
        let source = &self.training_set.source;
        log.line(&format!(
            "training data: {} images of {} identities; classifier over {} classes",
            source.len(),
            source.num_classes(),
            self.facts.num_classes
        ));
    }

    /// The evaluation sets (rank 0 only), then the run's size in the log.
    fn load_eval_sets(&mut self, workspace: &Path) -> Result<()> {
        if self.world.is_main() {
            let size = self.cfg.model.input_size() as usize;
            (self.eval_sets, self.skipped_targets) =
                eval_sets::load(self.cfg, size, workspace, &mut self.logger)?;
        }
        self.st.best.resize(self.eval_sets.len(), 0.0);
        let n_params: i64 = self
            .st
            .backbone_params
            .iter()
            .map(|t| t.numel() as i64)
            .sum();
        self.logger.line(&format!(
            "backbone: {n_params} trainable parameters; {} steps per epoch ({} batches, accumulation {}), {} steps in all; optimizer {}",
            self.steps_per_epoch,
            self.facts.batches_per_epoch,
            self.cfg.train.grad_accumulation,
            self.total_steps,
            optimizer_name(self.cfg)
        ));
        Ok(())
    }

    /// The steps of the current epoch (from where a resumed run stopped), each followed by
    /// [`Trainer::after_step`].
    fn run_epoch(&mut self) -> Result<()> {
        let epoch = self.st.epoch;
        let r0 = Instant::now();
        let model = self
            .st
            .model(self.cfg.train.precision, self.facts.num_classes);
        if let Some(note) = self
            .objective
            .begin_epoch(epoch, &model, &self.training_set)?
        {
            self.logger.line(&format!(
                "epoch {epoch}: {note} ({:.1} s)",
                r0.elapsed().as_secs_f64()
            ));
        }
        let loader = Rc::clone(&self.loader);
        let mut batches = loader.epoch_shard(epoch, self.st.batch_in_epoch, self.world.shard());
        // Micro-batches of this epoch (of every rank) that make whole optimiser steps (leftovers
        // are dropped).
        let usable = self.steps_per_epoch * self.cfg.train.grad_accumulation * self.world.size();
        loop {
            let lr = self.schedule.lr(self.st.step);
            let plan = StepPlan {
                cfg: self.cfg,
                num_classes: self.facts.num_classes,
                device: self.device,
                world: &self.world,
                shard: self.st.shard,
            };
            let outcome = plan.run(
                &mut self.st,
                self.objective.as_mut(),
                &mut batches,
                lr,
                &mut self.window,
            )?;
            if self.st.batch_in_epoch >= usable {
                self.st.epoch += 1;
                self.st.batch_in_epoch = 0;
            }
            self.after_step(epoch, &outcome)?;
            if self.st.batch_in_epoch == 0 {
                return Ok(());
            }
        }
    }

    /// Everything between two steps: the NaN guard, the log line, the checkpoint and the
    /// evaluation that are due.
    fn after_step(&mut self, epoch: usize, outcome: &StepOutcome) -> Result<()> {
        let t = Instant::now();
        self.guard_nonfinite(outcome)?;
        self.window.busy += t.elapsed().as_secs_f64();
        self.progress.set(self.st.step as u64);
        if self.st.step.is_multiple_of(self.cfg.train.log_every.max(1))
            || self.st.step == self.total_steps
        {
            self.log_window(epoch, outcome);
        }
        let every = self.cfg.checkpoint.every_steps;
        let epoch_done = self.st.batch_in_epoch == 0;
        if self.st.step < self.total_steps
            && ((every > 0 && self.st.step.is_multiple_of(every)) || (every == 0 && epoch_done))
        {
            self.save_checkpoint()?;
        }
        if self.cfg.eval.every_steps > 0
            && self.st.step.is_multiple_of(self.cfg.eval.every_steps)
            && self.st.step < self.total_steps
        {
            let e0 = Instant::now();
            self.evaluate();
            self.eval_seconds += e0.elapsed().as_secs_f64();
        }
        Ok(())
    }

    /// Log a skipped step; after `train.max_nonfinite_steps` in a row (or a collapsed fp16
    /// scale), checkpoint and stop with an error.
    fn guard_nonfinite(&mut self, outcome: &StepOutcome) -> Result<()> {
        if outcome.finite {
            return Ok(());
        }
        let st = &self.st;
        let scale = if st.scaler.enabled() {
            format!("; grad scale now {}", st.scaler.scale())
        } else {
            String::new()
        };
        self.logger.line(&format!(
            "step {}: non-finite loss or gradient (loss {}); step skipped, weights, optimiser and BatchNorm statistics left as they were{scale}",
            st.step - 1,
            outcome.loss
        ));
        if st.consecutive_bad < self.cfg.train.max_nonfinite_steps && !outcome.collapsed {
            return Ok(());
        }
        let dir = self.save_checkpoint()?;
        let why = if outcome.collapsed {
            format!(
                "the fp16 loss scale fell to train.scaler.min_scale ({})",
                self.cfg.train.scaler.min_scale
            )
        } else {
            format!(
                "{} consecutive non-finite steps (train.max_nonfinite_steps)",
                self.st.consecutive_bad
            )
        };
        self.logger.line(&format!("stopping: {why}"));
        bail!("{why}; stopped at global step {}; the last good state is checkpointed in {} (lower optim.lr or check the data, then: facerec train --resume {} --allow-changes --set optim.lr=...)", self.st.step, dir.display(), self.run_dir.display());
    }

    /// The train record of the window that ends at this step (`metrics.jsonl`, console, log).
    fn log_window(&mut self, epoch: usize, outcome: &StepOutcome) {
        let w = std::mem::take(&mut self.window);
        let st = &self.st;
        self.final_loss = w.loss / w.steps.max(1) as f64;
        let elapsed = w.busy + w.wait;
        let world = self.world.size();
        let mut record = serde_json::json!({
            "kind": "train", "step": st.step, "epoch": epoch, "loss": self.final_loss, "lr": outcome.lr,
            "global_batch": world * self.cfg.train.batch_size * self.cfg.train.grad_accumulation,
            "samples_per_sec": (w.samples * world) as f64 / elapsed.max(1e-9),
            "data_wait_fraction": w.wait / elapsed.max(1e-9),
            "skipped_steps": st.skipped,
            "skipped_images": self.loader.skipped(),
        });
        if st.scaler.enabled() {
            record["grad_scale"] = serde_json::json!(st.scaler.scale());
        }
        for (k, v) in &outcome.metrics {
            record[*k] = serde_json::json!(v);
        }
        let eta = self.progress.eta_seconds(
            (st.step - self.start_step) as u64,
            (self.total_steps - self.start_step) as u64,
        );
        self.logger.train_line(
            &record,
            self.total_steps,
            eta,
            st.scaler.enabled(),
            &self.progress,
        );
    }

    /// Write a checkpoint of the current state (atomically; the newest `checkpoint.keep` kept).
    /// Data parallel: every rank holds the same weights and optimiser state, so rank 0 writes the
    /// one checkpoint once every rank has reached this point, and the others wait for it.
    fn save_checkpoint(&self) -> Result<PathBuf> {
        self.world.barrier()?;
        let parent = self.run_dir.join("checkpoints");
        let whole = self.whole_classifier()?;
        let saved = if let Some((classifier, optimizer)) = whole {
            let order_fp = checkpoint::fingerprint(&self.loader.epoch_order(self.st.epoch));
            let mut meta = self.facts.meta(&self.st, order_fp);
            meta.segments = self.segments_now();
            checkpoint::save_named(
                &parent,
                &meta,
                &self.st.backbone_vs,
                &classifier,
                &optimizer,
                &self.objective.state(),
                self.cfg.checkpoint.keep,
            )?
        } else {
            checkpoint::step_dir(&parent, self.st.step)
        };
        self.world.barrier()?;
        Ok(saved)
    }

    /// The whole classifier's variables and the optimiser state with the whole classifier's
    /// buffers, on rank 0 (`None` on the other ranks). Model parallel: gathered block by block
    /// (every rank takes part); otherwise this process's own.
    #[allow(clippy::type_complexity)]
    fn whole_classifier(&self) -> Result<Option<(Vec<(String, Tensor)>, Vec<(String, Tensor)>)>> {
        let Some(shard) = self.st.row_block() else {
            if !self.world.is_main() {
                return Ok(None);
            }
            let mut named: Vec<(String, Tensor)> =
                self.st.head_vs.variables().into_iter().collect();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            return Ok(Some((named, self.st.opt.state_tensors())));
        };
        let classifier =
            crate::model_parallel::gather_classifier(&self.world, &self.st.head_vs, shard)?;
        let optimizer = crate::model_parallel::gather_optimizer_state(
            &self.world,
            self.st.opt.state_tensors(),
            crate::state::CLASSIFIER_GROUP,
            shard,
        )?;
        Ok(classifier.zip(optimizer))
    }

    /// Verify on every evaluation set, log it and keep the best accuracies.
    fn evaluate(&mut self) -> Vec<crate::summary::TargetResult> {
        let results = eval_sets::evaluate(
            &self.st.backbone,
            self.device,
            &self.eval_sets,
            self.cfg.eval.batch_size,
        );
        for (r, b) in results.iter().zip(self.st.best.iter_mut()) {
            *b = b.max(r.model.accuracy_mean);
            self.logger.eval_line(self.st.step, r, *b, &self.progress);
        }
        results
    }

    /// The final evaluation, the last checkpoint, `model.safetensors`, `classifier.safetensors`
    /// and `summary.json`.
    fn finish(&mut self) -> Result<RunSummary> {
        self.progress.finish();
        if self.loader.skipped() > 0 {
            self.logger.line(&format!("{} unreadable images were skipped (data.policy = \"skip\"); see the messages above", self.loader.skipped()));
        }
        let segments = self.segments_now();
        let train_seconds = segments.iter().filter_map(|s| s.train_seconds).sum();
        let targets = self.evaluate();
        self.save_checkpoint()?;
        let classifier = match self.st.row_block() {
            Some(shard) => {
                crate::model_parallel::gather_classifier(&self.world, &self.st.head_vs, shard)?
            }
            None => None,
        };
        if !self.world.is_main() {
            return Ok(RunSummary {
                run_dir: self.run_dir.clone(),
                steps: self.st.step,
                skipped_steps: self.st.skipped,
                train_seconds,
                final_loss: self.final_loss,
                segments,
                targets,
                skipped_targets: Vec::new(),
            });
        }
        checkpoint::save_varstore(
            &self.st.backbone_vs,
            &self.run_dir.join("model.safetensors"),
        )?;
        let classifier_file = self.run_dir.join("classifier.safetensors");
        match classifier {
            Some(named) => checkpoint::save_named_atomic(&named, &classifier_file)?,
            None => checkpoint::save_varstore(&self.st.head_vs, &classifier_file)?,
        }
        let summary = RunSummary {
            run_dir: self.run_dir.clone(),
            steps: self.st.step,
            skipped_steps: self.st.skipped,
            train_seconds,
            final_loss: self.final_loss,
            segments,
            targets,
            skipped_targets: std::mem::take(&mut self.skipped_targets),
        };
        crate::log::write_atomic(
            &self.run_dir.join("summary.json"),
            serde_json::to_string_pretty(&summary)?.as_bytes(),
        )?;
        let _ = std::fs::remove_file(self.run_dir.join("failed.txt"));
        self.logger.summary(&summary);
        Ok(summary)
    }
}

/// The training data of a run, opened and checked before anything is written: a bad config or
/// dataset never leaves a run directory behind.
struct TrainingData {
    source: Arc<dyn Source>,
    num_classes: usize,
    loader: Rc<Loader>,
    steps_per_epoch: usize,
}

impl TrainingData {
    fn open(
        cfg: &Config,
        opts: &RunOptions,
        device: Device,
        world: &World,
        workers: usize,
    ) -> Result<Self> {
        let size = cfg.model.input_size() as usize;
        let source = open_source(
            &cfg.data,
            size,
            cfg.input.fit,
            &opts.workspace,
            cfg.seed,
            "data",
            true,
        )?
        .expect("a required source is always opened");
        let num_classes = cfg.classifier.num_classes.unwrap_or(source.num_classes());
        check_labels(source.as_ref(), num_classes)?;
        // Model parallel: each rank holds one block of rows (the largest is ceil(C / W)).
        let rows = match cfg.classifier.sharding_for(world.size()) {
            crate::config::Sharding::ModelParallel => num_classes.div_ceil(world.size()),
            crate::config::Sharding::Replicated => num_classes,
        };
        crate::memory::check_classifier_fits(
            cfg,
            rows,
            device,
            &crate::memory::class_count_origin(cfg),
        )?;
        let loader = Rc::new(training_loader(cfg, source.clone(), workers));
        let accumulation = cfg.train.grad_accumulation;
        let steps_per_epoch = loader.batches_per_epoch() / (accumulation * world.size());
        if steps_per_epoch == 0 {
            bail!(
                "config key `train.batch_size`: {} x train.grad_accumulation {accumulation} x {} processes is larger than the training set ({} images)",
                cfg.train.batch_size,
                world.size(),
                source.len()
            );
        }
        Ok(TrainingData {
            source,
            num_classes,
            loader,
            steps_per_epoch,
        })
    }
}

/// The device (`cuda:LOCAL_RANK` for each rank of a data-parallel CUDA run) and the process group
/// the environment describes.
fn join_world(cfg: &Config) -> Result<(Device, World)> {
    let device = parse_device(&cfg.train.device)?;
    let world = World::from_env(device)?;
    let device = match device {
        Device::Cuda(_) if world.size() > 1 => Device::Cuda(world.local_rank()),
        d => d,
    };
    check_available(device)?;
    Ok((device, world))
}

/// The run directory and its logger. Rank 0 creates it (or reopens a resumed run's) and writes
/// `config.toml`; the other ranks of a data-parallel run only need its path (checkpoints) and log
/// nothing.
fn open_run_dir(
    cfg: &Config,
    resume: Option<&ResumePoint>,
    world: &World,
) -> Result<(PathBuf, Logger)> {
    if !world.is_main() {
        let dir = world.share_from_main("facerec/run_dir", "")?;
        return Ok((PathBuf::from(dir), Logger::null()));
    }
    let run_dir = match resume {
        Some(r) => r.run_dir.clone(),
        None => crate::log::new_run_dir(&cfg.output_dir, &cfg.run_name)
            .context("config key `output_dir`")?,
    };
    world.share_from_main("facerec/run_dir", &run_dir.to_string_lossy())?;
    let logger = Logger::open(&run_dir, resume.is_some())?;
    if resume.is_none() {
        crate::log::write_atomic(&run_dir.join("config.toml"), cfg.to_toml().as_bytes())?;
    }
    Ok((run_dir, logger))
}

/// The checkpoint to continue from (the newest of `run_dir`, or `opts.resume_from`), checked
/// against this run's facts; settings that changed since it was written are listed, and those that
/// break an exact resume refused without `opts.allow_changes`.
fn find_resume_point(
    facts: &RunFacts,
    loader: &Loader,
    run_dir: &Path,
    opts: &RunOptions,
) -> Result<ResumePoint> {
    let (dir, mut notes) = match &opts.resume_from {
        Some(name) => (checkpoint::named(run_dir, name)?, Vec::new()),
        None => {
            let (dir, passed_over) = checkpoint::latest_noting(run_dir)?;
            let notes: Vec<String> = passed_over
                .iter()
                .map(|p| format!("warning: skipped the checkpoint folder {} (no meta.json: incomplete or emptied); resuming from {} instead", p.display(), dir.display()))
                .collect();
            (dir, notes)
        }
    };
    for n in &notes {
        eprintln!("{n}");
    }
    let meta = checkpoint::read_meta(&dir)?;
    // First what no flag can allow (another model, class count, optimiser, seed, data), each with
    // its own message; then the changes an exact resume cannot absorb.
    facts.check(&meta, &dir, |e| {
        checkpoint::fingerprint(&loader.epoch_order(e))
    })?;
    let changes = crate::config::resume_changes(&meta.config, facts.cfg)
        .with_context(|| format!("{}", dir.join("meta.json").display()))?;
    let breaking: Vec<String> = changes
        .iter()
        .filter(|c| c.breaking)
        .map(|c| format!("  {}", c.describe()))
        .collect();
    if !breaking.is_empty() && !opts.allow_changes {
        bail!(
            "resuming {} with changed settings that break an exact resume:\n{}\nthe checkpoint {} was written without them; pass --allow-changes to continue with them anyway (they are recorded in metrics.jsonl and config.toml), or leave them out (harmless keys: {})",
            run_dir.display(),
            breaking.join("\n"),
            dir.display(),
            crate::config::HARMLESS_ON_RESUME.join(", ")
        );
    }
    if let Some(warning) = checkpoint::verify(&dir, &meta)? {
        eprintln!("{warning}");
        notes.push(warning);
    }
    let steps_per_epoch =
        facts.batches_per_epoch / (facts.world_size * facts.cfg.train.grad_accumulation).max(1);
    let total = steps_per_epoch * facts.cfg.train.epochs;
    if meta.step >= total && run_dir.join("summary.json").is_file() {
        bail!(
            "{}: the run already finished at step {} (summary.json); nothing to train and nothing was changed. To train longer: facerec train --resume {} --set train.epochs=N (N > {})",
            run_dir.display(),
            meta.step,
            run_dir.display(),
            facts.cfg.train.epochs
        );
    }
    Ok(ResumePoint {
        run_dir: run_dir.to_path_buf(),
        dir,
        meta,
        notes,
        changes,
    })
}

/// The segments a resumed run continues: those of its checkpoint, or for a checkpoint from before
/// segments were recorded one of unknown time up to its step.
fn past_segments(r: &ResumePoint) -> Vec<checkpoint::Segment> {
    if r.meta.segments.is_empty() && r.meta.step > 0 {
        return vec![checkpoint::Segment {
            from_step: 0,
            to_step: r.meta.step,
            train_seconds: None,
        }];
    }
    r.meta.segments.clone()
}

/// A resumed run's bookkeeping (rank 0): checkpoints newer than the one resumed from are set
/// aside, `metrics.jsonl` is cut back to its step, the changed settings are logged and recorded
/// (`kind = "resume"` in `metrics.jsonl`; `config.toml` rewritten, the one before kept as
/// `config-until-step-N.toml`). Returns the loss of the last train record kept.
fn record_resume(
    cfg: &Config,
    r: &ResumePoint,
    log: &mut Logger,
    total_steps: usize,
) -> Result<Option<f64>> {
    let step = r.meta.step;
    let parent = r.run_dir.join("checkpoints");
    let discarded = checkpoint::set_aside_newer(&parent, step)?;
    for d in &discarded {
        log.line(&format!(
            "set aside the newer checkpoint {} (resuming from step {step})",
            d.display()
        ));
    }
    // Resuming at the run's last step redoes only the final evaluation, which logged eval records
    // of that step.
    let kept = crate::log::keep_records_through(&r.run_dir, step, step >= total_steps)?;
    // The file may have been replaced: write to the new one.
    *log = Logger::open(&r.run_dir, true)?;
    if kept.dropped > 0 {
        log.line(&format!(
            "metrics.jsonl: dropped {} records after step {step} (they are trained again)",
            kept.dropped
        ));
    }
    for c in &r.changes {
        let what = if c.breaking {
            "breaks an exact resume; allowed by --allow-changes"
        } else {
            "harmless"
        };
        log.line(&format!(
            "resumed with a changed setting from step {step}: {} ({what})",
            c.describe()
        ));
    }
    log.record(&serde_json::json!({
        "kind": "resume", "step": step, "checkpoint": r.dir.display().to_string(),
        "discarded": discarded.iter().map(|d| d.display().to_string()).collect::<Vec<_>>(),
        "changes": r.changes.iter().map(|c| serde_json::json!({
            "key": c.key, "before": c.before, "after": c.after, "breaking": c.breaking,
        })).collect::<Vec<_>>(),
    }));
    let path = r.run_dir.join("config.toml");
    let now = cfg.to_toml();
    let before = std::fs::read_to_string(&path).unwrap_or_default();
    if before != now {
        if !before.is_empty() {
            let keep = r.run_dir.join(format!("config-until-step-{step:08}.toml"));
            crate::log::write_atomic(&keep, before.as_bytes())?;
        }
        crate::log::write_atomic(&path, now.as_bytes())?;
    }
    Ok(kept.last_loss)
}
