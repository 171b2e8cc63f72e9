//! Calibration data: documents from a named corpus or a file, and two seeded samplers.
//!
//! - [`Sampler::RandomWindows`] (SparseGPT / Wanda): for each sample, a random document long
//!   enough for the window, then a random window inside it. Short documents are never used,
//!   so with the staged C4 sample long windows reuse the few long documents.
//! - [`Sampler::ConcatChunks`] (the policy-gradient reference code's `group_texts`): every
//!   document tokenised and concatenated in order, cut into windows (the remainder dropped),
//!   the windows shuffled, the first N kept.
//!
//! Both draw from `ChaCha8Rng::seed_from_u64(seed)`, so a seed gives the same windows on every
//! machine. [`CalibInfo`] records what was drawn; every output that used calibration data
//! carries it.

use std::io::Read;
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{DataDirs, Error, PerplexityCorpus, Result};

/// How calibration windows are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sampler {
    /// A random window from a random long-enough document, per sample (SparseGPT / Wanda).
    RandomWindows,
    /// Concatenate all documents, chunk, shuffle, take the first N (PG reference code).
    ConcatChunks,
}

impl std::str::FromStr for Sampler {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "random-windows" | "wanda" => Ok(Self::RandomWindows),
            "concat-chunks" | "concat" => Ok(Self::ConcatChunks),
            o => Err(Error::Invalid(format!(
                "unknown calibration sampler `{o}`: use random-windows or concat-chunks"
            ))),
        }
    }
}

/// What a calibration set was drawn from and how; written next to every result that used it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibInfo {
    /// Dataset name or file given.
    pub dataset: String,
    /// The file read.
    pub path: PathBuf,
    /// Documents in the file.
    pub documents: usize,
    /// Sampler used.
    pub sampler: Sampler,
    /// Windows drawn.
    pub samples: usize,
    /// Tokens per window.
    pub seq_len: usize,
    /// Seed of the draw.
    pub seed: u64,
}

/// A drawn calibration set.
#[derive(Debug, Clone)]
pub struct Calibration {
    /// Token windows, each `seq_len` long.
    pub windows: Vec<Vec<u32>>,
    /// Provenance.
    pub info: CalibInfo,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// Reads the documents of a calibration source: `c4` (the staged C4 sample), `wikitext2`, `ptb`,
/// or a file: `.json.gz` / `.jsonl` (one JSON object per line with a `text` field) or plain
/// text (one document per blank-line-separated paragraph).
pub fn load_documents(source: &str, dirs: &DataDirs) -> Result<(PathBuf, Vec<String>)> {
    let path = match source {
        "c4" => dirs.find("c4", "c4-sample.00000-of-00001.json.gz")?,
        "wikitext2" | "ptb" => {
            let corpus = PerplexityCorpus::from_task(source)?;
            let (path, text, _) = corpus.load(dirs)?;
            let docs = text
                .split("\n\n")
                .map(str::trim)
                .filter(|d| !d.is_empty())
                .map(String::from)
                .collect();
            return Ok((path, non_empty(docs, Path::new(source))?));
        }
        p if Path::new(p).is_file() => PathBuf::from(p),
        other => {
            return Err(Error::Invalid(format!(
                "calibration data `{other}` is neither a known dataset (c4, wikitext2, ptb) nor an existing file"
            )));
        }
    };
    let name = path.to_string_lossy().into_owned();
    let mut bytes = Vec::new();
    std::fs::File::open(&path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io(&path))?;
    let text = if name.ends_with(".gz") {
        let mut s = String::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_string(&mut s)
            .map_err(|e| {
                Error::Invalid(format!(
                    "{}: not a valid gzip text file: {e}",
                    path.display()
                ))
            })?;
        s
    } else {
        String::from_utf8(bytes)
            .map_err(|e| Error::Invalid(format!("{}: not UTF-8 text: {e}", path.display())))?
    };
    let jsonl =
        name.ends_with(".jsonl") || name.ends_with(".json.gz") || name.ends_with(".jsonl.gz");
    let docs = if jsonl {
        let mut docs = Vec::new();
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
                Error::Invalid(format!("{} line {}: not JSON: {e}", path.display(), i + 1))
            })?;
            let t = v.get("text").and_then(|t| t.as_str()).ok_or_else(|| {
                Error::Invalid(format!(
                    "{} line {}: no string field `text`",
                    path.display(),
                    i + 1
                ))
            })?;
            docs.push(t.to_string());
        }
        docs
    } else {
        text.split("\n\n")
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(String::from)
            .collect()
    };
    let docs = non_empty(docs, &path)?;
    Ok((path, docs))
}

