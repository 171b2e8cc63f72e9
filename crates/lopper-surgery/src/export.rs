//! Writing models: the lopper directory format (Hugging Face names and config, plus the exact
//! per-layer shape and provenance), all files first in a temporary folder next to the target,
//! then one rename.

use std::io::Write;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;

use crate::error::{Error, Result};
use lopper_core::{MaskPlan, ModelShape};
use lopper_model::gguf::{GgmlType, Value, llama_gguf_meta};
use lopper_model::{Llama, Tokenizer, hf_config_json};

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// The lopper directory: `model.safetensors` (HF names; matrices in the model's storage type,
    /// vectors F32), `config.json`, `shape.json`,
    /// `tokenizer.json`, `lopper.json`.
    Hf,
    /// `model.gguf` (llama architecture, per-layer arrays where layers differ, tokenizer
    /// metadata, 2-D weights in the given type: F32, F16 or Q8_0) and `lopper.json`.
    Gguf(GgmlType),
    /// The [`ExportFormat::Hf`] files with vLLM's DeciLM (`nemotron-nas`) `config.json`: one
    /// `block_configs` entry per layer and [`DECI_CONFIG_FILE`]. Plans whose attention layers
    /// keep different numbers of query heads do not fit it and are refused.
    Vllm,
}

/// How to export.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Output format.
    pub format: ExportFormat,
    /// Replace an existing output folder.
    pub force: bool,
    /// Provenance written to `lopper.json` (method, settings, seed, calibration data, command).
    pub provenance: serde_json::Value,
}

