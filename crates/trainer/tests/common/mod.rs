//! Helpers shared by the trainer's integration tests that drive the `facerec` binary: arguments,
//! the run directory a run wrote, and weight files compared tensor by tensor.
#![allow(dead_code)] // each test binary uses its own subset

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// `--config CFG --set output_dir=OUT --set S...` for `facerec train`.
pub fn args(cfg: &Path, out: &Path, sets: &[&str]) -> Vec<String> {
    let mut a = vec![
        "--config".to_string(),
        cfg.display().to_string(),
        "--set".into(),
        format!("output_dir={}", out.display()),
    ];
    for s in sets {
        a.push("--set".into());
        a.push(s.to_string());
    }
    a
}

/// The one run directory under `parent`.
///
/// # Panics
/// When there is not exactly one.
pub fn only_run_dir(parent: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(
        dirs.len(),
        1,
        "expected one run directory in {}: {dirs:?}",
        parent.display()
    );
    dirs[0].clone()
}

/// The tensors of a safetensors file by name.
pub fn tensors(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// Whether `key` is a BatchNorm buffer (running statistics, not a trained weight).
pub fn is_buffer(key: &str) -> bool {
    key.ends_with("running_mean")
        || key.ends_with("running_var")
        || key.ends_with("num_batches_tracked")
}

/// Every tensor of `a` equals the one of the same name in `b`, bit for bit.
pub fn assert_bitwise_equal(a: &Path, b: &Path) {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(ta.len(), tb.len(), "{} vs {}", a.display(), b.display());
    for (k, x) in &ta {
        let y = tb
            .get(k)
            .unwrap_or_else(|| panic!("{k} missing in {}", b.display()));
        assert!(
            x.equal(y),
            "`{k}` differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}
