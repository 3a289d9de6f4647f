//! AdaFace (quality-adaptive margin): Kim, Jain, Liu, "AdaFace: Quality Adaptive Margin for Face
//! Recognition", CVPR 2022, arXiv 2204.00964.
//!
//! Idea: the feature norm `‖x_i‖` is a proxy of image quality. Normalised by moving batch
//! statistics, `ẑ_i = clip((‖x_i‖ − μ)/(σ/h), −1, 1)`, it sets an angular and an additive margin
//! per sample, `g_angle = −m·ẑ_i`, `g_add = m·ẑ_i + m`, and the target logit is
//! `s·(cos(θ_y + g_angle) − g_add)`: low-quality samples (`ẑ = −1`) get ArcFace's `cos(θ + m)`,
//! average ones (`ẑ = 0`) CosFace's `cos θ − m`, high-quality ones (`ẑ = 1`) `cos(θ − m) − 2m`.
//! Defaults s = 64, m = 0.4, h = 0.333, α = 0.01 (`μ ← α·μ_step + (1 − α)·μ`, the same for `σ`),
//! `μ₀ = 20`, `σ₀ = 100` (the released initial values).
//!
//! The norms are detached (no gradient reaches the backbone through the margin) and clamped to
//! `[0.001, 100]`; `σ` is the unbiased standard deviation and `ε = 1e-3` is added to it before
//! dividing. `cos(θ_y + g_angle)` is [`AngularMargin::per_row`] with the `exact` gradient.
//!
//! Deliberate differences from the paper's description and the reference code:
//! - `μ` and `σ` move **once per optimiser step**, in [`MarginHead::end_step`], from every row of
//!   the step (all micro-batches under gradient accumulation); the step's logits use the
//!   statistics of the previous steps (the reference updates them in the forward pass first).
//!   The logits are then a pure function of inputs and state.
//! - The angle is not clamped to `[ε, π − ε]` after adding `g_angle`: for `g_angle < 0` and
//!   `θ < |g_angle|` the target is the exact `cos(θ + g_angle)`; past `θ + g_angle = π` the per-row
//!   room's fallback `cos θ − g_angle·sin g_angle` applies (as for every per-row angular head).
//! - Without feature norms ([`MarginHead::logits`]) every sample counts as average, `ẑ = 0`.
//! - Under data parallelism each process keeps its own statistics (no all-reduce); a skipped step
//!   (AMP overflow) still moves them. They are checkpointed as `head.norm_mean`, `head.norm_std`.

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tch::{Kind, Tensor};

use crate::angular::{AngularMargin, ArcFaceGradient};
use crate::head::{
    check_head_inputs, cross_entropy, scaled_targets, validate_scale, MarginHead, Scale,
};
use crate::normface::default_scale;

/// Feature norms are clamped to `[NORM_MIN, NORM_MAX]` before the statistics and `ẑ`.
pub const NORM_MIN: f64 = 0.001;
/// See [`NORM_MIN`].
pub const NORM_MAX: f64 = 100.0;
/// Added to `σ` before dividing.
pub const STD_EPS: f64 = 1e-3;
/// Initial moving mean of the norms.
pub const INIT_MEAN: f64 = 20.0;
/// Initial moving standard deviation of the norms.
pub const INIT_STD: f64 = 100.0;

/// `[head] type = "adaface"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdaFaceConfig {
    /// Logit scale `s`. Default 64.
    #[serde(default = "default_scale")]
    pub s: f64,
    /// Margin `m`, in `[0, 1]`. Default 0.4.
    #[serde(default = "default_margin")]
    pub m: f64,
    /// Concentration `h` of the normalised norm (`ẑ = (‖x‖ − μ)·h/σ`), in `(0, 10]`. Default 0.333.
    #[serde(default = "default_h")]
    pub h: f64,
    /// Weight `α` of the step's statistics in the moving mean and std, in `[0, 1]`. Default 0.01.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
}

fn default_margin() -> f64 {
    0.4
}

fn default_h() -> f64 {
    0.333
}

fn default_alpha() -> f64 {
    0.01
}

impl Default for AdaFaceConfig {
    fn default() -> Self {
        Self {
            s: default_scale(),
            m: default_margin(),
            h: default_h(),
            alpha: default_alpha(),
        }
    }
}

impl AdaFaceConfig {
    /// `s` finite and > 0; `m` in `[0, 1]` (so `θ ± m` stays within one half-turn of `θ`); `h` in
    /// `(0, 10]`; `alpha` in `[0, 1]`.
    pub fn validate(&self) -> Result<()> {
        validate_scale(self.s)?;
        let (m, h, a) = (self.m, self.h, self.alpha);
        ensure!((0.0..=1.0).contains(&m), "m must be in [0, 1], got {m}");
        ensure!(h > 0.0 && h <= 10.0, "h must be in (0, 10], got {h}");
        ensure!((0.0..=1.0).contains(&a), "alpha must be in [0, 1], got {a}");
        Ok(())
    }
}

/// AdaFace head: `z_y = s·(cos(θ_y + g_angle,i) − g_add,i)`, `z_j = s·cos θ_j`.
///
/// # Shapes
/// [`MarginHead::logits_with_norms`]: `cos_bc [B, C]`, `labels_b [B]` (Int64), `norms_b [B]` ->
/// `[B, C]`.
#[derive(Debug)]
pub struct AdaFace {
    s: f64,
    m: f64,
    h: f64,
    alpha: f64,
    mean: f64,
    std: f64,
    /// `(Σ n, Σ n², count)` of the clamped norms since the last [`MarginHead::end_step`].
    pending: Option<(Tensor, Tensor, i64)>,
}

