//! A seeded mutation fuzzer over the parsers that read user files: RecordIO (`.rec`/`.idx`/`property`,
//! opened as a training set and every record decoded), insightface `.bin` verification packs, the
//! pickle reader under them, LFW pair lists (parsed and resolved against an image folder) and
//! checkpoint manifests (`meta.json` read, checked against its folder, checksums verified, the tensor
//! file read as `init.from` would).
//!
//! cargo-fuzz is not installed here, so this is a plain test: every target starts from valid inputs
//! made by facerec's own writers (or by Python's `pickle`, stored as hex below), mutates them (bit
//! flips, interesting integers at random and aligned offsets, dictionary tokens, insertions,
//! deletions, duplicated ranges, truncation, splices of two corpus entries) and runs the parser under
//! `catch_unwind`. Inputs a parser accepts join the corpus. A panic fails the test; its input is
//! written under `target/fuzz-findings/` and its message printed (so is the slowest input of each
//! target when it took over 0.5 s, as `<target>-slowest/`).
//!
//! `fuzz_parsers_briefly` runs always (0.4 s per target). The long run is ignored by default:
//! `FACEREC_FUZZ_SECS=360 nice -n 19 cargo test --release -p facerec-trainer --test fuzz_parsers --
//! --ignored --test-threads 1` (seconds per target; `FACEREC_FUZZ_SEED` picks the seed, default 19).
//! docs/reliability.md records its executions.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use facerec_data::rec::parse_property;
use facerec_data::recordio::{parse_idx, parse_payload, read_record, scan_offsets};
use facerec_data::verification_pack::encode_pickle;
use facerec_data::{pack_image_folder, BadRecordPolicy, PackOptions, RecOptions, RecordIo, Source};
use facerec_evaluation::{pickle, BinPack, Fit, LfwPairs};
use facerec_trainer::amp::ScalerState;
use facerec_trainer::checkpoint::{self, DataOrder, Meta};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

/// One input: the files (parts) a parser reads together.
type Input = Vec<Vec<u8>>;

/// A parser under test. `run` returns whether the parser accepted the input.
struct Target {
    name: &'static str,
    seeds: Vec<Input>,
    dict: &'static [&'static [u8]],
    run: fn(&Path, &[Vec<u8>]) -> bool,
}

/// Tokens that matter to more than one format (numbers at type limits, separators).
const COMMON: &[&[u8]] = &[
    b"0",
    b"-1",
    b"1",
    b"4294967295",
    b"4294967296",
    b"18446744073709551615",
    b"99999999999999999999999",
    b"1e400",
    b"-0",
    b"NaN",
    b"\n",
    b"\t",
    b" ",
    b"\r\n",
    b"\0",
];
const JSON: &[&[u8]] = &[
    b"null",
    b"true",
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"\"step\"",
    b"\"checksums\"",
    b"\"../meta.json\"",
    b"\"/etc/passwd\"",
    b"\"model.safetensors\"",
    b"\"format\"",
    b"\\u0000",
];
const PICKLE: &[&[u8]] = &[
    b"(",
    b".",
    b"e",
    b"a",
    b"]",
    b")",
    b"}",
    b"t",
    b"\x85",
    b"\x86",
    b"\x87",
    b"\x88",
    b"\x89",
    b"N",
    b"\x94",
    b"h\x00",
    b"q\x00",
    b"j\xff\xff\xff\xff",
    b"T\xff\xff\xff\x7f",
    b"U\xff",
    b"X\xff\xff\xff\xff",
    b"\x8e\xff\xff\xff\xff\xff\xff\xff\xff",
    b"B\xff\xff\xff\x7f",
    b"\x95\xff\xff\xff\xff\xff\xff\xff\x7f",
    b"\x80\x05",
    b"\x8a\xff",
    b"\x8b\xff\xff\xff\x7f",
    b"c__builtin__\nbytearray\n",
    b"\x93",
    b"R",
    b"b",
    b"s",
    b"u",
    b"d",
    b"l",
    b"2",
    b"0",
    b"1",
];
const REC: &[&[u8]] = &[
    b"\x1d\x1a\x1a\xce\x0a\x00\x00\x00",
    b"\xff\xd8\xff\xe0",
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xff\xff\x1f",
    b"\x00\x00\x00\x20",
    b"\x00\x00\x00\x40",
    b"\x00\x00\x00\x60",
    b"\x02\x00\x00\x00",
    b"\x00\x00\x80\x7f",
    b"\x00\x00\xc0\x7f",
    b"\xff\xff\x7f\x7f",
];
const PAIRS: &[&[u8]] = &[
    b"Abel_Pacheco",
    b"_",
    b"10 300",
    b"0001",
    b"-",
    b"..",
    b"/",
    b"\xc3\xa9",
    b"0 0",
    b"1 1",
];

