//! Synthetic identities: a deterministic, procedurally generated face dataset, the embedded default
//! training data (arcface_torch has a synthetic mode for speed tests; ours must also be learnable).
//!
//! Each identity draws its own geometry and appearance (face shape, skin tone, ears, eye spacing, size
//! and colour, brows, nose, mouth, hair style and colour, sometimes a beard). Each image draws nuisances:
//! pose (in-plane rotation, translation, scale, a yaw-like horizontal shift/squeeze of the features),
//! lighting (direction and strength of a shading gradient, gain, colour cast), expression (smile, open
//! mouth, brow raise, blink, gaze), background, occlusion (a rectangle, a bar or dark glasses, sometimes)
//! and pixel noise. Pixels are rendered one by one from anti-aliased soft shapes.
//!
//! Everything is a pure function of `(seed, identity id, image index)`: one ChaCha8 stream per identity
//! (`hash(seed, id, IDENTITY_TAG)`) and one per image (`hash(seed, id, image)`), so the result does not
//! depend on the thread count or on the order of loads. Identity ids are `first_identity + label`, so two
//! configs with the same seed and disjoint id ranges give disjoint identities (train vs. held-out).
//! The model is described in `docs/data.md`.

use anyhow::{ensure, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::source::{hash_words, Source};

/// Configuration of a [`SyntheticFaces`] set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticConfig {
    /// Number of identities (classes). Default 100.
    pub identities: usize,
    /// Images per identity. Default 20.
    pub images_per_identity: usize,
    /// Side length of the square RGB images. Default 112 (the ArcFace input size).
    pub image_size: usize,
    /// Seed of the whole generator. Default 0.
    pub seed: u64,
    /// Identity ids are `[first_identity, first_identity + identities)`; label `l` is id `first_identity + l`.
    /// Sets with the same seed and disjoint id ranges have disjoint identities. Default 0.
    pub first_identity: u64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            identities: 100,
            images_per_identity: 20,
            image_size: 112,
            seed: 0,
            first_identity: 0,
        }
    }
}

/// The synthetic identity dataset; image `i` is identity `i / images_per_identity`, image
/// `i % images_per_identity`.
#[derive(Debug, Clone)]
pub struct SyntheticFaces {
    cfg: SyntheticConfig,
    identities: Vec<Identity>,
}

/// Stream tag of the per-identity generator (image streams use the image index, which is smaller).
const IDENTITY_TAG: u64 = u64::MAX;

impl SyntheticFaces {
    /// Build the set (draws the identities; images are rendered on `load`).
    pub fn new(cfg: SyntheticConfig) -> Result<Self> {
        ensure!(cfg.identities > 0, "synthetic data: identities must be > 0");
        ensure!(
            cfg.images_per_identity > 0,
            "synthetic data: images_per_identity must be > 0"
        );
        ensure!(
            (16..=1024).contains(&cfg.image_size),
            "synthetic data: image_size must be in 16..=1024, got {}",
            cfg.image_size
        );
        ensure!(
            cfg.identities
                .checked_mul(cfg.images_per_identity)
                .is_some()
                && cfg
                    .first_identity
                    .checked_add(cfg.identities as u64)
                    .is_some(),
            "synthetic data: identities x images_per_identity overflows"
        );
        let identities = (0..cfg.identities as u64)
            .map(|l| Identity::draw(&mut rng_for(cfg.seed, cfg.first_identity + l, IDENTITY_TAG)))
            .collect();
        Ok(Self { cfg, identities })
    }

    /// The configuration this set was built from.
    pub fn config(&self) -> &SyntheticConfig {
        &self.cfg
    }

    fn split(&self, index: usize) -> (usize, usize) {
        assert!(
            index < self.len(),
            "synthetic image {index} out of range (len {})",
            self.len()
        );
        (
            index / self.cfg.images_per_identity,
            index % self.cfg.images_per_identity,
        )
    }
}

impl Source for SyntheticFaces {
    fn len(&self) -> usize {
        self.cfg.identities * self.cfg.images_per_identity
    }
    fn num_classes(&self) -> usize {
        self.cfg.identities
    }
    fn label(&self, index: usize) -> usize {
        self.split(index).0
    }
    fn image_size(&self) -> usize {
        self.cfg.image_size
    }
    fn load(&self, index: usize) -> Result<Vec<u8>> {
        let (label, image) = self.split(index);
        let mut rng = rng_for(
            self.cfg.seed,
            self.cfg.first_identity + label as u64,
            image as u64,
        );
        let pose = Pose::draw(&mut rng);
        Ok(render(
            &self.identities[label],
            &pose,
            self.cfg.image_size,
            &mut rng,
        ))
    }
    fn describe(&self, index: usize) -> String {
        let (label, image) = self.split(index);
        format!(
            "synthetic identity {} image {image}",
            self.cfg.first_identity + label as u64
        )
    }
}

