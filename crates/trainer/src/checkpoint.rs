//! Checkpoints: everything `--resume` needs, written so that a crash never damages a good one.
//!
//! A checkpoint is a folder `<run dir>/checkpoints/step-NNNNNNNN/` holding
//! - `model.safetensors`: the backbone, arcface_torch key names (BN running stats included);
//! - `classifier.safetensors`: the classifier weight;
//! - `optimizer.safetensors`: the optimiser's buffers and step count;
//! - `objective.safetensors`: method state (CoReFace's margin, cluster tables), when there is any;
//! - `meta.json`: [`Meta`] (step, epoch and position in the epoch's data order, scaler, counters,
//!   model description, the resolved config, the SHA-256 of every tensor file), written last.
//!
//! The folder is assembled under `.step-NNNNNNNN.partial` and renamed into place, so a checkpoint
//! either exists complete or not at all; older ones are deleted only after the new one is in place.
//! Randomness needs no saved generator state: the data order and augmentation derive from
//! `(seed, epoch, index)`, ElasticFace margins and Partial FC samples from `(seed, step)`, and the
//! torch generator is re-seeded from `(seed, step)` before every step.
//!
//! Loading checks names and shapes and names the file and the keys that differ. Resuming (and
//! `init.from` naming a checkpoint) first verifies every tensor file against the SHA-256 in
//! `meta.json` and the step against the folder name; checkpoints written before checksums
//! existed are accepted with a warning.

use crate::amp::ScalerState;
use crate::optim::Optimizer;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::Tensor;

/// Checkpoint format version written to `meta.json`.
pub const FORMAT: u32 = 1;

/// What a checkpoint says about the run besides its tensors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Meta {
    /// [`FORMAT`].
    pub format: u32,
    /// Optimiser steps completed.
    pub step: usize,
    /// The epoch in progress (or the next one when `batch_in_epoch` is 0).
    pub epoch: usize,
    /// Loader batches of `epoch` already consumed.
    pub batch_in_epoch: usize,
    /// The run seed (data order, augmentation, margins, sampling).
    pub seed: u64,
    /// Classifier rows.
    pub num_classes: usize,
    /// Training images and batches per epoch when the checkpoint was written, and a fingerprint of
    /// the current epoch's order: resuming on different data is refused.
    pub data: DataOrder,
    /// The backbone configuration (TOML).
    pub model: String,
    /// `sgd` or `adamw`.
    pub optimizer: String,
    /// Loss scaler.
    pub scaler: ScalerState,
    /// Steps skipped by the NaN guard so far, and the current run of consecutive ones.
    pub skipped_steps: usize,
    /// Consecutive non-finite steps at the time of writing.
    pub consecutive_bad: usize,
    /// Best verification accuracy per target so far.
    pub best: Vec<f64>,
    /// The resolved config of the run.
    pub config: String,
    /// Processes of the data-parallel run that wrote it (1 for checkpoints from before data
    /// parallelism). A run may resume on another number of processes when the global batch
    /// (processes x `train.batch_size` x `train.grad_accumulation`) stays the same.
    #[serde(default = "one")]
    pub world_size: usize,
    /// SHA-256 (hex) of each tensor file of the folder, by file name; filled in by [`save`].
    /// Empty in checkpoints from before checksums (accepted with a warning).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub checksums: BTreeMap<String, String>,
    /// The run's segments (the first run and every resume) up to this checkpoint, the last one
    /// ending at `step`; empty in checkpoints from before segments were recorded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub segments: Vec<Segment>,
}

/// One stretch of a run between a start (or `--resume`) and a checkpoint or the end.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Segment {
    /// The global step it started from.
    pub from_step: usize,
    /// The global step it reached.
    pub to_step: usize,
    /// Wall time of its training loop (evaluation excluded), seconds; `None` when unknown (the
    /// part of a run written by a facerec that did not record segments).
    pub train_seconds: Option<f64>,
}

fn one() -> usize {
    1
}

