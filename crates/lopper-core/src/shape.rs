//! Model shapes as plain data.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// RoPE frequency scaling, as Hugging Face `rope_scaling` expresses it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "snake_case")]
pub enum RopeScaling {
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        /// Divisor of every frequency.
        factor: f64,
    },
    /// LLaMA-3.1 style smooth scaling of the low frequencies.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Wavelength bound (as a fraction of the original context) below which frequencies are scaled.
        low_freq_factor: f64,
        /// Wavelength bound above which frequencies are kept.
        high_freq_factor: f64,
        /// Context length the model was trained with.
        original_max_position_embeddings: usize,
    },
}

/// Rotary position embedding settings (HF rotate-half convention over `head_dim` dims).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RopeConfig {
    /// Base of the inverse frequencies: `inv_freq[i] = theta^(-2i/head_dim)`.
    pub theta: f64,
    /// Optional frequency scaling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling: Option<RopeScaling>,
}

impl RopeConfig {
    /// The inverse frequencies for a head of `head_dim` dims (`head_dim / 2` values), scaling applied.
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f64> {
        let half = head_dim / 2;
        (0..half)
            .map(|i| {
                let f = self.theta.powf(-(2.0 * i as f64) / head_dim as f64);
                match self.scaling {
                    None => f,
                    Some(RopeScaling::Linear { factor }) => f / factor,
                    Some(RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position_embeddings,
                    }) => {
                        let old = original_max_position_embeddings as f64;
                        let low_wavelen = old / low_freq_factor;
                        let high_wavelen = old / high_freq_factor;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    }
                }
            })
            .collect()
    }
}

/// One decoder layer's shape. A block with zero KV heads has no attention; a block with zero MLP
/// width has no MLP; a layer with neither is an identity (surgery removes it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerShape {
    /// Query heads (a multiple of `n_kv_heads`; 0 when the attention block is removed).
    pub n_heads: usize,
    /// Key/value heads, i.e. GQA groups (0 when the attention block is removed).
    pub n_kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// SwiGLU intermediate width (0 when the MLP block is removed).
    pub ffn_hidden: usize,
}

impl LayerShape {
    /// Whether the attention block exists.
    pub fn has_attn(&self) -> bool {
        self.n_kv_heads > 0
    }
    /// Whether the MLP block exists.
    pub fn has_mlp(&self) -> bool {
        self.ffn_hidden > 0
    }
    /// Query heads per KV group (0 without attention).
    pub fn n_rep(&self) -> usize {
        self.n_heads.checked_div(self.n_kv_heads).unwrap_or(0)
    }
    /// Parameters of q/k/v/o projections (no biases).
    pub fn attn_params(&self, hidden: usize) -> u64 {
        let q = self.n_heads * self.head_dim;
        let kv = self.n_kv_heads * self.head_dim;
        (hidden * (2 * q + 2 * kv)) as u64
    }
    /// Parameters of gate/up/down projections.
    pub fn mlp_params(&self, hidden: usize) -> u64 {
        (3 * hidden * self.ffn_hidden) as u64
    }
}

/// A LLaMA-family decoder as data: the one description from which every model, dense or pruned,
/// is built.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelShape {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// RMSNorm epsilon.
    pub norm_eps: f64,
    /// Rotary embedding settings.
    pub rope: RopeConfig,
    /// Whether the LM head shares the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// Longest context the model was trained for (informational).
    pub max_position_embeddings: usize,
    /// The decoder layers, in order.
    pub layers: Vec<LayerShape>,
}

impl ModelShape {
    /// The tiny seeded test model: vocab 128, hidden 32, 3 layers of 4 query heads / 2 KV heads
    /// (GQA groups of 2), head_dim 8, MLP width 48.
    pub fn tiny() -> Self {
        Self {
            vocab_size: 128,
            hidden_size: 32,
            // 1e-5 rounded to f32, so that the shape survives formats that store f32 (GGUF).
            norm_eps: 1e-5_f32 as f64,
            rope: RopeConfig {
                theta: 10_000.0,
                scaling: None,
            },
            tie_word_embeddings: false,
            max_position_embeddings: 64,
            layers: vec![
                LayerShape {
                    n_heads: 4,
                    n_kv_heads: 2,
                    head_dim: 8,
                    ffn_hidden: 48,
                };
                3
            ],
        }
    }

