//! Face recognition backbones (iResNet, MobileFaceNet, ViT) with arcface_torch parameter names.
//!
//! This file owns the model configuration (`[model]` in TOML, an internally tagged enum), the entry
//! point [`build`], the [`Backbone`] module, and the layers both networks share: a PyTorch-faithful
//! [`BatchNorm`] (weight 1, bias 0, `num_batches_tracked` buffer, optionally frozen weight) and
//! [`PRelu`] (per-channel slope 0.25). The networks live in [`iresnet`], [`mobilefacenet`] and
//! [`vit`].
//!
//! Every parameter path equals the PyTorch `state_dict` key of the arcface_torch model, so the
//! variables of a `VarStore` written with `Tensor::write_npz`/`VarStore::save` load into the
//! reference model with `strict=True` (see `docs/backbones.md`).

pub mod autocast;
pub mod fold;
pub mod iresnet;
pub mod mobilefacenet;
pub mod onnx;
pub mod vit;

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use tch::nn::{self, ModuleT};
use tch::{Kind, Tensor};

pub use fold::FoldReport;
pub use iresnet::{IBasicBlock, IResNet};
pub use mobilefacenet::MobileFaceNet;
pub use vit::ViT;

/// Depths with arcface_torch presets and their block counts per stage.
pub const IRESNET_DEPTHS: [(u32, [usize; 4]); 5] = [
    (18, [2, 2, 2, 2]),
    (34, [3, 4, 6, 3]),
    (50, [3, 4, 14, 3]),
    (100, [3, 13, 30, 3]),
    (200, [6, 26, 60, 6]),
];

/// Which backbone to build (`[model]` table; `type` selects the variant).
///
/// ```toml
/// [model]
/// type = "iresnet"
/// depth = 50
/// ```
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum BackboneConfig {
    /// arcface_torch `iresnet{18,34,50,100,200}` or a custom iResNet.
    Iresnet(IResNetConfig),
    /// arcface_torch `mbf` (MobileFaceNet).
    Mobilefacenet(MobileFaceNetConfig),
    /// arcface_torch `vit_t`, `vit_s`, `vit_b`, ... (`preset = "vit_t"`) or a custom ViT.
    Vit(ViTConfig),
}

impl Default for BackboneConfig {
    /// iResNet-50, the arcface_torch default.
    fn default() -> Self {
        BackboneConfig::Iresnet(IResNetConfig::r50())
    }
}

impl BackboneConfig {
    /// Checks every field; the error names the offending key (`model.depth: ...`).
    pub fn validate(&self) -> Result<()> {
        match self {
            BackboneConfig::Iresnet(c) => c.validate(),
            BackboneConfig::Mobilefacenet(c) => c.validate(),
            BackboneConfig::Vit(c) => c.validate(),
        }
    }

    /// Side of the square input image in pixels (112 for every preset).
    pub fn input_size(&self) -> i64 {
        match self {
            BackboneConfig::Iresnet(c) => c.input_size,
            BackboneConfig::Mobilefacenet(c) => c.input_size,
            BackboneConfig::Vit(c) => c.input_size,
        }
    }

    /// Length of the embedding the backbone outputs.
    pub fn embedding_size(&self) -> i64 {
        match self {
            BackboneConfig::Iresnet(c) => c.embedding_size,
            BackboneConfig::Mobilefacenet(c) => c.embedding_size,
            BackboneConfig::Vit(c) => c.embedding_size,
        }
    }

    /// Sets `channels_last` on the convolutional networks; returns false (and changes nothing)
    /// for the ViT, which has no such key.
    pub fn set_channels_last(&mut self, on: bool) -> bool {
        match self {
            BackboneConfig::Iresnet(c) => c.channels_last = on,
            BackboneConfig::Mobilefacenet(c) => c.channels_last = on,
            BackboneConfig::Vit(_) => return false,
        }
        true
    }
}

