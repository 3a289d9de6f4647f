//! `cargo xtask`: facerec's front door.
//!
//! Every command first finds or provisions libtorch (PyTorch 2.13.0, the version `tch` 0.26 is built
//! against), then runs cargo with the environment `torch-sys` needs. This crate must not depend on
//! `tch`: it has to build on a machine that has no libtorch yet.
//!
//! Lookup order (see `docs/setup.md`):
//! 1. `LIBTORCH` set: use it as is.
//! 2. a `python3` on `PATH` whose `torch` is exactly 2.13.0: build with `LIBTORCH_USE_PYTORCH=1`.
//! 3. a virtual environment in the per-user cache (`$FACEREC_TORCH_ENV`, else
//!    `$XDG_CACHE_HOME/facerec/torch-2.13.0`, else `~/.cache/facerec/torch-2.13.0`), created and
//!    filled with `pip install torch==2.13.0 numpy` the first time, reused by every checkout after.
//!    The same environment also gets `onnxruntime==1.31.1` (the independent runtime of the ONNX
//!    export tests), installed once, also into an environment made before it was needed.
//!
//! Every command that builds also makes sure the Gloo headers are there (`facerec-distributed`
//! compiles against them; the PyTorch wheel lacks them): found under `GLOO_INCLUDE_DIR`,
//! `/usr/include` or `/usr/local/include`, else installed with `apt-get install -y libgloo-dev`
//! when running as root, else a clear error saying what to install.
//!
//! `train --nproc N` (and `--nnodes`, `--node-rank`, `--master-addr`, `--master-port`) builds the
//! `facerec` binary once and starts N ranks of `facerec train` through `facerec-launch`.

use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

mod imports;

const TORCH_VERSION: &str = "2.13.0";
const READY_MARKER: &str = ".facerec-ready";
/// onnxruntime for the ONNX export tests (`crates/trainer/tests/onnx_export.rs`), pinned.
const ONNXRUNTIME_VERSION: &str = "1.31.1";

const USAGE: &str = "\
cargo xtask <command> [args]

