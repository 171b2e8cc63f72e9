//! Synthetic models: the published shapes of real model families with seeded random weights,
//! generated tensor by tensor directly in the storage type. They test scale (loading, memory,
//! placement, every command's path) on machines that cannot download the real weights; their
//! outputs mean nothing.

use std::path::{Path, PathBuf};

use burn::tensor::TensorData;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::config::shape_from_hf_config_text;
use crate::error::{Error, Result, io_err};
use crate::weights::{HostTensor, WeightSource, expected_dims};
use lopper_core::{Dtype, ModelShape};

/// The built-in configurations: name and `config.json` (the published values of each family's
/// model card: sizes, vocabulary, RoPE base and scaling, norm epsilon, head tying).
pub const BUILTIN: [(&str, &str); 7] = [
    (
        "llama-3.2-1b",
        r#"{"model_type":"llama","vocab_size":128256,"hidden_size":2048,"intermediate_size":8192,
        "num_hidden_layers":16,"num_attention_heads":32,"num_key_value_heads":8,"head_dim":64,
        "rms_norm_eps":1e-5,"rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":32.0,
        "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192},
        "tie_word_embeddings":true,"max_position_embeddings":131072}"#,
    ),
    (
        "llama-3.1-8b",
        r#"{"model_type":"llama","vocab_size":128256,"hidden_size":4096,"intermediate_size":14336,
        "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"head_dim":128,
        "rms_norm_eps":1e-5,"rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":8.0,
        "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192},
        "tie_word_embeddings":false,"max_position_embeddings":131072}"#,
    ),
    (
        "llama-2-7b",
        r#"{"model_type":"llama","vocab_size":32000,"hidden_size":4096,"intermediate_size":11008,
        "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":32,
        "rms_norm_eps":1e-5,"rope_theta":10000.0,"tie_word_embeddings":false,
        "max_position_embeddings":4096}"#,
    ),
    (
        "llama-2-13b",
        r#"{"model_type":"llama","vocab_size":32000,"hidden_size":5120,"intermediate_size":13824,
        "num_hidden_layers":40,"num_attention_heads":40,"num_key_value_heads":40,
        "rms_norm_eps":1e-5,"rope_theta":10000.0,"tie_word_embeddings":false,
        "max_position_embeddings":4096}"#,
    ),
    (
        "llama-2-70b",
        r#"{"model_type":"llama","vocab_size":32000,"hidden_size":8192,"intermediate_size":28672,
        "num_hidden_layers":80,"num_attention_heads":64,"num_key_value_heads":8,
        "rms_norm_eps":1e-5,"rope_theta":10000.0,"tie_word_embeddings":false,
        "max_position_embeddings":4096}"#,
    ),
    (
        "mistral-7b",
        r#"{"model_type":"mistral","vocab_size":32768,"hidden_size":4096,"intermediate_size":14336,
        "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"head_dim":128,
        "rms_norm_eps":1e-5,"rope_theta":1000000.0,"sliding_window":null,
        "tie_word_embeddings":false,"max_position_embeddings":32768}"#,
    ),
    (
        "qwen2.5-7b",
        r#"{"model_type":"qwen2","vocab_size":152064,"hidden_size":3584,"intermediate_size":18944,
        "num_hidden_layers":28,"num_attention_heads":28,"num_key_value_heads":4,
        "rms_norm_eps":1e-6,"rope_theta":1000000.0,"sliding_window":131072,
        "use_sliding_window":false,"tie_word_embeddings":false,"max_position_embeddings":131072}"#,
    ),
];

/// Seed of every synthetic model's weights.
pub const SEED: u64 = 0x5EED;

/// A synthetic model: a shape, whether its q/k/v projections carry biases (Qwen2), and where
/// the configuration came from.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticModel {
    /// `synthetic:NAME` or the config path.
    pub name: String,
    /// The shape.
    pub shape: ModelShape,
    /// Biases on q/k/v (`model_type` qwen2, or `attention_bias`).
    pub qkv_bias: bool,
}

