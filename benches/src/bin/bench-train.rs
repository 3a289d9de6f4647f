//! `cargo xtask bench-train`: whole training steps of facerec against a PyTorch eager reference of
//! the same network, head, optimiser and batch, measured in one run; and eval-mode embedding
//! throughput against `torch.no_grad()` inference of the same network.
//!
//! One training step is what `facerec train` does per batch (ours goes through the trainer's own
//! pieces: `facerec_backbone::build`, the `Classifier`, the config's objective, the `Optimizer`,
//! `GradScaler` and `clip_grad_norm`, called in the order of the loop body in `run.rs`): forward,
//! cosine classifier, ArcFace, cross-entropy, backward, the NaN guard, clipping the backbone's
//! gradient norm to 5, SGD (momentum 0.9, weight decay 5e-4) and reading the loss. The reference,
//! `data-scripts/bench_train_reference.py`, is the same step written as a PyTorch user writes it
//! (arcface_torch's loop) on the independent oracle networks of `backbone_oracle.py`, run as users
//! run it (`--reference defaults`: no allocator or OpenMP settings), with facerec's allocator
//! setting (`malloc`: the same `mallopt` calls) and with all of facerec's process settings
//! (`same`: those and `GOMP_SPINCOUNT=3000`; see `crates/process`).
//! The batch is a fixed synthetic one (uniform images in [-1, 1], random labels) on both sides:
//! data loading is `bench-data`'s subject.
//!
//! Per network: a warm-up on every side, then `--reps` rounds in which ours and each reference
//! run `steps` steps in turn (A B C A B C ...), so all see the same machine load. Reported:
//! samples/s from the median step time, the ratio to each reference, the ratio of median process
//! CPU time per step (less inflated by other processes on a shared machine), and the resident
//! size (peak so far, and now) of each process. The embedding rows time
//! `embed_with_flip` over Uint8 images as `facerec eval` runs it (normalise, `f(x) + f(flip(x))`,
//! XNorm, L2 normalise; the backbone with its BatchNorms folded, as `eval` loads it) against the
//! same under `torch.no_grad()`, with a column for our unfolded backbone timed in the same rounds.
//!
//! Networks (`--nets`): `small` (the iResNet of the shipped CPU recipes: layers [1, 1, 1, 1],
//! widths [16, 32, 64, 128], 128-d, 56 px), `mbf` (MobileFaceNet scale 1, 128-d, 112 px), `r18`,
//! `r50` (112 px, 512-d), and on request `vit_t` (arcface_torch's, with its masking and drop path
//! on both sides; the reference is `vit_oracle.py`'s network). On a CUDA machine a CUDA table follows: r50 at batch 128 with fp16 and
//! bf16 autocast on both sides (`torch.autocast` + `GradScaler` for fp16 in the reference).

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use facerec_backbone::{Backbone, BackboneConfig, IResNetConfig, MobileFaceNetConfig, ViTConfig};
use facerec_benches::{median, process_cpu_ms, sync};
use facerec_evaluation::embed_with_flip;
use facerec_evaluation::images::normalize;
use facerec_trainer::amp::Precision;
use facerec_trainer::objective::Objective;
use facerec_trainer::state::State;
use facerec_trainer::step::StepPlan;
use facerec_trainer::world::World;
use facerec_trainer::Config;
use serde::Deserialize;
use serde_json::json;
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

