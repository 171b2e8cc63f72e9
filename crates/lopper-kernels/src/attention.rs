//! Causal grouped-query attention with RoPE, straight from the projections' 2-D outputs.
//!
//! The portable path in `lopper-model` rotates q and k with position tables, reshapes them to
//! `[batch, heads, seq, head_dim]`, repeats every KV head over its query group, and runs the
//! backend's attention: four full copies of the activations before the first product. Here each
//! task (one batch row, one KV head, one block of query rows) reads the rows of q of every query
//! head of the group and its rows of k and v in place (nothing repeated), rotates them into
//! small buffers (the query heads stacked, so that every product runs on all of them at once),
//! and computes only the causal part of the score matrix on the BLAS: query rows `r0..r1` attend to
//! keys `0..r1`, in blocks of 256 keys with an online softmax (f32, each row shifted by its
//! running maximum, the output rescaled when the maximum grows, divided by the row's sum at the
//! end: flash attention's scheme) and a vectorisable `exp`. The backward recomputes the
//! probabilities with the two-pass softmax, row by row.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use half::bf16;

use crate::blas::{Blas, MatRef, blas};
use crate::math::{add_in_place, exp, max_of, round_to_bf16, sum_of_products};
use crate::matmul::{Fused, from_flex, fused, into_flex};

/// Query rows per block of the backward.
const ROWS: usize = 256;
/// Rows of the forward's products: a task stacks the same query rows of every query head of a
/// KV group. With SmolLM2's three heads per group, 3 x 64 rows ran as fast as 3 x 128 and
/// faster than 3 x 256 at 1 x 2048 (bf16, AMX).
const STACKED_ROWS: usize = 256;

/// Query rows per forward task for `rep` query heads per KV head: about [`STACKED_ROWS`] rows
/// stacked, a multiple of 32.
fn query_rows(rep: usize) -> usize {
    (STACKED_ROWS / rep.max(1) / 32 * 32).max(32)
}

/// Keys per block of scores: a task's score block is about `STACKED_ROWS x KEYS` (256 KiB in
/// f32), and oneDNN's AMX kernels take the scores product (inner dimension `head_dim`) only up
/// to a few hundred columns.
const KEYS: usize = 256;

thread_local! {
    /// One block of scores, about `[STACKED_ROWS, KEYS]`, reused per thread: a fresh block per
    /// task would be a fresh allocation, zeroed by the allocator or page by page by the kernel.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The block's probabilities rounded to bf16, as the second product reads them.
    static PROBS: std::cell::RefCell<Vec<bf16>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The batch geometry and head layout of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Rows of the batch.
    pub batch: usize,
    /// Tokens per row.
    pub seq: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (`heads` is a multiple of it).
    pub kv_heads: usize,
    /// Dimension of every head.
    pub head_dim: usize,
    /// The type the two products multiply in: `F32`, or `BF16` (a model stored in bf16: q, k,
    /// v and the probabilities rounded, as PyTorch's bf16 attention holds them, accumulated in
    /// f32) where the CPU has bf16 dot products; f32 otherwise. Scores and softmax stay f32.
    pub products: DType,
}

/// RoPE tables for positions `0..seq`, `[seq * head_dim]` each, in the rotate-half convention
/// with the sign folded into `sin`: the rotation of `x` is
/// `x[i] * cos[i] + x[partner(i)] * sin[i]`, where `partner` swaps the two halves.
#[derive(Debug, Clone, Copy)]
pub struct RopeTables<'a> {
    /// cos of every position and dimension.
    pub cos: &'a [f32],
    /// sin, negated on the first half.
    pub sin: &'a [f32],
}

