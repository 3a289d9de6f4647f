//! Training objectives: what one micro-batch's loss is. The loop (`run.rs`, `step.rs`) owns data, optimiser,
//! scaler, checkpoints and logs; an [`Objective`] owns the margin head, Partial FC and any method
//! state (CoReFace's adaptive margin, cluster tables), and turns images and labels into a loss
//! through the shared backbone and classifier.
//!
//! - [`margin_softmax::MarginSoftmax`]: a margin head from `facerec-loss-heads` on the cosine
//!   classifier (every method of the heads issue), optionally over a Partial FC sample.
//! - [`cluster_guided::ClusterGuidedObjective`]: cluster-guided ArcFace (`[cluster_guided]`) with
//!   periodic refresh, supervised contrastive clustering and cluster aligning.
//! - [`coreface::CoReFaceObjective`]: CoReFace (`[coreface]`): two dropout views of the trunk
//!   features, both classified, plus the contrastive regularizer.

pub mod cluster_guided;
pub mod coreface;
pub mod margin_softmax;

pub use crate::model::Model;
use anyhow::Result;
use facerec_loss_heads::{ClassShard, Collectives, PartialFc, Sampled};
use std::collections::HashMap;
use tch::Tensor;

/// The objective a config asks for. `shard`: this rank's block of the classifier under model
/// parallelism (`None`: the classifier is whole), for objectives whose state is indexed by class
/// rows (the cluster-guided re-imprinting writes the rows of its block only).
pub fn build(
    cfg: &crate::Config,
    num_classes: i64,
    shard: Option<ClassShard>,
    device: tch::Device,
) -> Box<dyn Objective> {
    if let Some(cg) = &cfg.cluster_guided {
        return Box::new(cluster_guided::ClusterGuidedObjective::new(
            cg,
            &cfg.partial_fc.sampler(),
            (num_classes, shard),
            cfg.model.embedding_size(),
            device,
        ));
    }
    let base = margin_softmax::MarginSoftmax::new(&cfg.head, &cfg.partial_fc.sampler());
    match &cfg.coreface {
        Some(cf) => Box::new(coreface::CoReFaceObjective::new(base, cf)),
        None => Box::new(base),
    }
}

/// One micro-batch's result.
pub struct MicroLoss {
    /// The scalar loss (fp32) to backpropagate.
    pub loss: Tensor,
    /// Classifier rows this micro-batch may change (Partial FC); `None` = all.
    pub row_mask: Option<Tensor>,
    /// Extra scalars to log (name, value), e.g. a loss component or a margin.
    pub metrics: Vec<(&'static str, f64)>,
}

/// A training objective.
pub trait Objective {
    /// Called once before each optimiser step with the global step (0-based) and epoch, before
    /// any [`Objective::loss`] of that step (heads and samplers move to the stream of the step).
    fn begin_step(&mut self, step: usize, epoch: usize);

    /// Called once after each optimiser step (also a skipped one), after every
    /// [`Objective::loss`] of that step: state that moves once per step (CoReFace's adaptive
    /// margin) is updated here from the step's micro-batches.
    fn end_step(&mut self) {}

    /// Called before each [`Objective::loss`] with the dataset indices of the micro-batch's
    /// images (the loader's `Batch::indices`; a P x K batch repeats an image when its identity
    /// has fewer than K). Objectives that pair images with each other (GCE's pairwise framework)
    /// use them to never pair an image with a copy of itself.
    fn set_batch_images(&mut self, _images: &[usize]) {}

    /// The loss of one micro-batch.
    ///
    /// # Shapes
    /// `x [B, 3, S, S]` (normalised images), `y [B]` Int64 labels.
    fn loss(&mut self, model: &Model, x: &Tensor, y: &Tensor) -> MicroLoss;

