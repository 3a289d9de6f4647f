//! insightface-style verification packs (`lfw.bin`, SPEC 6.1) built from an image folder and an LFW
//! pairs file, for `facerec prep lfw`.
//!
//! The container is what insightface's `lfw2pack.py` wrote under Python 2: a pickle, protocol 2, of the
//! tuple `(bins, issame_list)`; `bins` holds `2P` encoded images as Python 2 `str` (opcodes
//! SHORT_BINSTRING / BINSTRING), pair `k` being `(bins[2k], bins[2k+1])`, and `issame_list` holds `P`
//! bools (NEWTRUE / NEWFALSE). Python 3 reads it with `pickle.load(f, encoding='bytes')` as
//! arcface_torch's `eval/verification.py` does; the evaluation crate reads the same opcodes. Lists are
//! written in batches of 1000 items per APPENDS, as Python's pickler does; there is no memo.
//!
//! Images: a JPEG file is stored byte for byte (as `lfw2pack.py` does); anything else (PNG, PGM) is
//! decoded and stored as an RGB JPEG at the given quality. Each file is read once however many pairs
//! use it.
//!
//! Which images and pairs, and in which order, is the caller's business: `facerec prep lfw` resolves an
//! LFW pairs file through `facerec_evaluation::LfwPairs`, which puts the pairs in the protocol's fold
//! order (View 2's folds as in the file; View 1 stratified so that each contiguous tenth holds a tenth
//! of the matched and of the mismatched pairs), because insightface scores a pack with contiguous folds.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};

use crate::rec_writer::{encode_jpeg, read_rgb};
use crate::threads::{cores, par_map};

/// The pickle bytes of `(bins, issame)` (see the module docs).
pub fn encode_pickle(bins: &[Vec<u8>], issame: &[bool]) -> Vec<u8> {
    const MARK: u8 = b'(';
    const APPENDS: u8 = b'e';
    let mut out = vec![0x80, 2]; // PROTO 2
    let list = |out: &mut Vec<u8>, n: usize, item: &mut dyn FnMut(&mut Vec<u8>, usize)| {
        out.push(b']'); // EMPTY_LIST
        for lo in (0..n).step_by(1000) {
            out.push(MARK);
            (lo..(lo + 1000).min(n)).for_each(|i| item(out, i));
            out.push(APPENDS);
        }
    };
    list(&mut out, bins.len(), &mut |out, i| {
        let b = &bins[i];
        if b.len() < 256 {
            out.extend_from_slice(&[b'U', b.len() as u8]); // SHORT_BINSTRING
        } else {
            out.push(b'T'); // BINSTRING
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(b);
    });
    list(&mut out, issame.len(), &mut |out, i| {
        out.push(if issame[i] { 0x88 } else { 0x89 })
    });
    out.extend_from_slice(&[0x86, b'.']); // TUPLE2, STOP
    out
}

/// What [`pack_pairs`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LfwPackSummary {
    /// Pairs.
    pub pairs: usize,
    /// Matched pairs.
    pub positives: usize,
    /// Distinct image files read.
    pub files: usize,
}

/// Build `out` (an insightface-style `.bin`) holding, for each pair `(a, b, same)`, the images
/// `files[a]` and `files[b]`, in the given order. `quality` is used for images that are not JPEG files
/// already; `image_size` resizes those (and re-encodes JPEGs). Each file is read once.
///
/// # Panics
/// If a pair index is `>= files.len()`.
pub fn pack_pairs(
    files: &[PathBuf],
    pairs: &[(usize, usize, bool)],
    out: &Path,
    quality: u8,
    image_size: Option<usize>,
) -> Result<LfwPackSummary> {
    ensure!(
        (1..=100).contains(&quality),
        "JPEG quality must be in 1..=100, got {quality}"
    );
    let encoded = par_map(files.len(), cores(), |k| -> Result<Vec<u8>> {
        let path = &files[k];
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        if bytes.starts_with(&[0xFF, 0xD8]) && image_size.is_none() {
            return Ok(bytes);
        }
        let img = read_rgb(path, image_size)?;
        encode_jpeg(
            img.as_raw(),
            img.width() as usize,
            img.height() as usize,
            quality,
        )
        .with_context(|| format!("encoding {}", path.display()))
    });
    let encoded: Vec<Vec<u8>> = encoded.into_iter().collect::<Result<_>>()?;
    let bins: Vec<Vec<u8>> = pairs
        .iter()
        .flat_map(|&(a, b, _)| [encoded[a].clone(), encoded[b].clone()])
        .collect();
    let issame: Vec<bool> = pairs.iter().map(|p| p.2).collect();
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = out.with_extension("bin.partial");
    std::fs::write(&tmp, encode_pickle(&bins, &issame))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("renaming to {}", out.display()))?;
    Ok(LfwPackSummary {
        pairs: pairs.len(),
        positives: issame.iter().filter(|&&s| s).count(),
        files: files.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pickle_opcodes() {
        let p = encode_pickle(&[b"ab".to_vec(), vec![7u8; 300]], &[true]);
        assert_eq!(&p[..6], &[0x80, 2, b']', b'(', b'U', 2]);
        assert_eq!(&p[8..13], &[b'T', 44, 1, 0, 0]);
        assert_eq!(
            &p[p.len() - 7..],
            &[b'e', b']', b'(', 0x88, b'e', 0x86, b'.']
        );
    }
}
