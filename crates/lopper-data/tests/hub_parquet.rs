//! The hub step's parquet reader and row conversions, on small parquet files written by pyarrow
//! (the library the hub's conversion uses) with the hub's schemas: `tests/fixtures/`, made by
//! `scripts/make_parquet_fixtures.py`.

use std::path::PathBuf;

use lopper_data::hub::{Conversion, convert, hub_source, read_parquet_rows};
use lopper_data::{DataDirs, McTask, PerplexityCorpus};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[test]
fn wikitext_rows_become_the_raw_file_and_read_back_as_the_same_rows() {
    // Snappy-compressed, one string column.
    let rows = read_parquet_rows(&fixture("wikitext-test.parquet")).unwrap();
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[0]["text"], " = Robert Boulter = \n");
    assert_eq!(rows[1]["text"], "");
    let raw = String::from_utf8(convert(&rows, Conversion::WikitextRaw).unwrap()).unwrap();
    let back = PerplexityCorpus::Wikitext2.rows_from_text(&raw);
    let want: Vec<String> = rows
        .iter()
        .map(|r| r["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(back, want);
}

#[test]
fn arc_rows_with_nested_choices_become_arc_v1_documents() {
    // Zstd-compressed, with a struct of lists.
    let rows = read_parquet_rows(&fixture("arc-test.parquet")).unwrap();
    assert_eq!(rows.len(), 2);
    let text = String::from_utf8(convert(&rows, Conversion::ArcV1).unwrap()).unwrap();
    let docs: Vec<_> = text
        .lines()
        .map(|l| {
            McTask::ArcEasy
                .doc(&serde_json::from_str(l).unwrap(), None)
                .unwrap()
        })
        .collect();
    assert_eq!(docs[0].gold, 2);
    assert_eq!(docs[0].choices[2], "Planetary days will become shorter.");
    assert!(docs[0].requests[0].0.starts_with("Question: An astronomer"));
    // Digit answer keys map like letters.
    assert_eq!(docs[1].gold, 1);
    assert_eq!(docs[1].choices, vec!["ice", "steam", "rock"]);
}

#[test]
fn boolq_rows_keep_their_integer_labels() {
    let rows = read_parquet_rows(&fixture("boolq-validation.parquet")).unwrap();
    let text = String::from_utf8(convert(&rows, Conversion::JsonLines).unwrap()).unwrap();
    let doc = McTask::Boolq
        .doc(&serde_json::from_str(text.trim()).unwrap(), None)
        .unwrap();
    assert_eq!(doc.gold, 1, "label 1 is `yes`");
    assert!(doc.requests[0].0.ends_with("language?\nAnswer:"));
}

#[test]
fn unreadable_parquet_and_unconvertible_datasets_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.parquet");
    std::fs::write(&bad, b"PAR1 this is not parquet").unwrap();
    let e = read_parquet_rows(&bad).unwrap_err().to_string();
    assert!(e.contains("not a readable parquet file"), "{e}");
    let rows = read_parquet_rows(&fixture("boolq-validation.parquet")).unwrap();
    let e = convert(&rows, Conversion::SentenceLines)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`sentence`"), "{e}");
    // Every staged file of the evaluation sets has a hub source, except the two lopper cannot
    // rebuild; asking the hub for those names the reason and the fix.
    assert!(hub_source("wikitext2", "wiki.test.raw").is_some());
    assert!(hub_source("hellaswag", "hellaswag_val_full.txt.bz2").is_none());
    let dirs = DataDirs {
        roots: vec![dir.path().join("none")],
        hub: Some(dir.path().join("stage")),
    };
    let e = McTask::Hellaswag.load(&dirs).unwrap_err().to_string();
    assert!(
        e.contains("Hugging Face hub")
            && e.contains("PROVENANCE.md")
            && e.contains("LOPPER_DATA_DIR"),
        "{e}"
    );
}
