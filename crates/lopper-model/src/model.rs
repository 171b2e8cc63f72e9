//! The LLaMA-family decoder, built from a [`ModelShape`]. One forward path: the plain forward is
//! the masked forward with no masks.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::BTreeMap;

use burn::module::{Module, Param};
use burn::nn::{Embedding, Linear};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Int, Tensor, TensorData};

use crate::error::{Error, Result};
use crate::masks::{LayerMasks, Masks};
use crate::placement::LayerStream;
use crate::weights::{HostTensor, WeightSource, load_checked, load_stored};
use lopper_core::{Dtype, LayerShape, ModelShape};
use lopper_kernels::{
    AttentionShape, RopeTables, causal_attention, linear, matmul, rms_norm, swiglu,
};

/// Root-mean-square layer norm: `x / sqrt(mean(x^2) + eps) * weight`.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// Scale, `[hidden]`.
    pub weight: Param<Tensor<B, 1>>,
    /// Epsilon inside the square root.
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// # Shapes
    /// - `x`: `[n, hidden]` -> `[n, hidden]`
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        // One fused pass where it applies (lopper-kernels), else burn's ops.
        rms_norm(x, self.weight.val(), self.eps).unwrap_or_else(|(x, w)| {
            let ms = x.clone().powi_scalar(2).mean_dim(1);
            x * (ms + self.eps).sqrt().recip() * w.unsqueeze_dim(0)
        })
    }
}

/// Grouped-query causal self-attention with RoPE.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// `[hidden, n_heads * head_dim]`
    pub q_proj: Linear<B>,
    /// `[hidden, n_kv_heads * head_dim]`
    pub k_proj: Linear<B>,
    /// `[hidden, n_kv_heads * head_dim]`
    pub v_proj: Linear<B>,
    /// `[n_heads * head_dim, hidden]`
    pub o_proj: Linear<B>,
    /// Query heads.
    pub n_heads: usize,
    /// KV heads.
    pub n_kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
}

impl<B: Backend> Attention<B> {
    /// # Shapes
    /// - `x`: `[batch * seq, hidden]` (normed input), `rope`: tables for this batch shape
    /// - `head_mask`: `[n_heads]`, multiplies each query head's output before `o_proj`
    /// - output: `[batch * seq, hidden]`
    pub fn forward(
        &self,
        x: Tensor<B, 2>,
        batch: usize,
        seq: usize,
        rope: &Rope<B>,
        head_mask: Option<&Tensor<B, 1>>,
    ) -> Tensor<B, 2> {
        self.forward_tapped(x, batch, seq, rope, head_mask, &mut |_| {})
    }

    /// [`Attention::forward`], handing `tap` the (masked) input of `o_proj`,
    /// `[batch * seq, n_heads * head_dim]`.
    pub fn forward_tapped(
        &self,
        x: Tensor<B, 2>,
        batch: usize,
        seq: usize,
        rope: &Rope<B>,
        head_mask: Option<&Tensor<B, 1>>,
        tap: &mut dyn FnMut(&Tensor<B, 2>),
    ) -> Tensor<B, 2> {
        let (h, kvh, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let q = linear(&self.q_proj, x.clone());
        let k = linear(&self.k_proj, x.clone());
        let v = linear(&self.v_proj, x);
        let shape = AttentionShape {
            batch,
            seq,
            heads: h,
            kv_heads: kvh,
            head_dim: hd,
            products: self.q_proj.weight.val().dtype(),
        };
        // The fused kernel where it applies (CPU, f32, BLAS), else burn's ops.
        let mut out = match causal_attention(q, k, v, shape, rope.tables()) {
            Ok(out) => out,
            Err((q, k, v)) => {
                let heads = |t: Tensor<B, 2>, n: usize| -> Tensor<B, 4> {
                    t.reshape([batch, seq, n, hd]).swap_dims(1, 2)
                };
                let q = heads(rope.apply(q, h), h);
                let k = heads(rope.apply(k, kvh), kvh);
                let v = heads(v, kvh);
                let (k, v) = (repeat_kv(k, h / kvh), repeat_kv(v, h / kvh));
                rope.causal_attention(q, k, v) // [b, h, s, hd]
                    .swap_dims(1, 2)
                    .reshape([batch * seq, h * hd])
            }
        };
        if let Some(m) = head_mask {
            let per_column = m
                .clone()
                .reshape([h, 1])
                .expand([h, hd])
                .reshape([1, h * hd]);
            out = out * per_column;
        }
        tap(&out);
        linear(&self.o_proj, out)
    }
}

/// Expands `[b, kvh, s, d]` to `[b, kvh * rep, s, d]`; query head `i` reads KV head `i / rep`.
fn repeat_kv<B: Backend>(x: Tensor<B, 4>, rep: usize) -> Tensor<B, 4> {
    if rep == 1 {
        return x;
    }
    let [b, kvh, s, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, kvh, rep, s, d])
        .reshape([b, kvh * rep, s, d])
}

/// SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `[hidden, ffn_hidden]`
    pub gate_proj: Linear<B>,
    /// `[hidden, ffn_hidden]`
    pub up_proj: Linear<B>,
    /// `[ffn_hidden, hidden]`
    pub down_proj: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    /// # Shapes
    /// - `x`: `[n, hidden]`, `channel_mask`: `[ffn_hidden]` (multiplies `silu(gate) * up`)
    /// - output: `[n, hidden]`
    pub fn forward(&self, x: Tensor<B, 2>, channel_mask: Option<&Tensor<B, 1>>) -> Tensor<B, 2> {
        self.forward_tapped(x, channel_mask, &mut |_| {})
    }

    /// [`Mlp::forward`], handing `tap` the (masked) input of `down_proj`, `[n, ffn_hidden]`.
    pub fn forward_tapped(
        &self,
        x: Tensor<B, 2>,
        channel_mask: Option<&Tensor<B, 1>>,
        tap: &mut dyn FnMut(&Tensor<B, 2>),
    ) -> Tensor<B, 2> {
        let (gate, up) = (linear(&self.gate_proj, x.clone()), linear(&self.up_proj, x));
        let mut a = swiglu(gate, up).unwrap_or_else(|(gate, up)| silu(gate) * up);
        if let Some(m) = channel_mask {
            a = a * m.clone().unsqueeze_dim(0);
        }
        tap(&a);
        linear(&self.down_proj, a)
    }
}

