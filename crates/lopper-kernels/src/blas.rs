//! The matrix-product libraries, found and loaded at run time: oneDNN ([`crate::dnnl`]) for f32
//! and bf16, oneMKL for f16 and wherever oneDNN is missing.
//!
//! `cargo xtask setup` installs oneMKL's libraries from the `mkl` wheel on PyPI into the lopper
//! home ([`install_mkl`]) and oneDNN's from its wheel ([`crate::install_dnnl`]); [`blas`] loads
//! them on first use. Nothing links against either at build time, so a build, a test or a
//! machine without them works the same, on the backend's portable gemm. Both run sequentially
//! on their calling thread (MKL's sequential layer, one OpenMP thread for oneDNN):
//! [`crate::matmul`] splits each product over rayon's threads (the pool burn-flex already
//! uses), so no second thread pool competes for the cores.

use std::ffi::{c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use half::{bf16, f16};
use libloading::Library;

use crate::dnnl::{DNNL_VAR, Dnnl, DnnlGemm};
use crate::error::{Error, Result};

/// The pinned PyPI requirement that carries the libraries.
pub const MKL_REQUIREMENT: &str = "mkl==2024.2.0";
/// Folder of the libraries inside the wheel.
const WHEEL_LIB_DIR: &str = "mkl-2024.2.0.data/data/lib";
/// The libraries lopper installs: the single dynamic library, the LP64 interface, the
/// sequential layer, the core, and the CPU-specific kernels the core picks from at run time.
pub const MKL_LIBS: &[&str] = &[
    "libmkl_rt.so.2",
    "libmkl_intel_lp64.so.2",
    "libmkl_sequential.so.2",
    "libmkl_core.so.2",
    "libmkl_def.so.2",
    "libmkl_mc3.so.2",
    "libmkl_avx2.so.2",
    "libmkl_avx512.so.2",
];
/// Environment variable: `off` disables the BLAS; a path (the library or its folder) picks one.
pub const BLAS_VAR: &str = "LOPPER_BLAS";

/// Where [`install_mkl`] puts the libraries under the lopper home.
pub fn mkl_dir(home: &Path) -> PathBuf {
    home.join("blas").join(MKL_REQUIREMENT.replace("==", "-"))
}

/// Installs oneMKL's libraries under `home` unless they are already there; returns their
/// folder.
pub fn install_mkl(home: &Path) -> Result<PathBuf> {
    install_wheel_libs(
        MKL_REQUIREMENT,
        WHEEL_LIB_DIR,
        MKL_LIBS,
        &mkl_dir(home),
        "oneMKL",
    )
}

/// Installs `libs` from folder `wheel_dir` of the wheel `requirement` into `dest` unless they
/// are already there. The wheel is fetched with pip, the libraries are extracted into a scratch
/// folder that is renamed into place whole, so an interrupted install leaves nothing
/// half-written.
pub(crate) fn install_wheel_libs(
    requirement: &str,
    wheel_dir: &str,
    libs: &[&str],
    dest: &Path,
    what: &str,
) -> Result<PathBuf> {
    let installed = libs
        .iter()
        .all(|l| std::fs::metadata(dest.join(l)).is_ok_and(|m| m.len() > 0));
    if installed {
        return Ok(dest.to_path_buf());
    }
    let parent = dest.parent().expect("library folders have a parent");
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let scratch = tempfile::Builder::new()
        .prefix(".install-")
        .tempdir_in(parent)
        .map_err(|e| Error::io(parent, e))?;
    tracing::info!(requirement, "downloading {what} with pip");
    let members: Vec<String> = libs.iter().map(|l| format!("{wheel_dir}/{l}")).collect();
    let members: Vec<&str> = members.iter().map(String::as_str).collect();
    let fix = format!(
        "put {} in a folder and point {BLAS_VAR} (oneMKL) or {DNNL_VAR} (oneDNN) at it; lopper runs without it, on slower matrix products",
        libs.join(", ")
    );
    lopper_core::pypi::fetch_wheel_members(requirement, &members, scratch.path(), &fix)?;
    let extracted = scratch.path().join(wheel_dir);
    if dest.exists() {
        std::fs::remove_dir_all(dest).map_err(|e| Error::io(dest, e))?;
    }
    std::fs::rename(&extracted, dest).map_err(|e| Error::io(dest, e))?;
    tracing::info!(path = %dest.display(), "{what} installed");
    Ok(dest.to_path_buf())
}

/// A row-major matrix operand of a product: `rows x cols` logically, stored row-major with
/// leading dimension `ld`, or, when `trans`, stored as its transpose (`cols x rows`, row-major).
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a, T> {
    /// The storage, starting at the matrix's first element.
    pub data: &'a [T],
    /// Logical rows.
    pub rows: usize,
    /// Logical columns.
    pub cols: usize,
    /// Distance between consecutive stored rows.
    pub ld: usize,
    /// Stored transposed.
    pub trans: bool,
}

impl<'a, T> MatRef<'a, T> {
    /// A `rows x cols` operand stored in `data` with leading dimension `ld` (transposed when
    /// `trans`).
    pub fn new(data: &'a [T], rows: usize, cols: usize, ld: usize, trans: bool) -> Self {
        Self {
            data,
            rows,
            cols,
            ld,
            trans,
        }
    }

    /// Checks that the stored matrix fits in `data`; the FFI relies on it.
    fn check(&self, what: &str) -> Result<()> {
        let (srows, scols) = if self.trans {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        };
        let need = if srows == 0 || scols == 0 {
            0
        } else {
            (srows - 1) * self.ld + scols
        };
        if self.ld < scols.max(1) || self.data.len() < need {
            return Err(Error::Shape(format!(
                "{what}: a {srows} x {scols} matrix with leading dimension {} needs {need} elements, has {}",
                self.ld,
                self.data.len()
            )));
        }
        Ok(())
    }
}

/// `cblas_?gemm` with row-major operands of element `T` and f32 output (`cblas_sgemm`,
/// `cblas_gemm_bf16bf16f32`, `cblas_gemm_f16f16f32`).
type Gemm<T> = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const T,
    c_int,
    *const T,
    c_int,
    f32,
    *mut f32,
    c_int,
);
type Sgemm = Gemm<f32>;
type GemmHalf = Gemm<u16>;
type SetLayer = unsafe extern "C" fn(c_int) -> c_int;
type VersionString = unsafe extern "C" fn(*mut c_char, c_int);

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;
const MKL_THREADING_SEQUENTIAL: c_int = 1;
const MKL_INTERFACE_LP64: c_int = 0;
const MKL_CBWR_AUTO: c_int = 2;
const MKL_CBWR_STRICT: c_int = 0x10000;
const MKL_CBWR_SUCCESS: c_int = 0;