/// iResNet ("LResNet-E-IR" without SE) as in arcface_torch `backbones/iresnet.py` (SPEC 1(d)).
///
/// Exactly one of `depth` and `layers` must be set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IResNetConfig {
    /// Preset depth: 18, 34, 50, 100 or 200 (arcface_torch block counts). Default: unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<u32>,
    /// Custom blocks per stage, e.g. `[1, 1, 1, 1]` for small CPU runs. Default: unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<[usize; 4]>,
    /// Channels of the four stages; the stem has `widths[0]`. Default `[64, 128, 256, 512]`.
    #[serde(default = "default_widths")]
    pub widths: [i64; 4],
    /// Embedding length (output of `fc` and `features`). Default 512.
    #[serde(default = "default_embedding")]
    pub embedding_size: i64,
    /// Dropout probability before `fc`. Default 0.0 (arcface_torch; ElasticFace r50 uses 0.4).
    #[serde(default)]
    pub dropout: f64,
    /// Input side in pixels; the trunk output side is `ceil(input_size / 16)`. Default 112.
    #[serde(default = "default_input")]
    pub input_size: i64,
    /// Run the convolutions on channels-last (NHWC) activations: the input is re-laid out once
    /// and oneDNN keeps that layout through the network (same shapes and parameters, f32 rounding
    /// differs). Default false (PyTorch's NCHW). On a CPU it trains the small networks of the
    /// shipped CPU recipes about 1.2x faster and iResNet-18 about 10 % slower (docs/backbones.md).
    /// Refused when a width is below [`MIN_CHANNELS_LAST_WIDTH`] (a libtorch 2.13 defect).
    #[serde(default = "default_channels_last")]
    pub channels_last: bool,
}

/// The narrowest stage `channels_last = true` accepts (see [`IResNetConfig::channels_last`]).
pub const MIN_CHANNELS_LAST_WIDTH: i64 = 8;

fn default_widths() -> [i64; 4] {
    [64, 128, 256, 512]
}
fn default_embedding() -> i64 {
    512
}
fn default_input() -> i64 {
    112
}
fn default_channels_last() -> bool {
    false
}

impl Default for IResNetConfig {
    /// [`IResNetConfig::r50`].
    fn default() -> Self {
        Self::r50()
    }
}

impl IResNetConfig {
    fn preset(depth: u32) -> Self {
        IResNetConfig {
            depth: Some(depth),
            layers: None,
            widths: default_widths(),
            embedding_size: default_embedding(),
            dropout: 0.0,
            input_size: default_input(),
            channels_last: default_channels_last(),
        }
    }
    /// iResNet-18: blocks `[2, 2, 2, 2]`.
    pub fn r18() -> Self {
        Self::preset(18)
    }
    /// iResNet-34: blocks `[3, 4, 6, 3]`.
    pub fn r34() -> Self {
        Self::preset(34)
    }
    /// iResNet-50: blocks `[3, 4, 14, 3]`.
    pub fn r50() -> Self {
        Self::preset(50)
    }
    /// iResNet-100: blocks `[3, 13, 30, 3]`.
    pub fn r100() -> Self {
        Self::preset(100)
    }
    /// iResNet-200: blocks `[6, 26, 60, 6]`.
    pub fn r200() -> Self {
        Self::preset(200)
    }

    /// Blocks per stage, from `depth` or `layers`.
    ///
    /// # Panics
    /// If the config does not pass [`BackboneConfig::validate`].
    pub fn blocks(&self) -> [usize; 4] {
        match (self.depth, self.layers) {
            (Some(d), None) => IRESNET_DEPTHS
                .iter()
                .find(|(depth, _)| *depth == d)
                .map(|(_, b)| *b)
                .unwrap_or_else(|| panic!("model.depth: {d} is not a preset")),
            (None, Some(l)) => l,
            _ => panic!("model: set exactly one of `depth` and `layers`"),
        }
    }

    /// Spatial side after the four stride-2 stages: `ceil(input_size / 16)` (112 -> 7, 56 -> 4).
    pub fn final_side(&self) -> i64 {
        (0..4).fold(self.input_size, |s, _| (s + 1) / 2)
    }

