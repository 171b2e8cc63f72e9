//! Weights held on the host by name: what a model exports, and a [`WeightSource`] itself.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::error::{Error, Result};
use crate::model::Llama;
use crate::weights::{HostTensor, WeightSource};
use lopper_core::Dtype;

/// Where a tensor goes in a file being written: its slot's name, offset and bytes.
type Placed = (String, u64, Vec<u8>);

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

    /// Where every tensor of the model's safetensors file goes (HF names and layout), the
    /// matrices in `dtype` and the vectors (norm scales, biases) in F32, plus the zero F32
    /// vectors `zero_biases` names (`(name, length)`): from the shapes alone, before any data.
    pub fn safetensors_layout(
        &self,
        dtype: Dtype,
        zero_biases: &[(String, usize)],
    ) -> Result<SafetensorsLayout> {
        let entries = self
            .named_dims()
            .into_iter()
            .chain(zero_biases.iter().map(|(n, len)| (n.clone(), vec![*len])));
        let mut layout = SafetensorsLayout::new(entries, dtype)?;
        layout.zero = zero_biases.iter().map(|(n, _)| n.clone()).collect();
        Ok(layout)
    }

    /// Writes the file `layout` describes through `write_at(offset, bytes)`: the header, then
    /// each tensor as it comes off its device, then the zero vectors. The host holds one tensor
    /// at a time, never a whole-model copy. Of a resident model.
    pub fn write_safetensors(
        &self,
        layout: &SafetensorsLayout,
        write_at: &mut dyn FnMut(u64, &[u8]) -> std::io::Result<()>,
    ) -> Result<()> {
        self.require_resident("writing its weights")?;
        let io = |source| Error::Io {
            path: "(safetensors file being written)".into(),
            source,
        };
        write_at(0, &layout.head).map_err(io)?;
        let mut written = self.write_each(
            &mut |name, t| {
                let (at, bytes) = layout.encode(&name, &t)?;
                Ok(Some((name, at, bytes)))
            },
            write_at,
            &|m| layout.bad(m),
        )?;
        for name in &layout.zero {
            let (at, shape, d) = &layout.slots[name];
            let len = shape.iter().product::<usize>() * d.bytes() as usize;
            write_at(*at, &vec![0; len]).map_err(io)?;
            written.insert(name.clone());
        }
        if let Some(name) = layout.slots.keys().find(|n| !written.contains(*n)) {
            return Err(layout.bad(format!("{name} was never written")));
        }
        Ok(())
    }

    /// Every weight off its device, one at a time: `place(HF name, tensor)` gives the slot it
    /// fills, the offset and its bytes (`None`: the file has no place for it), and `write_at`
    /// writes them. Returns the slots filled; a slot filled twice is an error made by `bad`.
    fn write_each(
        &self,
        place: &mut dyn FnMut(String, HostTensor) -> Result<Option<Placed>>,
        write_at: &mut dyn FnMut(u64, &[u8]) -> std::io::Result<()>,
        bad: &dyn Fn(String) -> Error,
    ) -> Result<std::collections::BTreeSet<String>> {
        let mut written = std::collections::BTreeSet::new();
        let mut failed = None;
        self.visit_host_tensors(&mut |name, t| {
            if failed.is_some() {
                return;
            }
            let r = place(name, t).and_then(|slot| match slot {
                Some((slot, at, bytes)) => {
                    write_at(at, &bytes).map_err(|source| Error::Io {
                        path: "(model file being written)".into(),
                        source,
                    })?;
                    if written.insert(slot.clone()) {
                        Ok(())
                    } else {
                        Err(bad(format!("{slot} written twice")))
                    }
                }
                None => Ok(()),
            });
            if let Err(e) = r {
                failed = Some(e);
            }
        });
        match failed {
            Some(e) => Err(e),
            None => Ok(written),
        }
    }

    /// Where every tensor of the model's GGUF file goes ([`crate::gguf::llama_gguf_typed`]'s
    /// file: `meta`'s metadata and tensors, then the model's, 2-D ones stored as `ty`), from
    /// the shapes alone. `meta` is [`crate::gguf::llama_gguf_meta`] plus what the caller adds
    /// (tokenizer, name).
    pub fn gguf_layout(
        &self,
        meta: &crate::gguf::GgufBuilder,
        ty: crate::gguf::GgmlType,
    ) -> crate::gguf::GgufLayout {
        let sorted: BTreeMap<String, Vec<usize>> = self.named_dims().into_iter().collect();
        meta.layout(
            sorted
                .into_iter()
                .filter_map(|(n, shape)| {
                    crate::weights::hf_to_gguf_name(&n).map(|g| (g, shape, ty))
                })
                .collect(),
        )
    }

    /// Writes the GGUF file `layout` describes through `write_at(offset, bytes)`: the header,
    /// then each tensor as it comes off its device (q/k rows permuted as llama.cpp reads
    /// them). The host holds one tensor at a time. Of a resident model.
    pub fn write_gguf(
        &self,
        layout: &crate::gguf::GgufLayout,
        write_at: &mut dyn FnMut(u64, &[u8]) -> std::io::Result<()>,
    ) -> Result<()> {
        self.require_resident("writing its weights")?;
        layout.write_fixed(write_at).map_err(|source| Error::Io {
            path: "(GGUF file being written)".into(),
            source,
        })?;
        let shape = self.shape();
        let bad = |msg| Error::Gguf {
            path: "(being written)".into(),
            msg,
        };
        let written = self.write_each(
            &mut |name, t| {
                let Some((g, t)) = crate::gguf::llama_gguf_tensor(shape, &name, &t) else {
                    return Ok(None);
                };
                let (at, bytes) = layout.encode(&g, &t.shape, &t.data)?;
                Ok(Some((g, at, bytes)))
            },
            write_at,
            &bad,
        )?;
        if let Some(name) = layout.names().find(|n| !written.contains(*n)) {
            return Err(bad(format!("{name} was never written")));
        }
        Ok(())
    }

    /// The file of [`Llama::write_safetensors`] as bytes in memory.
    pub fn safetensors_bytes_in(
        &self,
        dtype: Dtype,
        zero_biases: &[(String, usize)],
    ) -> Result<Vec<u8>> {
        let layout = self.safetensors_layout(dtype, zero_biases)?;
        let mut buf = vec![0u8; layout.len() as usize];
        self.write_safetensors(&layout, &mut |at, b| {
            buf[at as usize..at as usize + b.len()].copy_from_slice(b);
            Ok(())
        })?;
        Ok(buf)
    }
}

