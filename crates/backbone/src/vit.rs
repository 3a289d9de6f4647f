//! Vision Transformer for faces (Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers
//! for Image Recognition at Scale", ICLR 2021, arXiv 2010.11929) as insightface arcface_torch
//! `backbones/vit.py` builds it for `vit_t`, `vit_s`, `vit_b` (and the `_dp005_mask*` variants):
//! patch 9 on a 112 x 112 face (a 12 x 12 grid of 144 tokens, no class token), learned position
//! embeddings, pre-norm blocks (LayerNorm -> multi-head self-attention -> residual, LayerNorm ->
//! MLP with ReLU6 -> residual, each branch behind stochastic depth), a final LayerNorm, then the
//! feature head `Linear(144 D -> D, no bias) -> BN1d -> Linear(D -> E, no bias) -> BN1d` (eps 2e-5)
//! on the flattened tokens.
//!
//! Training-time patch masking (`mask_ratio`, as in MAE, He et al., arXiv 2111.06377): after the
//! position embedding a random `floor(L (1 - r))` tokens per image go through the blocks; after the
//! final LayerNorm the dropped positions are filled with the learned `mask_token` and the tokens are
//! put back in their original order, so the head always sees all `L` positions. Eval mode never
//! masks. Stochastic depth (Huang et al., arXiv 1603.09382) grows linearly from 0 in the first
//! block to `drop_path_rate` in the last; one keep/drop draw per image and branch, scaled by
//! `1 / keep`.
//!
//! Mixed precision: arcface_torch runs the `qkv` and `proj` projections under CUDA autocast and the
//! attention scores and softmax in fp32; with `autocast = Some(dtype)` we do the same (the rest of
//! the network stays in the parameter kind). Deliberate difference: arcface_torch switches autocast
//! on in those two projections even when its config says `fp16 = False`; here they follow the run's
//! precision, so an fp32 run is fp32 throughout.
//!
//! Parameter paths equal arcface_torch's `state_dict` keys (`patch_embed.proj`, `pos_embed`,
//! `blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`, `norm`, `feature.{0,1,2,3}`,
//! `mask_token`).

use crate::onnx::{self, ConvGeometry};
use crate::{BatchNorm, ViTConfig};
use facerec_onnx::{Attr, GraphBuilder};
use tch::nn::{self, Module, ModuleT};
use tch::{Kind, Tensor};

/// arcface_torch's feature-head BatchNorm1d epsilon.
pub const FEATURE_BN_EPS: f64 = 2e-5;

/// Linear weights: truncated normal with std 0.02 and cut-offs at +-2 (absolute, i.e. 100 std, so
/// effectively a plain normal, which is what we draw); biases 0.
const LINEAR_INIT: nn::Init = nn::Init::Randn {
    mean: 0.0,
    stdev: 0.02,
};

fn linear(p: nn::Path, c_in: i64, c_out: i64, bias: bool) -> nn::Linear {
    nn::linear(
        p,
        c_in,
        c_out,
        nn::LinearConfig {
            ws_init: LINEAR_INIT,
            bs_init: bias.then_some(nn::Init::Const(0.0)),
            bias,
        },
    )
}

/// The LayerNorm epsilon (PyTorch's and tch's default).
pub const LAYER_NORM_EPS: f64 = 1e-5;

fn layer_norm(p: nn::Path, d: i64) -> nn::LayerNorm {
    // PyTorch LayerNorm: eps 1e-5, weight 1, bias 0.
    nn::layer_norm(p, vec![d], Default::default())
}

/// Multi-head self-attention; parameters `qkv` (bias per `qkv_bias`) and `proj` (with bias).
#[derive(Debug)]
pub struct Attention {
    pub qkv: nn::Linear,
    pub proj: nn::Linear,
    pub num_heads: i64,
}

impl Attention {
    /// Attention over `dim` channels split into `num_heads` heads.
    pub fn new(p: &nn::Path, dim: i64, num_heads: i64, qkv_bias: bool) -> Self {
        Attention {
            qkv: linear(p / "qkv", dim, 3 * dim, qkv_bias),
            proj: linear(p / "proj", dim, dim, true),
            num_heads,
        }
    }