    fn validate(&self) -> Result<()> {
        match (self.depth, self.layers) {
            (Some(_), Some(_)) => bail!("model: set exactly one of `depth` and `layers`, not both"),
            (None, None) => bail!("model: set one of `depth` (18, 34, 50, 100, 200) or `layers`"),
            (Some(d), None) => ensure!(
                IRESNET_DEPTHS.iter().any(|(depth, _)| *depth == d),
                "model.depth: {d} is not one of 18, 34, 50, 100, 200"
            ),
            (None, Some(l)) => ensure!(
                l.iter().all(|&n| n >= 1),
                "model.layers: {l:?} must have at least one block per stage"
            ),
        }
        ensure!(
            self.widths.iter().all(|&w| w >= 1),
            "model.widths: {:?} must be positive",
            self.widths
        );
        // libtorch 2.13's channels-last (oneDNN) convolutions corrupt the heap on layers of 2 to 7
        // channels (reproduced in plain PyTorch: docs/backbones.md), so such widths run NCHW only.
        ensure!(
            !self.channels_last || self.widths.iter().all(|&w| w >= MIN_CHANNELS_LAST_WIDTH),
            "model.channels_last: widths {:?} have a stage below {MIN_CHANNELS_LAST_WIDTH} channels, \
             where libtorch's channels-last convolutions corrupt memory; set model.channels_last = false \
             (the embedded default sets it true) or widen the stage",
            self.widths
        );
        ensure!(
            self.embedding_size >= 1,
            "model.embedding_size: {} must be positive",
            self.embedding_size
        );
        ensure!(
            (0.0..1.0).contains(&self.dropout),
            "model.dropout: {} must be in [0, 1)",
            self.dropout
        );
        ensure!(
            self.input_size >= 16,
            "model.input_size: {} must be at least 16",
            self.input_size
        );
        Ok(())
    }
}

/// MobileFaceNet as arcface_torch `get_mbf(fp16, num_features, blocks=(1, 4, 6, 2), scale=2)`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MobileFaceNetConfig {
    /// Embedding length. Default 512.
    #[serde(default = "default_embedding")]
    pub embedding_size: i64,
    /// Bottlenecks per stage. Default `[1, 4, 6, 2]` (`mbf`); `mbf_large` is `[2, 8, 12, 4]`.
    #[serde(default = "default_mbf_blocks")]
    pub blocks: [usize; 4],
    /// Width multiplier of the 64/128-channel stages. Default 2 (`mbf`); `mbf_large` is 4.
    #[serde(default = "default_mbf_scale")]
    pub scale: i64,
    /// Input side in pixels; the global depthwise conv kernel is `ceil(input_size / 16)`. Default 112.
    #[serde(default = "default_input")]
    pub input_size: i64,
    /// As [`IResNetConfig::channels_last`]. Default false; on a CPU `true` trains `mbf` about
    /// 1.2x faster (docs/benchmarks.md, "Channels-last convolutions").
    #[serde(default = "default_channels_last")]
    pub channels_last: bool,
}

fn default_mbf_blocks() -> [usize; 4] {
    [1, 4, 6, 2]
}
fn default_mbf_scale() -> i64 {
    2
}

impl Default for MobileFaceNetConfig {
    /// arcface_torch `mbf`.
    fn default() -> Self {
        MobileFaceNetConfig {
            embedding_size: default_embedding(),
            blocks: default_mbf_blocks(),
            scale: default_mbf_scale(),
            input_size: default_input(),
            channels_last: default_channels_last(),
        }
    }
}

impl MobileFaceNetConfig {
    /// arcface_torch `mbf_large`: blocks `[2, 8, 12, 4]`, scale 4.
    pub fn large() -> Self {
        MobileFaceNetConfig {
            blocks: [2, 8, 12, 4],
            scale: 4,
            ..Default::default()
        }
    }

    /// Spatial side entering the global depthwise conv: `ceil(input_size / 16)`.
    pub fn final_side(&self) -> i64 {
        (0..4).fold(self.input_size, |s, _| (s + 1) / 2)
    }

    fn validate(&self) -> Result<()> {
        ensure!(
            self.embedding_size >= 1,
            "model.embedding_size: {} must be positive",
            self.embedding_size
        );
        ensure!(
            self.scale >= 1,
            "model.scale: {} must be positive",
            self.scale
        );
        ensure!(
            self.input_size >= 16,
            "model.input_size: {} must be at least 16",
            self.input_size
        );
        Ok(())
    }
}

/// arcface_torch's ViT presets: name, `embed_dim`, `depth`, `drop_path_rate`, `mask_ratio` (all
/// with patch 9 on 112 px, 8 heads, MLP ratio 4, no `qkv` bias).
pub const VIT_PRESETS: [(&str, i64, usize, f64, f64); 8] = [
    ("vit_t", 256, 12, 0.1, 0.1),
    ("vit_t_dp005_mask0", 256, 12, 0.05, 0.0),
    ("vit_s", 512, 12, 0.1, 0.1),
    ("vit_s_dp005_mask_0", 512, 12, 0.05, 0.0),
    ("vit_b", 512, 24, 0.1, 0.1),
    ("vit_b_dp005_mask_005", 512, 24, 0.05, 0.05),
    ("vit_l_dp005_mask_005", 768, 24, 0.05, 0.05),
    ("vit_h", 1024, 48, 0.1, 0.0),
];

