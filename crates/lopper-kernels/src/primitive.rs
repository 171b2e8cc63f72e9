//! oneDNN's matmul primitive, for bf16 products on CPUs with AMX tiles.
//!
//! oneDNN's gemm entry point (`dnnl_gemm_bf16bf16f32`, [`crate::dnnl`]) runs on AVX-512 bf16
//! dot products whatever the CPU. On a CPU with AMX (Sapphire Rapids and later) its matmul
//! *primitive* picks the tile kernels (`brg:avx512_core_amx`), the ones PyTorch's bf16 linear
//! layers run on, at about twice the speed. A primitive is compiled for one shape and layout,
//! so each thread keeps the primitives it has built, keyed by shape and strides
//! ([`MatmulCache`]); a shape whose primitive would not run on AMX (an odd layout) is remembered
//! as such and goes to the gemm entry point. So does a shape the thread has seen only once:
//! compiling takes about 0.3 ms, more than a one-off product of a sliced layer gains.
//!
//! [`probe`] decides once, at load, whether the primitive runs on AMX on this CPU; nowhere else
//! is the path taken.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, c_char, c_int, c_void};

use std::sync::atomic::{AtomicU64, Ordering};

use libloading::Library;

/// Opaque oneDNN handles (`dnnl_engine_t`, `dnnl_stream_t`, ...).
type Handle = *mut c_void;
/// `dnnl_dims_t`: `int64_t[DNNL_MAX_NDIMS]`.
type Dims = [i64; 12];

const ENGINE_CPU: c_int = 1;
const STREAM_DEFAULT: u32 = 1;
const DT_BF16: c_int = 2;
const DT_F32: c_int = 3;
const QUERY_IMPL_INFO_STR: c_int = 8;
const ARG_SRC: c_int = 1;
const ARG_DST: c_int = 17;
const ARG_WEIGHTS: c_int = 33;
/// Primitives one thread keeps before it drops them all and starts again (a pruned model has a
/// few shapes per layer; the bound keeps a long run with many shapes from growing).
const CACHE_LIMIT: usize = 256;
/// Shapes seen once that one thread remembers (cleared when full).
const SEEN_LIMIT: usize = 4096;

#[repr(C)]
struct ExecArg {
    arg: c_int,
    memory: Handle,
}

type StreamCreate = unsafe extern "C" fn(*mut Handle, Handle, u32) -> c_int;
/// A call on one handle (destroy, wait).
type OnHandle = unsafe extern "C" fn(Handle) -> c_int;
type MdCreate = unsafe extern "C" fn(*mut Handle, c_int, *const i64, c_int, *const i64) -> c_int;
type PdCreate =
    unsafe extern "C" fn(*mut Handle, Handle, Handle, Handle, Handle, Handle, Handle) -> c_int;
type PdQuery = unsafe extern "C" fn(Handle, c_int, c_int, *mut c_void) -> c_int;
type PrimitiveCreate = unsafe extern "C" fn(*mut Handle, Handle) -> c_int;
type Execute = unsafe extern "C" fn(Handle, Handle, c_int, *const ExecArg) -> c_int;
type MemoryCreate = unsafe extern "C" fn(*mut Handle, Handle, Handle, *mut c_void) -> c_int;
type SetHandle = unsafe extern "C" fn(Handle, *mut c_void) -> c_int;
type EngineCreate = unsafe extern "C" fn(*mut Handle, c_int, usize) -> c_int;

/// The C functions of the primitive API (dnnl.h), copied out of the loaded library.
#[derive(Clone, Copy)]
struct Fns {
    stream_create: StreamCreate,
    stream_wait: OnHandle,
    stream_destroy: OnHandle,
    md_create: MdCreate,
    md_destroy: OnHandle,
    pd_create: PdCreate,
    pd_query: PdQuery,
    pd_destroy: OnHandle,
    primitive_create: PrimitiveCreate,
    primitive_execute: Execute,
    primitive_destroy: OnHandle,
    memory_create: MemoryCreate,
    memory_set_handle: SetHandle,
    memory_destroy: OnHandle,
}

