//! Matrix products on burn tensors that run on the BLAS when they can.
//!
//! [`matmul`] takes tensors of any backend. When the backend's float primitive is burn-flex's
//! CPU tensor, the dtype is f32, bf16 or f16, the batch dimensions match and a BLAS is loaded,
//! the product runs on the BLAS, its rows split over rayon's threads; otherwise it is the
//! backend's own `matmul`, unchanged. A weight stored narrower than its f32 input (a model
//! loaded with `--dtype bf16|f16`) on the CPU: a bf16 weight where the CPU has bf16 dot
//! products takes the input rounded to bf16 (PyTorch's bf16 linear); otherwise the weight is
//! widened to f32 one block of columns at a time (the exact f32 product of the stored weight).
//! On other backends the input is rounded to the weight's type. Either way the output is f32. Strided operands (a transposed weight, a
//! narrowed batch) are read in place through the BLAS's transpose flags and leading dimensions.

use std::any::{Any, TypeId};
use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use burn_flex::{Flex, FlexTensor};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::blas::{Blas, MatRef, blas};

/// `Autodiff<Flex>`'s float primitive (burn-autodiff does not name its type publicly).
pub(crate) type AutodiffTensor<B> = burn::tensor::ops::FloatTensor<burn::backend::Autodiff<B>>;

static ON_BLAS: AtomicU64 = AtomicU64::new(0);
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the BLAS path on or off for the whole process (benchmarks time both paths in one run;
/// `LOPPER_BLAS=off` is the user's switch). On by default.
pub fn set_blas_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

thread_local! {
    static PORTABLE_HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the BLAS path off on this thread (the products `f` starts here run on the
/// backend's own matmul): tests compare both paths this way without touching other threads.
pub fn portable<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            PORTABLE_HERE.with(|p| p.set(self.0));
        }
    }
    let _restore = Restore(PORTABLE_HERE.with(|p| p.replace(true)));
    f()
}

pub(crate) fn blas_enabled() -> bool {
    ENABLED.load(Ordering::Relaxed) && !PORTABLE_HERE.with(|p| p.get())
}

/// The path a fused kernel takes on backend `B`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fused {
    /// On burn-flex's tensors directly.
    Flex,
    /// Recorded on `Autodiff<Flex>` with its own backward.
    Autodiff,
}

/// The fused path of backend `B`: `None` on any other backend or with the fast paths off.
pub(crate) fn fused<B: Backend>() -> Option<Fused> {
    let primitive = TypeId::of::<B::FloatTensorPrimitive>();
    if !blas_enabled() {
        None
    } else if primitive == TypeId::of::<FlexTensor>() {
        Some(Fused::Flex)
    } else if primitive == TypeId::of::<AutodiffTensor<Flex>>() {
        Some(Fused::Autodiff)
    } else {
        None
    }
}

pub(crate) fn count_blas_product() {
    ON_BLAS.fetch_add(1, Ordering::Relaxed);
}

/// How many products this process has run on the BLAS (benchmarks and tests read it to show
/// which path ran).
pub fn products_on_blas() -> u64 {
    ON_BLAS.load(Ordering::Relaxed)
}

/// `x * weight + bias` of a burn `Linear` (weight `[in, out]`), through [`matmul`].
///
/// # Shapes
/// - `x`: `[n, in]` -> `[n, out]`
pub fn linear<B: Backend>(layer: &Linear<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    let y = matmul(x, layer.weight.val());
    match &layer.bias {
        Some(b) => y + b.val().unsqueeze_dim(0),
        None => y,
    }
}

/// `lhs.matmul(rhs)`, on the BLAS where it applies (see the module docs).
///
/// # Shapes
/// - `lhs`: `[..., m, k]`, `rhs`: `[..., k, n]` -> `[..., m, n]`
pub fn matmul<B: Backend, const D: usize>(lhs: Tensor<B, D>, rhs: Tensor<B, D>) -> Tensor<B, D> {
    if lhs.dtype() != rhs.dtype() {
        return mixed_matmul(lhs, rhs);
    }
    if TypeId::of::<B::FloatTensorPrimitive>() == TypeId::of::<AutodiffTensor<Flex>>() {
        return autodiff_matmul(lhs, rhs);
    }
    if TypeId::of::<B::FloatTensorPrimitive>() != TypeId::of::<FlexTensor>() {
        return lhs.matmul(rhs);
    }
    let blas = match blas() {
        Some(b) if blas_enabled() => b,
        _ => return lhs.matmul(rhs),
    };
    let (a, b) = match (into_flex(lhs), into_flex(rhs)) {
        (Ok(a), Ok(b)) => (a, b),
        (a, b) => return back::<B, D>(a).matmul(back::<B, D>(b)),
    };
    match flex_matmul(blas, &a, &b, a.dtype()) {
        Some(out) => from_flex(out),
        None => from_flex::<B, D>(a).matmul(from_flex(b)),
    }
}

