//! `facerec eval`: evaluate a trained backbone on insightface `.bin` packs, LFW `pairs.txt` lists over an
//! image folder, and IJB-B/C 1:1 (SPEC 6.1, 6.2), several targets per call. Writes `report.json`,
//! `report.txt` and one ROC plot per target into an output folder, and prints the text report.
//!
//! The model: a run directory written by `facerec train` (its `config.toml` holds the `[model]` table,
//! `model.safetensors` the backbone weights with arcface_torch names), or a `.safetensors` file or a
//! PyTorch `.pt`/`.pth` state dict (arcface_torch's released `model.pt`, read without Python by
//! `crate::torch_pt`) with the config found beside it or given by `--config`. Images go through the one image path
//! (`facerec_data::input`): fitted to the model's `input_size` by the run's `[input] fit` rule (the
//! geometry it was trained on; `--fit` overrides), normalised as in training. Each pair list is verified
//! with its own folds (`facerec_evaluation::PairSet`): a `.bin` pack with 10, an LFW list with its sets.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::loaded_model::LoadedModel;
use super::progress_bar as bar;
use anyhow::{bail, ensure, Context, Result};
use facerec_data::Fit;
use facerec_evaluation::ijb::{self, IjbMeta, IjbOptions};
use facerec_evaluation::report::{EvalReport, FileRef, TargetReport};
use facerec_evaluation::roc::{cosine_from_squared_distance, Roc, FAR_TARGETS};
use facerec_evaluation::{
    embed_with_flip, pair_distances, verify_distances, BinPack, LfwPairs, PairSet,
};
use tch::Tensor;

/// `facerec eval` options.
#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct Args {
    /// A run directory (config.toml + model.safetensors), a model `.safetensors` file, or a PyTorch
    /// `.pt`/`.pth` state dict (with `--config` naming its `[model]`).
    #[arg(long, value_name = "RUN_DIR|MODEL.safetensors|MODEL.pt")]
    pub model: PathBuf,
    /// The config holding the `[model]` table. Default: `config.toml` in the run directory, or beside
    /// the `.safetensors`/`.pt` file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// insightface verification pack (`lfw.bin`, `cfp_fp.bin`, ...); repeatable.
    #[arg(long = "bin", value_name = "FILE.bin")]
    pub bins: Vec<PathBuf>,
    /// LFW pair list (View 1 `N` or View 2 `10 300` layout); repeatable, each with an `--images`.
    #[arg(long = "pairs", value_name = "pairs.txt")]
    pub pairs: Vec<PathBuf>,
    /// Image folder `<Name>/<Name>_NNNN.<ext>` for the `--pairs` lists: one per list, or one for all.
    #[arg(long = "images", value_name = "DIR")]
    pub images: Vec<PathBuf>,
    /// IJB folder (`meta/`, `loose_crop/`); repeatable, each with a `--target`.
    #[arg(long = "ijb", value_name = "DIR")]
    pub ijb: Vec<PathBuf>,
    /// IJB target (`IJBB` or `IJBC`): one per `--ijb`, or one for all.
    #[arg(long = "target", value_name = "IJBB|IJBC")]
    pub targets: Vec<String>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// How images that are not `input_size` square are fitted: `stretch` or `center_crop`. Default: the
    /// run's `[input] fit` (what it was trained with; stretch when absent).
    #[arg(long, value_name = "stretch|center_crop")]
    pub fit: Option<Fit>,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Decoding threads and libtorch intra-op threads; 0 = all cores.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Output folder. Default: `<run dir>/eval-<UTC time>`, or `eval-<UTC time>` in the current folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// 1:N identification: the gallery, one sub-folder per identity (or a `path<TAB>label` list);
    /// with --probes.
    #[arg(long, value_name = "DIR", requires = "probes")]
    pub gallery: Option<PathBuf>,
    /// 1:N identification: the probes, labelled as the gallery; identities absent from the gallery
    /// are the open-set non-mated searches.
    #[arg(long, value_name = "DIR", requires = "gallery")]
    pub probes: Option<PathBuf>,
    /// IJB: the 1:N identification protocol (galleries G1, G2 against the mixed-media probes)
    /// instead of 1:1 verification.
    #[arg(long)]
    pub ijb_1n: bool,
    /// IJB: do not add the flipped image's embedding.
    #[arg(long)]
    pub ijb_no_flip: bool,
    /// IJB: L2-normalise every image feature (insightface `use_norm_score = False`).
    #[arg(long)]
    pub ijb_no_norm_score: bool,
    /// IJB: do not weight image features by the detector score.
    #[arg(long)]
    pub ijb_no_detector_score: bool,
}

