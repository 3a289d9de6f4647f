//! iResNet, the improved residual network of ArcFace (Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive
//! Angular Margin Loss for Deep Face Recognition", CVPR 2019, arXiv 1801.07698; the block is
//! "LResNet-E-IR" without SE) as built by insightface arcface_torch `backbones/iresnet.py` (SPEC 1(d)).
//!
//! Stem conv3x3 -> BN -> PReLU; four stages whose first block has stride 2 (112 -> 56 -> 28 -> 14 -> 7);
//! each `IBasicBlock` is BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN plus the identity or a
//! conv1x1/BN downsample, with no activation after the addition. Head: BN2d -> flatten (C, H, W) ->
//! dropout -> Linear -> BatchNorm1d whose weight is fixed at 1.
//!
//! Deliberate generalisations (identical for the presets): stage widths and the input side are
//! configurable, and `fc` takes `widths[3] * side * side` inputs with `side = ceil(input / 16)`
//! (arcface_torch hard-codes 512 * 7 * 7).

use crate::onnx::{self, ConvGeometry};
use crate::{conv_cfg, maybe_channels_last, to_param_kind, BatchNorm, IResNetConfig, PRelu};
use facerec_onnx::GraphBuilder;
use tch::nn::{self, Module, ModuleT};
use tch::{Kind, Tensor};

/// Conv weights are N(0, 0.1) (arcface_torch `nn.init.normal_(m.weight, 0, 0.1)`).
const CONV_INIT: nn::Init = nn::Init::Randn {
    mean: 0.0,
    stdev: 0.1,
};

/// One improved residual block; parameters `bn1, conv1, bn2, prelu, conv2, bn3, downsample.{0,1}`.
#[derive(Debug)]
pub struct IBasicBlock {
    pub bn1: BatchNorm,
    pub conv1: nn::Conv2D,
    pub bn2: BatchNorm,
    pub prelu: PRelu,
    pub conv2: nn::Conv2D,
    pub bn3: BatchNorm,
    /// conv1x1(stride) and BN, present when the stride or the channel count changes.
    pub downsample: Option<(nn::Conv2D, BatchNorm)>,
    /// Stride of `conv2` and of the downsample conv.
    pub stride: i64,
}

impl IBasicBlock {
    /// A block from `c_in` to `c_out` channels whose second conv has `stride`.
    pub fn new(p: &nn::Path, c_in: i64, c_out: i64, stride: i64) -> Self {
        let downsample = (stride != 1 || c_in != c_out).then(|| {
            let d = p / "downsample";
            (
                nn::conv2d(&d / "0", c_in, c_out, 1, conv_cfg(stride, 0, 1, CONV_INIT)),
                BatchNorm::new(&(&d / "1"), c_out, true),
            )
        });
        IBasicBlock {
            bn1: BatchNorm::new(&(p / "bn1"), c_in, true),
            conv1: nn::conv2d(p / "conv1", c_in, c_out, 3, conv_cfg(1, 1, 1, CONV_INIT)),
            bn2: BatchNorm::new(&(p / "bn2"), c_out, true),
            prelu: PRelu::new(&(p / "prelu"), c_out),
            conv2: nn::conv2d(
                p / "conv2",
                c_out,
                c_out,
                3,
                conv_cfg(stride, 1, 1, CONV_INIT),
            ),
            bn3: BatchNorm::new(&(p / "bn3"), c_out, true),
            downsample,
            stride,
        }
    }
}

impl ModuleT for IBasicBlock {
    /// # Shapes
    /// `xs`: `[B, C_in, H, W]`; output `[B, C_out, ceil(H / s), ceil(W / s)]`.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let out = self.bn1.forward_t(xs, train);
        let out = self.conv1.forward(&out);
        let out = self.prelu.forward(&self.bn2.forward_t(&out, train));
        let out = self.bn3.forward_t(&self.conv2.forward(&out), train);
        match &self.downsample {
            Some((conv, bn)) => out + bn.forward_t(&conv.forward(xs), train),
            None => out + xs,
        }
    }
}

