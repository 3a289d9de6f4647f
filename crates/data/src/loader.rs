//! The batch [`Loader`]: deterministic shuffled epochs over a [`Source`], decoded by worker threads into a
//! bounded prefetch window and delivered in order, and [`load_all`] for whole evaluation sets.
//!
//! Determinism: the epoch order is a ChaCha8 shuffle seeded by `hash(seed, epoch)`; the horizontal flip
//! of an image is one bit of `hash(seed, epoch, index)`; a batch is built by one worker from its indices
//! alone. So batch `b` of epoch `e` is bitwise identical for any worker count and for a resumed epoch
//! (`start_step = b`). arcface_torch seeds each DataLoader worker instead, which ties the augmentation
//! to the worker count; we deliberately do not. The order comes from a [`Sampler`]: uniform, or
//! identity-balanced P x K (see [`crate::sampler`]).
//!
//! Threads: [`thread_split`] is the rule for sharing the cores between the decoding workers and
//! libtorch's intra-op threads; [`LoaderConfig::default`] applies it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Tensor};

use crate::augment::AugmentConfig;
use crate::input::to_input_tensor;
use crate::sampler::{group_by_label, pk_chunks, pk_order, Sampler};
use crate::source::{hash_words, Source};
use crate::threads::cores;

/// Loader settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderConfig {
    /// Images per batch. Default 128 (arcface_torch's per-GPU batch size).
    pub batch_size: usize,
    /// Shuffle the order every epoch. Default true.
    pub shuffle: bool,
    /// Drop the last incomplete batch. Default true (as arcface_torch's DataLoader).
    pub drop_last: bool,
    /// Random horizontal flip with p = 0.5. Default true.
    pub flip: bool,
    /// Random translation by up to this many pixels in x and y (edge pixels repeated), decided like
    /// the flip by (seed, epoch, index). Default 0 (off, as arcface_torch).
    pub max_shift: usize,
    /// Decoding threads; 0 decodes on the consumer's thread. Default:
    /// `thread_split(cores, cuda_available).decode_workers` (see [`thread_split`]).
    pub workers: usize,
    /// Batches decoded ahead of the consumer (at least 1). Default 4.
    pub prefetch: usize,
    /// Seed of the order and the flips. Default 2048 (arcface_torch's seed).
    pub seed: u64,
    /// Epoch order: [`Sampler::Uniform`] (default) or identity-balanced P x K.
    pub sampler: Sampler,
    /// Crop, resampling, blur, colour, grayscale and erasing, drawn per (seed, epoch, image)
    /// before the flip and the shift. Default: all off.
    pub augment: AugmentConfig,
}

/// How many threads decode and how many libtorch uses; see [`thread_split`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadSplit {
    /// Loader decoding threads ([`LoaderConfig::workers`]).
    pub decode_workers: usize,
    /// libtorch intra-op threads (`tch::set_num_threads`).
    pub torch_threads: usize,
}

/// The rule for sharing `cores` between JPEG decoding and libtorch's intra-op threads.
///
/// Decoding a 112x112 JPEG and flipping it costs about 0.1 to 0.3 ms of one core (measured by
/// `cargo xtask bench-data`); a training step costs per image what the model costs.
/// - Model on the CPU: an iResNet forward + backward costs tens of milliseconds per image per core, so
///   decoding is about 1% of the work. libtorch keeps every core (`torch_threads = cores`) and one
///   decoding thread (two from 16 cores on) keeps the prefetch window full; it sleeps on the window most
///   of the time, so the oversubscription is short bursts. Taking a core from libtorch for decoding
///   would cost `1/cores` of the step time to save about 1%.
/// - Model on a GPU: the CPU only decodes and launches kernels, and decoding is the bottleneck
///   (arcface_torch runs several DataLoader workers per GPU for this reason): every core but one decodes
///   (`decode_workers = cores - 1`, at least 1) and libtorch gets one thread for the little CPU work
///   left (the training-loop thread feeds the GPU).
pub fn thread_split(cores: usize, model_on_gpu: bool) -> ThreadSplit {
    let cores = cores.max(1);
    if model_on_gpu {
        ThreadSplit {
            decode_workers: (cores - 1).max(1),
            torch_threads: 1,
        }
    } else {
        ThreadSplit {
            decode_workers: 1 + cores / 16,
            torch_threads: cores,
        }
    }
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            batch_size: 128,
            shuffle: true,
            drop_last: true,
            flip: true,
            max_shift: 0,
            workers: thread_split(cores(), tch::Cuda::is_available()).decode_workers,
            prefetch: 4,
            seed: 2048,
            sampler: Sampler::Uniform,
            augment: AugmentConfig::default(),
        }
    }
}

