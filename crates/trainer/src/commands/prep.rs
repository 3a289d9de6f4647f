//! `facerec prep`: data preparation without MXNet (issue 3, SPEC 6.1 and 6.3).
//!
//! - `prep pack --images DIR --out DIR [--quality Q] [--size S]`: an image folder (one sub-folder per
//!   identity) to insightface `train.rec` / `train.idx` / `property`.
//! - `prep check --rec DIR [--size S] [--size-policy resize|strict] [--fit stretch|center_crop]`: counts
//!   identities and images, checks the label range and the header record's class count, decodes every
//!   record as training would (by default: fitted to the size like `size_policy = "resize"`) and lists
//!   the bad ones with key and byte offset; fails when any is bad.
//! - `prep lfw --images DIR --pairs FILE --out FILE.bin`: an insightface-style verification pack from
//!   an LFW pairs file.
//!
//! The logic lives in `facerec-data`; this file parses arguments and prints.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use facerec_data::rec::{parse_property, rec_paths};
use facerec_data::verification_pack::{pack_pairs, LfwPackSummary};
use facerec_data::{
    pack_image_folder, BadRecordPolicy, ClassOrigin, Fit, PackOptions, RecLayout, RecOptions,
    RecordIo, SizePolicy, Source,
};
use facerec_evaluation::LfwPairs;

/// `facerec prep` arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: Prep,
}

#[derive(Subcommand, Debug)]
enum Prep {
    /// Align faces to the 112 x 112 ArcFace template from a landmark file (see `commands::align`).
    Align(super::align::Args),
    /// Pack an image folder (one sub-folder per identity) into train.rec, train.idx and property.
    Pack {
        /// Folder holding one sub-folder per identity.
        #[arg(long)]
        images: PathBuf,
        /// Output folder (created).
        #[arg(long)]
        out: PathBuf,
        /// JPEG quality 1..=100.
        #[arg(long, default_value_t = 95)]
        quality: u8,
        /// Resize every image to SIZE x SIZE (default: keep; all images must have one size).
        #[arg(long)]
        size: Option<usize>,
    },
    /// Check a RecordIO set: counts, label range, every record decoded; lists bad records.
    Check {
        /// A folder with train.rec / train.idx / property, or a .rec file.
        #[arg(long)]
        rec: PathBuf,
        /// Model input side to decode at (default: from `property`, else 112).
        #[arg(long)]
        size: Option<usize>,
        /// Images of another size: `resize` (fitted, as training's default `size_policy`) or `strict`
        /// (reported as bad records).
        #[arg(long, value_enum, default_value = "resize")]
        size_policy: CheckSizePolicy,
        /// How `resize` fits them (training's `input.fit`).
        #[arg(long, default_value = "stretch", value_name = "stretch|center_crop")]
        fit: Fit,
        /// Decoding threads (default: all cores).
        #[arg(long, default_value_t = 0)]
        workers: usize,
    },
    /// Build an insightface-style verification .bin from an LFW pairs file.
    Lfw {
        /// Folder with <Name>/<Name>_NNNN.{jpg,png,...}.
        #[arg(long)]
        images: PathBuf,
        /// LFW pairs file (`N` or `folds N` header, then `name i j` / `name1 i name2 j`).
        #[arg(long)]
        pairs: PathBuf,
        /// The .bin to write.
        #[arg(long)]
        out: PathBuf,
        /// JPEG quality for images that are not JPEG files already.
        #[arg(long, default_value_t = 95)]
        quality: u8,
        /// Resize non-JPEG images (and re-encode JPEGs) to SIZE x SIZE.
        #[arg(long)]
        size: Option<usize>,
    },
}

/// `prep check --size-policy`: the training source's `size_policy` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckSizePolicy {
    /// Fit other sizes to the input (training's default).
    Resize,
    /// Report other sizes as bad records.
    Strict,
}

