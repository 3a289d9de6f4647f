//! Softmax with bias: the plain linear classifier `z_j = W_jᵀx + b_j` trained with
//! cross-entropy, the baseline every margin paper starts from (e.g. DeepFace, Taigman et al.,
//! CVPR 2014; the "Softmax" rows of the SphereFace, CosFace and ArcFace papers).
//!
//! Idea: no normalisation, no margin, a learned bias. Unlike every other head it does not work
//! on cosines: [`LinearClassifier`] owns `W [C, D]` and `b [C]` and produces the scores, and the
//! [`Softmax`] head passes them through unchanged. `[head] type = "softmax"` asks for
//! [`crate::ClassifierKind::Linear`] ([`crate::HeadConfig::classifier_kind`]). Initialisation follows PyTorch's `nn.Linear`
//! (`U(−1/√D, 1/√D)` for both weight and bias), since arcface_torch has no softmax head.

use serde::{Deserialize, Serialize};
use tch::{nn, Tensor};

use crate::head::MarginHead;
use crate::partial_fc::Sampled;

/// `[head] type = "softmax"`: no keys.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SoftmaxConfig {}

/// The softmax head: logits are the linear classifier's scores, unchanged.
#[derive(Debug, Clone, Copy, Default)]
pub struct Softmax;

impl MarginHead for Softmax {
    fn row_scaled_logits(&self) -> bool {
        true
    }

    /// `z = scores`.
    ///
    /// # Shapes
    /// `scores_bc [B, C]` (from [`LinearClassifier::scores`]), `labels_b [B]` (Int64, checked)
    /// -> `[B, C]`.
    fn logits(&self, scores_bc: &Tensor, labels_b: &Tensor) -> Tensor {
        crate::head::check_head_inputs(scores_bc, labels_b);
        scores_bc.shallow_clone()
    }
}

/// A linear classifier with bias: `scores = x Wᵀ + b`.
#[derive(Debug)]
pub struct LinearClassifier {
    weight: Tensor,
    bias: Tensor,
    embedding_size: i64,
}

impl LinearClassifier {
    /// Registers `weight [C, D]` and `bias [C]` under `p`, both `U(−1/√D, 1/√D)`.
    ///
    /// # Panics
    /// If `num_classes` or `embedding_size` is not positive.
    pub fn new(p: &nn::Path, num_classes: i64, embedding_size: i64) -> Self {
        assert!(
            num_classes > 0 && embedding_size > 0,
            "LinearClassifier needs C > 0 and D > 0"
        );
        let bound = 1.0 / (embedding_size as f64).sqrt();
        let init = nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        Self {
            weight: p.var("weight", &[num_classes, embedding_size], init),
            bias: p.var("bias", &[num_classes], init),
            embedding_size,
        }
    }

    /// `scores = emb Wᵀ + b`.
    ///
    /// # Shapes
    /// `emb_bd [B, D]` -> `[B, C]`.
    ///
    /// # Panics
    /// If `emb_bd` is not `[B, D]` with this classifier's `D`.
    pub fn scores(&self, emb_bd: &Tensor) -> Tensor {
        self.check(emb_bd);
        emb_bd.linear(&self.weight, Some(&self.bias))
    }

    /// Scores against the sampled classes only: `emb W[index]ᵀ + b[index]`.
    ///
    /// # Shapes
    /// `emb_bd [B, D]`, `sampled.index [C']` -> `[B, C']`.
    pub fn scores_sampled(&self, emb_bd: &Tensor, sampled: &Sampled) -> Tensor {
        self.check(emb_bd);
        let w = self.weight.index_select(0, &sampled.index);
        let b = self.bias.index_select(0, &sampled.index);
        emb_bd.linear(&w, Some(&b))
    }

    fn check(&self, emb_bd: &Tensor) {
        let (_, d) = emb_bd.size2().expect("emb_bd must be [B, D]");
        assert_eq!(d, self.embedding_size, "embedding size mismatch");
    }

    /// Number of classes `C`.
    pub fn num_classes(&self) -> i64 {
        self.weight.size()[0]
    }

    /// The weight variable `W [C, D]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias variable `b [C]`.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }
}
