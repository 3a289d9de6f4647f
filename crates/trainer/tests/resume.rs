//! Exact resume and checkpoint faults, through the `facerec` binary.
//!
//! The resume tests kill a training process with SIGKILL at a step chosen from the clock, resume
//! it with `facerec train --resume RUN_DIR`, and require the final weights, classifier and
//! optimiser state to be bitwise identical to an uninterrupted run of the same config. The config
//! exercises every source of randomness the trainer has: shuffling, flips and shifts, dropout,
//! ElasticFace margins and Partial FC sampling (and AdamW with gradient accumulation in the second).

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const STEPS: usize = 18;

/// A small, fast config: 16 synthetic identities x 6 images, batch 16 -> 6 steps an epoch.
/// `train_extra` goes into `[train]`, `extra` at the end.
fn write_config(dir: &Path, train_extra: &str, extra: &str) -> PathBuf {
    let train_extra = if train_extra.is_empty() {
        "batch_size = 16"
    } else {
        train_extra
    };
    let text = format!(
        r#"extends = "default"
run_name = "resume"
[data]
type = "synthetic"
identities = 16
images_per_identity = 6
[model]
layers = [1, 1, 1, 1]
widths = [8, 8, 16, 16]
embedding_size = 16
input_size = 32
dropout = 0.2
[head]
type = "elastic_arc"
[partial_fc]
sample_rate = 0.5
[train]
epochs = 3
log_every = 1
threads = 2
{train_extra}
[loader]
max_shift = 2
workers = 2
[checkpoint]
every_steps = 2
keep = 2
[eval]
every_steps = 0
targets = []
{extra}
"#
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn facerec() -> Command {
    Command::new(env!("CARGO_BIN_EXE_facerec"))
}

/// `facerec train` to completion; returns (success, stderr).
fn run(args: &[&str]) -> (bool, String) {
    let out = facerec()
        .arg("train")
        .args(args)
        .output()
        .expect("running facerec");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Highest "global step N/" in the run's training.log.
fn logged_step(run_parent: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(run_parent) else {
        return 0;
    };
    let mut best = 0;
    for e in entries.flatten() {
        let text = std::fs::read_to_string(e.path().join("training.log")).unwrap_or_default();
        for part in text.split("global step ").skip(1) {
            if let Some(n) = part.split('/').next().and_then(|n| n.parse::<usize>().ok()) {
                best = best.max(n);
            }
        }
    }
    best
}

/// Train uninterrupted in one folder; train in another, SIGKILL it at an arbitrary step, resume;
/// compare everything.
/// `sets` are `--set` overrides for both runs.
fn kill_and_resume_matches_uninterrupted(train_extra: &str, extra: &str, sets: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), train_extra, extra);
    let set_args: Vec<String> = sets
        .iter()
        .flat_map(|s| ["--set".to_string(), s.to_string()])
        .collect();
    let whole = dir.path().join("whole");
    let mut args = vec![
        "--config".to_string(),
        cfg.display().to_string(),
        "--set".into(),
        format!("output_dir={}", whole.display()),
    ];
    args.extend(set_args.iter().cloned());
    let (ok, err) = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "uninterrupted run failed: {err}");

    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as usize;
    let kill_at = 3 + nanos % (STEPS - 6);
    let killed = dir.path().join("killed");
    let mut child = facerec()
        .args([
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--set",
            &format!("output_dir={}", killed.display()),
        ])
        .args(&set_args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while logged_step(&killed) < kill_at {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before step {kill_at}"
        );
        assert!(t0.elapsed() < Duration::from_secs(600), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    let run_dir = only_run_dir(&killed);
    assert!(
        !run_dir.join("summary.json").exists(),
        "killed at step {kill_at} but the run had finished"
    );
    assert!(!run_dir.join("model.safetensors").exists());
    let (ok, err) = run(&["--resume", run_dir.to_str().unwrap()]);
    assert!(ok, "resume after SIGKILL at step {kill_at} failed: {err}");
    let log = std::fs::read_to_string(run_dir.join("training.log")).unwrap();
    assert!(log.contains("resumed from"), "{log}");

    let whole_dir = only_run_dir(&whole);
    for f in ["model.safetensors", "classifier.safetensors"] {
        assert_bitwise_equal(&whole_dir.join(f), &run_dir.join(f));
    }
    let last = format!("checkpoints/step-{STEPS:08}");
    for f in [
        "model.safetensors",
        "classifier.safetensors",
        "optimizer.safetensors",
        "objective.safetensors",
    ] {
        if whole_dir.join(&last).join(f).exists() {
            assert_bitwise_equal(&whole_dir.join(&last).join(f), &run_dir.join(&last).join(f));
        }
    }
    // keep = 2: older checkpoints were pruned.
    let mut left: Vec<String> = std::fs::read_dir(run_dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left.len(),
        2,
        "checkpoints left after the resumed run: {left:?}"
    );
}

#[test]
fn sgd_resume_after_sigkill_is_bitwise_exact() {
    kill_and_resume_matches_uninterrupted("", "", &[]);
}

#[test]
fn adamw_with_accumulation_resume_after_sigkill_is_bitwise_exact() {
    // Micro-batches of 8, two per step: the same 6 steps an epoch.
    kill_and_resume_matches_uninterrupted(
        "batch_size = 8\ngrad_accumulation = 2",
        "[optim]\ntype = \"adamw\"\nlr = 0.002\nclassifier_weight_decay = 0.0",
        &[],
    );
}

/// CurricularFace's `t` and AdaFace's norm statistics are head state in the objective state.
#[test]
fn curricularface_and_adaface_resume_after_sigkill_is_bitwise_exact() {
    kill_and_resume_matches_uninterrupted("", "", &["head.type=curricularface", "head.s=16.0"]);
    kill_and_resume_matches_uninterrupted("", "", &["head.type=adaface", "head.s=16.0"]);
}

/// CoReFace from epoch 1: the adaptive margin is objective state and must continue exactly.
#[test]
fn coreface_resume_after_sigkill_is_bitwise_exact() {
    kill_and_resume_matches_uninterrupted(
        "",
        "",
        &[
            "model.dropout=0.0",
            "coreface.start_epoch=1",
            "coreface.s=16.0",
        ],
    );
}

/// Cluster-guided ArcFace refreshing every epoch: margins, centres and the refresh epoch are
/// objective state; a resumed run neither repeats nor skips a refresh.
#[test]
fn cluster_guided_resume_after_sigkill_is_bitwise_exact() {
    kill_and_resume_matches_uninterrupted(
        "",
        "",
        &[
            "head.type=arcface",
            "head.s=16.0",
            "cluster_guided.refresh_every_epochs=1",
            "cluster_guided.margin.s=16.0",
            "cluster_guided.align.mode=both",
        ],
    );
}

/// `coreface.init_from` starts CoReFace from another run's backbone and classifier (as the
/// published run started from an ArcFace checkpoint). At a learning rate too small to move any
/// weight, the classifier and every trainable backbone tensor end bitwise equal to the source's.
#[test]
fn coreface_init_from_loads_backbone_and_classifier() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "", "");
    let source = short_run(&dir.path().join("src"), &cfg, &[]);
    let from = format!("coreface.init_from={}", source.display());
    let sets = [
        from.as_str(),
        "model.dropout=0.0",
        "coreface.start_epoch=0",
        "coreface.s=16.0",
        "optim.lr=1e-30",
    ];
    let tuned = short_run(&dir.path().join("cf"), &cfg, &sets);
    let log = std::fs::read_to_string(tuned.join("training.log")).unwrap();
    assert!(
        log.contains("backbone initialised from") && log.contains("classifier initialised"),
        "{log}"
    );
    assert_bitwise_equal(
        &source.join("classifier.safetensors"),
        &tuned.join("classifier.safetensors"),
    );
    let (a, b) = (
        tensors(&source.join("model.safetensors")),
        tensors(&tuned.join("model.safetensors")),
    );
    let weights: Vec<&String> = a
        .keys()
        .filter(|k| !k.contains("running_") && !k.contains("num_batches"))
        .collect();
    assert!(weights.len() > 10);
    for k in weights {
        assert!(
            a[k].equal(&b[k]),
            "`{k}` was not initialised from the source run"
        );
    }
    // Without the key the classifier starts fresh (the check above can fail).
    let fresh = short_run(&dir.path().join("fresh"), &cfg, &sets[1..]);
    let (a, c) = (
        tensors(&source.join("classifier.safetensors")),
        tensors(&fresh.join("classifier.safetensors")),
    );
    assert!(a.iter().any(|(k, x)| !x.equal(&c[k])));
}

