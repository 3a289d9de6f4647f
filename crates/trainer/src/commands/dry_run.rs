//! `facerec train --dry-run` (`cargo xtask train --dry-run`): what a configured run would hold in
//! memory, without training and without creating a run directory.
//!
//! Reported:
//! - backbone parameters (trainable, frozen such as iResNet's `features.weight`) and BN buffers,
//!   counted on the backbone built from the config;
//! - classifier parameters `C x D` (plus `C` biases for the softmax head) and their fp32 memory:
//!   weights + optimiser state (one momentum buffer for SGD with momentum) + gradients. The
//!   gradient is a dense `[C, D]` tensor even with Partial FC, because the sampled rows are
//!   gathered with `index_select`, whose backward writes into a gradient of the full matrix;
//! - Partial FC: `C' = max(1, floor(r * C))` classes per step (or the batch's distinct labels when
//!   there are more of them), the `[C', D]` normalised weight copy and one `[B, C']` logits tensor;
//! - activations per batch, **measured**: the backbone runs one image (eval mode, no autograd)
//!   layer by layer, and the element counts of every layer output (conv, BN, PReLU, residual add,
//!   dropout when `p > 0`, fc, the final BN) are summed, then multiplied by the batch size and 4
//!   bytes (fp32). Views (flatten) are not counted. Autograd keeps roughly these tensors for the
//!   backward pass; cuDNN workspaces, the allocator's cache and the prefetched input batches are
//!   not included. The amp figure counts the autocast trunk at 2 bytes per element.
//!
//! The layer walk mirrors the backbones' `forward`; a test checks that it returns exactly the
//! backbone's output, so it cannot silently drift from the real network.

use std::fmt;

use anyhow::{Context, Result};
use facerec_backbone::mobilefacenet::{ConvUnit, DepthWise, Stage};
use facerec_backbone::vit::drop_path;
use facerec_backbone::{Backbone, BackboneConfig, IResNet, MobileFaceNet, ViT};
use tch::nn::{self, Module, ModuleT};
use tch::{Device, Kind, Tensor};

use crate::config::{Config, OptimConfig, Sharding};

/// Bytes per fp32 value.
const F32: i64 = 4;

/// Element counts of the layer outputs for one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActivationCount {
    /// All layer outputs.
    pub total: i64,
    /// The part computed in the autocast trunk (iResNet: stem, stages, `bn2`; MobileFaceNet:
    /// `layers`; ViT: the `qkv` and `proj` outputs, the only layers arcface_torch autocasts).
    pub trunk: i64,
}

/// Sums the element counts of the tensors it keeps.
struct Meter {
    total: i64,
}

impl Meter {
    fn keep(&mut self, t: Tensor) -> Tensor {
        self.total += t.numel() as i64;
        t
    }

    fn unit(&mut self, u: &ConvUnit, x: &Tensor) -> Tensor {
        let x = self.keep(u.conv.forward(x));
        let x = self.keep(u.bn.forward_t(&x, false));
        match &u.prelu {
            Some(a) => self.keep(a.forward(&x)),
            None => x,
        }
    }

    fn depthwise(&mut self, d: &DepthWise, x: &Tensor) -> Tensor {
        let y = d
            .units
            .iter()
            .fold(x.shallow_clone(), |y, u| self.unit(u, &y));
        if d.residual {
            self.keep(y + x)
        } else {
            y
        }
    }

    fn iresnet(&mut self, m: &IResNet, xs: &Tensor) -> (Tensor, i64) {
        let x = self.keep(m.conv1.forward(&m.lay_out_input(xs)));
        let x = self.keep(m.bn1.forward_t(&x, false));
        let mut x = self.keep(m.prelu.forward(&x));
        for b in m.stages.iter().flatten() {
            let o = self.keep(b.bn1.forward_t(&x, false));
            let o = self.keep(b.conv1.forward(&o));
            let o = self.keep(b.bn2.forward_t(&o, false));
            let o = self.keep(b.prelu.forward(&o));
            let o = self.keep(b.conv2.forward(&o));
            let o = self.keep(b.bn3.forward_t(&o, false));
            let identity = match &b.downsample {
                Some((conv, bn)) => {
                    let d = self.keep(conv.forward(&x));
                    self.keep(bn.forward_t(&d, false))
                }
                None => x.shallow_clone(),
            };
            x = self.keep(o + identity);
        }
        let x = self.keep(m.bn2.forward_t(&x, false)).flatten(1, -1);
        let trunk = self.total;
        if m.dropout > 0.0 {
            // In training, dropout writes a new tensor of the same size (eval: identity).
            self.total += x.numel() as i64;
        }
        let x = self.keep(m.fc.forward(&x));
        (self.keep(m.features.forward_t(&x, false)), trunk)
    }