    /// `softmax(q kᵀ / sqrt(d_head)) v` per head, then `proj`; `qkv` and `proj` under `autocast`,
    /// the scores in the kind of `xs`.
    ///
    /// # Shapes
    /// `xs`: `[B, L, D]`; output `[B, L, D]`.
    pub fn forward_amp(&self, xs: &Tensor, autocast: Option<Kind>) -> Tensor {
        let (b, l, d) = xs.size3().expect("attention input [B, L, D]");
        let h = self.num_heads;
        let kind = xs.kind();
        let qkv = crate::autocast::with_cuda_autocast(autocast, || self.qkv.forward(xs))
            .reshape([b, l, 3, h, d / h])
            .permute([2, 0, 3, 1, 4])
            .to_kind(kind);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let scale = ((d / h) as f64).powf(-0.5);
        let attn = (q.matmul(&k.transpose(-2, -1)) * scale).softmax(-1, kind);
        let out = attn.matmul(&v).transpose(1, 2).reshape([b, l, d]);
        crate::autocast::with_cuda_autocast(autocast, || self.proj.forward(&out)).to_kind(kind)
    }
}

/// The block's MLP: `fc1` -> ReLU6 -> `fc2`.
#[derive(Debug)]
pub struct Mlp {
    pub fc1: nn::Linear,
    pub fc2: nn::Linear,
}

impl Module for Mlp {
    /// # Shapes
    /// `xs`: `[B, L, D]`; output `[B, L, D]`.
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.fc2.forward(&self.fc1.forward(xs).relu6())
    }
}

/// Stochastic depth on a residual branch: in training, each image's branch is kept with
/// probability `1 - p` and scaled by `1 / (1 - p)`; identity in eval mode or with `p == 0`.
///
/// # Shapes
/// `xs`: `[B, ...]`; output the same.
pub fn drop_path(xs: &Tensor, p: f64, train: bool) -> Tensor {
    if !train || p <= 0.0 {
        return xs.shallow_clone();
    }
    let keep = 1.0 - p;
    let mut shape = vec![1i64; xs.dim()];
    shape[0] = xs.size()[0];
    let mask = (Tensor::rand(shape.as_slice(), (xs.kind(), xs.device())) + keep).floor();
    xs / keep * mask
}

/// One pre-norm transformer block; parameters `norm1, attn.{qkv, proj}, norm2, mlp.{fc1, fc2}`.
#[derive(Debug)]
pub struct Block {
    pub norm1: nn::LayerNorm,
    pub attn: Attention,
    pub norm2: nn::LayerNorm,
    pub mlp: Mlp,
    /// This block's stochastic-depth probability.
    pub drop_path: f64,
}

impl Block {
    /// A block of width `cfg.embed_dim` with stochastic-depth probability `drop_path`.
    pub fn new(p: &nn::Path, cfg: &ViTConfig, drop_path: f64) -> Self {
        let d = cfg.embed_dim;
        let hidden = cfg.mlp_hidden();
        Block {
            norm1: layer_norm(p / "norm1", d),
            attn: Attention::new(&(p / "attn"), d, cfg.num_heads, cfg.qkv_bias),
            norm2: layer_norm(p / "norm2", d),
            mlp: Mlp {
                fc1: linear(p / "mlp" / "fc1", d, hidden, true),
                fc2: linear(p / "mlp" / "fc2", hidden, d, true),
            },
            drop_path,
        }
    }

    /// `x + drop_path(attn(norm1(x)))`, then `x + drop_path(mlp(norm2(x)))`.
    ///
    /// # Shapes
    /// `xs`: `[B, L, D]`; output `[B, L, D]`.
    pub fn forward_amp(&self, xs: &Tensor, train: bool, autocast: Option<Kind>) -> Tensor {
        let a = self.attn.forward_amp(&self.norm1.forward(xs), autocast);
        let x = xs + drop_path(&a, self.drop_path, train);
        let m = self.mlp.forward(&self.norm2.forward(&x));
        &x + drop_path(&m, self.drop_path, train)
    }
}