/// The matmul primitive API of a loaded oneDNN, with its CPU engine.
///
/// The function pointers stay valid for as long as the library stays loaded: the [`Dnnl`]
/// that holds this lives in [`crate::blas`]'s process-wide static and is never unloaded, which
/// is what lets the per-thread caches release their primitives at thread exit.
///
/// [`Dnnl`]: crate::dnnl
#[derive(Debug)]
pub(crate) struct Matmul {
    fns: Fns,
    engine: Handle,
    /// The implementation oneDNN chose for the probe product, e.g. `brg:avx512_core_amx`.
    pub kernel: String,
}

impl std::fmt::Debug for Fns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("oneDNN primitive API")
    }
}

// SAFETY: the engine is oneDNN's CPU engine, which the library allows any thread to use; the
// streams and primitives built on it are kept per thread ([`MatmulCache`]).
#[allow(unsafe_code)]
unsafe impl Send for Matmul {}
#[allow(unsafe_code)]
unsafe impl Sync for Matmul {}

/// Loads the primitive API from `lib` and builds a probe product; `None` when a symbol is
/// missing, the engine cannot be made, or the probe does not run on AMX tiles.
#[allow(unsafe_code)]
pub(crate) fn probe(lib: &Library) -> Option<Matmul> {
    // SAFETY: the symbols are looked up by their documented names and given their documented
    // C signatures (dnnl.h of oneDNN 3.x, whose handles are all pointers).
    let fns = unsafe {
        let sym = |name: &[u8]| crate::blas::symbol(lib, name).ok();
        macro_rules! f {
            ($name:literal as $t:ty) => {
                std::mem::transmute::<*mut c_void, $t>(sym($name)?)
            };
        }
        Fns {
            stream_create: f!(b"dnnl_stream_create\0" as StreamCreate),
            stream_wait: f!(b"dnnl_stream_wait\0" as OnHandle),
            stream_destroy: f!(b"dnnl_stream_destroy\0" as OnHandle),
            md_create: f!(b"dnnl_memory_desc_create_with_strides\0" as MdCreate),
            md_destroy: f!(b"dnnl_memory_desc_destroy\0" as OnHandle),
            pd_create: f!(b"dnnl_matmul_primitive_desc_create\0" as PdCreate),
            pd_query: f!(b"dnnl_primitive_desc_query\0" as PdQuery),
            pd_destroy: f!(b"dnnl_primitive_desc_destroy\0" as OnHandle),
            primitive_create: f!(b"dnnl_primitive_create\0" as PrimitiveCreate),
            primitive_execute: f!(b"dnnl_primitive_execute\0" as Execute),
            primitive_destroy: f!(b"dnnl_primitive_destroy\0" as OnHandle),
            memory_create: f!(b"dnnl_memory_create\0" as MemoryCreate),
            memory_set_handle: f!(b"dnnl_memory_set_data_handle\0" as SetHandle),
            memory_destroy: f!(b"dnnl_memory_destroy\0" as OnHandle),
        }
    };
    // SAFETY: as above (dnnl_engine_create(engine*, kind, index)).
    let engine_create = unsafe {
        std::mem::transmute::<*mut c_void, EngineCreate>(
            crate::blas::symbol(lib, b"dnnl_engine_create\0").ok()?,
        )
    };
    let mut engine: Handle = std::ptr::null_mut();
    // SAFETY: a CPU engine of index 0 always exists; the handle is written on success.
    if unsafe { engine_create(&mut engine, ENGINE_CPU, 0) } != 0 || engine.is_null() {
        return None;
    }
    let mut api = Matmul {
        fns,
        engine,
        kernel: String::new(),
    };
    // The probe: the layout of a linear layer (weights stored transposed).
    let key = Key {
        m: 64,
        n: 64,
        k: 64,
        a: [64, 1],
        b: [1, 64],
        ldc: 64,
    };
    let plan = api.build(&key)?;
    api.kernel = plan.kernel.clone();
    plan.release(&api.fns);
    api.kernel.contains("amx").then_some(api)
}

