//! `facerec plot` and `facerec train --dry-run` through the binary.

use std::path::Path;
use std::process::Command;

fn facerec(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_facerec"))
        .args(args)
        .output()
        .expect("cannot start facerec")
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

const METRICS: &str = r#"{"kind":"train","step":50,"epoch":0,"loss":21.7,"lr":0.05,"samples_per_sec":310.2,"data_wait_fraction":0.02,"skipped_images":0}
{"kind":"train","step":100,"epoch":0,"loss":18.2,"lr":0.1,"samples_per_sec":305.0,"data_wait_fraction":0.01,"skipped_images":0}
{"kind":"eval","step":100,"target":"synthetic-heldout","accuracy":0.71,"accuracy_std":0.02,"best":0.71,"xnorm":12.0,"val_at_far_1e-3":0.1}
{"kind":"eval","step":100,"target":"orl","accuracy":0.66,"accuracy_std":0.03,"best":0.66,"xnorm":11.0,"val_at_far_1e-3":0.1}
{"kind":"train","step":150,"epoch":1,"loss":12.9,"lr":0.066,"samples_per_sec":300.0,"data_wait_fraction":0.01,"skipped_images":0}
{"kind":"train","step":200,"epoch":1,"loss":9.4,"lr":0.033,"samples_per_sec":300.0,"data_wait_fraction":0.01,"skipped_images":0}
{"kind":"eval","step":200,"target":"synthetic-heldout","accuracy":0.88,"accuracy_std":0.02,"best":0.88,"xnorm":14.0,"val_at_far_1e-3":0.3}
{"kind":"eval","step":200,"target":"orl","accuracy":0.79,"accuracy_std":0.03,"best":0.79,"xnorm":13.0,"val_at_far_1e-3":0.2}
"#;

#[test]
fn plot_writes_pngs_from_metrics() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("metrics.jsonl"), METRICS).unwrap();
    let o = facerec(&["plot", "--run", p(dir.path())]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for name in ["loss.png", "lr.png", "accuracy.png"] {
        let path = dir.path().join("plots").join(name);
        let img = image::open(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .to_rgb8();
        assert_eq!(img.dimensions(), (720, 520), "{name}");
        // Some curve colour (not white, black or grid grey) is drawn.
        assert!(
            img.pixels().any(|px| {
                let [r, g, b] = px.0;
                r != g || g != b
            }),
            "{name} has no curve"
        );
    }
    assert!(
        !dir.path().join("plots/grad_scale.png").exists(),
        "no grad scale was logged"
    );

    // --out elsewhere.
    let out = dir.path().join("elsewhere");
    let o = facerec(&["plot", "--run", p(dir.path()), "--out", p(&out)]);
    assert!(o.status.success());
    assert!(out.join("loss.png").is_file());
}

#[test]
fn plot_names_the_file_and_line_of_a_malformed_record() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    let mut text: String = METRICS.lines().take(3).map(|l| format!("{l}\n")).collect();
    text.push_str("{\"kind\":\"train\",\"step\":150,\"loss\":12.9,\n");
    std::fs::write(&metrics, text).unwrap();
    let o = facerec(&["plot", "--run", p(dir.path())]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("{} line 4", metrics.display())),
        "{err}"
    );
    assert!(!dir.path().join("plots/loss.png").exists());

    let missing = dir.path().join("missing");
    let o = facerec(&["plot", "--run", p(&missing)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains(&format!("{} does not exist", missing.display())),
        "{err}"
    );
}

/// iResNet-50 with 93,431 classes (MS1MV3), batch 128, SGD with momentum.
#[test]
fn dry_run_r50_ms1mv3_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("r50.toml");
    std::fs::write(
        &cfg,
        r#"output_dir = "runs-should-not-appear"
[data]
type = "synthetic"
identities = 10
images_per_identity = 2
[model]
type = "iresnet"
depth = 50
[classifier]
num_classes = 93431
[head]
type = "arcface"
[partial_fc]
sample_rate = 0.1
[optim]
type = "sgd"
momentum = 0.9
[train]
epochs = 20
batch_size = 128
"#,
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_facerec"))
        .current_dir(dir.path())
        .args(["train", "--config", p(&cfg), "--dry-run"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{}\n{}",
        out,
        String::from_utf8_lossy(&o.stderr)
    );
    // Hand-computed: C x D = 93,431 x 512 = 47,836,672 parameters; x 4 B = 191,346,688 B each for
    // weights, momentum and gradients; x 3 = 574,040,064 B (547.45 MiB).
    assert!(
        out.contains("classifier parameters: 47,836,672 (93,431 classes x 512 embedding"),
        "{out}"
    );
    assert!(out.contains("weights 182.48 MiB (191,346,688 B)"), "{out}");
    assert!(out.contains("= 547.45 MiB (574,040,064 B)"), "{out}");
    // The arcface_torch r50 (published 43.6M; ours is checked name by name against the oracle).
    assert!(
        out.contains("backbone parameters: 43,590,336 trainable, 512 frozen"),
        "{out}"
    );
    // Partial FC keeps floor(0.1 x 93,431) = 9,343 classes per step; the dense gradient and the
    // momentum of all rows stay, so the memory above does not shrink.
    assert!(
        out.contains("sample_rate 0.1 -> 9,343 classes per step"),
        "{out}"
    );
    // Activations, summed by hand over the r50 layers (stem 3 x 64 x 112^2; per block bn1 on the
    // input, conv1/bn2/prelu at the input side, conv2/bn3/add (+ downsample conv/bn) at the output
    // side; bn2, fc, features): 19,820,544 values per image.
    assert!(
        out.contains("activations: 19,820,544 values per image"),
        "{out}"
    );
    assert!(out.contains("x batch 128"), "{out}");
    assert!(
        !dir.path().join("runs-should-not-appear").exists(),
        "a dry run created a run directory"
    );
}
