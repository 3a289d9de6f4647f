//! CoReFace: Song and Wang, "Sample-Guided Contrastive Regularization for Deep Face Recognition",
//! arXiv 2304.11668 (SPEC section 3; docs/coreface.md).
//!
//! Idea: regularise margin-softmax training with an image-to-image contrastive term. Two views of
//! each image come from two independent dropout masks on the flattened trunk features
//! ([`dropout_views`], embedding augmentation instead of image augmentation); the loss treats the
//! same image's other view as the positive, neutralises other images of the same identity (the
//! supervised mask: their cosine is set to 0, a constant logit), and subtracts an adaptive margin,
//! the batch's mean gap between the positive and the hardest negative, from the positive logit.
//!
//! ```text
//! L_con(a→b) = (1/R)·Σ_r CE( s·(S̃_r − m·e_{t(r)}), t(r) ),  S̃ = cos with same-identity entries := 0
//! m ← momentum·gap_batch + (1 − momentum)·m      (momentum_on = "batch", the released code)
//! ```
//!
//! Deliberate differences from the released code (which we did not copy; see SPEC 3(b)):
//! - The moving-average direction is a setting ([`MomentumOn`]); the default keeps the released
//!   code's weight 0.99 on the *current batch* (see [`MomentumOn::Batch`] for why).
//! - The pair-coupling protocol is a setting ([`Protocol`]); the released code's adopted protocol
//!   (one direction, N x N) is the default. With two directions the margin is updated once per step
//!   from the gaps of all `2B` anchor rows (the released code has no such path enabled).
//! - The hardest negative of a row is the maximum over its negatives only
//!   ([`HardestNegative::Negatives`], SPEC 3(b)'s `max_{j≠i}`); the released code's rule, the
//!   positive's entry kept in the maximum as 0 (so the hardest negative is never below 0), is
//!   the setting [`HardestNegative::PositiveAsZero`].
//! - The margin state moves once per optimiser step; with gradient accumulation the step's gap
//!   is the mean over the rows of all its micro-batches (see [`CoReFace`]).
//! - A fixed margin ([`MarginConfig::Fixed`]) is available for ablations; `m = 0` with distinct
//!   labels reduces the loss to InfoNCE between the views.
//! - The loss is computed in f32 for f16/bf16 views (f64 for f64), like the heads' cross-entropy.

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::{ContrastiveRegularizer, RegularizerOutput};

/// How the anchors and candidates of the contrastive term are coupled (SPEC 3(b), INFERRED names).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// Default, the released code's adopted protocol ("N"): view-1 anchors against view-2
    /// candidates, an `[B, B]` matrix. Row `i`: one positive (column `i`), `B − 1` negatives of
    /// which the same-identity ones are masked to cosine 0. Every cross-view cosine enters exactly
    /// one softmax row.
    #[default]
    OneWay,
    /// Both directions ("double-way N"): the `[B, B]` matrix of view 1 against view 2 and its
    /// transpose, `2B` rows; the loss is the mean over all rows (the mean of the two directions,
    /// so its scale equals [`Protocol::OneWay`]). Every cross-view cosine enters two rows: the
    /// repeated signal the paper warns about.
    BothWays,
    /// The SimCLR layout ("2N"): both views stacked into `[2B, D]`, an `[2B, 2B]` matrix without
    /// its diagonal (a row never sees itself). Row `k`: one positive (the same image's other view),
    /// `2B − 2` negatives (other images in both views), same-identity ones masked. Every
    /// cross-view cosine enters two rows, and within-view pairs (`i¹, j¹`), (`i², j²`) are added.
    TwoN,
}

/// Which side of the margin's moving average carries the weight `momentum`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum MomentumOn {
    /// Default, the released code: `m ← momentum·gap_batch + (1 − momentum)·m_prev`; with 0.99
    /// the margin is almost the current batch's gap. Chosen as the default because (1) it is
    /// what produced every published CoReFace number, while the paper's text on the direction is
    /// unverified (SPEC 3(f)); (2) the margin's stated purpose is a steady loss: subtracting the
    /// batch's own positive-minus-hardest-negative gap puts the positive logit near the hardest
    /// negative in *every* batch, whereas a slow average lags the gap by about `1/(1 − 0.99)` =
    /// 100 steps and, started from `m = 0`, reaches only `(1 − 0.99^t)` of the typical gap after
    /// `t` steps of the contrastive phase (half after 69 steps).
    #[default]
    Batch,
    /// A textbook exponential moving average: `m ← momentum·m_prev + (1 − momentum)·gap_batch`
    /// (what "EMA with 0.99" usually means; what the paper may describe).
    State,
}