/// Embed (flip test), verify with the pair set's folds, and compute the ROC of the cosine scores.
/// Returns (verification, XNorm, ROC).
fn verify_set(
    m: &LoadedModel,
    images: &Tensor,
    pairs: &PairSet,
    batch: usize,
    name: &str,
) -> Result<(facerec_evaluation::VerificationReport, f64, Roc)> {
    pairs.check().with_context(|| name.to_string())?;
    let pb = bar(
        2 * images.size()[0] as u64,
        format!("{name}: embedding (+flip)"),
    );
    let model = |x: &Tensor| {
        let out = m.embed(x);
        pb.inc(x.size()[0] as u64);
        out
    };
    let (emb, xnorm) = embed_with_flip(&model, images, batch as i64);
    pb.finish_and_clear();
    let dist = pair_distances(&emb, &pairs.pairs);
    let issame = pairs.issame();
    let report = verify_distances(&dist, &issame, pairs.folds);
    let roc = Roc::new(&cosine_from_squared_distance(&dist), &issame)
        .with_context(|| name.to_string())?;
    Ok((report, xnorm, roc))
}

fn stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

fn pick<'a, T>(list: &'a [T], i: usize, what: &str, of: &str) -> Result<&'a T> {
    match list.len() {
        0 => bail!("{of} needs {what}"),
        1 => Ok(&list[0]),
        n if i < n => Ok(&list[i]),
        n => bail!("{n} {what} for more {of} entries: give one for all or one per {of}"),
    }
}

/// Run `facerec eval`.
pub fn run(args: Args) -> Result<()> {
    check_args(&args)?;
    let (device, threads) = super::init_device(&args.device, args.threads)?;

    let mut m = LoadedModel::load(&args.model, args.config.as_deref(), device)?;
    if let Some(fit) = args.fit {
        if fit != m.fit {
            eprintln!("note: --fit {fit} differs from the run's [input] fit = {}: the model sees other geometry than in training", m.fit);
        }
        m.fit = fit;
    }
    let size = m.input_size();
    let out = match &args.out {
        Some(o) => {
            std::fs::create_dir_all(o).with_context(|| format!("creating {}", o.display()))?;
            o.clone()
        }
        None if args.model.is_dir() => crate::log::new_run_dir(&args.model, "eval")?,
        None => crate::log::new_run_dir(Path::new("."), "eval")?,
    };
    eprintln!(
        "model {} ({} input, fit {}, {:?}; {}); writing to {}",
        m.checkpoint.display(),
        size,
        m.fit,
        device,
        match &m.fold {
            Some(r) => r.to_string(),
            None => "BatchNorm folding off".into(),
        },
        out.display()
    );
    let mut targets = Vec::new();

    eval_bins(&args, &m, threads, &out, &mut targets)?;
    eval_pairs(&args, &m, threads, &out, &mut targets)?;
    eval_ijb(&args, &m, threads, &out, &mut targets)?;
    if let (Some(g), Some(p)) = (&args.gallery, &args.probes) {
        targets.push(super::identify::evaluate(
            &m,
            g,
            p,
            args.batch_size,
            threads,
            &out,
        )?);
        eprint!(
            "{}",
            targets
                .last()
                .and_then(|t| t.identification.as_ref())
                .map(|r| r.to_text())
                .unwrap_or_default()
        );
    }
    let config_ref = FileRef::new(&m.config_file).ok();
    let report = EvalReport {
        model: FileRef::new(&m.checkpoint)?,
        model_config: config_ref,
        options: serde_json::to_value(&args)?,
        device: format!("{device:?}"),
        targets,
    };
    report.write(&out)?;
    print!("{}", report.to_text());
    println!("\nreport: {}", out.join("report.txt").display());
    Ok(())
}