/// A product's shape and layout: `c[m x n] = a[m x k] * b[k x n]`, with each operand's (row,
/// column) strides in elements and `c` row-major with leading dimension `ldc`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Key {
    m: i64,
    n: i64,
    k: i64,
    a: [i64; 2],
    b: [i64; 2],
    ldc: i64,
}

/// A compiled primitive and its three memory objects (their data pointers set per call).
struct Plan {
    primitive: Handle,
    memories: [Handle; 3],
    kernel: String,
}

impl Plan {
    #[allow(unsafe_code)]
    fn release(self, fns: &Fns) {
        // SAFETY: each handle was created by this library and is released once, here.
        unsafe {
            for m in self.memories {
                (fns.memory_destroy)(m);
            }
            (fns.primitive_destroy)(self.primitive);
        }
    }
}

impl Matmul {
    /// Compiles the primitive of `key`; `None` when oneDNN refuses the shape.
    #[allow(unsafe_code)]
    fn build(&self, key: &Key) -> Option<Plan> {
        let f = &self.fns;
        let dims = |r: i64, c: i64| -> Dims {
            let mut d = [0; 12];
            d[0] = r;
            d[1] = c;
            d
        };
        let strides = |s: [i64; 2]| -> Dims { dims(s[0], s[1]) };
        let mut mds: [Handle; 3] = [std::ptr::null_mut(); 3];
        // SAFETY: dims and strides are 12-element arrays as dnnl_dims_t is; every handle created
        // here is destroyed before returning, except the primitive and memories of the plan.
        unsafe {
            let descs = [
                (dims(key.m, key.k), strides(key.a), DT_BF16),
                (dims(key.k, key.n), strides(key.b), DT_BF16),
                (dims(key.m, key.n), strides([key.ldc, 1]), DT_F32),
            ];
            let mut ok = true;
            for (md, (d, s, t)) in mds.iter_mut().zip(&descs) {
                ok &= (f.md_create)(md, 2, d.as_ptr(), *t, s.as_ptr()) == 0;
            }
            let mut pd: Handle = std::ptr::null_mut();
            let null = std::ptr::null_mut();
            ok = ok && (f.pd_create)(&mut pd, self.engine, mds[0], mds[1], null, mds[2], null) == 0;
            let mut plan = None;
            if ok {
                let mut info: *const c_char = std::ptr::null();
                let kernel = if (f.pd_query)(pd, QUERY_IMPL_INFO_STR, 0, (&raw mut info).cast())
                    == 0
                    && !info.is_null()
                {
                    CStr::from_ptr(info).to_string_lossy().into_owned()
                } else {
                    String::new()
                };
                let mut primitive: Handle = std::ptr::null_mut();
                if (f.primitive_create)(&mut primitive, pd) == 0 {
                    let mut memories: [Handle; 3] = [std::ptr::null_mut(); 3];
                    let mut made = true;
                    for (mem, md) in memories.iter_mut().zip(&mds) {
                        made &= (f.memory_create)(mem, *md, self.engine, null) == 0;
                    }
                    let p = Plan {
                        primitive,
                        memories,
                        kernel,
                    };
                    if made {
                        plan = Some(p);
                    } else {
                        p.release(f);
                    }
                }
            }
            if !pd.is_null() {
                (f.pd_destroy)(pd);
            }
            for md in mds {
                if !md.is_null() {
                    (f.md_destroy)(md);
                }
            }
            plan
        }
    }

