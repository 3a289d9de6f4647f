//! Training-image augmentation in the data workers (the trainer's `[augment]` table): random
//! resized crop, down-and-up resampling (low resolution), Gaussian blur, colour jitter
//! (brightness, contrast, saturation, gamma), grayscale and random erasing.
//!
//! Every operation is off by default (probability 0), as in arcface_torch, whose training
//! transform is a horizontal flip only; the flip and the shift stay in [`crate::LoaderConfig`].
//!
//! Determinism: each operation draws from its own ChaCha8 stream seeded by
//! `hash(seed, epoch, image index, operation)`, so an image is augmented the same way whatever the
//! worker count, a resumed run sees what the uninterrupted run saw, and changing one operation's
//! settings leaves the draws of the others unchanged. The operations run in the order of the
//! fields below, on the decoded image already fitted to the model input, before the flip and the
//! shift.

use anyhow::{ensure, Result};
use image::imageops::FilterType;
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::source::hash_words;

/// Probabilities and ranges of each augmentation (`[augment]`). A range `[lo, hi]` is drawn
/// uniformly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Probability of a random resized crop (crop, then resize back to the input size).
    pub crop_p: f64,
    /// Area of the crop as a fraction of the image, `0 < lo <= hi <= 1`. Default `[0.7, 1.0]`.
    pub crop_scale: [f64; 2],
    /// Aspect ratio (width / height) of the crop, drawn log-uniformly, `0 < lo <= hi`. Default
    /// `[0.9, 1.111]`.
    pub crop_ratio: [f64; 2],
    /// Probability of resampling down and back up (a low-resolution copy).
    pub low_res_p: f64,
    /// Size of the low-resolution copy as a fraction of the input size, `0 < lo <= hi <= 1`.
    /// Default `[0.25, 0.75]`.
    pub low_res_scale: [f64; 2],
    /// Probability of a Gaussian blur.
    pub blur_p: f64,
    /// Standard deviation of the blur in pixels, `0 < lo <= hi`. Default `[0.3, 1.5]`.
    pub blur_sigma: [f64; 2],
    /// Probability of colour jitter (gamma, brightness, contrast and saturation together).
    pub color_p: f64,
    /// Brightness factor drawn from `[1 - b, 1 + b]`, `0 <= b < 1`. Default 0.2.
    pub brightness: f64,
    /// Contrast factor (around the image's mean gray) from `[1 - c, 1 + c]`, `0 <= c < 1`.
    /// Default 0.2.
    pub contrast: f64,
    /// Saturation factor (around each pixel's gray) from `[1 - s, 1 + s]`, `0 <= s < 1`.
    /// Default 0.2.
    pub saturation: f64,
    /// Gamma `g` of `255·(v/255)^g`, `0 < lo <= hi`. Default `[0.8, 1.25]`.
    pub gamma: [f64; 2],
    /// Probability of converting to gray (ITU-R 601 luma in all three channels).
    pub grayscale_p: f64,
    /// Probability of erasing one random rectangle (filled with uniform noise: an occlusion).
    pub erase_p: f64,
    /// Area of the rectangle as a fraction of the image, `0 < lo <= hi <= 1`. Default
    /// `[0.02, 0.2]`.
    pub erase_area: [f64; 2],
    /// Aspect ratio of the rectangle, drawn log-uniformly, `0 < lo <= hi`. Default `[0.3, 3.3]`.
    pub erase_ratio: [f64; 2],
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            crop_p: 0.0,
            crop_scale: [0.7, 1.0],
            crop_ratio: [0.9, 1.111],
            low_res_p: 0.0,
            low_res_scale: [0.25, 0.75],
            blur_p: 0.0,
            blur_sigma: [0.3, 1.5],
            color_p: 0.0,
            brightness: 0.2,
            contrast: 0.2,
            saturation: 0.2,
            gamma: [0.8, 1.25],
            grayscale_p: 0.0,
            erase_p: 0.0,
            erase_area: [0.02, 0.2],
            erase_ratio: [0.3, 3.3],
        }
    }
}

/// Operation tags of the per-image streams.
const CROP: u64 = 0x4155_4331;
const LOW_RES: u64 = 0x4155_4332;
const BLUR: u64 = 0x4155_4333;
const COLOR: u64 = 0x4155_4334;
const GRAY: u64 = 0x4155_4335;
const ERASE: u64 = 0x4155_4336;

