//! Run directory, `training.log`, `metrics.jsonl` and the console: an indicatif progress bar on a
//! terminal, plain lines otherwise. Vocabulary follows arcface_torch: samples/sec, loss, lr,
//! epoch, global step, ETA, plus the fraction of step time spent waiting for data.

use crate::summary::RunSummary;
use crate::summary::TargetResult;
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Create `<parent>/<name>-<UTC yyyymmdd-hhmmss>` (with a numeric suffix if it exists).
pub fn new_run_dir(parent: &Path, name: &str) -> Result<PathBuf> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    let stamp = format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    );
    for n in 0.. {
        let dir = if n == 0 {
            parent.join(format!("{name}-{stamp}"))
        } else {
            parent.join(format!("{name}-{stamp}-{n}"))
        };
        if !dir.exists() {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("creating run directory {}", dir.display()))?;
            return Ok(dir);
        }
    }
    unreachable!()
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Write `bytes` to `path` through a temporary file in the same folder and a rename, so a crash
/// never leaves a half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// What [`keep_records_through`] left in `metrics.jsonl`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct KeptRecords {
    /// Records dropped (of later steps, or a torn last line).
    pub dropped: usize,
    /// The loss of the last `train` record kept.
    pub last_loss: Option<f64>,
}

/// Before a run resumes from the checkpoint of `step`: drop the records of `metrics.jsonl` in `dir`
/// that lie after it (they are trained again, and would otherwise appear twice), and with
/// `drop_eval_at_step` also the `eval` records of `step` itself (the final evaluation, redone when
/// the checkpoint is the run's last). A torn last line (a killed write) goes too. The file is
/// replaced atomically; records without a step are kept.
pub fn keep_records_through(
    dir: &Path,
    step: usize,
    drop_eval_at_step: bool,
) -> Result<KeptRecords> {
    let path = dir.join("metrics.jsonl");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(KeptRecords::default());
    };
    let mut kept = String::with_capacity(text.len());
    let mut out = KeptRecords::default();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            out.dropped += 1;
            continue;
        };
        let at = v["step"].as_u64().map(|s| s as usize);
        let eval = v["kind"] == "eval";
        if at.is_some_and(|s| s > step || (s == step && eval && drop_eval_at_step)) {
            out.dropped += 1;
            continue;
        }
        if v["kind"] == "train" {
            out.last_loss = v["loss"].as_f64().or(out.last_loss);
        }
        kept.push_str(line);
        kept.push('\n');
    }
    if out.dropped > 0 {
        write_atomic(&path, kept.as_bytes())?;
    }
    Ok(out)
}

/// The console progress: a bar on a terminal, nothing otherwise (plain lines come from [`Logger`]).
pub struct Progress {
    bar: Option<ProgressBar>,
    started: Instant,
}

impl Progress {
    /// A bar of `total` steps when stdout is a terminal.
    pub fn new(total: u64) -> Self {
        let bar = std::io::stdout().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
                    .expect("static template"),
            );
            bar
        });
        Progress {
            bar,
            started: Instant::now(),
        }
    }
    /// No bar (ranks other than 0 of a data-parallel run).
    pub fn hidden() -> Self {
        Progress {
            bar: None,
            started: Instant::now(),
        }
    }
    /// Set the position.
    pub fn set(&mut self, pos: u64) {
        if let Some(b) = &self.bar {
            b.set_position(pos);
        }
    }
    /// Estimated seconds left.
    pub fn eta_seconds(&self, done: u64, total: u64) -> f64 {
        let per = self.started.elapsed().as_secs_f64() / done.max(1) as f64;
        per * total.saturating_sub(done) as f64
    }
    /// Remove the bar.
    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
    fn println(&self, line: &str, plain: bool) {
        match &self.bar {
            Some(b) if !plain => b.println(line),
            Some(_) => {}
            None => println!("{line}"),
        }
    }
    fn set_message(&self, msg: String) {
        if let Some(b) = &self.bar {
            b.set_message(msg);
        }
    }
}

/// Writes `training.log` and `metrics.jsonl` in the run directory and echoes to the console; or,
/// on the ranks of a data-parallel run other than 0, nothing at all ([`Logger::null`]).
pub struct Logger {
    files: Option<(File, File)>,
}

