//! Compiles the CUDA kernels (src/kernels/cuda/*.cu) to PTX with nvcc, only when the `cuda`
//! feature is on; the default build does nothing here.
//!
//! Each kernel file becomes `$OUT_DIR/<name>.compute_80.ptx` (loaded on any GPU of compute
//! capability 8.0 or later: the driver JIT-compiles it) and, when this nvcc knows
//! compute_90, `<name>.compute_90.ptx` (preferred on 9.x GPUs). `NVCC` overrides the nvcc
//! binary; `NVCC_FLAGS` adds flags (e.g. `-ccbin g++-11`).

use std::path::{Path, PathBuf};
use std::process::Command;

const KERNELS: [&str; 3] = ["scan", "conv", "step"];
const ARCHS: [&str; 2] = ["compute_80", "compute_90"];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo::rerun-if-changed=src/kernels/cuda");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=NVCC_FLAGS");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let extra: Vec<String> = std::env::var("NVCC_FLAGS")
        .map(|f| f.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    let known = supported_archs(&nvcc);
    let src = Path::new("src/kernels/cuda");
    for name in KERNELS {
        let cu = src.join(format!("{name}.cu"));
        for arch in ARCHS {
            let ptx = out.join(format!("{name}.{arch}.ptx"));
            if arch != "compute_80" && !known.iter().any(|a| a == arch) {
                // An empty file means "not built"; the loader falls back to compute_80.
                std::fs::write(&ptx, "").expect("write an empty PTX placeholder");
                println!(
                    "cargo::warning=nvcc does not support {arch}; {name}: compute_80 PTX only"
                );
                continue;
            }
            let status = Command::new(&nvcc)
                .args(["--ptx", "-O3", "-lineinfo", &format!("-arch={arch}")])
                .args(&extra)
                .arg("-o")
                .arg(&ptx)
                .arg(&cu)
                .status()
                .unwrap_or_else(|e| panic!("cannot run {nvcc} (the `cuda` feature needs the CUDA toolkit; set NVCC): {e}"));
            if !status.success() {
                panic!("{nvcc} failed on {} for {arch}: {status}", cu.display());
            }
        }
    }
}

/// The virtual architectures this nvcc can target (`nvcc --list-gpu-arch`, CUDA ≥ 11.1).
fn supported_archs(nvcc: &str) -> Vec<String> {
    Command::new(nvcc)
        .arg("--list-gpu-arch")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}
