//! Cluster-guided ArcFace: the margin head of Zhenduo Zhang, "Improved Face Representation via
//! Joint Label Classification and Supervised Contrastive Clustering", arXiv 2312.04029.
//!
//! Idea: ArcFace with a per-identity angular margin set from how hard the identity is to cluster
//! (SPEC 4(c)): `z_y = s·cos(θ_y + m_y)`, `m_c = clip(m0 ± slope·(h_c − h̄), m_min, m_max)`. Only
//! the abstract is public, so the rule is OUR READING (SPEC section 4, "Proposed faithful
//! reading"; every choice in `docs/cluster-guided.md`).
//!
//! This file holds the head ([`ClusterGuidedArcFace`], its margin table a checkpointed buffer),
//! its config ([`ClusterMarginConfig`]) and the margin-from-hardness rule
//! ([`margins_from_hardness`]). The hardness itself, the cluster centres, `L_scc`, `L_align` and
//! re-imprinting are clustering's (`facerec_clustering::cluster_guided`); the trainer composes
//! the two into the `[cluster_guided]` objective. The margin goes through the shared
//! [`AngularMargin::per_row`] of [`crate::angular`].

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

use crate::angular::{AngularMargin, ArcFaceGradient};
use crate::head::{scaled_targets, validate_scale, MarginHead, Scale};

/// Sign of the margin's dependence on hardness.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum MarginSign {
    /// Harder identities get a larger margin (compress scattered identities). Default.
    #[default]
    HarderLarger,
    /// Harder identities get a smaller margin (forgive hard or noisy identities).
    HarderSmaller,
}

/// The cluster-guided head and its margin rule (the trainer's `[cluster_guided.margin]` table):
/// `m_c = clip(m0 ± slope·(h_c − h̄), m_min, m_max)`, `h̄` the mean hardness of the identities
/// seen at the refresh; unseen identities get `m0`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterMarginConfig {
    /// Logit scale `s`. Default 64.
    #[serde(default = "default_s")]
    pub s: f64,
    /// Base margin `m0` (radians). Default 0.5 (ArcFace's).
    #[serde(default = "default_m0")]
    pub m0: f64,
    /// Slope `λ` (>= 0; the direction is `sign`). 0 gives exactly ArcFace with `m = m0`. Default 0.2.
    #[serde(default = "default_slope")]
    pub slope: f64,
    /// Smallest margin. Default 0.3.
    #[serde(default = "default_m_min")]
    pub m_min: f64,
    /// Largest margin. Default 0.7.
    #[serde(default = "default_m_max")]
    pub m_max: f64,
    /// `"harder_larger"` (default) or `"harder_smaller"`.
    #[serde(default)]
    pub sign: MarginSign,
    /// ArcFace gradient treatment: `"exact"` (default), `"easy_margin"`, `"detached"`.
    #[serde(default)]
    pub gradient: ArcFaceGradient,
}

fn default_s() -> f64 {
    64.0
}
fn default_m0() -> f64 {
    0.5
}
fn default_slope() -> f64 {
    0.2
}
fn default_m_min() -> f64 {
    0.3
}
fn default_m_max() -> f64 {
    0.7
}

impl Default for ClusterMarginConfig {
    fn default() -> Self {
        Self {
            s: default_s(),
            m0: default_m0(),
            slope: default_slope(),
            m_min: default_m_min(),
            m_max: default_m_max(),
            sign: MarginSign::default(),
            gradient: ArcFaceGradient::default(),
        }
    }
}

impl ClusterMarginConfig {
    /// `s > 0`, `slope >= 0`, `0 <= m_min <= m0 <= m_max < π`. Errors name the field.
    pub fn validate(&self) -> Result<()> {
        validate_scale(self.s)?;
        ensure!(
            self.slope.is_finite() && self.slope >= 0.0,
            "slope must be finite and >= 0, got {}",
            self.slope
        );
        ensure!(
            0.0 <= self.m_min
                && self.m_min <= self.m0
                && self.m0 <= self.m_max
                && self.m_max < std::f64::consts::PI,
            "need 0 <= m_min <= m0 <= m_max < π, got m_min {} m0 {} m_max {}",
            self.m_min,
            self.m0,
            self.m_max
        );
        Ok(())
    }
}