/// The layout of a safetensors file: its header (tensors in name order, contiguous, the data
/// on an 8-byte boundary) and where each tensor's bytes go.
#[derive(Debug, Clone)]
pub struct SafetensorsLayout {
    /// The length prefix and the padded JSON header.
    head: Vec<u8>,
    /// Name -> (absolute offset of its bytes, shape, storage type).
    slots: BTreeMap<String, (u64, Vec<usize>, Dtype)>,
    /// Tensors written as zeros.
    zero: Vec<String>,
    len: u64,
}

impl SafetensorsLayout {
    /// Matrices (2-D) in `dtype`, everything else F32.
    fn new(entries: impl IntoIterator<Item = (String, Vec<usize>)>, dtype: Dtype) -> Result<Self> {
        let sorted: BTreeMap<String, Vec<usize>> = entries.into_iter().collect();
        let mut header = serde_json::Map::new();
        let mut layout = Vec::with_capacity(sorted.len());
        let mut offset = 0u64;
        for (name, shape) in sorted {
            let d = if shape.len() == 2 { dtype } else { Dtype::F32 };
            let len = shape.iter().product::<usize>() as u64 * d.bytes();
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
                path: "(being written)".into(),
                msg: e.to_string(),
            }
        })?;
        json.resize(json.len().div_ceil(8) * 8, b' ');
        let mut head = (json.len() as u64).to_le_bytes().to_vec();
        head.extend_from_slice(&json);
        let start = head.len() as u64;
        Ok(Self {
            slots: layout
                .into_iter()
                .map(|(n, o, s, d)| (n, (start + o, s, d)))
                .collect(),
            head,
            zero: Vec::new(),
            len: start + offset,
        })
    }

    /// The file's length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file holds no tensor data.
    pub fn is_empty(&self) -> bool {
        self.len == self.head.len() as u64
    }

    fn bad(&self, msg: String) -> Error {
        Error::Safetensors {
            path: "(being written)".into(),
            msg,
        }
    }

    /// `t`'s bytes in its slot's storage type, and the offset they go to.
    fn encode(&self, name: &str, t: &HostTensor) -> Result<(u64, Vec<u8>)> {
        let (at, shape, d) = self
            .slots
            .get(name)
            .ok_or_else(|| self.bad(format!("{name} is not in the header")))?;
        if *shape != t.shape {
            return Err(self.bad(format!(
                "{name}: {:?} written into a slot of {shape:?}",
                t.shape
            )));
        }
        let bytes = match d {
            Dtype::F32 => t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Dtype::Bf16 => t
                .data
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
            Dtype::F16 => t
                .data
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
        };
        Ok((*at, bytes))
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
        let layout = SafetensorsLayout::new(
            self.tensors
                .iter()
                .map(|(n, t)| (n.clone(), t.shape.clone())),
            dtype,
        )?;
        let mut buf = vec![0u8; layout.len() as usize];
        buf[..layout.head.len()].copy_from_slice(&layout.head);
        for (n, t) in &self.tensors {
            let (at, b) = layout.encode(n, t)?;
            buf[at as usize..at as usize + b.len()].copy_from_slice(&b);
        }
        Ok(buf)
    }
}
