//! LLM-BIP: block-wise importance from one forward pass, through an upper bound on how much
//! removing a unit changes its own transformer block's output.
//!
//! # Derivation (ours; the paper's exact formula is not in our notes)
//!
//! A LLaMA block maps its input `x` (per token) to `Y = h + M(N(h))` with `h = x + A(x)`,
//! `N(v) = gamma * v / s(v)`, `s(v) = sqrt(|v|^2 / d + eps)` (RMSNorm, `d` = hidden size) and
//! `M(u) = W_down a(u)`, `a_j(u) = silu(p_j) q_j`, `p = W_gate u`, `q = W_up u` (SwiGLU).
//!
//! **MLP channel `j`.** The MLP is the block's last branch, so removing channel `j` changes the
//! output by exactly `-a_j(u) W_down[:, j]`: per token `|dY| = |a_j| |W_down[:, j]|`, and over
//! the calibration tokens `I_j = ||a_j||_2 |W_down[:, j]|` (exact, no bound needed).
//!
//! **KV group `g`** (its query heads). Removing it changes the attention residual by exactly
//! `dh = -O_g W_o[g, :]` (the group's head outputs times its rows of `o_proj`), and the block
//! output by `dY = dh + M(N(h + dh)) - M(N(h))`. Two Lipschitz steps bound the second term:
//!
//! 1. RMSNorm: the Jacobian of `v / s(v)` is `(I - v v^T / (d s^2)) / s`, whose spectral norm
//!    is `1 / s(v)`; on the segment from `h` to `h + dh`, `|v| >= |h| - |dh|`, so
//!    `|N(h + dh) - N(h)| <= r = max|gamma| |dh| / sqrt(max(|h| - |dh|, 0)^2 / d + eps)`.
//! 2. SwiGLU on the segment `u(t) = u0 + t delta`, `|delta| <= r`: with `A_j = |W_gate[:, j]|`,
//!    `B_j = |W_up[:, j]|`, `C_j = |W_down[:, j]|`, `|silu'| <= 1.1` and `|silu(z)| <= |z|`,
//!    `|d a_j / dt| <= 1.1 A_j r (|q_j(u0)| + B_j r) + (|p_j(u0)| + A_j r) B_j r`; summing
//!    `C_j |a_j(u1) - a_j(u0)|` bounds `|M(u1) - M(u0)|`:
//!    `|M(u1) - M(u0)| <= r K1 + r^2 K2`, `K1 = sum_j C_j (1.1 A_j |q_j| + B_j |p_j|)` (per
//!    token), `K2 = 2.1 sum_j A_j B_j C_j` (per block).
//!
//! So per token `|dY| <= U = |dh| + r K1 + r^2 K2`, a bound that holds for any input (the
//! block's Lipschitz continuity, made local), computed from one forward pass, and the group's
//! importance is `I_g = sqrt(sum_t U_t^2)`, an upper bound of the Frobenius norm of the block
//! output change over the calibration tokens. Both scores measure the same quantity (block
//! output change), so they can also be ranked together.
//!
//! The bound is valid but loose: every SwiGLU channel is charged for the worst-case alignment
//! of the perturbation with its weights, so on the default model's real activations `U` is
//! 150x (layer 3) to 5000x (layer 11) the exact change (measured by the end-to-end test). Within
//! a layer it orders KV groups like a per-token weighted `|O_g W_o[g, :]|`; across unit types
//! it over-weights KV groups, which is why the default allocation is per layer.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, s};
use lopper_core::UnitScores;
use lopper_kernels::{linear, matmul};
use lopper_model::{Llama, Tap, weight_f32};

use crate::{Result, host};

/// `sup |silu'|` rounded up (the maximum is 1.0998 near z = 2.4).
const SILU_SLOPE: f64 = 1.1;

/// Per-token quantities of one layer on one batch.
#[derive(Debug)]
pub struct BlockTerms<B: Backend> {
    /// The bound `U_t` per KV group: `[tokens, groups]` (`None` without attention).
    pub group_bound: Option<Tensor<B, 2>>,
    /// `a_j(t)^2 |W_down[:, j]|^2`: `[tokens, ffn]` (`None` without an MLP).
    pub channel_sq: Option<Tensor<B, 2>>,
}

/// The MLP side of the bound: `K1` per token `[n, 1]`, `K2` and `max |gamma|` (`[1, 1]`), and
/// the norm's epsilon.
struct Lipschitz<B: Backend> {
    k1: Tensor<B, 2>,
    k2: Tensor<B, 2>,
    gamma_max: Tensor<B, 2>,
    eps: f32,
}