/// Over which entries a row's hardest negative is taken, for the gap behind the adaptive margin
/// (and the logged `batch_gap` / `hardest_negative_cos`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum HardestNegative {
    /// Default (SPEC 3(b) step 3, ours): the maximum over the row's negatives only, every
    /// non-positive, non-excluded entry of the masked matrix (same-identity entries count as their
    /// masked value 0). With no repeated identity the hardest negative can be below 0 and the gap
    /// above 1.
    #[default]
    Negatives,
    /// The released code: the maximum over the whole row with the positive's entry kept in it as
    /// 0, so the hardest negative is never below 0: `max(0, Negatives)`. Excluded entries (2N:
    /// the anchor itself) stay out, which changes nothing since the floor is 0 anyway.
    PositiveAsZero,
}

/// `[coreface.margin] type = "adaptive"`: the margin follows the batch gap.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveMarginConfig {
    /// Moving-average coefficient in `[0, 1]`. Default 0.99.
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    /// Which side carries `momentum`: `"batch"` (default, the released code) or `"state"`.
    #[serde(default)]
    pub momentum_on: MomentumOn,
}

fn default_momentum() -> f64 {
    0.99
}

impl Default for AdaptiveMarginConfig {
    fn default() -> Self {
        Self {
            momentum: default_momentum(),
            momentum_on: MomentumOn::default(),
        }
    }
}

/// `[coreface.margin] type = "fixed"`: a constant margin (ablation).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct FixedMarginConfig {
    /// The margin subtracted from the positive cosine. Default 0.0 (plain InfoNCE when no two
    /// images share an identity).
    #[serde(default)]
    pub m: f64,
}

/// The margin subtracted from each row's positive cosine (`[coreface.margin]`, tagged by `type`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum MarginConfig {
    /// Default: the moving average of the batch gap (SPEC 3(b) step 3).
    Adaptive(AdaptiveMarginConfig),
    /// A constant.
    Fixed(FixedMarginConfig),
}

impl Default for MarginConfig {
    fn default() -> Self {
        MarginConfig::Adaptive(AdaptiveMarginConfig::default())
    }
}

/// The `[coreface]` table: the recipe (phases, dropout, loss weights) and the contrastive loss.
///
/// ```toml
/// [coreface]
/// start_epoch = 7          # contrastive phase from this 0-based epoch index on
/// # init_from = "runs/arcface"   (trainer-side, optional: backbone + classifier of that run)
/// warmup_dropout = 0.4     # single-view dropout before start_epoch
/// dropout = 0.6            # the two views' dropout from start_epoch on
/// w_cls1 = 0.5
/// w_cls2 = 0.5
/// w_con = 0.05
/// protocol = "one_way"     # "one_way" | "both_ways" | "two_n"
/// s = 64.0
/// hardest_negative = "negatives"   # "negatives" (ours) | "positive_as_zero" (released code)
/// [coreface.margin]
/// type = "adaptive"        # "adaptive" | "fixed"
/// momentum = 0.99
/// momentum_on = "batch"    # "batch" (released code) | "state" (textbook EMA)
/// ```
/// Missing keys take the documented defaults (the released recipe, SPEC 3(d)); unknown keys are an
/// error.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CoReFaceConfig {
    /// 0-based epoch index from which the contrastive phase runs (two views, three losses).
    /// Before it: one view, dropout `warmup_dropout`, classification loss only. Default 7 (the
    /// released code: `shrink_epoch[0] − 1`, the epoch of the first learning-rate drop).
    #[serde(default = "default_start_epoch")]
    pub start_epoch: usize,
    /// Trainer-side, not read by this crate: a run directory, checkpoint directory or backbone
    /// `.safetensors` (e.g. of an ArcFace + dropout 0.4 run) whose backbone *and* classifier
    /// initialise this run, as the published run started its contrastive phase from an ArcFace
    /// checkpoint at epoch 8. The trainer reads it as `[init] from = ..., classifier = true`
    /// (docs/coreface.md). Default: unset (train from scratch through the warm-up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<String>,
    /// Dropout probability on the trunk features before `start_epoch` (one view). Default 0.4.
    #[serde(default = "default_warmup_dropout")]
    pub warmup_dropout: f64,
    /// Dropout probability of each of the two views from `start_epoch` on. Default 0.6 (the
    /// released code's `dropout2`).
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    /// Weight of view 1's classification loss. Default 0.5.
    #[serde(default = "default_w_cls")]
    pub w_cls1: f64,
    /// Weight of view 2's classification loss. Default 0.5.
    #[serde(default = "default_w_cls")]
    pub w_cls2: f64,
    /// Weight of the contrastive loss. Default 0.05.
    #[serde(default = "default_w_con")]
    pub w_con: f64,
    /// Pair coupling: `"one_way"` (default), `"both_ways"` or `"two_n"`.
    #[serde(default)]
    pub protocol: Protocol,
    /// Logit scale `s` (temperature `1/s`) of the contrastive softmax. Default 64.
    #[serde(default = "default_s")]
    pub s: f64,
    /// The hardest-negative rule of the gap: `"negatives"` (default, ours) or
    /// `"positive_as_zero"` (the released code; see [`HardestNegative`]).
    #[serde(default)]
    pub hardest_negative: HardestNegative,
    /// The margin. Default adaptive, momentum 0.99 on the batch.
    #[serde(default)]
    pub margin: MarginConfig,
}

