//! Cluster-guided ArcFace in the trainer (`[cluster_guided]`; our reading and every choice in
//! docs/cluster-guided.md).
//!
//! At the start of every epoch `e > 0` with `e % refresh_every_epochs == 0` the objective embeds
//! the training set (or a class-stratified subset) in eval mode, clusters each identity, and
//! sets the per-identity margins from the cluster hardness and the cluster centres; with
//! `align.mode = "reimprint" | "both"` it also re-imprints the classifier rows. Each step:
//! `CE(cluster-guided ArcFace) + λ_scc·L_scc + λ_align·L_align` (the centre terms only once a
//! refresh has happened). Margins, centres and the epoch of the last refresh are objective state,
//! so a resumed run neither repeats nor skips a refresh.
//!
//! The objective is composed from two crates: the head and its margin-from-hardness rule from
//! `facerec-loss-heads` (`cluster_guided`), the hardness, centres, `L_scc`, `L_align` and
//! re-imprinting from `facerec-clustering`. The `[cluster_guided]` table that configures both is
//! [`ClusterGuidedConfig`] ([`config`]).
//!
//! Model parallel (`classifier.sharding = "model_parallel"`, docs/distributed.md): the margin
//! table, the centres and their validity stay whole on every rank (`[C]`, `[C, D]`), and every
//! rank computes the same refresh (each embeds the whole subset: the backbone is the same on
//! every rank) and re-imprints the rows of its own block only. A step classifies the gathered
//! batch through the sharded cross-entropy with each row's margin `m_{y_i}`
//! ([`ClusterGuidedArcFace::for_classes`]); `L_scc` and the centres' EMA are computed on the
//! gathered embeddings, identically on every rank (`L_scc` enters as `replicated_share`);
//! `L_align` is a sum over the batch's identities, each term on the rank that owns the class row,
//! divided by the global count of valid identities, and its value summed across ranks.

pub mod config;

pub use config::ClusterGuidedConfig;

use super::{replicated_share, sample_classes, MicroLoss, Model, Objective, TrainingSet};
use anyhow::{bail, Context, Result};
use facerec_clustering::cluster_guided::{
    align_loss, cluster_statistics, reimprint, scc_loss, stratified_subset, ClusterCentres,
};
use facerec_loss_heads::{
    cross_entropy, margins_from_hardness, sharded_training_loss, ClassShard, ClusterGuidedArcFace,
    Collectives, MarginHead, PartialFc, PartialFcConfig,
};
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

/// Images per forward pass at a refresh.
const REFRESH_BATCH: usize = 128;

/// The cluster-guided objective.
pub struct ClusterGuidedObjective {
    cfg: ClusterGuidedConfig,
    head: ClusterGuidedArcFace,
    centres: ClusterCentres,
    partial_fc: Option<PartialFc>,
    /// Epoch whose start ran the last refresh (-1: none yet).
    last_refresh: i64,
    /// Identities `C` (the length of the tables).
    num_classes: i64,
    /// Model parallel: this rank's block of the classifier (`None`: the classifier is whole).
    shard: Option<ClassShard>,
}

impl ClusterGuidedObjective {
    /// Tables for `num_classes` identities and `dim`-dimensional embeddings on `device`;
    /// `shard`: this rank's block of the classifier under model parallelism (`None`: whole).
    pub fn new(
        cfg: &ClusterGuidedConfig,
        partial_fc: &PartialFcConfig,
        (num_classes, shard): (i64, Option<ClassShard>),
        dim: i64,
        device: Device,
    ) -> Self {
        let margins = Tensor::full([num_classes], cfg.margin.m0, (Kind::Float, device));
        let centres = ClusterCentres::from_tensors(
            Tensor::zeros([num_classes, dim], (Kind::Float, device)),
            &Tensor::zeros([num_classes], (Kind::Float, device)),
        );
        ClusterGuidedObjective {
            cfg: cfg.clone(),
            head: ClusterGuidedArcFace::with_margins(margins, cfg.margin.s, cfg.margin.gradient),
            centres,
            partial_fc: (partial_fc.sample_rate < 1.0).then(|| PartialFc::new(partial_fc)),
            last_refresh: -1,
            num_classes,
            shard,
        }
    }

    fn refreshed(&self) -> bool {
        self.last_refresh >= 0
    }

    /// The centres of the classifier rows this rank holds: all of them, or its block's.
    fn block_centres(&self) -> ClusterCentres {
        let (start, len) = match self.shard {
            Some(s) => (s.start, s.len),
            None => (0, self.num_classes),
        };
        ClusterCentres::from_tensors(
            self.centres.centres().narrow(0, start, len),
            &self.centres.valid().narrow(0, start, len),
        )
    }

