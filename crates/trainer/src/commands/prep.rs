//! `facerec prep`: data preparation without MXNet (issue 3, SPEC 6.1 and 6.3).
//!
//! - `prep pack --images DIR --out DIR [--quality Q] [--size S]`: an image folder (one sub-folder per
//!   identity) to insightface `train.rec` / `train.idx` / `property`.
//! - `prep check --rec DIR [--size S]`: counts identities and images, checks the label range, decodes
//!   every record and lists the bad ones with key and byte offset; fails when any is bad.
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
    pack_image_folder, BadRecordPolicy, PackOptions, RecLayout, RecOptions, RecordIo, SizePolicy,
    Source,
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
        /// Expected image side (default: from `property`, else 112). Other sizes are reported.
        #[arg(long)]
        size: Option<usize>,
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

/// Run `facerec prep ...`.
pub fn run(args: Args) -> Result<()> {
    let start = Instant::now();
    match args.command {
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
        Prep::Check { rec, size, workers } => check(&rec, size, workers, start)?,
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
            size: SizePolicy::Strict,
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
    println!(
        "images: {}; num_classes: {} ({used} with images); labels {lo}..={hi}; images per identity {}..={}",
        set.len(),
        set.num_classes(),
        per_class.iter().filter(|&&n| n > 0).min().unwrap_or(&0),
        per_class.iter().max().unwrap_or(&0)
    );
    let mut bad = set.bad_records().to_vec();
    bad.extend(set.check_all(workers));
    println!(
        "decoded {} records at {size}x{size} with {workers} threads in {:.1} s",
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
}

/// `prep lfw`: resolve an LFW pairs file over `images` (View 1 or View 2) into the protocol's fold
/// order and write the pairs as an insightface `.bin` (see `facerec_data::verification_pack`).
pub fn pack_lfw(
    images: &Path,
    pairs_file: &Path,
    out: &Path,
    quality: u8,
    size: Option<usize>,
) -> Result<LfwPackSummary> {
    let set = LfwPairs::read(pairs_file)
        .and_then(|p| p.resolve(images))
        .with_context(|| format!("pairs file {}", pairs_file.display()))?;
    let pairs: Vec<(usize, usize, bool)> = set.pairs.iter().map(|p| (p.a, p.b, p.same)).collect();
    pack_pairs(&set.images, &pairs, out, quality, size)
}
