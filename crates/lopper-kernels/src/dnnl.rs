//! oneDNN's gemm, found and loaded at run time.
//!
//! `cargo xtask setup` installs `libdnnl.so.3` from the `onednn-cpu-gomp` wheel on PyPI into
//! the lopper home ([`install_dnnl`]); [`crate::blas`] loads it next to oneMKL. oneDNN picks its
//! kernels by the CPU's instruction sets, not its vendor: on an AVX512_BF16 CPU (Zen 4,
//! Sapphire Rapids) its bf16 x bf16 -> f32 product runs on `vdpbf16ps`, the kernels PyTorch's
//! bf16 linear layers use. Its OpenMP runtime is libgomp (GCC's, on every machine that builds
//! Rust); each calling thread asks it for one thread, since [`crate::matmul`] already splits the
//! products over rayon's threads.

use std::ffi::{c_char, c_int, c_uint};
use std::path::{Path, PathBuf};

use libloading::Library;

use crate::error::Result;

/// The pinned PyPI requirement that carries the library (the CPU-only build on GNU OpenMP).
pub const DNNL_REQUIREMENT: &str = "onednn-cpu-gomp==2023.2.0";
/// Folder of the library inside the wheel.
const WHEEL_LIB_DIR: &str = "onednn_cpu_gomp-2023.2.0.data/data/lib";
/// The library lopper installs.
pub const DNNL_LIB: &str = "libdnnl.so.3";
/// Environment variable: `off` disables oneDNN (products then run on oneMKL); a path (the
/// library or its folder) picks one.
pub const DNNL_VAR: &str = "LOPPER_DNNL";

/// Where [`install_dnnl`] puts the library under the lopper home.
pub fn dnnl_dir(home: &Path) -> PathBuf {
    home.join("blas").join(DNNL_REQUIREMENT.replace("==", "-"))
}

/// Installs oneDNN under `home` unless it is already there; returns its folder (atomically, as
/// [`crate::install_mkl`] does).
pub fn install_dnnl(home: &Path) -> Result<PathBuf> {
    crate::blas::install_wheel_libs(
        DNNL_REQUIREMENT,
        WHEEL_LIB_DIR,
        &[DNNL_LIB],
        &dnnl_dir(home),
        "oneDNN",
    )
}

/// `dnnl_sgemm` / `dnnl_gemm_bf16bf16f32`: row-major, `'N'`/`'T'` flags, 64-bit sizes,
/// returns a status (0 = success).
pub(crate) type DnnlGemm<S> = unsafe extern "C" fn(
    c_char,
    c_char,
    i64,
    i64,
    i64,
    f32,
    *const S,
    i64,
    *const S,
    i64,
    f32,
    *mut f32,
    i64,
) -> c_int;
type SetNumThreads = unsafe extern "C" fn(c_int);

#[repr(C)]
struct Version {
    major: c_int,
    minor: c_int,
    patch: c_int,
    hash: *const c_char,
    cpu_runtime: c_uint,
    gpu_runtime: c_uint,
}
type GetVersion = unsafe extern "C" fn() -> *const Version;
type EffectiveIsa = unsafe extern "C" fn() -> c_int;

/// `dnnl_cpu_isa_avx512_core_bf16` and the ISAs above it carry the bf16 dot product.
const ISA_AVX512_CORE_BF16: c_int = 0xe7;

/// A loaded oneDNN.
#[derive(Debug)]
pub(crate) struct Dnnl {
    pub sgemm: DnnlGemm<f32>,
    pub gemm_bf16: DnnlGemm<u16>,
    set_num_threads: SetNumThreads,
    /// Whether the CPU runs its bf16 product on bf16 dot-product instructions.
    pub native_bf16: bool,
    /// Whether `gemm_bf16` runs at all on this CPU: oneDNN implements it from AVX-512 up and
    /// answers `unimplemented` on an AVX2 CPU (probed at load with a 1 x 1 product).
    pub bf16_gemm: bool,
    /// The matmul primitive, where it runs bf16 products on AMX tiles.
    pub amx: Option<crate::primitive::Matmul>,
    pub version: String,
    _lib: Library,
}