/// The bound terms of `layer` for the residual stream `x` entering it, given its taps. Without
/// an MLP the attention change reaches the output unchanged (`U = |dh|`).
pub fn block_terms<B: Backend>(
    layer: &lopper_model::DecoderLayer<B>,
    ls: &lopper_core::LayerShape,
    x: &Tensor<B, 2>,
    taps: &[(Tap, Tensor<B, 2>)],
) -> BlockTerms<B> {
    let tap = |t: Tap| taps.iter().find(|(p, _)| *p == t).map(|(_, v)| v.clone());
    // MLP: exact channel terms, and the Lipschitz terms of the bound.
    let mut lip: Option<Lipschitz<B>> = None;
    let mut channel_sq = None;
    if let (Some(mlp), Some(norm2), Some(u0), Some(act)) = (
        layer.mlp.as_ref(),
        layer.post_attention_layernorm.as_ref(),
        tap(Tap::MlpInput),
        tap(Tap::DownProjInput),
    ) {
        let col_norm = |w: Tensor<B, 2>| w.powi_scalar(2).sum_dim(0).sqrt(); // [1, ffn]
        let a = col_norm(weight_f32(&mlp.gate_proj));
        let b = col_norm(weight_f32(&mlp.up_proj));
        // down_proj is [ffn, hidden] in burn's layout: row norms.
        let c = weight_f32(&mlp.down_proj)
            .powi_scalar(2)
            .sum_dim(1)
            .sqrt()
            .transpose();
        let p = linear(&mlp.gate_proj, u0.clone());
        let q = linear(&mlp.up_proj, u0);
        let k1 = (q.abs() * (a.clone() * c.clone() * SILU_SLOPE as f32)
            + p.abs() * (b.clone() * c.clone()))
        .sum_dim(1); // [n, 1]
        let k2 = (a * b * c.clone()).sum().reshape([1, 1]) * (SILU_SLOPE + 1.0) as f32;
        let gamma_max = norm2.weight.val().abs().max().reshape([1, 1]);
        lip = Some(Lipschitz {
            k1,
            k2,
            gamma_max,
            eps: norm2.eps as f32,
        });
        channel_sq = Some(act.powi_scalar(2) * c.powi_scalar(2));
    }
    let mut group_bound = None;
    if let (Some(attn), Some(oin)) = (layer.self_attn.as_ref(), tap(Tap::OProjInput)) {
        let d = x.dims()[1];
        let h = x.clone() + linear(&attn.o_proj, oin.clone());
        let h_norm = h.powi_scalar(2).sum_dim(1).sqrt(); // [n, 1]
        let wo = weight_f32(&attn.o_proj); // [heads * hd, hidden]
        let width = ls.n_rep() * ls.head_dim;
        let groups: Vec<Tensor<B, 2>> = (0..ls.n_kv_heads)
            .map(|g| {
                let cols = g * width..(g + 1) * width;
                let dh = matmul(
                    oin.clone().slice(s![.., cols.clone()]),
                    wo.clone().slice(s![cols, ..]),
                );
                let dn = dh.powi_scalar(2).sum_dim(1).sqrt(); // [n, 1]
                match &lip {
                    None => dn,
                    Some(lp) => {
                        let lo = (h_norm.clone() - dn.clone()).clamp_min(0.0);
                        let s_min = (lo.powi_scalar(2) / d as f32 + lp.eps).sqrt();
                        let r = dn.clone() * lp.gamma_max.clone() / s_min;
                        dn + r.clone() * lp.k1.clone() + r.powi_scalar(2) * lp.k2.clone()
                    }
                }
            })
            .collect();
        group_bound = Some(Tensor::cat(groups, 1));
    }
    BlockTerms {
        group_bound,
        channel_sq,
    }
}

/// LLM-BIP scores of every KV group and MLP channel (see the module documentation): one
/// forward pass per calibration batch, layer by layer.
pub fn llm_bip<B: Backend>(
    model: &Llama<B>,
    windows: &[Vec<u32>],
    batch_size: usize,
) -> Result<UnitScores> {
    crate::check_calibration(windows, batch_size)?;
    let shape = model.shape();
    let n_layers = shape.n_layers();
    let mut kv: Vec<Option<Tensor<B, 2>>> = vec![None; n_layers];
    let mut ch: Vec<Option<Tensor<B, 2>>> = vec![None; n_layers];
    // Layer by layer over every batch's stream (an offloaded layer is read once); the sums
    // over batches run in batch order either way.
    let mut streams = Vec::new();
    for batch in windows.chunks(batch_size) {
        let t = model.tokens(batch)?;
        let [b, seq] = t.dims();
        streams.push((model.stepper(b, seq), model.embed(t)));
    }
    for l in 0..n_layers {
        let layer = model.layer(l)?;
        for (stepper, x) in &mut streams {
            let mut taps = Vec::new();
            *x = layer.on_device(x.clone());
            let y = stepper.forward(&layer, x.clone(), |p, v| taps.push((p, v.clone())));
            let bt = block_terms(&layer, &shape.layers[l], x, &taps);
            if let Some(g) = bt.group_bound {
                let g = g.powi_scalar(2).sum_dim(0);
                kv[l] = Some(kv[l].take().map_or(g.clone(), |a| a + g));
            }
            if let Some(c) = bt.channel_sq {
                let c = c.sum_dim(0);
                ch[l] = Some(ch[l].take().map_or(c.clone(), |a| a + c));
            }
            *x = y;
        }
    }
    let finish = |v: Vec<Option<Tensor<B, 2>>>| -> Result<Vec<Vec<f64>>> {
        v.into_iter()
            .map(|t| match t {
                Some(t) => Ok(host(t)?.into_iter().map(f64::sqrt).collect()),
                None => Ok(Vec::new()),
            })
            .collect()
    };
    Ok(UnitScores {
        method: "llm-bip".into(),
        kv_groups: finish(kv)?,
        channels: finish(ch)?,
    })
}