/// Points inside a decoder layer where [`Llama::forward_tapped`] shows activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tap {
    /// The input of `q_proj`/`k_proj`/`v_proj`: the attention norm's output, `[batch * seq, hidden]`.
    AttnInput,
    /// The input of `gate_proj`/`up_proj`: the MLP norm's output, `[batch * seq, hidden]`.
    MlpInput,
    /// The input of `o_proj`: per-head attention outputs, `[batch * seq, n_heads * head_dim]`.
    OProjInput,
    /// The input of `down_proj`: `silu(gate) * up`, `[batch * seq, ffn_hidden]`.
    DownProjInput,
}

/// One decoder layer. Either block may be absent (pruned away); its norm goes with it.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// Norm before attention.
    pub input_layernorm: Option<RmsNorm<B>>,
    /// Attention block.
    pub self_attn: Option<Attention<B>>,
    /// Norm before the MLP.
    pub post_attention_layernorm: Option<RmsNorm<B>>,
    /// MLP block.
    pub mlp: Option<Mlp<B>>,
}

/// Runs single decoder layers on a fixed batch geometry ([`Llama::stepper`]). On a model whose
/// layers are placed over several devices ([`Llama::place`]) each layer runs on its own device:
/// the residual stream (and a layer's masks) move there first, and the result stays there.
#[derive(Debug)]
pub struct LayerStepper<B: Backend> {
    /// A RoPE table for each device the model's layers live on.
    ropes: Vec<(B::Device, Rope<B>)>,
    inv_freq: Vec<f64>,
    batch: usize,
    seq: usize,
}

impl<B: Backend> LayerStepper<B> {
    /// `layer` (of the model that made the stepper, or a changed copy of one) applied to the
    /// residual stream `x`, with its linear inputs tapped.
    ///
    /// # Shapes
    /// - `x`: `[batch * seq, hidden]` -> `[batch * seq, hidden]`
    pub fn forward(
        &self,
        layer: &DecoderLayer<B>,
        x: Tensor<B, 2>,
        mut on_tap: impl FnMut(Tap, &Tensor<B, 2>),
    ) -> Tensor<B, 2> {
        self.run(layer, x, None, &mut on_tap)
    }

    /// [`LayerStepper::forward`] under one layer's masks.
    ///
    /// # Shapes
    /// - `x`: `[batch * seq, hidden]` -> `[batch * seq, hidden]`
    pub fn forward_masked(
        &self,
        layer: &DecoderLayer<B>,
        x: Tensor<B, 2>,
        masks: &LayerMasks<B>,
    ) -> Tensor<B, 2> {
        self.run(layer, x, Some(masks), &mut |_, _| {})
    }

    /// `layer` on its own device: `x` and the masks move there first; a layer without blocks
    /// passes `x` through.
    fn run(
        &self,
        layer: &DecoderLayer<B>,
        x: Tensor<B, 2>,
        masks: Option<&LayerMasks<B>>,
        tap: &mut dyn FnMut(Tap, &Tensor<B, 2>),
    ) -> Tensor<B, 2> {
        let Some(device) = layer.device() else {
            return x;
        };
        let x = layer.on_device(x);
        let rope = match self.ropes.iter().find(|(d, _)| *d == device) {
            Some((_, rope)) => Cow::Borrowed(rope),
            // A layer on a device the model did not use when the stepper was made: a table
            // for this call.
            None => Cow::Owned(Rope::new(&self.inv_freq, self.batch, self.seq, &device)),
        };
        let moved;
        let masks = match masks {
            Some(m) if !m.is_on(&device) => {
                moved = m.to_device(&device);
                Some(&moved)
            }
            m => m,
        };
        layer.forward(x, self.batch, self.seq, &rope, masks, tap)
    }
}

/// The names of a decoder layer's seven projections, in the order of [`DecoderLayer::linears`].
pub const LINEAR_NAMES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

impl<B: Backend> DecoderLayer<B> {
    /// The seven projections in [`LINEAR_NAMES`] order, `None` where their block is absent.
    pub fn linears(&self) -> [Option<&Linear<B>>; 7] {
        let a = self.self_attn.as_ref();
        let m = self.mlp.as_ref();
        [
            a.map(|a| &a.q_proj),
            a.map(|a| &a.k_proj),
            a.map(|a| &a.v_proj),
            a.map(|a| &a.o_proj),
            m.map(|m| &m.gate_proj),
            m.map(|m| &m.up_proj),
            m.map(|m| &m.down_proj),
        ]
    }

    /// [`DecoderLayer::linears`], mutable.
    pub fn linears_mut(&mut self) -> [Option<&mut Linear<B>>; 7] {
        let (mut q, mut k, mut v, mut o) = (None, None, None, None);
        let (mut g, mut u, mut d) = (None, None, None);
        if let Some(a) = self.self_attn.as_mut() {
            (q, k, v, o) = (
                Some(&mut a.q_proj),
                Some(&mut a.k_proj),
                Some(&mut a.v_proj),
                Some(&mut a.o_proj),
            );
        }
        if let Some(m) = self.mlp.as_mut() {
            (g, u, d) = (
                Some(&mut m.gate_proj),
                Some(&mut m.up_proj),
                Some(&mut m.down_proj),
            );
        }
        [q, k, v, o, g, u, d]
    }
}

impl<B: Backend> DecoderLayer<B> {
    /// The device the layer's weights live on (`None` for a layer without blocks: it runs
    /// nothing).
    pub fn device(&self) -> Option<B::Device> {
        self.input_layernorm
            .as_ref()
            .map(|n| n.weight.val().device())
            .or_else(|| {
                self.post_attention_layernorm
                    .as_ref()
                    .map(|n| n.weight.val().device())
            })
    }

    /// `x` moved to the layer's device (unchanged for a layer without blocks, or one already
    /// there): what a caller that combines a layer's taps with its input does first on a
    /// model placed over several devices.
    pub fn on_device(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match self.device() {
            Some(device) if x.device() != device => x.to_device(&device),
            _ => x,
        }
    }

    fn forward(
        &self,
        x: Tensor<B, 2>,
        batch: usize,
        seq: usize,
        rope: &Rope<B>,
        masks: Option<&LayerMasks<B>>,
        tap: &mut dyn FnMut(Tap, &Tensor<B, 2>),
    ) -> Tensor<B, 2> {
        let mut x = x;
        if let (Some(norm), Some(attn)) = (&self.input_layernorm, &self.self_attn) {
            let scale = masks.map_or(1.0, |m| m.attn);
            if scale != 0.0 {
                let xin = norm.forward(x.clone());
                tap(Tap::AttnInput, &xin);
                let y = attn.forward_tapped(
                    xin,
                    batch,
                    seq,
                    rope,
                    masks.and_then(|m| m.heads.as_ref()),
                    &mut |t| tap(Tap::OProjInput, t),
                );
                x = if scale == 1.0 { x + y } else { x + y * scale };
            }
        }
        if let (Some(norm), Some(mlp)) = (&self.post_attention_layernorm, &self.mlp) {
            let scale = masks.map_or(1.0, |m| m.mlp);
            if scale != 0.0 {
                let xin = norm.forward(x.clone());
                tap(Tap::MlpInput, &xin);
                let y =
                    mlp.forward_tapped(xin, masks.and_then(|m| m.channels.as_ref()), &mut |t| {
                        tap(Tap::DownProjInput, t)
                    });
                x = if scale == 1.0 { x + y } else { x + y * scale };
            }
        }
        x
    }
}

