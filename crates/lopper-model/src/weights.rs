//! Where weights come from: one trait, named by Hugging Face tensor names, with sources for GGUF,
//! safetensors checkpoints and seeded random weights. The model is built from any of them the
//! same way.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use burn::tensor::TensorData;

use crate::error::{Error, Result, io_err};
use crate::gguf::GgufFile;
use lopper_core::{Dtype, ModelShape};

/// A dense f32 tensor on the host, row-major, in Hugging Face layout (`[out, in]` for matrices).
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// The values.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// The transpose of a matrix (`[r, c]` -> `[c, r]`).
    pub fn transposed(&self) -> HostTensor {
        let (r, c) = (self.shape[0], self.shape[1]);
        let mut data = vec![0f32; r * c];
        for i in 0..r {
            let row = &self.data[i * c..(i + 1) * c];
            for (j, &v) in row.iter().enumerate() {
                data[j * r + i] = v;
            }
        }
        HostTensor {
            shape: vec![c, r],
            data,
        }
    }
}

impl HostTensor {
    /// The values as burn data of `dtype`, transposed (`[r, c]` -> `[c, r]`) when `transpose`:
    /// one pass, one output buffer (what the model stores, without an f32 transposed copy).
    pub fn into_data(self, dtype: Dtype, transpose: bool) -> TensorData {
        fn convert<T: burn::tensor::Element + Default>(
            t: HostTensor,
            transpose: bool,
            f: impl Fn(f32) -> T,
        ) -> TensorData {
            if !transpose || t.shape.len() != 2 {
                let data: Vec<T> = t.data.into_iter().map(f).collect();
                return TensorData::new(data, t.shape);
            }
            let (r, c) = (t.shape[0], t.shape[1]);
            let mut out = vec![T::default(); r * c];
            // 64 x 64 tiles keep both the strided reads and the writes in cache.
            const B: usize = 64;
            for i0 in (0..r).step_by(B) {
                for j0 in (0..c).step_by(B) {
                    for i in i0..(i0 + B).min(r) {
                        for j in j0..(j0 + B).min(c) {
                            out[j * r + i] = f(t.data[i * c + j]);
                        }
                    }
                }
            }
            TensorData::new(out, [c, r])
        }
        match dtype {
            Dtype::F32 if !transpose => TensorData::new(self.data, self.shape),
            Dtype::F32 => convert(self, true, |v| v),
            Dtype::Bf16 => convert(self, transpose, half::bf16::from_f32),
            Dtype::F16 => convert(self, transpose, half::f16::from_f32),
        }
    }
}

/// A checkpoint that yields tensors by their Hugging Face name
/// (`model.layers.3.self_attn.q_proj.weight`).
pub trait WeightSource {
    /// Human-readable name of the source, for errors.
    fn describe(&self) -> String;
    /// The tensor called `name`, or `None` if the checkpoint lacks it.
    fn tensor(&self, name: &str) -> Result<Option<HostTensor>>;
    /// Tensor `name` as the model stores it: burn data of `dtype`, transposed to `[in, out]`
    /// when `transpose`. The default converts [`WeightSource::tensor`]'s f32 values in one pass;
    /// a source that can write the stored form directly (synthetic weights) overrides it, so
    /// that loading never holds more than one tensor beyond the model.
    fn stored(&self, name: &str, dtype: Dtype, transpose: bool) -> Result<Option<TensorData>> {
        Ok(self.tensor(name)?.map(|t| t.into_data(dtype, transpose)))
    }
    /// The Hugging Face layout dims of tensor `name`, or `None` if the checkpoint lacks it. The
    /// default reads the tensor; file sources answer from their headers without reading data.
    fn dims(&self, name: &str) -> Result<Option<Vec<usize>>> {
        Ok(self.tensor(name)?.map(|t| t.shape))
    }
}

