//! FINCH: first-neighbour clustering hierarchy. Sarfraz, Sharma, Stiefelhagen, "Efficient
//! Parameter-free Clustering Using First Neighbor Relations", CVPR 2019, arXiv 1902.11154.
//!
//! Idea: link every point to its first (nearest) neighbour; the connected components of that graph
//! (`i ~ j` if `j = κ(i)`, `i = κ(j)` or `κ(i) = κ(j)`, which are exactly the components of the edges
//! `i — κ(i)`) are the first partition. Replace every cluster by the mean of its points and repeat,
//! which gives a hierarchy of ever coarser partitions with no parameter at all.
//!
//! Deliberate differences: neighbours are cosine (faces live on the sphere), cluster means are
//! normalised sums of the unit embeddings of the cluster's original points (as FINCH averages the
//! original data, not the previous level's means); and an optional cosine `threshold` drops the
//! first-neighbour links weaker than it (`None` = the paper's parameter-free method). We do not
//! implement the paper's final "required number of clusters" refinement; [`FinchSelect`] picks one
//! of the computed partitions instead.

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::neighbours::{normalize, top_k_neighbours, UnionFind, DEFAULT_CHUNK_ELEMS};

/// FINCH options.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FinchConfig {
    /// Drop first-neighbour links with cosine below this. Default none (parameter-free FINCH).
    #[serde(default)]
    pub threshold: Option<f64>,
    /// At most this many partitions. Default 32.
    #[serde(default = "default_levels")]
    pub max_levels: usize,
    /// Element budget of one `[rows, N]` similarity block. Default 2^24.
    #[serde(default = "default_chunk")]
    pub chunk_elems: i64,
}

fn default_levels() -> usize {
    32
}
fn default_chunk() -> i64 {
    DEFAULT_CHUNK_ELEMS
}

impl Default for FinchConfig {
    fn default() -> Self {
        Self {
            threshold: None,
            max_levels: default_levels(),
            chunk_elems: default_chunk(),
        }
    }
}

impl FinchConfig {
    /// `max_levels >= 1`, `chunk_elems >= 1`, a threshold in `[-1, 1]`.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.max_levels >= 1, "finch.max_levels: must be >= 1");
        ensure!(self.chunk_elems >= 1, "finch.chunk_elems: must be >= 1");
        if let Some(t) = self.threshold {
            ensure!(
                (-1.0..=1.0).contains(&t),
                "finch.threshold: must be in [-1, 1], got {t}"
            );
        }
        Ok(())
    }
}

/// Which FINCH partition to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinchSelect {
    /// Partition `i` of the hierarchy (0 = finest), or the coarsest if there are fewer.
    Level(usize),
    /// The partition whose number of clusters is closest to `k` (the finer one on a tie).
    ClosestTo(usize),
}

/// The FINCH hierarchy: partitions of the input rows, finest first; every partition has strictly
/// fewer clusters than the one before, and labels are `0..K` in order of first appearance.
///
/// # Shapes
/// `emb_nd [N, D]` -> partitions of length `N`.
///
/// # Panics
/// If `emb_nd` is not 2-D with `N >= 2`, or `cfg` is invalid.
pub fn finch(emb_nd: &Tensor, cfg: &FinchConfig) -> Vec<Vec<i64>> {
    if let Err(e) = cfg.validate() {
        panic!("finch: {e:#}");
    }
    let _guard = tch::no_grad_guard();
    let (n, d) = emb_nd.size2().expect("emb_nd must be [N, D]");
    assert!(n >= 2, "finch needs at least 2 rows");
    let x = normalize(emb_nd);
    let mut partitions: Vec<Vec<i64>> = Vec::new();
    let mut point_cluster: Vec<i64> = (0..n).collect();
    let mut current = x.shallow_clone();
    let mut count = n as usize;
    while partitions.len() < cfg.max_levels && count >= 2 {
        let (sim, nn) = top_k_neighbours(&current, 1, cfg.chunk_elems);
        let nn: Vec<i64> = Vec::try_from(nn.view([-1]).to_device(tch::Device::Cpu)).unwrap();
        let sim: Vec<f64> = Vec::try_from(
            sim.view([-1])
                .to_kind(Kind::Double)
                .to_device(tch::Device::Cpu),
        )
        .unwrap();
        let mut uf = UnionFind::new(count);
        for (i, (&j, &s)) in nn.iter().zip(&sim).enumerate() {
            if cfg.threshold.is_none_or(|t| s >= t) {
                uf.union(i, j as usize);
            }
        }
        let (level, k) = uf.labels();
        if k == count {
            break; // no merge: the hierarchy is complete
        }
        point_cluster = point_cluster.iter().map(|&c| level[c as usize]).collect();
        // Renumber by first appearance over the original points.
        let mut id = vec![-1i64; k];
        let mut next = 0;
        for c in point_cluster.iter_mut() {
            if id[*c as usize] < 0 {
                id[*c as usize] = next;
                next += 1;
            }
            *c = id[*c as usize];
        }
        partitions.push(point_cluster.clone());
        count = k;
        let idx = Tensor::from_slice(&point_cluster).to_device(x.device());
        let sums = Tensor::zeros([k as i64, d], (x.kind(), x.device())).index_add(0, &idx, &x);
        current = normalize(&sums);
    }
    if partitions.is_empty() {
        partitions.push((0..n).collect());
    }
    partitions
}