impl SyntheticModel {
    /// A built-in name (see [`BUILTIN`]) or the path of a Hugging Face `config.json`.
    pub fn resolve(id: &str) -> Result<Self> {
        if let Some((name, json)) = BUILTIN.iter().find(|(n, _)| *n == id) {
            return Self::from_json(name, json, Path::new(name));
        }
        let path = PathBuf::from(id);
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.clone()
        };
        if !file.is_file() {
            return Err(Error::Resolve(format!(
                "synthetic:{id} is neither a built-in configuration ({}) nor a config.json file",
                BUILTIN.map(|(n, _)| n).join(", ")
            )));
        }
        let text = std::fs::read_to_string(&file).map_err(io_err(&file))?;
        Self::from_json(id, &text, &file)
    }

    fn from_json(name: &str, json: &str, path: &Path) -> Result<Self> {
        let shape = shape_from_hf_config_text(json, path)?;
        let v: serde_json::Value = serde_json::from_str(json).map_err(|e| Error::Config {
            path: path.into(),
            msg: e.to_string(),
        })?;
        let qkv_bias = v["model_type"] == "qwen2" || v["attention_bias"] == true;
        Ok(Self {
            name: name.into(),
            shape,
            qkv_bias,
        })
    }

    /// The weights of this model.
    pub fn weights(&self) -> SyntheticWeights {
        SyntheticWeights {
            shape: self.shape.clone(),
            qkv_bias: self.qkv_bias,
            seed: SEED,
        }
    }

    /// Parameters, biases included.
    pub fn num_params(&self) -> u64 {
        let biases: u64 = if self.qkv_bias {
            self.shape
                .layers
                .iter()
                .map(|l| ((l.n_heads + 2 * l.n_kv_heads) * l.head_dim) as u64)
                .sum()
        } else {
            0
        };
        self.shape.num_params() + biases
    }
}

/// Seeded random weights generated in the form the model stores them: each row of a stored
/// matrix from its own counter-based stream (so rows are generated in parallel and any dtype
/// gives the same values, rounded). Uniform with standard deviation `1/sqrt(fan_in)`; norm
/// scales near 1; q/k/v biases (when present) small.
#[derive(Debug, Clone)]
pub struct SyntheticWeights {
    shape: ModelShape,
    qkv_bias: bool,
    seed: u64,
}

/// SplitMix64: a counter-based generator, fast and fully specified (the same on every machine).
fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Whether the model stores tensor `name` transposed (`[in, out]`): projections and the LM head.
fn stored_transposed(name: &str) -> bool {
    name.ends_with("_proj.weight") || name == "lm_head.weight"
}

impl SyntheticWeights {
    /// `(hf_dims, offset, scale)`: the value is `offset + scale * u`, `u` uniform in [-1, 1).
    fn law(&self, name: &str) -> Option<(Vec<usize>, f32, f32)> {
        let is_bias = name.ends_with(".bias");
        if is_bias {
            let qkv = ["q_proj.bias", "k_proj.bias", "v_proj.bias"]
                .iter()
                .any(|t| name.ends_with(t));
            if !(self.qkv_bias && qkv) {
                return None;
            }
        }
        let dims = expected_dims(&self.shape, name)?;
        let is_norm = name.ends_with("layernorm.weight") || name == "model.norm.weight";
        Some(if is_norm {
            (dims, 1.0, 0.2)
        } else if is_bias {
            (dims, 0.0, 0.02)
        } else {
            let fan_in = *dims.last().expect("a matrix") as f32;
            (dims, 0.0, (3.0 / fan_in).sqrt())
        })
    }

    /// The tensor in its canonical (stored) layout, `f` rounding each f32 value.
    fn generate<T: Send + Copy + Default>(
        &self,
        name: &str,
        convert: impl Fn(&[f32], &mut [T]) + Sync,
    ) -> Option<(Vec<usize>, Vec<T>)> {
        let (mut dims, offset, scale) = self.law(name)?;
        if stored_transposed(name) {
            dims.reverse();
        }
        let row_len = *dims.last().expect("non-empty");
        let n: usize = dims.iter().product();
        // FNV-1a of the name, mixed with the seed: each tensor its own stream.
        let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        }) ^ self.seed;
        let mut data = vec![T::default(); n];
        data.par_chunks_mut(row_len.max(1))
            .enumerate()
            .for_each_init(
                || vec![0f32; row_len],
                |row_f32, (row, out)| {
                    let base = splitmix(h ^ (row as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
                    for (i, pair) in row_f32.chunks_mut(2).enumerate() {
                        let bits = splitmix(base.wrapping_add(i as u64));
                        for (k, v) in pair.iter_mut().enumerate() {
                            // 24 random bits -> [0, 1) -> [-1, 1).
                            let u = ((bits >> (8 + 32 * k)) & 0xFF_FFFF) as f32 / (1 << 24) as f32;
                            *v = offset + scale * (2.0 * u - 1.0);
                        }
                    }
                    // One vectorised rounding per row (half's slice conversion).
                    convert(&row_f32[..out.len()], out);
                },
            );
        Some((dims, data))
    }
}

