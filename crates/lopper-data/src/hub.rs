//! Datasets from the Hugging Face hub: the hub's parquet conversion of a dataset (revision
//! `refs/convert/parquet`, files `<config>/<split>/NNNN.parquet`) is downloaded through
//! `hf-hub`, read row by row, and written in the staged file format the loaders read (the format
//! each manifest names), under `<lopper home>/datasets/<name>/`.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::{Error, Result};

/// How hub rows become one staged file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conversion {
    /// WikiText raw: the rows (lines with their newline; blank lines empty) concatenated.
    WikitextRaw,
    /// One line per row from the string column `sentence` (PTB text-only).
    SentenceLines,
    /// One JSON object per line, the row as it is.
    JsonLines,
    /// PIQA's labels file: the `label` column, one per line.
    LabelLines,
    /// ARC's V1 JSON lines: `{id, question: {stem, choices: [{text, label}]}, answerKey}` from
    /// the hub's flat `{id, question, choices: {text: [...], label: [...]}, answerKey}`.
    ArcV1,
}

/// Where a staged file comes from on the hub: `(config, split, conversion)`; `None` for files
/// lopper cannot rebuild from the hub (the C4 sample, HellaSwag's preprocessed text form).
pub fn hub_source(name: &str, file: &str) -> Option<(&'static str, &'static str, Conversion)> {
    use Conversion::*;
    Some(match (name, file) {
        ("wikitext2", "wiki.test.raw") => ("wikitext-2-raw-v1", "test", WikitextRaw),
        ("ptb", "ptb.test.txt") => ("penn_treebank", "test", SentenceLines),
        ("ptb", "ptb.valid.txt") => ("penn_treebank", "validation", SentenceLines),
        ("boolq", "val.jsonl") => ("boolq", "validation", JsonLines),
        ("piqa", "valid.jsonl") => ("plain_text", "validation", JsonLines),
        ("piqa", "valid-labels.lst") => ("plain_text", "validation", LabelLines),
        ("arc", "ARC-Easy-Test.jsonl") => ("ARC-Easy", "test", ArcV1),
        ("arc", "ARC-Challenge-Test.jsonl") => ("ARC-Challenge", "test", ArcV1),
        ("arc", "ARC-Easy-Dev.jsonl") => ("ARC-Easy", "validation", ArcV1),
        ("arc", "ARC-Challenge-Dev.jsonl") => ("ARC-Challenge", "validation", ArcV1),
        ("openbookqa", "main_test.jsonl") => ("main", "test", JsonLines),
        ("winogrande", "winogrande_xl_validation.jsonl") => {
            ("winogrande_xl", "validation", JsonLines)
        }
        ("lambada", "lambada_test.jsonl") => ("default", "test", JsonLines),
        _ => return None,
    })
}

/// The staged file's bytes from hub rows.
pub fn convert(rows: &[Map<String, Value>], conversion: Conversion) -> Result<Vec<u8>> {
    let field = |r: &Map<String, Value>, k: &str| -> Result<String> {
        match r.get(k) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Number(n)) => Ok(n.to_string()),
            Some(Value::Bool(b)) => Ok(b.to_string()),
            _ => Err(Error::Invalid(format!(
                "hub rows lack the column `{k}` (columns: {})",
                r.keys().cloned().collect::<Vec<_>>().join(", ")
            ))),
        }
    };
    let mut out = String::new();
    for r in rows {
        match conversion {
            Conversion::WikitextRaw => {
                let t = field(r, "text")?;
                out += if t.is_empty() { "\n" } else { &t };
            }
            Conversion::SentenceLines => {
                out += &field(r, "sentence")?;
                out.push('\n');
            }
            Conversion::LabelLines => {
                out += &field(r, "label")?;
                out.push('\n');
            }
            Conversion::JsonLines => {
                out += &serde_json::to_string(r).expect("JSON values serialise");
                out.push('\n');
            }
            Conversion::ArcV1 => {
                let choices = r.get("choices").ok_or_else(|| {
                    Error::Invalid("ARC hub rows lack the column `choices`".into())
                })?;
                let list = |k: &str| -> Vec<Value> {
                    choices
                        .get(k)
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default()
                };
                let (texts, labels) = (list("text"), list("label"));
                if texts.len() != labels.len() || texts.is_empty() {
                    return Err(Error::Invalid(
                        "ARC hub row: `choices.text` and `choices.label` differ in length".into(),
                    ));
                }
                let v = serde_json::json!({
                    "id": field(r, "id")?,
                    "question": {
                        "stem": field(r, "question")?,
                        "choices": texts.iter().zip(&labels)
                            .map(|(t, l)| serde_json::json!({"text": t, "label": l}))
                            .collect::<Vec<_>>(),
                    },
                    "answerKey": field(r, "answerKey")?,
                });
                out += &v.to_string();
                out.push('\n');
            }
        }
    }
    Ok(out.into_bytes())
}

