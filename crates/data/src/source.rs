//! The [`Source`] trait: a random-access, labelled image collection, plus the seeding helpers that keep
//! every random decision a pure function of its inputs (never of thread scheduling).
//!
//! Sources are indexed `0..len()`; a later RecordIO source maps indices to `.idx` keys, a P x K sampler
//! only needs `label(i)`, and the loader only needs `load(i)`. Nothing here assumes files.

/// A labelled image collection. Images come out as RGB `u8`, HWC, `image_size x image_size x 3`.
///
/// Implementations must be cheap to share between threads (`load` takes `&self`) and deterministic:
/// `load(i)` returns the same bytes every time.
pub trait Source: Send + Sync {
    /// Number of images.
    fn len(&self) -> usize;
    /// Number of classes; every `label(i)` is `< num_classes()`.
    fn num_classes(&self) -> usize;
    /// Class of image `index`, in `0..num_classes()`.
    ///
    /// # Panics
    /// May panic when `index >= len()`.
    fn label(&self, index: usize) -> usize;
    /// Side length `S` of the square images.
    fn image_size(&self) -> usize;
    /// Decode/render image `index` as `S*S*3` bytes (RGB, HWC). Errors name the file or record.
    fn load(&self, index: usize) -> anyhow::Result<Vec<u8>>;
    /// A human-readable name for image `index`: the file path, or "synthetic identity 3 image 7".
    fn describe(&self, index: usize) -> String;
    /// `len() == 0`.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether the [`crate::Loader`] should leave an image that fails to load out of its batch
    /// (counted and logged) instead of ending the epoch with an error. Default false; a
    /// [`crate::RecordIo`] opened with [`crate::BadRecordPolicy::Skip`] says true.
    fn skips_bad_images(&self) -> bool {
        false
    }
    /// Under a skip policy: whether `failed_loads` distinct images that failed to load (plus what the
    /// source itself left out when it opened) are still within the source's ceiling. The error names
    /// the file and the counts; the [`crate::Loader`] ends the epoch with it. Default: always within.
    fn check_skipped(&self, failed_loads: usize) -> anyhow::Result<()> {
        let _ = failed_loads;
        Ok(())
    }
}

/// SplitMix64 finaliser: a fixed, platform-independent 64-bit mixer (std's `DefaultHasher` is not
/// guaranteed stable across Rust releases, so it must not decide data).
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Hash of a tuple of words, order-sensitive; used to seed one ChaCha8 stream per decision.
pub(crate) fn hash_words(words: &[u64]) -> u64 {
    words
        .iter()
        .fold(0x6A09_E667_F3BC_C908, |h, &w| mix64(h ^ mix64(w)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_order_sensitive_and_stable() {
        assert_ne!(hash_words(&[1, 2]), hash_words(&[2, 1]));
        assert_ne!(hash_words(&[0]), hash_words(&[0, 0]));
        // SplitMix64 reference value for state 0 (first output of the generator seeded with 0).
        assert_eq!(mix64(0), 0xE220_A839_7B1D_CDAF);
    }
}