commands:
  train [facerec train args]   set up libtorch, then train (no args: the embedded default run)
        --nproc N              ... as N local processes (data parallel; RANK, WORLD_SIZE, ... set)
        --nnodes M --node-rank K --master-addr HOST --master-port P
                               ... as node K of M machines (run the same command on each)
  test [cargo test args]       set up libtorch, then run the whole test suite (release profile)
  clippy [cargo clippy args]   set up libtorch, then lint every target with warnings as errors (CI)
  run [facerec args]           set up libtorch, then run the `facerec` binary with any subcommand
  bench [criterion args]       set up libtorch, then run the criterion benchmarks
  bench-<name> [args]          set up libtorch, then run benches/src/bin/bench-<name>.rs (ours vs a reference)
  <other> [args]               any other `facerec` subcommand, e.g. `cargo xtask eval --model RUN_DIR --bin lfw.bin`,
                               `export --model RUN_DIR --format safetensors --out F`, `plot --run RUN_DIR`
                               (inputs are named options: --model for a model, --run for a run's metrics)
  imports                      list import circles between the files of each crate (none allowed)
  setup                        only find or provision libtorch, and print where it is
  env                          print the shell exports that plain `cargo` commands need

environment:
  LIBTORCH           use this libtorch directory
  FACEREC_TORCH_ENV  where to create the cached Python environment holding torch
  GLOO_INCLUDE_DIR   a folder holding the Gloo headers (gloo/), instead of libgloo-dev
";

/// How the build will find libtorch.
enum Torch {
    /// `LIBTORCH` points at an unpacked libtorch.
    Libtorch(PathBuf),
    /// A Python interpreter with torch 2.13.0; `venv` is set when it lives in a virtual environment.
    Python {
        python: PathBuf,
        venv: Option<PathBuf>,
    },
}

impl Torch {
    /// Environment variables for cargo and for the programs it runs.
    fn env(&self) -> Vec<(String, OsString)> {
        match self {
            Torch::Libtorch(dir) => vec![("LIBTORCH".into(), dir.clone().into())],
            Torch::Python { python, venv } => {
                let mut env = vec![
                    ("LIBTORCH_USE_PYTORCH".into(), "1".into()),
                    ("FACEREC_PYTHON".into(), python.clone().into()),
                ];
                if let Some(venv) = venv {
                    let mut path = OsString::from(venv.join("bin"));
                    if let Some(old) = std::env::var_os("PATH") {
                        path.push(":");
                        path.push(old);
                    }
                    env.push(("VIRTUAL_ENV".into(), venv.clone().into()));
                    env.push(("PATH".into(), path));
                }
                env
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Torch::Libtorch(dir) => format!("libtorch from LIBTORCH={}", dir.display()),
            Torch::Python { python, .. } => {
                format!("torch {TORCH_VERSION} from {}", python.display())
            }
        }
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<ExitCode> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() || matches!(args[0].as_str(), "-h" | "--help" | "help") {
        print!("{USAGE}");
        return Ok(ExitCode::SUCCESS);
    }
    let command = args.remove(0);
    let root = workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&root);
    match command.as_str() {
        "imports" => {
            let found = imports::circles(&root)?;
            for circle in &found {
                let names: Vec<String> = circle.iter().map(|f| f.display().to_string()).collect();
                println!("import circle: {}", names.join(" <-> "));
            }
            if found.is_empty() {
                println!("xtask: no import circles between files");
                return Ok(ExitCode::SUCCESS);
            }
            return Ok(ExitCode::FAILURE);
        }
        "setup" => {
            let torch = find_or_provision()?;
            println!("xtask: using {}", torch.describe());
            return Ok(ExitCode::SUCCESS);
        }
        "env" => {
            let torch = find_or_provision()?;
            for (k, v) in torch.env() {
                println!("export {k}={:?}", v.to_string_lossy());
            }
            return Ok(ExitCode::SUCCESS);
        }
        "train" => {
            let (launch, rest) = facerec_launch::split_launch_args(&args)?;
            match launch {
                // `--dry-run` estimates per-rank numbers in one process: the trainer reads --nproc.
                Some(_) if args.iter().any(|a| a == "--dry-run") => {}
                Some(cfg) => return train_distributed(&cargo, &root, &cfg, &rest),
                None => {}
            }
            cmd.args([
                "run",
                "--release",
                "--package",
                "facerec-trainer",
                "--bin",
                "facerec",
                "--",
            ]);
            cmd.arg("train").args(&args);
        }
        "run" => {
            cmd.args([
                "run",
                "--release",
                "--package",
                "facerec-trainer",
                "--bin",
                "facerec",
                "--",
            ]);
            cmd.args(&args);
        }
        "test" => {
            cmd.args(["test", "--release"]);
            if !args.iter().any(|a| a == "-p" || a.starts_with("--package")) {
                cmd.arg("--workspace");
            }
            cmd.args(&args);
        }
        "clippy" => {
            cmd.args(["clippy", "--release", "--workspace", "--all-targets"]);
            cmd.args(&args);
            cmd.args(["--", "-D", "warnings"]);
        }
        "bench" => {
            cmd.args([
                "bench",
                "--package",
                "facerec-benches",
                "--bench",
                "bench_main",
                "--",
            ]);
            cmd.args(&args);
        }
        bench if bench.starts_with("bench-") => {
            cmd.args([
                "run",
                "--release",
                "--package",
                "facerec-benches",
                "--bin",
                bench,
                "--",
            ]);
            cmd.args(&args);
        }
        other if other.starts_with('-') => bail!("unknown option `{other}`\n\n{USAGE}"),
        other => {
            cmd.args([
                "run",
                "--release",
                "--package",
                "facerec-trainer",
                "--bin",
                "facerec",
                "--",
            ]);
            cmd.arg(other).args(&args);
        }
    }
    let torch = find_or_provision()?;
    eprintln!("xtask: using {}", torch.describe());
    cmd.envs(torch.env());
    let status = cmd.status().with_context(|| format!("running {cargo}"))?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(c) => ExitCode::from(c.clamp(1, 255) as u8),
        None => ExitCode::FAILURE,
    })
}

/// `cargo xtask train --nproc N ...`: build `facerec` once, then run N supervised ranks of
/// `facerec train ...` (see crates/launch and docs/distributed.md).
fn train_distributed(
    cargo: &str,
    root: &Path,
    cfg: &facerec_launch::LaunchConfig,
    args: &[String],
) -> Result<ExitCode> {
    let torch = find_or_provision()?;
    eprintln!("xtask: using {}", torch.describe());
    let mut build = Command::new(cargo);
    build.current_dir(root).envs(torch.env());
    build.args([
        "build",
        "--release",
        "--package",
        "facerec-trainer",
        "--bin",
        "facerec",
    ]);
    run_checked(&mut build, "cargo build --release --bin facerec")?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let target = if target.is_absolute() {
        target
    } else {
        root.join(target)
    };
    let exe = target.join("release").join("facerec");
    let mut argv: Vec<OsString> = vec!["train".into()];
    argv.extend(args.iter().map(OsString::from));
    facerec_launch::launch(cfg, &exe, &argv, &torch.env()).context("distributed training")?;
    Ok(ExitCode::SUCCESS)
}