/// The data position stored in a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DataOrder {
    /// Training images.
    pub images: usize,
    /// Loader batches per epoch.
    pub batches_per_epoch: usize,
    /// FNV-1a hash of the current epoch's image order.
    pub order_fingerprint: u64,
}

/// FNV-1a over the indices (stable across platforms and versions).
pub fn fingerprint(order: &[usize]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &i in order {
        for b in (i as u64).to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Save every variable of `vs` to `path` (a `.safetensors` file) atomically.
pub fn save_varstore(vs: &VarStore, path: &Path) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // VarStore::save picks the format from the extension, so the temporary keeps `.safetensors`.
    let tmp = path.with_file_name(format!(".{name}.partial.safetensors"));
    vs.save(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// Save named tensors to `path` (a `.safetensors` file) atomically, as [`save_varstore`] does
/// for a store's variables.
pub fn save_named_atomic(named: &[(String, Tensor)], path: &Path) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.partial.safetensors"));
    Tensor::write_safetensors(named, &tmp).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// The folder of checkpoint `step` under `parent`.
pub fn step_dir(parent: &Path, step: usize) -> PathBuf {
    parent.join(format!("step-{step:08}"))
}

/// Write a checkpoint under `parent` (created if needed), then delete all but the newest `keep`.
/// Returns its folder.
pub fn save(
    parent: &Path,
    meta: &Meta,
    backbone: &VarStore,
    classifier: &VarStore,
    opt: &Optimizer,
    objective: &[(String, Tensor)],
    keep: usize,
) -> Result<PathBuf> {
    let mut named: Vec<(String, Tensor)> = classifier.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    save_named(
        parent,
        meta,
        backbone,
        &named,
        &opt.state_tensors(),
        objective,
        keep,
    )
}

/// [`save`] with the classifier and the optimiser state given as named tensors: a model-parallel
/// run passes the whole classifier and the whole optimiser state gathered on rank 0, so its
/// checkpoint is the one a single process writes.
pub fn save_named(
    parent: &Path,
    meta: &Meta,
    backbone: &VarStore,
    classifier: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
    objective: &[(String, Tensor)],
    keep: usize,
) -> Result<PathBuf> {
    std::fs::create_dir_all(parent)
        .with_context(|| format!("creating checkpoint folder {}", parent.display()))?;
    let dest = step_dir(parent, meta.step);
    let tmp = parent.join(format!(".step-{:08}.partial", meta.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    backbone
        .save(tmp.join("model.safetensors"))
        .with_context(|| format!("writing {}", tmp.join("model.safetensors").display()))?;
    Tensor::write_safetensors(classifier, tmp.join("classifier.safetensors"))
        .with_context(|| format!("writing {}", tmp.join("classifier.safetensors").display()))?;
    Tensor::write_safetensors(optimizer, tmp.join("optimizer.safetensors"))
        .with_context(|| format!("writing {}", tmp.join("optimizer.safetensors").display()))?;
    if !objective.is_empty() {
        Tensor::write_safetensors(objective, tmp.join("objective.safetensors"))
            .with_context(|| format!("writing {}", tmp.join("objective.safetensors").display()))?;
    }
    let mut meta = meta.clone();
    for name in TENSOR_FILES {
        let path = tmp.join(name);
        if path.is_file() {
            meta.checksums.insert(name.to_string(), sha256_file(&path)?);
        }
    }
    let json = serde_json::to_vec_pretty(&meta)?;
    std::fs::write(tmp.join("meta.json"), json)
        .with_context(|| format!("writing {}", tmp.join("meta.json").display()))?;
    sync_dir_files(&tmp)?;
    if dest.exists() && !dest.join("meta.json").is_file() {
        eprintln!("warning: replacing the incomplete checkpoint folder {} (no meta.json) with a new checkpoint of the same step", dest.display());
    }
    if dest.exists() {
        // The same step written again (a resumed run reaching it anew): swap, then drop the old one.
        let old = parent.join(format!(".step-{:08}.old", meta.step));
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(&dest, &old).with_context(|| format!("moving aside {}", dest.display()))?;
        std::fs::rename(&tmp, &dest)
            .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, &dest)
            .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    }
    prune(parent, keep)?;
    Ok(dest)
}

/// The tensor files a checkpoint folder may hold (each with its checksum in `meta.json`).
pub const TENSOR_FILES: [&str; 4] = [
    "model.safetensors",
    "classifier.safetensors",
    "optimizer.safetensors",
    "objective.safetensors",
];

/// SHA-256 of a file's contents, lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// How to continue from an older checkpoint when the newest one of `dir`'s run is unusable:
/// `--resume-from` the newest older one (the run directory is `dir`'s grandparent).
fn fall_back_hint(dir: &Path) -> String {
    let parent = dir.parent().unwrap_or(Path::new("."));
    let run_dir = parent.parent().unwrap_or(Path::new("."));
    let older: Vec<String> = list(parent)
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, d)| d != dir)
        .map(|(_, d)| {
            d.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect();
    match older.last() {
        None => format!(
            "no older checkpoint is left in {}; start the run again",
            parent.display()
        ),
        Some(previous) => format!(
            "to fall back to the previous checkpoint: facerec train --resume {} --resume-from {previous} (checkpoints there: {})",
            run_dir.display(),
            older.join(", ")
        ),
    }
}

/// The complete checkpoint `name` of a run directory (`--resume-from`): `step-N` (any zero
/// padding) or `N`. Errors list the checkpoints there.
pub fn named(run_dir: &Path, name: &str) -> Result<PathBuf> {
    let parent = run_dir.join("checkpoints");
    let all = list(&parent)?;
    let names = || {
        let v: Vec<String> = all
            .iter()
            .filter_map(|(_, d)| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(", ")
        }
    };
    let Some(step) = name
        .trim()
        .strip_prefix("step-")
        .unwrap_or(name.trim())
        .parse::<usize>()
        .ok()
    else {
        bail!(
            "--resume-from {name:?}: expected a checkpoint name such as step-00000004 or a step number (checkpoints in {}: {})",
            parent.display(),
            names()
        );
    };
    match all.iter().find(|(s, _)| *s == step) {
        Some((_, dir)) => Ok(dir.clone()),
        None => bail!(
            "--resume-from {name}: {} holds no complete checkpoint of step {step} (complete ones: {})",
            parent.display(),
            names()
        ),
    }
}

/// Move the complete checkpoints of steps after `step` out of the way (renamed to
/// `discarded-step-N`, kept for inspection, never listed or pruned): a run resumed from an older
/// checkpoint continues from there, and a later `--resume` must not pick the newer ones. Returns
/// the new names. (Newer folders without `meta.json` stay: [`save`] replaces them, with a warning.)
pub fn set_aside_newer(parent: &Path, step: usize) -> Result<Vec<PathBuf>> {
    let newer = list(parent)?.into_iter().filter(|(s, _)| *s > step);
    let mut moved = Vec::new();
    for (_, dir) in newer {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut to = parent.join(format!("discarded-{name}"));
        for n in 1.. {
            if !to.exists() {
                break;
            }
            to = parent.join(format!("discarded-{name}-{n}"));
        }
        std::fs::rename(&dir, &to)
            .with_context(|| format!("moving {} aside to {}", dir.display(), to.display()))?;
        moved.push(to);
    }
    Ok(moved)
}

/// Verify the tensor files of checkpoint folder `dir` against the checksums of its `meta`.
/// Returns a warning to log when the checkpoint has no checksums (written by an older facerec).
pub fn verify(dir: &Path, meta: &Meta) -> Result<Option<String>> {
    if meta.checksums.is_empty() {
        return Ok(Some(format!("warning: {} has no checksums (written by an older facerec); its tensor files are not verified", dir.join("meta.json").display())));
    }
    for (name, want) in &meta.checksums {
        if !TENSOR_FILES.contains(&name.as_str()) {
            bail!(
                "{}: lists a checksum for {name:?}, which is not a checkpoint file (expected one of {}); the file was edited or is corrupt; {}",
                dir.join("meta.json").display(),
                TENSOR_FILES.join(", "),
                fall_back_hint(dir)
            );
        }
        verify_one(dir, name, want)?;
    }
    Ok(None)
}

fn verify_one(dir: &Path, name: &str, want: &str) -> Result<()> {
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{}: missing, though {} lists it; the checkpoint is incomplete; {}",
            path.display(),
            dir.join("meta.json").display(),
            fall_back_hint(dir)
        );
    }
    let got = sha256_file(&path)?;
    if got != want {
        bail!(
            "{}: corrupt checkpoint file (SHA-256 {got}, meta.json recorded {want}); {}",
            path.display(),
            fall_back_hint(dir)
        );
    }
    Ok(())
}

/// When `file` lies in a checkpoint folder (a `meta.json` beside it that records its checksum),
/// verify it. Files without a recorded checksum (a run's final model) are accepted.
pub fn verify_if_checkpoint(file: &Path) -> Result<()> {
    let Some(dir) = file.parent() else {
        return Ok(());
    };
    if !dir.join("meta.json").is_file() {
        return Ok(());
    }
    let meta = read_meta(dir)?;
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match meta.checksums.get(&name) {
        Some(want) => verify_one(dir, &name, want),
        None => Ok(()),
    }
}

/// fsync every file of `dir` and the folder itself, so the rename publishes durable data.
fn sync_dir_files(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", path.display()))?;
    }
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

/// Complete checkpoints under `parent`, oldest first.
pub fn list(parent: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Ok(out);
    };
    for entry in entries {
        let path = entry
            .with_context(|| format!("listing {}", parent.display()))?
            .path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<usize>().ok())
        {
            if path.join("meta.json").is_file() {
                out.push((step, path));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// `step-*` folders under `parent` that are not complete checkpoints (no `meta.json`).
pub fn incomplete(parent: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.strip_prefix("step-")
                .is_some_and(|s| s.parse::<usize>().is_ok())
                && p.is_dir()
                && !p.join("meta.json").is_file()
        })
        .collect();
    out.sort();
    out
}

fn prune(parent: &Path, keep: usize) -> Result<()> {
    let all = list(parent)?;
    for (_, dir) in all.iter().take(all.len().saturating_sub(keep)) {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("deleting old checkpoint {}", dir.display()))?;
    }
    remove_stale_leftovers(parent);
    Ok(())
}

/// Removes the `.step-N.partial` and `.step-N.old` folders a process killed inside [`save`] can
/// leave behind, but only those whose step has no complete checkpoint left to lose: when
/// `step-N/meta.json` exists (the write or the swap finished) or step N was pruned (older than
/// every kept checkpoint). A leftover of a step with no complete folder is kept: it may be the
/// only copy of that step.
fn remove_stale_leftovers(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let oldest_kept = list(parent).ok().and_then(|l| l.first().map(|(s, _)| *s));
    for path in entries.flatten().map(|e| e.path()) {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let step = name
            .strip_prefix(".step-")
            .and_then(|r| {
                r.strip_suffix(".partial")
                    .or_else(|| r.strip_suffix(".old"))
            })
            .and_then(|n| n.parse::<usize>().ok());
        let Some(step) = step else { continue };
        let complete = step_dir(parent, step).join("meta.json").is_file();
        let pruned = oldest_kept.is_some_and(|oldest| step < oldest);
        if complete || pruned {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// The newest complete checkpoint of a run directory.
pub fn latest(run_dir: &Path) -> Result<PathBuf> {
    Ok(latest_noting(run_dir)?.0)
}

/// The newest complete checkpoint of a run directory, and the newer `step-*` folders passed over
/// because they hold no `meta.json` (to be reported).
pub fn latest_noting(run_dir: &Path) -> Result<(PathBuf, Vec<PathBuf>)> {
    let parent = run_dir.join("checkpoints");
    let bad = incomplete(&parent);
    match list(&parent)?.pop() {
        Some((step, dir)) => {
            let newer = bad.into_iter().filter(|p| p.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("step-")).and_then(|s| s.parse::<usize>().ok()).is_some_and(|s| s > step)).collect();
            Ok((dir, newer))
        }
        None if !bad.is_empty() => bail!(
            "{}: no complete checkpoint to resume from; {} have no meta.json (incomplete or emptied)",
            run_dir.display(),
            bad.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        ),
        None => bail!("{}: no complete checkpoint to resume from (looked for checkpoints/step-*/meta.json)", run_dir.display()),
    }
}

/// Read `meta.json` of a checkpoint folder.
pub fn read_meta(dir: &Path) -> Result<Meta> {
    let path = dir.join("meta.json");
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let meta: Meta = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{}: not a facerec checkpoint description (corrupt?)",
            path.display()
        )
    })?;
    if meta.format != FORMAT {
        bail!(
            "{}: checkpoint format {} (this facerec reads {FORMAT})",
            path.display(),
            meta.format
        );
    }
    let folder = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("step-"))
        .and_then(|s| s.parse::<usize>().ok());
    if let Some(step) = folder {
        if step != meta.step {
            bail!(
                "{}: says step {}, but its folder is {} (edited or misplaced?); {}",
                path.display(),
                meta.step,
                dir.display(),
                fall_back_hint(dir)
            );
        }
    }
    Ok(meta)
}

