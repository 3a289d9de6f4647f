//! Cosine (spherical) k-means with k-means++ seeding.
//!
//! Papers: Dhillon & Modha, "Concept Decompositions for Large Sparse Text Data Using Clustering",
//! Machine Learning 42 (2001), doi 10.1023/A:1007612920971 (spherical k-means); Arthur &
//! Vassilvitskii, "k-means++: The Advantages of Careful Seeding", SODA 2007 (seeding).
//!
//! Idea: on the unit sphere, assign every embedding to the centre of highest cosine and move each
//! centre to the normalised sum of its members; this maximises the total cosine to the centres.
//! Seeding picks the first centre uniformly and every next one with probability proportional to
//! `d(x)²`, `d(x) = 1 − max cos(x, chosen centres)`.
//!
//! Everything is tch ops on the embeddings' device; the `[N, K]` similarities exist one block of
//! rows at a time (at most `chunk_elems` entries). Random draws come from a ChaCha stream seeded by
//! `seed` (never libtorch's global generator), so a run is reproducible on a given device.
//! Deliberate choices: an empty cluster is re-seeded with the point farthest from its centre
//! (lowest best cosine), and iteration stops when no assignment changes.

use anyhow::{ensure, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::neighbours::{normalize, rows_per_chunk, DEFAULT_CHUNK_ELEMS};

/// Cosine k-means options.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KMeansConfig {
    /// Number of clusters `K` (>= 1, <= N). Default 8.
    #[serde(default = "default_k")]
    pub k: usize,
    /// Maximum Lloyd iterations. Default 100.
    #[serde(default = "default_max_iter")]
    pub max_iter: usize,
    /// Seed of the k-means++ draws. Default 0.
    #[serde(default)]
    pub seed: u64,
    /// Independent k-means++ starts (seeds `seed, seed + 1, ...`); the run with the highest total
    /// cosine to its centres is kept (a single seeding can merge two true clusters and split
    /// another). Default 3.
    #[serde(default = "default_n_init")]
    pub n_init: usize,
    /// Element budget of one `[rows, K]` similarity block. Default 2^24.
    #[serde(default = "default_chunk")]
    pub chunk_elems: i64,
}

fn default_k() -> usize {
    8
}
fn default_max_iter() -> usize {
    100
}
fn default_n_init() -> usize {
    3
}
fn default_chunk() -> i64 {
    DEFAULT_CHUNK_ELEMS
}

impl Default for KMeansConfig {
    fn default() -> Self {
        Self {
            k: default_k(),
            max_iter: default_max_iter(),
            seed: 0,
            n_init: default_n_init(),
            chunk_elems: default_chunk(),
        }
    }
}

impl KMeansConfig {
    /// `k >= 1`, `max_iter >= 1`, `chunk_elems >= 1`.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.k >= 1, "kmeans.k: must be >= 1");
        ensure!(self.max_iter >= 1, "kmeans.max_iter: must be >= 1");
        ensure!(self.n_init >= 1, "kmeans.n_init: must be >= 1");
        ensure!(self.chunk_elems >= 1, "kmeans.chunk_elems: must be >= 1");
        Ok(())
    }
}

/// The outcome of [`cosine_kmeans`].
#[derive(Debug)]
pub struct KMeansResult {
    /// Cluster of every row, in `0..K`.
    pub assignments: Vec<i64>,
    /// Unit-norm centres `[K, D]` on the input's device.
    pub centres_kd: Tensor,
    /// Lloyd iterations run.
    pub iterations: usize,
    /// Mean cosine of each row to its centre.
    pub mean_cosine: f64,
    /// The seed of the kept start.
    pub seed: u64,
}

/// Best centre of every row, block by block.
///
/// # Shapes
/// `x_nd [N, D]`, `c_kd [K, D]` (both unit rows) -> (`best cos [N]`, `index [N]` Int64).
fn assign(x_nd: &Tensor, c_kd: &Tensor, chunk_elems: i64) -> (Tensor, Tensor) {
    let n = x_nd.size()[0];
    let rows = rows_per_chunk(c_kd.size()[0], chunk_elems);
    let ct = c_kd.tr();
    let (mut vals, mut idxs) = (Vec::new(), Vec::new());
    let mut r0 = 0;
    while r0 < n {
        let b = rows.min(n - r0);
        let (v, i) = x_nd.narrow(0, r0, b).matmul(&ct).max_dim(1, false);
        vals.push(v);
        idxs.push(i);
        r0 += b;
    }
    (Tensor::cat(&vals, 0), Tensor::cat(&idxs, 0))
}