thread_local! {
    static ONE_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Dnnl {
    /// Asks OpenMP for one thread on the calling thread (once per thread: the setting is the
    /// thread's own). Called before every product.
    pub fn sequential(&self) {
        if !ONE_THREAD.with(|d| d.replace(true)) {
            // SAFETY: omp_set_num_threads takes a positive count and touches only this thread's
            // OpenMP state.
            #[allow(unsafe_code)]
            unsafe {
                (self.set_num_threads)(1)
            };
        }
    }
}

/// The library named by `LOPPER_DNNL` or installed by setup; `Err` says why there is none.
pub(crate) fn find_and_load() -> std::result::Result<Dnnl, String> {
    let candidate = match std::env::var_os(DNNL_VAR).filter(|v| !v.is_empty()) {
        Some(v) if ["off", "none", "0"].contains(&v.to_string_lossy().as_ref()) => {
            return Err(format!(
                "{DNNL_VAR}={} turns oneDNN off",
                v.to_string_lossy()
            ));
        }
        _ => crate::blas::locate(DNNL_VAR, dnnl_dir, DNNL_LIB),
    };
    if !candidate.is_file() {
        return Err(format!(
            "no oneDNN at {} (run `cargo xtask setup` to install it from PyPI, or set {DNNL_VAR} to a libdnnl.so.3)",
            candidate.display()
        ));
    }
    load(&candidate).map_err(|e| {
        format!(
            "oneDNN at {} does not load ({e}; it needs GCC's libgomp.so.1: `apt install libgomp1`); set {DNNL_VAR}=off to silence this",
            candidate.display()
        )
    })
}

#[allow(unsafe_code)]
fn load(path: &Path) -> std::result::Result<Dnnl, String> {
    // SAFETY: loading a shared library runs its initialisers (oneDNN's and libgomp's). The
    // symbols are looked up by their documented names and called with their documented C
    // signatures (dnnl.h, omp.h; omp_set_num_threads comes from libgomp, which oneDNN loads).
    unsafe {
        let lib = Library::new(path).map_err(|e| e.to_string())?;
        let sym = |name: &[u8]| crate::blas::symbol(&lib, name);
        let sgemm: DnnlGemm<f32> = std::mem::transmute(sym(b"dnnl_sgemm\0")?);
        let gemm_bf16: DnnlGemm<u16> = std::mem::transmute(sym(b"dnnl_gemm_bf16bf16f32\0")?);
        let set_num_threads: SetNumThreads = std::mem::transmute(sym(b"omp_set_num_threads\0")?);
        let isa: EffectiveIsa = std::mem::transmute(sym(b"dnnl_get_effective_cpu_isa\0")?);
        let native_bf16 = isa() & ISA_AVX512_CORE_BF16 == ISA_AVX512_CORE_BF16;
        let get_version: GetVersion = std::mem::transmute(sym(b"dnnl_version\0")?);
        let v = get_version();
        let version = if v.is_null() {
            "oneDNN".to_string()
        } else {
            format!("oneDNN {}.{}.{}", (*v).major, (*v).minor, (*v).patch)
        };
        // Probed on one OpenMP thread, as every product runs.
        set_num_threads(1);
        let bf16_gemm = {
            let one: u16 = 0x3f80; // 1.0 in bf16
            let mut c = 0f32;
            let status = gemm_bf16(
                b'N' as c_char,
                b'N' as c_char,
                1,
                1,
                1,
                1.0,
                &one,
                1,
                &one,
                1,
                0.0,
                &mut c,
                1,
            );
            status == 0 && c == 1.0
        };
        let amx = if native_bf16 {
            crate::primitive::probe(&lib)
        } else {
            None
        };
        Ok(Dnnl {
            sgemm,
            gemm_bf16,
            set_num_threads,
            native_bf16,
            bf16_gemm,
            amx,
            version,
            _lib: lib,
        })
    }
}
