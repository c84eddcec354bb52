//! With the `cuda` feature: compiles every `kernels/*.cu` to PTX with nvcc and
//! embeds it (`$OUT_DIR/ptx.rs`, one `pub const NAME: &str` per kernel file);
//! when `TUNEFUSE_CUDA_STUBS=<dir>` is set, links the final binaries against
//! the stub CUDA libraries in that directory (see scripts/cuda-toolchain.sh),
//! so a GPU binary can be built on a machine without CUDA.
use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=TUNEFUSE_CUDA_STUBS");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    if let Err(msg) = build_kernels() {
        eprintln!("{msg}");
        std::process::exit(1);
    }
    link_stubs();
}

fn build_kernels() -> Result<(), String> {
    for var in ["NVCC", "CUDA_ROOT", "CUDA_PATH", "CUDA_COMPUTE_CAP", "PATH"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let kernels = Path::new("kernels");
    // The directory too, so that a new kernel file triggers a rebuild.
    println!("cargo::rerun-if-changed=kernels");
    let mut sources = Vec::new();
    let entries = std::fs::read_dir(kernels).map_err(|e| format!("cannot read kernels/: {e}"))?;
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        match path.extension().and_then(|e| e.to_str()) {
            Some("cu") => {
                println!("cargo::rerun-if-changed={}", path.display());
                sources.push(path);
            }
            Some("cuh") => println!("cargo::rerun-if-changed={}", path.display()),
            _ => {}
        }
    }
    sources.sort();

    let nvcc = find_nvcc()?;
    let cap = compute_cap()?;
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let mut consts = String::new();
    for src in &sources {
        let stem = src.file_stem().unwrap().to_string_lossy().to_string();
        let ptx = out.join(format!("{stem}.ptx"));
        let mut cmd = Command::new(&nvcc);
        cmd.args(["-ptx", "-O3", "-std=c++17", "--expt-relaxed-constexpr"])
            .arg(format!("-arch=sm_{cap}"))
            .arg("-I")
            .arg(kernels)
            .arg(src)
            .arg("-o")
            .arg(&ptx);
        let output = cmd
            .output()
            .map_err(|e| format!("tunefuse build: cannot run {}: {e}", nvcc.display()))?;
        if !output.status.success() {
            return Err(format!(
                "tunefuse build: nvcc failed on {}\ncommand: {:?}\n--- stderr ---\n{}\n--- stdout ---\n{}",
                src.display(),
                cmd,
                String::from_utf8_lossy(&output.stderr),
                String::from_utf8_lossy(&output.stdout)
            ));
        }
        consts.push_str(&format!(
            "/// PTX of `kernels/{stem}.cu` for sm_{cap}.\npub const {}: &str = include_str!(concat!(env!(\"OUT_DIR\"), \"/{stem}.ptx\"));\n",
            stem.to_uppercase()
        ));
    }
    consts.push_str(&format!(
        "/// The compute capability the PTX was built for.\npub const COMPUTE_CAP: u32 = {cap};\n"
    ));
    std::fs::write(out.join("ptx.rs"), consts).map_err(|e| e.to_string())
}

fn find_nvcc() -> Result<PathBuf, String> {
    if let Some(p) = env::var_os("NVCC") {
        return Ok(PathBuf::from(p));
    }
    for var in ["CUDA_ROOT", "CUDA_PATH"] {
        if let Some(root) = env::var_os(var) {
            let p = Path::new(&root).join("bin").join("nvcc");
            if p.exists() {
                return Ok(p);
            }
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let p = dir.join("nvcc");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err("tunefuse build: nvcc not found (looked at $NVCC, $CUDA_ROOT/bin, $CUDA_PATH/bin and PATH).\n\
         Run `source \"$(scripts/cuda-toolchain.sh --env-file)\"` to install the pinned nvcc, or set NVCC."
        .into())
}

fn compute_cap() -> Result<u32, String> {
    if let Ok(v) = env::var("CUDA_COMPUTE_CAP") {
        return v.trim().replace('.', "").parse().map_err(|_| {
            format!(
                "tunefuse build: CUDA_COMPUTE_CAP={v:?} is not a compute capability like 90 or 8.0"
            )
        });
    }
    let smi = Command::new("nvidia-smi")
        .args(["--query-gpu=compute_cap", "--format=csv,noheader"])
        .output();
    if let Ok(o) = smi {
        if o.status.success() {
            let text = String::from_utf8_lossy(&o.stdout);
            if let Some(first) = text.lines().next() {
                if let Ok(cap) = first.trim().replace('.', "").parse() {
                    return Ok(cap);
                }
            }
        }
    }
    Err("tunefuse build: no GPU compute capability: set CUDA_COMPUTE_CAP (e.g. 90 for H100/H200, 80 for A100); \
         nvidia-smi did not report one"
        .into())
}

fn link_stubs() {
    let Some(dir) = env::var_os("TUNEFUSE_CUDA_STUBS") else {
        return;
    };
    let dir = PathBuf::from(dir);
    println!("cargo::rustc-link-search=native={}", dir.display());
    println!("cargo::rustc-link-arg=-Wl,--unresolved-symbols=ignore-in-object-files");
    println!("cargo::rustc-link-arg=-Wl,--no-as-needed");
    for lib in ["cuda", "cudart", "cublas", "cublasLt", "curand", "nvrtc"] {
        println!("cargo::rustc-link-arg=-l{lib}");
    }
}
