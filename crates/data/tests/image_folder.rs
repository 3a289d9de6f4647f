//! Integration tests of `ImageFolder` on generated PNG/PGM/JPEG files, of `shared_data::unpack` on a
//! generated archive, and one test on the real ORL faces from `../shared/data` (unpacked at run time).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use facerec_data::{shared_data, Fit, ImageFolder, Loader, LoaderConfig, Source};
use image::{GrayImage, Luma, Rgb, RgbImage};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn write_pgm_ascii(path: &Path, w: usize, h: usize, value: u8) {
    let pixels = vec![value.to_string(); w * h].join(" ");
    std::fs::write(
        path,
        format!("P2\n# plain graymap\n{w} {h}\n255\n{pixels}\n"),
    )
    .unwrap();
}

/// root/{s1, s2, s10}: s1 = RGB PNG 20x30 + binary PGM 10x10; s2 = JPEG + plain PGM; s10 = gray PNG with a
/// horizontal ramp; plus files that must be ignored.
fn make_tree() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for c in ["s1", "s2", "s10"] {
        std::fs::create_dir(root.join(c)).unwrap();
    }
    RgbImage::from_pixel(20, 30, Rgb([10, 200, 30]))
        .save(root.join("s1/1.png"))
        .unwrap();
    GrayImage::from_pixel(10, 10, Luma([77]))
        .save(root.join("s1/2.pgm"))
        .unwrap(); // P5
    RgbImage::from_pixel(16, 16, Rgb([120, 60, 200]))
        .save(root.join("s2/1.jpg"))
        .unwrap();
    write_pgm_ascii(&root.join("s2/2.pgm"), 6, 4, 150);
    GrayImage::from_fn(32, 8, |x, _| Luma([(x * 8) as u8]))
        .save(root.join("s10/1.png"))
        .unwrap();
    std::fs::write(root.join("s1/notes.txt"), "not an image").unwrap();
    std::fs::write(root.join("s1/.hidden.png"), "not an image either").unwrap();
    std::fs::write(root.join("README"), "a file at the top level").unwrap();
    dir
}

fn pixels(img: &[u8]) -> impl Iterator<Item = &[u8]> {
    img.chunks_exact(3)
}

#[test]
fn labels_natural_sort_gray_to_rgb_and_resize() {
    let tree = make_tree();
    let set = ImageFolder::open(tree.path(), 8, None).unwrap();
    assert_eq!(set.class_names(), ["s1", "s2", "s10"]);
    assert_eq!((set.len(), set.num_classes(), set.image_size()), (5, 3, 8));
    assert_eq!(
        (0..5).map(|i| set.label(i)).collect::<Vec<_>>(),
        [0, 0, 1, 1, 2]
    );
    assert!(set.describe(2).ends_with("1.jpg"), "{}", set.describe(2));
    let expect: [(usize, [u8; 3], u8); 4] = [
        (0, [10, 200, 30], 0),
        (1, [77, 77, 77], 0),
        (2, [120, 60, 200], 4),
        (3, [150, 150, 150], 0),
    ];
    for (i, rgb, tol) in expect {
        let img = set.load(i).unwrap();
        assert_eq!(img.len(), 8 * 8 * 3);
        for p in pixels(&img) {
            for k in 0..3 {
                assert!(
                    p[k].abs_diff(rgb[k]) <= tol,
                    "{}: pixel {p:?}, expected {rgb:?}",
                    set.describe(i)
                );
            }
        }
    }
    // The 32x8 ramp stretched to 8x8: gray replicated, increasing left to right, every row the same.
    let ramp = set.load(4).unwrap();
    assert!(pixels(&ramp).all(|p| p[0] == p[1] && p[1] == p[2]));
    let row: Vec<u8> = pixels(&ramp[..8 * 3]).map(|p| p[0]).collect();
    assert!(row.windows(2).all(|w| w[0] < w[1]), "{row:?}");
    assert!(row[0] < 32 && row[7] > 220, "{row:?}");
    assert!(ramp.chunks_exact(8 * 3).all(|r| r == &ramp[..8 * 3]));
}

#[test]
fn selected_classes_keep_the_given_order() {
    let tree = make_tree();
    let classes = ["s10".to_string(), "s1".to_string()];
    let set = ImageFolder::open(tree.path(), 4, Some(&classes)).unwrap();
    assert_eq!(set.class_names(), classes);
    assert_eq!((set.len(), set.num_classes()), (3, 2));
    assert_eq!((0..3).map(|i| set.label(i)).collect::<Vec<_>>(), [0, 1, 1]);
    let twice = ["s1".to_string(), "s1".to_string()];
    assert!(ImageFolder::open(tree.path(), 4, Some(&twice)).is_err());
}

