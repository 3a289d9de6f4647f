//! `facerec eval --gallery G --probes P`: open-set 1:N identification
//! (`facerec_evaluation::identification`). Both sides are labelled image sets as `facerec embed`
//! reads them (a folder with one sub-folder per identity, or a list file of `path<TAB>label` lines):
//! every image is embedded with the flip test (`normalize(f(x) + f(flip(x)))`, as `facerec eval`'s
//! verification), the gallery becomes one template per identity (the normalised mean of its
//! images), and each probe is searched against all templates by cosine. Probes whose identity has
//! no gallery template are the open-set non-mated searches. Reports CMC at ranks 1, 5, 10 and TPIR
//! at FPIR 1e-3, 1e-2, 1e-1, and writes each probe's rank-1 result to `identification.csv`.
//!
//! `facerec eval --ijb DIR --target IJBC --ijb-1n`: the IJB 1:N protocol instead of 1:1
//! (`facerec_evaluation::ijb_1n`), one report per gallery.

use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use facerec_evaluation::identification::{identify, identity_templates, similarity};
use facerec_evaluation::report::{FileRef, TargetReport};
use facerec_evaluation::{IdentificationReport, CMC_RANKS, FPIR_TARGETS};
use tch::Kind;

use super::embed::{csv_field, Items};
use super::loaded_model::LoadedModel;
use super::progress_bar as bar;

/// Embed one labelled side (flip test, normalised).
fn embed_side(
    m: &LoadedModel,
    path: &Path,
    what: &str,
    batch: usize,
    threads: usize,
) -> Result<(Items, tch::Tensor)> {
    let items = Items::open(path, m.input_size() as usize, m.fit)
        .with_context(|| format!("{what} {}", path.display()))?;
    ensure!(
        items.labels.iter().all(|l| !l.is_empty()),
        "{what} {}: every image needs an identity (a sub-folder per identity, or `path<TAB>label` lines)",
        path.display()
    );
    let pb = bar(items.len() as u64, format!("{what}: embedding (+flip)"));
    let emb = items.embed(m, true, true, batch, threads, &|n| pb.inc(n))?;
    pb.finish_and_clear();
    Ok((items, emb))
}

/// The search of `probes` against `gallery` (see the module docs); the report, with the per-probe
/// CSV written into `out`.
pub fn evaluate(
    m: &LoadedModel,
    gallery: &Path,
    probes: &Path,
    batch: usize,
    threads: usize,
    out: &Path,
) -> Result<TargetReport> {
    let t0 = Instant::now();
    let (g_items, g_emb) = embed_side(m, gallery, "gallery", batch, threads)?;
    let (p_items, p_emb) = embed_side(m, probes, "probes", batch, threads)?;
    let (labels, templates) = identity_templates(&g_emb, &g_items.labels);
    let scores = similarity(&p_emb, &templates);
    let report: IdentificationReport =
        identify(&scores, &labels, &p_items.labels, &CMC_RANKS, &FPIR_TARGETS)
            .context("1:N identification")?;
    // Per probe: its label, the rank-1 gallery identity and score.
    let (best, arg) = scores.max_dim(1, false);
    let best = Vec::<f64>::try_from(best.to_kind(Kind::Double))?;
    let arg = Vec::<i64>::try_from(arg)?;
    let mut csv = String::from("probe,label,rank1_identity,rank1_score\n");
    for (i, name) in p_items.names.iter().enumerate() {
        csv.push_str(&format!(
            "{},{},{},{:.6}\n",
            csv_field(name),
            csv_field(&p_items.labels[i]),
            csv_field(&labels[arg[i] as usize]),
            best[i]
        ));
    }
    let csv_path = out.join("identification.csv");
    std::fs::write(&csv_path, csv).with_context(|| format!("writing {}", csv_path.display()))?;
    let file = |p: &Path| {
        if p.is_file() {
            FileRef::new(p).ok()
        } else {
            None
        }
    };
    Ok(TargetReport {
        name: "1:N".to_string(),
        kind: "identification".to_string(),
        files: [file(gallery), file(probes)]
            .into_iter()
            .flatten()
            .collect(),
        image_dir: Some(gallery.to_path_buf()),
        images: g_items.len() + p_items.len(),
        verification: None,
        xnorm: None,
        roc: None,
        plot: None,
        seconds: t0.elapsed().as_secs_f64(),
        identification: Some(report),
    })
}

/// `--ijb DIR --target T --ijb-1n`: the IJB 1:N protocol, one report per gallery (G1, G2).
pub fn evaluate_ijb_1n(
    m: &LoadedModel,
    dir: &Path,
    target: &str,
    opts: &facerec_evaluation::ijb::IjbOptions,
    batch: usize,
    threads: usize,
) -> Result<Vec<TargetReport>> {
    let t0 = Instant::now();
    let meta = facerec_evaluation::ijb_1n::Ijb1nMeta::load(dir, target)?;
    let pb = bar(
        meta.meta.faces.len() as u64,
        format!("{target} 1:N: align + embed"),
    );
    let model = |x: &tch::Tensor| m.embed(x);
    let results = facerec_evaluation::ijb_1n::evaluate(
        &model,
        &meta,
        m.input_size(),
        opts,
        batch as i64,
        threads,
        &|n| pb.inc(n),
    )?;
    pb.finish_and_clear();
    let files = meta
        .meta
        .files
        .iter()
        .chain(&meta.files)
        .map(|f| FileRef::new(f))
        .collect::<Result<Vec<_>>>()?;
    Ok(results
        .into_iter()
        .map(|r| TargetReport {
            name: format!("{} 1:N {}", r.target, r.gallery),
            kind: "ijb_1n".to_string(),
            files: files.clone(),
            image_dir: Some(meta.meta.image_dir.clone()),
            images: meta.meta.faces.len(),
            verification: None,
            xnorm: None,
            roc: None,
            plot: None,
            seconds: t0.elapsed().as_secs_f64(),
            identification: Some(r.report),
        })
        .collect())
}
