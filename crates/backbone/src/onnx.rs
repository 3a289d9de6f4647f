//! The backbones as ONNX graphs (opset 17), for `facerec export --format onnx` (docs/export.md).
//!
//! Each network describes its own eval-mode graph with [`facerec_onnx::GraphBuilder`]
//! (`IResNet::onnx_graph`, `MobileFaceNet::onnx_graph`); this file holds the layers they share
//! and the entry point [`Backbone::to_onnx`]. The graph's interface is arcface_torch's (its
//! `torch2onnx.py`): the input `input` is `[batch, 3, S, S]` float32 RGB normalised as
//! `(x / 255 - 0.5) / 0.5`, the output `embedding` is `[batch, D]`, not L2-normalised; the batch
//! axis is dynamic.
//!
//! Layers map one to one, in eval mode: `Conv` (no bias, explicit pads), `BatchNormalization`
//! (running statistics, epsilon 1e-5; kept as a node rather than folded into a conv, because
//! iResNet's blocks open with a BN that has no conv before it and the node is exact),
//! `PRelu` (slope `[C, 1, 1]`), `Add`, `Flatten`, `Gemm` (`transB = 1`, the Linear weight as
//! stored), and `BatchNormalization` again for BatchNorm1d on `[batch, D]`. Dropout is the
//! identity in eval mode and is left out. The ViT adds `Reshape`/`Transpose` (tokens and heads),
//! `LayerNormalization`, `MatMul` (a Linear on tokens, with a constant `Transpose` of the stored
//! weight, and the attention products), `Gather` (q, k, v), `Mul` (the score scale), `Softmax` and
//! `Clip(0, 6)` (ReLU6); training-time masking and drop path are not in the eval graph.
//! Initializer names are our (= arcface_torch's)
//! `state_dict` keys; value names are the module paths.

use facerec_onnx::{Attr, Dim, GraphBuilder};
use tch::{nn, Device, Kind, Tensor};

use crate::{Backbone, BatchNorm, PRelu};

/// Name of the graph input.
pub const INPUT: &str = "input";
/// Name of the graph output.
pub const OUTPUT: &str = "embedding";
/// Name of the dynamic batch axis.
pub const BATCH: &str = "batch";

/// The values of a tensor as row-major float32 (copied to the CPU).
pub(crate) fn values(t: &Tensor) -> Vec<f32> {
    let flat = t
        .detach()
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous()
        .view(-1);
    Vec::<f32>::try_from(&flat).expect("a float tensor converts to Vec<f32>")
}

/// A float initializer holding `t` under `name`, with `t`'s shape.
pub(crate) fn weight(g: &mut GraphBuilder, name: &str, t: &Tensor) -> String {
    g.initializer(name, &t.size(), values(t))
}

/// Kernel geometry of a `Conv` node (square kernel, stride and padding).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvGeometry {
    pub stride: i64,
    pub pad: i64,
    pub groups: i64,
}

/// `Conv` with `conv`'s weight (and bias, if any) stored as `{name}.weight` / `{name}.bias`.
pub(crate) fn conv(
    g: &mut GraphBuilder,
    name: &str,
    conv: &nn::Conv2D,
    x: &str,
    geo: ConvGeometry,
) -> String {
    let size = conv.ws.size();
    let w = weight(g, &format!("{name}.weight"), &conv.ws);
    let mut inputs = vec![x.to_string(), w];
    if let Some(b) = &conv.bs {
        inputs.push(weight(g, &format!("{name}.bias"), b));
    }
    let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    let p = geo.pad;
    g.node(
        "Conv",
        name,
        &inputs,
        vec![
            Attr::ints("kernel_shape", &size[2..]),
            Attr::ints("strides", &[geo.stride, geo.stride]),
            Attr::ints("pads", &[p, p, p, p]),
            Attr::ints("dilations", &[1, 1]),
            Attr::int("group", geo.groups),
        ],
    )
}

impl BatchNorm {
    /// Eval-mode `BatchNormalization` on `[N, C, ...]` with this layer's running statistics.
    pub(crate) fn onnx(&self, g: &mut GraphBuilder, name: &str, x: &str) -> String {
        self.onnx_as(g, name, name, x)
    }

    /// As [`BatchNorm::onnx`] with the parameters under `name` and the output value named `out`.
    /// A folded layer ([`BatchNorm::is_folded`]) is an `Identity` (its conv or linear carries it).
    pub(crate) fn onnx_as(&self, g: &mut GraphBuilder, name: &str, out: &str, x: &str) -> String {
        if self.is_folded() {
            return g.node("Identity", out, &[x], vec![]);
        }
        let scale = weight(g, &format!("{name}.weight"), &self.weight);
        let bias = weight(g, &format!("{name}.bias"), &self.bias);
        let mean = weight(g, &format!("{name}.running_mean"), &self.running_mean);
        let var = weight(g, &format!("{name}.running_var"), &self.running_var);
        g.node(
            "BatchNormalization",
            out,
            &[x, &scale, &bias, &mean, &var],
            vec![Attr::float("epsilon", self.eps as f32)],
        )
    }
}

impl PRelu {
    /// `PRelu` on `[N, C, H, W]`: the slope is stored as `[C, 1, 1]` so it broadcasts per channel.
    pub(crate) fn onnx(&self, g: &mut GraphBuilder, name: &str, x: &str) -> String {
        let c = self.weight.size()[0];
        let slope = g.initializer(&format!("{name}.weight"), &[c, 1, 1], values(&self.weight));
        g.node("PRelu", name, &[x, &slope], vec![])
    }
}

