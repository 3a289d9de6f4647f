//! What a finished run reports (`summary.json` and the closing table).

use crate::eval_sets::TargetResult;
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
    /// Wall time of the training loop (evaluation excluded), seconds.
    pub train_seconds: f64,
    /// Mean training loss over the last logging window.
    pub final_loss: f64,
    /// Final verification per target.
    pub targets: Vec<TargetResult>,
    /// Targets skipped because their data is missing.
    pub skipped_targets: Vec<String>,
}