impl IBasicBlock {
    /// The block's eval-mode ONNX nodes under the module path `name` (e.g. `layer1.0`); returns
    /// the output value (named `name`).
    pub fn onnx_graph(&self, g: &mut GraphBuilder, name: &str, x: &str) -> String {
        let geo = |stride, pad| ConvGeometry {
            stride,
            pad,
            groups: 1,
        };
        let out = self.bn1.onnx(g, &format!("{name}.bn1"), x);
        let out = onnx::conv(g, &format!("{name}.conv1"), &self.conv1, &out, geo(1, 1));
        let out = self.bn2.onnx(g, &format!("{name}.bn2"), &out);
        let out = self.prelu.onnx(g, &format!("{name}.prelu"), &out);
        let out = onnx::conv(
            g,
            &format!("{name}.conv2"),
            &self.conv2,
            &out,
            geo(self.stride, 1),
        );
        let out = self.bn3.onnx(g, &format!("{name}.bn3"), &out);
        let shortcut = match &self.downsample {
            Some((conv, bn)) => {
                let d = onnx::conv(
                    g,
                    &format!("{name}.downsample.0"),
                    conv,
                    x,
                    geo(self.stride, 0),
                );
                bn.onnx(g, &format!("{name}.downsample.1"), &d)
            }
            None => x.to_string(),
        };
        g.node("Add", name, &[&out, &shortcut], vec![])
    }
}

/// The iResNet backbone; parameter paths equal arcface_torch `state_dict` keys.
#[derive(Debug)]
pub struct IResNet {
    pub conv1: nn::Conv2D,
    pub bn1: BatchNorm,
    pub prelu: PRelu,
    /// `layer1` .. `layer4`.
    pub stages: Vec<Vec<IBasicBlock>>,
    pub bn2: BatchNorm,
    pub dropout: f64,
    pub fc: nn::Linear,
    /// BatchNorm1d with a frozen unit weight and a trainable bias.
    pub features: BatchNorm,
    /// `model.channels_last`: the trunk runs on NHWC-strided activations.
    pub channels_last: bool,
}

impl IResNet {
    /// Builds the network under `p` (no validation: see [`crate::build`]).
    ///
    /// # Panics
    /// If `cfg` names neither a valid `depth` nor `layers`.
    pub fn new(p: &nn::Path, cfg: &IResNetConfig) -> Self {
        let w = cfg.widths;
        let mut c_in = w[0];
        let stages = cfg
            .blocks()
            .iter()
            .zip(w)
            .enumerate()
            .map(|(i, (&n, c_out))| {
                let sp = p / format!("layer{}", i + 1);
                (0..n)
                    .map(|j| {
                        let stride = if j == 0 { 2 } else { 1 };
                        let block = IBasicBlock::new(&(&sp / j), c_in, c_out, stride);
                        c_in = c_out;
                        block
                    })
                    .collect()
            })
            .collect();
        let side = cfg.final_side();
        let fc_in = w[3] * side * side;
        // PyTorch's Linear default: weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        let bound = 1.0 / (fc_in as f64).sqrt();
        let uniform = nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let fc_cfg = nn::LinearConfig {
            ws_init: uniform,
            bs_init: Some(uniform),
            bias: true,
        };
        IResNet {
            conv1: nn::conv2d(p / "conv1", 3, w[0], 3, conv_cfg(1, 1, 1, CONV_INIT)),
            bn1: BatchNorm::new(&(p / "bn1"), w[0], true),
            prelu: PRelu::new(&(p / "prelu"), w[0]),
            stages,
            bn2: BatchNorm::new(&(p / "bn2"), w[3], true),
            dropout: cfg.dropout,
            fc: nn::linear(p / "fc", fc_in, cfg.embedding_size, fc_cfg),
            features: BatchNorm::new(&(p / "features"), cfg.embedding_size, false),
            channels_last: cfg.channels_last,
        }
    }

