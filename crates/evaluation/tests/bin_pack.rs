//! `.bin` verification packs written by the Python 3 script `data-scripts/make_bin_pack.py` in every
//! variant (Python 2 byte strings, Python 3 bytes with protocols 2 and 4, numpy uint8 arrays with protocols
//! 2 and 5) read back in Rust: the same encoded bytes, labels and decoded pixels; corrupt packs fail cleanly.

use std::path::{Path, PathBuf};
use std::process::Command;

use facerec_evaluation::images::{read_rgb, Fit};
use facerec_evaluation::BinPack;
use facerec_testkit::python;
use image::{ImageFormat, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

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

#[test]
fn every_variant_round_trips() {
    let Some(py) = python() else { return };
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
        let status = Command::new(&py)
            .arg(script())
            .arg(dir.path())
            .arg(&out)
            .arg(variant)
            .status()
            .unwrap();
        assert!(status.success(), "make_bin_pack.py {variant} failed");
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
