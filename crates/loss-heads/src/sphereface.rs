//! SphereFace (A-Softmax): Liu, Wen, Yu, Li, Raj, Song, "SphereFace: Deep Hypersphere Embedding
//! for Face Recognition", CVPR 2017, arXiv 1704.08063.
//!
//! Idea: multiply the target *angle* by an integer `m` (default 4). Because `cos(mθ)` is not
//! monotone on `[0, π]`, the paper uses `ψ(θ) = (−1)^k·cos(mθ) − 2k` for
//! `θ ∈ [kπ/m, (k+1)π/m]`, which is continuous and decreasing. Weights are normalised, the
//! feature norm is kept: `z_y = ‖x‖·ψ(θ_y)`, `z_j = ‖x‖·cos θ_j`. Training starts from softmax and
//! anneals: `z_y = ‖x‖·(λ·cos θ_y + ψ(θ_y))/(1 + λ)` with
//! `λ = max(λ_min, base·(1 + γ·it)^(−power))` (released defaults 1000, 0.12, 1, 5; SPEC 1(b)).
//!
//! Notes on this implementation:
//! - `cos(mθ)` is the Chebyshev polynomial `T_m(cos θ)`, as in the released code, so its gradient
//!   needs no `acos`; `k = ⌊m·acos(cos θ)/π⌋` is piecewise constant and computed (detached) on the
//!   `B` gathered target cosines only.
//! - The row scale is a config choice, [`SphereFaceScale`]: `feature_norm` (default, the paper's
//!   A-Softmax: [`MarginHead::logits_with_norms`] scales row `i` by `‖x_i‖`) or `fixed` (every
//!   row by `s`, the normalised-feature variant of later re-implementations).
//!   [`MarginHead::logits`] has no feature norms and always scales by `s`. The trainer always
//!   passes the norms, so there `s` acts only with `scale = "fixed"` (and setting it otherwise
//!   is a config error naming `head.s`). The iteration comes from [`MarginHead::set_step`]
//!   (λ = base before the first call).

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use std::f64::consts::PI;
use tch::Tensor;

use crate::angular::COS_EPS;
use crate::head::MarginHead;
use crate::normface::default_scale;

/// What multiplies SphereFace's logits (`[head] scale`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum SphereFaceScale {
    /// Default. Row `i` by its feature norm `‖x_i‖` when the caller passes the norms
    /// ([`MarginHead::logits_with_norms`], as the trainer does): the paper's A-Softmax.
    #[default]
    FeatureNorm,
    /// Every row by the fixed `s`, also when norms are passed.
    Fixed,
}

/// `[head] type = "sphereface"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SphereFaceConfig {
    /// Angle multiplier `m`, an integer in `1..=8`. Default 4.
    #[serde(default = "default_m")]
    pub m: u32,
    /// Row scale: `"feature_norm"` (default, `‖x_i‖`) or `"fixed"` (`s`).
    #[serde(default)]
    pub scale: SphereFaceScale,
    /// Fixed logit scale: used by [`MarginHead::logits`] (no norms given) and, with
    /// `scale = "fixed"`, by [`MarginHead::logits_with_norms`]. Default 64.
    #[serde(default = "default_scale")]
    pub s: f64,
    /// λ schedule `base`. Default 1000.
    #[serde(default = "default_base")]
    pub lambda_base: f64,
    /// λ schedule `γ`. Default 0.12.
    #[serde(default = "default_gamma")]
    pub lambda_gamma: f64,
    /// λ schedule `power`. Default 1.
    #[serde(default = "default_power")]
    pub lambda_power: f64,
    /// λ floor `λ_min`. Default 5.
    #[serde(default = "default_lambda_min")]
    pub lambda_min: f64,
}

fn default_m() -> u32 {
    4
}
fn default_base() -> f64 {
    1000.0
}
fn default_gamma() -> f64 {
    0.12
}
fn default_power() -> f64 {
    1.0
}
fn default_lambda_min() -> f64 {
    5.0
}

impl Default for SphereFaceConfig {
    fn default() -> Self {
        Self {
            m: default_m(),
            scale: SphereFaceScale::default(),
            s: default_scale(),
            lambda_base: default_base(),
            lambda_gamma: default_gamma(),
            lambda_power: default_power(),
            lambda_min: default_lambda_min(),
        }
    }
}

