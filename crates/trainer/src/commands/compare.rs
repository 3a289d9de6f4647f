//! `facerec compare`: train several configs at the same budget over several seeds and print one
//! table: per method and target, the mean over seeds of the 10-fold accuracy, the spread over
//! seeds, the mean fold std, and the raw-pixel baseline. Each run keeps its own run directory.
//!
//! ```text
//! facerec compare --config a.toml --config b.toml --seeds 1,2,3 [--set k=v ...] [--out table.md]
//! ```
//! The same `--set` overrides go to every config (e.g. `train.epochs=40`), so the budget is equal
//! by construction; a config that changes the budget says so in its own file.

use crate::{train, Config, RunOptions};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Arguments of `facerec compare`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A training config; repeat for each method. The label is the file stem.
    #[arg(long = "config", required = true)]
    pub configs: Vec<PathBuf>,
    /// Seeds, comma separated. Each config runs once per seed.
    #[arg(long, default_value = "2048", value_delimiter = ',')]
    pub seeds: Vec<u64>,
    /// Overrides applied to every config.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Also write the table (Markdown) here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Accuracies of one (config, target) over the seeds.
#[derive(Default)]
struct Cell {
    accuracy: Vec<f64>,
    fold_std: Vec<f64>,
    raw: f64,
    seconds: Vec<f64>,
}

/// Mean and population standard deviation.
fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    (
        m,
        (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n).sqrt(),
    )
}

/// Run the comparison.
pub fn run(args: Args) -> Result<()> {
    if args.seeds.is_empty() {
        bail!("--seeds: give at least one seed");
    }
    let mut cells: BTreeMap<(usize, String), Cell> = BTreeMap::new();
    for (ci, path) in args.configs.iter().enumerate() {
        for &seed in &args.seeds {
            let mut overrides = args.overrides.clone();
            overrides.push(format!("seed={seed}"));
            let cfg = Config::load(Some(path), &overrides)
                .with_context(|| format!("config {}", path.display()))?;
            println!("== {} seed {seed}", path.display());
            let summary = train(
                &cfg,
                &RunOptions {
                    echo_config: false,
                    ..RunOptions::default()
                },
            )?;
            for t in summary.targets {
                let cell = cells.entry((ci, t.name.clone())).or_default();
                cell.accuracy.push(t.model.accuracy_mean);
                cell.fold_std.push(t.model.accuracy_std);
                cell.raw = t.raw_pixels.accuracy_mean;
                cell.seconds.push(summary.train_seconds);
            }
        }
    }
    let mut table = String::from(
        "| config | target | accuracy (mean over seeds) | std over seeds | mean fold std | paired diff vs first config (mean ± s.e.) | seeds better | raw pixels | seeds | train s/run |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for ((ci, target), c) in &cells {
        let stem = args.configs[*ci]
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (m, s) = mean_std(&c.accuracy);
        let (fs, _) = mean_std(&c.fold_std);
        let (secs, _) = mean_std(&c.seconds);
        let per_seed: Vec<String> = c.accuracy.iter().map(|a| format!("{a:.4}")).collect();
        let (diff, better) = match cells.get(&(0, target.clone())) {
            Some(base) if *ci > 0 => paired(&c.accuracy, &base.accuracy),
            _ => ("—".into(), "—".into()),
        };
        table.push_str(&format!(
            "| {stem} | {target} | {m:.4} | {s:.4} | {fs:.4} | {diff} | {better} | {:.4} | {} ({}) | {secs:.0} |\n",
            c.raw,
            c.accuracy.len(),
            per_seed.join(", ")
        ));
    }
    println!("\n{table}");
    if let Some(out) = &args.out {
        crate::log::write_atomic(out, table.as_bytes())?;
    }
    Ok(())
}

/// The paired difference of `a` against `base` run for run (the same seeds in the same order:
/// same initial weights and data order): its mean with the standard error of that mean (sample
/// std / sqrt(n); none for one seed), and how many runs of `a` beat their `base` run.
fn paired(a: &[f64], base: &[f64]) -> (String, String) {
    if a.len() != base.len() || a.is_empty() {
        return ("—".into(), "—".into());
    }
    let d: Vec<f64> = a.iter().zip(base).map(|(x, y)| x - y).collect();
    let n = d.len() as f64;
    let (m, pop_std) = mean_std(&d);
    let better = d.iter().filter(|&&x| x > 0.0).count();
    let diff = if d.len() > 1 {
        let se = pop_std * (n / (n - 1.0)).sqrt() / n.sqrt();
        format!("{m:+.4} ± {se:.4}")
    } else {
        format!("{m:+.4}")
    };
    (diff, format!("{better}/{}", d.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paired_difference_and_standard_error() {
        // d = (+0.02, 0.00, +0.04): mean 0.02, sample std 0.02, s.e. 0.02 / sqrt(3).
        let (diff, better) = paired(&[0.92, 0.90, 0.94], &[0.90, 0.90, 0.90]);
        assert_eq!(diff, format!("+0.0200 ± {:.4}", 0.02 / 3f64.sqrt()));
        assert_eq!(better, "2/3");
        assert_eq!(paired(&[0.8], &[0.9]), ("-0.1000".into(), "0/1".into()));
        assert_eq!(paired(&[0.8, 0.9], &[0.9]).0, "—");
    }

    #[test]
    fn mean_std_is_population() {
        let (m, s) = mean_std(&[1.0, 3.0]);
        assert_eq!((m, s), (2.0, 1.0));
    }
}
