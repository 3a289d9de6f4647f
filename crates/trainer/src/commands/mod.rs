//! `facerec` subcommands other than `train`: one file each, with a clap `Args` struct and `run(args)`.

pub mod compare;
pub mod cluster;
pub mod eval;
pub mod prep;
