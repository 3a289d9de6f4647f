//! IJB-B / IJB-C 1:1 verification with insightface's template protocol (SPEC 6.2, the procedure of
//! `recognition/arcface_torch/eval_ijbc.py`, re-implemented from the spec's description).
//!
//! IJB-B: Whitelam et al., "IARPA Janus Benchmark-B Face Dataset", CVPR Workshops 2017. IJB-C: Maze et al.,
//! "IARPA Janus Benchmark - C: Face Dataset and Protocol", ICB 2018. The idea: a template is a set of
//! still images and video frames of one subject; every image is aligned by a 5-point similarity transform,
//! embedded with the flip test, weighted by its detector score (and, by keeping the norm, by its
//! quality), frames of one video (media) are averaged, media are summed, and the L2-normalised template
//! features are compared by dot product for every listed template pair.
//!
//! Files (under `DIR/meta/`, or `DIR/` itself): `<t>_face_tid_mid.txt` (image, template id, media id),
//! `<t>_template_pair_label.txt` (template 1, template 2, label 1/0), `<t>_name_5pts_score.txt` (image,
//! 10 landmark coordinates, detector score), `<t>` being `ijbb` or `ijbc`; images in `DIR/loose_crop/`.
//! The two per-image files must list the same images in the same order (insightface indexes both by line;
//! we check the names agree).
//!
//! Deliberate differences from insightface: the warp is our own bilinear sampler in f64 (OpenCV's
//! `warpAffine` quantises coordinates to 1/32 pixel and weights to 11 bits), so aligned pixels may differ
//! by one grey level; images are decoded RGB directly (insightface reads BGR with OpenCV and converts).
//! When the model's input is not 112, the template is scaled by `size / 112` and the crop warped straight
//! to that size. Images are processed in chunks so memory stays bounded for IJB-C's 469 K crops.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::images::decode_all;
use crate::roc::{Roc, RocReport, FAR_TARGETS};

/// The alignment lives in the data crate (`facerec prep align` uses it too); re-exported here.
pub use facerec_data::align::{align, umeyama, warp_affine, ARCFACE_TEMPLATE};

/// One face image of the metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct IjbFace {
    /// File name inside `loose_crop/`.
    pub name: String,
    pub template: u64,
    pub media: u64,
    /// Five landmarks (x, y) in the loose crop.
    pub landmarks: [[f64; 2]; 5],
    /// Detector "faceness" score.
    pub score: f64,
}

/// The parsed 1:1 protocol of one IJB target.
#[derive(Debug, Clone, PartialEq)]
pub struct IjbMeta {
    /// `IJBB` or `IJBC` as given.
    pub target: String,
    pub faces: Vec<IjbFace>,
    /// (template 1, template 2, genuine).
    pub pairs: Vec<(u64, u64, bool)>,
    /// The `loose_crop` folder.
    pub image_dir: PathBuf,
    /// The three metadata files read.
    pub files: Vec<PathBuf>,
}

/// Options of insightface's `eval_ijbc.py`, with its defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct IjbOptions {
    /// Add the embedding of the horizontally flipped image ("F2"). Default true.
    pub flip: bool,
    /// Keep each image feature's norm as a quality weight (otherwise L2-normalise per image). Default true.
    pub norm_score: bool,
    /// Multiply each image feature by its detector score. Default true.
    pub detector_score: bool,
}

impl Default for IjbOptions {
    fn default() -> Self {
        Self {
            flip: true,
            norm_score: true,
            detector_score: true,
        }
    }
}

/// Scores and metrics of one IJB run.
#[derive(Debug, Clone, Serialize)]
pub struct IjbResult {
    pub target: String,
    pub options: IjbOptions,
    pub images: usize,
    pub templates: usize,
    pub pairs: usize,
    pub roc: RocReport,
    /// One score per listed pair, in file order.
    #[serde(skip)]
    pub scores: Vec<f64>,
    /// The curve, for plotting.
    #[serde(skip)]
    pub curve: Option<Roc>,
}