/// Causal softmax attention of RoPE-rotated `q` and `k` over `v`, scale `1 / sqrt(head_dim)`,
/// query head `h` reading KV head `h / (heads / kv_heads)`, on the BLAS. On `Autodiff<Flex>`
/// it is one recorded op whose backward ([`attention_grads`]) runs on the BLAS too. Hands the
/// operands back (`Err`) where the fast path does not apply: another backend, a dtype other
/// than f32, no BLAS, or tables and shapes that disagree. The caller then runs its portable
/// path.
///
/// # Shapes
/// - `q`: `[batch * seq, heads * head_dim]`, `k`, `v`: `[batch * seq, kv_heads * head_dim]`
/// - output: `[batch * seq, heads * head_dim]`, row `b * seq + t`, head `h` in columns
///   `h * head_dim..`
#[allow(clippy::type_complexity)]
pub fn causal_attention<B: Backend>(
    q: Tensor<B, 2>,
    k: Tensor<B, 2>,
    v: Tensor<B, 2>,
    shape: AttentionShape,
    rope: RopeTables<'_>,
) -> Result<Tensor<B, 2>, (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>)> {
    let AttentionShape {
        batch,
        seq,
        heads,
        kv_heads,
        head_dim: hd,
        ..
    } = shape;
    let fits = q.dtype() == DType::F32
        && k.dtype() == DType::F32
        && v.dtype() == DType::F32
        && kv_heads > 0
        && heads.is_multiple_of(kv_heads)
        && hd > 0
        && hd.is_multiple_of(2)
        && q.dims() == [batch * seq, heads * hd]
        && k.dims() == [batch * seq, kv_heads * hd]
        && v.dims() == k.dims()
        && rope.cos.len() >= seq * hd
        && rope.sin.len() >= seq * hd;
    let (Some(path), Some(blas)) = (fused::<B>().filter(|_| fits), blas()) else {
        return Err((q, k, v));
    };
    if path == Fused::Autodiff {
        // Recorded on the autodiff graph with its own backward (f32 products).
        let shape = AttentionShape {
            products: DType::F32,
            ..shape
        };
        return Ok(crate::autodiff::attention(q, k, v, shape, rope));
    }
    let flex = |t: Tensor<B, 2>| into_flex(t).map(|f| f.to_contiguous());
    let (q, k, v) = match (flex(q), flex(k), flex(v)) {
        (Ok(q), Ok(k), Ok(v)) => (q, k, v),
        _ => unreachable!("the float primitive is FlexTensor (checked above)"),
    };
    Ok(from_flex(attention_flex(blas, &q, &k, &v, shape, rope)))
}

/// [`causal_attention`] of contiguous f32 Flex tensors, on `blas`.
pub(crate) fn attention_flex(
    blas: &Blas,
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    shape: AttentionShape,
    rope: RopeTables<'_>,
) -> FlexTensor {
    let AttentionShape {
        batch,
        seq,
        heads,
        head_dim: hd,
        ..
    } = shape;
    let (qs, ks, vs) = (q.storage::<f32>(), k.storage::<f32>(), v.storage::<f32>());
    let qw = heads * hd;
    let (kv_heads, rep) = (shape.kv_heads, heads / shape.kv_heads);
    let q_rows = query_rows(rep);
    let tasks: Vec<(usize, usize, usize)> = (0..batch)
        .flat_map(|b| {
            (0..kv_heads).flat_map(move |g| (0..seq).step_by(q_rows).map(move |r0| (b, g, r0)))
        })
        .collect();
    let inputs = Inputs {
        q: qs,
        k: ks,
        v: vs,
        shape,
        rope,
    };
    let blocks = if shape.products == DType::BF16 && blas.native_bf16() {
        attend::<bf16>(blas, &inputs, q_rows, &tasks)
    } else {
        attend::<f32>(blas, &inputs, q_rows, &tasks)
    };
    let mut out = vec![0f32; batch * seq * qw];
    for (&(b, g, r0), block) in tasks.iter().zip(blocks) {
        let block = match block {
            Ok(b) => b,
            Err(e) => unreachable!("operands described from their own buffers: {e}"),
        };
        let rows = q_rows.min(seq - r0);
        for (i, src) in block.chunks_exact(hd).enumerate() {
            let (h, row) = (g * rep + i / rows, b * seq + r0 + i % rows);
            out[row * qw + h * hd..][..hd].copy_from_slice(src);
        }
    }
    crate::matmul::count_blas_product();
    FlexTensor::from_data(TensorData::new(out, [batch * seq, qw]))
}