/// Read a `.safetensors` file, naming it on failure.
pub fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let list = Tensor::read_safetensors(path).with_context(|| {
        format!(
            "reading {} (not a safetensors file, or corrupt or truncated)",
            path.display()
        )
    })?;
    Ok(list.into_iter().collect())
}

/// The keys of a tensor file compared with the variables of a model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyReport {
    /// Model variables the file lacks.
    pub missing: Vec<String>,
    /// File entries the model does not have.
    pub unexpected: Vec<String>,
    /// `(key, file shape, model shape)` where both have the key with different shapes.
    pub mismatched: Vec<(String, Vec<i64>, Vec<i64>)>,
}

impl KeyReport {
    /// Compare `file` with `vars`.
    pub fn compare(file: &HashMap<String, Tensor>, vars: &HashMap<String, Tensor>) -> Self {
        let fk: BTreeSet<&String> = file.keys().collect();
        let vk: BTreeSet<&String> = vars.keys().collect();
        KeyReport {
            missing: vk.difference(&fk).map(|s| s.to_string()).collect(),
            unexpected: fk.difference(&vk).map(|s| s.to_string()).collect(),
            mismatched: fk
                .intersection(&vk)
                .filter(|k| file[**k].size() != vars[**k].size())
                .map(|k| (k.to_string(), file[*k].size(), vars[*k].size()))
                .collect(),
        }
    }

