//! A resumed run keeps the record (issue 19 item 5, `--resume-from`, failed runs), through the
//! `facerec` binary: resuming a finished run is refused and changes nothing; extending it appends a
//! segment to `summary.json` (the time of both, the new final loss) and records the changed
//! `train.epochs`; resuming from an older checkpoint drops the later `metrics.jsonl` records
//! instead of duplicating them and sets the newer checkpoints aside; settings that break an exact
//! resume are refused unless `--allow-changes`, then logged; a run that fails before its first
//! step leaves no run directory, one that fails later a `failed.txt`.

mod common;
use common::*;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// 16 synthetic identities x 6 images, batch 16 -> 6 steps an epoch; checkpoints every 2 steps;
/// a synthetic verification target every 2 steps.
fn write_config(dir: &Path) -> PathBuf {
    tiny_synthetic_config(
        dir,
        "record",
        1,
        (2, 5),
        "every_steps = 2\n[[eval.targets]]\nname = \"synth\"\nsource = { type = \"synthetic\", identities = 4, images_per_identity = 4, first_identity = 900 }",
    )
}

/// `--resume RUN` followed by `extra`.
fn resume(run: &Path, extra: &[&str]) -> (bool, String) {
    let mut a = vec!["--resume".to_string(), run.display().to_string()];
    a.extend(extra.iter().map(|s| s.to_string()));
    run_train(&a)
}

fn trained_run(dir: &Path) -> PathBuf {
    let cfg = write_config(dir);
    let out = dir.join("out");
    let (ok, err) = run_train(&args(&cfg, &out, &[]));
    assert!(ok, "training failed: {err}");
    only_run_dir(&out)
}