/// Integers that trip length and offset arithmetic, written little-endian.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0xffff,
    0x1_0000,
    0x1fff_ffff,
    0x2000_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    u64::MAX / 2,
    u64::MAX,
];

fn mutate(rng: &mut ChaCha8Rng, input: &mut Input, dict: &[&[u8]], corpus: &[Input]) {
    let part = rng.gen_range(0..input.len());
    for _ in 0..rng.gen_range(1..=4) {
        let bytes = &mut input[part];
        if bytes.is_empty() {
            bytes.push(rng.gen());
        }
        let at = rng.gen_range(0..bytes.len());
        match rng.gen_range(0..11) {
            0 | 1 => bytes[at] ^= 1 << rng.gen_range(0..8),
            2 => bytes[at] = rng.gen(),
            3 => {
                let v = INTERESTING[rng.gen_range(0..INTERESTING.len())];
                let width = [1usize, 2, 4, 8][rng.gen_range(0..4)];
                let at = if rng.gen_bool(0.5) { at & !3 } else { at };
                let end = (at + width).min(bytes.len());
                let le = v.to_le_bytes();
                bytes[at..end].copy_from_slice(&le[..end - at]);
            }
            4 => {
                let tok = if rng.gen_bool(0.7) {
                    dict[rng.gen_range(0..dict.len())]
                } else {
                    COMMON[rng.gen_range(0..COMMON.len())]
                };
                if rng.gen_bool(0.5) {
                    bytes.splice(at..at, tok.iter().copied());
                } else {
                    let end = (at + tok.len()).min(bytes.len());
                    bytes.splice(at..end, tok.iter().copied());
                }
            }
            5 => {
                let n = rng.gen_range(1..=8);
                bytes.splice(at..at, (0..n).map(|_| rng.gen::<u8>()));
            }
            6 => {
                let end = (at + rng.gen_range(1..=16)).min(bytes.len());
                bytes.drain(at..end);
            }
            7 => {
                let end = (at + rng.gen_range(1..=64)).min(bytes.len());
                let chunk = bytes[at..end].to_vec();
                let to = rng.gen_range(0..=bytes.len());
                bytes.splice(to..to, chunk);
            }
            8 => bytes.truncate(at),
            9 => {
                // Splice: our head, another corpus entry's tail (same part).
                let other = &corpus[rng.gen_range(0..corpus.len())][part];
                if !other.is_empty() {
                    let from = rng.gen_range(0..other.len());
                    bytes.truncate(at);
                    bytes.extend_from_slice(&other[from..]);
                }
            }
            _ => {
                let v = rng.gen::<u32>().to_le_bytes();
                let at = at & !3;
                let end = (at + 4).min(bytes.len());
                bytes[at..end].copy_from_slice(&v[..end - at]);
            }
        }
    }
}

/// What a run of one target found.
struct Outcome {
    execs: u64,
    accepted: u64,
    corpus: usize,
    slowest: Duration,
    panics: Vec<String>,
}

