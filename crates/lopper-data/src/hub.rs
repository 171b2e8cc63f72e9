//! Datasets from the Hugging Face hub: the hub's parquet conversion of a dataset (revision
//! `refs/convert/parquet`, files `<config>/<split>/NNNN.parquet`) is downloaded through
//! `hf-hub`, read row by row, and written in the staged file format the loaders read (the format
//! each manifest names), under `<lopper home>/datasets/<name>/`.
//!
//! C4 is the exception: the staged calibration sample cannot be rebuilt from the hub, so the
//! fallback downloads the shard that SparseGPT and Wanda calibrate on ([`C4_SHARD`] of
//! `allenai/c4`) and keeps a seeded uniform sample of [`C4_SAMPLE_DOCS`] of its documents
//! ([`sample_jsonl_gz`]) as [`C4_SHARD_SAMPLE`], in the same gzip JSON-lines form.

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

/// The C4 shard the SparseGPT / Wanda calibration reads, inside `allenai/c4`.
pub const C4_SHARD: &str = "en/c4-train.00000-of-01024.json.gz";
/// Documents kept from [`C4_SHARD`] (the staged sample also holds 1,000).
pub const C4_SAMPLE_DOCS: usize = 1000;
/// Seed of the document sample drawn from [`C4_SHARD`].
pub const C4_SAMPLE_SEED: u64 = 0;
/// The file the hub fallback of `c4` writes under `<root>/c4/`.
pub const C4_SHARD_SAMPLE: &str = "c4-train.00000-of-01024.sample.json.gz";
/// The staged C4 calibration sample (see the `c4` manifest).
pub const C4_STAGED: &str = "c4-sample.00000-of-00001.json.gz";