/// The projections' outputs and the geometry of one attention call.
pub(crate) struct Inputs<'a> {
    pub(crate) q: &'a [f32],
    pub(crate) k: &'a [f32],
    pub(crate) v: &'a [f32],
    pub(crate) shape: AttentionShape,
    pub(crate) rope: RopeTables<'a>,
}

/// The element the two products multiply: f32, or bf16 (rounded inputs, f32 accumulation).
trait Element: Copy + Default + Send + Sync + 'static {
    /// `dst = src`, rounded to this type.
    fn round(dst: &mut [Self], src: &[f32]);
    /// `c = a * b`, accumulated and stored in f32.
    fn gemm(
        blas: &Blas,
        a: MatRef<'_, Self>,
        b: MatRef<'_, Self>,
        c: &mut [f32],
        ldc: usize,
    ) -> crate::Result<()>;
    /// A block of probabilities as a product operand: `p` itself in f32, a rounded copy
    /// otherwise (in a buffer reused per thread), passed to `then`.
    fn operand<R>(p: &[f32], then: impl FnOnce(&[Self]) -> R) -> R;
}

impl Element for f32 {
    fn round(dst: &mut [f32], src: &[f32]) {
        dst.copy_from_slice(src);
    }
    fn gemm(
        blas: &Blas,
        a: MatRef<'_, f32>,
        b: MatRef<'_, f32>,
        c: &mut [f32],
        ldc: usize,
    ) -> crate::Result<()> {
        blas.sgemm(a, b, c, ldc)
    }
    fn operand<R>(p: &[f32], then: impl FnOnce(&[f32]) -> R) -> R {
        then(p)
    }
}

impl Element for bf16 {
    fn round(dst: &mut [bf16], src: &[f32]) {
        round_to_bf16(dst, src);
    }
    fn gemm(
        blas: &Blas,
        a: MatRef<'_, bf16>,
        b: MatRef<'_, bf16>,
        c: &mut [f32],
        ldc: usize,
    ) -> crate::Result<()> {
        blas.gemm_bf16(a, b, c, ldc)
    }
    fn operand<R>(p: &[f32], then: impl FnOnce(&[bf16]) -> R) -> R {
        PROBS.with_borrow_mut(|probs| {
            if probs.len() < p.len() {
                probs.resize(p.len(), bf16::ZERO);
            }
            let probs = &mut probs[..p.len()];
            round_to_bf16(probs, p);
            then(probs)
        })
    }
}

