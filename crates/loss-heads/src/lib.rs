//! Margin heads for face recognition and the cosine classifier that owns the class weights.
//!
//! # The classifier / head split (as in insightface `arcface_torch`)
//!
//! Training a margin-softmax face model is three steps, each owned by one type here:
//!
//! 1. [`CosineClassifier`] owns the class-weight matrix `W [C, D]` (variable `weight`, init
//!    N(0, 0.01)) and turns embeddings into clamped cosines `cos = clamp(x̂ Ŵᵀ, -1, 1)` of shape
//!    `[B, C]`. [`LinearClassifier`] (weight and bias, plain `Wx + b`) serves the [`Softmax`]
//!    head; [`Classifier`] holds either, by [`ClassifierKind`] ([`HeadConfig::classifier_kind`]
//!    names the one a head needs). Which classes take part in a
//!    step is decided next to the classifier: [`PartialFc`] samples all positive classes of the
//!    batch plus a random subset of the others and returns a [`Sampled`] index.
//! 2. A [`MarginHead`] (built from a [`HeadConfig`]) turns those cosines into `s`-scaled logits,
//!    penalising only each sample's target entry: [`NormFace`] (no margin), [`CosFace`]
//!    (`cos θ_y − m`), [`ArcFace`] (`cos(θ_y + m)`, three gradient treatments, see
//!    [`ArcFaceGradient`]), [`CombinedMargin`] (`cos(m1·θ_y + m2) − m3`), [`SphereFace`]
//!    (`ψ(θ_y)` with λ annealing), [`ElasticFace`] (a random margin per sample and step, with the
//!    "+" assignments), [`ClusterGuidedArcFace`] (a margin per identity, set from how hard the
//!    identity is to cluster) and [`Softmax`] (identity over `Wx + b`). Heads never own the weight, so
//!    one head works unchanged over a full or a sampled class set.
//! 3. [`cross_entropy`] averages `−log softmax(z)_y` over the batch. [`margin_cross_entropy`]
//!    (and [`margin_cross_entropy_with_norms`]) does steps 2 and 3 at once with the same value
//!    and gradients and fewer `[B, C]` temporaries: use it in training loops (see [`margin_ce`]).
//!
//! ```text
//! emb [B,D] --CosineClassifier--> cos [B,C] --MarginHead--> logits [B,C] --cross_entropy--> L
//! ```
//!
//! A minimal training step (see `examples/train_small.rs` for a complete one):
//!
//! ```no_run
//! use facerec_loss_heads::{margin_cross_entropy, CosineClassifier, HeadConfig, MarginHead};
//! use tch::{nn, Device, Kind, Tensor};
//!
//! let vs = nn::VarStore::new(Device::Cpu);
//! let classifier = CosineClassifier::new(&(vs.root() / "fc"), 1000, 512);
//! let mut head = HeadConfig::default().build(); // ArcFace, s = 64, m = 0.5
//! let emb = Tensor::randn([32, 512], (Kind::Float, Device::Cpu)); // your model's output
//! let labels = Tensor::randint(1000, [32], (Kind::Int64, Device::Cpu));
//! head.set_step(0); // once per iteration: annealing (SphereFace) and random margins (ElasticFace)
//! // = cross_entropy(&head.logits(&cos, &labels), &labels), fused
//! let loss = margin_cross_entropy(&*head, &classifier.cosines(&emb), &labels);
//! loss.backward();
//! ```
//!
//! # Deliberate difference from the reference
//!
//! arcface_torch applies `arccos`/`cos` to the whole `[B, C]` cosine matrix and then selects the
//! target entries. We gather the `B` target cosines (`[B, 1]`), transform only those, and scatter
//! them back (see [`apply_to_targets`], and [`scaled_targets`], which the heads use: it writes
//! the scaled targets into `s·cos` in place and so makes one pass over `[B, C]`). The values and
//! gradients are identical; the work is `O(B)` instead of `O(B·C)` transcendental calls, and no
//! `acos` is ever evaluated at the non-target entries, whose gradient the reference has to mask
//! out anyway.
//!
//! # Where things live
//!
//! - [`head`]: the [`MarginHead`] trait and the target helpers every head uses.
//! - [`config`]: [`HeadConfig`], the `[head]` table, and the factory [`HeadConfig::build`].
//! - [`angular`]: the additive angular margin `cos(θ + m)` with its eps guards, the three
//!   [`ArcFaceGradient`] treatments and the threshold fallback, written once and called by
//!   ArcFace, the combined margin, ElasticFace-Arc, cluster-guided ArcFace and GCE.
//! - One file per method, named after the paper: [`normface`], [`cosface`], [`arcface`],
//!   [`combined`], [`sphereface`], [`elastic`], [`cluster_guided`], [`gce`], [`softmax`], [`curricularface`], [`adaface`],
//!   [`subcenter`] (sub-center ArcFace: the classifier's `K` rows per class, pooled), [`magface`].
//! - [`classifier`], [`partial_fc`]: the weight owner and the class sampler; [`margin_ce`]: the
//!   fused margin cross-entropy; [`sharded`]: the cross-entropy over a class matrix split across
//!   ranks (model-parallel Partial FC) and its [`Collectives`].
//!
//! Files import each other only through their own paths (`crate::head::MarginHead`), never
//! through the re-exports below, and no two files import each other. The finite-difference
//! checker the tests use lives in the dev-only `facerec-testkit` crate.

