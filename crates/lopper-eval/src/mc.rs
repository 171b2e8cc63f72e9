//! Log-likelihood scoring of (context, continuation) requests and multiple-choice metrics with
//! lm-evaluation-harness 0.4 semantics.

use burn::tensor::backend::Backend;
use lopper_model::{Error, Llama, Result, Tokenizer, nll_from_logits};
use serde::Serialize;

/// Longest scored sequence; longer inputs keep their last tokens (lm-eval's left truncation).
pub const MAX_LEN: usize = 2048;

/// Context and continuation token ids, as lm-eval's `_encode_pair` makes them: trailing spaces
/// of the context move to the continuation, the whole string is tokenised and split after the
/// context's tokens; an empty context becomes the BOS (or EOS) token.
pub fn encode_pair(
    tok: &Tokenizer,
    context: &str,
    continuation: &str,
) -> Result<(Vec<u32>, Vec<u32>)> {
    if context.is_empty() {
        let prefix = tok.bos_id.or(tok.eos_id).ok_or_else(|| {
            Error::Input("empty context and the tokenizer has neither BOS nor EOS".into())
        })?;
        return Ok((vec![prefix], tok.encode(continuation)?));
    }
    let trimmed = context.trim_end();
    let (ctx, cont) = (
        trimmed,
        format!("{}{continuation}", &context[trimmed.len()..]),
    );
    let whole = tok.encode(&format!("{ctx}{cont}"))?;
    let ctx_enc = tok.encode(ctx)?;
    let split = ctx_enc.len().min(whole.len());
    Ok((ctx_enc, whole[split..].to_vec()))
}

/// For each request: the sum of log-probabilities of the continuation given its context, and
/// whether every continuation token is the model's greedy (argmax) choice. `batch_size`
/// sequences per forward (sorted by length, right-padded: padding after a sequence cannot change
/// its logits in a causal model). `progress(done)` is called after each batch.
pub fn loglikelihoods<B: Backend>(
    model: &Llama<B>,
    tok: &Tokenizer,
    requests: &[(String, String)],
    batch_size: usize,
    mut progress: impl FnMut(usize),
) -> Result<Vec<(f64, bool)>> {
    // (request index, scored tokens, continuation length)
    let mut items = Vec::with_capacity(requests.len());
    for (i, (ctx, cont)) in requests.iter().enumerate() {
        let (c, k) = encode_pair(tok, ctx, cont)?;
        if k.is_empty() {
            return Err(Error::Input(format!(
                "request {i}: the continuation {cont:?} has no tokens"
            )));
        }
        let mut full = [c, k.clone()].concat();
        if full.len() > MAX_LEN + 1 {
            full.drain(..full.len() - (MAX_LEN + 1));
        }
        let cont_len = k.len().min(full.len() - 1);
        items.push((i, full, cont_len));
    }
    items.sort_by_key(|(_, f, _)| std::cmp::Reverse(f.len()));
    let mut out = vec![(0f64, false); requests.len()];
    let mut done = 0;
    for batch in items.chunks(batch_size.max(1)) {
        let len = batch
            .iter()
            .map(|(_, f, _)| f.len())
            .max()
            .unwrap_or(2)
            .max(2);
        let rows: Vec<Vec<u32>> = batch
            .iter()
            .map(|(_, f, _)| {
                let mut r = f.clone();
                r.resize(len, 0);
                r
            })
            .collect();
        let tokens = model.tokens(&rows)?;
        let logits = model
            .forward_masked(tokens.clone(), None)?
            .narrow(1, 0, len - 1);
        let targets = tokens.narrow(1, 1, len - 1);
        let nll: Vec<f32> = nll_from_logits(logits.clone(), targets)
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("converted to f32");
        let greedy: Vec<i64> = logits
            .argmax(2)
            .into_data()
            .convert::<i64>()
            .to_vec()
            .expect("converted to i64");
        for (row, (i, full, cont_len)) in batch.iter().enumerate() {
            // Target j of the row is predicted at index j - 1.
            let n = full.len();
            let at = |j: usize| row * (len - 1) + j - 1;
            let s: f64 = (n - cont_len..n).map(|j| nll[at(j)] as f64).sum();
            let is_greedy = (n - cont_len..n).all(|j| greedy[at(j)] == full[j] as i64);
            out[*i] = (-s, is_greedy);
        }
        done += batch.len();
        progress(done);
    }
    Ok(out)
}

/// Accuracy metrics of one task.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct McScores {
    /// Fraction where the highest summed log-probability is the gold choice.
    pub acc: f64,
    /// Standard error of `acc` (sample standard deviation / sqrt(n), as lm-eval).
    pub acc_stderr: f64,
    /// Same with log-probabilities divided by the choice string's length in characters.
    pub acc_norm: f64,
    /// Standard error of `acc_norm`.
    pub acc_norm_stderr: f64,
    /// Documents scored.
    pub n: usize,
}

/// `acc` / `acc_norm` from per-choice log-likelihoods: `docs[i] = (lls, choice strings, gold)`.
pub fn mc_scores(docs: &[(Vec<f64>, Vec<String>, usize)]) -> McScores {
    let argmax = |v: &[f64]| {
        // First maximum wins, like numpy's argmax.
        (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b })
    };
    let (mut hit, mut hit_norm) = (0usize, 0usize);
    for (lls, choices, gold) in docs {
        hit += (argmax(lls) == *gold) as usize;
        let norm: Vec<f64> = lls
            .iter()
            .zip(choices)
            .map(|(l, c)| l / c.chars().count() as f64)
            .collect();
        hit_norm += (argmax(&norm) == *gold) as usize;
    }
    let n = docs.len();
    let stderr = |p: f64| {
        if n > 1 {
            (p * (1.0 - p) / (n - 1) as f64).sqrt()
        } else {
            0.0
        }
    };
    let (acc, acc_norm) = (hit as f64 / n as f64, hit_norm as f64 / n as f64);
    McScores {
        acc,
        acc_stderr: stderr(acc),
        acc_norm,
        acc_norm_stderr: stderr(acc_norm),
        n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acc_norm_divides_by_choice_characters_and_first_max_wins() {
        let docs = vec![
            // acc picks 0 (-4 > -5); acc_norm: -4/1 = -4 vs -5/10 = -0.5 -> picks 1.
            (
                vec![-4.0, -5.0],
                vec!["a".to_string(), "bbbbbbbbbb".to_string()],
                1,
            ),
            // tie: first wins.
            (vec![-1.0, -1.0], vec!["x".to_string(), "y".to_string()], 0),
        ];
        let s = mc_scores(&docs);
        assert_eq!((s.acc, s.acc_norm, s.n), (0.5, 1.0, 2));
        assert!((s.acc_stderr - 0.5).abs() < 1e-12);
        assert_eq!(s.acc_norm_stderr, 0.0);
    }
}
