//! CurricularFace (adaptive curriculum learning loss): Huang, Wang, Tai, Liu, Shen, Li, Li, Huang,
//! "CurricularFace: Adaptive Curriculum Learning Loss for Deep Face Recognition", CVPR 2020,
//! arXiv 2004.00288.
//!
//! Idea: the target keeps ArcFace's `s·cos(θ_y + m)`; a *hard* negative (`cos θ_j > cos(θ_y + m)`)
//! gets `s·cos θ_j·(t + cos θ_j)` instead of `s·cos θ_j`, where `t` is an exponential moving
//! average of the batches' mean target cosine. Early in training `t ≈ 0` shrinks hard negatives
//! (easy samples first); as `t` grows they are emphasised. Defaults s = 64, m = 0.5, α = 0.01
//! (`t ← α·r + (1 − α)·t`, `r` the mean target cosine, `t₀ = 0`).
//!
//! The target `cos(θ_y + m)` (and its fallback `cos θ_y − m·sin m` past `θ_y = π − m`) is
//! [`AngularMargin::fixed`] with the `exact` gradient; hard negatives are chosen on detached
//! values (the mask carries no gradient) and `t` is a constant in the graph.
//!
//! Deliberate differences from the paper's description and the reference code:
//! - `t` moves **once per optimiser step**, in [`MarginHead::end_step`], from the mean target
//!   cosine of every row the step saw (all micro-batches under gradient accumulation, the full
//!   batch); the step's logits use the `t` of the previous steps. The reference updates `t` inside
//!   the forward pass before using it, i.e. with the current batch; with α = 0.01 the lag of one
//!   step changes `t` by at most 2α, and it makes the logits a pure function of the inputs and the
//!   state (gradient checks, the fused-loss probe, identical micro-batches under accumulation).
//! - A skipped step (AMP overflow) still moves `t` (its forward pass happened).
//! - Under data parallelism each process keeps its own `t` from its own rows (no all-reduce).
//! - `t` is checkpointed (`head.t` in the objective state) so a resumed run continues exactly.

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::f64::consts::PI;
use tch::{Kind, Tensor};

use crate::angular::{AngularMargin, ArcFaceGradient};
use crate::head::{check_head_inputs, cross_entropy, validate_scale, MarginHead};
use crate::normface::default_scale;

/// `[head] type = "curricularface"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CurricularFaceConfig {
    /// Logit scale `s`. Default 64.
    #[serde(default = "default_scale")]
    pub s: f64,
    /// Angular margin `m` in radians, in `[0, π)`. Default 0.5.
    #[serde(default = "default_margin")]
    pub m: f64,
    /// Weight `α` of the step's mean target cosine in the moving average of `t`, in `[0, 1]`.
    /// Default 0.01 (the paper's momentum 0.99 on the old value).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
}

fn default_margin() -> f64 {
    0.5
}

fn default_alpha() -> f64 {
    0.01
}

impl Default for CurricularFaceConfig {
    fn default() -> Self {
        Self {
            s: default_scale(),
            m: default_margin(),
            alpha: default_alpha(),
        }
    }
}

impl CurricularFaceConfig {
    /// `s` finite and > 0; `m` in `[0, π)`; `alpha` in `[0, 1]`.
    pub fn validate(&self) -> Result<()> {
        validate_scale(self.s)?;
        let (m, a) = (self.m, self.alpha);
        ensure!((0.0..PI).contains(&m), "m must be in [0, π), got {m}");
        ensure!((0.0..=1.0).contains(&a), "alpha must be in [0, 1], got {a}");
        Ok(())
    }
}

/// CurricularFace head: `z_y = s·φ(cos θ_y)` (ArcFace's exact target), `z_j = s·N(t, cos θ_j)`
/// with `N = cos θ_j·(t + cos θ_j)` where `cos θ_j > φ(cos θ_y)` and `cos θ_j` elsewhere.
///
/// # Shapes
/// [`MarginHead::logits`]: `cos_bc [B, C]`, `labels_b [B]` (Int64) -> `[B, C]`.
#[derive(Debug)]
pub struct CurricularFace {
    s: f64,
    alpha: f64,
    angular: AngularMargin,
    t: f64,
    /// Sum of the detached target cosines seen since the last [`MarginHead::end_step`], and their
    /// count.
    pending: Option<(Tensor, i64)>,
}

impl CurricularFace {
    /// Builds the head from a (validated) config, with `t = 0`.
    pub fn new(cfg: &CurricularFaceConfig) -> Self {
        Self {
            s: cfg.s,
            alpha: cfg.alpha,
            angular: AngularMargin::fixed(cfg.m, ArcFaceGradient::Exact),
            t: 0.0,
            pending: None,
        }
    }

    /// The current `t`.
    pub fn t(&self) -> f64 {
        self.t
    }

    /// Sets `t` (tests; [`MarginHead::load_state`] restores it from a checkpoint).
    pub fn set_t(&mut self, t: f64) {
        self.t = t;
    }
}

impl MarginHead for CurricularFace {
    /// # Shapes
    /// `cos_bc [B, C]`, `labels_b [B]` (Int64) -> `[B, C]`.
    fn logits(&self, cos_bc: &Tensor, labels_b: &Tensor) -> Tensor {
        let idx_b1 = labels_b.view([check_head_inputs(cos_bc, labels_b), 1]);
        let phi_b1 = self.angular.target(&cos_bc.gather(1, &idx_b1, false));
        let hard_bc = cos_bc.detach().gt_tensor(&phi_b1.detach());
        let weighted_bc = cos_bc * (cos_bc + self.t);
        weighted_bc
            .where_self(&hard_bc, cos_bc)
            .scatter(1, &idx_b1, &phi_b1)
            * self.s
    }

    /// Cross-entropy of [`MarginHead::logits`]; records the step's target cosines for `t`.
    fn training_loss(
        &mut self,
        cos_bc: &Tensor,
        labels_b: &Tensor,
        _emb: &Tensor,
        norms: &Tensor,
    ) -> Tensor {
        let b = check_head_inputs(cos_bc, labels_b);
        let target_b = tch::no_grad(|| cos_bc.detach().gather(1, &labels_b.view([b, 1]), false));
        self.record_rows(&target_b.view([b]), norms);
        cross_entropy(&self.logits(cos_bc, labels_b), labels_b)
    }

    /// Adds the rows' target cosines to the step's sum.
    fn record_rows(&mut self, target_cos_b: &Tensor, _norms_b: &Tensor) {
        let b = target_cos_b.size()[0];
        let sum = tch::no_grad(|| target_cos_b.detach().sum(Kind::Double));
        self.pending = Some(match self.pending.take() {
            Some((s, n)) => (s + sum, n + b),
            None => (sum, b),
        });
    }

    /// `t ← α·r + (1 − α)·t`, `r` the mean target cosine of the step's rows (no-op without rows).
    fn end_step(&mut self) {
        if let Some((sum, n)) = self.pending.take() {
            if n > 0 {
                let r = sum.double_value(&[]) / n as f64;
                self.t = self.alpha * r + (1.0 - self.alpha) * self.t;
            }
        }
    }

    /// `t` as a 0-d f64 tensor.
    fn state(&self) -> Vec<(String, Tensor)> {
        vec![("t".into(), Tensor::from(self.t))]
    }

    fn load_state(&mut self, mut state: HashMap<String, Tensor>) -> Result<()> {
        let t = state
            .remove("t")
            .context("CurricularFace state has no `t`")?;
        self.t = f64::try_from(&t.to_kind(Kind::Double)).context("CurricularFace state `t`")?;
        crate::head::no_more_state(state, "CurricularFace")
    }
}