fn rng_for(seed: u64, id: u64, stream: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(hash_words(&[seed, id, stream]))
}

type Rgb = [f32; 3];

/// Identity-level parameters, in face units (1.0 = image side at scale 1; origin at the face centre,
/// v pointing down).
#[derive(Debug, Clone)]
struct Identity {
    face_a: f32,
    face_b: f32,
    taper: f32,
    skin: Rgb,
    ear: f32,
    eye_y: f32,
    eye_dx: f32,
    eye_rx: f32,
    eye_ry: f32,
    iris: Rgb,
    brow_dy: f32,
    brow_len: f32,
    brow_th: f32,
    brow_tilt: f32,
    brow_col: Rgb,
    nose_len: f32,
    nose_w: f32,
    mouth_y: f32,
    mouth_w: f32,
    lip_up: f32,
    lip_low: f32,
    lip_col: Rgb,
    hair_col: Rgb,
    hairline: f32,
    hair_curve: f32,
    hair_part: f32,
    hair_w: f32,
    hair_top: f32,
    hair_bottom: f32,
    beard: f32,
    /// Relief (heights in face units) that the lighting turns into shading: the head's depth, the
    /// nose ridge and tip, eye sockets, brow ridge, cheekbones (height and drop below the eyes), chin.
    relief: Relief,
    /// Clear glasses (a thin frame around each eye) this person usually wears, if any.
    specs: Option<Specs>,
}

/// Identity relief: heights of smooth bumps on an ellipsoidal head (see [`Identity::relief`]).
#[derive(Debug, Clone)]
struct Relief {
    depth: f32,
    nose: f32,
    nose_tip: f32,
    socket: f32,
    brow: f32,
    cheek: f32,
    cheek_dy: f32,
    chin: f32,
}

/// Clear glasses: frame gray level, frame thickness, lens size relative to the eye, and the
/// probability that one image shows them.
#[derive(Debug, Clone)]
struct Specs {
    frame: f32,
    thickness: f32,
    size: f32,
    wear_p: f32,
}

fn lerp3(a: Rgb, b: Rgb, t: f32) -> Rgb {
    [
        a[0] + (b[0] - a[0]) * t,
        a[1] + (b[1] - a[1]) * t,
        a[2] + (b[2] - a[2]) * t,
    ]
}

fn scale3(a: Rgb, k: f32) -> Rgb {
    [a[0] * k, a[1] * k, a[2] * k]
}

fn jitter3(rng: &mut ChaCha8Rng, c: Rgb, amount: f32) -> Rgb {
    c.map(|x| (x + rng.gen_range(-amount..=amount)).clamp(0.0, 255.0))
}

/// A palette colour, jittered.
fn pick(rng: &mut ChaCha8Rng, palette: &[Rgb], amount: f32) -> Rgb {
    let c = palette[rng.gen_range(0..palette.len())];
    jitter3(rng, c, amount)
}

