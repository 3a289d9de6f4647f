//! Plots as PNG, drawn with the `image` crate: the ROC plot ([`roc_png`]: FPR on a log axis from 1e-6
//! to 1, TPR linear from 0 to 1, decade and 0.1 grid lines, one coloured curve per entry and a legend
//! with each AUC) and line charts over training steps ([`line_png`]: linear axes with "nice" ticks,
//! one coloured curve per series, used by `facerec plot` for loss, lr and accuracy).
//!
//! Deliberate choice: `plotters` was not used because its text rendering needs either system font
//! libraries (`font-kit`, fontconfig) or a font file shipped with us; a 3 x 5 pixel font for the few
//! characters a ROC plot needs is enough and builds everywhere.

use std::path::Path;

use anyhow::{Context, Result};
use image::{Rgb, RgbImage};

use crate::roc::Roc;

const W: u32 = 720;
const H: u32 = 520;
const LEFT: i64 = 80;
const RIGHT: i64 = 24;
const TOP: i64 = 36;
const BOTTOM: i64 = 64;
const DECADES: f64 = 6.0;
const COLORS: [[u8; 3]; 6] = [
    [31, 119, 180],
    [214, 39, 40],
    [44, 160, 44],
    [255, 127, 14],
    [148, 103, 189],
    [23, 190, 207],
];

/// Glyphs of the built-in 3 x 5 font: rows top to bottom, 3 bits each (MSB = left column).
fn glyph(c: char) -> [u8; 5] {
    match c.to_ascii_uppercase() {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        'A' => [2, 5, 7, 5, 5],
        'B' => [6, 5, 6, 5, 6],
        'C' => [3, 4, 4, 4, 3],
        'D' => [6, 5, 5, 5, 6],
        'E' => [7, 4, 6, 4, 7],
        'F' => [7, 4, 6, 4, 4],
        'G' => [3, 4, 5, 5, 3],
        'H' => [5, 5, 7, 5, 5],
        'I' => [7, 2, 2, 2, 7],
        'J' => [1, 1, 1, 5, 2],
        'K' => [5, 5, 6, 5, 5],
        'L' => [4, 4, 4, 4, 7],
        'M' => [5, 7, 7, 5, 5],
        'N' => [6, 5, 5, 5, 5],
        'O' => [2, 5, 5, 5, 2],
        'P' => [6, 5, 6, 4, 4],
        'Q' => [2, 5, 5, 6, 3],
        'R' => [6, 5, 6, 5, 5],
        'S' => [3, 4, 2, 1, 6],
        'T' => [7, 2, 2, 2, 2],
        'U' => [5, 5, 5, 5, 7],
        'V' => [5, 5, 5, 5, 2],
        'W' => [5, 5, 7, 7, 5],
        'X' => [5, 5, 2, 5, 5],
        'Y' => [5, 5, 2, 2, 2],
        'Z' => [7, 1, 2, 4, 7],
        '-' => [0, 0, 7, 0, 0],
        '.' => [0, 0, 0, 0, 2],
        ',' => [0, 0, 0, 2, 4],
        ':' => [0, 2, 0, 2, 0],
        '=' => [0, 7, 0, 7, 0],
        '+' => [0, 2, 7, 2, 0],
        '(' => [1, 2, 2, 2, 1],
        ')' => [4, 2, 2, 2, 4],
        '/' => [1, 1, 2, 4, 4],
        '_' => [0, 0, 0, 0, 7],
        '@' => [7, 5, 7, 4, 7],
        ' ' => [0; 5],
        _ => [7, 7, 7, 7, 7],
    }
}

struct Canvas(RgbImage);