impl Logger {
    /// Create the two files in `dir`, or append to them (`append`, a resumed run).
    pub fn open(dir: &Path, append: bool) -> Result<Self> {
        let open = |name: &str| {
            let path = dir.join(name);
            std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(append)
                .truncate(!append)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))
        };
        Ok(Logger {
            files: Some((open("training.log")?, open("metrics.jsonl")?)),
        })
    }

    /// A logger that writes and prints nothing (ranks other than 0 of a data-parallel run).
    pub fn null() -> Self {
        Logger { files: None }
    }

    /// A free-form line (console and log).
    pub fn line(&mut self, text: &str) {
        if let Some((log, _)) = &mut self.files {
            println!("{text}");
            let _ = writeln!(log, "{text}");
        }
    }

    /// A line for `training.log` only, after it was shown by the progress bar.
    fn log_only(&mut self, text: &str) {
        if let Some((log, _)) = &mut self.files {
            let _ = writeln!(log, "{text}");
        }
    }

    /// A record for `metrics.jsonl` only (e.g. `kind = "resume"`).
    pub fn record(&mut self, value: &serde_json::Value) {
        if let Some((_, metrics)) = &mut self.files {
            let _ = writeln!(metrics, "{value}");
        }
    }

    /// A training log line from a `kind = "train"` record.
    /// `show_scale`: print the loss scaler's grad scale (mixed precision).
    pub fn train_line(
        &mut self,
        r: &serde_json::Value,
        total: usize,
        eta_s: f64,
        show_scale: bool,
        progress: &Progress,
    ) {
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        let scale = if show_scale {
            format!(" grad scale {}", f("grad_scale"))
        } else {
            String::new()
        };
        let text = format!(
            "epoch {} global step {}/{} loss {:.4} lr {:.6} samples/sec {:.1} data-wait {:.1}%{scale} ETA {}",
            r["epoch"], r["step"], total, f("loss"), f("lr"), f("samples_per_sec"), 100.0 * f("data_wait_fraction"), fmt_duration(eta_s)
        );
        if self.files.is_none() {
            return;
        }
        progress.set_message(format!(
            "loss {:.3} lr {:.4} {:.0} samples/s",
            f("loss"),
            f("lr"),
            f("samples_per_sec")
        ));
        progress.println(&text, true);
        self.log_only(&text);
        self.record(r);
    }

    /// One target's verification during or after training.
    pub fn eval_line(&mut self, step: usize, t: &TargetResult, best: f64, progress: &Progress) {
        let text = format!(
            "[{}] step {step}: accuracy {:.4} ± {:.4} (best {:.4}), XNorm {:.2}, VAL@FAR=1e-3 {:.4}; raw pixels {:.4}",
            t.name, t.model.accuracy_mean, t.model.accuracy_std, best, t.xnorm, t.model.val_mean, t.raw_pixels.accuracy_mean
        );
        if self.files.is_none() {
            return;
        }
        progress.println(&text, false);
        self.log_only(&text);
        self.record(&serde_json::json!({
            "kind": "eval", "step": step, "target": t.name, "accuracy": t.model.accuracy_mean,
            "accuracy_std": t.model.accuracy_std, "best": best, "xnorm": t.xnorm, "val_at_far_1e-3": t.model.val_mean,
        }));
    }

    /// The final table.
    pub fn summary(&mut self, s: &RunSummary) {
        self.line(&format!(
            "\ntrained {} steps in {} ({} skipped); final loss {:.4}; run directory {}",
            s.steps,
            fmt_duration(s.train_seconds),
            s.skipped_steps,
            s.final_loss,
            s.run_dir.display()
        ));
        self.line(&format!(
            "{:<22} {:>6} {:>6} {:>18} {:>18}",
            "target", "ids", "pairs", "model acc ± std", "raw-pixel acc ± std"
        ));
        for t in &s.targets {
            self.line(&format!(
                "{:<22} {:>6} {:>6} {:>10.4} ± {:.4} {:>10.4} ± {:.4}",
                t.name,
                t.identities,
                t.model.num_pairs,
                t.model.accuracy_mean,
                t.model.accuracy_std,
                t.raw_pixels.accuracy_mean,
                t.raw_pixels.accuracy_std
            ));
        }
        for name in &s.skipped_targets {
            self.line(&format!("{name:<22} skipped (data not found)"));
        }
    }
}

fn fmt_duration(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s / 60 % 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
