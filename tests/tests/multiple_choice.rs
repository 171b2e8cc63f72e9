//! Zero-shot multiple-choice tasks on the real data: official counts, requests built exactly as
//! lm-evaluation-harness 0.4 builds them, and scoring on the real model.

mod common;

use common::{data_dirs, default_model};
use lopper_data::McTask;

#[test]
fn every_task_loads_its_official_example_count() {
    let dirs = data_dirs();
    for task in McTask::ALL {
        let (_, docs) = task.load(&dirs).unwrap();
        assert_eq!(docs.len(), task.official_count(), "{}", task.name());
        assert!(
            docs.iter()
                .all(|d| d.gold < d.requests.len() && d.choices.len() == d.requests.len())
        );
    }
}

#[test]
fn first_documents_are_built_like_lm_eval() {
    let dirs = data_dirs();
    let first = |t: McTask| t.load(&dirs).unwrap().1.remove(0);

    let d = first(McTask::ArcEasy);
    assert_eq!(
        d.requests[0],
        (
            "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:".to_string(),
            " Sunlight is the source of energy for nearly all ecosystems.".to_string()
        )
    );
    assert_eq!(
        d.choices[0],
        "Sunlight is the source of energy for nearly all ecosystems."
    );

    let d = first(McTask::Piqa);
    assert_eq!(
        d.requests[0].0,
        "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    );
    assert!(d.requests[1].1.starts_with(
        " Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans"
    ));
    assert_eq!(d.gold, 0);

    let d = first(McTask::Winogrande);
    assert_eq!(
        d.requests[0].0,
        "Sarah was a much better surgeon than Maria so Sarah"
    );
    assert_eq!(
        d.requests[1].0,
        "Sarah was a much better surgeon than Maria so Maria"
    );
    assert_eq!(d.requests[0].1, " always got the easier cases.");
    assert_eq!(d.gold, 1);

    let d = first(McTask::Openbookqa);
    assert!(
        d.requests[0]
            .0
            .ends_with("they decide the best way to save money is to")
    );
    assert_eq!(d.requests[1].1, " quit eating lunch out");
    assert_eq!(d.gold, 1);

    let d = first(McTask::Hellaswag);
    assert_eq!(
        d.requests[3],
        (
            "Roof shingle removal: A man is sitting on a roof. he".to_string(),
            " starts pulling up roofing on a roof.".to_string()
        )
    );
    assert_eq!(d.gold, 3);
    assert_eq!(d.choices.len(), 4);

    let d = first(McTask::Boolq);
    assert!(
        d.requests[0]
            .0
            .starts_with("Ethanol fuel -- All biomass goes through")
    );
    assert!(
        d.requests[0]
            .0
            .ends_with("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    );
    assert_eq!(
        (d.requests[0].1.as_str(), d.requests[1].1.as_str()),
        (" no", " yes")
    );
    assert_eq!(d.gold, 0);
}

#[test]
fn continuation_tokens_follow_lm_evals_split_and_score_on_the_real_model() {
    let d = default_model();
    let tok = &d.tokenizer;
    // A trailing space of the context moves to the continuation.
    let (c, k) = lopper_eval::encode_pair(tok, "The sky is ", "blue").unwrap();
    assert_eq!(c, tok.encode("The sky is").unwrap());
    assert_eq!(
        [c.clone(), k.clone()].concat(),
        tok.encode("The sky is blue").unwrap()
    );
    // Log-likelihoods do not depend on batching or padding.
    let reqs: Vec<(String, String)> = vec![
        ("The capital of France is".into(), " Paris".into()),
        ("The capital of France is".into(), " a banana".into()),
        (
            "Question: What color is the sky on a clear day?\nAnswer:".into(),
            " blue".into(),
        ),
    ];
    let one = lopper_eval::loglikelihoods(&d.model, tok, &reqs, 1, |_| {}).unwrap();
    let all = lopper_eval::loglikelihoods(&d.model, tok, &reqs, 3, |_| {}).unwrap();
    for (a, b) in one.iter().zip(&all) {
        assert!((a.0 - b.0).abs() < 1e-3, "{a:?} vs {b:?}");
        assert_eq!(a.1, b.1);
    }
    assert!(
        one[0].0 > one[1].0,
        "Paris ({:?}) should beat a banana ({:?})",
        one[0],
        one[1]
    );
    assert!(one.iter().all(|l| l.0 < 0.0));
    assert!(!one[1].1, "` a banana` is not the greedy continuation");
    // Against the direct computation (full logits of each request on its own), with two
    // single-token answers that share one model input and a multi-token continuation.
    let reqs: Vec<(String, String)> = vec![
        ("Is water wet? Answer:".into(), " yes".into()),
        ("Is water wet? Answer:".into(), " no".into()),
        ("The capital of France is".into(), " a large city".into()),
    ];
    let got = lopper_eval::loglikelihoods(&d.model, tok, &reqs, 2, |_| {}).unwrap();
    for ((ctx, cont), g) in reqs.iter().zip(&got) {
        let (c, k) = lopper_eval::encode_pair(tok, ctx, cont).unwrap();
        let full = [c, k.clone()].concat();
        let t = d.model.tokens(std::slice::from_ref(&full)).unwrap();
        let nll: Vec<f32> = lopper_model::next_token_nll(d.model.forward(t.clone()), t)
            .into_data()
            .to_vec()
            .unwrap();
        let want: f64 = -nll[nll.len() - k.len()..]
            .iter()
            .map(|&x| x as f64)
            .sum::<f64>();
        assert!(
            (g.0 - want).abs() < 1e-3,
            "{ctx:?}{cont:?}: {} vs {want}",
            g.0
        );
    }
}

#[test]
fn lambada_splits_off_the_last_word_like_lm_eval() {
    let (_, reqs) = lopper_data::load_lambada(&data_dirs()).unwrap();
    assert_eq!(reqs.len(), 5153);
    assert!(reqs[0].0.starts_with("In my palm is a clear stone,"));
    assert!(
        reqs[0]
            .0
            .ends_with(" in a confident grin, I don't care about")
    );
    assert_eq!(reqs[0].1, " signs");
}