impl Canvas {
    fn put(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as u32) < W && (y as u32) < H {
            self.0.put_pixel(x as u32, y as u32, Rgb(c));
        }
    }

    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3], thick: i64) {
        let steps = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as i64).max(1);
        for s in 0..=steps {
            let t = s as f64 / steps as f64;
            let (x, y) = (
                (x0 + t * (x1 - x0)).round() as i64,
                (y0 + t * (y1 - y0)).round() as i64,
            );
            for dx in 0..thick {
                for dy in 0..thick {
                    self.put(x + dx - thick / 2, y + dy - thick / 2, c);
                }
            }
        }
    }

    /// Text at scale 2 (6 x 10 pixels per glyph, 8 pixels advance); returns the width drawn.
    fn text(&mut self, x: i64, y: i64, s: &str, c: [u8; 3]) -> i64 {
        for (k, ch) in s.chars().enumerate() {
            for (row, bits) in glyph(ch).iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                            self.put(x + 8 * k as i64 + 2 * col + dx, y + 2 * row as i64 + dy, c);
                        }
                    }
                }
            }
        }
        8 * s.chars().count() as i64
    }
}

fn to_px(fpr: f64, tpr: f64) -> (f64, f64) {
    let (pw, ph) = (
        (W as i64 - LEFT - RIGHT) as f64,
        (H as i64 - TOP - BOTTOM) as f64,
    );
    let lx = (fpr.max(10f64.powf(-DECADES)).log10() + DECADES) / DECADES;
    (LEFT as f64 + lx * pw, TOP as f64 + (1.0 - tpr) * ph)
}

/// Draw `curves` (legend name, ROC) into a PNG at `path`.
pub fn roc_png(curves: &[(&str, &Roc)], title: &str, path: &Path) -> Result<()> {
    let mut cv = Canvas(RgbImage::from_pixel(W, H, Rgb([255, 255, 255])));
    let grid = [225, 225, 225];
    let ink = [0, 0, 0];
    for d in 0..=DECADES as i32 {
        let fpr = 10f64.powi(d - DECADES as i32);
        let (x, _) = to_px(fpr, 0.0);
        cv.line((x, TOP as f64), (x, (H as i64 - BOTTOM) as f64), grid, 1);
        let label = if d == DECADES as i32 {
            "1".to_string()
        } else {
            format!("1E-{}", DECADES as i32 - d)
        };
        cv.text(
            x as i64 - 4 * label.len() as i64,
            H as i64 - BOTTOM + 8,
            &label,
            ink,
        );
    }
    for k in 0..=10 {
        let (_, y) = to_px(1.0, k as f64 / 10.0);
        cv.line((LEFT as f64, y), ((W as i64 - RIGHT) as f64, y), grid, 1);
        cv.text(
            LEFT - 34,
            y as i64 - 5,
            &format!("{:.1}", k as f64 / 10.0),
            ink,
        );
    }
    let (x0, y0) = to_px(1e-6, 0.0);
    let (x1, y1) = to_px(1.0, 1.0);
    for (a, b) in [
        ((x0, y0), (x1, y0)),
        ((x0, y0), (x0, y1)),
        ((x0, y1), (x1, y1)),
        ((x1, y0), (x1, y1)),
    ] {
        cv.line(a, b, ink, 1);
    }
    cv.text(
        W as i64 / 2 - 96,
        H as i64 - 30,
        "FALSE ACCEPT RATE (FPR)",
        ink,
    );
    cv.text(8, TOP - 26, "TAR (TPR)", ink);
    cv.text(LEFT + 100, TOP - 26, title, ink);
    for (k, (name, roc)) in curves.iter().enumerate() {
        let c = COLORS[k % COLORS.len()];
        let pts: Vec<(f64, f64)> = roc
            .fpr
            .iter()
            .zip(&roc.tpr)
            .map(|(&f, &t)| to_px(f, t))
            .collect();
        for w in pts.windows(2) {
            cv.line(w[0], w[1], c, 2);
        }
        let ly = (H as i64 - BOTTOM) - 20 - 16 * (curves.len() - 1 - k) as i64;
        cv.line(
            ((W as i64 - 300) as f64, ly as f64 + 5.0),
            ((W as i64 - 280) as f64, ly as f64 + 5.0),
            c,
            3,
        );
        cv.text(
            W as i64 - 272,
            ly,
            &format!("{name} AUC {:.4}", roc.auc()),
            ink,
        );
    }
    cv.0.save(path)
        .with_context(|| format!("writing ROC plot {}", path.display()))
}

