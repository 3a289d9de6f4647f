//! CoReFace in the trainer (`[coreface]`; method and choices in docs/coreface.md).
//!
//! Before `start_epoch`: one view, `warmup_dropout` on the trunk features, the margin softmax.
//! From `start_epoch` on: two independent dropout masks (`dropout`) on the trunk features, each
//! through the shared fc + BatchNorm1d neck; both views classified by the configured head over the
//! same Partial FC sample; `w_cls1·L¹ + w_cls2·L² + w_con·L_con` with the contrastive regularizer
//! of `facerec-contrastive-regularizer`. Evaluation uses the ordinary forward with dropout off.
//! The adaptive margin is objective state, so checkpoints carry it; it moves once per optimiser
//! step (every micro-batch adds its gaps, [`Objective::end_step`] stores the step's margin).
//! `model.dropout` must be 0 (the objective applies the dropout itself; the config check says so).

use super::{margin_softmax::MarginSoftmax, MicroLoss, Model, Objective};
use anyhow::{Context, Result};
use facerec_contrastive_regularizer::{
    dropout_views, CoReFace, CoReFaceConfig, ContrastiveRegularizer,
};
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

/// The margin softmax plus CoReFace's two views and contrastive term.
pub struct CoReFaceObjective {
    cfg: CoReFaceConfig,
    base: MarginSoftmax,
    reg: CoReFace,
    epoch: usize,
}

impl CoReFaceObjective {
    /// Wrap the margin softmax `base`.
    ///
    /// # Panics
    /// If `cfg` does not validate (the config check runs first).
    pub fn new(base: MarginSoftmax, cfg: &CoReFaceConfig) -> Self {
        CoReFaceObjective {
            cfg: cfg.clone(),
            base,
            reg: CoReFace::standalone(cfg, Device::Cpu, Kind::Float),
            epoch: 0,
        }
    }
}

fn scalar(t: &Tensor) -> f64 {
    f64::try_from(t).unwrap_or(f64::NAN)
}

impl Objective for CoReFaceObjective {
    fn begin_step(&mut self, step: usize, epoch: usize) {
        self.base.begin_step(step, epoch);
        self.epoch = epoch;
    }

    fn set_batch_images(&mut self, images: &[usize]) {
        self.base.set_batch_images(images);
    }

    fn loss(&mut self, model: &Model, x: &Tensor, y: &Tensor) -> MicroLoss {
        let h = model.trunk(x).to_kind(Kind::Float);
        if !self.cfg.is_contrastive(self.epoch) {
            let emb = model.neck(&h.dropout(self.cfg.warmup_dropout, true));
            let (loss, row_mask) = self.base.loss_of(model, emb, y);
            return MicroLoss {
                loss,
                row_mask,
                metrics: Vec::new(),
            };
        }
        let (e1, e2) = dropout_views(&h, self.cfg.dropout, |f| model.neck(f));
        let (losses, row_mask) =
            self.base
                .losses_of_views(model, vec![e1.shallow_clone(), e2.shallow_clone()], y);
        let out = self.reg.forward_micro_batch(&e1, &e2, y);
        let loss = self.cfg.total_loss(&losses[0], &losses[1], &out.loss);
        let metrics = vec![
            ("loss_cls1", scalar(&losses[0])),
            ("loss_cls2", scalar(&losses[1])),
            ("loss_con", scalar(&out.loss)),
            ("coreface_margin", scalar(&out.margin)),
            ("coreface_batch_gap", scalar(&out.batch_gap)),
            ("coreface_positive_cos", scalar(&out.positive_cos)),
            (
                "coreface_hardest_negative_cos",
                scalar(&out.hardest_negative_cos),
            ),
        ];
        MicroLoss {
            loss,
            row_mask,
            metrics,
        }
    }

    fn end_step(&mut self) {
        self.reg.end_step();
        self.base.end_step();
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        let mut state = vec![("coreface.margin".into(), self.reg.margin_state().copy())];
        state.extend(self.base.state());
        state
    }

    fn load_state(&mut self, mut state: HashMap<String, Tensor>) -> Result<()> {
        // A checkpoint of a plain margin-softmax run (e.g. the ArcFace warm phase) has no margin
        // yet: the regularizer starts from 0, as in a fresh contrastive phase.
        if let Some(m) = state.remove("coreface.margin") {
            self.reg
                .set_margin(f64::try_from(&m).context("coreface.margin")?);
        }
        // The rest is the margin head's (`head.*`).
        if let Some(k) = state.keys().find(|k| !k.starts_with("head.")) {
            anyhow::bail!("objective state has an entry `{k}` that CoReFace does not have");
        }
        self.base.load_state(state)
    }
}
