//! Margin heads for face recognition and the cosine classifier that owns the class weights.
//!
//! # The classifier / head split (as in insightface `arcface_torch`)
//!
//! Training a margin-softmax face model is three steps, each owned by one type here:
//!
//! 1. [`CosineClassifier`] owns the class-weight matrix `W [C, D]` (variable `weight`, init
//!    N(0, 0.01)) and turns embeddings into clamped cosines `cos = clamp(x̂ Ŵᵀ, -1, 1)` of shape
//!    `[B, C]`. [`LinearClassifier`] (weight and bias, plain `Wx + b`) serves the [`Softmax`]
//!    head; [`Classifier`] picks the right one for a [`HeadConfig`]. Which classes take part in a
//!    step is decided next to the classifier: [`PartialFc`] samples all positive classes of the
//!    batch plus a random subset of the others and returns a [`Sampled`] index.
//! 2. A [`MarginHead`] (built from a [`HeadConfig`]) turns those cosines into `s`-scaled logits,
//!    penalising only each sample's target entry: [`NormFace`] (no margin), [`CosFace`]
//!    (`cos θ_y − m`), [`ArcFace`] (`cos(θ_y + m)`, three gradient treatments, see
//!    [`ArcFaceGradient`]), [`CombinedMargin`] (`cos(m1·θ_y + m2) − m3`), [`SphereFace`]
//!    (`ψ(θ_y)` with λ annealing), [`ElasticFace`] (a random margin per sample and step, with the
//!    "+" assignments) and [`Softmax`] (identity over `Wx + b`). Heads never own the weight, so
//!    one head works unchanged over a full or a sampled class set.
//! 3. [`cross_entropy`] averages `−log softmax(z)_y` over the batch. [`margin_cross_entropy`]
//!    (and [`margin_cross_entropy_with_norms`]) does steps 2 and 3 at once with the same value
//!    and gradients and fewer `[B, C]` temporaries: use it in training loops (see [`margin_ce`]).
//!
//! ```text
//! emb [B,D] --CosineClassifier--> cos [B,C] --MarginHead--> logits [B,C] --cross_entropy--> L
//! ```
//!
//! A minimal training step (see `examples/train_small.rs` for a complete one):
//!
//! ```no_run
//! use facerec_loss_heads::{margin_cross_entropy, CosineClassifier, HeadConfig, MarginHead};
//! use tch::{nn, Device, Kind, Tensor};
//!
//! let vs = nn::VarStore::new(Device::Cpu);
//! let classifier = CosineClassifier::new(&(vs.root() / "fc"), 1000, 512);
//! let mut head = HeadConfig::default().build(); // ArcFace, s = 64, m = 0.5
//! let emb = Tensor::randn([32, 512], (Kind::Float, Device::Cpu)); // your model's output
//! let labels = Tensor::randint(1000, [32], (Kind::Int64, Device::Cpu));
//! head.set_step(0); // once per iteration: annealing (SphereFace) and random margins (ElasticFace)
//! // = cross_entropy(&head.logits(&cos, &labels), &labels), fused
//! let loss = margin_cross_entropy(&*head, &classifier.cosines(&emb), &labels);
//! loss.backward();
//! ```
//!
//! # Deliberate difference from the reference
//!
//! arcface_torch applies `arccos`/`cos` to the whole `[B, C]` cosine matrix and then selects the
//! target entries. We gather the `B` target cosines (`[B, 1]`), transform only those, and scatter
//! them back (see [`apply_to_targets`], and [`scaled_targets`], which the heads use: it writes
//! the scaled targets into `s·cos` in place and so makes one pass over `[B, C]`). The values and
//! gradients are identical; the work is `O(B)` instead of `O(B·C)` transcendental calls, and no
//! `acos` is ever evaluated at the non-target entries, whose gradient the reference has to mask
//! out anyway.
//!
//! The finite-difference checker used by this crate's tests lives in [`gradcheck`] so later heads
//! and other crates can reuse it.

