//! MobileFaceNet (Chen, Liu, Gao, Han, "MobileFaceNets: Efficient CNNs for Accurate Real-Time Face
//! Verification on Mobile Devices", CCBR 2018, arXiv 1804.07573) in the variant of insightface
//! arcface_torch `backbones/mobilefacenet.py` (`mbf`: blocks (1, 4, 6, 2), scale 2).
//!
//! Conv-BN-PReLU units, depthwise-separable bottlenecks (1x1 expand -> depthwise 3x3 -> linear 1x1,
//! residual when the stride is 1), a 1x1 `conv_sep` to 512 channels and a GDC head: a linear global
//! depthwise conv over the whole final map, flatten, bias-free Linear, BatchNorm1d (trainable weight).
//! The expansion widths (the `groups` of arcface_torch: 128, 256, 512) do not scale with `scale`.
//!
//! Deliberate generalisation: the GDC kernel is `ceil(input_size / 16)` (arcface_torch hard-codes
//! 7, the same at 112). Init as arcface_torch: conv and linear weights Kaiming-normal (fan-out,
//! ReLU gain), BN weight 1 / bias 0, PReLU 0.25.

use crate::onnx::{self, ConvGeometry};
use crate::{conv_cfg, maybe_channels_last, to_param_kind, BatchNorm, MobileFaceNetConfig, PRelu};
use facerec_onnx::GraphBuilder;
use tch::nn::{self, Module, ModuleT};
use tch::{Kind, Tensor};

/// `nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")`.
const KAIMING_FAN_OUT: nn::Init = nn::Init::Kaiming {
    dist: nn::init::NormalOrUniform::Normal,
    fan: nn::init::FanInOut::FanOut,
    non_linearity: nn::init::NonLinearity::ReLU,
};

/// Conv -> BN (-> PReLU): arcface_torch `ConvBlock` (with PReLU) or `LinearBlock` (without);
/// parameters `layers.0` (conv), `layers.1` (BN), `layers.2` (PReLU).
#[derive(Debug)]
pub struct ConvUnit {
    pub conv: nn::Conv2D,
    pub bn: BatchNorm,
    pub prelu: Option<PRelu>,
    /// The conv's kernel geometry.
    pub geometry: Geometry,
}

/// Kernel geometry of a [`ConvUnit`]: `k x k` kernel, stride, padding, groups.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub k: i64,
    pub stride: i64,
    pub pad: i64,
    pub groups: i64,
}

impl Geometry {
    const POINTWISE: Geometry = Geometry {
        k: 1,
        stride: 1,
        pad: 0,
        groups: 1,
    };
    fn k3(stride: i64, groups: i64) -> Self {
        Geometry {
            k: 3,
            stride,
            pad: 1,
            groups,
        }
    }
}

impl ConvUnit {
    /// `act`: PReLU after the BN (`ConvBlock`) or not (`LinearBlock`).
    pub fn new(p: &nn::Path, c_in: i64, c_out: i64, g: Geometry, act: bool) -> Self {
        let l = p / "layers";
        let cfg = conv_cfg(g.stride, g.pad, g.groups, KAIMING_FAN_OUT);
        ConvUnit {
            conv: nn::conv2d(&l / "0", c_in, c_out, g.k, cfg),
            bn: BatchNorm::new(&(&l / "1"), c_out, true),
            prelu: act.then(|| PRelu::new(&(&l / "2"), c_out)),
            geometry: g,
        }
    }

    /// The unit's eval-mode ONNX nodes under the module path `name` (`{name}.layers.{0,1,2}`);
    /// returns the output value.
    pub fn onnx_graph(&self, g: &mut GraphBuilder, name: &str, x: &str) -> String {
        let geo = ConvGeometry {
            stride: self.geometry.stride,
            pad: self.geometry.pad,
            groups: self.geometry.groups,
        };
        let x = onnx::conv(g, &format!("{name}.layers.0"), &self.conv, x, geo);
        let x = self.bn.onnx(g, &format!("{name}.layers.1"), &x);
        match &self.prelu {
            Some(a) => a.onnx(g, &format!("{name}.layers.2"), &x),
            None => x,
        }
    }
}

impl ModuleT for ConvUnit {
    /// # Shapes
    /// `xs`: `[B, C_in, H, W]`; output `[B, C_out, H', W']`.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let x = self.bn.forward_t(&self.conv.forward(xs), train);
        match &self.prelu {
            Some(a) => a.forward(&x),
            None => x,
        }
    }
}

/// arcface_torch `DepthWise`: 1x1 to `groups` channels, depthwise 3x3 (stride), linear 1x1 to
/// `c_out`; parameters `layers.{0,1,2}`; adds the input when `residual`.
#[derive(Debug)]
pub struct DepthWise {
    pub units: [ConvUnit; 3],
    pub residual: bool,
}

