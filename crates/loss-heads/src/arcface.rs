//! ArcFace (additive angular margin): Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular
//! Margin Loss for Deep Face Recognition", CVPR 2019, arXiv 1801.07698.
//!
//! Idea: add the margin to the target *angle*, `z_y = s·cos(θ_y + m)`, `z_j = s·cos θ_j`, a
//! constant geodesic margin on the hypersphere. Defaults s = 64, m = 0.5.
//!
//! `cos(θ+m)` stops being monotone in θ once `θ + m > π`, and its exact derivative
//! `sin(θ+m)/sin θ` diverges at θ → 0; [`ArcFaceGradient`] picks one of the three known treatments
//! (SPEC 1(b)). The target transform, its clamps and the threshold fallback live in
//! [`crate::angular`] ([`AngularMargin::fixed`]). Deliberate differences from the reference code:
//! the margin is computed on the gathered `[B, 1]` target cosines only (never `acos` over
//! `[B, C]`), and `cos(θ+m)` is evaluated as `cos θ·cos m − sin θ·sin m` on the clamped cosine,
//! which equals `cos(acos(cos θ) + m)` up to the clamps without calling `acos`.

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use std::f64::consts::PI;
use tch::Tensor;

use crate::angular::{AngularMargin, ArcFaceGradient};
use crate::head::{scaled_targets, validate_scale, MarginHead, Scale};
use crate::normface::default_scale;

/// `[head] type = "arcface"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ArcFaceConfig {
    /// Logit scale `s`. Default 64.
    #[serde(default = "default_scale")]
    pub s: f64,
    /// Angular margin `m` in radians, in `[0, π)`. Default 0.5.
    #[serde(default = "default_margin")]
    pub m: f64,
    /// Gradient treatment: `"exact"` (default), `"easy_margin"` or `"detached"`.
    #[serde(default)]
    pub gradient: ArcFaceGradient,
}

fn default_margin() -> f64 {
    0.5
}

impl Default for ArcFaceConfig {
    fn default() -> Self {
        Self {
            s: default_scale(),
            m: default_margin(),
            gradient: ArcFaceGradient::default(),
        }
    }
}

impl ArcFaceConfig {
    /// `s` finite and > 0; `m` in `[0, π)`. Errors name the field (`m must be in [0, π), ...`).
    pub fn validate(&self) -> Result<()> {
        validate_scale(self.s)?;
        let m = self.m;
        ensure!((0.0..PI).contains(&m), "m must be in [0, π), got {m}");
        Ok(())
    }
}

/// ArcFace head: `z_y = s·φ(cos θ_y)` with `φ ≈ cos(θ_y + m)` per [`ArcFaceGradient`],
/// `z_j = s·cos θ_j` for `j ≠ y`. The combined margin `(1, m, 0)`.
///
/// # Shapes
/// [`MarginHead::logits`]: `cos_bc [B, C]`, `labels_b [B]` (Int64) -> `[B, C]`.
#[derive(Debug, Clone)]
pub struct ArcFace {
    s: f64,
    m: f64,
    angular: AngularMargin,
}

impl ArcFace {
    /// Builds the head from a (validated) config.
    pub fn new(cfg: &ArcFaceConfig) -> Self {
        Self {
            s: cfg.s,
            m: cfg.m,
            angular: AngularMargin::fixed(cfg.m, cfg.gradient),
        }
    }

    /// The margin `m`.
    pub fn margin(&self) -> f64 {
        self.m
    }
}

impl MarginHead for ArcFace {
    fn row_scaled_logits(&self) -> bool {
        true
    }

    /// # Shapes
    /// `cos_bc [B, C]`, `labels_b [B]` (Int64) -> `[B, C]`.
    fn logits(&self, cos_bc: &Tensor, labels_b: &Tensor) -> Tensor {
        scaled_targets(cos_bc, labels_b, Scale::Fixed(self.s), |c| {
            self.angular.target(c)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// The eps clamps keep the exact and easy-margin gradients finite at cos θ = ±1.
    #[test]
    fn gradient_is_finite_at_the_poles() {
        for gradient in [ArcFaceGradient::Exact, ArcFaceGradient::EasyMargin] {
            let head = ArcFace::new(&ArcFaceConfig {
                gradient,
                ..Default::default()
            });
            let cos = Tensor::from_slice(&[1.0, 0.0, -1.0, 0.0]).view([2, 2]);
            let cos = cos.set_requires_grad(true);
            let labels = Tensor::from_slice(&[0i64, 0]);
            let z = head.logits(&cos, &labels);
            let g = Tensor::run_backward(
                &[crate::head::cross_entropy(&z, &labels)],
                &[&cos],
                false,
                false,
            );
            let finite = g[0].isfinite().all().int64_value(&[]) == 1;
            assert!(
                finite && z.isfinite().all().int64_value(&[]) == 1,
                "{gradient:?}: {g:?}"
            );
            assert_eq!(g[0].kind(), Kind::Double);
        }
    }
}
