//! Model configuration at the boundaries: GGUF metadata and Hugging Face `config.json`, both
//! turned into a [`ModelShape`].

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result, io_err};
use crate::gguf::{GgufFile, Value};
use lopper_core::{LayerShape, ModelShape, RopeConfig, RopeScaling};

/// Architectures whose GGUF tensors and keys follow llama's layout.
const LLAMA_LIKE: &[&str] = &["llama", "mistral", "deci"];

/// Reads the [`ModelShape`] from a GGUF file's llama-architecture metadata, including per-layer
/// arrays for head counts and MLP width (how llama.cpp expresses heterogeneous layers).
pub fn shape_from_gguf(file: &GgufFile) -> Result<ModelShape> {
    let err = |msg: String| Error::Gguf {
        path: file.path().to_owned(),
        msg,
    };
    let arch = file
        .get("general.architecture")
        .and_then(Value::as_str)
        .ok_or_else(|| err("metadata key `general.architecture` is missing".into()))?;
    if !LLAMA_LIKE.contains(&arch) {
        return Err(err(format!(
            "architecture `{arch}` is not supported; lopper reads LLaMA-family models (general.architecture = llama)"
        )));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let req_u = |k: &str| -> Result<usize> {
        let full = key(k);
        file.get(&full)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| {
                err(format!(
                    "metadata key `{full}` is missing or not an integer"
                ))
            })
    };
    let n_layers = req_u("block_count")?;
    let hidden = req_u("embedding_length")?;
    // A per-layer value: a scalar for every layer, or an array with one entry per layer.
    let per_layer = |k: &str, default: Option<usize>| -> Result<Vec<usize>> {
        let full = key(k);
        match file.get(&full) {
            None => default
                .map(|d| vec![d; n_layers])
                .ok_or_else(|| err(format!("metadata key `{full}` is missing"))),
            Some(Value::Array(a)) => {
                if a.len() != n_layers {
                    return Err(err(format!(
                        "metadata array `{full}` has {} entries for {n_layers} layers",
                        a.len()
                    )));
                }
                a.iter()
                    .map(|v| {
                        v.as_u64()
                            .map(|x| x as usize)
                            .ok_or_else(|| err(format!("`{full}` holds a non-integer")))
                    })
                    .collect()
            }
            Some(v) => v
                .as_u64()
                .map(|x| vec![x as usize; n_layers])
                .ok_or_else(|| err(format!("metadata key `{full}` is not an integer"))),
        }
    };
    let heads = per_layer("attention.head_count", None)?;
    let kv_heads = per_layer("attention.head_count_kv", None).unwrap_or_else(|_| heads.clone());
    let mut ffn = per_layer("feed_forward_length", None)?;
    if let Some(i) = (0..n_layers).find(|&i| heads[i] > 0 && kv_heads[i] == 0) {
        return Err(err(format!(
            "layer {i} has {} query heads and no KV head (deci's linear attention), which lopper does not model",
            heads[i]
        )));
    }
    // Layers lopper wrote with a zero placeholder MLP (see `llama_gguf_typed`).
    if let Some(Value::Array(flags)) = file.get("lopper.mlp_removed") {
        for (i, f) in flags.iter().enumerate().take(n_layers) {
            if f.as_bool() == Some(true) {
                ffn[i] = 0;
            }
        }
    }
    let max_heads = heads.iter().copied().max().unwrap_or(0);
    let head_dim = match file
        .get(&key("attention.key_length"))
        .and_then(Value::as_u64)
    {
        Some(k) => k as usize,
        None if max_heads > 0 && hidden % max_heads == 0 => hidden / max_heads,
        None => {
            return Err(err(format!(
                "cannot infer head_dim: `{}` is missing and hidden size {hidden} is not a multiple of {max_heads} heads",
                key("attention.key_length")
            )));
        }
    };
    let eps = file
        .get(&key("attention.layer_norm_rms_epsilon"))
        .and_then(Value::as_f64)
        .ok_or_else(|| {
            err(format!(
                "metadata key `{}` is missing",
                key("attention.layer_norm_rms_epsilon")
            ))
        })?;
    let theta = file
        .get(&key("rope.freq_base"))
        .and_then(Value::as_f64)
        .unwrap_or(10_000.0);
    let scaling = match file.get(&key("rope.scaling.type")).and_then(Value::as_str) {
        None | Some("none") => None,
        Some("linear") => Some(RopeScaling::Linear {
            factor: file
                .get(&key("rope.scaling.factor"))
                .and_then(Value::as_f64)
                .ok_or_else(|| err(format!("`{}` is missing", key("rope.scaling.factor"))))?,
        }),
        Some(other) => {
            return Err(err(format!(
                "RoPE scaling type `{other}` is not supported (none and linear are)"
            )));
        }
    };
    let vocab = match file.get(&key("vocab_size")).and_then(Value::as_u64) {
        Some(v) => v as usize,
        None => file
            .tensor_info("token_embd.weight")
            .map(|t| t.dims.get(1).copied().unwrap_or(0) as usize)
            .ok_or_else(|| err("tensor `token_embd.weight` is missing".into()))?,
    };
    let shape = ModelShape {
        vocab_size: vocab,
        hidden_size: hidden,
        norm_eps: eps,
        rope: RopeConfig { theta, scaling },
        tie_word_embeddings: file.tensor_info("output.weight").is_none(),
        max_position_embeddings: file
            .get(&key("context_length"))
            .and_then(Value::as_u64)
            .unwrap_or(2048) as usize,
        layers: (0..n_layers)
            .map(|i| LayerShape {
                n_heads: heads[i],
                n_kv_heads: kv_heads[i],
                head_dim,
                ffn_hidden: ffn[i],
            })
            .collect(),
    };
    shape.validate()?;
    Ok(shape)
}

