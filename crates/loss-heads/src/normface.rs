//! NormFace: Wang, Xiang, Cheng, Yuille, "NormFace: L2 Hypersphere Embedding for Face
//! Verification", ACM MM 2017, arXiv 1704.06369.
//!
//! Idea: normalise both features and class weights and drop the bias, so logits are cosines; a
//! fixed scale `s` restores a usable softmax range. No margin: the baseline the other heads reduce
//! to when their margin is 0.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::head::MarginHead;

/// `[head] type = "normface"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NormFaceConfig {
    /// Logit scale `s` (fixed, not learned). Default 64 (as in arcface_torch).
    #[serde(default = "default_scale")]
    pub s: f64,
}

pub(crate) fn default_scale() -> f64 {
    64.0
}

impl Default for NormFaceConfig {
    fn default() -> Self {
        Self { s: default_scale() }
    }
}

impl NormFaceConfig {
    /// `head.s` must be finite and > 0.
    pub fn validate(&self) -> Result<()> {
        crate::head::validate_scale(self.s)
    }
}

/// NormFace head: `z_j = s·cos θ_j` for every class, target included.
#[derive(Debug, Clone)]
pub struct NormFace {
    s: f64,
}

impl NormFace {
    /// Builds the head from a (validated) config.
    pub fn new(cfg: &NormFaceConfig) -> Self {
        Self { s: cfg.s }
    }
}

impl MarginHead for NormFace {
    fn row_scaled_logits(&self) -> bool {
        true
    }

    /// `z = s·cos`.
    ///
    /// # Shapes
    /// `cos_bc [B, C]`, `labels_b [B]` (Int64, unused but checked) -> `[B, C]`.
    fn logits(&self, cos_bc: &Tensor, labels_b: &Tensor) -> Tensor {
        crate::head::check_head_inputs(cos_bc, labels_b);
        cos_bc * self.s
    }
}
