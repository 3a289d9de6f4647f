//! RecordIO: packing an image folder and reading it back with our reader and with the independent
//! Python reader `data-scripts/recordio_reader.py` (written from SPEC 6.3; without `FACEREC_PYTHON`,
//! its frozen answers in `data-scripts/fixtures/recordio_reader-*.json`); split records; sets with no
//! header record; `.idx` keys past 2^24; every bad-input case of issue 3 (error naming file, key and
//! offset, or counted and skipped under the skip policy); the P x K sampler; verification packs.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use facerec_data::rec_writer::encode_jpeg;
use facerec_data::recordio::{encode_payload, read_record, IrHeader, RecordWriter, MAGIC_BYTES};
use facerec_data::verification_pack::pack_pairs;
use facerec_data::{
    pack_image_folder, BadRecordPolicy, Loader, LoaderConfig, PackOptions, RecLayout, RecOptions,
    RecordIo, Sampler, SizePolicy, Source, SyntheticConfig, SyntheticFaces,
};
use facerec_testkit::{oracle, oracle_with};
use image::{Rgb, RgbImage};
use serde_json::Value;

const S: usize = 24;

/// A smooth colour pattern that JPEG keeps within a few levels, different per (identity, image).
fn pattern(c: usize, j: usize, size: usize) -> RgbImage {
    RgbImage::from_fn(size as u32, size as u32, |x, y| {
        let (x, y) = (x as usize, y as usize);
        Rgb([
            (40 + 6 * x + 30 * c) as u8,
            (30 + 5 * y + 20 * j) as u8,
            (200 - 3 * x - 2 * y - 10 * c) as u8,
        ])
    })
}

/// root/<id>/<j>.png with `counts[id]` images each (identity names out of natural order on disk).
fn make_folder(counts: &[usize]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (c, &n) in counts.iter().enumerate() {
        let d = dir.path().join(format!("id{c}"));
        std::fs::create_dir(&d).unwrap();
        for j in 0..n {
            pattern(c, j, S).save(d.join(format!("{j}.png"))).unwrap();
        }
    }
    dir
}

fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).abs())
        .sum::<f64>()
        / a.len() as f64
}

/// The independent reader's JSON for `path` (`what` = `rec`: a folder, `bin`: a pack), live or
/// frozen (`testkit::oracle_with`, keyed by the digests of the files read). Image contents are kept
/// as digests (`rec`: compared with what our reader extracts) or deflated (`bin`: decoded here).
fn run_reader(what: &str, path: &Path) -> Value {
    let files: Vec<(String, Vec<u8>)> = if path.is_dir() {
        let mut names: Vec<String> = std::fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
            .into_iter()
            .map(|n| {
                let bytes = std::fs::read(path.join(&n)).unwrap();
                (n, bytes)
            })
            .collect()
    } else {
        vec![("file".into(), std::fs::read(path).unwrap())]
    };
    let digests: serde_json::Map<String, Value> = files
        .iter()
        .map(|(n, b)| (n.clone(), Value::String(oracle::digest(b))))
        .collect();
    let request = serde_json::json!({"what": what, "files": digests});
    oracle_with("recordio_reader.py", &request, |py| {
        let out = Command::new(py)
            .arg(oracle::script_path("recordio_reader.py"))
            .arg(what)
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "recordio_reader.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut v: Value = serde_json::from_slice(&out.stdout).unwrap();
        if let Some(images) = v["images"].as_array_mut() {
            for item in images {
                let content = hex(item["content"].as_str().unwrap());
                item["content"] = Value::String(oracle::digest(&content));
            }
        }
        if let Some(bins) = v["bins"].as_array() {
            let bins: Vec<Vec<u8>> = bins.iter().map(|b| hex(b.as_str().unwrap())).collect();
            let lengths: Vec<u8> = bins
                .iter()
                .flat_map(|b| (b.len() as u32).to_le_bytes())
                .collect();
            v["bins"] = serde_json::json!({
                "lengths": oracle::packed(&lengths),
                "bytes": oracle::packed(&bins.concat()),
            });
        }
        v
    })
}