fn default_start_epoch() -> usize {
    7
}
fn default_warmup_dropout() -> f64 {
    0.4
}
fn default_dropout() -> f64 {
    0.6
}
fn default_w_cls() -> f64 {
    0.5
}
fn default_w_con() -> f64 {
    0.05
}
fn default_s() -> f64 {
    64.0
}

impl Default for CoReFaceConfig {
    fn default() -> Self {
        Self {
            start_epoch: default_start_epoch(),
            init_from: None,
            warmup_dropout: default_warmup_dropout(),
            dropout: default_dropout(),
            w_cls1: default_w_cls(),
            w_cls2: default_w_cls(),
            w_con: default_w_con(),
            protocol: Protocol::default(),
            s: default_s(),
            hardest_negative: HardestNegative::default(),
            margin: MarginConfig::default(),
        }
    }
}

impl CoReFaceConfig {
    /// Checks every value; the error names the key, e.g. `coreface.dropout: must be in [0, 1)`.
    pub fn validate(&self) -> Result<()> {
        for (key, p) in [
            ("warmup_dropout", self.warmup_dropout),
            ("dropout", self.dropout),
        ] {
            ensure!(
                (0.0..1.0).contains(&p),
                "coreface.{key}: must be in [0, 1), got {p}"
            );
        }
        for (key, w) in [
            ("w_cls1", self.w_cls1),
            ("w_cls2", self.w_cls2),
            ("w_con", self.w_con),
        ] {
            ensure!(
                w.is_finite() && w >= 0.0,
                "coreface.{key}: must be finite and >= 0, got {w}"
            );
        }
        let s = self.s;
        ensure!(
            s.is_finite() && s > 0.0,
            "coreface.s: must be finite and > 0, got {s}"
        );
        match &self.margin {
            MarginConfig::Adaptive(a) => ensure!(
                (0.0..=1.0).contains(&a.momentum),
                "coreface.margin.momentum: must be in [0, 1], got {}",
                a.momentum
            ),
            MarginConfig::Fixed(f) => ensure!(
                f.m.is_finite(),
                "coreface.margin.m: must be finite, got {}",
                f.m
            ),
        }
        if let Some(p) = &self.init_from {
            ensure!(!p.is_empty(), "coreface.init_from: empty path");
        }
        Ok(())
    }

    /// True from `start_epoch` on: two views and the contrastive term.
    pub fn is_contrastive(&self, epoch: usize) -> bool {
        epoch >= self.start_epoch
    }

    /// The trunk-feature dropout of `epoch`: `warmup_dropout` before `start_epoch`, `dropout`
    /// (per view) from it on.
    pub fn dropout_at(&self, epoch: usize) -> f64 {
        if self.is_contrastive(epoch) {
            self.dropout
        } else {
            self.warmup_dropout
        }
    }

    /// `w_cls1·cls1 + w_cls2·cls2 + w_con·con`.
    ///
    /// # Shapes
    /// Three scalars -> scalar.
    pub fn total_loss(&self, cls1: &Tensor, cls2: &Tensor, con: &Tensor) -> Tensor {
        cls1 * self.w_cls1 + cls2 * self.w_cls2 + con * self.w_con
    }
}

