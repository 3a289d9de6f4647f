//! Margin softmax: a `facerec-loss-heads` margin head on the cosine (or linear) classifier, the
//! cross-entropy of its logits, optionally over a Partial FC class sample. This is ArcFace,
//! CosFace, SphereFace, ElasticFace, ... as arcface_torch trains them.

use super::{MicroLoss, Model, Objective};
use anyhow::Context;
use facerec_loss_heads::{
    margin_cross_entropy_with_norms, sharded_training_loss, ClassShard, Collectives, Gce,
    HeadConfig, MarginHead, PartialFc, PartialFcConfig,
};
use std::collections::HashMap;
use tch::Tensor;

/// A margin head + cross-entropy.
pub struct MarginSoftmax {
    head: Head,
    partial_fc: Option<PartialFc>,
}

/// The head: a margin head behind the trait, or GCE by its type (its loss is not a cross-entropy
/// of logits, and its model-parallel form, `Gce::sharded_step_loss`, is its own).
enum Head {
    Margin(Box<dyn MarginHead>),
    Gce(Box<Gce>),
}

impl MarginSoftmax {
    fn head(&self) -> &dyn MarginHead {
        match &self.head {
            Head::Margin(h) => h.as_ref(),
            Head::Gce(g) => g.as_ref(),
        }
    }

    fn head_mut(&mut self) -> &mut dyn MarginHead {
        match &mut self.head {
            Head::Margin(h) => h.as_mut(),
            Head::Gce(g) => g.as_mut(),
        }
    }
}

impl MarginSoftmax {
    /// From the `[head]` and `[partial_fc]` tables.
    pub fn new(head: &HeadConfig, partial_fc: &PartialFcConfig) -> Self {
        let head = match head {
            HeadConfig::Gce(c) => Head::Gce(Box::new(Gce::new(c))),
            other => Head::Margin(other.build()),
        };
        MarginSoftmax {
            head,
            partial_fc: (partial_fc.sample_rate < 1.0).then(|| PartialFc::new(partial_fc)),
        }
    }

    /// The head's logits and the cross-entropy for embeddings `emb_bd` (already through the
    /// backbone); used by objectives that add terms to the margin softmax.
    pub fn loss_of(
        &mut self,
        model: &Model,
        emb_bd: Tensor,
        y: &Tensor,
    ) -> (Tensor, Option<Tensor>) {
        let (mut losses, mask) = self.losses_of_views(model, vec![emb_bd], y);
        (losses.remove(0), mask)
    }

    /// [`MarginSoftmax::loss_of`] for several views of the same images: one Partial FC sample
    /// serves every view.
    pub fn losses_of_views(
        &mut self,
        model: &Model,
        views: Vec<Tensor>,
        y: &Tensor,
    ) -> (Vec<Tensor>, Option<Tensor>) {
        let (sampled, mask) = super::sample_classes(self.partial_fc.as_mut(), y, model);
        let labels = sampled
            .as_ref()
            .map(|s| s.labels.shallow_clone())
            .unwrap_or_else(|| y.shallow_clone());
        let losses = views
            .into_iter()
            .map(|emb| {
                let (emb, scores) = model.scores(emb, sampled.as_ref());
                let norms = emb.norm_scalaropt_dim(2, [1], false);
                if self.head().row_scaled_logits() {
                    // Every margin head: the fused cross-entropy (one [B, C] buffer), plus the
                    // head's norm regulariser (MagFace).
                    let ce = margin_cross_entropy_with_norms(self.head(), &scores, &labels, &norms);
                    self.head().plus_norm_penalty(ce, &norms)
                } else {
                    // GCE and heads of users' own: their own training loss.
                    self.head_mut()
                        .training_loss(&scores, &labels, &emb, &norms)
                }
            })
            .collect();
        (losses, mask)
    }