/// Refuse argument combinations that cannot be evaluated.
fn check_args(args: &Args) -> Result<()> {
    ensure!(
        !(args.bins.is_empty() && args.pairs.is_empty() && args.ijb.is_empty() && args.gallery.is_none()),
        "nothing to evaluate: give --bin FILE.bin, --pairs pairs.txt --images DIR, --ijb DIR --target IJBC, or --gallery DIR --probes DIR"
    );
    ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    if args.images.len() > 1 && args.images.len() != args.pairs.len() {
        bail!(
            "{} --images for {} --pairs: give one for all or one per list",
            args.images.len(),
            args.pairs.len()
        );
    }
    if args.targets.len() > 1 && args.targets.len() != args.ijb.len() {
        bail!(
            "{} --target for {} --ijb: give one for all or one per folder",
            args.targets.len(),
            args.ijb.len()
        );
    }
    Ok(())
}

/// The `--bin` packs.
fn eval_bins(
    args: &Args,
    m: &LoadedModel,
    threads: usize,
    out: &Path,
    targets: &mut Vec<TargetReport>,
) -> Result<()> {
    let size = m.input_size();
    for bin in &args.bins {
        let t0 = Instant::now();
        let name = stem(bin);
        let pack = BinPack::read(bin)?;
        let pb = bar(pack.images.len() as u64, format!("{name}: decoding"));
        let images = pack
            .decode(size, m.fit, threads, &|| pb.inc(1))
            .with_context(|| bin.display().to_string())?;
        pb.finish_and_clear();
        let (v, xnorm, roc) = verify_set(m, &images, &pack.pair_set(), args.batch_size, &name)?;
        targets.push(finish(
            &name,
            "bin",
            vec![FileRef::new(bin)?],
            None,
            images.size()[0] as usize,
            Some((v, xnorm)),
            &roc,
            out,
            t0,
        )?);
        eprint!("{}", last_text(targets));
    }

    Ok(())
}

/// The `--pairs` lists.
fn eval_pairs(
    args: &Args,
    m: &LoadedModel,
    threads: usize,
    out: &Path,
    targets: &mut Vec<TargetReport>,
) -> Result<()> {
    let size = m.input_size();
    for (i, pairs_file) in args.pairs.iter().enumerate() {
        let t0 = Instant::now();
        let name = stem(pairs_file);
        let dir = pick(&args.images, i, "an --images folder", "--pairs")?;
        let list = LfwPairs::read(pairs_file)?;
        let set = list
            .resolve(dir)
            .with_context(|| pairs_file.display().to_string())?;
        let pb = bar(set.images.len() as u64, format!("{name}: decoding"));
        let images = set.decode(size, m.fit, threads, &|| pb.inc(1))?;
        pb.finish_and_clear();
        let (v, xnorm, roc) = verify_set(m, &images, &set.pairs, args.batch_size, &name)?;
        targets.push(finish(
            &name,
            "pairs",
            vec![FileRef::new(pairs_file)?],
            Some(dir.clone()),
            set.images.len(),
            Some((v, xnorm)),
            &roc,
            out,
            t0,
        )?);
        eprint!("{}", last_text(targets));
    }

    Ok(())
}

