#![doc = include_str!("../README.md")]

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod calib;
pub mod hub;
mod manifest;
mod mc;
pub use calib::{CalibInfo, Calibration, Sampler, all_windows, load_documents, sample};
pub use manifest::{HubLocation, Manifest, ManifestFile};
pub use mc::{McDoc, McTask, load_lambada};

/// Errors of dataset resolution and reading.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The dataset's files were found nowhere.
    #[error("dataset `{name}`: {file} not found; looked in {}{}. Run `cargo xtask setup` from a lopper checkout (it copies the repository's datasets/ into the lopper home), set LOPPER_DATA_DIR to a folder holding `{name}/{file}`, or allow the hub (unset LOPPER_NO_HUB)", tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "), hub.as_ref().map(|h| format!(", then the Hugging Face hub ({h})")).unwrap_or_default())]
    NotFound {
        /// Dataset name.
        name: String,
        /// The file that was looked for.
        file: String,
        /// Folders tried, in order.
        tried: Vec<PathBuf>,
        /// Why the hub step failed, when it was tried.
        hub: Option<String>,
    },
    /// A task name lopper does not know.
    #[error("unknown task `{0}`; perplexity tasks are: wikitext2, ptb, ptb_valid, c4")]
    UnknownTask(String),
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Settings that cannot work (window length 0, limit 0, ...).
    #[error("{0}")]
    Invalid(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Where datasets are looked for, in order.
#[derive(Debug, Clone, Default)]
pub struct DataDirs {
    /// Folders that hold `<name>/` dataset folders, in order of preference.
    pub roots: Vec<PathBuf>,
    /// Where files rebuilt from the Hugging Face hub are staged (`None`: no hub step).
    pub hub: Option<PathBuf>,
}

/// The repository's own `datasets/` folder, when this build runs from a checkout (it is looked
/// up at run time, so an installed binary whose source folder is gone simply skips it).
pub fn checkout_datasets() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets");
    p.join("c4.json")
        .is_file()
        .then(|| p.canonicalize().unwrap_or(p))
}

impl DataDirs {
    /// `$LOPPER_DATA_DIR`, then the repository's `datasets/` (in a checkout; see
    /// [`checkout_datasets`]), then `<lopper home>/datasets` (where `cargo xtask setup` copies
    /// them), then the hub (staging into the lopper home; `LOPPER_NO_HUB=1` or
    /// `HF_HUB_OFFLINE=1` turns the hub step off).
    pub fn from_env(lopper_home: &Path) -> Self {
        let mut roots = Vec::new();
        if let Some(d) = std::env::var_os("LOPPER_DATA_DIR").filter(|d| !d.is_empty()) {
            roots.push(PathBuf::from(d));
        }
        roots.extend(checkout_datasets());
        let home = lopper_home.join("datasets");
        roots.push(home.clone());
        let off = |v: &str| std::env::var_os(v).is_some_and(|x| x == "1");
        Self {
            roots,
            hub: (!off("LOPPER_NO_HUB") && !off("HF_HUB_OFFLINE")).then_some(home),
        }
    }

    /// The repository's own datasets and nothing else (no hub): what the tests read.
    pub fn checkout() -> Result<Self> {
        let root = checkout_datasets().ok_or_else(|| {
            Error::Invalid(format!(
                "{}/../../datasets is not a lopper checkout's datasets folder; run from a checkout or set LOPPER_DATA_DIR",
                env!("CARGO_MANIFEST_DIR")
            ))
        })?;
        Ok(Self {
            roots: vec![root],
            hub: None,
        })
    }

    /// Copies every file of every manifest from the first root that has it into `dest/<name>/`
    /// (skipping files already there with the right size and hash), checking each against its
    /// manifest. Returns the files written. `cargo xtask setup` uses it to place the
    /// repository's datasets in the lopper home, so a binary run from anywhere finds them.
    pub fn install_into(&self, dest: &Path) -> Result<Vec<PathBuf>> {
        let target = DataDirs {
            roots: vec![dest.to_owned()],
            hub: None,
        };
        let mut written = Vec::new();
        for m in Manifest::all() {
            if m.verify(&target).is_ok() {
                continue;
            }
            for (src, f) in m.verify(self)?.into_iter().zip(&m.files) {
                let to = dest.join(&f.path);
                let bytes = std::fs::read(&src).map_err(|source| Error::Io {
                    path: src.clone(),
                    source,
                })?;
                if let Some(dir) = to.parent() {
                    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
                        path: dir.to_owned(),
                        source,
                    })?;
                }
                lopper_core::write_atomic(&to, &bytes)
                    .map_err(|e| Error::Invalid(format!("writing {}: {e}", to.display())))?;
                written.push(to);
            }
            m.verify(&target)?;
        }
        Ok(written)
    }

    /// The path of `file` of dataset `name`: `<root>/<name>/<file>` under the first root that
    /// has it, else the file rebuilt from the hub's parquet conversion (see [`hub`]).
    pub fn find(&self, name: &str, file: &str) -> Result<PathBuf> {
        let tried: Vec<PathBuf> = self.roots.iter().map(|r| r.join(name)).collect();
        if let Some(p) = tried.iter().map(|d| d.join(file)).find(|p| p.is_file()) {
            return Ok(p);
        }
        let hub = match &self.hub {
            Some(root) => match hub::materialize(name, file, root) {
                Ok(p) => return Ok(p),
                Err(why) => Some(why),
            },
            None => None,
        };
        Err(Error::NotFound {
            name: name.into(),
            file: file.into(),
            tried,
            hub,
        })
    }
}

