//! Image decoding for evaluation sets: encoded JPEG/PNG/PGM to the model's `S x S` RGB input through the
//! data crate's one image path ([`facerec_data::input`]: decode, fit by a [`Fit`] rule, normalise), so
//! evaluation sees the geometry training saw; decoded by several threads into one `[N, 3, S, S]` Uint8
//! tensor (SPEC 6.1, "Decoding").
//!
//! Images stay `u8` in memory (LFW: 12 000 images of 112 x 112 take 450 MB as u8, 1.8 GB as f32); the model
//! closure normalises each batch (see [`normalize`]).
//!
//! The fit rule is the training run's (`[input] fit` in its config; default stretch). An `S x S` image is
//! kept as it is under either rule. insightface resizes the short side only (`mx.image.resize_short`) and
//! would fail to batch a non-square result; its packs are square, so this only matters for other data.

use std::path::Path;

use anyhow::Result;
pub use facerec_data::input::{fit, normalize, Fit};
use tch::{Kind, Tensor};

/// Decode encoded image bytes to `size x size` RGB (HWC bytes), fitted by `rule`.
pub fn decode_rgb(bytes: &[u8], size: u32, rule: Fit) -> Result<Vec<u8>> {
    facerec_data::input::decode_to_input(bytes, size as usize, rule)
}

/// Read and decode an image file to `size x size` RGB (HWC bytes), fitted by `rule`; errors name the
/// file.
pub fn read_rgb(path: &Path, size: u32, rule: Fit) -> Result<Vec<u8>> {
    facerec_data::input::read_to_input(path, size as usize, rule)
}

/// Decode `n` images with `decode(i) -> HWC bytes of size x size x 3` on `threads` threads, into a
/// `[n, 3, size, size]` Uint8 tensor on the CPU. `tick` is called once per decoded image (progress bars).
/// The first error (in index order of the failing thread's chunk) is returned.
///
/// # Shapes
/// Returns `[n, 3, size, size]` Uint8.
pub fn decode_all(
    n: usize,
    size: usize,
    threads: usize,
    decode: &(dyn Fn(usize) -> Result<Vec<u8>> + Sync),
    tick: &(dyn Fn() + Sync),
) -> Result<Tensor> {
    let bytes = facerec_data::decode_parallel(n, size, threads, decode, tick)?;
    if n == 0 {
        return Ok(Tensor::zeros(
            [0, 3, size as i64, size as i64],
            (Kind::Uint8, tch::Device::Cpu),
        ));
    }
    Ok(Tensor::from_slice(&bytes)
        .view([n as i64, size as i64, size as i64, 3])
        .permute([0, 3, 1, 2])
        .contiguous())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_all_is_nchw() {
        let t = decode_all(
            2,
            2,
            2,
            &|i| Ok((0..12).map(|v| (v + 100 * i) as u8).collect()),
            &|| {},
        )
        .unwrap();
        assert_eq!(t.size(), [2, 3, 2, 2]);
        // Channel 1 of image 1: HWC values 101 + 3 * pixel + 100.
        let c1 = Vec::<u8>::try_from(t.get(1).get(1).flatten(0, -1)).unwrap();
        assert_eq!(c1, [101, 104, 107, 110]);
        assert!(decode_all(
            3,
            2,
            2,
            &|i| if i == 2 {
                anyhow::bail!("bad")
            } else {
                Ok(vec![0; 12])
            },
            &|| {}
        )
        .is_err());
    }
}