    fn mobilefacenet(&mut self, m: &MobileFaceNet, xs: &Tensor) -> (Tensor, i64) {
        let mut x = m.lay_out_input(xs);
        for s in &m.stages {
            x = match s {
                Stage::Unit(u) => self.unit(u, &x),
                Stage::Down(d) => self.depthwise(d, &x),
                Stage::Residual(ds) => ds.iter().fold(x, |x, d| self.depthwise(d, &x)),
            };
        }
        let trunk = self.total;
        let x = self.unit(&m.conv_sep, &x);
        let x = self.unit(&m.gdc, &x).flatten(1, -1);
        let x = self.keep(m.linear.forward(&x));
        (self.keep(m.bn.forward_t(&x, false)), trunk)
    }

    /// ViT in eval mode (no masking, no drop path). Per block: the two norms, `qkv`, the
    /// `[H, L, L]` scores and their softmax, the attention output, `proj`, `fc1`, ReLU6, `fc2` and
    /// the two residual sums. The autocast part (`qkv`, `proj`) is counted as trunk.
    fn vit(&mut self, m: &ViT, xs: &Tensor) -> (Tensor, i64) {
        let mut x = self.keep(m.patch_embed.forward(xs).flatten(2, -1).transpose(1, 2));
        x = self.keep(x + &m.pos_embed);
        let mut amp = 0;
        for b in &m.blocks {
            let (bs, l, d) = x.size3().expect("tokens");
            let h = b.attn.num_heads;
            let n = self.keep(b.norm1.forward(&x));
            let qkv = self.keep(b.attn.qkv.forward(&n));
            amp += qkv.numel() as i64;
            let qkv = qkv.reshape([bs, l, 3, h, d / h]).permute([2, 0, 3, 1, 4]);
            let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
            let scale = ((d / h) as f64).powf(-0.5);
            let scores = self.keep(q.matmul(&k.transpose(-2, -1)) * scale);
            let attn = self.keep(scores.softmax(-1, scores.kind()));
            let o = self
                .keep(attn.matmul(&v))
                .transpose(1, 2)
                .reshape([bs, l, d]);
            let o = self.keep(b.attn.proj.forward(&o));
            amp += o.numel() as i64;
            x = self.keep(&x + drop_path(&o, b.drop_path, false));
            let n = self.keep(b.norm2.forward(&x));
            let f = self.keep(b.mlp.fc1.forward(&n));
            let f = self.keep(f.relu6());
            let f = self.keep(b.mlp.fc2.forward(&f));
            x = self.keep(&x + drop_path(&f, b.drop_path, false));
        }
        let x = self.keep(m.norm.forward(&x)).flatten(1, -1);
        let x = self.keep(m.feature_fc1.forward(&x));
        let x = self.keep(m.feature_bn1.forward_t(&x, false));
        let x = self.keep(m.feature_fc2.forward(&x));
        (self.keep(m.feature_bn2.forward_t(&x, false)), amp)
    }
}

/// Runs `backbone` on `x` (eval mode, no autograd) layer by layer and counts the outputs.
/// Returns the output (equal to `backbone.forward_t(x, false)`) and the counts, per batch of `x`.
///
/// # Shapes
/// `x`: `[B, 3, S, S]`; output `[B, D]`.
pub fn walk_layers(backbone: &Backbone, x: &Tensor) -> (Tensor, ActivationCount) {
    let _guard = tch::no_grad_guard();
    let mut meter = Meter { total: 0 };
    let (out, trunk) = match backbone {
        Backbone::IResNet(m) => meter.iresnet(m, x),
        Backbone::MobileFaceNet(m) => meter.mobilefacenet(m, x),
        Backbone::ViT(m) => meter.vit(m, x),
    };
    (
        out,
        ActivationCount {
            total: meter.total,
            trunk,
        },
    )
}

/// Parameter and buffer counts of a backbone's variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamCount {
    /// Trainable parameters.
    pub trainable: i64,
    /// Parameters that do not train (iResNet's `features.weight`, fixed at 1).
    pub frozen: i64,
    /// BN `running_mean`/`running_var` values and `num_batches_tracked` scalars.
    pub buffers: i64,
}

