//! The trained modules (backbone and classifier) in the run's precision, as the objectives and the
//! evaluation call them. The precision is given once, when the [`Model`] is made; every forward
//! method applies it (CUDA autocast for the backbone trunk and the classifier matmul in fp16 or
//! bf16, as arcface_torch; the embedding neck stays in fp32).

use crate::amp::Precision;
use facerec_backbone::Backbone;
use facerec_loss_heads::{Classifier, Sampled};
use tch::{Kind, Tensor};

/// Backbone + classifier in one precision.
pub struct Model<'a> {
    /// The backbone.
    pub backbone: &'a Backbone,
    /// The classifier that owns the class weights.
    pub classifier: &'a Classifier,
    /// Classifier rows.
    pub num_classes: i64,
    precision: Precision,
}

impl<'a> Model<'a> {
    /// The modules of a run in `precision`.
    pub fn new(
        backbone: &'a Backbone,
        classifier: &'a Classifier,
        num_classes: i64,
        precision: Precision,
    ) -> Self {
        Model {
            backbone,
            classifier,
            num_classes,
            precision,
        }
    }

    /// The precision every method runs in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Embeddings of `x`; `train` selects batch statistics and dropout.
    ///
    /// # Shapes
    /// `x [B, 3, S, S]` normalised images; output `[B, D]` in the parameter kind.
    pub fn embed(&self, x: &Tensor, train: bool) -> Tensor {
        self.backbone
            .forward_amp(x, train, self.precision.autocast_kind())
    }

    /// The flattened trunk features of `x` in train mode, before dropout and neck.
    ///
    /// # Shapes
    /// `x [B, 3, S, S]`; output `[B, F]` with `F = backbone.trunk_width()`.
    pub fn trunk(&self, x: &Tensor) -> Tensor {
        self.backbone
            .forward_trunk_amp(x, true, self.precision.autocast_kind())
    }

    /// The embedding neck on trunk features in train mode (fp32; no dropout).
    ///
    /// # Shapes
    /// `h [B, F]`; output `[B, D]`.
    pub fn neck(&self, h: &Tensor) -> Tensor {
        self.backbone.forward_neck_t(h, true)
    }

    /// Classifier scores for embeddings `emb` (all classes, or a Partial FC sample):
    /// `(emb_bd fp32, scores_bc fp32)`.
    ///
    /// # Shapes
    /// `emb [B, D]`; scores `[B, C]` or `[B, C']` for a sample of `C'` classes.
    pub fn scores(&self, emb: Tensor, sampled: Option<&Sampled>) -> (Tensor, Tensor) {
        let scores = crate::amp::autocast(self.precision, || match sampled {
            None => self.classifier.scores(&emb),
            Some(s) => self.classifier.scores_sampled(&emb, s),
        });
        (emb.to_kind(Kind::Float), scores.to_kind(Kind::Float))
    }
}
