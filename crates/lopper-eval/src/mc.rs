//! Log-likelihood scoring of (context, continuation) requests and multiple-choice metrics with
//! lm-evaluation-harness 0.4 semantics.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
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

/// One model input and the requests it serves: (request index, continuation tokens).
type SharedInput = (Vec<u32>, Vec<(usize, Vec<u32>)>);

/// For each request: the sum of log-probabilities of the continuation given its context, and
/// whether every continuation token is the model's greedy (argmax) choice.
///
/// Work saved without changing any number: requests whose model input (context and continuation
/// without its last token) is identical share one sequence (BoolQ's "yes"/"no", single-token
/// answers); sequences run `batch_size` at a time, sorted by length and right-padded (padding
/// after a sequence cannot change its logits in a causal model); the LM head and the softmax run
/// only at the positions that predict continuation tokens. `progress(done)` counts requests.
pub fn loglikelihoods<B: Backend>(
    model: &Llama<B>,
    tok: &Tokenizer,
    requests: &[(String, String)],
    batch_size: usize,
    mut progress: impl FnMut(usize),
) -> Result<Vec<(f64, bool)>> {
    // Unique model inputs, and per input the requests it serves: (request, targets).
    let mut index: std::collections::HashMap<Vec<u32>, usize> = std::collections::HashMap::new();
    let mut inputs: Vec<SharedInput> = Vec::new();
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
        let targets = full[full.len() - cont_len..].to_vec();
        full.pop();
        let slot = *index.entry(full.clone()).or_insert_with(|| {
            inputs.push((full, Vec::new()));
            inputs.len() - 1
        });
        inputs[slot].1.push((i, targets));
    }
    inputs.sort_by_key(|(f, _)| std::cmp::Reverse(f.len()));
    let mut out = vec![(0f64, false); requests.len()];
    let mut done = 0;
    // The final hidden states and the LM head live on the last layer's device (a placed model).
    let device = model.head_device();
    for batch in inputs.chunks(batch_size.max(1)) {
        let len = batch.iter().map(|(f, _)| f.len()).max().unwrap_or(1);
        let rows: Vec<Vec<u32>> = batch
            .iter()
            .map(|(f, _)| {
                let mut r = f.clone();
                r.resize(len, 0);
                r
            })
            .collect();
        // Flat hidden-state rows that predict a continuation token, and those tokens.
        let (mut at, mut want) = (Vec::new(), Vec::new());
        for (row, (f, reqs)) in batch.iter().enumerate() {
            for (_, targets) in reqs {
                // Target j of k predicts from input position len(f) - k + j.
                let start = f.len() - targets.len();
                for (j, &t) in targets.iter().enumerate() {
                    at.push((row * len + start + j) as i64);
                    want.push(t as i64);
                }
            }
        }
        let hidden = model.forward_hidden(model.tokens(&rows)?, None)?;
        let hidden = hidden.to_device(&device);
        let picked = hidden.select(
            0,
            Tensor::<B, 1, Int>::from_data(TensorData::new(at.clone(), [at.len()]), &device),
        );
        let logits = model.head(picked).unsqueeze_dim::<3>(0);
        let targets =
            Tensor::<B, 1, Int>::from_data(TensorData::new(want.clone(), [want.len()]), &device)
                .unsqueeze_dim::<2>(0);
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
        let mut k = 0;
        for (_, reqs) in batch {
            for (i, targets) in reqs {
                let n = targets.len();
                let s: f64 = nll[k..k + n].iter().map(|&x| x as f64).sum();
                let is_greedy = (k..k + n).all(|j| greedy[j] == want[j]);
                out[*i] = (-s, is_greedy);
                k += n;
                done += 1;
            }
        }
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

/// [`mc_scores`] from the log-likelihoods of all documents' requests in order (what
/// [`loglikelihoods`] returns for the concatenated requests): document `i`, given as
/// `(requests, choice strings, gold)`, owns the next `requests` values of `lls`.
///
/// # Panics
/// If `lls` holds fewer values than the documents' requests together.
pub fn mc_scores_of_requests<'a>(
    lls: &[(f64, bool)],
    docs: impl IntoIterator<Item = (usize, &'a [String], usize)>,
) -> McScores {
    let mut at = 0;
    let scored: Vec<(Vec<f64>, Vec<String>, usize)> = docs
        .into_iter()
        .map(|(n, choices, gold)| {
            let doc_lls = lls[at..at + n].iter().map(|l| l.0).collect();
            at += n;
            (doc_lls, choices.to_vec(), gold)
        })
        .collect();
    mc_scores(&scored)
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
        // The same documents from one flat list of request log-likelihoods.
        let flat: Vec<(f64, bool)> = docs
            .iter()
            .flat_map(|d| d.0.iter().map(|&l| (l, false)))
            .collect();
        let grouped = mc_scores_of_requests(&flat, docs.iter().map(|d| (d.0.len(), &d.1[..], d.2)));
        assert_eq!(grouped, s);
    }
}