impl AdaFace {
    /// Builds the head from a (validated) config, with `μ = 20`, `σ = 100`.
    pub fn new(cfg: &AdaFaceConfig) -> Self {
        Self {
            s: cfg.s,
            m: cfg.m,
            h: cfg.h,
            alpha: cfg.alpha,
            mean: INIT_MEAN,
            std: INIT_STD,
            pending: None,
        }
    }

    /// The moving `(μ, σ)` of the feature norms.
    pub fn statistics(&self) -> (f64, f64) {
        (self.mean, self.std)
    }

    /// Sets `(μ, σ)` (tests; [`MarginHead::load_state`] restores them from a checkpoint).
    pub fn set_statistics(&mut self, mean: f64, std: f64) {
        self.mean = mean;
        self.std = std;
    }

    /// `ẑ = clip((clamp(‖x‖) − μ)·h/(σ + ε), −1, 1)`, detached.
    ///
    /// # Shapes
    /// `norms_b [B]` -> `[B]`.
    pub fn normalised_norms(&self, norms_b: &Tensor) -> Tensor {
        let n = norms_b.detach().clamp(NORM_MIN, NORM_MAX);
        ((n - self.mean) * (self.h / (self.std + STD_EPS))).clamp(-1.0, 1.0)
    }

    /// The logits for given `ẑ` (detached constants).
    fn logits_with_zhat(&self, cos_bc: &Tensor, labels_b: &Tensor, zhat_b: &Tensor) -> Tensor {
        let b = check_head_inputs(cos_bc, labels_b);
        let zhat_b1 = zhat_b.to_kind(cos_bc.kind()).view([b, 1]);
        let g_angle = &zhat_b1 * (-self.m);
        let g_add = &zhat_b1 * self.m + self.m;
        let angular = AngularMargin::per_row(&g_angle, ArcFaceGradient::Exact);
        scaled_targets(cos_bc, labels_b, Scale::Fixed(self.s), |c| {
            angular.target(c) - &g_add
        })
    }
}

impl MarginHead for AdaFace {
    /// Without norms: `ẑ = 0`, i.e. CosFace with margin `m`.
    fn logits(&self, cos_bc: &Tensor, labels_b: &Tensor) -> Tensor {
        let zero = Tensor::zeros([cos_bc.size()[0]], (cos_bc.kind(), cos_bc.device()));
        self.logits_with_zhat(cos_bc, labels_b, &zero)
    }

    fn logits_with_norms(&self, cos_bc: &Tensor, labels_b: &Tensor, norms_b: &Tensor) -> Tensor {
        self.logits_with_zhat(cos_bc, labels_b, &self.normalised_norms(norms_b))
    }

    /// Cross-entropy of [`MarginHead::logits_with_norms`]; records the step's norms.
    fn training_loss(
        &mut self,
        cos_bc: &Tensor,
        labels_b: &Tensor,
        _emb: &Tensor,
        norms_b: &Tensor,
    ) -> Tensor {
        self.record_rows(cos_bc, norms_b);
        cross_entropy(&self.logits_with_norms(cos_bc, labels_b, norms_b), labels_b)
    }

    /// Adds the rows' clamped norms to the step's sums.
    fn record_rows(&mut self, _target_cos_b: &Tensor, norms_b: &Tensor) {
        let (s1, s2) = tch::no_grad(|| {
            let n = norms_b
                .detach()
                .to_kind(Kind::Double)
                .clamp(NORM_MIN, NORM_MAX);
            (n.sum(Kind::Double), n.square().sum(Kind::Double))
        });
        let b = norms_b.size()[0];
        self.pending = Some(match self.pending.take() {
            Some((a1, a2, k)) => (a1 + s1, a2 + s2, k + b),
            None => (s1, s2, b),
        });
    }

    /// `μ ← α·μ_step + (1 − α)·μ`, `σ ← α·σ_step + (1 − α)·σ` over the step's rows (`σ` only with
    /// 2+ rows).
    fn end_step(&mut self) {
        if let Some((s1, s2, n)) = self.pending.take() {
            if n == 0 {
                return;
            }
            let (s1, s2, nf) = (s1.double_value(&[]), s2.double_value(&[]), n as f64);
            let mean = s1 / nf;
            self.mean = self.alpha * mean + (1.0 - self.alpha) * self.mean;
            if n > 1 {
                let std = ((s2 - nf * mean * mean).max(0.0) / (nf - 1.0)).sqrt();
                self.std = self.alpha * std + (1.0 - self.alpha) * self.std;
            }
        }
    }

    /// `norm_mean`, `norm_std` as 0-d f64 tensors.
    fn state(&self) -> Vec<(String, Tensor)> {
        vec![
            ("norm_mean".into(), Tensor::from(self.mean)),
            ("norm_std".into(), Tensor::from(self.std)),
        ]
    }

    fn load_state(&mut self, mut state: HashMap<String, Tensor>) -> Result<()> {
        for (key, slot) in [("norm_mean", &mut self.mean), ("norm_std", &mut self.std)] {
            let t = state
                .remove(key)
                .with_context(|| format!("AdaFace state has no `{key}`"))?;
            *slot = f64::try_from(&t.to_kind(Kind::Double))
                .with_context(|| format!("AdaFace state `{key}`"))?;
        }
        crate::head::no_more_state(state, "AdaFace")
    }
}
