//! CUDA-only checks (feature `cuda-tests`): fp16 autocast with the dynamic loss scaler trains, logs
//! its grad scale, checkpoints the scaler and resumes; a CPU-only machine never compiles this file.
#![cfg(feature = "cuda-tests")]

use std::process::Command;

#[test]
fn fp16_training_logs_scale_and_resumes_on_cuda() {
    assert!(
        tch::Cuda::is_available(),
        "cuda-tests needs a CUDA device (is libtorch_cuda linked?)"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("runs");
    let run = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_facerec"))
            .arg("train")
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let sets = [
        format!("output_dir={}", out.display()),
        "train.device=cuda".into(),
        "train.precision=fp16".into(),
        "train.epochs=2".into(),
        "train.log_every=10".into(),
        "eval.targets=[]".into(),
        "checkpoint.every_steps=50".into(),
    ];
    let args: Vec<String> = sets
        .iter()
        .flat_map(|s| ["--set".to_string(), s.clone()])
        .collect();
    run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let run_dir = std::fs::read_dir(&out)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let scales: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["grad_scale"].as_f64())
        .collect();
    assert!(
        !scales.is_empty() && scales.iter().all(|s| *s >= 1.0),
        "{scales:?}"
    );
    let losses: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["loss"].as_f64())
        .collect();
    assert!(
        losses.iter().all(|l| l.is_finite()) && losses.last() < losses.first(),
        "{losses:?}"
    );
    let ckpt = run_dir.join("checkpoints");
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::fs::read_dir(&ckpt)
                .unwrap()
                .last()
                .unwrap()
                .unwrap()
                .path()
                .join("meta.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert!(meta["scaler"]["scale"].as_f64().unwrap() >= 1.0);
    // Resume from the newest checkpoint with one more epoch.
    run(&[
        "--resume",
        run_dir.to_str().unwrap(),
        "--set",
        "train.epochs=3",
    ]);
}

#[test]
fn bf16_training_runs_on_cuda() {
    assert!(
        tch::Cuda::is_available(),
        "cuda-tests needs a CUDA device (is libtorch_cuda linked?)"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_facerec"))
        .args([
            "train",
            "--set",
            &format!("output_dir={}", dir.path().display()),
        ])
        .args([
            "--set",
            "train.device=cuda",
            "--set",
            "train.precision=bf16",
            "--set",
            "train.epochs=1",
            "--set",
            "eval.targets=[]",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