impl Identity {
    fn draw(rng: &mut ChaCha8Rng) -> Self {
        const HAIR: [Rgb; 7] = [
            [25.0, 20.0, 18.0],
            [60.0, 40.0, 28.0],
            [105.0, 70.0, 40.0],
            [140.0, 70.0, 35.0],
            [200.0, 165.0, 100.0],
            [160.0, 155.0, 150.0],
            [90.0, 85.0, 80.0],
        ];
        const IRIS: [Rgb; 5] = [
            [45.0, 30.0, 20.0],
            [90.0, 60.0, 35.0],
            [70.0, 110.0, 160.0],
            [80.0, 120.0, 70.0],
            [110.0, 115.0, 120.0],
        ];
        let tone = rng.gen::<f32>();
        let skin = jitter3(
            rng,
            lerp3([238.0, 205.0, 180.0], [90.0, 58.0, 40.0], tone),
            14.0,
        );
        let hair_col = pick(rng, &HAIR, 18.0);
        let face_a = rng.gen_range(0.23..0.30);
        let face_b = rng.gen_range(0.30..0.38);
        let eye_rx = rng.gen_range(0.032..0.052);
        let bald = rng.gen_bool(0.08);
        Self {
            face_a,
            face_b,
            taper: rng.gen_range(0.0..0.4),
            skin,
            ear: rng.gen_range(0.025..0.045),
            eye_y: rng.gen_range(-0.07..0.0),
            eye_dx: rng.gen_range(0.085..0.135),
            eye_rx,
            eye_ry: eye_rx * rng.gen_range(0.4..0.65),
            iris: pick(rng, &IRIS, 12.0),
            brow_dy: rng.gen_range(0.035..0.065),
            brow_len: eye_rx * rng.gen_range(1.0..1.5),
            brow_th: rng.gen_range(0.007..0.018),
            brow_tilt: rng.gen_range(-0.3..0.3),
            brow_col: lerp3(hair_col, [20.0, 15.0, 12.0], rng.gen_range(0.2..0.7)),
            nose_len: rng.gen_range(0.07..0.12),
            nose_w: rng.gen_range(0.018..0.035),
            mouth_y: rng.gen_range(0.13..0.19),
            mouth_w: rng.gen_range(0.045..0.08),
            lip_up: rng.gen_range(0.006..0.014),
            lip_low: rng.gen_range(0.008..0.02),
            lip_col: lerp3(
                scale3(skin, 0.75),
                [170.0, 70.0, 70.0],
                rng.gen_range(0.2..0.6),
            ),
            hair_col,
            hairline: if bald {
                -face_b * 1.1
            } else {
                -face_b * rng.gen_range(0.4..0.8)
            },
            hair_curve: rng.gen_range(-0.05..0.12),
            hair_part: rng.gen_range(-0.08..0.08),
            hair_w: rng.gen_range(1.02..1.3),
            hair_top: if bald { 0.0 } else { rng.gen_range(0.02..0.1) },
            hair_bottom: if bald {
                -1.0
            } else {
                rng.gen_range(-0.12..0.3)
            },
            beard: if rng.gen_bool(0.2) {
                rng.gen_range(0.4..0.9)
            } else {
                0.0
            },
            relief: Relief {
                depth: rng.gen_range(0.12..0.22),
                nose: rng.gen_range(0.012..0.035),
                nose_tip: rng.gen_range(0.008..0.025),
                socket: rng.gen_range(0.006..0.02),
                brow: rng.gen_range(0.004..0.016),
                cheek: rng.gen_range(0.0..0.02),
                cheek_dy: rng.gen_range(0.05..0.09),
                chin: rng.gen_range(0.004..0.018),
            },
            specs: rng.gen_bool(0.25).then(|| Specs {
                frame: rng.gen_range(10.0..120.0),
                thickness: rng.gen_range(0.003..0.008),
                size: rng.gen_range(1.6..2.2),
                wear_p: rng.gen_range(0.6..1.0),
            }),
        }
    }
}

/// An occluder, in image coordinates (x, y in [-0.5, 0.5]) except `Glasses`, which follows the face.
#[derive(Debug, Clone)]
enum Occluder {
    Rect {
        x0: f32,
        y0: f32,
        x1: f32,
        y1: f32,
        col: Rgb,
    },
    Glasses {
        col: Rgb,
    },
}

/// Image-level nuisances.
#[derive(Debug, Clone)]
struct Pose {
    cos: f32,
    sin: f32,
    tx: f32,
    ty: f32,
    scale: f32,
    /// Horizontal stretch of the face (> 1 wider), as when a non-square photo is fitted.
    aspect: f32,
    yaw: f32,
    /// Unit direction towards the light, in face coordinates (x right, y down, z to the camera).
    light: [f32; 3],
    /// Share of ambient (unshaded) light, in (0, 1].
    ambient: f32,
    gain: Rgb,
    smile: f32,
    open: f32,
    brow_raise: f32,
    blink: f32,
    gaze: f32,
    bg: Rgb,
    bg_grad: [f32; 2],
    /// Soft background blobs (image coordinates: centre, half-axes, gray level): clutter.
    clutter: Vec<[f32; 5]>,
    /// Gray level of the clothes below the neck.
    clothes: f32,
    /// Uniform draw compared with the identity's `Specs::wear_p`.
    specs_roll: f32,
    occluder: Option<Occluder>,
    noise: f32,
}