    /// True when names and shapes agree exactly.
    pub fn is_exact(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }

    /// A readable description (lists are cut after 10 entries).
    pub fn describe(&self) -> String {
        let list = |v: &[String]| {
            let mut s = v.iter().take(10).cloned().collect::<Vec<_>>().join(", ");
            if v.len() > 10 {
                s.push_str(&format!(", ... ({} in all)", v.len()));
            }
            s
        };
        let mut parts = Vec::new();
        if !self.missing.is_empty() {
            parts.push(format!("missing keys: {}", list(&self.missing)));
        }
        if !self.unexpected.is_empty() {
            parts.push(format!("unexpected keys: {}", list(&self.unexpected)));
        }
        for (k, f, m) in self.mismatched.iter().take(10) {
            parts.push(format!(
                "`{k}` has shape {f:?} in the file, {m:?} in the model"
            ));
        }
        if parts.is_empty() {
            "all keys match".into()
        } else {
            parts.join("; ")
        }
    }
}

/// Copy `file`'s tensors into the variables of `vs` with the same names (no autograd).
pub fn copy_into(vs: &VarStore, file: &HashMap<String, Tensor>) {
    let _guard = tch::no_grad_guard();
    for (name, mut var) in vs.variables() {
        if let Some(src) = file.get(&name) {
            var.copy_(&src.to_kind(var.kind()).to_device(var.device()));
        }
    }
}