/// Hugging Face name -> GGUF name (llama architecture).
pub fn hf_to_gguf_name(hf: &str) -> Option<String> {
    Some(match hf {
        "model.embed_tokens.weight" => "token_embd.weight".into(),
        "lm_head.weight" => "output.weight".into(),
        "model.norm.weight" => "output_norm.weight".into(),
        _ => {
            let rest = hf.strip_prefix("model.layers.")?;
            let (layer, tail) = rest.split_once('.')?;
            let layer: usize = layer.parse().ok()?;
            let g = match tail {
                "input_layernorm.weight" => "attn_norm.weight",
                "self_attn.q_proj.weight" => "attn_q.weight",
                "self_attn.q_proj.bias" => "attn_q.bias",
                "self_attn.k_proj.weight" => "attn_k.weight",
                "self_attn.k_proj.bias" => "attn_k.bias",
                "self_attn.v_proj.weight" => "attn_v.weight",
                "self_attn.v_proj.bias" => "attn_v.bias",
                "self_attn.o_proj.weight" => "attn_output.weight",
                "self_attn.o_proj.bias" => "attn_output.bias",
                "post_attention_layernorm.weight" => "ffn_norm.weight",
                "mlp.gate_proj.weight" => "ffn_gate.weight",
                "mlp.gate_proj.bias" => "ffn_gate.bias",
                "mlp.up_proj.weight" => "ffn_up.weight",
                "mlp.up_proj.bias" => "ffn_up.bias",
                "mlp.down_proj.weight" => "ffn_down.weight",
                "mlp.down_proj.bias" => "ffn_down.bias",
                _ => return None,
            };
            format!("blk.{layer}.{g}")
        }
    })
}

/// Undoes (or, with `inverse`, applies) llama.cpp's row permutation of `attn_q`/`attn_k`:
/// within each head, GGUF stores RoPE pairs as adjacent rows `(2i, 2i+1)`, Hugging Face as
/// `(i, i + head_dim/2)`. `w` is `[n_head * head_dim, in]`, or a bias `[n_head * head_dim]`.
pub fn permute_qk_rows(w: &HostTensor, n_head: usize, inverse: bool) -> HostTensor {
    let (rows, cols) = (w.shape[0], w.shape.get(1).copied().unwrap_or(1));
    let hd = rows / n_head;
    let half = hd / 2;
    let mut data = vec![0f32; rows * cols];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let gguf_row = h * hd + 2 * i + j;
                let hf_row = h * hd + j * half + i;
                let (dst, src) = if inverse {
                    (gguf_row, hf_row)
                } else {
                    (hf_row, gguf_row)
                };
                data[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&w.data[src * cols..(src + 1) * cols]);
            }
        }
    }
    HostTensor {
        shape: w.shape.clone(),
        data,
    }
}

/// Weights from a GGUF file (llama architecture), dequantised to f32 and with q/k rows restored
/// to the Hugging Face layout.
#[derive(Debug)]
pub struct GgufWeights<'a> {
    file: &'a GgufFile,
    heads: Vec<(usize, usize)>,
}

impl<'a> GgufWeights<'a> {
    /// Wraps `file`, whose per-layer head counts are in `shape`.
    pub fn new(file: &'a GgufFile, shape: &ModelShape) -> Self {
        Self {
            file,
            heads: shape
                .layers
                .iter()
                .map(|l| (l.n_heads, l.n_kv_heads))
                .collect(),
        }
    }
}

impl WeightSource for GgufWeights<'_> {
    fn describe(&self) -> String {
        format!("GGUF file {}", self.file.path().display())
    }

    fn dims(&self, name: &str) -> Result<Option<Vec<usize>>> {
        Ok(hf_to_gguf_name(name)
            .and_then(|g| self.file.tensor_info(&g))
            .map(|t| t.row_major_shape()))
    }

    fn tensor(&self, name: &str) -> Result<Option<HostTensor>> {
        let Some(g) = hf_to_gguf_name(name) else {
            return Ok(None);
        };
        if self.file.tensor_info(&g).is_none() {
            return Ok(None);
        }
        let (shape, data) = self.file.dequantize(&g)?;
        let t = HostTensor { shape, data };
        let layer = || -> usize {
            g.strip_prefix("blk.")
                .and_then(|r| r.split('.').next())
                .and_then(|l| l.parse().ok())
                .unwrap_or(0)
        };
        let n_head = if g.ends_with("attn_q.weight") || g.ends_with("attn_q.bias") {
            self.heads.get(layer()).map(|h| h.0)
        } else if g.ends_with("attn_k.weight") || g.ends_with("attn_k.bias") {
            self.heads.get(layer()).map(|h| h.1)
        } else {
            None
        };
        Ok(Some(match n_head {
            Some(n) if n > 0 && t.shape.len() <= 2 && t.shape[0].is_multiple_of(2 * n) => {
                permute_qk_rows(&t, n, false)
            }
            _ => t,
        }))
    }
}