/// A product whose right operand (a weight) is stored in a narrower type than the left one
/// (f32 activations). On the CPU with a BLAS: [`rounding_product`] where the CPU multiplies
/// bf16 natively (oneDNN on AVX512_BF16), else [`widening_product`] (oneMKL's own bf16 product
/// is slower than its f32 one on AMD CPUs and widens its whole operand per thread). Elsewhere:
/// the input is rounded to the weight's type and burn multiplies in it (what autocast does),
/// the output cast back.
fn mixed_matmul<B: Backend, const D: usize>(lhs: Tensor<B, D>, rhs: Tensor<B, D>) -> Tensor<B, D> {
    let (out, narrow) = (lhs.dtype(), rhs.dtype());
    let blas = blas().filter(|_| {
        blas_enabled()
            && D == 2
            && out == DType::F32
            && matches!(narrow, DType::BF16 | DType::F16)
            && TypeId::of::<B::FloatTensorPrimitive>() == TypeId::of::<FlexTensor>()
    });
    let (lhs, rhs) = match blas {
        None => (lhs, rhs),
        Some(blas) => match (into_flex(lhs), into_flex(rhs)) {
            (Ok(a), Ok(b)) => {
                match rounding_product(blas, &a, &b).or_else(|| widening_product(blas, &a, &b)) {
                    Some(product) => return from_flex(product),
                    None => (from_flex(a), from_flex(b)),
                }
            }
            (a, b) => (back(a), back(b)),
        },
    };
    matmul(lhs.cast(narrow), rhs).cast(out)
}

/// `a * b` for a 2-D f32 `a` and a 2-D bf16 `b` where the BLAS multiplies bf16 on the CPU's
/// bf16 dot-product instructions: `a` rounded to bf16 (as PyTorch's bf16 activations are), the
/// product accumulated in f32. `None` when it does not apply.
fn rounding_product(blas: &Blas, a: &FlexTensor, b: &FlexTensor) -> Option<FlexTensor> {
    let (ad, bd) = (a.layout().shape().to_vec(), b.layout().shape().to_vec());
    if !blas.native_bf16()
        || a.dtype() != DType::F32
        || b.dtype() != DType::BF16
        || ad.len() != 2
        || bd.len() != 2
        || ad[1] != bd[0]
    {
        return None;
    }
    let (m, k) = (ad[0], ad[1]);
    let (a, oa) = described(a)?;
    if oa.trans {
        return None;
    }
    let x = oa.mat(a.storage::<f32>(), 0);
    let mut rounded = vec![bf16::ZERO; m * k];
    rounded
        .par_chunks_mut(k.max(1) * 64)
        .enumerate()
        .for_each(|(i, out)| {
            for (r, row) in out.chunks_exact_mut(k.max(1)).enumerate() {
                let at = (i * 64 + r) * x.ld;
                crate::math::round_to_bf16(row, &x.data[at..at + k]);
            }
        });
    let a16 = FlexTensor::from_data(TensorData::new(rounded, [m, k]));
    flex_matmul(blas, &a16, b, DType::F32)
}

/// Bytes of f32 weight one task widens at a time.
const WIDEN_BLOCK_BYTES: usize = 4 << 20;

