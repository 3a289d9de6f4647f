//! The independent oracles (`data-scripts/*.py`, Python + torch) and their frozen answers.
//!
//! [`oracle`] sends a JSON request to `data-scripts/<script>` and returns its JSON answer. Every
//! answer is also kept in the repository as a small fixture,
//! `data-scripts/fixtures/<script stem>-<request hash>.json`, so that a developer without the
//! oracle interpreter still runs every parity assertion against the oracle's numbers:
//!
//! | `FACEREC_PYTHON` | fixture | what happens |
//! |---|---|---|
//! | set (`cargo xtask test`) | present | the live oracle runs; its answer must match the fixture within [`FROZEN_RTOL`] / [`FROZEN_ATOL`], else the test fails (a drifted oracle or a stale fixture) |
//! | set | missing | the live answer is written as the new fixture (commit it); on CI (`CI=true`) a missing fixture fails instead |
//! | unset | present | the frozen answer is used (a note on stderr) |
//! | unset | missing | the test fails: run it once with the interpreter to record the answer |
//!
//! With `FACEREC_REFRESH_FIXTURES=1` (and the interpreter) every fixture a test touches is
//! rewritten from the live answer instead of being compared. On CI the interpreter is required,
//! so the live oracle always runs there.
//!
//! The request hash is FNV-1a (64 bit) over a canonical form of the request: object keys sorted,
//! integers as written, every other number rounded to 12 significant digits, so a last-bit
//! difference in a request computed through libtorch does not change the name. A changed request
//! (a test edited) gets a new fixture; delete the old file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;
use tch::Tensor;

/// Relative tolerance between a live answer and its fixture. The oracles compute in float64 (a
/// float32 case only rounds the oracle's inputs to float32), so an answer is the same function of
/// its inputs on any CPU to ~1e-13, while a changed oracle moves it by far more than this. A
/// float32 oracle would not do: its gradients moved by up to 2.5e-4 relative between the machine
/// that froze them and another CPU.
pub const FROZEN_RTOL: f64 = 1e-6;
/// Absolute tolerance between a live answer and its fixture, times `max(1, max |x|)` of the array
/// (or the number) it sits in.
pub const FROZEN_ATOL: f64 = 1e-9;

fn env_is(name: &str, value: &str) -> bool {
    std::env::var(name).as_deref() == Ok(value)
}

fn data_scripts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data-scripts")
}

/// The frozen answer's path for `script` and `request`.
pub fn fixture_path(script: &str, request: &Value) -> PathBuf {
    let stem = script.strip_suffix(".py").unwrap_or(script);
    data_scripts()
        .join("fixtures")
        .join(format!("{stem}-{:016x}.json", request_hash(request)))
}

/// The oracle `data-scripts/<script>`'s answer to `request`: live when `$FACEREC_PYTHON` is set
/// (and checked against, or recorded as, the fixture), frozen otherwise (see the module docs).
///
/// # Panics
/// When the script fails or answers something that is not JSON, when the live answer disagrees
/// with the fixture, when no answer is available (no interpreter and no fixture), and on CI
/// without the interpreter or the fixture.
pub fn oracle(script: &str, request: &Value) -> Value {
    oracle_with(script, request, |py| run_live(py, script, request))
}