#[derive(Parser, Clone)]
#[command(about = "Training steps and embedding throughput: facerec vs PyTorch eager")]
struct Args {
    /// Comma-separated networks: small, mbf, r18, r50, vit_t (not in the default list).
    #[arg(long, default_value = "small,mbf,r18,r50")]
    nets: String,
    /// Alternating rounds (each: `steps` steps of ours, then of each reference).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Steps per side and round (default per network: small 8, mbf 3, r18 2, r50 1).
    #[arg(long)]
    steps: Option<usize>,
    /// Warm-up steps per side before timing.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Batch size (default per network: 64; r18 and r50 32 on the CPU).
    #[arg(long)]
    batch: Option<i64>,
    /// Classifier classes.
    #[arg(long, default_value_t = 826)]
    classes: i64,
    /// ArcFace head: `arcface` (exact gradient, facerec's default) or `arcface_detached`.
    #[arg(long, default_value = "arcface")]
    head: String,
    /// libtorch intra-op threads, on both sides (default: libtorch's choice, the core count).
    #[arg(long)]
    threads: Option<i32>,
    /// Comma-separated reference columns: `defaults` (PyTorch as users run it), `malloc` (with
    /// facerec's allocator setting), `same` (with facerec's allocator and OpenMP settings).
    #[arg(long, default_value = "defaults,malloc,same")]
    reference: String,
    /// Images embedded per timed embedding repetition (default per network: small 1024, mbf 256,
    /// r18 128, r50 64; each image is two forwards, with the flip).
    #[arg(long)]
    eval_images: Option<i64>,
    /// Skip the training rows.
    #[arg(long)]
    skip_train: bool,
    /// Skip the embedding rows.
    #[arg(long)]
    skip_eval: bool,
    /// Only our side.
    #[arg(long)]
    skip_python: bool,
    /// Our activation layout, `channels-last` or `nchw` (`model.channels_last`). Default: the
    /// faster one for each network on a CPU (docs/backbones.md): channels-last for `small` (as the
    /// shipped CPU recipes, whose embedded default config sets it) and `mbf`, NCHW (the library
    /// default) for `r18` and `r50`.
    #[arg(long, value_parser = ["channels-last", "nchw"])]
    layout: Option<String>,
    /// Python with torch (default `$FACEREC_PYTHON`, else `python3`).
    #[arg(long)]
    python: Option<PathBuf>,
}

/// Batch size of the embedding rows (both sides).
const EVAL_BATCH: i64 = 128;

/// One network of the bench.
struct Net {
    name: &'static str,
    model: BackboneConfig,
    batch: i64,
    steps: usize,
    eval_images: i64,
}

fn nets(args: &Args, device: Device) -> Result<Vec<Net>> {
    let cuda = device.is_cuda();
    let pick = |default: i64| args.batch.unwrap_or(default);
    let mut out = Vec::new();
    for name in args.nets.split(',').map(str::trim) {
        let (name, model, batch, steps, eval_images) = match name {
            "small" => (
                "small",
                BackboneConfig::Iresnet(IResNetConfig {
                    depth: None,
                    layers: Some([1, 1, 1, 1]),
                    widths: [16, 32, 64, 128],
                    embedding_size: 128,
                    dropout: 0.0,
                    input_size: 56,
                    channels_last: true,
                }),
                pick(64),
                8,
                1024,
            ),
            "mbf" => (
                "mbf",
                BackboneConfig::Mobilefacenet(MobileFaceNetConfig {
                    embedding_size: 128,
                    scale: 1,
                    channels_last: true,
                    ..Default::default()
                }),
                pick(64),
                3,
                256,
            ),
            "r18" => (
                "r18",
                BackboneConfig::Iresnet(IResNetConfig::r18()),
                pick(if cuda { 128 } else { 32 }),
                2,
                128,
            ),
            "r50" => (
                "r50",
                BackboneConfig::Iresnet(IResNetConfig::r50()),
                pick(if cuda { 128 } else { 32 }),
                1,
                64,
            ),
            "vit_t" => (
                "vit_t",
                BackboneConfig::Vit(ViTConfig::vit_t()),
                pick(if cuda { 128 } else { 16 }),
                1,
                64,
            ),
            other => bail!("--nets: unknown network `{other}` (small, mbf, r18, r50, vit_t)"),
        };
        let mut model = model;
        if let Some(layout) = &args.layout {
            // The ViT has no convolutions to lay out: it runs as it is.
            model.set_channels_last(layout == "channels-last");
        }
        out.push(Net {
            name,
            model,
            batch,
            steps: args.steps.unwrap_or(if cuda { 10 } else { steps }),
            eval_images: args
                .eval_images
                .unwrap_or(if cuda { 1024 } else { eval_images }),
        });
    }
    Ok(out)
}