impl DepthWise {
    pub fn new(
        p: &nn::Path,
        c_in: i64,
        c_out: i64,
        stride: i64,
        groups: i64,
        residual: bool,
    ) -> Self {
        let l = p / "layers";
        DepthWise {
            units: [
                ConvUnit::new(&(&l / "0"), c_in, groups, Geometry::POINTWISE, true),
                ConvUnit::new(
                    &(&l / "1"),
                    groups,
                    groups,
                    Geometry::k3(stride, groups),
                    true,
                ),
                ConvUnit::new(&(&l / "2"), groups, c_out, Geometry::POINTWISE, false),
            ],
            residual,
        }
    }
}

impl DepthWise {
    /// The block's eval-mode ONNX nodes under `name` (`{name}.layers.{0,1,2}`, then the residual
    /// `Add` named `name`); returns the output value.
    pub fn onnx_graph(&self, g: &mut GraphBuilder, name: &str, x: &str) -> String {
        let mut y = x.to_string();
        for (k, u) in self.units.iter().enumerate() {
            y = u.onnx_graph(g, &format!("{name}.layers.{k}"), &y);
        }
        if self.residual {
            g.node("Add", name, &[&y, x], vec![])
        } else {
            y
        }
    }
}

impl ModuleT for DepthWise {
    /// # Shapes
    /// `xs`: `[B, C_in, H, W]`; output `[B, C_out, ceil(H / s), ceil(W / s)]`.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let x = self
            .units
            .iter()
            .fold(xs.shallow_clone(), |x, u| u.forward_t(&x, train));
        if self.residual {
            x + xs
        } else {
            x
        }
    }
}

/// One entry of arcface_torch's `layers` ModuleList.
// Built once per model and walked in order; boxing the larger variants would only add indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Stage {
    /// A plain `ConvBlock`.
    Unit(ConvUnit),
    /// A strided `DepthWise` (no residual).
    Down(DepthWise),
    /// `Residual`: stride-1 residual `DepthWise` blocks under `layers.{i}`.
    Residual(Vec<DepthWise>),
}

impl Stage {
    fn residual(p: &nn::Path, c: i64, n: usize, groups: i64) -> Self {
        let l = p / "layers";
        Stage::Residual(
            (0..n)
                .map(|i| DepthWise::new(&(&l / i), c, c, 1, groups, true))
                .collect(),
        )
    }
}

impl ModuleT for Stage {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self {
            Stage::Unit(u) => u.forward_t(xs, train),
            Stage::Down(d) => d.forward_t(xs, train),
            Stage::Residual(ds) => ds
                .iter()
                .fold(xs.shallow_clone(), |x, d| d.forward_t(&x, train)),
        }
    }
}

/// The MobileFaceNet backbone; parameter paths equal arcface_torch `state_dict` keys
/// (`layers.*`, `conv_sep.*`, `features.layers.{0,2,3}.*`).
#[derive(Debug)]
pub struct MobileFaceNet {
    pub stages: Vec<Stage>,
    pub conv_sep: ConvUnit,
    /// GDC: linear global depthwise conv (`features.layers.0`).
    pub gdc: ConvUnit,
    /// Bias-free Linear 512 -> embedding (`features.layers.2`).
    pub linear: nn::Linear,
    /// BatchNorm1d (`features.layers.3`), trainable weight.
    pub bn: BatchNorm,
    /// `model.channels_last`: the convolutions run on NHWC-strided activations.
    pub channels_last: bool,
}

impl MobileFaceNet {
    /// Builds the network under `p` (no validation: see [`crate::build`]).
    pub fn new(p: &nn::Path, cfg: &MobileFaceNetConfig) -> Self {
        let l = p / "layers";
        let (c1, c2) = (64 * cfg.scale, 128 * cfg.scale);
        let [b0, b1, b2, b3] = cfg.blocks;
        let stem = Geometry::k3(2, 1);
        let stage1 = if b0 == 1 {
            Stage::Unit(ConvUnit::new(
                &(&l / "1"),
                c1,
                c1,
                Geometry::k3(1, 64),
                true,
            ))
        } else {
            Stage::residual(&(&l / "1"), c1, b0, 128)
        };
        let stages = vec![
            Stage::Unit(ConvUnit::new(&(&l / "0"), 3, c1, stem, true)),
            stage1,
            Stage::Down(DepthWise::new(&(&l / "2"), c1, c1, 2, 128, false)),
            Stage::residual(&(&l / "3"), c1, b1, 128),
            Stage::Down(DepthWise::new(&(&l / "4"), c1, c2, 2, 256, false)),
            Stage::residual(&(&l / "5"), c2, b2, 256),
            Stage::Down(DepthWise::new(&(&l / "6"), c2, c2, 2, 512, false)),
            Stage::residual(&(&l / "7"), c2, b3, 256),
        ];
        let f = p / "features" / "layers";
        let side = cfg.final_side();
        let gdc = Geometry {
            k: side,
            stride: 1,
            pad: 0,
            groups: 512,
        };
        let lin_cfg = nn::LinearConfig {
            ws_init: KAIMING_FAN_OUT,
            bs_init: None,
            bias: false,
        };
        MobileFaceNet {
            stages,
            conv_sep: ConvUnit::new(&(p / "conv_sep"), c2, 512, Geometry::POINTWISE, true),
            gdc: ConvUnit::new(&(&f / "0"), 512, 512, gdc, false),
            linear: nn::linear(&f / "2", 512, cfg.embedding_size, lin_cfg),
            bn: BatchNorm::new(&(&f / "3"), cfg.embedding_size, true),
            channels_last: cfg.channels_last,
        }
    }

