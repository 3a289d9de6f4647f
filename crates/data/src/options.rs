//! The loader's options as a run configures them: the `[loader]` table of the trainer's TOML
//! deserialises straight into [`LoaderOptions`], and [`LoaderOptions::config`] adds what the run
//! decides (batch size, seed, the resolved number of decoding threads).

use crate::loader::LoaderConfig;
use crate::sampler::Sampler;
use serde::{Deserialize, Serialize};

/// Augmentation, batch composition and decoding threads of the training loader (`[loader]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoaderOptions {
    /// Random horizontal flip (p = 0.5, decided by seed, epoch and image). Default true.
    #[serde(default = "yes")]
    pub flip: bool,
    /// Random translation by up to this many pixels (edges repeated). Default 0 (off).
    #[serde(default)]
    pub max_shift: usize,
    /// Identity-balanced P x K batches with K = this many images per identity (P = batch size /
    /// K); 0 = uniform shuffling. Default 0.
    #[serde(default)]
    pub images_per_identity: usize,
    /// Decoding threads; 0 = automatic (the trainer's `thread_split`: 1 on CPU, cores - 1 when the
    /// model runs on CUDA). Default 0.
    #[serde(default)]
    pub workers: usize,
    /// Batches decoded ahead. Default 4.
    #[serde(default = "four")]
    pub prefetch: usize,
}

fn yes() -> bool {
    true
}
fn four() -> usize {
    4
}

impl Default for LoaderOptions {
    fn default() -> Self {
        LoaderOptions {
            flip: true,
            max_shift: 0,
            images_per_identity: 0,
            workers: 0,
            prefetch: 4,
        }
    }
}

impl LoaderOptions {
    /// The epoch order these options ask for.
    pub fn sampler(&self) -> Sampler {
        match self.images_per_identity {
            0 => Sampler::Uniform,
            k => Sampler::IdentityBalanced { k },
        }
    }

    /// The shuffled, last-batch-dropping training loader of batches of `batch_size` with the
    /// run's `seed` (no [`crate::AugmentConfig`] augmentation: the trainer sets its `[augment]`), decoded by `workers` threads (the resolved count; [`LoaderOptions::workers`]
    /// may be 0 = automatic).
    pub fn config(&self, batch_size: usize, seed: u64, workers: usize) -> LoaderConfig {
        LoaderConfig {
            batch_size,
            shuffle: true,
            drop_last: true,
            flip: self.flip,
            max_shift: self.max_shift,
            workers,
            prefetch: self.prefetch,
            seed,
            sampler: self.sampler(),
            augment: Default::default(),
        }
    }
}