/// Counts the variables of `vs` by their arcface_torch names.
pub fn count_params(vs: &nn::VarStore) -> ParamCount {
    let mut c = ParamCount {
        trainable: 0,
        frozen: 0,
        buffers: 0,
    };
    for (name, t) in vs.variables() {
        let n = t.numel() as i64;
        let leaf = name.rsplit('.').next().unwrap_or("");
        if matches!(leaf, "running_mean" | "running_var" | "num_batches_tracked") {
            c.buffers += n;
        } else if t.requires_grad() {
            c.trainable += n;
        } else {
            c.frozen += n;
        }
    }
    c
}

/// What the dry run needs besides the backbone config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClassifierSpec {
    /// Number of classes `C`.
    pub num_classes: i64,
    /// Softmax head: a bias per class besides `W [C, D]`.
    pub bias: bool,
    /// Partial FC sample rate `r` in `(0, 1]`.
    pub sample_rate: f64,
    /// Optimiser state tensors per parameter (SGD with momentum: 1; plain SGD: 0; Adam: 2).
    pub state_buffers: i64,
    /// Weight rows per class: `K` sub-centres for `subcenter_arcface`, else 1 (`W [C·K, D]`).
    pub rows_per_class: i64,
}

/// The dry-run report.
#[derive(Debug, Clone, PartialEq)]
pub struct DryRun {
    /// The backbone config.
    pub model: BackboneConfig,
    /// Backbone parameters and buffers.
    pub backbone: ParamCount,
    /// The classifier.
    pub classifier: ClassifierSpec,
    /// Embedding length `D`.
    pub embedding_size: i64,
    /// Classifier parameters: `C * D` (+ `C`).
    pub classifier_params: i64,
    /// Classes per step `C'` (Partial FC), before the at-least-the-positives rule.
    pub sampled_classes: i64,
    /// Batch size `B`.
    pub batch_size: i64,
    /// Layer outputs per image.
    pub activations_per_image: ActivationCount,
    /// Processes of a data-parallel run (`--nproc`; 1 = one process). Every number above is per
    /// process: each holds the whole model and trains on its own batch of `batch_size`.
    pub processes: i64,
    /// How the classifier is placed over the processes (`classifier.sharding`).
    pub sharding: Sharding,
}