fn records(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// How often each (kind, step, target) appears among the train and eval records.
fn counts(run: &Path) -> BTreeMap<(String, u64, String), usize> {
    let mut m = BTreeMap::new();
    for r in records(run) {
        let kind = r["kind"].as_str().unwrap().to_string();
        if kind == "train" || kind == "eval" {
            let key = (
                kind,
                r["step"].as_u64().unwrap(),
                r["target"].as_str().unwrap_or("").to_string(),
            );
            *m.entry(key).or_insert(0) += 1;
        }
    }
    m
}

fn summary(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

fn no_duplicates(run: &Path) {
    let dup: Vec<_> = counts(run).into_iter().filter(|(_, n)| *n > 1).collect();
    assert!(
        dup.is_empty(),
        "duplicate records in metrics.jsonl: {dup:?}"
    );
}

#[test]
fn a_finished_run_keeps_its_record_when_resumed_or_extended() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained_run(dir.path());
    let first = summary(&run);
    let first_loss = first["final_loss"].as_f64().expect("a final loss");
    let first_secs = first["train_seconds"].as_f64().unwrap();
    let metrics_before = read(&run.join("metrics.jsonl"));

    // Resumed as it is: nothing to train; refused, and nothing is rewritten.
    let (ok, err) = resume(&run, &[]);
    assert!(
        !ok,
        "resuming a finished run should say there is nothing to do"
    );
    assert!(
        err.contains("already finished at step 6") && err.contains("train.epochs"),
        "{err}"
    );
    assert_eq!(summary(&run), first, "summary.json was rewritten");
    assert_eq!(read(&run.join("metrics.jsonl")), metrics_before);

    // Extended by one epoch: a harmless change, recorded; the record is appended.
    let (ok, err) = resume(&run, &["--set", "train.epochs=2"]);
    assert!(ok, "extending the run failed: {err}");
    let s = summary(&run);
    assert_eq!(s["steps"], 12);
    let segs = s["segments"].as_array().unwrap();
    assert_eq!(segs.len(), 2, "{s}");
    assert_eq!(
        (segs[0]["from_step"].as_u64(), segs[0]["to_step"].as_u64()),
        (Some(0), Some(6))
    );
    assert_eq!(
        (segs[1]["from_step"].as_u64(), segs[1]["to_step"].as_u64()),
        (Some(6), Some(12))
    );
    let secs: Vec<f64> = segs
        .iter()
        .map(|g| g["train_seconds"].as_f64().unwrap())
        .collect();
    let total = s["train_seconds"].as_f64().unwrap();
    assert!((total - secs.iter().sum::<f64>()).abs() < 1e-9, "{s}");
    assert!(
        (secs[0] - first_secs).abs() < 0.5,
        "the first segment's time {} is not the first run's {first_secs}",
        secs[0]
    );
    assert!(s["final_loss"].as_f64().is_some_and(f64::is_finite), "{s}");
    no_duplicates(&run);
    let c = counts(&run);
    for step in 1..=12u64 {
        assert_eq!(
            c.get(&("train".into(), step, String::new())),
            Some(&1),
            "step {step}: {c:?}"
        );
    }
    // The first run's final evaluation (step 6) stays, once.
    assert_eq!(
        c.get(&("eval".into(), 6, "synth".into())),
        Some(&1),
        "{c:?}"
    );
    let rec = records(&run);
    let resumed: Vec<_> = rec.iter().filter(|r| r["kind"] == "resume").collect();
    assert_eq!(resumed.len(), 1);
    assert_eq!(resumed[0]["step"], 6);
    assert_eq!(resumed[0]["changes"][0]["key"], "train.epochs");
    assert_eq!(resumed[0]["changes"][0]["before"], "1");
    assert_eq!(resumed[0]["changes"][0]["after"], "2");
    assert_eq!(resumed[0]["changes"][0]["breaking"], false);
    assert!(read(&run.join("config.toml")).contains("epochs = 2"));
    assert!(read(&run.join("config-until-step-00000006.toml")).contains("epochs = 1"));
    let log = read(&run.join("training.log"));
    assert!(log.contains("train.epochs: 1 -> 2 (harmless)"), "{log}");
    // The first run's loss is still in the record (metrics.jsonl), not lost.
    let loss6 = rec
        .iter()
        .find(|r| r["kind"] == "train" && r["step"] == 6)
        .unwrap()["loss"]
        .as_f64()
        .unwrap();
    assert!((loss6 - first_loss).abs() < 1e-12);
}

#[test]
fn resume_from_an_older_checkpoint_drops_later_records_and_sets_newer_ones_aside() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained_run(dir.path());
    let whole_model =
        std::fs::read(run.join("checkpoints/step-00000006/model.safetensors")).unwrap();
    std::fs::remove_file(run.join("summary.json")).unwrap(); // as if killed after step 6

    let (ok, err) = resume(&run, &["--resume-from", "step-4"]);
    assert!(ok, "--resume-from failed: {err}");
    no_duplicates(&run);
    let c = counts(&run);
    for step in 1..=6u64 {
        assert_eq!(
            c.get(&("train".into(), step, String::new())),
            Some(&1),
            "step {step}: {c:?}"
        );
    }
    for step in [2u64, 4, 6] {
        assert_eq!(
            c.get(&("eval".into(), step, "synth".into())),
            Some(&1),
            "eval {step}: {c:?}"
        );
    }
    let aside = run.join("checkpoints/discarded-step-00000006");
    assert!(
        aside.join("meta.json").is_file(),
        "the newer checkpoint was not set aside"
    );
    assert_eq!(
        std::fs::read(run.join("checkpoints/step-00000006/model.safetensors")).unwrap(),
        whole_model,
        "steps 5 and 6 trained again differ from the first time"
    );
    let s = summary(&run);
    let segs = s["segments"].as_array().unwrap();
    assert_eq!(segs.len(), 2, "{s}");
    assert_eq!(segs[1]["from_step"], 4);
    let log = read(&run.join("training.log"));
    assert!(
        log.contains("dropped") && log.contains("after step 4"),
        "{log}"
    );

    // Unknown names list what there is.
    let (ok, err) = resume(&run, &["--resume-from", "step-3"]);
    assert!(!ok);
    assert!(
        err.contains("no complete checkpoint of step 3") && err.contains("step-00000004"),
        "{err}"
    );
    let (ok, err) = resume(&run, &["--resume-from", "latest"]);
    assert!(!ok);
    assert!(err.contains("expected a checkpoint name"), "{err}");
}

