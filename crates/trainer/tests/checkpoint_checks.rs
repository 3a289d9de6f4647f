//! Checkpoint integrity through the `facerec` binary: a flipped byte in a tensor file, an edited
//! `meta.json` step, an empty newest folder and a checkpoint from before checksums.

mod common;
use common::*;

use std::path::{Path, PathBuf};

/// 16 synthetic identities x 6 images, batch 16 -> 6 steps; checkpoints at steps 2, 4 and 6.
fn trained_run(dir: &Path) -> PathBuf {
    let cfg = tiny_synthetic_config(dir, "ck", 1, (2, 3), "every_steps = 0\ntargets = []");
    let out = dir.join("out");
    let (ok, err) = run_train(&[
        "--config".into(),
        cfg.display().to_string(),
        "--set".into(),
        format!("output_dir={}", out.display()),
    ]);
    assert!(ok, "training failed: {err}");
    let runs: Vec<PathBuf> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1);
    runs[0].clone()
}

fn resume(run: &Path) -> (bool, String) {
    // As after an interruption: resuming a finished run (summary.json there) has nothing to do.
    let _ = std::fs::remove_file(run.join("summary.json"));
    run_train(&["--resume".into(), run.display().to_string()])
}

fn ckpt(run: &Path, step: usize) -> PathBuf {
    run.join("checkpoints").join(format!("step-{step:08}"))
}

/// Flip every bit of `n` bytes near the end of `path` (tensor data, past the header).
fn flip_bytes(path: &Path, n: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let len = bytes.len();
    for b in &mut bytes[len - n - 8..len - 8] {
        *b = !*b;
    }
    std::fs::write(path, bytes).unwrap();
}

fn edit_meta(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("meta.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

#[test]
fn flipped_tensor_bytes_are_refused_on_resume_and_init() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained_run(dir.path());
    let meta = std::fs::read_to_string(ckpt(&run, 6).join("meta.json")).unwrap();
    assert!(
        meta.contains("\"checksums\"") && meta.contains("model.safetensors"),
        "{meta}"
    );

    flip_bytes(&ckpt(&run, 6).join("model.safetensors"), 16);
    let (ok, err) = resume(&run);
    assert!(!ok, "a corrupt checkpoint was accepted: {err}");
    assert!(
        err.contains("step-00000006/model.safetensors") && err.contains("corrupt"),
        "{err}"
    );
    assert!(
        err.contains("step-00000004"),
        "the fall-back is not offered: {err}"
    );

    // Following the advice: move the corrupt folder aside, and the run resumes from step 4.
    std::fs::rename(ckpt(&run, 6), dir.path().join("corrupt-step-6")).unwrap();
    let (ok, err) = resume(&run);
    assert!(ok, "resume from the previous checkpoint failed: {err}");

    // init.from a checkpoint folder verifies too (the optimiser-free fine-tuning path).
    flip_bytes(&ckpt(&run, 4).join("classifier.safetensors"), 8);
    flip_bytes(&ckpt(&run, 4).join("model.safetensors"), 8);
    let (ok, err) = run_train(&[
        "--config".into(),
        dir.path().join("config.toml").display().to_string(),
        "--set".into(),
        format!("output_dir={}", dir.path().join("ft").display()),
        "--set".into(),
        format!("init.from={}", ckpt(&run, 4).display()),
    ]);
    assert!(!ok, "init.from accepted a corrupt checkpoint: {err}");
    assert!(
        err.contains("init.from") && err.contains("step-00000004/model.safetensors"),
        "{err}"
    );
}

#[test]
fn edited_step_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained_run(dir.path());
    // The step no longer matches the folder name.
    edit_meta(&ckpt(&run, 6), |v| v["step"] = 999.into());
    let (ok, err) = resume(&run);
    assert!(!ok, "{err}");
    assert!(
        err.contains("step-00000006/meta.json") && err.contains("999"),
        "{err}"
    );

    // Folder and step agree, but lie beyond the run's 6 steps.
    let far = ckpt(&run, 999);
    std::fs::rename(ckpt(&run, 6), &far).unwrap();
    let (ok, err) = resume(&run);
    assert!(!ok, "{err}");
    assert!(
        err.contains("step-00000999/meta.json") && err.contains("beyond this run"),
        "{err}"
    );

    // An epoch beyond train.epochs.
    std::fs::remove_dir_all(&far).unwrap();
    edit_meta(&ckpt(&run, 4), |v| v["epoch"] = 7.into());
    let (ok, err) = resume(&run);
    assert!(!ok, "{err}");
    assert!(
        err.contains("step-00000004/meta.json") && err.contains("epoch 7"),
        "{err}"
    );
}

#[test]
fn empty_newest_folder_is_named_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained_run(dir.path());
    let empty = ckpt(&run, 8);
    std::fs::create_dir(&empty).unwrap();
    let (ok, err) = resume(&run);
    assert!(ok, "{err}");
    assert!(
        err.contains("skipped the checkpoint folder") && err.contains("step-00000008"),
        "{err}"
    );
    let log = std::fs::read_to_string(run.join("training.log")).unwrap();
    assert!(log.contains("step-00000008"), "not in training.log: {log}");
    assert!(empty.is_dir(), "the skipped folder was removed");
}

#[test]
fn checkpoint_without_checksums_is_accepted_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained_run(dir.path());
    edit_meta(&ckpt(&run, 6), |v| {
        v.as_object_mut().unwrap().remove("checksums");
    });
    let (ok, err) = resume(&run);
    assert!(ok, "{err}");
    assert!(err.contains("no checksums"), "{err}");
}
