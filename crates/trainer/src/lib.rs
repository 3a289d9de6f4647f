//! The facerec trainer: wires the library crates (backbone, loss heads, data, evaluation) into a
//! training run driven by a TOML config, and builds the `facerec` binary.
//!
//! Owns: configs ([`config`]), the optimisers with savable state ([`optim`]), mixed precision
//! ([`amp`]), LR schedules ([`schedule`]), checkpoints and resume ([`checkpoint`]), logs ([`log`])
//! the classifier memory check ([`memory`]) and the run itself ([`run`]).
//! Library crates never depend on this one.

pub mod amp;
pub mod checkpoint;
pub mod commands;
pub mod config;
pub mod device;
pub mod log;
pub mod memory;
pub mod objective;
pub mod optim;
pub mod run;
pub mod schedule;

pub use config::Config;
pub use run::{train, RunOptions, RunSummary, TargetResult};
