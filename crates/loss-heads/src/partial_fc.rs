//! Partial FC class sampling: An, Zhu, Xiao, Wu, Zhang, Fu, Deng, Yu, Zhou, Liu, "Partial FC:
//! Training 10 Million Identities on a Single Machine", ICCVW 2021, arXiv 2010.05222; and An et
//! al., "Killing Two Birds with One Stone: Efficient and Robust Training of Face Recognition
//! CNNs by Partial FC", CVPR 2022.
//!
//! Idea: with millions of classes, most negative class centres contribute almost nothing to a
//! step's softmax. Each step keeps every class that occurs in the batch (the positives) plus a
//! uniformly random subset of the others, `⌊r·C⌋` classes in all, and computes logits against
//! `W[index]` only (SPEC 1(f)): draw `u ~ U(0, 1)` per class, set `u = 2` for positives, take
//! the top `⌊r·C⌋`, sort ascending, remap labels by binary search. If `⌊r·C⌋` is smaller than the
//! number of positives, the index is the positives alone.
//!
//! Deliberate differences from arcface_torch's `partial_fc_v2`:
//! - One process samples all `C` classes with [`PartialFc::sample`]; under model parallelism each
//!   rank samples its own block with [`PartialFc::sample_shard`] (the rate applies per rank, as
//!   in v2), from the same per-class draws.
//! - The draw comes from a ChaCha8 generator owned by the sampler, seeded by
//!   [`PartialFcConfig::seed`]; [`PartialFc::set_step`] moves it to the stream of that step, so
//!   the sampled index depends only on `(seed, step, labels)` and a resumed run samples the same
//!   classes. (arcface_torch draws from torch's global generator on the device.)
//! - v2 lets SGD momentum and weight decay touch *all* rows every step; the returned
//!   [`Sampled::index`] (and [`Sampled::row_mask`]) lets the optimiser restrict both to the
//!   sampled rows, as v1 did.

use anyhow::{ensure, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::sharded::ClassShard;

/// `[partial_fc]`: class sampling for the classifier.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PartialFcConfig {
    /// Fraction `r` of the classes kept per step, in `(0, 1]`. Default 1.0 (no sampling; the
    /// arcface_torch value for MS1M, Glint360K and WF4M; 0.2–0.3 for WebFace42M).
    #[serde(default = "default_rate")]
    pub sample_rate: f64,
    /// Seed of the sampler's generator. Default 0.
    #[serde(default)]
    pub seed: u64,
}

fn default_rate() -> f64 {
    1.0
}

impl Default for PartialFcConfig {
    fn default() -> Self {
        Self {
            sample_rate: default_rate(),
            seed: 0,
        }
    }
}

impl PartialFcConfig {
    /// `sample_rate` must be in `(0, 1]`; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let r = self.sample_rate;
        ensure!(
            r > 0.0 && r <= 1.0,
            "sample_rate must be in (0, 1], got {r}"
        );
        Ok(())
    }
}

/// One step's sampled classes.
#[derive(Debug)]
pub struct Sampled {
    /// Sampled class ids, sorted ascending, Int64, on the labels' device. `[C']`.
    pub index: Tensor,
    /// Labels remapped to positions in `index`, Int64. `[B]`.
    pub labels: Tensor,
}

impl Sampled {
    /// Number of sampled classes `C'`.
    pub fn len(&self) -> i64 {
        self.index.size()[0]
    }

    /// True when no class was sampled (never the case for a non-empty batch).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A `[C, 1]` mask (kind `kind`, on the index's device) that is 1 on sampled rows and 0
    /// elsewhere: multiply momentum and weight-decay updates of `W [C, D]` by it so unsampled
    /// rows stay untouched in this step.
    pub fn row_mask(&self, num_classes: i64, kind: Kind) -> Tensor {
        Tensor::zeros([num_classes, 1], (kind, self.index.device())).index_fill(0, &self.index, 1.0)
    }

    /// [`Sampled::row_mask`] for a weight with `rows_per_class` rows per class (sub-centres,
    /// class `c` in rows `c·K .. c·K + K`): `[C·K, 1]`, 1 on every row of a sampled class.
    pub fn row_mask_of_rows(&self, num_classes: i64, rows_per_class: i64, kind: Kind) -> Tensor {
        let mask = self.row_mask(num_classes, kind);
        if rows_per_class == 1 {
            mask
        } else {
            mask.repeat_interleave_self_int(rows_per_class, Some(0), None)
        }
    }
}

/// The Partial FC sampler: owns the sample rate and a seeded generator.
#[derive(Debug, Clone)]
pub struct PartialFc {
    sample_rate: f64,
    seed: u64,
    step: u64,
    rng: ChaCha8Rng,
}

impl PartialFc {
    /// Builds the sampler from a (validated) config.
    pub fn new(cfg: &PartialFcConfig) -> Self {
        Self {
            sample_rate: cfg.sample_rate,
            seed: cfg.seed,
            step: 0,
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
        }
    }