/// FINCH's final step for a required number of clusters: starting from `partition`, repeatedly
/// merges the two clusters whose (normalised) means have the highest cosine until `k` remain
/// (nothing happens when it already has `k` or fewer). Labels are renumbered by first appearance.
///
/// Deliberate difference: the paper merges by first-neighbour relations one pair at a time; we
/// merge the globally most similar pair of cluster means, which is the same pair whenever that
/// pair are mutual first neighbours (the usual case). Works on an `[M, M]` matrix of the `M`
/// clusters of `partition`: use it on a partition with a moderate `M` (e.g. the first FINCH level
/// with at least `k` clusters).
///
/// # Shapes
/// `emb_nd [N, D]`, `partition` N labels `0..M` -> N labels `0..k`.
///
/// # Panics
/// If the lengths disagree or `k == 0`.
pub fn refine_to_k(emb_nd: &Tensor, partition: &[i64], k: usize) -> Vec<i64> {
    assert!(k >= 1, "refine_to_k: k must be >= 1");
    let _guard = tch::no_grad_guard();
    let (n, d) = emb_nd.size2().expect("emb_nd must be [N, D]");
    assert_eq!(n as usize, partition.len(), "one label per row");
    let m = crate::neighbours::count_labels(partition);
    if m <= k {
        return partition.to_vec();
    }
    let x = normalize(emb_nd);
    let idx = Tensor::from_slice(partition).to_device(x.device());
    let sums = Tensor::zeros([m as i64, d], (x.kind(), x.device())).index_add(0, &idx, &x);
    let sums: Vec<f64> = Vec::try_from(
        sums.to_kind(Kind::Double)
            .to_device(tch::Device::Cpu)
            .view([-1]),
    )
    .expect("f64 sums");
    let d = d as usize;
    let mut sum: Vec<Vec<f64>> = (0..m).map(|j| sums[j * d..(j + 1) * d].to_vec()).collect();
    let unit = |v: &[f64]| {
        let n = v.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-12);
        v.iter().map(|a| a / n).collect::<Vec<f64>>()
    };
    let mut alive: Vec<bool> = vec![true; m];
    let mut owner: Vec<usize> = (0..m).collect();
    let mut means: Vec<Vec<f64>> = sum.iter().map(|v| unit(v)).collect();
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let mut sim = vec![f64::NEG_INFINITY; m * m];
    for a in 0..m {
        for b in a + 1..m {
            sim[a * m + b] = dot(&means[a], &means[b]);
        }
    }
    for _ in 0..m - k {
        let (mut best, mut pair) = (f64::NEG_INFINITY, (0, 0));
        for a in 0..m {
            if !alive[a] {
                continue;
            }
            for b in a + 1..m {
                if alive[b] && sim[a * m + b] > best {
                    best = sim[a * m + b];
                    pair = (a, b);
                }
            }
        }
        let (a, b) = pair;
        alive[b] = false;
        let moved = std::mem::take(&mut sum[b]);
        for (s, v) in sum[a].iter_mut().zip(moved) {
            *s += v;
        }
        means[a] = unit(&sum[a]);
        for o in owner.iter_mut() {
            if *o == b {
                *o = a;
            }
        }
        for c in 0..m {
            if alive[c] && c != a {
                let s = dot(&means[a], &means[c]);
                let (lo, hi) = if c < a { (c, a) } else { (a, c) };
                sim[lo * m + hi] = s;
            }
        }
    }
    let mut id = vec![-1i64; m];
    let mut next = 0;
    partition
        .iter()
        .map(|&p| {
            let o = owner[p as usize];
            if id[o] < 0 {
                id[o] = next;
                next += 1;
            }
            id[o]
        })
        .collect()
}

/// Picks one partition of a [`finch`] hierarchy.
///
/// # Panics
/// If `partitions` is empty.
pub fn select(partitions: &[Vec<i64>], how: FinchSelect) -> &[i64] {
    assert!(!partitions.is_empty(), "no FINCH partitions");
    match how {
        FinchSelect::Level(i) => &partitions[i.min(partitions.len() - 1)],
        FinchSelect::ClosestTo(k) => partitions
            .iter()
            .min_by_key(|p| crate::neighbours::count_labels(p).abs_diff(k))
            .expect("non-empty"),
    }
}
