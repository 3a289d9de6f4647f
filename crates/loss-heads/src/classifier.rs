//! The cosine classifier: owns the class-weight matrix and turns embeddings into clamped cosines.
//!
//! Follows arcface_torch's single-process forward (SPEC 1(c), steps 3–4): `Ŵ = normalize(W)`
//! row-wise, `x̂ = normalize(x)`, `cos = clamp(x̂Ŵᵀ, −1, 1)`, with `W [C, D]` initialised
//! N(0, 0.01) and stored as the variable `weight` (arcface_torch's `state_dict` key). With
//! Partial FC ([`crate::PartialFc`]) the cosines are computed against the sampled rows only
//! ([`CosineClassifier::cosines_sampled`]); margin heads only ever see the cosines.
//! [`Classifier`] holds this or the softmax head's [`LinearClassifier`], by [`ClassifierKind`].
//!
//! With `K > 1` sub-centres per class (sub-center ArcFace, [`crate::subcenter`]) the weight is
//! `W [C·K, D]`, class `c` in rows `c·K .. c·K + K`, and every cosine method returns the max over
//! each class's `K` rows, so heads and Partial FC still see `C` (or `C'`) class columns.

use tch::{nn, Kind, Tensor};

use crate::partial_fc::Sampled;
use crate::softmax::LinearClassifier;
use crate::subcenter::{pool_sub_centres, sub_centre_rows};

/// Smallest norm divided by in [`normalize_rows`] (PyTorch's `F.normalize` default eps).
const NORM_EPS: f64 = 1e-12;

/// A bias-free linear classifier over L2-normalised embeddings and weights.
#[derive(Debug)]
pub struct CosineClassifier {
    weight: Tensor,
    num_classes: i64,
    embedding_size: i64,
    /// Rows (sub-centres) per class `K`; 1 but for sub-center ArcFace.
    sub_centres: i64,
}

impl CosineClassifier {
    /// Registers `weight [num_classes, embedding_size]` under `p`, initialised N(0, 0.01).
    ///
    /// # Panics
    /// If `num_classes` or `embedding_size` is not positive.
    pub fn new(p: &nn::Path, num_classes: i64, embedding_size: i64) -> Self {
        Self::with_sub_centres(p, num_classes, 1, embedding_size)
    }

    /// Registers `weight [num_classes·k, embedding_size]` under `p` (class `c`'s `k` sub-centres
    /// in rows `c·k .. c·k + k`), initialised N(0, 0.01) like [`CosineClassifier::new`], which is
    /// this with `k = 1`.
    ///
    /// # Panics
    /// If `num_classes`, `k` or `embedding_size` is not positive.
    pub fn with_sub_centres(p: &nn::Path, num_classes: i64, k: i64, embedding_size: i64) -> Self {
        assert!(
            num_classes > 0 && embedding_size > 0 && k > 0,
            "CosineClassifier needs C > 0, K > 0 and D > 0"
        );
        let init = nn::Init::Randn {
            mean: 0.0,
            stdev: 0.01,
        };
        let weight = p.var("weight", &[num_classes * k, embedding_size], init);
        Self {
            weight,
            num_classes,
            embedding_size,
            sub_centres: k,
        }
    }

    /// `cos = clamp(normalize(emb) @ normalize(W)ᵀ, −1, 1)` (with sub-centres: the max over each
    /// class's `K` rows).
    ///
    /// Half/bfloat16 products (under autocast) are returned as f32, as arcface_torch does.
    ///
    /// # Shapes
    /// `emb_bd [B, D]` -> `cos_bc [B, C]`.
    ///
    /// # Panics
    /// If `emb_bd` is not `[B, D]` with this classifier's `D`.
    pub fn cosines(&self, emb_bd: &Tensor) -> Tensor {
        self.cosines_against(emb_bd, &self.weight)
    }

    /// Cosines against the sampled classes only, `W[sampled.index]` (Partial FC; with sub-centres
    /// all `K` rows of each sampled class). Unsampled rows of `W` get an exactly zero gradient;
    /// pair the result with `sampled.labels`.
    ///
    /// # Shapes
    /// `emb_bd [B, D]`, `sampled.index [C']` -> `cos_bc' [B, C']`.
    ///
    /// # Panics
    /// As [`CosineClassifier::cosines`], or if an index is outside `[0, C)`.
    pub fn cosines_sampled(&self, emb_bd: &Tensor, sampled: &Sampled) -> Tensor {
        let rows = sub_centre_rows(&sampled.index, self.sub_centres);
        self.cosines_against(emb_bd, &self.weight.index_select(0, &rows))
    }

