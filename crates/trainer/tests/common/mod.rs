//! Helpers shared by the trainer's integration tests that drive the `facerec` binary: arguments,
//! the run directory a run wrote, and weight files compared tensor by tensor.
#![allow(dead_code)] // each test binary uses its own subset

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tch::Tensor;

/// `--config CFG --set output_dir=OUT --set S...` for `facerec train`.
pub fn args(cfg: &Path, out: &Path, sets: &[&str]) -> Vec<String> {
    let mut a = vec![
        "--config".to_string(),
        cfg.display().to_string(),
        "--set".into(),
        format!("output_dir={}", out.display()),
    ];
    for s in sets {
        a.push("--set".into());
        a.push(s.to_string());
    }
    a
}

/// The one run directory under `parent`.
///
/// # Panics
/// When there is not exactly one.
pub fn only_run_dir(parent: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(
        dirs.len(),
        1,
        "expected one run directory in {}: {dirs:?}",
        parent.display()
    );
    dirs[0].clone()
}

/// The tensors of a safetensors file by name.
pub fn tensors(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// Whether `key` is a BatchNorm buffer (running statistics, not a trained weight).
pub fn is_buffer(key: &str) -> bool {
    key.ends_with("running_mean")
        || key.ends_with("running_var")
        || key.ends_with("num_batches_tracked")
}

/// Every tensor of `a` equals the one of the same name in `b`, bit for bit.
pub fn assert_bitwise_equal(a: &Path, b: &Path) {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(ta.len(), tb.len(), "{} vs {}", a.display(), b.display());
    for (k, x) in &ta {
        let y = tb
            .get(k)
            .unwrap_or_else(|| panic!("{k} missing in {}", b.display()));
        assert!(
            x.equal(y),
            "`{k}` differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

/// A port on 127.0.0.1 free right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Children killed when dropped (a failing assertion never leaves a rank behind).
pub struct Ranks(pub Vec<Child>);

impl Drop for Ranks {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Ranks {
    /// `world` ranks of `facerec train args...` meeting at 127.0.0.1:`port`.
    pub fn start(world: usize, port: u16, args: &[String], timeout_s: u64) -> Ranks {
        let children = (0..world)
            .map(|rank| {
                Command::new(env!("CARGO_BIN_EXE_facerec"))
                    .arg("train")
                    .args(args)
                    .env("RANK", rank.to_string())
                    .env("WORLD_SIZE", world.to_string())
                    .env("LOCAL_RANK", rank.to_string())
                    .env("LOCAL_WORLD_SIZE", world.to_string())
                    .env("MASTER_ADDR", "127.0.0.1")
                    .env("MASTER_PORT", port.to_string())
                    .env("FACEREC_DIST_TIMEOUT", timeout_s.to_string())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("starting a rank")
            })
            .collect();
        Ranks(children)
    }

    /// Wait for every rank (at most `limit`); their outputs in rank order.
    pub fn wait(mut self, limit: Duration) -> Vec<Output> {
        let t0 = Instant::now();
        let mut outs = Vec::new();
        for c in std::mem::take(&mut self.0) {
            let mut c = c;
            loop {
                if c.try_wait().unwrap().is_some() {
                    break;
                }
                if t0.elapsed() > limit {
                    let _ = c.kill();
                    panic!("a rank did not finish within {limit:?}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            outs.push(c.wait_with_output().unwrap());
        }
        outs
    }

    /// Kill rank 1 and check that rank 0 stops within 40 s with an error that names rank 1.
    pub fn kill_rank_1_and_check_rank_0_names_it(mut self) {
        let _ = self.0[1].kill();
        let _ = self.0[1].wait();
        let t_kill = Instant::now();
        let survivor = self.0.remove(0);
        let outs = Ranks(vec![survivor]).wait(Duration::from_secs(60));
        let err = String::from_utf8_lossy(&outs[0].stderr);
        assert!(
            !outs[0].status.success(),
            "rank 0 went on after its peer died"
        );
        assert!(
            t_kill.elapsed() < Duration::from_secs(40),
            "rank 0 took {:?} to notice",
            t_kill.elapsed()
        );
        assert!(
            err.contains("rank 1"),
            "rank 0's error does not name rank 1: {err}"
        );
    }
}

/// Run `world` ranks to completion; panics naming the rank that failed.
pub fn train(world: usize, args: &[String]) {
    let outs = if world == 1 {
        vec![Command::new(env!("CARGO_BIN_EXE_facerec"))
            .arg("train")
            .args(args)
            .output()
            .unwrap()]
    } else {
        Ranks::start(world, free_port(), args, 60).wait(Duration::from_secs(300))
    };
    for (r, o) in outs.iter().enumerate() {
        assert!(
            o.status.success(),
            "rank {r} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// Largest `|a - b| / (1 + |b|)` over the trainable tensors of two weight files.
pub fn max_rel_diff(a: &Path, b: &Path) -> f64 {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(ta.len(), tb.len());
    let mut worst = 0f64;
    for (k, x) in ta.iter().filter(|(k, _)| !is_buffer(k)) {
        let y = &tb[k];
        let d = (x - y).abs() / (y.abs() + 1.0);
        worst = worst.max(d.max().double_value(&[]));
    }
    worst
}

/// `facerec train` with the given arguments (one process); returns (success, stderr).
pub fn run_train(args: &[String]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_facerec"))
        .arg("train")
        .args(args)
        .output()
        .expect("running facerec");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes `dir/config.toml`: 16 synthetic identities x 6 images, batch 16 (6 steps an epoch), a
/// tiny iResNet at 32 px, ArcFace, `epochs` epochs, a checkpoint every `checkpoint_every` steps
/// (`keep` kept), and `eval` as the body of the `[eval]` table.
pub fn tiny_synthetic_config(
    dir: &Path,
    run_name: &str,
    epochs: usize,
    (checkpoint_every, keep): (usize, usize),
    eval: &str,
) -> PathBuf {
    let text = format!(
        r#"extends = "default"
run_name = "{run_name}"
[data]
type = "synthetic"
identities = 16
images_per_identity = 6
[model]
layers = [1, 1, 1, 1]
widths = [8, 8, 16, 16]
embedding_size = 16
input_size = 32
[head]
type = "arcface"
[train]
epochs = {epochs}
batch_size = 16
log_every = 1
threads = 2
[loader]
workers = 2
[checkpoint]
every_steps = {checkpoint_every}
keep = {keep}
[eval]
{eval}
"#
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Writes a run directory as `facerec train` leaves one for `eval`/`export`: `config.toml` with the
/// `[model]` table of `cfg` and `model.safetensors` with the variables of `vs`.
pub fn save_run_dir(dir: &Path, cfg: &facerec_backbone::BackboneConfig, vs: &tch::nn::VarStore) {
    #[derive(serde::Serialize)]
    struct Doc<'a> {
        model: &'a facerec_backbone::BackboneConfig,
    }
    std::fs::write(
        dir.join("config.toml"),
        toml::to_string(&Doc { model: cfg }).unwrap(),
    )
    .unwrap();
    vs.save(dir.join("model.safetensors")).unwrap();
}

/// The `--set` overrides of the short in-process training runs (24 synthetic identities x 4
/// images, batch 16, no evaluation, lr 0.05 without warm-up, none of the default's augmentation:
/// these runs check that a head learns 24 identities in a few steps, not transfer) for `epochs`,
/// then `extra`.
pub fn short_run_overrides(epochs: usize, extra: &[&str]) -> Vec<String> {
    let mut overrides: Vec<String> = [
        "data.identities=24",
        "data.images_per_identity=4",
        "train.batch_size=16",
        "train.log_every=2",
        "eval.targets=[]",
        "optim.lr=0.05",
        "schedule.warmup_steps=0",
        "augment.crop_p=0",
        "augment.low_res_p=0",
        "augment.blur_p=0",
        "augment.color_p=0",
        "augment.grayscale_p=0",
        "augment.erase_p=0",
    ]
    .map(String::from)
    .to_vec();
    overrides.push(format!("train.epochs={epochs}"));
    overrides.extend(extra.iter().map(|s| s.to_string()));
    overrides
}

/// Resumes `run_dir` on `to` processes for a second epoch with `accumulation` (the `--set` line
/// that keeps the global batch), then checks that its weights and classifier are within 2e-5
/// (relative) of the uninterrupted run in `whole_parent`; `label` starts the printed line.
pub fn resume_on_and_compare(
    run_dir: &Path,
    whole_parent: &Path,
    to: usize,
    accumulation: String,
    label: &str,
) {
    let mut resume = vec!["--resume".to_string(), run_dir.display().to_string()];
    for s in ["train.epochs=2".to_string(), accumulation] {
        resume.push("--set".into());
        resume.push(s);
    }
    train(to, &resume);
    for file in ["model.safetensors", "classifier.safetensors"] {
        let d = max_rel_diff(&run_dir.join(file), &only_run_dir(whole_parent).join(file));
        eprintln!("{label} -> {to} processes, {file}: {d:.3e}");
        assert!(
            d <= 2e-5,
            "{file}: resumed on {to} processes differs by {d:.3e}"
        );
    }
}
