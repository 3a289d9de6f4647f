//! Face clustering and clustering metrics, plus the cluster-guided training pieces (Zhang, arXiv
//! 2312.04029; our reading in SPEC section 4).
//!
//! # Clustering a set of face embeddings
//!
//! - [`cosine_kmeans`]: spherical k-means with k-means++ seeding, when the number of identities
//!   is known.
//! - [`finch`]: FINCH first-neighbour merging, parameter-free, a hierarchy of partitions
//!   ([`finch::select`] picks one by level or by the number of clusters closest to a guess).
//! - [`knn_graph_clusters`]: connected components of the kNN graph with edges above a cosine
//!   threshold (one parameter: the threshold).
//! - [`evaluate`]: pairwise precision/recall/F, BCubed precision/recall/F and NMI against known
//!   identities.
//!
//! All take an embedding matrix `[N, D]` on any device; similarities are computed in blocks of at
//! most `chunk_elems` entries (see [`neighbours`]), so no `N x N` (or `N x K`) matrix is ever
//! materialised beyond one block.
//!
//! ```no_run
//! use facerec_clustering::{cosine_kmeans, evaluate, finch, knn_graph_clusters, FinchConfig,
//!     FinchSelect, GraphConfig, KMeansConfig};
//! # let emb = tch::Tensor::randn([100, 64], (tch::Kind::Float, tch::Device::Cpu));
//! # let truth: Vec<i64> = (0..100).map(|i| i / 10).collect();
//! let km = cosine_kmeans(&emb, &KMeansConfig { k: 10, ..Default::default() });
//! let parts = finch(&emb, &FinchConfig::default());
//! let fin = facerec_clustering::finch::select(&parts, FinchSelect::ClosestTo(10));
//! let gr = knn_graph_clusters(&emb, &GraphConfig { threshold: 0.4, ..Default::default() });
//! println!("{}", evaluate(&km.assignments, &truth).unwrap());
//! ```
//!
//! # Cluster-guided training
//!
//! [`cluster_guided`]: per-identity hardness and centres, the supervised contrastive clustering
//! loss and cluster aligning (loss and re-imprinting). The cluster-guided ArcFace head and its
//! margin-from-hardness rule live in `facerec-loss-heads` (this crate does not depend on it);
//! the trainer composes the two.

pub mod cluster_guided;
pub mod finch;
pub mod graph;
pub mod kmeans;
pub mod metrics;
pub mod neighbours;

pub use cluster_guided::{
    align_loss, cluster_statistics, reimprint, scc_loss, stratified_subset, AlignConfig, AlignMode,
    ClassClustering, ClusterCentres, ClusterStats, Hardness, ReimprintNorm, SccConfig,
};
pub use finch::{finch, refine_to_k, FinchConfig, FinchSelect};
pub use graph::{knn_graph_clusters, GraphConfig};
pub use kmeans::{cosine_kmeans, KMeansConfig, KMeansResult};
pub use metrics::{evaluate, ClusterMetrics};
pub use neighbours::{top_k_neighbours, UnionFind};