impl IjbMeta {
    /// Read the metadata of `target` (`IJBB`, `IJBC`, case-insensitive) under `dir`.
    pub fn load(dir: &Path, target: &str) -> Result<Self> {
        let t = target.to_ascii_lowercase();
        ensure!(
            matches!(t.as_str(), "ijbb" | "ijbc"),
            "unknown IJB target {target:?} (IJBB or IJBC)"
        );
        let find = |suffix: &str| -> Result<PathBuf> {
            let name = format!("{t}_{suffix}");
            [dir.join("meta").join(&name), dir.join(&name)]
                .into_iter()
                .find(|p| p.is_file())
                .with_context(|| {
                    format!(
                        "{target}: no {name} in {}/meta or {}",
                        dir.display(),
                        dir.display()
                    )
                })
        };
        let (tid_path, pair_path, lmk_path) = (
            find("face_tid_mid.txt")?,
            find("template_pair_label.txt")?,
            find("name_5pts_score.txt")?,
        );
        let image_dir = dir.join("loose_crop");
        ensure!(
            image_dir.is_dir(),
            "{target}: image folder {} does not exist",
            image_dir.display()
        );

        let tid = read_rows(&tid_path, 3)?;
        let lmk = read_rows(&lmk_path, 12)?;
        ensure!(
            tid.len() == lmk.len(),
            "{} lists {} images, {} lists {}",
            tid_path.display(),
            tid.len(),
            lmk_path.display(),
            lmk.len()
        );
        let mut faces = Vec::with_capacity(tid.len());
        for ((line, a), (_, b)) in tid.iter().zip(&lmk) {
            let at = |p: &Path| format!("{}:{line}", p.display());
            ensure!(
                a[0] == b[0],
                "{}: image {:?} differs from {:?} on the same line of {}",
                at(&tid_path),
                a[0],
                b[0],
                lmk_path.display()
            );
            let int = |s: &str, p: &Path| -> Result<u64> {
                s.parse()
                    .with_context(|| format!("{}: {s:?} is not an integer id", at(p)))
            };
            let num = |s: &str| -> Result<f64> {
                let v: f64 = s
                    .parse()
                    .with_context(|| format!("{}: {s:?} is not a number", at(&lmk_path)))?;
                ensure!(v.is_finite(), "{}: {s:?} is not finite", at(&lmk_path));
                Ok(v)
            };
            let mut landmarks = [[0.0; 2]; 5];
            for (k, p) in landmarks.iter_mut().enumerate() {
                *p = [num(&b[1 + 2 * k])?, num(&b[2 + 2 * k])?];
            }
            faces.push(IjbFace {
                name: a[0].clone(),
                template: int(&a[1], &tid_path)?,
                media: int(&a[2], &tid_path)?,
                landmarks,
                score: num(&b[11])?,
            });
        }
        let pairs = read_rows(&pair_path, 3)?
            .into_iter()
            .map(|(line, r)| {
                let at = format!("{}:{line}", pair_path.display());
                let id = |s: &str| {
                    s.parse::<u64>()
                        .with_context(|| format!("{at}: {s:?} is not a template id"))
                };
                let label = match r[2].as_str() {
                    "1" => true,
                    "0" => false,
                    s => bail!("{at}: label {s:?} is not 0 or 1"),
                };
                Ok((id(&r[0])?, id(&r[1])?, label))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            target: target.to_string(),
            faces,
            pairs,
            image_dir,
            files: vec![tid_path, pair_path, lmk_path],
        })
    }
}

/// Whitespace-separated rows with exactly `fields` fields; (1-based line, fields). Blank lines skipped.
fn read_rows(path: &Path, fields: usize) -> Result<Vec<(usize, Vec<String>)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let f: Vec<String> = line.split_whitespace().map(String::from).collect();
        if f.is_empty() {
            continue;
        }
        ensure!(
            f.len() == fields,
            "{}:{}: {} fields, expected {fields}",
            path.display(),
            i + 1,
            f.len()
        );
        rows.push((i + 1, f));
    }
    Ok(rows)
}

/// Per-image features: `f(x)` (+ `f(flip(x))` with `opts.flip`), L2-normalised unless `opts.norm_score`,
/// times the detector score with `opts.detector_score`. Images are read, aligned and embedded in chunks
/// of `chunk` images; `tick` is called once per embedded image.
///
/// `model` maps normalised `[b, 3, size, size]` float batches to `[b, D]` (eval mode); it runs under
/// `no_grad` here.
///
/// # Shapes
/// Returns `[faces, D]` Float on the CPU.
#[allow(clippy::too_many_arguments)]
pub fn image_features(
    model: &dyn Fn(&Tensor) -> Tensor,
    meta: &IjbMeta,
    size: u32,
    opts: &IjbOptions,
    batch_size: i64,
    threads: usize,
    chunk: usize,
    tick: &(dyn Fn(u64) + Sync),
) -> Result<Tensor> {
    ensure!(
        !meta.faces.is_empty(),
        "{}: the metadata lists no images",
        meta.target
    );
    ensure!(batch_size > 0, "batch size {batch_size} < 1");
    let _guard = tch::no_grad_guard();
    let mut feats = Vec::new();
    for start in (0..meta.faces.len()).step_by(chunk.max(1)) {
        let faces = &meta.faces[start..(start + chunk.max(1)).min(meta.faces.len())];
        let images = decode_all(
            faces.len(),
            size as usize,
            threads,
            &|i| {
                let f = &faces[i];
                let path = meta.image_dir.join(&f.name);
                // The shared decoder (facerec_data::input); alignment replaces the fit.
                let img = facerec_data::input::read(&path)
                    .with_context(|| format!("{}: reading {}", meta.target, path.display()))?;
                Ok(align(&img, &f.landmarks, size)
                    .with_context(|| format!("{}: aligning {}", meta.target, path.display()))?
                    .into_raw())
            },
            &|| {},
        )?;
        let n = images.size()[0];
        for b0 in (0..n).step_by(batch_size as usize) {
            let x = crate::images::normalize(&images.narrow(0, b0, batch_size.min(n - b0)));
            let mut f = model(&x).to_kind(Kind::Float);
            if opts.flip {
                f += model(&x.flip([3])).to_kind(Kind::Float);
            }
            feats.push(f.to_device(Device::Cpu));
            tick(x.size()[0] as u64);
        }
    }
    let mut f = Tensor::cat(&feats, 0);
    if !opts.norm_score {
        f = crate::embed::l2_normalize(&f);
    }
    if opts.detector_score {
        let s: Vec<f32> = meta.faces.iter().map(|f| f.score as f32).collect();
        f *= Tensor::from_slice(&s).unsqueeze(1);
    }
    Ok(f)
}