impl DryRun {
    /// fp32 bytes of the classifier weights (and of its gradient).
    pub fn classifier_weight_bytes(&self) -> i64 {
        self.classifier_params * F32
    }
    /// fp32 bytes of the classifier's optimiser state.
    pub fn classifier_state_bytes(&self) -> i64 {
        self.classifier.state_buffers * self.classifier_weight_bytes()
    }
    /// Weights + optimiser state + gradients of the classifier, fp32 bytes.
    pub fn classifier_total_bytes(&self) -> i64 {
        2 * self.classifier_weight_bytes() + self.classifier_state_bytes()
    }
    /// Layer outputs of one batch in fp32, bytes.
    pub fn activation_bytes_fp32(&self) -> i64 {
        self.activations_per_image.total * self.batch_size * F32
    }
    /// Values averaged over the processes at every step: the trainable backbone parameters' and
    /// the classifier's gradients, plus the loss, plus (with Partial FC) the `[C, 1]` row mask.
    pub fn reduced_values_per_step(&self) -> i64 {
        let mask = if self.classifier.sample_rate < 1.0 {
            self.classifier.num_classes
        } else {
            0
        };
        self.backbone.trainable + self.classifier_params + 1 + mask
    }
    /// Bytes each process sends (and receives) per step for the gradient all-reduce, as a ring
    /// all-reduce moves them: `2 (N − 1) / N` times the fp32 gradient size (0 for one process).
    pub fn allreduce_bytes_per_rank(&self) -> i64 {
        let n = self.processes.max(1);
        2 * (n - 1) * self.reduced_values_per_step() * F32 / n
    }
    /// Model parallel: the class rows of the largest block, `ceil(C / N)`.
    pub fn shard_rows(&self) -> i64 {
        let n = self.processes.max(1);
        (self.classifier.num_classes + n - 1) / n
    }
    /// Model parallel: weights + optimiser state + gradients of one rank's block, fp32 bytes.
    pub fn shard_total_bytes(&self) -> i64 {
        let per_row = self.embedding_size * self.classifier.rows_per_class.max(1)
            + i64::from(self.classifier.bias);
        (2 + self.classifier.state_buffers) * self.shard_rows() * per_row * F32
    }
    /// Model parallel: the classes of one rank's Partial FC sample, `max(1, floor(r * rows))`.
    pub fn shard_sampled(&self) -> i64 {
        let rows = self.shard_rows();
        ((self.classifier.sample_rate * rows as f64).floor() as i64).clamp(1, rows.max(1))
    }
    /// Model parallel: one `[N * B, C'_r]` fp32 logits tensor of one rank, bytes.
    pub fn shard_logits_bytes(&self) -> i64 {
        self.processes.max(1) * self.batch_size * self.shard_sampled() * F32
    }
    /// Model parallel: bytes each rank sends per step, by collective (ring algorithms; 0 for one
    /// process): the all-gather of the embeddings (fp32) and labels (int64), the three
    /// all-reduces of the sharded softmax (`[N * B, 2]` target cosines and owner counts, then the
    /// `[N * B]` row maxima and sums of exponentials: 4 fp32 values per gathered row),
    /// the reduce-scatter of the gathered embeddings' gradient, and the backbone gradient's
    /// all-reduce. The classifier's gradient is not communicated.
    pub fn model_parallel_bytes(&self) -> [(&'static str, i64); 5] {
        let n = self.processes.max(1);
        let (b, d) = (self.batch_size, self.embedding_size);
        [
            (
                "all-gather embeddings + labels",
                (n - 1) * b * (d * F32 + 8),
            ),
            (
                "softmax statistics (3 all-reduces, 4 values per gathered row)",
                4 * 2 * (n - 1) * b * F32,
            ),
            (
                "reduce-scatter of the embedding gradient",
                (n - 1) * b * d * F32,
            ),
            (
                "backbone gradient all-reduce",
                2 * (n - 1) * (self.backbone.trainable + 2) * F32 / n,
            ),
            ("step flags (loss, finite)", 0),
        ]
    }
    /// Layer outputs of one batch with the trunk in fp16 (amp), bytes.
    pub fn activation_bytes_amp(&self) -> i64 {
        let a = self.activations_per_image;
        (a.trunk * 2 + (a.total - a.trunk) * F32) * self.batch_size
    }
}

/// Builds the backbone on the CPU, counts its parameters and measures one image's activations.
///
/// # Panics
/// If `model` does not pass [`BackboneConfig::validate`], or a count is negative.
pub fn estimate(model: &BackboneConfig, classifier: ClassifierSpec, batch_size: i64) -> DryRun {
    assert!(
        classifier.num_classes > 0 && batch_size > 0,
        "classes and batch size must be positive"
    );
    let vs = nn::VarStore::new(Device::Cpu);
    let backbone = facerec_backbone::build(&vs.root(), model);
    let s = model.input_size();
    let x = Tensor::zeros([1, 3, s, s], (Kind::Float, Device::Cpu));
    let (_, activations) = walk_layers(&backbone, &x);
    let d = model.embedding_size();
    let c = classifier.num_classes;
    let sampled = ((classifier.sample_rate * c as f64).floor() as i64).clamp(1, c);
    DryRun {
        model: model.clone(),
        backbone: count_params(&vs),
        classifier,
        embedding_size: d,
        classifier_params: c * classifier.rows_per_class.max(1) * d
            + if classifier.bias { c } else { 0 },
        sampled_classes: sampled,
        batch_size,
        activations_per_image: activations,
        processes: 1,
        sharding: Sharding::Replicated,
    }
}

impl ClassifierSpec {
    /// The classifier of `cfg` over `num_classes` classes.
    pub fn of(cfg: &Config, num_classes: i64) -> Self {
        let state_buffers = match &cfg.optim {
            OptimConfig::Sgd { momentum, .. } => i64::from(*momentum != 0.0),
            OptimConfig::Adamw { .. } => 2,
        };
        ClassifierSpec {
            num_classes,
            bias: cfg.head.classifier_kind() == facerec_loss_heads::ClassifierKind::Linear,
            sample_rate: cfg.partial_fc.sample_rate,
            state_buffers,
            rows_per_class: cfg.head.classifier_kind().rows_per_class(),
        }
    }