/// The loaded libraries: oneDNN for f32 and bf16 products where it loads, oneMKL for f16 and
/// wherever oneDNN is missing. At least one of them is there.
#[derive(Debug)]
pub struct Blas {
    mkl: Option<Mkl>,
    dnnl: Option<Dnnl>,
    /// The libraries' own versions, e.g. `oneDNN 3.2.0 + oneMKL 2024.2`.
    pub version: String,
    /// Why a library is missing, and what runs instead (empty when both loaded).
    pub missing: Vec<String>,
}

#[derive(Debug)]
struct Mkl {
    sgemm: Sgemm,
    gemm_bf16: Option<GemmHalf>,
    gemm_f16: Option<GemmHalf>,
    version: String,
    _lib: Library,
}

static BLAS: OnceLock<std::result::Result<Blas, String>> = OnceLock::new();

/// The BLAS, loaded on first call; `None` (logged once, with the fix) when there is none.
pub fn blas() -> Option<&'static Blas> {
    blas_status().ok()
}

/// The BLAS, or why there is none (`LOPPER_BLAS=off`, not installed, a library that does not
/// load), for `cargo xtask info` and the benchmarks.
pub fn blas_status() -> std::result::Result<&'static Blas, &'static str> {
    BLAS.get_or_init(|| {
        let r = find_and_load();
        match &r {
            Ok(b) => tracing::debug!(version = %b.version, "BLAS loaded"),
            Err(why) => tracing::info!("{why}"),
        }
        r
    })
    .as_ref()
    .map_err(String::as_str)
}

