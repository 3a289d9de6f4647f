//! Cluster-guided face recognition: Zhenduo Zhang, "Improved Face Representation via Joint Label
//! Classification and Supervised Contrastive Clustering", arXiv 2312.04029.
//!
//! Idea: bring face-clustering knowledge into training. Periodically embed (a class-stratified
//! subset of) the training set, cluster each identity and measure how hard it is to cluster; then
//! (1) ArcFace with a per-identity angular margin that depends on that hardness, (2) a supervised
//! contrastive clustering loss pulling each feature to its identity's cluster centre, (3) cluster
//! aligning between the cluster centres and the classifier's class centres (a loss, periodic
//! re-imprinting, or both).
//!
//! Only the abstract is public, so everything here is OUR READING (SPEC section 4, "Proposed faithful
//! reading"); `docs/cluster-guided.md` explains each choice. This crate owns the clustering side:
//! hardness, centres, `L_scc`, `L_align` and re-imprinting. The margin head (1) and its
//! margin-from-hardness rule live with the other heads (`facerec_loss_heads::cluster_guided`);
//! the trainer composes both into the `[cluster_guided]` objective. Pieces, in the order the
//! trainer calls them:
//!
//! 1. [`stratified_subset`] picks the refresh set; the trainer embeds it in eval mode.
//! 2. [`cluster_statistics`]: per-identity dominant cluster, centre `μ_c` and hardness `h_c`.
//! 3. (loss-heads: margins from the hardness, into the head's table); [`ClusterCentres::set`];
//!    [`reimprint`] (aligning option b).
//! 4. Per step: (loss-heads: the head), [`scc_loss`], [`align_loss`] (aligning option a),
//!    optionally [`ClusterCentres::ema_update`].

use anyhow::{ensure, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::neighbours::{normalize, top_k_neighbours, UnionFind, DEFAULT_CHUNK_ELEMS};

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// How an identity's embeddings are clustered at a refresh (`[cluster_guided.clustering]`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClassClustering {
    /// No clustering: the dominant cluster is the whole identity.
    None,
    /// Single-linkage agglomerative clustering at cosine `tau` (the connected components of the
    /// graph `cos(x̂_i, x̂_j) ≥ tau` within the identity); the dominant cluster is the largest
    /// component. Default, with `tau = 0.5`.
    Threshold {
        /// Link threshold. Default 0.5.
        #[serde(default = "default_tau")]
        tau: f64,
    },
}

fn default_tau() -> f64 {
    0.5
}

impl Default for ClassClustering {
    fn default() -> Self {
        ClassClustering::Threshold { tau: default_tau() }
    }
}

impl ClassClustering {
    /// `tau` in `[-1, 1]`; the error names the field.
    pub fn validate(&self) -> Result<()> {
        if let ClassClustering::Threshold { tau } = *self {
            ensure!(
                (-1.0..=1.0).contains(&tau),
                "tau must be in [-1, 1], got {tau}"
            );
        }
        Ok(())
    }
}

/// Per-identity hardness `h_c ∈ [0, 1]` (`[cluster_guided.hardness]`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Hardness {
    /// `1 −` the fraction of the identity's samples whose `k` nearest neighbours (cosine, over the
    /// whole refresh set, self excluded) carry its label in a strict majority. Default, `k = 5`.
    KnnPurity {
        /// Neighbours (capped at N − 1). Default 5.
        #[serde(default = "default_knn")]
        k: usize,
    },
    /// `1 − |dominant cluster| / n_c`.
    DominantFraction,
    /// `1 −` the mean cosine of the identity's samples to its centre `μ_c`.
    MeanCosine,
}

fn default_knn() -> usize {
    5
}

impl Default for Hardness {
    fn default() -> Self {
        Hardness::KnnPurity { k: default_knn() }
    }
}

impl Hardness {
    /// `k >= 1` for `knn_purity`; the error names the field.
    pub fn validate(&self) -> Result<()> {
        if let Hardness::KnnPurity { k } = *self {
            ensure!(k >= 1, "k must be >= 1");
        }
        Ok(())
    }
}