/// One named curve for [`line_png`]: `(x, y)` points in drawing order. A non-finite `y` leaves a
/// gap in the line.
#[derive(Debug, Clone, Copy)]
pub struct Series<'a> {
    pub name: &'a str,
    pub points: &'a [(f64, f64)],
}

/// Tick spacing: 1, 2 or 5 times a power of ten, giving about `target` intervals over `range`.
fn nice_step(range: f64, target: f64) -> f64 {
    let raw = (range / target).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    mag * if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    }
}

/// Axis limits rounded out to whole ticks, and the ticks: `(lo, hi, step)`.
fn nice_axis(min: f64, max: f64) -> (f64, f64, f64) {
    let (min, max) = if max > min {
        (min, max)
    } else {
        let pad = if min == 0.0 { 1.0 } else { 0.1 * min.abs() };
        (min - pad, max + pad)
    };
    let step = nice_step(max - min, 5.0);
    (
        (min / step).floor() * step,
        (max / step).ceil() * step,
        step,
    )
}

/// A tick label with as many decimals as the step needs; scientific for very small or large values.
fn tick_label(v: f64, step: f64) -> String {
    if v.abs() < step * 1e-9 {
        return "0".into();
    }
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    if v.abs() >= 1e6 || decimals > 4 {
        format!("{v:.1e}").to_uppercase()
    } else {
        format!("{v:.decimals$}")
    }
}

