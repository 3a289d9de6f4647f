//! [`RecordIo`]: insightface / MXNet RecordIO training sets (`train.rec` + `train.idx` + `property`) as a
//! [`Source`], without MXNet (SPEC 6.3).
//!
//! The `.rec` is memory-mapped; the `.idx` maps keys to byte offsets (without an `.idx` the file is
//! scanned front to back). Layouts:
//! - insightface (`RecBuilder`, MS1M / Glint / WebFace packs): record 0 is a header with `flag > 0`,
//!   empty content and labels `[id_start, id_end]`; images are keys `1..id_start`, identity records
//!   `id_start..id_end`. The ranges are float32 and inexact past 2^24 images (Glint360K, WebFace42M), so
//!   we take the image/identity boundary from the `.idx` keys instead: the keys are sorted and the first
//!   meta record (`flag >= 2`, empty content) is found by binary search, then cross-checked against the
//!   float within its precision.
//! - plain im2rec output (record 0 is an image): every key is an image.
//!
//! Image labels are read from every image record's `IRHeader` when the set opens (`label` when
//! `flag == 0`, else `labels[0]`, as arcface_torch does), so labels are validated up front: a label
//! must be a whole number in `0..num_classes`. `num_classes` comes from `property`
//! (`num_classes,H,W`), else from the header's identity range, else from the largest label.
//!
//! When the header record's identity range decides `num_classes`, it must agree with the identity
//! records in the `.idx` (or, without any, claim no more identities than there are images): a header
//! claiming 999,999,616 identities for a 40-identity pack is a bad record (key 0), not a classifier of
//! 512 GB.
//!
//! Content goes through the one image path ([`crate::input`]): JPEG with zune-jpeg straight to RGB,
//! other content (PNG, PNM, as im2rec may store) with the `image` crate, gray replicated. An image whose
//! size differs from the configured size is fitted by [`RecOptions::fit`] (default stretch, as
//! [`crate::ImageFolder`] and the evaluation sets) under [`SizePolicy::Resize`] (the default) or is a
//! bad record under [`SizePolicy::Strict`].
//!
//! Bad records: under [`BadRecordPolicy::Error`] (the default) the first one is an error naming the
//! file, the key and the byte offset. Under [`BadRecordPolicy::Skip`], records that fail to parse or
//! carry a bad label are dropped when the set opens (listed by [`RecordIo::bad_records`] and logged),
//! and images that fail to decode are left out of their batch by the [`crate::Loader`] (counted by
//! [`crate::Loader::skipped`] and logged). Skipping has a ceiling, [`RecOptions::max_skipped_fraction`]
//! (default 1 %) of the image records: above it, opening (or the loader, counting distinct images that
//! failed to decode) stops with an error naming the file and the counts.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::input::{self, Fit};
use crate::recordio::{parse_idx, parse_payload, read_record, scan_offsets, IrHeader};
use crate::source::Source;
use crate::threads::{cores, par_map};

/// What to do with a record that does not parse, decode or validate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BadRecordPolicy {
    /// Fail naming the file, key and byte offset (the default).
    #[default]
    Error,
    /// Count, log and leave the record out.
    Skip,
}

/// What to do with a decoded image whose size is not the configured size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SizePolicy {
    /// Fit to `image_size x image_size` by [`RecOptions::fit`] (see [`crate::input::Fit`]). The
    /// default.
    #[default]
    Resize,
    /// Treat it as a bad record.
    Strict,
}

/// Options of [`RecordIo::open`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecOptions {
    /// Bad records: error (default) or skip.
    pub policy: BadRecordPolicy,
    /// Images of another size: resize (default) or bad record.
    pub size: SizePolicy,
    /// How [`SizePolicy::Resize`] fits an image to the configured size. Default stretch.
    pub fit: Fit,
    /// Under [`BadRecordPolicy::Skip`]: the largest fraction of the image records that may be left
    /// out (when opening, plus distinct images that fail to decode while loading) before the set is
    /// refused, in `[0, 1]`. Default 0.01.
    pub max_skipped_fraction: f64,
}

/// Default of [`RecOptions::max_skipped_fraction`].
pub const DEFAULT_MAX_SKIPPED_FRACTION: f64 = 0.01;