/// One output block per task `(batch row, KV head, first query row)`, `q_rows` query rows per
/// task (the last block shorter): the rows `r0..r1` of every query head of the group, stacked
/// head after head (`[rep * rows, hd]`), so that each product reads the group's keys and values
/// once for all its query heads and runs on `rep` times as many rows.
fn attend<T: Element>(
    blas: &Blas,
    x: &Inputs<'_>,
    q_rows: usize,
    tasks: &[(usize, usize, usize)],
) -> Vec<crate::Result<Vec<f32>>> {
    let AttentionShape {
        batch,
        seq,
        heads,
        kv_heads,
        head_dim: hd,
        ..
    } = x.shape;
    let (qw, kw) = (heads * hd, kv_heads * hd);
    let rep = heads / kv_heads;
    let scale = (hd as f32).sqrt().recip();
    // Keys rotated and values copied once per (batch row, KV head), `[batch, kv_heads, seq,
    // hd]` in the products' type: every block of query rows of the group reads them.
    let mut keys = vec![T::default(); batch * kv_heads * seq * hd];
    let mut values = vec![T::default(); batch * kv_heads * seq * hd];
    keys.par_chunks_mut((seq * hd).max(1))
        .zip(values.par_chunks_mut((seq * hd).max(1)))
        .enumerate()
        .for_each(|(i, (kd, vd))| {
            let (b, g) = (i / kv_heads, i % kv_heads);
            let mut rotated = vec![0f32; seq * hd];
            rotate_into(&mut rotated, x.k, kw, g * hd, b * seq, 0, hd, x.rope);
            T::round(kd, &rotated);
            for (t, dst) in vd.chunks_exact_mut(hd).enumerate() {
                T::round(dst, &x.v[(b * seq + t) * kw + g * hd..][..hd]);
            }
        });
    tasks
        .par_iter()
        .map(|&(b, g, r0)| {
            let r1 = (r0 + q_rows).min(seq);
            let rows = r1 - r0;
            let stacked = rep * rows;
            let mut qr = vec![0f32; stacked * hd];
            for (hi, dst) in qr.chunks_exact_mut(rows * hd).enumerate() {
                let h = g * rep + hi;
                rotate_into(dst, x.q, qw, h * hd, b * seq + r0, r0, hd, x.rope);
            }
            // 1/sqrt(hd) folded into q (exact for a power-of-two head dimension).
            qr.iter_mut().for_each(|v| *v *= scale);
            let mut q = vec![T::default(); stacked * hd];
            T::round(&mut q, &qr);
            let at = (b * kv_heads + g) * seq * hd;
            let mat = |data, rows, cols, trans| MatRef {
                data,
                rows,
                cols,
                ld: hd,
                trans,
            };
            // Online softmax over blocks of keys (see the module docs).
            let mut out = vec![0f32; stacked * hd];
            let mut part = vec![0f32; stacked * hd];
            let (mut maxes, mut sums) = (vec![f32::NEG_INFINITY; stacked], vec![0f32; stacked]);
            SCORES.with_borrow_mut(|scores| {
                scores.resize(stacked * KEYS, 0.0);
                for j0 in (0..r1).step_by(KEYS) {
                    let cols = KEYS.min(r1 - j0);
                    let scores = &mut scores[..stacked * cols];
                    T::gemm(
                        blas,
                        mat(&q, stacked, hd, false),
                        mat(&keys[at + j0 * hd..at + (j0 + cols) * hd], hd, cols, true),
                        scores,
                        cols,
                    )?;
                    for (i, row) in scores.chunks_exact_mut(cols).enumerate() {
                        // Keys j0.. that query r0 + i % rows sees (at least one in the first
                        // block).
                        let valid = (r0 + i % rows + 1).saturating_sub(j0).min(cols);
                        let (seen, future) = row.split_at_mut(valid);
                        future.fill(0.0);
                        if valid == 0 {
                            continue;
                        }
                        let max = maxes[i].max(max_of(seen));
                        let sum = exp_shifted(seen, max);
                        if maxes[i] != max {
                            let alpha = exp(maxes[i] - max);
                            sums[i] *= alpha;
                            out[i * hd..(i + 1) * hd]
                                .iter_mut()
                                .for_each(|o| *o *= alpha);
                            maxes[i] = max;
                        }
                        sums[i] += sum;
                    }
                    T::operand(scores, |p| {
                        T::gemm(
                            blas,
                            MatRef {
                                data: p,
                                rows: stacked,
                                cols,
                                ld: cols,
                                trans: false,
                            },
                            mat(
                                &values[at + j0 * hd..at + (j0 + cols) * hd],
                                cols,
                                hd,
                                false,
                            ),
                            &mut part,
                            hd,
                        )
                    })?;
                    add_in_place(&mut out, &part);
                }
                for (o, sum) in out.chunks_exact_mut(hd).zip(&sums) {
                    let inv = sum.recip();
                    o.iter_mut().for_each(|v| *v *= inv);
                }
                Ok(out)
            })
        })
        .collect()
}

