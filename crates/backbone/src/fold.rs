//! Folding eval-mode BatchNorm into the neighbouring convolution or linear layer, for inference
//! (`facerec eval`, `embed`, `cluster`, identification; `docs/backbones.md`, "BatchNorm folding").
//!
//! In eval mode a BatchNorm is a per-channel affine map `y = s·x + t` with
//! `s = γ / sqrt(σ² + ε)` and `t = β − μ·s` (running statistics `μ`, `σ²`). When it follows a
//! convolution or a linear layer, `BN(W * x + b) = (s·W) * x + (s·b + t)`: the layer takes the
//! scaled weight and a bias, and the BatchNorm pass over the activations disappears. A BatchNorm
//! *before* a linear layer folds too when nothing but a flatten lies between (iResNet's `bn2` into
//! `fc`): `W (s ⊙ x + t) + b = (W diag s) x + (W t + b)`.
//!
//! What is not folded, because it would not be exact: the BatchNorm that opens each iResNet block
//! (`bn1`) precedes a 3x3 convolution with zero padding. The padded border sees zeros of the BN's
//! *output*; a folded conv would see zeros of its *input*, i.e. `t` instead of 0 along the border,
//! so the first and last rows and columns would differ. It cannot go backwards either: the block's
//! input is also its unscaled identity shortcut. In the ViT only the feature head's two BatchNorm1d
//! fold; its LayerNorms are left as they are (their elementwise affine part could move into the
//! following Linear, a small saving not taken).
//!
//! The folded values are computed in f64 from the parameters and cast back to the parameter kind,
//! so the result equals the unfolded network up to f32 rounding (about 1e-6 relative; tested to
//! 1e-5 for every backbone type in `tests/fold.rs`). Folding replaces the layer's weight tensor and
//! marks the BatchNorm folded ([`BatchNorm::is_folded`]: its forward is then the identity); the
//! `VarStore` keeps the original, unfolded variables, so a folded backbone is for inference only:
//! training it panics, and saving its `VarStore` saves the unfolded model (which is consistent).

use crate::iresnet::IBasicBlock;
use crate::mobilefacenet::{ConvUnit, DepthWise, Stage};
use crate::{Backbone, BatchNorm, IResNet, MobileFaceNet, ViT};
use tch::{nn, Kind, Tensor};

/// How many BatchNorms a fold removed and how many remain (they cannot be folded exactly).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FoldReport {
    /// BatchNorms folded into a convolution or a linear layer.
    pub folded: usize,
    /// BatchNorms left in place.
    pub kept: usize,
}

impl std::fmt::Display for FoldReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} BatchNorms folded into the preceding conv/linear, {} kept",
            self.folded, self.kept
        )
    }
}

impl BatchNorm {
    /// The eval-mode affine map `(s, t)` in f64: `s = weight / sqrt(running_var + eps)`,
    /// `t = bias − running_mean · s`.
    ///
    /// # Shapes
    /// Both `[C]`.
    pub fn eval_affine(&self) -> (Tensor, Tensor) {
        let f64_ = |t: &Tensor| t.detach().to_kind(Kind::Double);
        let s = f64_(&self.weight) / (f64_(&self.running_var) + self.eps).sqrt();
        let t = f64_(&self.bias) - f64_(&self.running_mean) * &s;
        (s, t)
    }
}

/// `bn(conv(x))` as one convolution: the weight scaled per output channel, the bias `s·b + t`.
/// Works for grouped and depthwise convolutions (the output channel is the weight's first axis).
/// Returns false (and changes nothing) if `bn` is already folded.
///
/// # Panics
/// If `bn` does not have one channel per output channel of `conv`.
pub fn fold_into_conv(conv: &mut nn::Conv2D, bn: &mut BatchNorm) -> bool {
    if bn.is_folded() {
        return false;
    }
    let _guard = tch::no_grad_guard();
    let (s, t) = bn.eval_affine();
    let c = s.size()[0];
    assert_eq!(conv.ws.size()[0], c, "fold_into_conv: BN channels");
    let kind = conv.ws.kind();
    let w = conv.ws.detach().to_kind(Kind::Double) * s.view([c, 1, 1, 1]);
    let b = match &conv.bs {
        Some(b) => b.detach().to_kind(Kind::Double) * &s + &t,
        None => t,
    };
    conv.ws = w.to_kind(kind);
    conv.bs = Some(b.to_kind(kind));
    bn.folded = true;
    true
}

/// `bn(linear(x))` (BatchNorm1d after a Linear) as one Linear: rows scaled, bias `s·b + t`.
/// Returns false if `bn` is already folded.
///
/// # Panics
/// If `bn` does not have one channel per output of `lin`.
pub fn fold_into_linear(lin: &mut nn::Linear, bn: &mut BatchNorm) -> bool {
    if bn.is_folded() {
        return false;
    }
    let _guard = tch::no_grad_guard();
    let (s, t) = bn.eval_affine();
    let c = s.size()[0];
    assert_eq!(lin.ws.size()[0], c, "fold_into_linear: BN channels");
    let kind = lin.ws.kind();
    let w = lin.ws.detach().to_kind(Kind::Double) * s.view([c, 1]);
    let b = match &lin.bs {
        Some(b) => b.detach().to_kind(Kind::Double) * &s + &t,
        None => t,
    };
    lin.ws = w.to_kind(kind);
    lin.bs = Some(b.to_kind(kind));
    bn.folded = true;
    true
}

