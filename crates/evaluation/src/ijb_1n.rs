//! IJB-B / IJB-C 1:N identification (Whitelam et al. 2017, Maze et al. 2018): open-set search of
//! the mixed-media probe templates against each of the two disjoint galleries G1 and G2, with the
//! metrics of [`crate::identification`] (CMC rank-1/5/10, TPIR at FPIR 1e-3/1e-2/1e-1).
//!
//! Files (under `DIR/meta/` or `DIR/`, `<t>` = `ijbb` / `ijbc`): the 1:1 files of [`crate::ijb`]
//! (`<t>_face_tid_mid.txt`, `<t>_name_5pts_score.txt`: every image with its template, media,
//! landmarks and detector score; their templates are the union of the 1:N gallery and probe
//! templates), plus `<t>_1N_gallery_G1.csv`, `<t>_1N_gallery_G2.csv` and `<t>_1N_probe_mixed.csv`
//! (the IJB release's comma-separated lists, one row per image, a header row, the first two columns
//! `TEMPLATE_ID,SUBJECT_ID`). Template features are those of the 1:1 protocol (aligned, flip test,
//! detector-score weighted, media-averaged, normalised: [`crate::ijb::template_features`]); each
//! gallery holds one template per subject. Against G1 the probes of G2's subjects are the non-mated
//! searches, and the other way round.
//!
//! The template pair file of the 1:1 protocol is read too ([`IjbMeta::load`]); it is part of every
//! IJB meta folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use serde::Serialize;
use tch::Tensor;

use crate::identification::{identify, similarity, IdentificationReport, CMC_RANKS, FPIR_TARGETS};
use crate::ijb::{image_features, template_features, IjbMeta, IjbOptions};

/// A list of (template id, subject id), each template once.
pub type TemplateSubjects = Vec<(u64, u64)>;

/// The 1:N protocol of one IJB target.
#[derive(Debug, Clone)]
pub struct Ijb1nMeta {
    /// The 1:1 metadata (images, templates, media, landmarks, scores).
    pub meta: IjbMeta,
    /// `("G1", templates)`, `("G2", templates)`.
    pub galleries: Vec<(String, TemplateSubjects)>,
    /// The mixed-media probe templates.
    pub probes: TemplateSubjects,
    /// The three 1:N files read.
    pub files: Vec<PathBuf>,
}

/// Read a 1:N list: `TEMPLATE_ID,SUBJECT_ID,...` rows after a header; a template listed with two
/// subjects is an error naming the line.
pub fn read_template_subjects(path: &Path) -> Result<TemplateSubjects> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut seen: BTreeMap<u64, u64> = BTreeMap::new();
    let mut order = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), i + 1);
        let mut f = line.split(',').map(str::trim);
        let (t, s) = match (f.next(), f.next()) {
            (Some(t), Some(s)) => (t, s),
            _ => anyhow::bail!("{at}: expected TEMPLATE_ID,SUBJECT_ID,..."),
        };
        let t: u64 = t
            .parse()
            .with_context(|| format!("{at}: template id {t:?}"))?;
        let s: u64 = s
            .parse()
            .with_context(|| format!("{at}: subject id {s:?}"))?;
        match seen.insert(t, s) {
            None => order.push((t, s)),
            Some(prev) => ensure!(
                prev == s,
                "{at}: template {t} listed with subject {s}, earlier with {prev}"
            ),
        }
    }
    ensure!(!order.is_empty(), "{}: no templates", path.display());
    Ok(order)
}

impl Ijb1nMeta {
    /// Read the 1:1 metadata and the three 1:N lists of `target` under `dir`.
    pub fn load(dir: &Path, target: &str) -> Result<Self> {
        let meta = IjbMeta::load(dir, target)?;
        let t = target.to_ascii_lowercase();
        let find = |suffix: &str| -> Result<PathBuf> {
            let name = format!("{t}_1N_{suffix}");
            [dir.join("meta").join(&name), dir.join(&name)]
                .into_iter()
                .find(|p| p.is_file())
                .with_context(|| {
                    format!(
                        "{target} 1:N: no {name} in {}/meta or {}",
                        dir.display(),
                        dir.display()
                    )
                })
        };
        let files = vec![
            find("gallery_G1.csv")?,
            find("gallery_G2.csv")?,
            find("probe_mixed.csv")?,
        ];
        let galleries = vec![
            ("G1".to_string(), read_template_subjects(&files[0])?),
            ("G2".to_string(), read_template_subjects(&files[1])?),
        ];
        let probes = read_template_subjects(&files[2])?;
        Ok(Self {
            meta,
            galleries,
            probes,
            files,
        })
    }
}

