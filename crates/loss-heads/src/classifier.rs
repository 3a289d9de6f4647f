//! The cosine classifier: owns the class-weight matrix and turns embeddings into clamped cosines.
//!
//! Follows arcface_torch's single-process forward (SPEC 1(c), steps 3–4): `Ŵ = normalize(W)`
//! row-wise, `x̂ = normalize(x)`, `cos = clamp(x̂Ŵᵀ, −1, 1)`, with `W [C, D]` initialised
//! N(0, 0.01) and stored as the variable `weight` (arcface_torch's `state_dict` key). With
//! Partial FC ([`crate::PartialFc`]) the cosines are computed against the sampled rows only
//! ([`CosineClassifier::cosines_sampled`]); margin heads only ever see the cosines.
//! [`Classifier`] holds this or the softmax head's [`LinearClassifier`], by [`ClassifierKind`].

use tch::{nn, Kind, Tensor};

use crate::partial_fc::Sampled;
use crate::softmax::LinearClassifier;

/// Smallest norm divided by in [`normalize_rows`] (PyTorch's `F.normalize` default eps).
const NORM_EPS: f64 = 1e-12;

/// A bias-free linear classifier over L2-normalised embeddings and weights.
#[derive(Debug)]
pub struct CosineClassifier {
    weight: Tensor,
    num_classes: i64,
    embedding_size: i64,
}

impl CosineClassifier {
    /// Registers `weight [num_classes, embedding_size]` under `p`, initialised N(0, 0.01).
    ///
    /// # Panics
    /// If `num_classes` or `embedding_size` is not positive.
    pub fn new(p: &nn::Path, num_classes: i64, embedding_size: i64) -> Self {
        assert!(
            num_classes > 0 && embedding_size > 0,
            "CosineClassifier needs C > 0 and D > 0"
        );
        let init = nn::Init::Randn {
            mean: 0.0,
            stdev: 0.01,
        };
        let weight = p.var("weight", &[num_classes, embedding_size], init);
        Self {
            weight,
            num_classes,
            embedding_size,
        }
    }

    /// `cos = clamp(normalize(emb) @ normalize(W)ᵀ, −1, 1)`.
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

    /// Cosines against the sampled classes only, `W[sampled.index]` (Partial FC). Unsampled rows
    /// of `W` get an exactly zero gradient; pair the result with `sampled.labels`.
    ///
    /// # Shapes
    /// `emb_bd [B, D]`, `sampled.index [C']` -> `cos_bc' [B, C']`.
    ///
    /// # Panics
    /// As [`CosineClassifier::cosines`], or if an index is outside `[0, C)`.
    pub fn cosines_sampled(&self, emb_bd: &Tensor, sampled: &Sampled) -> Tensor {
        self.cosines_against(emb_bd, &self.weight.index_select(0, &sampled.index))
    }

    fn cosines_against(&self, emb_bd: &Tensor, weight: &Tensor) -> Tensor {
        let (_, d) = emb_bd.size2().expect("emb_bd must be [B, D]");
        assert_eq!(d, self.embedding_size, "embedding size mismatch");
        let cos_bc = normalize_rows(emb_bd)
            .matmul(&normalize_rows(weight).tr())
            .clamp(-1.0, 1.0);
        match cos_bc.kind() {
            Kind::Half | Kind::BFloat16 => cos_bc.to_kind(Kind::Float),
            _ => cos_bc,
        }
    }

    /// Number of classes `C`.
    pub fn num_classes(&self) -> i64 {
        self.num_classes
    }

    /// Embedding size `D`.
    pub fn embedding_size(&self) -> i64 {
        self.embedding_size
    }

    /// The class-weight variable `W [C, D]` (shares storage with the `VarStore` entry).
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
    /// Registers a classifier of `kind` under `p` (variable `weight`, plus `bias` for
    /// [`ClassifierKind::Linear`]).
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

    /// The class-weight variable `W [C, D]`.
    pub fn weight(&self) -> &Tensor {
        match self {
            Classifier::Cosine(c) => c.weight(),
            Classifier::Linear(c) => c.weight(),
        }
    }

    /// Number of classes `C`.
    pub fn num_classes(&self) -> i64 {
        self.weight().size()[0]
    }
}

/// Row-wise L2 normalisation `x / max(‖x‖₂, 1e-12)`.
///
/// # Shapes
/// `x [N, D]` -> `[N, D]`.
pub fn normalize_rows(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2, [1], true).clamp_min(NORM_EPS)
}
