//! GCE / "GFace": Zhao, Zhu, Shi, Zhang, Zhao, Lei, "Global Cross-Entropy Loss for Deep Face
//! Recognition", IEEE Transactions on Image Processing 34, pp. 1672–1685, 2025,
//! doi 10.1109/TIP.2025.3546481.
//!
//! Idea: softmax only asks a sample's target similarity to beat *its own* non-target
//! similarities. GCE asks every in-sample target similarity to beat every non-target similarity
//! of the batch (its own and the other samples'), and every in-sample non-target similarity to
//! stay below every target similarity of the batch: one global ordering, "every positive above
//! every negative". A bilateral margin penalises both sides, and a pairwise framework replaces
//! some class prototypes by sample features so training also sees sample-to-sample pairs, as at
//! test time.
//!
//! Only the abstract is public and no code was found: this is *our reading* (SPEC section 5,
//! `docs/gce.md`), with every choice in [`GceConfig`]. With `S = clamp(x̂ Ŵᵀ)`,
//! `t̃_k` the margin-penalised target similarity of sample `k`, `ñ_kc` its margin-penalised
//! non-target similarities, `ℓ_k = log Σ_{c≠y_k} e^{s ñ_kc}` and `O(i)` the out-samples of
//! anchor `i` (samples of other classes):
//!
//! ```text
//! L1_i = log(1 + e^{−s t̃_i}·[e^{ℓ_i} + ω Σ_{k∈O(i)} e^{ℓ_k}])
//! L2_i = log(1 + e^{ℓ_i}·[e^{−s t̃_i} + ω Σ_{k∈O(i)} e^{−s t̃_k}])
//! L    = (1/B) Σ_i (w1·L1_i + w2·L2_i)            (w1 = w2 = 1/2)
//! ```
//!
//! Both terms are computed in `O(B·C + B²)` time and memory, all in the log domain: one
//! masked `logsumexp` per row of the `[B, C]` matrix gives `ℓ`, and the out-sample sums are a
//! `logsumexp` over a `[B, B]` matrix of log-weights (`0` on the diagonal, `ln ω` for
//! out-samples, `−∞` otherwise) added to `ℓ` (or to `−s t̃`). No `[B, B, C]` tensor exists and
//! no sum is formed by subtraction, so nothing cancels and nothing overflows at `s = 64`.
//! With `ω = 0` both terms are the cross-entropy of the margin logits (`s t̃` at the target,
//! `s ñ` elsewhere).
//!
//! Deliberate choices (there is no reference code to differ from): everything in the list above
//! is INFERRED from the abstract; the prototype replacement is applied to *columns* of the
//! cosine matrix (`S[:, c] ← x̂ x̂_jᵀ`), which equals replacing `Ŵ_c` by `x̂_j` and needs neither
//! the classifier weight nor a copy of it, so it works unchanged over a Partial FC subset (the
//! column positions are the remapped labels). By default an anchor's out-sample sums are constants
//! in its terms ([`OutGradient::Detached`]): differentiated live, they gave the batch's hardest
//! image about half the batch's gradient weight and cost 9 points on LFW (issue 17, `docs/gce.md`).

use std::collections::BTreeMap;

use anyhow::{ensure, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::angular::{AngularMargin, ArcFaceGradient, COS_EPS};
use crate::classifier::normalize_rows;
use crate::head::MarginHead;
use crate::sharded::Collectives;

/// How a margin enters a similarity.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MarginForm {
    /// On the cosine: target `t − m_t`, non-target `n + m_n` (CosFace-like).
    Additive,
    /// On the angle: target `cos(θ + m_t)` (ArcFace, with the [`ArcFaceGradient`] treatment),
    /// non-target `cos(max(θ − m_n, 0))`.
    Angular,
}

/// The weight `ω` of every out-sample term.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum OutWeight {
    /// A fixed `ω ≥ 0` (`0`: margin softmax; `1`: a pure global softmax).
    Value(f64),
    /// A rule that depends on the batch.
    Rule(OutWeightRule),
}

/// Batch-dependent choices of `ω`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OutWeightRule {
    /// `ω = 1/(B − 1)`: balances the `B − 1` times larger out-sample set (0 when `B = 1`).
    InverseBatch,
}

impl Default for OutWeight {
    fn default() -> Self {
        OutWeight::Rule(OutWeightRule::InverseBatch)
    }
}

impl OutWeight {
    /// `ω` for a batch of `b` samples.
    pub fn value(&self, b: i64) -> f64 {
        match self {
            OutWeight::Value(w) => *w,
            OutWeight::Rule(OutWeightRule::InverseBatch) => {
                if b > 1 {
                    1.0 / (b - 1) as f64
                } else {
                    0.0
                }
            }
        }
    }
}

/// Whether an anchor's out-sample terms send gradient to the *other* samples' similarities.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum OutGradient {
    /// Anchor `i`'s terms differentiate through every `ℓ_k` and `t̃_k` they contain: each
    /// out-sample's similarities receive gradient from all `B − 1` anchors that list it. At
    /// `s = 32` the hardest sample of a batch then takes about half the batch's gradient weight
    /// (`docs/gce.md`, "Why GCE trailed ArcFace on LFW"); the default until issue 17.
    Live,
    /// Default. The out-sample sums of anchor `i` are constants (detached): anchor `i`'s terms
    /// move only its own target and non-targets, against a threshold set by the rest of the
    /// batch. Each sample's gradient then comes from its own two terms, as in margin softmax.
    #[default]
    Detached,
}

/// What happens to the one comparison that becomes trivial after a replacement: sample `j`
/// against the prototype of its own class, now `x̂_j` itself (similarity 1).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum SelfPair {
    /// Default. Sample `j` keeps its similarity to the original prototype `Ŵ_{y_j}` (the entry
    /// of the cosine matrix is left untouched); every other sample sees `x̂_j`.
    #[default]
    KeepPrototype,
    /// Sample `j` has no valid target this step: its own terms are left out of the mean and its
    /// target is left out of the other anchors' out-sample targets (term 2). Its non-target row
    /// still counts as out-sample negatives (term 1).
    Drop,
}

