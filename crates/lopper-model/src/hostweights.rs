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
    /// Every weight, by Hugging Face name, in Hugging Face layout (`[out, in]`). Of a resident
    /// model: an offloaded one's layers are not held ([`Llama::require_resident`]).
    pub fn to_host_weights(&self) -> HostWeights {
        let mut tensors = BTreeMap::new();
        self.visit_host_tensors(&mut |name, t| {
            tensors.insert(name, t);
        });
        HostWeights { tensors }
    }

    /// [`Llama::to_host_weights`] one tensor at a time: `put(name, tensor)` for every weight,
    /// each copied to the host for the call only.
    pub fn visit_host_tensors(&self, put: &mut dyn FnMut(String, HostTensor)) {
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
    }

    /// The model as the bytes of one safetensors file (HF names and layout), the matrices in
    /// `dtype` and the vectors (norm scales, biases) in F32, plus the zero F32 vectors
    /// `zero_biases` names (`(name, length)`). Written tensor by tensor into the one output
    /// buffer: the host holds the file's bytes and one tensor in f32, never a whole-model f32
    /// copy. Of a resident model.
    pub fn safetensors_bytes_in(
        &self,
        dtype: Dtype,
        zero_biases: &[(String, usize)],
    ) -> Result<Vec<u8>> {
        self.require_resident("writing its weights")?;
        let entries = self
            .named_dims()
            .into_iter()
            .chain(zero_biases.iter().map(|(n, len)| (n.clone(), vec![*len])));
        let mut file = SafetensorsFile::new(entries, dtype)?;
        file.mark_zero(zero_biases.iter().map(|(n, _)| n.as_str()));
        let mut failed = None;
        self.visit_host_tensors(&mut |name, t| {
            if failed.is_none()
                && let Err(e) = file.put(&name, &t)
            {
                failed = Some(e);
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        file.finish()
    }
}

/// A safetensors file assembled in one buffer: the header from every tensor's name and shape
/// first (tensors in name order, contiguous), then each tensor's bytes put into its slot.
struct SafetensorsFile {
    buf: Vec<u8>,
    /// Name -> (start of its bytes in `buf`, shape, storage type, filled).
    slots: BTreeMap<String, (usize, Vec<usize>, Dtype, bool)>,
}

impl SafetensorsFile {
    /// Matrices (2-D) in `dtype`, everything else F32.
    fn new(entries: impl IntoIterator<Item = (String, Vec<usize>)>, dtype: Dtype) -> Result<Self> {
        let sorted: BTreeMap<String, Vec<usize>> = entries.into_iter().collect();
        let mut header = serde_json::Map::new();
        let mut layout = Vec::with_capacity(sorted.len());
        let mut offset = 0usize;
        for (name, shape) in sorted {
            let d = if shape.len() == 2 { dtype } else { Dtype::F32 };
            let len = shape.iter().product::<usize>() * d.bytes() as usize;
            let st = match d {
                Dtype::F32 => "F32",
                Dtype::Bf16 => "BF16",
                Dtype::F16 => "F16",
            };
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": st, "shape": shape, "data_offsets": [offset, offset + len]}),
            );
            layout.push((name, offset, shape, d));
            offset += len;
        }
        let mut json = serde_json::to_vec(&serde_json::Value::Object(header)).map_err(|e| {
            Error::Safetensors {
                path: "(in memory)".into(),
                msg: e.to_string(),
            }
        })?;
        // The data starts on an 8-byte boundary: the header padded with spaces.
        json.resize(json.len().div_ceil(8) * 8, b' ');
        let data_start = 8 + json.len();
        let mut buf = Vec::new();
        buf.try_reserve_exact(data_start + offset).map_err(|_| {
            Error::Input(format!(
                "no memory for a {} MB weights file",
                (data_start + offset) >> 20
            ))
        })?;
        buf.extend_from_slice(&(json.len() as u64).to_le_bytes());
        buf.extend_from_slice(&json);
        buf.resize(data_start + offset, 0);
        let slots = layout
            .into_iter()
            .map(|(n, o, s, d)| (n, (data_start + o, s, d, false)))
            .collect();
        Ok(Self { buf, slots })
    }

    /// Tensors left at zero (their bytes are zero already).
    fn mark_zero<'a>(&mut self, names: impl IntoIterator<Item = &'a str>) {
        for n in names {
            if let Some(slot) = self.slots.get_mut(n) {
                slot.3 = true;
            }
        }
    }

    fn put(&mut self, name: &str, t: &HostTensor) -> Result<()> {
        let bad = |msg: String| Error::Safetensors {
            path: "(in memory)".into(),
            msg,
        };
        let (start, shape, d, filled) = self
            .slots
            .get_mut(name)
            .ok_or_else(|| bad(format!("{name} is not in the header")))?;
        if *shape != t.shape || *filled {
            return Err(bad(format!(
                "{name}: {:?} written into a slot of {shape:?} (filled: {filled})",
                t.shape
            )));
        }
        let out = &mut self.buf[*start..*start + t.data.len() * d.bytes() as usize];
        match d {
            Dtype::F32 => {
                for (o, v) in out.chunks_exact_mut(4).zip(&t.data) {
                    o.copy_from_slice(&v.to_le_bytes());
                }
            }
            Dtype::Bf16 => {
                for (o, &v) in out.chunks_exact_mut(2).zip(&t.data) {
                    o.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes());
                }
            }
            Dtype::F16 => {
                for (o, &v) in out.chunks_exact_mut(2).zip(&t.data) {
                    o.copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
                }
            }
        }
        *filled = true;
        Ok(())
    }

    fn finish(self) -> Result<Vec<u8>> {
        if let Some((name, _)) = self.slots.iter().find(|(_, s)| !s.3) {
            return Err(Error::Safetensors {
                path: "(in memory)".into(),
                msg: format!("{name} was never written"),
            });
        }
        Ok(self.buf)
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
        let mut file = SafetensorsFile::new(
            self.tensors
                .iter()
                .map(|(n, t)| (n.clone(), t.shape.clone())),
            dtype,
        )?;
        for (n, t) in &self.tensors {
            file.put(n, t)?;
        }
        file.finish()
    }
}