/// One batch: images `B x S x S x 3` (RGB u8, contiguous) with their labels and source indices.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `B*S*S*3` bytes, image after image, HWC.
    pub images: Vec<u8>,
    /// Class of each image.
    pub labels: Vec<i64>,
    /// Source index of each image.
    pub indices: Vec<usize>,
    /// Side length `S`.
    pub image_size: usize,
}

impl Batch {
    /// Images as `[B,3,S,S]` f32 in [-1, 1] (`(x/255 - 0.5)/0.5`, arcface_torch's normalisation, through
    /// [`crate::input::to_input_tensor`]) and labels as `[B]` Int64, both on `device` (the bytes travel
    /// as u8 and are converted there).
    ///
    /// # Shapes
    /// images `[B,3,S,S]` Float, labels `[B]` Int64.
    pub fn to_tensors(&self, device: Device) -> (Tensor, Tensor) {
        let images = to_input_tensor(&self.images, self.len(), self.image_size, device);
        (images, Tensor::from_slice(&self.labels).to_device(device))
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// `len() == 0`.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Deterministic, multi-threaded batches over a shared [`Source`].
pub struct Loader {
    source: Arc<dyn Source>,
    cfg: LoaderConfig,
    wait_ns: Arc<AtomicU64>,
    skipped: Arc<AtomicU64>,
    /// Distinct source indices that failed to load under a skip policy, for the source's ceiling.
    failed: Arc<Mutex<BTreeSet<usize>>>,
    /// Images per class, for the P x K sampler.
    groups: Vec<Vec<usize>>,
}

impl Loader {
    /// A loader over `source`.
    ///
    /// # Panics
    /// When `cfg.batch_size == 0`, or under [`Sampler::IdentityBalanced`] when `k == 0` or
    /// `batch_size` is not a multiple of `k`.
    pub fn new(source: Arc<dyn Source>, cfg: LoaderConfig) -> Self {
        assert!(cfg.batch_size > 0, "LoaderConfig::batch_size must be > 0");
        let groups = match cfg.sampler {
            Sampler::Uniform => Vec::new(),
            Sampler::IdentityBalanced { k } => {
                assert!(
                    k > 0 && cfg.batch_size.is_multiple_of(k),
                    "P x K sampler: batch_size {} must be a positive multiple of k = {k}",
                    cfg.batch_size
                );
                group_by_label(
                    (0..source.len()).map(|i| source.label(i)),
                    source.num_classes(),
                )
            }
        };
        Self {
            source,
            cfg,
            wait_ns: Arc::new(AtomicU64::new(0)),
            skipped: Arc::new(AtomicU64::new(0)),
            failed: Arc::new(Mutex::new(BTreeSet::new())),
            groups,
        }
    }

    /// Images left out of their batch so far because they failed to load under a skip policy
    /// ([`Source::skips_bad_images`]).
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// The source.
    pub fn source(&self) -> &Arc<dyn Source> {
        &self.source
    }

    /// The settings.
    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    /// Batches in one epoch: `len / B` with `drop_last`, else `ceil(len / B)`; under P x K,
    /// `floor(chunks / P)` (see [`crate::sampler`]).
    pub fn batches_per_epoch(&self) -> usize {
        let (n, b) = (self.source.len(), self.cfg.batch_size);
        if let Sampler::IdentityBalanced { k } = self.cfg.sampler {
            return pk_chunks(&self.groups, k) / (b / k);
        }
        if self.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The order of the source indices in `epoch`: a permutation of `0..len`, or under P x K
    /// `batches_per_epoch() * B` indices (some images left out, small identities repeated).
    pub fn epoch_order(&self, epoch: usize) -> Vec<usize> {
        if let Sampler::IdentityBalanced { k } = self.cfg.sampler {
            return pk_order(
                &self.groups,
                self.cfg.batch_size / k,
                k,
                self.cfg.seed,
                epoch,
            );
        }
        let mut order: Vec<usize> = (0..self.source.len()).collect();
        if self.cfg.shuffle {
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(hash_words(&[
                self.cfg.seed,
                epoch as u64,
                SHUFFLE_TAG,
            ])));
        }
        order
    }

    /// Whether image `index` is flipped in `epoch` (false when flipping is off).
    pub fn is_flipped(&self, epoch: usize, index: usize) -> bool {
        self.cfg.flip && hash_words(&[self.cfg.seed, epoch as u64, index as u64, FLIP_TAG]) & 1 == 1
    }

    /// The augmentation of image `index` in `epoch`: flip and shift `(dx, dy)`, each in
    /// `-max_shift..=max_shift`.
    pub fn augmentation(&self, epoch: usize, index: usize) -> Augment {
        let k = self.cfg.max_shift as i64;
        let h = hash_words(&[self.cfg.seed, epoch as u64, index as u64, SHIFT_TAG]);
        let span = (2 * k + 1) as u64;
        let (dx, dy) = if k == 0 {
            (0, 0)
        } else {
            ((h % span) as i64 - k, ((h >> 32) % span) as i64 - k)
        };
        Augment {
            flip: self.is_flipped(epoch, index),
            dx,
            dy,
        }
    }

    /// Batches of one epoch starting at batch `start_step`, in a deterministic order (shuffle from seed and
    /// epoch), decoded by `workers` threads into a bounded prefetch queue, delivered in order. Random flip
    /// (p = 0.5) decided by (seed, epoch, index), so the same batch is bitwise identical whatever the
    /// thread count. A failed load yields one `Err` naming the image, then the iterator ends. Dropping the
    /// iterator stops the workers.
    pub fn epoch(&self, epoch: usize, start_step: usize) -> EpochIter<'_> {
        self.epoch_shard(epoch, start_step, Shard::WHOLE)
    }

    /// [`Loader::epoch`] for one rank of a data-parallel job: the batches `start_step + shard.rank`,
    /// `+ shard.world`, `+ 2·shard.world`, ... of the single-process sequence (batch size
    /// unchanged), so the ranks together read exactly the batches one process would, each batch
    /// once, and every batch is bitwise the one a single process builds.
    ///
    /// # Panics
    /// If `shard.world == 0` or `shard.rank >= shard.world`.
    pub fn epoch_shard(&self, epoch: usize, start_step: usize, shard: Shard) -> EpochIter<'_> {
        assert!(
            shard.rank < shard.world,
            "shard rank {} of world {}",
            shard.rank,
            shard.world
        );
        let end = self.batches_per_epoch();
        let (first, stride) = (start_step + shard.rank, shard.world);
        let order = self.epoch_order(epoch);
        let augments = order.iter().map(|&i| self.augmentation(epoch, i)).collect();
        let job = Arc::new(Job {
            source: self.source.clone(),
            order,
            augments,
            augment: self.cfg.augment.clone(),
            seed: self.cfg.seed,
            epoch,
            batch_size: self.cfg.batch_size,
            skipped: self.skipped.clone(),
            failed: self.failed.clone(),
        });
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                next_claim: first,
                next_deliver: first,
                done: BTreeMap::new(),
                stop: false,
            }),
            cv: Condvar::new(),
        });
        let window = self.cfg.prefetch.max(1);
        let mine = end.saturating_sub(first).div_ceil(stride);
        let workers = (0..self.cfg.workers.min(mine))
            .map(|w| {
                let (job, shared) = (job.clone(), shared.clone());
                std::thread::Builder::new()
                    .name(format!("facerec-data-{w}"))
                    .spawn(move || worker(&job, &shared, end, window, stride))
                    .expect("spawning a data loader thread")
            })
            .collect();
        EpochIter {
            loader: self,
            job,
            shared,
            workers,
            next: first,
            stride,
            end,
            failed: false,
        }
    }

    /// Total time consumers of this loader spent blocked waiting for a batch (including synchronous
    /// decoding when `workers == 0`). Take differences between two reads for a data-wait fraction.
    pub fn wait_time(&self) -> Duration {
        Duration::from_nanos(self.wait_ns.load(Ordering::Relaxed))
    }
}