    fn cosines_against(&self, emb_bd: &Tensor, weight: &Tensor) -> Tensor {
        let (_, d) = emb_bd.size2().expect("emb_bd must be [B, D]");
        assert_eq!(d, self.embedding_size, "embedding size mismatch");
        let cos_bc = normalize_rows(emb_bd)
            .matmul(&normalize_rows(weight).tr())
            .clamp(-1.0, 1.0);
        let cos_bc = match cos_bc.kind() {
            Kind::Half | Kind::BFloat16 => cos_bc.to_kind(Kind::Float),
            _ => cos_bc,
        };
        pool_sub_centres(&cos_bc, self.sub_centres)
    }

    /// Number of classes `C`.
    pub fn num_classes(&self) -> i64 {
        self.num_classes
    }

    /// Embedding size `D`.
    pub fn embedding_size(&self) -> i64 {
        self.embedding_size
    }

    /// Rows (sub-centres) per class `K` (1 but for sub-center ArcFace).
    pub fn sub_centres(&self) -> i64 {
        self.sub_centres
    }

    /// The class-weight variable `W [C·K, D]` (shares storage with the `VarStore` entry).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

/// Which classifier to register: cosines for the margin heads, `Wx + b` for softmax
/// ([`crate::HeadConfig::classifier_kind`] names the one a head needs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassifierKind {
    /// [`CosineClassifier`]: variable `weight`, clamped cosines (every head but `softmax`).
    Cosine,
    /// [`LinearClassifier`]: variables `weight` and `bias`, `Wx + b` (`softmax`).
    Linear,
    /// [`CosineClassifier`] with `K` sub-centres per class (`subcenter_arcface`): variable
    /// `weight [C·K, D]`, cosines pooled to `[B, C]`.
    SubCenter(i64),
}

impl ClassifierKind {
    /// Rows of the weight per class: `K` for [`ClassifierKind::SubCenter`], 1 otherwise.
    pub fn rows_per_class(&self) -> i64 {
        match self {
            ClassifierKind::SubCenter(k) => *k,
            _ => 1,
        }
    }
}

/// The classifier a head consumes: cosines for the margin heads, `Wx + b` for softmax.
#[derive(Debug)]
pub enum Classifier {
    /// [`CosineClassifier`] (every head but `softmax`).
    Cosine(CosineClassifier),
    /// [`LinearClassifier`] (`softmax`).
    Linear(LinearClassifier),
}

impl Classifier {
    /// Registers a classifier of `kind` under `p` (variable `weight`, `[C·K, D]` for
    /// [`ClassifierKind::SubCenter`], plus `bias` for [`ClassifierKind::Linear`]).
    ///
    /// # Panics
    /// If `num_classes` or `embedding_size` is not positive.
    pub fn new(p: &nn::Path, kind: ClassifierKind, num_classes: i64, embedding_size: i64) -> Self {
        match kind {
            ClassifierKind::Linear => {
                Classifier::Linear(LinearClassifier::new(p, num_classes, embedding_size))
            }
            ClassifierKind::Cosine => {
                Classifier::Cosine(CosineClassifier::new(p, num_classes, embedding_size))
            }
            ClassifierKind::SubCenter(k) => Classifier::Cosine(CosineClassifier::with_sub_centres(
                p,
                num_classes,
                k,
                embedding_size,
            )),
        }
    }

    /// What the head consumes: cosines, or linear scores.
    ///
    /// # Shapes
    /// `emb_bd [B, D]` -> `[B, C]`.
    pub fn scores(&self, emb_bd: &Tensor) -> Tensor {
        match self {
            Classifier::Cosine(c) => c.cosines(emb_bd),
            Classifier::Linear(c) => c.scores(emb_bd),
        }
    }

    /// As [`Classifier::scores`], against the sampled classes only.
    ///
    /// # Shapes
    /// `emb_bd [B, D]`, `sampled.index [C']` -> `[B, C']`.
    pub fn scores_sampled(&self, emb_bd: &Tensor, sampled: &Sampled) -> Tensor {
        match self {
            Classifier::Cosine(c) => c.cosines_sampled(emb_bd, sampled),
            Classifier::Linear(c) => c.scores_sampled(emb_bd, sampled),
        }
    }

    /// The class-weight variable `W [C, D]` (`[C·K, D]` with sub-centres).
    pub fn weight(&self) -> &Tensor {
        match self {
            Classifier::Cosine(c) => c.weight(),
            Classifier::Linear(c) => c.weight(),
        }
    }

    /// Rows of [`Classifier::weight`] per class (`K` with sub-centres, else 1).
    pub fn rows_per_class(&self) -> i64 {
        match self {
            Classifier::Cosine(c) => c.sub_centres(),
            Classifier::Linear(_) => 1,
        }
    }

    /// Number of classes `C`.
    pub fn num_classes(&self) -> i64 {
        self.weight().size()[0] / self.rows_per_class()
    }
}

/// Row-wise L2 normalisation `x / max(‖x‖₂, 1e-12)`.
///
/// # Shapes
/// `x [N, D]` -> `[N, D]`.
pub fn normalize_rows(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2, [1], true).clamp_min(NORM_EPS)
}
