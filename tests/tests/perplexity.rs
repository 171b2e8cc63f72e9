//! Perplexity on the real model and the real WikiText-2 / PTB test sets.

mod common;

use common::{data_dirs, default_model};
use lopper_data::{BosPolicy, PerplexityCorpus, windows};

#[test]
fn corpora_have_the_official_row_counts() {
    let dirs = data_dirs();
    let (_, text, rows) = PerplexityCorpus::Wikitext2.load(&dirs).unwrap();
    assert_eq!(rows, 4358);
    assert!(
        text.starts_with("\n\n = Robert Boulter = \n"),
        "{:?}",
        &text[..40]
    );
    assert_eq!(PerplexityCorpus::Ptb.load(&dirs).unwrap().2, 3761);
    assert_eq!(PerplexityCorpus::PtbValid.load(&dirs).unwrap().2, 3370);
}

#[test]
fn wikitext2_perplexity_is_the_mean_of_the_models_own_token_nlls() {
    let d = default_model();
    let (_, text, _) = PerplexityCorpus::Wikitext2.load(&data_dirs()).unwrap();
    let ids = d.tokenizer.encode(&text).unwrap();
    let win = windows(&ids, 128, BosPolicy::None, None, Some(3)).unwrap();
    assert_eq!(
        win[1][0], ids[128],
        "windows are consecutive slices of the stream"
    );
    let p = lopper_eval::perplexity(&d.model, &win, 2, None, |_| {}).unwrap();
    assert_eq!((p.windows, p.tokens), (3, 3 * 127));
    let mut direct = 0f64;
    for w in &win {
        let nll: Vec<f32> = d
            .model
            .token_nll(d.model.tokens(std::slice::from_ref(w)).unwrap(), None)
            .unwrap()
            .into_data()
            .to_vec()
            .unwrap();
        direct += nll.iter().map(|&x| x as f64).sum::<f64>();
    }
    assert!(
        (p.nll_sum - direct).abs() < 1e-3,
        "{} vs {direct}",
        p.nll_sum
    );
    assert!((p.ppl - (direct / 381.0).exp()).abs() < 1e-6 * p.ppl);
    assert!(
        p.ppl > 5.0 && p.ppl < 200.0,
        "a 135M model on WikiText-2: {}",
        p.ppl
    );
}

#[test]
fn the_staged_datasets_match_their_manifests() {
    let dirs = data_dirs();
    for m in lopper_data::Manifest::all() {
        let paths = m
            .verify(&dirs)
            .unwrap_or_else(|e| panic!("{}: {e}", m.name));
        assert_eq!(paths.len(), m.files.len());
    }
}
