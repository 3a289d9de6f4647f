//! A small ViT (masking and drop path on) through the real training loop under every objective:
//! each head type, Partial FC, GCE's pairwise prototypes, CoReFace and cluster-guided training.
//! Every step must take a finite loss, and some later step's loss must be below the first's.

use facerec_backbone::{BackboneConfig, ViTConfig};
mod common;

use facerec_trainer::{train, Config, RunOptions};

/// Width 16, 2 blocks of 2 heads, patch 8 on the default 56 px (49 tokens), 32-d embedding, with
/// arcface_torch's mask ratio 0.1 and drop path 0.1.
fn tiny_vit() -> ViTConfig {
    ViTConfig {
        embed_dim: 16,
        depth: 2,
        num_heads: 2,
        patch_size: 8,
        input_size: 56,
        embedding_size: 32,
        ..ViTConfig::vit_t()
    }
}

fn short_vit_run(extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let overrides = common::short_run_overrides(2, extra);
    let mut cfg = Config::load(None, &overrides).unwrap();
    cfg.model = BackboneConfig::Vit(tiny_vit());
    cfg.validate().unwrap();
    cfg.output_dir = dir.path().to_path_buf();
    let summary = train(
        &cfg,
        &RunOptions {
            workspace: dir.path().into(),
            echo_config: false,
            ..RunOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{extra:?}: {e:#}"));
    let metrics = std::fs::read_to_string(summary.run_dir.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect();
    assert!(losses.len() >= 2, "{extra:?}: {losses:?}");
    assert!(
        losses.iter().all(|l| l.is_finite()),
        "{extra:?}: {losses:?}"
    );
    // Masking, drop path and GCE's prototypes make single steps noisy: some later step must be
    // below the first.
    assert!(
        losses[1..].iter().any(|l| *l < losses[0]),
        "{extra:?}: loss never went below the first step's: {losses:?}"
    );
    assert_eq!(summary.skipped_steps, 0, "{extra:?}");
    // The written config names the ViT, so eval/export rebuild the same network.
    let written = std::fs::read_to_string(summary.run_dir.join("config.toml")).unwrap();
    assert!(written.contains("type = \"vit\""), "{written}");
}

#[test]
fn vit_trains_through_every_objective() {
    for extra in [
        &["head.type=softmax"][..],
        &["head.type=cosface", "head.s=16.0"],
        &["head.type=arcface", "head.s=16.0"],
        &[
            "head.type=combined",
            "head.s=16.0",
            "head.m1=1.0",
            "head.m2=0.3",
            "head.m3=0.2",
        ],
        &["head.type=elastic_arc", "head.s=16.0"],
        &["head.type=curricularface", "head.s=16.0"],
        &["head.type=adaface", "head.s=16.0"],
        &[
            "head.type=gce",
            "head.s=16.0",
            "loader.images_per_identity=4",
        ],
        &["partial_fc.sample_rate=0.5", "head.s=16.0"],
        &["head.s=16.0", "coreface.start_epoch=0", "coreface.s=16.0"],
        &[
            "cluster_guided.refresh_every_epochs=1",
            "cluster_guided.margin.s=32.0",
            // The default head's m (0.3) must equal the cluster-guided start margin m0.
            "cluster_guided.margin.m0=0.3",
        ],
    ] {
        short_vit_run(extra);
    }
}