    /// Forward pass; with `autocast` the trunk (stem, stages, `bn2`) runs under CUDA autocast in that dtype and
    /// `fc`/`features` in the parameter kind, as arcface_torch does.
    ///
    /// Equals `forward_neck_t(forward_trunk_amp(xs, train, autocast).dropout(dropout, train), train)`.
    ///
    /// # Shapes
    /// `xs`: `[B, 3, S, S]` with `S = input_size`; output `[B, embedding_size]`.
    ///
    /// # Panics
    /// If the input side differs from the configured `input_size` (the `fc` width would not match).
    pub fn forward_amp(&self, xs: &Tensor, train: bool, autocast: Option<Kind>) -> Tensor {
        let x = self
            .forward_trunk_amp(xs, train, autocast)
            .dropout(self.dropout, train);
        self.forward_neck_t(&x, train)
    }

    /// The trunk: stem, stages and `bn2`, flattened in (C, H, W) order, *before* the dropout;
    /// with `autocast` under CUDA autocast in that dtype, cast back to the parameter kind.
    ///
    /// # Shapes
    /// `xs`: `[B, 3, S, S]`; output `[B, widths[3] * side * side]` (`[B, 25088]` for the presets).
    ///
    /// # Panics
    /// On a wrong input shape.
    pub fn forward_trunk_amp(&self, xs: &Tensor, train: bool, autocast: Option<Kind>) -> Tensor {
        let trunk = crate::autocast::with_cuda_autocast(autocast, || {
            let xs = self.lay_out_input(xs);
            let mut x = self
                .prelu
                .forward(&self.bn1.forward_t(&self.conv1.forward(&xs), train));
            for block in self.stages.iter().flatten() {
                x = block.forward_t(&x, train);
            }
            self.bn2.forward_t(&x, train).flatten(1, -1)
        });
        to_param_kind(trunk, &self.fc.ws)
    }

    /// The input as the trunk's first layer receives it: with NHWC strides when
    /// `model.channels_last` is on, else unchanged (same shape and values either way). Anything
    /// that runs the layers one by one (the dry run's activation walk) starts from this.
    pub fn lay_out_input(&self, xs: &Tensor) -> Tensor {
        maybe_channels_last(xs, self.channels_last)
    }

    /// The neck: `fc` then the `features` BatchNorm1d (batch statistics when `train`). No dropout:
    /// the caller applies its own (CoReFace draws two masks per image here).
    ///
    /// # Shapes
    /// `feat_bf`: `[B, F]` with `F` the trunk width; output `[B, embedding_size]`.
    ///
    /// # Panics
    /// If `F` differs from the `fc` input width.
    pub fn forward_neck_t(&self, feat_bf: &Tensor, train: bool) -> Tensor {
        self.features.forward_t(&self.fc.forward(feat_bf), train)
    }
}

impl IResNet {
    /// The eval-mode ONNX graph from the input value `x` to the embedding (the value
    /// [`onnx::OUTPUT`]): stem, blocks, `bn2`, flatten, `fc`, `features` (no dropout: eval mode).
    pub fn onnx_graph(&self, g: &mut GraphBuilder, x: &str) -> String {
        let stem = ConvGeometry {
            stride: 1,
            pad: 1,
            groups: 1,
        };
        let x = onnx::conv(g, "conv1", &self.conv1, x, stem);
        let x = self.bn1.onnx(g, "bn1", &x);
        let mut x = self.prelu.onnx(g, "prelu", &x);
        for (i, stage) in self.stages.iter().enumerate() {
            for (j, block) in stage.iter().enumerate() {
                x = block.onnx_graph(g, &format!("layer{}.{j}", i + 1), &x);
            }
        }
        let x = self.bn2.onnx(g, "bn2", &x);
        let x = onnx::flatten(g, "flatten", &x);
        let x = onnx::linear(g, "fc", &self.fc, &x);
        self.features.onnx_as(g, "features", onnx::OUTPUT, &x)
    }
}

impl ModuleT for IResNet {
    /// # Shapes
    /// `xs`: `[B, 3, S, S]`; output `[B, embedding_size]`.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.forward_amp(xs, train, None)
    }
}