/// [`GgufWeights`] that own their file: a source a model can keep to read its layers from for
/// each turn ([`crate::Llama::offloaded`]).
#[derive(Debug)]
pub struct GgufSource {
    file: GgufFile,
    shape: ModelShape,
}

impl GgufSource {
    /// The weights of `file`, whose per-layer head counts are in `shape`.
    pub fn new(file: GgufFile, shape: &ModelShape) -> Self {
        Self {
            file,
            shape: shape.clone(),
        }
    }
}

impl WeightSource for GgufSource {
    fn describe(&self) -> String {
        GgufWeights::new(&self.file, &self.shape).describe()
    }
    fn tensor(&self, name: &str) -> Result<Option<HostTensor>> {
        GgufWeights::new(&self.file, &self.shape).tensor(name)
    }
    fn dims(&self, name: &str) -> Result<Option<Vec<usize>>> {
        GgufWeights::new(&self.file, &self.shape).dims(name)
    }
}

/// Weights from a Hugging Face safetensors checkpoint: one `model.safetensors`, or shards listed
/// in `model.safetensors.index.json`. F32, F16 and BF16 are read.
#[derive(Debug)]
pub struct SafetensorsWeights {
    files: Vec<(PathBuf, memmap2::Mmap)>,
    /// tensor name -> index into `files`
    index: BTreeMap<String, usize>,
}

impl SafetensorsWeights {
    /// Opens the checkpoint in `dir` (single file or sharded).
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.is_file() {
            Self::open_files(&[single])
        } else if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::Safetensors {
                    path: index.clone(),
                    msg: format!("not valid JSON: {e}"),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::Safetensors {
                    path: index.clone(),
                    msg: "no `weight_map` object".into(),
                })?;
            let mut shards: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(str::to_owned))
                .collect();
            shards.sort();
            shards.dedup();
            let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
            Self::open_files(&paths)
        } else {
            Err(Error::Resolve(format!(
                "{} has neither model.safetensors nor model.safetensors.index.json",
                dir.display()
            )))
        }
    }

    /// Opens the given safetensors files.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        for (i, path) in paths.iter().enumerate() {
            let f = std::fs::File::open(path).map_err(io_err(path))?;
            // SAFETY: read-only map of a checkpoint lopper does not modify while it is open.
            #[allow(unsafe_code)]
            let map = unsafe { memmap2::Mmap::map(&f) }.map_err(io_err(path))?;
            let st =
                safetensors::SafeTensors::deserialize(&map).map_err(|e| Error::Safetensors {
                    path: path.clone(),
                    msg: format!("{e} (the file is truncated or not a safetensors file)"),
                })?;
            for name in st.names() {
                index.insert(name.to_string(), i);
            }
            files.push((path.clone(), map));
        }
        Ok(Self { files, index })
    }

    /// Values in the checkpoint's bias tensors (`*.bias`), read from the headers.
    pub fn bias_params(&self) -> u64 {
        self.index
            .iter()
            .filter(|(name, _)| name.ends_with(".bias"))
            .filter_map(|(name, &i)| {
                let st = safetensors::SafeTensors::deserialize(&self.files[i].1).ok()?;
                Some(st.tensor(name).ok()?.shape().iter().product::<usize>() as u64)
            })
            .sum()
    }
}

impl WeightSource for SafetensorsWeights {
    fn describe(&self) -> String {
        match self.files.as_slice() {
            [(p, _)] => format!("safetensors file {}", p.display()),
            fs => format!(
                "{} safetensors shards in {}",
                fs.len(),
                fs[0].0.parent().unwrap_or(Path::new(".")).display()
            ),
        }
    }

