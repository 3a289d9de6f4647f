//! `facerec` subcommands other than `train`: one file each, with a clap `Args` struct and `run(args)`.
//! (`dry_run` is the `train --dry-run` report, called from `train`'s arguments.)

pub mod compare;
pub mod cluster;
pub mod dry_run;
pub mod eval;
pub mod export;
pub mod plot;
pub mod prep;