/// Search `probes` against `gallery` given template features (`ids` ascending, rows of
/// `templates`). Errors name a template that has no image.
///
/// # Shapes
/// `templates`: `[T, D]`.
pub fn search(
    ids: &[u64],
    templates: &Tensor,
    gallery: &[(u64, u64)],
    probes: &[(u64, u64)],
) -> Result<IdentificationReport> {
    let rows = |list: &[(u64, u64)], what: &str| -> Result<Tensor> {
        let idx = list
            .iter()
            .map(|&(t, _)| {
                ids.binary_search(&t).map(|i| i as i64).map_err(|_| {
                    anyhow::anyhow!("{what} template {t} has no image in the metadata")
                })
            })
            .collect::<Result<Vec<i64>>>()?;
        Ok(templates.index_select(0, &Tensor::from_slice(&idx)))
    };
    let (g, p) = (rows(gallery, "gallery")?, rows(probes, "probe")?);
    let gl: Vec<u64> = gallery.iter().map(|x| x.1).collect();
    let pl: Vec<u64> = probes.iter().map(|x| x.1).collect();
    identify(&similarity(&p, &g), &gl, &pl, &CMC_RANKS, &FPIR_TARGETS)
}

/// One gallery's result.
#[derive(Debug, Clone, Serialize)]
pub struct Ijb1nResult {
    pub target: String,
    pub gallery: String,
    pub report: IdentificationReport,
}

/// The whole protocol: image and template features as in the 1:1 protocol, then one search per
/// gallery.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    model: &dyn Fn(&Tensor) -> Tensor,
    m: &Ijb1nMeta,
    size: u32,
    opts: &IjbOptions,
    batch_size: i64,
    threads: usize,
    tick: &(dyn Fn(u64) + Sync),
) -> Result<Vec<Ijb1nResult>> {
    let feats = image_features(model, &m.meta, size, opts, batch_size, threads, 4096, tick)?;
    let (ids, templates) = template_features(&feats, &m.meta.faces);
    m.galleries
        .iter()
        .map(|(name, g)| {
            Ok(Ijb1nResult {
                target: m.meta.target.clone(),
                gallery: name.clone(),
                report: search(&ids, &templates, g, &m.probes)
                    .with_context(|| format!("{} 1:N gallery {name}", m.meta.target))?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_and_the_search_splits_mated_from_non_mated() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("g.csv");
        std::fs::write(
            &f,
            "TEMPLATE_ID,SUBJECT_ID,FILENAME\n5,50,img/1.jpg\n5,50,img/2.jpg\n7,70,img/3.jpg\n",
        )
        .unwrap();
        assert_eq!(read_template_subjects(&f).unwrap(), [(5, 50), (7, 70)]);
        std::fs::write(&f, "TEMPLATE_ID,SUBJECT_ID\n5,50\n5,51\n").unwrap();
        let err = format!("{:#}", read_template_subjects(&f).unwrap_err());
        assert!(
            err.contains("g.csv:3") && err.contains("subject 51"),
            "{err}"
        );
        std::fs::write(&f, "T,S\nx,1\n").unwrap();
        assert!(read_template_subjects(&f).is_err());

        // Four templates in the plane; G1 = {1: subject 10, 2: subject 20}, G2 = {3: subject 30};
        // probes: template 4 (next to 1) of subject 10 and template 3 of subject 30. Against G1 the
        // subject-30 probe is non-mated, against G2 the subject-10 probe.
        let ids = [1u64, 2, 3, 4];
        let t = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0, -1.0, 0.0, 0.9, 0.1]).view([4, 2]);
        let probes = [(4, 10), (3, 30)];
        let g1 = search(&ids, &t, &[(1, 10), (2, 20)], &probes).unwrap();
        assert_eq!((g1.mated, g1.non_mated), (1, 1));
        assert_eq!(g1.cmc[0].rate, 1.0);
        let g2 = search(&ids, &t, &[(3, 30)], &probes).unwrap();
        assert_eq!((g2.mated, g2.non_mated), (1, 1));
        let err = format!("{:#}", search(&ids, &t, &[(9, 90)], &probes).unwrap_err());
        assert!(err.contains("template 9"), "{err}");
    }
}