/// Embedding augmentation: two independent inverted-dropout masks (keep probability `1 − p`,
/// kept entries scaled by `1/(1 − p)`) on the trunk features, each view passed through the shared
/// `neck` (e.g. `|h| backbone.forward_neck_t(h, true)`: FC + BatchNorm1d, so each view is
/// normalised with its own batch statistics and the running statistics are updated twice).
/// Always draws masks (training only); evaluation uses one view, `neck(trunk)` in eval mode,
/// without dropout. `p = 0` gives two identical views.
///
/// # Shapes
/// `trunk_bf [B, F]`; `neck` maps `[B, F] -> [B, D]`; returns `([B, D], [B, D])`.
///
/// # Panics
/// If `p` is not in `[0, 1)`.
pub fn dropout_views(
    trunk_bf: &Tensor,
    p: f64,
    neck: impl Fn(&Tensor) -> Tensor,
) -> (Tensor, Tensor) {
    assert!(
        (0.0..1.0).contains(&p),
        "dropout p must be in [0, 1), got {p}"
    );
    let v1 = neck(&trunk_bf.dropout(p, true));
    let v2 = neck(&trunk_bf.dropout(p, true));
    (v1, v2)
}

/// Row-wise L2 normalisation `x / max(‖x‖, 1e-12)` (PyTorch `F.normalize`).
///
/// # Shapes
/// `x_bd [B, D]` -> `[B, D]`.
pub fn normalize(x_bd: &Tensor) -> Tensor {
    let norm = x_bd
        .norm_scalaropt_dim(2.0, [1i64].as_slice(), true)
        .clamp_min(1e-12);
    x_bd / norm
}

/// The supervised mask in one vectorised comparison: `mask[i, j] = (y_i == y_j) && i != j`.
///
/// # Shapes
/// `labels_b [B]` (Int64) -> `[B, B]` Bool.
pub fn same_identity_mask(labels_b: &Tensor) -> Tensor {
    let b = labels_b.size1().expect("labels must be [B]");
    let same = labels_b.unsqueeze(1).eq_tensor(&labels_b.unsqueeze(0));
    same.logical_and(&Tensor::eye(b, (Kind::Bool, labels_b.device())).logical_not())
}

/// The logits of the contrastive softmax for one protocol, before the margin, with the layout
/// masks (see [`contrastive_logits`]). `R` anchor rows, `K` candidate columns: `[B, B]` (one way),
/// `[2B, B]` (both ways), `[2B, 2B]` (2N).
#[derive(Debug)]
pub struct ContrastiveLogits {
    /// Masked cosines `S̃ [R, K]`: clamped cosines, same-identity entries set to 0 (no gradient),
    /// excluded entries (2N: the row's own embedding) set to 0 too (they never enter the loss).
    pub cos_rk: Tensor,
    /// Target column of each row (the positive) `[R]` Int64.
    pub targets_r: Tensor,
    /// Positive entries `[R, K]` Bool (exactly one per row).
    pub positive_rk: Tensor,
    /// Excluded entries `[R, K]` Bool: not in the softmax at all (2N: the diagonal).
    pub excluded_rk: Tensor,
}

impl ContrastiveLogits {
    /// `(gap, positive cosine, hardest negative)` per row, detached, each `[R]`, with the default
    /// rule [`HardestNegative::Negatives`]: the hardest negative is the maximum over all
    /// non-positive, non-excluded entries of `S̃`, masked ones included (they count as 0).
    pub fn gaps(&self) -> (Tensor, Tensor, Tensor) {
        self.gaps_with(HardestNegative::Negatives)
    }

    /// [`ContrastiveLogits::gaps`] with the hardest negative taken by `rule`.
    pub fn gaps_with(&self, rule: HardestNegative) -> (Tensor, Tensor, Tensor) {
        let cos = self.cos_rk.detach();
        let pos_r = cos
            .gather(1, &self.targets_r.unsqueeze(1), false)
            .squeeze_dim(1);
        let not_neg = self.positive_rk.logical_or(&self.excluded_rk);
        let (neg_r, _) = cos.masked_fill(&not_neg, -3.0).max_dim(1, false);
        let neg_r = match rule {
            HardestNegative::Negatives => neg_r,
            HardestNegative::PositiveAsZero => neg_r.clamp_min(0.0),
        };
        (&pos_r - &neg_r, pos_r, neg_r)
    }