    /// Number of decoder layers.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Checks internal consistency.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidShape(m));
        if self.vocab_size == 0 || self.hidden_size == 0 {
            return bad(format!(
                "vocab_size ({}) and hidden_size ({}) must be positive",
                self.vocab_size, self.hidden_size
            ));
        }
        if !(self.norm_eps > 0.0 && self.norm_eps.is_finite()) {
            return bad(format!("norm_eps must be positive, got {}", self.norm_eps));
        }
        if !(self.rope.theta > 0.0 && self.rope.theta.is_finite()) {
            return bad(format!(
                "rope theta must be positive, got {}",
                self.rope.theta
            ));
        }
        if self.layers.is_empty() {
            return bad("the model has no decoder layers".into());
        }
        for (i, l) in self.layers.iter().enumerate() {
            if l.n_kv_heads == 0 {
                if l.n_heads != 0 {
                    return bad(format!(
                        "layer {i}: {} query heads but no KV head",
                        l.n_heads
                    ));
                }
            } else {
                if l.n_heads == 0 || l.n_heads % l.n_kv_heads != 0 {
                    return bad(format!(
                        "layer {i}: query heads ({}) must be a positive multiple of KV heads ({})",
                        l.n_heads, l.n_kv_heads
                    ));
                }
                if l.head_dim == 0 || l.head_dim % 2 != 0 {
                    return bad(format!(
                        "layer {i}: head_dim must be even and positive for RoPE, got {}",
                        l.head_dim
                    ));
                }
            }
        }
        Ok(())
    }

    /// Parameters of the token embedding matrix.
    pub fn embedding_params(&self) -> u64 {
        (self.vocab_size * self.hidden_size) as u64
    }

    /// Parameters of the decoder layers' linear projections: the prunable part.
    pub fn decoder_linear_params(&self) -> u64 {
        self.layers
            .iter()
            .map(|l| l.attn_params(self.hidden_size) + l.mlp_params(self.hidden_size))
            .sum()
    }

    /// Parameters of the RMSNorm weights (one per existing block, plus the final norm).
    pub fn norm_params(&self) -> u64 {
        let blocks: usize = self
            .layers
            .iter()
            .map(|l| l.has_attn() as usize + l.has_mlp() as usize)
            .sum();
        ((blocks + 1) * self.hidden_size) as u64
    }

    /// All parameters, counting a tied LM head once.
    pub fn num_params(&self) -> u64 {
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.embedding_params()
        };
        self.embedding_params() + head + self.decoder_linear_params() + self.norm_params()
    }

    /// Forward FLOPs for one token that attends over `context` positions (multiply-add = 2 FLOPs):
    /// all linear projections, the attention scores and weighted sums, and the LM head.
    pub fn flops_per_token(&self, context: usize) -> u64 {
        let h = self.hidden_size as u64;
        let layers: u64 = self
            .layers
            .iter()
            .map(|l| {
                2 * (l.attn_params(self.hidden_size) + l.mlp_params(self.hidden_size))
                    + 4 * (l.n_heads * l.head_dim * context) as u64
            })
            .sum();
        layers + 2 * h * self.vocab_size as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2() -> ModelShape {
        ModelShape {
            vocab_size: 49152,
            hidden_size: 576,
            norm_eps: 1e-5,
            rope: RopeConfig {
                theta: 100_000.0,
                scaling: None,
            },
            tie_word_embeddings: true,
            max_position_embeddings: 8192,
            layers: vec![
                LayerShape {
                    n_heads: 9,
                    n_kv_heads: 3,
                    head_dim: 64,
                    ffn_hidden: 1536
                };
                30
            ],
        }
    }

    #[test]
    fn smollm2_parameter_count_matches_the_published_134_5m() {
        // HF reports 134,515,008 parameters for SmolLM2-135M (tied head).
        assert_eq!(smollm2().num_params(), 134_515_008);
    }

    #[test]
    fn validate_rejects_inconsistent_layers() {
        let mut s = ModelShape::tiny();
        s.validate().unwrap();
        s.layers[1].n_heads = 3;
        assert!(matches!(s.validate(), Err(Error::InvalidShape(m)) if m.contains("layer 1")));
        let mut s = ModelShape::tiny();
        s.layers[0].n_kv_heads = 0;
        assert!(s.validate().is_err());
        s.layers[0].n_heads = 0;
        s.validate().unwrap();
        assert!(!s.layers[0].has_attn());
    }

    #[test]
    fn flops_count_linear_work_twice_per_parameter() {
        let s = ModelShape::tiny();
        let no_ctx = s.flops_per_token(0);
        assert_eq!(
            no_ctx,
            2 * s.decoder_linear_params() + 2 * (s.hidden_size * s.vocab_size) as u64
        );
        assert_eq!(s.flops_per_token(10) - no_ctx, 3 * 4 * 4 * 8 * 10);
    }

    #[test]
    fn llama3_rope_scaling_keeps_high_and_scales_low_frequencies() {
        let rope = RopeConfig {
            theta: 500_000.0,
            scaling: Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            }),
        };
        let plain = RopeConfig {
            theta: 500_000.0,
            scaling: None,
        };
        let (a, b) = (rope.inv_freq(128), plain.inv_freq(128));
        assert_eq!(a[0], b[0]);
        assert!((a[63] - b[63] / 8.0).abs() < 1e-15);
    }
}
