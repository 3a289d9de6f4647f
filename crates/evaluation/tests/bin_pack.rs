//! `.bin` verification packs written by the Python 3 script `data-scripts/make_bin_pack.py` in every
//! variant (Python 2 byte strings, Python 3 bytes with protocols 2 and 4, numpy uint8 arrays with protocols
//! 2 and 5) read back in Rust: the same encoded bytes, labels and decoded pixels; corrupt packs fail cleanly.
//!
//! Without `FACEREC_PYTHON` the packs are rebuilt from the script's frozen answers
//! (`data-scripts/fixtures/make_bin_pack-*.json`): a pack with our image bytes cut out (the pickle
//! framing between them, and whether each image is stored raw or as `bytes2`'s latin-1 text in
//! UTF-8), into which the same images are put back.

use std::path::{Path, PathBuf};
use std::process::Command;

use facerec_evaluation::images::{read_rgb, Fit};
use facerec_evaluation::BinPack;
use facerec_testkit::{oracle, oracle_with};
use image::{ImageFormat, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data-scripts/make_bin_pack.py")
}

/// 2P noise images, JPEG and PNG alternating, some not square; returns file names and labels.
fn write_images(dir: &Path, pairs: usize) -> (Vec<String>, Vec<bool>) {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut names = Vec::new();
    for i in 0..2 * pairs {
        let (w, h) = if i % 7 == 3 { (30, 20) } else { (20, 20) };
        let img = RgbImage::from_fn(w, h, |_, _| image::Rgb([rng.gen(), rng.gen(), rng.gen()]));
        let (name, fmt) = if i % 2 == 0 {
            (format!("{i:06}.jpg"), ImageFormat::Jpeg)
        } else {
            (format!("{i:06}.png"), ImageFormat::Png)
        };
        img.save_with_format(dir.join(&name), fmt).unwrap();
        names.push(name);
    }
    let issame: Vec<bool> = (0..pairs).map(|_| rng.gen_bool(0.5)).collect();
    std::fs::write(dir.join("list.txt"), names.join("\n")).unwrap();
    let labels: Vec<&str> = issame.iter().map(|&s| if s { "1" } else { "0" }).collect();
    std::fs::write(dir.join("issame.txt"), labels.join("\n")).unwrap();
    (names, issame)
}

/// `bytes` as latin-1 text encoded in UTF-8 (how pickle protocol 2 stores Python 3 `bytes`).
fn latin1_utf8(bytes: &[u8]) -> Vec<u8> {
    bytes
        .iter()
        .map(|&b| b as char)
        .collect::<String>()
        .into_bytes()
}

/// The first occurrence of `needle` in `hay` at or after `from`, looking at most 4 KiB ahead.
fn find_near(hay: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    let end = hay.len().min(from + 4096 + needle.len());
    hay.get(from..end)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|k| from + k)
}

/// The pack with `images` (in pack order) cut out: `framing` (the bytes before, between and after
/// them, with their `lengths`, deflated: [`oracle::packed`]) and `forms` (`r` raw, `l` latin-1 text in UTF-8, per image).
fn template(pack: &[u8], images: &[Vec<u8>]) -> Value {
    let (mut pos, mut framing, mut lengths, mut forms) = (0, Vec::new(), Vec::new(), String::new());
    for (i, img) in images.iter().enumerate() {
        let latin = latin1_utf8(img);
        let (at, len, form) = match (find_near(pack, pos, img), find_near(pack, pos, &latin)) {
            (Some(r), Some(l)) if l < r => (l, latin.len(), 'l'),
            (Some(r), _) => (r, img.len(), 'r'),
            (None, Some(l)) => (l, latin.len(), 'l'),
            (None, None) => panic!("image {i} is not in the pack near byte {pos}"),
        };
        framing.extend_from_slice(&pack[pos..at]);
        lengths.push(at - pos);
        forms.push(form);
        pos = at + len;
    }
    framing.extend_from_slice(&pack[pos..]);
    lengths.push(pack.len() - pos);
    let lengths: Vec<u8> = lengths
        .iter()
        .flat_map(|&n| (n as u32).to_le_bytes())
        .collect();
    json!({
        "len": pack.len(),
        "framing": oracle::packed(&framing),
        "lengths": oracle::packed(&lengths),
        "forms": forms,
    })
}

