//! `cargo xtask bench-coreface`: the cost of the CoReFace regularizer per training step, against
//! plain ArcFace on the same backbone, measured in the same run.
//!
//! Timed per repetition, forward + backward (gradients zeroed before, no optimizer step, which is
//! the same in both):
//! - **arcface**: trunk -> dropout(0.4) -> neck (fc + BatchNorm1d) -> cosine classifier -> ArcFace
//!   -> cross-entropy (the warm-up phase of the recipe, and the "ArcFace + dropout" baseline).
//! - **coreface**: trunk -> two dropout(0.6) views -> neck twice -> classifier + ArcFace on each
//!   view -> 0.5·CE₁ + 0.5·CE₂ + 0.05·L_con (one-way N x N, adaptive margin; `--protocol` picks).
//! - **loss only**: L_con forward + backward alone on two `[B, D]` leaves (the regularizer's own
//!   cost, without the second neck and classification pass it brings along).
//!
//! The two steps alternate within each repetition (and which goes first alternates), so both see
//! the same machine load; the table shows medians, the median of the per-repetition ratios
//! coreface / arcface and, as a check against a busy machine, the ratio of the fastest repetitions. Default backbone: a small iResNet (one block
//! per stage, widths 16-32-64-128, 112 x 112 input, 512-d embedding, trunk width 6272), 1000
//! classes, B = 64 and 128. On a CUDA machine the CPU table is followed by a CUDA one.
//! `--loss-only` times L_con alone for the three protocols instead (no backbone).

use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use facerec_backbone::{build, Backbone, BackboneConfig, IResNetConfig};
use facerec_benches::{median, min, sync};
use facerec_contrastive_regularizer::{
    contrastive_logits, dropout_views, CoReFace, CoReFaceConfig, ContrastiveRegularizer, Protocol,
};
use facerec_loss_heads::{cross_entropy, CosineClassifier, HeadConfig, MarginHead};
use tch::{nn, Device, Kind, Tensor};

#[derive(Parser)]
#[command(about = "CoReFace step cost vs plain ArcFace on the same backbone")]
struct Args {
    /// Timed repetitions per batch size (after one warm-up each).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Comma-separated batch sizes.
    #[arg(long, default_value = "64,128")]
    batches: String,
    /// libtorch intra-op threads (default: libtorch's own choice).
    #[arg(long)]
    threads: Option<i32>,
    /// Stage widths of the iResNet, comma-separated (4 values).
    #[arg(long, default_value = "16,32,64,128")]
    widths: String,
    /// Blocks per stage, comma-separated (4 values).
    #[arg(long, default_value = "1,1,1,1")]
    layers: String,
    /// Input side in pixels.
    #[arg(long, default_value_t = 112)]
    input: i64,
    /// Number of classes of the classifier.
    #[arg(long, default_value_t = 1000)]
    classes: i64,
    /// Contrastive protocol: one_way, both_ways, two_n.
    #[arg(long, default_value = "one_way")]
    protocol: String,
    /// Skip the CUDA table even when a GPU is present.
    #[arg(long)]
    cpu_only: bool,
    /// Only time L_con (forward + backward on two `[B, 512]` leaves) for every protocol.
    #[arg(long)]
    loss_only: bool,
}

fn four(s: &str) -> Result<[i64; 4]> {
    let v: Vec<i64> = s
        .split(',')
        .map(|x| x.trim().parse())
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(v.len() == 4, "need 4 comma-separated values, got {s}");
    Ok([v[0], v[1], v[2], v[3]])
}

struct Setup {
    device: Device,
    vs: nn::VarStore,
    model: Backbone,
    classifier: CosineClassifier,
    head: Box<dyn MarginHead>,
    reg: CoReFace,
    cfg: CoReFaceConfig,
    x: Tensor,
    labels: Tensor,
}

impl Setup {
    fn new(args: &Args, device: Device, b: i64, protocol: Protocol) -> Result<Self> {
        tch::manual_seed(0);
        let layers = four(&args.layers)?;
        let bcfg = BackboneConfig::Iresnet(IResNetConfig {
            depth: None,
            layers: Some(layers.map(|n| n as usize)),
            widths: four(&args.widths)?,
            embedding_size: 512,
            dropout: 0.0,
            input_size: args.input,
            channels_last: false,
        });
        bcfg.validate()?;
        let vs = nn::VarStore::new(device);
        let model = build(&vs.root(), &bcfg);
        let classifier = CosineClassifier::new(&(vs.root() / "classifier"), args.classes, 512);
        let cfg = CoReFaceConfig {
            protocol,
            ..Default::default()
        };
        let reg = CoReFace::new(&(vs.root() / "coreface"), &cfg);
        let x = Tensor::rand([b, 3, args.input, args.input], (Kind::Float, device)) * 2.0 - 1.0;
        // Repeated identities (about two images each), as in a sampled face batch.
        let labels = Tensor::randint(b / 2, [b], (Kind::Int64, device));
        Ok(Self {
            device,
            vs,
            model,
            classifier,
            head: HeadConfig::default().build(),
            reg,
            cfg,
            x,
            labels,
        })
    }

    fn zero_grad(&mut self) {
        for v in self.vs.trainable_variables().iter_mut() {
            v.zero_grad();
        }
    }

    fn cls(&self, emb: &Tensor) -> Tensor {
        cross_entropy(
            &self
                .head
                .logits(&self.classifier.cosines(emb), &self.labels),
            &self.labels,
        )
    }

    /// Milliseconds of one plain ArcFace step (dropout 0.4, one view).
    fn arcface(&mut self) -> f64 {
        self.zero_grad();
        sync(self.device);
        let t0 = Instant::now();
        let h = self.model.forward_trunk_t(&self.x, true);
        let emb = self
            .model
            .forward_neck_t(&h.dropout(self.cfg.warmup_dropout, true), true);
        self.cls(&emb).backward();
        sync(self.device);
        t0.elapsed().as_secs_f64() * 1e3
    }