    /// Model parallel: this rank's embeddings of its micro-batch `x`, one tensor per view the
    /// objective classifies (the step gathers each across the ranks and passes them to
    /// [`Objective::sharded_loss`] in this order). Random draws that one process would make for
    /// the whole batch (CoReFace's dropout masks) are drawn for the gathered batch from the
    /// step's stream and this rank's rows taken, so they do not depend on the world size.
    ///
    /// # Shapes
    /// `x [B, 3, S, S]` -> views `[B, D]` each.
    fn sharded_views(&mut self, model: &Model, x: &Tensor, _comm: &dyn Collectives) -> Vec<Tensor> {
        vec![model.embed(x, true)]
    }

    /// Model parallel (`classifier.sharding = "model_parallel"`): the loss of the gathered
    /// batch against this rank's block of the classifier (`model.classifier` holds only the
    /// block `shard`), through `facerec_loss_heads::sharded_cross_entropy` over `comm`. Its value
    /// is the global mean (the same on every rank); its gradient reaches this rank's class rows
    /// and `views_g` such that the gradients of `views_g` summed over the ranks are the
    /// one-process gradient (terms computed identically on every rank from the gathered views go
    /// in as [`replicated_share`]). The row mask is over the block's rows. The default refuses.
    ///
    /// # Shapes
    /// `views_g`: the gathered [`Objective::sharded_views`], `[W * B, D]` each (leaves that
    /// require grad); `y_g [W * B]` Int64.
    fn sharded_loss(
        &mut self,
        _model: &Model,
        _views_g: &[Tensor],
        _y_g: &Tensor,
        _shard: ClassShard,
        _comm: &dyn Collectives,
    ) -> Result<MicroLoss> {
        anyhow::bail!("config key `classifier.sharding`: this objective does not support a model-parallel classifier; set classifier.sharding = \"replicated\"")
    }

    /// Called at the start of every epoch (also the first one after a resume). Objectives that
    /// refresh tables from the training set do it here and return a line for the log.
    fn begin_epoch(
        &mut self,
        _epoch: usize,
        _model: &Model,
        _data: &dyn TrainingSet,
    ) -> Result<Option<String>> {
        Ok(None)
    }

    /// State to checkpoint (tensors), beyond the weights and the optimiser.
    fn state(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }

    /// Restore [`Objective::state`].
    fn load_state(&mut self, state: HashMap<String, Tensor>) -> Result<()> {
        if let Some(k) = state.keys().next() {
            anyhow::bail!("objective state has an entry `{k}` this objective does not have");
        }
        Ok(())
    }
}

/// Read access to the training images for objectives that embed the training set.
pub trait TrainingSet {
    /// Number of images.
    fn len(&self) -> usize;
    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Label of image `i`.
    fn label(&self, i: usize) -> usize;
    /// Images `idx` as a normalised batch `[N, 3, S, S]` (no augmentation).
    fn images(&self, idx: &[usize]) -> Result<Tensor>;
}

/// A term that every rank computes identically from the gathered views (CoReFace's contrastive
/// loss, the supervised contrastive clustering loss), as this rank's share: its value is `t`, its
/// gradient `t / W`, so the gathered views' gradients summed over the `W` ranks (the step's
/// reduce-scatter) count it once. `t` itself in a world of one.
///
/// # Shapes
/// `t` scalar -> scalar.
pub fn replicated_share(t: &Tensor, world: usize) -> Tensor {
    if world <= 1 {
        return t.shallow_clone();
    }
    let w = world as f64;
    t / w + t.detach() * (1.0 - 1.0 / w)
}

/// This micro-batch's Partial FC sample (when `pfc` is configured) and the classifier rows it may
/// change: `(sample, row mask)`, both `None` without Partial FC. The mask covers every row of a
/// sampled class of `model`'s classifier (`[C·K, 1]`: all `K` sub-centres with sub-center ArcFace).
pub fn sample_classes(
    pfc: Option<&mut PartialFc>,
    y: &Tensor,
    model: &Model,
) -> (Option<Sampled>, Option<Tensor>) {
    let k = model.classifier.rows_per_class();
    let sampled = pfc.map(|pfc| pfc.sample(y, model.num_classes));
    let mask = sampled
        .as_ref()
        .map(|s| s.row_mask_of_rows(model.num_classes, k, tch::Kind::Float));
    (sampled, mask)
}