/// `[cluster_guided.scc]`: `L_scc = (1/B) Σ_i −log softmax_c(s'·cos(x̂_i, μ_c))_{y_i}` over the
/// centres of the identities in the batch (plus `extra_negatives` random others).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SccConfig {
    /// Loss weight `λ_scc` (0 disables the loss). Default 0.1.
    #[serde(default = "default_scc_weight")]
    pub weight: f64,
    /// Scale `s'` (an inverse temperature). Default 32.
    #[serde(default = "default_scc_scale")]
    pub scale: f64,
    /// Random other identities' centres added as negatives per step. Default 0.
    #[serde(default)]
    pub extra_negatives: usize,
    /// EMA factor `α` of `μ_c ← normalize(α μ_c + (1 − α)·mean x̂)` per step; none = centres constant
    /// between refreshes. Default none.
    #[serde(default)]
    pub ema: Option<f64>,
}

fn default_scc_weight() -> f64 {
    0.1
}
fn default_scc_scale() -> f64 {
    32.0
}

impl Default for SccConfig {
    fn default() -> Self {
        Self {
            weight: default_scc_weight(),
            scale: default_scc_scale(),
            extra_negatives: 0,
            ema: None,
        }
    }
}

impl SccConfig {
    /// `weight >= 0`, `scale > 0`, `ema` in `[0, 1)`; errors name the field.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.weight >= 0.0, "weight must be >= 0");
        ensure!(self.scale > 0.0, "scale must be > 0");
        if let Some(a) = self.ema {
            ensure!((0.0..1.0).contains(&a), "ema must be in [0, 1)");
        }
        Ok(())
    }
}

/// Which aligning procedure runs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum AlignMode {
    /// Neither.
    None,
    /// The alignment loss every step. Default.
    #[default]
    Loss,
    /// Re-imprinting at every refresh.
    Reimprint,
    /// Both.
    Both,
}

/// Norm of a re-imprinted classifier row.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ReimprintNorm {
    /// Unit norm (SPEC 4(e)). Default.
    #[default]
    Unit,
    /// The row's norm before re-imprinting (keeps the row's effective learning rate).
    Keep,
}

/// `[cluster_guided.align]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AlignConfig {
    /// `"none"`, `"loss"` (default), `"reimprint"` or `"both"`.
    #[serde(default)]
    pub mode: AlignMode,
    /// Weight `λ_align` of `L_align`. Default 0.1.
    #[serde(default = "default_align_weight")]
    pub weight: f64,
    /// Re-imprinting mix `β` in `[0, 1]`: `W_c ← normalize((1 − β)Ŵ_c + β μ_c)`. Default 0.5.
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// `"unit"` (default) or `"keep"`.
    #[serde(default)]
    pub norm: ReimprintNorm,
}

fn default_align_weight() -> f64 {
    0.1
}
fn default_beta() -> f64 {
    0.5
}

impl Default for AlignConfig {
    fn default() -> Self {
        Self {
            mode: AlignMode::default(),
            weight: default_align_weight(),
            beta: default_beta(),
            norm: ReimprintNorm::default(),
        }
    }
}

impl AlignConfig {
    /// `weight >= 0`, `beta` in `[0, 1]`; errors name the field.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.weight >= 0.0, "weight must be >= 0");
        ensure!((0.0..=1.0).contains(&self.beta), "beta must be in [0, 1]");
        Ok(())
    }

    /// Whether the per-step alignment loss runs.
    pub fn uses_loss(&self) -> bool {
        matches!(self.mode, AlignMode::Loss | AlignMode::Both) && self.weight > 0.0
    }

    /// Whether refreshes re-imprint the classifier.
    pub fn uses_reimprint(&self) -> bool {
        matches!(self.mode, AlignMode::Reimprint | AlignMode::Both)
    }
}

// ---------------------------------------------------------------------------------------------
// Refresh: subset, statistics
// ---------------------------------------------------------------------------------------------