pub mod adaface;
pub mod angular;
pub mod arcface;
pub mod classifier;
pub mod cluster_guided;
pub mod combined;
pub mod config;
pub mod cosface;
pub mod curricularface;
pub mod elastic;
pub mod gce;
pub mod head;
pub mod magface;
pub mod margin_ce;
pub mod normface;
pub mod partial_fc;
pub mod sharded;
pub mod softmax;
pub mod sphereface;
pub mod subcenter;

pub use adaface::{AdaFace, AdaFaceConfig};
pub use angular::{AngularMargin, ArcFaceGradient, COS_EPS, SIN2_EPS};
pub use arcface::{ArcFace, ArcFaceConfig};
pub use classifier::{normalize_rows, Classifier, ClassifierKind, CosineClassifier};
pub use cluster_guided::{
    margins_from_hardness, ClusterGuidedArcFace, ClusterMarginConfig, MarginSign, RowMarginArcFace,
};
pub use combined::{CombinedConfig, CombinedMargin};
pub use config::HeadConfig;
pub use cosface::{CosFace, CosFaceConfig};
pub use curricularface::{CurricularFace, CurricularFaceConfig};
pub use elastic::{
    ElasticArcConfig, ElasticArcPlusConfig, ElasticCosConfig, ElasticCosPlusConfig, ElasticFace,
    ElasticKind, ElasticParams, PlusAssignment,
};
pub use gce::{
    Gce, GceConfig, MarginForm, OutGradient, OutWeight, OutWeightRule, PairwiseConfig, Replacement,
    SelfPair,
};
pub use head::{
    apply_to_targets, cross_entropy, scaled_target_offsets, scaled_targets, MarginHead, Scale,
};
pub use magface::{MagFace, MagFaceConfig};
pub use margin_ce::{margin_cross_entropy, margin_cross_entropy_with_norms};
pub use normface::{NormFace, NormFaceConfig};
pub use partial_fc::{PartialFc, PartialFcConfig, Sampled};
pub use sharded::{
    sharded_cross_entropy, sharded_training_loss, ClassShard, Collectives, SingleProcess,
    ThreadGroup,
};
pub use softmax::{LinearClassifier, Softmax, SoftmaxConfig};
pub use sphereface::{SphereFace, SphereFaceConfig, SphereFaceScale};
pub use subcenter::{pool_sub_centres, sub_centre_rows, SubCenterArcFaceConfig};