impl Pose {
    fn draw(rng: &mut ChaCha8Rng) -> Self {
        let angle = rng.gen_range(-0.2f32..0.2);
        // Light from any side, mostly from the front: polar angle up to 70 degrees.
        let azimuth = rng.gen_range(0.0..std::f32::consts::TAU);
        let polar = rng.gen_range(0.0f32..1.2);
        let light = [
            polar.sin() * azimuth.cos(),
            polar.sin() * azimuth.sin(),
            polar.cos(),
        ];
        let ambient = rng.gen_range(0.3f32..0.8);
        let gain = rng.gen_range(0.75f32..1.15);
        let light = if light[1] > 0.0 && rng.gen_bool(0.7) {
            // Mostly from above (y points down).
            [light[0], -light[1], light[2]]
        } else {
            light
        };
        let occluder = if rng.gen_bool(0.3) {
            let col = [
                rng.gen_range(0.0..255.0),
                rng.gen_range(0.0..255.0),
                rng.gen_range(0.0..255.0),
            ];
            Some(match rng.gen_range(0..4) {
                0 => Occluder::Glasses {
                    col: scale3(col, 0.25),
                },
                1 => {
                    // A horizontal or vertical bar across the whole image.
                    let (c, w) = (rng.gen_range(-0.35..0.35), rng.gen_range(0.06..0.16));
                    if rng.gen_bool(0.5) {
                        Occluder::Rect {
                            x0: -1.0,
                            x1: 1.0,
                            y0: c - w,
                            y1: c + w,
                            col,
                        }
                    } else {
                        Occluder::Rect {
                            x0: c - w,
                            x1: c + w,
                            y0: -1.0,
                            y1: 1.0,
                            col,
                        }
                    }
                }
                _ => {
                    let (w, h) = (rng.gen_range(0.12..0.4), rng.gen_range(0.12..0.4));
                    let (x0, y0) = (rng.gen_range(-0.5..0.5 - w), rng.gen_range(-0.5..0.5 - h));
                    Occluder::Rect {
                        x0,
                        y0,
                        x1: x0 + w,
                        y1: y0 + h,
                        col,
                    }
                }
            })
        } else {
            None
        };
        Self {
            cos: angle.cos(),
            sin: angle.sin(),
            tx: rng.gen_range(-0.05..0.05),
            ty: rng.gen_range(-0.05..0.05),
            scale: rng.gen_range(1.05..1.7),
            aspect: rng.gen_range(0.9..1.25),
            yaw: rng.gen_range(-0.7..0.7),
            light,
            ambient,
            gain: [0, 1, 2].map(|_| gain * rng.gen_range(0.92..1.08)),
            smile: rng.gen_range(-0.6..1.0),
            open: if rng.gen_bool(0.3) {
                rng.gen_range(0.004..0.03)
            } else {
                0.0
            },
            brow_raise: rng.gen_range(-0.012..0.02),
            blink: if rng.gen_bool(0.1) {
                rng.gen_range(0.1..0.5)
            } else {
                1.0
            },
            gaze: rng.gen_range(-0.35..0.35),
            bg: {
                let level = rng.gen_range(20.0..210.0);
                [0, 1, 2].map(|_| level + rng.gen_range(-12.0..12.0))
            },
            bg_grad: [rng.gen_range(-60.0..60.0), rng.gen_range(-60.0..60.0)],
            clutter: (0..rng.gen_range(0..5))
                .map(|_| {
                    [
                        rng.gen_range(-0.5..0.5),
                        rng.gen_range(-0.5..0.5),
                        rng.gen_range(0.05..0.3),
                        rng.gen_range(0.05..0.3),
                        rng.gen_range(0.0..255.0),
                    ]
                })
                .collect(),
            clothes: rng.gen_range(10.0..230.0),
            specs_roll: rng.gen(),
            occluder,
            noise: rng.gen_range(1.0..8.0),
        }
    }
}

/// Coverage of a shape at signed distance `d` (negative inside) for a pixel of width `pw`.
#[inline]
fn cover(d: f32, pw: f32) -> f32 {
    (0.5 - d / pw).clamp(0.0, 1.0)
}

/// Approximate signed distance to the axis-aligned ellipse centred at `(cx, cy)` with half-axes `rx, ry`
/// (first order: the implicit function over its gradient norm; exact on the boundary).
#[inline]
fn ellipse_d(u: f32, v: f32, cx: f32, cy: f32, rx: f32, ry: f32) -> f32 {
    let (dx, dy) = ((u - cx) / rx, (v - cy) / ry);
    let f = dx * dx + dy * dy - 1.0;
    let g = 2.0 * ((dx / rx).powi(2) + (dy / ry).powi(2)).sqrt();
    f / g.max(1e-6)
}

/// Anti-aliased coverage of an ellipse, with a cheap bounding-box rejection.
#[inline]
fn ellipse(u: f32, v: f32, cx: f32, cy: f32, rx: f32, ry: f32, pw: f32) -> f32 {
    if (u - cx).abs() > rx + pw || (v - cy).abs() > ry + pw {
        return 0.0;
    }
    cover(ellipse_d(u, v, cx, cy, rx, ry), pw)
}

#[inline]
fn blend(c: &mut Rgb, col: Rgb, alpha: f32) {
    if alpha > 0.0 {
        for k in 0..3 {
            c[k] += (col[k] - c[k]) * alpha;
        }
    }
}

