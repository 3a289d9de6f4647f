//! Face alignment by a 5-point similarity transform to the arcface_torch 112 x 112 template, and the
//! landmark files it reads. Used by the IJB protocol (`facerec_evaluation::ijb`) and by
//! `facerec prep align`.
//!
//! The transform is Umeyama's least-squares similarity (rotation, uniform scale, translation; Umeyama,
//! "Least-squares estimation of transformation parameters between two point patterns", TPAMI 1991)
//! from the five landmarks (left eye, right eye, nose tip, left and right mouth corner, as seen in the
//! image) to [`ARCFACE_TEMPLATE`] scaled by `size / 112`; the crop is a bilinear warp with a black
//! border ([`warp_affine`], the geometry of OpenCV's `warpAffine` computed in f64).
//!
//! Channel order: images are RGB throughout (decoded by [`crate::input`], warped channel by channel,
//! written as RGB PNG or JPEG); nothing here reorders channels. insightface's scripts read BGR with
//! OpenCV and convert, so their aligned pixels are the same.
//!
//! Landmark files ([`read_landmarks`]): one image per line, `path x0 y0 x1 y1 ...` separated by tabs
//! or spaces, an optional header line (its second field is not a number). Two layouts
//! ([`LandmarkLayout`]): the 5 points above (11 columns), and the 9-point layout of the LFW funneled
//! landmarks in `../shared/data` (19 columns: 4 eye corners left to right, 3 nose points, 2 mouth
//! corners), reduced to 5 by taking each eye as the mean of its two corners, the nose as point 5 and
//! the mouth corners as points 7 and 8 (0-based), the reduction the shipped aligned LFW set used.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use image::RgbImage;

/// The 112 x 112 ArcFace alignment template (x, y): eyes, nose tip, mouth corners.
pub const ARCFACE_TEMPLATE: [[f64; 2]; 5] = [
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
];

/// Least-squares similarity transform (rotation, uniform scale, translation) mapping `src` onto `dst`
/// (Umeyama, "Least-squares estimation of transformation parameters between two point patterns", TPAMI
/// 1991, with the reflection correction), as the 2 x 3 matrix `[[a, -b, tx], [b, a, ty]]`.
///
/// Returns `None` when the source points are degenerate (all equal).
pub fn umeyama(src: &[[f64; 2]], dst: &[[f64; 2]]) -> Option<[[f64; 3]; 2]> {
    let n = src.len() as f64;
    let mean = |p: &[[f64; 2]]| {
        let s = p.iter().fold([0.0, 0.0], |a, q| [a[0] + q[0], a[1] + q[1]]);
        [s[0] / n, s[1] / n]
    };
    let (ms, md) = (mean(src), mean(dst));
    // Covariance dst^T src / n and the source variance.
    let (mut c, mut var) = ([[0.0f64; 2]; 2], 0.0);
    for (s, d) in src.iter().zip(dst) {
        let (xs, ys) = (s[0] - ms[0], s[1] - ms[1]);
        let (xd, yd) = (d[0] - md[0], d[1] - md[1]);
        c[0][0] += xd * xs;
        c[0][1] += xd * ys;
        c[1][0] += yd * xs;
        c[1][1] += yd * ys;
        var += xs * xs + ys * ys;
    }
    if var <= 0.0 {
        return None;
    }
    // For 2-D the optimal rotation (det +1) has cos ~ (c00 + c11), sin ~ (c10 - c01); the scale is the
    // trace of S D over the variance, which equals that vector's length over var.
    let (p, q) = (c[0][0] + c[1][1], c[1][0] - c[0][1]);
    let r = (p * p + q * q).sqrt();
    if r == 0.0 {
        return None;
    }
    let scale = r / var;
    let (a, b) = (scale * p / r, scale * q / r);
    let tx = md[0] - (a * ms[0] - b * ms[1]);
    let ty = md[1] - (b * ms[0] + a * ms[1]);
    Some([[a, -b, tx], [b, a, ty]])
}