/// Load `path` into `vs`, requiring exactly the same names and shapes; the error names the file
/// and the keys that differ.
pub fn load_exact(vs: &VarStore, path: &Path, what: &str) -> Result<()> {
    copy_exact(vs, read_tensors(path)?, path, what)
}

/// Copy `file` (read from `path`) into `vs`, requiring exactly the same names and shapes.
fn copy_exact(vs: &VarStore, file: HashMap<String, Tensor>, path: &Path, what: &str) -> Result<()> {
    let report = KeyReport::compare(&file, &vs.variables());
    if !report.is_exact() {
        bail!(
            "{}: this {what} does not fit the configured model ({})",
            path.display(),
            report.describe()
        );
    }
    copy_into(vs, &file);
    Ok(())
}

/// Rows `[start, start + len)` (dimension 0) of every tensor of `file`: a model-parallel rank's
/// block of a whole classifier (or of its optimiser state). Every tensor must have
/// `num_classes` rows; the error names `origin` and the tensor.
pub fn narrow_rows(
    file: HashMap<String, Tensor>,
    (start, len, num_classes): (i64, i64, i64),
    origin: &Path,
) -> Result<HashMap<String, Tensor>> {
    file.into_iter()
        .map(|(k, t)| {
            if t.dim() == 0 || t.size()[0] != num_classes {
                bail!(
                    "{}: `{k}` has shape {:?}, expected {num_classes} class rows (a whole classifier) to take this rank's block from",
                    origin.display(),
                    t.size()
                );
            }
            Ok((k, t.narrow(0, start, len).contiguous()))
        })
        .collect()
}

