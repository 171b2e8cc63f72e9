//! Low-rank adapters on the decoder linears, applied in weight space: the student's weight is
//! `W + s * A B` (`s = alpha / rank`), built before each forward so that the model's own
//! forward path runs unchanged. With `B = 0` at the start the student is the pruned model.

use burn::module::{Module, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use lopper_model::{HostTensor, LINEAR_NAMES, Llama};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

/// One adapter pair per present decoder linear (burn layout: `A` is `[in, r]`, `B` is
/// `[r, out]`, the update `s * A B` is `[in, out]` like the weight).
#[derive(Module, Debug)]
pub struct LoraAdapters<B: Backend> {
    /// Down projections, `[in, r]`, random at the start.
    pub a: Vec<Param<Tensor<B, 2>>>,
    /// Up projections, `[r, out]`, zero at the start.
    pub b: Vec<Param<Tensor<B, 2>>>,
    /// `(layer, index into LINEAR_NAMES)` of each pair.
    #[module(skip)]
    pub slots: Vec<(usize, usize)>,
    /// `alpha / rank`.
    pub scale: f64,
    /// `r`.
    pub rank: usize,
}

impl<B: Backend> LoraAdapters<B> {
    /// Adapters of rank `rank` for every decoder linear of `model`: `A` uniform in
    /// `+-1/sqrt(in)` (the bound of PEFT's Kaiming-uniform initialisation) from `seed`, `B` zero.
    pub fn new(model: &Llama<B>, rank: usize, alpha: f64, seed: u64) -> Result<Self> {
        if rank == 0 {
            return Err(Error::Invalid("--rank must be at least 1".into()));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (mut a, mut b, mut slots) = (Vec::new(), Vec::new(), Vec::new());
        for (l, layer) in model.layers.iter().enumerate() {
            for (k, lin) in layer.linears().into_iter().enumerate() {
                let Some(lin) = lin else { continue };
                let [din, dout] = lin.weight.val().dims();
                if rank > din.min(dout) {
                    return Err(Error::Invalid(format!(
                        "--rank {rank} is above the smaller side of layer {l}'s {} ({din} x {dout}); lower --rank",
                        LINEAR_NAMES[k]
                    )));
                }
                // On the device of the weight it adapts (a placed model's layer).
                let device = lin.weight.device();
                let bound = 1.0 / (din as f32).sqrt();
                let av: Vec<f32> = (0..din * rank)
                    .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * bound)
                    .collect();
                let at = Tensor::<B, 2>::from_data(TensorData::new(av, [din, rank]), &device);
                a.push(Param::from_tensor(at));
                b.push(Param::from_tensor(Tensor::zeros([rank, dout], &device)));
                slots.push((l, k));
            }
        }
        if slots.is_empty() {
            return Err(Error::Invalid(
                "the model has no decoder linear left to adapt".into(),
            ));
        }
        Ok(Self {
            a,
            b,
            slots,
            scale: alpha / rank as f64,
            rank,
        })
    }

    /// Trainable parameters.
    pub fn num_params(&self) -> usize {
        self.a
            .iter()
            .chain(&self.b)
            .map(|p| p.val().dims().iter().product::<usize>())
            .sum()
    }

    /// `base` with every adapted weight replaced by `W + s * A B`: on the inner backend the
    /// merged model; on an autodiff backend the student, whose new weights stay connected to
    /// `A` and `B` (`base`'s own weights should not require gradients).
    pub fn apply(&self, base: &Llama<B>) -> Llama<B> {
        let mut out = base.clone();
        for (i, &(l, k)) in self.slots.iter().enumerate() {
            let lin = out.layers[l].linears_mut()[k]
                .take()
                .expect("slots name present linears");
            let w = lin.weight.val() + self.a[i].val().matmul(self.b[i].val()) * self.scale;
            // Not `set_require_grad`: that would cut the graph back to A and B.
            lin.weight = Param::initialized(ParamId::new(), w);
        }
        out
    }

    /// The adapters in PEFT's layout and names (`lora_A.weight` `[r, in]`, `lora_B.weight`
    /// `[out, r]`), for `adapter_model.safetensors`, with the matching `adapter_config.json`.
    pub fn peft(&self) -> Result<(Vec<(String, HostTensor)>, serde_json::Value)> {
        let mut tensors = Vec::new();
        let mut targets = std::collections::BTreeSet::new();
        for (i, &(l, k)) in self.slots.iter().enumerate() {
            let name = LINEAR_NAMES[k];
            targets.insert(name);
            let block = if k < 4 { "self_attn" } else { "mlp" };
            let prefix = format!("base_model.model.model.layers.{l}.{block}.{name}");
            for (suffix, t) in [
                ("lora_A.weight", self.a[i].val().transpose()),
                ("lora_B.weight", self.b[i].val().transpose()),
            ] {
                let shape = t.dims().to_vec();
                let data = t
                    .into_data()
                    .convert::<f32>()
                    .to_vec::<f32>()
                    .map_err(|e| Error::Invalid(format!("reading adapter {prefix}: {e:?}")))?;
                tensors.push((format!("{prefix}.{suffix}"), HostTensor { shape, data }));
            }
        }
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.rank,
            "lora_alpha": self.scale * self.rank as f64,
            "lora_dropout": 0.0,
            "bias": "none",
            "target_modules": targets.into_iter().collect::<Vec<_>>(),
            "fan_in_fan_out": false,
            "inference_mode": true,
        });
        Ok((tensors, config))
    }
}
