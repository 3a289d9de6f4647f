//! `facerec embed`, `facerec prep align` and `facerec eval --gallery --probes` on small synthetic
//! inputs: embeddings equal the trainer's own evaluation embedding, alignment keeps RGB and puts the
//! landmarks on the template, bad input names the file and line (or the missing image) and leaves
//! nothing behind, and a 1:N search of known composition counts its mated and non-mated probes.

use std::path::{Path, PathBuf};

use facerec_backbone::BackboneConfig;
use facerec_data::align::ARCFACE_TEMPLATE;
use facerec_data::{Fit, ImageFolder, RecOptions, RecordIo, Source};
use facerec_trainer::commands::{align, embed, eval};
use image::{Rgb, RgbImage};
use tch::{nn, nn::ModuleT, Device, Tensor};

const MODEL: &str = "[model]\ntype = \"iresnet\"\nlayers = [1, 1, 1, 1]\nwidths = [4, 4, 8, 8]\nembedding_size = 16\ninput_size = 32\n\n[input]\nfit = \"center_crop\"\n";

/// A run directory with random weights; returns the backbone config.
fn run_dir(dir: &Path) -> BackboneConfig {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.toml"), MODEL).unwrap();
    let cfg: BackboneConfig = toml::from_str::<toml::Table>(MODEL).unwrap()["model"]
        .clone()
        .try_into()
        .unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let _ = facerec_backbone::build(&vs.root(), &cfg);
    vs.save(dir.join("model.safetensors")).unwrap();
    cfg
}

/// A non-square coloured image (so the fit rule matters).
fn face(seed: u32) -> RgbImage {
    RgbImage::from_fn(44, 36, |x, y| {
        Rgb([
            ((x * seed + y * 7) % 251) as u8,
            ((y * 3 + seed) % 256) as u8,
            (seed * 13 % 256) as u8,
        ])
    })
}

/// `root/<id>/<k>.png` for ids `P0..P{ids}` with `per` images each.
fn folder(root: &Path, ids: u32, per: u32, offset: u32) {
    for i in 0..ids {
        let d = root.join(format!("P{i}"));
        std::fs::create_dir_all(&d).unwrap();
        for k in 0..per {
            face(1 + 10 * i + k + offset)
                .save(d.join(format!("{k}.png")))
                .unwrap();
        }
    }
}

fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
    let hl = u16::from_le_bytes([b[8], b[9]]) as usize;
    assert_eq!((10 + hl) % 64, 0, "npy header padding");
    let header = std::str::from_utf8(&b[10..10 + hl]).unwrap();
    assert!(header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"));
    let shape = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let shape: Vec<usize> = shape
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let data = b[10 + hl..]
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (shape, data)
}