/// One line saying which matrix products this process runs.
pub fn describe() -> String {
    match blas_status() {
        Ok(b) => format!(
            "{} (sequential, split over {} rayon threads){}",
            b.version,
            rayon::current_num_threads(),
            b.missing
                .iter()
                .map(|m| format!("; {m}"))
                .collect::<String>()
        ),
        Err(why) => format!("portable gemm: {why}"),
    }
}

fn find_and_load() -> std::result::Result<Blas, String> {
    if let Some(v) = std::env::var_os(BLAS_VAR)
        .filter(|v| ["off", "none", "0"].contains(&v.to_string_lossy().as_ref()))
    {
        return Err(format!(
            "{BLAS_VAR}={} turns the BLAS off",
            v.to_string_lossy()
        ));
    }
    let mkl = find_and_load_mkl();
    let dnnl = crate::dnnl::find_and_load();
    match (mkl, dnnl) {
        (Err(m), Err(d)) => Err(format!(
            "{m}; {d}; matrix products run on the portable gemm, about 2.5x slower"
        )),
        (mkl, dnnl) => {
            let mut missing = Vec::new();
            if let Err(why) = &mkl {
                missing.push(format!("{why}; f16 products widen to f32 on oneDNN"));
            }
            if let Err(why) = &dnnl {
                missing.push(format!(
                    "{why}; products run on oneMKL (bf16 about 2.5x slower)"
                ));
            }
            for m in &missing {
                tracing::info!("{m}");
            }
            let (mkl, dnnl) = (mkl.ok(), dnnl.ok());
            let mut parts = Vec::new();
            if let Some(d) = &dnnl {
                parts.push(if let Some(amx) = &d.amx {
                    format!("{} (bf16 on AMX tiles: {})", d.version, amx.kernel)
                } else if d.native_bf16 {
                    format!("{} (bf16 dot products)", d.version)
                } else {
                    d.version.clone()
                });
            }
            if let Some(m) = &mkl {
                parts.push(m.version.clone());
            }
            Ok(Blas {
                version: parts.join(" + "),
                missing,
                mkl,
                dnnl,
            })
        }
    }
}

fn find_and_load_mkl() -> std::result::Result<Mkl, String> {
    let candidate = locate(BLAS_VAR, mkl_dir, MKL_LIBS[0]);
    if !candidate.is_file() {
        return Err(format!(
            "no oneMKL at {} (run `cargo xtask setup` to install it from PyPI, or set {BLAS_VAR} to a libmkl_rt.so)",
            candidate.display()
        ));
    }
    load(&candidate).map_err(|e| {
        format!(
            "oneMKL at {} does not load ({e}); reinstall it with `cargo xtask setup` or set {BLAS_VAR}=off",
            candidate.display()
        )
    })
}

/// The library file named by the environment variable `var` (the file or its folder), else
/// `lib` in `dir` of the lopper home.
pub(crate) fn locate(var: &str, dir: fn(&Path) -> PathBuf, lib: &str) -> PathBuf {
    match std::env::var_os(var).filter(|v| !v.is_empty()) {
        Some(v) => {
            let p = PathBuf::from(v);
            if p.is_dir() { p.join(lib) } else { p }
        }
        None => dir(&lopper_core::lopper_home()).join(lib),
    }
}

/// The address of symbol `name` (NUL-terminated) in `lib`.
pub(crate) fn symbol(lib: &Library, name: &[u8]) -> std::result::Result<*mut c_void, String> {
    // SAFETY: the address is only read out; callers transmute it to the symbol's documented
    // C signature.
    #[allow(unsafe_code)]
    unsafe {
        lib.get::<*mut c_void>(name)
            .map(|s| *s)
            .map_err(|e| e.to_string())
    }
}