/// `m_c = clip(m0 ± slope·(h_c − h̄), m_min, m_max)` (SPEC 4(c)); `h̄` is the mean over the seen
/// identities; unseen ones (NaN hardness) get `m0`.
pub fn margins_from_hardness(hardness: &[f64], cfg: &ClusterMarginConfig) -> Vec<f64> {
    let seen: Vec<f64> = hardness.iter().copied().filter(|h| !h.is_nan()).collect();
    let mean = if seen.is_empty() {
        0.0
    } else {
        seen.iter().sum::<f64>() / seen.len() as f64
    };
    let sign = match cfg.sign {
        MarginSign::HarderLarger => 1.0,
        MarginSign::HarderSmaller => -1.0,
    };
    hardness
        .iter()
        .map(|&h| {
            if h.is_nan() || cfg.slope == 0.0 {
                cfg.m0
            } else {
                (cfg.m0 + sign * cfg.slope * (h - mean)).clamp(cfg.m_min, cfg.m_max)
            }
        })
        .collect()
}

/// ArcFace with a per-identity margin: `z_y = s·cos(θ_y + m_y)`, `z_j = s·cos θ_j` (SPEC 4(c)).
///
/// The margin table `margins [C]` is a non-trainable f32 variable registered under the path given
/// to [`ClusterGuidedArcFace::new`], so a `VarStore` checkpoint carries it; it starts at `m0`
/// everywhere (plain ArcFace until the first refresh). The target transform is
/// [`AngularMargin::per_row`], ArcFace's with the same clamps and the same three
/// [`ArcFaceGradient`] treatments (the `exact` fallback `c − m_y·sin m_y` below `cos(π − m_y)`),
/// so with a constant table it equals [`crate::ArcFace`] up to rounding.
///
/// With Partial FC the head sees cosines against a sampled class subset and remapped labels; use
/// [`ClusterGuidedArcFace::logits_for_classes`] with the original labels.
#[derive(Debug)]
pub struct ClusterGuidedArcFace {
    s: f64,
    gradient: ArcFaceGradient,
    margins_c: Tensor,
}

impl ClusterGuidedArcFace {
    /// Registers `margins [num_classes]` (filled with `cfg.m0`) under `p`.
    ///
    /// # Panics
    /// If `cfg` is invalid or `num_classes < 1`.
    pub fn new(p: &nn::Path, num_classes: i64, cfg: &ClusterMarginConfig) -> Self {
        if let Err(e) = cfg.validate() {
            panic!("ClusterGuidedArcFace::new: {e:#}");
        }
        assert!(num_classes >= 1, "ClusterGuidedArcFace needs C >= 1");
        let t = Tensor::full([num_classes], cfg.m0, (Kind::Float, p.device()));
        let margins_c = p.add("margins", t, false);
        Self {
            s: cfg.s,
            gradient: cfg.gradient,
            margins_c,
        }
    }

    /// A head over a given margin table `[C]` (not registered anywhere; tests, tools).
    pub fn with_margins(margins_c: Tensor, s: f64, gradient: ArcFaceGradient) -> Self {
        Self {
            s,
            gradient,
            margins_c,
        }
    }

    /// The margin table `[C]`.
    pub fn margins(&self) -> &Tensor {
        &self.margins_c
    }

    /// Overwrites the margin table (under `no_grad`).
    ///
    /// # Panics
    /// If `margins.len() != C`.
    pub fn set_margins(&mut self, margins: &[f64]) {
        let c = self.margins_c.size()[0];
        assert_eq!(margins.len() as i64, c, "one margin per class");
        let src = Tensor::from_slice(margins)
            .to_kind(self.margins_c.kind())
            .to_device(self.margins_c.device());
        tch::no_grad(|| self.margins_c.copy_(&src));
    }