/// `a * b` for a 2-D f32 `a` and a 2-D bf16/f16 `b`: column blocks of `b` widened to f32 and
/// multiplied on the BLAS, blocks split over rayon's threads. `None` when it does not apply.
fn widening_product(blas: &Blas, a: &FlexTensor, b: &FlexTensor) -> Option<FlexTensor> {
    let (ad, bd) = (a.layout().shape().to_vec(), b.layout().shape().to_vec());
    if a.dtype() != DType::F32 || ad.len() != 2 || bd.len() != 2 || ad[1] != bd[0] {
        return None;
    }
    let (m, k, n) = (ad[0], ad[1], bd[1]);
    let (a, oa) = described(a)?;
    let (b, ob) = described(b)?;
    // Blocks small enough to stay in cache, and at least one per thread.
    let per_thread = n.div_ceil(rayon::current_num_threads().max(1));
    let nc = (WIDEN_BLOCK_BYTES / 4 / k.max(1))
        .min(per_thread)
        .max(16)
        .next_multiple_of(16);
    let blocks: Vec<usize> = (0..n).step_by(nc.max(1)).collect();
    let widen = |j0: usize, cols: usize| -> Vec<f32> {
        // half's slice conversions use the CPU's vector instructions.
        match b.dtype() {
            DType::BF16 => widen_block(ob.mat(b.storage::<bf16>(), 0), j0, cols, |s, d| {
                s.convert_to_f32_slice(d)
            }),
            _ => widen_block(ob.mat(b.storage::<f16>(), 0), j0, cols, |s, d| {
                s.convert_to_f32_slice(d)
            }),
        }
    };
    let parts: crate::Result<Vec<Vec<f32>>> = blocks
        .par_iter()
        .map(|&j0| {
            let cols = nc.min(n - j0);
            let w = widen(j0, cols);
            let wm = MatRef {
                data: &w,
                rows: k,
                cols,
                ld: if ob.trans { k } else { cols },
                trans: ob.trans,
            };
            let mut c = vec![0f32; m * cols];
            blas.sgemm(oa.mat(a.storage::<f32>(), 0), wm, &mut c, cols)?;
            Ok(c)
        })
        .collect();
    let parts = match parts {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("BLAS product refused ({e}); using the portable path");
            return None;
        }
    };
    count_blas_product();
    let mut out = vec![0f32; m * n];
    for (&j0, part) in blocks.iter().zip(&parts) {
        let cols = part.len() / m.max(1);
        for (r, row) in part.chunks_exact(cols.max(1)).enumerate() {
            out[r * n + j0..r * n + j0 + cols].copy_from_slice(row);
        }
    }
    Some(FlexTensor::from_data(TensorData::new(out, [m, n])))
}

/// Columns `j0..j0 + cols` of `b` as f32, stored as `b` stores them: `[k, cols]` row-major, or
/// `[cols, k]` (the block of a transposed operand) when `b.trans`.
fn widen_block<T: Copy>(
    b: MatRef<'_, T>,
    j0: usize,
    cols: usize,
    f: fn(&[T], &mut [f32]),
) -> Vec<f32> {
    let mut w = vec![0f32; b.rows * cols];
    if b.trans {
        for (j, out) in (j0..j0 + cols).zip(w.chunks_exact_mut(b.rows.max(1))) {
            f(&b.data[j * b.ld..j * b.ld + b.rows], out);
        }
    } else {
        for (r, out) in w.chunks_exact_mut(cols.max(1)).enumerate() {
            f(&b.data[r * b.ld + j0..r * b.ld + j0 + cols], out);
        }
    }
    w
}

/// The product on `Autodiff<Flex>`: forward and backward products on the BLAS (a recorded op
/// whose gradients are `grad * rhs^T` and `lhs^T * grad`), or burn's own autodiff matmul where
/// the BLAS does not apply.
fn autodiff_matmul<B: Backend, const D: usize>(
    lhs: Tensor<B, D>,
    rhs: Tensor<B, D>,
) -> Tensor<B, D> {
    let (ld, rd) = (lhs.dims(), rhs.dims());
    let applies = blas().is_some_and(|b| {
        blas_enabled()
            && ld[..D - 2] == rd[..D - 2]
            && ld[D - 1] == rd[D - 2]
            && lhs.dtype() == rhs.dtype()
            && blas_takes(b, lhs.dtype())
    });
    if !applies {
        return lhs.matmul(rhs);
    }
    let (a, b) = (
        downcast::<B, AutodiffTensor<Flex>, D>(lhs),
        downcast::<B, AutodiffTensor<Flex>, D>(rhs),
    );
    upcast::<B, D, _>(crate::autodiff::blas_matmul(a, b))
}

pub(crate) fn downcast<B: Backend, T: 'static, const D: usize>(t: Tensor<B, D>) -> T {
    match t.into_primitive() {
        TensorPrimitive::Float(p) => {
            let any: Box<dyn Any> = Box::new(p);
            *any.downcast::<T>()
                .expect("checked by the caller's TypeId test")
        }
        TensorPrimitive::QFloat(_) => unreachable!("quantized tensors are not AutodiffTensor"),
    }
}