    /// Model parallel `L_align`: this rank's share (the identities of the gathered batch whose
    /// class row it owns, over the global count of valid identities), with the value of the sum
    /// over the ranks.
    fn sharded_align(
        &self,
        weight_block: &Tensor,
        y_g: &Tensor,
        shard: ClassShard,
        comm: &dyn Collectives,
    ) -> Result<Tensor> {
        let kind = Kind::Float;
        let (classes, _, _) = y_g.unique_dim(0, true, false, false);
        let global_count = self
            .centres
            .valid()
            .index_select(0, &classes)
            .to_kind(kind)
            .sum(kind)
            .clamp_min(1.0);
        let local = shard.local_labels(&classes);
        let own = local.masked_select(&local.ge(0));
        let part = if own.numel() == 0 {
            (weight_block.sum(kind) * 0.0).to_kind(kind)
        } else {
            let block = self.block_centres();
            let local_count = block.valid().index_select(0, &own).to_kind(kind).sum(kind);
            align_loss(weight_block, &own, &block).to_kind(kind) * local_count / &global_count
        };
        let total = comm
            .all_reduce_sum(&part.detach())
            .context("cluster-guided: all-reduce of the alignment loss")?;
        Ok(&part + (total - part.detach()))
    }

    fn refresh(&mut self, epoch: usize, model: &Model, data: &dyn TrainingSet) -> Result<String> {
        let labels: Vec<i64> = (0..data.len()).map(|i| data.label(i) as i64).collect();
        let idx = stratified_subset(
            &labels,
            self.cfg.samples_per_class,
            self.cfg.subset_seed ^ epoch as u64,
        );
        let emb = {
            let _guard = tch::no_grad_guard();
            let mut parts = Vec::new();
            for chunk in idx.chunks(REFRESH_BATCH) {
                let x = data
                    .images(chunk)
                    .context("embedding the training set for the cluster refresh")?;
                let emb = model.embed(&x, false);
                parts.push(emb.to_kind(Kind::Float));
            }
            Tensor::cat(&parts, 0)
        };
        let sub_labels: Vec<i64> = idx.iter().map(|&i| labels[i]).collect();
        let stats = cluster_statistics(
            &emb,
            &sub_labels,
            self.num_classes as usize,
            self.cfg.clustering,
            self.cfg.hardness,
        );
        let margins = margins_from_hardness(&stats.hardness, &self.cfg.margin);
        self.head.set_margins(&margins);
        self.centres.set(&stats);
        let reimprinted = if self.cfg.align.uses_reimprint() {
            // Model parallel: the rows of this rank's block (the count is this rank's).
            reimprint(
                model.classifier.weight(),
                &self.block_centres(),
                self.cfg.align.beta,
                self.cfg.align.norm,
            )
        } else {
            0
        };
        self.last_refresh = epoch as i64;
        let seen = stats.class_sizes.iter().filter(|&&n| n > 0).count();
        let (lo, hi) = margins
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &m| {
                (a.min(m), b.max(m))
            });
        let mean = margins.iter().sum::<f64>() / margins.len().max(1) as f64;
        Ok(format!(
            "cluster refresh: {} images embedded, {seen} identities with a centre, mean hardness {:.4}, margins min {lo:.4} mean {mean:.4} max {hi:.4}, {reimprinted} classifier rows re-imprinted",
            idx.len(),
            stats.mean_hardness()
        ))
    }
}

impl Objective for ClusterGuidedObjective {
    fn begin_step(&mut self, step: usize, _epoch: usize) {
        if let Some(pfc) = self.partial_fc.as_mut() {
            pfc.set_step(step as u64);
        }
    }

    fn loss(&mut self, model: &Model, x: &Tensor, y: &Tensor) -> MicroLoss {
        let emb = model.embed(x, true);
        let (sampled, row_mask) = sample_classes(self.partial_fc.as_mut(), y, model);
        let (emb, scores) = model.scores(emb, sampled.as_ref());
        let (logits, labels) = match &sampled {
            Some(s) => (
                self.head.logits_for_classes(&scores, &s.labels, y),
                s.labels.shallow_clone(),
            ),
            None => (self.head.logits(&scores, y), y.shallow_clone()),
        };
        let ce = cross_entropy(&logits, &labels);
        let mut loss = ce.shallow_clone();
        let mut metrics = Vec::new();
        if self.refreshed() {
            if self.cfg.scc.weight > 0.0 {
                let extra = (self.cfg.scc.extra_negatives > 0).then(|| {
                    Tensor::randint(
                        self.num_classes,
                        [self.cfg.scc.extra_negatives as i64],
                        (Kind::Int64, y.device()),
                    )
                });
                let scc = scc_loss(&emb, y, &self.centres, self.cfg.scc.scale, extra.as_ref());
                metrics.push(("loss_scc", f64::try_from(&scc).unwrap_or(f64::NAN)));
                loss += scc * self.cfg.scc.weight;
            }
            if self.cfg.align.uses_loss() {
                let align = align_loss(model.classifier.weight(), y, &self.centres);
                metrics.push(("loss_align", f64::try_from(&align).unwrap_or(f64::NAN)));
                loss += align * self.cfg.align.weight;
            }
            if let Some(alpha) = self.cfg.scc.ema {
                self.centres.ema_update(&emb, y, alpha);
            }
            metrics.push(("loss_cls", f64::try_from(&ce).unwrap_or(f64::NAN)));
        }
        MicroLoss {
            loss,
            row_mask,
            metrics,
        }
    }