impl WeightSource for SyntheticWeights {
    fn describe(&self) -> String {
        format!("synthetic random weights (seed {:#x})", self.seed)
    }

    fn dims(&self, name: &str) -> Result<Option<Vec<usize>>> {
        Ok(self.law(name).map(|(dims, _, _)| dims))
    }

    fn tensor(&self, name: &str) -> Result<Option<HostTensor>> {
        let Some((shape, data)) = self.generate(name, |s, d| d.copy_from_slice(s)) else {
            return Ok(None);
        };
        let t = HostTensor { shape, data };
        Ok(Some(if stored_transposed(name) {
            t.transposed()
        } else {
            t
        }))
    }

    fn stored(&self, name: &str, dtype: Dtype, transpose: bool) -> Result<Option<TensorData>> {
        if transpose != stored_transposed(name) {
            return Ok(self.tensor(name)?.map(|t| t.into_data(dtype, transpose)));
        }
        let data = match dtype {
            Dtype::F32 => self
                .generate(name, |s, d| d.copy_from_slice(s))
                .map(|(s, d)| TensorData::new(d, s)),
            Dtype::Bf16 => self
                .generate(name, |s, d| lopper_kernels::math::round_to_bf16(d, s))
                .map(|(s, d)| TensorData::new(d, s)),
            Dtype::F16 => self
                .generate(name, |s, d: &mut [half::f16]| d.convert_from_f32_slice(s))
                .map(|(s, d)| TensorData::new(d, s)),
        };
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_have_their_published_sizes() {
        let params = |n: &str| SyntheticModel::resolve(n).unwrap().num_params() as f64 / 1e9;
        // Published parameter counts (billions), to the model cards' precision.
        for (name, want) in [
            ("llama-3.2-1b", 1.24),
            ("llama-3.1-8b", 8.03),
            ("llama-2-7b", 6.74),
            ("llama-2-13b", 13.0),
            ("llama-2-70b", 69.0),
            ("mistral-7b", 7.25),
            ("qwen2.5-7b", 7.62),
        ] {
            let got = params(name);
            assert!(
                (got - want).abs() / want < 0.01,
                "{name}: {got:.3}B vs {want}B"
            );
        }
        let l3 = SyntheticModel::resolve("llama-3.1-8b").unwrap();
        assert!(matches!(
            l3.shape.rope.scaling,
            Some(lopper_core::RopeScaling::Llama3 { .. })
        ));
        assert!(SyntheticModel::resolve("qwen2.5-7b").unwrap().qkv_bias);
        assert!(!l3.qkv_bias);
        let e = SyntheticModel::resolve("gpt-2").unwrap_err().to_string();
        assert!(e.contains("llama-3.1-8b") && e.contains("gpt-2"), "{e}");
    }

    #[test]
    fn stored_weights_equal_the_hf_tensors_rounded() {
        let mut m = SyntheticModel::resolve("qwen2.5-7b").unwrap();
        // A small model of the same family: the law, not the size, is under test.
        m.shape = ModelShape::tiny();
        let w = m.weights();
        for name in [
            "model.layers.1.self_attn.k_proj.weight",
            "model.layers.1.self_attn.k_proj.bias",
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.layers.0.input_layernorm.weight",
        ] {
            let hf = w.tensor(name).unwrap().unwrap();
            assert_eq!(hf.shape, expected_dims(&m.shape, name).unwrap(), "{name}");
            let t = stored_transposed(name);
            let want = hf.clone().into_data(Dtype::Bf16, t);
            let got = w.stored(name, Dtype::Bf16, t).unwrap().unwrap();
            assert_eq!(got, want, "{name}");
            let f32_direct = w.stored(name, Dtype::F32, t).unwrap().unwrap();
            assert_eq!(f32_direct, hf.into_data(Dtype::F32, t), "{name}");
        }
        assert!(
            w.tensor("model.layers.0.mlp.up_proj.bias")
                .unwrap()
                .is_none()
        );
        let v = w
            .tensor("model.layers.0.self_attn.q_proj.weight")
            .unwrap()
            .unwrap();
        let bound = (3.0f32 / 32.0).sqrt();
        assert!(v.data.iter().all(|x| x.abs() <= bound));
        let mean = v.data.iter().sum::<f32>() / v.data.len() as f32;
        let var = v.data.iter().map(|x| x * x).sum::<f32>() / v.data.len() as f32;
        assert!(mean.abs() < 0.05 && (var.sqrt() - 1.0 / 32f32.sqrt()).abs() < 0.02);
    }
}