    fn dims(&self, name: &str) -> Result<Option<Vec<usize>>> {
        let Some(&i) = self.index.get(name) else {
            return Ok(None);
        };
        let (path, map) = &self.files[i];
        let st = safetensors::SafeTensors::deserialize(map).map_err(|e| Error::Safetensors {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        let view = st.tensor(name).map_err(|e| Error::Safetensors {
            path: path.clone(),
            msg: format!("tensor `{name}`: {e}"),
        })?;
        use safetensors::Dtype;
        if !matches!(view.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(Error::Safetensors {
                path: path.clone(),
                msg: format!(
                    "tensor `{name}` has dtype {:?}; lopper reads F32, F16 and BF16 checkpoints",
                    view.dtype()
                ),
            });
        }
        Ok(Some(view.shape().to_vec()))
    }

    fn tensor(&self, name: &str) -> Result<Option<HostTensor>> {
        let Some(&i) = self.index.get(name) else {
            return Ok(None);
        };
        let (path, map) = &self.files[i];
        let err = |msg: String| Error::Safetensors {
            path: path.clone(),
            msg,
        };
        let st = safetensors::SafeTensors::deserialize(map).map_err(|e| err(e.to_string()))?;
        let view = st
            .tensor(name)
            .map_err(|e| err(format!("tensor `{name}`: {e}")))?;
        let bytes = view.data();
        use safetensors::Dtype;
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(err(format!(
                    "tensor `{name}` has dtype {other:?}; lopper reads F32, F16 and BF16 checkpoints"
                )));
            }
        };
        Ok(Some(HostTensor {
            shape: view.shape().to_vec(),
            data,
        }))
    }
}

/// Seeded random weights for any shape: the tiny test model, benchmarks. Each tensor's values
/// depend only on the seed and the tensor's name, so they are the same on every backend.
#[derive(Debug, Clone)]
pub struct RandomWeights {
    shape: ModelShape,
    seed: u64,
}

impl RandomWeights {
    /// Random weights of `shape` from `seed`.
    pub fn new(shape: &ModelShape, seed: u64) -> Self {
        Self {
            shape: shape.clone(),
            seed,
        }
    }
}

impl WeightSource for RandomWeights {
    fn describe(&self) -> String {
        format!("random weights (seed {})", self.seed)
    }

    fn tensor(&self, name: &str) -> Result<Option<HostTensor>> {
        // Random models are bias-free, like LLaMA.
        if name.ends_with(".bias") {
            return Ok(None);
        }
        let Some(dims) = expected_dims(&self.shape, name) else {
            return Ok(None);
        };
        // FNV-1a of the name, mixed with the seed.
        let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ h);
        let n: usize = dims.iter().product();
        let is_norm = name.ends_with("layernorm.weight") || name == "model.norm.weight";
        let scale = if is_norm {
            0.2
        } else {
            // Uniform with std 1/sqrt(fan_in) keeps activations O(1).
            (3.0 / *dims.last().unwrap() as f32).sqrt()
        };
        let data = (0..n)
            .map(|_| {
                let u: f32 = rng.random::<f32>() * 2.0 - 1.0;
                if is_norm { 1.0 + scale * u } else { scale * u }
            })
            .collect();
        Ok(Some(HostTensor { shape: dims, data }))
    }
}