/// Draw `series` as lines on linear axes into a PNG at `path`: x and y ranges cover every finite
/// point, rounded out to ticks; a legend names each series when there is more than one.
///
/// # Errors
/// When no series has a finite point, or the file cannot be written (the error names it).
pub fn line_png(series: &[Series], title: &str, x_label: &str, path: &Path) -> Result<()> {
    let finite: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    anyhow::ensure!(
        !finite.is_empty(),
        "{title}: nothing to plot (no finite point) for {}",
        path.display()
    );
    let fold = |f: fn(&(f64, f64)) -> f64| {
        finite
            .iter()
            .map(f)
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            })
    };
    let (x_min, x_max) = fold(|p| p.0);
    let (y_min, y_max) = fold(|p| p.1);
    let (x_lo, x_hi, x_step) = nice_axis(x_min, x_max);
    let (y_lo, y_hi, y_step) = nice_axis(y_min, y_max);
    let (pw, ph) = (
        (W as i64 - LEFT - RIGHT) as f64,
        (H as i64 - TOP - BOTTOM) as f64,
    );
    let px = |x: f64, y: f64| {
        (
            LEFT as f64 + (x - x_lo) / (x_hi - x_lo) * pw,
            TOP as f64 + (1.0 - (y - y_lo) / (y_hi - y_lo)) * ph,
        )
    };
    let mut cv = Canvas(RgbImage::from_pixel(W, H, Rgb([255, 255, 255])));
    let grid = [225, 225, 225];
    let ink = [0, 0, 0];
    let ticks = |lo: f64, hi: f64, step: f64| {
        let n = ((hi - lo) / step).round() as i64;
        (0..=n).map(move |k| lo + k as f64 * step)
    };
    for x in ticks(x_lo, x_hi, x_step) {
        let (gx, _) = px(x, y_lo);
        cv.line((gx, TOP as f64), (gx, (H as i64 - BOTTOM) as f64), grid, 1);
        let label = tick_label(x, x_step);
        cv.text(
            gx as i64 - 4 * label.len() as i64,
            H as i64 - BOTTOM + 8,
            &label,
            ink,
        );
    }
    for y in ticks(y_lo, y_hi, y_step) {
        let (_, gy) = px(x_lo, y);
        cv.line((LEFT as f64, gy), ((W as i64 - RIGHT) as f64, gy), grid, 1);
        let label = tick_label(y, y_step);
        cv.text(
            LEFT - 6 - 8 * label.len() as i64,
            gy as i64 - 5,
            &label,
            ink,
        );
    }
    let (x0, y0) = px(x_lo, y_lo);
    let (x1, y1) = px(x_hi, y_hi);
    for (a, b) in [
        ((x0, y0), (x1, y0)),
        ((x0, y0), (x0, y1)),
        ((x0, y1), (x1, y1)),
        ((x1, y0), (x1, y1)),
    ] {
        cv.line(a, b, ink, 1);
    }
    cv.text(
        W as i64 / 2 - 4 * x_label.len() as i64,
        H as i64 - 30,
        x_label,
        ink,
    );
    cv.text(LEFT, TOP - 26, title, ink);
    for (k, s) in series.iter().enumerate() {
        let c = COLORS[k % COLORS.len()];
        let mut prev: Option<(f64, f64)> = None;
        let sparse = s.points.len() <= 100;
        for &(x, y) in s.points {
            if !(x.is_finite() && y.is_finite()) {
                prev = None;
                continue;
            }
            let p = px(x, y);
            if let Some(q) = prev {
                cv.line(q, p, c, 2);
            }
            // A marker on every point of a sparse series (evaluations), a dot after a gap.
            if sparse || prev.is_none() {
                cv.line(p, p, c, 5);
            }
            prev = Some(p);
        }
        if series.len() > 1 {
            let ly = TOP + 8 + 16 * k as i64;
            let lx = W as i64 - RIGHT - 16 - 8 * s.name.chars().count().max(12) as i64 - 28;
            cv.line(
                (lx as f64, ly as f64 + 5.0),
                ((lx + 20) as f64, ly as f64 + 5.0),
                c,
                3,
            );
            cv.text(lx + 28, ly, s.name, ink);
        }
    }
    cv.0.save(path)
        .with_context(|| format!("writing plot {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_axes_and_labels() {
        assert_eq!(nice_axis(0.0, 9.3), (0.0, 10.0, 2.0));
        // Range 0.0748 / 5 = 0.015 rounds up to a step of 0.02; limits round out to 0 and 0.1.
        let (lo, hi, step) = nice_axis(0.0123, 0.0871);
        assert!(
            (step - 0.02).abs() < 1e-12 && lo == 0.0 && (hi - 0.1).abs() < 1e-12,
            "{lo} {hi} {step}"
        );
        // A constant series still gets a non-empty range.
        let (lo, hi, _) = nice_axis(3.0, 3.0);
        assert!(lo < 3.0 && hi > 3.0);
        assert_eq!(tick_label(0.25, 0.05), "0.25");
        assert_eq!(tick_label(1500.0, 500.0), "1500");
        assert_eq!(tick_label(2e-6, 1e-6), "2.0E-6");
        assert_eq!(tick_label(1e-17, 0.1), "0");
    }

    #[test]
    fn line_chart_draws_every_series() {
        let a = [(0.0, 1.0), (10.0, 0.5), (20.0, f64::NAN), (30.0, 0.2)];
        let b = [(0.0, 0.3), (30.0, 0.9)];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        let series = [
            Series {
                name: "a",
                points: &a,
            },
            Series {
                name: "b",
                points: &b,
            },
        ];
        line_png(&series, "LOSS", "STEP", &path).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (W, H));
        assert!(img.pixels().any(|p| p.0 == COLORS[0]));
        assert!(img.pixels().any(|p| p.0 == COLORS[1]));
        let empty = [(0.0, f64::NAN)];
        let err = line_png(
            &[Series {
                name: "x",
                points: &empty,
            }],
            "LR",
            "STEP",
            &path,
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("nothing to plot"), "{err:#}");
    }

    #[test]
    fn writes_a_png_with_the_curve() {
        let roc = Roc::new(&[0.9, 0.8, 0.7, 0.2], &[true, false, true, false]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("roc.png");
        roc_png(&[("test", &roc)], "ROC", &path).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (W, H));
        assert!(img.pixels().any(|p| p.0 == COLORS[0]), "the curve is drawn");
    }
}