/// Hash every file under `dir` (name -> bytes) to prove nothing was changed.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(snapshot(&p));
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out.sort();
    out
}

/// One finished short run (1 epoch, 6 steps) in `parent`; returns its run directory.
fn short_run(parent: &Path, cfg: &Path, sets: &[&str]) -> PathBuf {
    let mut args = vec![
        "--config".to_string(),
        cfg.display().to_string(),
        "--set".into(),
        format!("output_dir={}", parent.display()),
        "--set".into(),
        "train.epochs=1".into(),
    ];
    for s in sets {
        args.push("--set".into());
        args.push(s.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, err) = run(&args);
    assert!(ok, "{err}");
    only_run_dir(parent)
}

#[test]
fn checkpoint_faults_give_clear_errors_and_damage_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "", "");
    let run_dir = short_run(&dir.path().join("a"), &cfg, &[]);
    let before = snapshot(&run_dir.join("checkpoints"));

    // Resuming with another number of classes.
    let (ok, err) = run(&[
        "--resume",
        run_dir.to_str().unwrap(),
        "--set",
        "classifier.num_classes=20",
    ]);
    assert!(!ok);
    assert!(
        err.contains("classifier.num_classes") && err.contains("16") && err.contains("20"),
        "{err}"
    );

    // A checkpoint from another model put in place of the newest one.
    let other = short_run(
        &dir.path().join("b"),
        &cfg,
        &["model.widths=[8, 8, 16, 32]"],
    );
    let other_ckpt = other.join("checkpoints/step-00000006");
    let foreign_parent = dir.path().join("foreign");
    std::fs::create_dir_all(foreign_parent.join("checkpoints")).unwrap();
    std::fs::copy(
        run_dir.join("config.toml"),
        foreign_parent.join("config.toml"),
    )
    .unwrap();
    let dst = foreign_parent.join("checkpoints/step-00000006");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&other_ckpt).unwrap().flatten() {
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    let (ok, err) = run(&["--resume", foreign_parent.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("config key `model`") && err.contains("another backbone"),
        "{err}"
    );

    // The same foreign tensors under a matching description: their checksums differ from the
    // recorded ones, so the file is named as corrupt.
    let meta =
        std::fs::read_to_string(run_dir.join("checkpoints/step-00000006/meta.json")).unwrap();
    std::fs::write(dst.join("meta.json"), &meta).unwrap();
    let (ok, err) = run(&["--resume", foreign_parent.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("step-00000006/") && err.contains(".safetensors: corrupt checkpoint file"),
        "{err}"
    );
    // Without checksums (a checkpoint from before them), the tensor check names the keys.
    let mut value: serde_json::Value = serde_json::from_str(&meta).unwrap();
    value.as_object_mut().unwrap().remove("checksums");
    std::fs::write(
        dst.join("meta.json"),
        serde_json::to_string(&value).unwrap(),
    )
    .unwrap();
    let (ok, err) = run(&["--resume", foreign_parent.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("model.safetensors")
            && err.contains("in the file")
            && err.contains("in the model"),
        "{err}"
    );

    // A truncated weight file: named, and nothing else is touched.
    let corrupt_parent = dir.path().join("corrupt");
    std::fs::create_dir_all(corrupt_parent.join("checkpoints/step-00000006")).unwrap();
    std::fs::copy(
        run_dir.join("config.toml"),
        corrupt_parent.join("config.toml"),
    )
    .unwrap();
    for e in std::fs::read_dir(run_dir.join("checkpoints/step-00000006"))
        .unwrap()
        .flatten()
    {
        std::fs::copy(
            e.path(),
            corrupt_parent
                .join("checkpoints/step-00000006")
                .join(e.file_name()),
        )
        .unwrap();
    }
    let victim = corrupt_parent.join("checkpoints/step-00000006/model.safetensors");
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &bytes[..bytes.len() / 2]).unwrap();
    let (ok, err) = run(&["--resume", corrupt_parent.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("model.safetensors") && err.contains("corrupt"),
        "{err}"
    );

    assert_eq!(
        snapshot(&run_dir.join("checkpoints")),
        before,
        "a failed resume changed a checkpoint"
    );

    // An output directory that cannot be created.
    let file = dir.path().join("not-a-folder");
    std::fs::write(&file, "x").unwrap();
    let (ok, err) = run(&[
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        &format!("output_dir={}", file.join("runs").display()),
    ]);
    assert!(!ok);
    assert!(
        err.contains("output_dir") && err.contains("not-a-folder"),
        "{err}"
    );
}

#[test]
fn nan_guard_stops_with_a_checkpoint_of_the_last_good_state() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "", "");
    let out = dir.path().join("runs");
    // An absurd learning rate blows the weights up to inf within a few steps.
    let (ok, err) = run(&[
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        &format!("output_dir={}", out.display()),
        "--set",
        "optim.lr=1e30",
        "--set",
        "train.grad_clip=0",
        "--set",
        "train.max_nonfinite_steps=2",
    ]);
    assert!(!ok);
    assert!(
        err.contains("consecutive non-finite steps") && err.contains("checkpoint"),
        "{err}"
    );
    let run_dir = only_run_dir(&out);
    let log = std::fs::read_to_string(run_dir.join("training.log")).unwrap();
    assert!(
        log.contains("non-finite loss or gradient") && log.contains("step skipped"),
        "{log}"
    );
    let ckpts: Vec<_> = std::fs::read_dir(run_dir.join("checkpoints"))
        .unwrap()
        .flatten()
        .collect();
    assert!(!ckpts.is_empty());
}

#[test]
fn init_from_loads_the_backbone_and_rejects_another_shape() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "", "");
    let source = short_run(&dir.path().join("src"), &cfg, &[]);
    let tuned = short_run(
        &dir.path().join("ft"),
        &cfg,
        &[
            &format!("init.from={}", source.display()),
            "data.identities=12",
        ],
    );
    let log = std::fs::read_to_string(tuned.join("training.log")).unwrap();
    assert!(
        log.contains("backbone initialised from") && log.contains("all keys match"),
        "{log}"
    );
    // Classifier too: 16 classes in the source run, so 12 identities do not fit it.
    let (ok, err) = run(&[
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        &format!("output_dir={}", dir.path().join("ft2").display()),
        "--set",
        &format!("init.from={}", source.display()),
        "--set",
        "init.classifier=true",
        "--set",
        "data.identities=12",
    ]);
    assert!(!ok);
    assert!(
        err.contains("init.classifier") && err.contains("classifier.safetensors"),
        "{err}"
    );

    let (ok, err) = run(&[
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        &format!("output_dir={}", dir.path().join("bad").display()),
        "--set",
        &format!("init.from={}", source.join("model.safetensors").display()),
        "--set",
        "model.embedding_size=24",
    ]);
    assert!(!ok);
    assert!(
        err.contains("init.from") && err.contains("fc.weight") && err.contains("in the file"),
        "{err}"
    );
}