/// [`load_exact`] of this rank's block of rows `(start, len, num_classes)` of a whole classifier
/// file (`None`: the whole file).
pub fn load_exact_rows(
    vs: &VarStore,
    path: &Path,
    what: &str,
    rows: Option<(i64, i64, i64)>,
) -> Result<()> {
    let Some(rows) = rows else {
        return load_exact(vs, path, what);
    };
    copy_exact(
        vs,
        narrow_rows(read_tensors(path)?, rows, path)?,
        path,
        what,
    )
}

/// The state tensors of a checkpoint's optimiser file.
pub fn read_optimizer(dir: &Path) -> Result<HashMap<String, Tensor>> {
    read_tensors(&dir.join("optimizer.safetensors"))
}

/// The objective's state of a checkpoint (empty when it has none).
pub fn read_objective(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let path = dir.join("objective.safetensors");
    if path.exists() {
        read_tensors(&path)
    } else {
        Ok(HashMap::new())
    }
}

/// Resolve `init.from`: a `.safetensors` or PyTorch `.pt`/`.pth` file, a run directory (its `model.safetensors`, else its
/// newest checkpoint), or a checkpoint directory.
pub fn resolve_init(path: &Path) -> Result<PathBuf> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if path.is_dir() {
        let direct = path.join("model.safetensors");
        if direct.is_file() {
            return Ok(direct);
        }
        if let Ok(dir) = latest(path) {
            return Ok(dir.join("model.safetensors"));
        }
        bail!(
            "config key `init.from`: {} holds neither model.safetensors nor checkpoints/step-*",
            path.display()
        );
    }
    bail!("config key `init.from`: {} does not exist", path.display())
}

/// A key without its `module.` (DataParallel / DistributedDataParallel) and `backbone.` prefixes.
pub fn strip_wrapper_prefixes(k: &str) -> String {
    let mut k = k;
    for prefix in ["module.", "backbone."] {
        if let Some(rest) = k.strip_prefix(prefix) {
            k = rest;
        }
    }
    k.to_string()
}