/// A perplexity corpus and how its rows are joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PerplexityCorpus {
    /// WikiText-2 raw, test split: rows joined with "\n\n".
    Wikitext2,
    /// Penn Treebank (Mikolov), test split: rows joined with " ".
    Ptb,
    /// Penn Treebank, validation split.
    PtbValid,
    /// The staged C4 sample (1,000 documents of C4 `en`, not the official validation shard):
    /// document texts joined with " ", as SparseGPT/Wanda join C4 validation documents.
    C4,
}

impl PerplexityCorpus {
    /// Parses a task name.
    pub fn from_task(task: &str) -> Result<Self> {
        match task {
            "wikitext2" => Ok(Self::Wikitext2),
            "ptb" => Ok(Self::Ptb),
            "ptb_valid" => Ok(Self::PtbValid),
            "c4" => Ok(Self::C4),
            other => Err(Error::UnknownTask(other.into())),
        }
    }

    /// The task name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Wikitext2 => "wikitext2",
            Self::Ptb => "ptb",
            Self::PtbValid => "ptb_valid",
            Self::C4 => "c4",
        }
    }

    fn location(self) -> (&'static str, &'static str) {
        match self {
            Self::Wikitext2 => ("wikitext2", "wiki.test.raw"),
            Self::Ptb => ("ptb", "ptb.test.txt"),
            Self::PtbValid => ("ptb", "ptb.valid.txt"),
            Self::C4 => ("c4", "c4-sample.00000-of-00001.json.gz"),
        }
    }

    /// The Hugging Face rows of the split, read from the raw file.
    ///
    /// - WikiText-2: each line *with* its trailing "\n"; whitespace-only lines become "".
    /// - PTB (`ptb_text_only`): each line's words joined by one space (the leading space and the
    ///   newline dropped).
    pub fn rows_from_text(self, text: &str) -> Vec<String> {
        match self {
            Self::Wikitext2 => text
                .split_inclusive('\n')
                .map(|l| {
                    if l.trim().is_empty() {
                        String::new()
                    } else {
                        l.to_string()
                    }
                })
                .collect(),
            Self::Ptb | Self::PtbValid => text
                .lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect(),
            // C4 rows are JSON documents; see `load`.
            Self::C4 => text.lines().map(String::from).collect(),
        }
    }

    /// The separator the literature joins rows with.
    pub fn joiner(self) -> &'static str {
        match self {
            Self::Wikitext2 => "\n\n",
            Self::Ptb | Self::PtbValid | Self::C4 => " ",
        }
    }

    /// Reads the split from `dirs` and returns (file, joined text, row count).
    pub fn load(self, dirs: &DataDirs) -> Result<(PathBuf, String, usize)> {
        if self == Self::C4 {
            let (path, docs) = calib::load_documents("c4", dirs)?;
            let n = docs.len();
            return Ok((path, docs.join(self.joiner()), n));
        }
        let (name, file) = self.location();
        let path = dirs.find(name, file)?;
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let rows = self.rows_from_text(&text);
        let n = rows.len();
        Ok((path, rows.join(self.joiner()), n))
    }
}

/// Whether each window starts with a BOS token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BosPolicy {
    /// Windows are plain slices of the token stream (the pruning literature's protocol).
    None,
    /// Each window is BOS followed by `seq_len - 1` tokens of the stream; BOS is not scored as a target.
    Window,
}

impl std::str::FromStr for BosPolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Self::None),
            "window" => Ok(Self::Window),
            o => Err(Error::Invalid(format!(
                "unknown BOS policy `{o}`: use none or window"
            ))),
        }
    }
}

