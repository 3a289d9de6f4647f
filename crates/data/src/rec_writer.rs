//! Packing an image folder (`root/<identity>/<image>`) into an insightface RecordIO set: `train.rec`,
//! `train.idx` and `property` in the layout of insightface's `RecBuilder` (SPEC 6.3), which
//! arcface_torch's `MXFaceDataset` and [`crate::RecordIo`] read.
//!
//! Layout written: record 0 is the header (`flag = 2`, labels `[N + 1, N + 1 + I]`, `id = 0`,
//! `id2 = 1`, no content); keys `1..=N` are the images in [`crate::ImageFolder`] order (identities in
//! natural order, images in natural order within each), each `flag = 0`, `label = identity index`,
//! `id = key`, content a baseline JPEG of the RGB image at the given quality (gray images are stored as
//! 3-channel JPEGs, as insightface's packs are); keys `N + 1..N + 1 + I` are the identity records
//! (`flag = 2`, labels `[first key, end key)`). `property` is `I,H,W`. The files are written under
//! temporary names and renamed when complete.
//!
//! Differences from insightface's tool: images are decoded and re-encoded (never copied as-is), so one
//! quality applies to all; every image must have the size of the first (or `image_size` resizes all).

use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};

use crate::image_folder::ImageFolder;
use crate::recordio::{encode_payload, IrHeader, RecordWriter};
use crate::source::Source;
use crate::threads::{cores, par_map};

/// Options of [`pack_image_folder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackOptions {
    /// JPEG quality 1..=100. Default 95.
    pub quality: u8,
    /// Resize every image to this square side. Default `None`: keep sizes (all must be equal).
    pub image_size: Option<usize>,
    /// Encoding threads; 0 = all cores. Default 0.
    pub workers: usize,
}

impl Default for PackOptions {
    fn default() -> Self {
        Self {
            quality: 95,
            image_size: None,
            workers: 0,
        }
    }
}

/// What [`pack_image_folder`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackSummary {
    /// Identity folders (classes).
    pub identities: usize,
    /// Image records.
    pub images: usize,
    /// Image height and width.
    pub height: usize,
    /// Image width.
    pub width: usize,
    /// The `.rec` file.
    pub rec: PathBuf,
    /// Size of the `.rec` in bytes.
    pub rec_bytes: u64,
}

/// Encode RGB pixels (HWC) as a baseline JPEG at `quality`.
pub fn encode_jpeg(rgb: &[u8], width: usize, height: usize, quality: u8) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
        .encode(
            rgb,
            width as u32,
            height as u32,
            image::ExtendedColorType::Rgb8,
        )
        .context("encoding JPEG")?;
    Ok(out)
}

/// Read any supported image file as RGB through the one image path ([`crate::input`]), optionally
/// fitted to a square side (stretch).
pub(crate) fn read_rgb(path: &Path, size: Option<usize>) -> Result<image::RgbImage> {
    let img = crate::input::read(path)?;
    match size {
        Some(s) => crate::input::fit(img, s, crate::input::Fit::Stretch)
            .with_context(|| format!("image {}", path.display())),
        None => Ok(img),
    }
}

/// Pack `images` (one folder per identity, see [`ImageFolder`]) into `out/train.rec`, `out/train.idx`
/// and `out/property`. Fails naming the folder or file on an empty identity folder, an unreadable
/// image or an image whose size differs from the first.
pub fn pack_image_folder(images: &Path, out: &Path, opts: &PackOptions) -> Result<PackSummary> {
    ensure!(
        (1..=100).contains(&opts.quality),
        "JPEG quality must be in 1..=100, got {}",
        opts.quality
    );
    let folder = ImageFolder::open(images, 1, None)?;
    let (n, identities) = (folder.len(), folder.num_classes());
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let rec_path = out.join("train.rec");
    let idx_path = out.join("train.idx");
    let tmp_rec = out.join(".train.rec.partial");
    let tmp_idx = out.join(".train.idx.partial");
    let file = std::fs::File::create(&tmp_rec)
        .with_context(|| format!("creating {}", tmp_rec.display()))?;
    let mut rec = RecordWriter::new(BufWriter::with_capacity(1 << 20, file));
    let mut idx = String::new();
    let io_err = |e: std::io::Error| {
        anyhow::Error::from(e).context(format!("writing {}", tmp_rec.display()))
    };

    let (id_start, id_end) = (n as u64 + 1, (n + identities) as u64 + 1);
    let header = IrHeader::meta(vec![id_start as f32, id_end as f32], 0, 1);
    let offset = rec.write(&encode_payload(&header, &[])).map_err(io_err)?;
    idx.push_str(&format!("0\t{offset}\n"));

    let threads = if opts.workers == 0 {
        cores()
    } else {
        opts.workers
    };
    let mut size: Option<(u32, u32)> = None;
    const CHUNK: usize = 512;
    for lo in (0..n).step_by(CHUNK) {
        let hi = (lo + CHUNK).min(n);
        let encoded = par_map(hi - lo, threads, |j| -> Result<(Vec<u8>, (u32, u32))> {
            let path = folder.path(lo + j);
            let img = read_rgb(path, opts.image_size)?;
            let dims = img.dimensions();
            let jpeg = encode_jpeg(img.as_raw(), dims.0 as usize, dims.1 as usize, opts.quality)
                .with_context(|| format!("encoding {}", path.display()))?;
            Ok((jpeg, dims))
        });
        for (j, item) in encoded.into_iter().enumerate() {
            let (jpeg, dims) = item?;
            let first = *size.get_or_insert(dims);
            ensure!(
                dims == first,
                "{} is {}x{} but the first image is {}x{}; pass an image size to resize all",
                folder.path(lo + j).display(),
                dims.0,
                dims.1,
                first.0,
                first.1
            );
            let key = (lo + j) as u64 + 1;
            let header = IrHeader::image(folder.label(lo + j) as u32, key);
            let offset = rec.write(&encode_payload(&header, &jpeg)).map_err(io_err)?;
            idx.push_str(&format!("{key}\t{offset}\n"));
        }
    }
    // Identity records: class c holds keys [first, end) (ImageFolder lists classes contiguously).
    let mut counts = vec![0u64; identities];
    (0..n).for_each(|i| counts[folder.label(i)] += 1);
    let mut first = 1u64;
    for (c, &count) in counts.iter().enumerate() {
        let key = id_start + c as u64;
        let header = IrHeader::meta(vec![first as f32, (first + count) as f32], key, 0);
        let offset = rec.write(&encode_payload(&header, &[])).map_err(io_err)?;
        idx.push_str(&format!("{key}\t{offset}\n"));
        first += count;
    }
    let rec_bytes = rec.position();
    rec.finish()
        .map_err(io_err)?
        .into_inner()
        .map_err(|e| io_err(e.into_error()))?
        .sync_all()
        .map_err(io_err)?;
    std::fs::write(&tmp_idx, idx).with_context(|| format!("writing {}", tmp_idx.display()))?;
    let (w, h) = size.unwrap_or((0, 0));
    let prop = out.join("property");
    std::fs::write(&prop, format!("{identities},{h},{w}"))
        .with_context(|| format!("writing {}", prop.display()))?;
    std::fs::rename(&tmp_rec, &rec_path)
        .with_context(|| format!("renaming to {}", rec_path.display()))?;
    std::fs::rename(&tmp_idx, &idx_path)
        .with_context(|| format!("renaming to {}", idx_path.display()))?;
    Ok(PackSummary {
        identities,
        images: n,
        height: h as usize,
        width: w as usize,
        rec: rec_path,
        rec_bytes,
    })
}