pub mod arcface;
pub mod classifier;
pub mod combined;
pub mod cosface;
pub mod elastic;
pub mod gce;
pub mod gradcheck;
pub mod margin_ce;
pub mod normface;
pub mod partial_fc;
pub mod softmax;
pub mod sphereface;

pub use arcface::{ArcFace, ArcFaceConfig, ArcFaceGradient};
pub use classifier::{Classifier, CosineClassifier};
pub use combined::{CombinedConfig, CombinedMargin};
pub use cosface::{CosFace, CosFaceConfig};
pub use elastic::{
    ElasticArcConfig, ElasticArcPlusConfig, ElasticCosConfig, ElasticCosPlusConfig, ElasticFace,
    ElasticKind, ElasticParams, PlusAssignment,
};
pub use gce::{
    Gce, GceConfig, MarginForm, OutWeight, OutWeightRule, PairwiseConfig, Replacement, SelfPair,
};
pub use margin_ce::{margin_cross_entropy, margin_cross_entropy_with_norms};
pub use normface::{NormFace, NormFaceConfig};
pub use partial_fc::{PartialFc, PartialFcConfig, Sampled};
pub use softmax::{LinearClassifier, Softmax, SoftmaxConfig};
pub use sphereface::{SphereFace, SphereFaceConfig};

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// A margin head turns clamped cosines into s-scaled logits; it never owns the class weights.
pub trait MarginHead: std::fmt::Debug + Send {
    /// Logits `z` with the head's penalty applied to each sample's target entry.
    ///
    /// # Shapes
    /// `cos_bc [B, C]` (float), `labels_b [B]` (Int64) -> logits `[B, C]`, same kind as `cos_bc`.
    ///
    /// # Panics
    /// If the shapes disagree, `labels_b` is not Int64, or a label is outside `[0, C)`
    /// (labels are validated when the dataset opens, never here, to avoid a GPU sync).
    fn logits(&self, cos_bc: &Tensor, labels_b: &Tensor) -> Tensor;

    /// Tells the head the global training iteration (0-based) before the step's forward pass.
    ///
    /// A no-op for stateless heads. [`SphereFace`] sets its annealing weight λ from it;
    /// [`ElasticFace`] re-seeds its margin generator to the stream of that step, so a resumed run
    /// draws the same margins as an uninterrupted one. Call it once per iteration.
    fn set_step(&mut self, _step: u64) {}

    /// Tells the head which training images the rows of the next batches are (their dataset
    /// indices, one per row; the loader's `Batch::indices`), before the training loss. A P x K
    /// batch repeats an image when its identity has fewer than K images. A no-op for heads that
    /// never compare rows with each other; [`Gce`]'s pairwise framework uses it so that an image
    /// is never paired with a copy of itself.
    fn set_batch_images(&mut self, _images: &[usize]) {}

    /// Logits for heads that use the *un*-normalised feature norm `‖x_i‖` as the per-row scale
    /// (SphereFace's original A-Softmax). Every other head ignores `norms_b` and returns
    /// [`MarginHead::logits`].
    ///
    /// # Shapes
    /// `cos_bc [B, C]`, `labels_b [B]` (Int64), `norms_b [B]` (same kind as `cos_bc`) -> `[B, C]`.
    fn logits_with_norms(&self, cos_bc: &Tensor, labels_b: &Tensor, _norms_b: &Tensor) -> Tensor {
        self.logits(cos_bc, labels_b)
    }

    /// The step's training loss. Default: [`cross_entropy`] of
    /// [`MarginHead::logits_with_norms`]. Losses that are not a cross-entropy over logits
    /// override it ([`Gce`] needs the embeddings for its prototype replacement).
    ///
    /// # Shapes
    /// `cos_bc [B, C]`, `labels_b [B]` (Int64), `emb_bd [B, D]` (the backbone's embeddings),
    /// `norms_b [B]` -> scalar.
    fn training_loss(
        &mut self,
        cos_bc: &Tensor,
        labels_b: &Tensor,
        _emb_bd: &Tensor,
        norms_b: &Tensor,
    ) -> Tensor {
        cross_entropy(&self.logits_with_norms(cos_bc, labels_b, norms_b), labels_b)
    }