/// The pack [`template`] describes, with `images` put back.
fn rebuild(t: &Value, images: &[Vec<u8>]) -> Vec<u8> {
    let framing = oracle::unpacked(t["framing"].as_str().unwrap());
    let lengths: Vec<usize> = oracle::unpacked(t["lengths"].as_str().unwrap())
        .chunks(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as usize)
        .collect();
    let forms: Vec<char> = t["forms"].as_str().unwrap().chars().collect();
    assert_eq!(lengths.len(), images.len() + 1, "template: segment count");
    let (mut out, mut at) = (Vec::new(), 0);
    for (k, len) in lengths.iter().enumerate() {
        out.extend_from_slice(&framing[at..at + len]);
        at += len;
        if let Some(img) = images.get(k) {
            match forms[k] {
                'l' => out.extend(latin1_utf8(img)),
                _ => out.extend_from_slice(img),
            }
        }
    }
    assert_eq!(
        out.len() as u64,
        t["len"].as_u64().unwrap(),
        "template: length"
    );
    out
}

/// `make_bin_pack.py`'s pack of `dir`'s images in `variant`, live or rebuilt from its frozen
/// template (`testkit::oracle_with`, keyed by the digests of the images and lists).
fn pack_bytes(dir: &Path, variant: &str, files: &[Vec<u8>]) -> Vec<u8> {
    let all: Vec<u8> = files
        .iter()
        .flat_map(|f| {
            (f.len() as u64)
                .to_le_bytes()
                .into_iter()
                .chain(f.iter().copied())
        })
        .collect();
    let list = std::fs::read(dir.join("list.txt")).unwrap();
    let issame = std::fs::read(dir.join("issame.txt")).unwrap();
    let request = json!({
        "variant": variant,
        "images": oracle::digest(&all),
        "list": oracle::digest(&list),
        "issame": oracle::digest(&issame),
    });
    let t = oracle_with("make_bin_pack.py", &request, |py| {
        let out = dir.join(format!("{variant}.live.bin"));
        let status = Command::new(py)
            .arg(script())
            .arg(dir)
            .arg(&out)
            .arg(variant)
            .status()
            .unwrap();
        assert!(status.success(), "make_bin_pack.py {variant} failed");
        let pack = std::fs::read(&out).unwrap();
        let t = template(&pack, files);
        assert!(
            rebuild(&t, files) == pack,
            "{variant}: the template does not rebuild the pack"
        );
        t
    });
    rebuild(&t, files)
}

#[test]
fn every_variant_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    // 1100 images: more than one APPENDS batch (1000) and more than 256 memo entries (LONG_BINPUT).
    let (names, issame) = write_images(dir.path(), 550);
    let files: Vec<Vec<u8>> = names
        .iter()
        .map(|n| std::fs::read(dir.path().join(n)).unwrap())
        .collect();
    let mut first: Option<tch::Tensor> = None;
    for variant in ["py2", "bytes2", "bytes4", "numpy2", "numpy5"] {
        let out = dir.path().join(format!("{variant}.bin"));
        std::fs::write(&out, pack_bytes(dir.path(), variant, &files)).unwrap();
        let pack = BinPack::read(&out).unwrap_or_else(|e| panic!("{variant}: {e:#}"));
        assert_eq!(pack.issame, issame, "{variant}");
        assert_eq!(pack.images.len(), files.len(), "{variant}");
        for (i, (got, want)) in pack.images.iter().zip(&files).enumerate() {
            assert_eq!(&got[..], &want[..], "{variant}: image {i}");
        }
        let decoded = pack.decode(20, Fit::Stretch, 2, &|| {}).unwrap();
        assert_eq!(decoded.size(), [1100, 3, 20, 20]);
        match &first {
            None => {
                // Decoding from the pack equals decoding the files.
                for i in [0usize, 1, 3, 10, 1099] {
                    let want = read_rgb(&dir.path().join(&names[i]), 20, Fit::Stretch).unwrap();
                    let got = Vec::<u8>::try_from(
                        decoded.get(i as i64).permute([1, 2, 0]).flatten(0, -1),
                    )
                    .unwrap();
                    assert_eq!(got, want, "image {i}");
                }
                first = Some(decoded);
            }
            Some(f) => assert!(f.equal(&decoded), "{variant} decodes differently"),
        }
        // Truncated anywhere: an error, never a panic.
        let data = std::fs::read(&out).unwrap();
        for cut in [
            0,
            1,
            2,
            3,
            50,
            data.len() / 2,
            data.len() - 2,
            data.len() - 1,
        ] {
            assert!(
                BinPack::from_bytes(&data[..cut]).is_err(),
                "{variant}: cut at {cut} parsed"
            );
        }
    }
}

#[test]
fn corrupt_image_bytes_name_the_image() {
    // A pack whose second image is not an image (Python 2 layout written by hand).
    let data = b"\x80\x02](U\x03abcU\x03defe]\x88a\x86.";
    let pack = BinPack::from_bytes(data).unwrap();
    let err = format!("{:#}", pack.decode(8, Fit::Stretch, 1, &|| {}).unwrap_err());
    assert!(err.contains("image 0 of the pack"), "{err}");
}