pub(crate) fn upcast<B: Backend, const D: usize, T: 'static>(t: T) -> Tensor<B, D> {
    let any: Box<dyn Any> = Box::new(t);
    let p = any
        .downcast::<B::FloatTensorPrimitive>()
        .expect("called only when the backend's float primitive is T");
    Tensor::from_primitive(TensorPrimitive::Float(*p))
}

/// `a * b` of two Flex tensors with equal batch dimensions: on the BLAS where it applies, else
/// Flex's own product.
pub(crate) fn flex_product(a: FlexTensor, b: FlexTensor) -> FlexTensor {
    use burn::tensor::ops::FloatTensorOps;
    match blas().filter(|_| blas_enabled()) {
        Some(blas) => match flex_matmul(blas, &a, &b, a.dtype()) {
            Some(out) => out,
            None => Flex::float_matmul(a, b),
        },
        None => Flex::float_matmul(a, b),
    }
}

pub(crate) fn into_flex<B: Backend, const D: usize>(
    t: Tensor<B, D>,
) -> Result<FlexTensor, Tensor<B, D>> {
    match t.into_primitive() {
        TensorPrimitive::Float(p) => {
            let any: Box<dyn Any> = Box::new(p);
            any.downcast::<FlexTensor>().map(|b| *b).map_err(|any| {
                let p = any
                    .downcast::<B::FloatTensorPrimitive>()
                    .expect("the value boxed just above");
                Tensor::from_primitive(TensorPrimitive::Float(*p))
            })
        }
        q => Err(Tensor::from_primitive(q)),
    }
}

fn back<B: Backend, const D: usize>(t: Result<FlexTensor, Tensor<B, D>>) -> Tensor<B, D> {
    match t {
        Ok(f) => from_flex(f),
        Err(t) => t,
    }
}

pub(crate) fn from_flex<B: Backend, const D: usize>(t: FlexTensor) -> Tensor<B, D> {
    upcast(t)
}

/// How one operand's matrices sit in its storage.
#[derive(Debug)]
struct Operand {
    /// Offset of each batch matrix's first element.
    offsets: Vec<usize>,
    rows: usize,
    cols: usize,
    ld: usize,
    trans: bool,
}

impl Operand {
    /// `None` when the matrices are neither row- nor column-major with a positive leading
    /// dimension (the caller then makes the tensor contiguous).
    fn of(t: &FlexTensor) -> Option<Self> {
        let layout = t.layout();
        let dims = layout.shape().to_vec();
        let strides = layout.strides();
        let d = dims.len();
        if d < 2 || strides.iter().any(|&s| s < 0) {
            return None;
        }
        let (rows, cols) = (dims[d - 2], dims[d - 1]);
        let (sr, sc) = (strides[d - 2] as usize, strides[d - 1] as usize);
        let (ld, trans) = if (sc == 1 || cols == 1) && (sr >= cols.max(1) || rows == 1) {
            (if rows == 1 { cols.max(1) } else { sr }, false)
        } else if (sr == 1 || rows == 1) && (sc >= rows.max(1) || cols == 1) {
            (if cols == 1 { rows.max(1) } else { sc }, true)
        } else {
            return None;
        };
        let offsets = batch_offsets(&dims[..d - 2], &strides[..d - 2], layout.start_offset());
        Some(Self {
            offsets,
            rows,
            cols,
            ld,
            trans,
        })
    }

    fn mat<'a, T>(&self, data: &'a [T], batch: usize) -> MatRef<'a, T> {
        MatRef {
            data: &data[self.offsets[batch].min(data.len())..],
            rows: self.rows,
            cols: self.cols,
            ld: self.ld,
            trans: self.trans,
        }
    }
}

/// The tensor and how its matrices sit in storage; a copy made contiguous when the BLAS cannot
/// read its layout in place.
fn described(t: &FlexTensor) -> Option<(Cow<'_, FlexTensor>, Operand)> {
    match Operand::of(t) {
        Some(o) => Some((Cow::Borrowed(t), o)),
        None => {
            let c = t.to_contiguous();
            let o = Operand::of(&c)?;
            Some((Cow::Owned(c), o))
        }
    }
}

/// Row-major order of batch matrices: the first dimension varies slowest.
fn batch_offsets(dims: &[usize], strides: &[isize], start: usize) -> Vec<usize> {
    let mut offsets = vec![start];
    for (&n, &s) in dims.iter().zip(strides) {
        offsets = offsets
            .iter()
            .flat_map(|&o| (0..n).map(move |i| o + i * s as usize))
            .collect();
    }
    offsets
}