/// The `--ijb` folders.
fn eval_ijb(
    args: &Args,
    m: &LoadedModel,
    threads: usize,
    out: &Path,
    targets: &mut Vec<TargetReport>,
) -> Result<()> {
    let size = m.input_size();
    let opts = IjbOptions {
        flip: !args.ijb_no_flip,
        norm_score: !args.ijb_no_norm_score,
        detector_score: !args.ijb_no_detector_score,
    };
    for (i, dir) in args.ijb.iter().enumerate() {
        let t0 = Instant::now();
        let target = pick(&args.targets, i, "a --target (IJBB or IJBC)", "--ijb")?;
        if args.ijb_1n {
            let reports =
                super::identify::evaluate_ijb_1n(m, dir, target, &opts, args.batch_size, threads)?;
            for r in reports {
                eprint!(
                    "{}: {}",
                    r.name,
                    r.identification
                        .as_ref()
                        .map(|i| i.to_text())
                        .unwrap_or_default()
                );
                targets.push(r);
            }
            continue;
        }
        let meta = IjbMeta::load(dir, target)?;
        let pb = bar(meta.faces.len() as u64, format!("{target}: align + embed"));
        let model = |x: &Tensor| m.embed(x);
        let res = ijb::evaluate(
            &model,
            &meta,
            size,
            &opts,
            args.batch_size as i64,
            threads,
            &|n| pb.inc(n),
        )?;
        pb.finish_and_clear();
        let files = meta
            .files
            .iter()
            .map(|f| FileRef::new(f))
            .collect::<Result<Vec<_>>>()?;
        let roc = res.curve.as_ref().expect("evaluate returns the curve");
        targets.push(finish(
            target,
            "ijb",
            files,
            Some(meta.image_dir.clone()),
            res.images,
            None,
            roc,
            out,
            t0,
        )?);
        eprint!("{}", last_text(targets));
    }

    Ok(())
}

fn last_text(targets: &[TargetReport]) -> String {
    let t = targets.last().expect("a target was just added");
    match (&t.verification, &t.roc) {
        (Some(v), _) => format!(
            "{}: Accuracy-Flip {:.5} +- {:.5}\n",
            t.name, v.accuracy_mean, v.accuracy_std
        ),
        (None, Some(r)) => format!(
            "{}: TAR@FAR=1e-4 {:.5}, TAR@FAR=1e-5 {:.5}\n",
            t.name, r.tar_at_far[2].tar, r.tar_at_far[1].tar
        ),
        _ => String::new(),
    }
}