    /// Logits `s·(S̃ − m·positive)`, excluded entries `−inf`.
    ///
    /// # Shapes
    /// `margin` a scalar tensor (same kind as `cos_rk`) -> `[R, K]`.
    pub fn logits(&self, s: f64, margin: &Tensor) -> Tensor {
        let pos = self.positive_rk.to_kind(self.cos_rk.kind());
        let z = (&self.cos_rk - pos * margin.detach()) * s;
        z.masked_fill(&self.excluded_rk, f64::NEG_INFINITY)
    }

    /// Mean cross-entropy of [`ContrastiveLogits::logits`] with the positives as targets.
    pub fn loss(&self, s: f64, margin: &Tensor) -> Tensor {
        let kind = self.cos_rk.kind();
        self.logits(s, margin)
            .log_softmax(-1, kind)
            .nll_loss(&self.targets_r)
    }
}

fn compute_kind(k: Kind) -> Kind {
    if k == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// Builds the masked cosine matrix of `protocol` from two views (normalised here).
///
/// # Shapes
/// `view1_bd [B, D]`, `view2_bd [B, D]`, `labels_b [B]` (Int64); see [`ContrastiveLogits`] for
/// `R` and `K`. Computed in f64 for f64 views, f32 otherwise.
///
/// # Panics
/// If the shapes disagree, the labels are not Int64, or `B < 2` (no negatives).
pub fn contrastive_logits(
    view1_bd: &Tensor,
    view2_bd: &Tensor,
    labels_b: &Tensor,
    protocol: Protocol,
) -> ContrastiveLogits {
    let (b, d) = view1_bd.size2().expect("view1 must be [B, D]");
    assert_eq!(
        view2_bd.size(),
        [b, d],
        "view2 must have view1's shape [B, D]"
    );
    assert_eq!(labels_b.kind(), Kind::Int64, "labels must be Int64");
    assert_eq!(labels_b.size(), [b], "labels must be [B] with B = {b}");
    assert!(b >= 2, "the contrastive loss needs B >= 2 (got {b})");
    let kind = compute_kind(view1_bd.kind());
    let dev = view1_bd.device();
    let e1 = normalize(&view1_bd.to_kind(kind));
    let e2 = normalize(&view2_bd.to_kind(kind));
    let ar_b = Tensor::arange(b, (Kind::Int64, dev));
    match protocol {
        Protocol::OneWay | Protocol::BothWays => {
            let same_bb = same_identity_mask(labels_b);
            let cos12 = e1.mm(&e2.tr()).clamp(-1.0, 1.0);
            let eye = Tensor::eye(b, (Kind::Bool, dev));
            let (cos, targets, positive, same) = if protocol == Protocol::OneWay {
                (cos12, ar_b, eye, same_bb)
            } else {
                let cos = Tensor::cat(&[&cos12, &cos12.tr()], 0);
                (
                    cos,
                    Tensor::cat(&[&ar_b, &ar_b], 0),
                    Tensor::cat(&[&eye, &eye], 0),
                    Tensor::cat(&[&same_bb, &same_bb], 0),
                )
            };
            let excluded = positive.zeros_like();
            ContrastiveLogits {
                cos_rk: cos.masked_fill(&same, 0.0),
                targets_r: targets,
                positive_rk: positive,
                excluded_rk: excluded,
            }
        }
        Protocol::TwoN => {
            let z = Tensor::cat(&[&e1, &e2], 0);
            let cos = z.mm(&z.tr()).clamp(-1.0, 1.0);
            let n = 2 * b;
            let ar_n = Tensor::arange(n, (Kind::Int64, dev));
            let targets = (&ar_n + b).remainder(n);
            let positive = targets.unsqueeze(1).eq_tensor(&ar_n.unsqueeze(0));
            let excluded = Tensor::eye(n, (Kind::Bool, dev));
            let labels_n = Tensor::cat(&[labels_b, labels_b], 0);
            let same = labels_n
                .unsqueeze(1)
                .eq_tensor(&labels_n.unsqueeze(0))
                .logical_and(&positive.logical_or(&excluded).logical_not());
            ContrastiveLogits {
                cos_rk: cos.masked_fill(&same.logical_or(&excluded), 0.0),
                targets_r: targets,
                positive_rk: positive,
                excluded_rk: excluded,
            }
        }
    }
}

/// The CoReFace contrastive regularizer: masked cosine softmax with an adaptive margin.
///
/// The margin state is a scalar tensor (`margin`, initially 0); built with [`CoReFace::new`] it is
/// a non-trainable variable of the `VarStore`, so `VarStore::save`/`load` carry it.
///
/// The state moves once per optimiser step. [`ContrastiveRegularizer::forward`] is one step of
/// one batch. With gradient accumulation, call
/// [`ContrastiveRegularizer::forward_micro_batch`] for every micro-batch and
/// [`ContrastiveRegularizer::end_step`] after the optimiser step: the step's gap is the mean over
/// every anchor row of its micro-batches (each row's gap taken within its own micro-batch; with
/// equal micro-batches, the mean of their gaps). Micro-batch `k` uses the margin updated from the
/// gap of micro-batches `1..=k` (the margin the step would have if it ended there), so the last
/// one uses the step's margin, which `end_step` stores. One micro-batch per step is exactly
/// `forward`.
#[derive(Debug)]
pub struct CoReFace {
    protocol: Protocol,
    s: f64,
    margin_cfg: MarginConfig,
    hardest: HardestNegative,
    margin: Tensor,
    /// This step's micro-batches so far: (mean gap, mean positive, mean hardest negative, rows).
    pending: Vec<(Tensor, Tensor, Tensor, i64)>,
}

impl CoReFace {
    /// Registers the margin state as the buffer `margin` (shape `[]`, 0) under `p`
    /// (e.g. `vs.root() / "coreface"` gives the checkpoint key `coreface.margin`).
    ///
    /// # Panics
    /// If [`CoReFaceConfig::validate`] fails.
    pub fn new(p: &nn::Path, cfg: &CoReFaceConfig) -> Self {
        Self::with_state(cfg, p.zeros_no_train("margin", &[]))
    }

    /// Without a `VarStore`: the state is a plain tensor of `kind` on `device` (save it yourself
    /// through [`CoReFace::margin_state`]).
    ///
    /// # Panics
    /// If [`CoReFaceConfig::validate`] fails.
    pub fn standalone(cfg: &CoReFaceConfig, device: Device, kind: Kind) -> Self {
        Self::with_state(cfg, Tensor::zeros([0i64; 0], (kind, device)))
    }

    fn with_state(cfg: &CoReFaceConfig, margin: Tensor) -> Self {
        if let Err(e) = cfg.validate() {
            panic!("CoReFace on an invalid config: {e:#}");
        }
        Self {
            protocol: cfg.protocol,
            s: cfg.s,
            margin_cfg: cfg.margin.clone(),
            hardest: cfg.hardest_negative,
            margin,
            pending: Vec::new(),
        }
    }

    /// This step's `(gap, positive cosine, hardest negative)` so far: row-weighted means over the
    /// pending micro-batches (the one micro-batch's own means when there is one). `None` before
    /// the first micro-batch of a step.
    fn step_means(&self) -> Option<(Tensor, Tensor, Tensor)> {
        match self.pending.as_slice() {
            [] => None,
            [(g, p, n, _)] => Some((g.shallow_clone(), p.shallow_clone(), n.shallow_clone())),
            many => {
                let rows: i64 = many.iter().map(|e| e.3).sum();
                let mean = |pick: fn(&(Tensor, Tensor, Tensor, i64)) -> &Tensor| {
                    let parts: Vec<Tensor> = many.iter().map(|e| pick(e) * (e.3 as f64)).collect();
                    Tensor::stack(&parts, 0).sum(parts[0].kind()) / rows as f64
                };
                Some((mean(|e| &e.0), mean(|e| &e.1), mean(|e| &e.2)))
            }
        }
    }

    /// The margin state (scalar tensor, aliasing the `VarStore` buffer when built with
    /// [`CoReFace::new`]). Write it with `tch::no_grad(|| state.copy_(...))` to restore it.
    pub fn margin_state(&self) -> &Tensor {
        &self.margin
    }

    /// Overwrites the margin state in place (e.g. when resuming without a `VarStore`).
    pub fn set_margin(&mut self, m: f64) {
        tch::no_grad(|| {
            let _ = self.margin.fill_(m);
        });
    }

    /// The protocol.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The next margin from this batch's mean gap and the state, *without* storing it.
    ///
    /// # Shapes
    /// `batch_gap` scalar -> scalar (kind of `batch_gap`).
    pub fn next_margin(&self, batch_gap: &Tensor) -> Tensor {
        let prev = self
            .margin
            .to_device(batch_gap.device())
            .to_kind(batch_gap.kind());
        match &self.margin_cfg {
            MarginConfig::Fixed(f) => batch_gap.zeros_like() + f.m,
            MarginConfig::Adaptive(a) => match a.momentum_on {
                MomentumOn::Batch => batch_gap * a.momentum + prev * (1.0 - a.momentum),
                MomentumOn::State => prev * a.momentum + batch_gap * (1.0 - a.momentum),
            },
        }
    }
}

impl ContrastiveRegularizer for CoReFace {
    /// Builds the protocol's masked cosines, adds this micro-batch's gaps (computed on the
    /// detached masked matrix, hardest negatives by `hardest_negative`) to the step's, and returns
    /// the loss with the margin updated from the step's gap so far; the state is not written
    /// (see [`CoReFace`]).
    ///
    /// # Shapes
    /// `view1_bd [B, D]`, `view2_bd [B, D]`, `labels_b [B]` (Int64).
    ///
    /// # Panics
    /// As [`contrastive_logits`].
    fn forward_micro_batch(
        &mut self,
        view1_bd: &Tensor,
        view2_bd: &Tensor,
        labels_b: &Tensor,
    ) -> RegularizerOutput {
        let lg = contrastive_logits(view1_bd, view2_bd, labels_b, self.protocol);
        let (gap_r, pos_r, neg_r) = lg.gaps_with(self.hardest);
        let kind = lg.cos_rk.kind();
        let rows = gap_r.size()[0];
        self.pending
            .push((gap_r.mean(kind), pos_r.mean(kind), neg_r.mean(kind), rows));
        let (batch_gap, positive_cos, hardest_negative_cos) =
            self.step_means().expect("a micro-batch was just added");
        let margin = self.next_margin(&batch_gap).detach();
        RegularizerOutput {
            loss: lg.loss(self.s, &margin),
            margin,
            batch_gap,
            positive_cos,
            hardest_negative_cos,
        }
    }

    /// Stores the margin of the step's gap (the one its last micro-batch used) and starts a new
    /// step. Without a micro-batch since the last call (e.g. in the warm-up phase) nothing changes.
    fn end_step(&mut self) {
        if let Some((gap, _, _)) = self.step_means() {
            let margin = self.next_margin(&gap).detach();
            tch::no_grad(|| {
                let new = margin
                    .to_device(self.margin.device())
                    .to_kind(self.margin.kind());
                self.margin.copy_(&new);
            });
        }
        self.pending.clear();
    }
}

/// One embedding of the batch: `view` 1 or 2 and the `image` index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ViewRef {
    /// 1 or 2.
    pub view: u8,
    /// Index in the batch.
    pub image: usize,
}

