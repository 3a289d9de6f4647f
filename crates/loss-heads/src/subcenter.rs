//! Sub-center ArcFace: Deng, Guo, Liu, Gong, Zafeiriou, "Sub-center ArcFace: Boosting Face
//! Recognition by Large-Scale Noisy Web Faces", ECCV 2020, DOI 10.1007/978-3-030-58621-8_43.
//!
//! Idea: each class gets `K` sub-centres instead of one; a sample's cosine to a class is the
//! largest cosine to any of its sub-centres, and ArcFace's margin is applied to that. Clean faces
//! gather around one dominant sub-centre, noisy or atypical ones can fall to another without
//! pulling the dominant one. Defaults K = 3, s = 64, m = 0.5.
//!
//! # Where each part lives
//!
//! The classifier owns the sub-centres: [`crate::CosineClassifier`] with `K > 1`
//! ([`crate::ClassifierKind::SubCenter`]) holds `W [C·K, D]`, class `c`'s sub-centres in rows
//! `c·K .. c·K + K` (class-major, so a block of classes is a contiguous block of rows), and
//! returns the pooled cosines `[B, C]` ([`pool_sub_centres`]). The head is then plain
//! [`crate::ArcFace`] on those cosines, so it works unchanged over a Partial FC sample
//! ([`sub_centre_rows`] turns a sample of classes into the `K` rows of each) and over a
//! model-parallel block. The gradient of the max reaches only the closest sub-centre of each
//! (sample, class) pair.
//!
//! Deliberate difference from the paper: the paper's second stage (after training, drop the
//! non-dominant sub-centres and the samples far from the dominant one, then retrain with `K = 1`)
//! is not built; a trained model keeps all `K` sub-centres (only the backbone is exported).

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::angular::ArcFaceGradient;
use crate::arcface::ArcFaceConfig;
use crate::normface::default_scale;

/// `[head] type = "subcenter_arcface"`: ArcFace over `k` sub-centres per class.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SubCenterArcFaceConfig {
    /// Sub-centres per class `K`, in `[1, 64]` (1 is ArcFace). Default 3.
    #[serde(default = "default_k")]
    pub k: i64,
    /// Logit scale `s`. Default 64.
    #[serde(default = "default_scale")]
    pub s: f64,
    /// Angular margin `m` in radians, in `[0, π)`. Default 0.5.
    #[serde(default = "default_margin")]
    pub m: f64,
    /// Gradient treatment of the margin, as ArcFace's. Default `"exact"`.
    #[serde(default)]
    pub gradient: ArcFaceGradient,
}

fn default_k() -> i64 {
    3
}

fn default_margin() -> f64 {
    0.5
}

impl Default for SubCenterArcFaceConfig {
    fn default() -> Self {
        Self {
            k: default_k(),
            s: default_scale(),
            m: default_margin(),
            gradient: ArcFaceGradient::default(),
        }
    }
}

impl SubCenterArcFaceConfig {
    /// `k` in `[1, 64]`; `s` and `m` as [`ArcFaceConfig::validate`].
    pub fn validate(&self) -> Result<()> {
        let k = self.k;
        ensure!((1..=64).contains(&k), "k must be in [1, 64], got {k}");
        self.arcface().validate()
    }

    /// The ArcFace head applied to the pooled cosines.
    pub fn arcface(&self) -> ArcFaceConfig {
        ArcFaceConfig {
            s: self.s,
            m: self.m,
            gradient: self.gradient,
        }
    }
}

/// The cosine of each sample to each class: the max over the class's `k` sub-centres.
///
/// # Shapes
/// `cos_bck [B, C·k]` (column `c·k + j` is sub-centre `j` of class `c`) -> `[B, C]`.
///
/// # Panics
/// If `cos_bck` is not 2-D with a column count divisible by `k`, or `k < 1`.
pub fn pool_sub_centres(cos_bck: &Tensor, k: i64) -> Tensor {
    assert!(k >= 1, "k must be >= 1");
    if k == 1 {
        return cos_bck.shallow_clone();
    }
    let (b, ck) = cos_bck.size2().expect("cos_bck must be [B, C·K]");
    assert_eq!(ck % k, 0, "{ck} columns are not a multiple of k = {k}");
    cos_bck.view([b, ck / k, k]).amax([2], false)
}

/// The classifier rows of a sample of classes: `c·k + j` for every class `c` of `index_c` (in
/// order) and `j` in `0..k`.
///
/// # Shapes
/// `index_c [C']` (Int64) -> `[C'·k]` (Int64).
pub fn sub_centre_rows(index_c: &Tensor, k: i64) -> Tensor {
    if k == 1 {
        return index_c.shallow_clone();
    }
    let j = Tensor::arange(k, (Kind::Int64, index_c.device()));
    (index_c.unsqueeze(1) * k + j.unsqueeze(0)).view([-1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_takes_the_max_per_class_and_rows_expand_class_major() {
        let cos = Tensor::from_slice(&[
            0.1, 0.5, -0.2, 0.3, 0.9, 0.0, -0.4, -0.1, -0.3, 0.2, 0.2, 0.1,
        ])
        .view([2, 6]);
        let pooled = pool_sub_centres(&cos, 3);
        let want = Tensor::from_slice(&[0.5, 0.9, -0.1, 0.2]).view([2, 2]);
        assert!(pooled.equal(&want), "{pooled:?}");
        let rows = sub_centre_rows(&Tensor::from_slice(&[0i64, 2]), 3);
        assert_eq!(Vec::<i64>::try_from(rows).unwrap(), vec![0, 1, 2, 6, 7, 8]);
    }

    #[test]
    fn k_is_validated() {
        for k in [0, 65] {
            let e = SubCenterArcFaceConfig {
                k,
                ..Default::default()
            }
            .validate()
            .unwrap_err();
            assert!(e.to_string().starts_with("k must be"), "{e}");
        }
    }
}
