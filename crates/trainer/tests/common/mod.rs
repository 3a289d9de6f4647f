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