/// Predicting positions whose logits a loss computes at once (a `[NLL_ROWS, vocab]` block).
/// 1,024 keeps a policy-gradient batch (8 x 128) in one block and bounds a long evaluation's
/// logits at 200 MB for a 49,152-token vocabulary.
pub const NLL_ROWS: usize = 1024;

/// Query rows per block of the chunked causal attention used for long sequences.
const ATTN_CHUNK: usize = 256;

/// The activation memory one forward pass (no autodiff) of a model holds at its peak, by part,
/// in bytes. An estimate from the shape alone, made before any work so that a batch or a
/// sequence that cannot fit is refused with a figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardMemory {
    /// RoPE tables and the causal-mask blocks of chunked attention (they grow with seq^2).
    pub tables: u64,
    /// The widest layer's working set: residual stream, projections, SwiGLU.
    pub layer: u64,
    /// Attention scores and their softmax (full `seq x seq`, or one block of query rows).
    pub attention: u64,
    /// Logits over the vocabulary and the log-sum-exp temporary.
    pub logits: u64,
}

impl ForwardMemory {
    /// A forward of `batch` rows of `seq` tokens of a model of `shape`, in f32.
    pub fn of(shape: &ModelShape, batch: usize, seq: usize) -> Self {
        const F32: u64 = 4;
        let (b, s) = (batch as u64, seq as u64);
        let chunked = seq > 2 * ATTN_CHUNK;
        let widest = |f: &dyn Fn(&lopper_core::LayerShape) -> u64| {
            shape.layers.iter().map(f).max().unwrap_or(0)
        };
        let heads = widest(&|l| (l.n_heads * l.head_dim) as u64);
        let rope = 2 * 2 * b * s * heads;
        let bias = if chunked {
            s * (s + ATTN_CHUNK as u64) / 2
        } else {
            0
        };
        let hidden = shape.hidden_size as u64;
        let layer = widest(&|l| {
            let (q, kv) = (
                (l.n_heads * l.head_dim) as u64,
                (l.n_kv_heads * l.head_dim) as u64,
            );
            // x, normed, residual sum; q, k, v, k and v repeated to every head, output, o_proj.
            let attn = 3 * hidden + 4 * q + 2 * kv + hidden;
            // gate, up, silu(gate) * up, down_proj.
            let mlp = 3 * l.ffn_hidden as u64 + hidden;
            attn.max(mlp) + hidden
        }) * b
            * s;
        let rows = if chunked { ATTN_CHUNK as u64 } else { s };
        let attention = 2 * b * widest(&|l| l.n_heads as u64) * rows * s;
        let logits = 2 * b * s * shape.vocab_size as u64;
        Self {
            tables: (rope + bias) * F32,
            layer: layer * F32,
            attention: attention * F32,
            logits: logits * F32,
        }
    }

    /// The sum of the parts.
    pub fn total(&self) -> u64 {
        self.tables + self.layer + self.attention + self.logits
    }
}

/// The memory a model's weights take where they live, in bytes, and what loading adds for a
/// moment: an estimate from the shape alone, made before any tensor is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightMemory {
    /// Weight matrices (projections, embedding, LM head) in the storage type.
    pub matrices: u64,
    /// Norm scales and biases (always f32).
    pub vectors: u64,
    /// The largest matrix's f32 values while it is converted (file sources read a tensor as
    /// f32, then store it; synthetic weights are generated in place: 0).
    pub loading: u64,
}

impl WeightMemory {
    /// The weights of a model of `shape` stored in `dtype`, with `bias_params` bias values;
    /// `streamed_f32` when the source hands each tensor over as f32 first (files).
    pub fn of(shape: &ModelShape, dtype: Dtype, bias_params: u64, streamed_f32: bool) -> Self {
        let matrices = shape.num_params() - shape.norm_params();
        let largest = shape
            .layers
            .iter()
            .map(|l| (l.n_heads * l.head_dim).max(l.ffn_hidden) as u64 * shape.hidden_size as u64)
            .max()
            .unwrap_or(0)
            .max(shape.embedding_params());
        // A non-transposed f32 tensor is moved into place; every other one is written once more.
        let loading = if streamed_f32 { largest * 4 } else { 0 };
        Self {
            matrices: matrices * dtype.bytes(),
            vectors: (shape.norm_params() + bias_params) * 4,
            loading,
        }
    }

    /// The weights of a model of `shape` whose decoder layers are offloaded
    /// ([`Llama::offloaded`]): the embedding and LM head stay, and the largest layer is read in
    /// for its turn (with its largest tensor's f32 values in flight for a file source).
    pub fn offloaded(
        shape: &ModelShape,
        dtype: Dtype,
        bias_params: u64,
        streamed_f32: bool,
    ) -> Self {
        let full = Self::of(shape, dtype, bias_params, streamed_f32);
        let head = if shape.tie_word_embeddings {
            0
        } else {
            shape.embedding_params()
        };
        let layer = crate::placement::layer_params(shape)
            .into_iter()
            .max()
            .unwrap_or(0);
        Self {
            matrices: (shape.embedding_params() + head + layer) * dtype.bytes(),
            vectors: full.vectors,
            loading: full.loading,
        }
    }

    /// What stays resident once loaded.
    pub fn resident(&self) -> u64 {
        self.matrices + self.vectors
    }

    /// The peak while loading.
    pub fn peak(&self) -> u64 {
        self.resident() + self.loading
    }
}

/// RoPE tables for one head count: cos and sign-folded sin, each `[batch * seq, heads * head_dim]`.
type CosSin<B> = (Tensor<B, 2>, Tensor<B, 2>);