/// Template features: per template (ascending id), the mean feature of each media (ascending id) summed
/// over media, then L2-normalised. Returns the template ids and `[T, D]` features.
///
/// # Shapes
/// `feats`: `[faces, D]`; returns `[T, D]` Float.
///
/// # Panics
/// If `feats` has a row count other than `faces.len()`.
pub fn template_features(feats: &Tensor, faces: &[IjbFace]) -> (Vec<u64>, Tensor) {
    assert_eq!(
        feats.size()[0] as usize,
        faces.len(),
        "template_features: one row per face"
    );
    let feats = feats.to_kind(Kind::Double);
    let mut groups: BTreeMap<u64, BTreeMap<u64, Vec<i64>>> = BTreeMap::new();
    for (i, f) in faces.iter().enumerate() {
        groups
            .entry(f.template)
            .or_default()
            .entry(f.media)
            .or_default()
            .push(i as i64);
    }
    let mut ids = Vec::with_capacity(groups.len());
    let mut rows = Vec::with_capacity(groups.len());
    for (t, media) in groups {
        let sum = media
            .values()
            .map(|idx| {
                feats
                    .index_select(0, &Tensor::from_slice(idx))
                    .mean_dim(0, false, Kind::Double)
            })
            .reduce(|a, b| a + b)
            .expect("a template has at least one image");
        ids.push(t);
        rows.push(sum);
    }
    let t = crate::embed::l2_normalize(&Tensor::stack(&rows, 0)).to_kind(Kind::Float);
    (ids, t)
}

/// Dot product of the two templates' features for every pair. Errors name the first pair whose template
/// has no image.
pub fn pair_scores(
    ids: &[u64],
    templates: &Tensor,
    pairs: &[(u64, u64, bool)],
) -> Result<Vec<f64>> {
    let row = |t: u64, k: usize| -> Result<i64> {
        ids.binary_search(&t)
            .map(|i| i as i64)
            .map_err(|_| anyhow::anyhow!("pair {k}: template {t} has no image in the metadata"))
    };
    let mut scores = Vec::with_capacity(pairs.len());
    let t = templates.to_kind(Kind::Double);
    for (c, chunk) in pairs.chunks(100_000).enumerate() {
        let (mut a, mut b) = (
            Vec::with_capacity(chunk.len()),
            Vec::with_capacity(chunk.len()),
        );
        for (k, &(t1, t2, _)) in chunk.iter().enumerate() {
            a.push(row(t1, c * 100_000 + k)?);
            b.push(row(t2, c * 100_000 + k)?);
        }
        let s = (t.index_select(0, &Tensor::from_slice(&a))
            * t.index_select(0, &Tensor::from_slice(&b)))
        .sum_dim_intlist([1i64].as_slice(), false, Kind::Double);
        scores.extend(Vec::<f64>::try_from(s)?);
    }
    Ok(scores)
}

/// The whole protocol: image features, templates, pair scores, ROC and TAR at [`FAR_TARGETS`].
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    model: &dyn Fn(&Tensor) -> Tensor,
    meta: &IjbMeta,
    size: u32,
    opts: &IjbOptions,
    batch_size: i64,
    threads: usize,
    tick: &(dyn Fn(u64) + Sync),
) -> Result<IjbResult> {
    let feats = image_features(model, meta, size, opts, batch_size, threads, 4096, tick)?;
    let (ids, templates) = template_features(&feats, &meta.faces);
    let scores = pair_scores(&ids, &templates, &meta.pairs).with_context(|| meta.target.clone())?;
    let labels: Vec<bool> = meta.pairs.iter().map(|p| p.2).collect();
    let roc = Roc::new(&scores, &labels).with_context(|| meta.target.clone())?;
    Ok(IjbResult {
        target: meta.target.clone(),
        options: *opts,
        images: meta.faces.len(),
        templates: ids.len(),
        pairs: scores.len(),
        roc: roc.report(&FAR_TARGETS),
        scores,
        curve: Some(roc),
    })
}