/// The trainer config of one bench case: the embedded default with this network, ArcFace
/// (s = 64, m = 0.5), SGD and clipping at 5.
fn config(net: &Net, args: &Args, device: Device, precision: Precision) -> Result<Config> {
    let mut value: toml::Value = toml::from_str(facerec_trainer::config::DEFAULT_CONFIG)?;
    let root = value
        .as_table_mut()
        .context("the default config is a table")?;
    root.insert("model".into(), toml::Value::try_from(&net.model)?);
    let gradient = match args.head.as_str() {
        "arcface" => "exact",
        "arcface_detached" => "detached",
        other => bail!("--head: `{other}` is neither arcface nor arcface_detached"),
    };
    let mut head = toml::Table::new();
    head.insert("type".into(), "arcface".into());
    head.insert("s".into(), 64.0.into());
    head.insert("m".into(), 0.5.into());
    head.insert("gradient".into(), gradient.into());
    root.insert("head".into(), head.into());
    let train = root
        .get_mut("train")
        .and_then(|t| t.as_table_mut())
        .context("[train]")?;
    train.insert("batch_size".into(), net.batch.into());
    train.insert("grad_clip".into(), 5.0.into());
    let device_name = match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    };
    train.insert("device".into(), device_name.into());
    train.insert("precision".into(), toml::Value::try_from(precision)?);
    let optim = root
        .get_mut("optim")
        .and_then(|t| t.as_table_mut())
        .context("[optim]")?;
    optim.insert("lr".into(), 0.1.into());
    optim.insert("momentum".into(), 0.9.into());
    optim.insert("weight_decay".into(), 5e-4.into());
    Config::from_value(value)
}

/// Our side: the trainer's own state (`State::new`), objective and optimiser step
/// (`StepPlan::run_on`, the step `facerec train` takes) over one fixed batch.
struct Ours {
    cfg: Config,
    st: State,
    objective: Box<dyn Objective>,
    world: World,
    num_classes: i64,
    lr: f64,
    last_loss: f64,
    x: Tensor,
    y: Tensor,
    images: Vec<usize>,
    device: Device,
}

impl Ours {
    /// Built as the trainer builds its state.
    fn new(cfg: &Config, num_classes: i64, device: Device) -> Self {
        tch::manual_seed(cfg.seed as i64);
        let st = State::new(cfg, num_classes as usize, device);
        let objective = facerec_trainer::objective::build(cfg, num_classes, None, device);
        let size = cfg.model.input_size();
        let b = cfg.train.batch_size as i64;
        let x = Tensor::rand([b, 3, size, size], (Kind::Float, device)) * 2.0 - 1.0;
        let y = Tensor::randint(num_classes, [b], (Kind::Int64, device));
        Ours {
            cfg: cfg.clone(),
            st,
            objective,
            world: World::single(),
            num_classes,
            lr: cfg.optim.lr(),
            last_loss: f64::NAN,
            x,
            y,
            images: (0..b as usize).collect(),
            device,
        }
    }

    fn params(&self) -> i64 {
        self.st
            .backbone_params
            .iter()
            .map(|t| t.numel() as i64)
            .sum()
    }

    /// One optimiser step: the trainer's `StepPlan::run_on` (one micro-batch).
    fn step(&mut self) -> f64 {
        let plan = StepPlan {
            cfg: &self.cfg,
            num_classes: self.num_classes as usize,
            device: self.device,
            world: &self.world,
            shard: None,
        };
        let out = plan
            .run_on(
                &mut self.st,
                self.objective.as_mut(),
                &self.x,
                &self.y,
                &self.images,
                self.lr,
            )
            .expect("a step on one process cannot fail");
        self.last_loss = out.loss;
        out.loss
    }

    fn train(&mut self, steps: usize) -> Vec<Timing> {
        (0..steps)
            .map(|_| {
                sync(self.device);
                let (t0, c0) = (Instant::now(), process_cpu_ms());
                self.step();
                sync(self.device);
                Timing {
                    wall: t0.elapsed().as_secs_f64() * 1e3,
                    cpu: process_cpu_ms() - c0,
                }
            })
            .collect()
    }

    /// A copy of the backbone with its BatchNorms folded, as `facerec eval` loads a model
    /// (`LoadedModel::load`); the store is returned with it.
    fn folded_backbone(&self) -> Result<(nn::VarStore, Backbone)> {
        let mut vs = nn::VarStore::new(self.device);
        let mut net = facerec_backbone::build(&vs.root(), &self.cfg.model);
        vs.copy(&self.st.backbone_vs)?;
        let report = net.fold_batch_norms();
        eprintln!("bench-train: eval backbone: {report}");
        Ok((vs, net))
    }

