//! RMSNorm in one pass per row (burn's ops take five: square, mean, add, square root and
//! reciprocal, two products), and on `Autodiff<Flex>` a recorded op whose backward is one pass
//! per row too.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use crate::math::{rms_norm_row, rms_norm_row_grad};
use crate::matmul::{Fused, from_flex, fused, into_flex};

/// Rows per parallel task.
const ROWS: usize = 64;

/// `x / sqrt(mean(x^2) + eps) * weight`, row by row, in f32. Hands the inputs back (`Err`)
/// where the fast path does not apply (another backend or dtype, a weight of another width,
/// fast paths off).
///
/// # Shapes
/// - `x`: `[n, hidden]`, `weight`: `[hidden]` -> `[n, hidden]`
#[allow(clippy::type_complexity)]
pub fn rms_norm<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Result<Tensor<B, 2>, (Tensor<B, 2>, Tensor<B, 1>)> {
    let [_, hidden] = x.dims();
    let applies = x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && weight.dims() == [hidden]
        && hidden > 0;
    let Some(path) = fused::<B>().filter(|_| applies) else {
        return Err((x, weight));
    };
    if path == Fused::Autodiff {
        return Ok(crate::autodiff::rms_norm(x, weight, eps as f32));
    }
    let (x, w) = match (into_flex(x), into_flex(weight)) {
        (Ok(x), Ok(w)) => (x.to_contiguous(), w.to_contiguous()),
        _ => unreachable!("the float primitive is FlexTensor (checked above)"),
    };
    Ok(from_flex(rms_norm_flex(&x, &w, eps as f32).0))
}

/// [`rms_norm`] of contiguous f32 Flex tensors, with every row's `1 / sqrt(mean(x^2) + eps)`.
pub(crate) fn rms_norm_flex(x: &FlexTensor, w: &FlexTensor, eps: f32) -> (FlexTensor, Vec<f32>) {
    let (xs, ws) = (x.storage::<f32>(), w.storage::<f32>());
    let hidden = ws.len();
    let rows = xs.len() / hidden;
    let mut out = vec![0f32; xs.len()];
    let mut r = vec![0f32; rows];
    out.par_chunks_mut(ROWS * hidden)
        .zip(r.par_chunks_mut(ROWS))
        .zip(xs.par_chunks(ROWS * hidden))
        .for_each(|((o, r), x)| {
            for ((o, r), x) in o
                .chunks_exact_mut(hidden)
                .zip(r)
                .zip(x.chunks_exact(hidden))
            {
                *r = rms_norm_row(o, x, ws, eps);
            }
        });
    (
        FlexTensor::from_data(TensorData::new(out, [rows, hidden])),
        r,
    )
}

/// The gradients of [`rms_norm`] with respect to `x` (`[rows * hidden]`) and the weight
/// (`[hidden]`), given `dy` and the rows' `r`.
pub(crate) fn rms_norm_grads(x: &[f32], w: &[f32], r: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let hidden = w.len();
    let mut dx = vec![0f32; x.len()];
    let dws: Vec<Vec<f32>> = dx
        .par_chunks_mut(ROWS * hidden)
        .zip(x.par_chunks(ROWS * hidden))
        .zip(dy.par_chunks(ROWS * hidden))
        .zip(r.par_chunks(ROWS))
        .map(|(((dx, x), dy), r)| {
            let mut dw = vec![0f32; hidden];
            for (((dx, x), dy), &r) in dx
                .chunks_exact_mut(hidden)
                .zip(x.chunks_exact(hidden))
                .zip(dy.chunks_exact(hidden))
                .zip(r)
            {
                rms_norm_row_grad(dx, &mut dw, dy, x, w, r);
            }
            dw
        })
        .collect();
    let mut dw = vec![0f32; hidden];
    for part in dws {
        dw.iter_mut().zip(part).for_each(|(a, b)| *a += b);
    }
    (dx, dw)
}

#[cfg(test)]
mod tests {
    use burn::backend::Autodiff;
    use burn::tensor::{Distribution, Tensor};
    use burn_flex::{Flex, FlexDevice};

    use super::*;

    /// burn's ops, as the model's portable path writes RMSNorm.
    fn portable<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 1>, eps: f64) -> Tensor<B, 2> {
        let ms = x.clone().powi_scalar(2).mean_dim(1);
        x * (ms + eps).sqrt().recip() * w.unsqueeze_dim(0)
    }

    #[test]
    fn equals_burns_ops_forward_and_backward() {
        type A = Autodiff<Flex>;
        let d = FlexDevice;
        // 130 rows: three tasks, the last partial; 100 columns: not a multiple of the lanes.
        let x = Tensor::<Flex, 2>::random([130, 100], Distribution::Normal(0.5, 2.0), &d);
        let w = Tensor::<Flex, 1>::random([100], Distribution::Normal(1.0, 0.3), &d);
        let dy = Tensor::<Flex, 2>::random([130, 100], Distribution::Normal(0.0, 1.0), &d);
        let run = |fused: bool| -> [Vec<f32>; 3] {
            let xa = Tensor::<A, 2>::from_inner(x.clone()).require_grad();
            let wa = Tensor::<A, 1>::from_inner(w.clone()).require_grad();
            let y = if fused {
                rms_norm(xa.clone(), wa.clone(), 1e-5).expect("the fused path applies")
            } else {
                portable(xa.clone(), wa.clone(), 1e-5)
            };
            let out = y.clone().inner().into_data().to_vec().unwrap();
            let grads = (y * Tensor::from_inner(dy.clone())).sum().backward();
            let gx = xa.grad(&grads).unwrap().into_data().to_vec().unwrap();
            let gw = wa.grad(&grads).unwrap().into_data().to_vec().unwrap();
            [out, gx, gw]
        };
        let (fused, want) = (run(true), run(false));
        for (what, (a, b)) in ["output", "dx", "dw"].iter().zip(fused.iter().zip(&want)) {
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = a
                .iter()
                .zip(b)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            assert!(worst <= 1e-5 * scale.max(1.0), "{what}: {worst} of {scale}");
        }
        // The plain Flex path gives the autodiff path's output.
        let plain: Vec<f32> = rms_norm(x, w, 1e-5).unwrap().into_data().to_vec().unwrap();
        assert_eq!(plain, fused[0]);
    }
}