impl AugmentConfig {
    /// Whether any operation can fire.
    pub fn is_active(&self) -> bool {
        [
            self.crop_p,
            self.low_res_p,
            self.blur_p,
            self.color_p,
            self.grayscale_p,
            self.erase_p,
        ]
        .iter()
        .any(|&p| p > 0.0)
    }

    /// Checks every probability and range; the error names the field.
    pub fn validate(&self) -> Result<()> {
        for (name, p) in [
            ("crop_p", self.crop_p),
            ("low_res_p", self.low_res_p),
            ("blur_p", self.blur_p),
            ("color_p", self.color_p),
            ("grayscale_p", self.grayscale_p),
            ("erase_p", self.erase_p),
        ] {
            ensure!(
                (0.0..=1.0).contains(&p),
                "{name} must be a probability in [0, 1], got {p}"
            );
        }
        for (name, r, max) in [
            ("crop_scale", self.crop_scale, Some(1.0)),
            ("crop_ratio", self.crop_ratio, None),
            ("low_res_scale", self.low_res_scale, Some(1.0)),
            ("blur_sigma", self.blur_sigma, None),
            ("gamma", self.gamma, None),
            ("erase_area", self.erase_area, Some(1.0)),
            ("erase_ratio", self.erase_ratio, None),
        ] {
            let [lo, hi] = r;
            ensure!(
                lo.is_finite() && hi.is_finite() && lo > 0.0 && lo <= hi,
                "{name} must be a range [lo, hi] with 0 < lo <= hi, got [{lo}, {hi}]"
            );
            if let Some(max) = max {
                ensure!(hi <= max, "{name} must not exceed {max}, got [{lo}, {hi}]");
            }
        }
        for (name, x) in [
            ("brightness", self.brightness),
            ("contrast", self.contrast),
            ("saturation", self.saturation),
        ] {
            ensure!((0.0..1.0).contains(&x), "{name} must be in [0, 1), got {x}");
        }
        Ok(())
    }

    /// Augments `image` (an `s x s` RGB image, HWC bytes) as image `index` of `epoch` in a run
    /// seeded by `seed`. Returns the image unchanged when no operation fires.
    ///
    /// # Panics
    /// If `image.len() != s * s * 3`.
    pub fn apply(
        &self,
        image: Vec<u8>,
        s: usize,
        seed: u64,
        epoch: usize,
        index: usize,
    ) -> Vec<u8> {
        assert_eq!(image.len(), s * s * 3, "augment: image is not {s}x{s}x3");
        let stream = |tag: u64| {
            ChaCha8Rng::seed_from_u64(hash_words(&[seed, epoch as u64, index as u64, tag]))
        };
        let side = s as u32;
        let mut img = RgbImage::from_raw(side, side, image).expect("length checked above");
        let mut rng = stream(CROP);
        if rng.gen::<f64>() < self.crop_p {
            img = self.random_resized_crop(&img, &mut rng);
        }
        let mut rng = stream(LOW_RES);
        if rng.gen::<f64>() < self.low_res_p {
            let f = uniform(&mut rng, self.low_res_scale);
            let small = ((s as f64 * f).round() as u32).clamp(1, side);
            let down = image::imageops::resize(&img, small, small, FilterType::Triangle);
            img = image::imageops::resize(&down, side, side, FilterType::Triangle);
        }
        let mut rng = stream(BLUR);
        if rng.gen::<f64>() < self.blur_p {
            img = image::imageops::blur(&img, uniform(&mut rng, self.blur_sigma) as f32);
        }
        let mut rng = stream(COLOR);
        if rng.gen::<f64>() < self.color_p {
            self.jitter_colour(&mut img, &mut rng);
        }
        let mut rng = stream(GRAY);
        if rng.gen::<f64>() < self.grayscale_p {
            for p in img.pixels_mut() {
                let g = luma(p.0).round().clamp(0.0, 255.0) as u8;
                p.0 = [g, g, g];
            }
        }
        let mut rng = stream(ERASE);
        if rng.gen::<f64>() < self.erase_p {
            self.erase(&mut img, &mut rng);
        }
        img.into_raw()
    }

    /// A crop of area `crop_scale` and aspect `crop_ratio` at a uniform position, resized back.
    fn random_resized_crop(&self, img: &RgbImage, rng: &mut ChaCha8Rng) -> RgbImage {
        let side = img.width();
        let (w, h) = rectangle(side, self.crop_scale, self.crop_ratio, rng);
        let x0 = rng.gen_range(0..=side - w);
        let y0 = rng.gen_range(0..=side - h);
        let crop = image::imageops::crop_imm(img, x0, y0, w, h).to_image();
        image::imageops::resize(&crop, side, side, FilterType::Triangle)
    }