/// Up to `per_class` indices of every class (a seeded shuffle within each class; all when
/// `per_class == 0` or the class is smaller), returned in increasing order.
pub fn stratified_subset(labels: &[i64], per_class: usize, seed: u64) -> Vec<usize> {
    if per_class == 0 {
        return (0..labels.len()).collect();
    }
    let mut by_class: std::collections::BTreeMap<i64, Vec<usize>> = Default::default();
    for (i, &l) in labels.iter().enumerate() {
        by_class.entry(l).or_default().push(i);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    for (_, mut v) in by_class {
        v.shuffle(&mut rng);
        v.truncate(per_class);
        out.extend(v);
    }
    out.sort_unstable();
    out
}

/// What a refresh learns about every identity.
#[derive(Debug)]
pub struct ClusterStats {
    /// Unit centres `μ_c` of the dominant clusters `[C, D]` (zero rows for unseen identities), on
    /// the embeddings' device, f32 (f64 for f64 embeddings).
    pub centres_cd: Tensor,
    /// Samples of each identity in the refresh set (0 = unseen).
    pub class_sizes: Vec<usize>,
    /// Size of each identity's dominant cluster.
    pub dominant_sizes: Vec<usize>,
    /// Hardness `h_c ∈ [0, 1]`; NaN for unseen identities.
    pub hardness: Vec<f64>,
}

impl ClusterStats {
    /// Mean hardness over the seen identities (NaN if none).
    pub fn mean_hardness(&self) -> f64 {
        let seen: Vec<f64> = self
            .hardness
            .iter()
            .copied()
            .filter(|h| !h.is_nan())
            .collect();
        seen.iter().sum::<f64>() / seen.len() as f64
    }

    /// Bool `[C]`: identities with a centre.
    pub fn valid_c(&self) -> Tensor {
        let v: Vec<bool> = self.class_sizes.iter().map(|&n| n > 0).collect();
        Tensor::from_slice(&v).to_device(self.centres_cd.device())
    }
}

/// Per-identity clustering, centres and hardness from a refresh set (SPEC 4(a), 4(b)).
///
/// # Shapes
/// `emb_nd [N, D]` (any float kind; normalised here), `labels_n` N labels in `0..num_classes`.
///
/// # Panics
/// If the lengths disagree, a label is out of range, or `clustering` or `hardness` is invalid.
pub fn cluster_statistics(
    emb_nd: &Tensor,
    labels_n: &[i64],
    num_classes: usize,
    clustering: ClassClustering,
    hardness: Hardness,
) -> ClusterStats {
    if let Err(e) = clustering.validate().and_then(|()| hardness.validate()) {
        panic!("cluster_statistics: {e:#}");
    }
    let _guard = tch::no_grad_guard();
    let (n, d) = emb_nd.size2().expect("emb_nd must be [N, D]");
    assert_eq!(n as usize, labels_n.len(), "one label per embedding");
    let x = normalize(emb_nd);
    let dev = x.device();
    let mut members: Vec<Vec<i64>> = vec![Vec::new(); num_classes];
    for (i, &l) in labels_n.iter().enumerate() {
        assert!(
            l >= 0 && (l as usize) < num_classes,
            "label {l} outside 0..{num_classes}"
        );
        members[l as usize].push(i as i64);
    }
    let centres = Tensor::zeros([num_classes as i64, d], (x.kind(), dev));
    let mut class_sizes = vec![0; num_classes];
    let mut dominant_sizes = vec![0; num_classes];
    let mut mean_cos = vec![f64::NAN; num_classes];
    for (c, idx) in members.iter().enumerate() {
        if idx.is_empty() {
            continue;
        }
        let rows = x.index_select(0, &Tensor::from_slice(idx).to_device(dev));
        let nc = idx.len();
        let dominant: Tensor = match clustering {
            ClassClustering::Threshold { tau } if nc >= 2 => {
                let sims: Vec<f64> = Vec::try_from(
                    rows.matmul(&rows.tr())
                        .to_kind(Kind::Double)
                        .to_device(Device::Cpu)
                        .view([-1]),
                )
                .expect("f64 similarities");
                let mut uf = UnionFind::new(nc);
                for i in 0..nc {
                    for j in i + 1..nc {
                        if sims[i * nc + j] >= tau {
                            uf.union(i, j);
                        }
                    }
                }
                let (lab, k) = uf.labels();
                let mut counts = vec![0usize; k];
                for &l in &lab {
                    counts[l as usize] += 1;
                }
                // Largest component; the first in appearance order on a tie.
                let best = (0..k)
                    .max_by_key(|&j| (counts[j], std::cmp::Reverse(j)))
                    .unwrap();
                let keep: Vec<i64> = (0..nc as i64)
                    .filter(|&i| lab[i as usize] == best as i64)
                    .collect();
                rows.index_select(0, &Tensor::from_slice(&keep).to_device(dev))
            }
            _ => rows.shallow_clone(),
        };
        let mu = normalize(&dominant.sum_dim_intlist([0].as_slice(), true, x.kind()));
        centres.get(c as i64).copy_(&mu.view([d]));
        class_sizes[c] = nc;
        dominant_sizes[c] = dominant.size()[0] as usize;
        mean_cos[c] = rows
            .matmul(&mu.view([d, 1]))
            .mean(Kind::Double)
            .double_value(&[]);
    }
    let hardness: Vec<f64> = match hardness {
        Hardness::DominantFraction => (0..num_classes)
            .map(|c| match class_sizes[c] {
                0 => f64::NAN,
                nc => 1.0 - dominant_sizes[c] as f64 / nc as f64,
            })
            .collect(),
        Hardness::MeanCosine => mean_cos.iter().map(|m| 1.0 - m).collect(),
        Hardness::KnnPurity { k } => {
            let mut pure = vec![0usize; num_classes];
            if n >= 2 {
                let k = (k as i64).min(n - 1);
                let (_, nb) = top_k_neighbours(&x, k, DEFAULT_CHUNK_ELEMS);
                let nb: Vec<i64> = Vec::try_from(nb.to_device(Device::Cpu).view([-1])).unwrap();
                for (i, &l) in labels_n.iter().enumerate() {
                    let same = nb[i * k as usize..(i + 1) * k as usize]
                        .iter()
                        .filter(|&&j| labels_n[j as usize] == l)
                        .count();
                    if 2 * same > k as usize {
                        pure[l as usize] += 1;
                    }
                }
            }
            (0..num_classes)
                .map(|c| match class_sizes[c] {
                    0 => f64::NAN,
                    nc => 1.0 - pure[c] as f64 / nc as f64,
                })
                .collect()
        }
    };
    ClusterStats {
        centres_cd: centres,
        class_sizes,
        dominant_sizes,
        hardness,
    }
}

// ---------------------------------------------------------------------------------------------
// Centres, supervised contrastive clustering, aligning
// ---------------------------------------------------------------------------------------------

/// The cluster centres `μ [C, D]` and a validity mask `[C]` (1 = the identity has a centre), as
/// non-trainable f32 variables (`centres`, `valid`) so checkpoints carry them.
#[derive(Debug)]
pub struct ClusterCentres {
    centres_cd: Tensor,
    valid_c: Tensor,
}

impl ClusterCentres {
    /// Registers zero centres, all invalid, under `p`.
    pub fn new(p: &nn::Path, num_classes: i64, dim: i64) -> Self {
        Self {
            centres_cd: p.zeros_no_train("centres", &[num_classes, dim]),
            valid_c: p.zeros_no_train("valid", &[num_classes]),
        }
    }

    /// Centres from given tensors (`valid_c` Bool or 0/1 float); not registered anywhere.
    pub fn from_tensors(centres_cd: Tensor, valid_c: &Tensor) -> Self {
        let valid_c = valid_c.to_kind(centres_cd.kind());
        Self {
            centres_cd,
            valid_c,
        }
    }

    /// `μ [C, D]`.
    pub fn centres(&self) -> &Tensor {
        &self.centres_cd
    }

    /// `[C]`, 1 where a centre exists.
    pub fn valid(&self) -> &Tensor {
        &self.valid_c
    }

    /// Copies a refresh's centres in (under `no_grad`).
    pub fn set(&mut self, stats: &ClusterStats) {
        let dev = self.centres_cd.device();
        let src = stats
            .centres_cd
            .to_kind(self.centres_cd.kind())
            .to_device(dev);
        let valid = stats.valid_c().to_kind(self.valid_c.kind()).to_device(dev);
        tch::no_grad(|| {
            self.centres_cd.copy_(&src);
            self.valid_c.copy_(&valid);
        });
    }

    /// `μ_c ← normalize(α μ_c + (1 − α)·mean_{i: y_i = c} x̂_i)` for the valid identities of the
    /// batch (SPEC 4(d)); under `no_grad`.
    ///
    /// # Shapes
    /// `emb_bd [B, D]`, `labels_b [B]` (Int64).
    pub fn ema_update(&mut self, emb_bd: &Tensor, labels_b: &Tensor, alpha: f64) {
        let _guard = tch::no_grad_guard();
        let kind = self.centres_cd.kind();
        let x = normalize_rows(&emb_bd.detach().to_kind(kind));
        let (cls, inverse, _) = labels_b.unique_dim(0, true, true, false);
        let k = cls.size()[0];
        let d = x.size()[1];
        let sums = Tensor::zeros([k, d], (kind, x.device())).index_add(0, &inverse, &x);
        let counts = inverse
            .bincount(None::<&Tensor>, k)
            .to_kind(kind)
            .view([k, 1]);
        let mean = sums / counts;
        let old = self.centres_cd.index_select(0, &cls);
        let new = normalize_rows(&(&old * alpha + mean * (1.0 - alpha)));
        let valid_k1 = self.valid_c.index_select(0, &cls).view([k, 1]).gt(0.5);
        let rows = new.where_self(&valid_k1, &old);
        let _ = self.centres_cd.index_copy_(0, &cls, &rows);
    }
}

/// Row-wise L2 normalisation `x / max(‖x‖₂, 1e-12)` in the input's kind (PyTorch's
/// `F.normalize`); [`normalize`] also casts to f32.
fn normalize_rows(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12)
}