    /// `c = a * b` on the AMX primitive of this shape, when there is one: `Ok(false)` sends
    /// the product to the gemm entry point instead. The caller has checked that every operand
    /// lies inside its storage.
    ///
    /// # Safety
    /// `a`, `b` and `c` point to matrices of `key`'s shape and strides.
    #[allow(unsafe_code)]
    pub(crate) unsafe fn run(
        &self,
        (m, n, k): (usize, usize, usize),
        a: (*const u16, [usize; 2]),
        b: (*const u16, [usize; 2]),
        c: (*mut f32, usize),
    ) -> Result<bool, String> {
        let i = |v: usize| v as i64;
        let key = Key {
            m: i(m),
            n: i(n),
            k: i(k),
            a: [i(a.1[0]), i(a.1[1])],
            b: [i(b.1[0]), i(b.1[1])],
            ldc: i(c.1),
        };
        CACHE.with(|cache| {
            let mut cache = cache.borrow_mut();
            let cache = cache.get_or_insert_with(|| MatmulCache::new(self.fns));
            let f = &self.fns;
            if cache.stream.is_null() {
                // SAFETY: the engine is valid for the life of the process.
                if unsafe { (f.stream_create)(&mut cache.stream, self.engine, STREAM_DEFAULT) } != 0
                {
                    cache.stream = std::ptr::null_mut();
                    return Err("oneDNN could not create a stream".to_string());
                }
            }
            if !cache.plans.contains_key(&key) {
                // A shape seen once goes to the gemm entry point: a search over sampled masks
                // slices layers to widths that may not come back, and compiling a primitive
                // for each would cost more than it gains.
                if cache.seen.len() >= SEEN_LIMIT {
                    cache.seen.clear();
                }
                if cache.seen.insert(key) {
                    return Ok(false);
                }
                if cache.plans.len() >= CACHE_LIMIT {
                    cache.clear();
                }
                let plan = self.build(&key);
                let kernel = plan.as_ref().map_or("none", |p| p.kernel.as_str());
                tracing::trace!(?key, kernel, "oneDNN matmul primitive built");
                let plan = match plan {
                    Some(p) if p.kernel.contains("amx") => Some(p),
                    other => {
                        // Another kernel would be slower than the gemm entry point's.
                        if let Some(p) = other {
                            p.release(f);
                        }
                        None
                    }
                };
                cache.plans.insert(key, plan);
            }
            let Some(plan) = cache.plans.get(&key).and_then(Option::as_ref) else {
                return Ok(false);
            };
            // SAFETY: the caller guarantees the pointers hold matrices of this shape; the
            // memories and primitive belong to this thread's cache.
            unsafe {
                let ptrs = [a.0.cast_mut().cast(), b.0.cast_mut().cast(), c.0.cast()];
                for (mem, p) in plan.memories.iter().zip(ptrs) {
                    if (f.memory_set_handle)(*mem, p) != 0 {
                        return Err("oneDNN refused a data pointer".to_string());
                    }
                }
                let args = [
                    ExecArg {
                        arg: ARG_SRC,
                        memory: plan.memories[0],
                    },
                    ExecArg {
                        arg: ARG_WEIGHTS,
                        memory: plan.memories[1],
                    },
                    ExecArg {
                        arg: ARG_DST,
                        memory: plan.memories[2],
                    },
                ];
                let status = (f.primitive_execute)(plan.primitive, cache.stream, 3, args.as_ptr());
                if status != 0 || (f.stream_wait)(cache.stream) != 0 {
                    return Err(format!(
                        "oneDNN's matmul primitive failed on a {m} x {k} by {k} x {n} product (status {status})"
                    ));
                }
            }
            AMX_PRODUCTS.fetch_add(1, Ordering::Relaxed);
            Ok(true)
        })
    }
}

/// Products run on AMX primitives in this process (for tests and benchmarks).
static AMX_PRODUCTS: AtomicU64 = AtomicU64::new(0);

/// How many products have run on AMX primitives in this process.
#[cfg(test)]
pub(crate) fn products_on_amx() -> u64 {
    AMX_PRODUCTS.load(Ordering::Relaxed)
}

/// How many shapes the calling thread's cache holds.
#[cfg(test)]
fn cached_on_this_thread() -> usize {
    CACHE.with_borrow(|c| c.as_ref().map_or(0, |c| c.plans.len()))
}

/// One thread's stream and compiled primitives (`None`: the shape does not run on AMX).
struct MatmulCache {
    fns: Fns,
    stream: Handle,
    plans: HashMap<Key, Option<Plan>>,
    /// Shapes run once on the gemm entry point, not compiled yet.
    seen: HashSet<Key>,
}

