//! What a finished run reports (`summary.json` and the closing table).

use crate::checkpoint::Segment;
use facerec_evaluation::VerificationReport;
use serde::Serialize;
use std::path::PathBuf;

/// What a run reports.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// The run directory.
    pub run_dir: PathBuf,
    /// Optimiser steps taken.
    pub steps: usize,
    /// Steps skipped by the NaN guard.
    pub skipped_steps: usize,
    /// Wall time of the training loop (evaluation excluded), seconds, summed over every segment
    /// of the run (the first run and each `--resume`) whose time is known.
    pub train_seconds: f64,
    /// Mean training loss over the last logging window of the run (when a resumed segment took no
    /// step, the last one `metrics.jsonl` holds).
    pub final_loss: f64,
    /// The run's segments, in order: where each started and stopped, and its training time.
    pub segments: Vec<Segment>,
    /// Final verification per target.
    pub targets: Vec<TargetResult>,
    /// Targets skipped because their data is missing.
    pub skipped_targets: Vec<String>,
}

/// Verification result of one target.
#[derive(Debug, Clone, Serialize)]
pub struct TargetResult {
    /// The target's name.
    pub name: String,
    /// Identities (0 for a fixed pair list, `.bin` or `pairs.txt`, whose identities are not known).
    pub identities: usize,
    /// Images.
    pub images: usize,
    /// The model's verification.
    pub model: VerificationReport,
    /// Mean L2 norm of the un-normalised embeddings.
    pub xnorm: f64,
    /// The same pairs verified on raw pixels (cosine of the flattened, flip-summed input).
    pub raw_pixels: VerificationReport,
}