/// Vision Transformer as arcface_torch `backbones/vit.py` (see [`vit`]).
///
/// In TOML, `preset` picks an arcface_torch network and any other key overrides it; without a
/// preset the defaults are `vit_t`'s:
///
/// ```toml
/// [model]
/// type = "vit"
/// preset = "vit_s"      # vit_t, vit_s, vit_b, vit_t_dp005_mask0, ... (see VIT_PRESETS)
/// mask_ratio = 0.0      # optional override
/// ```
///
/// The resolved config is written back with every field and no `preset`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(try_from = "ViTConfigToml")]
pub struct ViTConfig {
    /// Token width `D`. Default 256 (`vit_t`).
    pub embed_dim: i64,
    /// Number of transformer blocks. Default 12.
    pub depth: usize,
    /// Attention heads; must divide `embed_dim`. Default 8.
    pub num_heads: i64,
    /// MLP hidden width as a multiple of `embed_dim` (truncated to an integer). Default 4.
    pub mlp_ratio: f64,
    /// Patch side (conv kernel and stride). Default 9: 112 px -> 12 x 12 tokens (the last 4 pixel
    /// rows and columns are not seen, as in arcface_torch).
    pub patch_size: i64,
    /// Input side in pixels. Default 112.
    pub input_size: i64,
    /// Embedding length `E` (arcface_torch `num_features`). Default 512.
    pub embedding_size: i64,
    /// Stochastic depth of the last block (linear from 0 in the first). Default 0.1.
    pub drop_path_rate: f64,
    /// Fraction of tokens dropped in training (MAE-style random masking). Default 0.1.
    pub mask_ratio: f64,
    /// Bias in the `qkv` projection. Default false.
    pub qkv_bias: bool,
}

/// The TOML form of [`ViTConfig`]: an optional preset plus optional overrides.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ViTConfigToml {
    preset: Option<String>,
    embed_dim: Option<i64>,
    depth: Option<usize>,
    num_heads: Option<i64>,
    mlp_ratio: Option<f64>,
    patch_size: Option<i64>,
    input_size: Option<i64>,
    embedding_size: Option<i64>,
    drop_path_rate: Option<f64>,
    mask_ratio: Option<f64>,
    qkv_bias: Option<bool>,
}

impl TryFrom<ViTConfigToml> for ViTConfig {
    type Error = String;
    fn try_from(t: ViTConfigToml) -> Result<Self, String> {
        let base = match t.preset.as_deref() {
            None => ViTConfig::vit_t(),
            Some(name) => ViTConfig::preset(name).ok_or_else(|| {
                let names: Vec<_> = VIT_PRESETS.iter().map(|p| p.0).collect();
                format!("model.preset: `{name}` is not one of {}", names.join(", "))
            })?,
        };
        Ok(ViTConfig {
            embed_dim: t.embed_dim.unwrap_or(base.embed_dim),
            depth: t.depth.unwrap_or(base.depth),
            num_heads: t.num_heads.unwrap_or(base.num_heads),
            mlp_ratio: t.mlp_ratio.unwrap_or(base.mlp_ratio),
            patch_size: t.patch_size.unwrap_or(base.patch_size),
            input_size: t.input_size.unwrap_or(base.input_size),
            embedding_size: t.embedding_size.unwrap_or(base.embedding_size),
            drop_path_rate: t.drop_path_rate.unwrap_or(base.drop_path_rate),
            mask_ratio: t.mask_ratio.unwrap_or(base.mask_ratio),
            qkv_bias: t.qkv_bias.unwrap_or(base.qkv_bias),
        })
    }
}

impl Default for ViTConfig {
    /// [`ViTConfig::vit_t`].
    fn default() -> Self {
        Self::vit_t()
    }
}

