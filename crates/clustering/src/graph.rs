//! kNN graph with a cosine threshold, clustered by connected components.
//!
//! A classic parameter-light face clustering baseline (e.g. the "kNN + threshold" baselines of
//! Wang et al., "Linkage Based Face Clustering via Graph Convolution Network", CVPR 2019,
//! arXiv 1903.11306): link each face to those of its `k` nearest neighbours whose cosine is at
//! least `threshold`, then every connected component (union-find) is one identity. `k` bounds the
//! work and memory (`N·k` edges); `threshold` is the one parameter that matters and depends on the
//! model (the verification threshold of the model is a good start).

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::neighbours::{top_k_neighbours, UnionFind, DEFAULT_CHUNK_ELEMS};

/// kNN-graph options.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GraphConfig {
    /// Neighbours per node (capped at `N − 1`). Default 10.
    #[serde(default = "default_k")]
    pub k: usize,
    /// Minimum cosine of an edge. Default 0.5.
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    /// Element budget of one `[rows, N]` similarity block. Default 2^24.
    #[serde(default = "default_chunk")]
    pub chunk_elems: i64,
}

fn default_k() -> usize {
    10
}
fn default_threshold() -> f64 {
    0.5
}
fn default_chunk() -> i64 {
    DEFAULT_CHUNK_ELEMS
}

impl Default for GraphConfig {
    fn default() -> Self {
        Self {
            k: default_k(),
            threshold: default_threshold(),
            chunk_elems: default_chunk(),
        }
    }
}

impl GraphConfig {
    /// `k >= 1`, threshold in `[-1, 1]`, `chunk_elems >= 1`.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.k >= 1, "graph.k: must be >= 1");
        let t = self.threshold;
        ensure!(
            (-1.0..=1.0).contains(&t),
            "graph.threshold: must be in [-1, 1], got {t}"
        );
        ensure!(self.chunk_elems >= 1, "graph.chunk_elems: must be >= 1");
        Ok(())
    }
}

/// Connected components of the thresholded kNN graph: a cluster label per row, `0..K` in order of
/// first appearance.
///
/// # Shapes
/// `emb_nd [N, D]` -> `N` labels.
///
/// # Panics
/// If `emb_nd` is not 2-D or `cfg` is invalid.
pub fn knn_graph_clusters(emb_nd: &Tensor, cfg: &GraphConfig) -> Vec<i64> {
    if let Err(e) = cfg.validate() {
        panic!("knn_graph_clusters: {e:#}");
    }
    let (n, _) = emb_nd.size2().expect("emb_nd must be [N, D]");
    if n < 2 {
        return vec![0; n as usize];
    }
    let k = (cfg.k as i64).min(n - 1);
    let (sim, idx) = top_k_neighbours(emb_nd, k, cfg.chunk_elems);
    let sim: Vec<f64> = Vec::try_from(
        sim.to_kind(Kind::Double)
            .view([-1])
            .to_device(tch::Device::Cpu),
    )
    .unwrap();
    let idx: Vec<i64> = Vec::try_from(idx.view([-1]).to_device(tch::Device::Cpu)).unwrap();
    let mut uf = UnionFind::new(n as usize);
    for (e, (&j, &s)) in idx.iter().zip(&sim).enumerate() {
        if s >= cfg.threshold {
            uf.union(e / k as usize, j as usize);
        }
    }
    uf.labels().0
}