    /// True if the logits have the row-scaled form [`margin_cross_entropy`] relies on:
    /// `z_ij = r_i·cos_ij` for every `j ≠ y_i`, where the row scale `r_i` (`s`, 1, or a feature
    /// norm) does not depend on the cosines, and the target logit `z_{i,y_i}` depends on the
    /// cosines of row `i` only through `cos_{i,y_i}`; both for [`MarginHead::logits`] and
    /// [`MarginHead::logits_with_norms`], and for any `C` (the fused loss evaluates the head on a
    /// `[B, 2]` probe). Every margin head of this crate returns true ([`Gce`], whose loss is not a
    /// cross-entropy of its logits, returns false). Default false: a head of your own
    /// then gets the unfused `cross_entropy(head.logits(..))` from [`margin_cross_entropy`].
    fn row_scaled_logits(&self) -> bool {
        false
    }
}

/// Which margin head to train with; the `[head]` table of a training config, tagged by `type`.
///
/// ```toml
/// [head]
/// type = "arcface"   # "softmax" | "normface" | "sphereface" | "cosface" | "arcface" | "combined"
///                    # | "elastic_arc" | "elastic_cos" | "elastic_arc_plus" | "elastic_cos_plus" | "gce"
/// s = 64.0
/// m = 0.5
/// gradient = "exact" # "exact" | "easy_margin" | "detached"
/// ```
/// Missing fields take the documented defaults of each variant's config struct; unknown fields
/// are an error. The default head is ArcFace (s = 64, m = 0.5).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum HeadConfig {
    /// Plain softmax over `Wx + b` (needs the [`LinearClassifier`], see [`Classifier::new`]).
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
}

impl Default for HeadConfig {
    fn default() -> Self {
        HeadConfig::Arcface(ArcFaceConfig::default())
    }
}

impl HeadConfig {
    /// Checks every value; the error names the offending key, e.g. `head.m: must be in [0, pi)`.
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
        }
    }

    /// True for `softmax`, whose head expects `Wx + b` scores from a [`LinearClassifier`];
    /// every other head expects cosines from a [`CosineClassifier`].
    pub fn uses_linear_classifier(&self) -> bool {
        matches!(self, HeadConfig::Softmax(_))
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
        }
    }
}

/// Checks the logit scale shared by every head: `head.s` finite and > 0.
pub(crate) fn validate_scale(s: f64) -> Result<()> {
    ensure!(
        s.is_finite() && s > 0.0,
        "head.s: must be finite and > 0, got {s}"
    );
    Ok(())
}

/// Replaces each row's target cosine `c_y` by `f(c_y)`, leaving every other entry untouched.
///
/// Gathers the `B` target entries into `[B, 1]`, applies `f` there only, and scatters the result
/// back. The gradient reaching a non-target entry is the upstream gradient unchanged; the one
/// reaching a target entry goes through `f`.
///
/// # Shapes
/// `cos_bc [B, C]`, `labels_b [B]` (Int64); `f` maps `[B, 1] -> [B, 1]`; result `[B, C]`.
///
/// # Panics
/// If `cos_bc` is not 2-D, `labels_b` is not Int64 of shape `[B]`, or a label is out of range.
pub fn apply_to_targets(
    cos_bc: &Tensor,
    labels_b: &Tensor,
    f: impl FnOnce(&Tensor) -> Tensor,
) -> Tensor {
    let idx_b1 = labels_b.view([check_head_inputs(cos_bc, labels_b), 1]);
    let target_b1 = cos_bc.gather(1, &idx_b1, false);
    cos_bc.scatter(1, &idx_b1, &f(&target_b1))
}