impl ViTConfig {
    /// The arcface_torch network called `name` (see [`VIT_PRESETS`]), 512-d embedding.
    pub fn preset(name: &str) -> Option<Self> {
        let &(_, embed_dim, depth, drop_path_rate, mask_ratio) =
            VIT_PRESETS.iter().find(|p| p.0 == name)?;
        Some(ViTConfig {
            embed_dim,
            depth,
            num_heads: 8,
            mlp_ratio: 4.0,
            patch_size: 9,
            input_size: 112,
            embedding_size: 512,
            drop_path_rate,
            mask_ratio,
            qkv_bias: false,
        })
    }
    /// `vit_t`: D 256, 12 blocks, drop path 0.1, mask ratio 0.1.
    pub fn vit_t() -> Self {
        Self::preset("vit_t").expect("vit_t is a preset")
    }
    /// `vit_s`: D 512, 12 blocks, drop path 0.1, mask ratio 0.1.
    pub fn vit_s() -> Self {
        Self::preset("vit_s").expect("vit_s is a preset")
    }
    /// `vit_b`: D 512, 24 blocks, drop path 0.1, mask ratio 0.1.
    pub fn vit_b() -> Self {
        Self::preset("vit_b").expect("vit_b is a preset")
    }

    /// Tokens per image: `(input_size / patch_size)^2` (144 for the presets).
    pub fn num_patches(&self) -> i64 {
        let g = self.input_size / self.patch_size;
        g * g
    }

    /// MLP hidden width `int(embed_dim * mlp_ratio)`.
    pub fn mlp_hidden(&self) -> i64 {
        (self.embed_dim as f64 * self.mlp_ratio) as i64
    }

    /// Stochastic-depth probability of block `i`: `drop_path_rate * i / (depth - 1)`.
    pub fn drop_path_at(&self, i: usize) -> f64 {
        if self.depth <= 1 {
            0.0
        } else {
            self.drop_path_rate * i as f64 / (self.depth - 1) as f64
        }
    }

    fn validate(&self) -> Result<()> {
        ensure!(
            self.embed_dim >= 1 && self.depth >= 1,
            "model.embed_dim ({}) and model.depth ({}) must be positive",
            self.embed_dim,
            self.depth
        );
        ensure!(
            self.num_heads >= 1 && self.embed_dim % self.num_heads == 0,
            "model.num_heads: {} must divide model.embed_dim {}",
            self.num_heads,
            self.embed_dim
        );
        ensure!(
            self.mlp_hidden() >= 1,
            "model.mlp_ratio: {} gives no MLP width",
            self.mlp_ratio
        );
        ensure!(
            self.patch_size >= 1 && self.patch_size <= self.input_size,
            "model.patch_size: {} must be in [1, input_size = {}]",
            self.patch_size,
            self.input_size
        );
        ensure!(
            self.embedding_size >= 1,
            "model.embedding_size: {} must be positive",
            self.embedding_size
        );
        ensure!(
            (0.0..1.0).contains(&self.drop_path_rate),
            "model.drop_path_rate: {} must be in [0, 1)",
            self.drop_path_rate
        );
        ensure!(
            (0.0..1.0).contains(&self.mask_ratio),
            "model.mask_ratio: {} must be in [0, 1)",
            self.mask_ratio
        );
        ensure!(
            (self.num_patches() as f64 * (1.0 - self.mask_ratio)) as i64 >= 1,
            "model.mask_ratio: {} keeps no token of {}",
            self.mask_ratio,
            self.num_patches()
        );
        Ok(())
    }
}

/// Builds the backbone under `p` (use the VarStore root so names equal arcface_torch keys).
///
/// # Panics
/// If `cfg` does not pass [`BackboneConfig::validate`] (call it at the config boundary).
pub fn build(p: &nn::Path, cfg: &BackboneConfig) -> Backbone {
    if let Err(e) = cfg.validate() {
        panic!("invalid backbone config: {e:#}");
    }
    match cfg {
        BackboneConfig::Iresnet(c) => Backbone::IResNet(IResNet::new(p, c)),
        BackboneConfig::Mobilefacenet(c) => Backbone::MobileFaceNet(MobileFaceNet::new(p, c)),
        BackboneConfig::Vit(c) => Backbone::ViT(ViT::new(p, c)),
    }
}

/// A built backbone: images `[B, 3, S, S]` in `[-1, 1]` to embeddings `[B, embedding_size]`.
#[derive(Debug)]
pub enum Backbone {
    IResNet(IResNet),
    MobileFaceNet(MobileFaceNet),
    ViT(ViT),
}

