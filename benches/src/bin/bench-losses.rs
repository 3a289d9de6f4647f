//! `cargo xtask bench-losses`: forward + backward time of every margin head, ours against a PyTorch
//! eager reference of the same head written the way the reference code computes it
//! (`data-scripts/bench_losses_reference.py`: acos/cos over the whole `[B, C]` matrix, one-hot or
//! index-assigned margins), measured in the same run with the same libtorch thread count.
//!
//! Timed per repetition: `cos = clamp(raw, −1, 1)` from a `[B, C]` leaf, the head with the mean
//! cross-entropy, and the backward to the leaf (`autograd.grad`, no accumulation). Ours is the
//! path the trainer uses, the fused `margin_cross_entropy(head, cos, labels)`; `--unfused` adds a
//! column for the generic `cross_entropy(head.logits(cos, labels), labels)`, timed in the same
//! alternation; `--sharded` one for `sharded_cross_entropy(head, cos, local labels, norms)` over
//! a world of one (`SingleProcess`: the per-rank work of the model-parallel loss at `C' = C`,
//! without communication). The classifier's
//! matmul is the same in both and excluded by default (`--with-classifier` includes it, with
//! `D = --dim`). The reference runs as a subprocess in serve mode, and per head one warm-up each
//! is followed by `--reps` repetitions that alternate between ours and the reference, so both
//! see the same machine load. The table shows medians and, as a check against a busy machine,
//! the ratio of the fastest repetitions and the ratio of median process CPU times (user + system
//! time of all threads, `CLOCK_PROCESS_CPUTIME_ID` here and `time.process_time()` in Python), which
//! the other processes on a shared machine do not inflate the way they inflate wall time.
//! GCE (`gce`, `gce_additive`) is timed the same way, its loss in place of head + CE; its
//! reference is GCE written the straightforward way (see the script).
//! Small cases (fewer than 2^22 entries) time each repetition right after an untimed run of the
//! same side, so that neither side is timed on caches the other process has just evicted (see
//! `SETTLE_BELOW`).
//! Shapes: `(B, C) = (128, 10 000)` and `(512, 100 000)`; `--quick` runs the first only, with
//! two repetitions. On a CUDA machine the CPU table is followed by a CUDA one.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use facerec_benches::{median, min, process_cpu_ms, sync};
use facerec_loss_heads::{
    cross_entropy, margin_cross_entropy, pool_sub_centres, sharded_cross_entropy, CosineClassifier,
    Gce, GceConfig, HeadConfig, MarginHead, SingleProcess,
};
use serde::Deserialize;
use tch::{nn, Device, Kind, Tensor};

#[derive(Parser)]
#[command(about = "Margin heads, forward + backward: facerec vs PyTorch eager references")]
struct Args {
    /// Timed repetitions per head and shape (after one warm-up).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Only (128, 10000), two repetitions.
    #[arg(long)]
    quick: bool,
    /// libtorch intra-op threads, in both (default: libtorch's own choice, usually the core count).
    #[arg(long)]
    threads: Option<i32>,
    /// Comma-separated heads (default: all).
    #[arg(long)]
    heads: Option<String>,
    /// Comma-separated shapes BxC (overrides the defaults).
    #[arg(long)]
    shapes: Option<String>,
    /// Include normalise + matmul against a `[C, D]` weight in the timing.
    #[arg(long)]
    with_classifier: bool,
    /// Embedding size for `--with-classifier`.
    #[arg(long, default_value_t = 512)]
    dim: i64,
    /// Only our side.
    #[arg(long)]
    skip_python: bool,
    /// Also time the unfused `cross_entropy(head.logits(..))` (an extra column).
    #[arg(long)]
    unfused: bool,
    /// Also time the model-parallel `sharded_cross_entropy` over a world of one (an extra column;
    /// margin heads only).
    #[arg(long)]
    sharded: bool,
    /// Python with torch (default `$FACEREC_PYTHON`, else `python3`).
    #[arg(long)]
    python: Option<PathBuf>,
}

#[derive(Deserialize)]
struct Hello {
    torch: String,
    threads: i32,
}

#[derive(Deserialize)]
struct Reply {
    ms: Vec<f64>,
    cpu_ms: Vec<f64>,
}