/// Every row of a parquet file as a JSON object (strings, numbers, booleans, lists, structs).
#[cfg(feature = "hub")]
pub fn read_parquet_rows(path: &Path) -> Result<Vec<Map<String, Value>>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let bad = |e: String| {
        Error::Invalid(format!(
            "{}: not a readable parquet file: {e}",
            path.display()
        ))
    };
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })?;
    let reader = SerializedFileReader::new(file).map_err(|e| bad(e.to_string()))?;
    let mut rows = Vec::new();
    for row in reader.get_row_iter(None).map_err(|e| bad(e.to_string()))? {
        match row.map_err(|e| bad(e.to_string()))?.to_json_value() {
            Value::Object(m) => rows.push(m),
            other => return Err(bad(format!("a row is not a record: {other}"))),
        }
    }
    Ok(rows)
}

/// Downloads (or finds in the hf-hub cache) the parquet shards of `repo`'s `config`/`split`.
#[cfg(feature = "hub")]
fn download(repo: &str, config: &str, split: &str) -> std::result::Result<Vec<PathBuf>, String> {
    use hf_hub::{Repo, RepoType};
    if std::env::var_os("HF_HUB_OFFLINE").is_some_and(|v| v == "1") {
        return Err("HF_HUB_OFFLINE=1".into());
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .map_err(|e| e.to_string())?;
    let r = api.repo(Repo::with_revision(
        repo.into(),
        RepoType::Dataset,
        "refs%2Fconvert%2Fparquet".into(),
    ));
    let mut shards = Vec::new();
    for i in 0.. {
        match r.get(&format!("{config}/{split}/{i:04}.parquet")) {
            Ok(p) => shards.push(p),
            Err(e) if shards.is_empty() => return Err(e.to_string()),
            Err(_) => break,
        }
    }
    Ok(shards)
}

/// Rebuilds `<root>/<name>/<file>` from the hub; the error says why it could not.
#[cfg(feature = "hub")]
pub fn materialize(name: &str, file: &str, root: &Path) -> std::result::Result<PathBuf, String> {
    let manifest = crate::Manifest::get(name).map_err(|e| e.to_string())?;
    let (config, split, conv) = hub_source(name, file).ok_or_else(|| {
        format!("the hub's rows of `{name}` cannot be turned into {file}; stage the file (see PROVENANCE.md)")
    })?;
    let repo = &manifest.hub.repo;
    let shards =
        download(repo, config, split).map_err(|e| format!("{repo} ({config}/{split}): {e}"))?;
    let mut rows = Vec::new();
    for s in &shards {
        rows.extend(read_parquet_rows(s).map_err(|e| e.to_string())?);
    }
    let bytes = convert(&rows, conv).map_err(|e| e.to_string())?;
    let path = root.join(name).join(file);
    std::fs::create_dir_all(root.join(name)).map_err(|e| e.to_string())?;
    lopper_core::write_atomic(&path, &bytes).map_err(|e| e.to_string())?;
    tracing::info!(dataset = name, file, rows = rows.len(), path = %path.display(), "staged from the hub");
    Ok(path)
}

/// Without the `hub` feature there is no hub step.
#[cfg(not(feature = "hub"))]
pub fn materialize(name: &str, file: &str, _root: &Path) -> std::result::Result<PathBuf, String> {
    Err(format!(
        "{name}/{file}: lopper-data was built without the `hub` feature"
    ))
}