/// The images of a `bin` answer of [`run_reader`].
fn bins_of(v: &Value) -> Vec<Vec<u8>> {
    let all = oracle::unpacked(v["bins"]["bytes"].as_str().unwrap());
    let mut at = 0;
    oracle::unpacked(v["bins"]["lengths"].as_str().unwrap())
        .chunks(4)
        .map(|c| {
            let n = u32::from_le_bytes(c.try_into().unwrap()) as usize;
            at += n;
            all[at - n..at].to_vec()
        })
        .collect()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Open with `policy` and no ceiling on skipped records (`max_skipped_fraction = 1`): the tests of the
/// skip policy look at single bad records; the ceiling has tests of its own.
fn open(path: &Path, size: usize, policy: BadRecordPolicy) -> anyhow::Result<RecordIo> {
    RecordIo::open(
        path,
        size,
        RecOptions {
            policy,
            size: SizePolicy::Resize,
            max_skipped_fraction: 1.0,
            ..Default::default()
        },
    )
}

#[test]
fn pack_reads_back_with_ours_and_the_python_reader() {
    let counts = [3, 1, 4];
    let folder = make_folder(&counts);
    let out = tempfile::tempdir().unwrap();
    let summary = pack_image_folder(
        folder.path(),
        out.path(),
        &PackOptions {
            quality: 95,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        (
            summary.identities,
            summary.images,
            summary.height,
            summary.width
        ),
        (3, 8, S, S)
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("property")).unwrap(),
        format!("3,{S},{S}")
    );

    let expected: Vec<(usize, usize)> = counts
        .iter()
        .enumerate()
        .flat_map(|(c, &n)| (0..n).map(move |j| (c, j)))
        .collect();
    let rec = open(out.path(), S, BadRecordPolicy::Error).unwrap();
    assert_eq!((rec.len(), rec.num_classes()), (8, 3));
    assert!(matches!(
        rec.layout(),
        RecLayout::Insightface { identities: 3, .. }
    ));
    for (i, &(c, j)) in expected.iter().enumerate() {
        assert_eq!((rec.label(i), rec.key(i)), (c, i as u64 + 1));
        let diff = mean_abs_diff(&rec.load(i).unwrap(), pattern(c, j, S).as_raw());
        assert!(diff < 3.0, "image {i}: mean abs diff {diff}");
    }

    let v = run_reader("rec", out.path());
    assert_eq!(v["header"][0], 2);
    assert_eq!(v["property"], serde_json::json!([3, S, S]));
    let images = v["images"].as_array().unwrap();
    assert_eq!(images.len(), 8);
    for (i, (item, &(c, j))) in images.iter().zip(&expected).enumerate() {
        assert_eq!(item["label"].as_f64().unwrap(), c as f64);
        assert_eq!(item["id2"], 0);
        // The Python reader extracted exactly our reader's bytes, and they decode with the `image`
        // crate (not our decoder) to the pattern.
        let ours = rec.content(i).unwrap();
        assert_eq!(item["content"], oracle::digest(&ours), "image {i}: content");
        let img = image::load_from_memory(&ours).unwrap().to_rgb8();
        assert!(mean_abs_diff(img.as_raw(), pattern(c, j, S).as_raw()) < 3.0);
    }
    let ranges: Vec<Value> = v["identities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["range"].clone())
        .collect();
    assert_eq!(
        ranges,
        [
            serde_json::json!([1, 4]),
            serde_json::json!([4, 5]),
            serde_json::json!([5, 9])
        ]
    );
    assert!(v["identities"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["empty"] == true));
}

/// A JPEG with a COM segment holding `MAGIC_BYTES` at a 4-aligned offset of the record payload, so the
/// writer must split the record.
fn jpeg_with_magic(img: &RgbImage) -> Vec<u8> {
    let plain = encode_jpeg(
        img.as_raw(),
        img.width() as usize,
        img.height() as usize,
        90,
    )
    .unwrap();
    // payload = 24-byte IRHeader + jpeg; the COM data starts at payload offset 24 + 2 + 4 = 30.
    let mut com = vec![0u8; 2]; // pad so that the magic lands at payload offset 32
    com.extend_from_slice(&MAGIC_BYTES);
    com.extend_from_slice(b"split me");
    com.extend_from_slice(&MAGIC_BYTES); // offset 32 + 12 = 44: aligned too
    let mut out = plain[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xFE]);
    out.extend_from_slice(&((com.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&com);
    out.extend_from_slice(&plain[2..]);
    out
}

/// Write records by hand: `records[k]` = (header, content) for key k; returns the offsets.
fn write_rec(dir: &Path, records: &[(IrHeader, Vec<u8>)], with_idx: bool) -> Vec<u64> {
    let mut w = RecordWriter::new(Vec::new());
    let offsets: Vec<u64> = records
        .iter()
        .map(|(h, c)| w.write(&encode_payload(h, c)).unwrap())
        .collect();
    std::fs::write(dir.join("train.rec"), w.finish().unwrap()).unwrap();
    if with_idx {
        let idx: String = offsets
            .iter()
            .enumerate()
            .map(|(k, o)| format!("{k}\t{o}\n"))
            .collect();
        std::fs::write(dir.join("train.idx"), idx).unwrap();
    }
    offsets
}

/// insightface layout by hand: header, images (class of each), identity records.
fn insightface_records(images: &[(u32, Vec<u8>)], classes: usize) -> Vec<(IrHeader, Vec<u8>)> {
    let n = images.len() as u64;
    let mut recs = vec![(
        IrHeader::meta(vec![(n + 1) as f32, (n + 1 + classes as u64) as f32], 0, 1),
        vec![],
    )];
    recs.extend(
        images
            .iter()
            .enumerate()
            .map(|(i, (c, jpeg))| (IrHeader::image(*c, i as u64 + 1), jpeg.clone())),
    );
    for c in 0..classes as u32 {
        let keys: Vec<u64> = (0..images.len())
            .filter(|&i| images[i].0 == c)
            .map(|i| i as u64 + 1)
            .collect();
        let range = vec![keys[0] as f32, (keys[keys.len() - 1] + 1) as f32];
        recs.push((IrHeader::meta(range, n + 1 + c as u64, 0), vec![]));
    }
    recs
}

fn jpeg(c: usize, j: usize) -> Vec<u8> {
    let img = pattern(c, j, S);
    encode_jpeg(img.as_raw(), S, S, 95).unwrap()
}

#[test]
fn split_records_are_reassembled_by_both_readers() {
    let dir = tempfile::tempdir().unwrap();
    let special = jpeg_with_magic(&pattern(1, 5, S));
    let images = vec![(0, jpeg(0, 0)), (1, special.clone()), (1, jpeg(1, 1))];
    let offsets = write_rec(dir.path(), &insightface_records(&images, 2), true);
    std::fs::write(dir.path().join("property"), format!("2,{S},{S}")).unwrap();
    let bytes = std::fs::read(dir.path().join("train.rec")).unwrap();
    assert_eq!(
        read_record(&bytes, offsets[2]).unwrap().parts,
        3,
        "the record must be split twice"
    );

    let rec = open(dir.path(), S, BadRecordPolicy::Error).unwrap();
    assert_eq!(rec.content(1).unwrap(), special);
    assert!(mean_abs_diff(&rec.load(1).unwrap(), pattern(1, 5, S).as_raw()) < 3.0);

    let v = run_reader("rec", dir.path());
    assert_eq!(v["images"][1]["content"], oracle::digest(&special));
}

#[test]
fn plain_im2rec_set_without_header_or_idx() {
    let dir = tempfile::tempdir().unwrap();
    // Record 0 is an image; one record stores its class in labels[0] (flag > 0), as multi-label im2rec.
    let mut multi = IrHeader::meta(vec![2.0, 7.5], 2, 0);
    multi.id2 = 0;
    let records = vec![
        (IrHeader::image(1, 0), jpeg(1, 0)),
        (IrHeader::image(0, 1), jpeg(0, 0)),
        (multi, jpeg(2, 0)),
    ];
    write_rec(dir.path(), &records, false); // no .idx: scanned
    let rec = open(&dir.path().join("train.rec"), S, BadRecordPolicy::Error).unwrap();
    assert_eq!(*rec.layout(), RecLayout::Plain);
    assert_eq!((rec.len(), rec.num_classes()), (3, 3));
    assert_eq!((0..3).map(|i| rec.label(i)).collect::<Vec<_>>(), [1, 0, 2]);
}

#[test]
fn idx_keys_decide_past_float32_precision() {
    // Keys around 2^24: id_start = 2^24 + 3 is not a float32 (it rounds to 2^24 + 4). A reader that
    // trusted the float range would take identity record 2^24 + 3 for an image.
    let dir = tempfile::tempdir().unwrap();
    let big = 1u64 << 24;
    let image_keys = [1, 2, big + 1, big + 2];
    let id_start = big + 3;
    let mut w = RecordWriter::new(Vec::new());
    let mut idx = String::new();
    let header = IrHeader::meta(vec![id_start as f32, (id_start + 2) as f32], 0, 1);
    idx.push_str(&format!(
        "0\t{}\n",
        w.write(&encode_payload(&header, &[])).unwrap()
    ));
    for (i, &k) in image_keys.iter().enumerate() {
        let h = IrHeader::image((i % 2) as u32, k);
        idx.push_str(&format!(
            "{k}\t{}\n",
            w.write(&encode_payload(&h, &jpeg(i % 2, i))).unwrap()
        ));
    }
    for c in 0..2u64 {
        let h = IrHeader::meta(vec![0.0, 0.0], id_start + c, 0);
        idx.push_str(&format!(
            "{}\t{}\n",
            id_start + c,
            w.write(&encode_payload(&h, &[])).unwrap()
        ));
    }
    assert_ne!(id_start as f32 as u64, id_start);
    std::fs::write(dir.path().join("train.rec"), w.finish().unwrap()).unwrap();
    std::fs::write(dir.path().join("train.idx"), idx).unwrap();
    let rec = open(dir.path(), S, BadRecordPolicy::Error).unwrap();
    assert_eq!(
        (0..rec.len()).map(|i| rec.key(i)).collect::<Vec<_>>(),
        image_keys
    );
    assert!(matches!(
        rec.layout(),
        RecLayout::Insightface { identities: 2, .. }
    ));
    assert_eq!(rec.num_classes(), 2);
}

/// A packed set of 3 identities x 2 images to break in the bad-input tests.
fn packed() -> (tempfile::TempDir, Vec<u64>) {
    let dir = tempfile::tempdir().unwrap();
    let images: Vec<(u32, Vec<u8>)> = (0..6).map(|i| ((i / 2) as u32, jpeg(i / 2, i))).collect();
    let offsets = write_rec(dir.path(), &insightface_records(&images, 3), true);
    std::fs::write(dir.path().join("property"), format!("3,{S},{S}")).unwrap();
    (dir, offsets)
}

fn err_text(r: anyhow::Result<RecordIo>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

#[test]
fn truncated_rec() {
    let (dir, offsets) = packed();
    let rec_path = dir.path().join("train.rec");
    let bytes = std::fs::read(&rec_path).unwrap();
    // Cut inside image key 6 (its record starts at offsets[6]).
    std::fs::write(&rec_path, &bytes[..offsets[6] as usize + 40]).unwrap();
    std::fs::write(
        dir.path().join("train.idx"),
        (0..=6)
            .map(|k| format!("{k}\t{}\n", offsets[k]))
            .collect::<String>(),
    )
    .unwrap();
    let err = err_text(open(dir.path(), S, BadRecordPolicy::Error));
    assert!(
        err.contains("train.rec")
            && err.contains("key 6")
            && err.contains(&format!("byte {}", offsets[6])),
        "{err}"
    );
    assert!(err.contains("truncated"), "{err}");
    let rec = open(dir.path(), S, BadRecordPolicy::Skip).unwrap();
    assert_eq!(rec.len(), 5);
    assert_eq!(
        rec.bad_records()
            .iter()
            .map(|b| (b.key, b.offset))
            .collect::<Vec<_>>(),
        [(6, offsets[6])]
    );
}

#[test]
fn wrong_magic() {
    let (dir, offsets) = packed();
    let rec_path = dir.path().join("train.rec");
    let mut bytes = std::fs::read(&rec_path).unwrap();
    bytes[offsets[2] as usize] ^= 0xFF;
    std::fs::write(&rec_path, &bytes).unwrap();
    let err = err_text(open(dir.path(), S, BadRecordPolicy::Error));
    assert!(
        err.contains("key 2")
            && err.contains("wrong magic")
            && err.contains(&format!("byte {}", offsets[2])),
        "{err}"
    );
    assert_eq!(open(dir.path(), S, BadRecordPolicy::Skip).unwrap().len(), 5);
}

#[test]
fn idx_offset_past_the_end() {
    let (dir, offsets) = packed();
    let len = std::fs::metadata(dir.path().join("train.rec"))
        .unwrap()
        .len();
    let idx: String = offsets
        .iter()
        .enumerate()
        .map(|(k, &o)| format!("{k}\t{}\n", if k == 3 { len + 100 } else { o }))
        .collect();
    std::fs::write(dir.path().join("train.idx"), idx).unwrap();
    let err = err_text(open(dir.path(), S, BadRecordPolicy::Error));
    assert!(
        err.contains("key 3") && err.contains("past the end"),
        "{err}"
    );
    // A garbled .idx line names the line.
    std::fs::write(dir.path().join("train.idx"), "0\t0\n1\tsome\n").unwrap();
    let err = err_text(open(dir.path(), S, BadRecordPolicy::Error));
    assert!(err.contains("train.idx") && err.contains("line 2"), "{err}");
}

#[test]
fn undecodable_jpeg_errors_or_is_skipped_by_the_loader() {
    let dir = tempfile::tempdir().unwrap();
    let mut images: Vec<(u32, Vec<u8>)> =
        (0..8).map(|i| ((i % 2) as u32, jpeg(i % 2, i))).collect();
    images[5].1 = vec![0xFF, 0xD8, 0xFF, 0xE0, 1, 2, 3, 4, 5, 6, 7];
    let offsets = write_rec(dir.path(), &insightface_records(&images, 2), true);
    let rec = open(dir.path(), S, BadRecordPolicy::Error).unwrap(); // headers are fine
    let err = format!("{:#}", rec.load(5).unwrap_err());
    assert!(
        err.contains("key 6")
            && err.contains(&format!("byte {}", offsets[6]))
            && err.contains("JPEG"),
        "{err}"
    );
    let bad = rec.check_all(2);
    assert_eq!(bad.iter().map(|b| b.key).collect::<Vec<_>>(), [6]);

    let cfg = LoaderConfig {
        batch_size: 4,
        shuffle: false,
        drop_last: false,
        workers: 2,
        ..Default::default()
    };
    let strict = Loader::new(Arc::new(rec), cfg.clone());
    let results: Vec<_> = strict.epoch(0, 0).collect();
    assert!(results.last().unwrap().is_err() && results.len() == 2);

    let skipping = Loader::new(
        Arc::new(open(dir.path(), S, BadRecordPolicy::Skip).unwrap()),
        cfg,
    );
    let batches: Vec<_> = skipping.epoch(0, 0).map(|b| b.unwrap()).collect();
    assert_eq!(batches.iter().map(|b| b.len()).collect::<Vec<_>>(), [4, 3]);
    assert!(!batches[1].indices.contains(&5));
    assert_eq!(skipping.skipped(), 1);
}

#[test]
fn wrong_image_size_resizes_or_fails_under_strict() {
    let (dir, offsets) = packed();
    let rec = RecordIo::open(
        dir.path(),
        16,
        RecOptions {
            size: SizePolicy::Strict,
            ..Default::default()
        },
    )
    .unwrap();
    let err = format!("{:#}", rec.load(0).unwrap_err());
    assert!(
        err.contains(&format!("{S}x{S}, expected 16x16"))
            && err.contains(&format!("byte {}", offsets[1])),
        "{err}"
    );
    let rec = open(dir.path(), 16, BadRecordPolicy::Error).unwrap();
    assert_eq!(rec.load(0).unwrap().len(), 16 * 16 * 3);
}

#[test]
fn label_outside_num_classes() {
    let dir = tempfile::tempdir().unwrap();
    let images: Vec<(u32, Vec<u8>)> = (0..4).map(|i| ((i % 2) as u32, jpeg(i % 2, i))).collect();
    let mut records = insightface_records(&images, 2);
    records[3].0.label = 99.0;
    write_rec(dir.path(), &records, true);
    std::fs::write(dir.path().join("property"), format!("2,{S},{S}")).unwrap();
    let err = err_text(open(dir.path(), S, BadRecordPolicy::Error));
    assert!(
        err.contains("key 3") && err.contains("label 99 is outside num_classes = 2"),
        "{err}"
    );
    records[3].0.label = 0.5;
    write_rec(dir.path(), &records, true);
    assert!(err_text(open(dir.path(), S, BadRecordPolicy::Error)).contains("not a class id"));
    let rec = open(dir.path(), S, BadRecordPolicy::Skip).unwrap();
    assert_eq!((rec.len(), rec.bad_records()[0].key), (3, 3));
}

#[test]
fn empty_identity_folder_and_empty_files() {
    let folder = make_folder(&[2, 0, 1]);
    let out = tempfile::tempdir().unwrap();
    let err = format!(
        "{:#}",
        pack_image_folder(folder.path(), out.path(), &PackOptions::default()).unwrap_err()
    );
    assert!(err.contains("id1") && err.contains("no images"), "{err}");
    std::fs::write(out.path().join("train.rec"), b"").unwrap();
    let err = err_text(open(out.path(), S, BadRecordPolicy::Error));
    assert!(err.contains("train.rec is empty"), "{err}");
    std::fs::write(out.path().join("train.rec"), b"not a record io file at all").unwrap();
    let err = err_text(open(out.path(), S, BadRecordPolicy::Error));
    assert!(err.contains("wrong magic at byte 0"), "{err}");
}

#[test]
fn pk_sampler_batches_are_identity_balanced_and_deterministic() {
    let source: Arc<dyn Source> = Arc::new(
        SyntheticFaces::new(SyntheticConfig {
            identities: 9,
            images_per_identity: 5,
            image_size: 16,
            seed: 1,
            first_identity: 0,
        })
        .unwrap(),
    );
    let (p, k) = (3, 2);
    let cfg = |workers| LoaderConfig {
        batch_size: p * k,
        workers,
        sampler: Sampler::IdentityBalanced { k },
        ..Default::default()
    };
    let loader = Loader::new(source.clone(), cfg(2));
    // 9 identities x floor(5 / 2) chunks = 18 chunks -> 6 batches of 3 identities.
    assert_eq!(loader.batches_per_epoch(), 6);
    let batches: Vec<_> = loader.epoch(1, 0).map(|b| b.unwrap()).collect();
    assert_eq!(batches.len(), 6);
    for b in &batches {
        let ids: Vec<i64> = b.labels.chunks(k).map(|c| c[0]).collect();
        assert!(
            b.labels.chunks(k).all(|c| c.iter().all(|&l| l == c[0])),
            "{:?}",
            b.labels
        );
        assert_eq!(
            ids.iter().collect::<HashSet<_>>().len(),
            p,
            "{:?}",
            b.labels
        );
        assert_eq!(b.indices.iter().collect::<HashSet<_>>().len(), p * k);
    }
    let other = Loader::new(source, cfg(0));
    assert_eq!(
        other.epoch(1, 0).map(|b| b.unwrap()).collect::<Vec<_>>(),
        batches
    );
    assert_eq!(
        other.epoch(1, 4).map(|b| b.unwrap()).collect::<Vec<_>>(),
        batches[4..]
    );
    assert_ne!(other.epoch_order(2), other.epoch_order(1));
}

#[test]
fn verification_pack_reads_in_python() {
    let folder = tempfile::tempdir().unwrap();
    for (c, name) in ["Ann_A", "Bob_B"].iter().enumerate() {
        let d = folder.path().join(name);
        std::fs::create_dir(&d).unwrap();
        for j in 1..=2 {
            pattern(c, j, S)
                .save(d.join(format!("{name}_{j:04}.png")))
                .unwrap();
        }
    }
    // A JPEG file is stored byte for byte.
    let raw_jpeg = jpeg(5, 5);
    std::fs::write(folder.path().join("Bob_B/Bob_B_0003.jpg"), &raw_jpeg).unwrap();
    let file =
        |name: &str, j: usize, ext: &str| folder.path().join(format!("{name}/{name}_{j:04}.{ext}"));
    let files = vec![
        file("Ann_A", 1, "png"),
        file("Ann_A", 2, "png"),
        file("Bob_B", 1, "png"),
        file("Bob_B", 3, "jpg"),
        file("Bob_B", 2, "png"),
    ];
    let pairs = [(0, 1, true), (2, 3, true), (0, 4, false), (1, 3, false)];
    let out = folder.path().join("out/lfw.bin");
    let s = pack_pairs(&files, &pairs, &out, 95, None).unwrap();
    assert_eq!((s.pairs, s.positives, s.files), (4, 2, 5));
    let missing = vec![folder.path().join("Carl_C/Carl_C_0001.png")];
    let err = format!(
        "{:#}",
        pack_pairs(&missing, &[(0, 0, true)], &out, 95, None).unwrap_err()
    );
    assert!(err.contains("Carl_C_0001"), "{err}");

    let v = run_reader("bin", &out);
    assert_eq!(v["issame"], serde_json::json!([true, true, false, false]));
    let bins = bins_of(&v);
    assert_eq!(bins.len(), 8);
    assert_eq!(bins[3], raw_jpeg);
    assert_eq!(bins[7], raw_jpeg);
    let expect = [(0, 1), (0, 2), (1, 1)];
    for (b, &(c, j)) in bins.iter().zip(&expect) {
        let img = image::load_from_memory(b).unwrap().to_rgb8();
        assert!(mean_abs_diff(img.as_raw(), pattern(c, j, S).as_raw()) < 3.0);
    }
}

/// A header record whose identity range disagrees with the .idx (the 999,999,616 identities
/// without a `property` file) is a bad record naming key 0: an error by default, left out under the
/// skip policy (the class count then comes from the identity records). It used to pass as
/// `num_classes = 999,999,616` and make the trainer allocate a 512 GB classifier.
#[test]
fn implausible_header_class_count_is_a_bad_record() {
    let dir = tempfile::tempdir().unwrap();
    let images: Vec<(u32, Vec<u8>)> = (0..6).map(|i| ((i / 2) as u32, jpeg(i / 2, i))).collect();
    let mut records = insightface_records(&images, 3);
    records[0].0 = IrHeader::meta(vec![7.0, 999_999_616.0 + 7.0], 0, 1);
    write_rec(dir.path(), &records, true);
    let err = err_text(open(dir.path(), S, BadRecordPolicy::Error));
    assert!(
        err.contains("key 0")
            && err.contains("999999616 identities")
            && err.contains("3 identity records"),
        "{err}"
    );
    let rec = open(dir.path(), S, BadRecordPolicy::Skip).unwrap();
    assert_eq!(
        rec.bad_records().iter().map(|b| b.key).collect::<Vec<_>>(),
        [0]
    );
    assert_eq!((rec.len(), rec.num_classes()), (6, 3));
    assert_eq!(
        rec.class_origin(),
        facerec_data::ClassOrigin::IdentityRecords
    );
    // Without identity records, a header may not claim more identities than there are images.
    let plain_ids: Vec<_> = records[..7].to_vec();
    write_rec(dir.path(), &plain_ids, true);
    let err = err_text(open(dir.path(), S, BadRecordPolicy::Error));
    assert!(err.contains("for only 6 image records"), "{err}");
    // A property file decides instead of the header: no complaint.
    std::fs::write(dir.path().join("property"), format!("3,{S},{S}")).unwrap();
    let rec = open(dir.path(), S, BadRecordPolicy::Error).unwrap();
    assert_eq!(
        (rec.num_classes(), rec.class_origin()),
        (3, facerec_data::ClassOrigin::Property)
    );
}

/// `policy = "skip"` has a ceiling, `max_skipped_fraction` (default 1 %): a truncated `.rec` that
/// loses 1 of its 6 image records when it opens is refused naming the file and the counts, where it
/// used to train on the rest with exit 0.
#[test]
fn skipping_more_than_the_ceiling_when_opening_is_an_error() {
    let (dir, offsets) = packed();
    let rec_path = dir.path().join("train.rec");
    let bytes = std::fs::read(&rec_path).unwrap();
    std::fs::write(&rec_path, &bytes[..offsets[6] as usize + 40]).unwrap();
    std::fs::write(
        dir.path().join("train.idx"),
        (0..=6)
            .map(|k| format!("{k}\t{}\n", offsets[k]))
            .collect::<String>(),
    )
    .unwrap();
    let skip = |max_skipped_fraction| {
        RecordIo::open(
            dir.path(),
            S,
            RecOptions {
                policy: BadRecordPolicy::Skip,
                max_skipped_fraction,
                ..Default::default()
            },
        )
    };
    assert_eq!(RecOptions::default().max_skipped_fraction, 0.01);
    let err = err_text(skip(RecOptions::default().max_skipped_fraction));
    assert!(
        err.contains("train.rec")
            && err.contains("1 of 6 image records")
            && err.contains("1 left out when opening")
            && err.contains("max_skipped_fraction = 0.01"),
        "{err}"
    );
    assert_eq!(skip(0.2).unwrap().len(), 5);
    assert!(err_text(skip(1.5)).contains("max_skipped_fraction must be in [0, 1]"));
}

/// The ceiling also holds for images that fail to decode while loading: the loader counts distinct
/// failed images and ends the epoch with an error naming the file once they pass the ceiling.
#[test]
fn skipping_more_than_the_ceiling_while_loading_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut images: Vec<(u32, Vec<u8>)> =
        (0..8).map(|i| ((i % 2) as u32, jpeg(i % 2, i))).collect();
    images[5].1 = vec![0xFF, 0xD8, 0xFF, 0xE0, 1, 2, 3, 4, 5, 6, 7];
    write_rec(dir.path(), &insightface_records(&images, 2), true);
    let cfg = LoaderConfig {
        batch_size: 4,
        shuffle: false,
        drop_last: false,
        workers: 2,
        ..Default::default()
    };
    let loader = |max_skipped_fraction| {
        let rec = RecordIo::open(
            dir.path(),
            S,
            RecOptions {
                policy: BadRecordPolicy::Skip,
                max_skipped_fraction,
                ..Default::default()
            },
        )
        .unwrap();
        Loader::new(Arc::new(rec), cfg.clone())
    };
    let strict = loader(0.01);
    let results: Vec<_> = strict.epoch(0, 0).collect();
    let err = format!("{:#}", results.last().unwrap().as_ref().unwrap_err());
    assert!(
        err.contains("train.rec")
            && err.contains("1 of 8 image records")
            && err.contains("1 failed to decode while loading")
            && err.contains("max_skipped_fraction"),
        "{err}"
    );
    // Within the ceiling the bad image is left out and the epoch completes; a second epoch sees the
    // same image fail again, which is still one distinct image.
    let lenient = loader(0.2);
    for epoch in 0..2 {
        let sizes: Vec<usize> = lenient.epoch(epoch, 0).map(|b| b.unwrap().len()).collect();
        assert_eq!(sizes, [4, 3]);
    }
    assert_eq!(lenient.skipped(), 2);
}
