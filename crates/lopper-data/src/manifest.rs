//! Dataset manifests (`datasets/<name>.json` in the repository, compiled in): name, licence,
//! citation, where the hub keeps it, and every file with its sha256, size and format.

use std::io::Read;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{DataDirs, Error, Result};

/// One file of a dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// `<dataset folder>/<file>`, relative to a data root.
    pub path: String,
    /// sha256 of the file, hex.
    pub sha256: String,
    /// Size in bytes.
    pub bytes: u64,
    /// What is inside and how it is laid out.
    pub format: String,
}

/// Where the Hugging Face hub keeps the dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubLocation {
    /// Dataset repository.
    pub repo: String,
    /// Configuration name.
    pub config: String,
    /// Split.
    pub split: String,
}

/// A dataset manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Dataset name (also its folder under a data root).
    pub name: String,
    /// Licence.
    pub license: String,
    /// Citation.
    pub citation: String,
    /// Hub location.
    pub hub: HubLocation,
    /// Files.
    pub files: Vec<ManifestFile>,
}

const MANIFESTS: &[&str] = &[
    include_str!("../../../datasets/wikitext2.json"),
    include_str!("../../../datasets/ptb.json"),
    include_str!("../../../datasets/c4.json"),
    include_str!("../../../datasets/boolq.json"),
    include_str!("../../../datasets/piqa.json"),
    include_str!("../../../datasets/hellaswag.json"),
    include_str!("../../../datasets/winogrande.json"),
    include_str!("../../../datasets/arc.json"),
    include_str!("../../../datasets/openbookqa.json"),
    include_str!("../../../datasets/lambada.json"),
];

impl Manifest {
    /// Every manifest.
    pub fn all() -> Vec<Manifest> {
        MANIFESTS
            .iter()
            .map(|m| serde_json::from_str(m).expect("manifests are checked by the tests"))
            .collect()
    }

    /// The manifest of `name`.
    pub fn get(name: &str) -> Result<Manifest> {
        Self::all()
            .into_iter()
            .find(|m| m.name == name)
            .ok_or_else(|| {
                let names: Vec<String> = Self::all().into_iter().map(|m| m.name).collect();
                Error::Invalid(format!(
                    "no dataset manifest named `{name}`; known: {}",
                    names.join(", ")
                ))
            })
    }

    /// Finds every file under `dirs` and checks its size and sha256. Returns the paths.
    pub fn verify(&self, dirs: &DataDirs) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for f in &self.files {
            let (folder, file) = f
                .path
                .split_once('/')
                .unwrap_or((self.name.as_str(), f.path.as_str()));
            let path = dirs.find(folder, file)?;
            let mut h = Sha256::new();
            let mut n = 0u64;
            let mut buf = vec![0u8; 1 << 20];
            let mut r = std::fs::File::open(&path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            loop {
                let k = r.read(&mut buf).map_err(|source| Error::Io {
                    path: path.clone(),
                    source,
                })?;
                if k == 0 {
                    break;
                }
                h.update(&buf[..k]);
                n += k as u64;
            }
            let got: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
            if got != f.sha256 || n != f.bytes {
                return Err(Error::Invalid(format!(
                    "{}: {n} bytes with sha256 {got}, but the `{}` manifest expects {} bytes with sha256 {}; the file is corrupt or another version: restore it from {}",
                    path.display(),
                    self.name,
                    f.bytes,
                    f.sha256,
                    self.hub.repo
                )));
            }
            out.push(path);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_manifest_parses_and_names_its_files() {
        let all = Manifest::all();
        assert_eq!(all.len(), MANIFESTS.len());
        for m in &all {
            assert!(
                !m.files.is_empty() && !m.license.is_empty() && !m.citation.is_empty(),
                "{}",
                m.name
            );
            assert!(
                m.files.iter().all(|f| f.sha256.len() == 64 && f.bytes > 0),
                "{}",
                m.name
            );
        }
        assert_eq!(Manifest::get("c4").unwrap().hub.repo, "allenai/c4");
        assert!(
            Manifest::get("c5")
                .unwrap_err()
                .to_string()
                .contains("wikitext2")
        );
    }

    #[test]
    fn a_corrupt_file_is_named_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("ptb")).unwrap();
        std::fs::write(dir.path().join("ptb/ptb.test.txt"), "not ptb").unwrap();
        let dirs = DataDirs {
            roots: vec![dir.path().to_owned()],
            hub: None,
        };
        let e = Manifest::get("ptb")
            .unwrap()
            .verify(&dirs)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ptb.test.txt") && e.contains("corrupt") && e.contains("ptb_text_only"),
            "{e}"
        );
    }
}