/// Run `facerec prep ...`.
pub fn run(args: Args) -> Result<()> {
    let start = Instant::now();
    match args.command {
        Prep::Align(a) => super::align::run(a)?,
        Prep::Pack {
            images,
            out,
            quality,
            size,
        } => {
            let s = pack_image_folder(
                &images,
                &out,
                &PackOptions {
                    quality,
                    image_size: size,
                    workers: 0,
                },
            )?;
            println!(
                "packed {} images of {} identities ({}x{}, JPEG quality {quality}) into {} ({:.1} MB) in {:.1} s",
                s.images,
                s.identities,
                s.width,
                s.height,
                s.rec.display(),
                s.rec_bytes as f64 / 1e6,
                start.elapsed().as_secs_f64()
            );
        }
        Prep::Check {
            rec,
            size,
            size_policy,
            fit,
            workers,
        } => {
            let size_policy = match size_policy {
                CheckSizePolicy::Resize => SizePolicy::Resize,
                CheckSizePolicy::Strict => SizePolicy::Strict,
            };
            check(&rec, size, size_policy, fit, workers, start)?
        }
        Prep::Lfw {
            images,
            pairs,
            out,
            quality,
            size,
        } => {
            let s = pack_lfw(&images, &pairs, &out, quality, size)?;
            println!(
                "wrote {}: {} pairs ({} same, {} different) from {} image files in {:.1} s",
                out.display(),
                s.pairs,
                s.positives,
                s.pairs - s.positives,
                s.files,
                start.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

fn check(
    path: &std::path::Path,
    size: Option<usize>,
    size_policy: SizePolicy,
    fit: Fit,
    workers: usize,
    start: Instant,
) -> Result<()> {
    let (_, _, prop) = rec_paths(path);
    let property = std::fs::read_to_string(&prop)
        .ok()
        .and_then(|t| parse_property(&t));
    let size = size.or(property.map(|p| p.1)).unwrap_or(112);
    let set = RecordIo::open(
        path,
        size,
        RecOptions {
            policy: BadRecordPolicy::Skip,
            size: size_policy,
            fit,
            // List every bad record, however many.
            max_skipped_fraction: 1.0,
        },
    )?;
    let workers = if workers == 0 {
        facerec_data::cores()
    } else {
        workers
    };
    match set.layout() {
        RecLayout::Insightface { identities, header_range } => println!(
            "layout: insightface (header record 0: images 1..{}, identity records {}..{}; {identities} identity records in the .idx)",
            header_range.0, header_range.0, header_range.1
        ),
        RecLayout::Plain => println!("layout: plain (no header record; every key is an image)"),
    }
    let mut per_class = vec![0usize; set.num_classes()];
    (0..set.len()).for_each(|i| per_class[set.label(i)] += 1);
    let used = per_class.iter().filter(|&&n| n > 0).count();
    let (lo, hi) = (0..set.len())
        .map(|i| set.label(i))
        .fold((usize::MAX, 0), |(a, b), l| (a.min(l), b.max(l)));
    let origin = match set.class_origin() {
        ClassOrigin::Property => "from property",
        ClassOrigin::Header => "from the header record",
        ClassOrigin::IdentityRecords => {
            "from the .idx identity records; the header record's count was refused"
        }
        ClassOrigin::Labels => "from the largest label",
    };
    println!(
        "images: {}; num_classes: {} ({origin}; {used} with images); labels {lo}..={hi}; images per identity {}..={}",
        set.len(),
        set.num_classes(),
        per_class.iter().filter(|&&n| n > 0).min().unwrap_or(&0),
        per_class.iter().max().unwrap_or(&0)
    );
    let mut bad = set.bad_records().to_vec();
    bad.extend(set.check_all(workers));
    let how = match size_policy {
        SizePolicy::Resize => {
            format!("other sizes fitted by {fit}, as training with size_policy = \"resize\"")
        }
        SizePolicy::Strict => "other sizes are bad records (size policy: strict)".to_string(),
    };
    println!(
        "decoded {} records at {size}x{size} ({how}) with {workers} threads in {:.1} s",
        set.len(),
        start.elapsed().as_secs_f64()
    );
    if bad.is_empty() {
        println!("no bad records");
        return Ok(());
    }
    for b in &bad {
        println!(
            "bad record: key {} at byte {}: {}",
            b.key, b.offset, b.reason
        );
    }
    bail!("{}: {} bad records", set.rec_path().display(), bad.len())
}

/// `prep lfw`: resolve an LFW pairs file over `images` (View 1 or View 2) into the order whose 10
/// contiguous folds (how a pack is read) each hold a tenth of the matched and of the mismatched pairs,
/// and write the pairs as an insightface `.bin` (see `facerec_data::verification_pack`).
pub fn pack_lfw(
    images: &Path,
    pairs_file: &Path,
    out: &Path,
    quality: u8,
    size: Option<usize>,
) -> Result<LfwPackSummary> {
    // A pack carries no sets: it is always read with 10 contiguous folds, so the pairs are ordered
    // for 10 folds that each hold both kinds (View 1 and View 2 files keep their usual order; a list
    // of 5 sets is interleaved instead of giving folds of one kind).
    let list = LfwPairs::read(pairs_file)?;
    let folds = facerec_evaluation::PROTOCOL_FOLDS
        .min(list.matched())
        .min(list.pairs.len() - list.matched())
        .max(1);
    let set = list
        .resolve_with_folds(images, folds)
        .with_context(|| format!("pairs file {}", pairs_file.display()))?;
    let pairs: Vec<(usize, usize, bool)> =
        set.pairs.pairs.iter().map(|p| (p.a, p.b, p.same)).collect();
    pack_pairs(&set.images, &pairs, out, quality, size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        prep: Prep,
    }

    fn prep(args: &[&str]) -> Result<()> {
        let cli = Cli::try_parse_from(std::iter::once("prep").chain(args.iter().copied()))?;
        run(Args { command: cli.prep })
    }

    #[test]
    fn pack_then_check_then_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let (images, out) = (dir.path().join("images"), dir.path().join("rec"));
        for c in 0..2u8 {
            std::fs::create_dir_all(images.join(format!("p{c}"))).unwrap();
            for j in 0..2u8 {
                image::RgbImage::from_pixel(20, 20, image::Rgb([40 * c, 60 * j, 90]))
                    .save(images.join(format!("p{c}/{j}.png")))
                    .unwrap();
            }
        }
        let s = |p: &PathBuf| p.to_str().unwrap().to_string();
        prep(&[
            "pack",
            "--images",
            &s(&images),
            "--out",
            &s(&out),
            "--quality",
            "90",
        ])
        .unwrap();
        prep(&["check", "--rec", &s(&out)]).unwrap();
        // Garble the JPEG of the last image (key 4): its record's content no longer decodes.
        let idx = std::fs::read_to_string(out.join("train.idx")).unwrap();
        let offset: usize = idx
            .lines()
            .nth(4)
            .unwrap()
            .split('\t')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let mut rec = std::fs::read(out.join("train.rec")).unwrap();
        rec[offset + 8 + 24 + 2..offset + 8 + 24 + 40].fill(0xAB);
        std::fs::write(out.join("train.rec"), rec).unwrap();
        let err = format!("{:#}", prep(&["check", "--rec", &s(&out)]).unwrap_err());
        assert!(err.contains("1 bad records"), "{err}");
    }

    /// A pack of non-square images (ORL is 92 x 112) passes `check` as it trains: fitted to the
    /// input like `size_policy = "resize"` (it used to fail every record as "expected 112x112 (size
    /// policy: strict)"); `--size-policy strict` still reports them.
    #[test]
    fn non_square_pack_checks_like_training() {
        let dir = tempfile::tempdir().unwrap();
        let (images, out) = (dir.path().join("images"), dir.path().join("rec"));
        for c in 0..2u8 {
            std::fs::create_dir_all(images.join(format!("p{c}"))).unwrap();
            for j in 0..2u8 {
                image::RgbImage::from_pixel(23, 28, image::Rgb([40 * c, 60 * j, 90]))
                    .save(images.join(format!("p{c}/{j}.png")))
                    .unwrap();
            }
        }
        let s = |p: &PathBuf| p.to_str().unwrap().to_string();
        prep(&["pack", "--images", &s(&images), "--out", &s(&out)]).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("property"))
                .unwrap()
                .trim(),
            "2,28,23"
        );
        prep(&["check", "--rec", &s(&out)]).unwrap();
        prep(&[
            "check",
            "--rec",
            &s(&out),
            "--fit",
            "center_crop",
            "--size",
            "16",
        ])
        .unwrap();
        let err = format!(
            "{:#}",
            prep(&["check", "--rec", &s(&out), "--size-policy", "strict"]).unwrap_err()
        );
        assert!(err.contains("4 bad records"), "{err}");
    }

    /// A header record claiming 999,999,616 identities with no property file is reported by `check`
    /// (it used to print "no bad records", and training then panicked allocating 512 GB).
    #[test]
    fn implausible_header_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (images, out) = (dir.path().join("images"), dir.path().join("rec"));
        for c in 0..2u8 {
            std::fs::create_dir_all(images.join(format!("p{c}"))).unwrap();
            for j in 0..2u8 {
                image::RgbImage::from_pixel(8, 8, image::Rgb([40 * c, 60 * j, 90]))
                    .save(images.join(format!("p{c}/{j}.png")))
                    .unwrap();
            }
        }
        let s = |p: &PathBuf| p.to_str().unwrap().to_string();
        prep(&["pack", "--images", &s(&images), "--out", &s(&out)]).unwrap();
        // Record 0 (offset 0): 8 bytes magic + length, 24 bytes IRHeader, then labels [id_start, id_end].
        let mut rec = std::fs::read(out.join("train.rec")).unwrap();
        let id_start = f32::from_le_bytes(rec[32..36].try_into().unwrap());
        assert_eq!(id_start, 5.0, "header of a 4-image pack");
        rec[36..40].copy_from_slice(&(id_start + 999_999_616.0).to_le_bytes());
        std::fs::write(out.join("train.rec"), rec).unwrap();
        std::fs::remove_file(out.join("property")).unwrap();
        let err = format!(
            "{:#}",
            prep(&["check", "--rec", &s(&out), "--size", "8"]).unwrap_err()
        );
        assert!(err.contains("1 bad records"), "{err}");
    }
}
