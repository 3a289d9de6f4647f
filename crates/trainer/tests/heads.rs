//! Every head type, and Partial FC sampling, through the real training loop: a short run on
//! synthetic identities must take every step with a finite loss that goes down.

use facerec_trainer::{train, Config, RunOptions};

fn short_run(extra: &[&str]) -> facerec_trainer::RunSummary {
    let dir = tempfile::tempdir().unwrap();
    let mut overrides: Vec<String> = [
        "data.identities=24",
        "data.images_per_identity=4",
        "train.epochs=3",
        "train.batch_size=16",
        "train.log_every=2",
        "eval.targets=[]",
        "optim.lr=0.05",
        "schedule.warmup_steps=0",
    ]
    .map(String::from)
    .to_vec();
    overrides.extend(extra.iter().map(|s| s.to_string()));
    let mut cfg = Config::load(None, &overrides).unwrap();
    cfg.output_dir = dir.path().to_path_buf();
    let summary = train(&cfg, &RunOptions { workspace: dir.path().into(), echo_config: false, resume: None }).unwrap();
    let metrics = std::fs::read_to_string(summary.run_dir.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect();
    assert!(losses.iter().all(|l| l.is_finite()), "{extra:?}: {losses:?}");
    assert!(losses.last() < losses.first(), "{extra:?}: loss did not go down: {losses:?}");
    assert_eq!(summary.skipped_steps, 0, "{extra:?}");
    summary
}

#[test]
fn every_head_trains() {
    for head in [
        &["head.type=softmax"][..],
        &["head.type=normface", "head.s=16.0"],
        &["head.type=sphereface"],
        &["head.type=cosface", "head.s=16.0"],
        &["head.type=arcface", "head.s=16.0", "head.gradient=detached"],
        &["head.type=combined", "head.s=16.0", "head.m1=1.0", "head.m2=0.3", "head.m3=0.2"],
        &["head.type=elastic_arc", "head.s=16.0"],
        &["head.type=elastic_cos_plus", "head.s=16.0"],
    ] {
        short_run(head);
    }
}

#[test]
fn partial_fc_sampling_trains() {
    short_run(&["partial_fc.sample_rate=0.3", "head.s=16.0"]);
    short_run(&["partial_fc.sample_rate=0.5", "head.type=softmax"]);
}
