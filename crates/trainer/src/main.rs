//! The `facerec` command line. `cargo xtask train` runs `facerec train` with libtorch set up.
//!
//! One convention for every subcommand: inputs are named options, never positional. What holds a
//! model (a run directory or a `.safetensors`) is `--model` (`eval`, `cluster`, `export`); what
//! holds only a run's metrics is `--run` (`plot`); `train --resume RUN_DIR` continues a run.
//!
//! At process start the settings of `facerec-process` are applied: glibc keeps freed memory
//! (`FACEREC_MALLOC=keep`, the default: large tensors are not faulted in again every step;
//! `FACEREC_MALLOC=system` opts out) and OpenMP threads spin briefly, then sleep
//! (`GOMP_SPINCOUNT=3000` unless set, by one re-execution; `FACEREC_OMP_WAIT=passive|default`
//! changes it). `train`, `eval`, `cluster` and `compare` end with the settings and the peak
//! resident size on stderr, so the memory side of the trade is visible.

use anyhow::Result;
use clap::{Parser, Subcommand};
use facerec_trainer::{train, Config, RunOptions};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "facerec",
    about = "Train and evaluate face recognition models on libtorch"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model. With no --config: the embedded default (synthetic identities, small iResNet).
    Train {
        /// A TOML config (may `extends = "other.toml"`; `extends = "default"` is the embedded default).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a key, e.g. `--set optim.lr=0.05 --set train.epochs=2`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Print the resolved config and exit.
        #[arg(long)]
        print_config: bool,
        /// Continue the run in RUN_DIR from its newest checkpoint, with its own `config.toml`
        /// (plus any --set; changing the model or the number of classes is refused).
        #[arg(long, value_name = "RUN_DIR", conflicts_with = "config")]
        resume: Option<PathBuf>,
        /// With --resume: continue from this checkpoint (`step-N`) instead of the newest (the
        /// newer ones are set aside as `checkpoints/discarded-step-N`).
        #[arg(long, value_name = "STEP", requires = "resume")]
        resume_from: Option<String>,
        /// With --resume: accept --set changes that break an exact resume (head, optimiser
        /// settings, ...); they are logged and recorded in metrics.jsonl and config.toml.
        #[arg(long, requires = "resume")]
        allow_changes: bool,
        /// Print parameter counts, classifier and activation memory for the config, then exit.
        #[arg(long)]
        dry_run: bool,
        /// With --dry-run: report per-process memory and the bytes each process communicates per
        /// step for N data-parallel processes. (To train on N processes: `cargo xtask train
        /// --nproc N`, torchrun or srun; see docs/distributed.md.)
        #[arg(long, value_name = "N", requires = "dry_run")]
        nproc: Option<usize>,
    },
    /// Data preparation: `prep pack`, `prep check`, `prep lfw` (insightface RecordIO and .bin packs).
    Prep(facerec_trainer::commands::prep::Args),
    /// Train several configs over several seeds at the same budget and print one accuracy table.
    Compare(facerec_trainer::commands::compare::Args),
    /// Evaluate a trained model: `--model RUN_DIR` with `--bin FILE.bin`, `--pairs pairs.txt --images DIR`, or `--ijb DIR --target IJBC`.
    Eval(facerec_trainer::commands::eval::Args),
    /// Embed images with a trained model: `--model RUN_DIR --input DIR|FILE.rec|LIST --out FILE.npy|FILE.safetensors`.
    Embed(facerec_trainer::commands::embed::Args),
    /// Cluster a folder of faces: `--model RUN_DIR --images DIR [--method kmeans|finch|graph] --out FILE.csv`.
    Cluster(facerec_trainer::commands::cluster::Args),
    /// Export a run's backbone: `--model RUN_DIR --format safetensors|torchscript --out FILE`.
    Export(facerec_trainer::commands::export::Args),
    /// Draw loss, lr and verification accuracy over steps from a run's metrics.jsonl to PNG: `--run RUN_DIR [--out DIR]`.
    Plot(facerec_trainer::commands::plot::Args),
}

fn main() -> ExitCode {
    // Before anything else: it may re-execute the binary (OpenMP policy), and the allocator
    // thresholds apply to blocks allocated afterwards.
    let settings = match facerec_process::init() {
        Ok(policy) => policy,
        Err(err) => {
            eprintln!("error: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    let cli = Cli::parse();
    let report_memory = match &cli.command {
        Command::Train {
            print_config,
            dry_run,
            ..
        } => !print_config && !dry_run,
        Command::Eval(_) | Command::Cluster(_) | Command::Compare(_) => true,
        _ => false,
    };
    let result = run(cli);
    if report_memory {
        eprintln!(
            "{}; {}",
            facerec_process::peak_rss_line(),
            settings.describe()
        );
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train {
            config,
            overrides,
            print_config,
            resume,
            resume_from,
            allow_changes,
            dry_run,
            nproc,
        } => {
            let config = match &resume {
                Some(dir) => Some(dir.join("config.toml")),
                None => config,
            };
            let cfg = Config::load(config.as_deref(), &overrides)?;
            if print_config {
                print!("{}", cfg.to_toml());
                return Ok(());
            }
            if dry_run {
                return facerec_trainer::commands::dry_run::run(&cfg, nproc.unwrap_or(1));
            }
            train(
                &cfg,
                &RunOptions {
                    resume,
                    resume_from,
                    allow_changes,
                    ..RunOptions::default()
                },
            )?;
            Ok(())
        }
        Command::Prep(args) => facerec_trainer::commands::prep::run(args),
        Command::Eval(args) => facerec_trainer::commands::eval::run(args),
        Command::Compare(args) => facerec_trainer::commands::compare::run(args),
        Command::Cluster(args) => facerec_trainer::commands::cluster::run(args),
        Command::Embed(args) => facerec_trainer::commands::embed::run(args),
        Command::Export(args) => facerec_trainer::commands::export::run(args),
        Command::Plot(args) => facerec_trainer::commands::plot::run(args),
    }
}