/// Per-forward position tables for one batch shape: RoPE (HF rotate-half convention), applied
/// to projections in their 2-D `[batch * seq, heads * head_dim]` layout, and the causal biases of
/// the chunked attention. Tables are built once per forward (per head count for RoPE) so that
/// every elementwise op runs on contiguous, same-shape tensors.
#[derive(Debug, Clone)]
pub struct Rope<B: Backend> {
    /// head count -> (cos, sign-folded sin), each `[batch * seq, heads * head_dim]`; built on
    /// the portable path's first use of each head count.
    tables: RefCell<BTreeMap<usize, CosSin<B>>>,
    /// One position's rows, `[seq * head_dim]` each: cos and sign-folded sin.
    cos_pos: Vec<f32>,
    sin_pos: Vec<f32>,
    batch: usize,
    seq: usize,
    device: B::Device,
    head_dim: usize,
    /// For long sequences on the portable path: (first query row, rows, additive causal bias
    /// `[1, 1, rows, end]`), built on first use.
    chunks: std::cell::OnceCell<Vec<(usize, usize, Tensor<B, 4>)>>,
}

impl<B: Backend> Rope<B> {
    /// Tables for positions `0..seq` of each of `batch` rows from the inverse frequencies
    /// (`head_dim / 2` values). Angles are computed in f32 like the reference implementation.
    /// The per-head-count tensors and causal biases of the portable path are built on its first
    /// use; the fused attention kernel reads the per-position rows only.
    pub fn new(inv_freq: &[f64], batch: usize, seq: usize, device: &B::Device) -> Self {
        let half = inv_freq.len();
        let hd = 2 * half;
        // One position's row: cos over hd dims, and sin with rotate-half's sign folded in
        // (rotate_half(x) = [-x2, x1] = flip_halves(x) * [-1.., +1..]).
        let mut cos_pos = vec![0f32; seq * hd];
        let mut sin_pos = vec![0f32; seq * hd];
        for p in 0..seq {
            for (i, &f) in inv_freq.iter().enumerate() {
                let angle = (p as f32 * f as f32) as f64;
                let (sn, c) = (angle.sin() as f32, angle.cos() as f32);
                cos_pos[p * hd + i] = c;
                cos_pos[p * hd + i + half] = c;
                sin_pos[p * hd + i] = -sn;
                sin_pos[p * hd + i + half] = sn;
            }
        }
        Self {
            tables: RefCell::new(BTreeMap::new()),
            cos_pos,
            sin_pos,
            batch,
            seq,
            device: device.clone(),
            head_dim: hd,
            chunks: std::cell::OnceCell::new(),
        }
    }

    /// The causal biases of the block-causal attention of long sequences.
    fn chunks(&self) -> &[(usize, usize, Tensor<B, 4>)] {
        self.chunks.get_or_init(|| {
            let (seq, device) = (self.seq, &self.device);
            let mut chunks = Vec::new();
            if seq > 2 * ATTN_CHUNK {
                for start in (0..seq).step_by(ATTN_CHUNK) {
                    let rows = ATTN_CHUNK.min(seq - start);
                    let end = start + rows;
                    let bias: Vec<f32> = (0..rows)
                        .flat_map(|i| {
                            (0..end).map(move |j| {
                                if j > start + i {
                                    f32::NEG_INFINITY
                                } else {
                                    0.0
                                }
                            })
                        })
                        .collect();
                    let bias = Tensor::from_data(TensorData::new(bias, [1, 1, rows, end]), device);
                    chunks.push((start, rows, bias));
                }
            }
            chunks
        })
    }

    /// One position's rows of the tables, for the fused attention kernel.
    pub fn tables(&self) -> RopeTables<'_> {
        RopeTables {
            cos: &self.cos_pos,
            sin: &self.sin_pos,
        }
    }

    /// The (cos, sin) tables for `h` heads, built on first use.
    fn tables_for(&self, h: usize) -> CosSin<B> {
        if let Some(t) = self.tables.borrow().get(&h) {
            return t.clone();
        }
        let (batch, seq, hd) = (self.batch, self.seq, self.head_dim);
        let expand = |pos: &[f32]| -> Tensor<B, 2> {
            let mut v = Vec::with_capacity(batch * seq * h * hd);
            for _ in 0..batch {
                for p in 0..seq {
                    for _ in 0..h {
                        v.extend_from_slice(&pos[p * hd..(p + 1) * hd]);
                    }
                }
            }
            Tensor::from_data(TensorData::new(v, [batch * seq, h * hd]), &self.device)
        };
        let t = (expand(&self.cos_pos), expand(&self.sin_pos));
        self.tables.borrow_mut().insert(h, t.clone());
        t
    }

    /// Causal scaled-dot-product attention. Short sequences use the backend's fused kernel;
    /// long ones are split into blocks of query rows that each attend only to the keys up to
    /// their last position (about half the work of a full score matrix, and every block is one
    /// batched gemm).
    ///
    /// # Shapes
    /// - `q`, `k`, `v`: `[batch, heads, seq, head_dim]` -> `[batch, heads, seq, head_dim]`
    pub fn causal_attention(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        if self.seq <= 2 * ATTN_CHUNK {
            let options = AttentionModuleOptions {
                scale: None,
                softcap: None,
                is_causal: true,
            };
            return attention(q, k, v, None, None, options);
        }
        let [_, _, _, hd] = q.dims();
        let scale = (hd as f64).sqrt().recip();
        let outs = self
            .chunks()
            .iter()
            .map(|(start, rows, bias)| {
                let end = start + rows;
                let qc = q.clone().narrow(2, *start, *rows);
                let kc = k.clone().narrow(2, 0, end);
                let vc = v.clone().narrow(2, 0, end);
                let scores = matmul(qc, kc.swap_dims(2, 3)) * scale + bias.clone();
                matmul(softmax(scores, 3), vc)
            })
            .collect();
        Tensor::cat(outs, 2)
    }

    /// # Shapes
    /// - `x`: `[batch * seq, heads * head_dim]` -> same
    pub fn apply(&self, x: Tensor<B, 2>, heads: usize) -> Tensor<B, 2> {
        let (cos, sin) = self.tables_for(heads);
        let [n, _] = x.dims();
        let half = self.head_dim / 2;
        let swapped = x
            .clone()
            .reshape([n, heads, 2, half])
            .flip([2])
            .reshape([n, heads * self.head_dim]);
        x * cos + swapped * sin
    }
}

/// A LLaMA-family causal language model of any [`ModelShape`], heterogeneous layers included.
#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    /// Token embedding, weight `[vocab, hidden]`.
    pub embed_tokens: Embedding<B>,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer<B>>,
    /// Final norm.
    pub norm: RmsNorm<B>,
    /// Untied LM head `[hidden, vocab]`; `None` when tied to the embedding.
    pub lm_head: Option<Linear<B>>,
    #[module(skip)]
    pub(crate) shape: ModelShape,
    /// Where the decoder layers are read from for each turn when they are offloaded (then
    /// `layers` holds empty placeholders); `None` when every layer is resident.
    #[module(skip)]
    pub(crate) stream: Option<LayerStream>,
}