#[inline]
fn smoothstep(e0: f32, e1: f32, x: f32) -> f32 {
    let t = ((x - e0) / (e1 - e0)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// Identity geometry under one pose (yaw, expression), in face units.
struct Layout {
    face_a: f32,
    face_cx: f32,
    face_cy: f32,
    /// (centre x, half-width) of the left and right eye.
    eyes: [(f32, f32); 2],
    eye_ry: f32,
    brow_y: f32,
    nose_x: f32,
    nose_end: f32,
    mouth_x: f32,
    mouth_y: f32,
    hair: (f32, f32, f32, f32),
    /// Half-extent of everything drawn on the head, for rejecting background pixels.
    head_rx: f32,
    head_top: f32,
    head_bottom: f32,
    /// Gaussian bumps of the relief on the face: centre x, centre y, sigma x, sigma y, height.
    bumps: Vec<[f32; 5]>,
}

impl Layout {
    /// Yaw narrows the face contour a little, shifts the features sideways (the nose most) and shrinks
    /// the far eye and brow.
    fn new(id: &Identity, p: &Pose) -> Self {
        let yaw = p.yaw;
        let face_a = id.face_a * (1.0 - 0.12 * yaw.abs());
        let feat_dx = yaw * 0.05;
        let face_cx = -yaw * 0.015;
        let eyes = [-1.0f32, 1.0].map(|side| {
            let squeeze = (1.0 - 0.35 * yaw * side).clamp(0.4, 1.4);
            (
                side * id.eye_dx * (1.0 - 0.15 * yaw * side) + feat_dx,
                id.eye_rx * squeeze,
            )
        });
        let face_cy = 0.03;
        let hair = (
            face_cx * 0.5,
            face_cy - id.hair_top,
            face_a * id.hair_w,
            id.face_b + id.hair_top,
        );
        let r = &id.relief;
        let brow_y = id.eye_y - id.brow_dy - p.brow_raise;
        let (nose_x, nose_end) = (feat_dx * 1.6, id.eye_y + id.nose_len);
        let (mouth_x, mouth_y) = (feat_dx * 1.2, id.mouth_y - 0.004 * p.smile);
        let mut bumps = vec![
            [
                nose_x,
                0.5 * (id.eye_y + nose_end),
                id.nose_w * 0.7,
                id.nose_len * 0.5,
                r.nose,
            ],
            [nose_x, nose_end - 0.012, id.nose_w * 0.9, 0.016, r.nose_tip],
            [mouth_x, mouth_y + 0.08, 0.045, 0.03, r.chin],
            [mouth_x, mouth_y, id.mouth_w * 0.8, 0.014, 0.006],
        ];
        for (&(ex, rx), side) in eyes.iter().zip([-1.0f32, 1.0]) {
            bumps.push([
                ex,
                id.eye_y - 0.004,
                rx * 1.2,
                id.eye_ry * 2.0 + 0.01,
                -r.socket,
            ]);
            bumps.push([ex, brow_y + 0.008, id.brow_len * 1.2, 0.016, r.brow]);
            bumps.push([
                ex + side * 0.02,
                id.eye_y + r.cheek_dy,
                0.045,
                0.035,
                r.cheek,
            ]);
        }
        Self {
            bumps,
            face_a,
            face_cx,
            face_cy,
            eyes,
            eye_ry: id.eye_ry * p.blink,
            brow_y,
            nose_x,
            nose_end,
            mouth_x,
            mouth_y,
            hair,
            head_rx: (face_a + 2.0 * id.ear).max(hair.2) + face_cx.abs() + 0.01,
            head_top: face_cy - id.face_b - 2.0 * id.hair_top - 0.01,
            head_bottom: face_cy + id.face_b + 0.01,
        }
    }
}

/// Render one image: `s*s*3` RGB bytes. The per-pixel noise continues the image's random stream.
fn render(id: &Identity, p: &Pose, s: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
    // One pixel in face units (the narrower way when the face is stretched).
    let pw = 1.0 / (s as f32 * p.scale * p.aspect.max(1.0));
    let l = Layout::new(id, p);
    let body_top = l.face_cy + 0.3 * id.face_b;
    // Exposure: the shading is divided by the square root of its value at the face centre facing
    // the camera, so a side light darkens one side more than it dims the whole face.
    let exposure = (p.ambient + (1.0 - p.ambient) * p.light[2]).sqrt();
    let mut out = Vec::with_capacity(s * s * 3);
    for py in 0..s {
        for px in 0..s {
            let x = (px as f32 + 0.5) / s as f32 - 0.5;
            let y = (py as f32 + 0.5) / s as f32 - 0.5;
            // Image -> face coordinates: undo translation, rotation, scale.
            let (dx, dy) = (x - p.tx, y - p.ty);
            let u = (p.cos * dx + p.sin * dy) / (p.scale * p.aspect);
            let v = (-p.sin * dx + p.cos * dy) / p.scale;
            let mut c = [
                p.bg[0] + p.bg_grad[0] * x,
                p.bg[1] + p.bg_grad[1] * y,
                p.bg[2] + 0.5 * (p.bg_grad[0] * y + p.bg_grad[1] * x),
            ];
            for &[bx, by, rx, ry, level] in &p.clutter {
                let a = ellipse(x, y, bx, by, rx, ry, 4.0 / s as f32);
                blend(&mut c, [level; 3], 0.8 * a);
            }
            if v > body_top {
                draw_body(id, p, &l, u, v, pw, &mut c);
            }
            let on_head = u.abs() <= l.head_rx && v >= l.head_top && v <= l.head_bottom;
            let (fg, face_cov) = if on_head {
                draw_head(id, p, &l, u, v, pw, &mut c)
            } else {
                (0.0, 0.0)
            };
            // Lighting: Lambert shading of the relief over the head, then gain and colour cast.
            let k = if fg > 0.0 {
                1.0 + (shade(id, p, &l, u, v, face_cov) / exposure - 1.0) * fg
            } else {
                1.0
            };
            for (ch, g) in c.iter_mut().zip(p.gain) {
                *ch *= k * g;
            }
            if let Some(Occluder::Rect {
                x0,
                y0,
                x1,
                y1,
                col,
            }) = &p.occluder
            {
                let a = cover((x0 - x).max(x - x1).max(y0 - y).max(y - y1), 1.0 / s as f32);
                blend(&mut c, *col, a);
            }
            // Noise: the sum of four uniform bytes (Irwin-Hall), close to Gaussian, with unit variance.
            let r: u32 = rng.gen();
            let sum = r.to_le_bytes().iter().map(|&b| b as f32).sum::<f32>();
            let n = (sum - 510.0) / 147.8;
            for ch in c {
                out.push((ch + p.noise * n).round().clamp(0.0, 255.0) as u8);
            }
        }
    }
    out
}

/// Lambert shading `ambient + (1 - ambient) max(0, <n, light>)` at face point `(u, v)`: the normal `n`
/// is that of the height field `depth sqrt(1 - r^2)` of the head's ellipse (its slope capped near the
/// rim, so hair and ears get a steep normal) plus the identity's relief bumps, weighted by the face's
/// coverage `face_cov`.
fn shade(id: &Identity, p: &Pose, l: &Layout, u: f32, v: f32, face_cov: f32) -> f32 {
    let (du, dv) = (u - l.face_cx, v - l.face_cy);
    let (a2, b2) = (l.face_a * l.face_a, id.face_b * id.face_b);
    let q = (1.0 - du * du / a2 - dv * dv / b2).max(0.04).sqrt();
    let depth = id.relief.depth;
    let (mut gx, mut gy) = (-depth * du / (a2 * q), -depth * dv / (b2 * q));
    if face_cov > 0.0 {
        for &[bx, by, sx, sy, h] in &l.bumps {
            let (tx, ty) = ((u - bx) / sx, (v - by) / sy);
            if tx.abs() < 3.0 && ty.abs() < 3.0 {
                let g = face_cov * h * (-0.5 * (tx * tx + ty * ty)).exp();
                gx -= g * tx / sx;
                gy -= g * ty / sy;
            }
        }
    }
    // n = (-gx, -gy, 1) / |.|
    let lit = (-gx * p.light[0] - gy * p.light[1] + p.light[2]) / (gx * gx + gy * gy + 1.0).sqrt();
    p.ambient + (1.0 - p.ambient) * lit.max(0.0)
}

/// Neck and shoulders (clothes) below the face, at face point `(u, v)`.
#[allow(clippy::too_many_arguments)]
fn draw_body(id: &Identity, p: &Pose, l: &Layout, u: f32, v: f32, pw: f32, c: &mut Rgb) {
    let neck = (u - l.face_cx).abs() - 0.55 * l.face_a;
    blend(c, scale3(id.skin, 0.7), cover(neck, pw));
    let shoulders = ellipse(u, v, l.face_cx, l.face_cy + id.face_b + 0.28, 0.65, 0.3, pw);
    blend(c, [p.clothes; 3], shoulders);
}

/// Paint the head layers at face point `(u, v)` over `c`; returns the head's coverage there and the
/// face's (for the lighting).
fn draw_head(
    id: &Identity,
    p: &Pose,
    l: &Layout,
    u: f32,
    v: f32,
    pw: f32,
    c: &mut Rgb,
) -> (f32, f32) {
    let yaw = p.yaw;
    // Hair behind the head, cut off softly at its lower end.
    let hair_cov = if id.hair_top > 0.0 {
        let (hx, hy, hrx, hry) = l.hair;
        ellipse(u, v, hx, hy, hrx, hry, pw)
            * (1.0 - smoothstep(id.hair_bottom - 0.02, id.hair_bottom + 0.02, v))
    } else {
        0.0
    };
    blend(c, id.hair_col, hair_cov);
    // Ears (the far one hides behind the head when turned).
    for side in [-1.0f32, 1.0] {
        let ex = l.face_cx + side * l.face_a * (0.97 - 0.1 * yaw * side);
        let r = id.ear * (1.0 - 0.5 * (yaw * side).max(0.0));
        blend(
            c,
            scale3(id.skin, 0.88),
            ellipse(u, v, ex, id.eye_y + 0.03, r, id.ear * 1.7, pw),
        );
    }
    // Face: an ellipse whose half-width tapers towards the chin, darker towards its rim.
    let vt = ((v - l.face_cy) / id.face_b).max(0.0);
    let a_v = l.face_a * (1.0 - id.taper * vt * vt);
    let face_cov = ellipse(u, v, l.face_cx, l.face_cy, a_v, id.face_b, pw);
    if face_cov > 0.0 {
        let r2 = ((u - l.face_cx) / l.face_a).powi(2) + ((v - l.face_cy) / id.face_b).powi(2);
        blend(c, scale3(id.skin, 1.0 - 0.18 * r2.min(1.0)), face_cov);
        draw_features(id, p, l, u, v, pw, c, face_cov);
    }
    // Hair in front: the fringe above a curved, parted hairline.
    if id.hair_top > 0.0 {
        let hu = (u - l.face_cx - id.hair_part) / l.face_a;
        let line = id.hairline
            + id.hair_curve * hu * hu
            + 0.03 * hu.abs().min(1.0) * id.hair_part.signum();
        blend(c, id.hair_col, cover(v - line, pw) * face_cov.max(hair_cov));
    }
    // Dark glasses follow the face.
    if let Some(Occluder::Glasses { col }) = &p.occluder {
        for &(ex, rx) in &l.eyes {
            blend(
                c,
                *col,
                0.95 * ellipse(u, v, ex, id.eye_y, rx * 1.45, id.eye_ry * 2.6, pw),
            );
        }
        let mid = 0.5 * (l.eyes[0].0 + l.eyes[1].0);
        let bridge = ((v - id.eye_y + 0.01).abs() - 0.004).max((u - mid).abs() - id.eye_dx);
        blend(c, *col, cover(bridge, pw));
    } else if let Some(sp) = id.specs.as_ref().filter(|sp| p.specs_roll < sp.wear_p) {
        draw_specs(sp, id, l, u, v, pw, c);
    }
    (face_cov.max(hair_cov), face_cov)
}

/// Clear glasses: an elliptic frame around each eye, a bridge and the temples towards the ears.
#[allow(clippy::too_many_arguments)]
fn draw_specs(sp: &Specs, id: &Identity, l: &Layout, u: f32, v: f32, pw: f32, c: &mut Rgb) {
    let col = [sp.frame; 3];
    let th = sp.thickness;
    let lens_ry = id.eye_rx * sp.size * 0.55;
    let mut cov = 0.0f32;
    let mut inner = [0.0f32; 2];
    for (k, &(ex, rx)) in l.eyes.iter().enumerate() {
        let lens_rx = rx * sp.size * 0.75;
        inner[k] = ex + if k == 0 { lens_rx } else { -lens_rx };
        if (u - ex).abs() < lens_rx + th + pw && (v - id.eye_y).abs() < lens_ry + th + pw {
            let d = ellipse_d(u, v, ex, id.eye_y, lens_rx, lens_ry).abs() - th;
            cov = cov.max(cover(d, pw));
        }
        // Temple: from the outer edge of the lens to the side of the face.
        let outer = ex + if k == 0 { -lens_rx } else { lens_rx };
        let (lo, hi) = if k == 0 {
            (l.face_cx - l.face_a, outer)
        } else {
            (outer, l.face_cx + l.face_a)
        };
        let temple = ((v - id.eye_y + 0.3 * lens_ry).abs() - 0.6 * th).max((lo - u).max(u - hi));
        cov = cov.max(cover(temple, pw));
    }
    let (lo, hi) = (inner[0].min(inner[1]), inner[0].max(inner[1]));
    let bridge = ((v - id.eye_y + 0.4 * lens_ry).abs() - 0.7 * th).max((lo - u).max(u - hi));
    cov = cov.max(cover(bridge, pw));
    blend(c, col, 0.9 * cov);
}

/// Beard, nose, mouth, eyes and brows, inside the face (`face_cov` > 0).
#[allow(clippy::too_many_arguments)]
fn draw_features(
    id: &Identity,
    p: &Pose,
    l: &Layout,
    u: f32,
    v: f32,
    pw: f32,
    c: &mut Rgb,
    face_cov: f32,
) {
    if id.beard > 0.0 {
        let a = face_cov * id.beard * smoothstep(l.nose_end - 0.01, l.nose_end + 0.04, v);
        blend(c, id.hair_col, a);
    }
    // Nose: a shadow along the side away from the yaw, then the nostrils.
    let side_x = l.nose_x - p.yaw.signum() * id.nose_w * 0.5;
    let mid = 0.5 * (id.eye_y + l.nose_end) + 0.01;
    blend(
        c,
        scale3(id.skin, 0.78),
        0.5 * ellipse(u, v, side_x, mid, id.nose_w * 0.5, id.nose_len * 0.5, pw),
    );
    for side in [-1.0f32, 1.0] {
        let a = ellipse(
            u,
            v,
            l.nose_x + side * id.nose_w * 0.6,
            l.nose_end,
            0.011,
            0.006,
            pw,
        );
        blend(c, scale3(id.skin, 0.55), 0.8 * a);
    }
    // Mouth: upper lip, lower lip and the opening between them, bent by the smile.
    let t = (u - l.mouth_x) / id.mouth_w;
    if t.abs() < 1.0 + 2.0 * pw / id.mouth_w && (v - l.mouth_y).abs() < 0.08 {
        let ends = cover((t.abs() - 1.0) * id.mouth_w, pw);
        let w = (1.0 - t * t).max(0.0).sqrt();
        let dv = v - (l.mouth_y - 0.022 * p.smile * t * t);
        let half_gap = 0.5 * p.open * w;
        let up = cover((-dv - half_gap - id.lip_up * w).max(dv + half_gap), pw);
        let low = cover((dv - half_gap - id.lip_low * w).max(half_gap - dv), pw);
        let gap = cover(dv.abs() - half_gap.max(0.3 * pw), pw);
        blend(c, id.lip_col, ends * up);
        blend(c, scale3(id.lip_col, 1.1), ends * low);
        blend(c, [40.0, 15.0, 15.0], ends * gap);
    }
    // Eyes: socket shadow, sclera, iris, pupil, upper lid line.
    let iris_r = id.eye_ry * 0.95;
    for &(ex, rx) in &l.eyes {
        if (u - ex).abs() > 1.5 * rx + pw || (v - id.eye_y).abs() > 2.0 * id.eye_ry + pw {
            continue;
        }
        blend(
            c,
            scale3(id.skin, 0.8),
            0.45 * ellipse(u, v, ex, id.eye_y - 0.004, rx * 1.5, id.eye_ry * 1.9, pw),
        );
        let white = ellipse(u, v, ex, id.eye_y, rx, l.eye_ry, pw);
        blend(c, [232.0, 226.0, 220.0], white);
        let ix = ex + p.gaze * rx * 0.5;
        blend(
            c,
            id.iris,
            ellipse(u, v, ix, id.eye_y, iris_r, iris_r, pw).min(white),
        );
        let pupil = ellipse(u, v, ix, id.eye_y, iris_r * 0.45, iris_r * 0.45, pw).min(white);
        blend(c, [10.0, 10.0, 12.0], pupil);
        if v < id.eye_y {
            let lid = cover(
                ellipse_d(u, v, ex, id.eye_y, rx, l.eye_ry).abs() - 0.25 * pw.max(0.004),
                pw,
            );
            blend(c, scale3(id.skin, 0.35), 0.7 * lid);
        }
    }
    // Brows: tilted ellipses, mirrored.
    for (&(ex, rx), side) in l.eyes.iter().zip([-1.0f32, 1.0]) {
        let len = id.brow_len * rx / id.eye_rx;
        if (u - ex).abs() > len + pw || (v - l.brow_y).abs() > len + pw {
            continue;
        }
        let tilt = side * (id.brow_tilt + 0.3 * p.brow_raise / 0.02);
        let (ct, st) = (tilt.cos(), tilt.sin());
        let (bu, bv) = (u - ex, v - l.brow_y);
        let (ru, rv) = (ct * bu + st * bv, -st * bu + ct * bv);
        blend(
            c,
            id.brow_col,
            0.9 * ellipse(ru, rv, 0.0, 0.0, len, id.brow_th, pw),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(seed: u64, first: u64) -> SyntheticFaces {
        SyntheticFaces::new(SyntheticConfig {
            identities: 3,
            images_per_identity: 4,
            image_size: 32,
            seed,
            first_identity: first,
        })
        .unwrap()
    }

    #[test]
    fn deterministic_and_offset_consistent() {
        let (a, b) = (set(5, 10), set(5, 10));
        for i in 0..a.len() {
            assert_eq!(a.load(i).unwrap(), b.load(i).unwrap());
        }
        // Identity id 11 image 2 is the same whether it is label 1 (first = 10) or label 0 (first = 11).
        assert_eq!(set(5, 10).load(4 + 2).unwrap(), set(5, 11).load(2).unwrap());
        assert_ne!(set(5, 10).load(0).unwrap(), set(6, 10).load(0).unwrap());
        assert_eq!(a.describe(5), "synthetic identity 11 image 1");
        assert_eq!((a.label(5), a.num_classes(), a.len()), (1, 3, 12));
    }

    #[test]
    fn rejects_bad_config() {
        let bad = |f: fn(&mut SyntheticConfig)| {
            let mut c = SyntheticConfig::default();
            f(&mut c);
            SyntheticFaces::new(c).is_err()
        };
        assert!(bad(|c| c.identities = 0));
        assert!(bad(|c| c.images_per_identity = 0));
        assert!(bad(|c| c.image_size = 4));
        assert!(!bad(|_| ()));
    }
}