#[test]
fn errors_name_the_file_or_folder() {
    let tree = make_tree();
    let root = tree.path();
    // Missing root and missing listed class.
    let missing = root.join("nowhere");
    let err = format!("{:#}", ImageFolder::open(&missing, 8, None).unwrap_err());
    assert!(err.contains(&missing.display().to_string()), "{err}");
    let err = format!(
        "{:#}",
        ImageFolder::open(root, 8, Some(&["s99".to_string()])).unwrap_err()
    );
    assert!(err.contains("s99"), "{err}");
    // Corrupt file: opening works, loading names the file, also through the loader.
    std::fs::write(
        root.join("s2/3.png"),
        b"\x89PNG\r\n\x1a\n definitely not a png",
    )
    .unwrap();
    let set = Arc::new(ImageFolder::open(root, 8, None).unwrap());
    let bad = (0..set.len())
        .find(|&i| set.describe(i).ends_with("3.png"))
        .unwrap();
    let err = format!("{:#}", set.load(bad).unwrap_err());
    assert!(
        err.contains(&root.join("s2/3.png").display().to_string()),
        "{err}"
    );
    let cfg = LoaderConfig {
        batch_size: 2,
        shuffle: false,
        drop_last: false,
        flip: false,
        max_shift: 0,
        workers: 2,
        prefetch: 2,
        seed: 0,
        sampler: Default::default(),
        augment: Default::default(),
    };
    let loader = Loader::new(set, cfg);
    let err = loader
        .epoch(0, 0)
        .find_map(|b| b.err())
        .expect("the corrupt file must fail");
    assert!(format!("{err:#}").contains("3.png"), "{err:#}");
    // An empty class folder.
    std::fs::create_dir(root.join("s3")).unwrap();
    std::fs::write(root.join("s3/readme.txt"), "no images").unwrap();
    let err = format!("{:#}", ImageFolder::open(root, 8, None).unwrap_err());
    assert!(
        err.contains(&root.join("s3").display().to_string()) && err.contains("no images"),
        "{err}"
    );
}

/// Dangling and looping symbolic links in an image folder are named in an error (they used to be
/// skipped silently, training on fewer images than the folder seems to hold); a link to a real file
/// is an image like any other.
#[cfg(unix)]
#[test]
fn broken_symlinks_are_named() {
    use std::os::unix::fs::symlink;
    let tree = make_tree();
    let root = tree.path();
    symlink(root.join("s1/1.png"), root.join("s2/linked.png")).unwrap();
    let set = ImageFolder::open(root, 8, None).unwrap();
    assert_eq!(set.len(), 6, "a working link is an image");
    symlink(root.join("gone/missing.png"), root.join("s1/dangling.png")).unwrap();
    symlink(root.join("s10/loop_b.png"), root.join("s10/loop_a.png")).unwrap();
    symlink(root.join("s10/loop_a.png"), root.join("s10/loop_b.png")).unwrap();
    symlink(root.join("no_such_class"), root.join("s4")).unwrap();
    let err = format!("{:#}", ImageFolder::open(root, 8, None).unwrap_err());
    for name in ["s1/dangling.png", "s10/loop_a.png", "s10/loop_b.png", "s4"] {
        assert!(
            err.contains(&root.join(name).display().to_string()),
            "{name} not named: {err}"
        );
    }
    assert!(err.contains("4 broken symbolic link"), "{err}");
    assert!(err.contains("target missing"), "{err}");
    // Listing the classes does not hide a broken link inside one of them.
    let err = format!(
        "{:#}",
        ImageFolder::open(root, 8, Some(&["s1".to_string()])).unwrap_err()
    );
    assert!(
        err.contains("dangling.png") && !err.contains("loop_a"),
        "{err}"
    );
}

