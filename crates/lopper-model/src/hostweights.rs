//! Weights held on the host by name: what a model exports, and a [`WeightSource`] itself.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::error::{Error, Result};
use crate::model::Llama;
use crate::weights::{HostTensor, WeightSource};
use lopper_core::Dtype;

/// Named host tensors in Hugging Face layout.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostWeights {
    /// Tensors by HF name.
    pub tensors: BTreeMap<String, HostTensor>,
}

impl WeightSource for HostWeights {
    fn describe(&self) -> String {
        format!("in-memory weights ({} tensors)", self.tensors.len())
    }
    fn tensor(&self, name: &str) -> Result<Option<HostTensor>> {
        Ok(self.tensors.get(name).cloned())
    }
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> HostTensor {
    let shape = t.dims().to_vec();
    let data = t
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("converted to f32");
    HostTensor { shape, data }
}

impl<B: Backend> Llama<B> {
    /// Every weight, by Hugging Face name, in Hugging Face layout (`[out, in]`).
    pub fn to_host_weights(&self) -> HostWeights {
        let mut out = BTreeMap::new();
        let mut put = |name: String, t: HostTensor| {
            out.insert(name, t);
        };
        put(
            "model.embed_tokens.weight".into(),
            host(self.embed_tokens.weight.val()),
        );
        put("model.norm.weight".into(), host(self.norm.weight.val()));
        if let Some(head) = &self.lm_head {
            put(
                "lm_head.weight".into(),
                host(head.weight.val()).transposed(),
            );
        }
        for (i, l) in self.layers.iter().enumerate() {
            let p = |t: &str| format!("model.layers.{i}.{t}");
            if let (Some(n), Some(a)) = (&l.input_layernorm, &l.self_attn) {
                put(p("input_layernorm.weight"), host(n.weight.val()));
                for (name, lin) in [
                    ("q_proj", &a.q_proj),
                    ("k_proj", &a.k_proj),
                    ("v_proj", &a.v_proj),
                    ("o_proj", &a.o_proj),
                ] {
                    put(
                        p(&format!("self_attn.{name}.weight")),
                        host(lin.weight.val()).transposed(),
                    );
                    if let Some(b) = &lin.bias {
                        put(p(&format!("self_attn.{name}.bias")), host(b.val()));
                    }
                }
            }
            if let (Some(n), Some(m)) = (&l.post_attention_layernorm, &l.mlp) {
                put(p("post_attention_layernorm.weight"), host(n.weight.val()));
                for (name, lin) in [
                    ("gate_proj", &m.gate_proj),
                    ("up_proj", &m.up_proj),
                    ("down_proj", &m.down_proj),
                ] {
                    put(
                        p(&format!("mlp.{name}.weight")),
                        host(lin.weight.val()).transposed(),
                    );
                    if let Some(b) = &lin.bias {
                        put(p(&format!("mlp.{name}.bias")), host(b.val()));
                    }
                }
            }
        }
        HostWeights { tensors: out }
    }
}

impl HostWeights {
    /// Writes the tensors as one F32 safetensors file (atomically).
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        let data = self.safetensors_bytes()?;
        lopper_core::write_atomic(path, &data)?;
        Ok(())
    }

    /// The tensors as the bytes of one F32 safetensors file.
    pub fn safetensors_bytes(&self) -> Result<Vec<u8>> {
        self.safetensors_bytes_in(Dtype::F32)
    }

    /// [`HostWeights::safetensors_bytes`] with the matrices (2-D tensors) in `dtype`; vectors
    /// (norm scales, biases) stay F32.
    pub fn safetensors_bytes_in(&self, dtype: Dtype) -> Result<Vec<u8>> {
        use safetensors::Dtype as St;
        let bytes: Vec<(String, Vec<u8>, Vec<usize>, St)> = self
            .tensors
            .iter()
            .map(|(n, t)| {
                let d = if t.shape.len() == 2 {
                    dtype
                } else {
                    Dtype::F32
                };
                let (b, st): (Vec<u8>, St) = match d {
                    Dtype::F32 => (
                        t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                        St::F32,
                    ),
                    Dtype::Bf16 => (
                        t.data
                            .iter()
                            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                            .collect(),
                        St::BF16,
                    ),
                    Dtype::F16 => (
                        t.data
                            .iter()
                            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                            .collect(),
                        St::F16,
                    ),
                };
                (n.clone(), b, t.shape.clone(), st)
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
            .iter()
            .map(|(n, b, s, st)| {
                let v = safetensors::tensor::TensorView::new(*st, s.clone(), b)
                    .expect("consistent sizes");
                (n.clone(), v)
            })
            .collect();
        safetensors::serialize(views, None).map_err(|e| Error::Safetensors {
            path: "(in memory)".into(),
            msg: e.to_string(),
        })
    }
}