/// The arcface_torch ViT; parameter paths equal its `state_dict` keys.
#[derive(Debug)]
pub struct ViT {
    /// `patch_embed.proj`: Conv2d(3, D, kernel = stride = patch_size), with bias.
    pub patch_embed: nn::Conv2D,
    /// `[1, L, D]`.
    pub pos_embed: Tensor,
    pub blocks: Vec<Block>,
    pub norm: nn::LayerNorm,
    /// `feature.0`: Linear(L D -> D), no bias.
    pub feature_fc1: nn::Linear,
    /// `feature.1`: BatchNorm1d(D), eps 2e-5.
    pub feature_bn1: BatchNorm,
    /// `feature.2`: Linear(D -> E), no bias.
    pub feature_fc2: nn::Linear,
    /// `feature.3`: BatchNorm1d(E), eps 2e-5.
    pub feature_bn2: BatchNorm,
    /// `[1, 1, D]`, fills the masked positions after the final norm.
    pub mask_token: Tensor,
    pub mask_ratio: f64,
    /// Tokens `L = (input_size / patch_size)^2`.
    pub num_patches: i64,
    pub embed_dim: i64,
}

impl ViT {
    /// Builds the network under `p` (no validation: see [`crate::build`]).
    pub fn new(p: &nn::Path, cfg: &ViTConfig) -> Self {
        let d = cfg.embed_dim;
        let l = cfg.num_patches();
        let fan_in = (3 * cfg.patch_size * cfg.patch_size) as f64;
        // PyTorch's Conv2d default: weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        let bound = 1.0 / fan_in.sqrt();
        let uniform = nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let patch_embed = nn::conv2d(
            p / "patch_embed" / "proj",
            3,
            d,
            cfg.patch_size,
            nn::ConvConfig {
                stride: cfg.patch_size,
                ws_init: uniform,
                bs_init: uniform,
                ..Default::default()
            },
        );
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(&(p / "blocks" / i), cfg, cfg.drop_path_at(i)))
            .collect();
        let feature = p / "feature";
        ViT {
            patch_embed,
            pos_embed: p.var("pos_embed", &[1, l, d], LINEAR_INIT),
            blocks,
            norm: layer_norm(p / "norm", d),
            feature_fc1: linear(&feature / "0", l * d, d, false),
            feature_bn1: BatchNorm::with_eps(&(&feature / "1"), d, true, FEATURE_BN_EPS),
            feature_fc2: linear(&feature / "2", d, cfg.embedding_size, false),
            feature_bn2: BatchNorm::with_eps(
                &(&feature / "3"),
                cfg.embedding_size,
                true,
                FEATURE_BN_EPS,
            ),
            mask_token: p.var("mask_token", &[1, 1, d], LINEAR_INIT),
            mask_ratio: cfg.mask_ratio,
            num_patches: l,
            embed_dim: d,
        }
    }

    /// Patch embedding plus position embedding.
    ///
    /// # Shapes
    /// `xs`: `[B, 3, S, S]`; output `[B, L, D]`.
    pub fn embed_patches(&self, xs: &Tensor) -> Tensor {
        self.patch_embed.forward(xs).flatten(2, -1).transpose(1, 2) + &self.pos_embed
    }

    /// Tokens kept by the training-time mask: `floor(L (1 - mask_ratio))`.
    pub fn kept_tokens(&self) -> i64 {
        (self.num_patches as f64 * (1.0 - self.mask_ratio)) as i64
    }

    /// The trunk: tokens through the blocks and the final norm (with masking in training), the
    /// masked positions filled with `mask_token`, flattened to `[B, L * D]`.
    ///
    /// # Shapes
    /// `xs`: `[B, 3, S, S]`; output `[B, L * D]` in the parameter kind.
    ///
    /// # Panics
    /// On a wrong input shape.
    pub fn forward_trunk_amp(&self, xs: &Tensor, train: bool, autocast: Option<Kind>) -> Tensor {
        let noise = (train && self.mask_ratio > 0.0).then(|| {
            let b = xs.size()[0];
            Tensor::rand([b, self.num_patches], (Kind::Float, xs.device()))
        });
        self.forward_trunk_masked(xs, noise.as_ref(), train, autocast)
    }

    /// [`ViT::forward_trunk_amp`] with the masking noise given: with `Some(noise)` each image keeps
    /// its [`ViT::kept_tokens`] positions of smallest noise (in that order through the blocks), as
    /// arcface_torch's random masking does with its own uniform draw; `None` masks nothing.
    /// `train` switches drop path on (the trunk has no batch statistics).
    ///
    /// # Shapes
    /// `xs`: `[B, 3, S, S]`; `noise`: `[B, L]`; output `[B, L * D]`.
    ///
    /// # Panics
    /// On a wrong input or noise shape.
    pub fn forward_trunk_masked(
        &self,
        xs: &Tensor,
        noise: Option<&Tensor>,
        train: bool,
        autocast: Option<Kind>,
    ) -> Tensor {
        let x = self.embed_patches(xs);
        let (b, l, d) = x.size3().expect("tokens [B, L, D]");
        let (mut x, restore) = match noise {
            Some(noise) => {
                assert_eq!(noise.size(), [b, l], "masking noise [B, L]");
                let keep = self.kept_tokens();
                let shuffle = noise.argsort(1, false);
                let restore = shuffle.argsort(1, false);
                let idx = shuffle
                    .narrow(1, 0, keep)
                    .unsqueeze(-1)
                    .expand([b, keep, d], true);
                (x.gather(1, &idx, false), Some(restore))
            }
            None => (x, None),
        };
        for block in &self.blocks {
            x = block.forward_amp(&x, train, autocast);
        }
        let mut x = self.norm.forward(&x);
        if let Some(restore) = restore {
            let kept = x.size()[1];
            let fill = self.mask_token.expand([b, l - kept, d], true);
            let idx = restore.unsqueeze(-1).expand([b, l, d], true);
            x = Tensor::cat(&[x, fill], 1).gather(1, &idx, false);
        }
        x.reshape([b, l * d])
    }

    /// The feature head `feature.0..3` (batch statistics in its BatchNorms when `train`).
    ///
    /// # Shapes
    /// `feat_bf`: `[B, L * D]`; output `[B, embedding_size]`.
    pub fn forward_neck_t(&self, feat_bf: &Tensor, train: bool) -> Tensor {
        let x = self.feature_fc1.forward(feat_bf);
        let x = self.feature_bn1.forward_t(&x, train);
        let x = self.feature_fc2.forward(&x);
        self.feature_bn2.forward_t(&x, train)
    }

    /// Trunk then head.
    ///
    /// # Shapes
    /// `xs`: `[B, 3, S, S]`; output `[B, embedding_size]`.
    pub fn forward_amp(&self, xs: &Tensor, train: bool, autocast: Option<Kind>) -> Tensor {
        self.forward_neck_t(&self.forward_trunk_amp(xs, train, autocast), train)
    }
}