const SHUFFLE_TAG: u64 = 0x5348_5546; // "SHUF"
const FLIP_TAG: u64 = 0x464C_4950; // "FLIP"
const SHIFT_TAG: u64 = 0x5348_4654; // "SHFT"

/// Which batches of an epoch one rank of a data-parallel job reads (see [`Loader::epoch_shard`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This rank, `0..world`.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
}

impl Shard {
    /// The whole epoch (one process).
    pub const WHOLE: Shard = Shard { rank: 0, world: 1 };
}

/// How one image is augmented: mirrored first, then translated by `(dx, dy)` pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Augment {
    /// Horizontal mirror.
    pub flip: bool,
    /// Shift right by `dx` (left when negative).
    pub dx: i64,
    /// Shift down by `dy` (up when negative).
    pub dy: i64,
}

/// What the workers of one epoch need.
struct Job {
    source: Arc<dyn Source>,
    order: Vec<usize>,
    augments: Vec<Augment>,
    augment: AugmentConfig,
    seed: u64,
    epoch: usize,
    batch_size: usize,
    skipped: Arc<AtomicU64>,
    failed: Arc<Mutex<BTreeSet<usize>>>,
}

impl Job {
    /// Build batch `b` (positions `b*B..min((b+1)*B, len)` of the epoch order).
    fn build(&self, b: usize) -> Result<Batch> {
        let lo = b * self.batch_size;
        let hi = (lo + self.batch_size).min(self.order.len());
        let s = self.source.image_size();
        let mut batch = Batch {
            images: Vec::with_capacity((hi - lo) * s * s * 3),
            labels: Vec::with_capacity(hi - lo),
            indices: Vec::with_capacity(hi - lo),
            image_size: s,
        };
        for (&index, &aug) in self.order[lo..hi].iter().zip(&self.augments[lo..hi]) {
            let image = match load_checked(&*self.source, index) {
                Ok(image) => image,
                Err(err) if self.source.skips_bad_images() => {
                    self.skipped.fetch_add(1, Ordering::Relaxed);
                    eprintln!("skipping a bad image in batch {b}: {err:#}");
                    let distinct = {
                        let mut failed = self.failed.lock().unwrap();
                        failed.insert(index);
                        failed.len()
                    };
                    self.source
                        .check_skipped(distinct)
                        .map_err(|e| e.context(format!("building batch {b}")))?;
                    continue;
                }
                Err(err) => return Err(err.context(format!("building batch {b}"))),
            };
            let image = if self.augment.is_active() {
                self.augment.apply(image, s, self.seed, self.epoch, index)
            } else {
                image
            };
            batch.indices.push(index);
            if aug == Augment::default() {
                batch.images.extend_from_slice(&image);
            } else {
                augment_into(&image, s, aug, &mut batch.images);
            }
            batch.labels.push(self.source.label(index) as i64);
        }
        ensure!(
            !batch.is_empty(),
            "building batch {b}: every image failed to load"
        );
        Ok(batch)
    }
}