    /// Gamma (`255·(v/255)^g`, from a 256-entry table of the input bytes), then brightness,
    /// contrast around the mean gray and saturation around each pixel's gray, in floating point,
    /// rounded once at the end.
    fn jitter_colour(&self, img: &mut RgbImage, rng: &mut ChaCha8Rng) {
        let b = uniform(rng, [1.0 - self.brightness, 1.0 + self.brightness]);
        let c = uniform(rng, [1.0 - self.contrast, 1.0 + self.contrast]);
        let sat = uniform(rng, [1.0 - self.saturation, 1.0 + self.saturation]);
        let g = uniform(rng, self.gamma);
        let table: Vec<f64> = (0..256)
            .map(|v| 255.0 * (v as f64 / 255.0).powf(g) * b)
            .collect();
        let scaled = |p: [u8; 3]| p.map(|x| table[x as usize]);
        let n = (img.width() * img.height()) as f64;
        let mean = img.pixels().map(|p| luma_f(scaled(p.0))).sum::<f64>() / n;
        for p in img.pixels_mut() {
            let v = scaled(p.0).map(|x| mean + (x - mean) * c);
            let gray = luma_f(v);
            p.0 = v.map(|x| (gray + (x - gray) * sat).round().clamp(0.0, 255.0) as u8);
        }
    }

    /// One rectangle of area `erase_area` and aspect `erase_ratio` filled with uniform noise.
    fn erase(&self, img: &mut RgbImage, rng: &mut ChaCha8Rng) {
        let side = img.width();
        let (w, h) = rectangle(side, self.erase_area, self.erase_ratio, rng);
        let x0 = rng.gen_range(0..=side - w);
        let y0 = rng.gen_range(0..=side - h);
        for y in y0..y0 + h {
            for x in x0..x0 + w {
                img.put_pixel(x, y, image::Rgb([rng.gen(), rng.gen(), rng.gen()]));
            }
        }
    }
}

/// Width and height (each in `1..=side`) of a rectangle of area fraction drawn from `area` and
/// aspect ratio drawn log-uniformly from `ratio`.
fn rectangle(side: u32, area: [f64; 2], ratio: [f64; 2], rng: &mut ChaCha8Rng) -> (u32, u32) {
    let a = uniform(rng, area) * (side as f64).powi(2);
    let r = uniform(rng, [ratio[0].ln(), ratio[1].ln()]).exp();
    let fit = |x: f64| (x.round() as u32).clamp(1, side);
    (fit((a * r).sqrt()), fit((a / r).sqrt()))
}

/// A uniform draw from `[lo, hi]` (exactly `lo` when the range is one point).
fn uniform(rng: &mut ChaCha8Rng, [lo, hi]: [f64; 2]) -> f64 {
    lo + (hi - lo) * rng.gen::<f64>()
}

/// ITU-R 601 luma of an RGB pixel.
fn luma(p: [u8; 3]) -> f64 {
    luma_f(p.map(f64::from))
}

