//! Next-token negative log-likelihood straight from a block of logits: one pass per row
//! (maximum, then the log-sum-exp on eight lanes with the vectorised `exp`), nothing written
//! but one value per row. The portable path builds the shifted logits, their exponentials and
//! the gathered targets as full `[rows, vocab]` tensors. On `Autodiff<Flex>` the same pass is a
//! recorded op whose backward writes `softmax - onehot` row by row ([`nll_grad`]).

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData, TensorMetadata};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use crate::math::{exp, max_of};
use crate::matmul::{Fused, from_flex, fused, into_flex};

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
    let applies = logits.dtype() == DType::F32 && targets.dims() == [rows] && vocab > 0;
    let Some(path) = fused::<B>().filter(|_| applies) else {
        return Err((logits, targets));
    };
    let ids: Vec<i64> = match targets.clone().into_data().convert::<i64>().to_vec() {
        Ok(v) => v,
        Err(_) => return Err((logits, targets)),
    };
    if ids.iter().any(|&t| t < 0 || t as usize >= vocab) {
        return Err((logits, targets));
    }
    let ids: Vec<usize> = ids.into_iter().map(|t| t as usize).collect();
    if path == Fused::Autodiff {
        return Ok(crate::autodiff::nll(logits, ids));
    }
    let l = match into_flex(logits) {
        Ok(l) => l.to_contiguous(),
        Err(_) => unreachable!("the float primitive is FlexTensor (checked above)"),
    };
    let (out, _) = nll_flex(&l, &ids);
    Ok(from_flex(out))
}

/// The NLL of every row of contiguous f32 `logits` (`[rows]`) and each row's log-sum-exp.
pub(crate) fn nll_flex(logits: &FlexTensor, ids: &[usize]) -> (FlexTensor, Vec<f32>) {
    let data = logits.storage::<f32>();
    let vocab = data.len() / ids.len().max(1);
    let (out, lse): (Vec<f32>, Vec<f32>) = data
        .par_chunks_exact(vocab.max(1))
        .zip(ids.par_iter())
        .map(|(row, &t)| {
            let lse = log_sum_exp(row);
            (lse - row[t], lse)
        })
        .unzip();
    let rows = out.len();
    (FlexTensor::from_data(TensorData::new(out, [rows])), lse)
}

/// The gradient of the rows' NLL with respect to their logits, each row scaled by its
/// `grad`: `grad[r] * (softmax(logits[r]) - onehot(ids[r]))`, from the rows' log-sum-exp.
///
/// # Shapes
/// - `logits`: `[rows * vocab]`, `ids`, `lse`, `grad`: `[rows]` -> `[rows * vocab]`
pub(crate) fn nll_grad(logits: &[f32], ids: &[usize], lse: &[f32], grad: &[f32]) -> Vec<f32> {
    let vocab = logits.len() / ids.len().max(1);
    let mut out = vec![0f32; logits.len()];
    out.par_chunks_exact_mut(vocab.max(1))
        .zip(logits.par_chunks_exact(vocab.max(1)))
        .enumerate()
        .for_each(|(r, (o, x))| {
            scaled_softmax(o, x, lse[r], grad[r]);
            o[ids[r]] -= grad[r];
        });
    out
}

crate::math::multiversioned! {
    /// `out = g * exp(x - lse)`: a row's softmax from its log-sum-exp, scaled.
    fn scaled_softmax(out: &mut [f32], x: &[f32], lse: f32, g: f32) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = g * exp(v - lse);
        }
    }
}

/// `KL(softmax(teacher[r] / t) || softmax(student[r] / t))` for every row `r`, in f32, one pass
/// per row; on `Autodiff<Flex>` a recorded op whose backward, `(softmax(student / t) -
/// softmax(teacher / t)) / t` per row, is one pass too (the teacher is a constant). Hands the
/// inputs back (`Err`) where the fast path does not apply (another backend or dtype, shapes
/// that differ, fast paths off, a temperature that is not positive).
///
/// # Shapes
/// - `student`, `teacher`: `[rows, vocab]` -> `[rows]`
#[allow(clippy::type_complexity)]
pub fn kl_div<B: Backend>(
    student: Tensor<B, 2>,
    teacher: Tensor<B, 2>,
    temperature: f32,
) -> Result<Tensor<B, 1>, (Tensor<B, 2>, Tensor<B, 2>)> {
    let [_, vocab] = student.dims();
    let applies = student.dtype() == DType::F32
        && teacher.dtype() == DType::F32
        && teacher.dims() == student.dims()
        && vocab > 0
        && temperature > 0.0
        && temperature.is_finite();
    let Some(path) = fused::<B>().filter(|_| applies) else {
        return Err((student, teacher));
    };
    if path == Fused::Autodiff {
        return Ok(crate::autodiff::kl_div(student, teacher, temperature));
    }
    let (s, t) = match (into_flex(student), into_flex(teacher)) {
        (Ok(s), Ok(t)) => (s.to_contiguous(), t.to_contiguous()),
        _ => unreachable!("the float primitive is FlexTensor (checked above)"),
    };
    Ok(from_flex(kl_flex(&s, &t, temperature).0))
}