/// Rows `row0..row0 + rows` of the head at column `col` of a `[_, width]` buffer, rotated for
/// positions `pos0..`, into a contiguous `[rows, hd]` buffer.
#[allow(clippy::too_many_arguments)]
fn rotate_into(
    dst: &mut [f32],
    src: &[f32],
    width: usize,
    col: usize,
    row0: usize,
    pos0: usize,
    hd: usize,
    rope: RopeTables<'_>,
) {
    let rows = dst.len() / hd;
    let p = pos0 * hd;
    rope_rows(
        dst,
        &src[row0 * width + col..],
        width,
        &rope.cos[p..p + rows * hd],
        &rope.sin[p..p + rows * hd],
        hd,
    );
}

crate::math::multiversioned! {
    /// RoPE (the rotate-half layout): row `i` of `dst` (`[rows, hd]`) is row `i` of `src` (rows
    /// `width` apart) rotated by row `i` of the tables (`[rows, hd]`).
    fn rope_rows(dst: &mut [f32], src: &[f32], width: usize, cos: &[f32], sin: &[f32], hd: usize) {
        let half = hd / 2;
        for (i, d) in dst.chunks_exact_mut(hd).enumerate() {
            let x = &src[i * width..][..hd];
            let (c, s) = (&cos[i * hd..][..hd], &sin[i * hd..][..hd]);
            let (x1, x2) = x.split_at(half);
            let (d1, d2) = d.split_at_mut(half);
            for j in 0..half {
                d1[j] = x1[j] * c[j] + x2[j] * s[j];
                d2[j] = x2[j] * c[half + j] + x1[j] * s[half + j];
            }
        }
    }
}

