//! Build steps beyond Rust:
//!
//! - the C header `ffi/include/multiworld.h`, from `src/ffi/` with cbindgen (committed; CI
//!   regenerates it and fails if it changed; a failure here is a warning so that a read-only
//!   source tree still builds);
//! - with the `cuda` feature: the kernels of `cuda/kernels.cu`, compiled by nvcc into a fatbin
//!   (SASS for sm_80 and sm_90, PTX for newer GPUs) that the crate embeds, and the kernels'
//!   per-element arithmetic compiled for the host (`cuda/host_check.cpp`), which the tests
//!   check against the crate's reference without a GPU.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into()));
    header(&dir);
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        cuda(&dir);
    }
}

fn header(dir: &Path) {
    println!("cargo:rerun-if-changed=src/ffi");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    let config = match cbindgen::Config::from_file(dir.join("cbindgen.toml")) {
        Ok(c) => c,
        Err(e) => {
            println!("cargo:warning=cbindgen.toml: {e}");
            return;
        }
    };
    // cbindgen follows the `mod` declarations of src/ffi/mod.rs into the other files.
    match cbindgen::Builder::new().with_config(config).with_src(dir.join("src/ffi/mod.rs")).generate() {
        Ok(bindings) => {
            let out = dir.join("ffi/include/multiworld.h");
            if let Some(parent) = out.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            bindings.write_to_file(out);
        }
        Err(e) => println!("cargo:warning=cbindgen could not generate the C header: {e}"),
    }
}

/// nvcc from `NVCC`, then `CUDA_HOME/bin`, then `PATH`.
fn find_nvcc() -> Option<PathBuf> {
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if let Some(p) = std::env::var_os("NVCC") {
        return Some(PathBuf::from(p));
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        let p = PathBuf::from(home).join("bin/nvcc");
        if p.exists() {
            return Some(p);
        }
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join("nvcc")).find(|p| p.exists())
}

fn run(cmd: &mut Command, what: &str) {
    match cmd.status() {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{what} failed ({s}): {cmd:?}"),
        Err(e) => panic!("{what} could not start: {e}: {cmd:?}"),
    }
}

fn cuda(dir: &Path) {
    for f in ["cuda/kernels.cu", "cuda/arith.cuh", "cuda/host_check.cpp"] {
        println!("cargo:rerun-if-changed={f}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let Some(nvcc) = find_nvcc() else {
        panic!(
            "\n\nThe `cuda` feature compiles the crate's kernels with nvcc, and none was found \
             (looked at NVCC, CUDA_HOME/bin and PATH).\nInstall one, for example:\n    \
             pip install --target $HOME/.nvcc nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 \
             nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88\n    \
             export NVCC=$HOME/.nvcc/nvidia/cu13/bin/nvcc\nor build without `--features cuda`.\n\n"
        );
    };
    run(
        Command::new(&nvcc)
            .args(["--fatbin", "-O3", "-std=c++17"])
            .args(["-gencode", "arch=compute_80,code=sm_80"])
            .args(["-gencode", "arch=compute_90,code=sm_90"])
            .args(["-gencode", "arch=compute_90,code=compute_90"])
            .arg("-I")
            .arg(dir.join("cuda"))
            .arg("-o")
            .arg(out.join("kernels.fatbin"))
            .arg(dir.join("cuda/kernels.cu")),
        "nvcc",
    );
    // The host build of the arithmetic: plain C++, no CUDA headers, no C++ runtime needed.
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let obj = out.join("host_check.o");
    run(
        Command::new(&cxx)
            .args(["-std=c++17", "-O2", "-fPIC", "-fno-exceptions", "-fno-rtti", "-c"])
            .arg("-I")
            .arg(dir.join("cuda"))
            .arg(dir.join("cuda/host_check.cpp"))
            .arg("-o")
            .arg(&obj),
        "the C++ compiler (CXX, default c++)",
    );
    run(Command::new("ar").arg("crs").arg(out.join("libmw_host_check.a")).arg(&obj), "ar");
    println!("cargo:rustc-link-search=native={}", out.display());
    println!("cargo:rustc-link-lib=static=mw_host_check");
}