/// Backbone weights from a `.safetensors` file or a PyTorch `.pt`/`.pth` state dict
/// ([`crate::torch_pt`]), keys with their wrapper prefixes stripped ([`strip_wrapper_prefixes`]).
pub fn read_weights(path: &Path) -> Result<HashMap<String, Tensor>> {
    let raw: Vec<(String, Tensor)> = if crate::torch_pt::is_torch_file(path) {
        crate::torch_pt::read_state_dict(path)?
    } else {
        read_tensors(path)?.into_iter().collect()
    };
    Ok(raw
        .into_iter()
        .map(|(k, t)| (strip_wrapper_prefixes(&k), t))
        .collect())
}

/// Fine-tuning: load backbone weights from `path` (`.safetensors`, or a PyTorch `.pt`/`.pth`
/// state dict as arcface_torch saves it) into `vs`. Keys may carry a `module.` prefix
/// (DataParallel) or `backbone.` prefix; both are stripped. Shape mismatches are always an error;
/// missing keys are an error when `strict`. Returns the report (to be logged).
pub fn init_backbone(vs: &VarStore, path: &Path, strict: bool) -> Result<KeyReport> {
    let file = resolve_init(path)?;
    verify_if_checkpoint(&file).context("config key `init.from`")?;
    let tensors = read_weights(&file).context("config key `init.from`")?;
    let report = KeyReport::compare(&tensors, &vs.variables());
    if !report.mismatched.is_empty() || (strict && !report.missing.is_empty()) {
        bail!(
            "config key `init.from`: {} does not fit the configured backbone ({}){}",
            file.display(),
            report.describe(),
            if strict && !report.missing.is_empty() {
                "; set init.strict = false to start the missing ones from random init"
            } else {
                ""
            }
        );
    }
    if report.missing.len() == vs.variables().len() {
        bail!(
            "config key `init.from`: {} shares no key with the configured backbone ({})",
            file.display(),
            report.describe()
        );
    }
    copy_into(vs, &tensors);
    Ok(report)
}

/// With `init.classifier`: load `classifier.safetensors` from beside the backbone file that
/// `init.from` resolves to, exactly.
pub fn init_classifier(vs: &VarStore, from: &Path) -> Result<PathBuf> {
    init_classifier_rows(vs, from, None)
}

