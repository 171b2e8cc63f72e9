//! Causal grouped-query attention with RoPE, straight from the projections' 2-D outputs.
//!
//! The portable path in `lopper-model` rotates q and k with position tables, reshapes them to
//! `[batch, heads, seq, head_dim]`, repeats every KV head over its query group, and runs the
//! backend's attention: four full copies of the activations before the first product. Here each
//! task (one batch row, one query head, one block of query rows) reads its rows of q, k and v in
//! place (the KV head of its group: nothing repeated), rotates them into small buffers, and
//! computes only the causal part of the score matrix on the BLAS: query rows `r0..r1` attend to
//! keys `0..r1`. Softmax is exact (f32, the row maximum subtracted) with a vectorisable `exp`.

use std::any::TypeId;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use crate::blas::{MatRef, blas};
use crate::math::{exp, max_of};
use crate::matmul::{blas_enabled, from_flex, into_flex};

/// Query rows per task: bounds a task's score block at `ROWS x seq`.
const ROWS: usize = 256;

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
/// query head `h` reading KV head `h / (heads / kv_heads)`, on the BLAS. Hands the operands
/// back (`Err`) where the fast path does not apply: another backend, a dtype other than f32,
/// no BLAS, or tables and shapes that disagree. The caller then runs its portable path.
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
    } = shape;
    let fits = TypeId::of::<B::FloatTensorPrimitive>() == TypeId::of::<FlexTensor>()
        && blas_enabled()
        && q.dtype() == DType::F32
        && k.dtype() == DType::F32
        && v.dtype() == DType::F32
        && kv_heads > 0
        && heads.is_multiple_of(kv_heads)
        && hd.is_multiple_of(2)
        && q.dims() == [batch * seq, heads * hd]
        && k.dims() == [batch * seq, kv_heads * hd]
        && v.dims() == k.dims()
        && rope.cos.len() >= seq * hd
        && rope.sin.len() >= seq * hd;
    let Some(blas) = blas().filter(|_| fits) else {
        return Err((q, k, v));
    };
    let flex = |t: Tensor<B, 2>| into_flex(t).map(|f| f.to_contiguous());
    let (q, k, v) = match (flex(q), flex(k), flex(v)) {
        (Ok(q), Ok(k), Ok(v)) => (q, k, v),
        _ => unreachable!("the float primitive is FlexTensor (checked above)"),
    };
    let (qs, ks, vs) = (q.storage::<f32>(), k.storage::<f32>(), v.storage::<f32>());
    let (qw, kw) = (heads * hd, kv_heads * hd);
    let rep = heads / kv_heads;
    let scale = (hd as f32).sqrt().recip();
    let tasks: Vec<(usize, usize, usize)> = (0..batch)
        .flat_map(|b| {
            (0..heads).flat_map(move |h| (0..seq).step_by(ROWS).map(move |r0| (b, h, r0)))
        })
        .collect();
    let blocks: Vec<crate::Result<Vec<f32>>> = tasks
        .par_iter()
        .map(|&(b, h, r0)| {
            let r1 = (r0 + ROWS).min(seq);
            let rows = r1 - r0;
            let g = h / rep;
            let base = b * seq;
            let qr = rotate(qs, qw, h * hd, base + r0, rows, r0, hd, rope);
            let kr = rotate(ks, kw, g * hd, base, r1, 0, hd, rope);
            let mut scores = vec![0f32; rows * r1];
            blas.sgemm_scaled(
                scale,
                MatRef {
                    data: &qr,
                    rows,
                    cols: hd,
                    ld: hd,
                    trans: false,
                },
                MatRef {
                    data: &kr,
                    rows: hd,
                    cols: r1,
                    ld: hd,
                    trans: true,
                },
                &mut scores,
                r1,
            )?;
            for (i, row) in scores.chunks_exact_mut(r1).enumerate() {
                causal_softmax(row, r0 + i + 1);
            }
            let mut out = vec![0f32; rows * hd];
            let vdata = &vs[base * kw + g * hd..];
            blas.sgemm(
                MatRef {
                    data: &scores,
                    rows,
                    cols: r1,
                    ld: r1,
                    trans: false,
                },
                MatRef {
                    data: vdata,
                    rows: r1,
                    cols: hd,
                    ld: kw,
                    trans: false,
                },
                &mut out,
                hd,
            )?;
            Ok(out)
        })
        .collect();
    let mut out = vec![0f32; batch * seq * qw];
    for (&(b, h, r0), block) in tasks.iter().zip(blocks) {
        let block = match block {
            Ok(b) => b,
            Err(e) => unreachable!("operands described from their own buffers: {e}"),
        };
        for (i, src) in block.chunks_exact(hd).enumerate() {
            let row = b * seq + r0 + i;
            out[row * qw + h * hd..][..hd].copy_from_slice(src);
        }
    }
    crate::matmul::count_blas_product();
    Ok(from_flex(FlexTensor::from_data(TensorData::new(
        out,
        [batch * seq, qw],
    ))))
}

/// Rows `row0..row0 + rows` of the head at column `col` of a `[_, width]` buffer, rotated for
/// positions `pos0..`, into a contiguous `[rows, hd]` buffer.
#[allow(clippy::too_many_arguments)]
fn rotate(
    src: &[f32],
    width: usize,
    col: usize,
    row0: usize,
    rows: usize,
    pos0: usize,
    hd: usize,
    rope: RopeTables<'_>,
) -> Vec<f32> {
    let half = hd / 2;
    let mut out = vec![0f32; rows * hd];
    for (i, dst) in out.chunks_exact_mut(hd).enumerate() {
        let x = &src[(row0 + i) * width + col..][..hd];
        let p = (pos0 + i) * hd;
        let (cos, sin) = (&rope.cos[p..p + hd], &rope.sin[p..p + hd]);
        let (x1, x2) = x.split_at(half);
        let (d1, d2) = dst.split_at_mut(half);
        for j in 0..half {
            d1[j] = x1[j] * cos[j] + x2[j] * sin[j];
            d2[j] = x2[j] * cos[half + j] + x1[j] * sin[half + j];
        }
    }
    out
}

/// Softmax over the first `valid` entries of `row` (the keys a query may see); zeros after.
/// Reductions run on eight lanes so that every loop vectorises.
fn causal_softmax(row: &mut [f32], valid: usize) {
    const L: usize = 8;
    let (seen, future) = row.split_at_mut(valid);
    future.fill(0.0);
    let max = max_of(seen);
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
    let sum: f32 = sums.iter().chain(chunks.remainder()).sum();
    let inv = sum.recip();
    for x in seen.iter_mut() {
        *x *= inv;
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
}