impl SphereFaceConfig {
    /// `m` in `1..=8`; `s` finite and > 0; `lambda_*` finite and ≥ 0. Errors name the field.
    pub fn validate(&self) -> Result<()> {
        crate::head::validate_scale(self.s)?;
        let m = self.m;
        ensure!((1..=8).contains(&m), "m must be in 1..=8, got {m}");
        for (key, v) in [
            ("lambda_base", self.lambda_base),
            ("lambda_gamma", self.lambda_gamma),
            ("lambda_power", self.lambda_power),
            ("lambda_min", self.lambda_min),
        ] {
            ensure!(
                v.is_finite() && v >= 0.0,
                "{key} must be finite and >= 0, got {v}"
            );
        }
        Ok(())
    }

    /// `λ(it) = max(λ_min, base·(1 + γ·it)^(−power))`.
    pub fn lambda_at(&self, step: u64) -> f64 {
        let annealed =
            self.lambda_base * (1.0 + self.lambda_gamma * step as f64).powf(-self.lambda_power);
        annealed.max(self.lambda_min)
    }
}

/// SphereFace head: `z_y = r·(λ·cos θ_y + ψ(θ_y))/(1 + λ)`, `z_j = r·cos θ_j`, with `r = s`
/// ([`MarginHead::logits`], or [`SphereFaceScale::Fixed`]) or `r = ‖x_i‖`
/// ([`MarginHead::logits_with_norms`] with [`SphereFaceScale::FeatureNorm`]).
///
/// # Shapes
/// `cos_bc [B, C]`, `labels_b [B]` (Int64), `norms_b [B]` -> `[B, C]`.
#[derive(Debug, Clone)]
pub struct SphereFace {
    cfg: SphereFaceConfig,
    lambda: f64,
}

impl SphereFace {
    /// Builds the head from a (validated) config, at iteration 0.
    pub fn new(cfg: &SphereFaceConfig) -> Self {
        Self {
            cfg: cfg.clone(),
            lambda: cfg.lambda_at(0),
        }
    }

    /// The current annealing weight λ.
    pub fn lambda(&self) -> f64 {
        self.lambda
    }

    /// `ψ(θ) = (−1)^k·T_m(cos θ) − 2k`, `k = ⌊m·θ/π⌋` clamped to `m − 1`.
    ///
    /// # Shapes
    /// `c [*]` -> `[*]`.
    pub fn psi(&self, c: &Tensor) -> Tensor {
        let m = self.cfg.m as i64;
        let k = tch::no_grad(|| {
            let theta = c.clamp(-1.0 + COS_EPS, 1.0 - COS_EPS).acos();
            (theta * (m as f64 / PI)).floor().clamp(0.0, (m - 1) as f64)
        });
        // Chebyshev recurrence T_{n+1} = 2c·T_n − T_{n−1}.
        let (mut prev, mut cur) = (c.ones_like(), c.shallow_clone());
        for _ in 1..m {
            let next = c * &cur * 2.0 - &prev;
            prev = cur;
            cur = next;
        }
        let sign = (k.remainder(2.0) * -2.0) + 1.0;
        cur * sign - k * 2.0
    }

    /// The annealed target `(λ·c + ψ(c))/(1 + λ)`.
    fn target(&self, c_b1: &Tensor) -> Tensor {
        (c_b1 * self.lambda + self.psi(c_b1)) / (1.0 + self.lambda)
    }
}

impl MarginHead for SphereFace {
    fn row_scaled_logits(&self) -> bool {
        true
    }

    /// Scaled by `s`.
    ///
    /// # Shapes
    /// `cos_bc [B, C]`, `labels_b [B]` (Int64) -> `[B, C]`.
    fn logits(&self, cos_bc: &Tensor, labels_b: &Tensor) -> Tensor {
        crate::head::scaled_targets(
            cos_bc,
            labels_b,
            crate::head::Scale::Fixed(self.cfg.s),
            |c| self.target(c),
        )
    }

    fn set_step(&mut self, step: u64) {
        self.lambda = self.cfg.lambda_at(step);
    }

    /// Scaled by the feature norm of each row (the paper's A-Softmax), or by `s` with
    /// [`SphereFaceScale::Fixed`] (then `norms_b` is ignored).
    ///
    /// # Shapes
    /// `cos_bc [B, C]`, `labels_b [B]` (Int64), `norms_b [B]` -> `[B, C]`.
    fn logits_with_norms(&self, cos_bc: &Tensor, labels_b: &Tensor, norms_b: &Tensor) -> Tensor {
        if self.cfg.scale == SphereFaceScale::Fixed {
            return self.logits(cos_bc, labels_b);
        }
        let b = crate::head::check_head_inputs(cos_bc, labels_b);
        let r_b1 = norms_b.view([b, 1]);
        crate::head::scaled_targets(cos_bc, labels_b, crate::head::Scale::PerRow(&r_b1), |c| {
            self.target(c)
        })
    }
}
