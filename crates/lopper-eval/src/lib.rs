#![doc = include_str!("../README.md")]

use burn::tensor::backend::Backend;

mod mc;
use lopper_model::{Llama, Masks, Result};
pub use mc::{MAX_LEN, McScores, encode_pair, loglikelihoods, mc_scores, mc_scores_of_requests};
use serde::Serialize;

/// Perplexity of a set of windows.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Perplexity {
    /// `exp(nll_sum / tokens)`.
    pub ppl: f64,
    /// Sum of next-token NLLs (nats).
    pub nll_sum: f64,
    /// Windows evaluated.
    pub windows: usize,
    /// Tokens predicted (each window of `n` tokens predicts `n - 1`).
    pub tokens: usize,
}

/// Perplexity of `model` (under optional `masks`) on equal-length token `windows`, `batch_size`
/// windows per forward. `progress(done)` is called after each batch with the windows done.
/// Every position of a window predicts the next one; the first token of a window is context
/// only, so each window of `n` tokens contributes `n - 1` predictions.
///
/// ```
/// use burn_flex::{Flex, FlexDevice};
/// use lopper_core::ModelShape;
/// use lopper_model::Llama;
///
/// let model = Llama::<Flex>::random(&ModelShape::tiny(), 0, &FlexDevice)?;
/// let windows: Vec<Vec<u32>> = (0..4)
///     .map(|w| (0..16).map(|t| (w * 7 + t * 3) % 128).collect())
///     .collect();
/// let mut seen = 0;
/// let p = lopper_eval::perplexity(&model, &windows, 3, None, |done| seen = done)?;
/// assert_eq!((p.windows, p.tokens, seen), (4, 4 * 15, 4));
/// assert!((p.ppl.ln() - p.nll_sum / p.tokens as f64).abs() < 1e-9);
/// assert!(p.ppl > 1.0 && p.ppl.is_finite());
/// # Ok::<(), lopper_model::Error>(())
/// ```
pub fn perplexity<B: Backend>(
    model: &Llama<B>,
    windows: &[Vec<u32>],
    batch_size: usize,
    masks: Option<&Masks<B>>,
    mut progress: impl FnMut(usize),
) -> Result<Perplexity> {
    let batch_size = batch_size.max(1);
    let mut nll_sum = 0f64;
    let mut tokens = 0usize;
    let mut done = 0;
    for batch in windows.chunks(batch_size) {
        let t = model.tokens(batch)?;
        let nll: Vec<f32> = model
            .token_nll(t, masks)?
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("converted to f32");
        tokens += nll.len();
        nll_sum += nll.iter().map(|&x| x as f64).sum::<f64>();
        done += batch.len();
        progress(done);
    }
    tracing::debug!(windows = done, tokens, "perplexity evaluated");
    Ok(Perplexity {
        ppl: (nll_sum / tokens as f64).exp(),
        nll_sum,
        windows: done,
        tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn_flex::{Flex, FlexDevice};
    use lopper_core::ModelShape;

    #[test]
    fn perplexity_is_the_exp_of_the_mean_token_nll_whatever_the_batching() {
        let m = Llama::<Flex>::random(&ModelShape::tiny(), 5, &FlexDevice).unwrap();
        let windows: Vec<Vec<u32>> = (0..5)
            .map(|w| (0..9).map(|t| ((w * 13 + t * 7) % 128) as u32).collect())
            .collect();
        let mut calls = Vec::new();
        let p = perplexity(&m, &windows, 2, None, |d| calls.push(d)).unwrap();
        assert_eq!(calls, vec![2, 4, 5]);
        assert_eq!((p.windows, p.tokens), (5, 40));
        let direct: f64 = windows
            .iter()
            .map(|w| {
                m.mean_loss(m.tokens(std::slice::from_ref(w)).unwrap(), None)
                    .unwrap()
                    * 8.0
            })
            .sum();
        assert!(
            (p.nll_sum - direct).abs() < 1e-3,
            "{} vs {direct}",
            p.nll_sum
        );
        let one = perplexity(&m, &windows, 5, None, |_| {}).unwrap();
        assert!((one.ppl - p.ppl).abs() < 1e-6 * p.ppl);
        assert!((p.ppl - (direct / 40.0).exp()).abs() < 1e-4 * p.ppl);
    }
}