impl Default for RecOptions {
    fn default() -> Self {
        Self {
            policy: BadRecordPolicy::default(),
            size: SizePolicy::default(),
            fit: Fit::default(),
            max_skipped_fraction: DEFAULT_MAX_SKIPPED_FRACTION,
        }
    }
}

/// A record that was left out (or, in [`RecordIo::check_all`], failed to decode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    /// Its `.idx` key.
    pub key: u64,
    /// Its byte offset in the `.rec`.
    pub offset: u64,
    /// What is wrong.
    pub reason: String,
}

/// How the set is organised.
#[derive(Debug, Clone, PartialEq)]
pub enum RecLayout {
    /// insightface: header record 0 and identity records after the images.
    Insightface {
        /// Identity records found in the `.idx` (keys from the first meta record on).
        identities: usize,
        /// `[id_start, id_end]` as stored (float32) in record 0.
        header_range: (f32, f32),
    },
    /// Every key is an image (im2rec output without a header record).
    Plain,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    key: u64,
    offset: u64,
    label: u32,
}

/// A memory-mapped RecordIO training set.
pub struct RecordIo {
    rec_path: PathBuf,
    map: Mmap,
    images: Vec<Entry>,
    num_classes: usize,
    image_size: usize,
    options: RecOptions,
    layout: RecLayout,
    bad: Vec<BadRecord>,
    /// Image records left out when opening (`bad` without the header's own record).
    bad_images: usize,
    class_origin: ClassOrigin,
}

/// Where [`RecordIo`]'s `num_classes` came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassOrigin {
    /// The `property` file (`num_classes,H,W`).
    Property,
    /// The header record's identity range (insightface layout).
    Header,
    /// The identity records of the `.idx` (the header's range was refused under the skip policy).
    IdentityRecords,
    /// The largest label + 1.
    Labels,
}

impl std::fmt::Debug for RecordIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordIo")
            .field("rec", &self.rec_path)
            .field("images", &self.images.len())
            .field("num_classes", &self.num_classes)
            .field("layout", &self.layout)
            .finish()
    }
}

/// `train.rec`, `train.idx` and `property` for a folder; `x.rec`, `x.idx` and `property` beside it for
/// a file.
pub fn rec_paths(path: &Path) -> (PathBuf, PathBuf, PathBuf) {
    if path.is_dir() {
        (
            path.join("train.rec"),
            path.join("train.idx"),
            path.join("property"),
        )
    } else {
        let dir = path.parent().unwrap_or(Path::new("."));
        (
            path.to_path_buf(),
            path.with_extension("idx"),
            dir.join("property"),
        )
    }
}

/// Parse a `property` file: `num_classes,H,W`.
pub fn parse_property(text: &str) -> Option<(usize, usize, usize)> {
    let fields: Vec<usize> = text
        .trim()
        .split(',')
        .map(|f| f.trim().parse().ok())
        .collect::<Option<_>>()?;
    match fields[..] {
        [c, h, w] => Some((c, h, w)),
        _ => None,
    }
}

impl RecordIo {
    /// Open a set: `path` is a folder holding `train.rec`/`train.idx`/`property`, or a `.rec` file with
    /// its `.idx` beside it. Reads every image record's header (labels), so structural problems show
    /// up here; JPEGs are decoded on [`Source::load`].
    pub fn open(path: &Path, image_size: usize, options: RecOptions) -> Result<Self> {
        ensure!(image_size > 0, "{}: image_size must be > 0", path.display());
        let frac = options.max_skipped_fraction;
        ensure!(
            (0.0..=1.0).contains(&frac),
            "{}: max_skipped_fraction must be in [0, 1], got {frac}",
            path.display()
        );
        let (rec_path, idx_path, prop_path) = rec_paths(path);
        let file =
            File::open(&rec_path).with_context(|| format!("opening {}", rec_path.display()))?;
        let file_len = file
            .metadata()
            .with_context(|| format!("reading {}", rec_path.display()))?
            .len();
        ensure!(file_len > 0, "{} is empty", rec_path.display());
        // SAFETY: the map is read-only; like every mmap reader we assume nobody truncates the file
        // while it is open (that would fault, not corrupt memory safety of other data).
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("memory-mapping {}", rec_path.display()))?;
        let rec_name = rec_path.display().to_string();