/// The gradients of [`causal_attention`] with respect to its unrotated `q`, `k` and `v`, given
/// the gradient `dout` of its output, in f32. The probabilities are recomputed block by block
/// (as the forward computes them) rather than kept: per block of query rows `r0..r1`,
/// `dV += P^T dO`, `dP = dO V^T`, `dS = P (dP - rowsum(P dP))`, `dQ = dS K / sqrt(hd)` and
/// `dK += dS^T Q / sqrt(hd)` in the rotated space, then rotated back (the transpose of RoPE).
/// One task per (batch row, KV head): its query heads' contributions to the group's `dK` and
/// `dV` add up inside the task, so no two tasks write the same rows.
///
/// # Shapes
/// - `q`, `dout`: `[batch * seq, heads * head_dim]`, `k`, `v`: `[batch * seq, kv_heads * head_dim]`
/// - output: `(dq, dk, dv)` in the shapes of `q`, `k`, `v`
#[allow(clippy::type_complexity)]
pub(crate) fn attention_grads(
    blas: &Blas,
    x: &Inputs<'_>,
    dout: &[f32],
) -> crate::Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let AttentionShape {
        batch,
        seq,
        heads,
        kv_heads,
        head_dim: hd,
        ..
    } = x.shape;
    let (qw, kw) = (heads * hd, kv_heads * hd);
    let rep = heads / kv_heads;
    let scale = (hd as f32).sqrt().recip();
    let tasks: Vec<(usize, usize)> = (0..batch)
        .flat_map(|b| (0..kv_heads).map(move |g| (b, g)))
        .collect();
    let parts: Vec<crate::Result<[Vec<f32>; 3]>> = tasks
        .par_iter()
        .map(|&(b, g)| {
            let mut keys = vec![0f32; seq * hd];
            rotate_into(&mut keys, x.k, kw, g * hd, b * seq, 0, hd, x.rope);
            let mut values = vec![0f32; seq * hd];
            for (t, dst) in values.chunks_exact_mut(hd).enumerate() {
                dst.copy_from_slice(&x.v[(b * seq + t) * kw + g * hd..][..hd]);
            }
            let (mut dk_rot, mut dv) = (vec![0f32; seq * hd], vec![0f32; seq * hd]);
            // The group's query heads' gradients, `[rep, seq, hd]`, rotated back.
            let mut dq = vec![0f32; rep * seq * hd];
            let mut part = Vec::new();
            for hi in 0..rep {
                let h = g * rep + hi;
                for r0 in (0..seq).step_by(ROWS) {
                    let r1 = (r0 + ROWS).min(seq);
                    let rows = r1 - r0;
                    let mut q = vec![0f32; rows * hd];
                    rotate_into(&mut q, x.q, qw, h * hd, b * seq + r0, r0, hd, x.rope);
                    q.iter_mut().for_each(|v| *v *= scale);
                    let mut d_o = vec![0f32; rows * hd];
                    for (i, dst) in d_o.chunks_exact_mut(hd).enumerate() {
                        dst.copy_from_slice(&dout[(b * seq + r0 + i) * qw + h * hd..][..hd]);
                    }
                    let (keys, values) = (&keys[..r1 * hd], &values[..r1 * hd]);
                    let mut p = vec![0f32; rows * r1];
                    blas.sgemm(
                        MatRef::new(&q, rows, hd, hd, false),
                        MatRef::new(keys, hd, r1, hd, true),
                        &mut p,
                        r1,
                    )?;
                    for (i, row) in p.chunks_exact_mut(r1).enumerate() {
                        causal_softmax(row, r0 + i + 1);
                    }
                    part.resize(r1 * hd, 0.0);
                    blas.sgemm(
                        MatRef::new(&p, r1, rows, r1, true),
                        MatRef::new(&d_o, rows, hd, hd, false),
                        &mut part,
                        hd,
                    )?;
                    add_in_place(&mut dv[..r1 * hd], &part);
                    let mut ds = vec![0f32; rows * r1];
                    blas.sgemm(
                        MatRef::new(&d_o, rows, hd, hd, false),
                        MatRef::new(values, hd, r1, hd, true),
                        &mut ds,
                        r1,
                    )?;
                    for (dsr, pr) in ds.chunks_exact_mut(r1).zip(p.chunks_exact(r1)) {
                        softmax_grad_in_place(dsr, pr);
                    }
                    let mut dq_rot = vec![0f32; rows * hd];
                    blas.sgemm_scaled(
                        scale,
                        MatRef::new(&ds, rows, r1, r1, false),
                        MatRef::new(keys, r1, hd, hd, false),
                        &mut dq_rot,
                        hd,
                    )?;
                    let p0 = r0 * hd;
                    unrope_rows(
                        &mut dq[(hi * seq + r0) * hd..][..rows * hd],
                        &dq_rot,
                        &x.rope.cos[p0..p0 + rows * hd],
                        &x.rope.sin[p0..p0 + rows * hd],
                        hd,
                    );
                    blas.sgemm(
                        MatRef::new(&ds, r1, rows, r1, true),
                        MatRef::new(&q, rows, hd, hd, false),
                        &mut part,
                        hd,
                    )?;
                    add_in_place(&mut dk_rot[..r1 * hd], &part);
                }
            }
            let mut dk = vec![0f32; seq * hd];
            unrope_rows(
                &mut dk,
                &dk_rot,
                &x.rope.cos[..seq * hd],
                &x.rope.sin[..seq * hd],
                hd,
            );
            Ok([dq, dk, dv])
        })
        .collect();
    let (mut dq, mut dk, mut dv) = (
        vec![0f32; batch * seq * qw],
        vec![0f32; batch * seq * kw],
        vec![0f32; batch * seq * kw],
    );
    for (&(b, g), part) in tasks.iter().zip(parts) {
        let [gq, gk, gv] = part?;
        for (hi, head) in gq.chunks_exact(seq * hd).enumerate() {
            let h = g * rep + hi;
            for (t, src) in head.chunks_exact(hd).enumerate() {
                dq[(b * seq + t) * qw + h * hd..][..hd].copy_from_slice(src);
            }
        }
        for t in 0..seq {
            let at = (b * seq + t) * kw + g * hd;
            dk[at..at + hd].copy_from_slice(&gk[t * hd..][..hd]);
            dv[at..at + hd].copy_from_slice(&gv[t * hd..][..hd]);
        }
    }
    Ok((dq, dk, dv))
}

