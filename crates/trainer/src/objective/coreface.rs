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
//!
//! Model parallel (`classifier.sharding = "model_parallel"`, docs/distributed.md): each rank
//! takes its rows of the dropout masks drawn for the *gathered* batch from the step's stream
//! ([`global_dropout`]), so its masks are the rows one process draws for those images over the
//! concatenated batch; both views are gathered; each is classified by the sharded cross-entropy
//! (one Partial FC sample of the block serves both); the contrastive term, its batch gap and the
//! adaptive margin are computed on the gathered views, identically on every rank (the loss term
//! enters as `replicated_share`, so its gradient counts once). What stays per rank is BatchNorm:
//! the neck's BatchNorm1d normalises each rank's views with that rank's batch statistics, as
//! every BatchNorm of a data-parallel run does.

use super::{margin_softmax::MarginSoftmax, replicated_share, MicroLoss, Model, Objective};
use anyhow::{ensure, Context, Result};
use facerec_contrastive_regularizer::{
    dropout_views, CoReFace, CoReFaceConfig, ContrastiveRegularizer, RegularizerOutput,
};
use facerec_loss_heads::{ClassShard, Collectives};
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

/// The metrics of a contrastive micro-batch: both classification losses and the regularizer's.
fn metrics_of(losses: &[Tensor], out: &RegularizerOutput) -> Vec<(&'static str, f64)> {
    vec![
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
    ]
}

/// Inverted dropout (keep probability `1 − p`, kept entries scaled by `1/(1 − p)`) on this
/// rank's rows `h_bf` of a batch gathered over `world` ranks of `B` rows each: the mask is drawn
/// for the whole `[world·B, F]` batch from torch's generator and rows `[rank·B, (rank+1)·B)` are
/// taken, which is what `Tensor::dropout` over the concatenated batch draws for those rows (on
/// CPU, `x.dropout(p, true)` is `x * (bernoulli(1 − p) / (1 − p))` drawn for `x`'s shape); so
/// the masks do not depend on the world size. `p = 0` draws nothing, as `dropout` does.
///
/// # Shapes
/// `h_bf [B, F]` -> `[B, F]`.
///
/// # Panics
/// If `p` is not in `[0, 1)`, `rank >= world` or `h_bf` is not 2-d.
pub fn global_dropout(h_bf: &Tensor, p: f64, rank: usize, world: usize) -> Tensor {
    assert!(
        (0.0..1.0).contains(&p),
        "dropout p must be in [0, 1), got {p}"
    );
    assert!(rank < world, "rank {rank} of world {world}");
    if p == 0.0 {
        return h_bf.shallow_clone();
    }
    let (b, f) = h_bf.size2().expect("trunk features must be [B, F]");
    let mask = Tensor::ones([world as i64 * b, f], (h_bf.kind(), h_bf.device())).dropout(p, true);
    h_bf * mask.narrow(0, rank as i64 * b, b)
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
        MicroLoss {
            loss,
            row_mask,
            metrics: metrics_of(&losses, &out),
        }
    }

    /// One view (`warmup_dropout`) before `start_epoch`, two (`dropout`) from it on; the masks
    /// are this rank's rows of the gathered batch's ([`global_dropout`]).
    fn sharded_views(&mut self, model: &Model, x: &Tensor, comm: &dyn Collectives) -> Vec<Tensor> {
        let h = model.trunk(x).to_kind(Kind::Float);
        let (rank, world) = (comm.rank(), comm.world_size());
        let p = self.cfg.dropout_at(self.epoch);
        let views = if self.cfg.is_contrastive(self.epoch) {
            2
        } else {
            1
        };
        (0..views)
            .map(|_| model.neck(&global_dropout(&h, p, rank, world)))
            .collect()
    }

    /// Both views through the sharded cross-entropy over one Partial FC sample of the block; the
    /// contrastive term on the gathered views (the same on every rank, entered as
    /// `replicated_share`, so that its gradient counts once over the ranks).
    fn sharded_loss(
        &mut self,
        model: &Model,
        views_g: &[Tensor],
        y_g: &Tensor,
        shard: ClassShard,
        comm: &dyn Collectives,
    ) -> Result<MicroLoss> {
        let want = if self.cfg.is_contrastive(self.epoch) {
            2
        } else {
            1
        };
        ensure!(
            views_g.len() == want,
            "CoReFace: {} views gathered, epoch {} needs {want}",
            views_g.len(),
            self.epoch
        );
        let (losses, row_mask) = self
            .base
            .sharded_losses_of_views(model, views_g, y_g, shard, comm)?;
        if want == 1 {
            return Ok(MicroLoss {
                loss: losses[0].shallow_clone(),
                row_mask,
                metrics: Vec::new(),
            });
        }
        let out = self.reg.forward_micro_batch(&views_g[0], &views_g[1], y_g);
        let con = replicated_share(&out.loss, comm.world_size());
        let loss = self.cfg.total_loss(&losses[0], &losses[1], &con);
        Ok(MicroLoss {
            loss,
            row_mask,
            metrics: metrics_of(&losses, &out),
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Rank r's masked rows are the rows one process masks over the concatenated batch, drawn
    /// from the same stream: bitwise on CPU, for W = 1, 2, 3 (W = 1 is `Tensor::dropout`).
    #[test]
    fn global_dropout_takes_this_ranks_rows_of_the_whole_batch_mask() {
        let (b, f) = (4i64, 6i64);
        for w in 1..=3usize {
            let h = Tensor::randn([w as i64 * b, f], (Kind::Float, Device::Cpu));
            tch::manual_seed(5);
            let whole = h.dropout(0.3, true);
            let parts: Vec<Tensor> = (0..w)
                .map(|r| {
                    tch::manual_seed(5);
                    global_dropout(&h.narrow(0, r as i64 * b, b), 0.3, r, w)
                })
                .collect();
            assert!(Tensor::cat(&parts, 0).equal(&whole), "{w} ranks");
            // The mask did drop and scale entries.
            let zeros = whole.eq(0.0).sum(Kind::Int64).int64_value(&[]);
            assert!(zeros > 0 && zeros < w as i64 * b * f);
        }
        let h = Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
        assert!(global_dropout(&h, 0.0, 1, 2).equal(&h));
    }
}