/// [`init_classifier`] of this rank's block of rows `(start, len, num_classes)` (model parallel).
pub fn init_classifier_rows(
    vs: &VarStore,
    from: &Path,
    rows: Option<(i64, i64, i64)>,
) -> Result<PathBuf> {
    let model = resolve_init(from)?;
    let path = model.with_file_name("classifier.safetensors");
    if !path.is_file() {
        bail!("config key `init.classifier`: {} has no classifier.safetensors beside it (point init.from at a run or checkpoint folder)", model.display());
    }
    verify_if_checkpoint(&path).context("config key `init.classifier`")?;
    load_exact_rows(vs, &path, "classifier (init.classifier)", rows)
        .context("config key `init.classifier`")?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, Device, Kind};

    #[test]
    fn save_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let w = (vs.root() / "fc").randn("weight", &[3, 2], 0.0, 1.0);
        let path = dir.path().join("model.safetensors");
        save_varstore(&vs, &path).unwrap();
        let vs2 = nn::VarStore::new(Device::Cpu);
        let w2 = (vs2.root() / "fc").zeros("weight", &[3, 2]);
        load_exact(&vs2, &path, "model").unwrap();
        assert!(w.equal(&w2));
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary left behind"
        );
    }

    #[test]
    fn mismatched_model_is_described() {
        let dir = tempfile::tempdir().unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = (vs.root() / "fc").randn("weight", &[3, 2], 0.0, 1.0);
        let _ = (vs.root() / "old").randn("bias", &[2], 0.0, 1.0);
        let path = dir.path().join("model.safetensors");
        save_varstore(&vs, &path).unwrap();
        let vs2 = nn::VarStore::new(Device::Cpu);
        let _ = (vs2.root() / "fc").zeros("weight", &[4, 2]);
        let _ = (vs2.root() / "new").zeros("bias", &[2]);
        let err = load_exact(&vs2, &path, "model").unwrap_err().to_string();
        assert!(err.contains("missing keys: new.bias"), "{err}");
        assert!(err.contains("unexpected keys: old.bias"), "{err}");
        assert!(
            err.contains("`fc.weight` has shape [3, 2] in the file, [4, 2] in the model"),
            "{err}"
        );
    }

    #[test]
    fn init_strips_prefixes_and_lists_keys() {
        let dir = tempfile::tempdir().unwrap();
        let src = Tensor::from_slice(&[1.0f32, 2.0]);
        let extra = Tensor::from_slice(&[0.0f32]);
        let path = dir.path().join("r.safetensors");
        Tensor::write_safetensors(
            &[
                ("module.conv.weight", &src),
                ("module.fc_head.weight", &extra),
            ],
            &path,
        )
        .unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let w = (vs.root() / "conv").zeros("weight", &[2]);
        let _ = (vs.root() / "bn").zeros("bias", &[2]);
        assert!(init_backbone(&vs, &path, true)
            .unwrap_err()
            .to_string()
            .contains("missing keys: bn.bias"));
        let report = init_backbone(&vs, &path, false).unwrap();
        assert_eq!(report.missing, vec!["bn.bias".to_string()]);
        assert_eq!(report.unexpected, vec!["fc_head.weight".to_string()]);
        assert!(w.equal(&src));
    }

    #[test]
    fn prune_keeps_newest_and_ignores_partials() {
        let dir = tempfile::tempdir().unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let w = (vs.root() / "fc")
            .randn("weight", &[2, 2], 0.0, 1.0)
            .set_requires_grad(true);
        let opt = Optimizer::sgd(
            vec![crate::optim::ParamGroup::new(vec![w], 0.0)],
            0.9,
            false,
        );
        let meta = |step| Meta {
            format: FORMAT,
            step,
            epoch: 0,
            batch_in_epoch: step,
            seed: 1,
            num_classes: 2,
            data: DataOrder {
                images: 4,
                batches_per_epoch: 2,
                order_fingerprint: 0,
            },
            model: String::new(),
            optimizer: "sgd".into(),
            scaler: ScalerState {
                scale: 1.0,
                growth_tracker: 0,
            },
            skipped_steps: 0,
            consecutive_bad: 0,
            best: vec![],
            config: String::new(),
            world_size: 1,
            checksums: BTreeMap::new(),
            segments: vec![Segment {
                from_step: 0,
                to_step: step,
                train_seconds: Some(0.5),
            }],
        };
        // Leftovers of a killed save: a partial write of a later step (kept: it may be the only
        // copy), the swapped-out old folder of a step whose new folder is complete and the
        // old folder of a step since pruned (both removed).
        for leftover in [
            ".step-00000009.partial",
            ".step-00000003.old",
            ".step-00000000.old",
        ] {
            std::fs::create_dir_all(dir.path().join(leftover)).unwrap();
        }
        for step in [1, 2, 3, 4] {
            save(dir.path(), &meta(step), &vs, &vs, &opt, &[], 2).unwrap();
        }
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [".step-00000009.partial", "step-00000003", "step-00000004"]
        );
        let steps: Vec<usize> = list(dir.path())
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(steps, vec![3, 4]);
        let read = read_meta(&step_dir(dir.path(), 4)).unwrap();
        assert_eq!(
            Meta {
                checksums: BTreeMap::new(),
                ..read.clone()
            },
            meta(4)
        );
        assert_eq!(
            read.checksums.len(),
            3,
            "model, classifier and optimizer files: {:?}",
            read.checksums
        );
        assert!(verify(&step_dir(dir.path(), 4), &read).unwrap().is_none());
        let state = read_optimizer(&step_dir(dir.path(), 4)).unwrap();
        assert_eq!(i64::try_from(&state["steps"]).unwrap(), 0);
        let _ = Kind::Float;
    }
}
