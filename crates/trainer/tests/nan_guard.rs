//! The NaN guard through the `facerec` binary: a run stopped by `train.max_nonfinite_steps`
//! checkpoints the last good state (BatchNorm running statistics included), and a resumed run
//! counts its consecutive non-finite steps afresh.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use tch::Kind;

/// 16 synthetic identities x 6 images, batch 16 -> 6 steps an epoch, 18 in all; a checkpoint
/// after every step (all kept).
fn write_config(dir: &Path) -> PathBuf {
    tiny_synthetic_config(dir, "nan", 3, (1, 100), "every_steps = 0\ntargets = []")
}

/// The global step the error message says the run stopped at.
fn stop_step(stderr: &str) -> usize {
    let rest = stderr
        .split("stopped at global step ")
        .nth(1)
        .unwrap_or_else(|| panic!("no stop in: {stderr}"));
    rest.split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn checkpoint(run: &Path, step: usize) -> PathBuf {
    run.join("checkpoints").join(format!("step-{step:08}"))
}

fn log_of(run: &Path) -> String {
    std::fs::read_to_string(run.join("training.log")).unwrap()
}

/// Every step non-finite (`head.s` overflows f32): the stop checkpoint holds the initial
/// BatchNorm statistics (mean 0, var 1, no batch tracked), and resuming counts anew.
#[test]
fn all_steps_bad_keep_initial_bn_statistics_and_resume_counts_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path());
    let out = dir.path().join("out");
    let (ok, err) = run_train(&args(
        &cfg,
        &out,
        &["head.s=1e39", "train.max_nonfinite_steps=3"],
    ));
    assert!(!ok, "the run should stop: {err}");
    assert_eq!(stop_step(&err), 3, "{err}");
    let run = only_run_dir(&out);
    let model = tensors(&checkpoint(&run, 3).join("model.safetensors"));
    let mut buffers = 0;
    for (k, t) in &model {
        if !is_buffer(k) {
            continue;
        }
        buffers += 1;
        let want = if k.ends_with("running_var") {
            t.ones_like()
        } else {
            t.zeros_like()
        };
        assert!(t.equal(&want), "`{k}` changed during skipped steps: {t:?}");
    }
    assert!(buffers > 10, "expected BatchNorm buffers, found {buffers}");
    assert!(
        !log_of(&run).contains("grad scale"),
        "grad scale logged with precision off"
    );

    // Resume with the same bad settings: the guard allows 3 new non-finite steps (the count of the
    // checkpoint, 3, is not carried over), so the run stops at step 6, not 4.
    let resume = |sets: &[&str]| {
        let mut a = vec!["--resume".to_string(), run.display().to_string()];
        if sets.contains(&"head.s=64") {
            // Changed settings that break an exact resume must be asked for.
            a.push("--allow-changes".into());
        }
        for s in sets {
            a.push("--set".into());
            a.push(s.to_string());
        }
        run_train(&a)
    };
    let (ok, err) = resume(&["head.s=1e39", "train.max_nonfinite_steps=3"]);
    assert!(!ok, "{err}");
    assert_eq!(stop_step(&err), 6, "{err}");
    assert!(
        log_of(&run).contains("the count starts again from 0"),
        "{}",
        log_of(&run)
    );

    // Resume with sane settings: training continues to the end.
    let (ok, err) = resume(&["head.s=64", "optim.lr=0.1", "train.max_nonfinite_steps=3"]);
    assert!(ok, "resume with optim.lr=0.1 failed: {err}");
    assert!(
        !run.join("failed.txt").exists(),
        "a finished run is no longer marked failed"
    );
    let log = log_of(&run);
    assert!(
        log.contains("head.s: ") && log.contains("allowed by --allow-changes"),
        "the changed scale is not logged: {log}"
    );
    let last = tensors(&run.join("model.safetensors"));
    assert!(last
        .values()
        .all(|t| t.isfinite().all().int64_value(&[]) == 1));
    let tracked = last
        .iter()
        .find(|(k, _)| k.ends_with("num_batches_tracked"))
        .unwrap()
        .1;
    assert_eq!(
        tracked.to_kind(Kind::Int64).int64_value(&[]),
        12,
        "BatchNorm counted the 12 good steps (of 18) only"
    );
}

/// An exploding learning rate: the first steps are finite, then every step overflows. The stop
/// checkpoint is bitwise the checkpoint of the last good step (weights and BatchNorm statistics),
/// and all finite.
#[test]
fn exploding_lr_stop_checkpoint_is_the_last_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path());
    let out = dir.path().join("out");
    let (ok, err) = run_train(&args(
        &cfg,
        &out,
        &[
            "optim.lr=1e30",
            "train.grad_clip=0",
            "train.max_nonfinite_steps=3",
        ],
    ));
    assert!(!ok, "the run should stop: {err}");
    let stop = stop_step(&err);
    assert!(
        stop >= 4,
        "expected a good step before the bad ones (stopped at {stop}): {err}"
    );
    let run = only_run_dir(&out);
    let good = tensors(&checkpoint(&run, stop - 3).join("model.safetensors"));
    let end = tensors(&checkpoint(&run, stop).join("model.safetensors"));
    assert_eq!(good.len(), end.len());
    for (k, t) in &end {
        assert!(
            t.equal(&good[k]),
            "`{k}` differs from the last good step's (step {})",
            stop - 3
        );
        if is_buffer(k) {
            assert_eq!(
                t.isfinite().all().int64_value(&[]),
                1,
                "`{k}` is not finite"
            );
        }
    }
}