#[allow(clippy::too_many_arguments)]
fn finish(
    name: &str,
    kind: &str,
    files: Vec<FileRef>,
    image_dir: Option<PathBuf>,
    images: usize,
    verification: Option<(facerec_evaluation::VerificationReport, f64)>,
    roc: &Roc,
    out: &Path,
    t0: Instant,
) -> Result<TargetReport> {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let plot = out.join(format!("roc-{safe}.png"));
    facerec_evaluation::plot::roc_png(&[(name, roc)], &format!("ROC {name}"), &plot)?;
    let (verification, xnorm) = match verification {
        Some((v, x)) => (Some(v), Some(x)),
        None => (None, None),
    };
    Ok(TargetReport {
        name: name.to_string(),
        kind: kind.to_string(),
        files,
        image_dir,
        images,
        verification,
        xnorm,
        roc: Some(roc.report(&FAR_TARGETS)),
        plot: Some(plot),
        seconds: t0.elapsed().as_secs_f64(),
        identification: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use facerec_backbone::BackboneConfig;
    use image::{Rgb, RgbImage};
    use tch::{nn, Device};

    /// A tiny run directory: config.toml with a small iResNet and its random weights.
    fn run_dir(dir: &Path) {
        let toml = "[model]\ntype = \"iresnet\"\nlayers = [1, 1, 1, 1]\nwidths = [4, 4, 8, 8]\nembedding_size = 16\ninput_size = 32\n";
        std::fs::write(dir.join("config.toml"), toml).unwrap();
        let cfg: BackboneConfig = toml::from_str::<toml::Table>(toml).unwrap()["model"]
            .clone()
            .try_into()
            .unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = facerec_backbone::build(&vs.root(), &cfg);
        vs.save(dir.join("model.safetensors")).unwrap();
    }

    fn face(seed: u32) -> RgbImage {
        RgbImage::from_fn(40, 40, |x, y| {
            Rgb([
                ((x * seed + y * 7) % 251) as u8,
                (y * 3) as u8,
                (seed * 13 % 256) as u8,
            ])
        })
    }

    /// Python 2 protocol-2 pickle of (list of str, list of bool), written by hand.
    fn py2_pack(bins: &[Vec<u8>], issame: &[bool]) -> Vec<u8> {
        let mut o = vec![0x80, 2, b']', b'('];
        for b in bins {
            o.push(b'T');
            o.extend((b.len() as i32).to_le_bytes());
            o.extend(b);
        }
        o.extend([b'e', b']', b'(']);
        o.extend(issame.iter().map(|&s| if s { 0x88 } else { 0x89 }));
        o.extend([b'e', 0x86, b'.']);
        o
    }

    #[test]
    fn evaluates_bin_and_pairs_targets_and_writes_reports() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("run")).unwrap();
        run_dir(&d.join("run"));
        // 20 pairs: genuine pairs are the same image, impostors different images.
        let (mut bins, mut issame) = (Vec::new(), Vec::new());
        for k in 0..20u32 {
            let same = k % 2 == 0;
            for img in [face(k + 1), face(if same { k + 1 } else { k + 40 })] {
                let mut buf = std::io::Cursor::new(Vec::new());
                img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
                bins.push(buf.into_inner());
            }
            issame.push(same);
        }
        std::fs::write(d.join("toy.bin"), py2_pack(&bins, &issame)).unwrap();
        // LFW layout: 10 people with 2 images each; View 1 list of 10 matched + 10 mismatched.
        let mut text = String::from("10\n");
        for k in 1..=10u32 {
            let p = d.join("lfw").join(format!("P{k}"));
            std::fs::create_dir_all(&p).unwrap();
            face(k).save(p.join(format!("P{k}_0001.png"))).unwrap();
            face(k).save(p.join(format!("P{k}_0002.png"))).unwrap();
            text.push_str(&format!("P{k} 1 2\n"));
        }
        for k in 1..=10u32 {
            text.push_str(&format!("P{k} 1 P{} 2\n", k % 10 + 1));
        }
        std::fs::write(d.join("pairs.txt"), text).unwrap();
        let args = Args {
            model: d.join("run"),
            config: None,
            bins: vec![d.join("toy.bin")],
            pairs: vec![d.join("pairs.txt")],
            images: vec![d.join("lfw")],
            ijb: vec![],
            targets: vec![],
            batch_size: 8,
            fit: None,
            device: "cpu".into(),
            threads: 1,
            out: Some(d.join("out")),
            gallery: None,
            probes: None,
            ijb_1n: false,
            ijb_no_flip: false,
            ijb_no_norm_score: false,
            ijb_no_detector_score: false,
        };
        run(args.clone()).unwrap();
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("out/report.json")).unwrap())
                .unwrap();
        let t = report["targets"].as_array().unwrap();
        assert_eq!(t.len(), 2);
        // Genuine pairs are identical images (distance 0, score 1), impostors are not: the ROC separates
        // them perfectly. (A random-weight model maps all faces close together, so the 0.01 threshold grid
        // of the accuracy protocol need not.)
        for target in t {
            let v = &target["verification"];
            assert_eq!(
                v["fold_accuracies"].as_array().unwrap().len(),
                10,
                "{target}"
            );
            assert!(v["accuracy_mean"].as_f64().unwrap() >= 0.5, "{target}");
            assert_eq!(target["roc"]["auc"].as_f64().unwrap(), 1.0, "{target}");
            assert_eq!(target["roc"]["tar_at_far"].as_array().unwrap().len(), 6);
            assert!(Path::new(target["plot"].as_str().unwrap()).is_file());
            assert_eq!(target["files"][0]["sha256"].as_str().unwrap().len(), 64);
        }
        assert_eq!(t[0]["images"], 40);
        assert_eq!(t[1]["images"], 20);
        assert!(std::fs::read_to_string(d.join("out/report.txt"))
            .unwrap()
            .contains("Accuracy-Flip"));
        // A missing checkpoint and an empty call are clear errors.
        let err = format!(
            "{:#}",
            run(Args {
                model: d.join("nope"),
                ..args.clone()
            })
            .unwrap_err()
        );
        assert!(err.contains("nope"), "{err}");
        let err = format!(
            "{:#}",
            run(Args {
                bins: vec![],
                pairs: vec![],
                ..args
            })
            .unwrap_err()
        );
        assert!(err.contains("nothing to evaluate"), "{err}");
    }
}
