//! CosFace (large margin cosine loss, LMCL): Wang, Wang, Zhou, Ji, Gong, Zhou, Li, Liu,
//! "CosFace: Large Margin Cosine Loss for Deep Face Recognition", CVPR 2018, arXiv 1801.09414.
//!
//! Idea: subtract an additive margin from the target cosine, `z_y = s·(cos θ_y − m)`, so the
//! target must beat every other class by `m` in cosine. Default `m = 0.35` is the paper's; the
//! insightface torch class and its WebFace/Glint360K configs use 0.40 (set `m = 0.4` to match).
//! Differs from the reference only in applying the margin to the gathered target entries.

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::head::MarginHead;
use crate::normface::default_scale;

/// `[head] type = "cosface"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CosFaceConfig {
    /// Logit scale `s`. Default 64.
    #[serde(default = "default_scale")]
    pub s: f64,
    /// Cosine margin `m`, in `[0, 2)`. Default 0.35 (paper; insightface uses 0.40).
    #[serde(default = "default_margin")]
    pub m: f64,
}

fn default_margin() -> f64 {
    0.35
}

impl Default for CosFaceConfig {
    fn default() -> Self {
        Self {
            s: default_scale(),
            m: default_margin(),
        }
    }
}

impl CosFaceConfig {
    /// `s` finite and > 0; `m` in `[0, 2)` (cosines span 2, so a margin of 2 or more
    /// puts every target below every other class).
    pub fn validate(&self) -> Result<()> {
        crate::head::validate_scale(self.s)?;
        let m = self.m;
        ensure!((0.0..2.0).contains(&m), "m must be in [0, 2), got {m}");
        Ok(())
    }
}

/// CosFace head: `z_y = s·(cos θ_y − m)`, `z_j = s·cos θ_j` for `j ≠ y`.
#[derive(Debug, Clone)]
pub struct CosFace {
    s: f64,
    m: f64,
}

impl CosFace {
    /// Builds the head from a (validated) config.
    pub fn new(cfg: &CosFaceConfig) -> Self {
        Self { s: cfg.s, m: cfg.m }
    }
}

impl MarginHead for CosFace {
    fn row_scaled_logits(&self) -> bool {
        true
    }

    /// # Shapes
    /// `cos_bc [B, C]`, `labels_b [B]` (Int64) -> `[B, C]`.
    fn logits(&self, cos_bc: &Tensor, labels_b: &Tensor) -> Tensor {
        crate::head::scaled_targets(cos_bc, labels_b, crate::head::Scale::Fixed(self.s), |c| {
            c - self.m
        })
    }
}