        let mut keys = if idx_path.exists() {
            let text = std::fs::read_to_string(&idx_path)
                .with_context(|| format!("reading {}", idx_path.display()))?;
            let keys = parse_idx(&text).map_err(|e| anyhow!("{}: {e}", idx_path.display()))?;
            ensure!(!keys.is_empty(), "{} lists no records", idx_path.display());
            keys
        } else {
            let (offsets, err) = scan_offsets(&map);
            if let Some(e) = err {
                bail!(
                    "{rec_name} (no {} beside it, scanning): {e}",
                    idx_path.display()
                );
            }
            offsets
                .into_iter()
                .enumerate()
                .map(|(k, o)| (k as u64, o))
                .collect()
        };
        keys.sort_unstable();
        if let Some(w) = keys.windows(2).find(|w| w[0].0 == w[1].0) {
            bail!("{}: key {} is listed twice", idx_path.display(), w[0].0);
        }

        let property = match std::fs::read_to_string(&prop_path) {
            Ok(text) => Some(parse_property(&text).ok_or_else(|| {
                anyhow!(
                    "{}: expected `num_classes,H,W`, found {:?}",
                    prop_path.display(),
                    text.trim()
                )
            })?),
            Err(_) => None,
        };

        let mut bad = Vec::new();
        let policy = options.policy;
        let mut report = |b: BadRecord| -> Result<()> {
            match policy {
                BadRecordPolicy::Error => bail!(
                    "{rec_name}: key {} at byte {}: {}",
                    b.key,
                    b.offset,
                    b.reason
                ),
                BadRecordPolicy::Skip => {
                    bad.push(b);
                    Ok(())
                }
            }
        };

        // Layout: an insightface header record 0, or plain.
        let header0 = keys
            .first()
            .filter(|(k, _)| *k == 0)
            .and_then(|&(_, o)| meta_header(&map, o));
        let mut identity_records = None;
        let (mut header_bad, mut header_refused) = (0usize, false);
        let (image_keys, layout, header_classes) = match header0 {
            Some(h) if h.labels.len() >= 2 => {
                let rest = &keys[1..];
                let boundary = rest.partition_point(|&(_, o)| meta_header(&map, o).is_none());
                let (id_start, id_end) = (h.labels[0], h.labels[1]);
                let first_meta = rest
                    .get(boundary)
                    .map_or(rest.last().map_or(1, |l| l.0 + 1), |m| m.0);
                // float32 spacing at id_start: exact below 2^24.
                let tolerance = (id_start.abs() * f32::EPSILON) as f64;
                if (first_meta as f64 - id_start as f64).abs() > tolerance.max(0.0) {
                    header_bad += 1;
                    report(BadRecord {
                        key: 0,
                        offset: keys[0].1,
                        reason: format!(
                            "header record says images are keys 1..{id_start}, but the first identity record in the .idx is key {first_meta}"
                        ),
                    })?;
                }
                let identities = rest.len() - boundary;
                identity_records = Some(identities).filter(|&n| n > 0);
                let layout = RecLayout::Insightface {
                    identities,
                    header_range: (id_start, id_end),
                };
                let classes = (id_end - id_start).max(0.0) as usize;
                // Plausibility of the header's class count, when it is the one that decides.
                let images = boundary;
                let claim = (classes > 0 && property.is_none()).then_some(classes);
                let tolerance = (id_end.abs() * f32::EPSILON).ceil() as usize;
                let implausible = match (claim, identity_records) {
                    (Some(c), Some(n)) if c.abs_diff(n) > tolerance => Some(format!(
                        "header record claims {c} identities (labels [{id_start}, {id_end}]) but the .idx lists {n} identity records; no property file overrides it"
                    )),
                    (Some(c), None) if c > images => Some(format!(
                        "header record claims {c} identities (labels [{id_start}, {id_end}]) for only {images} image records; no property file overrides it"
                    )),
                    _ => None,
                };
                let mut header_classes = claim;
                if let Some(reason) = implausible {
                    header_bad += 1;
                    header_refused = true;
                    report(BadRecord {
                        key: 0,
                        offset: keys[0].1,
                        reason,
                    })?;
                    header_classes = None; // skip policy: count from the .idx or the labels
                }
                (&rest[..boundary], layout, header_classes)
            }
            _ => (&keys[..], RecLayout::Plain, None),
        };