fn luma_f([r, g, b]: [f64; 3]) -> f64 {
    0.299 * r + 0.587 * g + 0.114 * b
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 16x16 image with a horizontal and a vertical gradient and some colour.
    fn picture() -> Vec<u8> {
        let s = 16;
        (0..s * s)
            .flat_map(|i| {
                let (y, x) = (i / s, i % s);
                [(x * 15) as u8, (y * 15) as u8, ((x + y) * 7) as u8]
            })
            .collect()
    }

    fn only(set: impl FnOnce(&mut AugmentConfig)) -> AugmentConfig {
        let mut c = AugmentConfig::default();
        set(&mut c);
        c
    }

    #[test]
    fn off_by_default_and_identity_when_off() {
        let c = AugmentConfig::default();
        assert!(!c.is_active());
        c.validate().unwrap();
        assert_eq!(c.apply(picture(), 16, 1, 0, 3), picture());
    }

    #[test]
    fn each_operation_changes_the_image_and_is_deterministic() {
        let ops: Vec<(&str, AugmentConfig)> = vec![
            ("crop", only(|c| c.crop_p = 1.0)),
            ("low_res", only(|c| c.low_res_p = 1.0)),
            ("blur", only(|c| c.blur_p = 1.0)),
            ("color", only(|c| c.color_p = 1.0)),
            ("gray", only(|c| c.grayscale_p = 1.0)),
            ("erase", only(|c| c.erase_p = 1.0)),
        ];
        for (name, c) in ops {
            assert!(c.is_active(), "{name}");
            let a = c.apply(picture(), 16, 7, 2, 5);
            assert_eq!(a.len(), 16 * 16 * 3, "{name}");
            assert_ne!(a, picture(), "{name} left the image unchanged");
            assert_eq!(
                a,
                c.apply(picture(), 16, 7, 2, 5),
                "{name} is not deterministic"
            );
            // Another image index, epoch or seed draws differently (every operation but gray has
            // a random parameter; low_res rounds its size to whole pixels, so one of three
            // other draws may land on the same size).
            if name != "gray" {
                let others = [
                    c.apply(picture(), 16, 7, 2, 6),
                    c.apply(picture(), 16, 7, 3, 5),
                    c.apply(picture(), 16, 8, 2, 5),
                ];
                assert!(others.iter().any(|o| *o != a), "{name} ignores its seed");
            }
        }
    }

    #[test]
    fn grayscale_gives_equal_channels() {
        let a = only(|c| c.grayscale_p = 1.0).apply(picture(), 16, 0, 0, 0);
        assert!(a.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
        // Luma of the first non-black pixel (x = 1: [15, 0, 7]).
        assert_eq!(a[3], (0.299f64 * 15.0 + 0.114 * 7.0).round() as u8);
    }

    #[test]
    fn erase_changes_one_rectangle_only() {
        let c = only(|c| {
            c.erase_p = 1.0;
            c.erase_area = [0.1, 0.1];
        });
        let a = c.apply(picture(), 16, 3, 0, 0);
        let changed: Vec<(usize, usize)> = (0..256)
            .filter(|&i| a[i * 3..i * 3 + 3] != picture()[i * 3..i * 3 + 3])
            .map(|i| (i / 16, i % 16))
            .collect();
        let (ys, xs): (Vec<_>, Vec<_>) = changed.iter().copied().unzip();
        let h = ys.iter().max().unwrap() - ys.iter().min().unwrap() + 1;
        let w = xs.iter().max().unwrap() - xs.iter().min().unwrap() + 1;
        // About 10 % of 256 pixels, all inside their bounding box (a noise pixel may equal the
        // original by chance, so the box can hold a few unchanged ones).
        assert!((15..=40).contains(&(w * h)), "rectangle {w}x{h}");
        assert!(changed.len() >= w * h - 3);
    }

    #[test]
    fn brightness_alone_scales_the_mean() {
        let c = only(|c| {
            c.color_p = 1.0;
            c.brightness = 0.5;
            c.contrast = 0.0;
            c.saturation = 0.0;
            c.gamma = [1.0, 1.0];
        });
        let mean = |v: &[u8]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let ratios: Vec<f64> = (0..20)
            .map(|i| mean(&c.apply(picture(), 16, 0, 0, i)) / mean(&picture()))
            .collect();
        assert!(
            ratios.iter().all(|r| (0.49..=1.51).contains(r)),
            "{ratios:?}"
        );
        assert!(ratios.iter().any(|&r| r < 0.9) && ratios.iter().any(|&r| r > 1.1));
    }

    #[test]
    fn operations_draw_independently() {
        // Turning blur on does not change which crop an image gets.
        let crop = only(|c| c.crop_p = 0.5);
        let both = only(|c| {
            c.crop_p = 0.5;
            c.grayscale_p = 1.0;
        });
        let gray = only(|c| c.grayscale_p = 1.0);
        for i in 0..10 {
            let a = gray.apply(crop.apply(picture(), 16, 1, 0, i), 16, 1, 0, i);
            assert_eq!(a, both.apply(picture(), 16, 1, 0, i));
        }
    }

    #[test]
    fn bad_values_name_the_field() {
        let err = |c: AugmentConfig| c.validate().unwrap_err().to_string();
        assert!(err(only(|c| c.blur_p = 1.5)).starts_with("blur_p must be a probability"));
        assert!(err(only(|c| c.crop_scale = [0.9, 0.5])).starts_with("crop_scale must be a range"));
        assert!(err(only(|c| c.erase_area = [0.1, 2.0])).starts_with("erase_area must not exceed"));
        assert!(err(only(|c| c.contrast = 1.0)).starts_with("contrast must be in [0, 1)"));
        assert!(err(only(|c| c.gamma = [f64::NAN, 1.0])).starts_with("gamma must be a range"));
    }
}