    /// Model parallel: [`MarginSoftmax::losses_of_views`] for the gathered views `views_g`
    /// (`[W * B, D]` each) against this rank's block `shard`, each through the sharded
    /// cross-entropy over `comm` (value: the global mean; gradient: this rank's share). One
    /// Partial FC sample of the block serves every view; the row mask is over the block.
    ///
    /// # Errors
    /// For a head whose training loss is not split across ranks, and as
    /// `facerec_loss_heads::sharded_cross_entropy`.
    pub fn sharded_losses_of_views(
        &mut self,
        model: &Model,
        views_g: &[Tensor],
        y_g: &Tensor,
        shard: ClassShard,
        comm: &dyn Collectives,
    ) -> anyhow::Result<(Vec<Tensor>, Option<Tensor>)> {
        anyhow::ensure!(
            matches!(self.head, Head::Gce(_)) || self.head().loss_is_cross_entropy(),
            "config key `classifier.sharding`: this head has its own training loss, which is not split across ranks; set classifier.sharding = \"replicated\""
        );
        let sampled = self
            .partial_fc
            .as_mut()
            .map(|pfc| pfc.sample_shard(y_g, shard));
        let (labels, row_mask) = match &sampled {
            Some(s) => (
                s.labels.shallow_clone(),
                Some(s.row_mask_of_rows(
                    shard.len,
                    model.classifier.rows_per_class(),
                    tch::Kind::Float,
                )),
            ),
            None => (shard.local_labels(y_g), None),
        };
        let mut losses = Vec::with_capacity(views_g.len());
        for emb_g in views_g {
            let (emb, cos) = model.scores(emb_g.shallow_clone(), sampled.as_ref());
            let norms = emb.norm_scalaropt_dim(2, [1], false);
            // The head records the gathered batch's target cosines and norms (CurricularFace's
            // `t`, AdaFace's norm statistics): the same on every rank.
            losses.push(match &mut self.head {
                // GCE's global terms across the ranks: the target from its owner, ℓ reduced, the
                // replacement drawn from the gathered labels and applied by the owner.
                Head::Gce(g) => g.sharded_step_loss(&cos, &labels, y_g, &emb, comm)?,
                Head::Margin(h) => sharded_training_loss(h.as_mut(), &cos, &labels, &norms, comm)?,
            });
        }
        Ok((losses, row_mask))
    }
}

impl Objective for MarginSoftmax {
    fn begin_step(&mut self, step: usize, _epoch: usize) {
        self.head_mut().set_step(step as u64);
        if let Some(pfc) = self.partial_fc.as_mut() {
            pfc.set_step(step as u64);
        }
    }

    fn set_batch_images(&mut self, images: &[usize]) {
        self.head_mut().set_batch_images(images);
    }

    /// The head's moving statistics (CurricularFace's `t`, AdaFace's norm mean and std) move here,
    /// once per optimiser step from every micro-batch of the step.
    fn end_step(&mut self) {
        self.head_mut().end_step();
    }

    /// The head's state, as `head.<name>`.
    fn state(&self) -> Vec<(String, Tensor)> {
        self.head()
            .state()
            .into_iter()
            .map(|(k, v)| (format!("head.{k}"), v))
            .collect()
    }

    fn load_state(&mut self, state: HashMap<String, Tensor>) -> anyhow::Result<()> {
        let mut head = HashMap::new();
        for (k, v) in state {
            match k.strip_prefix("head.") {
                Some(name) => head.insert(name.to_string(), v),
                None => {
                    anyhow::bail!("objective state has an entry `{k}` this objective does not have")
                }
            };
        }
        self.head_mut()
            .load_state(head)
            .context("objective state `head.*`")
    }

    /// Every margin head (and softmax) through the sharded cross-entropy; with Partial FC, this
    /// rank's sample of its block (`PartialFc::sample_shard`: every positive of the gathered
    /// batch in the block plus a uniform share, `sample_rate` per block).
    fn sharded_loss(
        &mut self,
        model: &Model,
        views_g: &[Tensor],
        y_g: &Tensor,
        shard: ClassShard,
        comm: &dyn Collectives,
    ) -> anyhow::Result<MicroLoss> {
        let (mut losses, row_mask) =
            self.sharded_losses_of_views(model, views_g, y_g, shard, comm)?;
        anyhow::ensure!(
            losses.len() == 1,
            "margin softmax: one view, got {}",
            losses.len()
        );
        Ok(MicroLoss {
            loss: losses.remove(0),
            row_mask,
            metrics: Vec::new(),
        })
    }

    fn loss(&mut self, model: &Model, x: &Tensor, y: &Tensor) -> MicroLoss {
        let (loss, row_mask) = self.loss_of(model, model.embed(x, true), y);
        MicroLoss {
            loss,
            row_mask,
            metrics: Vec::new(),
        }
    }
}
