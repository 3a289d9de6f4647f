//! Refuse a classifier that cannot fit before allocating it: a class count read from a corrupt RecordIO
//! header (999,999,616 identities) used to reach tch's `VarStore`, which panics trying to allocate 512 GB.
//!
//! The classifier's fp32 bytes are what the dry run counts (`commands::dry_run::ClassifierSpec`):
//! weights, gradients and optimiser state, `(2 + state buffers) * (C * D [+ C]) * 4`. On the CPU they are
//! compared with `MemAvailable` of `/proc/meminfo` (an allocation there would succeed on paper under
//! Linux overcommit and be killed when touched); on a CUDA device the same number of bytes is allocated
//! once, uninitialised, with tch's fallible `f_empty` and freed, so a classifier the GPU cannot hold is
//! an error instead of a panic. Where neither answer is available (no `/proc/meminfo`), nothing is checked.

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use crate::commands::dry_run::ClassifierSpec;
use crate::config::Config;

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
pub fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut fields = line.split_whitespace().skip(1);
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") => value.checked_mul(1024),
        None => Some(value),
        Some(_) => None,
    }
}

/// Memory the CPU can still give this process (`MemAvailable`), if known.
pub fn cpu_available_bytes() -> Option<u64> {
    parse_mem_available(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

fn gib(bytes: u128) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Fail naming `classifier.num_classes` (and where the count came from: `origin`) when the classifier
/// of `cfg` over `num_classes` classes cannot fit on `device`.
pub fn check_classifier_fits(
    cfg: &Config,
    num_classes: usize,
    device: Device,
    origin: &str,
) -> Result<()> {
    let spec = ClassifierSpec::of(cfg, num_classes as i64);
    let d = cfg.model.embedding_size();
    let need = spec.total_bytes(d);
    let what = || {
        format!(
            "config key `classifier.num_classes`: a classifier of {num_classes} classes x {d} embedding needs {} ({need} B) for weights, gradients and {} optimiser buffer(s) in fp32",
            gib(need),
            spec.state_buffers
        )
    };
    match device {
        Device::Cpu => {
            let Some(avail) = cpu_available_bytes() else {
                return Ok(());
            };
            if need > avail as u128 {
                bail!(
                    "{}, more than the {} of memory available (MemAvailable in /proc/meminfo); the class count comes from {origin}. Check the data (`facerec prep check` for a .rec) or set classifier.num_classes",
                    what(),
                    gib(avail as u128)
                );
            }
        }
        _ => {
            let numel = i64::try_from(need / 4).unwrap_or(i64::MAX);
            if let Err(e) = Tensor::f_empty([numel], (Kind::Float, device)) {
                let first = e.to_string();
                let first = first.lines().next().unwrap_or_default();
                bail!(
                    "{}, which {device:?} cannot allocate ({first}); the class count comes from {origin}. Check the data (`facerec prep check` for a .rec), set classifier.num_classes, or use Partial FC across more devices",
                    what()
                );
            }
        }
    }
    Ok(())
}

/// Where the classifier's class count comes from, for [`check_classifier_fits`]'s error.
pub fn class_count_origin(cfg: &Config) -> String {
    use crate::config::SourceConfig as S;
    if cfg.classifier.num_classes.is_some() {
        return "the config (classifier.num_classes)".into();
    }
    let what = match &cfg.data {
        S::Rec { path, .. } => format!(
            "the RecordIO set {} (its property file, else its header record, else its labels)",
            path.display()
        ),
        S::ImageFolder { root, .. } => format!("the class folders of {}", root.display()),
        S::Orl { .. } => "the ORL identities".into(),
        S::Synthetic { identities, .. } => format!("data.identities = {identities}"),
        S::Bin { path } => path.display().to_string(),
        S::LfwPairs { pairs, .. } => pairs.display().to_string(),
    };
    format!("the training data (config key `data`): {what}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_available_is_read_in_kib() {
        let text = "MemTotal:       16318412 kB\nMemFree:          512000 kB\nMemAvailable:    8000000 kB\n";
        assert_eq!(parse_mem_available(text), Some(8_000_000 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: x kB\n"), None);
    }

    #[test]
    fn an_absurd_classifier_is_refused_and_a_small_one_passes() {
        let cfg = Config::load(None, &[]).unwrap();
        check_classifier_fits(&cfg, 1000, Device::Cpu, "the test").unwrap();
        if cpu_available_bytes().is_none() {
            eprintln!("SKIPPED the refusal: no /proc/meminfo here");
            return;
        }
        let err =
            check_classifier_fits(&cfg, 999_999_616, Device::Cpu, "the header record of x.rec")
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("classifier.num_classes")
                && err.contains("999999616 classes")
                && err.contains("x.rec"),
            "{err}"
        );
    }
}
