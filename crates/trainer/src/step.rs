//! One optimiser step, in the order the loop runs it: draw the step's random stream, forward and
//! backward every micro-batch of the step ([`StepPlan::forward_backward`]), then unscale, check for
//! non-finite values, clip the backbone's gradient and update ([`StepPlan::apply`]). In a data-parallel run
//! the gradients are averaged over the ranks in between ([`StepPlan::synchronise`]). The loop (`run.rs`)
//! owns what happens around a step: logging, checkpoints, evaluation, the NaN-guard stop.

use crate::config::Config;
use crate::objective::Objective;
use crate::optim::clip_grad_norm;
use crate::state::{State, CLASSIFIER_GROUP};
use crate::world::World;
use anyhow::{Context, Result};
use facerec_data::EpochIter;
use facerec_loss_heads::ClassShard;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Loss, the classifier rows it may change and the objective's metrics, of one or several
/// micro-batches.
type MicroResult = (f64, Option<Tensor>, Vec<(&'static str, f64)>);

/// What one optimiser step did.
pub struct StepOutcome {
    /// Learning rate of the step.
    pub lr: f64,
    /// The step's loss (the mean over its micro-batches).
    pub loss: f64,
    /// Whether loss and gradients were finite (the update was applied).
    pub finite: bool,
    /// Whether the fp16 loss scale reached its floor at this step.
    pub collapsed: bool,
    /// The objective's extra scalars of the last micro-batch.
    pub metrics: Vec<(&'static str, f64)>,
}

/// Counters of one logging window.
#[derive(Default)]
pub struct Window {
    /// Summed loss of the finite steps.
    pub loss: f64,
    /// Finite steps.
    pub steps: usize,
    /// Images consumed.
    pub samples: usize,
    /// Seconds computing.
    pub busy: f64,
    /// Seconds waiting for data.
    pub wait: f64,
}

/// Seed of the torch generator for step `step` (dropout): a function of (seed, step) only, so a
/// resumed run draws what the uninterrupted one drew.
pub fn step_seed(seed: u64, step: usize) -> i64 {
    (seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ step as u64) as i64 & i64::MAX
}

/// The settings one step needs, fixed for the run.
pub struct StepPlan<'a> {
    /// The resolved config.
    pub cfg: &'a Config,
    /// Classifier rows.
    pub num_classes: usize,
    /// Where the model lives.
    pub device: Device,
    /// The data-parallel processes (a world of one: no collectives).
    pub world: &'a World,
    /// Model parallel: this rank's block of the classifier (`None`: the classifier is whole on
    /// every rank, data parallel).
    pub shard: Option<ClassShard>,
}

impl StepPlan<'_> {
    /// Take optimiser step `st.step` at learning rate `lr`, reading its micro-batches from
    /// `batches`; advances the step and batch counters (not the epoch).
    pub fn run(
        &self,
        st: &mut State,
        objective: &mut dyn Objective,
        batches: &mut EpochIter,
        lr: f64,
        window: &mut Window,
    ) -> Result<StepOutcome> {
        let buffers = self.begin(st, objective);
        let (loss, row_mask, metrics) = self.forward_backward(st, objective, batches, window)?;
        self.finish(
            st,
            objective,
            buffers,
            (loss, row_mask, metrics),
            lr,
            window,
        )
    }

    /// The same step on one given micro-batch `x [B, 3, S, S]`, `y [B]` (dataset indices
    /// `images`), without a loader: what `bench-train` times, so the bench runs the trainer's own
    /// step. Counts as `train.grad_accumulation = 1`.
    pub fn run_on(
        &self,
        st: &mut State,
        objective: &mut dyn Objective,
        x: &Tensor,
        y: &Tensor,
        images: &[usize],
        lr: f64,
    ) -> Result<StepOutcome> {
        let buffers = self.begin(st, objective);
        let micro = self.micro_batch(st, objective, x, y, images, 1)?;
        self.finish(st, objective, buffers, micro, lr, &mut Window::default())
    }

    /// The step's random stream, the objective's step, zeroed gradients; returns the BatchNorm
    /// buffers as they were before the forward passes (restored if the step is skipped).
    fn begin(&self, st: &mut State, objective: &mut dyn Objective) -> Vec<(Tensor, Tensor)> {
        tch::manual_seed(step_seed(self.cfg.seed, st.step));
        objective.begin_step(st.step, st.epoch);
        st.opt.zero_grad();
        // The forward pass in train mode updates the BatchNorm running statistics; a skipped step
        // must not keep them (every rank takes the same decision: `finite` is global).
        st.snapshot_buffers()
    }

    /// After the micro-batches: synchronise, apply, restore the buffers of a skipped step, count.
    fn finish(
        &self,
        st: &mut State,
        objective: &mut dyn Objective,
        mut buffers: Vec<(Tensor, Tensor)>,
        micro: MicroResult,
        lr: f64,
        window: &mut Window,
    ) -> Result<StepOutcome> {
        let (loss, row_mask, metrics) = micro;
        let t1 = Instant::now();
        let (loss, row_mask) = self.synchronise(st, loss, row_mask)?;
        let (finite, collapsed) = self.apply(st, row_mask, loss, lr)?;
        if !finite {
            State::restore_buffers(&mut buffers);
        }
        objective.end_step();
        if finite {
            window.loss += loss;
            window.steps += 1;
        }
        st.step += 1;
        window.busy += t1.elapsed().as_secs_f64();
        Ok(StepOutcome {
            lr,
            loss,
            finite,
            collapsed,
            metrics,
        })
    }

    /// Forward and backward of the step's `train.grad_accumulation` micro-batches, each loss
    /// divided by their count (gradients sum to the mean). Returns the summed loss, the union of
    /// the classifier rows the micro-batches may change, and the last micro-batch's metrics.
    fn forward_backward(
        &self,
        st: &mut State,
        objective: &mut dyn Objective,
        batches: &mut EpochIter,
        window: &mut Window,
    ) -> Result<MicroResult> {
        let accumulation = self.cfg.train.grad_accumulation;
        let mut loss_v = 0.0;
        let mut row_mask: Option<Tensor> = None;
        let mut metrics = Vec::new();
        for _ in 0..accumulation {
            let wait_start = Instant::now();
            let batch = batches
                .next()
                .context("the loader ended early")?
                .with_context(|| format!("loading a batch in epoch {}", st.epoch))?;
            let t0 = Instant::now();
            window.wait += (t0 - wait_start).as_secs_f64();
            let (x, y) = batch.to_tensors(self.device);
            let (loss, mask, m) =
                self.micro_batch(st, objective, &x, &y, &batch.indices, accumulation)?;
            loss_v += loss;
            row_mask = match (row_mask.take(), mask) {
                (Some(a), Some(b)) => Some(a.maximum(&b)),
                (a, b) => a.or(b),
            };
            metrics = m;
            window.samples += batch.len();
            window.busy += t0.elapsed().as_secs_f64();
            // The epoch position counts the micro-batches of every rank.
            st.batch_in_epoch += self.world.size();
        }
        Ok((loss_v, row_mask, metrics))
    }

    /// Forward and backward of one micro-batch, its loss divided by `accumulation`: that loss, the
    /// classifier rows it may change and the objective's metrics.
    fn micro_batch(
        &self,
        st: &mut State,
        objective: &mut dyn Objective,
        x: &Tensor,
        y: &Tensor,
        images: &[usize],
        accumulation: usize,
    ) -> Result<MicroResult> {
        if let Some(shard) = self.shard {
            return self.micro_batch_sharded(st, objective, (x, y, images), accumulation, shard);
        }
        objective.set_batch_images(images);
        let micro = objective.loss(&st.model(self.cfg.train.precision, self.num_classes), x, y);
        let loss = micro.loss / accumulation as f64;
        st.scaler.scale_loss(&loss).backward();
        Ok((
            f64::try_from(&loss).unwrap_or(f64::NAN),
            self.row_mask_of(micro.row_mask),
            micro.metrics,
        ))
    }

    /// Model parallel: one micro-batch against this rank's block `shard`. The objective's
    /// views of the micro-batch (`Objective::sharded_views`: one embedding, or CoReFace's two)
    /// are gathered (detached) with the labels of every rank into leaves `[W * B, D]`; the
    /// objective's sharded loss (the global mean over the gathered batch) is backpropagated to
    /// the block and to the gathered views; the gradient of each is summed over the ranks and
    /// this rank's rows of it (reduce-scatter) go through the backbone as
    /// `(Σ_v view_v * grad_v).sum().backward()`. Every rank gets the same loss; the backbone
    /// gradient is this rank's share of the global one (summed over ranks in
    /// [`StepPlan::synchronise`]).
    fn micro_batch_sharded(
        &self,
        st: &mut State,
        objective: &mut dyn Objective,
        (x, y, images): (&Tensor, &Tensor, &[usize]),
        accumulation: usize,
        shard: ClassShard,
    ) -> Result<MicroResult> {
        let model = st.model(self.cfg.train.precision, shard.len as usize);
        let views = objective.sharded_views(&model, x, self.world);
        let views_g = views
            .iter()
            .map(|v| {
                Ok(self
                    .world
                    .all_gather_cat(&v.detach().to_kind(Kind::Float), "the embeddings")?
                    .set_requires_grad(true))
            })
            .collect::<Result<Vec<Tensor>>>()?;
        let y_g = self.world.all_gather_cat(y, "the labels")?;
        // The loss sees the gathered rows: their images too (GCE never pairs an image with a
        // copy of itself).
        let local: Vec<i64> = images.iter().map(|&i| i as i64).collect();
        let images_g = self.world.all_gather_cat(
            &Tensor::from_slice(&local).to_device(y.device()),
            "the image indices",
        )?;
        let images_g = Vec::<i64>::try_from(&images_g.to_device(tch::Device::Cpu))?;
        objective.set_batch_images(&images_g.iter().map(|&i| i as usize).collect::<Vec<_>>());
        let micro = objective.sharded_loss(&model, &views_g, &y_g, shard, self.world)?;
        let loss = micro.loss / accumulation as f64;
        st.scaler.scale_loss(&loss).backward();
        let mut through_backbone: Option<Tensor> = None;
        for (view, view_g) in views.iter().zip(&views_g) {
            let mut grad_g = view_g.grad();
            if !grad_g.defined() {
                // Every rank takes part in the reduce-scatter, even one whose loss did not
                // reach this view.
                grad_g = view_g.zeros_like();
            }
            let grad_own = self
                .world
                .reduce_scatter_sum(&grad_g, "the gathered embeddings' gradient")?;
            let term = (view * grad_own.to_kind(view.kind())).sum(view.kind());
            through_backbone = Some(match through_backbone {
                Some(acc) => acc + term,
                None => term,
            });
        }
        // One backward for every view: they share the trunk's graph.
        if let Some(t) = through_backbone {
            t.backward();
        }
        Ok((
            f64::try_from(&loss).unwrap_or(f64::NAN),
            self.row_mask_of(micro.row_mask),
            micro.metrics,
        ))
    }

    /// The rows the optimiser may change: the sampled rows under `partial_fc.optimizer_semantics
    /// = "v1"`, every row (`None`) under `"v2"` (momentum and weight decay touch every row; an
    /// unsampled row's gradient is zero).
    fn row_mask_of(&self, mask: Option<Tensor>) -> Option<Tensor> {
        if self.cfg.partial_fc.masks_rows() {
            mask
        } else {
            None
        }
    }

    /// Data parallel: average the gradients and the loss over the ranks and unite their Partial FC
    /// rows, so that every rank clips the global gradient and takes the same step (nothing is
    /// communicated in a world of one).
    fn synchronise(
        &self,
        st: &State,
        loss: f64,
        row_mask: Option<Tensor>,
    ) -> Result<(f64, Option<Tensor>)> {
        if self.world.size() == 1 {
            return Ok((loss, row_mask));
        }
        if self.shard.is_some() {
            // Model parallel: the loss is already global and each rank's row mask is over its
            // own block; the backbone gradients are shares of the global one.
            self.world.sum_gradients(&st.backbone_params)?;
            return Ok((loss, row_mask));
        }
        let params: Vec<Tensor> = st.opt.params().map(Tensor::shallow_clone).collect();
        self.world.average_gradients(&params)?;
        self.world.reduce_loss_and_rows(loss, row_mask)
    }

    /// Unscale the gradients, check them, and update: clip the backbone's gradient norm
    /// (`train.grad_clip`) and take the optimiser step, touching only the classifier rows in
    /// `row_mask` (Partial FC). A non-finite loss or gradient skips the update and is counted.
    /// Returns `(finite, scale collapsed)`. Model parallel: finite on every rank (each checks
    /// its own class block), so every rank takes the same decision.
    fn apply(
        &self,
        st: &mut State,
        row_mask: Option<Tensor>,
        loss: f64,
        lr: f64,
    ) -> Result<(bool, bool)> {
        st.opt.set_row_mask(CLASSIFIER_GROUP, row_mask);
        st.scaler.unscale(st.opt.params());
        let mut finite = loss.is_finite() && st.opt.grads_finite();
        if self.shard.is_some() {
            finite = self
                .world
                .all_true(finite, "whether every rank's gradients are finite")?;
        }
        let collapsed = st.scaler.update(finite);
        if finite {
            st.consecutive_bad = 0;
            if self.cfg.train.grad_clip > 0.0 {
                clip_grad_norm(&st.backbone_params, self.cfg.train.grad_clip);
            }
            st.opt.step(lr);
        } else {
            st.skipped += 1;
            st.consecutive_bad += 1;
        }
        Ok((finite, collapsed))
    }
}
