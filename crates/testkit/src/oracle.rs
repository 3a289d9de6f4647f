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
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;

/// Relative tolerance between a live answer and its fixture.
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
                "no frozen answer of {script} for this request ({} is missing): run the test \
                 once through `cargo xtask test` (which sets FACEREC_PYTHON) to record it",
                fixture.display()
            );
        };
        eprintln!(
            "note: {script}: frozen answer {} (set FACEREC_PYTHON to run the oracle live)",
            fixture.display()
        );
        return answer;
    };
    let live = run_live(&py, script, request);
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

/// `$FACEREC_PYTHON` when it names an existing file.
fn interpreter() -> Option<PathBuf> {
    std::env::var_os("FACEREC_PYTHON")
        .map(PathBuf::from)
        .filter(|p| p.exists())
}

fn run_live(py: &PathBuf, script: &str, request: &Value) -> Value {
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
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
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
}