/// The fit rule reaches the decoded images: a 20 x 30 image under stretch and centre crop (the
/// functions themselves are unit-tested in `input.rs`).
#[test]
fn fit_rule_applies_to_folder_images() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir(root.join("a")).unwrap();
    // 20 x 60: rows 0..10 red, 10..50 green, 50..60 blue. A centre crop to 4 x 4 keeps source rows
    // 20..40 (short side 20 -> 4, height 60 -> 12, rows 4..8): no red or blue reaches it. A stretch
    // keeps every row: red at the top, blue at the bottom.
    RgbImage::from_fn(20, 60, |_, y| match y {
        0..=9 => Rgb([255, 0, 0]),
        10..=49 => Rgb([0, 255, 0]),
        _ => Rgb([0, 0, 255]),
    })
    .save(root.join("a/1.png"))
    .unwrap();
    let stretch = ImageFolder::open(root, 4, None).unwrap();
    assert_eq!(stretch.fit(), Fit::Stretch);
    let s = stretch.load(0).unwrap();
    assert!(
        s[0] > 50 && s[2] == 0,
        "stretch keeps the red top rows: {:?}",
        &s[..3]
    );
    let n = s.len();
    assert!(
        s[n - 3] == 0 && s[n - 1] > 50,
        "and the blue bottom rows: {:?}",
        &s[n - 3..]
    );
    let crop = ImageFolder::open(root, 4, None)
        .unwrap()
        .with_fit(Fit::CenterCrop);
    let c = crop.load(0).unwrap();
    assert!(
        c.chunks(3).all(|p| p[0] == 0 && p[2] == 0 && p[1] > 200),
        "{c:?}"
    );
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn unpack_verifies_and_unpacks_once() {
    let data = tempfile::tempdir().unwrap();
    // A tiny archive: faces/a/1.txt.
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    let mut header = tar::Header::new_gnu();
    header.set_size(5);
    header.set_mode(0o644);
    header.set_cksum();
    builder
        .append_data(&mut header, "faces/a/1.txt", &b"hello"[..])
        .unwrap();
    let archive = builder.into_inner().unwrap().finish().unwrap();
    std::fs::write(data.path().join("faces.tar.gz"), &archive).unwrap();
    std::fs::write(data.path().join("other.tar.gz"), &archive).unwrap();
    let sums = format!(
        "{}  faces.tar.gz\n{}  other.tar.gz\n",
        sha256_hex(&archive),
        "0".repeat(64)
    );
    std::fs::write(data.path().join("SHA256SUMS"), sums).unwrap();

    let dest = tempfile::tempdir().unwrap();
    let out = shared_data::unpack(data.path(), "faces.tar.gz", dest.path()).unwrap();
    assert_eq!(out, dest.path().join("faces"));
    assert_eq!(
        std::fs::read_to_string(out.join("a/1.txt")).unwrap(),
        "hello"
    );
    // Reused: a second call does not unpack again (a local edit survives).
    std::fs::write(out.join("a/1.txt"), "edited").unwrap();
    assert_eq!(
        shared_data::unpack(data.path(), "faces.tar.gz", dest.path()).unwrap(),
        out
    );
    assert_eq!(
        std::fs::read_to_string(out.join("a/1.txt")).unwrap(),
        "edited"
    );
    // A checksum mismatch and an unlisted archive are errors naming the archive.
    let err = format!(
        "{:#}",
        shared_data::unpack(data.path(), "other.tar.gz", dest.path()).unwrap_err()
    );
    assert!(
        err.contains("other.tar.gz") && err.contains("SHA256SUMS"),
        "{err}"
    );
    let err = format!(
        "{:#}",
        shared_data::unpack(data.path(), "missing.tar.gz", dest.path()).unwrap_err()
    );
    assert!(err.contains("missing.tar.gz"), "{err}");
    // Only the unpacked folder and its marker are left in dest (no temporary folders).
    let mut names: Vec<String> = std::fs::read_dir(dest.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, [".faces.tar.gz.unpacked", "faces"]);
}

#[test]
fn real_orl_faces() {
    let Some(data) = shared_data::for_tests(&workspace()) else {
        return;
    };
    let orl = shared_data::unpack(
        &data,
        "orl_faces.tar.gz",
        &workspace().join("target/shared-data"),
    )
    .unwrap();
    assert!(orl.ends_with("orl_faces"), "{}", orl.display());
    let classes: Vec<String> = (1..=3).map(|i| format!("s{i}")).collect();
    let set = ImageFolder::open(&orl, 56, Some(&classes)).unwrap();
    assert_eq!((set.len(), set.num_classes()), (30, 3));
    for label in 0..3 {
        assert_eq!((0..30).filter(|&i| set.label(i) == label).count(), 10);
    }
    let (images, labels) = facerec_data::load_all(&set, 2).unwrap();
    assert_eq!(images.size(), [30, 3, 56, 56]);
    assert_eq!(labels.len(), 30);
    // Gray faces replicated to 3 equal channels, with real contrast.
    assert!(images.select(1, 0).equal(&images.select(1, 2)));
    let std = images.std(true).double_value(&[]);
    assert!(std > 0.2, "ORL images look flat (std {std})");
    // All 40 classes in natural order.
    let all = ImageFolder::open(&orl, 28, None).unwrap();
    assert_eq!((all.len(), all.num_classes()), (400, 40));
    assert_eq!(all.class_names()[..3], ["s1", "s2", "s3"]);
    assert_eq!(all.class_names()[39], "s40");
}