fn param<B: Backend, const D: usize>(t: HostTensor, device: &B::Device) -> Param<Tensor<B, D>> {
    stored(TensorData::new(t.data, t.shape), device)
}

/// A parameter holding `data` in its own dtype.
fn stored<B: Backend, const D: usize>(data: TensorData, device: &B::Device) -> Param<Tensor<B, D>> {
    let dtype = data.dtype;
    Param::from_tensor(Tensor::from_data(data, (device, dtype)))
}

/// A linear layer's weight (`[in, out]`) as f32, whatever its storage type: what metrics,
/// reconstruction and compensation compute with (a transient copy for a narrow weight).
pub fn weight_f32<B: Backend>(lin: &Linear<B>) -> Tensor<B, 2> {
    lin.weight.val().cast(DType::F32)
}

/// burn's dtype for a storage type.
pub fn burn_dtype(d: Dtype) -> DType {
    match d {
        Dtype::F32 => DType::F32,
        Dtype::Bf16 => DType::BF16,
        Dtype::F16 => DType::F16,
    }
}

/// Decoder layer `i` of `shape` read from `weights` onto `device`, its weight matrices stored
/// in `dtype` (streamed one tensor at a time), norm scales and biases in f32; every tensor's
/// presence and shape is checked.
pub(crate) fn build_layer<B: Backend>(
    shape: &ModelShape,
    weights: &dyn WeightSource,
    i: usize,
    device: &B::Device,
    dtype: Dtype,
) -> Result<DecoderLayer<B>> {
    let l = &shape.layers[i];
    let p = |t: &str| format!("model.layers.{i}.{t}");
    let _span = tracing::debug_span!("load_layer", i).entered();
    // A projection: its weight (HF `[out, in]`, stored `[in, out]` as burn's Linear
    // multiplies), and its bias when the checkpoint has one (LLaMA has none; Qwen2 has q/k/v
    // biases; FLAP-style compensation adds o_proj / down_proj biases).
    let lin = |name: &str| -> Result<Linear<B>> {
        let weight = stored(
            load_stored(weights, shape, &format!("{name}.weight"), dtype, true)?,
            device,
        );
        let bias_name = format!("{name}.bias");
        let bias = match weights.tensor(&bias_name)? {
            Some(b) => Some(load_checked(weights, shape, &bias_name).map(|_| b)?),
            None => None,
        };
        Ok(Linear {
            weight,
            bias: bias.map(|b| param(b, device)),
        })
    };
    let norm = |name: &str| -> Result<RmsNorm<B>> {
        Ok(RmsNorm {
            weight: param(load_checked(weights, shape, name)?, device),
            eps: shape.norm_eps,
        })
    };
    let (input_layernorm, self_attn) = if l.has_attn() {
        (
            Some(norm(&p("input_layernorm.weight"))?),
            Some(Attention {
                q_proj: lin(&p("self_attn.q_proj"))?,
                k_proj: lin(&p("self_attn.k_proj"))?,
                v_proj: lin(&p("self_attn.v_proj"))?,
                o_proj: lin(&p("self_attn.o_proj"))?,
                n_heads: l.n_heads,
                n_kv_heads: l.n_kv_heads,
                head_dim: l.head_dim,
            }),
        )
    } else {
        (None, None)
    };
    let (post_attention_layernorm, mlp) = if l.has_mlp() {
        (
            Some(norm(&p("post_attention_layernorm.weight"))?),
            Some(Mlp {
                gate_proj: lin(&p("mlp.gate_proj"))?,
                up_proj: lin(&p("mlp.up_proj"))?,
                down_proj: lin(&p("mlp.down_proj"))?,
            }),
        )
    } else {
        (None, None)
    };
    Ok(DecoderLayer {
        input_layernorm,
        self_attn,
        post_attention_layernorm,
        mlp,
    })
}

impl<B: Backend> Llama<B> {
    /// Builds the model of `shape` from `weights` in f32 ([`Llama::from_weights_in`]).
    pub fn from_weights(
        shape: &ModelShape,
        weights: &dyn WeightSource,
        device: &B::Device,
    ) -> Result<Self> {
        Self::from_weights_in(shape, weights, device, Dtype::F32)
    }

    /// Builds the model of `shape` from `weights`, checking every tensor's presence and shape.
    /// Weight matrices (projections, embedding, LM head) are stored in `dtype`, streamed from
    /// the source one tensor at a time; norm scales and biases stay f32.
    pub fn from_weights_in(
        shape: &ModelShape,
        weights: &dyn WeightSource,
        device: &B::Device,
        dtype: Dtype,
    ) -> Result<Self> {
        shape.validate()?;
        let layers = (0..shape.n_layers())
            .map(|i| build_layer(shape, weights, i, device, dtype))
            .collect::<Result<Vec<_>>>()?;
        let model = Self::with_layers(shape, weights, layers, device, dtype, None)?;
        tracing::debug!(params = shape.num_params(), %dtype, source = %weights.describe(), "model built");
        Ok(model)
    }

