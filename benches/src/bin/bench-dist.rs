//! `cargo xtask bench-dist`: all-reduce of a backbone-sized gradient over Gloo on this machine,
//! time per step and bytes per step against the analytic number.
//!
//! The bench builds the chosen backbone once to list its trainable parameter shapes, then starts
//! `--nproc` ranks of itself through `facerec-launch` (127.0.0.1, a free port). Every rank holds a
//! gradient tensor per parameter and, per step, averages them with
//! `ProcessGroup::all_reduce_bucketed(.., ReduceOp::Avg, bucket)` (the path a data-parallel trainer
//! takes), after `--warmup` untimed steps. A second timing all-reduces one flat buffer of the same
//! size with `all_reduce` (no packing), to separate communication from the bucket copies.
//!
//! Bytes: a gradient of P f32 values is `4P` bytes. A bandwidth-optimal all-reduce (ring:
//! reduce-scatter + all-gather) sends `2 (W - 1) / W * 4P` bytes per rank and step. The measured
//! number is the growth of the loopback interface's byte counter (`/proc/net/dev`, `lo`, received
//! bytes; system-wide, so other traffic on 127.0.0.1 during the run adds to it) divided by steps
//! and ranks. Also printed: algorithm bandwidth `4P / t` and bus bandwidth
//! `algbw * 2 (W - 1) / W` (the nccl-tests conventions).
//!
//! `--head-step`: instead, the classifier head step alone on every rank, replicated against
//! model parallel, side by side in one run (ArcFace, `--classes` C, `--dim` D, `--batch` B per
//! rank, f32): cosines of the normalised embeddings against the normalised class rows, the margin
//! cross-entropy and its backward to the embeddings and the class rows, plus the collectives each
//! mode needs. Replicated (data parallel): every rank holds all C rows, the fused
//! `margin_cross_entropy` of its own B rows, then one all-reduce (Avg) of the `[C, D]` classifier
//! gradient. Model parallel: every rank holds its block of about C/W rows; all-gather of the
//! embeddings and labels, `sharded_cross_entropy` of the W·B gathered rows against the block (its
//! two softmax all-reduces and the target all-reduce), and the reduce-scatter of the embeddings'
//! gradient. Prints wall ms per step and rank 0's CPU time per step (user + system, this
//! process: on a shared machine a wall time includes waiting for a core), and the ratios.

use anyhow::{bail, Context, Result};
use clap::Parser;
use facerec_backbone::{BackboneConfig, IResNetConfig};
use facerec_distributed::{Backend, ProcessGroup, ReduceOp, Rendezvous};
use facerec_loss_heads::{margin_cross_entropy, sharded_cross_entropy, ClassShard, HeadConfig};
use facerec_trainer::world::World;
use std::ffi::OsString;
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

#[derive(Parser, Debug, Clone)]
#[command(about = "Gloo all-reduce of a backbone-sized gradient on N local processes")]
struct Args {
    /// Backbone whose parameters set the gradient: `default` (the embedded default run's small
    /// iResNet), `r18`, `r50`.
    #[arg(long, default_value = "r18")]
    model: String,
    /// Processes.
    #[arg(long, default_value_t = 2)]
    nproc: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Bucket size in MiB for the bucketed all-reduce.
    #[arg(long, default_value_t = 25)]
    bucket_mb: usize,
    /// Time the classifier head step, replicated vs model parallel, instead of the backbone
    /// all-reduce.
    #[arg(long)]
    head_step: bool,
    /// `--head-step`: classes C.
    #[arg(long, default_value_t = 100_000)]
    classes: i64,
    /// `--head-step`: embedding size D.
    #[arg(long, default_value_t = 512)]
    dim: i64,
    /// `--head-step`: images per rank B.
    #[arg(long, default_value_t = 64)]
    batch: i64,
}

const WORKER_VAR: &str = "FACEREC_BENCH_DIST_WORKER";

fn backbone(name: &str) -> Result<BackboneConfig> {
    Ok(BackboneConfig::Iresnet(match name {
        "default" => IResNetConfig {
            depth: None,
            layers: Some([1, 1, 1, 1]),
            widths: [16, 32, 64, 128],
            embedding_size: 128,
            dropout: 0.0,
            input_size: 56,
            channels_last: false,
        },
        "r18" => IResNetConfig::r18(),
        "r50" => IResNetConfig::r50(),
        other => bail!("--model {other:?}: expected default, r18 or r50"),
    }))
}

/// Shapes of the backbone's trainable parameters.
fn parameter_shapes(cfg: &BackboneConfig) -> Vec<Vec<i64>> {
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = facerec_backbone::build(&vs.root(), cfg);
    let mut named = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect::<Vec<_>>();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named.into_iter().map(|(_, t)| t.size()).collect()
}

