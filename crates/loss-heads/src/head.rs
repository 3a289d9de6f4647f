//! The margin-head contract ([`MarginHead`]) and the helpers every head builds its logits with.
//!
//! A head gets clamped cosines `[B, C]` and labels `[B]` and changes only each row's target entry.
//! [`scaled_targets`] (and [`scaled_target_offsets`] for a constant offset) gather the `B` target
//! cosines, transform only those and write `s·cos` with the scaled targets in one pass over
//! `[B, C]`; [`apply_to_targets`] is the unscaled form. [`cross_entropy`] is the loss over the
//! logits. Every head file imports from here (never from the crate root).

use anyhow::{bail, ensure, Result};
use std::collections::HashMap;
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
    /// A no-op for stateless heads. [`crate::SphereFace`] sets its annealing weight λ from it;
    /// [`crate::ElasticFace`] re-seeds its margin generator to the stream of that step, so a resumed run
    /// draws the same margins as an uninterrupted one. Call it once per iteration.
    fn set_step(&mut self, _step: u64) {}

    /// Tells the head which training images the rows of the next batches are (their dataset
    /// indices, one per row; the loader's `Batch::indices`), before the training loss. A P x K
    /// batch repeats an image when its identity has fewer than K images. A no-op for heads that
    /// never compare rows with each other; [`crate::Gce`]'s pairwise framework uses it so that an
    /// image is never paired with a copy of itself.
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
    /// [`MarginHead::logits_with_norms`], plus [`MarginHead::norm_penalty`] if any. Losses that are not a cross-entropy over logits
    /// override it ([`crate::Gce`] needs the embeddings for its prototype replacement).
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
        let ce = cross_entropy(&self.logits_with_norms(cos_bc, labels_b, norms_b), labels_b);
        self.plus_norm_penalty(ce, norms_b)
    }

    /// `loss` plus [`MarginHead::norm_penalty`] of `norms_b` when the head has one: what the
    /// default [`MarginHead::training_loss`] and a caller of the fused cross-entropy
    /// ([`crate::margin_cross_entropy_with_norms`]) return.
    ///
    /// # Shapes
    /// `loss` scalar, `norms_b [B]` -> scalar.
    fn plus_norm_penalty(&self, loss: Tensor, norms_b: &Tensor) -> Tensor {
        match self.norm_penalty(norms_b) {
            Some(p) => loss + p,
            None => loss,
        }
    }

    /// A loss term of the feature norms alone that the training loss adds to the cross-entropy:
    /// MagFace's `λ_g·mean g(‖x_i‖)`. `None` (the default) for every other head. The default
    /// [`MarginHead::training_loss`] and [`crate::sharded_training_loss`] add it; a caller of
    /// [`crate::margin_cross_entropy_with_norms`] (a pure cross-entropy) adds it itself.
    ///
    /// # Shapes
    /// `norms_b [B]` (differentiable) -> scalar.
    fn norm_penalty(&self, _norms_b: &Tensor) -> Option<Tensor> {
        None
    }

    /// True if the head's training loss is the cross-entropy of its logits (every head of this
    /// crate but [`crate::Gce`]); [`crate::sharded_cross_entropy`] refuses a head that says false.
    fn loss_is_cross_entropy(&self) -> bool {
        true
    }

    /// Records a batch's rows for the head's moving statistics when the loss is computed outside
    /// [`MarginHead::training_loss`] ([`crate::sharded_training_loss`] calls it with the gathered
    /// batch's target cosines and feature norms, the same on every rank). [`crate::CurricularFace`]
    /// records the target cosines, [`crate::AdaFace`] the norms; folded in by
    /// [`MarginHead::end_step`]. Default no-op.
    ///
    /// # Shapes
    /// `target_cos_b [B]`, `norms_b [B]` (detached here).
    fn record_rows(&mut self, _target_cos_b: &Tensor, _norms_b: &Tensor) {}

    /// Called once after each optimiser step (also a skipped one), after every
    /// [`MarginHead::training_loss`] of that step. Heads with moving statistics
    /// ([`crate::CurricularFace`]'s `t`, [`crate::AdaFace`]'s norm mean and std) fold in what the
    /// step's micro-batches recorded here, so gradient accumulation moves them once per step from
    /// every row of the step. Default no-op.
    fn end_step(&mut self) {}

    /// The head's state to checkpoint, as named tensors (names without a prefix; the trainer
    /// stores them as `head.<name>`). Default: none.
    fn state(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }

    /// Restores [`MarginHead::state`]. Errors name a missing or an unexpected entry. Default:
    /// accepts only an empty state.
    fn load_state(&mut self, state: HashMap<String, Tensor>) -> Result<()> {
        no_more_state(state, "this head")
    }

    /// True if the logits have the row-scaled form [`crate::margin_cross_entropy`] relies on:
    /// `z_ij = r_i·cos_ij` for every `j ≠ y_i`, where the row scale `r_i` (`s`, 1, or a feature
    /// norm) does not depend on the cosines, and the target logit `z_{i,y_i}` depends on the
    /// cosines of row `i` only through `cos_{i,y_i}`; both for [`MarginHead::logits`] and
    /// [`MarginHead::logits_with_norms`], and for any `C` (the fused loss evaluates the head on a
    /// `[B, 2]` probe). Every margin head of this crate returns true ([`crate::Gce`], whose loss is not a
    /// cross-entropy of its logits, returns false). Default false: a head of your own
    /// then gets the unfused `cross_entropy(head.logits(..))` from [`crate::margin_cross_entropy`].
    fn row_scaled_logits(&self) -> bool {
        false
    }
}

/// Errors if `state` still holds an entry (`who` names the head in the message).
pub(crate) fn no_more_state(state: HashMap<String, Tensor>, who: &str) -> Result<()> {
    if let Some(k) = state.keys().next() {
        bail!("head state has an entry `{k}` that {who} does not have");
    }
    Ok(())
}

/// Checks the logit scale shared by every head: `s` finite and > 0.
pub(crate) fn validate_scale(s: f64) -> Result<()> {
    ensure!(
        s.is_finite() && s > 0.0,
        "s must be finite and > 0, got {s}"
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