/// `[head.pairwise]` (with `[head] type = "gce"`): the prototype-replacement framework.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PairwiseConfig {
    /// Probability `r` that the prototype of an eligible class is replaced in a step, in
    /// `[0, 1]`. Default 0.2 (SPEC 5 suggests 0.1–0.5; 0 disables the framework).
    #[serde(default = "default_rate")]
    pub rate: f64,
    /// A class is eligible when it has at least this many samples in the batch, `≥ 1`.
    /// Default 2 (with one sample the replaced prototype only meets other classes' samples).
    #[serde(default = "default_min_count")]
    pub min_count: usize,
    /// Detach the feature `x̂_j` that stands in for the prototype (gradient flows only through the
    /// anchors' side of each pair). Default true.
    #[serde(default = "default_true")]
    pub detach: bool,
    /// Treatment of sample `j`'s comparison with its own feature. Default `"keep_prototype"`.
    #[serde(default)]
    pub self_pair: SelfPair,
    /// Seed of the replacement draw. Default 0.
    #[serde(default)]
    pub seed: u64,
}

fn default_rate() -> f64 {
    0.2
}
fn default_min_count() -> usize {
    2
}
fn default_true() -> bool {
    true
}

impl Default for PairwiseConfig {
    fn default() -> Self {
        Self {
            rate: default_rate(),
            min_count: default_min_count(),
            detach: true,
            self_pair: SelfPair::default(),
            seed: 0,
        }
    }
}

/// `[head] type = "gce"`: the GCE loss (SPEC 5, `docs/gce.md`).
///
/// ```toml
/// [gce]
/// s = 64.0
/// m_t = 0.5                 # target margin
/// target_form = "angular"   # "angular": cos(θ + m_t) | "additive": cos θ − m_t
/// gradient = "exact"        # angular target: "exact" | "easy_margin" | "detached"
/// m_n = 0.1                 # non-target margin
/// nontarget_form = "angular"  # "angular": cos(max(θ − m_n, 0)) | "additive": cos θ + m_n
/// out_weight = "inverse_batch"  # or a number ω ≥ 0
/// same_class_out = false
/// out_gradient = "detached" # out-sample sums as constants | "live"
/// term1_weight = 0.5
/// term2_weight = 0.5
/// [head.pairwise]
/// rate = 0.2
/// min_count = 2
/// detach = true
/// self_pair = "keep_prototype"  # | "drop"
/// seed = 0
/// ```
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GceConfig {
    /// Logit scale `s`. Default 64.
    #[serde(default = "default_s")]
    pub s: f64,
    /// Target margin `m_t`: radians for `angular` (in `[0, π)`), a cosine offset for
    /// `additive` (in `[0, 2)`). Default 0.5.
    #[serde(default = "default_m_t")]
    pub m_t: f64,
    /// Form of the target margin. Default `"angular"` (ArcFace).
    #[serde(default = "default_angular")]
    pub target_form: MarginForm,
    /// Gradient treatment of the angular target margin, as for ArcFace. Default `"exact"`.
    #[serde(default)]
    pub gradient: ArcFaceGradient,
    /// Non-target margin `m_n` (radians for `angular`, in `[0, π)`; a cosine offset for
    /// `additive`, in `[0, 2)`). Default 0.1 (SPEC 5 suggests 0.05–0.2).
    #[serde(default = "default_m_n")]
    pub m_n: f64,
    /// Form of the non-target margin. Default `"angular"`.
    #[serde(default = "default_angular")]
    pub nontarget_form: MarginForm,
    /// Weight `ω` of the out-sample terms: `"inverse_batch"` (`1/(B − 1)`, default) or a number
    /// `≥ 0`.
    #[serde(default)]
    pub out_weight: OutWeight,
    /// Count the *other samples of the anchor's own class* as out-samples too (their non-targets
    /// and targets). Default false (SPEC 5: out-samples are samples of other classes).
    #[serde(default)]
    pub same_class_out: bool,
    /// Gradient through the out-sample sums: `"detached"` (default) or `"live"`
    /// ([`OutGradient`]).
    #[serde(default)]
    pub out_gradient: OutGradient,
    /// Weight `w1` of term 1 (targets above all negatives). Default 0.5.
    #[serde(default = "default_half")]
    pub term1_weight: f64,
    /// Weight `w2` of term 2 (non-targets below all positives). Default 0.5.
    #[serde(default = "default_half")]
    pub term2_weight: f64,
    /// The pairwise framework (prototype replacement).
    #[serde(default)]
    pub pairwise: PairwiseConfig,
}

fn default_s() -> f64 {
    64.0
}
fn default_m_t() -> f64 {
    0.5
}
fn default_m_n() -> f64 {
    0.1
}
fn default_half() -> f64 {
    0.5
}
fn default_angular() -> MarginForm {
    MarginForm::Angular
}

impl Default for GceConfig {
    fn default() -> Self {
        Self {
            s: default_s(),
            m_t: default_m_t(),
            target_form: MarginForm::Angular,
            gradient: ArcFaceGradient::default(),
            m_n: default_m_n(),
            nontarget_form: MarginForm::Angular,
            out_weight: OutWeight::default(),
            same_class_out: false,
            out_gradient: OutGradient::Detached,
            term1_weight: default_half(),
            term2_weight: default_half(),
            pairwise: PairwiseConfig::default(),
        }
    }
}

fn check_margin(key: &str, m: f64, form: MarginForm) -> Result<()> {
    let hi = match form {
        MarginForm::Angular => std::f64::consts::PI,
        MarginForm::Additive => 2.0,
    };
    ensure!(
        m.is_finite() && (0.0..hi).contains(&m),
        "{key} must be in [0, {hi}) for the {form:?} form, got {m}"
    );
    Ok(())
}