/// `cv2.warpAffine(img, m, (size, size))` with bilinear sampling and a black border: output pixel
/// `(x, y)` samples `img` at `m^-1 (x, y)` (integer pixel centres, no half-pixel shift). Samples
/// outside the image count as 0.
///
/// # Panics
/// If `m` is singular.
pub fn warp_affine(img: &RgbImage, m: &[[f64; 3]; 2], size: u32) -> RgbImage {
    let [[a, b, tx], [c, d, ty]] = *m;
    let det = a * d - b * c;
    assert!(det != 0.0, "warp_affine: singular transform");
    // Inverse of [[a, b], [c, d]] and its translation.
    let (ia, ib, ic, id) = (d / det, -b / det, -c / det, a / det);
    let (w, h) = (img.width() as i64, img.height() as i64);
    let px = |x: i64, y: i64, ch: usize| -> f64 {
        if x < 0 || y < 0 || x >= w || y >= h {
            0.0
        } else {
            img.get_pixel(x as u32, y as u32)[ch] as f64
        }
    };
    RgbImage::from_fn(size, size, |x, y| {
        let (u, v) = (x as f64 - tx, y as f64 - ty);
        let (sx, sy) = (ia * u + ib * v, ic * u + id * v);
        let (x0, y0) = (sx.floor(), sy.floor());
        let (fx, fy) = (sx - x0, sy - y0);
        let (x0, y0) = (x0 as i64, y0 as i64);
        let mut out = [0u8; 3];
        for (ch, o) in out.iter_mut().enumerate() {
            let top = px(x0, y0, ch) * (1.0 - fx) + px(x0 + 1, y0, ch) * fx;
            let bottom = px(x0, y0 + 1, ch) * (1.0 - fx) + px(x0 + 1, y0 + 1, ch) * fx;
            *o = (top * (1.0 - fy) + bottom * fy).round().clamp(0.0, 255.0) as u8;
        }
        image::Rgb(out)
    })
}

/// Align one image to `size x size`: similarity from its landmarks to the ArcFace template scaled
/// by `size / 112`, then [`warp_affine`].
pub fn align(img: &RgbImage, landmarks: &[[f64; 2]; 5], size: u32) -> Result<RgbImage> {
    let m = template_transform(landmarks, size)?;
    Ok(warp_affine(img, &m, size))
}

/// The similarity [`align`] warps with: landmarks onto the template scaled by `size / 112`.
pub fn template_transform(landmarks: &[[f64; 2]; 5], size: u32) -> Result<[[f64; 3]; 2]> {
    let k = f64::from(size) / 112.0;
    let dst: Vec<[f64; 2]> = ARCFACE_TEMPLATE
        .iter()
        .map(|p| [p[0] * k, p[1] * k])
        .collect();
    umeyama(landmarks, &dst).context("degenerate landmarks (all points equal)")
}

/// The column layout of a landmark file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LandmarkLayout {
    /// Five points: left eye, right eye, nose tip, left mouth corner, right mouth corner (11 columns).
    Five,
    /// The LFW funneled 9-point layout: 4 eye corners left to right, 3 nose points, 2 mouth corners
    /// (19 columns).
    Lfw9,
}

impl LandmarkLayout {
    /// Number of landmark points.
    pub fn points(self) -> usize {
        match self {
            LandmarkLayout::Five => 5,
            LandmarkLayout::Lfw9 => 9,
        }
    }

    /// Columns of one line: the path plus two per point.
    pub fn columns(self) -> usize {
        1 + 2 * self.points()
    }

    /// The layout with `columns` columns per line, if any.
    pub fn from_columns(columns: usize) -> Option<Self> {
        [LandmarkLayout::Five, LandmarkLayout::Lfw9]
            .into_iter()
            .find(|l| l.columns() == columns)
    }

    /// The five alignment points from this layout's points (see the module docs).
    ///
    /// # Panics
    /// If `pts.len() != self.points()`.
    pub fn to_five(self, pts: &[[f64; 2]]) -> [[f64; 2]; 5] {
        assert_eq!(pts.len(), self.points(), "to_five: point count");
        match self {
            LandmarkLayout::Five => [pts[0], pts[1], pts[2], pts[3], pts[4]],
            LandmarkLayout::Lfw9 => {
                let mid = |a: [f64; 2], b: [f64; 2]| [(a[0] + b[0]) / 2.0, (a[1] + b[1]) / 2.0];
                [
                    mid(pts[0], pts[1]),
                    mid(pts[2], pts[3]),
                    pts[5],
                    pts[7],
                    pts[8],
                ]
            }
        }
    }
}

