//! Every head type, and Partial FC sampling, through the real training loop: a short run on
//! synthetic identities must take every step with a finite loss that goes down. Also GCE's
//! prototype replacement on (padded) P x K batches and CoReFace's once-per-step margin under
//! gradient accumulation.

mod common;

use facerec_trainer::{train, Config, RunOptions};

fn short_run(extra: &[&str]) -> facerec_trainer::RunSummary {
    short_run_in(tempfile::tempdir().unwrap().path(), extra)
}

/// [`short_run`] with the run directory under `dir` (kept after the call).
fn short_run_in(dir: &std::path::Path, extra: &[&str]) -> facerec_trainer::RunSummary {
    let overrides = common::short_run_overrides(3, extra);
    let mut cfg = Config::load(None, &overrides).unwrap();
    cfg.output_dir = dir.to_path_buf();
    let summary = train(
        &cfg,
        &RunOptions {
            workspace: dir.into(),
            echo_config: false,
            resume: None,
            ..RunOptions::default()
        },
    )
    .unwrap();
    let metrics = std::fs::read_to_string(summary.run_dir.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect();
    assert!(
        losses.iter().all(|l| l.is_finite()),
        "{extra:?}: {losses:?}"
    );
    // The mean over the last third of the logged steps below the mean over the first third: one
    // step's loss against another's is noise on these small batches (a GCE pairwise run on
    // another CPU ended 0.3 above its first step while its thirds fell from 14.5 to 13.5).
    let third = (losses.len() / 3).max(1);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (first, last) = (mean(&losses[..third]), mean(&losses[losses.len() - third..]));
    assert!(
        last < first,
        "{extra:?}: loss did not go down (first third {first:.4}, last third {last:.4}): {losses:?}"
    );
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
        &[
            "head.type=combined",
            "head.s=16.0",
            "head.m1=1.0",
            "head.m2=0.3",
            "head.m3=0.2",
        ],
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

/// CurricularFace and AdaFace through the loop, alone and over a Partial FC sample (labels
/// remapped into the sample: CurricularFace's hard negatives are the sampled columns'); their
/// moving state ends in the checkpoint's objective state, moved away from its initial value
/// (once per step under gradient accumulation: `tests/curricular_adaface.rs` in loss-heads).
#[test]
fn curricularface_and_adaface_train_and_checkpoint_their_state() {
    for (head, key, initial) in [
        ("curricularface", "head.t", 0.0),
        ("adaface", "head.norm_mean", 20.0),
    ] {
        for extra in [&[][..], &["partial_fc.sample_rate=0.5"]] {
            let dir = tempfile::tempdir().unwrap();
            let mut args = vec![format!("head.type={head}"), "head.s=16.0".to_string()];
            args.extend(extra.iter().map(|s| s.to_string()));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let summary = short_run_in(dir.path(), &args);
            let state = find_file(&summary.run_dir, "objective.safetensors")
                .unwrap_or_else(|| panic!("{head} {extra:?}: no objective.safetensors"));
            let named = tch::Tensor::read_safetensors(&state).unwrap();
            let v = named
                .iter()
                .find(|(k, _)| k == key)
                .unwrap_or_else(|| panic!("{head}: no {key} in {named:?}"));
            let v = v.1.double_value(&[]);
            assert!(
                v.is_finite() && v != initial,
                "{head} {extra:?}: {key} = {v}"
            );
        }
    }
}

/// The first file named `name` below `dir` (depth first).
fn find_file(dir: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let p = entry.path();
        if p.is_dir() {
            if let Some(f) = find_file(&p, name) {
                return Some(f);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}

/// GCE's prototype replacement on P x K batches, also where identities have fewer images than K
/// (K = 8 over 4 images each: the sampler pads every chunk with copies, which the head must not
/// pair with themselves; the loop hands it the images' indices).
#[test]
fn gce_pairwise_trains_on_identity_balanced_batches() {
    short_run(&[
        "head.type=gce",
        "head.s=16.0",
        "loader.images_per_identity=4",
    ]);
    // The live out-sample gradient here: with the detached default (issue 17) this 36-step padded
    // run's loss fell (minimum 12.6 from 14.3) but its last logged value (16.2) was above its
    // first, which is what `short_run` asserts; the case checks the replacement of padded copies.
    short_run(&[
        "head.type=gce",
        "head.s=16.0",
        "head.pairwise.rate=0.5",
        "head.out_gradient=live",
        "loader.images_per_identity=8",
    ]);
}

fn train_records(summary: &facerec_trainer::RunSummary) -> Vec<serde_json::Value> {
    std::fs::read_to_string(summary.run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .collect()
}

/// CoReFace with two micro-batches per optimiser step: the adaptive margin moves once per step.
/// Every step is logged (its last micro-batch's values): `margin_t = 0.99·gap_t + 0.01·margin_{t−1}`
/// with `gap_t` the step's gap over both micro-batches (`= positive_cos − hardest_negative_cos`),
/// and the checkpointed margin is the last step's. (Updating per micro-batch, as before, breaks
/// the recurrence by about 1e-3.)
#[test]
fn coreface_margin_moves_once_per_optimiser_step() {
    let dir = tempfile::tempdir().unwrap();
    let summary = short_run_in(
        dir.path(),
        &[
            "model.dropout=0.0",
            "head.s=16.0",
            "coreface.start_epoch=0",
            "coreface.s=16.0",
            "train.batch_size=8",
            "train.grad_accumulation=2",
            "train.log_every=1",
        ],
    );
    let records = train_records(&summary);
    assert_eq!(records.len(), summary.steps);
    let f = |r: &serde_json::Value, k: &str| {
        r[k].as_f64()
            .unwrap_or_else(|| panic!("{k} missing in {r}"))
    };
    let mut prev = 0.0;
    for r in &records {
        let (m, gap) = (f(r, "coreface_margin"), f(r, "coreface_batch_gap"));
        let (pos, neg) = (
            f(r, "coreface_positive_cos"),
            f(r, "coreface_hardest_negative_cos"),
        );
        assert!((gap - (pos - neg)).abs() < 1e-5, "{r}");
        assert!(
            (m - (0.99 * gap + 0.01 * prev)).abs() < 1e-5,
            "step {}: margin {m}, gap {gap}, previous {prev}",
            r["step"]
        );
        prev = m;
    }
    let ckpt = facerec_trainer::checkpoint::latest(&summary.run_dir).unwrap();
    let state = facerec_trainer::checkpoint::read_objective(&ckpt).unwrap();
    let stored = f64::try_from(&state["coreface.margin"]).unwrap();
    assert_eq!(
        stored as f32, prev as f32,
        "the checkpoint holds the last step's margin"
    );
}

/// Sub-center ArcFace and MagFace through the loop, alone and over a Partial FC sample: the
/// classifier (checkpoint and `classifier.safetensors`) holds `K` rows per class, and a
/// sub-center run resumes from its checkpoint with that shape.
#[test]
fn subcenter_arcface_and_magface_train_also_under_partial_fc() {
    for extra in [&[][..], &["partial_fc.sample_rate=0.5"]] {
        for head in [
            &["head.type=subcenter_arcface", "head.s=16.0", "head.k=3"][..],
            &[
                "head.type=magface",
                "head.s=16.0",
                "head.l_a=1.0",
                "head.u_a=20.0",
            ],
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut args: Vec<&str> = head.to_vec();
            args.push("data.identities=12");
            args.extend(extra.iter());
            let summary = short_run_in(dir.path(), &args);
            let k = if head[0].contains("subcenter") { 3 } else { 1 };
            let weight_rows = |file: &std::path::Path| {
                let named = tch::Tensor::read_safetensors(file).unwrap();
                let (_, w) = named
                    .into_iter()
                    .find(|(k, _)| k.ends_with("weight"))
                    .unwrap();
                w
            };
            let w = weight_rows(&summary.run_dir.join("classifier.safetensors"));
            assert_eq!(w.size(), [12 * k, 128], "{args:?}");
            if k > 1 {
                // Every sub-centre row was initialised apart from its siblings.
                let rows = w.view([-1, k, w.size()[1]]);
                let spread = (rows.select(1, 0) - rows.select(1, 1)).abs().max();
                assert!(spread.double_value(&[]) > 0.0);
            }
            if k == 1 || !extra.is_empty() {
                continue;
            }
            // One more epoch from the checkpoint: the classifier reloads with its K rows.
            let mut more = common::short_run_overrides(4, &args);
            more.retain(|s| !s.starts_with("train.epochs="));
            more.push("train.epochs=4".into());
            let mut cfg = Config::load(None, &more).unwrap();
            cfg.output_dir = dir.path().to_path_buf();
            let resumed = train(
                &cfg,
                &RunOptions {
                    workspace: dir.path().into(),
                    echo_config: false,
                    resume: Some(summary.run_dir.clone()),
                    ..RunOptions::default()
                },
            )
            .unwrap_or_else(|e| panic!("{args:?}: resume: {e:#}"));
            assert!(resumed.steps > summary.steps, "{args:?}");
            let w2 = weight_rows(&resumed.run_dir.join("classifier.safetensors"));
            assert_eq!(w2.size(), w.size());
        }
    }
}
