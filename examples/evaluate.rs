//! Evaluate a model: WikiText-2 perplexity on 128-token windows and ARC-Easy zero-shot accuracy
//! (lm-evaluation-harness semantics), on the first windows and examples.
//!
//! ```text
//! cargo run --release -p lopper --example evaluate [-- MODEL]
//! ```
#![allow(clippy::print_stdout)]

use anyhow::Result;
use lopper::backend::{Flex, FlexDevice};
use lopper::data::{BosPolicy, DataDirs, McTask, PerplexityCorpus, windows};
use lopper::eval::{loglikelihoods, mc_scores_of_requests, perplexity};
use lopper::model::{ModelSpec, load, lopper_home};

fn main() -> Result<()> {
    let spec: ModelSpec = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "default".into())
        .parse()?;
    let loaded = load::<Flex>(&spec, &FlexDevice)?;
    let (model, tok) = (&loaded.model, &loaded.tokenizer);
    let dirs = DataDirs::from_env(&lopper_home());

    // Perplexity: the test split joined as the literature does, cut into 128-token windows.
    let (_, text, _) = PerplexityCorpus::Wikitext2.load(&dirs)?;
    let tokens = tok.encode(&text)?;
    let w = windows(&tokens, 128, BosPolicy::None, None, Some(40))?;
    let ppl = perplexity(model, &w, 8, None, |_| {})?;
    println!(
        "wikitext2 @128: ppl {:.3} over {} windows ({} predicted tokens)",
        ppl.ppl, ppl.windows, ppl.tokens
    );

    // Zero-shot multiple choice: the log-likelihood of each answer given the question.
    let (_, mut docs) = McTask::ArcEasy.load(&dirs)?;
    docs.truncate(50);
    let requests: Vec<(String, String)> = docs
        .iter()
        .flat_map(|d| d.requests.iter().cloned())
        .collect();
    let lls = loglikelihoods(model, tok, &requests, 8, |_| {})?;
    let s = mc_scores_of_requests(
        &lls,
        docs.iter()
            .map(|d| (d.requests.len(), &d.choices[..], d.gold)),
    );
    println!(
        "arc_easy: acc {:.3} ± {:.3}, acc_norm {:.3} ± {:.3} (n {})",
        s.acc, s.acc_stderr, s.acc_norm, s.acc_norm_stderr, s.n
    );
    Ok(())
}