impl Backbone {
    /// Forward pass with arcface_torch's mixed precision: with `autocast = Some(dtype)` (fp16 or
    /// bf16) the convolutional trunk runs under CUDA autocast in that dtype and the head
    /// (`fc`/`features`, or `conv_sep`/GDC) in fp32. Without CUDA, autocast has no effect.
    ///
    /// # Shapes
    /// `xs`: `[B, 3, S, S]` float; output `[B, embedding_size]` in the kind of the parameters.
    ///
    /// # Panics
    /// On a wrong input shape. (`B == 1` in training mode does not panic, unlike PyTorch, but the
    /// batch statistics of `features` are then degenerate.)
    pub fn forward_amp(&self, xs: &Tensor, train: bool, autocast: Option<Kind>) -> Tensor {
        match self {
            Backbone::IResNet(m) => m.forward_amp(xs, train, autocast),
            Backbone::MobileFaceNet(m) => m.forward_amp(xs, train, autocast),
            Backbone::ViT(m) => m.forward_amp(xs, train, autocast),
        }
    }

    /// The trunk: everything before the embedding neck, flattened, with no dropout applied
    /// (iResNet: stem, stages, `bn2`; MobileFaceNet: `layers`, `conv_sep`, GDC). With `autocast` the
    /// convolutional part runs under CUDA autocast in that dtype; the output is in the parameter kind.
    ///
    /// `forward_amp(xs, train, a)` equals `forward_neck_t(dropout(forward_trunk_amp(xs, train, a)),
    /// train)`, with the configured dropout (iResNet only). Embedding augmentation
    /// (CoReFace) draws its own dropout masks between the two halves.
    ///
    /// # Shapes
    /// `xs`: `[B, 3, S, S]`; output `[B, F]` with `F = trunk_width()` (25088 for the iResNet
    /// presets, 512 for MobileFaceNet).
    ///
    /// # Panics
    /// On a wrong input shape.
    pub fn forward_trunk_amp(&self, xs: &Tensor, train: bool, autocast: Option<Kind>) -> Tensor {
        match self {
            Backbone::IResNet(m) => m.forward_trunk_amp(xs, train, autocast),
            Backbone::MobileFaceNet(m) => m.forward_trunk_amp(xs, train, autocast),
            Backbone::ViT(m) => m.forward_trunk_amp(xs, train, autocast),
        }
    }

    /// [`Backbone::forward_trunk_amp`] without autocast.
    ///
    /// # Shapes
    /// `xs`: `[B, 3, S, S]`; output `[B, F]`.
    pub fn forward_trunk_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.forward_trunk_amp(xs, train, None)
    }

    /// The neck: trunk features to the embedding (iResNet: `fc` then the `features`
    /// BatchNorm1d; MobileFaceNet: the final Linear then BatchNorm1d). No dropout is applied here.
    /// With `train` the BatchNorm1d uses the batch statistics and updates its running statistics,
    /// once per call.
    ///
    /// # Shapes
    /// `feat_bf`: `[B, F]` with `F = trunk_width()`; output `[B, embedding_size]`.
    ///
    /// # Panics
    /// If `feat_bf` is not `[B, F]`.
    pub fn forward_neck_t(&self, feat_bf: &Tensor, train: bool) -> Tensor {
        match self {
            Backbone::IResNet(m) => m.forward_neck_t(feat_bf, train),
            Backbone::MobileFaceNet(m) => m.forward_neck_t(feat_bf, train),
            Backbone::ViT(m) => m.forward_neck_t(feat_bf, train),
        }
    }

    /// Width `F` of the trunk features (the neck's input).
    pub fn trunk_width(&self) -> i64 {
        match self {
            Backbone::IResNet(m) => m.fc.ws.size()[1],
            Backbone::MobileFaceNet(m) => m.linear.ws.size()[1],
            Backbone::ViT(m) => m.feature_fc1.ws.size()[1],
        }
    }

    /// The dropout probability the backbone applies between trunk and neck in
    /// [`Backbone::forward_amp`] (the configured `model.dropout` for iResNet; 0 for MobileFaceNet).
    pub fn dropout(&self) -> f64 {
        match self {
            Backbone::IResNet(m) => m.dropout,
            Backbone::MobileFaceNet(_) | Backbone::ViT(_) => 0.0,
        }
    }
}

impl ModuleT for Backbone {
    /// # Shapes
    /// `xs`: `[B, 3, S, S]`; output `[B, embedding_size]`.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.forward_amp(xs, train, None)
    }
}

/// `xs` (`[B, C, H, W]`) with channels-last strides when `on`: the same shape and values, laid
/// out NHWC, so that oneDNN picks its channels-last convolutions and keeps that layout.
fn maybe_channels_last(xs: &Tensor, on: bool) -> Tensor {
    if on {
        xs.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
    } else {
        xs.shallow_clone()
    }
}