/// [`kl_div`] of contiguous f32 Flex tensors, with every row's log-sum-exp of `student / t`
/// and of `teacher / t`.
pub(crate) fn kl_flex(
    student: &FlexTensor,
    teacher: &FlexTensor,
    t: f32,
) -> (FlexTensor, Vec<[f32; 2]>) {
    let (s, tl) = (student.storage::<f32>(), teacher.storage::<f32>());
    let vocab = student.shape()[1];
    let inv = t.recip();
    let (out, lse): (Vec<f32>, Vec<[f32; 2]>) = s
        .par_chunks_exact(vocab)
        .zip(tl.par_chunks_exact(vocab))
        .map(|(s, tl)| {
            let (mut ss, mut ts) = (vec![0f32; vocab], vec![0f32; vocab]);
            scale_into(&mut ss, s, inv);
            scale_into(&mut ts, tl, inv);
            let (lq, lp) = (log_sum_exp(&ss), log_sum_exp(&ts));
            (kl_row(&ts, &ss, lp, lq), [lq, lp])
        })
        .unzip();
    let rows = out.len();
    (FlexTensor::from_data(TensorData::new(out, [rows])), lse)
}

/// The gradient of [`kl_div`]'s rows with respect to the student's logits, each row scaled
/// by its `grad`: `grad[r] * (softmax(student[r] / t) - softmax(teacher[r] / t)) / t`.
pub(crate) fn kl_grad(
    student: &[f32],
    teacher: &[f32],
    lse: &[[f32; 2]],
    t: f32,
    grad: &[f32],
) -> Vec<f32> {
    let vocab = student.len() / lse.len().max(1);
    let mut out = vec![0f32; student.len()];
    out.par_chunks_exact_mut(vocab.max(1))
        .zip(student.par_chunks_exact(vocab.max(1)))
        .zip(teacher.par_chunks_exact(vocab.max(1)))
        .enumerate()
        .for_each(|(r, ((o, s), tl))| kl_grad_row(o, s, tl, lse[r], t, grad[r]));
    out
}

crate::math::multiversioned! {
    /// `out = x * c`.
    fn scale_into(out: &mut [f32], x: &[f32], c: f32) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = v * c;
        }
    }
}

crate::math::multiversioned! {
    /// `sum p (log p - log q)` of one row, from the scaled logits and their log-sum-exps.
    fn kl_row(tp: &[f32], sq: &[f32], lp: f32, lq: f32) -> f32 {
        const L: usize = 8;
        let mut lanes = [0f32; L];
        let mut a = tp.chunks_exact(L);
        let mut b = sq.chunks_exact(L);
        for (x, y) in (&mut a).zip(&mut b) {
            for l in 0..L {
                let log_p = x[l] - lp;
                lanes[l] += exp(log_p) * (log_p - (y[l] - lq));
            }
        }
        let rest: f32 = a
            .remainder()
            .iter()
            .zip(b.remainder())
            .map(|(&x, &y)| exp(x - lp) * ((x - lp) - (y - lq)))
            .sum();
        lanes.iter().sum::<f32>() + rest
    }
}

crate::math::multiversioned! {
    /// One row of [`kl_grad`].
    fn kl_grad_row(out: &mut [f32], s: &[f32], tl: &[f32], lse: [f32; 2], t: f32, g: f32) {
        let (inv, c) = (t.recip(), g / t);
        let n = out.len();
        let (s, tl) = (&s[..n], &tl[..n]);
        for i in 0..n {
            out[i] = c * (exp(s[i] * inv - lse[0]) - exp(tl[i] * inv - lse[1]));
        }
    }
}

/// `log(sum(exp(row)))`, stable (the row maximum subtracted).
fn log_sum_exp(row: &[f32]) -> f32 {
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
    sum.ln() + max
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
