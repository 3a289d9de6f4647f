//! [`HeadConfig`]: the `[head]` table of a training config, one variant per head, and the
//! factory that builds the head it names.

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::adaface::{AdaFace, AdaFaceConfig};
use crate::arcface::{ArcFace, ArcFaceConfig};
use crate::classifier::ClassifierKind;
use crate::combined::{CombinedConfig, CombinedMargin};
use crate::cosface::{CosFace, CosFaceConfig};
use crate::curricularface::{CurricularFace, CurricularFaceConfig};
use crate::elastic::{
    ElasticArcConfig, ElasticArcPlusConfig, ElasticCosConfig, ElasticCosPlusConfig, ElasticFace,
};
use crate::gce::{Gce, GceConfig};
use crate::head::MarginHead;
use crate::magface::{MagFace, MagFaceConfig};
use crate::normface::{NormFace, NormFaceConfig};
use crate::softmax::{Softmax, SoftmaxConfig};
use crate::sphereface::{SphereFace, SphereFaceConfig};
use crate::subcenter::SubCenterArcFaceConfig;

/// Which margin head to train with; the `[head]` table of a training config, tagged by `type`.
///
/// ```toml
/// [head]
/// type = "arcface"   # "softmax" | "normface" | "sphereface" | "cosface" | "arcface" | "combined"
///                    # | "elastic_arc" | "elastic_cos" | "elastic_arc_plus" | "elastic_cos_plus" | "gce"
///                    # | "curricularface" | "adaface" | "subcenter_arcface" | "magface"
/// s = 64.0
/// m = 0.5
/// gradient = "exact" # "exact" | "easy_margin" | "detached"
/// ```
/// Missing fields take the documented defaults of each variant's config struct; unknown fields
/// are an error. The default head is ArcFace (s = 64, m = 0.5).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum HeadConfig {
    /// Plain softmax over `Wx + b` (needs the [`crate::LinearClassifier`]: [`ClassifierKind::Linear`]).
    Softmax(SoftmaxConfig),
    /// NormFace: `z_j = s·cos θ_j`.
    Normface(NormFaceConfig),
    /// SphereFace (A-Softmax): `z_y = ‖x‖·(λ cos θ_y + ψ(θ_y))/(1 + λ)`.
    Sphereface(SphereFaceConfig),
    /// CosFace: `z_y = s·(cos θ_y − m)`.
    Cosface(CosFaceConfig),
    /// ArcFace: `z_y = s·cos(θ_y + m)`.
    Arcface(ArcFaceConfig),
    /// Combined margin: `z_y = s·(cos(m1·θ_y + m2) − m3)`.
    Combined(CombinedConfig),
    /// ElasticFace-Arc: `z_y = s·cos(θ_y + E_i)`, `E_i ~ N(m, σ)` per sample and step.
    ElasticArc(ElasticArcConfig),
    /// ElasticFace-Cos: `z_y = s·(cos θ_y − E_i)`.
    ElasticCos(ElasticCosConfig),
    /// ElasticFace-Arc+: the drawn margins assigned by target cosine.
    ElasticArcPlus(ElasticArcPlusConfig),
    /// ElasticFace-Cos+: the drawn margins assigned by target cosine.
    ElasticCosPlus(ElasticCosPlusConfig),
    /// GCE / GFace: global cross-entropy with bilateral margins and optional pairwise prototype
    /// replacement (a loss, not logits: see [`MarginHead::training_loss`]).
    Gce(GceConfig),
    /// CurricularFace: ArcFace's target, hard negatives weighted by `cos θ_j·(t + cos θ_j)`.
    Curricularface(CurricularFaceConfig),
    /// AdaFace: `z_y = s·(cos(θ_y + g_angle) − g_add)` from the normalised feature norm.
    Adaface(AdaFaceConfig),
    /// Sub-center ArcFace: ArcFace on the max cosine over `k` sub-centres per class (the
    /// classifier holds `W [C·k, D]`: [`ClassifierKind::SubCenter`]).
    SubcenterArcface(SubCenterArcFaceConfig),
    /// MagFace: `z_y = s·cos(θ_y + m(‖x‖))` plus the norm regulariser `λ_g·g(‖x‖)`.
    Magface(MagFaceConfig),
}