#[allow(unsafe_code)]
fn load(path: &Path) -> std::result::Result<Mkl, String> {
    // SAFETY: loading a shared library runs its initialisers; oneMKL's are the vendor's own. The
    // symbols are looked up by their documented names and called with their documented C
    // signatures (mkl_cblas.h, mkl_service.h).
    unsafe {
        let lib = Library::new(path).map_err(|e| e.to_string())?;
        let sym = |name: &[u8]| symbol(&lib, name);
        let set_threading: SetLayer = std::mem::transmute(sym(b"MKL_Set_Threading_Layer\0")?);
        let set_interface: SetLayer = std::mem::transmute(sym(b"MKL_Set_Interface_Layer\0")?);
        // Both layers must be chosen before any other call into the library.
        if set_interface(MKL_INTERFACE_LP64) != MKL_INTERFACE_LP64 {
            return Err("cannot select the LP64 interface".into());
        }
        if set_threading(MKL_THREADING_SEQUENTIAL) != MKL_THREADING_SEQUENTIAL {
            return Err("cannot select the sequential threading layer".into());
        }
        // Conditional numerical reproducibility: the same inputs give the same bits whatever
        // the buffers' alignment (without it MKL's code path may depend on the addresses, and a
        // resumed search would not be bit-identical to an uninterrupted one).
        let cbwr: SetLayer = std::mem::transmute(sym(b"MKL_CBWR_Set\0")?);
        if cbwr(MKL_CBWR_AUTO | MKL_CBWR_STRICT) != MKL_CBWR_SUCCESS {
            return Err("cannot select reproducible results (MKL_CBWR_Set)".into());
        }
        let sgemm: Sgemm = std::mem::transmute(sym(b"cblas_sgemm\0")?);
        let half = |name: &[u8]| {
            sym(name)
                .ok()
                .map(|p| std::mem::transmute::<*mut c_void, GemmHalf>(p))
        };
        let gemm_bf16 = half(b"cblas_gemm_bf16bf16f32\0");
        let gemm_f16 = half(b"cblas_gemm_f16f16f32\0");
        let version = match sym(b"MKL_Get_Version_String\0") {
            Ok(p) => {
                let f: VersionString = std::mem::transmute(p);
                let mut buf = [0 as c_char; 256];
                f(buf.as_mut_ptr(), buf.len() as c_int);
                let full = std::ffi::CStr::from_ptr(buf.as_ptr()).to_string_lossy();
                // "Intel(R) oneAPI Math Kernel Library Version 2024.2-Product Build ..."
                match full.split("Version ").nth(1) {
                    Some(v) => format!("oneMKL {}", v.split('-').next().unwrap_or(v).trim()),
                    None => full.trim().to_string(),
                }
            }
            Err(_) => "oneMKL".into(),
        };
        Ok(Mkl {
            sgemm,
            gemm_bf16,
            gemm_f16,
            version,
            _lib: lib,
        })
    }
}

/// The dimensions `(m, n, k)` of `c = a * b` after checking every operand against its storage.
fn check_product<T, U>(
    a: &MatRef<'_, T>,
    b: &MatRef<'_, T>,
    c: &[U],
    ldc: usize,
) -> Result<(usize, usize, usize)> {
    a.check("left operand")?;
    b.check("right operand")?;
    if a.cols != b.rows {
        return Err(Error::Shape(format!(
            "inner dimensions differ: {} x {} times {} x {}",
            a.rows, a.cols, b.rows, b.cols
        )));
    }
    let need = if a.rows == 0 {
        0
    } else {
        (a.rows - 1) * ldc + b.cols
    };
    if ldc < b.cols || c.len() < need {
        return Err(Error::Shape(format!(
            "output: {} x {} with leading dimension {ldc} needs {need} elements, has {}",
            a.rows,
            b.cols,
            c.len()
        )));
    }
    Ok((a.rows, b.cols, a.cols))
}

/// What a product writes into: `f32`, or `MaybeUninit<f32>` for a fresh buffer that the
/// product fills whole (every product overwrites its output, never reads it), which spares
/// zeroing it first. Sealed: both have the layout of an f32.
pub trait Output: sealed::Sealed + Copy {
    /// Zero, written where the inner dimension is empty.
    fn zero() -> Self;
}
impl Output for f32 {
    fn zero() -> Self {
        0.0
    }
}
impl Output for std::mem::MaybeUninit<f32> {
    fn zero() -> Self {
        std::mem::MaybeUninit::new(0.0)
    }
}

