//! Next-token negative log-likelihood straight from a block of logits: one pass per row
//! (maximum, then the log-sum-exp on eight lanes with the vectorised `exp`), nothing written
//! but one value per row. The portable path builds the shifted logits, their exponentials and
//! the gathered targets as full `[rows, vocab]` tensors.

use std::any::TypeId;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use crate::math::{exp, max_of};
use crate::matmul::{blas_enabled, from_flex, into_flex};

/// `logsumexp(logits[r]) - logits[r, targets[r]]` for every row `r`, in f32. Hands the inputs
/// back (`Err`) where the fast path does not apply (another backend, a dtype other than f32,
/// the fast paths turned off, a target outside the vocabulary); the caller then runs its own.
///
/// # Shapes
/// - `logits`: `[rows, vocab]`, `targets`: `[rows]` -> `[rows]`
#[allow(clippy::type_complexity)]
pub fn nll<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> Result<Tensor<B, 1>, (Tensor<B, 2>, Tensor<B, 1, Int>)> {
    let [rows, vocab] = logits.dims();
    if TypeId::of::<B::FloatTensorPrimitive>() != TypeId::of::<FlexTensor>()
        || !blas_enabled()
        || logits.dtype() != DType::F32
        || targets.dims() != [rows]
        || vocab == 0
    {
        return Err((logits, targets));
    }
    let ids: Vec<i64> = match targets.clone().into_data().convert::<i64>().to_vec() {
        Ok(v) => v,
        Err(_) => return Err((logits, targets)),
    };
    if ids.iter().any(|&t| t < 0 || t as usize >= vocab) {
        return Err((logits, targets));
    }
    let l = match into_flex(logits) {
        Ok(l) => l.to_contiguous(),
        Err(_) => unreachable!("the float primitive is FlexTensor (checked above)"),
    };
    let data = l.storage::<f32>();
    let out: Vec<f32> = data
        .par_chunks_exact(vocab)
        .zip(ids.par_iter())
        .map(|(row, &t)| row_nll(row, t as usize))
        .collect();
    Ok(from_flex(FlexTensor::from_data(TensorData::new(
        out,
        [rows],
    ))))
}

/// `log(sum(exp(row))) - row[target]`, stable (the row maximum subtracted).
fn row_nll(row: &[f32], target: usize) -> f32 {
    const L: usize = 8;
    let max = max_of(row);
    let mut sums = [0f32; L];
    let mut chunks = row.chunks_exact(L);
    for c in &mut chunks {
        for (s, &x) in sums.iter_mut().zip(c) {
            *s += exp(x - max);
        }
    }
    let sum: f32 = sums.iter().sum::<f32>()
        + chunks
            .remainder()
            .iter()
            .map(|&x| exp(x - max))
            .sum::<f32>();
    sum.ln() + max - row[target]
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Distribution, Tensor};
    use burn_flex::{Flex, FlexDevice};

    use super::*;

    #[test]
    fn equals_the_log_softmax_of_the_target() {
        let d = FlexDevice;
        let (rows, vocab) = (37, 1003);
        let logits = Tensor::<Flex, 2>::random([rows, vocab], Distribution::Normal(0.0, 4.0), &d);
        let ids: Vec<i64> = (0..rows as i64).map(|r| (r * 97) % vocab as i64).collect();
        let targets = Tensor::<Flex, 1, Int>::from_data(TensorData::new(ids.clone(), [rows]), &d);
        let got: Vec<f32> = nll(logits.clone(), targets)
            .expect("the fast path applies")
            .into_data()
            .to_vec()
            .unwrap();
        let host: Vec<f32> = logits.into_data().to_vec().unwrap();
        for (r, row) in host.chunks(vocab).enumerate() {
            let max = row
                .iter()
                .copied()
                .fold(f64::NEG_INFINITY, |m, x| m.max(x as f64));
            let lse = row
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln()
                + max;
            let want = lse - row[ids[r] as usize] as f64;
            assert!(
                (got[r] as f64 - want).abs() < 1e-4 * want.abs().max(1.0),
                "row {r}: {} vs {want}",
                got[r]
            );
        }
    }

    #[test]
    fn bad_targets_hand_the_inputs_back() {
        let d = FlexDevice;
        let logits = Tensor::<Flex, 2>::zeros([2, 5], &d);
        let targets = Tensor::<Flex, 1, Int>::from_data(TensorData::new(vec![1i64, 5], [2]), &d);
        assert!(nll(logits.clone(), targets).is_err());
        let short = Tensor::<Flex, 1, Int>::from_data(TensorData::new(vec![1i64], [1]), &d);
        assert!(nll(logits, short).is_err());
    }
}