/// `source.load(index)` with the size checked, errors naming the image.
fn load_checked(source: &dyn Source, index: usize) -> Result<Vec<u8>> {
    let s = source.image_size();
    let image = source
        .load(index)
        .with_context(|| format!("loading {}", source.describe(index)))?;
    ensure!(
        image.len() == s * s * 3,
        "{}: decoded to {} bytes, expected {s}x{s}x3 = {}",
        source.describe(index),
        image.len(),
        s * s * 3
    );
    Ok(image)
}

/// Append an `s x s x 3` image mirrored (if `aug.flip`) and then shifted by `(aug.dx, aug.dy)`,
/// repeating edge pixels where the shift uncovers the border.
fn augment_into(image: &[u8], s: usize, aug: Augment, out: &mut Vec<u8>) {
    let last = s as i64 - 1;
    for y in 0..s as i64 {
        let sy = (y - aug.dy).clamp(0, last) as usize;
        let row = &image[sy * s * 3..(sy + 1) * s * 3];
        for x in 0..s as i64 {
            let sx = (x - aug.dx).clamp(0, last);
            let sx = if aug.flip { last - sx } else { sx } as usize;
            out.extend_from_slice(&row[sx * 3..sx * 3 + 3]);
        }
    }
}

struct State {
    next_claim: usize,
    next_deliver: usize,
    done: BTreeMap<usize, Result<Batch>>,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
}

/// Claim batch numbers in order (every `stride`-th), at most `window` batches ahead of the
/// consumer, until the epoch ends or the iterator is dropped.
fn worker(job: &Job, shared: &Shared, end: usize, window: usize, stride: usize) {
    loop {
        let b = {
            let mut st = shared.state.lock().unwrap();
            while !st.stop
                && st.next_claim < end
                && st.next_claim >= st.next_deliver + window * stride
            {
                st = shared.cv.wait(st).unwrap();
            }
            if st.stop || st.next_claim >= end {
                return;
            }
            st.next_claim += stride;
            st.next_claim - stride
        };
        // A panicking source must not leave the consumer waiting for this batch forever.
        let batch = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.build(b)))
            .unwrap_or_else(|_| {
                Err(anyhow::anyhow!(
                    "building batch {b}: the data source panicked"
                ))
            });
        let mut st = shared.state.lock().unwrap();
        st.done.insert(b, batch);
        shared.cv.notify_all();
    }
}

/// The batches of one epoch, in order (see [`Loader::epoch`]).
pub struct EpochIter<'a> {
    loader: &'a Loader,
    job: Arc<Job>,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    next: usize,
    stride: usize,
    end: usize,
    failed: bool,
}