/// Received bytes of the loopback interface so far.
fn loopback_bytes() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/net/dev").context("reading /proc/net/dev")?;
    for line in text.lines() {
        if let Some(rest) = line.trim_start().strip_prefix("lo:") {
            let rx: u64 = rest
                .split_whitespace()
                .next()
                .context("lo: no fields")?
                .parse()?;
            return Ok(rx);
        }
    }
    bail!("no `lo` interface in /proc/net/dev")
}

fn worker(args: &Args) -> Result<()> {
    tch::set_num_threads(1);
    let shapes = parameter_shapes(&backbone(&args.model)?);
    let pg = ProcessGroup::new(&Rendezvous::from_env()?, Backend::Gloo)?;
    let (w, main) = (pg.world_size(), pg.is_main());
    let mut grads: Vec<Tensor> = shapes
        .iter()
        .map(|s| Tensor::randn(s.as_slice(), (Kind::Float, Device::Cpu)))
        .collect();
    let params: i64 = shapes.iter().map(|s| s.iter().product::<i64>()).sum();
    let bucket = args.bucket_mb << 20;
    for _ in 0..args.warmup {
        pg.all_reduce_bucketed(&mut grads, ReduceOp::Avg, bucket)?;
    }
    pg.barrier()?;
    let lo0 = loopback_bytes()?;
    let t0 = Instant::now();
    for _ in 0..args.steps {
        pg.all_reduce_bucketed(&mut grads, ReduceOp::Avg, bucket)?;
    }
    pg.barrier()?;
    let bucketed = t0.elapsed().as_secs_f64() / args.steps as f64;
    let lo1 = loopback_bytes()?;
    let mut flat = Tensor::randn([params], (Kind::Float, Device::Cpu));
    pg.all_reduce(&mut flat, ReduceOp::Sum)?;
    pg.barrier()?;
    let t1 = Instant::now();
    for _ in 0..args.steps {
        pg.all_reduce(&mut flat, ReduceOp::Sum)?;
    }
    pg.barrier()?;
    let single = t1.elapsed().as_secs_f64() / args.steps as f64;
    // The bucketed path's local work alone: copy into one buffer, divide, copy back.
    let mut packed = Tensor::empty([params], (Kind::Float, Device::Cpu));
    let t2 = Instant::now();
    for _ in 0..args.steps {
        let _guard = tch::no_grad_guard();
        let mut offset = 0;
        for g in grads.iter() {
            let n = g.numel() as i64;
            packed
                .narrow(0, offset, n)
                .view(g.size().as_slice())
                .copy_(g);
            offset += n;
        }
        let _ = packed.g_div_scalar_(w as f64);
        let mut offset = 0;
        for g in grads.iter_mut() {
            let n = g.numel() as i64;
            g.copy_(&packed.narrow(0, offset, n).view(g.size().as_slice()));
            offset += n;
        }
    }
    let packing = t2.elapsed().as_secs_f64() / args.steps as f64;
    if main {
        let bytes = 4.0 * params as f64;
        let ring = 2.0 * (w as f64 - 1.0) / w as f64;
        let measured = (lo1 - lo0) as f64 / (args.steps as f64 * w as f64);
        let mb = |b: f64| b / 1e6;
        println!("model {} ({} tensors, {params} parameters, gradient {:.2} MB f32), {w} processes x 1 thread, Gloo over 127.0.0.1", args.model, shapes.len(), mb(bytes));
        println!("analytic bytes sent per rank and step (ring all-reduce, 2(W-1)/W x gradient): {:.2} MB", mb(ring * bytes));
        println!(
            "measured (loopback rx bytes / steps / ranks, bucketed runs incl. barriers): {:.2} MB per rank and step ({:.2}x the analytic number)",
            mb(measured),
            measured / (ring * bytes)
        );
        for (name, t) in [
            (
                format!("all_reduce_bucketed Avg, {} MiB buckets", args.bucket_mb),
                bucketed,
            ),
            ("all_reduce of one flat buffer".to_string(), single),
        ] {
            let algbw = bytes / t;
            println!(
                "{name:<40} {:>8.2} ms/step  algbw {:>7.2} GB/s  busbw {:>7.2} GB/s",
                t * 1e3,
                algbw / 1e9,
                algbw * ring / 1e9
            );
        }
        println!(
            "{:<40} {:>8.2} ms/step (local work of the bucketed path, no communication)",
            "packing: copy in, divide, copy back",
            packing * 1e3
        );
    }
    Ok(())
}

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass; RUSAGE_SELF is always valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Row-normalised `x`.
fn unit_rows(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12)
}