/// Cuts `tokens` into non-overlapping windows of `seq_len` tokens, dropping the remainder.
/// With [`BosPolicy::Window`] each window is `[bos] + seq_len - 1` stream tokens.
/// `limit` keeps only the first windows.
pub fn windows(
    tokens: &[u32],
    seq_len: usize,
    bos: BosPolicy,
    bos_id: Option<u32>,
    limit: Option<usize>,
) -> Result<Vec<Vec<u32>>> {
    if seq_len < 2 {
        return Err(Error::Invalid(format!(
            "--seq-len must be at least 2, got {seq_len}"
        )));
    }
    if limit == Some(0) {
        return Err(Error::Invalid(
            "--limit 0 evaluates nothing; give a positive limit or none".into(),
        ));
    }
    let body = match bos {
        BosPolicy::None => seq_len,
        BosPolicy::Window => seq_len - 1,
    };
    let bos_id = match (bos, bos_id) {
        (BosPolicy::Window, None) => {
            return Err(Error::Invalid(
                "--bos window: the tokenizer has no BOS token".into(),
            ));
        }
        (_, b) => b,
    };
    let mut out: Vec<Vec<u32>> = tokens
        .chunks_exact(body)
        .map(|c| match bos {
            BosPolicy::None => c.to_vec(),
            BosPolicy::Window => std::iter::once(bos_id.unwrap())
                .chain(c.iter().copied())
                .collect(),
        })
        .collect();
    if let Some(l) = limit {
        out.truncate(l);
    }
    if out.is_empty() {
        return Err(Error::Invalid(format!(
            "the text has {} tokens, fewer than one window of {seq_len}",
            tokens.len()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wikitext_rows_keep_their_newline_and_blank_lines_become_empty() {
        let rows = PerplexityCorpus::Wikitext2.rows_from_text(" \n = Title = \n \n text here\n");
        assert_eq!(rows, vec!["", " = Title = \n", "", " text here\n"]);
        assert_eq!(rows.join("\n\n"), "\n\n = Title = \n\n\n\n\n text here\n");
    }

    #[test]
    fn ptb_rows_are_space_normalised() {
        let rows = PerplexityCorpus::Ptb.rows_from_text(" a b  c \n d\n");
        assert_eq!(rows.join(" "), "a b c d");
    }

    #[test]
    fn windows_drop_the_remainder_and_respect_bos() {
        let t: Vec<u32> = (10..20).collect();
        assert_eq!(
            windows(&t, 4, BosPolicy::None, None, None).unwrap(),
            vec![vec![10, 11, 12, 13], vec![14, 15, 16, 17]]
        );
        assert_eq!(
            windows(&t, 4, BosPolicy::Window, Some(1), Some(2)).unwrap(),
            vec![vec![1, 10, 11, 12], vec![1, 13, 14, 15]]
        );
        assert!(
            windows(&t, 4, BosPolicy::None, None, Some(0))
                .unwrap_err()
                .to_string()
                .contains("--limit 0")
        );
        assert!(
            windows(&t, 11, BosPolicy::None, None, None)
                .unwrap_err()
                .to_string()
                .contains("fewer than one window")
        );
        assert!(windows(&t, 4, BosPolicy::Window, None, None).is_err());
    }

    #[test]
    fn the_checkout_datasets_install_into_a_home_once() {
        let repo = DataDirs::checkout().unwrap();
        let files: usize = Manifest::all().iter().map(|m| m.files.len()).sum();
        let home = tempfile::tempdir().unwrap();
        let written = repo.install_into(home.path()).unwrap();
        assert_eq!(written.len(), files);
        let installed = DataDirs {
            roots: vec![home.path().to_owned()],
            hub: None,
        };
        for m in Manifest::all() {
            m.verify(&installed).unwrap();
        }
        // Already there: nothing copied again.
        assert!(repo.install_into(home.path()).unwrap().is_empty());
        // A corrupted copy is replaced.
        let c4 = home.path().join("c4").join(hub::C4_STAGED);
        std::fs::write(&c4, b"corrupt").unwrap();
        assert_eq!(repo.install_into(home.path()).unwrap(), vec![c4]);
    }

    #[test]
    fn missing_datasets_list_where_they_were_looked_for() {
        let dirs = DataDirs {
            roots: vec!["/nonexistent/a".into(), "/nonexistent/b".into()],
            hub: None,
        };
        let e = PerplexityCorpus::Wikitext2
            .load(&dirs)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/nonexistent/a/wikitext2")
                && e.contains("/nonexistent/b/wikitext2")
                && e.contains("LOPPER_DATA_DIR"),
            "{e}"
        );
        assert!(
            PerplexityCorpus::from_task("boolqq")
                .unwrap_err()
                .to_string()
                .contains("unknown task")
        );
    }
}