    /// Flip-test embeddings of `images` by `net` as `facerec eval` computes them.
    fn embed(&self, net: &Backbone, images: &Tensor, batch: i64, reps: usize) -> Vec<Timing> {
        let model = |x: &Tensor| {
            net.forward_t(&normalize(&x.to_device(self.device)), false)
                .to_device(Device::Cpu)
        };
        (0..reps)
            .map(|_| {
                let (t0, c0) = (Instant::now(), process_cpu_ms());
                let (emb, xnorm) = embed_with_flip(&model, images, batch);
                assert!(xnorm.is_finite() && emb.size()[0] == images.size()[0]);
                Timing {
                    wall: t0.elapsed().as_secs_f64() * 1e3,
                    cpu: process_cpu_ms() - c0,
                }
            })
            .collect()
    }
}

/// One timed step or repetition: wall and process CPU milliseconds.
#[derive(Debug, Clone, Copy)]
struct Timing {
    wall: f64,
    cpu: f64,
}

#[derive(Deserialize)]
struct Hello {
    torch: String,
    threads: i32,
}

#[derive(Deserialize)]
struct Times {
    ms: Vec<f64>,
    cpu_ms: Vec<f64>,
}

impl Times {
    fn timings(&self) -> Vec<Timing> {
        self.ms
            .iter()
            .zip(&self.cpu_ms)
            .map(|(&wall, &cpu)| Timing { wall, cpu })
            .collect()
    }
}

#[derive(Deserialize)]
struct Rss {
    peak_rss_bytes: u64,
    rss_bytes: u64,
}

/// How a reference process runs: its column name and the script's `--malloc` / `--omp`.
#[derive(Clone, Copy)]
struct RefMode {
    name: &'static str,
    malloc: &'static str,
    omp: &'static str,
}

fn ref_modes(list: &str) -> Result<Vec<RefMode>> {
    list.split(',')
        .map(|m| {
            Ok(match m.trim() {
                "defaults" => RefMode {
                    name: "defaults",
                    malloc: "system",
                    omp: "default",
                },
                "malloc" => RefMode {
                    name: "malloc",
                    malloc: "keep",
                    omp: "default",
                },
                "same" => RefMode {
                    name: "same",
                    malloc: "keep",
                    omp: "short",
                },
                other => bail!("--reference: `{other}` (defaults, malloc or same)"),
            })
        })
        .collect()
}

/// The PyTorch reference in serve mode (one JSON request line, one JSON line back).
struct Reference {
    malloc: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    torch: String,
}

impl Reference {
    fn start(args: &Args, threads: i32, mode: RefMode) -> Result<Self> {
        let python = args
            .python
            .clone()
            .or_else(|| std::env::var_os("FACEREC_PYTHON").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("python3"));
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../data-scripts/bench_train_reference.py");
        let mut child = Command::new(&python)
            .arg(&script)
            .args([
                "--threads",
                &threads.to_string(),
                "--malloc",
                mode.malloc,
                "--omp",
                mode.omp,
            ])
            // Only what the mode asks for: not the OpenMP policy this process runs with (children
            // inherit it), nor glibc tunables.
            .env_remove("GLIBC_TUNABLES")
            .env_remove("OMP_WAIT_POLICY")
            .env_remove("GOMP_SPINCOUNT")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
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
            malloc: mode.name.into(),
            child,
            stdin: Some(stdin),
            stdout,
            torch: hello.torch,
        })
    }

    fn ask<T: for<'de> Deserialize<'de>>(&mut self, req: serde_json::Value) -> Result<T> {
        let stdin = self.stdin.as_mut().context("reference closed")?;
        writeln!(stdin, "{req}")?;
        stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        serde_json::from_str(&line)
            .with_context(|| format!("reference ({}) reply to {req}: {line:?}", self.malloc))
    }
}