    /// Moves the generator to the stream of `step` (see the module docs): the draw of a step
    /// then depends only on `(seed, step)`.
    pub fn set_step(&mut self, step: u64) {
        self.step = step;
        self.rng = ChaCha8Rng::seed_from_u64(self.seed);
        self.rng.set_stream(step);
    }

    /// `⌊r·C⌋`, at least 1.
    pub fn num_sample(&self, num_classes: i64) -> i64 {
        ((self.sample_rate * num_classes as f64).floor() as i64).max(1)
    }

    /// Samples this step's classes: all positives plus a uniform random subset of the others.
    ///
    /// # Shapes
    /// `labels_b [B]` (Int64, values in `[0, num_classes)`) -> [`Sampled`].
    ///
    /// # Panics
    /// If `labels_b` is not a 1-D Int64 tensor.
    pub fn sample(&mut self, labels_b: &Tensor, num_classes: i64) -> Sampled {
        let u: Vec<f32> = (0..num_classes).map(|_| self.rng.gen::<f32>()).collect();
        let u_c = Tensor::from_slice(&u).to_device(labels_b.device());
        Self::sample_with_uniform(labels_b, self.num_sample(num_classes), &u_c)
    }

    /// The deterministic core of [`PartialFc::sample`], given the per-class uniform draw `u_c`.
    ///
    /// # Shapes
    /// `labels_b [B]` (Int64), `u_c [C]` (float, values in `[0, 1)`) -> [`Sampled`].
    ///
    /// # Panics
    /// If `labels_b` is not 1-D Int64 or `u_c` is not 1-D.
    pub fn sample_with_uniform(labels_b: &Tensor, num_sample: i64, u_c: &Tensor) -> Sampled {
        assert_eq!(labels_b.kind(), Kind::Int64, "labels must be Int64");
        assert_eq!(labels_b.dim(), 1, "labels must be [B]");
        assert_eq!(u_c.dim(), 1, "the uniform draw must be [C]");
        let (positives, _) = labels_b.internal_unique(true, false);
        let index = if num_sample >= positives.size()[0] {
            let u = u_c.index_fill(0, &positives, 2.0);
            let (_, top) = u.topk(num_sample, 0, true, false);
            top.sort(0, false).0
        } else {
            positives
        };
        let labels = labels_b.searchsorted(&index, false, false, "left", None::<Tensor>);
        Sampled { index, labels }
    }

    /// This rank's sample (model-parallel Partial FC): every class of `shard` that is a label of
    /// the gathered batch, plus a uniform share of its other rows, `⌊r·shard.len⌋` rows in all
    /// (the positives alone if there are more; none for an empty block).
    ///
    /// The uniform draw of class `k` is the `k`-th value of the step's stream (the generator
    /// seeded by `seed`, on stream `step` of [`PartialFc::set_step`], sought to word
    /// `shard.start`), the same value [`PartialFc::sample`] draws for class `k` in one process:
    /// the sample depends only on `(seed, step, labels, shard)`, so every rank and a resumed run
    /// draw deterministically, and with one shard covering all classes it equals
    /// [`PartialFc::sample`]. It does not advance the sampler's own generator.
    ///
    /// [`Sampled::index`]: *local* row indices into the shard's block, ascending (add
    /// `shard.start` for class ids); [`Sampled::labels`]: column in the sample of each row's
    /// target, `-1` where another rank owns it (the `local_labels` of
    /// [`crate::sharded_cross_entropy`]).
    ///
    /// # Shapes
    /// `labels_b [B]` (Int64, global class ids of the gathered batch) -> [`Sampled`].
    ///
    /// # Panics
    /// If `labels_b` is not a 1-D Int64 tensor.
    pub fn sample_shard(&mut self, labels_b: &Tensor, shard: ClassShard) -> Sampled {
        assert_eq!(labels_b.dim(), 1, "labels must be [B]");
        let local_b = shard.local_labels(labels_b);
        let owned_b = local_b.ge(0);
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(self.step);
        rng.set_word_pos(shard.start as u128);
        let u: Vec<f32> = (0..shard.len).map(|_| rng.gen::<f32>()).collect();
        let u_c = Tensor::from_slice(&u).to_device(labels_b.device());
        let (positives, _) = local_b.masked_select(&owned_b).internal_unique(true, false);
        let num_sample = (self.sample_rate * shard.len as f64).floor() as i64;
        let index = if num_sample > 0 && num_sample >= positives.size()[0] {
            let u = u_c.index_fill(0, &positives, 2.0);
            let (_, top) = u.topk(num_sample, 0, true, false);
            top.sort(0, false).0
        } else {
            positives
        };
        let column_b =
            local_b
                .clamp_min(0)
                .searchsorted(&index, false, false, "left", None::<Tensor>);
        let labels = column_b.where_self(&owned_b, &local_b.full_like(-1));
        Sampled { index, labels }
    }

    /// The identity sampling (every class, labels unchanged), for code paths that always go
    /// through [`Sampled`].
    pub fn all(labels_b: &Tensor, num_classes: i64) -> Sampled {
        let device: Device = labels_b.device();
        Sampled {
            index: Tensor::arange(num_classes, (Kind::Int64, device)),
            labels: labels_b.shallow_clone(),
        }
    }
}