/// `linear(flatten(bn(x)))` for `x: [B, C, H, W]` flattened in (C, H, W) order as one Linear:
/// column `c·HW + k` of the weight scaled by `s_c`, the bias `b + W t` with `t` repeated `HW` times
/// per channel. Returns false if `bn` is already folded.
///
/// # Panics
/// If the Linear's input width is not a multiple of the BN's channel count.
pub fn fold_before_linear(bn: &mut BatchNorm, lin: &mut nn::Linear) -> bool {
    if bn.is_folded() {
        return false;
    }
    let _guard = tch::no_grad_guard();
    let (s, t) = bn.eval_affine();
    let (c, fan_in) = (s.size()[0], lin.ws.size()[1]);
    assert!(
        fan_in % c == 0,
        "fold_before_linear: Linear input {fan_in} is not a multiple of {c} channels"
    );
    let hw = fan_in / c;
    let s_in = s.repeat_interleave_self_int(hw, 0, None);
    let t_in = t.repeat_interleave_self_int(hw, 0, None);
    let kind = lin.ws.kind();
    let w = lin.ws.detach().to_kind(Kind::Double);
    let shift = w.matmul(&t_in);
    let b = match &lin.bs {
        Some(b) => b.detach().to_kind(Kind::Double) + shift,
        None => shift,
    };
    lin.ws = (w * s_in.view([1, fan_in])).to_kind(kind);
    lin.bs = Some(b.to_kind(kind));
    bn.folded = true;
    true
}

impl FoldReport {
    fn count(&mut self, folded: bool) {
        if folded {
            self.folded += 1;
        }
    }
    fn keep(&mut self, bn: &BatchNorm) {
        if !bn.is_folded() {
            self.kept += 1;
        }
    }
}

impl Backbone {
    /// Folds every BatchNorm that follows a convolution or a linear layer (and iResNet's `bn2`
    /// into `fc`) into that layer, for inference; see the module doc. Folding twice does nothing
    /// more (the report then counts 0 folded).
    ///
    /// After this the backbone is for eval-mode forwards only: a training-mode forward panics
    /// at the first folded BatchNorm.
    pub fn fold_batch_norms(&mut self) -> FoldReport {
        let mut r = FoldReport::default();
        match self {
            Backbone::IResNet(m) => m.fold_batch_norms(&mut r),
            Backbone::MobileFaceNet(m) => m.fold_batch_norms(&mut r),
            Backbone::ViT(m) => m.fold_batch_norms(&mut r),
        }
        r
    }
}

impl IBasicBlock {
    fn fold_batch_norms(&mut self, r: &mut FoldReport) {
        // bn1 precedes a zero-padded conv: not exact, kept.
        r.keep(&self.bn1);
        r.count(fold_into_conv(&mut self.conv1, &mut self.bn2));
        r.count(fold_into_conv(&mut self.conv2, &mut self.bn3));
        if let Some((conv, bn)) = &mut self.downsample {
            r.count(fold_into_conv(conv, bn));
        }
    }
}

impl IResNet {
    fn fold_batch_norms(&mut self, r: &mut FoldReport) {
        r.count(fold_into_conv(&mut self.conv1, &mut self.bn1));
        for block in self.stages.iter_mut().flatten() {
            block.fold_batch_norms(r);
        }
        // The order matters: bn2 acts on fc's input, features on its output.
        r.count(fold_before_linear(&mut self.bn2, &mut self.fc));
        r.count(fold_into_linear(&mut self.fc, &mut self.features));
    }
}

impl ConvUnit {
    fn fold_batch_norms(&mut self, r: &mut FoldReport) {
        r.count(fold_into_conv(&mut self.conv, &mut self.bn));
    }
}

impl DepthWise {
    fn fold_batch_norms(&mut self, r: &mut FoldReport) {
        for u in &mut self.units {
            u.fold_batch_norms(r);
        }
    }
}

impl MobileFaceNet {
    fn fold_batch_norms(&mut self, r: &mut FoldReport) {
        for stage in &mut self.stages {
            match stage {
                Stage::Unit(u) => u.fold_batch_norms(r),
                Stage::Down(d) => d.fold_batch_norms(r),
                Stage::Residual(ds) => ds.iter_mut().for_each(|d| d.fold_batch_norms(r)),
            }
        }
        self.conv_sep.fold_batch_norms(r);
        self.gdc.fold_batch_norms(r);
        r.count(fold_into_linear(&mut self.linear, &mut self.bn));
    }
}

impl ViT {
    fn fold_batch_norms(&mut self, r: &mut FoldReport) {
        r.count(fold_into_linear(
            &mut self.feature_fc1,
            &mut self.feature_bn1,
        ));
        r.count(fold_into_linear(
            &mut self.feature_fc2,
            &mut self.feature_bn2,
        ));
    }
}