/// The part of a Hugging Face `config.json` lopper reads (LLaMA family).
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers >= 5 puts theta and scaling here.
    rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    tie_word_embeddings: bool,
    max_position_embeddings: Option<usize>,
    /// Mistral / Qwen2: attention sees at most this many past positions.
    sliding_window: Option<usize>,
    /// Qwen2: whether `sliding_window` is in force (Mistral's is whenever it is set).
    use_sliding_window: Option<bool>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    /// Per-layer widths of heterogeneous (pruned) models, as lopper writes them (a list; earlier
    /// lopper exports named it `per_layer_config`, which transformers now reads as a map).
    #[serde(alias = "per_layer_config")]
    lopper_layer_config: Option<Vec<PerLayer>>,
}

#[derive(Debug, Deserialize)]
struct PerLayer {
    num_attention_heads: usize,
    num_key_value_heads: usize,
    intermediate_size: usize,
}

/// The `model_type`s of `config.json` lopper reads: LLaMA 1/2/3 (and Vicuna, a LLaMA), Mistral
/// (sliding-window attention is not modelled: the window must cover the context), Qwen2/2.5
/// (q/k/v biases, read from the checkpoint).
pub const SUPPORTED_MODEL_TYPES: [&str; 4] = ["llama", "mistral", "qwen2", LOPPER_MODEL_TYPE];

/// The `model_type` of lopper's heterogeneous exports: a LLaMA whose layers differ in width
/// (`lopper_layer_config`), loaded by transformers through the modelling file shipped with it.
pub const LOPPER_MODEL_TYPE: &str = "lopper_llama";

/// Reads a Hugging Face `config.json` into a [`ModelShape`]. Missing required keys, and
/// features lopper does not model (biases on q/k/v), are errors naming the key.
pub fn shape_from_hf_config(path: &Path) -> Result<ModelShape> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    shape_from_hf_config_text(&text, path)
}