    /// Logits with the margins of classes `classes_b` (global ids) on the target entries given by
    /// `labels_b` (column ids of `cos_bc`; equal to `classes_b` without Partial FC).
    ///
    /// # Shapes
    /// `cos_bc [B, C']`, `labels_b [B]`, `classes_b [B]` (Int64) -> `[B, C']`.
    ///
    /// # Panics
    /// As [`MarginHead::logits`], or if a class is outside the table.
    pub fn logits_for_classes(
        &self,
        cos_bc: &Tensor,
        labels_b: &Tensor,
        classes_b: &Tensor,
    ) -> Tensor {
        let kind = if cos_bc.kind() == Kind::Double {
            Kind::Double
        } else {
            Kind::Float
        };
        let m_b1 = self
            .margins_c
            .detach()
            .index_select(0, classes_b)
            .to_kind(kind)
            .view([-1, 1]);
        self.logits_with_margins(cos_bc, labels_b, &m_b1)
    }

    /// This head for one batch whose rows have the global classes `classes_b`: a
    /// [`MarginHead`] holding the `B` margins `m_{y_i}`, so that it works wherever the labels are
    /// column positions rather than class ids (a Partial FC subset, or
    /// [`crate::sharded_cross_entropy`], which points every label at an extra column).
    ///
    /// # Shapes
    /// `classes_b [B]` (Int64, global class ids).
    ///
    /// # Panics
    /// If a class is outside the table.
    pub fn for_classes(&self, classes_b: &Tensor) -> RowMarginArcFace {
        RowMarginArcFace {
            s: self.s,
            gradient: self.gradient,
            m_b1: self
                .margins_c
                .detach()
                .index_select(0, classes_b)
                .view([-1, 1]),
        }
    }

    /// Logits for explicit per-sample margins (constants).
    ///
    /// # Shapes
    /// `cos_bc [B, C']`, `labels_b [B]` (Int64), `m_b1 [B, 1]` -> `[B, C']`.
    pub fn logits_with_margins(&self, cos_bc: &Tensor, labels_b: &Tensor, m_b1: &Tensor) -> Tensor {
        let angular = AngularMargin::per_row(m_b1, self.gradient);
        scaled_targets(cos_bc, labels_b, Scale::Fixed(self.s), |c| {
            angular.target(c)
        })
    }
}

impl MarginHead for ClusterGuidedArcFace {
    /// # Shapes
    /// `cos_bc [B, C]` (all classes), `labels_b [B]` (Int64) -> `[B, C]`.
    ///
    /// # Panics
    /// If `C` differs from the margin table's length (a Partial FC subset: use
    /// [`ClusterGuidedArcFace::logits_for_classes`]).
    fn logits(&self, cos_bc: &Tensor, labels_b: &Tensor) -> Tensor {
        assert_eq!(
            cos_bc.size().get(1).copied(),
            Some(self.margins_c.size()[0]),
            "cluster-guided ArcFace over a class subset: call logits_for_classes"
        );
        self.logits_for_classes(cos_bc, labels_b, labels_b)
    }
}

/// ArcFace with one fixed margin per row, `z_y = s·cos(θ_y + m_i)`: the cluster-guided head for
/// one batch ([`ClusterGuidedArcFace::for_classes`]).
#[derive(Debug)]
pub struct RowMarginArcFace {
    s: f64,
    gradient: ArcFaceGradient,
    m_b1: Tensor,
}

impl MarginHead for RowMarginArcFace {
    fn row_scaled_logits(&self) -> bool {
        true
    }

    /// # Shapes
    /// `cos_bc [B, C']`, `labels_b [B]` (Int64, column positions) -> `[B, C']`.
    ///
    /// # Panics
    /// If `B` differs from the batch the margins were taken for.
    fn logits(&self, cos_bc: &Tensor, labels_b: &Tensor) -> Tensor {
        let kind = if cos_bc.kind() == Kind::Double {
            Kind::Double
        } else {
            Kind::Float
        };
        let angular = AngularMargin::per_row(&self.m_b1.to_kind(kind), self.gradient);
        scaled_targets(cos_bc, labels_b, Scale::Fixed(self.s), |c| {
            angular.target(c)
        })
    }
}
