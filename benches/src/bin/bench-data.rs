//! `cargo xtask bench-data`: images/second through decode + flip + normalise + batch, our [`Loader`] over
//! a [`RecordIo`] against the Python reference (`data-scripts/bench_data_reference.py`: PIL decode in a
//! torch DataLoader with the same worker count, reading the same `.rec`), measured in the same run.
//!
//! LFW (`../shared/data/lfw_gray_112_aligned.tar.gz`, 13,233 images of 112x112) is unpacked under
//! `target/shared-data` and packed once into `target/bench-data/lfw-rec` (RGB JPEG, quality 95). Both
//! pipelines run one warm-up epoch, then `--epochs` timed epochs of `--batch` images (drop_last,
//! shuffled, random flip), ending in a `[B,3,112,112]` float tensor in [-1, 1] per batch on the CPU.
//! libtorch gets one intra-op thread in both (the normalisation is the only torch work).
//!
//! When `import PIL` fails in `$FACEREC_PYTHON`, Pillow is installed with pip into
//! `target/bench-data/python` (put on `PYTHONPATH` for the reference only).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use facerec_data::{
    pack_image_folder, shared_data, AugmentConfig, Loader, LoaderConfig, PackOptions, RecOptions,
    RecordIo, Source,
};
use tch::Device;

#[derive(Parser)]
#[command(
    about = "RecordIO loading throughput: facerec Loader vs a PIL + torch DataLoader reference"
)]
struct Args {
    /// Decoding workers (threads for us, processes for the reference).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Batch size.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Timed epochs (after one warm-up epoch).
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    /// JPEG quality of the packed set.
    #[arg(long, default_value_t = 95)]
    quality: u8,
    /// Only our loader.
    #[arg(long)]
    skip_python: bool,
    /// Also time our loader with each `[augment]` operation at probability 1 (and all of them at
    /// 0.5), one epoch each, and print the cost against no augmentation.
    #[arg(long)]
    augment: bool,
}

