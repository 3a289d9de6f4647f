//! A bounded mutation fuzzer for the RecordIO parser and the RecordIO source (the cargo-fuzz target in
//! `crates/data/fuzz` needs a nightly toolchain and cargo-fuzz; this runs on stable in the test suite).
//!
//! Valid `.rec` images (random payloads with embedded aligned magics, so split records are common, and
//! IRHeaders with random flags) are mutated (bit flips, magics and random length words at aligned
//! offsets, truncation, insertion, deletion) and parsed: `scan_offsets`, `read_record` at every aligned
//! offset and at random ones, `parse_payload`. Every 200th case is also written to disk with a matching
//! `.idx` and opened as a `RecordIo` (skip policy), and every image is decoded. Nothing may panic.
//! Unmutated inputs must round-trip exactly. Runs for `FACEREC_FUZZ_SECS` seconds (default 2).

use std::time::{Duration, Instant};

use facerec_data::recordio::{
    encode_payload, parse_payload, read_record, scan_offsets, IrHeader, RecordWriter, MAGIC_BYTES,
};
use facerec_data::{BadRecordPolicy, RecOptions, RecordIo, SizePolicy, Source};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random_payload(rng: &mut ChaCha8Rng) -> Vec<u8> {
    let flag = if rng.gen_bool(0.7) {
        0
    } else {
        rng.gen_range(1..4)
    };
    let labels = (0..flag).map(|_| rng.gen_range(0..10) as f32).collect();
    let header = IrHeader {
        flag,
        label: rng.gen_range(0..4) as f32,
        id: rng.gen(),
        id2: rng.gen_range(0..2),
        labels,
    };
    let mut content: Vec<u8> = (0..rng.gen_range(0..64)).map(|_| rng.gen()).collect();
    if rng.gen_bool(0.3) {
        content.splice(0..0, [0xFF, 0xD8, 0xFF, 0xE0]);
    }
    for _ in 0..rng.gen_range(0..3) {
        let at = rng.gen_range(0..=content.len()) & !3;
        content.splice(at..at, MAGIC_BYTES);
    }
    let mut p = encode_payload(&header, &content);
    if rng.gen_bool(0.1) {
        p.truncate(rng.gen_range(0..p.len()));
    }
    p
}

fn mutate(rng: &mut ChaCha8Rng, bytes: &mut Vec<u8>) {
    for _ in 0..rng.gen_range(1..5) {
        if bytes.is_empty() {
            bytes.extend_from_slice(&MAGIC_BYTES);
        }
        let at = rng.gen_range(0..bytes.len());
        let aligned = at & !3;
        match rng.gen_range(0..6) {
            0 => bytes[at] ^= 1 << rng.gen_range(0..8),
            1 if aligned + 4 <= bytes.len() => {
                bytes[aligned..aligned + 4].copy_from_slice(&MAGIC_BYTES)
            }
            2 if aligned + 4 <= bytes.len() => {
                let lrec: u32 = rng.gen::<u32>()
                    & if rng.gen_bool(0.5) {
                        0xE000_00FF
                    } else {
                        u32::MAX
                    };
                bytes[aligned..aligned + 4].copy_from_slice(&lrec.to_le_bytes());
            }
            3 => bytes.truncate(at),
            4 => bytes.insert(at, rng.gen()),
            _ => {
                bytes.remove(at);
            }
        }
    }
}

fn parse_everything(rng: &mut ChaCha8Rng, bytes: &[u8]) -> usize {
    let mut parsed = 0;
    let (offsets, _) = scan_offsets(bytes);
    let probes = (0..bytes.len() as u64 + 8)
        .step_by(4)
        .chain((0..4).map(|_| rng.gen_range(0..bytes.len() as u64 + 64)));
    for offset in offsets.into_iter().chain(probes) {
        if let Ok(rec) = read_record(bytes, offset) {
            parsed += 1;
            let _ = parse_payload(&rec.payload, offset).map(|(h, _)| h.class());
        }
    }
    parsed
}

#[test]
fn mutated_records_never_panic() {
    let secs = std::env::var("FACEREC_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut rng = ChaCha8Rng::seed_from_u64(0xF022);
    let dir = tempfile::tempdir().unwrap();
    let (mut cases, mut records, mut opened) = (0u64, 0usize, 0usize);
    while Instant::now() < deadline {
        let payloads: Vec<Vec<u8>> = (0..rng.gen_range(1..6))
            .map(|_| random_payload(&mut rng))
            .collect();
        let mut w = RecordWriter::new(Vec::new());
        let offsets: Vec<u64> = payloads.iter().map(|p| w.write(p).unwrap()).collect();
        let mut bytes = w.finish().unwrap();
        for (p, &o) in payloads.iter().zip(&offsets) {
            assert_eq!(
                &*read_record(&bytes, o).unwrap().payload,
                &p[..],
                "round trip"
            );
        }
        mutate(&mut rng, &mut bytes);
        records += parse_everything(&mut rng, &bytes);
        if cases % 200 == 0 {
            std::fs::write(dir.path().join("train.rec"), &bytes).unwrap();
            let idx: String = offsets
                .iter()
                .enumerate()
                .map(|(k, o)| format!("{k}\t{o}\n"))
                .collect();
            std::fs::write(dir.path().join("train.idx"), idx).unwrap();
            let opts = RecOptions {
                policy: BadRecordPolicy::Skip,
                size: SizePolicy::Resize,
                // No ceiling: open as many mutated sets as possible, to decode them.
                max_skipped_fraction: 1.0,
                ..Default::default()
            };
            if let Ok(set) = RecordIo::open(dir.path(), 8, opts) {
                opened += 1;
                (0..set.len()).for_each(|i| drop(set.load(i)));
            }
        }
        cases += 1;
    }
    eprintln!("fuzz: {cases} mutated .rec images in {secs} s, {records} records parsed, {opened} sets opened; no panic");
    assert!(cases > 0);
}