/// `Gemm` computing `x W^T (+ b)` with the Linear weight `[out, in]` as stored.
pub(crate) fn linear(g: &mut GraphBuilder, name: &str, lin: &nn::Linear, x: &str) -> String {
    let w = weight(g, &format!("{name}.weight"), &lin.ws);
    let mut inputs = vec![x.to_string(), w];
    if let Some(b) = &lin.bs {
        inputs.push(weight(g, &format!("{name}.bias"), b));
    }
    let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    g.node("Gemm", name, &inputs, vec![Attr::int("transB", 1)])
}

/// A Linear on `[..., in]` (a token sequence): `MatMul(x, Transpose(W))` plus `Add(b)`. The weight
/// stays `[out, in]` under its `state_dict` name; the `Transpose` node is constant and
/// onnxruntime folds it.
pub(crate) fn linear_nd(g: &mut GraphBuilder, name: &str, lin: &nn::Linear, x: &str) -> String {
    let w = weight(g, &format!("{name}.weight"), &lin.ws);
    let wt = g.node(
        "Transpose",
        &format!("{name}.weight_t"),
        &[&w],
        vec![Attr::ints("perm", &[1, 0])],
    );
    let y = g.node("MatMul", &format!("{name}.matmul"), &[x, &wt], vec![]);
    match &lin.bs {
        Some(b) => {
            let b = weight(g, &format!("{name}.bias"), b);
            g.node("Add", name, &[&y, &b], vec![])
        }
        None => y,
    }
}

/// `LayerNormalization` over the last axis (opset 17) with `ln`'s weight and bias.
///
/// # Panics
/// If `ln` has no affine parameters.
pub(crate) fn layer_norm(
    g: &mut GraphBuilder,
    name: &str,
    ln: &nn::LayerNorm,
    eps: f64,
    x: &str,
) -> String {
    let w = weight(
        g,
        &format!("{name}.weight"),
        ln.ws.as_ref().expect("an affine LayerNorm"),
    );
    let b = weight(
        g,
        &format!("{name}.bias"),
        ln.bs.as_ref().expect("an affine LayerNorm"),
    );
    g.node(
        "LayerNormalization",
        name,
        &[x, &w, &b],
        vec![Attr::int("axis", -1), Attr::float("epsilon", eps as f32)],
    )
}

/// `Reshape` to `shape` (int64; 0 copies the input's dimension, -1 is inferred).
pub(crate) fn reshape(g: &mut GraphBuilder, name: &str, x: &str, shape: &[i64]) -> String {
    let s = g.initializer_i64(&format!("{name}.shape"), &[shape.len() as i64], shape);
    g.node("Reshape", name, &[x, &s], vec![])
}

/// `Transpose` with `perm`.
pub(crate) fn transpose(g: &mut GraphBuilder, name: &str, x: &str, perm: &[i64]) -> String {
    g.node("Transpose", name, &[x], vec![Attr::ints("perm", perm)])
}

/// `Flatten(axis = 1)`: `[N, C, H, W]` to `[N, C * H * W]` in (C, H, W) order, as `flatten(1, -1)`.
pub(crate) fn flatten(g: &mut GraphBuilder, name: &str, x: &str) -> String {
    g.node("Flatten", name, &[x], vec![Attr::int("axis", 1)])
}

impl Backbone {
    /// The eval-mode graph of this backbone for inputs of side `input_size` (see the module docs).
    ///
    /// # Panics
    /// If a parameter is not a floating-point tensor.
    pub fn onnx_graph(&self, input_size: i64) -> GraphBuilder {
        let embedding_size = match self {
            Backbone::IResNet(m) => m.fc.ws.size()[0],
            Backbone::MobileFaceNet(m) => m.linear.ws.size()[0],
            Backbone::ViT(m) => m.feature_fc2.ws.size()[0],
        };
        let mut g = GraphBuilder::new(match self {
            Backbone::IResNet(_) => "iresnet",
            Backbone::MobileFaceNet(_) => "mobilefacenet",
            Backbone::ViT(_) => "vit",
        });
        g.set_doc(&format!(
            "facerec backbone, eval mode. Input `{INPUT}`: [batch, 3, {s}, {s}] float32 RGB, \
             (pixel / 255 - 0.5) / 0.5. Output `{OUTPUT}`: [batch, {embedding_size}], not \
             L2-normalised.",
            s = input_size
        ));
        let batch = || Dim::Named(BATCH.into());
        let x = g.input(
            INPUT,
            &[
                batch(),
                Dim::Fixed(3),
                Dim::Fixed(input_size),
                Dim::Fixed(input_size),
            ],
        );
        let y = match self {
            Backbone::IResNet(m) => m.onnx_graph(&mut g, &x),
            Backbone::MobileFaceNet(m) => m.onnx_graph(&mut g, &x),
            Backbone::ViT(m) => m.onnx_graph(&mut g, &x),
        };
        assert_eq!(y, OUTPUT, "the last node must be named {OUTPUT}");
        g.output(&y, &[batch(), Dim::Fixed(embedding_size)]);
        g
    }

    /// The `.onnx` file's bytes: [`Backbone::onnx_graph`] encoded as a `ModelProto` (IR 8, opset
    /// 17, producer `facerec`).
    ///
    /// # Panics
    /// As [`Backbone::onnx_graph`].
    pub fn to_onnx(&self, input_size: i64) -> Vec<u8> {
        self.onnx_graph(input_size).into_model_bytes("facerec")
    }
}
