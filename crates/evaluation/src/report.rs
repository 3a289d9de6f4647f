//! What an evaluation run writes: a JSON report and a short text report naming the model checkpoint, each
//! data file with its SHA-256, the options, and every target's numbers (so a number can always be traced
//! to exactly what produced it).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::roc::RocReport;
use crate::verification::VerificationReport;

/// SHA-256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("reading {}", path.display()))?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// A file that went into a result.
#[derive(Debug, Clone, Serialize)]
pub struct FileRef {
    pub path: PathBuf,
    pub sha256: String,
}

impl FileRef {
    /// Hash `path`.
    pub fn new(path: &Path) -> Result<Self> {
        Ok(Self {
            path: path.to_path_buf(),
            sha256: sha256_file(path)?,
        })
    }
}

/// One evaluated target.
#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    /// Display name (file stem or IJB target).
    pub name: String,
    /// `bin`, `pairs` or `ijb`.
    pub kind: String,
    /// The data files read (pack, pair list, metadata), with hashes.
    pub files: Vec<FileRef>,
    /// Image folder, when the images are loose files (not hashed).
    pub image_dir: Option<PathBuf>,
    /// Images embedded.
    pub images: usize,
    /// insightface 10-fold verification (bin, pairs).
    pub verification: Option<VerificationReport>,
    /// Mean norm of the un-normalised embeddings (bin, pairs).
    pub xnorm: Option<f64>,
    /// ROC operating points, AUC, EER.
    pub roc: Option<RocReport>,
    /// The ROC plot written for this target.
    pub plot: Option<PathBuf>,
    /// 1:N identification metrics (`facerec eval --gallery --probes`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identification: Option<crate::identification::IdentificationReport>,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// A whole evaluation run.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// The checkpoint evaluated.
    pub model: FileRef,
    /// The model config file it was built from.
    pub model_config: Option<FileRef>,
    /// The options of the run (command line), as JSON.
    pub options: serde_json::Value,
    /// The device used.
    pub device: String,
    pub targets: Vec<TargetReport>,
}

impl EvalReport {
    /// A short human-readable report.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "model      {}  sha256 {}",
            self.model.path.display(),
            self.model.sha256
        );
        if let Some(c) = &self.model_config {
            let _ = writeln!(s, "config     {}  sha256 {}", c.path.display(), c.sha256);
        }
        let _ = writeln!(s, "device     {}", self.device);
        let _ = writeln!(s, "options    {}", self.options);
        for t in &self.targets {
            let _ = writeln!(
                s,
                "\n[{}] ({}, {} images, {:.1} s)",
                t.name, t.kind, t.images, t.seconds
            );
            for f in &t.files {
                let _ = writeln!(s, "  file     {}  sha256 {}", f.path.display(), f.sha256);
            }
            if let Some(d) = &t.image_dir {
                let _ = writeln!(s, "  images   {}", d.display());
            }
            if let Some(v) = &t.verification {
                let _ = writeln!(
                    s,
                    "  Accuracy-Flip {:.5} +- {:.5} over {} pairs, {} folds; thresholds {:?}",
                    v.accuracy_mean,
                    v.accuracy_std,
                    v.num_pairs,
                    v.fold_accuracies.len(),
                    v.fold_thresholds
                );
                let _ = writeln!(
                    s,
                    "  VAL@FAR=1e-3 {:.5} +- {:.5} (FAR {:.5})",
                    v.val_mean, v.val_std, v.far_mean
                );
            }
            if let Some(x) = t.xnorm {
                let _ = writeln!(s, "  XNorm {x:.5}");
            }
            if let Some(r) = &t.identification {
                s.push_str(&r.to_text());
            }
            if let Some(r) = &t.roc {
                let _ = writeln!(
                    s,
                    "  ROC over {} genuine / {} impostor pairs: AUC {:.6}, EER {:.6}",
                    r.num_genuine, r.num_impostor, r.auc, r.eer
                );
                for p in &r.tar_at_far {
                    let _ = writeln!(
                        s,
                        "  TAR@FAR={:<7e} {:.5}  (at FAR {:.3e}; best at FAR <= target {:.5})",
                        p.far, p.tar, p.far_actual, p.tar_at_or_below
                    );
                }
            }
            if let Some(p) = &t.plot {
                let _ = writeln!(s, "  plot     {}", p.display());
            }
        }
        s
    }

    /// Write `report.json` and `report.txt` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = serde_json::to_string_pretty(self)?;
        for (name, body) in [("report.json", json), ("report.txt", self.to_text())] {
            let path = dir.join(name);
            std::fs::write(&path, body).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }
}