impl ModuleT for ViT {
    /// # Shapes
    /// `xs`: `[B, 3, S, S]`; output `[B, embedding_size]`.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.forward_amp(xs, train, None)
    }
}

impl Attention {
    /// Eval-mode ONNX nodes of the attention under `name` (`blocks.N.attn`) for `l` tokens of
    /// width `d`; returns the output value (`[batch, L, D]`).
    pub fn onnx_graph(&self, g: &mut GraphBuilder, name: &str, x: &str, l: i64, d: i64) -> String {
        let h = self.num_heads;
        let qkv = onnx::linear_nd(g, &format!("{name}.qkv"), &self.qkv, x);
        let qkv = onnx::reshape(g, &format!("{name}.qkv_heads"), &qkv, &[0, l, 3, h, d / h]);
        let qkv = onnx::transpose(g, &format!("{name}.qkv_t"), &qkv, &[2, 0, 3, 1, 4]);
        let mut qkv_parts = Vec::new();
        for (i, part) in ["q", "k", "v"].iter().enumerate() {
            let idx = g.initializer_i64(&format!("{name}.{part}_index"), &[], &[i as i64]);
            qkv_parts.push(g.node(
                "Gather",
                &format!("{name}.{part}"),
                &[&qkv, &idx],
                vec![Attr::int("axis", 0)],
            ));
        }
        let kt = onnx::transpose(g, &format!("{name}.k_t"), &qkv_parts[1], &[0, 1, 3, 2]);
        let scores = g.node(
            "MatMul",
            &format!("{name}.scores"),
            &[&qkv_parts[0], &kt],
            vec![],
        );
        let scale = ((d / h) as f64).powf(-0.5) as f32;
        let scale = g.initializer(&format!("{name}.scale"), &[], vec![scale]);
        let scores = g.node("Mul", &format!("{name}.scaled"), &[&scores, &scale], vec![]);
        let attn = g.node(
            "Softmax",
            &format!("{name}.softmax"),
            &[&scores],
            vec![Attr::int("axis", -1)],
        );
        let out = g.node(
            "MatMul",
            &format!("{name}.context"),
            &[&attn, &qkv_parts[2]],
            vec![],
        );
        let out = onnx::transpose(g, &format!("{name}.context_t"), &out, &[0, 2, 1, 3]);
        let out = onnx::reshape(g, &format!("{name}.merged"), &out, &[0, l, d]);
        onnx::linear_nd(g, &format!("{name}.proj"), &self.proj, &out)
    }
}