fn non_empty(docs: Vec<String>, path: &Path) -> Result<Vec<String>> {
    if docs.is_empty() {
        return Err(Error::Invalid(format!("{}: no documents", path.display())));
    }
    Ok(docs)
}

/// Draws `samples` windows of `seq_len` tokens from `docs` with `sampler` and `seed`.
/// `encode` tokenises one document (no special tokens).
#[allow(clippy::too_many_arguments)]
pub fn sample(
    dataset: &str,
    path: &Path,
    docs: &[String],
    encode: &dyn Fn(&str) -> std::result::Result<Vec<u32>, String>,
    sampler: Sampler,
    samples: usize,
    seq_len: usize,
    seed: u64,
) -> Result<Calibration> {
    if samples == 0 {
        return Err(Error::Invalid(
            "--calib-samples 0 draws nothing; give at least 1".into(),
        ));
    }
    if seq_len < 2 {
        return Err(Error::Invalid(format!(
            "--seq-len must be at least 2, got {seq_len}"
        )));
    }
    let enc = |d: &str| {
        encode(d).map_err(|e| Error::Invalid(format!("tokenising calibration text: {e}")))
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let windows = match sampler {
        Sampler::RandomWindows => {
            let tokens: Vec<Vec<u32>> = docs.iter().map(|d| enc(d)).collect::<Result<_>>()?;
            let long: Vec<usize> = (0..tokens.len())
                .filter(|&i| tokens[i].len() > seq_len)
                .collect();
            if long.is_empty() {
                return Err(Error::Invalid(format!(
                    "no document of {} is longer than {seq_len} tokens; use a shorter --seq-len or the concat-chunks sampler",
                    path.display()
                )));
            }
            (0..samples)
                .map(|_| {
                    let t = &tokens[long[rng.random_range(0..long.len())]];
                    let start = rng.random_range(0..t.len() - seq_len);
                    t[start..start + seq_len].to_vec()
                })
                .collect()
        }
        Sampler::ConcatChunks => {
            let (mut chunks, tokens) = concat_chunks(docs, &enc, seq_len)?;
            if chunks.len() < samples {
                return Err(Error::Invalid(format!(
                    "{} has {tokens} tokens: {} windows of {seq_len}, fewer than the {samples} asked for; lower --calib-samples or --seq-len",
                    path.display(),
                    chunks.len()
                )));
            }
            chunks.shuffle(&mut rng);
            chunks.truncate(samples);
            chunks
        }
    };
    Ok(Calibration {
        windows,
        info: CalibInfo {
            dataset: dataset.into(),
            path: path.to_owned(),
            documents: docs.len(),
            sampler,
            samples,
            seq_len,
            seed,
        },
    })
}

/// Every document tokenised and concatenated in order, cut into windows of `seq_len` (the
/// remainder dropped); and the number of tokens.
fn concat_chunks(
    docs: &[String],
    enc: &dyn Fn(&str) -> Result<Vec<u32>>,
    seq_len: usize,
) -> Result<(Vec<Vec<u32>>, usize)> {
    let mut all = Vec::new();
    for d in docs {
        all.extend(enc(d)?);
    }
    let chunks = all.chunks_exact(seq_len).map(<[u32]>::to_vec).collect();
    Ok((chunks, all.len()))
}

/// Every window of [`Sampler::ConcatChunks`] (no truncation), in the order of `seed`: training
/// data read in turn, with the tail held out.
pub fn all_windows(
    dataset: &str,
    path: &Path,
    docs: &[String],
    encode: &dyn Fn(&str) -> std::result::Result<Vec<u32>, String>,
    seq_len: usize,
    seed: u64,
) -> Result<Calibration> {
    let enc = |d: &str| encode(d).map_err(|e| Error::Invalid(format!("tokenising: {e}")));
    let (mut windows, tokens) = concat_chunks(docs, &enc, seq_len.max(1))?;
    if seq_len < 2 || windows.is_empty() {
        return Err(Error::Invalid(format!(
            "{} has {tokens} tokens: no window of {seq_len} tokens (--seq-len must be at least 2 and at most the text's length)",
            path.display()
        )));
    }
    // The same draw as `sample(.., ConcatChunks, windows.len(), ..)`.
    windows.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    Ok(Calibration {
        info: CalibInfo {
            dataset: dataset.into(),
            path: path.to_owned(),
            documents: docs.len(),
            sampler: Sampler::ConcatChunks,
            samples: windows.len(),
            seq_len,
            seed,
        },
        windows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One token per character.
    fn chars(s: &str) -> std::result::Result<Vec<u32>, String> {
        Ok(s.chars().map(|c| c as u32).collect())
    }

    fn docs() -> Vec<String> {
        vec![
            "abcdefghij".into(),
            "xy".into(),
            "0123456789ABCDEFGHIJ".into(),
        ]
    }

    #[test]
    fn random_windows_come_from_long_enough_documents_and_repeat_by_seed() {
        let p = Path::new("mem");
        let a = sample("t", p, &docs(), &chars, Sampler::RandomWindows, 20, 5, 9).unwrap();
        let b = sample("t", p, &docs(), &chars, Sampler::RandomWindows, 20, 5, 9).unwrap();
        let c = sample("t", p, &docs(), &chars, Sampler::RandomWindows, 20, 5, 10).unwrap();
        assert_eq!(a.windows, b.windows);
        assert_ne!(a.windows, c.windows);
        for w in &a.windows {
            assert_eq!(w.len(), 5);
            let s: String = w.iter().map(|&t| char::from_u32(t).unwrap()).collect();
            assert!(
                docs().iter().any(|d| d.contains(&s)) && !s.contains('x'),
                "{s}"
            );
        }
        assert_eq!(a.info.samples, 20);
        let e = sample("t", p, &docs(), &chars, Sampler::RandomWindows, 2, 50, 9).unwrap_err();
        assert!(e.to_string().contains("concat-chunks"), "{e}");
    }

    #[test]
    fn concat_chunks_cover_the_stream_without_overlap() {
        let p = Path::new("mem");
        let s = sample("t", p, &docs(), &chars, Sampler::ConcatChunks, 8, 4, 1).unwrap();
        // 32 chars -> 8 chunks of 4, all used, shuffled.
        let mut got = s.windows.clone();
        got.sort();
        let stream: Vec<u32> = chars(&docs().concat()).unwrap();
        let mut want: Vec<Vec<u32>> = stream.chunks_exact(4).map(<[u32]>::to_vec).collect();
        want.sort();
        assert_eq!(got, want);
        assert!(sample("t", p, &docs(), &chars, Sampler::ConcatChunks, 9, 4, 1).is_err());
        // All windows: the same order as the sampler drawing every one of them.
        let all = all_windows("t", p, &docs(), &chars, 4, 1).unwrap();
        assert_eq!(all.windows, s.windows);
        assert_eq!(all.info.samples, 8);
        assert!(all_windows("t", p, &docs(), &chars, 40, 1).is_err());
        assert!(all_windows("t", p, &docs(), &chars, 1, 1).is_err());
        assert!(sample("t", p, &docs(), &chars, Sampler::ConcatChunks, 0, 4, 1).is_err());
    }

    #[test]
    fn jsonl_gz_and_text_files_are_read_by_path() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let gz = dir.path().join("d.json.gz");
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(b"{\"text\": \"one\"}\n{\"text\": \"two\", \"url\": \"u\"}\n")
            .unwrap();
        std::fs::write(&gz, e.finish().unwrap()).unwrap();
        let dirs = DataDirs::default();
        assert_eq!(
            load_documents(gz.to_str().unwrap(), &dirs).unwrap().1,
            vec!["one", "two"]
        );
        let txt = dir.path().join("d.txt");
        std::fs::write(&txt, "para one\nstill\n\npara two\n").unwrap();
        assert_eq!(
            load_documents(txt.to_str().unwrap(), &dirs).unwrap().1,
            vec!["para one\nstill", "para two"]
        );
        let bad = dir.path().join("bad.jsonl");
        std::fs::write(&bad, "{\"text\": \"ok\"}\n{\"txt\": 1}\n").unwrap();
        let e = load_documents(bad.to_str().unwrap(), &dirs)
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("`text`"), "{e}");
        assert!(
            load_documents("nope", &dirs)
                .unwrap_err()
                .to_string()
                .contains("neither")
        );
    }
}