fn fuzz(
    target: &Target,
    seconds: f64,
    seed: u64,
    work: &Path,
    last_panic: &Mutex<String>,
) -> Outcome {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ fnv(target.name.as_bytes()));
    let dir = work.join(target.name);
    std::fs::create_dir_all(&dir).unwrap();
    for s in &target.seeds {
        assert!(
            (target.run)(&dir, s),
            "{}: a seed input is refused",
            target.name
        );
    }
    let mut corpus = target.seeds.clone();
    let mut out = Outcome {
        execs: 0,
        accepted: 0,
        corpus: 0,
        slowest: Duration::ZERO,
        panics: Vec::new(),
    };
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < deadline {
        let mut input = corpus[rng.gen_range(0..corpus.len())].clone();
        mutate(&mut rng, &mut input, target.dict, &corpus);
        let t0 = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| (target.run)(&dir, &input)));
        let took = t0.elapsed();
        if took > out.slowest {
            out.slowest = took;
            if took > Duration::from_millis(500) {
                // Kept for a look: a slow input is not a failure, but may be a hostile one.
                save(
                    &findings_dir().join(format!("{}-slowest", target.name)),
                    &input,
                );
            }
        }
        out.execs += 1;
        match result {
            Ok(true) => {
                out.accepted += 1;
                if corpus.len() < 512 {
                    corpus.push(input);
                } else {
                    let k = rng.gen_range(target.seeds.len()..corpus.len());
                    corpus[k] = input;
                }
            }
            Ok(false) => {}
            Err(_) => {
                let msg = last_panic.lock().unwrap().clone();
                let found = findings_dir().join(format!("{}-{}", target.name, out.panics.len()));
                save(&found, &input);
                out.panics
                    .push(format!("{msg} (input in {})", found.display()));
                if out.panics.len() >= 5 {
                    break;
                }
            }
        }
    }
    out.corpus = corpus.len();
    out
}

fn save(dir: &Path, input: &Input) {
    std::fs::create_dir_all(dir).unwrap();
    for (i, p) in input.iter().enumerate() {
        std::fs::write(dir.join(format!("part-{i}")), p).unwrap();
    }
}

fn findings_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/fuzz-findings")
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

// ---------------------------------------------------------------- targets

fn run_recordio(dir: &Path, parts: &[Vec<u8>]) -> bool {
    let (rec, idx, property) = (&parts[0], &parts[1], &parts[2]);
    let (offsets, _) = scan_offsets(rec);
    for &o in offsets.iter().take(64) {
        if let Ok(r) = read_record(rec, o) {
            let _ = parse_payload(&r.payload, o).map(|(h, c)| (h.class(), c.len()));
        }
    }
    let _ = parse_idx(&String::from_utf8_lossy(idx));
    let _ = parse_property(&String::from_utf8_lossy(property));
    std::fs::write(dir.join("train.rec"), rec).unwrap();
    std::fs::write(dir.join("train.idx"), idx).unwrap();
    // An empty third part stands for a set without a `property` file.
    if property.is_empty() {
        let _ = std::fs::remove_file(dir.join("property"));
    } else {
        std::fs::write(dir.join("property"), property).unwrap();
    }
    let opts = RecOptions {
        policy: BadRecordPolicy::Skip,
        max_skipped_fraction: 1.0,
        ..Default::default()
    };
    let strict = catch_open(dir, RecOptions::default()).is_some();
    let Some(set) = catch_open(dir, opts) else {
        return false;
    };
    for i in 0..set.len().min(8) {
        let _ = set.load(i);
    }
    let _ = set.check_all(1);
    strict
}

fn catch_open(dir: &Path, opts: RecOptions) -> Option<RecordIo> {
    RecordIo::open(dir, 8, opts).ok()
}

fn run_bin(_dir: &Path, parts: &[Vec<u8>]) -> bool {
    let Ok(pack) = BinPack::from_bytes(&parts[0]) else {
        return false;
    };
    let _ = pack.pairs();
    let set = pack.pair_set();
    let _ = set.check();
    let _ = pack.decode(8, Fit::default(), 1, &|| {});
    true
}

fn run_pickle(_dir: &Path, parts: &[Vec<u8>]) -> bool {
    match pickle::parse(&parts[0]) {
        Ok(v) => {
            let _ = v.kind();
            true
        }
        Err(e) => {
            let _ = format!("{e:#}");
            false
        }
    }
}

fn run_pairs(dir: &Path, parts: &[Vec<u8>]) -> bool {
    let Ok(pairs) = LfwPairs::parse(&String::from_utf8_lossy(&parts[0])) else {
        return false;
    };
    let _ = (pairs.folds(), pairs.matched());
    for p in pairs.pairs.iter().take(16) {
        let _ = (p.a.stem(), p.b.stem());
    }
    let images = dir.join("images");
    if let Ok(set) = pairs.resolve(&images) {
        let _ = set.pairs.check();
    }
    true
}

