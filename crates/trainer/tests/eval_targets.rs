//! Evaluation targets beyond labelled folders: an insightface `.bin` pack written by our own
//! `prep lfw` writer (facerec-data) and read by the evaluation crate's pickle reader, and the LFW
//! `pairs.txt` it was made from, verified during a short training run.

use facerec_data::{Source, SyntheticConfig, SyntheticFaces};
use facerec_trainer::config::{Config, EvalTarget, SourceConfig};
use facerec_trainer::{train, RunOptions};
use std::fmt::Write as _;
use std::path::Path;

const IDENTITIES: usize = 6;
const IMAGES: usize = 4;

/// Six synthetic identities saved as `<Name>/<Name>_000N.png`, and a View 1 style pair list.
fn write_lfw_style_set(dir: &Path) -> usize {
    let faces = SyntheticFaces::new(SyntheticConfig {
        identities: IDENTITIES,
        images_per_identity: IMAGES,
        image_size: 56,
        seed: 3,
        first_identity: 5_000,
    })
    .unwrap();
    let name = |id: usize| format!("Person_{id}");
    for i in 0..faces.len() {
        let (id, n) = (faces.label(i), i % IMAGES + 1);
        std::fs::create_dir_all(dir.join(name(id))).unwrap();
        let img = image::RgbImage::from_raw(56, 56, faces.load(i).unwrap()).unwrap();
        img.save(dir.join(name(id)).join(format!("{}_{n:04}.png", name(id))))
            .unwrap();
    }
    // View 1 layout: N, then N matched lines, then N mismatched lines.
    let mut matched = Vec::new();
    let mut mismatched = Vec::new();
    for id in 0..IDENTITIES {
        for (a, b) in [(1, 2), (3, 4)] {
            matched.push(format!("{}\t{a}\t{b}", name(id)));
        }
        let other = (id + 1) % IDENTITIES;
        for k in 1..=2 {
            mismatched.push(format!("{}\t{k}\t{}\t{}", name(id), name(other), k + 2));
        }
    }
    let mut text = format!("{}\n", matched.len());
    for line in matched.iter().chain(&mismatched) {
        writeln!(text, "{line}").unwrap();
    }
    std::fs::write(dir.join("pairs.txt"), text).unwrap();
    matched.len() * 2
}

#[test]
fn bin_and_pairs_targets_are_verified_during_training() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let num_pairs = write_lfw_style_set(&images);
    let bin = dir.path().join("set.bin");
    facerec_trainer::commands::prep::pack_lfw(&images, &images.join("pairs.txt"), &bin, 95, None)
        .unwrap();
    // insightface scores a pack with contiguous folds: every fold must hold both kinds of pair
    // (the View 1 file lists all matched pairs first).
    let pack = facerec_evaluation::BinPack::read(&bin).unwrap();
    for fold in facerec_evaluation::verification::kfold(pack.issame.len(), 10) {
        let kinds = &pack.issame[fold];
        assert!(
            kinds.contains(&true) && kinds.contains(&false),
            "a fold of one kind: {kinds:?}"
        );
    }

    let mut cfg = Config::load(
        None,
        &[
            "data.identities=20",
            "data.images_per_identity=4",
            "train.epochs=1",
            "train.batch_size=16",
            "eval.every_steps=0",
        ]
        .map(String::from),
    )
    .unwrap();
    cfg.output_dir = dir.path().join("runs");
    cfg.eval.targets = vec![
        EvalTarget {
            name: "bin".into(),
            source: SourceConfig::Bin { path: bin },
            required: true,
        },
        EvalTarget {
            name: "pairs".into(),
            source: SourceConfig::LfwPairs {
                pairs: images.join("pairs.txt"),
                images: images.clone(),
            },
            required: true,
        },
    ];
    let summary = train(
        &cfg,
        &RunOptions {
            workspace: dir.path().into(),
            echo_config: false,
            resume: None,
            ..RunOptions::default()
        },
    )
    .unwrap();
    assert_eq!(summary.targets.len(), 2);
    for t in &summary.targets {
        assert_eq!(t.model.num_pairs, num_pairs, "{}", t.name);
        assert!((0.0..=1.0).contains(&t.model.accuracy_mean));
    }
    // The same images and pairs (JPEG-compressed in the pack): raw-pixel verification must agree
    // closely between the two readers.
    let (a, b) = (
        &summary.targets[0].raw_pixels,
        &summary.targets[1].raw_pixels,
    );
    assert!(
        (a.accuracy_mean - b.accuracy_mean).abs() <= 0.15,
        "bin {} vs pairs {}",
        a.accuracy_mean,
        b.accuracy_mean
    );
}

#[test]
fn a_pair_list_cannot_be_training_data() {
    let err = Config::load(None, &["data.type=bin".into(), "data.path=/x.bin".into()]).unwrap_err();
    assert!(err.to_string().contains("data.type"), "{err}");
}

