//! The angular room: the additive angular margin `cos(θ + m)` on a target cosine, written once.
//!
//! Every head that adds a margin to the target *angle* calls [`AngularMargin::target`]:
//! [`crate::ArcFace`] (`m` fixed), [`crate::CombinedMargin`] (`cos(m1·θ + m2) − m3`),
//! [`crate::ElasticFace`] (Arc variants: a margin per sample), [`crate::ClusterGuidedArcFace`] (a
//! margin per identity) and [`crate::Gce`] (its target margin `m_t`). This file holds the
//! numerical guards they share ([`COS_EPS`], [`SIN2_EPS`]), the three gradient treatments
//! ([`ArcFaceGradient`], SPEC 1(b)) and the threshold fallback of the `exact` mode.
//!
//! `cos(θ + m)` is evaluated as `c·cos m − sin θ·sin m` with `sin θ = sqrt(max(1 − c̃², SIN2_EPS))`
//! on the clamped cosine `c̃ = clamp(c, −1 + COS_EPS, 1 − COS_EPS)`: no `acos`, a finite
//! derivative at `c = ±1`, and within about `4.5e-4·sin m` of `cos(acos(c) + m)` at `|c| = 1`
//! (exact inside the clamps). Only the `sin θ` term sees the clamps, so `m = 0` gives exactly `c`.
//! For `m1 ≠ 1` (the combined margin only) `acos` runs on the clamped gathered cosines.
//!
//! The margin is either one number for the whole batch ([`AngularMargin::fixed`],
//! [`AngularMargin::combined`]: `cos m`, `sin m` and the threshold are computed once in f64) or one
//! value per row ([`AngularMargin::per_row`]: a constant `[B, 1]` tensor, `cos m` and `sin m`
//! computed elementwise in the cosines' kind). Both go through the same [`AngularMargin::target`].

use serde::{Deserialize, Serialize};
use std::f64::consts::PI;
use tch::Tensor;

/// Cosines are clamped to `[−1 + COS_EPS, 1 − COS_EPS]` before `sin θ` (or `acos`) is taken.
pub const COS_EPS: f64 = 1e-7;
/// `sin θ = sqrt(max(1 − cos²θ, SIN2_EPS))`.
pub const SIN2_EPS: f64 = 1e-7;

/// How the additive-angular target logit is differentiated (and, above `θ + m = π`, evaluated).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ArcFaceGradient {
    /// Default. Plain autograd through `φ = cos(θ+m)` with eps clamps, and the threshold fallback
    /// (old arcface_torch / many PyTorch ports): with `th = cos(π − m)` and `mm = m·sin(π − m)`,
    /// `φ = cos(θ+m)` if `cos θ > th`, else `cos θ − mm` (CosFace-like, slope 1; note the fallback
    /// is discontinuous at `th`). Chosen because the ElasticFace and CoReFace ArcFace baselines
    /// were trained with exact autograd (SPEC 1(h)); the fallback keeps the target logit
    /// decreasing in θ past `π − m`.
    #[default]
    Exact,
    /// Exact autograd through `cos(θ+m)`, but only where `cos θ > 0`; samples with `cos θ ≤ 0`
    /// get no margin (`φ = cos θ`).
    EasyMargin,
    /// Current arcface_torch (since Dec 2022): `z = s·(cos + onehot·(cos(θ+m) − cos).detach())`.
    /// The forward value is `s·cos(θ+m)` (wrapping around past π, no threshold); the gradient
    /// w.r.t. the cosines is that of NormFace evaluated at the margin logits,
    /// `∂L/∂cos = s·(softmax(z) − onehot)/B`.
    Detached,
}

/// A margin quantity: one number for the batch, or a constant `[B, 1]` tensor.
#[derive(Debug)]
enum Term {
    Scalar(f64),
    Rows(Tensor),
}

impl Term {
    /// `t · self`.
    fn times(&self, t: &Tensor) -> Tensor {
        match self {
            Term::Scalar(v) => t * *v,
            Term::Rows(r) => t * r,
        }
    }

    /// `t − self`.
    fn subtracted_from(&self, t: &Tensor) -> Tensor {
        match self {
            Term::Scalar(v) => t - *v,
            Term::Rows(r) => t - r,
        }
    }

    /// `t > self`.
    fn below(&self, t: &Tensor) -> Tensor {
        match self {
            Term::Scalar(v) => t.gt(*v),
            Term::Rows(r) => t.gt_tensor(r),
        }
    }

    fn shallow_clone(&self) -> Term {
        match self {
            Term::Scalar(v) => Term::Scalar(*v),
            Term::Rows(r) => Term::Rows(r.shallow_clone()),
        }
    }
}