    /// Milliseconds of one CoReFace step (two views, three losses).
    fn coreface(&mut self) -> f64 {
        self.zero_grad();
        sync(self.device);
        let t0 = Instant::now();
        let h = self.model.forward_trunk_t(&self.x, true);
        let model = &self.model;
        let (v1, v2) = dropout_views(&h, self.cfg.dropout, |f| model.forward_neck_t(f, true));
        let con = self.reg.forward(&v1, &v2, &self.labels).loss;
        let loss = self.cfg.total_loss(&self.cls(&v1), &self.cls(&v2), &con);
        loss.backward();
        sync(self.device);
        t0.elapsed().as_secs_f64() * 1e3
    }

    /// Milliseconds of the contrastive loss alone, forward + backward to two `[B, 512]` leaves.
    fn loss_only(&self, v1: &Tensor, v2: &Tensor) -> f64 {
        sync(self.device);
        let t0 = Instant::now();
        let lg = contrastive_logits(v1, v2, &self.labels, self.cfg.protocol);
        let m = Tensor::from(0.3).to_device(self.device);
        let _ = Tensor::run_backward(&[lg.loss(self.cfg.s, &m)], &[v1, v2], false, false);
        sync(self.device);
        t0.elapsed().as_secs_f64() * 1e3
    }
}

fn table(args: &Args, device: Device, protocol: Protocol) -> Result<()> {
    let batches: Vec<i64> = args
        .batches
        .split(',')
        .map(|x| x.trim().parse())
        .collect::<Result<_, _>>()?;
    println!(
        "| B | arcface step (ms) | coreface step (ms) | coreface / arcface (median of per-rep ratios) | best-of ratio | L_con alone (ms) | L_con / arcface |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for b in batches {
        let mut s = Setup::new(args, device, b, protocol)?;
        let v1 = Tensor::randn([b, 512], (Kind::Float, device)).set_requires_grad(true);
        let v2 =
            (v1.detach() + Tensor::randn([b, 512], (Kind::Float, device))).set_requires_grad(true);
        // Warm-up.
        s.arcface();
        s.coreface();
        s.loss_only(&v1, &v2);
        let (mut a, mut c, mut l, mut r) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for rep in 0..args.reps {
            // Alternate which step goes first, so neither always follows the other's teardown.
            let (ta, tc) = if rep % 2 == 0 {
                let ta = s.arcface();
                (ta, s.coreface())
            } else {
                let tc = s.coreface();
                (s.arcface(), tc)
            };
            a.push(ta);
            c.push(tc);
            r.push(tc / ta);
            l.push(s.loss_only(&v1, &v2));
        }
        let best = min(&c) / min(&a);
        let (a, c, l, r) = (median(a), median(c), median(l), median(r));
        println!(
            "| {b} | {a:.1} | {c:.1} | {r:.3}x | {best:.3}x | {l:.3} | {:.4} |",
            l / a
        );
    }
    Ok(())
}

/// L_con alone for every protocol and batch size (no backbone).
fn loss_table(args: &Args, device: Device) -> Result<()> {
    let batches: Vec<i64> = args
        .batches
        .split(',')
        .map(|x| x.trim().parse())
        .collect::<Result<_, _>>()?;
    println!("| B | one_way (ms) | both_ways (ms) | two_n (ms) |");
    println!("|---:|---:|---:|---:|");
    for b in batches {
        tch::manual_seed(0);
        let labels = Tensor::randint(b / 2, [b], (Kind::Int64, device));
        let v1 = Tensor::randn([b, 512], (Kind::Float, device)).set_requires_grad(true);
        let v2 =
            (v1.detach() + Tensor::randn([b, 512], (Kind::Float, device))).set_requires_grad(true);
        let m = Tensor::from(0.3).to_device(device);
        let mut row = format!("| {b} |");
        for protocol in [Protocol::OneWay, Protocol::BothWays, Protocol::TwoN] {
            let once = || {
                sync(device);
                let t0 = Instant::now();
                let loss = contrastive_logits(&v1, &v2, &labels, protocol).loss(64.0, &m);
                let _ = Tensor::run_backward(&[loss], &[&v1, &v2], false, false);
                sync(device);
                t0.elapsed().as_secs_f64() * 1e3
            };
            once();
            let t = median((0..args.reps).map(|_| once()).collect());
            row += &format!(" {t:.3} |");
        }
        println!("{row}");
    }
    Ok(())
}

fn main() -> Result<()> {
    // facerec's process settings (allocator, OpenMP wait policy), as the trainer runs.
    facerec_process::init()?;
    let args = Args::parse();
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    let protocol: Protocol =
        serde_json::from_value(serde_json::Value::String(args.protocol.clone()))
            .map_err(|e| anyhow::anyhow!("--protocol {}: {e}", args.protocol))?;
    println!(
        "bench-coreface: iResNet layers [{}] widths [{}] input {} -> 512, {} classes, protocol {:?}, \
         {} libtorch threads, median of {} reps",
        args.layers,
        args.widths,
        args.input,
        args.classes,
        protocol,
        tch::get_num_threads(),
        args.reps
    );
    let mut devices = vec![Device::Cpu];
    if !args.cpu_only && tch::Cuda::is_available() {
        devices.push(Device::Cuda(0));
    }
    for device in devices {
        println!("\ndevice {device:?}\n");
        if args.loss_only {
            loss_table(&args, device)?;
        } else {
            table(&args, device, protocol)?;
        }
    }
    Ok(())
}