crate::math::multiversioned! {
    /// The transpose of [`rope_rows`]: `dst` (`[rows, hd]`) is the gradient with respect to the
    /// unrotated rows given `src`, the gradient with respect to the rotated ones.
    fn unrope_rows(dst: &mut [f32], src: &[f32], cos: &[f32], sin: &[f32], hd: usize) {
        let half = hd / 2;
        for (i, d) in dst.chunks_exact_mut(hd).enumerate() {
            let (g1, g2) = src[i * hd..][..hd].split_at(half);
            let (c, s) = (&cos[i * hd..][..hd], &sin[i * hd..][..hd]);
            let (d1, d2) = d.split_at_mut(half);
            for j in 0..half {
                d1[j] = g1[j] * c[j] + g2[j] * s[half + j];
                d2[j] = g1[j] * s[j] + g2[j] * c[half + j];
            }
        }
    }
}

crate::math::multiversioned! {
    /// The softmax's backward for one row: `dp` (the gradient with respect to the
    /// probabilities `p`) becomes `p * (dp - sum(p * dp))`, the gradient with respect to the
    /// scores (zero where `p` is, the future keys included).
    fn softmax_grad_in_place(dp: &mut [f32], p: &[f32]) {
        let dot = sum_of_products(dp, p);
        for (x, &y) in dp.iter_mut().zip(p) {
            *x = y * (*x - dot);
        }
    }
}

/// Softmax over the first `valid` entries of `row` (the keys a query may see); zeros after.
fn causal_softmax(row: &mut [f32], valid: usize) {
    let (seen, future) = row.split_at_mut(valid);
    future.fill(0.0);
    softmax_in_place(seen);
}

crate::math::multiversioned! {
    /// Softmax of `x` in place.
    fn softmax_in_place(seen: &mut [f32]) {
        let inv = exp_in_place(seen);
        for x in seen.iter_mut() {
            *x *= inv;
        }
    }
}

/// `x = e^(x - max x)` in place; returns `1 / sum` (the softmax's normaliser).
fn exp_in_place(seen: &mut [f32]) -> f32 {
    exp_shifted(seen, max_of(seen)).recip()
}

