//! SwiGLU's gate, `silu(gate) * up`, in one pass with the vectorised `exp` (burn's `silu` then
//! a product is two passes and a scalar `exp` per element); on `Autodiff<Flex>` a recorded op
//! whose backward is one pass too.

use burn::tensor::TensorMetadata;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use crate::math::{silu_mul, silu_mul_grad};
use crate::matmul::{Fused, from_flex, fused, into_flex};

/// `silu(gate) * up` elementwise, `silu(g) = g / (1 + e^-g)`. Hands the inputs back (`Err`)
/// where the fast path does not apply (another backend or dtype, different shapes, fast paths
/// off).
///
/// # Shapes
/// - `gate`, `up`: `[n, width]` -> `[n, width]`
#[allow(clippy::type_complexity)]
pub fn swiglu<B: Backend>(
    gate: Tensor<B, 2>,
    up: Tensor<B, 2>,
) -> Result<Tensor<B, 2>, (Tensor<B, 2>, Tensor<B, 2>)> {
    let applies =
        gate.dtype() == DType::F32 && up.dtype() == DType::F32 && gate.dims() == up.dims();
    let Some(path) = fused::<B>().filter(|_| applies) else {
        return Err((gate, up));
    };
    if path == Fused::Autodiff {
        return Ok(crate::autodiff::swiglu(gate, up));
    }
    let (g, u) = match (into_flex(gate), into_flex(up)) {
        (Ok(g), Ok(u)) => (g.to_contiguous(), u.to_contiguous()),
        _ => unreachable!("the float primitive is FlexTensor (checked above)"),
    };
    Ok(from_flex(swiglu_flex(&g, &u)))
}

/// Elements per parallel task of the elementwise passes.
const CHUNK: usize = 1 << 14;

/// [`swiglu`] of contiguous f32 Flex tensors of one shape.
pub(crate) fn swiglu_flex(g: &FlexTensor, u: &FlexTensor) -> FlexTensor {
    let dims = g.shape().to_vec();
    let mut out = vec![0f32; g.storage::<f32>().len()];
    out.par_chunks_mut(CHUNK)
        .zip(g.storage::<f32>().par_chunks(CHUNK))
        .zip(u.storage::<f32>().par_chunks(CHUNK))
        .for_each(|((o, g), u)| silu_mul(o, g, u));
    FlexTensor::from_data(TensorData::new(out, dims))
}

/// The gradients of [`swiglu`] with respect to `gate` and `up`, given `dout`.
pub(crate) fn swiglu_grads(g: &[f32], u: &[f32], dout: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (mut dg, mut du) = (vec![0f32; g.len()], vec![0f32; g.len()]);
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(dout.par_chunks(CHUNK))
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(((dg, du), d), (g, u))| silu_mul_grad(dg, du, d, g, u));
    (dg, du)
}

#[cfg(test)]
mod tests {
    use burn::tensor::activation::silu;
    use burn::tensor::{Distribution, Tensor};
    use burn_flex::{Flex, FlexDevice};

    use super::*;

    #[test]
    fn equals_silu_times_up() {
        let d = FlexDevice;
        let g = Tensor::<Flex, 2>::random([33, 517], Distribution::Normal(0.0, 8.0), &d);
        let u = Tensor::<Flex, 2>::random([33, 517], Distribution::Normal(0.0, 1.0), &d);
        let want: Vec<f32> = (silu(g.clone()) * u.clone()).into_data().to_vec().unwrap();
        let got: Vec<f32> = swiglu(g, u).expect("applies").into_data().to_vec().unwrap();
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
        }
        let big =
            Tensor::<Flex, 2>::from_data(TensorData::new(vec![-200f32, 200.0, 0.0], [1, 3]), &d);
        let ones = Tensor::<Flex, 2>::ones([1, 3], &d);
        let v: Vec<f32> = swiglu(big, ones).unwrap().into_data().to_vec().unwrap();
        // silu(-200) is -2.8e-85 (0 in f32); the clamped exp gives a value as negligible.
        assert!(v[0].abs() < 1e-30 && v[1] == 200.0 && v[2] == 0.0, "{v:?}");
        let (a, b) = (
            Tensor::<Flex, 2>::ones([2, 3], &d),
            Tensor::<Flex, 2>::ones([3, 2], &d),
        );
        assert!(swiglu(a, b).is_err());
    }
}
