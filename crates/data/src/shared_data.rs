//! The shared real-data folder (`../shared/data` next to the workspace): locating it, verifying an archive
//! against its `SHA256SUMS` and unpacking it once into a cache folder such as `target/shared-data/`.
//!
//! The archives (ORL, Extended Yale B, LFW) must never be committed or copied into the repository; tests
//! and commands unpack them at run time. An unpacked archive is marked by `dest/.<archive>.unpacked`
//! holding its checksum, so later calls reuse it without hashing the archive again, and a changed
//! archive (new checksum) is unpacked afresh.

use std::fs::File;
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest, Sha256};

/// Environment variable that overrides the shared data folder.
pub const ENV_VAR: &str = "FACEREC_SHARED_DATA";

/// The shared data folder: env `FACEREC_SHARED_DATA`, else `<workspace>/../shared/data`, if it exists.
pub fn locate(workspace: &Path) -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(ENV_VAR).filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        if dir.is_dir() {
            return Some(dir);
        }
        eprintln!("{ENV_VAR}={} is not a directory", dir.display());
        return None;
    }
    let dir = workspace.join("..").join("shared").join("data");
    dir.is_dir().then(|| dir.canonicalize().unwrap_or(dir))
}

/// The checksum of `archive` listed in `data_dir/SHA256SUMS` (`<hex>  <name>` or `<hex> *<name>` lines).
pub fn expected_sha256(data_dir: &Path, archive: &str) -> Result<String> {
    let sums = data_dir.join("SHA256SUMS");
    let text =
        std::fs::read_to_string(&sums).with_context(|| format!("reading {}", sums.display()))?;
    text.lines()
        .filter_map(|line| line.split_once(char::is_whitespace))
        .find(|(_, name)| name.trim().trim_start_matches('*') == archive)
        .map(|(hex, _)| hex.to_ascii_lowercase())
        .with_context(|| format!("{} lists no archive named {archive}", sums.display()))
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("reading {}", path.display()))?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Serialises unpacking inside one process (tests run in parallel threads).
static UNPACK_LOCK: Mutex<()> = Mutex::new(());

/// Verify `archive` (a `.tar.gz` in `data_dir`) against `data_dir/SHA256SUMS` and unpack it once into
/// `dest`; returns the unpacked folder (`dest/<top-level folder of the archive>`, e.g. `dest/orl_faces`).
/// A marker file makes later calls reuse it. Unpacking goes through a temporary folder in `dest` and a
/// rename, so an interrupted run never leaves a half-unpacked folder behind.
pub fn unpack(data_dir: &Path, archive: &str, dest: &Path) -> Result<PathBuf> {
    let expected = expected_sha256(data_dir, archive)?;
    let marker = dest.join(format!(".{archive}.unpacked"));
    let reuse = || -> Option<PathBuf> {
        let text = std::fs::read_to_string(&marker).ok()?;
        let (hash, top) = text.trim().split_once('\n')?;
        let dir = dest.join(top.trim());
        (hash.trim() == expected && dir.is_dir()).then_some(dir)
    };
    if let Some(dir) = reuse() {
        return Ok(dir);
    }
    let _guard = UNPACK_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dir) = reuse() {
        return Ok(dir);
    }
    let path = data_dir.join(archive);
    let actual = sha256_file(&path)?;
    ensure!(
        actual == expected,
        "{}: SHA-256 {actual} does not match SHA256SUMS ({expected})",
        path.display()
    );

    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".unpack-")
        .tempdir_in(dest)
        .with_context(|| format!("creating a temporary folder in {}", dest.display()))?;
    let gz = flate2::read::GzDecoder::new(BufReader::new(File::open(&path)?));
    tar::Archive::new(gz)
        .unpack(tmp.path())
        .with_context(|| format!("unpacking {}", path.display()))?;
    let tops: Vec<_> = std::fs::read_dir(tmp.path())?.collect::<std::io::Result<_>>()?;
    let (src, top) = match tops.as_slice() {
        [entry] if entry.path().is_dir() => (
            entry.path(),
            entry.file_name().to_string_lossy().into_owned(),
        ),
        _ => {
            let stem = archive
                .trim_end_matches(".gz")
                .trim_end_matches(".tgz")
                .trim_end_matches(".tar");
            (tmp.path().to_path_buf(), stem.to_string())
        }
    };
    if top.is_empty() || top.starts_with('.') {
        bail!("{}: unexpected top-level entry {top:?}", path.display());
    }
    let target = dest.join(&top);
    if target.exists() {
        // Left by an older archive version (its marker no longer matches): replace it.
        std::fs::remove_dir_all(&target)
            .with_context(|| format!("removing stale {}", target.display()))?;
    }
    if src == tmp.path() {
        let kept = tmp.keep();
        std::fs::rename(&kept, &target)
    } else {
        std::fs::rename(&src, &target)
    }
    .with_context(|| format!("moving the unpacked {archive} to {}", target.display()))?;
    let tmp_marker = dest.join(format!(".{archive}.unpacked.tmp"));
    File::create(&tmp_marker)
        .and_then(|mut f| write!(f, "{expected}\n{top}\n"))
        .and_then(|_| std::fs::rename(&tmp_marker, &marker))
        .with_context(|| format!("writing {}", marker.display()))?;
    Ok(target)
}

/// For tests: `Some(data dir)` if present; if missing and env `CI == "true"`, panic with a loud message;
/// otherwise print a skip note and return `None`.
///
/// # Panics
/// When the folder is missing on CI.
pub fn for_tests(workspace: &Path) -> Option<PathBuf> {
    let found = locate(workspace);
    if found.is_none() {
        let looked = workspace.join("../shared/data");
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!(
                "\n\n*** CI: the shared real-data folder is missing ({} or ${ENV_VAR}). \
                 Real-data tests cannot be skipped on CI. ***\n",
                looked.display()
            );
        }
        eprintln!(
            "SKIP: shared real-data folder not found ({} or ${ENV_VAR}); skipping real-data test",
            looked.display()
        );
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sums_in_both_formats() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("SHA256SUMS"),
            "ABCD  a.tar.gz\n1234 *b.tar.gz\n",
        )
        .unwrap();
        assert_eq!(expected_sha256(dir.path(), "a.tar.gz").unwrap(), "abcd");
        assert_eq!(expected_sha256(dir.path(), "b.tar.gz").unwrap(), "1234");
        let err = expected_sha256(dir.path(), "c.tar.gz")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("c.tar.gz") && err.contains("SHA256SUMS"),
            "{err}"
        );
    }
}
