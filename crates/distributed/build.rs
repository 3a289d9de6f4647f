//! Compiles `csrc/shim.cpp` against the libtorch that torch-sys links, and links it statically.
//!
//! - libtorch: the lib directory comes from torch-sys (`DEP_TCH_LIBTORCH_LIB`); the headers are its
//!   sibling `include/` (true for an unpacked libtorch and for the PyTorch wheel), or
//!   `$LIBTORCH_INCLUDE/include` when torch-sys was pointed at separate include/lib folders.
//! - C++ ABI: `LIBTORCH_CXX11_ABI` (torch-sys's variable) if set, else read from libc10.so (the
//!   new-ABI `std::__cxx11::` names appear in its symbols), so the shim and libtorch agree on
//!   `std::string`.
//! - Gloo headers: the wheel lacks them; Debian's `libgloo-dev` provides them (`cargo xtask setup`
//!   installs it), or `GLOO_INCLUDE_DIR`. Only the headers are used: the Gloo code itself is inside
//!   libtorch_cpu.so, and Debian's libgloo.so must not be linked (two copies of Gloo would clash).
//! - feature `nccl`: also the CUDA runtime and NCCL headers (the wheel's `nvidia/*/include`,
//!   `CUDA_HOME`, `NCCL_INCLUDE_DIR`). Without the feature no CUDA header is ever needed.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=csrc/shim.cpp");
    for var in [
        "DEP_TCH_LIBTORCH_LIB",
        "LIBTORCH_INCLUDE",
        "LIBTORCH_CXX11_ABI",
        "GLOO_INCLUDE_DIR",
        "CUDA_HOME",
        "NCCL_INCLUDE_DIR",
        "FACEREC_CUDA_INCLUDE",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    facerec_torch_link::emit();
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        // torch-sys under its `doc-only` feature: nothing to compile against.
        return;
    };
    let lib = PathBuf::from(lib);
    let include = torch_include(&lib);
    let abi = cxx11_abi(&lib);
    let gloo = gloo_include();

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .define("USE_C10D_GLOO", None)
        .define("GLOG_USE_GLOG_EXPORT", None)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .include(&gloo)
        .file("csrc/shim.cpp");
    if std::env::var_os("CARGO_FEATURE_NCCL").is_some() {
        for dir in cuda_includes(&lib) {
            build.include(dir);
        }
        build
            .define("USE_C10D_NCCL", None)
            .define("FACEREC_NCCL", None);
    }
    build.compile("facerec_dist_shim");
}

fn torch_include(lib: &Path) -> PathBuf {
    let candidates: Vec<PathBuf> = match std::env::var_os("LIBTORCH_INCLUDE") {
        Some(dir) => vec![PathBuf::from(&dir).join("include"), PathBuf::from(dir)],
        None => vec![lib.parent().map(|p| p.join("include")).unwrap_or_default()],
    };
    let header = "torch/csrc/distributed/c10d/ProcessGroupGloo.hpp";
    for dir in &candidates {
        if dir.join(header).exists() {
            return dir.clone();
        }
    }
    panic!(
        "facerec-distributed: the c10d headers ({header}) are not in {:?}; torch-sys reported the \
         libtorch lib directory {} and the headers are expected in its sibling `include/` \
         (set LIBTORCH_INCLUDE to the folder holding `include/` otherwise)",
        candidates,
        lib.display()
    );
}

fn cxx11_abi(lib: &Path) -> &'static str {
    if let Ok(v) = std::env::var("LIBTORCH_CXX11_ABI") {
        return if v.trim() == "0" { "0" } else { "1" };
    }
    match std::fs::read(lib.join("libc10.so")) {
        Ok(bytes) => {
            let needle = b"__cxx11";
            if bytes.windows(needle.len()).any(|w| w == needle) {
                "1"
            } else {
                "0"
            }
        }
        // Every libtorch since 2.7 is built with the new ABI.
        Err(_) => "1",
    }
}

fn gloo_include() -> PathBuf {
    let mut candidates = vec![];
    if let Some(dir) = std::env::var_os("GLOO_INCLUDE_DIR") {
        candidates.push(PathBuf::from(dir));
    }
    candidates.push("/usr/include".into());
    candidates.push("/usr/local/include".into());
    for dir in &candidates {
        if dir.join("gloo/config.h").exists() && dir.join("gloo/transport/device.h").exists() {
            return dir.clone();
        }
    }
    panic!(
        "facerec-distributed: the Gloo headers (gloo/config.h) were not found in {candidates:?}.\n\
         The PyTorch wheel ships Gloo's code inside libtorch_cpu.so but not its headers.\n\
         Install them with `cargo xtask setup` (runs `apt-get install -y libgloo-dev` as root) or \
         by hand: `sudo apt-get update && sudo apt-get install -y libgloo-dev`.\n\
         Elsewhere, point GLOO_INCLUDE_DIR at a folder holding `gloo/` (the headers of \
         https://github.com/facebookincubator/gloo are enough; do not link its library)."
    );
}

fn cuda_includes(lib: &Path) -> Vec<PathBuf> {
    let mut dirs = vec![];
    // The PyTorch wheel's NVIDIA dependencies: site-packages/nvidia/<pkg>/include.
    if let Some(site) = lib.parent().and_then(Path::parent) {
        if let Ok(entries) = std::fs::read_dir(site.join("nvidia")) {
            let mut found: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path().join("include"))
                .filter(|p| p.is_dir())
                .collect();
            found.sort();
            dirs.extend(found);
        }
    }
    if let Some(dir) = std::env::var_os("NCCL_INCLUDE_DIR") {
        dirs.push(PathBuf::from(dir));
    }
    if let Some(list) = std::env::var_os("FACEREC_CUDA_INCLUDE") {
        dirs.extend(std::env::split_paths(&list));
    }
    let cuda_home = std::env::var_os("CUDA_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/usr/local/cuda".into());
    dirs.push(cuda_home.join("include"));
    let has = |name: &str| dirs.iter().any(|d| d.join(name).exists());
    // The wheel's nvidia/cu13/include has the runtime API but not the toolkit's crt/ and libcu++
    // (nv/target) headers that cuda_runtime.h and cuda_fp16.h include: those come from a CUDA
    // toolkit (CUDA_HOME) or the nvidia-cuda-cccl wheel plus a crt/ folder (FACEREC_CUDA_INCLUDE).
    for header in [
        "cuda_runtime_api.h",
        "crt/host_config.h",
        "nv/target",
        "nccl.h",
    ] {
        if !has(header) {
            panic!(
                "facerec-distributed: feature `nccl` needs the header {header}, not found in {dirs:?}; \
                 install the CUDA toolkit and set CUDA_HOME (default /usr/local/cuda), or list extra \
                 include folders in FACEREC_CUDA_INCLUDE (':'-separated) and NCCL_INCLUDE_DIR"
            );
        }
    }
    dirs.into_iter().filter(|d| d.is_dir()).collect()
}