/// `--head-step` on one rank: (wall, CPU) seconds per step of `steps` steps after `warmup`.
fn time_steps(
    args: &Args,
    world: &World,
    mut step: impl FnMut() -> Result<()>,
) -> Result<(f64, f64)> {
    for _ in 0..args.warmup {
        step()?;
    }
    world.barrier()?;
    let (t0, c0) = (Instant::now(), cpu_seconds());
    for _ in 0..args.steps {
        step()?;
    }
    world.barrier()?;
    let n = args.steps as f64;
    Ok((t0.elapsed().as_secs_f64() / n, (cpu_seconds() - c0) / n))
}

fn head_step_worker(args: &Args) -> Result<()> {
    tch::set_num_threads(1);
    let world = World::from_env(Device::Cpu)?;
    let (w, rank) = (world.size(), world.rank());
    let (c, d, b) = (args.classes, args.dim, args.batch);
    let head = HeadConfig::Arcface(Default::default()).build();
    tch::manual_seed(rank as i64 + 1);
    let emb = Tensor::randn([b, d], (Kind::Float, Device::Cpu));
    let y = Tensor::randint(c, [b], (Kind::Int64, Device::Cpu));
    // Replicated: all C rows, the local batch, the gradient all-reduced.
    let weight = (Tensor::randn([c, d], (Kind::Float, Device::Cpu)) * 0.01).set_requires_grad(true);
    let emb_leaf = emb.shallow_clone().set_requires_grad(true);
    let replicated = time_steps(args, &world, || {
        let cos = unit_rows(&emb_leaf).matmul(&unit_rows(&weight).tr());
        margin_cross_entropy(head.as_ref(), &cos, &y).backward();
        let mut g = weight.grad();
        world.all_reduce(&mut g, ReduceOp::Avg, "the classifier gradient")?;
        let _guard = tch::no_grad_guard();
        let _ = weight.grad().zero_();
        let _ = emb_leaf.grad().zero_();
        Ok(())
    })?;
    drop(weight);
    // Model parallel: this rank's block, the gathered batch.
    let shard = ClassShard::of(c, rank, w);
    let block =
        (Tensor::randn([shard.len, d], (Kind::Float, Device::Cpu)) * 0.01).set_requires_grad(true);
    let sharded = time_steps(args, &world, || {
        let emb_g = world
            .all_gather_cat(&emb, "the embeddings")?
            .set_requires_grad(true);
        let y_g = world.all_gather_cat(&y, "the labels")?;
        let e = unit_rows(&emb_g);
        let cos = e.matmul(&unit_rows(&block).tr());
        let norms = emb_g.norm_scalaropt_dim(2, [1], false);
        sharded_cross_entropy(
            head.as_ref(),
            &cos,
            &shard.local_labels(&y_g),
            &norms,
            &world,
        )?
        .backward();
        let _own = world.reduce_scatter_sum(&emb_g.grad(), "the embeddings' gradient")?;
        let _guard = tch::no_grad_guard();
        let _ = block.grad().zero_();
        Ok(())
    })?;
    if world.is_main() {
        println!("head step: ArcFace, C = {c}, D = {d}, B = {b} per rank, {w} processes x 1 thread, Gloo over 127.0.0.1, f32; {} timed steps after {}", args.steps, args.warmup);
        println!("replicated: [{b} x {c}] cosines per rank + all-reduce of the [{c} x {d}] gradient ({:.1} MB)", 4.0 * (c * d) as f64 / 1e6);
        println!("model parallel: [{} x {}] cosines per rank (block of rank 0) + all-gather of [{b} x {d}] + 3 small all-reduces + reduce-scatter of [{} x {d}]", w as i64 * b, shard.len, w as i64 * b);
        for (name, (wall, cpu)) in [("replicated", replicated), ("model parallel", sharded)] {
            println!(
                "{name:<16} {:>9.1} ms/step wall  {:>9.1} ms/step CPU (rank 0)",
                wall * 1e3,
                cpu * 1e3
            );
        }
        println!(
            "replicated / model parallel: {:.2}x wall, {:.2}x CPU",
            replicated.0 / sharded.0,
            replicated.1 / sharded.1
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if std::env::var_os(WORKER_VAR).is_some() {
        if args.head_step {
            return head_step_worker(&args);
        }
        return worker(&args);
    }
    let exe = std::env::current_exe()?;
    let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    let mut cfg = facerec_launch::LaunchConfig::local(args.nproc);
    cfg.master_addr = "127.0.0.1".into();
    facerec_launch::launch(&cfg, &exe, &argv, &[(WORKER_VAR.into(), "1".into())])?;
    Ok(())
}