impl GceConfig {
    /// Checks every value; the error starts with the field, e.g. `m_n must be in [0, 2) ...`.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.s.is_finite() && self.s > 0.0,
            "s must be finite and > 0, got {}",
            self.s
        );
        check_margin("m_t", self.m_t, self.target_form)?;
        check_margin("m_n", self.m_n, self.nontarget_form)?;
        ensure!(
            self.nontarget_form == MarginForm::Additive || self.m_n == 0.0 || self.m_n >= 1e-3,
            "m_n must be 0 or >= 1e-3 for the angular non-target form, got {}",
            self.m_n
        );
        if let OutWeight::Value(w) = self.out_weight {
            ensure!(
                w.is_finite() && w >= 0.0,
                "out_weight must be \"inverse_batch\" or a finite number >= 0, got {w}"
            );
        }
        for (key, w) in [
            ("term1_weight", self.term1_weight),
            ("term2_weight", self.term2_weight),
        ] {
            ensure!(
                w.is_finite() && w >= 0.0,
                "{key} must be finite and >= 0, got {w}"
            );
        }
        ensure!(
            self.term1_weight + self.term2_weight > 0.0,
            "term1_weight or term2_weight must be > 0 (both are 0)"
        );
        let r = self.pairwise.rate;
        ensure!(
            (0.0..=1.0).contains(&r),
            "pairwise.rate must be in [0, 1], got {r}"
        );
        ensure!(
            self.pairwise.min_count >= 1,
            "pairwise.min_count must be >= 1"
        );
        Ok(())
    }
}

/// One step's prototype replacements: column `classes[r]` of the cosine matrix is replaced by
/// the similarities to the feature of batch sample `samples[r]` (a sample of that class).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replacement {
    /// Column positions in the cosine matrix (class ids, or Partial FC's remapped labels),
    /// ascending, distinct.
    pub classes: Vec<i64>,
    /// The batch row whose feature replaces each class's prototype.
    pub samples: Vec<i64>,
    /// `(row, r)`: another row holding the same image as `samples[r]` (a P x K batch repeats the
    /// images of an identity with fewer than K). It is treated as `samples[r]` itself is, by
    /// [`SelfPair`]: an image is never paired with a copy of itself. Empty when every row is a
    /// distinct image.
    pub copies: Vec<(i64, usize)>,
}

impl Replacement {
    /// True when nothing is replaced.
    pub fn is_empty(&self) -> bool {
        self.classes.is_empty()
    }
}

/// The GCE loss with bilateral margins and the pairwise framework; owns the replacement draw.
///
/// # Use in a training step
/// ```no_run
/// # use facerec_loss_heads::{CosineClassifier, Gce, GceConfig};
/// # use tch::{nn, Device, Kind, Tensor};
/// # let vs = nn::VarStore::new(Device::Cpu);
/// # let classifier = CosineClassifier::new(&vs.root(), 1000, 512);
/// # let emb_bd = Tensor::randn([32, 512], (Kind::Float, Device::Cpu));
/// # let labels_b = Tensor::randint(1000, [32], (Kind::Int64, Device::Cpu));
/// let mut gce = Gce::new(&GceConfig::default());
/// gce.set_step(0); // once per iteration, before the draw
/// let cos_bc = classifier.cosines(&emb_bd);
/// let loss = gce.step_loss(&cos_bc, &labels_b, &emb_bd);
/// loss.backward();
/// ```
#[derive(Debug, Clone)]
pub struct Gce {
    cfg: GceConfig,
    angular: AngularMargin,
    cos_mn: f64,
    sin_mn: f64,
    rng: ChaCha8Rng,
    /// Dataset indices of the rows of the next batches ([`MarginHead::set_batch_images`]).
    images: Option<Vec<usize>>,
}