fn run_manifest(dir: &Path, parts: &[Vec<u8>]) -> bool {
    let ckpt = dir.join("checkpoints").join("step-00000007");
    std::fs::write(ckpt.join("meta.json"), &parts[0]).unwrap();
    std::fs::write(ckpt.join("model.safetensors"), &parts[1]).unwrap();
    let _ = checkpoint::verify_if_checkpoint(&ckpt.join("model.safetensors"));
    let _ = checkpoint::latest_noting(dir);
    let _ = checkpoint::read_tensors(&ckpt.join("model.safetensors"));
    let Ok(meta) = checkpoint::read_meta(&ckpt) else {
        return false;
    };
    checkpoint::verify(&ckpt, &meta).is_ok()
}

// ---------------------------------------------------------------- seeds

fn tiny_png(shade: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(8, 8, |x, y| {
        image::Rgb([shade, (x * 30) as u8, (y * 30) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn tiny_jpeg(shade: u8) -> Vec<u8> {
    let rgb: Vec<u8> = (0..64)
        .flat_map(|i| [shade, (i * 4) as u8, 255 - shade])
        .collect();
    facerec_data::rec_writer::encode_jpeg(&rgb, 8, 8, 90).unwrap()
}

fn recordio_seeds(work: &Path) -> Vec<Input> {
    let folder = work.join("seed-folder");
    for (c, name) in ["alice", "bob", "carol"].iter().enumerate() {
        std::fs::create_dir_all(folder.join(name)).unwrap();
        for k in 0..2 {
            std::fs::write(
                folder.join(name).join(format!("{k}.png")),
                tiny_png((c * 80 + k * 20) as u8),
            )
            .unwrap();
        }
    }
    let out = work.join("seed-pack");
    pack_image_folder(
        &folder,
        &out,
        &PackOptions {
            workers: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let read = |n: &str| std::fs::read(out.join(n)).unwrap();
    let full = vec![read("train.rec"), read("train.idx"), read("property")];
    let no_property = vec![full[0].clone(), full[1].clone(), Vec::new()];
    vec![full, no_property]
}

fn bin_seeds() -> Vec<Input> {
    let imgs: Vec<Vec<u8>> = (0..4).map(|k| tiny_jpeg(k * 60)).collect();
    vec![
        vec![encode_pickle(&imgs, &[true, false])],
        vec![encode_pickle(&imgs[..2], &[false])],
        vec![encode_pickle(&[tiny_png(9), tiny_png(99)], &[true])],
    ]
}

/// `pickle.dumps` of small values under protocols 2, 4 and 5 (Python 3), hex (protocol 0's text
/// opcodes such as `UNICODE` are outside the reader, which is for `.bin` packs).
const PICKLES: &[&str] = &[
    "80025d710028580200000061627101635f636f646563730a656e636f64650a710258020000006364710358060000006c6174696e317104867105527106655d7107288889658671082e",
    "80049517000000000000005d94288c026162944302636494655d942888896586942e",
    "80049538000000000000005d94284306ffd8ffd8ffd8948c086275696c74696e73948c09627974656172726179949394430278799485945294654b014b00869486942e",
    "80059522000000000000005d94284306ffd8ffd8ffd894960200000000000000787994654b014b00869486942e",
    "80027d71002858010000006171015d7102284b014740040000000000004e65580100000062710388857104752e",
    "80025d7100288a08000064a7b3b6e00d4afdffffff4a701101005802000000c3a971018a06000000000001652e",
];

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn pickle_seeds() -> Vec<Input> {
    let mut seeds: Vec<Input> = PICKLES.iter().map(|h| vec![unhex(h)]).collect();
    seeds.extend(bin_seeds());
    seeds
}

fn pairs_seeds(work: &Path) -> Vec<Input> {
    let images = work.join("pairs").join("images");
    for (name, n) in [("Abel_Pacheco", 2), ("Ann_Lee", 1), ("Bo_Li", 1)] {
        std::fs::create_dir_all(images.join(name)).unwrap();
        for k in 1..=n {
            std::fs::write(
                images.join(name).join(format!("{name}_{k:04}.jpg")),
                tiny_jpeg(k as u8),
            )
            .unwrap();
        }
    }
    vec![
        vec![b"1\nAbel_Pacheco\t1\t2\nAnn_Lee\t1\tBo_Li\t1\n".to_vec()],
        vec![
            b"2 1\nAbel_Pacheco 1 2\nAnn_Lee 1 Bo_Li 1\nAbel_Pacheco 2 1\nBo_Li 1 Ann_Lee 1\n"
                .to_vec(),
        ],
    ]
}

fn manifest_seeds(work: &Path) -> Vec<Input> {
    let ckpt = work
        .join("manifest")
        .join("checkpoints")
        .join("step-00000007");
    std::fs::create_dir_all(&ckpt).unwrap();
    let file = ckpt.join("model.safetensors");
    let w = Tensor::arange(12, (Kind::Float, tch::Device::Cpu)).view([3, 4]);
    Tensor::write_safetensors(
        &[("conv.weight", &w), ("bn.running_var", &w.ones_like())],
        &file,
    )
    .unwrap();
    let tensors = std::fs::read(&file).unwrap();
    let mut checksums = BTreeMap::new();
    checksums.insert(
        "model.safetensors".to_string(),
        checkpoint::sha256_file(&file).unwrap(),
    );
    let meta = Meta {
        format: checkpoint::FORMAT,
        step: 7,
        epoch: 1,
        batch_in_epoch: 2,
        seed: 19,
        num_classes: 40,
        data: DataOrder {
            images: 400,
            batches_per_epoch: 5,
            order_fingerprint: 0xdead_beef,
        },
        model: "type = \"iresnet\"\ndepth = 18\n".into(),
        optimizer: "sgd".into(),
        scaler: ScalerState {
            scale: 1.0,
            growth_tracker: 0,
        },
        skipped_steps: 1,
        consecutive_bad: 0,
        best: vec![0.5, 0.75],
        config: "[train]\nepochs = 3\n".into(),
        world_size: 1,
        checksums,
        segments: vec![checkpoint::Segment {
            from_step: 0,
            to_step: 7,
            train_seconds: Some(1.5),
        }],
    };
    let pretty = serde_json::to_vec_pretty(&meta).unwrap();
    let mut old = meta.clone();
    old.checksums.clear();
    vec![
        vec![pretty, tensors.clone()],
        vec![serde_json::to_vec(&old).unwrap(), tensors],
    ]
}

fn targets(work: &Path) -> Vec<Target> {
    vec![
        Target {
            name: "recordio",
            seeds: recordio_seeds(work),
            dict: REC,
            run: run_recordio,
        },
        Target {
            name: "bin",
            seeds: bin_seeds(),
            dict: PICKLE,
            run: run_bin,
        },
        Target {
            name: "pickle",
            seeds: pickle_seeds(),
            dict: PICKLE,
            run: run_pickle,
        },
        Target {
            name: "pairs",
            seeds: pairs_seeds(work),
            dict: PAIRS,
            run: run_pairs,
        },
        Target {
            name: "manifest",
            seeds: manifest_seeds(work),
            dict: JSON,
            run: run_manifest,
        },
    ]
}

fn run_all(seconds: f64) {
    let seed = std::env::var("FACEREC_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(19u64);
    let work = tempfile::tempdir().unwrap();
    let last_panic = Arc::new(Mutex::new(String::new()));
    let hook_msg = Arc::clone(&last_panic);
    std::panic::set_hook(Box::new(move |info| {
        eprintln!("panic: {info}");
        *hook_msg.lock().unwrap() = info.to_string();
    }));
    let mut failures = Vec::new();
    for t in targets(work.path()) {
        let o = fuzz(&t, seconds, seed, work.path(), &last_panic);
        eprintln!(
            "fuzz {:<9} seed {seed}: {} executions in {seconds} s, {} accepted, corpus {}, slowest {:.1} ms, {} panics",
            t.name,
            o.execs,
            o.accepted,
            o.corpus,
            o.slowest.as_secs_f64() * 1e3,
            o.panics.len()
        );
        failures.extend(o.panics.into_iter().map(|p| format!("{}: {p}", t.name)));
    }
    let _ = std::panic::take_hook();
    assert!(
        failures.is_empty(),
        "the fuzzer found panics:\n{}",
        failures.join("\n")
    );
}

/// Always on: a short run of every target (also checks every seed is accepted).
#[test]
fn fuzz_parsers_briefly() {
    run_all(0.4);
}

/// The long run: `FACEREC_FUZZ_SECS` seconds per target (default 60).
#[test]
#[ignore = "long fuzz run; see the module docs"]
fn fuzz_parsers_long() {
    let secs = std::env::var("FACEREC_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60.0);
    run_all(secs);
}