    /// The embedding, final norm and LM head of `shape` read from `weights` onto `device`,
    /// around `layers`.
    pub(crate) fn with_layers(
        shape: &ModelShape,
        weights: &dyn WeightSource,
        layers: Vec<DecoderLayer<B>>,
        device: &B::Device,
        dtype: Dtype,
        stream: Option<LayerStream>,
    ) -> Result<Self> {
        let embed_tokens = Embedding {
            weight: stored(
                load_stored(weights, shape, "model.embed_tokens.weight", dtype, false)?,
                device,
            ),
        };
        let lm_head = if shape.tie_word_embeddings {
            None
        } else {
            Some(Linear {
                weight: stored(
                    load_stored(weights, shape, "lm_head.weight", dtype, true)?,
                    device,
                ),
                bias: None,
            })
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm: RmsNorm {
                weight: param(load_checked(weights, shape, "model.norm.weight")?, device),
                eps: shape.norm_eps,
            },
            lm_head,
            shape: shape.clone(),
            stream,
        })
    }

    /// The storage type of the weight matrices.
    pub fn dtype(&self) -> Dtype {
        match self.embed_tokens.weight.val().dtype() {
            DType::BF16 => Dtype::Bf16,
            DType::F16 => Dtype::F16,
            _ => Dtype::F32,
        }
    }

    /// The model's shape.
    pub fn shape(&self) -> &ModelShape {
        &self.shape
    }

    /// The device the weights live on.
    pub fn device(&self) -> B::Device {
        self.embed_tokens.weight.val().device()
    }

    /// Logits for every position, under optional masks.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]` token ids (each `< vocab_size`; see [`Llama::tokens`])
    /// - output: `[batch, seq, vocab]`
    pub fn forward_masked(
        &self,
        tokens: Tensor<B, 2, Int>,
        masks: Option<&Masks<B>>,
    ) -> Result<Tensor<B, 3>> {
        self.forward_with_hidden(tokens, masks, |_, _| {})
    }

    /// Logits for every position (the masked forward with no masks).
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]` -> `[batch, seq, vocab]`
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.forward_masked(tokens, None)
            .expect("no masks: nothing to validate")
    }

    /// The masked forward, calling `on_hidden(i, h)` with the residual stream entering layer `i`
    /// (`i = 0` is the embedding output) and, last, with `i = n_layers` and the final-normed
    /// state: the same checkpoints as Hugging Face's `hidden_states`.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]`; `h`: `[batch * seq, hidden]`; output: `[batch, seq, vocab]`
    pub fn forward_with_hidden(
        &self,
        tokens: Tensor<B, 2, Int>,
        masks: Option<&Masks<B>>,
        on_hidden: impl FnMut(usize, &Tensor<B, 2>),
    ) -> Result<Tensor<B, 3>> {
        self.run(
            tokens,
            masks,
            on_hidden,
            |_, l| Cow::Borrowed(l),
            |_, _, _| {},
        )
    }

    /// The one forward loop. `layer_for(i, layer)` may hand back a replacement for layer `i`
    /// (for example the layer sliced down to the units a sampled mask keeps, so that pruned
    /// units cost nothing); replacements are built one layer at a time and dropped after use.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]`; output: `[batch, seq, vocab]`
    pub fn forward_layers(
        &self,
        tokens: Tensor<B, 2, Int>,
        masks: Option<&Masks<B>>,
        on_hidden: impl FnMut(usize, &Tensor<B, 2>),
        layer_for: impl for<'l> FnMut(usize, &'l DecoderLayer<B>) -> Cow<'l, DecoderLayer<B>>,
    ) -> Result<Tensor<B, 3>> {
        self.run(tokens, masks, on_hidden, layer_for, |_, _, _| {})
    }

    /// The masked forward, calling `on_tap(i, point, x)` with the activations entering `o_proj`
    /// and `down_proj` of every layer `i` (what activation-aware importance metrics read).
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]`; `x`: `[batch * seq, width]`; output: `[batch, seq, vocab]`
    pub fn forward_tapped(
        &self,
        tokens: Tensor<B, 2, Int>,
        masks: Option<&Masks<B>>,
        on_tap: impl FnMut(usize, Tap, &Tensor<B, 2>),
    ) -> Result<Tensor<B, 3>> {
        self.run(tokens, masks, |_, _| {}, |_, l| Cow::Borrowed(l), on_tap)
    }

    /// The final-normed hidden state of every position (what the LM head reads), under
    /// optional masks; with [`Llama::head`] on the rows that matter, this skips the LM head and
    /// the softmax at positions nobody scores.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]` -> `[batch * seq, hidden]` (row `b * seq + t`)
    pub fn forward_hidden(
        &self,
        tokens: Tensor<B, 2, Int>,
        masks: Option<&Masks<B>>,
    ) -> Result<Tensor<B, 2>> {
        self.run_hidden(
            tokens,
            masks,
            |_, _| {},
            |_, l| Cow::Borrowed(l),
            |_, _, _| {},
        )
    }

    /// The LM head: logits of final-normed hidden states.
    ///
    /// # Shapes
    /// - `x`: `[rows, hidden]` -> `[rows, vocab]`
    pub fn head(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let device = self.head_device();
        let x = if x.device() != device {
            x.to_device(&device)
        } else {
            x
        };
        match &self.lm_head {
            Some(head) => linear(head, x),
            None => matmul(x, self.embed_tokens.weight.val().transpose()),
        }
    }

    /// The device the LM head runs on (the embedding's when the head is tied to it).
    pub fn head_device(&self) -> B::Device {
        match &self.lm_head {
            Some(head) => head.weight.val().device(),
            None => self.device(),
        }
    }

    /// Next-token NLL of every position from the residual stream leaving the last layer: final
    /// norm, LM head, log-softmax (what layer-wise methods call after running layers with a
    /// [`LayerStepper`]).
    ///
    /// # Shapes
    /// - `x`: `[batch * seq, hidden]`, `tokens`: `[batch, seq]` -> `[batch, seq - 1]`
    pub fn stream_nll(&self, x: Tensor<B, 2>, tokens: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        self.nll_of_normed(self.norm.forward(x), tokens)
    }

    /// Next-token NLL from final-normed hidden states, the LM head and the log-softmax run on
    /// at most [`NLL_ROWS`] predicting positions at a time: a loss never holds the whole
    /// `[tokens, vocab]` logits tensor.
    ///
    /// # Shapes
    /// - `x`: `[batch * seq, hidden]`, `tokens`: `[batch, seq]` -> `[batch, seq - 1]`
    fn nll_of_normed(&self, x: Tensor<B, 2>, tokens: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        self.nll_in_blocks(x, tokens, NLL_ROWS)
    }

    /// [`Llama::nll_of_normed`] with `block` rows per LM-head block.
    pub(crate) fn nll_in_blocks(
        &self,
        x: Tensor<B, 2>,
        tokens: Tensor<B, 2, Int>,
        block: usize,
    ) -> Tensor<B, 2> {
        let [batch, seq] = tokens.dims();
        let hidden = self.shape.hidden_size;
        // Position t of every row predicts token t + 1: drop each row's last position.
        let x = x
            .reshape([batch, seq, hidden])
            .narrow(1, 0, seq - 1)
            .reshape([batch * (seq - 1), hidden]);
        let rows = batch * (seq - 1);
        let targets = tokens
            .narrow(1, 1, seq - 1)
            .reshape([1, rows])
            .to_device(&self.head_device());
        let parts: Vec<Tensor<B, 1>> = (0..rows)
            .step_by(block)
            .map(|start| {
                let n = block.min(rows - start);
                let logits = self.head(x.clone().narrow(0, start, n));
                let t = targets.clone().narrow(1, start, n).reshape([n]);
                match lopper_kernels::nll(logits, t) {
                    Ok(nll) => nll,
                    Err((logits, t)) => {
                        nll_from_logits(logits.unsqueeze_dim(0), t.unsqueeze_dim(0)).reshape([n])
                    }
                }
            })
            .collect();
        Tensor::cat(parts, 0).reshape([batch, seq - 1])
    }

    /// The token embeddings of a batch, the residual stream entering layer 0.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]` -> `[batch * seq, hidden]`
    pub fn embed(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let [batch, seq] = tokens.dims();
        // The residual stream is f32 whatever the storage type of the table.
        self.embed_tokens
            .forward(tokens)
            .reshape([batch * seq, self.shape.hidden_size])
            .cast(DType::F32)
    }

    /// Runs decoder layers one at a time on batches of `batch` sequences of `seq` tokens (what
    /// layer-wise methods need: cache the residual stream, change a layer, go on).
    pub fn stepper(&self, batch: usize, seq: usize) -> LayerStepper<B> {
        let inv_freq = self.rope_inv_freq();
        let mut devices = vec![self.device()];
        for i in 0..self.layers.len() {
            if let Some(d) = self.layer_device(i).filter(|d| !devices.contains(d)) {
                devices.push(d);
            }
        }
        LayerStepper {
            ropes: devices
                .into_iter()
                .map(|d| {
                    let rope = Rope::new(&inv_freq, batch, seq, &d);
                    (d, rope)
                })
                .collect(),
            inv_freq,
            batch,
            seq,
        }
    }

    fn run(
        &self,
        tokens: Tensor<B, 2, Int>,
        masks: Option<&Masks<B>>,
        on_hidden: impl FnMut(usize, &Tensor<B, 2>),
        layer_for: impl for<'l> FnMut(usize, &'l DecoderLayer<B>) -> Cow<'l, DecoderLayer<B>>,
        on_tap: impl FnMut(usize, Tap, &Tensor<B, 2>),
    ) -> Result<Tensor<B, 3>> {
        let [batch, seq] = tokens.dims();
        let x = self.run_hidden(tokens, masks, on_hidden, layer_for, on_tap)?;
        Ok(self.head(x).reshape([batch, seq, self.shape.vocab_size]))
    }

    fn run_hidden(
        &self,
        tokens: Tensor<B, 2, Int>,
        masks: Option<&Masks<B>>,
        mut on_hidden: impl FnMut(usize, &Tensor<B, 2>),
        mut layer_for: impl for<'l> FnMut(usize, &'l DecoderLayer<B>) -> Cow<'l, DecoderLayer<B>>,
        mut on_tap: impl FnMut(usize, Tap, &Tensor<B, 2>),
    ) -> Result<Tensor<B, 2>> {
        if let Some(m) = masks {
            m.check(self.shape())?;
        }
        let [batch, seq] = tokens.dims();
        // Each layer on its own device (one, unless the model is placed).
        let stepper = self.stepper(batch, seq);
        let mut x = self.embed(tokens);
        for i in 0..self.layers.len() {
            on_hidden(i, &x);
            let layer = self.layer(i)?;
            let layer = layer_for(i, &layer);
            x = stepper.run(&layer, x, masks.map(|m| &m.layers[i]), &mut |point, t| {
                on_tap(i, point, t)
            });
        }
        let norm_device = self.norm.weight.val().device();
        if x.device() != norm_device {
            x = x.to_device(&norm_device);
        }
        let x = self.norm.forward(x);
        on_hidden(self.layers.len(), &x);
        Ok(x)
    }

    /// Query and KV head counts of every layer (the RoPE tables are built per count).
    fn rope_inv_freq(&self) -> Vec<f64> {
        let hd = self
            .shape
            .layers
            .iter()
            .find(|l| l.has_attn())
            .map_or(2, |l: &LayerShape| l.head_dim);
        self.shape
            .rope
            .inv_freq(hd)
            .into_iter()
            .map(|f| f as f32 as f64)
            .collect()
    }

    /// A token tensor from equal-length rows, checking ids against the vocabulary.
    ///
    /// # Shapes
    /// - output: `[rows.len(), rows[0].len()]`
    pub fn tokens(&self, rows: &[Vec<u32>]) -> Result<Tensor<B, 2, Int>> {
        tokens_tensor(rows, self.shape.vocab_size, &self.device())
    }

    /// Negative log-likelihood of each next token: position `t` predicts `tokens[t + 1]`.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]` (seq >= 2) -> `[batch, seq - 1]`
    pub fn token_nll(
        &self,
        tokens: Tensor<B, 2, Int>,
        masks: Option<&Masks<B>>,
    ) -> Result<Tensor<B, 2>> {
        self.nll_with(tokens, masks, |_, l| Cow::Borrowed(l))
    }

    /// [`Llama::token_nll`] with `layer_for` as in [`Llama::forward_layers`] (for example the
    /// layers sliced to a plan's kept units).
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]` (seq >= 2) -> `[batch, seq - 1]`
    pub fn token_nll_layers(
        &self,
        tokens: Tensor<B, 2, Int>,
        masks: Option<&Masks<B>>,
        layer_for: impl for<'l> FnMut(usize, &'l DecoderLayer<B>) -> Cow<'l, DecoderLayer<B>>,
    ) -> Result<Tensor<B, 2>> {
        self.nll_with(tokens, masks, layer_for)
    }

    fn nll_with(
        &self,
        tokens: Tensor<B, 2, Int>,
        masks: Option<&Masks<B>>,
        layer_for: impl for<'l> FnMut(usize, &'l DecoderLayer<B>) -> Cow<'l, DecoderLayer<B>>,
    ) -> Result<Tensor<B, 2>> {
        let [_, seq] = tokens.dims();
        if seq < 2 {
            return Err(Error::Input(format!(
                "need at least 2 tokens per row to score next-token predictions, got {seq}"
            )));
        }
        let x = self.run_hidden(tokens.clone(), masks, |_, _| {}, layer_for, |_, _, _| {})?;
        Ok(self.nll_of_normed(x, tokens))
    }

    /// Mean next-token cross-entropy (nats) over every predicted token of the batch.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]` (seq >= 2) -> scalar
    pub fn mean_loss(&self, tokens: Tensor<B, 2, Int>, masks: Option<&Masks<B>>) -> Result<f64> {
        mean_of(self.token_nll(tokens, masks)?)
    }

    /// Builds a model from its parts, checking every tensor against `shape` (the way surgery
    /// hands back a smaller model).
    pub fn from_parts(
        embed_tokens: Embedding<B>,
        layers: Vec<DecoderLayer<B>>,
        norm: RmsNorm<B>,
        lm_head: Option<Linear<B>>,
        shape: ModelShape,
    ) -> Result<Self> {
        shape.validate()?;
        let model = Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            shape,
            stream: None,
        };
        model.check_against_shape()?;
        Ok(model)
    }

    /// Every parameter's Hugging Face name and dims in Hugging Face layout (`[out, in]`).
    pub fn named_dims(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = vec![
            (
                "model.embed_tokens.weight".to_string(),
                self.embed_tokens.weight.dims().to_vec(),
            ),
            (
                "model.norm.weight".to_string(),
                self.norm.weight.dims().to_vec(),
            ),
        ];
        let mut lin = |name: String, l: &Linear<B>| {
            let [i, o] = l.weight.dims();
            out.push((format!("{name}.weight"), vec![o, i]));
            if let Some(b) = &l.bias {
                out.push((format!("{name}.bias"), b.dims().to_vec()));
            }
        };
        if let Some(head) = &self.lm_head {
            lin("lm_head".into(), head);
        }
        let mut norms = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let p = |t: &str| format!("model.layers.{i}.{t}");
            if let Some(a) = &layer.self_attn {
                for (n, l) in [
                    ("q_proj", &a.q_proj),
                    ("k_proj", &a.k_proj),
                    ("v_proj", &a.v_proj),
                    ("o_proj", &a.o_proj),
                ] {
                    lin(p(&format!("self_attn.{n}")), l);
                }
            }
            if let Some(m) = &layer.mlp {
                for (n, l) in [
                    ("gate_proj", &m.gate_proj),
                    ("up_proj", &m.up_proj),
                    ("down_proj", &m.down_proj),
                ] {
                    lin(p(&format!("mlp.{n}")), l);
                }
            }
            for (n, norm) in [
                ("input_layernorm", &layer.input_layernorm),
                ("post_attention_layernorm", &layer.post_attention_layernorm),
            ] {
                if let Some(norm) = norm {
                    norms.push((p(&format!("{n}.weight")), norm.weight.dims().to_vec()));
                }
            }
        }
        out.extend(norms);
        out
    }

    /// Checks that every tensor has the dims its shape implies, that blocks are present exactly
    /// where the shape has them, and that attention head counts match.
    fn check_against_shape(&self) -> Result<()> {
        let s = &self.shape;
        if self.layers.len() != s.n_layers() {
            return Err(Error::Input(format!(
                "{} decoder layers for a shape of {} layers",
                self.layers.len(),
                s.n_layers()
            )));
        }
        if s.tie_word_embeddings != self.lm_head.is_none() {
            return Err(Error::Input(
                "the LM head does not match tie_word_embeddings".into(),
            ));
        }
        for (i, (layer, ls)) in self.layers.iter().zip(&s.layers).enumerate() {
            let attn = layer.input_layernorm.is_some() && layer.self_attn.is_some();
            let mlp = layer.post_attention_layernorm.is_some() && layer.mlp.is_some();
            let attn_absent = layer.input_layernorm.is_none() && layer.self_attn.is_none();
            let mlp_absent = layer.post_attention_layernorm.is_none() && layer.mlp.is_none();
            if !(attn && ls.has_attn() || attn_absent && !ls.has_attn())
                || !(mlp && ls.has_mlp() || mlp_absent && !ls.has_mlp())
            {
                return Err(Error::Input(format!(
                    "layer {i}: attention / MLP block presence does not match the shape"
                )));
            }
            if let Some(a) = &layer.self_attn
                && (a.n_heads, a.n_kv_heads, a.head_dim) != (ls.n_heads, ls.n_kv_heads, ls.head_dim)
            {
                return Err(Error::Input(format!(
                    "layer {i}: attention head counts differ from the shape"
                )));
            }
        }
        for (name, got) in self.named_dims() {
            let expected = crate::weights::expected_dims(s, &name).ok_or_else(|| {
                Error::Input(format!("tensor `{name}` has no place in the shape"))
            })?;
            if expected != got {
                return Err(Error::TensorShape {
                    name,
                    source_desc: "the assembled model".into(),
                    expected,
                    got,
                });
            }
        }
        Ok(())
    }
}