impl Iterator for EpochIter<'_> {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.failed || self.next >= self.end {
            return None;
        }
        let start = Instant::now();
        let batch = if self.workers.is_empty() {
            self.job.build(self.next)
        } else {
            let mut st = self.shared.state.lock().unwrap();
            loop {
                if let Some(batch) = st.done.remove(&self.next) {
                    st.next_deliver = self.next + self.stride;
                    self.shared.cv.notify_all();
                    break batch;
                }
                st = self.shared.cv.wait(st).unwrap();
            }
        };
        self.loader
            .wait_ns
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.next += self.stride;
        self.failed = batch.is_err();
        Some(batch)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = if self.failed {
            0
        } else {
            self.end.saturating_sub(self.next).div_ceil(self.stride)
        };
        (0, Some(n))
    }
}

impl Drop for EpochIter<'_> {
    fn drop(&mut self) {
        self.shared.state.lock().unwrap().stop = true;
        self.shared.cv.notify_all();
        for handle in self.workers.drain(..) {
            let _ = handle.join(); // workers catch panics of the source; nothing to report here
        }
    }
}

/// Decode `n` images with `decode(i)` (HWC RGB bytes, `size x size x 3`) on `threads` threads (at
/// least one) into one contiguous `n*size*size*3` buffer, image after image. `tick` is called once per
/// decoded image (progress bars). The first error of a failing thread's chunk is returned; a decoder
/// that returns the wrong number of bytes is an error naming the image index.
///
/// # Panics
/// When a decoding thread panics.
pub fn decode_parallel(
    n: usize,
    size: usize,
    threads: usize,
    decode: &(dyn Fn(usize) -> Result<Vec<u8>> + Sync),
    tick: &(dyn Fn() + Sync),
) -> Result<Vec<u8>> {
    let per_image = size * size * 3;
    let mut bytes = vec![0u8; n * per_image];
    let chunk_images = n.div_ceil(threads.max(1)).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = bytes
            .chunks_mut(chunk_images * per_image)
            .enumerate()
            .map(|(c, chunk)| {
                scope.spawn(move || -> Result<()> {
                    for (k, dst) in chunk.chunks_exact_mut(per_image).enumerate() {
                        let i = c * chunk_images + k;
                        let image = decode(i)?;
                        ensure!(
                            image.len() == per_image,
                            "image {i}: decoded to {} bytes, expected {per_image}",
                            image.len()
                        );
                        dst.copy_from_slice(&image);
                        tick();
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("an image decoding thread panicked"))
    })?;
    Ok(bytes)
}

/// All images of a source (no flip) as `[N,3,S,S]` f32 in [-1, 1], decoded by `workers` threads (at
/// least one); labels in index order. Errors name the first image that failed.
///
/// # Shapes
/// returns images `[N,3,S,S]` Float on the CPU and `N` labels.
pub fn load_all(source: &dyn Source, workers: usize) -> Result<(Tensor, Vec<usize>)> {
    let (n, s) = (source.len(), source.image_size());
    let bytes = decode_parallel(n, s, workers, &|i| load_checked(source, i), &|| {})?;
    let labels = (0..n).map(|i| source.label(i)).collect();
    Ok((to_input_tensor(&bytes, n, s, Device::Cpu), labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flip_mirrors_columns() {
        // 2x2 image, pixels numbered by position.
        let img: Vec<u8> = (0..12).collect();
        let mut out = Vec::new();
        augment_into(
            &img,
            2,
            Augment {
                flip: true,
                dx: 0,
                dy: 0,
            },
            &mut out,
        );
        assert_eq!(out, [3, 4, 5, 0, 1, 2, 9, 10, 11, 6, 7, 8]);
    }

    #[test]
    fn shift_repeats_edges() {
        // 3x3 one-channel-like image (all three channels equal): value = 10*row + col.
        let img: Vec<u8> = (0..9).flat_map(|p| [10 * (p / 3) + p % 3; 3]).collect();
        let gray = |v: &[u8]| v.chunks(3).map(|c| c[0]).collect::<Vec<_>>();
        let mut out = Vec::new();
        augment_into(
            &img,
            3,
            Augment {
                flip: false,
                dx: 1,
                dy: -1,
            },
            &mut out,
        );
        // Right by one (column 0 repeated), up by one (last row repeated).
        assert_eq!(gray(&out), [10, 10, 11, 20, 20, 21, 20, 20, 21]);
        out.clear();
        augment_into(
            &img,
            3,
            Augment {
                flip: true,
                dx: 1,
                dy: 0,
            },
            &mut out,
        );
        // Mirror first (rows become 2,1,0), then shift right.
        assert_eq!(gray(&out), [2, 2, 1, 12, 12, 11, 22, 22, 21]);
    }
}