    /// Forward pass; with `autocast` the `layers` run under CUDA autocast in that dtype and `conv_sep` plus the
    /// GDC head in the parameter kind, as arcface_torch does.
    ///
    /// # Shapes
    /// `xs`: `[B, 3, S, S]` with `S = input_size`; output `[B, embedding_size]`.
    ///
    /// # Panics
    /// If the input side differs from the configured `input_size`.
    pub fn forward_amp(&self, xs: &Tensor, train: bool, autocast: Option<Kind>) -> Tensor {
        self.forward_neck_t(&self.forward_trunk_amp(xs, train, autocast), train)
    }

    /// The trunk: `layers` (under CUDA autocast with `autocast`), `conv_sep` and the GDC
    /// (`features.layers.0`), flattened; the input of the final Linear.
    ///
    /// # Shapes
    /// `xs`: `[B, 3, S, S]`; output `[B, 512]`.
    ///
    /// # Panics
    /// On a wrong input shape.
    pub fn forward_trunk_amp(&self, xs: &Tensor, train: bool, autocast: Option<Kind>) -> Tensor {
        let trunk = crate::autocast::with_cuda_autocast(autocast, || {
            self.stages
                .iter()
                .fold(self.lay_out_input(xs), |x, s| s.forward_t(&x, train))
        });
        let x = self
            .conv_sep
            .forward_t(&to_param_kind(trunk, &self.linear.ws), train);
        self.gdc.forward_t(&x, train).flatten(1, -1)
    }

    /// As [`crate::IResNet::lay_out_input`]: the input with NHWC strides when
    /// `model.channels_last` is on, else unchanged.
    pub fn lay_out_input(&self, xs: &Tensor) -> Tensor {
        maybe_channels_last(xs, self.channels_last)
    }

    /// The neck: the bias-free Linear (`features.layers.2`) then BatchNorm1d (`features.layers.3`).
    ///
    /// # Shapes
    /// `feat_bf`: `[B, 512]`; output `[B, embedding_size]`.
    ///
    /// # Panics
    /// If `feat_bf` is not `[B, 512]`.
    pub fn forward_neck_t(&self, feat_bf: &Tensor, train: bool) -> Tensor {
        self.bn.forward_t(&self.linear.forward(feat_bf), train)
    }
}

impl MobileFaceNet {
    /// The eval-mode ONNX graph from the input value `x` to the embedding (the value
    /// [`onnx::OUTPUT`]): `layers`, `conv_sep`, the GDC, flatten, Linear, BatchNorm1d.
    pub fn onnx_graph(&self, g: &mut GraphBuilder, x: &str) -> String {
        let mut x = x.to_string();
        for (i, stage) in self.stages.iter().enumerate() {
            let name = format!("layers.{i}");
            x = match stage {
                Stage::Unit(u) => u.onnx_graph(g, &name, &x),
                Stage::Down(d) => d.onnx_graph(g, &name, &x),
                Stage::Residual(ds) => ds.iter().enumerate().fold(x, |x, (k, d)| {
                    d.onnx_graph(g, &format!("{name}.layers.{k}"), &x)
                }),
            };
        }
        let x = self.conv_sep.onnx_graph(g, "conv_sep", &x);
        let x = self.gdc.onnx_graph(g, "features.layers.0", &x);
        let x = onnx::flatten(g, "features.layers.1", &x);
        let x = onnx::linear(g, "features.layers.2", &self.linear, &x);
        self.bn.onnx_as(g, "features.layers.3", onnx::OUTPUT, &x)
    }
}

impl ModuleT for MobileFaceNet {
    /// # Shapes
    /// `xs`: `[B, 3, S, S]`; output `[B, embedding_size]`.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.forward_amp(xs, train, None)
    }
}