        // Read every image header (in parallel: on a large set this touches one page per record).
        let headers = par_map(image_keys.len(), cores(), |i| {
            let (key, offset) = image_keys[i];
            image_label(&map, offset)
                .map(|l| (key, offset, l))
                .map_err(|reason| BadRecord {
                    key,
                    offset,
                    reason,
                })
        });
        let (num_classes, class_origin) = match (property, header_classes, identity_records) {
            (Some((c, _, _)), _, _) => (c, ClassOrigin::Property),
            (None, Some(c), _) => (c, ClassOrigin::Header),
            (None, None, Some(n)) if header_refused => (n, ClassOrigin::IdentityRecords),
            _ => (
                headers
                    .iter()
                    .filter_map(|h| h.as_ref().ok())
                    .map(|h| h.2 as usize + 1)
                    .max()
                    .unwrap_or(0),
                ClassOrigin::Labels,
            ),
        };
        let mut images = Vec::with_capacity(headers.len());
        for h in headers {
            match h {
                Ok((key, offset, label)) if (label as usize) < num_classes => {
                    images.push(Entry { key, offset, label })
                }
                Ok((key, offset, label)) => report(BadRecord {
                    key,
                    offset,
                    reason: format!("label {label} is outside num_classes = {num_classes}"),
                })?,
                Err(b) => report(b)?,
            }
        }
        let bad_images = bad.len() - header_bad;
        if !bad.is_empty() {
            log_bad(&rec_name, &bad, "skipped when opening");
        }
        ensure!(!images.is_empty(), "{rec_name}: no usable image records");
        check_skip_ceiling(&rec_name, bad_images, 0, images.len(), frac)?;
        Ok(Self {
            rec_path,
            map,
            images,
            num_classes,
            image_size,
            options,
            layout,
            bad,
            bad_images,
            class_origin,
        })
    }

    /// Where `num_classes` came from.
    pub fn class_origin(&self) -> ClassOrigin {
        self.class_origin
    }

    /// Records left out when the set opened (always empty under [`BadRecordPolicy::Error`]).
    pub fn bad_records(&self) -> &[BadRecord] {
        &self.bad
    }

    /// The layout found.
    pub fn layout(&self) -> &RecLayout {
        &self.layout
    }

    /// The `.rec` file.
    pub fn rec_path(&self) -> &Path {
        &self.rec_path
    }

    /// `.idx` key of image `index`.
    ///
    /// # Panics
    /// When `index >= len()`.
    pub fn key(&self, index: usize) -> u64 {
        self.images[index].key
    }

    /// Byte offset of image `index` in the `.rec`.
    ///
    /// # Panics
    /// When `index >= len()`.
    pub fn offset(&self, index: usize) -> u64 {
        self.images[index].offset
    }

    /// The JPEG (or other encoded) bytes of image `index`, errors naming file, key and offset.
    pub fn content(&self, index: usize) -> Result<Vec<u8>> {
        let e = self.images[index];
        let rec = read_record(&self.map, e.offset).map_err(|err| self.record_error(e, err))?;
        let (_, content) =
            parse_payload(&rec.payload, e.offset).map_err(|err| self.record_error(e, err))?;
        Ok(content.to_vec())
    }

    /// Decode every image with `workers` threads; returns the ones that fail (for `facerec prep check`).
    pub fn check_all(&self, workers: usize) -> Vec<BadRecord> {
        par_map(self.len(), workers.max(1), |i| {
            self.load(i).err().map(|err| BadRecord {
                key: self.key(i),
                offset: self.offset(i),
                reason: format!("{:#}", err.root_cause()),
            })
        })
        .into_iter()
        .flatten()
        .collect()
    }

    fn record_error(&self, e: Entry, err: impl std::fmt::Display) -> anyhow::Error {
        anyhow!(
            "{}: key {} at byte {}: {err}",
            self.rec_path.display(),
            e.key,
            e.offset
        )
    }
}