/// Whether the BLAS multiplies operands of `dtype` (accumulating in f32).
fn blas_takes(blas: &Blas, dtype: DType) -> bool {
    match dtype {
        DType::F32 => true,
        DType::BF16 => blas.has_bf16(),
        DType::F16 => blas.has_f16(),
        _ => false,
    }
}

/// The product on the BLAS, or `None` when it does not apply (dtype, broadcast batches). The
/// output is `out`: the operands' dtype, or f32 (the accumulator itself).
fn flex_matmul(blas: &Blas, a: &FlexTensor, b: &FlexTensor, out: DType) -> Option<FlexTensor> {
    let dtype = a.dtype();
    if dtype != b.dtype() || !blas_takes(blas, dtype) || !(out == dtype || out == DType::F32) {
        return None;
    }
    let (ad, bd) = (a.layout().shape().to_vec(), b.layout().shape().to_vec());
    let d = ad.len();
    if d < 2 || bd.len() != d || ad[..d - 2] != bd[..d - 2] || ad[d - 1] != bd[d - 2] {
        return None;
    }
    let (a, oa) = described(a)?;
    let (b, ob) = described(b)?;
    let (m, n) = (oa.rows, ob.cols);
    let batches = oa.offsets.len();
    // Filled whole by the products (each writes its block of rows, never reads it), so not
    // zeroed first: a fresh buffer of a few MiB per op, zeroed, was 5-9% of a forward pass.
    let len = batches * m * n;
    let mut acc: Vec<f32> = Vec::with_capacity(len);
    let spare = &mut acc.spare_capacity_mut()[..len];
    let ok = match dtype {
        DType::F32 => run_tasks(spare, batches, m, n, |bi, r0, rows, c| {
            let (x, y) = (
                oa.mat(a.storage::<f32>(), bi),
                ob.mat(b.storage::<f32>(), bi),
            );
            blas.sgemm(slice_rows(x, r0, rows), y, c, n)
        }),
        DType::BF16 => run_tasks(spare, batches, m, n, |bi, r0, rows, c| {
            let (x, y) = (
                oa.mat(a.storage::<bf16>(), bi),
                ob.mat(b.storage::<bf16>(), bi),
            );
            blas.gemm_bf16(slice_rows(x, r0, rows), y, c, n)
        }),
        _ => run_tasks(spare, batches, m, n, |bi, r0, rows, c| {
            let (x, y) = (
                oa.mat(a.storage::<f16>(), bi),
                ob.mat(b.storage::<f16>(), bi),
            );
            blas.gemm_f16(slice_rows(x, r0, rows), y, c, n)
        }),
    };
    if let Err(e) = ok {
        // Unreachable with operands described from their own layouts; fall back, loudly.
        tracing::warn!("BLAS product refused ({e}); using the portable path");
        return None;
    }
    // SAFETY: run_tasks returned Ok, so every task's product wrote its rows whole (ldc = n,
    // the blocks tile the buffer; an empty inner dimension is written as zeros), and all
    // `len` elements are initialised.
    #[allow(unsafe_code)]
    unsafe {
        acc.set_len(len)
    };
    count_blas_product();
    let mut shape = ad[..d - 2].to_vec();
    shape.extend([m, n]);
    let data = match out {
        DType::F32 => TensorData::new(acc, shape),
        DType::BF16 => {
            let mut narrow = vec![bf16::ZERO; acc.len()];
            crate::math::round_to_bf16(&mut narrow, &acc);
            TensorData::new(narrow, shape)
        }
        _ => TensorData::new(
            acc.into_iter().map(f16::from_f32).collect::<Vec<_>>(),
            shape,
        ),
    };
    Some(FlexTensor::from_data(data))
}