    /// Weights + gradients + optimiser state in fp32 bytes for embedding length `d`, in u128 so that
    /// an absurd class count cannot overflow: `(2 + state_buffers) * (C·K * D [+ C]) * 4`.
    pub fn total_bytes(&self, d: i64) -> u128 {
        let c = self.num_classes.max(0) as u128 * self.rows_per_class.max(1) as u128;
        let params = c * d.max(0) as u128 + if self.bias { c } else { 0 };
        (2 + self.state_buffers.max(0) as u128) * params * F32 as u128
    }
}

/// The dry run of a resolved config. The class count is `classifier.num_classes`, else the
/// training source's (the source is opened, nothing is decoded).
pub fn from_config(cfg: &Config) -> Result<DryRun> {
    let num_classes = match cfg.classifier.num_classes {
        Some(n) => n,
        None => {
            let size = cfg.model.input_size() as usize;
            let workspace = crate::sources::default_workspace();
            crate::sources::open_source(
                &cfg.data,
                size,
                cfg.input.fit,
                &workspace,
                cfg.seed,
                "data",
                true,
            )?
            .context("the training source")?
            .num_classes()
        }
    };
    let spec = ClassifierSpec::of(cfg, num_classes as i64);
    Ok(estimate(&cfg.model, spec, cfg.train.batch_size as i64))
}

/// Run the dry run for `processes` data-parallel processes (1: one process) and print the report.
pub fn run(cfg: &Config, processes: usize) -> Result<()> {
    let mut report = from_config(cfg)?;
    report.processes = processes.max(1) as i64;
    report.sharding = cfg.classifier.sharding_for(processes.max(1));
    print!("{report}");
    Ok(())
}

/// `12345678` -> `12,345,678`.
fn thousands(n: i64) -> String {
    let s = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// Bytes as MiB, or GiB from 1 GiB on.
fn mem(bytes: i64) -> String {
    let mib = bytes as f64 / (1u64 << 20) as f64;
    if mib >= 1024.0 {
        format!("{:.2} GiB", mib / 1024.0)
    } else {
        format!("{mib:.2} MiB")
    }
}

impl fmt::Display for DryRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (b, c) = (&self.backbone, &self.classifier);
        writeln!(
            f,
            "dry run: nothing is trained and no run directory is created"
        )?;
        writeln!(
            f,
            "model: {}",
            toml::to_string(&self.model)
                .unwrap_or_default()
                .replace('\n', "; ")
                .trim_end_matches("; ")
        )?;
        writeln!(
            f,
            "backbone parameters: {} trainable, {} frozen, {} in all; {} BN buffer values",
            thousands(b.trainable),
            thousands(b.frozen),
            thousands(b.trainable + b.frozen),
            thousands(b.buffers)
        )?;
        let head = if c.bias {
            "linear (softmax head), with bias".to_string()
        } else if c.rows_per_class > 1 {
            format!(
                "cosine, {} sub-centres per class, no bias",
                c.rows_per_class
            )
        } else {
            "cosine, no bias".to_string()
        };
        writeln!(
            f,
            "classifier parameters: {} ({} classes x {} embedding, {head})",
            thousands(self.classifier_params),
            thousands(c.num_classes),
            self.embedding_size
        )?;
        let w = self.classifier_weight_bytes();
        writeln!(
            f,
            "classifier memory, fp32: weights {} ({} B) + optimiser state {} ({} buffer(s) per weight) + gradients {} = {} ({} B)",
            mem(w),
            thousands(w),
            mem(self.classifier_state_bytes()),
            c.state_buffers,
            mem(w),
            mem(self.classifier_total_bytes()),
            thousands(self.classifier_total_bytes())
        )?;
        let cs = self.sampled_classes;
        writeln!(
            f,
            "partial FC: sample_rate {} -> {} classes per step (at least the batch's distinct labels); per step a [C', D] normalised weight copy {} and [B, C'] logits {} per tensor (B = {})",
            c.sample_rate,
            thousands(cs),
            mem(cs * self.embedding_size * F32),
            mem(self.batch_size * cs * F32),
            self.batch_size
        )?;
        let a = self.activations_per_image;
        writeln!(
            f,
            "activations: {} values per image (sum of every layer output, measured on one image); x batch {} = {} in fp32, about {} with the trunk in fp16 (amp)",
            thousands(a.total),
            self.batch_size,
            mem(self.activation_bytes_fp32()),
            mem(self.activation_bytes_amp())
        )?;
        let s = self.model.input_size();
        writeln!(
            f,
            "input batch: {} in fp32 ([{}, 3, {s}, {s}])",
            mem(self.batch_size * 3 * s * s * F32),
            self.batch_size
        )?;
        if self.processes > 1 && self.sharding == Sharding::ModelParallel {
            return self.fmt_model_parallel(f);
        }
        if self.processes > 1 {
            let n = self.processes;
            writeln!(
                f,
                "data parallel: {n} processes, every figure above per process (the whole model on each, batch {} each, global batch {} per micro-batch); per step each process averages {} gradient values ({}) and sends about {} (ring all-reduce: 2(N-1)/N of it)",
                self.batch_size,
                n * self.batch_size,
                thousands(self.reduced_values_per_step()),
                mem(self.reduced_values_per_step() * F32),
                mem(self.allreduce_bytes_per_rank())
            )?;
        }
        Ok(())
    }
}