/// Supervised contrastive clustering loss (SPEC 4(d)):
/// `L_scc = (1/|V|) Σ_{i∈V} −log[ exp(s'·cos(x̂_i, μ_{y_i})) / Σ_{c∈𝒞} exp(s'·cos(x̂_i, μ_c)) ]`,
/// `𝒞` = the valid identities of the batch plus `extra_c`, `V` = samples whose identity has a
/// centre. Centres are constants. 0 (connected to `emb_bd`) when no sample has a centre.
///
/// # Shapes
/// `emb_bd [B, D]`, `labels_b [B]` (Int64), `extra_c [E]` (Int64, optional) -> scalar.
///
/// # Panics
/// If the shapes disagree or a label is outside `0..C`.
pub fn scc_loss(
    emb_bd: &Tensor,
    labels_b: &Tensor,
    centres: &ClusterCentres,
    scale: f64,
    extra_c: Option<&Tensor>,
) -> Tensor {
    let (b, _) = emb_bd.size2().expect("emb_bd must be [B, D]");
    assert_eq!(labels_b.size(), [b], "labels must be [B]");
    let kind = if emb_bd.kind() == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    };
    let c = centres.centres_cd.size()[0];
    let pool = match extra_c {
        Some(e) => Tensor::cat(&[labels_b, &e.to_device(labels_b.device())], 0),
        None => labels_b.shallow_clone(),
    };
    let (cls, _, _) = pool.unique_dim(0, true, false, false);
    let k = cls.size()[0];
    let mu = centres
        .centres_cd
        .detach()
        .index_select(0, &cls)
        .to_kind(kind);
    let valid_k = centres.valid_c.index_select(0, &cls).gt(0.5);
    // Position of every class in `cls` (-1 elsewhere) to find each sample's target column.
    let pos_c = Tensor::full([c], -1, (Kind::Int64, labels_b.device())).index_put(
        &[Some(cls.shallow_clone())],
        &Tensor::arange(k, (Kind::Int64, labels_b.device())),
        false,
    );
    let tgt_b = pos_c.index_select(0, labels_b);
    let x = normalize_rows(&emb_bd.to_kind(kind));
    let logits = x.matmul(&mu.tr()) * scale;
    // Invalid centres are not candidates (a finite fill: a row with no valid column stays finite).
    let logits = logits.masked_fill(&valid_k.logical_not().view([1, k]), -1e30);
    let keep_b = centres.valid_c.index_select(0, labels_b).gt(0.5);
    let tgt_safe = tgt_b.clamp_min(0).view([b, 1]);
    let logp = logits
        .log_softmax(1, kind)
        .gather(1, &tgt_safe, false)
        .view([b]);
    // Samples without a centre do not count.
    let zero = Tensor::zeros([b], (kind, x.device()));
    let nll = logp.neg().where_self(&keep_b, &zero);
    let count = keep_b.to_kind(kind).sum(kind).clamp_min(1.0);
    nll.sum(kind) / count
}

