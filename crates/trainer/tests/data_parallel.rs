//! Data-parallel training through the `facerec` binary on Gloo over 127.0.0.1: ranks are started
//! by hand with torchrun's variables (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`, ...), on a
//! port found free at run time, and every child is killed when a test ends, also on failure.
//!
//! - Equivalence: 2 processes x batch B equal 1 process x batch B with `grad_accumulation = 2`
//!   (the same micro-batches, each normalised by its own BatchNorm statistics, the same averaged
//!   gradient), for SGD and AdamW with gradient clipping on. Trainable weights and the classifier
//!   agree to `|a - b| <= 2e-5 · (1 + |b|)`; BatchNorm running statistics are local to each rank
//!   (as in arcface_torch) and are not compared.
//! - Resume: a 2-process run killed with SIGKILL and resumed on 2 processes is bitwise equal to an
//!   uninterrupted 2-process run; a 2-process checkpoint continues on 1 process and a 1-process
//!   checkpoint on 2 (with the accumulation that keeps the global batch).
//! - Faults: a rank killed mid-run makes the other exit non-zero within the timeout, naming the
//!   dead rank; a store nobody listens on is a clear error, no hang.
//!
//! The classifier is replicated (`classifier.sharding = "replicated"`; tests/model_parallel.rs
//! covers the model-parallel one).

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// 16 synthetic identities x 6 images, batch 8: 12 micro-batches an epoch.
fn write_config(dir: &Path, optim: &str) -> PathBuf {
    let text = format!(
        r#"extends = "default"
run_name = "dp"
[data]
type = "synthetic"
identities = 16
images_per_identity = 6
[model]
layers = [1, 1, 1, 1]
widths = [8, 8, 16, 16]
embedding_size = 16
input_size = 32
dropout = 0.0
[classifier]
sharding = "replicated"
[head]
type = "arcface"
{optim}
[train]
epochs = 2
batch_size = 8
grad_clip = 1.0
log_every = 1
threads = 1
[loader]
max_shift = 2
workers = 1
[checkpoint]
every_steps = 1
keep = 2
[eval]
every_steps = 0
targets = []
"#
    );
    let path = dir.join(format!("config-{}.toml", optim.len()));
    std::fs::write(&path, text).unwrap();
    path
}

const SGD: &str = "[optim]\ntype = \"sgd\"\nlr = 0.1";
const ADAMW: &str = "[optim]\ntype = \"adamw\"\nlr = 0.003";

fn equivalence(optim: &str) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), optim);
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    train(1, &args(&cfg, &one, &["train.grad_accumulation=2"]));
    train(2, &args(&cfg, &two, &[]));
    let (r1, r2) = (only_run_dir(&one), only_run_dir(&two));
    for file in ["model.safetensors", "classifier.safetensors"] {
        let d = max_rel_diff(&r2.join(file), &r1.join(file));
        eprintln!("{optim:?} {file}: max |2 proc - 1 proc| / (1 + |1 proc|) = {d:.3e}");
        assert!(
            d <= 2e-5,
            "{file}: 2 processes differ from 1 process by {d:.3e}"
        );
    }
    // The metrics report the global batch and the same step count.
    let m2 = std::fs::read_to_string(r2.join("metrics.jsonl")).unwrap();
    assert!(m2.contains("\"global_batch\":16"), "{m2}");
    let steps = |d: &Path| {
        std::fs::read_to_string(d.join("summary.json"))
            .unwrap()
            .split("\"steps\": ")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(steps(&r1), steps(&r2));
    assert_eq!(steps(&r2), "12");
}

#[test]
fn two_processes_equal_one_with_accumulation_sgd() {
    equivalence(SGD);
}

#[test]
fn two_processes_equal_one_with_accumulation_adamw() {
    equivalence(ADAMW);
}