/// Cases with fewer `[B, C]` entries than this time each repetition right after an untimed
/// run of the same side. Without it, whichever side runs first after the other process's turn
/// finds its few-MB working set evicted from the caches by that process (a likely part of why, on
/// the quiet machine, our first column measured 8.8 ms at 128 x 10,000 against 7.6 ms for the
/// identical unfused code timed right after it);
/// in a training loop the same shapes repeat every step, so the warm case is the relevant one.
/// Large cases (hundreds of MB per tensor, far beyond any cache) are timed once per repetition.
const SETTLE_BELOW: i64 = 1 << 22;

/// One timed repetition: wall and process CPU milliseconds.
#[derive(Debug, Clone, Copy)]
struct Timing {
    wall: f64,
    cpu: f64,
}

/// The PyTorch reference in serve mode: one request line, one JSON line back.
struct Reference {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    torch: String,
}

impl Reference {
    fn start(args: &Args, device: Device, threads: i32) -> Result<Self> {
        let python = args
            .python
            .clone()
            .or_else(|| std::env::var_os("FACEREC_PYTHON").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("python3"));
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../data-scripts/bench_losses_reference.py");
        let mut cmd = Command::new(&python);
        cmd.arg(&script)
            .args(["--threads", &threads.to_string()])
            .args(["--device", if device.is_cuda() { "cuda" } else { "cpu" }])
            .args(["--dim", &args.dim.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if args.with_classifier {
            cmd.arg("--with-classifier");
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("running {} {}", python.display(), script.display()))?;
        let stdin = child.stdin.take().context("reference stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("reference stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let hello: Hello = serde_json::from_str(&line)
            .with_context(|| format!("{} did not start: {line:?}", script.display()))?;
        if hello.threads != threads {
            bail!(
                "the reference runs {} threads, we run {threads}",
                hello.threads
            );
        }
        Ok(Self {
            child,
            stdin: Some(stdin),
            stdout,
            torch: hello.torch,
        })
    }

    fn time(&mut self, head: &str, b: i64, c: i64, reps: usize) -> Result<Vec<Timing>> {
        let stdin = self.stdin.as_mut().context("reference closed")?;
        writeln!(stdin, "{head} {b} {c} {reps}")?;
        stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let reply: Reply = serde_json::from_str(&line)
            .with_context(|| format!("reference reply for {head} {b}x{c}: {line:?}"))?;
        Ok(reply
            .ms
            .iter()
            .zip(&reply.cpu_ms)
            .map(|(&wall, &cpu)| Timing { wall, cpu })
            .collect())
    }
}

impl Drop for Reference {
    fn drop(&mut self) {
        // Closing stdin ends the serve loop.
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// Our inputs for one shape: the `[B, C]` raw-score leaf (or embeddings and a classifier).
struct Case {
    device: Device,
    /// Rows per class (sub-centres): the leaf is `[B, C·k]`, pooled to `[B, C]` in the timing.
    k: i64,
    labels: Tensor,
    classifier: Option<CosineClassifier>,
    leaves: Vec<Tensor>,
    _vs: nn::VarStore,
}

impl Case {
    fn new(args: &Args, device: Device, b: i64, c: i64, k: i64) -> Self {
        tch::manual_seed(0);
        let labels = Tensor::randint(c, [b], (Kind::Int64, device));
        let vs = nn::VarStore::new(device);
        let (classifier, leaves) = if args.with_classifier {
            let clf = CosineClassifier::with_sub_centres(&vs.root(), c, k, args.dim);
            let emb = Tensor::randn([b, args.dim], (Kind::Float, device)).set_requires_grad(true);
            let w = clf.weight().shallow_clone();
            (Some(clf), vec![emb, w])
        } else {
            let raw = (Tensor::rand([b, c * k], (Kind::Float, device)) * 2.0 - 1.0)
                .set_requires_grad(true);
            (None, vec![raw])
        };
        Self {
            device,
            k,
            labels,
            classifier,
            leaves,
            _vs: vs,
        }
    }

    /// Milliseconds of one forward + backward (for a head: the fused loss, the unfused one, or
    /// the sharded one over a world of one).
    fn time_once(&self, loss_fn: &mut Loss, path: Path) -> Timing {
        let leaf_refs: Vec<&Tensor> = self.leaves.iter().collect();
        sync(self.device);
        let t0 = Instant::now();
        let c0 = process_cpu_ms();
        let cos = match &self.classifier {
            Some(clf) => clf.cosines(&self.leaves[0]),
            None => pool_sub_centres(&self.leaves[0].clamp(-1.0, 1.0), self.k),
        };
        let loss = match (loss_fn, path) {
            (Loss::Head(head), Path::Fused) => {
                margin_cross_entropy(head.as_ref(), &cos, &self.labels)
            }
            (Loss::Head(head), Path::Unfused) => {
                cross_entropy(&head.logits(&cos, &self.labels), &self.labels)
            }
            (Loss::Head(head), Path::Sharded) => {
                let norms = Tensor::ones([cos.size()[0]], (cos.kind(), cos.device()));
                sharded_cross_entropy(head.as_ref(), &cos, &self.labels, &norms, &SingleProcess)
                    .expect("sharded cross-entropy")
            }
            (Loss::Gce(gce), _) => gce.loss(&cos, &self.labels),
        };
        let grads = Tensor::run_backward(&[&loss], &leaf_refs, false, false);
        sync(self.device);
        let wall = t0.elapsed().as_secs_f64() * 1e3;
        let cpu = process_cpu_ms() - c0;
        // Freed outside the timed region, as the reference does.
        drop((grads, loss, cos));
        Timing { wall, cpu }
    }
}

/// Which implementation of a head's loss is timed.
#[derive(Clone, Copy)]
enum Path {
    Fused,
    Unfused,
    Sharded,
}

/// What is timed: a margin head followed by the cross-entropy, or a GCE loss.
#[allow(clippy::large_enum_variant)] // a handful of values, built once per bench row
enum Loss {
    Head(Box<dyn MarginHead>),
    Gce(Gce),
}

/// A head config (with the step to set) or a GCE config.
#[derive(Clone)]
enum LossConfig {
    Head(HeadConfig, u64),
    Gce(GceConfig),
}

impl LossConfig {
    /// Rows of the classifier per class (sub-centres).
    fn rows_per_class(&self) -> i64 {
        match self {
            LossConfig::Head(cfg, _) => cfg.classifier_kind().rows_per_class(),
            LossConfig::Gce(_) => 1,
        }
    }

    fn build(&self) -> Loss {
        match self {
            LossConfig::Head(cfg, step) => {
                let mut head = cfg.build();
                head.set_step(*step);
                Loss::Head(head)
            }
            LossConfig::Gce(cfg) => Loss::Gce(Gce::new(cfg)),
        }
    }
}

fn main() -> Result<()> {
    let settings = facerec_process::init()?;
    let args = Args::parse();
    eprintln!("bench-losses: {}", settings.describe());
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    let threads = tch::get_num_threads();
    let reps = if args.quick {
        args.reps.min(2)
    } else {
        args.reps
    };
    let shapes: Vec<(i64, i64)> = match &args.shapes {
        Some(s) => s
            .split(',')
            .map(|bc| {
                let (b, c) = bc.split_once('x').context("shapes are BxC")?;
                Ok((b.trim().parse()?, c.trim().parse()?))
            })
            .collect::<Result<_>>()?,
        None if args.quick => vec![(128, 10_000)],
        None => vec![(128, 10_000), (512, 100_000)],
    };
    let mut all: Vec<(&str, LossConfig)> = facerec_benches::head_cases()
        .into_iter()
        .map(|(n, cfg, step)| (n, LossConfig::Head(cfg, step)))
        .collect();
    all.extend(
        facerec_benches::gce_cases()
            .into_iter()
            .map(|(n, cfg)| (n, LossConfig::Gce(cfg))),
    );
    let selected: Vec<(&str, LossConfig)> = match &args.heads {
        Some(list) => {
            let wanted: Vec<&str> = list.split(',').map(str::trim).collect();
            for w in &wanted {
                if !all.iter().any(|(n, _)| n == w) {
                    bail!("--heads: unknown head `{w}`");
                }
            }
            all.into_iter()
                .filter(|(n, _)| wanted.contains(n))
                .collect()
        }
        None => all,
    };
    let mut devices = vec![Device::Cpu];
    if tch::Cuda::is_available() {
        devices.push(Device::Cuda(0));
    }
    for device in devices {
        let dev = if device.is_cuda() { "cuda" } else { "cpu" };
        let mut reference = if args.skip_python {
            None
        } else {
            Some(Reference::start(&args, device, threads)?)
        };
        // Per head: one warm-up each, then our and the reference's repetitions alternate, so both
        // see the same machine load.
        let mut rows = Vec::new();
        for &(b, c) in &shapes {
            eprintln!("bench-losses: {dev} B={b} C={c} ...");
            let case = Case::new(&args, device, b, c, 1);
            for (name, cfg) in &selected {
                let mut head = cfg.build();
                // Sub-center ArcFace: its own [B, C·K] inputs (made outside the timed region).
                let k = cfg.rows_per_class();
                let own = (k > 1).then(|| Case::new(&args, device, b, c, k));
                let case = own.as_ref().unwrap_or(&case);
                case.time_once(&mut head, Path::Fused);
                if args.unfused {
                    case.time_once(&mut head, Path::Unfused);
                }
                let sharded_too = args.sharded && matches!(head, Loss::Head(_));
                if sharded_too {
                    case.time_once(&mut head, Path::Sharded);
                }
                if let Some(r) = reference.as_mut() {
                    r.time(name, b, c, 1)?;
                }
                let (mut ours, mut unfused, mut theirs) = (Vec::new(), Vec::new(), Vec::new());
                let mut sharded = Vec::new();
                // Small cases: each timed run follows an untimed one of the same side (see
                // `SETTLE_BELOW`), so that no side is timed on caches the other process evicted.
                let settle = b * c < SETTLE_BELOW;
                let timed = |head: &mut Loss, path: Path| {
                    if settle {
                        case.time_once(head, path);
                    }
                    case.time_once(head, path)
                };
                for _ in 0..reps {
                    ours.push(timed(&mut head, Path::Fused));
                    if args.unfused {
                        unfused.push(timed(&mut head, Path::Unfused));
                    }
                    if sharded_too {
                        sharded.push(timed(&mut head, Path::Sharded));
                    }
                    if let Some(r) = reference.as_mut() {
                        let runs = r.time(name, b, c, if settle { 2 } else { 1 })?;
                        theirs.extend(runs.last().copied());
                    }
                }
                rows.push((name.to_string(), b, c, ours, unfused, sharded, theirs));
            }
        }
        let torch_version = reference.as_ref().map(|r| r.torch.clone());
        drop(reference);
        println!();
        println!(
            "device {dev}, {threads} libtorch threads, {reps} timed reps (median), {}{}",
            if args.with_classifier {
                format!("with classifier D={}", args.dim)
            } else {
                "head + CE + backward from [B, C] scores".into()
            },
            torch_version
                .map(|t| format!(", reference torch {t}"))
                .unwrap_or_default()
        );
        let (mut extra_head, mut extra_rule) = (String::new(), String::new());
        if args.unfused {
            extra_head.push_str(" ours unfused (ms) |");
            extra_rule.push_str("---:|");
        }
        if args.sharded {
            extra_head.push_str(" ours sharded, W = 1 (ms) |");
            extra_rule.push_str("---:|");
        }
        println!(
            "| head | B x C | ours (ms) |{extra_head} reference (ms) | reference / ours | best-of ratio | CPU-time ratio |"
        );
        println!("|---|---|---:|{extra_rule}---:|---:|---:|---:|");
        let wall = |v: &[Timing]| v.iter().map(|t| t.wall).collect::<Vec<_>>();
        let cpu = |v: &[Timing]| v.iter().map(|t| t.cpu).collect::<Vec<_>>();
        for (name, b, c, ours, unfused, sharded, theirs) in rows {
            let ms = wall(&ours);
            let (ours_med, ours_min) = (median(ms.clone()), min(&ms));
            let mut unfused_col = String::new();
            if args.unfused {
                unfused_col.push_str(&format!(" {:.1} |", median(wall(&unfused))));
            }
            if args.sharded && sharded.is_empty() {
                unfused_col.push_str(" - |");
            } else if args.sharded {
                unfused_col.push_str(&format!(" {:.1} |", median(wall(&sharded))));
            }
            if theirs.is_empty() {
                println!("| {name} | {b} x {c} | {ours_med:.1} |{unfused_col} - | - | - | - |");
            } else {
                let ref_ms = wall(&theirs);
                let (ref_med, ref_min) = (median(ref_ms.clone()), min(&ref_ms));
                let cpu_ratio = median(cpu(&theirs)) / median(cpu(&ours));
                println!(
                    "| {name} | {b} x {c} | {ours_med:.1} |{unfused_col} {ref_med:.1} | {:.2}x | {:.2}x | {cpu_ratio:.2}x |",
                    ref_med / ours_med,
                    ref_min / ours_min
                );
            }
        }
    }
    Ok(())
}