/// Rows `r0..r0 + rows` of a matrix operand.
fn slice_rows<T>(x: MatRef<'_, T>, r0: usize, rows: usize) -> MatRef<'_, T> {
    let skip = if x.trans { r0 } else { r0 * x.ld };
    MatRef {
        data: &x.data[skip.min(x.data.len())..],
        rows,
        ..x
    }
}

/// Runs `gemm(batch, first_row, rows, out_rows)` over blocks of output rows in parallel: every
/// batch matrix whole when there are enough of them to share evenly, else each split into one
/// block of rows per thread.
fn run_tasks<C, F>(out: &mut [C], batches: usize, m: usize, n: usize, gemm: F) -> crate::Result<()>
where
    C: crate::blas::Output + Send,
    F: Fn(usize, usize, usize, &mut [C]) -> crate::Result<()> + Sync,
{
    const MIN_ROWS: usize = 16;
    let threads = rayon::current_num_threads().max(1);
    let per_batch = if batches.is_multiple_of(threads) {
        1
    } else {
        threads.min(m / MIN_ROWS).max(1)
    };
    let rows_per = m.div_ceil(per_batch).max(1);
    let mut tasks = Vec::with_capacity(batches * per_batch);
    let mut rest = out;
    for bi in 0..batches {
        for r0 in (0..m).step_by(rows_per) {
            let rows = rows_per.min(m - r0);
            let (head, tail) = rest.split_at_mut(rows * n);
            tasks.push((bi, r0, rows, head));
            rest = tail;
        }
    }
    if tasks.len() == 1 {
        let (bi, r0, rows, c) = tasks.pop().expect("one task");
        return gemm(bi, r0, rows, c);
    }
    tasks
        .into_par_iter()
        .try_for_each(|(bi, r0, rows, c)| gemm(bi, r0, rows, c))
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Distribution, Tensor};
    use burn_flex::{Flex, FlexDevice};

    use super::*;

    type T<const D: usize> = Tensor<Flex, D>;

    fn rand<const D: usize>(shape: [usize; D]) -> T<D> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), &FlexDevice)
    }

    /// Largest |a - b| relative to the largest |b|.
    fn rel_err<const D: usize>(a: T<D>, b: T<D>) -> f32 {
        let scale = b.clone().abs().max().into_scalar().max(1e-6);
        (a - b).abs().max().into_scalar() / scale
    }

    fn check<const D: usize>(a: T<D>, b: T<D>, tol: f32) {
        let before = products_on_blas();
        let got = matmul(a.clone(), b.clone());
        let want = a.matmul(b);
        assert_eq!(got.dims(), want.dims());
        let e = rel_err(got, want);
        assert!(e <= tol, "relative error {e} > {tol}");
        assert!(
            products_on_blas() > before,
            "the product did not run on the BLAS"
        );
    }

    #[test]
    fn the_blas_is_installed() {
        // `cargo xtask setup` installs it; tests run after setup. LOPPER_BLAS=off opts out.
        if std::env::var_os(crate::blas::BLAS_VAR).is_none() {
            let b = crate::blas_status().expect("oneMKL installed by `cargo xtask setup`");
            assert!(b.version.contains("oneMKL"), "{}", b.version);
            if std::env::var_os(crate::dnnl::DNNL_VAR).is_none() {
                assert!(b.version.contains("oneDNN"), "{}", b.version);
            }
        }
    }

    #[test]
    fn equals_the_portable_product_on_odd_shapes() {
        if crate::blas().is_none() {
            return; // the_blas_is_installed fails instead
        }
        for (m, k, n) in [
            (1, 1, 1),
            (7, 13, 5),
            (130, 577, 33),
            (1, 576, 1536),
            (33, 1, 9),
        ] {
            check(rand([m, k]), rand([k, n]), 1e-5);
        }
        // Batched, with a transposed right operand (the attention scores' k^T).
        check(
            rand([2, 3, 17, 9]),
            rand([2, 3, 11, 9]).swap_dims(2, 3),
            1e-5,
        );
        // A transposed weight (the tied LM head) and a narrowed left operand.
        check(
            rand([40, 24]).narrow(0, 3, 31),
            rand([50, 24]).transpose(),
            1e-5,
        );
        // Narrowed batch rows and keys, as in the chunked attention.
        let q = rand([1, 2, 300, 8]).narrow(2, 256, 44);
        let k = rand([1, 2, 300, 8]).narrow(2, 0, 300);
        check(q, k.swap_dims(2, 3), 1e-5);
        // Many batches (whole matrices per task) and an odd batch count (rows split).
        check(rand([6, 20, 7]), rand([6, 7, 3]), 1e-5);
        check(rand([3, 70, 7]), rand([3, 7, 3]), 1e-5);
    }

    /// Values and gradients of `loss = sum(c * (a b))` through [`matmul`] on `Autodiff<Flex>`
    /// against burn's own autodiff product.
    fn check_autodiff<const D: usize>(a: T<D>, b: T<D>, grads_of: (bool, bool)) {
        use burn::backend::Autodiff;
        type A = Autodiff<Flex>;
        let lift = |t: T<D>, grad: bool| {
            let t = Tensor::<A, D>::from_inner(t);
            if grad { t.require_grad() } else { t }
        };
        let c = rand::<D>({
            let (ad, bd) = (a.dims(), b.dims());
            let mut d = ad;
            d[D - 1] = bd[D - 1];
            d
        });
        let run = |blas: bool| {
            let (x, y) = (lift(a.clone(), grads_of.0), lift(b.clone(), grads_of.1));
            let before = products_on_blas();
            let out = if blas {
                matmul(x.clone(), y.clone())
            } else {
                x.clone().matmul(y.clone())
            };
            let loss = (out.clone() * Tensor::<A, D>::from_inner(c.clone())).sum();
            let g = loss.backward();
            let on_blas = products_on_blas() - before;
            (out.inner(), x.grad(&g), y.grad(&g), on_blas)
        };
        let (want, wa, wb, _) = run(false);
        let (got, ga, gb, on_blas) = run(true);
        assert!(rel_err(got, want) < 1e-5);
        // The forward product and one backward product per tracked operand (at least: the
        // counter is the process's, and other tests run at the same time).
        assert!(on_blas > grads_of.0 as u64 + grads_of.1 as u64, "{on_blas}");
        for (g, w) in [(ga, wa), (gb, wb)] {
            match (g, w) {
                (Some(g), Some(w)) => assert!(rel_err(g, w) < 1e-5),
                (None, None) => {}
                _ => panic!("a gradient is missing on one path"),
            }
        }
    }

    #[test]
    fn autodiff_products_and_their_gradients_run_on_the_blas() {
        if crate::blas().is_none() {
            return;
        }
        check_autodiff(rand([37, 53]), rand([53, 29]), (true, true));
        check_autodiff(rand([8, 16]), rand([16, 5]), (false, true));
        check_autodiff(rand([8, 16]), rand([16, 5]), (true, false));
        // A transposed right operand and a batch.
        check_autodiff(rand([50, 24]), rand([30, 24]).transpose(), (true, true));
        check_autodiff(rand([2, 3, 17, 9]), rand([2, 3, 9, 11]), (true, true));
    }

    #[test]
    fn bf16_products_accumulate_in_f32() {
        if crate::blas().is_none() {
            return;
        }
        let (a, b) = (rand([64, 300]), rand([300, 40]));
        let want = a.clone().matmul(b.clone());
        let before = products_on_blas();
        let got = matmul(a.cast(DType::BF16), b.cast(DType::BF16)).cast(DType::F32);
        assert!(products_on_blas() > before);
        // bf16 inputs carry 8 bits of mantissa: about 2^-8 relative error per product term.
        let e = rel_err(got, want);
        assert!(e < 2e-2, "relative error {e}");
    }

    #[test]
    fn a_narrow_weight_multiplies_f32_inputs_into_f32() {
        let (a, w) = (rand([37, 300]), rand([300, 41]));
        let want = a.clone().matmul(w.clone());
        for narrow in [DType::BF16, DType::F16] {
            // Stored narrow, also as a transposed view (a tied LM head reads its embedding so).
            let wn = w.clone().cast(narrow);
            let wt = w.clone().transpose().cast(narrow).transpose();
            for w in [wn.clone(), wt] {
                let before = products_on_blas();
                let got = matmul(a.clone(), w);
                if crate::blas().is_some() {
                    assert!(products_on_blas() > before, "{narrow:?}: on the BLAS");
                }
                assert_eq!(got.dtype(), DType::F32);
                let e = rel_err(got.clone(), want.clone());
                assert!(e < 2e-2, "{narrow:?}: relative error {e}");
                // The same rounding on both paths: the BLAS (where it has the type) and burn's.
                let portable = portable(|| matmul(a.clone(), wn.clone()));
                assert_eq!(portable.dtype(), DType::F32);
                assert!(rel_err(got, portable) < 5e-3, "{narrow:?}");
            }
        }
    }

    #[test]
    fn broadcast_batches_use_the_portable_path() {
        let (a, b) = (rand([2, 5, 4]), rand([1, 4, 3]));
        let got = matmul(a.clone(), b.clone());
        assert!(rel_err(got, a.matmul(b)) < 1e-6);
    }

    /// A resumed run repeats the products of the uninterrupted one bit for bit only if a
    /// product's result does not depend on where its operands sit in memory.
    #[test]
    fn products_do_not_depend_on_the_operands_alignment() {
        let Some(blas) = crate::blas() else { return };
        let (m, k, n) = (67, 577, 129);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        use rand::{Rng, SeedableRng};
        let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let product = |shift: usize| -> (Vec<f32>, Vec<f32>) {
            // The same matrices, starting `shift` elements into fresh buffers.
            let mut ab = vec![0f32; shift + m * k];
            ab[shift..].copy_from_slice(&a);
            let mut bb = vec![0f32; shift + k * n];
            bb[shift..].copy_from_slice(&b);
            let (a16, b16): (Vec<bf16>, Vec<bf16>) = (
                ab.iter().map(|&v| bf16::from_f32(v)).collect(),
                bb.iter().map(|&v| bf16::from_f32(v)).collect(),
            );
            let mat = |rows, cols| (rows, cols, cols);
            let (ra, ca, la) = mat(m, k);
            let (rb, cb, lb) = mat(k, n);
            let mut c = vec![0f32; m * n];
            blas.sgemm(
                MatRef {
                    data: &ab[shift..],
                    rows: ra,
                    cols: ca,
                    ld: la,
                    trans: false,
                },
                MatRef {
                    data: &bb[shift..],
                    rows: rb,
                    cols: cb,
                    ld: lb,
                    trans: false,
                },
                &mut c,
                n,
            )
            .unwrap();
            let mut c16 = vec![0f32; m * n];
            if blas.has_bf16() {
                blas.gemm_bf16(
                    MatRef {
                        data: &a16[shift..],
                        rows: ra,
                        cols: ca,
                        ld: la,
                        trans: false,
                    },
                    MatRef {
                        data: &b16[shift..],
                        rows: rb,
                        cols: cb,
                        ld: lb,
                        trans: false,
                    },
                    &mut c16,
                    n,
                )
                .unwrap();
            }
            (c, c16)
        };
        let first = product(0);
        for shift in 1..17 {
            assert!(
                product(shift) == first,
                "the product moved with a shift of {shift} elements"
            );
        }
    }

    #[test]
    fn an_empty_inner_dimension_writes_zeros_into_a_fresh_buffer() {
        use std::mem::MaybeUninit;
        let Some(blas) = crate::blas() else { return };
        fn mat<T>(data: &[T], rows: usize, cols: usize, ld: usize) -> MatRef<'_, T> {
            MatRef::new(data, rows, cols, ld, false)
        }
        let (a, b) = ([0f32; 0], [0f32; 0]);
        let mut c = [MaybeUninit::new(f32::NAN); 12];
        blas.sgemm(mat(&a, 3, 0, 1), mat(&b, 0, 4, 4), &mut c, 4)
            .unwrap();
        // SAFETY: every element was initialised above (NaN, then zero).
        #[allow(unsafe_code)]
        let c = c.map(|v| unsafe { v.assume_init() });
        assert_eq!(c, [0.0; 12]);
        let (a, b) = ([bf16::ZERO; 0], [bf16::ZERO; 0]);
        let mut c = [f32::NAN; 6];
        if blas.has_bf16() {
            blas.gemm_bf16(mat(&a, 2, 0, 1), mat(&b, 0, 3, 3), &mut c, 3)
                .unwrap();
            assert_eq!(c, [0.0; 6]);
        }
    }

    #[test]
    fn operands_that_overrun_their_storage_are_refused() {
        let Some(blas) = crate::blas() else { return };
        let a = [1f32; 6];
        let b = [1f32; 6];
        let mut c = [0f32; 4];
        let mat = |data, rows, cols, ld| MatRef {
            data,
            rows,
            cols,
            ld,
            trans: false,
        };
        assert!(
            blas.sgemm(mat(&a, 2, 3, 3), mat(&b, 3, 2, 2), &mut c, 2)
                .is_ok()
        );
        assert_eq!(c, [3.0; 4]);
        let err = blas
            .sgemm(mat(&a, 2, 4, 4), mat(&b, 4, 2, 2), &mut c, 2)
            .unwrap_err();
        assert!(err.to_string().contains("needs"), "{err}");
        let err = blas
            .sgemm(mat(&a, 2, 3, 3), mat(&b, 2, 3, 3), &mut c, 2)
            .unwrap_err();
        assert!(err.to_string().contains("inner dimensions"), "{err}");
        let err = blas
            .sgemm(mat(&a, 2, 3, 3), mat(&b, 3, 2, 2), &mut c[..3], 2)
            .unwrap_err();
        assert!(err.to_string().contains("output"), "{err}");
    }
}