/// [`shape_from_hf_config`] of a `config.json` held in memory; `path` names it in errors.
pub fn shape_from_hf_config_text(text: &str, path: &Path) -> Result<ModelShape> {
    let err = |msg: String| Error::Config {
        path: path.to_owned(),
        msg,
    };
    let c: HfConfig =
        serde_json::from_str(text).map_err(|e| err(format!("not a valid config: {e}")))?;
    if let Some(t) = &c.model_type
        && !SUPPORTED_MODEL_TYPES.contains(&t.as_str())
    {
        return Err(err(format!(
            "model_type `{t}` is not supported; lopper reads LLaMA-family decoders: {}",
            SUPPORTED_MODEL_TYPES.join(", ")
        )));
    }
    // attention_bias / mlp_bias: the bias tensors are read when present (see `Llama::from_weights`).
    let _ = (c.attention_bias, c.mlp_bias);
    let req =
        |v: Option<usize>, k: &str| v.ok_or_else(|| err(format!("required key `{k}` is missing")));
    let n_layers = req(c.num_hidden_layers, "num_hidden_layers")?;
    let hidden = req(c.hidden_size, "hidden_size")?;
    let heads = req(c.num_attention_heads, "num_attention_heads")?;
    let ffn = req(c.intermediate_size, "intermediate_size")?;
    let vocab = req(c.vocab_size, "vocab_size")?;
    let eps = c
        .rms_norm_eps
        .ok_or_else(|| err("required key `rms_norm_eps` is missing".into()))?;
    let rp = c.rope_parameters.as_ref();
    let theta = c
        .rope_theta
        .or_else(|| {
            rp.and_then(|p| p.get("rope_theta"))
                .and_then(|v| v.as_f64())
        })
        .unwrap_or(10_000.0);
    let scaling_json = c.rope_scaling.as_ref().or(rp).filter(|v| !v.is_null());
    let scaling = match scaling_json {
        None => None,
        Some(s) => {
            let ty = s
                .get("rope_type")
                .or_else(|| s.get("type"))
                .and_then(|v| v.as_str())
                .unwrap_or("default");
            let f = |k: &str| {
                s.get(k)
                    .and_then(|v| v.as_f64())
                    .ok_or_else(|| err(format!("rope scaling key `{k}` is missing")))
            };
            match ty {
                "default" => None,
                "linear" => Some(RopeScaling::Linear {
                    factor: f("factor")?,
                }),
                "llama3" => Some(RopeScaling::Llama3 {
                    factor: f("factor")?,
                    low_freq_factor: f("low_freq_factor")?,
                    high_freq_factor: f("high_freq_factor")?,
                    original_max_position_embeddings: f("original_max_position_embeddings")?
                        as usize,
                }),
                other => {
                    return Err(err(format!(
                        "rope type `{other}` is not supported (default, linear and llama3 are)"
                    )));
                }
            }
        }
    };
    let head_dim = match c.head_dim {
        Some(h) => h,
        None if heads > 0 && hidden % heads == 0 => hidden / heads,
        None => return Err(err("required key `head_dim` is missing".into())),
    };
    let layers = match &c.lopper_layer_config {
        None => vec![
            LayerShape {
                n_heads: heads,
                n_kv_heads: c.num_key_value_heads.unwrap_or(heads),
                head_dim,
                ffn_hidden: ffn,
            };
            n_layers
        ],
        Some(per) if per.len() == n_layers => per
            .iter()
            .map(|p| LayerShape {
                n_heads: p.num_attention_heads,
                n_kv_heads: p.num_key_value_heads,
                head_dim,
                ffn_hidden: p.intermediate_size,
            })
            .collect(),
        Some(per) => {
            return Err(err(format!(
                "`lopper_layer_config` has {} entries for num_hidden_layers = {n_layers}",
                per.len()
            )));
        }
    };
    let shape = ModelShape {
        vocab_size: vocab,
        hidden_size: hidden,
        norm_eps: eps,
        rope: RopeConfig { theta, scaling },
        tie_word_embeddings: c.tie_word_embeddings,
        max_position_embeddings: c.max_position_embeddings.unwrap_or(2048),
        layers,
    };
    // lopper's attention is full causal attention, which equals sliding-window attention for
    // contexts up to the window: the window becomes the longest context, so that the guard of
    // every command refuses a longer one.
    let mut shape = shape;
    if let Some(w) = c.sliding_window
        && c.use_sliding_window != Some(false)
        && w < shape.max_position_embeddings
    {
        shape.max_position_embeddings = w;
    }
    shape.validate().map_err(|e| err(e.to_string()))?;
    Ok(shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, json: &str) -> std::path::PathBuf {
        let p = dir.join("config.json");
        std::fs::write(&p, json).unwrap();
        p
    }

    #[test]
    fn reads_a_llama_config_and_names_missing_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            r#"{"model_type":"llama","vocab_size":49152,"hidden_size":576,"intermediate_size":1536,
            "num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,"rms_norm_eps":1e-5,
            "rope_theta":100000.0,"tie_word_embeddings":true,"max_position_embeddings":8192}"#,
        );
        let s = shape_from_hf_config(&p).unwrap();
        assert_eq!(s.num_params(), 134_515_008);
        assert_eq!(s.layers[0].head_dim, 64);
        let p = write(
            dir.path(),
            r#"{"model_type":"llama","vocab_size":10,"hidden_size":8}"#,
        );
        let e = shape_from_hf_config(&p).unwrap_err().to_string();
        assert!(
            e.contains("num_hidden_layers") && e.contains("config.json"),
            "{e}"
        );
        let p = write(dir.path(), r#"{"model_type":"gpt2"}"#);
        assert!(
            shape_from_hf_config(&p)
                .unwrap_err()
                .to_string()
                .contains("gpt2")
        );
    }

    #[test]
    fn reads_transformers5_rope_parameters() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            r#"{"vocab_size":100,"hidden_size":64,"intermediate_size":96,"num_hidden_layers":2,
            "num_attention_heads":4,"rms_norm_eps":1e-6,"head_dim":16,
            "rope_parameters":{"rope_theta":500000.0,"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#,
        );
        let s = shape_from_hf_config(&p).unwrap();
        assert_eq!(s.rope.theta, 500_000.0);
        assert!(matches!(s.rope.scaling, Some(RopeScaling::Llama3 { .. })));
        assert_eq!(s.layers[1].n_kv_heads, 4);
    }

    #[test]
    fn a_sliding_window_bounds_the_context_and_unknown_families_are_named() {
        let cfg = |extra: &str| {
            format!(
                r#"{{"vocab_size":100,"hidden_size":64,"intermediate_size":96,"num_hidden_layers":2,
                "num_attention_heads":4,"rms_norm_eps":1e-6,"max_position_embeddings":32768{extra}}}"#
            )
        };
        let p = Path::new("config.json");
        // Mistral v0.1: a 4096-token window.
        let m =
            shape_from_hf_config_text(&cfg(r#","model_type":"mistral","sliding_window":4096"#), p)
                .unwrap();
        assert_eq!(m.max_position_embeddings, 4096);
        // Qwen2 names a window it does not use.
        let q = shape_from_hf_config_text(
            &cfg(r#","model_type":"qwen2","sliding_window":4096,"use_sliding_window":false"#),
            p,
        )
        .unwrap();
        assert_eq!(q.max_position_embeddings, 32768);
        let e = shape_from_hf_config_text(&cfg(r#","model_type":"gemma""#), p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("gemma") && e.contains("llama, mistral, qwen2"),
            "{e}"
        );
    }
}

/// A Hugging Face `config.json` for `shape` that stock `transformers` `LlamaForCausalLM` loads.
/// Only uniform shapes (every layer alike) can be expressed; `None` otherwise.
pub fn hf_config_json(
    shape: &ModelShape,
    bos: Option<u32>,
    eos: Option<u32>,
) -> Option<serde_json::Value> {
    let l = shape.layers.first()?;
    if shape.layers.iter().any(|x| x != l) || !l.has_attn() || !l.has_mlp() {
        return None;
    }
    let mut v = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": l.ffn_hidden,
        "num_hidden_layers": shape.n_layers(),
        "num_attention_heads": l.n_heads,
        "num_key_value_heads": l.n_kv_heads,
        "head_dim": l.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": shape.norm_eps,
        "rope_theta": shape.rope.theta,
        "max_position_embeddings": shape.max_position_embeddings,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "attention_bias": false,
        "mlp_bias": false,
        "torch_dtype": "float32",
    });
    if let Some(s) = shape.rope.scaling {
        v["rope_scaling"] = match s {
            RopeScaling::Linear { factor } => {
                serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => serde_json::json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings}),
        };
    }
    if let Some(b) = bos {
        v["bos_token_id"] = b.into();
    }
    if let Some(e) = eos {
        v["eos_token_id"] = e.into();
    }
    Some(v)
}

#[cfg(test)]
mod export_tests {
    use super::*;

    #[test]
    fn uniform_shapes_round_trip_through_config_json() {
        let s = ModelShape::tiny();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(
            &p,
            hf_config_json(&s, Some(1), Some(2)).unwrap().to_string(),
        )
        .unwrap();
        assert_eq!(shape_from_hf_config(&p).unwrap(), s);
        let mut het = s.clone();
        het.layers[0].ffn_hidden = 8;
        assert!(hf_config_json(&het, None, None).is_none());
    }
}