impl Default for HeadConfig {
    fn default() -> Self {
        HeadConfig::Arcface(ArcFaceConfig::default())
    }
}

impl HeadConfig {
    /// Checks every value. The error starts with the offending field of the variant's table, e.g.
    /// `m must be in [0, π), got 3.5` (a host that reads the table from a file prefixes its own
    /// path: the trainer says `config key `head.m`: ...`).
    pub fn validate(&self) -> Result<()> {
        match self {
            HeadConfig::Softmax(_) => Ok(()),
            HeadConfig::Normface(c) => c.validate(),
            HeadConfig::Sphereface(c) => c.validate(),
            HeadConfig::Cosface(c) => c.validate(),
            HeadConfig::Arcface(c) => c.validate(),
            HeadConfig::Combined(c) => c.validate(),
            HeadConfig::ElasticArc(c) => c.params().validate(),
            HeadConfig::ElasticCos(c) => c.params().validate(),
            HeadConfig::ElasticArcPlus(c) => c.params().validate(),
            HeadConfig::ElasticCosPlus(c) => c.params().validate(),
            HeadConfig::Gce(c) => c.validate(),
            HeadConfig::Curricularface(c) => c.validate(),
            HeadConfig::Adaface(c) => c.validate(),
            HeadConfig::SubcenterArcface(c) => c.validate(),
            HeadConfig::Magface(c) => c.validate(),
        }
    }

    /// The classifier the head consumes: [`ClassifierKind::Linear`] (`Wx + b`) for `softmax`,
    /// [`ClassifierKind::SubCenter`] (`k` rows per class) for `subcenter_arcface`,
    /// [`ClassifierKind::Cosine`] for every other head.
    pub fn classifier_kind(&self) -> ClassifierKind {
        match self {
            HeadConfig::Softmax(_) => ClassifierKind::Linear,
            HeadConfig::SubcenterArcface(c) => ClassifierKind::SubCenter(c.k),
            _ => ClassifierKind::Cosine,
        }
    }

    /// Builds the head.
    ///
    /// # Panics
    /// If [`HeadConfig::validate`] fails: validate configs when they are parsed.
    pub fn build(&self) -> Box<dyn MarginHead> {
        if let Err(e) = self.validate() {
            panic!("HeadConfig::build on an invalid config: {e:#}");
        }
        match self {
            HeadConfig::Softmax(_) => Box::new(Softmax),
            HeadConfig::Normface(c) => Box::new(NormFace::new(c)),
            HeadConfig::Sphereface(c) => Box::new(SphereFace::new(c)),
            HeadConfig::Cosface(c) => Box::new(CosFace::new(c)),
            HeadConfig::Arcface(c) => Box::new(ArcFace::new(c)),
            HeadConfig::Combined(c) => Box::new(CombinedMargin::new(c)),
            HeadConfig::ElasticArc(c) => Box::new(ElasticFace::new(&c.params())),
            HeadConfig::ElasticCos(c) => Box::new(ElasticFace::new(&c.params())),
            HeadConfig::ElasticArcPlus(c) => Box::new(ElasticFace::new(&c.params())),
            HeadConfig::ElasticCosPlus(c) => Box::new(ElasticFace::new(&c.params())),
            HeadConfig::Gce(c) => Box::new(Gce::new(c)),
            HeadConfig::Curricularface(c) => Box::new(CurricularFace::new(c)),
            HeadConfig::Adaface(c) => Box::new(AdaFace::new(c)),
            HeadConfig::SubcenterArcface(c) => Box::new(ArcFace::new(&c.arcface())),
            HeadConfig::Magface(c) => Box::new(MagFace::new(c)),
        }
    }
}