/// `scale · apply_to_targets(cos_bc, labels_b, f)`, with one pass over the `[B, C]` matrix.
///
/// Equal in value (up to one rounding of `s·c + s·(f(c) − c)`) and in gradient to
/// `apply_to_targets(cos_bc, labels_b, f) * scale`, computed as `z = cos·scale` followed by an
/// in-place `z.scatter_add_(labels, scale·(f(c_y) − c_y))`. Autograd saves nothing of `z` (a
/// product with a scalar, or with a per-row factor that is not `z` itself), so the in-place write
/// is safe; its backward passes the gradient of `z` through unchanged, where an out-of-place
/// `scatter` would copy the whole matrix in the forward pass and mask a copy of it in the
/// backward pass. The in-place writes of this function and [`scaled_target_offsets`] are the only
/// ones on an autograd path in the crate.
///
/// # Shapes
/// `cos_bc [B, C]`, `labels_b [B]` (Int64), `scale` a float or a `[B, 1]` tensor; `f` maps
/// `[B, 1] -> [B, 1]`; result `[B, C]`.
///
/// # Panics
/// As [`apply_to_targets`].
pub fn scaled_targets(
    cos_bc: &Tensor,
    labels_b: &Tensor,
    scale: Scale<'_>,
    f: impl FnOnce(&Tensor) -> Tensor,
) -> Tensor {
    let idx_b1 = labels_b.view([check_head_inputs(cos_bc, labels_b), 1]);
    let target_b1 = cos_bc.gather(1, &idx_b1, false);
    add_to_targets(cos_bc, &idx_b1, scale, f(&target_b1) - target_b1)
}

/// As [`scaled_targets`] for a target transform whose derivative is 1 (`f(c) = c + δ` with `δ`
/// a constant: CosFace, ElasticCos, and the detached ArcFace/combined modes), so no gradient path
/// through the gathered targets is built at all: `δ` is computed from detached cosines, and the
/// backward pass is that of `cos·scale` alone.
///
/// # Shapes
/// `cos_bc [B, C]`, `labels_b [B]` (Int64); `delta` maps the detached target cosines `[B, 1]` to
/// the offsets `[B, 1]`; result `[B, C]`.
///
/// # Panics
/// As [`apply_to_targets`].
pub fn scaled_target_offsets(
    cos_bc: &Tensor,
    labels_b: &Tensor,
    scale: Scale<'_>,
    delta: impl FnOnce(&Tensor) -> Tensor,
) -> Tensor {
    let idx_b1 = labels_b.view([check_head_inputs(cos_bc, labels_b), 1]);
    let offset_b1 = tch::no_grad(|| delta(&cos_bc.detach().gather(1, &idx_b1, false)));
    add_to_targets(cos_bc, &idx_b1, scale, offset_b1)
}

/// `z = cos·scale; z[i, y_i] += scale_i·delta_i` (in place, see [`scaled_targets`]).
fn add_to_targets(cos_bc: &Tensor, idx_b1: &Tensor, scale: Scale<'_>, delta_b1: Tensor) -> Tensor {
    let (mut z, delta) = match scale {
        Scale::Fixed(s) => (cos_bc * s, delta_b1 * s),
        Scale::PerRow(r_b1) => (cos_bc * r_b1, delta_b1 * r_b1),
    };
    let _ = z.scatter_add_(1, idx_b1, &delta);
    z
}

/// The logit scale of [`scaled_targets`]: one `s` for all rows, or one per row (`[B, 1]`).
#[derive(Debug, Clone, Copy)]
pub enum Scale<'a> {
    /// A fixed `s`.
    Fixed(f64),
    /// A per-row factor `[B, 1]`, e.g. SphereFace's feature norms.
    PerRow(&'a Tensor),
}

/// Checks the head contract (`[B, C]` cosines, Int64 labels `[B]`) and returns `B`.
pub(crate) fn check_head_inputs(cos_bc: &Tensor, labels_b: &Tensor) -> i64 {
    let (b, c) = cos_bc.size2().expect("cos_bc must be [B, C]");
    assert_eq!(labels_b.kind(), Kind::Int64, "labels must be Int64");
    assert_eq!(
        labels_b.size(),
        [b],
        "labels must be [B] with B = {b} (C = {c})"
    );
    b
}