impl Drop for Reference {
    fn drop(&mut self) {
        // Closing stdin ends the serve loop.
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// Current resident size of this process (`/proc/self/statm`), bytes.
fn rss_now() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    // SAFETY: sysconf with a constant name.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
}

fn mib(b: u64) -> String {
    format!("{}", b >> 20)
}

/// Timings of one side for one network.
struct Side {
    train: Vec<Timing>,
    /// Ours: with BatchNorms folded, as `facerec eval` runs (the reference: its only column).
    embed: Vec<Timing>,
    /// Ours only: the same backbone unfolded (`FACEREC_FOLD_BN=off`).
    embed_unfolded: Vec<Timing>,
    rss: (u64, u64),
}

fn main() -> Result<()> {
    let settings = facerec_process::init()?;
    let args = Args::parse();
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    let threads = tch::get_num_threads();
    let modes = ref_modes(&args.reference)?;
    let mut devices = vec![(Device::Cpu, Precision::Off)];
    if tch::Cuda::is_available() {
        devices.push((Device::Cuda(0), Precision::Fp16));
        devices.push((Device::Cuda(0), Precision::Bf16));
    } else {
        eprintln!(
            "bench-train: no CUDA device: the CUDA rows (r50, batch 128, fp16 / bf16) are skipped"
        );
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "bench-train: ours {}; {} activations; {threads} libtorch threads; load average at start {}",
        settings.describe(),
        args.layout.as_deref().unwrap_or("each network's default"),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    for (device, precision) in devices {
        let nets = if device.is_cuda() {
            nets(
                &Args {
                    nets: "r50".into(),
                    ..args.clone()
                },
                device,
            )?
        } else {
            nets(&args, device)?
        };
        let mut refs = Vec::new();
        if !args.skip_python {
            for &m in &modes {
                refs.push(Reference::start(&args, threads, m)?);
            }
        }
        let dev = match (device, precision) {
            (Device::Cuda(_), Precision::Fp16) => "cuda fp16",
            (Device::Cuda(_), _) => "cuda bf16",
            _ => "cpu",
        };
        let mut rows = Vec::new();
        for net in &nets {
            eprintln!("bench-train: {dev} {} batch {} ...", net.name, net.batch);
            let cfg = config(net, &args, device, precision)?;
            let mut ours = Ours::new(&cfg, args.classes, device);
            let setup = json!({
                "cmd": "setup", "model": serde_json::to_value(&net.model)?, "batch": net.batch,
                "classes": args.classes, "s": 64.0, "m": 0.5, "head": args.head, "lr": 0.1,
                "momentum": 0.9, "weight_decay": 5e-4, "clip": 5.0,
                "precision": match precision { Precision::Off => "off", Precision::Fp16 => "fp16", Precision::Bf16 => "bf16" },
                "device": if device.is_cuda() { "cuda" } else { "cpu" },
            });
            let mut ref_params = Vec::new();
            for r in refs.iter_mut() {
                #[derive(Deserialize)]
                struct Setup {
                    params: i64,
                }
                ref_params.push(r.ask::<Setup>(setup.clone())?.params);
            }
            if let Some(p) = ref_params.iter().find(|&&p| p != ours.params()) {
                bail!(
                    "{}: the reference has {p} backbone parameters, ours {}",
                    net.name,
                    ours.params()
                );
            }
            let mut sides: Vec<Side> = (0..=refs.len())
                .map(|_| Side {
                    train: vec![],
                    embed: vec![],
                    embed_unfolded: vec![],
                    rss: (0, 0),
                })
                .collect();
            if !args.skip_train {
                ours.train(args.warmup);
                for r in refs.iter_mut() {
                    r.ask::<Times>(json!({"cmd": "train", "steps": args.warmup}))?;
                }
                for _ in 0..args.reps {
                    sides[0].train.extend(ours.train(net.steps));
                    for (i, r) in refs.iter_mut().enumerate() {
                        sides[i + 1].train.extend(
                            r.ask::<Times>(json!({"cmd": "train", "steps": net.steps}))?
                                .timings(),
                        );
                    }
                }
            }
            if !args.skip_eval {
                let size = net.model.input_size();
                let images = Tensor::randint(
                    256,
                    [net.eval_images, 3, size, size],
                    (Kind::Uint8, Device::Cpu),
                )
                .to_device(device);
                let eval_batch = EVAL_BATCH;
                let (_folded_vs, folded) = ours.folded_backbone()?;
                let unfolded = &ours.st.backbone;
                ours.embed(&folded, &images, eval_batch, 1);
                ours.embed(unfolded, &images, eval_batch, 1);
                let req = |reps: usize| json!({"cmd": "embed", "images": net.eval_images, "batch": eval_batch, "reps": reps});
                for r in refs.iter_mut() {
                    r.ask::<Times>(req(1))?;
                }
                for _ in 0..args.reps {
                    sides[0]
                        .embed
                        .extend(ours.embed(&folded, &images, eval_batch, 1));
                    sides[0]
                        .embed_unfolded
                        .extend(ours.embed(unfolded, &images, eval_batch, 1));
                    for (i, r) in refs.iter_mut().enumerate() {
                        sides[i + 1].embed.extend(r.ask::<Times>(req(1))?.timings());
                    }
                }
            }
            sides[0].rss = (facerec_process::peak_rss_bytes().unwrap_or(0), rss_now());
            for (i, r) in refs.iter_mut().enumerate() {
                let rss: Rss = r.ask(json!({"cmd": "rss"}))?;
                sides[i + 1].rss = (rss.peak_rss_bytes, rss.rss_bytes);
            }
            // Same seed, same steps: equal across allocator / OpenMP settings and bit-identical
            // code changes (a check that a speed change did not change the numbers).
            if ours.st.step > 0 {
                eprintln!(
                    "bench-train: {dev} {}: our loss after {} steps: {:.9e}",
                    net.name, ours.st.step, ours.last_loss
                );
            }
            let params = ours.params();
            drop(ours);
            rows.push((net, params, sides));
        }
        let torch = refs
            .first()
            .map(|r| r.torch.clone())
            .unwrap_or_else(|| "-".into());
        let malloc_names: Vec<String> = refs.iter().map(|r| r.malloc.clone()).collect();
        drop(refs);
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        println!();
        println!(
            "device {dev}, {threads} libtorch threads, reference torch {torch}, {} rounds, median step; load average at end {}",
            args.reps,
            load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
        );
        print_tables(&rows, &malloc_names, &args);
    }
    Ok(())
}

fn print_tables(rows: &[(&Net, i64, Vec<Side>)], mallocs: &[String], args: &Args) {
    let med = |v: &[Timing], f: fn(&Timing) -> f64| median(v.iter().map(f).collect());
    for (what, unit, pick) in [
        ("training step", "samples/s", 0usize),
        ("embedding (eval, flip test)", "images/s", 1),
    ] {
        if (pick == 0 && args.skip_train) || (pick == 1 && args.skip_eval) {
            continue;
        }
        println!();
        println!("{what}:");
        let size_col = if pick == 0 {
            "batch".to_string()
        } else {
            format!("images (batches of {EVAL_BATCH})")
        };
        let mut head = format!("| net | params | {size_col} | ours {unit} |");
        let mut rule = "|---|---:|---:|---:|".to_string();
        if pick == 1 {
            // Ours is the folded backbone; the unfolded one is timed in the same rounds.
            head += &format!(" ours unfolded {unit} | fold gain | CPU-time gain |");
            rule += "---:|---:|---:|";
        }
        for m in mallocs {
            head += &format!(" PyTorch ({m}) {unit} | ratio | CPU-time ratio |");
            rule += "---:|---:|---:|";
        }
        if pick == 0 {
            head += " peak / now RSS MiB: ours |";
            rule += "---:|";
            for m in mallocs {
                head += &format!(" PyTorch ({m}) |");
                rule += "---:|";
            }
        }
        println!("{head}");
        println!("{rule}");
        for (net, params, sides) in rows {
            let t = |s: &Side| {
                if pick == 0 {
                    s.train.clone()
                } else {
                    s.embed.clone()
                }
            };
            let per_item = if pick == 0 {
                net.batch as f64
            } else {
                net.eval_images as f64
            };
            let ours = t(&sides[0]);
            if ours.is_empty() {
                continue;
            }
            let (ours_ms, ours_cpu) = (med(&ours, |x| x.wall), med(&ours, |x| x.cpu));
            let mut line = format!(
                "| {} | {params} | {} | {:.1} |",
                net.name,
                per_item as i64,
                per_item * 1e3 / ours_ms
            );
            if pick == 1 {
                let unf = &sides[0].embed_unfolded;
                let (ms, cpu) = (med(unf, |x| x.wall), med(unf, |x| x.cpu));
                line += &format!(
                    " {:.1} | {:.2}x | {:.2}x |",
                    per_item * 1e3 / ms,
                    ms / ours_ms,
                    cpu / ours_cpu
                );
            }
            for s in &sides[1..] {
                let theirs = t(s);
                let (ms, cpu) = (med(&theirs, |x| x.wall), med(&theirs, |x| x.cpu));
                line += &format!(
                    " {:.1} | {:.2}x | {:.2}x |",
                    per_item * 1e3 / ms,
                    ms / ours_ms,
                    cpu / ours_cpu
                );
            }
            if pick == 0 {
                for s in sides {
                    line += &format!(" {} / {} |", mib(s.rss.0), mib(s.rss.1));
                }
            }
            println!("{line}");
        }
    }
}