impl Source for RecordIo {
    fn len(&self) -> usize {
        self.images.len()
    }
    fn num_classes(&self) -> usize {
        self.num_classes
    }
    fn label(&self, index: usize) -> usize {
        self.images[index].label as usize
    }
    fn image_size(&self) -> usize {
        self.image_size
    }
    fn load(&self, index: usize) -> Result<Vec<u8>> {
        let e = self.images[index];
        let rec = read_record(&self.map, e.offset).map_err(|err| self.record_error(e, err))?;
        let (_, content) =
            parse_payload(&rec.payload, e.offset).map_err(|err| self.record_error(e, err))?;
        decode_image(
            content,
            self.image_size,
            self.options.size,
            self.options.fit,
        )
        .map_err(|err| self.record_error(e, format!("{err:#}")))
    }
    fn describe(&self, index: usize) -> String {
        let e = self.images[index];
        format!(
            "{} key {} (byte {})",
            self.rec_path.display(),
            e.key,
            e.offset
        )
    }
    fn skips_bad_images(&self) -> bool {
        self.options.policy == BadRecordPolicy::Skip
    }
    fn check_skipped(&self, failed_loads: usize) -> Result<()> {
        check_skip_ceiling(
            &self.rec_path.display().to_string(),
            self.bad_images,
            failed_loads,
            self.images.len(),
            self.options.max_skipped_fraction,
        )
    }
}

/// Refuse a set when more than `max_fraction` of its image records were left out: `at_open` when it
/// opened plus `on_load` distinct images that failed to decode, out of `at_open + usable` records.
fn check_skip_ceiling(
    file: &str,
    at_open: usize,
    on_load: usize,
    usable: usize,
    max_fraction: f64,
) -> Result<()> {
    let (skipped, records) = (at_open + on_load, at_open + usable);
    if skipped as f64 > max_fraction * records as f64 {
        bail!(
            "{file}: {skipped} of {records} image records are unreadable ({at_open} left out when opening, {on_load} failed to decode while loading), {:.1} %, more than max_skipped_fraction = {max_fraction}; repair or re-pack the file (facerec prep check lists the bad records), or raise max_skipped_fraction",
            100.0 * skipped as f64 / records.max(1) as f64
        );
    }
    Ok(())
}

/// The header of a meta record (`flag >= 2`, empty content) at `offset`, or `None`.
fn meta_header(map: &[u8], offset: u64) -> Option<IrHeader> {
    let rec = read_record(map, offset).ok()?;
    let (h, content) = parse_payload(&rec.payload, offset).ok()?;
    (h.flag >= 2 && content.is_empty()).then_some(h)
}

/// The class of the image record at `offset`, or why it is not a usable image record.
fn image_label(map: &[u8], offset: u64) -> std::result::Result<u32, String> {
    if offset >= map.len() as u64 {
        return Err(format!(
            "offset {offset} is past the end of the file ({} bytes)",
            map.len()
        ));
    }
    let rec = read_record(map, offset).map_err(|e| e.to_string())?;
    let (h, content) = parse_payload(&rec.payload, offset).map_err(|e| e.to_string())?;
    if content.is_empty() {
        return Err("record has no image content".into());
    }
    let c = h.class();
    if !(c.is_finite() && c >= 0.0 && c.fract() == 0.0 && c < (1u32 << 24) as f32) {
        return Err(format!(
            "label {c} is not a class id (a whole number in 0..2^24)"
        ));
    }
    Ok(c as u32)
}

/// Decode JPEG or PNG/PNM bytes through the one image path ([`crate::input`]) to `size x size` RGB
/// (HWC), gray replicated; another size is fitted by `fit` or, under [`SizePolicy::Strict`], an error.
pub fn decode_image(content: &[u8], size: usize, policy: SizePolicy, fit: Fit) -> Result<Vec<u8>> {
    let img = input::decode(content)?;
    let (w, h) = img.dimensions();
    ensure!(
        policy == SizePolicy::Resize || (w as usize, h as usize) == (size, size),
        "image is {w}x{h}, expected {size}x{size} (size policy: strict)"
    );
    Ok(input::fit(img, size, fit)?.into_raw())
}

/// Log up to 20 bad records, then a count.
pub(crate) fn log_bad(file: &str, bad: &[BadRecord], what: &str) {
    for b in bad.iter().take(20) {
        eprintln!(
            "{file}: key {} at byte {}: {} ({what})",
            b.key, b.offset, b.reason
        );
    }
    if bad.len() > 20 {
        eprintln!("{file}: ... and {} more bad records", bad.len() - 20);
    }
    eprintln!("{file}: {} bad records {what}", bad.len());
}