/// The dimensions `(m, n, k)` of `c = a * b` after [`check_product`], or `None` when there is
/// nothing for a library to compute: an empty output, or an empty inner dimension, whose
/// zeros are written here rather than left to each library's reading of `k = 0`.
fn prepare<T, C: Output>(
    a: &MatRef<'_, T>,
    b: &MatRef<'_, T>,
    c: &mut [C],
    ldc: usize,
) -> Result<Option<(usize, usize, usize)>> {
    let (m, n, k) = check_product(a, b, c, ldc)?;
    if k == 0 {
        for r in 0..m {
            c[r * ldc..r * ldc + n].fill(C::zero());
        }
    }
    Ok((m > 0 && n > 0 && k > 0).then_some((m, n, k)))
}
mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for std::mem::MaybeUninit<f32> {}
}

/// A row-major gemm of one library, for operands stored as `S` (f32, or u16 for bf16 and f16).
#[derive(Clone, Copy)]
enum Routine<'l, S> {
    Cblas(Gemm<S>),
    Dnnl(&'l Dnnl, DnnlGemm<S>),
}

impl Blas {
    /// `c = a * b` in f32 (row-major `c` with leading dimension `ldc`).
    pub fn sgemm<C: Output>(
        &self,
        a: MatRef<'_, f32>,
        b: MatRef<'_, f32>,
        c: &mut [C],
        ldc: usize,
    ) -> Result<()> {
        self.sgemm_scaled(1.0, a, b, c, ldc)
    }

    /// `c = alpha * a * b` in f32.
    pub fn sgemm_scaled<C: Output>(
        &self,
        alpha: f32,
        a: MatRef<'_, f32>,
        b: MatRef<'_, f32>,
        c: &mut [C],
        ldc: usize,
    ) -> Result<()> {
        let routine = match (&self.dnnl, &self.mkl) {
            (Some(d), _) => Routine::Dnnl(d, d.sgemm),
            (None, Some(m)) => Routine::Cblas(m.sgemm),
            (None, None) => unreachable!("a Blas holds at least one library"),
        };
        call(routine, alpha, a, b, c, ldc)
    }

    /// The AMX kernel oneDNN runs bf16 products on (e.g. `brg:avx512_core_amx`), if the CPU
    /// has AMX tiles.
    pub fn amx_kernel(&self) -> Option<&str> {
        self.dnnl.as_ref()?.amx.as_ref().map(|m| m.kernel.as_str())
    }

    /// Whether the library has the bf16 x bf16 -> f32 product.
    pub fn has_bf16(&self) -> bool {
        self.dnnl.as_ref().is_some_and(|d| d.bf16_gemm)
            || self.mkl.as_ref().is_some_and(|m| m.gemm_bf16.is_some())
    }

    /// Whether bf16 products run on the CPU's bf16 dot-product instructions (oneDNN on an
    /// AVX512_BF16 CPU): then a bf16 product is faster than an f32 one, and worth rounding an
    /// f32 input for.
    pub fn native_bf16(&self) -> bool {
        self.dnnl.as_ref().is_some_and(|d| d.native_bf16)
    }

    /// `c = a * b` with bf16 operands and f32 accumulation and output.
    pub fn gemm_bf16<C: Output>(
        &self,
        a: MatRef<'_, bf16>,
        b: MatRef<'_, bf16>,
        c: &mut [C],
        ldc: usize,
    ) -> Result<()> {
        if let Some((d, amx)) = self.dnnl.as_ref().and_then(|d| Some((d, d.amx.as_ref()?))) {
            let Some((m, n, k)) = prepare(&a, &b, c, ldc)? else {
                return Ok(());
            };
            d.sequential();
            let strides = |x: &MatRef<'_, bf16>| if x.trans { [1, x.ld] } else { [x.ld, 1] };
            // SAFETY: check_product verified that every operand's stored matrix, with these
            // strides, lies inside its slice; bf16 and u16 have the same layout.
            #[allow(unsafe_code)]
            let done = unsafe {
                amx.run(
                    (m, n, k),
                    (a.data.as_ptr().cast(), strides(&a)),
                    (b.data.as_ptr().cast(), strides(&b)),
                    (c.as_mut_ptr().cast(), ldc),
                )
            };
            if done.map_err(Error::Shape)? {
                return Ok(());
            }
        }
        let routine = match (&self.dnnl, &self.mkl) {
            (Some(d), _) if d.bf16_gemm => Routine::Dnnl(d, d.gemm_bf16),
            (
                _,
                Some(Mkl {
                    gemm_bf16: Some(f), ..
                }),
            ) => Routine::Cblas(*f),
            _ => return Err(Error::Shape("this BLAS has no bf16 product".into())),
        };
        call(routine, 1.0, a, b, c, ldc)
    }

