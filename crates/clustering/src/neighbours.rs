//! Batched cosine nearest neighbours and a union-find, the building blocks of the graph methods.
//!
//! Similarities are computed one block of rows at a time (`[rows, N]`, with `rows` chosen so that a
//! block holds at most `chunk_elems` entries), so the full `N x N` matrix never exists and millions of
//! embeddings fit on a GPU or in host memory.

use tch::{Kind, Tensor};

/// Default element budget of one similarity block (`2^24` entries: 64 MiB in f32).
pub const DEFAULT_CHUNK_ELEMS: i64 = 1 << 24;

/// Row-wise L2 normalisation `x / max(‖x‖₂, 1e-12)`, computed in f32 (or f64 for f64 input).
///
/// # Shapes
/// `x_nd [N, D]` -> `[N, D]`.
pub fn normalize(x_nd: &Tensor) -> Tensor {
    let x = match x_nd.kind() {
        Kind::Double => x_nd.shallow_clone(),
        _ => x_nd.to_kind(Kind::Float),
    };
    &x / x.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12)
}

/// Rows per block so that `rows * cols <= chunk_elems` (at least 1).
pub fn rows_per_chunk(cols: i64, chunk_elems: i64) -> i64 {
    (chunk_elems / cols.max(1)).max(1)
}

/// The `k` most similar other rows of each row of `x_nd` (cosine similarity of the rows, self
/// excluded; an exact duplicate of a row is still a neighbour), sorted by decreasing similarity.
///
/// # Shapes
/// `x_nd [N, D]` (any float kind, need not be normalised) -> (`sims [N, k]` f32/f64,
/// `index [N, k]` Int64), on the device of `x_nd`.
///
/// # Panics
/// If `x_nd` is not 2-D or `k` is not in `1..N`.
pub fn top_k_neighbours(x_nd: &Tensor, k: i64, chunk_elems: i64) -> (Tensor, Tensor) {
    let _guard = tch::no_grad_guard();
    let (n, _) = x_nd.size2().expect("x_nd must be [N, D]");
    assert!(
        k >= 1 && k < n,
        "top_k_neighbours: k = {k} must be in 1..N (N = {n})"
    );
    let x = normalize(x_nd);
    let xt = x.tr();
    let rows = rows_per_chunk(n, chunk_elems);
    let mut sims = Vec::new();
    let mut idx = Vec::new();
    let mut r0 = 0;
    while r0 < n {
        let b = rows.min(n - r0);
        let mut s = x.narrow(0, r0, b).matmul(&xt);
        let self_b1 = Tensor::arange_start(r0, r0 + b, (Kind::Int64, x.device())).view([b, 1]);
        let _ = s.scatter_value_(1, &self_b1, f64::NEG_INFINITY);
        let (v, i) = s.topk(k, 1, true, true);
        sims.push(v);
        idx.push(i);
        r0 += b;
    }
    (Tensor::cat(&sims, 0), Tensor::cat(&idx, 0))
}

/// Disjoint sets over `0..n` (union by size, path halving).
#[derive(Debug, Clone)]
pub struct UnionFind {
    parent: Vec<usize>,
    size: Vec<usize>,
}

impl UnionFind {
    /// `n` singletons.
    pub fn new(n: usize) -> Self {
        Self {
            parent: (0..n).collect(),
            size: vec![1; n],
        }
    }

    /// Representative of `i`'s set.
    pub fn find(&mut self, mut i: usize) -> usize {
        while self.parent[i] != i {
            self.parent[i] = self.parent[self.parent[i]];
            i = self.parent[i];
        }
        i
    }

    /// Merges the sets of `a` and `b`; true if they were different.
    pub fn union(&mut self, a: usize, b: usize) -> bool {
        let (mut a, mut b) = (self.find(a), self.find(b));
        if a == b {
            return false;
        }
        if self.size[a] < self.size[b] {
            std::mem::swap(&mut a, &mut b);
        }
        self.parent[b] = a;
        self.size[a] += self.size[b];
        true
    }

    /// Component label of every element, numbered `0, 1, ...` in order of first appearance (so the
    /// labelling is deterministic), and the number of components.
    pub fn labels(&mut self) -> (Vec<i64>, usize) {
        let n = self.parent.len();
        let mut id = vec![usize::MAX; n];
        let mut next = 0;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let r = self.find(i);
            if id[r] == usize::MAX {
                id[r] = next;
                next += 1;
            }
            out.push(id[r] as i64);
        }
        (out, next)
    }
}

/// Number of distinct labels, assuming they are `0..K` (max + 1; 0 for an empty list).
pub(crate) fn count_labels(labels: &[i64]) -> usize {
    labels.iter().max().map_or(0, |&m| m as usize + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn union_find_labels_in_first_appearance_order() {
        let mut uf = UnionFind::new(6);
        uf.union(4, 1);
        uf.union(5, 2);
        uf.union(2, 4);
        let (labels, k) = uf.labels();
        assert_eq!(labels, [0, 1, 1, 2, 1, 1]);
        assert_eq!(k, 3);
    }

    #[test]
    fn neighbours_exclude_self_and_agree_across_chunk_sizes() {
        let x = Tensor::from_slice(&[1.0f32, 0.0, 0.9, 0.1, 0.0, 1.0, -1.0, 0.2, 0.1, 1.0])
            .view([5, 2]);
        let (s1, i1) = top_k_neighbours(&x, 2, 1);
        let (s2, i2) = top_k_neighbours(&x, 2, 1 << 20);
        // Blocks of another shape may take another BLAS kernel (one row: a matrix-vector product),
        // whose rounding differs in the last bit on some CPUs (seen on a ninth-session VM): the
        // same neighbours, and the same similarities to float precision.
        let worst = f64::try_from((&s1 - &s2).abs().max()).unwrap();
        assert!(i1.equal(&i2), "{i1} vs {i2}");
        assert!(
            worst <= 1e-6,
            "chunked and whole similarities differ by {worst:e}"
        );
        let first: Vec<i64> = Vec::try_from(i1.select(1, 0)).unwrap();
        assert_eq!(first, [1, 0, 4, 2, 2]);
    }
}