/// The HF-layout shape tensor `name` must have in a model of `shape`, if `shape` has it.
pub fn expected_dims(shape: &ModelShape, name: &str) -> Option<Vec<usize>> {
    let d = shape.hidden_size;
    match name {
        "model.embed_tokens.weight" => return Some(vec![shape.vocab_size, d]),
        "lm_head.weight" if !shape.tie_word_embeddings => return Some(vec![shape.vocab_size, d]),
        "model.norm.weight" => return Some(vec![d]),
        _ => {}
    }
    if let Some(w) = name.strip_suffix(".bias") {
        // A projection's optional bias: one value per output feature.
        let wd = expected_dims(shape, &format!("{w}.weight"))?;
        return (w.contains("_proj")).then(|| vec![wd[0]]);
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let l = shape.layers.get(layer.parse::<usize>().ok()?)?;
    let (q, kv, f) = (
        l.n_heads * l.head_dim,
        l.n_kv_heads * l.head_dim,
        l.ffn_hidden,
    );
    let attn = l.has_attn();
    let mlp = l.has_mlp();
    Some(match tail {
        "input_layernorm.weight" if attn => vec![d],
        "self_attn.q_proj.weight" if attn => vec![q, d],
        "self_attn.k_proj.weight" if attn => vec![kv, d],
        "self_attn.v_proj.weight" if attn => vec![kv, d],
        "self_attn.o_proj.weight" if attn => vec![d, q],
        "post_attention_layernorm.weight" if mlp => vec![d],
        "mlp.gate_proj.weight" if mlp => vec![f, d],
        "mlp.up_proj.weight" if mlp => vec![f, d],
        "mlp.down_proj.weight" if mlp => vec![d, f],
        _ => return None,
    })
}

/// Loads tensor `name` from `src` as the model stores it ([`WeightSource::stored`]), checking
/// its shape against `shape` (in Hugging Face layout, before any transposition).
pub fn load_stored(
    src: &dyn WeightSource,
    shape: &ModelShape,
    name: &str,
    dtype: Dtype,
    transpose: bool,
) -> Result<TensorData> {
    let expected = expected_dims(shape, name).expect("the model only asks for tensors it has");
    let t = src
        .stored(name, dtype, transpose)?
        .ok_or_else(|| Error::MissingTensor {
            name: name.into(),
            source_desc: src.describe(),
        })?;
    let mut got = t.shape.to_vec();
    if transpose && got.len() == 2 {
        got.reverse();
    }
    if got != expected {
        return Err(Error::TensorShape {
            name: name.into(),
            source_desc: src.describe(),
            expected,
            got,
        });
    }
    Ok(t)
}

/// Loads tensor `name` from `src` and checks its shape against `shape`.
pub fn load_checked(src: &dyn WeightSource, shape: &ModelShape, name: &str) -> Result<HostTensor> {
    let expected = expected_dims(shape, name).expect("the model only asks for tensors it has");
    let t = src.tensor(name)?.ok_or_else(|| Error::MissingTensor {
        name: name.into(),
        source_desc: src.describe(),
    })?;
    if t.shape != expected {
        return Err(Error::TensorShape {
            name: name.into(),
            source_desc: src.describe(),
            expected,
            got: t.shape,
        });
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qk_permutation_round_trips_and_pairs_rows() {
        let t = HostTensor {
            shape: vec![8, 1],
            data: (0..8).map(|x| x as f32).collect(),
        };
        // Two heads of dim 4: GGUF rows (0,1),(2,3) are HF rows (0,2),(1,3).
        let hf = permute_qk_rows(&t, 2, false);
        assert_eq!(hf.data, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        assert_eq!(permute_qk_rows(&hf, 2, true), t);
    }

    #[test]
    fn gguf_names_cover_every_llama_tensor() {
        let s = ModelShape::tiny();
        assert_eq!(
            hf_to_gguf_name("model.layers.2.mlp.down_proj.weight").unwrap(),
            "blk.2.ffn_down.weight"
        );
        for i in 0..3 {
            for t in [
                "input_layernorm.weight",
                "self_attn.q_proj.weight",
                "self_attn.k_proj.weight",
                "self_attn.v_proj.weight",
                "self_attn.o_proj.weight",
                "post_attention_layernorm.weight",
                "mlp.gate_proj.weight",
                "mlp.up_proj.weight",
                "mlp.down_proj.weight",
            ] {
                let n = format!("model.layers.{i}.{t}");
                assert!(hf_to_gguf_name(&n).is_some(), "{n}");
                assert!(expected_dims(&s, &n).is_some(), "{n}");
            }
        }
    }

    #[test]
    fn random_weights_are_seeded_per_name() {
        let s = ModelShape::tiny();
        let a = RandomWeights::new(&s, 1);
        let n = "model.layers.0.self_attn.q_proj.weight";
        assert_eq!(
            a.tensor(n).unwrap(),
            RandomWeights::new(&s, 1).tensor(n).unwrap()
        );
        assert_ne!(
            a.tensor(n).unwrap(),
            RandomWeights::new(&s, 2).tensor(n).unwrap()
        );
        assert_eq!(a.tensor(n).unwrap().unwrap().shape, vec![32, 32]);
        assert!(
            a.tensor("lm_head.weight").unwrap().is_some(),
            "the tiny model is untied"
        );
    }
}