/// `pairs.txt` of `sets` sets with `n` matched and `n` mismatched pairs each, over people
/// `Person_<5000+k>` (k < sets * n), each with images 1 and 2.
fn sets_pairs_file(sets: usize, n: usize) -> String {
    let people = sets * n;
    let name = |k: usize| format!("Person_{}", 5_000 + k);
    let mut text = format!("{sets}\t{n}\n");
    for s in 0..sets {
        for k in s * n..(s + 1) * n {
            writeln!(text, "{}\t1\t2", name(k)).unwrap();
        }
        for k in s * n..(s + 1) * n {
            writeln!(text, "{}\t1\t{}\t2", name(k), name((k + 1) % people)).unwrap();
        }
    }
    text
}

/// Issue 17: one fold rule for the trainer's evaluation and `facerec eval`. A `pairs.txt` with a
/// `5\tN` header is verified with its 5 sets as the folds (the trainer used to cut every target into
/// 10 contiguous folds, each holding one kind of pair: raw pixels scored 0.43 there while `eval` used
/// the 5 sets), a `10\tN` file with its 10 sets; and `facerec eval` on the trained run gives the
/// trainer's numbers fold for fold.
#[test]
fn pair_lists_keep_their_sets_as_folds_in_training_and_in_eval() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let faces = SyntheticFaces::new(SyntheticConfig {
        identities: 10,
        images_per_identity: 2,
        image_size: 56,
        seed: 4,
        first_identity: 5_000,
    })
    .unwrap();
    for i in 0..faces.len() {
        let (id, n) = (faces.label(i), i % 2 + 1);
        let person = format!("Person_{}", 5_000 + id);
        std::fs::create_dir_all(images.join(&person)).unwrap();
        let img = image::RgbImage::from_raw(56, 56, faces.load(i).unwrap()).unwrap();
        img.save(images.join(&person).join(format!("{person}_{n:04}.png")))
            .unwrap();
    }
    let (p5, p10) = (
        dir.path().join("pairs5.txt"),
        dir.path().join("pairs10.txt"),
    );
    std::fs::write(&p5, sets_pairs_file(5, 2)).unwrap();
    std::fs::write(&p10, sets_pairs_file(10, 1)).unwrap();

    let mut cfg = Config::load(
        None,
        &[
            "data.identities=20",
            "data.images_per_identity=4",
            "train.epochs=1",
            "train.batch_size=16",
            "eval.every_steps=0",
        ]
        .map(String::from),
    )
    .unwrap();
    cfg.output_dir = dir.path().join("runs");
    cfg.eval.targets = [("five", &p5), ("ten", &p10)]
        .map(|(name, pairs)| EvalTarget {
            name: name.into(),
            source: SourceConfig::LfwPairs {
                pairs: pairs.clone(),
                images: images.clone(),
            },
            required: true,
        })
        .to_vec();
    let summary = train(
        &cfg,
        &RunOptions {
            workspace: dir.path().into(),
            echo_config: false,
            resume: None,
            ..RunOptions::default()
        },
    )
    .unwrap();
    let (five, ten) = (&summary.targets[0], &summary.targets[1]);
    assert_eq!(five.model.num_pairs, 20);
    assert_eq!(
        five.model.fold_accuracies.len(),
        5,
        "the 5 sets are the folds"
    );
    assert_eq!(five.raw_pixels.fold_accuracies.len(), 5);
    assert_eq!(
        ten.model.fold_accuracies.len(),
        10,
        "the 10 sets are the folds"
    );

    // The same run through `facerec eval`: the same folds and the same accuracies.
    let out = dir.path().join("eval");
    facerec_trainer::commands::eval::run(facerec_trainer::commands::eval::Args {
        model: summary.run_dir.clone(),
        config: None,
        bins: vec![],
        pairs: vec![p5.clone(), p10.clone()],
        images: vec![images.clone()],
        ijb: vec![],
        targets: vec![],
        batch_size: cfg.eval.batch_size,
        fit: None,
        device: "cpu".into(),
        threads: 0,
        out: Some(out.clone()),
        gallery: None,
        probes: None,
        ijb_1n: false,
        ijb_no_flip: false,
        ijb_no_norm_score: false,
        ijb_no_detector_score: false,
    })
    .unwrap();
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    for (t, ours) in report["targets"]
        .as_array()
        .unwrap()
        .iter()
        .zip([five, ten])
    {
        let v = &t["verification"];
        let folds: Vec<f64> = v["fold_accuracies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(
            folds.len(),
            ours.model.fold_accuracies.len(),
            "{}",
            ours.name
        );
        for (a, b) in folds.iter().zip(&ours.model.fold_accuracies) {
            assert!(
                (a - b).abs() < 1e-9,
                "{}: eval {folds:?} vs training {:?}",
                ours.name,
                ours.model.fold_accuracies
            );
        }
    }
}