/// [`oracle`] for an oracle that is not JSON-in / JSON-out (command-line arguments, input and
/// output files): `request` describes the inputs the test generated (their digests, see
/// [`digest`] and [`tensor_digest`], and the arguments) and names the fixture; `live` runs the
/// oracle with the interpreter it is given and reduces its output to a small JSON answer (full
/// values where they are small, [`bits_fingerprint`] / [`sketch`] where they are not). The same
/// fixture rules apply (see the module docs).
///
/// # Panics
/// As [`oracle`]; and whatever `live` panics on.
pub fn oracle_with(script: &str, request: &Value, live: impl FnOnce(&Path) -> Value) -> Value {
    let fixture = fixture_path(script, request);
    let frozen = std::fs::read(&fixture).ok().map(|bytes| {
        serde_json::from_slice::<Value>(&bytes)
            .unwrap_or_else(|e| panic!("{}: not JSON: {e}", fixture.display()))
    });
    let ci = env_is("CI", "true");
    let Some(py) = interpreter() else {
        assert!(
            !ci,
            "\n*** CI: the oracle interpreter ($FACEREC_PYTHON) is missing ***\n"
        );
        let Some(answer) = frozen else {
            panic!(
                "no frozen answer of {script} for this request ({} is missing): the inputs the \
                 test generated changed (a stale fixture), or it is new; run the test once \
                 through `cargo xtask test` (which sets FACEREC_PYTHON) to record it, commit it \
                 and delete the stale one (the fixtures of {script} now: {})",
                fixture.display(),
                fixtures_of(script).join(", ")
            );
        };
        eprintln!(
            "note: {script}: frozen answer {} (set FACEREC_PYTHON to run the oracle live)",
            fixture.display()
        );
        return answer;
    };
    let live = live(&py);
    let refresh = env_is("FACEREC_REFRESH_FIXTURES", "1");
    match frozen {
        Some(frozen) if !refresh => {
            if let Err(at) = same_answer(&live, &frozen, "$") {
                panic!(
                    "{script}: the live answer differs from the frozen one in {} at {at}; if the \
                     oracle changed on purpose, rerun with FACEREC_REFRESH_FIXTURES=1 and commit",
                    fixture.display()
                );
            }
        }
        Some(_) | None => {
            assert!(
                !ci || refresh,
                "\n*** CI: {script} has no frozen answer {} for this request: record it locally \
                 (cargo xtask test) and commit it ***\n",
                fixture.display()
            );
            write_fixture(&fixture, &live);
            eprintln!("note: {script}: recorded {}", fixture.display());
        }
    }
    live
}

