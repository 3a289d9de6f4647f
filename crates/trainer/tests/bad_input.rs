//! Bad input through the `facerec` binary: each case must exit non-zero with an error that names
//! the offending key, folder or file.

use std::path::Path;
use std::process::Command;

/// Run `facerec train` with `--set` overrides; return (success, stderr).
fn train(args: &[&str], out: &Path) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_facerec"))
        .arg("train")
        .args(["--set", &format!("output_dir={}", out.display())])
        .args(args.iter().flat_map(|a| ["--set", a]))
        .output()
        .expect("running facerec");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn unknown_config_key_is_named() {
    let out = tempfile::tempdir().unwrap();
    let (ok, err) = train(&["optim.lrr=0.1"], out.path());
    assert!(!ok);
    assert!(err.contains("optim") && err.contains("lrr"), "{err}");

    // The same through a config file, with a typo in a nested table.
    let cfg = out.path().join("typo.toml");
    std::fs::write(
        &cfg,
        "extends = \"default\"\n[train]\nepochs = 1\nbatch_sise = 8\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_facerec"))
        .args(["train", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(err.contains("train") && err.contains("batch_sise"), "{err}");
}

#[test]
fn missing_data_folder_is_named() {
    let out = tempfile::tempdir().unwrap();
    let missing = out.path().join("no-such-faces");
    let (ok, err) = train(
        &[
            "data.type=image_folder",
            &format!("data.root={}", missing.display()),
        ],
        out.path(),
    );
    assert!(!ok);
    assert!(err.contains("no-such-faces"), "{err}");
    assert!(err.contains("data.root"), "{err}");
}

#[test]
fn label_outside_class_range_is_rejected() {
    let out = tempfile::tempdir().unwrap();
    let root = out.path().join("faces");
    for class in ["a", "b", "c"] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for i in 0..2u8 {
            let img = image::GrayImage::from_fn(20, 20, |x, y| {
                image::Luma([(x as u8 * 7) ^ (y as u8 * 3) ^ (i * 50)])
            });
            img.save(root.join(class).join(format!("{i}.png"))).unwrap();
        }
    }
    let (ok, err) = train(
        &[
            "data.type=image_folder",
            &format!("data.root={}", root.display()),
            "classifier.num_classes=2",
        ],
        out.path(),
    );
    assert!(!ok);
    assert!(err.contains("classifier.num_classes"), "{err}");
    assert!(err.contains("label 2"), "{err}");
    assert!(
        err.contains(&root.join("c").display().to_string()),
        "the error names the file: {err}"
    );
    // Nothing was trained, so no run directory was created.
    let runs: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name() != "faces")
        .collect();
    assert!(runs.is_empty(), "{runs:?}");
}

#[test]
fn bad_value_is_named() {
    let out = tempfile::tempdir().unwrap();
    let (ok, err) = train(&["model.depth=42", "model.layers="], out.path());
    assert!(!ok, "{err}");
    let (ok, err) = train(&["train.device=tpu"], out.path());
    assert!(!ok);
    assert!(err.contains("train.device"), "{err}");
}

/// Issue 19: `eval.batch_size = 0` used to panic inside the evaluation crate's embedding loop.
#[test]
fn zero_eval_batch_size_is_named_not_a_panic() {
    let out = tempfile::tempdir().unwrap();
    let (ok, err) = train(&["eval.batch_size=0"], out.path());
    assert!(!ok);
    assert!(
        err.contains("eval.batch_size") && !err.contains("panicked"),
        "{err}"
    );
}

/// Issue 19: a classifier that cannot fit (here 999,999,616 classes, the class count of a corrupt
/// RecordIO header) is refused naming `classifier.num_classes` before anything is allocated; it used
/// to panic in tch's VarStore trying to allocate 512 GB.
#[test]
fn classifier_that_cannot_fit_is_refused() {
    let out = tempfile::tempdir().unwrap();
    let (ok, err) = train(
        &["classifier.num_classes=999999616", "train.device=cpu"],
        out.path(),
    );
    assert!(!ok);
    assert!(
        err.contains("classifier.num_classes")
            && err.contains("999999616 classes")
            && err.contains("MemAvailable"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// Issue 19: `policy = "skip"` on a truncated `.rec` used to drop most records and train with exit 0;
/// above `data.max_skipped_fraction` (default 1 %) the run stops naming the file and the counts.
#[test]
fn truncated_rec_under_skip_stops_above_the_ceiling() {
    let out = tempfile::tempdir().unwrap();
    let (images, rec) = (out.path().join("faces"), out.path().join("rec"));
    for class in 0..4u8 {
        std::fs::create_dir_all(images.join(format!("c{class}"))).unwrap();
        for i in 0..5u8 {
            let img = image::RgbImage::from_fn(24, 24, |x, y| {
                image::Rgb([(x as u8 * 9) ^ (i * 40), (y as u8 * 5) ^ (class * 60), 70])
            });
            img.save(images.join(format!("c{class}/{i}.png"))).unwrap();
        }
    }
    let status = Command::new(env!("CARGO_BIN_EXE_facerec"))
        .args(["prep", "pack", "--images"])
        .arg(&images)
        .arg("--out")
        .arg(&rec)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    // Cut the .rec in the middle of the images: about half of them are gone.
    let bytes = std::fs::read(rec.join("train.rec")).unwrap();
    std::fs::write(rec.join("train.rec"), &bytes[..bytes.len() / 2]).unwrap();
    let data = [
        "data.type=rec".to_string(),
        format!("data.path={}", rec.display()),
        "data.policy=skip".into(),
    ];
    let small = ["train.epochs=1", "train.batch_size=4", "train.device=cpu"];
    let args: Vec<&str> = data.iter().map(String::as_str).chain(small).collect();
    let (ok, err) = train(&args, out.path());
    assert!(!ok, "a run on half a .rec must not succeed: {err}");
    assert!(
        err.contains("train.rec")
            && err.contains("image records are unreadable")
            && err.contains("max_skipped_fraction"),
        "{err}"
    );
}