/// Mean cross-entropy `L = (1/B)·Σ_i −log softmax(z_i)_{y_i}` (max-subtracted `log_softmax`).
///
/// Computed in f64 for f64 logits and in f32 otherwise (f16/bf16 logits are upcast, as
/// arcface_torch does). Its gradient w.r.t. the logits is `(p − onehot)/B`.
///
/// # Shapes
/// `logits_bc [B, C]`, `labels_b [B]` (Int64) -> scalar.
///
/// # Panics
/// If `labels_b` is not Int64 or the shapes disagree.
pub fn cross_entropy(logits_bc: &Tensor, labels_b: &Tensor) -> Tensor {
    check_head_inputs(logits_bc, labels_b);
    let kind = if logits_bc.kind() == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    };
    logits_bc.log_softmax(-1, kind).nll_loss(labels_b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_to_targets_touches_only_targets_and_routes_gradients() {
        let cos = Tensor::from_slice(&[0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
            .view([2, 3])
            .set_requires_grad(true);
        let labels = Tensor::from_slice(&[2i64, 0]);
        let out = apply_to_targets(&cos, &labels, |c| c * 3.0);
        let expected = Tensor::from_slice(&[0.1, 0.2, 0.9, 1.2, 0.5, 0.6]).view([2, 3]);
        assert!(out.detach().allclose(&expected, 1e-15, 1e-15, false));
        let grad = Tensor::run_backward(&[out.sum(Kind::Double)], &[&cos], false, false);
        let expected = Tensor::from_slice(&[1.0, 1.0, 3.0, 3.0, 1.0, 1.0]).view([2, 3]);
        assert!(grad[0].equal(&expected), "{grad:?}");
    }

    #[test]
    fn scaled_targets_equals_scatter_then_scale_in_value_and_gradient() {
        let cos = Tensor::from_slice(&[0.1, -0.2, 0.3, 0.4, 0.5, -0.6])
            .view([2, 3])
            .set_requires_grad(true);
        let labels = Tensor::from_slice(&[1i64, 2]);
        let rows = Tensor::from_slice(&[2.0, -3.0]).view([2, 1]);
        let w = Tensor::from_slice(&[1.0, 2.0, 3.0, -1.0, 0.5, 0.25]).view([2, 3]);
        for scale in [Scale::Fixed(7.0), Scale::PerRow(&rows)] {
            let f = |c: &Tensor| c.square() - 1.0;
            let a = scaled_targets(&cos, &labels, scale, f);
            let b = match scale {
                Scale::Fixed(s) => apply_to_targets(&cos, &labels, f) * s,
                Scale::PerRow(r) => apply_to_targets(&cos, &labels, f) * r,
            };
            assert!(a.allclose(&b, 1e-15, 1e-15, false));
            let ga = Tensor::run_backward(&[(&a * &w).sum(Kind::Double)], &[&cos], false, false);
            let gb = Tensor::run_backward(&[(&b * &w).sum(Kind::Double)], &[&cos], false, false);
            assert!(ga[0].allclose(&gb[0], 1e-15, 1e-15, false), "{scale:?}");
            // A constant offset: same value and gradient as the general path.
            let c = scaled_target_offsets(&cos, &labels, scale, |t| t.zeros_like() - 0.3);
            let d = scaled_targets(&cos, &labels, scale, |t| t - 0.3);
            assert!(c.allclose(&d, 1e-15, 1e-15, false));
            let gc = Tensor::run_backward(&[(&c * &w).sum(Kind::Double)], &[&cos], false, false);
            let gd = Tensor::run_backward(&[(&d * &w).sum(Kind::Double)], &[&cos], false, false);
            assert!(gc[0].allclose(&gd[0], 1e-15, 1e-15, false), "{scale:?}");
        }
    }
}