/// Highest step checkpointed so far under `parent` (any run directory).
fn checkpointed_step(parent: &Path) -> usize {
    let Ok(runs) = std::fs::read_dir(parent) else {
        return 0;
    };
    let mut best = 0;
    for run in runs.flatten() {
        let Ok(ck) = std::fs::read_dir(run.path().join("checkpoints")) else {
            continue;
        };
        for e in ck.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = name
                .strip_prefix("step-")
                .and_then(|n| n.parse::<usize>().ok())
            {
                best = best.max(n);
            }
        }
    }
    best
}

#[test]
fn killed_two_process_run_resumes_bitwise() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), SGD);
    let whole = dir.path().join("whole");
    train(2, &args(&cfg, &whole, &[]));

    let killed = dir.path().join("killed");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as usize;
    let kill_after = 2 + nanos % 6;
    let ranks = Ranks::start(2, free_port(), &args(&cfg, &killed, &[]), 60);
    let t0 = Instant::now();
    while checkpointed_step(&killed) < kill_after {
        assert!(t0.elapsed() < Duration::from_secs(300), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(ranks); // SIGKILL to both ranks
    let run_dir = only_run_dir(&killed);
    assert!(
        !run_dir.join("model.safetensors").exists(),
        "the run had finished before the kill"
    );
    let resume = vec!["--resume".to_string(), run_dir.display().to_string()];
    train(2, &resume);
    let (a, b) = (only_run_dir(&whole), run_dir);
    for file in ["model.safetensors", "classifier.safetensors"] {
        assert_bitwise_equal(&a.join(file), &b.join(file));
    }
}

/// Train 1 epoch on `from` processes, then continue to 2 epochs on `to` processes; compare with
/// an uninterrupted run on `from`.
fn resume_on_another_world_size(from: usize, to: usize) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), SGD);
    // The global batch is 16 images per step: 2 x 8, or 1 x 8 x accumulation 2.
    let acc = |w: usize| format!("train.grad_accumulation={}", 2 / w);
    let whole = dir.path().join("whole");
    train(from, &args(&cfg, &whole, &[&acc(from)]));
    let split = dir.path().join("split");
    train(from, &args(&cfg, &split, &[&acc(from), "train.epochs=1"]));
    let run_dir = only_run_dir(&split);
    // Without the matching accumulation the resume is refused with the value to use.
    let refused = Command::new(env!("CARGO_BIN_EXE_facerec"))
        .args([
            "train",
            "--resume",
            run_dir.to_str().unwrap(),
            "--set",
            "train.epochs=2",
            "--set",
            "train.grad_accumulation=4",
        ])
        .output()
        .unwrap();
    if to == 1 {
        assert!(!refused.status.success());
        let err = String::from_utf8_lossy(&refused.stderr);
        assert!(err.contains("train.grad_accumulation = 2"), "{err}");
    }
    resume_on_and_compare(&run_dir, &whole, to, acc(to), &from.to_string());
}

#[test]
fn two_process_checkpoint_resumes_on_one() {
    resume_on_another_world_size(2, 1);
}

#[test]
fn one_process_checkpoint_resumes_on_two() {
    resume_on_another_world_size(1, 2);
}

#[test]
fn a_killed_rank_stops_the_other_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), SGD);
    let out = dir.path().join("out");
    let ranks = Ranks::start(2, free_port(), &args(&cfg, &out, &["train.epochs=50"]), 10);
    let t0 = Instant::now();
    while checkpointed_step(&out) < 2 {
        assert!(t0.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    ranks.kill_rank_1_and_check_rank_0_names_it();
}

#[test]
fn no_store_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), SGD);
    // Rank 1 alone: nobody hosts the store on this port.
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_facerec"))
        .arg("train")
        .args(args(&cfg, &dir.path().join("out"), &[]))
        .env("RANK", "1")
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", free_port().to_string())
        .env("FACEREC_DIST_TIMEOUT", "5")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t0.elapsed()
    );
    assert!(
        err.contains("rank 1 of 2") && err.contains("127.0.0.1"),
        "{err}"
    );
}