fn main() -> Result<()> {
    // facerec's process settings (allocator, OpenMP wait policy), as the trainer runs.
    facerec_process::init()?;
    let args = Args::parse();
    let ws = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()?;
    let Some(data) = shared_data::locate(&ws) else {
        bail!("the shared data folder (../shared/data or $FACEREC_SHARED_DATA) is needed for LFW")
    };
    let lfw = shared_data::unpack(
        &data,
        "lfw_gray_112_aligned.tar.gz",
        &ws.join("target/shared-data"),
    )?;
    let rec_dir = ws.join(format!("target/bench-data/lfw-rec-q{}", args.quality));
    if !rec_dir.join("train.idx").exists() {
        let t = Instant::now();
        let s = pack_image_folder(
            &lfw,
            &rec_dir,
            &PackOptions {
                quality: args.quality,
                ..Default::default()
            },
        )?;
        println!(
            "packed {} images of {} identities into {} ({:.1} MB) in {:.1} s",
            s.images,
            s.identities,
            s.rec.display(),
            s.rec_bytes as f64 / 1e6,
            t.elapsed().as_secs_f64()
        );
    }

    tch::set_num_threads(1);
    let set = Arc::new(RecordIo::open(&rec_dir, 112, RecOptions::default())?);
    let n = set.len();
    let base = LoaderConfig {
        batch_size: args.batch,
        workers: args.workers,
        prefetch: 4,
        ..Default::default()
    };
    let images_per_sec = |cfg: LoaderConfig, epochs: usize| -> Result<f64> {
        let loader = Loader::new(set.clone(), cfg);
        let run_epoch = |e: usize| -> Result<usize> {
            let mut images = 0;
            for batch in loader.epoch(e, 0) {
                let (x, _) = batch?.to_tensors(Device::Cpu);
                images += x.size()[0] as usize;
            }
            Ok(images)
        };
        run_epoch(0)?;
        let t = Instant::now();
        let images: usize = (1..=epochs).map(run_epoch).sum::<Result<usize>>()?;
        Ok(images as f64 / t.elapsed().as_secs_f64())
    };
    let ours = images_per_sec(base.clone(), args.epochs)?;
    let cores = facerec_data::cores();
    println!(
        "facerec Loader (zune-jpeg, {} workers, batch {}, {n} images, {cores} cores): {ours:.0} images/s",
        args.workers, args.batch
    );
    if args.augment {
        for (name, augment) in augment_cases() {
            let rate = images_per_sec(
                LoaderConfig {
                    augment,
                    ..base.clone()
                },
                1,
            )?;
            println!(
                "  with augment {name:<22} {rate:>6.0} images/s ({:.2}x the time of no augmentation)",
                ours / rate
            );
        }
    }
    if args.skip_python {
        return Ok(());
    }

    let py = python()?;
    let mut cmd = Command::new(&py);
    if let Some(dir) = pillow_path(&py, &ws)? {
        cmd.env("PYTHONPATH", dir);
    }
    let out = cmd
        .arg(ws.join("data-scripts/bench_data_reference.py"))
        .args(["--rec", rec_dir.to_str().context("non-UTF-8 path")?])
        .args([
            "--workers",
            &args.workers.to_string(),
            "--batch",
            &args.batch.to_string(),
        ])
        .args(["--epochs", &args.epochs.to_string()])
        .output()
        .context("running bench_data_reference.py")?;
    if !out.status.success() {
        bail!(
            "bench_data_reference.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("reading the reference's JSON")?;
    let theirs = v["images_per_sec"].as_f64().context("images_per_sec")?;
    println!(
        "Python reference ({} decode, torch DataLoader, {} workers, batch {}): {theirs:.0} images/s",
        v["decoder"].as_str().unwrap_or("?"),
        args.workers,
        args.batch
    );
    println!("ratio facerec / reference: {:.2}x", ours / theirs);
    Ok(())
}

/// Each augmentation alone at probability 1 (default ranges), then all at 0.5.
fn augment_cases() -> Vec<(&'static str, AugmentConfig)> {
    let one = |set: fn(&mut AugmentConfig)| {
        let mut c = AugmentConfig::default();
        set(&mut c);
        c
    };
    vec![
        ("crop_p = 1", one(|c| c.crop_p = 1.0)),
        ("low_res_p = 1", one(|c| c.low_res_p = 1.0)),
        ("blur_p = 1", one(|c| c.blur_p = 1.0)),
        ("color_p = 1", one(|c| c.color_p = 1.0)),
        ("grayscale_p = 1", one(|c| c.grayscale_p = 1.0)),
        ("erase_p = 1", one(|c| c.erase_p = 1.0)),
        (
            "all at p = 0.5",
            one(|c| {
                c.crop_p = 0.5;
                c.low_res_p = 0.5;
                c.blur_p = 0.5;
                c.color_p = 0.5;
                c.grayscale_p = 0.5;
                c.erase_p = 0.5;
            }),
        ),
    ]
}

fn python() -> Result<PathBuf> {
    match std::env::var_os("FACEREC_PYTHON") {
        Some(p) if Path::new(&p).exists() => Ok(PathBuf::from(p)),
        _ => bail!("FACEREC_PYTHON is not set (run through `cargo xtask bench-data`), or pass --skip-python"),
    }
}

/// `None` when `import PIL` works as is; else Pillow installed by pip into `target/bench-data/python`.
fn pillow_path(py: &Path, ws: &Path) -> Result<Option<PathBuf>> {
    let imports = |path: Option<&Path>| {
        let mut c = Command::new(py);
        if let Some(p) = path {
            c.env("PYTHONPATH", p);
        }
        c.args(["-c", "import PIL"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if imports(None) {
        return Ok(None);
    }
    let dir = ws.join("target/bench-data/python");
    if !imports(Some(&dir)) {
        println!(
            "PIL is not importable; installing Pillow with pip into {}",
            dir.display()
        );
        let status = Command::new(py)
            .args(["-m", "pip", "install", "--quiet", "--target"])
            .arg(&dir)
            .arg("pillow")
            .status()
            .context("running pip")?;
        if !status.success() || !imports(Some(&dir)) {
            bail!("could not install Pillow for the reference; rerun with --skip-python");
        }
    }
    Ok(Some(dir))
}