impl std::str::FromStr for LandmarkLayout {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "5" | "five" => Ok(LandmarkLayout::Five),
            "lfw9" => Ok(LandmarkLayout::Lfw9),
            other => bail!("landmark layout {other:?}: expected \"5\" or \"lfw9\""),
        }
    }
}

/// One line of a landmark file.
#[derive(Debug, Clone, PartialEq)]
pub struct LandmarkEntry {
    /// The image path as written (relative to the image folder).
    pub path: String,
    /// 1-based line in the file.
    pub line: usize,
    /// The five alignment points (x, y), already reduced from the file's layout.
    pub points: [[f64; 2]; 5],
}

/// Read a landmark file (see the module docs). `layout` `None`: decided by the first data line's
/// column count (11 or 19). Errors name the file and line: a line with a missing or extra column, a
/// coordinate that is not a finite number, no data line at all.
pub fn read_landmarks(
    path: &Path,
    layout: Option<LandmarkLayout>,
) -> Result<(LandmarkLayout, Vec<LandmarkEntry>)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading landmark file {}", path.display()))?;
    let mut layout = layout;
    let mut out = Vec::new();
    let mut first = true;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let at = || format!("{}:{line}", path.display());
        let fields: Vec<&str> = if raw.contains('\t') {
            raw.split('\t').map(str::trim).collect()
        } else {
            raw.split_whitespace().collect()
        };
        if fields.iter().all(|f| f.is_empty()) {
            continue;
        }
        if std::mem::take(&mut first) && fields.len() > 1 && fields[1].parse::<f64>().is_err() {
            continue; // the header
        }
        let l = match layout {
            Some(l) => l,
            None => {
                let l = LandmarkLayout::from_columns(fields.len()).with_context(|| {
                    format!(
                        "{}: {} columns; a landmark line is a path and 10 (5-point) or 18 \
                         (LFW 9-point) coordinates",
                        at(),
                        fields.len()
                    )
                })?;
                layout = Some(l);
                l
            }
        };
        ensure!(
            fields.len() == l.columns(),
            "{}: {} columns, expected {} (a path and {} coordinates of the {:?} layout): a missing or \
             extra column",
            at(),
            fields.len(),
            l.columns(),
            2 * l.points(),
            l
        );
        ensure!(!fields[0].is_empty(), "{}: the path column is empty", at());
        let mut pts = Vec::with_capacity(l.points());
        for k in 0..l.points() {
            let num = |s: &str| -> Result<f64> {
                let v: f64 = s
                    .parse()
                    .with_context(|| format!("{}: {s:?} is not a number", at()))?;
                ensure!(v.is_finite(), "{}: {s:?} is not finite", at());
                Ok(v)
            };
            pts.push([num(fields[1 + 2 * k])?, num(fields[2 + 2 * k])?]);
        }
        out.push(LandmarkEntry {
            path: fields[0].to_string(),
            line,
            points: l.to_five(&pts),
        });
    }
    let Some(layout) = layout else {
        bail!("{}: no landmark lines", path.display());
    };
    ensure!(!out.is_empty(), "{}: no landmark lines", path.display());
    Ok((layout, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn umeyama_recovers_a_similarity() {
        let (s, th, tx, ty) = (1.7f64, 0.3f64, 12.0, -5.0);
        let (a, b) = (s * th.cos(), s * th.sin());
        let dst: Vec<[f64; 2]> = ARCFACE_TEMPLATE
            .iter()
            .map(|p| [a * p[0] - b * p[1] + tx, b * p[0] + a * p[1] + ty])
            .collect();
        let m = umeyama(&ARCFACE_TEMPLATE, &dst).unwrap();
        let want = [[a, -b, tx], [b, a, ty]];
        for r in 0..2 {
            for c in 0..3 {
                assert!((m[r][c] - want[r][c]).abs() < 1e-9, "{m:?} vs {want:?}");
            }
        }
        assert!(umeyama(&[[1.0, 1.0]; 5], &ARCFACE_TEMPLATE).is_none());
    }

    #[test]
    fn warp_identity_and_shift() {
        let img = RgbImage::from_fn(4, 4, |x, y| image::Rgb([(10 * x + y) as u8; 3]));
        let id = warp_affine(&img, &[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], 4);
        assert_eq!(id, img);
        // Shift right by one: column 0 samples x = -1 (outside, 0), column 1 samples x = 0.
        let sh = warp_affine(&img, &[[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], 4);
        assert_eq!(sh.get_pixel(0, 2)[0], 0);
        assert_eq!(sh.get_pixel(1, 2)[0], img.get_pixel(0, 2)[0]);
        // Half-pixel shift: the mean of two neighbours.
        let half = warp_affine(&img, &[[1.0, 0.0, -0.5], [0.0, 1.0, 0.0]], 4);
        assert_eq!(half.get_pixel(1, 0)[0], 15);
    }

    #[test]
    fn align_puts_the_landmarks_on_the_template_and_keeps_rgb() {
        // A 200 x 160 image with a red square at each of five landmarks of a rotated, scaled face;
        // after alignment every square sits on its template point, still red (channel 0).
        let (s, th, tx, ty) = (1.6f64, -0.2f64, 20.0, 15.0);
        let (a, b) = (s * th.cos(), s * th.sin());
        let lm: Vec<[f64; 2]> = ARCFACE_TEMPLATE
            .iter()
            .map(|p| [a * p[0] - b * p[1] + tx, b * p[0] + a * p[1] + ty])
            .collect();
        let img = RgbImage::from_fn(200, 160, |x, y| {
            let near = lm
                .iter()
                .any(|p| (x as f64 - p[0]).abs() < 3.0 && (y as f64 - p[1]).abs() < 3.0);
            image::Rgb(if near { [250, 0, 0] } else { [0, 0, 200] })
        });
        let five = [lm[0], lm[1], lm[2], lm[3], lm[4]];
        let out = align(&img, &five, 112).unwrap();
        for p in ARCFACE_TEMPLATE {
            let px = out.get_pixel(p[0].round() as u32, p[1].round() as u32);
            assert!(px[0] > 200 && px[2] < 50, "{p:?}: {px:?}");
        }
        let corner = out.get_pixel(56, 20);
        assert!(corner[0] < 50 && corner[2] > 150, "{corner:?}");
    }

    #[test]
    fn lfw9_reduces_to_eye_means_nose_5_mouth_7_8() {
        let pts: Vec<[f64; 2]> = (0..9).map(|k| [k as f64, 10.0 * k as f64]).collect();
        let five = LandmarkLayout::Lfw9.to_five(&pts);
        assert_eq!(
            five,
            [
                [0.5, 5.0],
                [2.5, 25.0],
                [5.0, 50.0],
                [7.0, 70.0],
                [8.0, 80.0]
            ]
        );
    }

    #[test]
    fn landmark_files_parse_and_bad_lines_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("lm.tsv");
        let row = |name: &str, n: usize| {
            let mut s = name.to_string();
            for k in 0..n {
                s.push_str(&format!("\t{}.5", k));
            }
            s + "\n"
        };
        std::fs::write(
            &f,
            format!("path\tx0\ty0\n{}{}", row("a/1.jpg", 18), row("b/2.jpg", 18)),
        )
        .unwrap();
        let (layout, rows) = read_landmarks(&f, None).unwrap();
        assert_eq!(layout, LandmarkLayout::Lfw9);
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[1].path.as_str(), rows[1].line), ("b/2.jpg", 3));
        assert_eq!(rows[0].points[2], [10.5, 11.5]);
        // A missing column on line 3, an extra one on line 2.
        for (text, line) in [
            (format!("{}{}", row("a", 10), row("b", 9)), 2),
            (format!("{}{}", row("a", 10), row("b", 11)), 2),
            (format!("x y\n{}{}", row("a", 10), row("b", 9)), 3),
        ] {
            std::fs::write(&f, text).unwrap();
            let err = format!("{:#}", read_landmarks(&f, None).unwrap_err());
            assert!(err.contains(&format!("lm.tsv:{line}:")), "{err}");
            assert!(err.contains("missing or extra column"), "{err}");
        }
        std::fs::write(&f, row("a", 10).replace("3.5", "x")).unwrap();
        let err = format!("{:#}", read_landmarks(&f, None).unwrap_err());
        assert!(
            err.contains("lm.tsv:1:") && err.contains("not a number"),
            "{err}"
        );
        std::fs::write(&f, row("a", 7)).unwrap();
        assert!(read_landmarks(&f, None).is_err());
        assert!(read_landmarks(&f, Some(LandmarkLayout::Five)).is_err());
        assert!(read_landmarks(&dir.path().join("none.tsv"), None).is_err());
    }
}