    /// The gathered batch through the sharded cross-entropy with each row's margin; `L_scc` and
    /// the centres' EMA on the gathered embeddings (the same on every rank), `L_align` split by
    /// the owners of the class rows (see the module docs).
    fn sharded_loss(
        &mut self,
        model: &Model,
        views_g: &[Tensor],
        y_g: &Tensor,
        shard: ClassShard,
        comm: &dyn Collectives,
    ) -> Result<MicroLoss> {
        let [emb_g] = views_g else {
            bail!("cluster-guided: one view, got {}", views_g.len());
        };
        let sampled = self
            .partial_fc
            .as_mut()
            .map(|pfc| pfc.sample_shard(y_g, shard));
        let (labels, row_mask) = match &sampled {
            Some(s) => (
                s.labels.shallow_clone(),
                Some(s.row_mask(shard.len, Kind::Float)),
            ),
            None => (shard.local_labels(y_g), None),
        };
        let (emb, cos) = model.scores(emb_g.shallow_clone(), sampled.as_ref());
        let norms = emb.norm_scalaropt_dim(2, [1], false);
        let mut head = self.head.for_classes(y_g);
        let ce = sharded_training_loss(&mut head, &cos, &labels, &norms, comm)?;
        let mut loss = ce.shallow_clone();
        let mut metrics = Vec::new();
        if self.refreshed() {
            let world = comm.world_size();
            if self.cfg.scc.weight > 0.0 {
                let extra = (self.cfg.scc.extra_negatives > 0).then(|| {
                    Tensor::randint(
                        self.num_classes,
                        [self.cfg.scc.extra_negatives as i64],
                        (Kind::Int64, y_g.device()),
                    )
                });
                let scc = scc_loss(&emb, y_g, &self.centres, self.cfg.scc.scale, extra.as_ref());
                metrics.push(("loss_scc", f64::try_from(&scc).unwrap_or(f64::NAN)));
                loss += replicated_share(&scc, world) * self.cfg.scc.weight;
            }
            if self.cfg.align.uses_loss() {
                let align = self.sharded_align(model.classifier.weight(), y_g, shard, comm)?;
                metrics.push(("loss_align", f64::try_from(&align).unwrap_or(f64::NAN)));
                loss += align * self.cfg.align.weight;
            }
            if let Some(alpha) = self.cfg.scc.ema {
                self.centres.ema_update(&emb, y_g, alpha);
            }
            metrics.push(("loss_cls", f64::try_from(&ce).unwrap_or(f64::NAN)));
        }
        Ok(MicroLoss {
            loss,
            row_mask,
            metrics,
        })
    }

    fn begin_epoch(
        &mut self,
        epoch: usize,
        model: &Model,
        data: &dyn TrainingSet,
    ) -> Result<Option<String>> {
        let due = epoch > 0 && epoch.is_multiple_of(self.cfg.refresh_every_epochs);
        if !due || self.last_refresh == epoch as i64 {
            return Ok(None);
        }
        self.refresh(epoch, model, data).map(Some)
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        vec![
            ("cluster_guided.margins".into(), self.head.margins().copy()),
            (
                "cluster_guided.centres".into(),
                self.centres.centres().copy(),
            ),
            ("cluster_guided.valid".into(), self.centres.valid().copy()),
            (
                "cluster_guided.last_refresh".into(),
                Tensor::from(self.last_refresh),
            ),
        ]
    }

    fn load_state(&mut self, mut state: HashMap<String, Tensor>) -> Result<()> {
        let mut take = |k: &str| {
            state.remove(k).with_context(|| {
                format!("objective state lacks `{k}` (a checkpoint of another objective?)")
            })
        };
        let margins = take("cluster_guided.margins")?;
        let centres = take("cluster_guided.centres")?;
        let valid = take("cluster_guided.valid")?;
        let last = take("cluster_guided.last_refresh")?;
        if margins.size() != self.head.margins().size()
            || centres.size() != self.centres.centres().size()
        {
            bail!(
                "cluster_guided state has shapes {:?} / {:?}, the model needs {:?} / {:?}",
                margins.size(),
                centres.size(),
                self.head.margins().size(),
                self.centres.centres().size()
            );
        }
        let dev = self.head.margins().device();
        let margins_v: Vec<f64> = Vec::try_from(margins.to_kind(Kind::Double))?;
        self.head.set_margins(&margins_v);
        self.centres = ClusterCentres::from_tensors(centres.to_device(dev), &valid.to_device(dev));
        self.last_refresh = i64::try_from(&last)?;
        if let Some(k) = state.keys().next() {
            bail!("objective state has an entry `{k}` that cluster-guided training does not have");
        }
        Ok(())
    }
}