crate::math::multiversioned! {
    /// `x = e^(x - max)` in place; returns the sum, taken on eight lanes, so that every loop
    /// vectorises and the result is the same at any vector width.
    fn exp_shifted(seen: &mut [f32], max: f32) -> f32 {
        const L: usize = 8;
        for x in seen.iter_mut() {
            *x = exp(*x - max);
        }
        let mut sums = [0f32; L];
        let mut chunks = seen.chunks_exact(L);
        for c in &mut chunks {
            for (s, &x) in sums.iter_mut().zip(c) {
                *s += x;
            }
        }
        sums.iter().chain(chunks.remainder()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_softmax_sees_only_the_past() {
        let mut row = [1.0, 2.0, 3.0, 50.0];
        causal_softmax(&mut row, 2);
        let e = (1f32).exp();
        assert!((row[0] - 1.0 / (1.0 + e)).abs() < 1e-6);
        assert!((row[1] - e / (1.0 + e)).abs() < 1e-6);
        assert_eq!(&row[2..], &[0.0, 0.0]);
    }

    /// The attention written out in f64 loops, from the same tables.
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        s: AttentionShape,
        rope: RopeTables<'_>,
    ) -> Vec<f32> {
        let (hd, half) = (s.head_dim, s.head_dim / 2);
        let (qw, kw) = (s.heads * hd, s.kv_heads * hd);
        let rot = |x: &[f32], t: usize| -> Vec<f64> {
            (0..hd)
                .map(|i| {
                    let p = if i < half { i + half } else { i - half };
                    x[i] as f64 * rope.cos[t * hd + i] as f64
                        + x[p] as f64 * rope.sin[t * hd + i] as f64
                })
                .collect()
        };
        let mut out = vec![0f32; s.batch * s.seq * qw];
        for b in 0..s.batch {
            for h in 0..s.heads {
                let g = h / (s.heads / s.kv_heads);
                for t in 0..s.seq {
                    let row = b * s.seq + t;
                    let qr = rot(&q[row * qw + h * hd..][..hd], t);
                    let scores: Vec<f64> = (0..=t)
                        .map(|u| {
                            let kr = rot(&k[(b * s.seq + u) * kw + g * hd..][..hd], u);
                            qr.iter().zip(&kr).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for i in 0..hd {
                        let acc: f64 = (0..=t)
                            .map(|u| e[u] / sum * v[(b * s.seq + u) * kw + g * hd + i] as f64)
                            .sum();
                        out[row * qw + h * hd + i] = acc as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn equals_the_attention_written_out_in_f32_and_in_bf16() {
        if blas().is_none() {
            return; // matmul's the_blas_is_installed fails instead
        }
        // 300 tokens: several blocks of query rows, the last partial; two and three query
        // heads per KV head (the forward stacks them).
        for (heads, kv_heads) in [(4, 2), (6, 2)] {
            check_attention(heads, kv_heads);
        }
    }

    fn check_attention(heads: usize, kv_heads: usize) {
        use burn::tensor::Distribution;
        use burn_flex::{Flex, FlexDevice};
        let (batch, seq, hd) = (2, 300, 16);
        let rand = |cols: usize| {
            Tensor::<Flex, 2>::random(
                [batch * seq, cols],
                Distribution::Normal(0.0, 1.0),
                &FlexDevice,
            )
        };
        let (q, k, v) = (rand(heads * hd), rand(kv_heads * hd), rand(kv_heads * hd));
        let (mut cos, mut sin) = (vec![0f32; seq * hd], vec![0f32; seq * hd]);
        for t in 0..seq {
            for i in 0..hd {
                let angle = t as f32 / 10f32.powf((i % (hd / 2)) as f32 / 4.0);
                cos[t * hd + i] = angle.cos();
                sin[t * hd + i] = if i < hd / 2 {
                    -angle.sin()
                } else {
                    angle.sin()
                };
            }
        }
        let rope = RopeTables {
            cos: &cos,
            sin: &sin,
        };
        let vals = |t: &Tensor<Flex, 2>| -> Vec<f32> { t.to_data().to_vec().unwrap() };
        let mut shape = AttentionShape {
            batch,
            seq,
            heads,
            kv_heads,
            head_dim: hd,
            products: DType::F32,
        };
        let want = reference(&vals(&q), &vals(&k), &vals(&v), shape, rope);
        let worst = |got: Vec<f32>| {
            got.iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max)
        };
        let run = |shape| {
            let out = causal_attention(q.clone(), k.clone(), v.clone(), shape, rope);
            vals(&out.expect("the fused path applies"))
        };
        let e32 = worst(run(shape));
        assert!(e32 < 1e-5, "f32 products: largest difference {e32}");
        shape.products = DType::BF16;
        let e16 = worst(run(shape));
        // Outputs are averages of unit normals: bf16's 8-bit mantissa costs about 1e-2 at most.
        assert!(e16 < 3e-2, "bf16 products: largest difference {e16}");
        if blas().is_some_and(|b| b.native_bf16()) {
            assert!(e16 > e32, "the bf16 products did not run ({e16} vs {e32})");
        }
    }
}
