//! The one image path: decode, fit to the model input, normalise. Every place that turns a stored image
//! into model input goes through these functions: the training sources ([`crate::ImageFolder`],
//! [`crate::RecordIo`], ORL), the evaluation sets of `facerec-evaluation` (`.bin` packs, LFW pair lists,
//! labelled folders), `facerec eval` and `facerec cluster`. So a model is never evaluated on other
//! geometry than it was trained on.
//!
//! - Decode ([`decode`], [`read`]): JPEG with zune-jpeg straight to RGB, anything else (PNG, PGM/PPM/PNM)
//!   with the `image` crate; gray is replicated to three channels.
//! - Fit ([`fit`]) to the model's square input `S x S`, by the rule [`Fit`]: an `S x S` image is kept
//!   as it is; otherwise [`Fit::Stretch`] (the default) resizes both sides to `S` (triangle filter,
//!   aspect ratio not kept, nothing cut off), [`Fit::CenterCrop`] resizes the short side to `S`
//!   (triangle filter, aspect ratio kept) and cuts the centre `S x S`.
//! - Normalise ([`normalize`], [`to_input_tensor`]): HWC `u8` to NCHW `f32` in [-1, 1] as
//!   `(x / 255 - 0.5) / 0.5` (arcface_torch and insightface's evaluation).
//!
//! Why stretch is the default: it is what training has always done, so every shipped recipe keeps its
//! numbers; aligned face crops (insightface's 112 x 112) are square and unaffected by either rule; and a
//! non-square set such as ORL (92 x 112) keeps the chin and forehead that a centre crop would cut.
//! Face alignment from landmarks ([`crate::align`]: IJB, `facerec prep align`) is a warp of its own,
//! not a fit.

use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use image::imageops::FilterType;
use image::RgbImage;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// How an image that is not `S x S` becomes the model's `S x S` input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fit {
    /// Resize width and height to `S` (triangle filter); the aspect ratio changes, nothing is cut.
    /// The default.
    #[default]
    Stretch,
    /// Resize the short side to `S` (triangle filter, aspect ratio kept), then keep the centre
    /// `S x S` (for an odd surplus the extra column or row is cut on the right or bottom).
    CenterCrop,
}

impl std::fmt::Display for Fit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Fit::Stretch => "stretch",
            Fit::CenterCrop => "center_crop",
        })
    }
}

impl std::str::FromStr for Fit {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "stretch" => Ok(Fit::Stretch),
            "center_crop" => Ok(Fit::CenterCrop),
            other => bail!("fit {other:?}: expected \"stretch\" or \"center_crop\""),
        }
    }
}

/// Decode encoded image bytes (JPEG, PNG, PGM/PPM/PNM) to RGB; gray is replicated to three channels.
pub fn decode(bytes: &[u8]) -> Result<RgbImage> {
    let img = if bytes.starts_with(&[0xFF, 0xD8]) {
        let options = zune_core::options::DecoderOptions::default()
            .jpeg_set_out_colorspace(zune_core::colorspace::ColorSpace::RGB);
        let mut dec = zune_jpeg::JpegDecoder::new_with_options(
            zune_core::bytestream::ZCursor::new(bytes),
            options,
        );
        let rgb = dec
            .decode()
            .map_err(|e| anyhow!("JPEG does not decode: {e:?}"))?;
        let info = dec
            .info()
            .ok_or_else(|| anyhow!("JPEG does not decode: no header"))?;
        let (w, h) = (info.width as usize, info.height as usize);
        ensure!(
            w > 0 && h > 0 && rgb.len() == w * h * 3,
            "decoded JPEG has an inconsistent size {w}x{h}"
        );
        RgbImage::from_raw(w as u32, h as u32, rgb).context("decoded JPEG buffer")?
    } else {
        image::load_from_memory(bytes)
            .context("image content does not decode")?
            .to_rgb8()
    };
    ensure!(
        img.width() > 0 && img.height() > 0,
        "empty image ({} x {})",
        img.width(),
        img.height()
    );
    Ok(img)
}

/// Read and [`decode`] an image file; errors name the file.
pub fn read(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).with_context(|| format!("reading image {}", path.display()))?;
    decode(&bytes).with_context(|| format!("decoding image {}", path.display()))
}

/// Fit `img` to `size x size` by `rule` (see [`Fit`]); an image of that size is returned unchanged.
pub fn fit(img: RgbImage, size: usize, rule: Fit) -> Result<RgbImage> {
    let (w, h) = img.dimensions();
    ensure!(w > 0 && h > 0, "empty image ({w} x {h})");
    let s = u32::try_from(size)
        .ok()
        .filter(|&s| s > 0)
        .with_context(|| format!("model input size {size} must be in 1..2^32"))?;
    if (w, h) == (s, s) {
        return Ok(img);
    }
    Ok(match rule {
        Fit::Stretch => image::imageops::resize(&img, s, s, FilterType::Triangle),
        Fit::CenterCrop => {
            let scale = f64::from(s) / f64::from(w.min(h));
            let (nw, nh) = (
                ((f64::from(w) * scale).round() as u32).max(s),
                ((f64::from(h) * scale).round() as u32).max(s),
            );
            let resized = image::imageops::resize(&img, nw, nh, FilterType::Triangle);
            let (x0, y0) = ((nw - s) / 2, (nh - s) / 2);
            image::imageops::crop_imm(&resized, x0, y0, s, s).to_image()
        }
    })
}

/// [`decode`] then [`fit`]: `size * size * 3` RGB bytes (HWC), the model input before normalisation.
pub fn decode_to_input(bytes: &[u8], size: usize, rule: Fit) -> Result<Vec<u8>> {
    Ok(fit(decode(bytes)?, size, rule)?.into_raw())
}

