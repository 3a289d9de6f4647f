//! Combined margin: the (m1, m2, m3) parametrisation of insightface's MXNet ArcFace code
//! (Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face
//! Recognition", CVPR 2019, arXiv 1801.07698, section "combined margin").
//!
//! Idea: one target transform that contains the three classic penalties,
//! `z_y = s·(cos(m1·θ_y + m2) − m3)`: `m1` multiplies the angle (SphereFace-like), `m2` adds to
//! it (ArcFace), `m3` subtracts from the cosine (CosFace). `(1, 0, 0)` is NormFace,
//! `(1, 0.5, 0)` ArcFace, `(1, 0, 0.35)` CosFace; MXNet's "combined" preset is `(1, 0.3, 0.2)`.
//!
//! Deliberate differences from the reference code (SPEC 1(b), 1(h)):
//! - Current arcface_torch `CombinedMarginLoss` silently drops `m2` when `m3 > 0` and rejects
//!   `m1 ≠ 1`; we compute the full MXNet expression for every `(m1, m2, m3)`.
//! - The three ArcFace gradient treatments ([`ArcFaceGradient`]) apply here too; the transform is
//!   [`AngularMargin::combined`] in [`crate::angular`]. The threshold
//!   fallback of the `exact` mode is generalised from ArcFace: with `θ* = (π − m2)/m1` (the angle
//!   at which `m1·θ + m2` reaches π), targets with `θ > θ*` use `cos θ − (π − θ*)·sin θ* − m3`,
//!   the first-order expansion of `cos(m1θ + m2) ≈ cos θ − ((m1 − 1)θ + m2)·sin θ` with the
//!   coefficient frozen at `θ*` (for `m1 = 1` exactly ArcFace's `cos θ − m·sin m`). When
//!   `θ* ≥ π` the target angle never wraps and no fallback is used. This generalisation is ours.
//! - For `m1 = 1` no `acos` is evaluated (`cos(θ + m2) = cos θ·cos m2 − sin θ·sin m2`); for
//!   `m1 ≠ 1`, `acos` runs on the `B` gathered target cosines only, after the clamp to
//!   `[−1 + 1e-7, 1 − 1e-7]`.

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use std::f64::consts::PI;
use tch::Tensor;

use crate::angular::{AngularMargin, ArcFaceGradient};
use crate::head::{scaled_targets, validate_scale, MarginHead, Scale};
use crate::normface::default_scale;

/// `[head] type = "combined"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CombinedConfig {
    /// Logit scale `s`. Default 64.
    #[serde(default = "default_scale")]
    pub s: f64,
    /// Angle multiplier `m1`, in `(0, 10]`. Default 1.0 (MXNet "combined").
    #[serde(default = "default_m1")]
    pub m1: f64,
    /// Additive angular margin `m2` in radians, in `[0, π)`. Default 0.3 (MXNet "combined").
    #[serde(default = "default_m2")]
    pub m2: f64,
    /// Cosine margin `m3`, in `[0, 2)`. Default 0.2 (MXNet "combined").
    #[serde(default = "default_m3")]
    pub m3: f64,
    /// Gradient treatment, as for ArcFace: `"exact"` (default; threshold fallback generalised to
    /// `θ* = (π − m2)/m1`), `"easy_margin"` or `"detached"`.
    #[serde(default)]
    pub gradient: ArcFaceGradient,
}

fn default_m1() -> f64 {
    1.0
}
fn default_m2() -> f64 {
    0.3
}
fn default_m3() -> f64 {
    0.2
}

impl Default for CombinedConfig {
    fn default() -> Self {
        Self {
            s: default_scale(),
            m1: default_m1(),
            m2: default_m2(),
            m3: default_m3(),
            gradient: ArcFaceGradient::default(),
        }
    }
}

impl CombinedConfig {
    /// `s` finite and > 0; `m1` in `(0, 10]`; `m2` in `[0, π)`; `m3` in `[0, 2)`. Errors name
    /// the field.
    pub fn validate(&self) -> Result<()> {
        validate_scale(self.s)?;
        let (m1, m2, m3) = (self.m1, self.m2, self.m3);
        ensure!(m1 > 0.0 && m1 <= 10.0, "m1 must be in (0, 10], got {m1}");
        ensure!((0.0..PI).contains(&m2), "m2 must be in [0, π), got {m2}");
        ensure!((0.0..2.0).contains(&m3), "m3 must be in [0, 2), got {m3}");
        Ok(())
    }
}

/// Combined-margin head: `z_y = s·(cos(m1·θ_y + m2) − m3)` (per [`ArcFaceGradient`]),
/// `z_j = s·cos θ_j` for `j ≠ y`.
///
/// # Shapes
/// [`MarginHead::logits`]: `cos_bc [B, C]`, `labels_b [B]` (Int64) -> `[B, C]`.
#[derive(Debug, Clone)]
pub struct CombinedMargin {
    s: f64,
    angular: AngularMargin,
}

impl CombinedMargin {
    /// Builds the head from a (validated) config.
    pub fn new(cfg: &CombinedConfig) -> Self {
        Self {
            s: cfg.s,
            angular: AngularMargin::combined(cfg.m1, cfg.m2, cfg.m3, cfg.gradient),
        }
    }
}

impl MarginHead for CombinedMargin {
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