/// Alignment loss (SPEC 4(e) option a):
/// `L_align = (1/|𝒞_B|) Σ_{c∈𝒞_B} (1 − cos(Ŵ_c, sg(μ_c)))` over the valid identities of the batch;
/// 0 (connected to `weight_cd`) when none is valid.
///
/// # Shapes
/// `weight_cd [C, D]`, `labels_b [B]` (Int64) -> scalar.
pub fn align_loss(weight_cd: &Tensor, labels_b: &Tensor, centres: &ClusterCentres) -> Tensor {
    let kind = if weight_cd.kind() == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    };
    let (cls, _, _) = labels_b.unique_dim(0, true, false, false);
    let w = normalize_rows(&weight_cd.index_select(0, &cls).to_kind(kind));
    let mu = centres
        .centres_cd
        .detach()
        .index_select(0, &cls)
        .to_kind(kind);
    let valid = centres.valid_c.index_select(0, &cls).to_kind(kind);
    let cos_k = (w * mu).sum_dim_intlist([1].as_slice(), false, kind);
    let count = valid.sum(kind).clamp_min(1.0);
    ((cos_k.neg() + 1.0) * valid).sum(kind) / count
}

/// Re-imprinting (SPEC 4(e) option b): for every identity with a centre,
/// `W_c ← normalize((1 − β)Ŵ_c + β μ_c)` (times the row's old norm with [`ReimprintNorm::Keep`]),
/// written in place under `no_grad`. Returns the number of rows written.
///
/// # Shapes
/// `weight_cd [C, D]` (the classifier variable; shares storage).
pub fn reimprint(
    weight_cd: &Tensor,
    centres: &ClusterCentres,
    beta: f64,
    norm: ReimprintNorm,
) -> usize {
    let _guard = tch::no_grad_guard();
    let idx = centres
        .valid_c
        .gt(0.5)
        .nonzero()
        .view([-1])
        .to_device(weight_cd.device());
    let n = idx.size()[0];
    if n == 0 {
        return 0;
    }
    let w = weight_cd.index_select(0, &idx);
    let mu = centres
        .centres_cd
        .index_select(0, &idx)
        .to_device(w.device())
        .to_kind(w.kind());
    let mut new = normalize_rows(&(normalize_rows(&w) * (1.0 - beta) + mu * beta));
    if norm == ReimprintNorm::Keep {
        new *= w.norm_scalaropt_dim(2, [1], true);
    }
    let mut target = weight_cd.shallow_clone();
    let _ = target.index_copy_(0, &idx, &new);
    n as usize
}