/// The role of one candidate entry in a softmax row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The target: the same image's other view; its logit is `s·(cos − m)`.
    Positive,
    /// A different image of a different identity: logit `s·cos`.
    Negative,
    /// A different image of the same identity: logit 0 (cosine set to 0), still in the softmax.
    Masked,
    /// Not in the softmax (2N: the anchor itself).
    Excluded,
}

/// One softmax row of a protocol, described without tensors (for tests and documentation).
#[derive(Debug, Clone, PartialEq)]
pub struct LayoutRow {
    /// The anchor embedding.
    pub anchor: ViewRef,
    /// The candidates, in column order, with their roles.
    pub entries: Vec<(ViewRef, Role)>,
}

impl Protocol {
    /// The rows of this protocol for a batch with `labels`, in the row and column order of
    /// [`contrastive_logits`]: a plain description of who is compared with whom.
    pub fn layout(&self, labels: &[i64]) -> Vec<LayoutRow> {
        let b = labels.len();
        let v = |view: u8, image: usize| ViewRef { view, image };
        let role = |a: ViewRef, c: ViewRef| {
            if a == c {
                Role::Excluded
            } else if a.image == c.image {
                Role::Positive
            } else if labels[a.image] == labels[c.image] {
                Role::Masked
            } else {
                Role::Negative
            }
        };
        let row = |a: ViewRef, cands: &[ViewRef]| LayoutRow {
            anchor: a,
            entries: cands.iter().map(|&c| (c, role(a, c))).collect(),
        };
        let view1: Vec<ViewRef> = (0..b).map(|i| v(1, i)).collect();
        let view2: Vec<ViewRef> = (0..b).map(|i| v(2, i)).collect();
        let both: Vec<ViewRef> = view1.iter().chain(&view2).copied().collect();
        match self {
            Protocol::OneWay => view1.iter().map(|&a| row(a, &view2)).collect(),
            Protocol::BothWays => view1
                .iter()
                .map(|&a| row(a, &view2))
                .chain(view2.iter().map(|&a| row(a, &view1)))
                .collect(),
            Protocol::TwoN => both.iter().map(|&a| row(a, &both)).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_marks_other_images_of_the_same_identity() {
        let labels = Tensor::from_slice(&[3i64, 1, 3, 3, 2, 1]);
        let got = Vec::<i64>::try_from(same_identity_mask(&labels).to_kind(Kind::Int64).view([-1]))
            .unwrap();
        let l = [3i64, 1, 3, 3, 2, 1];
        let want: Vec<i64> = (0..6)
            .flat_map(|i| (0..6).map(move |j| (i != j && l[i] == l[j]) as i64))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn config_defaults_are_the_released_recipe() {
        let c: CoReFaceConfig = toml::from_str("").unwrap();
        assert_eq!(c, CoReFaceConfig::default());
        assert_eq!((c.w_cls1, c.w_cls2, c.w_con), (0.5, 0.5, 0.05));
        assert_eq!((c.warmup_dropout, c.dropout, c.start_epoch), (0.4, 0.6, 7));
        assert_eq!(c.protocol, Protocol::OneWay);
        assert_eq!(
            c.margin,
            MarginConfig::Adaptive(AdaptiveMarginConfig {
                momentum: 0.99,
                momentum_on: MomentumOn::Batch
            })
        );
        assert_eq!(c.dropout_at(6), 0.4);
        assert_eq!(c.dropout_at(7), 0.6);
        assert!(!c.is_contrastive(6) && c.is_contrastive(7));
    }

    #[test]
    fn config_parses_every_setting_and_names_bad_keys() {
        let c: CoReFaceConfig = toml::from_str(
            "protocol = \"two_n\"\ns = 32.0\ninit_from = \"a.safetensors\"\n\
             [margin]\ntype = \"adaptive\"\nmomentum = 0.9\nmomentum_on = \"state\"\n",
        )
        .unwrap();
        assert_eq!(c.protocol, Protocol::TwoN);
        assert_eq!(c.init_from.as_deref(), Some("a.safetensors"));
        assert_eq!(c.hardest_negative, HardestNegative::Negatives);
        let released: CoReFaceConfig =
            toml::from_str("hardest_negative = \"positive_as_zero\"").unwrap();
        assert_eq!(released.hardest_negative, HardestNegative::PositiveAsZero);
        let text = toml::to_string(&released).unwrap();
        assert_eq!(toml::from_str::<CoReFaceConfig>(&text).unwrap(), released);
        assert_eq!(
            c.margin,
            MarginConfig::Adaptive(AdaptiveMarginConfig {
                momentum: 0.9,
                momentum_on: MomentumOn::State
            })
        );
        let c: CoReFaceConfig =
            toml::from_str("protocol = \"both_ways\"\n[margin]\ntype = \"fixed\"\nm = 0.2\n")
                .unwrap();
        assert_eq!(c.margin, MarginConfig::Fixed(FixedMarginConfig { m: 0.2 }));
        let text = toml::to_string(&c).unwrap();
        assert_eq!(toml::from_str::<CoReFaceConfig>(&text).unwrap(), c);
        let err = |s: &str| match toml::from_str::<CoReFaceConfig>(s) {
            Ok(c) => format!("{:#}", c.validate().unwrap_err()),
            Err(e) => e.to_string(),
        };
        assert!(err("dropuot = 0.5").contains("dropuot"));
        assert!(err("[margin]\ntype = \"fixed\"\nmomentum = 0.5").contains("momentum"));
        assert!(err("protocol = \"n\"").contains("one_way"));
        assert!(err("hardest_negative = \"zero\"").contains("positive_as_zero"));
        assert!(err("dropout = 1.0").contains("coreface.dropout"));
        assert!(err("w_con = -1.0").contains("coreface.w_con"));
        assert!(err("s = 0.0").contains("coreface.s"));
        assert!(err("[margin]\ntype = \"adaptive\"\nmomentum = 1.5")
            .contains("coreface.margin.momentum"));
    }
}