/// Casts the trunk output back to the parameter kind after an autocast region.
fn to_param_kind(xs: Tensor, like: &Tensor) -> Tensor {
    if xs.kind() == like.kind() {
        xs
    } else {
        xs.to_kind(like.kind())
    }
}

/// PyTorch `BatchNorm1d`/`BatchNorm2d` (eps 1e-5, momentum 0.1) with PyTorch's parameter names and
/// init: `weight` 1, `bias` 0, `running_mean` 0, `running_var` 1 and the Int64 scalar buffer
/// `num_batches_tracked`, incremented by every training-mode forward.
#[derive(Debug)]
pub struct BatchNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub num_batches_tracked: Tensor,
    /// Added to the variance ([`BatchNorm::EPS`] unless built by [`BatchNorm::with_eps`]).
    pub eps: f64,
    /// Folded into the neighbouring conv or linear layer ([`crate::fold`]): the forward is the
    /// identity, eval mode only.
    folded: bool,
}

impl BatchNorm {
    /// PyTorch's defaults.
    pub const EPS: f64 = 1e-5;
    pub const MOMENTUM: f64 = 0.1;

    /// A batch norm over `c` channels; with `train_weight == false` the weight stays fixed at 1
    /// (arcface_torch `features`), registered as a non-trainable variable.
    pub fn new(p: &nn::Path, c: i64, train_weight: bool) -> Self {
        Self::with_eps(p, c, train_weight, Self::EPS)
    }

    /// [`BatchNorm::new`] with another epsilon (arcface_torch's ViT feature head uses 2e-5).
    pub fn with_eps(p: &nn::Path, c: i64, train_weight: bool, eps: f64) -> Self {
        let weight = if train_weight {
            p.var("weight", &[c], nn::Init::Const(1.0))
        } else {
            p.ones_no_train("weight", &[c])
        };
        let nbt = Tensor::zeros([0i64; 0], (Kind::Int64, p.device()));
        BatchNorm {
            weight,
            bias: p.var("bias", &[c], nn::Init::Const(0.0)),
            running_mean: p.zeros_no_train("running_mean", &[c]),
            running_var: p.ones_no_train("running_var", &[c]),
            num_batches_tracked: p.add("num_batches_tracked", nbt, false),
            eps,
            folded: false,
        }
    }

    /// Whether [`crate::fold`] folded this layer into its neighbour (its forward is then the
    /// identity).
    pub fn is_folded(&self) -> bool {
        self.folded
    }
}

impl ModuleT for BatchNorm {
    /// # Shapes
    /// `xs`: `[B, C]` or `[B, C, H, W]`; output the same.
    ///
    /// # Panics
    /// With `train` on a folded layer ([`BatchNorm::is_folded`]): a folded backbone is for
    /// inference only.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        if self.folded {
            assert!(
                !train,
                "a folded BatchNorm has no training mode: fold a copy of the backbone for inference"
            );
            return xs.shallow_clone();
        }
        if train {
            tch::no_grad(|| {
                let mut n = self.num_batches_tracked.shallow_clone();
                n += 1;
            });
        }
        xs.batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            Self::MOMENTUM,
            self.eps,
            true,
        )
    }
}

/// PyTorch `PReLU(num_parameters = c)`: a per-channel slope `weight`, initialised to 0.25.
#[derive(Debug)]
pub struct PRelu {
    pub weight: Tensor,
}

impl PRelu {
    pub fn new(p: &nn::Path, c: i64) -> Self {
        PRelu {
            weight: p.var("weight", &[c], nn::Init::Const(0.25)),
        }
    }
}

impl nn::Module for PRelu {
    /// # Shapes
    /// `xs`: `[B, C, ...]`; output the same.
    fn forward(&self, xs: &Tensor) -> Tensor {
        xs.prelu(&self.weight)
    }
}