/// A seeded uniform sample of `n` lines (documents) of a gzip JSON-lines file, in the order
/// they appear in the file, gzip-compressed again. Every kept line must be a JSON object with a
/// string `text`. Reads the file as a stream (reservoir sampling), so a 300 MB shard needs only
/// the kept documents in memory. Fewer than `n` documents keeps them all.
pub fn sample_jsonl_gz(path: &Path, n: usize, seed: u64) -> Result<Vec<u8>> {
    use std::io::{BufRead, Write};

    use rand::{Rng, SeedableRng};
    let bad = |e: String| Error::Invalid(format!("{}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })?;
    let reader = std::io::BufReader::new(flate2::read::MultiGzDecoder::new(file));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut kept: Vec<(usize, String)> = Vec::with_capacity(n);
    let mut seen = 0usize;
    for line in reader.lines() {
        let line = line.map_err(|e| bad(format!("not a readable gzip text file: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let i = seen;
        seen += 1;
        let slot = if kept.len() < n {
            Some(kept.len())
        } else {
            let j = rng.random_range(0..seen);
            (j < n).then_some(j)
        };
        if let Some(j) = slot {
            let v: Value = serde_json::from_str(&line)
                .map_err(|e| bad(format!("document {i} is not JSON: {e}")))?;
            if !v.get("text").is_some_and(Value::is_string) {
                return Err(bad(format!("document {i} has no string `text`")));
            }
            if j == kept.len() {
                kept.push((i, line));
            } else {
                kept[j] = (i, line);
            }
        }
    }
    if kept.is_empty() {
        return Err(bad("holds no documents".into()));
    }
    kept.sort_by_key(|(i, _)| *i);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    for (_, line) in &kept {
        gz.write_all(line.as_bytes())
            .and_then(|_| gz.write_all(b"\n"))
            .map_err(|e| bad(e.to_string()))?;
    }
    gz.finish().map_err(|e| bad(e.to_string()))
}

/// Writes `<root>/c4/`[`C4_SHARD_SAMPLE`] from a downloaded copy of [`C4_SHARD`] and returns
/// its path (an existing one is reused).
pub fn stage_c4_sample(shard: &Path, root: &Path) -> Result<PathBuf> {
    let path = root.join("c4").join(C4_SHARD_SAMPLE);
    if path.is_file() {
        return Ok(path);
    }
    let bytes = sample_jsonl_gz(shard, C4_SAMPLE_DOCS, C4_SAMPLE_SEED)?;
    std::fs::create_dir_all(root.join("c4")).map_err(|source| Error::Io {
        path: root.join("c4"),
        source,
    })?;
    lopper_core::write_atomic(&path, &bytes)
        .map_err(|e| Error::Invalid(format!("writing {}: {e}", path.display())))?;
    tracing::info!(shard = %shard.display(), path = %path.display(), "C4 calibration sample staged from the hub shard");
    Ok(path)
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
    let r = api()?.repo(Repo::with_revision(
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

/// An API client honouring `HF_HUB_OFFLINE` and the hf-hub environment (token, cache).
#[cfg(feature = "hub")]
fn api() -> std::result::Result<hf_hub::api::sync::Api, String> {
    if std::env::var_os("HF_HUB_OFFLINE").is_some_and(|v| v == "1") {
        return Err("HF_HUB_OFFLINE=1".into());
    }
    hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .map_err(|e| e.to_string())
}

/// Rebuilds `<root>/<name>/<file>` from the hub; the error says why it could not. For the C4
/// calibration sample this is a sample of the SparseGPT / Wanda shard ([`stage_c4_sample`]).
#[cfg(feature = "hub")]
pub fn materialize(name: &str, file: &str, root: &Path) -> std::result::Result<PathBuf, String> {
    let manifest = crate::Manifest::get(name).map_err(|e| e.to_string())?;
    if (name, file) == ("c4", C4_STAGED) {
        let staged = root.join("c4").join(C4_SHARD_SAMPLE);
        if staged.is_file() {
            return Ok(staged);
        }
        let repo = &manifest.hub.repo;
        tracing::info!(
            repo,
            file = C4_SHARD,
            "downloading the C4 calibration shard"
        );
        let shard = api()?
            .dataset(repo.clone())
            .get(C4_SHARD)
            .map_err(|e| format!("{repo} ({C4_SHARD}): {e}"))?;
        return stage_c4_sample(&shard, root).map_err(|e| e.to_string());
    }
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

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;
    use crate::{DataDirs, load_documents};

    /// A small stand-in for the C4 shard: `n` gzip JSON lines `{text, timestamp, url}`.
    fn shard(dir: &Path, n: usize) -> PathBuf {
        let path = dir.join("c4-train.00000-of-01024.json.gz");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        for i in 0..n {
            let doc = serde_json::json!({
                "text": format!("Document {i} of the shard. It has a few sentences in it."),
                "timestamp": "2019-04-25T12:57:54Z",
                "url": format!("https://example.org/{i}"),
            });
            writeln!(gz, "{doc}").unwrap();
        }
        std::fs::write(&path, gz.finish().unwrap()).unwrap();
        path
    }

    fn texts(bytes: &[u8]) -> Vec<String> {
        let mut s = String::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_string(&mut s)
            .unwrap();
        s.lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["text"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn the_shard_sample_is_seeded_uniform_and_in_file_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = shard(dir.path(), 500);
        let a = texts(&sample_jsonl_gz(&path, 40, 7).unwrap());
        assert_eq!(a, texts(&sample_jsonl_gz(&path, 40, 7).unwrap()));
        assert_ne!(a, texts(&sample_jsonl_gz(&path, 40, 8).unwrap()));
        assert_eq!(a.len(), 40);
        let idx: Vec<usize> = a
            .iter()
            .map(|t| t.split(' ').nth(1).unwrap().parse().unwrap())
            .collect();
        assert!(idx.windows(2).all(|w| w[0] < w[1]), "{idx:?}");
        // Not a prefix: a uniform sample of 40 of 500 reaches past the first 100 documents.
        assert!(*idx.last().unwrap() > 100, "{idx:?}");
        // Fewer documents than asked for: all of them.
        assert_eq!(
            texts(&sample_jsonl_gz(&path, 10_000, 7).unwrap()).len(),
            500
        );
    }

    #[test]
    fn the_c4_fallback_stages_a_sample_the_calibration_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = shard(dir.path(), 1500);
        let root = dir.path().join("home");
        let staged = stage_c4_sample(&path, &root).unwrap();
        assert_eq!(staged, root.join("c4").join(C4_SHARD_SAMPLE));
        let dirs = DataDirs {
            roots: vec![root.clone()],
            hub: None,
        };
        let (p, docs) = load_documents(staged.to_str().unwrap(), &dirs).unwrap();
        assert_eq!(p, staged);
        assert_eq!(docs.len(), C4_SAMPLE_DOCS);
        // Staged once: a second call reuses the file even without the shard.
        assert_eq!(
            stage_c4_sample(Path::new("/nonexistent"), &root).unwrap(),
            staged
        );
    }

    #[test]
    fn a_corrupt_shard_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.json.gz");
        std::fs::write(&p, b"not gzip at all").unwrap();
        let e = sample_jsonl_gz(&p, 10, 0).unwrap_err().to_string();
        assert!(e.contains("bad.json.gz") && e.contains("gzip"), "{e}");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        writeln!(gz, "{{\"url\": \"x\"}}").unwrap();
        std::fs::write(&p, gz.finish().unwrap()).unwrap();
        let e = sample_jsonl_gz(&p, 10, 0).unwrap_err().to_string();
        assert!(e.contains("no string `text`"), "{e}");
    }
}