/// Make sure the Gloo headers that facerec-distributed compiles against are installed.
fn ensure_gloo_headers() -> Result<()> {
    let mut dirs: Vec<PathBuf> = vec![];
    if let Some(dir) = std::env::var_os("GLOO_INCLUDE_DIR") {
        dirs.push(dir.into());
    }
    dirs.push("/usr/include".into());
    dirs.push("/usr/local/include".into());
    if dirs.iter().any(|d| d.join("gloo/config.h").exists()) {
        return Ok(());
    }
    const MANUAL: &str = "install them with `sudo apt-get update && sudo apt-get install -y libgloo-dev` \
         (Debian/Ubuntu), or set GLOO_INCLUDE_DIR to a folder holding the `gloo/` headers of \
         https://github.com/facebookincubator/gloo (only the headers are used; Gloo's code is inside libtorch)";
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let has_apt = Command::new("apt-get")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok();
    if !is_root || !has_apt {
        bail!(
            "facerec-distributed needs the Gloo C++ headers (the PyTorch wheel lacks them), and they are \
             not in {dirs:?}; {}: {MANUAL}",
            if is_root { "apt-get is not available" } else { "not running as root, so xtask will not install them" }
        );
    }
    eprintln!("xtask: the Gloo headers (for facerec-distributed) are missing; installing Debian's libgloo-dev");
    for (what, args) in [
        ("apt-get update", vec!["update"]),
        (
            "apt-get install -y libgloo-dev",
            vec!["install", "-y", "--no-install-recommends", "libgloo-dev"],
        ),
    ] {
        let mut cmd = Command::new("apt-get");
        // apt's output goes to stderr: `cargo xtask env` prints shell code on stdout.
        cmd.args(&args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(std::io::stderr());
        run_checked(&mut cmd, what)
            .with_context(|| format!("installing the Gloo headers failed; {MANUAL}"))?;
    }
    if !Path::new("/usr/include/gloo/config.h").exists() {
        bail!(
            "libgloo-dev was installed but /usr/include/gloo/config.h is still missing; {MANUAL}"
        );
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(Path::to_path_buf).unwrap_or(manifest)
}

fn find_or_provision() -> Result<Torch> {
    ensure_gloo_headers()?;
    find_or_provision_torch()
}

/// The first `name` on `PATH`, as an absolute path.
fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .map(|p| {
            if p.is_absolute() {
                p
            } else {
                std::env::current_dir().map(|d| d.join(&p)).unwrap_or(p)
            }
        })
}

fn find_or_provision_torch() -> Result<Torch> {
    if let Some(dir) = std::env::var_os("LIBTORCH") {
        let dir = PathBuf::from(dir);
        if !dir.join("lib").is_dir() {
            bail!("LIBTORCH={} has no lib/ directory", dir.display());
        }
        return Ok(Torch::Libtorch(dir));
    }
    if let Some(version) = torch_version(Path::new("python3")) {
        if version == TORCH_VERSION {
            let venv = std::env::var_os("VIRTUAL_ENV").map(PathBuf::from);
            // torch-sys runs `python` when VIRTUAL_ENV is set, `python3` otherwise.
            // The oracles' interpreter must be a path the tests can check (`FACEREC_PYTHON`).
            let python = find_on_path("python3").unwrap_or_else(|| "python3".into());
            return Ok(Torch::Python { python, venv });
        }
        eprintln!(
            "xtask: python3 has torch {version}, but tch 0.26 needs exactly {TORCH_VERSION}; \
             using the facerec cache instead"
        );
    }
    let venv = cache_env_dir()?;
    ensure_cached_env(&venv)?;
    Ok(Torch::Python {
        python: venv.join("bin").join("python"),
        venv: Some(venv),
    })
}

/// The `torch.__version__` of an interpreter, without any local suffix (`2.13.0+cu130` → `2.13.0`).
fn torch_version(python: &Path) -> Option<String> {
    let out = Command::new(python)
        .args(["-c", "import torch; print(torch.__version__)"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.trim().split('+').next()?.to_string();
    (!version.is_empty()).then_some(version)
}

fn cache_env_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("FACEREC_TORCH_ENV") {
        return Ok(PathBuf::from(dir));
    }
    let cache = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => {
            let home = std::env::var_os("HOME")
                .context("neither FACEREC_TORCH_ENV, XDG_CACHE_HOME nor HOME is set")?;
            PathBuf::from(home).join(".cache")
        }
    };
    Ok(cache.join("facerec").join(format!("torch-{TORCH_VERSION}")))
}

/// Create the cached environment unless a finished one is there, then add onnxruntime to it.
fn ensure_cached_env(venv: &Path) -> Result<()> {
    ensure_cached_torch(venv)?;
    ensure_onnxruntime(venv)
}

/// `pip install onnxruntime==ONNXRUNTIME_VERSION` into the cached environment unless its marker is
/// there (under the same lock as the torch install). A failed install is a warning, not an error:
/// only the ONNX tests need it, and they fail loudly on CI (and skip elsewhere) without it.
fn ensure_onnxruntime(venv: &Path) -> Result<()> {
    let marker = venv.join(format!(".facerec-onnxruntime-{ONNXRUNTIME_VERSION}"));
    if marker.exists() {
        return Ok(());
    }
    let name = venv
        .file_name()
        .context("the environment path has no name")?;
    let lock_path = venv.with_file_name(format!("{}.lock", name.to_string_lossy()));
    let lock = fs::File::create(&lock_path)
        .with_context(|| format!("creating {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", lock_path.display()))?;
    if marker.exists() {
        return Ok(());
    }
    let python = venv.join("bin").join("python");
    eprintln!(
        "xtask: installing onnxruntime=={ONNXRUNTIME_VERSION} into {} (for the ONNX export tests)",
        venv.display()
    );
    // pip's report goes to stderr: `eval "$(cargo xtask env)"` reads stdout.
    let installed = run_checked(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--progress-bar",
                "off",
                &format!("onnxruntime=={ONNXRUNTIME_VERSION}"),
            ])
            .stdout(std::io::stderr()),
        "pip install onnxruntime",
    );
    let version = Command::new(&python)
        .args(["-c", "import onnxruntime; print(onnxruntime.__version__)"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match (installed, version) {
        (Ok(()), Some(v)) if v == ONNXRUNTIME_VERSION => {
            fs::write(&marker, format!("onnxruntime {v}\n"))
                .with_context(|| format!("writing {}", marker.display()))?;
        }
        (result, v) => eprintln!(
            "xtask: warning: onnxruntime {ONNXRUNTIME_VERSION} is not in {} ({}; it reports {v:?}); \
             the ONNX export tests will skip (and fail on CI)",
            venv.display(),
            result.err().map_or("pip succeeded".into(), |e| format!("{e:#}"))
        ),
    }
    Ok(())
}

/// Create the cached torch environment unless a finished one is there. A file lock makes
/// concurrent checkouts (or CI runs) wait for one install rather than start a second one.
fn ensure_cached_torch(venv: &Path) -> Result<()> {
    let python = venv.join("bin").join("python");
    let ready = venv.join(READY_MARKER);
    if ready.exists() && torch_version(&python).as_deref() == Some(TORCH_VERSION) {
        return Ok(());
    }
    let parent = venv.parent().context("cache directory has no parent")?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let lock_path = parent.join(format!(
        "{}.lock",
        venv.file_name().unwrap().to_string_lossy()
    ));
    let lock = fs::File::create(&lock_path)
        .with_context(|| format!("creating {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        eprintln!(
            "xtask: another process is installing torch into {}; waiting for it",
            venv.display()
        );
        lock.lock()
            .with_context(|| format!("locking {}", lock_path.display()))?;
    }
    if ready.exists() && torch_version(&python).as_deref() == Some(TORCH_VERSION) {
        return Ok(());
    }
    eprintln!(
        "xtask: libtorch not found (no LIBTORCH, no python3 with torch {TORCH_VERSION}).\n\
         xtask: installing torch=={TORCH_VERSION} into {} (set FACEREC_TORCH_ENV to choose another place).\n\
         xtask: the wheel is the CUDA build, several GB with its NVIDIA libraries; expect 5 to 20 minutes.\n\
         xtask: this happens once per machine: every checkout reuses this environment.",
        venv.display()
    );
    let start = Instant::now();
    if !python.exists() {
        run_checked(
            Command::new("python3").args(["-m", "venv"]).arg(venv),
            "python3 -m venv",
        )?;
    }
    run_checked(
        Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "--progress-bar",
            "off",
            &format!("torch=={TORCH_VERSION}"),
            "numpy",
        ]),
        "pip install torch",
    )?;
    match torch_version(&python) {
        Some(v) if v == TORCH_VERSION => {}
        other => bail!(
            "after pip install, {} reports torch {:?}",
            python.display(),
            other
        ),
    }
    fs::write(&ready, format!("torch {TORCH_VERSION}\n"))
        .with_context(|| format!("writing {}", ready.display()))?;
    eprintln!(
        "xtask: torch installed in {:.0} s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn run_checked(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("{what} failed with {status}");
    }
    Ok(())
}