fn embed_args(model: &Path, input: &Path, out: &Path) -> embed::Args {
    embed::Args {
        model: model.to_path_buf(),
        config: None,
        input: input.to_path_buf(),
        out: out.to_path_buf(),
        flip_sum: false,
        no_normalise: false,
        batch_size: 3,
        fit: None,
        device: "cpu".into(),
        threads: 1,
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn embed_equals_the_trainers_eval_embedding() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = run_dir(&d.join("run"));
    folder(&d.join("faces"), 2, 3, 0);

    // The trainer's evaluation (eval_sets.rs): the source's images decoded as Uint8 through
    // `Source::load` (the run's fit), the backbone in eval mode on normalised input, the flip test.
    let vs = {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let net = facerec_backbone::build(&vs.root(), &cfg);
        vs.load(d.join("run/model.safetensors")).unwrap();
        (vs, net)
    };
    let set = ImageFolder::open(&d.join("faces"), 32, None)
        .unwrap()
        .with_fit(Fit::CenterCrop);
    let images =
        facerec_evaluation::images::decode_all(set.len(), 32, 1, &|i| set.load(i), &|| {}).unwrap();
    let labels: Vec<usize> = (0..set.len()).map(|i| set.label(i)).collect();
    let model = |x: &Tensor| {
        vs.1.forward_t(&facerec_evaluation::images::normalize(x), false)
    };
    let (want, _) = facerec_evaluation::embed_with_flip(&model, &images, 4);
    let want = Vec::<f32>::try_from(want.flatten(0, -1)).unwrap();

    let out = d.join("out/emb.npy");
    embed::run(embed::Args {
        flip_sum: true,
        ..embed_args(&d.join("run"), &d.join("faces"), &out)
    })
    .unwrap();
    let (shape, got) = read_npy(&out);
    assert_eq!(shape, [6, 16]);
    let diff = max_diff(&got, &want);
    assert!(
        diff < 1e-6,
        "embed vs the trainer's evaluation: max |diff| {diff}"
    );

    // The CSV beside it: one row per embedding, labels from the folders.
    let csv = std::fs::read_to_string(d.join("out/emb.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows[0], "index,path,label");
    assert_eq!(rows.len(), 7);
    for (i, r) in rows[1..].iter().enumerate() {
        let f: Vec<&str> = r.split(',').collect();
        assert_eq!(f[0], i.to_string());
        assert!(f[1].ends_with(".png") && Path::new(f[1]).is_file(), "{r}");
        assert_eq!(f[2], set.class_names()[labels[i]]);
    }

    // Safetensors, a list file, no flip and no normalisation: the raw forward of the same input.
    let list = d.join("list.txt");
    let text: String = (0..set.len())
        .map(|i| format!("{}\t{}\n", set.path(i).display(), labels[i]))
        .collect();
    std::fs::write(&list, text).unwrap();
    let st = d.join("raw.safetensors");
    embed::run(embed::Args {
        no_normalise: true,
        ..embed_args(&d.join("run"), &list, &st)
    })
    .unwrap();
    let raw = &Tensor::read_safetensors(&st).unwrap()[0];
    assert_eq!(raw.0, "embeddings");
    let want_raw = tch::no_grad(|| model(&images));
    let diff = (&raw.1 - want_raw).abs().max().double_value(&[]);
    assert!(diff < 1e-6, "raw embeddings: max |diff| {diff}");

    // Bad input: a missing input, an unknown output format, a list naming a missing image.
    let err = format!(
        "{:#}",
        embed::run(embed_args(&d.join("run"), &d.join("nope"), &out)).unwrap_err()
    );
    assert!(err.contains("nope"), "{err}");
    let err = format!(
        "{:#}",
        embed::run(embed_args(&d.join("run"), &list, &d.join("x.txt"))).unwrap_err()
    );
    assert!(err.contains(".npy or .safetensors"), "{err}");
    std::fs::write(&list, "gone.png\n").unwrap();
    let err = format!(
        "{:#}",
        embed::run(embed_args(&d.join("run"), &list, &d.join("y.npy"))).unwrap_err()
    );
    assert!(
        err.contains("list.txt:1") && err.contains("gone.png"),
        "{err}"
    );
    assert!(!d.join("y.npy").exists() && !d.join("y.csv").exists());
}

/// A 160 x 140 image with a red square at each of five landmarks (a rotated, scaled face) on blue.
fn marked_face() -> (RgbImage, Vec<[f64; 2]>) {
    let (s, th, tx, ty) = (1.2f64, 0.15f64, 25.0, 0.0);
    let (a, b) = (s * th.cos(), s * th.sin());
    let lm: Vec<[f64; 2]> = ARCFACE_TEMPLATE
        .iter()
        .map(|p| [a * p[0] - b * p[1] + tx, b * p[0] + a * p[1] + ty])
        .collect();
    let img = RgbImage::from_fn(160, 140, |x, y| {
        let near = lm
            .iter()
            .any(|p| (x as f64 - p[0]).abs() < 3.0 && (y as f64 - p[1]).abs() < 3.0);
        Rgb(if near { [250, 0, 0] } else { [0, 0, 200] })
    });
    (img, lm)
}

fn align_args(landmarks: &Path, images: &Path, out: &Path) -> align::Args {
    align::Args {
        landmarks: landmarks.to_path_buf(),
        images: images.to_path_buf(),
        out: out.to_path_buf(),
        layout: None,
        size: 112,
        quality: 95,
        threads: 2,
    }
}

fn assert_marks_on_template(img: &RgbImage, what: &str) {
    for p in ARCFACE_TEMPLATE {
        let px = img.get_pixel(p[0].round() as u32, p[1].round() as u32);
        assert!(
            px[0] > 180 && px[2] < 80,
            "{what}: at {p:?} {px:?} (red expected)"
        );
    }
    let bg = img.get_pixel(56, 15);
    assert!(
        bg[0] < 60 && bg[2] > 140,
        "{what}: background {bg:?} (blue expected)"
    );
}

#[test]
fn prep_align_keeps_rgb_writes_folder_and_rec_and_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (img, lm) = marked_face();
    let line = |name: &str| {
        let coords: Vec<String> = lm
            .iter()
            .flat_map(|p| [p[0].to_string(), p[1].to_string()])
            .collect();
        format!("{name}\t{}\n", coords.join("\t"))
    };
    for name in ["A/A_0001.jpg", "A/A_0002.jpg", "B/B_0001.jpg"] {
        let p = d.join("src").join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        // PNG bytes under a .jpg name: decoding goes by content.
        img.write_to(
            &mut std::fs::File::create(&p).unwrap(),
            image::ImageFormat::Png,
        )
        .unwrap();
    }
    let lmf = d.join("lm.tsv");
    std::fs::write(
        &lmf,
        format!(
            "path\tx0\ty0\n{}{}{}",
            line("A/A_0001.jpg"),
            line("A/A_0002.jpg"),
            line("B/B_0001.jpg")
        ),
    )
    .unwrap();

    align::run(align_args(&lmf, &d.join("src"), &d.join("aligned"))).unwrap();
    let out = facerec_data::input::read(&d.join("aligned/A/A_0002.png")).unwrap();
    assert_eq!(out.dimensions(), (112, 112));
    assert_marks_on_template(&out, "folder");

    align::run(align_args(
        &lmf,
        &d.join("src"),
        &d.join("packed/faces.rec"),
    ))
    .unwrap();
    let rec = RecordIo::open(&d.join("packed/faces.rec"), 112, RecOptions::default()).unwrap();
    assert_eq!((rec.len(), rec.num_classes()), (3, 2));
    let bytes = rec.load(2).unwrap();
    let back = RgbImage::from_raw(112, 112, bytes).unwrap();
    assert_marks_on_template(&back, ".rec (JPEG)");
    // `facerec embed` reads the packed .rec through its training source: one row per record.
    run_dir(&d.join("run"));
    embed::run(embed_args(
        &d.join("run"),
        &d.join("packed/faces.rec"),
        &d.join("rec.npy"),
    ))
    .unwrap();
    let (shape, _) = read_npy(&d.join("rec.npy"));
    assert_eq!(shape, [3, 16]);
    let labels: Vec<String> = std::fs::read_to_string(d.join("rec.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.rsplit(',').next().unwrap().to_string())
        .collect();
    assert_eq!(labels, ["0", "0", "1"]);
    // An existing output is refused.
    assert!(align::run(align_args(&lmf, &d.join("src"), &d.join("aligned"))).is_err());

    // A missing column (line 3) and an extra one: the file and line are named, nothing is written.
    let second = line("A/A_0002.jpg");
    let fields: Vec<&str> = second.trim_end().split('\t').collect();
    let bad = [
        format!(
            "{}{}\n",
            line("A/A_0001.jpg"),
            fields[..fields.len() - 1].join("\t")
        ),
        format!("{}{}\t7\n", line("A/A_0001.jpg"), second.trim_end()),
    ];
    for (k, text) in bad.iter().enumerate() {
        std::fs::write(&lmf, text).unwrap();
        let target = d.join(format!("bad{k}"));
        let err = format!(
            "{:#}",
            align::run(align_args(&lmf, &d.join("src"), &target)).unwrap_err()
        );
        assert!(
            err.contains("lm.tsv:2:") && err.contains("missing or extra column"),
            "{err}"
        );
        assert!(!target.exists());
    }
    // A missing image is named with its landmark line; no partial output is left behind.
    std::fs::write(
        &lmf,
        format!("{}{}", line("A/A_0001.jpg"), line("C/C_0001.jpg")),
    )
    .unwrap();
    let err = format!(
        "{:#}",
        align::run(align_args(&lmf, &d.join("src"), &d.join("bad.rec"))).unwrap_err()
    );
    assert!(
        err.contains("C_0001.jpg") && err.contains("lm.tsv:2"),
        "{err}"
    );
    let left: Vec<PathBuf> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        left.iter()
            .all(|p| !p.to_string_lossy().contains("partial") && !p.ends_with("bad.rec")),
        "{left:?}"
    );
}

#[test]
fn eval_gallery_probes_counts_mated_and_non_mated() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run_dir(&d.join("run"));
    // Gallery P0..P3, one image each; probes: the same images of P0..P3 (mated, rank 1: identical
    // input) plus P4, P5 (not in the gallery: non-mated).
    folder(&d.join("gallery"), 4, 1, 0);
    folder(&d.join("probes"), 6, 1, 0);
    let args = eval::Args {
        model: d.join("run"),
        config: None,
        bins: vec![],
        pairs: vec![],
        images: vec![],
        ijb: vec![],
        targets: vec![],
        batch_size: 4,
        fit: None,
        device: "cpu".into(),
        threads: 1,
        out: Some(d.join("out")),
        gallery: Some(d.join("gallery")),
        probes: Some(d.join("probes")),
        ijb_1n: false,
        ijb_no_flip: false,
        ijb_no_norm_score: false,
        ijb_no_detector_score: false,
    };
    eval::run(args).unwrap();
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("out/report.json")).unwrap()).unwrap();
    let id = &report["targets"][0]["identification"];
    assert_eq!(
        (
            id["gallery"].as_u64(),
            id["mated"].as_u64(),
            id["non_mated"].as_u64()
        ),
        (Some(4), Some(4), Some(2))
    );
    assert_eq!(id["cmc"][0]["rate"].as_f64(), Some(1.0), "{id}");
    assert_eq!(id["tpir_at_fpir"].as_array().unwrap().len(), 3);
    let csv = std::fs::read_to_string(d.join("out/identification.csv")).unwrap();
    assert_eq!(csv.lines().count(), 7);
    assert!(std::fs::read_to_string(d.join("out/report.txt"))
        .unwrap()
        .contains("CMC rank-1"));
}
