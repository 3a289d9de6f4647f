//! The facerec trainer: wires the library crates (backbone, loss heads, data, evaluation) into a
//! training run driven by a TOML config, and builds the `facerec` binary.
//!
//! Owns: configs ([`config`]), the optimisers with savable state ([`optim`]), mixed precision
//! ([`amp`]), LR schedules ([`schedule`]), checkpoints ([`checkpoint`]), logs ([`log`]), and the
//! run, split by job: the training data ([`sources`]), the evaluation sets ([`eval_sets`]), the
//! model in its precision ([`model`]), the checkpointed state ([`state`]), one optimiser step
//! ([`step`]), the loop ([`run`]) and its report ([`summary`]); the data-parallel processes in [`world`]; the model-parallel classifier in [`model_parallel`]; the classifier memory check in [`memory`]. Training objectives (margin softmax,
//! CoReFace, cluster-guided) are in [`objective`]; the `facerec` subcommands in [`commands`].
//! See docs/architecture.md.
//! Library crates never depend on this one.

pub mod amp;
pub mod checkpoint;
pub mod commands;
pub mod config;
pub mod device;
pub mod eval_sets;
pub mod log;
pub mod memory;
pub mod model;
pub mod model_parallel;
pub mod objective;
pub mod optim;
pub mod run;
pub mod schedule;
pub mod sources;
pub mod state;
pub mod step;
pub mod summary;
pub mod torch_pt;
pub mod world;

pub use config::Config;
pub use run::{train, RunOptions};
pub use summary::RunSummary;
pub use summary::TargetResult;