    /// Whether the library has the f16 x f16 -> f32 product.
    pub fn has_f16(&self) -> bool {
        self.mkl.as_ref().is_some_and(|m| m.gemm_f16.is_some())
    }

    /// `c = a * b` with f16 operands and f32 accumulation and output.
    pub fn gemm_f16<C: Output>(
        &self,
        a: MatRef<'_, f16>,
        b: MatRef<'_, f16>,
        c: &mut [C],
        ldc: usize,
    ) -> Result<()> {
        match &self.mkl {
            Some(Mkl {
                gemm_f16: Some(f), ..
            }) => call(Routine::Cblas(*f), 1.0, a, b, c, ldc),
            _ => Err(Error::Shape("this BLAS has no f16 product".into())),
        }
    }
}

/// Calls a row-major gemm after [`check_product`]. `T` (the operands' element) and `S` (the
/// C prototype's) have the same size and layout: f32 and f32, bf16 or f16 and u16.
#[allow(unsafe_code)]
fn call<T, S, C: Output>(
    routine: Routine<'_, S>,
    alpha: f32,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    c: &mut [C],
    ldc: usize,
) -> Result<()> {
    const { assert!(std::mem::size_of::<T>() == std::mem::size_of::<S>()) };
    let Some((m, n, k)) = prepare(&a, &b, c, ldc)? else {
        return Ok(());
    };
    let (pa, pb, pc) = (
        a.data.as_ptr().cast::<S>(),
        b.data.as_ptr().cast::<S>(),
        c.as_mut_ptr().cast::<f32>(),
    );
    match routine {
        Routine::Cblas(f) => {
            let int = |v: usize| {
                c_int::try_from(v)
                    .map_err(|_| Error::Shape(format!("{v} exceeds oneMKL's 32-bit sizes")))
            };
            let (m, n, k) = (int(m)?, int(n)?, int(k)?);
            let (lda, ldb, ldc) = (int(a.ld)?, int(b.ld)?, int(ldc)?);
            let flag = |t: bool| if t { TRANS } else { NO_TRANS };
            // SAFETY: check_product verified that every operand's stored matrix lies inside
            // its slice; the sizes fit the LP64 interface; T and S have the same layout.
            unsafe {
                f(
                    ROW_MAJOR,
                    flag(a.trans),
                    flag(b.trans),
                    m,
                    n,
                    k,
                    alpha,
                    pa,
                    lda,
                    pb,
                    ldb,
                    0.0,
                    pc,
                    ldc,
                );
            }
        }
        Routine::Dnnl(lib, f) => {
            lib.sequential();
            let flag = |t: bool| (if t { b'T' } else { b'N' }) as c_char;
            // SAFETY: as above; oneDNN's sizes are 64-bit and its layout is row-major.
            let status = unsafe {
                f(
                    flag(a.trans),
                    flag(b.trans),
                    m as i64,
                    n as i64,
                    k as i64,
                    alpha,
                    pa,
                    a.ld as i64,
                    pb,
                    b.ld as i64,
                    0.0,
                    pc,
                    ldc as i64,
                )
            };
            if status != 0 {
                return Err(Error::Shape(format!(
                    "oneDNN refused a {m} x {k} by {k} x {n} product (status {status})"
                )));
            }
        }
    }
    Ok(())
}