/// Writes one file of an export; the seam where tests inject a full disk.
pub trait FileSink {
    /// Creates `path` (`len` bytes) and has `fill` write it through `write_at(offset, bytes)`,
    /// in any order; the file is complete and synced when this returns `Ok`.
    fn write(&mut self, path: &Path, len: u64, fill: Fill<'_>) -> std::io::Result<()>;
}

/// What writes a file's bytes through the positioned writer it is given.
pub type Fill<'a> = &'a mut dyn FnMut(WriteAt<'_>) -> std::io::Result<()>;

/// A positioned writer: `(offset, bytes)`.
pub type WriteAt<'a> = &'a mut dyn FnMut(u64, &[u8]) -> std::io::Result<()>;

/// The real file system.
#[derive(Debug, Default)]
pub struct Disk;

impl FileSink for Disk {
    fn write(&mut self, path: &Path, len: u64, fill: Fill<'_>) -> std::io::Result<()> {
        use std::io::{Seek, SeekFrom};
        let mut f = std::fs::File::create(path)?;
        f.set_len(len)?;
        fill(&mut |at, bytes| {
            f.seek(SeekFrom::Start(at))?;
            f.write_all(bytes)
        })?;
        f.sync_all()
    }
}

/// One file of an export: bytes made in memory, or the model's weights written tensor by
/// tensor as they come off the device.
enum Content {
    Bytes(Vec<u8>),
    Weights(lopper_model::SafetensorsLayout),
    Gguf(lopper_model::gguf::GgufLayout),
}

/// A model file's write error as the sink sees it: the disk's own error as itself, anything
/// else kept in `inner` (and reported as itself once the sink returns).
fn set_aside(e: lopper_model::Error, inner: &mut Option<lopper_model::Error>) -> std::io::Error {
    match e {
        lopper_model::Error::Io { source, .. } => source,
        other => {
            *inner = Some(other);
            std::io::Error::other("the weights could not be written")
        }
    }
}

/// The modelling file shipped with heterogeneous exports (named by `auto_map` in their
/// `config.json`): transformers' own LLaMA layers, each built with its layer's sizes.
pub const MODELING_FILE: &str = "modeling_lopper.py";
const MODELING_SOURCE: &str = include_str!("../assets/modeling_lopper.py");

/// The configuration class shipped with `--format vllm` exports (named by `auto_map`): it gives
/// vLLM's DeciLM model the attribute access to `block_configs` it reads.
pub const DECI_CONFIG_FILE: &str = "configuration_decilm.py";
const DECI_CONFIG_SOURCE: &str = include_str!("../assets/configuration_decilm.py");

/// The `config.json` of `shape`: stock `transformers` LLaMA when every layer is alike;
/// otherwise model type `lopper_llama` with the largest widths plus `lopper_layer_config` (one
/// entry per layer with its `num_attention_heads`, `num_key_value_heads` and
/// `intermediate_size`; 0 marks a removed block) and an `auto_map` naming [`MODELING_FILE`], so
/// that `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads it.
pub fn config_json(shape: &ModelShape, tokenizer: &Tokenizer) -> serde_json::Value {
    if let Some(v) = hf_config_json(shape, tokenizer.bos_id, tokenizer.eos_id) {
        return v;
    }
    let mut v = widest_config_json(shape, tokenizer);
    v["model_type"] = lopper_model::LOPPER_MODEL_TYPE.into();
    v["architectures"] = serde_json::json!(["LopperLlamaForCausalLM"]);
    v["auto_map"] = serde_json::json!({
        "AutoConfig": "modeling_lopper.LopperLlamaConfig",
        "AutoModelForCausalLM": "modeling_lopper.LopperLlamaForCausalLM",
    });
    v["lopper_layer_config"] = shape
        .layers
        .iter()
        .map(|l| {
            serde_json::json!({
                "num_attention_heads": l.n_heads,
                "num_key_value_heads": l.n_kv_heads,
                "intermediate_size": l.ffn_hidden,
            })
        })
        .collect();
    v
}

/// vLLM's DeciLM (`nemotron-nas`) `config.json` of `shape`: the LLaMA keys, and per layer
/// `{attention: {no_op, replace_with_linear, n_heads_in_group}, ffn: {no_op,
/// replace_with_linear, intermediate_size}}`. DeciLM gives every attention layer
/// `num_attention_heads` query heads (and `num_attention_heads / n_heads_in_group` key/value
/// heads), so a shape whose attention layers keep different numbers of query heads is refused.
pub fn deci_config_json(shape: &ModelShape, tokenizer: &Tokenizer) -> Result<serde_json::Value> {
    let attn: Vec<(usize, &lopper_core::LayerShape)> = shape
        .layers
        .iter()
        .enumerate()
        .filter(|(_, l)| l.has_attn())
        .collect();
    let heads = attn.first().map_or(1, |(_, l)| l.n_heads);
    if let Some((i, l)) = attn.iter().find(|(_, l)| l.n_heads != heads) {
        return Err(Error::Unsupported(format!(
            "--format vllm: vLLM's DeciLM (nemotron-nas) keeps the same query heads in every attention layer, but layer {} has {heads} and layer {i} {} (the plan removed key/value groups in some layers only); export with --format hf (transformers, trust_remote_code) or gguf",
            attn[0].0, l.n_heads
        )));
    }
    let mut v = widest_config_json(shape, tokenizer);
    v["model_type"] = "nemotron-nas".into();
    v["architectures"] = serde_json::json!(["DeciLMForCausalLM"]);
    v["auto_map"] = serde_json::json!({"AutoConfig": "configuration_decilm.DeciLMConfig"});
    v["num_attention_heads"] = heads.into();
    v["block_configs"] = shape
        .layers
        .iter()
        .map(|l| {
            serde_json::json!({
                "attention": {
                    "no_op": !l.has_attn(),
                    "replace_with_linear": false,
                    "n_heads_in_group": l.has_attn().then(|| l.n_rep()),
                },
                "ffn": {
                    "no_op": !l.has_mlp(),
                    "replace_with_linear": false,
                    "intermediate_size": l.has_mlp().then_some(l.ffn_hidden),
                },
            })
        })
        .collect();
    Ok(v)
}

/// A stock LLaMA `config.json` with the largest widths of `shape`'s layers, the base of the
/// per-layer formats.
fn widest_config_json(shape: &ModelShape, tokenizer: &Tokenizer) -> serde_json::Value {
    let max = |f: &dyn Fn(&lopper_core::LayerShape) -> usize| {
        shape.layers.iter().map(f).max().unwrap_or(0)
    };
    let head_dim = shape
        .layers
        .iter()
        .find(|l| l.has_attn())
        .map_or(64, |l| l.head_dim);
    // Start from a uniform shape with the largest widths, then describe each layer.
    let widest = lopper_core::LayerShape {
        n_heads: max(&|l| l.n_heads).max(1),
        n_kv_heads: max(&|l| l.n_kv_heads).max(1),
        head_dim,
        ffn_hidden: max(&|l| l.ffn_hidden).max(1),
    };
    let uniform = ModelShape {
        layers: vec![widest; shape.n_layers()],
        ..shape.clone()
    };
    hf_config_json(&uniform, tokenizer.bos_id, tokenizer.eos_id)
        .expect("a uniform shape with both blocks is expressible")
}

fn json_bytes(v: &impl serde::Serialize) -> Vec<u8> {
    let mut s = serde_json::to_string_pretty(v).expect("serialisable");
    s.push('\n');
    s.into_bytes()
}

/// Exports `model` (already pruned, or dense) with its tokenizer to the folder `out`.
/// `plan` is the plan that produced it, recorded in `lopper.json` with `opts.provenance`.
pub fn export<B: Backend>(
    model: &Llama<B>,
    tokenizer: &Tokenizer,
    plan: Option<&MaskPlan>,
    opts: &ExportOptions,
    out: &Path,
) -> Result<PathBuf> {
    export_with(model, tokenizer, plan, opts, out, &mut Disk)
}

/// [`export`] writing through `sink` (tests inject failures here).
pub fn export_with<B: Backend>(
    model: &Llama<B>,
    tokenizer: &Tokenizer,
    plan: Option<&MaskPlan>,
    opts: &ExportOptions,
    out: &Path,
    sink: &mut dyn FileSink,
) -> Result<PathBuf> {
    model.require_resident("an export")?;
    if out.exists() && !opts.force {
        return Err(Error::OutputExists(out.to_owned()));
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|source| Error::Write {
        path: parent.clone(),
        source,
    })?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.partial-"))
        .tempdir_in(&parent)
        .map_err(|source| Error::Write {
            path: parent.clone(),
            source,
        })?;
    let shape = model.shape();
    let mut files: Vec<(&str, Content)> = Vec::new();
    match opts.format {
        ExportFormat::Hf | ExportFormat::Vllm => {
            let mut config = match opts.format {
                ExportFormat::Vllm => deci_config_json(shape, tokenizer)?,
                _ => config_json(shape, tokenizer),
            };
            let dims: std::collections::BTreeMap<String, Vec<usize>> =
                model.named_dims().into_iter().collect();
            let mut zero_biases = Vec::new();
            if dims.keys().any(|k| k.ends_with(".bias")) {
                // Stock transformers has one switch for all attention projections and one for
                // all MLP projections: turn both on and give the others zero biases.
                config["attention_bias"] = true.into();
                config["mlp_bias"] = true.into();
                zero_biases = dims
                    .iter()
                    .filter_map(|(k, shape)| {
                        let stem = k.strip_suffix(".weight")?;
                        (stem.contains("layers.") && stem.ends_with("_proj"))
                            .then(|| (format!("{stem}.bias"), shape[0]))
                    })
                    .filter(|(b, _)| !dims.contains_key(b))
                    .collect();
            }
            // The matrices in the model's own storage type.
            let dtype = model.dtype();
            config["torch_dtype"] = match dtype {
                lopper_core::Dtype::F32 => "float32",
                lopper_core::Dtype::Bf16 => "bfloat16",
                lopper_core::Dtype::F16 => "float16",
            }
            .into();
            // Written tensor by tensor at write time: the host never holds the whole model.
            files.push((
                "model.safetensors",
                Content::Weights(model.safetensors_layout(dtype, &zero_biases)?),
            ));
            files.push(("config.json", Content::Bytes(json_bytes(&config))));
            files.push(("shape.json", Content::Bytes(json_bytes(shape))));
            files.push((
                "tokenizer.json",
                Content::Bytes(tokenizer.to_json().as_bytes().to_vec()),
            ));
            if opts.format == ExportFormat::Vllm {
                files.push((
                    DECI_CONFIG_FILE,
                    Content::Bytes(DECI_CONFIG_SOURCE.as_bytes().to_vec()),
                ));
            } else if config.get("auto_map").is_some() {
                files.push((
                    MODELING_FILE,
                    Content::Bytes(MODELING_SOURCE.as_bytes().to_vec()),
                ));
            }
        }
        ExportFormat::Gguf(ty) => {
            if !matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::Q8_0) {
                return Err(Error::Unsupported(format!(
                    "GGUF tensor type {ty:?} cannot be written; use f32, f16 or q8_0"
                )));
            }
            let mut b = llama_gguf_meta(shape, ty);
            b.meta("general.name", Value::Str("lopper-pruned".into()));
            b.meta(
                "general.file_type",
                Value::U(match ty {
                    GgmlType::F16 => 1,
                    GgmlType::Q8_0 => 7,
                    _ => 0,
                }),
            );
            for (k, v) in tokenizer.gguf_metadata()? {
                b.meta(&k, v);
            }
            // Written tensor by tensor at write time, as the safetensors file is.
            files.push(("model.gguf", Content::Gguf(model.gguf_layout(&b, ty))));
        }
    }
    let mut record = serde_json::json!({
        "lopper_version": env!("CARGO_PKG_VERSION"),
        "params": shape.num_params(),
        "provenance": opts.provenance,
    });
    if let Some(p) = plan {
        record["plan"] = serde_json::to_value(p).expect("serialisable");
        record["kept_param_ratio"] = p.kept_param_ratio().into();
    }
    files.push(("lopper.json", Content::Bytes(json_bytes(&record))));
    // The old folder is deleted only once the new one is in place: both must fit.
    let need = files
        .iter()
        .map(|(_, c)| match c {
            Content::Bytes(b) => b.len() as u64,
            Content::Weights(l) => l.len(),
            Content::Gguf(l) => l.len(),
        })
        .sum();
    lopper_core::disk::ensure_disk_space(&parent, need, 0, "the exported model")?;
    for (file, content) in &files {
        let path = tmp.path().join(file);
        // A failure to produce the weights (not the disk's) is kept aside and reported as itself.
        let mut inner: Option<lopper_model::Error> = None;
        let written = match content {
            Content::Bytes(b) => sink.write(&path, b.len() as u64, &mut |w| w(0, b)),
            Content::Weights(layout) => sink.write(&path, layout.len(), &mut |w| {
                model
                    .write_safetensors(layout, w)
                    .map_err(|e| set_aside(e, &mut inner))
            }),
            Content::Gguf(layout) => sink.write(&path, layout.len(), &mut |w| {
                model
                    .write_gguf(layout, w)
                    .map_err(|e| set_aside(e, &mut inner))
            }),
        };
        if let Some(e) = inner {
            return Err(e.into());
        }
        written.map_err(|source| Error::Write { path, source })?;
    }
    // Publish: move an existing folder aside, rename the new one in, then delete the old.
    let tmp = tmp.keep();
    let old = out
        .exists()
        .then(|| parent.join(format!(".{name}.old-{}", std::process::id())));
    if let Some(old) = &old {
        std::fs::rename(out, old).map_err(|source| Error::Write {
            path: out.to_owned(),
            source,
        })?;
    }
    if let Err(source) = std::fs::rename(&tmp, out) {
        if let Some(old) = &old {
            let _ = std::fs::rename(old, out);
        }
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(Error::Write {
            path: out.to_owned(),
            source,
        });
    }
    if let Some(old) = old {
        let _ = std::fs::remove_dir_all(old);
    }
    tracing::info!(out = %out.display(), params = shape.num_params(), "exported");
    Ok(out.to_owned())
}