/// The target transform `φ(c) = cos(m1·acos(c) + m) − m3` with a gradient treatment
/// ([`ArcFaceGradient`]); `m1 = 1`, `m3 = 0` for every head but the combined margin.
///
/// The `exact` treatment's threshold fallback: where `m1·θ + m` would pass π, i.e. at
/// `θ > θ* = (π − m)/m1`, the target is `c − (π − θ*)·sin θ* − m3` instead (for `m1 = 1`:
/// ArcFace's `c − m·sin m` below `th = cos(π − m) = −cos m`). With `θ* ≥ π` there is no fallback.
#[derive(Debug)]
pub struct AngularMargin {
    m1: f64,
    /// The additive margin `m` itself (only read for `m1 ≠ 1`, where `acos` is taken).
    m: f64,
    m3: f64,
    cos_m: Term,
    sin_m: Term,
    /// `(th, drop)`: where `c > th` does not hold, the `exact` target is `c − drop`.
    threshold: Option<(Term, Term)>,
    gradient: ArcFaceGradient,
}

impl Clone for AngularMargin {
    fn clone(&self) -> Self {
        Self {
            m1: self.m1,
            m: self.m,
            m3: self.m3,
            cos_m: self.cos_m.shallow_clone(),
            sin_m: self.sin_m.shallow_clone(),
            threshold: self
                .threshold
                .as_ref()
                .map(|(a, b)| (a.shallow_clone(), b.shallow_clone())),
            gradient: self.gradient,
        }
    }
}

impl AngularMargin {
    /// `cos(θ + m)` with one `m` for every sample (ArcFace, GCE's target margin).
    pub fn fixed(m: f64, gradient: ArcFaceGradient) -> Self {
        Self::combined(1.0, m, 0.0, gradient)
    }

    /// `cos(m1·θ + m2) − m3` (the combined margin; `(1, m, 0)` is [`AngularMargin::fixed`]).
    pub fn combined(m1: f64, m2: f64, m3: f64, gradient: ArcFaceGradient) -> Self {
        let theta_star = (PI - m2) / m1;
        let threshold = (theta_star < PI).then(|| {
            let drop = (PI - theta_star) * theta_star.sin() + m3;
            (Term::Scalar(theta_star.cos()), Term::Scalar(drop))
        });
        Self {
            m1,
            m: m2,
            m3,
            cos_m: Term::Scalar(m2.cos()),
            sin_m: Term::Scalar(m2.sin()),
            threshold,
            gradient,
        }
    }

    /// `cos(θ_i + m_i)` with a margin per row (ElasticFace, cluster-guided ArcFace, AdaFace,
    /// MagFace), of the cosines' kind; the fallback threshold is `−cos m_i` and the fallback
    /// `c − m_i·sin m_i`. Detached margins are constants; a margin that requires a gradient
    /// (MagFace's `m(‖x‖)`) is differentiated through the target and the fallback (not through
    /// the threshold test).
    ///
    /// # Shapes
    /// `m_b1 [B, 1]`.
    pub fn per_row(m_b1: &Tensor, gradient: ArcFaceGradient) -> Self {
        let (cos_m, sin_m) = (m_b1.cos(), m_b1.sin());
        let threshold = Some((Term::Rows(cos_m.neg()), Term::Rows(m_b1 * &sin_m)));
        Self {
            m1: 1.0,
            m: f64::NAN,
            m3: 0.0,
            cos_m: Term::Rows(cos_m),
            sin_m: Term::Rows(sin_m),
            threshold,
            gradient,
        }
    }

    /// The gradient treatment.
    pub fn gradient(&self) -> ArcFaceGradient {
        self.gradient
    }

    /// `cos(m1·θ + m)` from `c = cos θ`, differentiable, with the eps clamps.
    fn cos_angle(&self, c: &Tensor) -> Tensor {
        let c_safe = c.clamp(-1.0 + COS_EPS, 1.0 - COS_EPS);
        if self.m1 == 1.0 {
            let sin = sin_theta_of_clamped(&c_safe);
            self.cos_m.times(c) - self.sin_m.times(&sin)
        } else {
            (c_safe.acos() * self.m1 + self.m).cos()
        }
    }

    /// The target transform `φ(c)` for this gradient mode.
    ///
    /// # Shapes
    /// `c_b1 [B, 1]` (the gathered target cosines) -> `[B, 1]`.
    pub fn target(&self, c_b1: &Tensor) -> Tensor {
        let phi = self.cos_angle(c_b1);
        let phi = if self.m3 != 0.0 { phi - self.m3 } else { phi };
        match self.gradient {
            ArcFaceGradient::Exact => match &self.threshold {
                Some((th, drop)) => phi.where_self(&th.below(c_b1), &drop.subtracted_from(c_b1)),
                None => phi,
            },
            ArcFaceGradient::EasyMargin => phi.where_self(&c_b1.gt(0.0), c_b1),
            ArcFaceGradient::Detached => c_b1 + (phi - c_b1).detach(),
        }
    }
}

/// `sin θ = sqrt(max(1 − c̃², SIN2_EPS))` of an already clamped cosine `c̃`.
fn sin_theta_of_clamped(c_safe: &Tensor) -> Tensor {
    (c_safe.square().neg() + 1.0).clamp_min(SIN2_EPS).sqrt()
}