#[test]
fn a_corrupt_newest_checkpoint_points_to_resume_from() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained_run(dir.path());
    std::fs::remove_file(run.join("summary.json")).unwrap();
    let model = run.join("checkpoints/step-00000006/model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    let n = bytes.len();
    for b in &mut bytes[n - 100..n - 8] {
        *b = !*b;
    }
    std::fs::write(&model, bytes).unwrap();
    let (ok, err) = resume(&run, &[]);
    assert!(!ok);
    let hint = format!("--resume {} --resume-from step-00000004", run.display());
    assert!(err.contains("corrupt") && err.contains(&hint), "{err}");
    let (ok, err) = resume(&run, &["--resume-from", "step-00000004"]);
    assert!(ok, "following the advice failed: {err}");
}

#[test]
fn changes_that_break_exact_resume_are_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained_run(dir.path());
    std::fs::remove_file(run.join("summary.json")).unwrap();
    let metrics = read(&run.join("metrics.jsonl"));
    for set in ["head.type=cosface", "optim.lr=0.5", "train.grad_clip=1.0"] {
        let (ok, err) = resume(&run, &["--resume-from", "step-4", "--set", set]);
        assert!(!ok, "{set} accepted on resume");
        let key = set.split('=').next().unwrap();
        assert!(
            err.contains("break an exact resume")
                && err.contains(key)
                && err.contains("--allow-changes"),
            "{set}: {err}"
        );
        assert_eq!(
            read(&run.join("metrics.jsonl")),
            metrics,
            "a refused resume changed metrics.jsonl"
        );
        assert!(
            run.join("checkpoints/step-00000006").is_dir(),
            "a refused resume moved a checkpoint"
        );
    }
    let (ok, err) = resume(
        &run,
        &[
            "--resume-from",
            "step-4",
            "--allow-changes",
            "--set",
            "head.type=cosface",
        ],
    );
    assert!(ok, "--allow-changes: {err}");
    let log = read(&run.join("training.log"));
    assert!(
        log.contains("head.type: \"arcface\" -> \"cosface\" (breaks an exact resume; allowed by --allow-changes)"),
        "{log}"
    );
    let rec = records(&run);
    let r = rec.iter().find(|r| r["kind"] == "resume").unwrap();
    assert!(
        r["changes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["key"] == "head.type" && c["breaking"] == true),
        "{r}"
    );
    assert!(read(&run.join("config.toml")).contains("cosface"));
    no_duplicates(&run);
}

#[test]
fn a_run_that_fails_before_its_first_step_leaves_no_directory() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path());
    let bad = dir.path().join("bad.bin");
    std::fs::write(&bad, b"\x80\x02not a pack").unwrap();
    let out = dir.path().join("out");
    let mut a = args(&cfg, &out, &[]);
    a.extend([
        "--set".into(),
        format!("eval.targets=[{{ name = \"bad\", required = true, source = {{ type = \"bin\", path = \"{}\" }} }}]", bad.display()),
    ]);
    let (ok, err) = run_train(&a);
    assert!(!ok, "a corrupt evaluation pack was accepted");
    assert!(err.contains("bad.bin"), "{err}");
    let left: Vec<_> = std::fs::read_dir(&out)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "a failed run left {left:?}");
}

#[test]
fn a_run_that_fails_later_is_marked_failed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path());
    let out = dir.path().join("out");
    let (ok, err) = run_train(&args(
        &cfg,
        &out,
        &[
            "head.s=1e39",
            "train.max_nonfinite_steps=2",
            "eval.targets=[]",
        ],
    ));
    assert!(!ok, "the run should stop: {err}");
    assert!(
        err.contains("--allow-changes"),
        "the advice names --allow-changes: {err}"
    );
    let run = only_run_dir(&out);
    let failed = read(&run.join("failed.txt"));
    assert!(
        failed.contains("failed at global step 2 of 6") && failed.contains("non-finite"),
        "{failed}"
    );
}