impl Gce {
    /// Builds the loss from a config.
    ///
    /// # Panics
    /// If [`GceConfig::validate`] fails: validate configs when they are parsed.
    pub fn new(cfg: &GceConfig) -> Self {
        if let Err(e) = cfg.validate() {
            panic!("Gce::new on an invalid config: {e:#}");
        }
        Self {
            cfg: cfg.clone(),
            angular: AngularMargin::fixed(cfg.m_t, cfg.gradient),
            cos_mn: cfg.m_n.cos(),
            sin_mn: cfg.m_n.sin(),
            rng: ChaCha8Rng::seed_from_u64(cfg.pairwise.seed),
            images: None,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &GceConfig {
        &self.cfg
    }

    /// Moves the replacement generator to the stream of `step`: the draw of a step depends only
    /// on `(seed, step, labels)`, so a resumed run draws what an uninterrupted one would.
    pub fn set_step(&mut self, step: u64) {
        self.rng = ChaCha8Rng::seed_from_u64(self.cfg.pairwise.seed);
        self.rng.set_stream(step);
    }

    /// Draws this step's replacements, every row a distinct image:
    /// [`Gce::draw_replacement_for_images`] without image indices.
    ///
    /// # Shapes
    /// `labels_b [B]` (Int64, the column positions of the cosine matrix) -> [`Replacement`].
    ///
    /// # Panics
    /// If `labels_b` is not a 1-D Int64 tensor.
    pub fn draw_replacement(&mut self, labels_b: &Tensor) -> Replacement {
        self.draw_replacement_for_images(labels_b, None)
    }

    /// Draws this step's replacements. Classes are visited in ascending order; for every class
    /// with at least `min_count` *distinct images* in the batch, one uniform `u` and one uniform
    /// index into those images (in order of first appearance) are drawn, and the class is
    /// replaced by that image's feature when `u < rate`. The other rows holding the picked image
    /// become [`Replacement::copies`]. `images` gives each row's dataset index; `None` means every
    /// row is a distinct image (then the draws equal those of a batch with distinct indices).
    ///
    /// Reads the labels on the CPU (one device sync when they live on a GPU).
    ///
    /// # Shapes
    /// `labels_b [B]` (Int64, the column positions of the cosine matrix), `images` `B` indices
    /// -> [`Replacement`].
    ///
    /// # Panics
    /// If `labels_b` is not a 1-D Int64 tensor, or `images` does not have `B` entries.
    pub fn draw_replacement_for_images(
        &mut self,
        labels_b: &Tensor,
        images: Option<&[usize]>,
    ) -> Replacement {
        assert_eq!(labels_b.kind(), Kind::Int64, "labels must be Int64");
        assert_eq!(labels_b.dim(), 1, "labels must be [B]");
        let pw = &self.cfg.pairwise;
        if pw.rate == 0.0 {
            return Replacement::default();
        }
        let labels = Vec::<i64>::try_from(labels_b.to_device(Device::Cpu)).expect("labels");
        if let Some(images) = images {
            assert_eq!(
                images.len(),
                labels.len(),
                "one image index per row: {} indices for B = {}",
                images.len(),
                labels.len()
            );
        }
        let image = |row: usize| images.map_or(row, |im| im[row]);
        let mut members: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
        for (row, &y) in labels.iter().enumerate() {
            members.entry(y).or_default().push(row);
        }
        let mut out = Replacement::default();
        for (class, rows) in members {
            // The first row of each distinct image of the class.
            let mut distinct: Vec<usize> = Vec::with_capacity(rows.len());
            for &row in &rows {
                if distinct.iter().all(|&d| image(d) != image(row)) {
                    distinct.push(row);
                }
            }
            if distinct.len() < pw.min_count {
                continue;
            }
            let u: f64 = self.rng.gen();
            let pick = distinct[self.rng.gen_range(0..distinct.len())];
            if u < pw.rate {
                let r = out.classes.len();
                out.classes.push(class);
                out.samples.push(pick as i64);
                let copies = rows
                    .iter()
                    .filter(|&&row| row != pick && image(row) == image(pick));
                out.copies.extend(copies.map(|&row| (row as i64, r)));
            }
        }
        out
    }

    /// Applies `replacement` to the cosine matrix: `S[:, c_r] = clamp(x̂ x̂_{j_r}ᵀ, −1, 1)`
    /// (with `x̂_{j_r}` detached if configured), except the self-pair entries `S[j_r, c_r]` and
    /// `S[k, c_r]` for every copy `k` of image `j_r` ([`Replacement::copies`]), which keep the
    /// original prototype similarity. Returns the new matrix and the per-sample validity weights
    /// (all 1, except 0 for the replacing samples and their copies under [`SelfPair::Drop`]).
    ///
    /// # Shapes
    /// `cos_bc [B, C]`, `emb_bd [B, D]` (raw or normalised embeddings; they are normalised
    /// here) -> (`[B, C]`, `valid_b [B]`), both of `cos_bc`'s kind.
    ///
    /// # Panics
    /// If the batch sizes disagree or an index of `replacement` is out of range.
    pub fn replace_prototypes(
        &self,
        cos_bc: &Tensor,
        emb_bd: &Tensor,
        replacement: &Replacement,
    ) -> (Tensor, Tensor) {
        let (b, _) = cos_bc.size2().expect("cos_bc must be [B, C]");
        let (be, _) = emb_bd.size2().expect("emb_bd must be [B, D]");
        assert_eq!(b, be, "cos_bc and emb_bd disagree on B");
        assert_eq!(
            replacement.classes.len(),
            replacement.samples.len(),
            "replacement classes and samples differ in length"
        );
        let kind = cos_bc.kind();
        let device = cos_bc.device();
        let mut valid_b = Tensor::ones([b], (kind, device));
        if replacement.is_empty() {
            return (cos_bc.shallow_clone(), valid_b);
        }
        let r = replacement.classes.len();
        assert!(
            replacement.copies.iter().all(|&(_, k)| k < r),
            "a copy refers to no replacement"
        );
        let classes_r = Tensor::from_slice(&replacement.classes).to_device(device);
        let samples_r = Tensor::from_slice(&replacement.samples).to_device(device);
        // Self pairs: (row, replacement) for every replacing sample and every copy of it.
        let (self_rows, self_cols): (Vec<i64>, Vec<i64>) = (0..r)
            .map(|k| (replacement.samples[k], k as i64))
            .chain(replacement.copies.iter().map(|&(row, k)| (row, k as i64)))
            .unzip();
        let self_rows = Tensor::from_slice(&self_rows).to_device(device);
        let self_cols = Tensor::from_slice(&self_cols).to_device(device);
        let x_bd = normalize_rows(emb_bd);
        let feats_rd = x_bd.index_select(0, &samples_r);
        let feats_rd = if self.cfg.pairwise.detach {
            feats_rd.detach()
        } else {
            feats_rd
        };
        let pair_br = x_bd.matmul(&feats_rd.tr()).clamp(-1.0, 1.0).to_kind(kind);
        let pair_br = match self.cfg.pairwise.self_pair {
            SelfPair::KeepPrototype => {
                let own = cos_bc.index(&[
                    Some(&self_rows),
                    Some(&classes_r.index_select(0, &self_cols)),
                ]);
                pair_br.index_put(&[Some(&self_rows), Some(&self_cols)], &own, false)
            }
            SelfPair::Drop => {
                let _ = valid_b.index_fill_(0, &self_rows, 0.0);
                pair_br
            }
        };
        (cos_bc.index_copy(1, &classes_r, &pair_br), valid_b)
    }

    /// Draws this step's replacements and returns the GCE loss: the one call a trainer needs.
    /// With `rate = 0` no draw is made and `emb_bd` is unused. The rows' images are those given
    /// to the last [`MarginHead::set_batch_images`] (never called: every row a distinct image).
    ///
    /// # Shapes
    /// `cos_bc [B, C]` (clamped cosines, e.g. [`crate::CosineClassifier::cosines`] or
    /// `cosines_sampled`), `labels_b [B]` (Int64, column positions), `emb_bd [B, D]` -> scalar.
    ///
    /// # Panics
    /// As [`Gce::loss`] and [`Gce::replace_prototypes`].
    pub fn step_loss(&mut self, cos_bc: &Tensor, labels_b: &Tensor, emb_bd: &Tensor) -> Tensor {
        let images = self.images.take();
        let rep = self.draw_replacement_for_images(labels_b, images.as_deref());
        self.images = images;
        if rep.is_empty() {
            return self.loss(cos_bc, labels_b);
        }
        self.loss_with_replacement(cos_bc, labels_b, emb_bd, &rep)
    }

    /// GCE over a class matrix split across ranks (model-parallel): [`Gce::step_loss`] of the
    /// gathered batch when each rank holds the cosines `cos_local` of the batch against its own
    /// class columns (its block, or its Partial FC sample of it), as for
    /// [`crate::sharded_cross_entropy`].
    ///
    /// The global terms: the target similarity `t_i` comes from its owning rank (one all-reduce);
    /// `ℓ_k = log Σ_{c≠y_k} e^{s ñ_kc}` is reduced across ranks (max, then sum of exponentials);
    /// everything after (the `[B, B]` out-sample sums, the softplus terms, the mean) needs only
    /// the `B` values `t̃` and `ℓ` and the labels and is computed identically on every rank. The
    /// replacement is drawn from the global labels (the same draw on every rank as in one process);
    /// the owner of a replaced class replaces its column. The value is the global loss on every
    /// rank; the gradient is this rank's share (exact for its class rows; summed over ranks,
    /// the gradient w.r.t. the gathered embeddings). Reads the local labels on the CPU.
    ///
    /// # Shapes
    /// `cos_local [B, C']` (f32/f64), `local_labels [B]` (Int64, column in `cos_local` or −1),
    /// `labels_b [B]` (Int64, the global classes of the gathered batch), `emb_bd [B, D]` (the
    /// gathered embeddings) -> scalar.
    ///
    /// # Errors
    /// On malformed inputs, a row owned by no rank or by several, and a failing collective.
    pub fn sharded_step_loss(
        &mut self,
        cos_local: &Tensor,
        local_labels: &Tensor,
        labels_b: &Tensor,
        emb_bd: &Tensor,
        comm: &dyn Collectives,
    ) -> Result<Tensor> {
        let (b, c_local) = cos_local
            .size2()
            .context("GCE: cos_local must be [B, C']")?;
        let kind = cos_local.kind();
        ensure!(
            matches!(kind, Kind::Float | Kind::Double),
            "GCE: cos_local must be f32 or f64, got {kind:?}"
        );
        ensure!(
            local_labels.kind() == Kind::Int64
                && local_labels.size() == [b]
                && labels_b.kind() == Kind::Int64
                && labels_b.size() == [b],
            "GCE: local and global labels must be Int64 [{b}]"
        );
        let device = cos_local.device();
        let local = Vec::<i64>::try_from(local_labels.to_device(Device::Cpu))
            .context("GCE: local labels")?;
        ensure!(
            local.iter().all(|&l| (-1..c_local).contains(&l)),
            "GCE: a local label is outside [-1, {c_local}) on rank {}",
            comm.rank()
        );
        let images = self.images.take();
        let rep = self.draw_replacement_for_images(labels_b, images.as_deref());
        self.images = images;
        let (cos, valid_b) = if rep.is_empty() {
            (cos_local.shallow_clone(), None)
        } else {
            // This rank's part of the draw: the replaced classes it owns, at their columns.
            let mut mine = Replacement::default();
            let mut renumber = vec![None; rep.classes.len()];
            for (k, &j) in rep.samples.iter().enumerate() {
                let col = local[j as usize];
                if col >= 0 {
                    renumber[k] = Some(mine.classes.len());
                    mine.classes.push(col);
                    mine.samples.push(j);
                }
            }
            mine.copies = rep
                .copies
                .iter()
                .filter_map(|&(row, k)| renumber[k].map(|k2| (row, k2)))
                .collect();
            let (cos, _) = self.replace_prototypes(cos_local, emb_bd, &mine);
            // Validity from the whole draw, the same on every rank.
            let mut valid = vec![1.0f64; b as usize];
            if self.cfg.pairwise.self_pair == SelfPair::Drop {
                let rows = rep.samples.iter().chain(rep.copies.iter().map(|(r, _)| r));
                rows.for_each(|&r| valid[r as usize] = 0.0);
            }
            let valid = Tensor::from_slice(&valid).to_kind(kind).to_device(device);
            (cos, Some(valid))
        };
        let owned_b1 = local_labels.ge(0).view([b, 1]);
        let owned_f = owned_b1.to_kind(kind);
        let idx_b1 = local_labels.clamp_min(0).view([b, 1]);
        let own_b1 = if c_local > 0 {
            cos.gather(1, &idx_b1, false) * &owned_f
        } else {
            Tensor::zeros([b, 1], (kind, device))
        };
        let both = comm
            .all_reduce_sum(&Tensor::cat(&[own_b1.detach(), owned_f.shallow_clone()], 1))
            .context("GCE: all-reduce of the target similarities")?;
        let misowned = tch::no_grad(|| {
            both.narrow(1, 1, 1)
                .ne(1.0)
                .sum(Kind::Int64)
                .int64_value(&[])
        });
        ensure!(
            misowned == 0,
            "GCE: {misowned} of {b} rows have no owning rank or several"
        );
        let t_b1 = &own_b1 + both.narrow(1, 0, 1).detach() * (1.0 - &owned_f);
        let neg_st_b = (self.target_margin(&t_b1) * (-self.cfg.s)).view([b]);
        let ell_b = self.row_log_sum_exp_across(&cos, &idx_b1, Some(&owned_b1), Some(comm))?;
        let (l1_b, l2_b) = self.combine_terms(&neg_st_b, &ell_b, labels_b, valid_b.as_ref());
        Ok(self.mean_of_terms(l1_b, l2_b, valid_b.as_ref()))
    }

    /// The GCE loss after the given replacements (see [`Gce::replace_prototypes`]).
    ///
    /// # Shapes
    /// `cos_bc [B, C]`, `labels_b [B]` (Int64), `emb_bd [B, D]` -> scalar.
    ///
    /// # Panics
    /// As [`Gce::loss`] and [`Gce::replace_prototypes`].
    pub fn loss_with_replacement(
        &self,
        cos_bc: &Tensor,
        labels_b: &Tensor,
        emb_bd: &Tensor,
        replacement: &Replacement,
    ) -> Tensor {
        let (cos_bc, valid_b) = self.replace_prototypes(cos_bc, emb_bd, replacement);
        self.loss_masked(&cos_bc, labels_b, Some(&valid_b))
    }

    /// The GCE loss without replacement.
    ///
    /// Computed in f64 for f64 cosines and in f32 otherwise (f16/bf16 are upcast).
    ///
    /// # Shapes
    /// `cos_bc [B, C]` (clamped cosines, `C ≥ 2`), `labels_b [B]` (Int64) -> scalar.
    ///
    /// # Panics
    /// If the shapes disagree, `labels_b` is not Int64 or a label is outside `[0, C)`.
    pub fn loss(&self, cos_bc: &Tensor, labels_b: &Tensor) -> Tensor {
        self.loss_masked(cos_bc, labels_b, None)
    }

    /// The per-sample terms `(L1_b, L2_b)` (see the module docs), each `[B]`.
    ///
    /// `valid_b` (0/1, `[B]`) marks samples whose target takes part (see [`SelfPair::Drop`]);
    /// invalid samples' terms are still returned but must be left out of the mean.
    ///
    /// # Shapes
    /// `cos_bc [B, C]`, `labels_b [B]` (Int64), `valid_b [B]` -> (`[B]`, `[B]`).
    ///
    /// # Panics
    /// As [`Gce::loss`].
    pub fn terms(
        &self,
        cos_bc: &Tensor,
        labels_b: &Tensor,
        valid_b: Option<&Tensor>,
    ) -> (Tensor, Tensor) {
        let b = crate::head::check_head_inputs(cos_bc, labels_b);
        let cos_bc = match cos_bc.kind() {
            Kind::Double | Kind::Float => cos_bc.shallow_clone(),
            _ => cos_bc.to_kind(Kind::Float),
        };
        let s = self.cfg.s;
        let idx_b1 = labels_b.view([b, 1]);
        let t_b1 = cos_bc.gather(1, &idx_b1, false);
        // −s·t̃, [B].
        let neg_st_b = (self.target_margin(&t_b1) * (-s)).view([b]);
        // ℓ_k = log Σ_{c≠y_k} e^{s ñ_kc} (see `row_log_sum_exp`).
        let ell_b = self.row_log_sum_exp(&cos_bc, &idx_b1);
        self.combine_terms(&neg_st_b, &ell_b, labels_b, valid_b)
    }

    /// `(L1_b, L2_b)` from `−s·t̃` and `ℓ` (each `[B]`), the rows' classes (for the out-sample
    /// sets: any ids, equal exactly for equal classes) and the validity weights.
    fn combine_terms(
        &self,
        neg_st_b: &Tensor,
        ell_b: &Tensor,
        labels_b: &Tensor,
        valid_b: Option<&Tensor>,
    ) -> (Tensor, Tensor) {
        let b = neg_st_b.size()[0];
        let kind = neg_st_b.kind();
        let device = neg_st_b.device();
        let omega = self.cfg.out_weight.value(b);
        let (a_b, g_b) = if omega == 0.0 {
            // No out-sample terms: both terms are the margin-softmax cross-entropy.
            (ell_b.shallow_clone(), neg_st_b.shallow_clone())
        } else if self.cfg.out_gradient == OutGradient::Detached {
            // The anchor's own entry (the diagonal) live, the out-samples' sums as constants:
            // log(e^{x_i} + Σ_{k∈O(i)} ω e^{detach(x_k)}).
            let eye = Tensor::eye(b, (Kind::Bool, device));
            let logw1_bb = self
                .log_weights(labels_b, omega, kind)
                .masked_fill(&eye, f64::NEG_INFINITY);
            let out1_b = (&logw1_bb + ell_b.detach().view([1, b])).logsumexp([1], false);
            let logw2_bb = match valid_b {
                Some(v) => logw1_bb.masked_fill(&v.eq(0.0).view([1, b]), f64::NEG_INFINITY),
                None => logw1_bb,
            };
            let out2_b = (logw2_bb + neg_st_b.detach().view([1, b])).logsumexp([1], false);
            (ell_b.logaddexp(&out1_b), neg_st_b.logaddexp(&out2_b))
        } else {
            let logw1_bb = self.log_weights(labels_b, omega, kind);
            let a_b = (&logw1_bb + ell_b.view([1, b])).logsumexp([1], false);
            let logw2_bb = match valid_b {
                // Invalid samples' targets leave the out-sample targets; the diagonal stays 0 so
                // every row keeps a finite entry.
                Some(v) => {
                    let eye = Tensor::eye(b, (Kind::Bool, device));
                    let drop = v.eq(0.0).view([1, b]).logical_and(&eye.logical_not());
                    logw1_bb.masked_fill(&drop, f64::NEG_INFINITY)
                }
                None => logw1_bb,
            };
            let g_b = (logw2_bb + neg_st_b.view([1, b])).logsumexp([1], false);
            (a_b, g_b)
        };
        let l1_b = softplus(&(a_b + neg_st_b));
        let l2_b = softplus(&(ell_b + g_b));
        (l1_b, l2_b)
    }

    fn loss_masked(&self, cos_bc: &Tensor, labels_b: &Tensor, valid_b: Option<&Tensor>) -> Tensor {
        let (l1_b, l2_b) = self.terms(cos_bc, labels_b, valid_b);
        self.mean_of_terms(l1_b, l2_b, valid_b)
    }

    /// `(1/|valid|) Σ_i valid_i·(w1·L1_i + w2·L2_i)` (the plain mean without `valid_b`).
    fn mean_of_terms(&self, l1_b: Tensor, l2_b: Tensor, valid_b: Option<&Tensor>) -> Tensor {
        let per_b = l1_b * self.cfg.term1_weight + l2_b * self.cfg.term2_weight;
        match valid_b {
            Some(v) => {
                let kind = per_b.kind();
                let v = v.to_kind(kind);
                // Never divide by 0: with no valid sample the loss is 0.
                (per_b * &v).sum(kind) / v.sum(kind).clamp_min(1.0)
            }
            None => per_b.mean(per_b.kind()),
        }
    }

    /// `[B, B]` log-weights of anchor `i` (row) over sample `k` (column): 0 on the diagonal,
    /// `ln ω` for out-samples, `−∞` otherwise.
    fn log_weights(&self, labels_b: &Tensor, omega: f64, kind: Kind) -> Tensor {
        let b = labels_b.size()[0];
        let device = labels_b.device();
        let eye = Tensor::eye(b, (Kind::Bool, device));
        let out_bb = if self.cfg.same_class_out {
            eye.logical_not()
        } else {
            labels_b.view([b, 1]).ne_tensor(&labels_b.view([1, b]))
        };
        Tensor::full([b, b], f64::NEG_INFINITY, (kind, device))
            .masked_fill(&out_bb, omega.ln())
            .masked_fill(&eye, 0.0)
    }

    /// `t̃`: the margin-penalised target similarity.
    ///
    /// # Shapes
    /// `t_b1 [B, 1]` -> `[B, 1]`.
    pub fn target_margin(&self, t_b1: &Tensor) -> Tensor {
        match self.cfg.target_form {
            MarginForm::Additive => t_b1 - self.cfg.m_t,
            MarginForm::Angular => self.angular.target(t_b1),
        }
    }

    /// `s·ñ` over the whole matrix, with `−∞` at each row's target entry (so that
    /// `logsumexp` over a row is `ℓ_k`).
    ///
    /// Additive: `s·c + s·m_n`, written in place into `s·c` (autograd saves nothing of a product
    /// with a scalar, so the in-place writes are safe, as in [`crate::scaled_targets`]).
    ///
    /// Angular: `cos(max(θ − m_n, 0))` is `1` for `c ≥ cos m_n` and
    /// `c·cos m_n + sin θ·sin m_n` below (`sin θ = sqrt(1 − c²)`, `c` clamped at `−1 + 1e-7`);
    /// the two pieces meet continuously at `c = cos m_n`. The transform is evaluated
    /// under `no_grad` together with its derivative `f′(c)`, and autograd sees only its tangent
    /// `z = c·s f′(c) + s(f(c) − c f′(c))` (both factors constants): the same value and the same
    /// gradient `s f′(c)` as differentiating the elementwise chain, with one saved `[B, C]` tensor
    /// and one backward pass instead of a dozen.
    ///
    /// # Shapes
    /// `cos_bc [B, C]`, `idx_b1 [B, 1]` (Int64 labels) -> `[B, C]`.
    pub fn masked_nontarget_logits(&self, cos_bc: &Tensor, idx_b1: &Tensor) -> Tensor {
        let s = self.cfg.s;
        let m = self.cfg.m_n;
        let mut z = if m == 0.0 {
            cos_bc * s
        } else {
            match self.cfg.nontarget_form {
                MarginForm::Additive => {
                    let mut z = cos_bc * s;
                    let _ = z.g_add_scalar_(s * m);
                    z
                }
                MarginForm::Angular => {
                    let (slope, intercept) = tch::no_grad(|| self.angular_tangent(cos_bc));
                    let mut z = cos_bc * slope;
                    let _ = z.g_add_(&intercept);
                    z
                }
            }
        };
        let _ = z.scatter_value_(1, idx_b1, f64::NEG_INFINITY);
        z
    }

    /// `ℓ_k = log Σ_{c≠y_k} e^{s ñ_kc}` as a differentiable `[B]` tensor, built from one fused
    /// no-grad pass and one linear autograd node.
    ///
    /// Under `no_grad`, one `[B, C]` buffer holds in turn `s ñ` (target at `−∞`), the
    /// max-shifted exponentials, the softmax weights `P` over the non-targets, and
    /// `G = P·∂(s ñ)/∂c`. This gives `ℓ` exactly as `logsumexp` computes it, and its gradient
    /// `∂ℓ_k/∂c_kj = G_kj`. Autograd then sees only `ℓ + (Σ_j c_kj G_kj − detach(same))`, one
    /// batched dot product: the same value (up to one rounding) and the same first-order
    /// gradient as differentiating `logsumexp(s ñ)`. Torch's `logsumexp` allocates about five
    /// `[B, C]` tensors in its forward and backward; this needs one buffer plus the gradient.
    /// Second derivatives through `ℓ` are not available (not needed for training).
    ///
    /// # Shapes
    /// `cos_bc [B, C]`, `idx_b1 [B, 1]` (Int64 labels) -> `[B]`.
    fn row_log_sum_exp(&self, cos_bc: &Tensor, idx_b1: &Tensor) -> Tensor {
        self.row_log_sum_exp_across(cos_bc, idx_b1, None, None)
            .expect("no collective, nothing to fail")
    }

    /// [`Gce::row_log_sum_exp`] over a column block of the class matrix: `owned_b1` (`[B, 1]`
    /// bool) marks the rows whose target is a column of `cos_bc` (every column of the other rows
    /// is a non-target), and the row max and the row sum of exponentials are reduced across
    /// `comm`'s ranks. The returned `ℓ` is the global one; its gradient is this block's share
    /// (the `G` of this block's columns, normalised by the global sum).
    fn row_log_sum_exp_across(
        &self,
        cos_bc: &Tensor,
        idx_b1: &Tensor,
        owned_b1: Option<&Tensor>,
        comm: Option<&dyn Collectives>,
    ) -> Result<Tensor> {
        let s = self.cfg.s;
        let m = self.cfg.m_n;
        let kind = cos_bc.kind();
        let (b, c) = cos_bc.size2().expect("cos_bc must be [B, C]");
        let (ell_b, g_bc) = tch::no_grad(|| -> Result<(Tensor, Tensor)> {
            let (mut z, slope) = if m != 0.0 && self.cfg.nontarget_form == MarginForm::Angular {
                let (slope, intercept) = self.angular_tangent(cos_bc);
                let mut z = cos_bc * &slope;
                let _ = z.g_add_(&intercept);
                (z, Some(slope))
            } else {
                let mut z = cos_bc * s;
                if m != 0.0 {
                    let _ = z.g_add_scalar_(s * m);
                }
                (z, None)
            };
            match owned_b1 {
                None => {
                    let _ = z.scatter_value_(1, idx_b1, f64::NEG_INFINITY);
                }
                Some(owned) if c > 0 => {
                    let mask =
                        Tensor::zeros([b, c], (Kind::Bool, z.device())).scatter(1, idx_b1, owned);
                    let _ = z.masked_fill_(&mask, f64::NEG_INFINITY);
                }
                Some(_) => {}
            }
            let local_max = if c > 0 {
                z.amax([1], true)
            } else {
                Tensor::full([b, 1], f64::NEG_INFINITY, (kind, z.device()))
            };
            let max_b1 = match comm {
                Some(k) => k.all_reduce_max(&local_max).context("GCE: row maxima")?,
                None => local_max,
            };
            let _ = z.g_sub_(&max_b1).exp_();
            let local_sum = z.sum_dim_intlist(1, true, kind);
            let sum_b1 = match comm {
                Some(k) => k
                    .all_reduce_sum(&local_sum)
                    .context("GCE: exponential sums")?,
                None => local_sum,
            };
            let ell_b = (sum_b1.log() + max_b1).view([-1]);
            let _ = z.g_div_(&sum_b1);
            match slope {
                Some(slope) => {
                    let _ = z.g_mul_(&slope);
                }
                None => {
                    let _ = z.g_mul_scalar_(s);
                }
            }
            Ok((ell_b, z))
        })?;
        let lin_b = cos_bc.view([b, 1, c]).bmm(&g_bc.view([b, c, 1])).view([b]);
        Ok(&lin_b - lin_b.detach() + ell_b)
    }

    /// `(s f′(c), s (f(c) − c f′(c)))` of the angular non-target transform `f` (no autograd).
    ///
    /// With `u = clamp(c, −1 + eps, cos m)` and `sin θ = sqrt(1 − u²)`: `f(u) = u cos m +
    /// sin θ sin m`, `f′(u) = cos m − sin m·u/sin θ`, and the intercept simplifies to
    /// `f − u f′ = sin m / sin θ`. At the upper clamp `u = cos m` these are exactly `f′ = 0` and
    /// intercept 1, i.e. `f = 1` with zero slope for every `c ≥ cos m`, so the piecewise
    /// definition needs no mask there. Below `−1 + eps` (only `c` in `[−1, −1 + 1e-7)`) the value
    /// is frozen at `f(−1 + eps)` with zero slope, as `cos(acos(clamp(c)) − m)` would be.
    /// `1 − u² ≥ min(sin² m, 2e-7) > 0`, so no
    /// further guard is needed (validation keeps an angular `m_n` at 0 or ≥ 1e-3).
    fn angular_tangent(&self, cos_bc: &Tensor) -> (Tensor, Tensor) {
        let s = self.cfg.s;
        let (cm, sm) = (self.cos_mn, self.sin_mn);
        let u = cos_bc.clamp(-1.0 + COS_EPS, cm);
        // r = 1 / sin θ.
        let mut r = u.square();
        let _ = r.neg_().g_add_scalar_(1.0).rsqrt_();
        let mut slope = &u * &r;
        let _ = slope.g_mul_scalar_(-s * sm).g_add_scalar_(s * cm);
        let _ = r.g_mul_scalar_(s * sm);
        // Below the lower clamp: f = f(−1 + eps), constant (as acos of the clamped cosine).
        let low = cos_bc.lt(-1.0 + COS_EPS);
        let u0 = -1.0 + COS_EPS;
        let f0 = u0 * cm + (1.0 - u0 * u0).sqrt() * sm;
        let _ = slope.masked_fill_(&low, 0.0);
        let _ = r.masked_fill_(&low, s * f0);
        (slope, r)
    }
}

/// GCE as a [`MarginHead`], so a trainer can hold it next to the other heads:
/// [`MarginHead::training_loss`] is [`Gce::step_loss`] (draw + GCE), [`MarginHead::set_step`]
/// moves the replacement stream, and [`MarginHead::logits`] gives the bilateral-margin logits (`s t̃` at the
/// target, `s ñ` elsewhere), whose cross-entropy is GCE at `ω = 0` without replacement.
impl MarginHead for Gce {
    /// # Shapes
    /// `cos_bc [B, C]`, `labels_b [B]` (Int64) -> `[B, C]`.
    fn logits(&self, cos_bc: &Tensor, labels_b: &Tensor) -> Tensor {
        let b = crate::head::check_head_inputs(cos_bc, labels_b);
        let idx_b1 = labels_b.view([b, 1]);
        let target_b1 = self.target_margin(&cos_bc.gather(1, &idx_b1, false)) * self.cfg.s;
        let mut z = self.masked_nontarget_logits(cos_bc, &idx_b1);
        let _ = z.scatter_(1, &idx_b1, &target_b1);
        z
    }

    fn set_step(&mut self, step: u64) {
        Gce::set_step(self, step);
    }

    /// False: GCE's loss is not the cross-entropy of [`MarginHead::logits`] (use
    /// [`Gce::step_loss`], or [`Gce::sharded_step_loss`] across ranks).
    fn loss_is_cross_entropy(&self) -> bool {
        false
    }

    /// Kept for every following [`Gce::step_loss`] (until the next call), so that a copy of the
    /// replacing image is treated as its self pair ([`Replacement::copies`]).
    fn set_batch_images(&mut self, images: &[usize]) {
        self.images = Some(images.to_vec());
    }

    /// # Shapes
    /// `cos_bc [B, C]`, `labels_b [B]` (Int64), `emb_bd [B, D]`, `norms_b [B]` (unused) -> scalar.
    fn training_loss(
        &mut self,
        cos_bc: &Tensor,
        labels_b: &Tensor,
        emb_bd: &Tensor,
        _norms_b: &Tensor,
    ) -> Tensor {
        self.step_loss(cos_bc, labels_b, emb_bd)
    }
}

/// `log(1 + e^x)`, exact and stable for any `x` (`logaddexp(x, 0)`).
fn softplus(x: &Tensor) -> Tensor {
    x.logaddexp(&x.zeros_like())
}
