//! `facerec prep align`: crop faces to the arcface_torch 112 x 112 template by a 5-point similarity
//! transform (`facerec_data::align`), from a landmark file (5-point, or the LFW funneled 9-point
//! layout), into an image folder or an insightface `.rec`.
//!
//! Every landmark line and every image is checked before anything is written: a line with a missing
//! or extra column fails naming the file and line, a missing image fails naming it (and the landmark
//! line that lists it). Output goes to a temporary path beside `--out` and is renamed into place at
//! the end, so a failed run leaves nothing half-written under the requested name.
//!
//! Channels: RGB in, RGB out (see `facerec_data::align`); gray images come out as RGB with three equal
//! channels, as the one image path would feed them to a model. A folder output keeps each image's
//! relative path with the extension `.png` (lossless); a `.rec` output is packed by
//! `facerec_data::pack_image_folder` (JPEG at `--quality`), which needs one sub-folder per identity
//! in the paths (`Name/Name_0001.jpg`, as LFW).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use facerec_data::align::{align, read_landmarks, LandmarkEntry, LandmarkLayout};
use facerec_data::{pack_image_folder, PackOptions};

/// `facerec prep align` options.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Landmark file: `path x0 y0 ... ` per line (tab or space separated; an optional header line).
    #[arg(long)]
    pub landmarks: PathBuf,
    /// Folder the landmark paths are relative to.
    #[arg(long)]
    pub images: PathBuf,
    /// Output: a folder (aligned PNGs, same relative paths) or a `FILE.rec` (with `FILE.idx` and
    /// `property` beside it). Must not exist yet.
    #[arg(long, value_name = "DIR|FILE.rec")]
    pub out: PathBuf,
    /// Landmark layout: `5` (eyes, nose, mouth corners) or `lfw9` (the LFW funneled 9 points).
    /// Default: from the column count (11 or 19).
    #[arg(long, value_name = "5|lfw9")]
    pub layout: Option<LandmarkLayout>,
    /// Side of the aligned square (the template is scaled by SIZE / 112).
    #[arg(long, default_value_t = 112)]
    pub size: u32,
    /// JPEG quality of a `.rec` output.
    #[arg(long, default_value_t = 95)]
    pub quality: u8,
    /// Threads; 0 = all cores.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// The aligned image's path inside the output folder: the landmark path with extension `.png`.
fn out_name(entry: &LandmarkEntry) -> PathBuf {
    Path::new(&entry.path).with_extension("png")
}

/// Read, align and write every entry into `dir` (which exists), on `threads` threads. The error of
/// the lowest failing line is returned.
pub fn align_into(
    entries: &[LandmarkEntry],
    images: &Path,
    dir: &Path,
    size: u32,
    threads: usize,
    tick: &(dyn Fn() + Sync),
) -> Result<()> {
    let next = AtomicUsize::new(0);
    let first_err: Mutex<Option<(usize, anyhow::Error)>> = Mutex::new(None);
    let work = |e: &LandmarkEntry| -> Result<()> {
        let src = images.join(&e.path);
        let img = facerec_data::input::read(&src)?;
        let out =
            align(&img, &e.points, size).with_context(|| format!("aligning {}", src.display()))?;
        let dst = dir.join(out_name(e));
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        out.save(&dst)
            .with_context(|| format!("writing {}", dst.display()))
    };
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= entries.len() || first_err.lock().expect("lock").is_some() {
                    break;
                }
                if let Err(err) = work(&entries[i]) {
                    let mut slot = first_err.lock().expect("lock");
                    if slot.as_ref().is_none_or(|(j, _)| i < *j) {
                        *slot = Some((i, err));
                    }
                }
                tick();
            });
        }
    });
    match first_err.into_inner().expect("lock") {
        Some((_, err)) => Err(err),
        None => Ok(()),
    }
}

/// Run `facerec prep align`.
pub fn run(args: Args) -> Result<()> {
    let t0 = Instant::now();
    ensure!(args.size > 0, "--size must be at least 1");
    let (layout, entries) = read_landmarks(&args.landmarks, args.layout)?;
    // Every image must be there before anything is written.
    for e in &entries {
        let p = args.images.join(&e.path);
        ensure!(
            p.is_file(),
            "image {} does not exist (listed on {}:{})",
            p.display(),
            args.landmarks.display(),
            e.line
        );
    }
    let threads = match args.threads {
        0 => facerec_data::cores(),
        t => t,
    };
    let is_rec = args.out.extension().is_some_and(|x| x == "rec");
    let parent = match args.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let rec_files = facerec_data::rec::rec_paths(&args.out);
    let targets: Vec<PathBuf> = if is_rec {
        vec![
            rec_files.0.clone(),
            rec_files.1.clone(),
            rec_files.2.clone(),
        ]
    } else {
        vec![args.out.clone()]
    };
    for t in &targets {
        ensure!(
            !t.exists(),
            "{} exists already: remove it or choose another --out",
            t.display()
        );
    }
    let tmp = tempfile::Builder::new()
        .prefix(".align-partial-")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a temporary folder in {}", parent.display()))?;
    let aligned = tmp.path().join("aligned");
    std::fs::create_dir_all(&aligned)?;
    let pb = super::progress_bar(entries.len() as u64, "aligning".into());
    align_into(
        &entries,
        &args.images,
        &aligned,
        args.size,
        threads,
        &|| pb.inc(1),
    )?;
    pb.finish_and_clear();
    if is_rec {
        let packed = tmp.path().join("packed");
        let s = pack_image_folder(
            &aligned,
            &packed,
            &PackOptions {
                quality: args.quality,
                image_size: None,
                workers: threads,
            },
        )
        .with_context(|| format!("packing the aligned images into {}", args.out.display()))?;
        for (from, to) in [
            (packed.join("train.rec"), &rec_files.0),
            (packed.join("train.idx"), &rec_files.1),
            (packed.join("property"), &rec_files.2),
        ] {
            std::fs::rename(&from, to)
                .with_context(|| format!("renaming {} to {}", from.display(), to.display()))?;
        }
        println!(
            "aligned {} faces ({layout:?} landmarks) of {} identities to {}x{} into {} in {:.1} s",
            s.images,
            s.identities,
            args.size,
            args.size,
            args.out.display(),
            t0.elapsed().as_secs_f64()
        );
    } else {
        if let Err(e) = std::fs::rename(&aligned, &args.out) {
            bail!(
                "renaming {} to {}: {e}",
                aligned.display(),
                args.out.display()
            );
        }
        println!(
            "aligned {} faces ({layout:?} landmarks) to {}x{} into {} in {:.1} s",
            entries.len(),
            args.size,
            args.size,
            args.out.display(),
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