/// Negative log-likelihood of each next token: position `t` predicts `tokens[t + 1]`.
///
/// # Shapes
/// - `logits`: `[batch, seq, vocab]`, `tokens`: `[batch, seq]` (seq >= 2) -> `[batch, seq - 1]`
pub fn next_token_nll<B: Backend>(logits: Tensor<B, 3>, tokens: Tensor<B, 2, Int>) -> Tensor<B, 2> {
    let [batch, seq] = tokens.dims();
    let logits = logits.narrow(1, 0, seq - 1);
    let targets = tokens.narrow(1, 1, seq - 1);
    nll_from_logits(logits, targets).reshape([batch, seq - 1])
}

/// The mean of every element, read back to the host in f64.
pub fn mean_of<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<f64> {
    let v: Vec<f32> = t
        .into_data()
        .to_vec()
        .map_err(|e| Error::Input(format!("reading values back: {e:?}")))?;
    Ok(v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64)
}

/// `logsumexp(logits) - logits[target]` for each position.
///
/// # Shapes
/// - `logits`: `[batch, seq, vocab]`, `targets`: `[batch, seq]` -> `[batch, seq, 1]`
pub fn nll_from_logits<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
) -> Tensor<B, 3> {
    let max = logits.clone().max_dim(2);
    let lse = (logits.clone() - max.clone()).exp().sum_dim(2).log() + max;
    let picked = logits.gather(2, targets.unsqueeze_dim(2));
    lse - picked
}

/// A `[rows, len]` token tensor; rows must be non-empty, of equal length, ids `< vocab`.
pub fn tokens_tensor<B: Backend>(
    rows: &[Vec<u32>],
    vocab: usize,
    device: &B::Device,
) -> Result<Tensor<B, 2, Int>> {
    let len = rows.first().map_or(0, Vec::len);
    if rows.is_empty() || len == 0 {
        return Err(Error::Input("no tokens to run".into()));
    }
    let mut flat = Vec::with_capacity(rows.len() * len);
    for (r, row) in rows.iter().enumerate() {
        if row.len() != len {
            return Err(Error::Input(format!(
                "row {r} has {} tokens, row 0 has {len}; pad or window the rows to one length",
                row.len()
            )));
        }
        if let Some(&bad) = row.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::Input(format!(
                "token id {bad} in row {r} is outside the vocabulary of {vocab}; the tokenizer does not match the model"
            )));
        }
        flat.extend(row.iter().map(|&t| t as i64));
    }
    Ok(Tensor::from_data(
        TensorData::new(flat, [rows.len(), len]),
        device,
    ))
}