impl Block {
    /// Eval-mode ONNX nodes of the block under `name` (`blocks.N`): drop path is the identity.
    pub fn onnx_graph(&self, g: &mut GraphBuilder, name: &str, x: &str, l: i64, d: i64) -> String {
        let n1 = onnx::layer_norm(g, &format!("{name}.norm1"), &self.norm1, LAYER_NORM_EPS, x);
        let a = self.attn.onnx_graph(g, &format!("{name}.attn"), &n1, l, d);
        let x = g.node("Add", &format!("{name}.attn_residual"), &[x, &a], vec![]);
        let n2 = onnx::layer_norm(g, &format!("{name}.norm2"), &self.norm2, LAYER_NORM_EPS, &x);
        let m = onnx::linear_nd(g, &format!("{name}.mlp.fc1"), &self.mlp.fc1, &n2);
        let (lo, hi) = (
            g.initializer(&format!("{name}.mlp.relu6_min"), &[], vec![0.0]),
            g.initializer(&format!("{name}.mlp.relu6_max"), &[], vec![6.0]),
        );
        let m = g.node(
            "Clip",
            &format!("{name}.mlp.relu6"),
            &[&m, &lo, &hi],
            vec![],
        );
        let m = onnx::linear_nd(g, &format!("{name}.mlp.fc2"), &self.mlp.fc2, &m);
        g.node("Add", name, &[&x, &m], vec![])
    }
}

impl ViT {
    /// The eval-mode ONNX graph from the input value `x` to the embedding (the value
    /// [`onnx::OUTPUT`]): patch embedding, position embedding, blocks, final norm, flatten, the
    /// feature head. No masking and no drop path (eval mode).
    pub fn onnx_graph(&self, g: &mut GraphBuilder, x: &str) -> String {
        let (l, d) = (self.num_patches, self.embed_dim);
        let k = self.patch_embed.ws.size()[2];
        let patches = ConvGeometry {
            stride: k,
            pad: 0,
            groups: 1,
        };
        let x = onnx::conv(g, "patch_embed.proj", &self.patch_embed, x, patches);
        let x = onnx::reshape(g, "patch_embed.flatten", &x, &[0, d, l]);
        let x = onnx::transpose(g, "patch_embed.tokens", &x, &[0, 2, 1]);
        let pos = onnx::weight(g, "pos_embed", &self.pos_embed);
        let mut x = g.node("Add", "pos_embed.add", &[&x, &pos], vec![]);
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.onnx_graph(g, &format!("blocks.{i}"), &x, l, d);
        }
        let x = onnx::layer_norm(g, "norm", &self.norm, LAYER_NORM_EPS, &x);
        let x = onnx::flatten(g, "flatten", &x);
        let x = onnx::linear(g, "feature.0", &self.feature_fc1, &x);
        let x = self.feature_bn1.onnx(g, "feature.1", &x);
        let x = onnx::linear(g, "feature.2", &self.feature_fc2, &x);
        self.feature_bn2.onnx_as(g, "feature.3", onnx::OUTPUT, &x)
    }
}
