//! Contrastive regularizers for margin-softmax face recognition training; today CoReFace
//! (Song and Wang, "Sample-Guided Contrastive Regularization for Deep Face Recognition",
//! arXiv 2304.11668), in [`coreface`].
//!
//! A classification loss (ArcFace, CosFace, ...; the `facerec-loss-heads` crate) pulls each
//! embedding towards its class prototype, but verification compares *images* with each other.
//! A contrastive regularizer adds an image-to-image term on two views of every image of the batch.
//! The crate is model-agnostic: anything that produces two views `[B, D]` per batch can use it.
//!
//! ```text
//! images --trunk--> h [B,F] --dropout mask 1--> neck --> view1 [B,D] --margin head--> L_cls1
//!                          \-dropout mask 2--> neck --> view2 [B,D] --margin head--> L_cls2
//!                                          ContrastiveRegularizer(view1, view2, y) --> L_con
//! L = w_cls1·L_cls1 + w_cls2·L_cls2 + w_con·L_con          (CoReFaceConfig::total_loss)
//! ```
//!
//! A minimal step with your own model (`trunk` and `neck` are yours; [`dropout_views`] draws the
//! two masks):
//!
//! ```no_run
//! use facerec_contrastive_regularizer::{dropout_views, CoReFace, CoReFaceConfig, ContrastiveRegularizer};
//! use tch::{nn, nn::Module, Device, Kind, Tensor};
//!
//! let vs = nn::VarStore::new(Device::Cpu);
//! let cfg = CoReFaceConfig::default(); // one-way N x N, s = 64, adaptive margin
//! let neck = nn::linear(&vs.root() / "fc", 2048, 512, Default::default());
//! let mut reg = CoReFace::new(&(vs.root() / "coreface"), &cfg); // margin buffer in the VarStore
//! let trunk_bf = Tensor::randn([32, 2048], (Kind::Float, Device::Cpu)); // your trunk's output
//! let labels = Tensor::randint(1000, [32], (Kind::Int64, Device::Cpu));
//! let (v1, v2) = dropout_views(&trunk_bf, cfg.dropout, |h| neck.forward(h));
//! let out = reg.forward(&v1, &v2, &labels);
//! let loss = out.loss * cfg.w_con; // plus the two classification losses
//! loss.backward();
//! ```

pub mod coreface;

pub use coreface::{
    contrastive_logits, dropout_views, normalize, same_identity_mask, AdaptiveMarginConfig,
    CoReFace, CoReFaceConfig, ContrastiveLogits, FixedMarginConfig, HardestNegative, LayoutRow,
    MarginConfig, MomentumOn, Protocol, Role, ViewRef,
};

use tch::Tensor;

/// An image-to-image contrastive term between two views of a batch.
///
/// Implementations may keep state (CoReFace: the moving-average margin) as tensors registered in a
/// `VarStore`, so checkpoints carry it. The state moves once per optimiser step: call
/// [`ContrastiveRegularizer::forward`] once per step, or, with gradient accumulation,
/// [`ContrastiveRegularizer::forward_micro_batch`] for every micro-batch and
/// [`ContrastiveRegularizer::end_step`] once after the optimiser step.
pub trait ContrastiveRegularizer: std::fmt::Debug + Send {
    /// The loss (a differentiable scalar) and detached diagnostics of one micro-batch; the
    /// statistics that move the state are gathered, the state itself is left for
    /// [`ContrastiveRegularizer::end_step`].
    ///
    /// # Shapes
    /// `view1_bd [B, D]`, `view2_bd [B, D]` (float, *not* normalised: the regularizer normalises),
    /// `labels_b [B]` (Int64) -> [`RegularizerOutput`] of scalars.
    ///
    /// # Panics
    /// If the shapes disagree, `labels_b` is not Int64, or `B < 2`.
    fn forward_micro_batch(
        &mut self,
        view1_bd: &Tensor,
        view2_bd: &Tensor,
        labels_b: &Tensor,
    ) -> RegularizerOutput;

    /// Updates the state from the micro-batches since the last call (none: no change).
    fn end_step(&mut self);

    /// One step of one batch: [`ContrastiveRegularizer::forward_micro_batch`] then
    /// [`ContrastiveRegularizer::end_step`].
    ///
    /// # Shapes
    /// As [`ContrastiveRegularizer::forward_micro_batch`].
    ///
    /// # Panics
    /// As [`ContrastiveRegularizer::forward_micro_batch`].
    fn forward(
        &mut self,
        view1_bd: &Tensor,
        view2_bd: &Tensor,
        labels_b: &Tensor,
    ) -> RegularizerOutput {
        let out = self.forward_micro_batch(view1_bd, view2_bd, labels_b);
        self.end_step();
        out
    }
}

/// What [`ContrastiveRegularizer::forward`] returns. Every field is a scalar tensor on the input
/// device; only `loss` carries a gradient. Nothing is read back to the host (no GPU sync):
/// read the diagnostics every N steps.
#[derive(Debug)]
pub struct RegularizerOutput {
    /// The contrastive loss, mean over anchor rows (f32, or f64 for f64 views).
    pub loss: Tensor,
    /// The margin used in this micro-batch's loss (after the moving-average update from
    /// `batch_gap`), detached. For the last micro-batch of a step: the step's margin.
    pub margin: Tensor,
    /// The step's gap so far: mean over the anchor rows of this step's micro-batches of
    /// (positive cosine − hardest negative cosine). With one micro-batch per step, this batch's.
    pub batch_gap: Tensor,
    /// Mean positive cosine (same image, other view) over the same rows, detached.
    pub positive_cos: Tensor,
    /// Mean hardest negative cosine over the same rows, detached.
    pub hardest_negative_cos: Tensor,
}