/// Config of a bias-free `Conv2d` with weight `init` (kernel size is given to `nn::conv2d`).
fn conv_cfg(stride: i64, padding: i64, groups: i64, init: nn::Init) -> nn::ConvConfig {
    nn::ConvConfig {
        stride,
        padding,
        groups,
        bias: false,
        ws_init: init,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn toml_cfg(s: &str) -> Result<BackboneConfig> {
        #[derive(Deserialize)]
        struct Doc {
            model: BackboneConfig,
        }
        let doc: Doc = toml::from_str(s)?;
        doc.model.validate()?;
        Ok(doc.model)
    }

    #[test]
    fn validation_names_the_key() {
        let err = |s: &str| format!("{:#}", toml_cfg(s).unwrap_err());
        let e = err("[model]\ntype = \"iresnet\"\ndepth = 42\n");
        assert!(
            e.contains("model.depth: 42 is not one of 18, 34, 50, 100, 200"),
            "{e}"
        );
        let e = err("[model]\ntype = \"iresnet\"\ndepth = 50\nlayers = [1, 1, 1, 1]\n");
        assert!(e.contains("exactly one of `depth` and `layers`"), "{e}");
        let e = err("[model]\ntype = \"iresnet\"\n");
        assert!(e.contains("set one of `depth`"), "{e}");
        let e = err("[model]\ntype = \"iresnet\"\ndepth = 50\ndropout = 1.5\n");
        assert!(e.contains("model.dropout"), "{e}");
        let e = err("[model]\ntype = \"iresnet\"\ndepth = 50\ndepht = 3\n");
        assert!(e.contains("depht"), "{e}");
        let e = err("[model]\ntype = \"resnet\"\n");
        assert!(e.contains("resnet"), "{e}");
        let e = err("[model]\ntype = \"mobilefacenet\"\nscale = 0\n");
        assert!(e.contains("model.scale"), "{e}");
        // Channels-last below 8 channels corrupts libtorch's heap: refused, NCHW accepted.
        let narrow = "[model]\ntype = \"iresnet\"\nlayers = [1, 1, 1, 1]\nwidths = [8, 4, 8, 8]\n";
        let e = err(&format!("{narrow}channels_last = true\n"));
        assert!(
            e.contains("model.channels_last") && e.contains("[8, 4, 8, 8]"),
            "{e}"
        );
        toml_cfg(&format!("{narrow}channels_last = false\n")).unwrap();
        let wide = "[model]\ntype = \"iresnet\"\nlayers = [1, 1, 1, 1]\nwidths = [8, 8, 8, 8]\n";
        toml_cfg(&format!("{wide}channels_last = true\n")).unwrap();
    }

    #[test]
    fn toml_round_trip_and_defaults() {
        let c = toml_cfg("[model]\ntype = \"iresnet\"\ndepth = 50\n").unwrap();
        assert_eq!(c, BackboneConfig::Iresnet(IResNetConfig::r50()));
        assert_eq!(c, BackboneConfig::default());
        let c = toml_cfg("[model]\ntype = \"mobilefacenet\"\n").unwrap();
        assert_eq!(
            c,
            BackboneConfig::Mobilefacenet(MobileFaceNetConfig::default())
        );
        let custom = BackboneConfig::Iresnet(IResNetConfig {
            depth: None,
            layers: Some([1, 2, 1, 1]),
            widths: [16, 32, 64, 128],
            embedding_size: 128,
            dropout: 0.4,
            input_size: 56,
            channels_last: false,
        });
        for cfg in [
            custom,
            BackboneConfig::Mobilefacenet(MobileFaceNetConfig::large()),
        ] {
            let text = toml::to_string(&cfg).unwrap();
            let back: BackboneConfig = toml::from_str(&text).unwrap();
            assert_eq!(back, cfg, "{text}");
        }
        assert_eq!(IResNetConfig::r100().blocks(), [3, 13, 30, 3]);
        assert_eq!(IResNetConfig::r18().final_side(), 7);
        let small = IResNetConfig {
            input_size: 56,
            ..IResNetConfig::r18()
        };
        assert_eq!(small.final_side(), 4);
    }

    #[test]
    fn batch_norm_counts_training_batches_only() {
        let vs = nn::VarStore::new(Device::Cpu);
        let bn = BatchNorm::new(&(vs.root() / "bn"), 3, false);
        let x = Tensor::randn([4, 3], (Kind::Float, Device::Cpu));
        let _ = bn.forward_t(&x, true);
        let _ = bn.forward_t(&x, true);
        let _ = bn.forward_t(&x, false);
        assert_eq!(i64::try_from(&bn.num_batches_tracked).unwrap(), 2);
        // Running mean moved by momentum 0.1 twice: 0.19 * batch mean.
        let want = x.mean_dim(0, false, Kind::Float) * 0.19;
        assert!(bn.running_mean.allclose(&want, 1e-5, 1e-6, false));
        assert_eq!(vs.trainable_variables().len(), 1, "only the bias trains");
    }

    fn assert_send<T: Send>() {}
    #[test]
    fn backbone_is_send() {
        assert_send::<Backbone>();
    }
}