impl MatmulCache {
    fn new(fns: Fns) -> Self {
        Self {
            fns,
            stream: std::ptr::null_mut(),
            plans: HashMap::new(),
            seen: HashSet::new(),
        }
    }

    fn clear(&mut self) {
        for plan in self.plans.drain().filter_map(|(_, p)| p) {
            plan.release(&self.fns);
        }
    }
}

impl Drop for MatmulCache {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        self.clear();
        if !self.stream.is_null() {
            // SAFETY: the stream was created by this cache and is destroyed once.
            unsafe { (self.fns.stream_destroy)(self.stream) };
        }
    }
}

thread_local! {
    static CACHE: RefCell<Option<MatmulCache>> = const { RefCell::new(None) };
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::*;
    use crate::MatRef;

    /// Deterministic values with a spread of magnitudes, exactly representable in bf16.
    fn values(n: usize, seed: u32) -> Vec<bf16> {
        (0..n as u32)
            .map(|i| {
                let h = i
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed.wrapping_mul(40_503));
                bf16::from_f32(((h >> 8) % 2001) as f32 / 1000.0 - 1.0)
            })
            .collect()
    }

    /// `a * b` through `gemm_bf16` against `sgemm` on the same (bf16-exact) values: the two
    /// accumulate in f32 and differ only in the order of the sums.
    #[allow(clippy::too_many_arguments)]
    fn check(m: usize, k: usize, n: usize, ta: bool, tb: bool, pad: usize) {
        let blas = crate::blas().expect("checked by the caller");
        let (lda, ldb) = (if ta { m } else { k } + pad, if tb { k } else { n } + pad);
        let a = values(lda * if ta { k } else { m }, 1);
        let b = values(ldb * if tb { n } else { k }, 2);
        let wide = |v: &[bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
        let (a32, b32) = (wide(&a), wide(&b));
        let ldc = n + pad;
        let mut want = vec![0f32; m * ldc];
        blas.sgemm(
            MatRef::new(&a32[..], m, k, lda, ta),
            MatRef::new(&b32[..], k, n, ldb, tb),
            &mut want,
            ldc,
        )
        .unwrap();
        let mut got = vec![0f32; m * ldc];
        blas.gemm_bf16(
            MatRef::new(&a[..], m, k, lda, ta),
            MatRef::new(&b[..], k, n, ldb, tb),
            &mut got,
            ldc,
        )
        .unwrap();
        for r in 0..m {
            for c in 0..n {
                let (g, w) = (got[r * ldc + c], want[r * ldc + c]);
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{m}x{k}x{n} (ta {ta}, tb {tb}, pad {pad}) at ({r}, {c}): {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn bf16_products_equal_f32_products_of_the_same_values_on_odd_shapes_and_layouts() {
        let Some(blas) = crate::blas() else { return };
        if !blas.has_bf16() {
            return;
        }
        let before = products_on_amx();
        for (m, k, n) in [
            (1, 1, 1),
            (7, 13, 5),
            (130, 577, 33),
            (64, 64, 300),
            (33, 1, 9),
        ] {
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                for pad in [0, 3] {
                    // Twice: the gemm entry point, then the primitive compiled for the shape.
                    check(m, k, n, ta, tb, pad);
                    check(m, k, n, ta, tb, pad);
                }
            }
        }
        if blas.amx_kernel().is_some() {
            // The layouts of a linear layer and of attention run on the tiles.
            assert!(products_on_amx() > before, "no product ran on AMX");
        }
    }

    #[test]
    fn a_thread_keeps_a_bounded_number_of_primitives() {
        let Some(blas) = crate::blas() else { return };
        if blas.amx_kernel().is_none() {
            return; // no primitives are built off AMX
        }
        for n in 1..=CACHE_LIMIT + 10 {
            // Compiled on the second sight of a shape.
            check(16, 32, n, false, true, 0);
            check(16, 32, n, false, true, 0);
            assert!(cached_on_this_thread() <= CACHE_LIMIT);
        }
        assert!(cached_on_this_thread() >= 10);
    }
}
