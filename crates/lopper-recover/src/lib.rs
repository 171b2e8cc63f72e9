#![doc = include_str!("../README.md")]

use serde::{Deserialize, Serialize};

mod lora;
mod train;

pub use lora::LoraAdapters;
pub use train::{Recovery, StepRecord, kd_loss};

/// Errors of recovery training.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Model errors.
    #[error(transparent)]
    Model(#[from] lopper_model::Error),
    /// Settings or data that cannot work.
    #[error("{0}")]
    Invalid(String),
    /// A checkpoint that cannot be written or read back.
    #[error("checkpoint {path}: {why}")]
    Checkpoint {
        /// The file.
        path: std::path::PathBuf,
        /// What went wrong.
        why: String,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Which weights recovery trains.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Adapt {
    /// Low-rank adapters `W + (alpha / rank) * A B` on every kept decoder linear; only `A` and
    /// `B` train, and they are merged into the weights at the end.
    Lora {
        /// Rank `r` of every adapter.
        rank: usize,
        /// Scale numerator: the update is `(alpha / rank) * A B`.
        alpha: f64,
    },
    /// Every weight of the model trains (embeddings, norms, linears, biases).
    Full,
}

impl Adapt {
    /// Parameters that train on a model of `shape`: `rank * (in + out)` per kept decoder linear
    /// for LoRA, every parameter for full fine-tuning. What a checkpoint stores, with AdamW's
    /// two moments each.
    pub fn trainable_params(&self, shape: &lopper_core::ModelShape) -> u64 {
        match *self {
            Adapt::Full => shape.num_params(),
            Adapt::Lora { rank, .. } => {
                let h = shape.hidden_size;
                let per_layer = |l: &lopper_core::LayerShape| {
                    let (q, kv, f) = (
                        l.n_heads * l.head_dim,
                        l.n_kv_heads * l.head_dim,
                        l.ffn_hidden,
                    );
                    let attn = if l.has_attn() {
                        (h + q) * 2 + (h + kv) * 2
                    } else {
                        0
                    };
                    let mlp = if l.has_mlp() { (h + f) * 3 } else { 0 };
                    (attn + mlp) * rank
                };
                shape.layers.iter().map(per_layer).sum::<usize>() as u64
            }
        }
    }
}

/// What the student is trained to match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LossKind {
    /// Next-token cross-entropy on the training text.
    #[serde(rename = "ce")]
    Ce,
    /// Distillation: KL divergence from the teacher's next-token distribution.
    #[serde(rename = "kd")]
    Kd,
    /// `ce + weight * kd`.
    #[serde(rename = "ce+kd")]
    CeKd,
}

impl LossKind {
    /// Whether the loss reads a teacher.
    pub fn needs_teacher(self) -> bool {
        self != LossKind::Ce
    }
}

impl std::fmt::Display for LossKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LossKind::Ce => "ce",
            LossKind::Kd => "kd",
            LossKind::CeKd => "ce+kd",
        })
    }
}

impl std::str::FromStr for LossKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ce" => Ok(LossKind::Ce),
            "kd" => Ok(LossKind::Kd),
            "ce+kd" => Ok(LossKind::CeKd),
            o => Err(Error::Invalid(format!(
                "unknown loss `{o}`: use ce (cross-entropy), kd (distillation from the teacher) or ce+kd"
            ))),
        }
    }
}

/// Distillation settings (read when the loss has `kd`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Distill {
    /// Softmax temperature of both distributions; the KL term is multiplied by its square
    /// (Hinton et al.) so that its gradient scale does not depend on it.
    pub temperature: f64,
    /// Match only the teacher's `k` most likely tokens per position (both distributions
    /// renormalised over them); `None`: the full vocabulary.
    pub top_k: Option<usize>,
    /// Weight of the KL term in `ce+kd`.
    pub weight: f64,
}

impl Default for Distill {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: None,
            weight: 1.0,
        }
    }
}

/// Everything that determines a recovery run (with the data and the models).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RecoverConfig {
    /// LoRA or full fine-tuning.
    pub adapt: Adapt,
    /// Training objective.
    pub loss: LossKind,
    /// Distillation settings.
    pub distill: Distill,
    /// Optimiser steps.
    pub steps: usize,
    /// Windows per optimiser step.
    pub batch_size: usize,
    /// Windows per forward/backward pass; the step's gradient is accumulated over
    /// `batch_size / micro_batch` passes, so memory does not grow with the batch.
    pub micro_batch: usize,
    /// Peak learning rate (AdamW).
    pub lr: f64,
    /// Linear warm-up steps from `lr / warmup` to `lr`.
    pub warmup: usize,
    /// Cosine decay after warm-up ends at `lr * min_lr_ratio`.
    pub min_lr_ratio: f64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Clip the global gradient norm (over every trained tensor) to this value.
    pub clip_norm: Option<f64>,
    /// Seed of the adapters' initialisation.
    pub seed: u64,
}

impl Default for RecoverConfig {
    fn default() -> Self {
        Self {
            adapt: Adapt::Lora {
                rank: 8,
                alpha: 16.0,
            },
            loss: LossKind::Ce,
            distill: Distill::default(),
            steps: 200,
            batch_size: 8,
            micro_batch: 4,
            lr: 1e-4,
            warmup: 10,
            min_lr_ratio: 0.1,
            weight_decay: 0.0,
            clip_norm: Some(1.0),
            seed: 0,
        }
    }
}

impl RecoverConfig {
    /// Refuses settings that cannot train, naming the flag.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(m));
        if let Adapt::Lora { rank, alpha } = self.adapt {
            if rank == 0 {
                return bad("--rank must be at least 1".into());
            }
            if !(alpha.is_finite() && alpha > 0.0) {
                return bad(format!("--alpha must be a positive number, got {alpha}"));
            }
        }
        if self.steps == 0 {
            return bad("--steps must be at least 1".into());
        }
        if self.batch_size == 0 || self.micro_batch == 0 {
            return bad("--batch-size and --micro-batch must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("--lr must be a positive number, got {}", self.lr));
        }
        if self.warmup > self.steps {
            return bad(format!(
                "--warmup {} is longer than --steps {}",
                self.warmup, self.steps
            ));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad(format!(
                "--min-lr-ratio must be in [0, 1], got {}",
                self.min_lr_ratio
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "--weight-decay must be 0 or more, got {}",
                self.weight_decay
            ));
        }
        if let Some(c) = self.clip_norm
            && !(c.is_finite() && c > 0.0)
        {
            return bad(format!("--clip-norm must be a positive number, got {c}"));
        }
        let d = self.distill;
        if !(d.temperature.is_finite() && d.temperature > 0.0) {
            return bad(format!(
                "--temperature must be a positive number, got {}",
                d.temperature
            ));
        }
        if d.top_k == Some(0) {
            return bad("--top-k must be at least 1 (leave it out for the full vocabulary)".into());
        }
        if !(d.weight.is_finite() && d.weight >= 0.0) {
            return bad(format!("--kd-weight must be 0 or more, got {}", d.weight));
        }
        Ok(())
    }

    /// The learning rate of step `step` (0-based): linear warm-up over `warmup` steps, then a
    /// cosine from `lr` down to `lr * min_lr_ratio` at the last step.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.steps.saturating_sub(self.warmup + 1).max(1) as f64;
        let t = ((step - self.warmup) as f64 / span).min(1.0);
        let floor = self.lr * self.min_lr_ratio;
        floor + (self.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }

    /// Windows a run of these settings reads (each once, in order).
    pub fn windows_needed(&self) -> usize {
        self.steps * self.batch_size
    }
}

#[cfg(test)]
mod tests;