/// [`read`] then [`fit`]: `size * size * 3` RGB bytes (HWC); errors name the file.
pub fn read_to_input(path: &Path, size: usize, rule: Fit) -> Result<Vec<u8>> {
    let img = read(path)?;
    fit(img, size, rule)
        .with_context(|| format!("image {}", path.display()))
        .map(RgbImage::into_raw)
}

/// The input normalisation in place on a Float tensor: `x = (x / 255 - 0.5) / 0.5`.
fn normalize_in_place(x: &mut Tensor) {
    let _ = x.divide_scalar_(255.0);
    let _ = x.subtract_scalar_(0.5);
    let _ = x.divide_scalar_(0.5);
}

/// The input normalisation `(x / 255 - 0.5) / 0.5` of a Uint8 (or 0..255 float) batch, as a new f32
/// tensor.
///
/// # Shapes
/// Any shape; returns the same shape, Float.
pub fn normalize(x: &Tensor) -> Tensor {
    let mut y = if x.kind() == Kind::Float {
        x.copy()
    } else {
        x.to_kind(Kind::Float)
    };
    normalize_in_place(&mut y);
    y
}

/// `n` images of `s x s x 3` HWC bytes -> `[n, 3, s, s]` f32 in [-1, 1] on `device` (the bytes travel as
/// u8, are transposed while still u8 and normalised in place there).
///
/// # Shapes
/// Returns `[n, 3, s, s]` Float.
///
/// # Panics
/// When `bytes.len() != n * s * s * 3`.
pub fn to_input_tensor(bytes: &[u8], n: usize, s: usize, device: Device) -> Tensor {
    assert_eq!(
        bytes.len(),
        n * s * s * 3,
        "image bytes do not match {n} x {s} x {s} x 3"
    );
    let size = [n as i64, s as i64, s as i64, 3];
    // Transpose while still u8 (a quarter of the bytes), then normalise in place: no further
    // [n,3,s,s] f32 buffers are allocated (fresh pages cost as much as the arithmetic on the CPU).
    let mut x = Tensor::from_slice(bytes)
        .view(size)
        .to_device(device)
        .permute([0, 3, 1, 2])
        .contiguous()
        .to_kind(Kind::Float);
    normalize_in_place(&mut x);
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 4 x 2 image, columns valued 10, 20, 30, 40.
    fn columns() -> RgbImage {
        RgbImage::from_fn(4, 2, |x, _| image::Rgb([10 * (x as u8 + 1); 3]))
    }

    #[test]
    fn center_crop_keeps_the_middle_of_the_long_side() {
        let out = fit(columns(), 2, Fit::CenterCrop).unwrap();
        assert_eq!(out.dimensions(), (2, 2));
        assert_eq!(out.get_pixel(0, 0)[0], 20);
        assert_eq!(out.get_pixel(1, 1)[0], 30);
    }

    #[test]
    fn stretch_keeps_both_ends_of_the_long_side() {
        let out = fit(columns(), 2, Fit::Stretch).unwrap();
        assert_eq!(out.dimensions(), (2, 2));
        // Halving the width with a triangle filter averages columns (10, 20) and (30, 40), weighted
        // towards the inner ones: both outer columns still contribute.
        let (l, r) = (out.get_pixel(0, 0)[0], out.get_pixel(1, 0)[0]);
        assert!(l < 20 && l > 10 && r > 30 && r < 40, "{l} {r}");
    }

    #[test]
    fn square_input_of_the_model_size_is_untouched_by_both_rules() {
        let img = RgbImage::from_fn(3, 3, |x, y| image::Rgb([(x * 3 + y) as u8, 1, 2]));
        for rule in [Fit::Stretch, Fit::CenterCrop] {
            assert_eq!(fit(img.clone(), 3, rule).unwrap(), img);
        }
        assert!(fit(img, 0, Fit::Stretch).is_err());
    }

    #[test]
    fn fit_parses_and_prints() {
        for rule in [Fit::Stretch, Fit::CenterCrop] {
            assert_eq!(rule.to_string().parse::<Fit>().unwrap(), rule);
        }
        assert!("crop".parse::<Fit>().is_err());
    }

    #[test]
    fn normalize_matches_the_formula_and_does_not_alias() {
        let x = Tensor::from_slice(&[0u8, 51, 255]);
        let y = Vec::<f32>::try_from(normalize(&x)).unwrap();
        assert_eq!(y, [-1.0, (51.0f32 / 255.0 - 0.5) / 0.5, 1.0]);
        let f = Tensor::from_slice(&[255.0f32]);
        let _ = normalize(&f);
        assert_eq!(
            f64::try_from(&f).unwrap(),
            255.0,
            "the input must not change"
        );
        let t = to_input_tensor(&[0, 51, 255], 1, 1, Device::Cpu);
        assert_eq!(Vec::<f32>::try_from(t.flatten(0, -1)).unwrap(), y);
    }

    #[test]
    fn jpeg_decodes_like_the_image_crate() {
        // Our JPEG route (zune-jpeg directly) and the `image` crate's must give the same pixels, so
        // folders of JPEG files and RecordIO packs decode alike.
        let img = RgbImage::from_fn(24, 17, |x, y| {
            image::Rgb([(x * 10) as u8, (y * 15) as u8, 99])
        });
        let mut buf = std::io::Cursor::new(Vec::new());
        img.write_to(&mut buf, image::ImageFormat::Jpeg).unwrap();
        let bytes = buf.into_inner();
        let ours = decode(&bytes).unwrap();
        let theirs = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!(ours, theirs);
        assert!(decode(&bytes[..20]).is_err());
    }
}