/// k-means++ seeding on unit rows: indices of the `k` chosen rows.
///
/// # Shapes
/// `x_nd [N, D]` unit rows -> `[K, D]` centres.
pub fn kmeans_plus_plus(x_nd: &Tensor, k: usize, rng: &mut ChaCha8Rng) -> Tensor {
    let _guard = tch::no_grad_guard();
    let n = x_nd.size()[0];
    let first = rng.gen_range(0..n);
    let mut chosen = vec![first];
    let mut dist_n = (x_nd.matmul(&x_nd.get(first)).neg() + 1.0).clamp_min(0.0);
    for _ in 1..k {
        let w = dist_n
            .square()
            .to_kind(Kind::Double)
            .cumsum(0, Kind::Double);
        let total = w.double_value(&[n - 1]);
        let next = if total > 0.0 {
            let u = Tensor::from_slice(&[rng.gen::<f64>() * total]).to_device(x_nd.device());
            // First i with cumsum[i] > u: rows of weight 0 are never drawn.
            let i = u
                .searchsorted(&w, false, true, "right", None::<&Tensor>)
                .int64_value(&[0]);
            i.min(n - 1)
        } else {
            rng.gen_range(0..n) // every row coincides with a chosen centre
        };
        chosen.push(next);
        let d_new = (x_nd.matmul(&x_nd.get(next)).neg() + 1.0).clamp_min(0.0);
        dist_n = dist_n.minimum(&d_new);
    }
    let idx = Tensor::from_slice(&chosen).to_device(x_nd.device());
    x_nd.index_select(0, &idx)
}

/// Cosine k-means of the rows of `emb_nd` (normalised here), k-means++ seeded, best of
/// `cfg.n_init` starts (ties: the earliest).
///
/// Works in f32 (f64 for f64 input) on the device of `emb_nd`.
///
/// # Shapes
/// `emb_nd [N, D]` -> assignments `N`, centres `[K, D]`.
///
/// # Panics
/// If `emb_nd` is not 2-D, `cfg` is invalid, or `cfg.k > N`.
pub fn cosine_kmeans(emb_nd: &Tensor, cfg: &KMeansConfig) -> KMeansResult {
    if let Err(e) = cfg.validate() {
        panic!("cosine_kmeans: {e:#}");
    }
    let _guard = tch::no_grad_guard();
    let (n, _) = emb_nd.size2().expect("emb_nd must be [N, D]");
    assert!(cfg.k as i64 <= n, "cosine_kmeans: k = {} > N = {n}", cfg.k);
    let x = normalize(emb_nd);
    let mut best_run: Option<KMeansResult> = None;
    for start in 0..cfg.n_init as u64 {
        let run = lloyd(&x, cfg, cfg.seed.wrapping_add(start));
        if best_run
            .as_ref()
            .is_none_or(|b| run.mean_cosine > b.mean_cosine)
        {
            best_run = Some(run);
        }
    }
    best_run.expect("n_init >= 1")
}

/// One k-means++ start and Lloyd iterations on unit rows.
fn lloyd(x: &Tensor, cfg: &KMeansConfig, seed: u64) -> KMeansResult {
    let (_, d) = x.size2().expect("[N, D]");
    let k = cfg.k as i64;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut centres = kmeans_plus_plus(x, cfg.k, &mut rng);
    let (mut best, mut idx) = assign(x, &centres, cfg.chunk_elems);
    let mut iterations = 0;
    for _ in 0..cfg.max_iter {
        iterations += 1;
        let sums = Tensor::zeros([k, d], (x.kind(), x.device())).index_add(0, &idx, x);
        let counts = idx.bincount(None::<&Tensor>, k);
        let empty: Vec<i64> = Vec::try_from(counts.eq(0).nonzero().view([-1])).unwrap_or_default();
        centres = normalize(&sums);
        if !empty.is_empty() {
            // Re-seed each empty cluster with one of the rows farthest from their centres.
            let far = best.topk(empty.len() as i64, 0, false, true).1;
            let slots = Tensor::from_slice(&empty).to_device(x.device());
            centres = centres.index_copy(0, &slots, &x.index_select(0, &far));
        }
        let (b2, i2) = assign(x, &centres, cfg.chunk_elems);
        let changed = i2.ne_tensor(&idx).any().int64_value(&[]) != 0;
        best = b2;
        idx = i2;
        if !changed && empty.is_empty() {
            break;
        }
    }
    KMeansResult {
        assignments: Vec::try_from(idx.to_device(tch::Device::Cpu)).expect("Int64 assignments"),
        centres_kd: centres,
        iterations,
        mean_cosine: best.mean(Kind::Double).double_value(&[]),
        seed,
    }
}