impl DryRun {
    /// The model-parallel lines: per-rank classifier block, logits and bytes per step.
    fn fmt_model_parallel(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.processes;
        writeln!(
            f,
            "model parallel (classifier.sharding = \"model_parallel\"): {n} processes, batch {} each, global batch {}; the classifier figures above are for the whole matrix, each rank holds one block of it:",
            self.batch_size,
            n * self.batch_size
        )?;
        writeln!(
            f,
            "  per-rank classifier: {} rows (ceil(C / {n})) x {}, weights + gradients + {} optimiser buffer(s) = {} ({} B)",
            thousands(self.shard_rows()),
            self.embedding_size,
            self.classifier.state_buffers,
            mem(self.shard_total_bytes()),
            thousands(self.shard_total_bytes())
        )?;
        writeln!(
            f,
            "  per-rank logits: [{} x {}] (gathered batch x the block's {} sampled classes) = {} per tensor ({} B)",
            thousands(n * self.batch_size),
            thousands(self.shard_sampled()),
            thousands(self.shard_sampled()),
            mem(self.shard_logits_bytes()),
            thousands(self.shard_logits_bytes())
        )?;
        let parts = self.model_parallel_bytes();
        let total: i64 = parts.iter().map(|p| p.1).sum();
        writeln!(
            f,
            "  bytes each rank sends per step: {} ({} B) in all",
            mem(total),
            thousands(total)
        )?;
        for (what, bytes) in parts.iter().filter(|p| p.1 > 0) {
            writeln!(f, "    {what}: {} ({} B)", mem(*bytes), thousands(*bytes))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use facerec_backbone::{IResNetConfig, MobileFaceNetConfig};

    #[test]
    fn thousands_and_mem() {
        assert_eq!(thousands(47_836_672), "47,836,672");
        assert_eq!(thousands(512), "512");
        assert_eq!(mem(191_346_688), "182.48 MiB");
        assert_eq!(mem(3 << 30), "3.00 GiB");
    }

    /// The walk returns exactly the backbone's own eval output (so it visits the real layers),
    /// in both activation layouts (`model.channels_last`).
    #[test]
    fn walk_matches_forward() {
        tch::manual_seed(3);
        let iresnet = IResNetConfig {
            depth: None,
            layers: Some([2, 1, 2, 1]),
            // At least 8 channels a stage: libtorch's channels-last kernels corrupt memory below
            // (IResNetConfig::channels_last).
            widths: [8, 8, 8, 16],
            embedding_size: 8,
            dropout: 0.0,
            input_size: 24,
            channels_last: true,
        };
        let mbf = MobileFaceNetConfig {
            blocks: [2, 1, 1, 1],
            scale: 1,
            input_size: 32,
            ..Default::default()
        };
        let cfgs = [
            BackboneConfig::Iresnet(iresnet.clone()),
            BackboneConfig::Iresnet(IResNetConfig {
                layers: Some([1, 1, 1, 1]),
                channels_last: false,
                ..iresnet
            }),
            BackboneConfig::Mobilefacenet(mbf.clone()),
            BackboneConfig::Mobilefacenet(MobileFaceNetConfig {
                blocks: [1, 1, 1, 1],
                channels_last: true,
                ..mbf
            }),
            BackboneConfig::Vit(tiny_vit()),
        ];
        for cfg in cfgs {
            let vs = nn::VarStore::new(Device::Cpu);
            let backbone = facerec_backbone::build(&vs.root(), &cfg);
            let s = cfg.input_size();
            let x = Tensor::randn([2, 3, s, s], (Kind::Float, Device::Cpu));
            let (out, count) = walk_layers(&backbone, &x);
            let want = tch::no_grad(|| backbone.forward_t(&x, false));
            assert!(out.equal(&want), "{cfg:?}");
            assert!(count.trunk > 0 && count.trunk < count.total);
        }
    }

    /// Two blocks of width 8 (2 heads), patch 4 on 18 px (16 tokens), embedding 8.
    fn tiny_vit() -> facerec_backbone::ViTConfig {
        facerec_backbone::ViTConfig {
            embed_dim: 8,
            depth: 2,
            num_heads: 2,
            patch_size: 4,
            input_size: 18,
            embedding_size: 8,
            ..facerec_backbone::ViTConfig::vit_t()
        }
    }

    /// One block per stage, widths 2-4-8-16, embedding 8, 16 px.
    fn tiny() -> BackboneConfig {
        BackboneConfig::Iresnet(IResNetConfig {
            depth: None,
            layers: Some([1, 1, 1, 1]),
            widths: [2, 4, 8, 16],
            embedding_size: 8,
            dropout: 0.0,
            input_size: 16,
            channels_last: false,
        })
    }

    /// A tiny iResNet counted by hand, layer by layer (see the comments).
    #[test]
    fn iresnet_activation_count_by_hand() {
        let cfg = tiny();
        // stem: conv, bn, prelu at 2x16x16 = 3 * 512
        let stem = 3 * 512;
        // block (c_in, c_out, side in -> side out): bn1 on the input, conv1/bn2/prelu at c_out x
        // side_in^2, conv2/bn3/downsample conv/downsample bn/add at c_out x side_out^2.
        let block =
            |ci: i64, co: i64, si: i64, so: i64| ci * si * si + 3 * co * si * si + 5 * co * so * so;
        let stages =
            block(2, 2, 16, 8) + block(2, 4, 8, 4) + block(4, 8, 4, 2) + block(8, 16, 2, 1);
        assert_eq!(stages, 2688 + 1216 + 608 + 304);
        // bn2 (16 x 1 x 1), then fc (8) and features (8).
        let trunk = stem + stages + 16;
        let total = trunk + 8 + 8;
        assert_eq!(total, 6384);
        let spec = ClassifierSpec {
            num_classes: 10,
            bias: false,
            sample_rate: 1.0,
            state_buffers: 1,
            rows_per_class: 1,
        };
        let r = estimate(&cfg, spec, 32);
        assert_eq!(r.activations_per_image, ActivationCount { total, trunk });
        assert_eq!(r.activation_bytes_fp32(), 6384 * 32 * 4);
        assert_eq!(r.activation_bytes_amp(), (6368 * 2 + 16 * 4) * 32);
    }

    #[test]
    fn softmax_bias_and_sampling() {
        let cfg = tiny();
        let spec = ClassifierSpec {
            num_classes: 1001,
            bias: true,
            sample_rate: 0.1,
            state_buffers: 2,
            rows_per_class: 1,
        };
        let r = estimate(&cfg, spec, 4);
        assert_eq!(r.classifier_params, 1001 * 8 + 1001);
        assert_eq!(r.sampled_classes, 100);
        assert_eq!(r.classifier_total_bytes(), 4 * 4 * (1001 * 9));
        // The classifier the trainer builds has exactly these parameters.
        let vs = nn::VarStore::new(Device::Cpu);
        let head = facerec_loss_heads::HeadConfig::Softmax(Default::default());
        let _c = facerec_loss_heads::Classifier::new(&vs.root(), head.classifier_kind(), 1001, 8);
        let n: i64 = vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum();
        assert_eq!(n, r.classifier_params);
    }

    /// Sub-center ArcFace: `K` weight rows per class in the parameter and memory counts, equal to
    /// what `Classifier::new` registers; the memory check's bytes agree.
    #[test]
    fn sub_centres_multiply_the_classifier_rows() {
        let cfg = tiny();
        let head = facerec_loss_heads::HeadConfig::SubcenterArcface(Default::default());
        let spec = ClassifierSpec {
            num_classes: 1001,
            bias: false,
            sample_rate: 1.0,
            state_buffers: 1,
            rows_per_class: head.classifier_kind().rows_per_class(),
        };
        assert_eq!(spec.rows_per_class, 3);
        assert_eq!(spec.total_bytes(8), 3 * 4 * 1001 * 3 * 8);
        let r = estimate(&cfg, spec, 4);
        assert_eq!(r.classifier_params, 1001 * 3 * 8);
        let vs = nn::VarStore::new(Device::Cpu);
        let c = facerec_loss_heads::Classifier::new(&vs.root(), head.classifier_kind(), 1001, 8);
        assert_eq!(c.weight().numel() as i64, r.classifier_params);
        assert_eq!(c.num_classes(), 1001);
        assert!(r.to_string().contains("3 sub-centres per class"), "{r}");
    }
}

#[cfg(test)]
mod data_parallel_tests {
    use super::*;
    use facerec_backbone::IResNetConfig;

    /// A tiny iResNet at 16 px with `embedding_size`, and a bias-free classifier of `num_classes`
    /// rows, no sampling, one optimiser buffer per row (SGD with momentum).
    fn tiny_net_and_classifier(
        embedding_size: i64,
        num_classes: i64,
    ) -> (BackboneConfig, ClassifierSpec) {
        let cfg = BackboneConfig::Iresnet(IResNetConfig {
            depth: None,
            layers: Some([1, 1, 1, 1]),
            widths: [2, 4, 8, 16],
            embedding_size,
            dropout: 0.0,
            input_size: 16,
            channels_last: false,
        });
        let spec = ClassifierSpec {
            num_classes,
            bias: false,
            sample_rate: 1.0,
            state_buffers: 1,
            rows_per_class: 1,
        };
        (cfg, spec)
    }

    /// Bytes per step of the gradient all-reduce, by hand: a ring all-reduce of V fp32 values over
    /// N processes sends 2 (N − 1) / N · 4V bytes from each; V = trainable backbone parameters +
    /// C·D classifier values + the loss (+ the C-row mask with Partial FC).
    #[test]
    fn allreduce_bytes_by_hand() {
        let (cfg, spec) = tiny_net_and_classifier(8, 10);
        let mut r = estimate(&cfg, spec, 32);
        assert_eq!(
            r.allreduce_bytes_per_rank(),
            0,
            "one process communicates nothing"
        );
        let v = r.backbone.trainable + 10 * 8 + 1;
        r.processes = 2;
        assert_eq!(r.allreduce_bytes_per_rank(), 2 * v * 4 / 2);
        r.processes = 4;
        assert_eq!(r.allreduce_bytes_per_rank(), 2 * 3 * v * 4 / 4);
        r.classifier.sample_rate = 0.5;
        assert_eq!(
            r.reduced_values_per_step(),
            v + 10,
            "the Partial FC row mask is united too"
        );
        assert!(r.to_string().contains("data parallel: 4 processes"));
    }

    /// Model parallel at C = 2,000,000, D = 512, B = 128, SGD with momentum: the block, logits
    /// and bytes by hand at 8 and 64 ranks.
    #[test]
    fn model_parallel_figures_by_hand() {
        let (cfg, spec) = tiny_net_and_classifier(512, 2_000_000);
        let mut r = estimate(&cfg, spec, 128);
        r.sharding = Sharding::ModelParallel;
        r.processes = 8;
        assert_eq!(r.shard_rows(), 250_000);
        assert_eq!(r.shard_total_bytes(), 3 * 250_000 * 512 * 4);
        assert_eq!(r.shard_logits_bytes(), 8 * 128 * 250_000 * 4);
        let parts = r.model_parallel_bytes();
        assert_eq!(parts[0].1, 7 * 128 * (512 * 4 + 8));
        assert_eq!(parts[2].1, 7 * 128 * 512 * 4);
        r.processes = 64;
        assert_eq!(r.shard_rows(), 31_250);
        // The gathered batch grows as the block shrinks: the logits stay the same size.
        assert_eq!(r.shard_logits_bytes(), 64 * 128 * 31_250 * 4);
        r.classifier.sample_rate = 0.3;
        assert_eq!(r.shard_sampled(), 9375);
        let text = r.to_string();
        assert!(text.contains("model parallel"), "{text}");
        assert!(text.contains("per-rank classifier: 31,250 rows"), "{text}");
        r.processes = 3;
        r.classifier.num_classes = 10;
        assert_eq!(
            r.shard_rows(),
            4,
            "C not divisible by N: the first blocks hold one row more"
        );
    }
}