/// The file names of `script`'s fixtures, sorted (at most 12, then a count).
fn fixtures_of(script: &str) -> Vec<String> {
    let stem = script.strip_suffix(".py").unwrap_or(script);
    let prefix = format!("{stem}-");
    let mut names: Vec<String> = std::fs::read_dir(data_scripts().join("fixtures"))
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(&prefix) && n.ends_with(".json"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    if names.len() > 12 {
        let more = names.len() - 12;
        names.truncate(12);
        names.push(format!("{more} more"));
    }
    names
}

/// The path of `data-scripts/<script>`, for [`oracle_with`]'s `live` closures.
pub fn script_path(script: &str) -> PathBuf {
    data_scripts().join(script)
}

/// FNV-1a (64 bit) of `bytes` as 16 hex digits: how a request names a large input exactly.
pub fn digest(bytes: &[u8]) -> String {
    format!("{:016x}", fnv1a(bytes))
}

/// [`digest`] of a tensor's kind, shape and (contiguous, CPU) bytes.
///
/// # Panics
/// When the tensor's data cannot be copied to the CPU.
pub fn tensor_digest(t: &Tensor) -> String {
    let t = t.to_device(tch::Device::Cpu).contiguous();
    let numel = t.numel();
    let mut bytes = format!("{:?}{:?}", t.kind(), t.size()).into_bytes();
    let head = bytes.len();
    bytes.resize(head + numel * t.kind().elt_size_in_bytes(), 0);
    t.copy_data_u8(&mut bytes[head..], numel);
    digest(&bytes)
}

/// [`digest`] of `f64`s (little-endian bytes).
pub fn f64_digest(values: &[f64]) -> String {
    digest(
        &values
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect::<Vec<u8>>(),
    )
}

/// A compact, exact stand-in for a long array of bit patterns (e.g. `f64::to_bits`): its length,
/// its [`digest`] and 16 evenly spaced `[index, value]` samples (to locate a difference).
/// Two arrays are equal (up to an FNV collision) when their fingerprints are.
pub fn bits_fingerprint(values: &[u64]) -> Value {
    let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
    let step = values.len().div_ceil(16).max(1);
    let sample: Vec<Value> = (0..values.len())
        .step_by(step)
        .map(|i| serde_json::json!([i, values[i]]))
        .collect();
    serde_json::json!({"len": values.len(), "fnv": digest(&bytes), "sample": sample})
}

/// Panics, naming `what` and the first differing sample, unless `ours`' [`bits_fingerprint`]
/// equals `frozen`.
///
/// # Panics
/// On any difference.
pub fn assert_bits_fingerprint(what: &str, ours: &[u64], frozen: &Value) {
    let mine = bits_fingerprint(ours);
    if &mine == frozen {
        return;
    }
    let first = mine["sample"]
        .as_array()
        .zip(frozen["sample"].as_array())
        .and_then(|(a, b)| a.iter().zip(b).find(|(x, y)| x != y))
        .map(|(x, y)| format!("; first differing sample: ours {x}, oracle {y}"))
        .unwrap_or_default();
    panic!(
        "{what}: ours (length {}, fnv {}) differs from the oracle's (length {}, fnv {}){first}",
        mine["len"], mine["fnv"], frozen["len"], frozen["fnv"]
    );
}

/// `bytes` deflated (best compression) and written in base64: how a frozen answer keeps a binary
/// blob that compresses well (e.g. a pickle with its images cut out). The inverse is [`unpacked`].
pub fn packed(bytes: &[u8]) -> String {
    use std::io::Write as _;
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(bytes).expect("deflating into memory");
    base64(&enc.finish().expect("deflating into memory"))
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with `=` padding.
fn base64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for k in 0..4 {
            if k <= c.len() {
                out.push(B64[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The bytes of standard base64 `text`; `None` when it is not base64.
fn unbase64(text: &str) -> Option<Vec<u8>> {
    let t = text.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(t.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for &ch in t {
        let v = B64.iter().position(|&b| b == ch)? as u32;
        acc = acc << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// The bytes [`packed`] wrote.
///
/// # Panics
/// When `text` is not base64 or not a deflate stream.
pub fn unpacked(text: &str) -> Vec<u8> {
    use std::io::Read as _;
    let z = unbase64(text).expect("packed bytes: not base64");
    let mut out = Vec::new();
    flate2::read::DeflateDecoder::new(&z[..])
        .read_to_end(&mut out)
        .expect("packed bytes: not a deflate stream");
    out
}

/// Number of random projections in a [`sketch`].
pub const SKETCH_PROJECTIONS: usize = 4;

fn sketch_weights(j: usize, n: usize) -> Vec<f64> {
    crate::randn_vec(0x5e7c_0000 + j as u64, n)
}

/// A compact stand-in for a long float array, for frozen answers too large to keep in full: its
/// length, largest magnitude and [`SKETCH_PROJECTIONS`] projections on fixed standard-normal
/// directions (seeded, so both sides use the same). Compare with [`assert_sketch`].
pub fn sketch(values: &[f64]) -> Value {
    let max_abs = values.iter().fold(0f64, |a, x| a.max(x.abs()));
    let proj: Vec<f64> = (0..SKETCH_PROJECTIONS)
        .map(|j| {
            let w = sketch_weights(j, values.len());
            w.iter().zip(values).map(|(w, x)| w * x).sum()
        })
        .collect();
    serde_json::json!({"n": values.len(), "max_abs": max_abs, "proj": proj})
}

/// Asserts that `ours` is consistent with the oracle's [`sketch`] `frozen` under the element-wise
/// rule `|ours − oracle| ≤ b = tol · max(1, max |oracle|)`: the lengths are equal, the largest
/// magnitudes differ by at most `b`, and every projection `w·x` by at most `6 b ‖w‖₂` (six
/// standard deviations of `w·e` for independent element errors `|e_i| ≤ b`; the rigorous worst
/// case `b ‖w‖₁` is about `sqrt(n)` times looser, and the rounding differences between two
/// libraries are many orders below `b`). One element off by more than about `6 b sqrt(n)` is
/// caught (with high probability); smaller differences only by the live oracle, which compares
/// element by element.
///
/// # Panics
/// On a length mismatch or a bound exceeded, naming `what`.
pub fn assert_sketch(what: &str, ours: &[f64], frozen: &Value, tol: f64) {
    let n = frozen["n"].as_u64().expect("sketch n") as usize;
    assert_eq!(
        ours.len(),
        n,
        "{what}: length (ours vs the oracle's sketch)"
    );
    let theirs_max = frozen["max_abs"].as_f64().expect("sketch max_abs");
    let bound = tol * theirs_max.max(1.0);
    let mine = sketch(ours);
    let my_max = mine["max_abs"].as_f64().unwrap_or(f64::NAN);
    assert!(
        (my_max - theirs_max).abs() <= bound,
        "{what}: max |x| ours {my_max:e}, oracle {theirs_max:e} (bound {bound:e})"
    );
    let frozen_proj = crate::floats(&frozen["proj"]);
    let my_proj = crate::floats(&mine["proj"]);
    assert_eq!(frozen_proj.len(), SKETCH_PROJECTIONS, "{what}: sketch size");
    for (j, (a, b)) in my_proj.iter().zip(&frozen_proj).enumerate() {
        let l2: f64 = sketch_weights(j, n)
            .iter()
            .map(|w| w * w)
            .sum::<f64>()
            .sqrt();
        let limit = 6.0 * bound * l2;
        assert!(
            (a - b).abs() <= limit,
            "{what}: projection {j} ours {a:e}, oracle {b:e} (bound {limit:e}): some element \
             differs (run with FACEREC_PYTHON to see which)"
        );
    }
}

/// `$FACEREC_PYTHON` when it names an existing file.
fn interpreter() -> Option<PathBuf> {
    std::env::var_os("FACEREC_PYTHON")
        .map(PathBuf::from)
        .filter(|p| p.exists())
}

fn run_live(py: &Path, script: &str, request: &Value) -> Value {
    let path = data_scripts().join(script);
    let mut child = Command::new(py)
        .arg(&path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", path.display()));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(request.to_string().as_bytes())
        .expect("writing the request");
    let out = child.wait_with_output().expect("waiting for the oracle");
    assert!(out.status.success(), "{} failed", path.display());
    serde_json::from_slice(&out.stdout).expect("oracle JSON")
}

/// Writes through a temporary file (unique per process and call) and a rename, so parallel tests
/// never read half a fixture.
fn write_fixture(path: &PathBuf, answer: &Value) {
    let dir = path.parent().expect("fixture directory");
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let unique = NEXT.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("json.tmp{}-{unique}", std::process::id()));
    let mut text = serde_json::to_string(answer).expect("serialising the answer");
    text.push('\n');
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("renaming to {}: {e}", path.display()));
}

/// FNV-1a (64 bit) of the canonical form of `request` (see the module docs).
pub fn request_hash(request: &Value) -> u64 {
    let mut text = String::new();
    canonical(request, &mut text);
    fnv1a(text.as_bytes())
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn canonical(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => out.push_str(&i.to_string()),
            (None, Some(u)) => out.push_str(&u.to_string()),
            _ => {
                let x = n.as_f64().expect("a JSON number");
                // 12 significant digits; -0 and 0 agree.
                let x = if x == 0.0 { 0.0 } else { x };
                out.push_str(&format!("{x:.11e}"));
            }
        },
        Value::String(s) => out.push_str(&Value::String(s.clone()).to_string()),
        Value::Array(a) => {
            out.push('[');
            for (k, x) in a.iter().enumerate() {
                if k > 0 {
                    out.push(',');
                }
                canonical(x, out);
            }
            out.push(']');
        }
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (k, key) in keys.into_iter().enumerate() {
                if k > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                canonical(&m[key], out);
            }
            out.push('}');
        }
    }
}

/// The largest magnitude among the numbers of `v` (recursively), at least 1.
fn scale(v: &Value) -> f64 {
    match v {
        Value::Number(n) => n.as_f64().unwrap_or(0.0).abs().max(1.0),
        Value::Array(a) => a.iter().map(scale).fold(1.0, f64::max),
        _ => 1.0,
    }
}

/// `Ok` when `live` and `frozen` have the same structure and every number agrees within
/// [`FROZEN_RTOL`] / [`FROZEN_ATOL`]; else the JSON path of the first difference.
fn same_answer(live: &Value, frozen: &Value, at: &str) -> Result<(), String> {
    same_within(live, frozen, at, scale(frozen))
}

fn same_within(live: &Value, frozen: &Value, at: &str, scale_of: f64) -> Result<(), String> {
    match (live, frozen) {
        (Value::Number(a), Value::Number(b)) => {
            let (a, b) = (
                a.as_f64().unwrap_or(f64::NAN),
                b.as_f64().unwrap_or(f64::NAN),
            );
            if (a - b).abs() <= FROZEN_RTOL * b.abs() + FROZEN_ATOL * scale_of {
                Ok(())
            } else {
                Err(format!("{at} (live {a:e}, frozen {b:e})"))
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            if a.len() != b.len() {
                return Err(format!("{at} (length {} vs {})", a.len(), b.len()));
            }
            let s = scale(frozen);
            for (k, (x, y)) in a.iter().zip(b).enumerate() {
                same_within(x, y, &format!("{at}[{k}]"), s)?;
            }
            Ok(())
        }
        (Value::Object(a), Value::Object(b)) => {
            if a.len() != b.len() || a.keys().any(|k| !b.contains_key(k)) {
                return Err(format!("{at} (different keys)"));
            }
            for (k, x) in a {
                same_within(x, &b[k], &format!("{at}.{k}"), scale(&b[k]))?;
            }
            Ok(())
        }
        (a, b) if a == b => Ok(()),
        _ => Err(format!("{at} ({live} vs {frozen})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn request_hash_ignores_key_order_and_last_bits_but_not_values() {
        let a = json!({"x": [0.1, 2, -0.0], "mode": "exact"});
        let b = json!({"mode": "exact", "x": [0.1 + 1e-16, 2, 0.0]});
        assert_eq!(request_hash(&a), request_hash(&b));
        let c = json!({"mode": "exact", "x": [0.1000001, 2, 0.0]});
        assert_ne!(request_hash(&a), request_hash(&c));
        let d = json!({"mode": "easy_margin", "x": [0.1, 2, 0.0]});
        assert_ne!(request_hash(&a), request_hash(&d));
        // FNV-1a of the empty object's canonical text "{}", computed by hand from the definition.
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for b in *b"{}" {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        assert_eq!(request_hash(&json!({})), h);
    }

    #[test]
    fn answers_compare_within_tolerance_and_name_the_difference() {
        let frozen = json!({"loss": 1.5, "grad": [1.0, -2e-3, null], "n": 3});
        let close = json!({"loss": 1.5 + 1e-7, "grad": [1.0, -2e-3 + 1e-10, null], "n": 3});
        assert_eq!(same_answer(&close, &frozen, "$"), Ok(()));
        let off = json!({"loss": 1.5, "grad": [1.0, -2.1e-3, null], "n": 3});
        let e = same_answer(&off, &frozen, "$").unwrap_err();
        assert!(e.starts_with("$.grad[1]"), "{e}");
        let shape = json!({"loss": 1.5, "grad": [1.0], "n": 3});
        assert!(same_answer(&shape, &frozen, "$")
            .unwrap_err()
            .contains("length"));
        let nan = json!({"loss": 1.5, "grad": [1.0, -2e-3, 0.0], "n": 3});
        assert!(same_answer(&nan, &frozen, "$").is_err());
    }

    #[test]
    fn packed_bytes_round_trip_and_base64_is_standard() {
        // RFC 4648 test vectors.
        for (raw, text) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(raw.as_bytes()), text);
            assert_eq!(unbase64(text).unwrap(), raw.as_bytes());
        }
        let blob: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 13) as u8).collect();
        let p = packed(&blob);
        assert!(p.len() < blob.len() / 4, "{} chars", p.len());
        assert_eq!(unpacked(&p), blob);
    }

    #[test]
    fn fingerprints_and_sketches_see_one_changed_element() {
        let v: Vec<f64> = crate::randn_vec(3, 2000);
        let mut w = v.clone();
        assert_sketch("same", &w, &sketch(&v), 1e-9);
        w[1234] += 1e-3;
        let caught = std::panic::catch_unwind(|| assert_sketch("off", &w, &sketch(&v), 1e-9));
        assert!(
            caught.is_err(),
            "a change of 1e-3 in one of 2000 elements went unseen"
        );
        let bits: Vec<u64> = v.iter().map(|x| x.to_bits()).collect();
        let mut other = bits.clone();
        assert_bits_fingerprint("same", &other, &bits_fingerprint(&bits));
        other[7] ^= 1;
        let caught = std::panic::catch_unwind(|| {
            assert_bits_fingerprint("off", &other, &bits_fingerprint(&bits))
        });
        assert!(caught.is_err(), "a one-bit change went unseen");
    }
}
