//! Checks made before any forward pass: a context longer than the model's positions, and
//! activation memory a batch would need beyond what the machine has. Both refuse with the
//! figure and the flag that fixes it, instead of letting a run grow until it is killed.

use anyhow::{Result, bail};
use lopper_core::Dtype;
use lopper_core::ModelShape;
use lopper_core::memory::{LIMIT_VAR, available_bytes, human};
use lopper_model::{DeviceMap, ForwardMemory, Inspected, ModelFiles, WeightMemory, layer_params};

/// Share of the available memory a forward may plan to use (the rest is headroom for the
/// allocator, the tokenizer and the process's other buffers).
pub const USABLE: f64 = 0.9;

/// The weights of `model` in `dtype` (and the one tensor in flight while loading) must fit in
/// the host memory available now; checked before any tensor is read. With `offload`, the
/// weights that stay are the embedding, the LM head and one decoder layer at a time.
pub fn weights_fit(
    model: &Inspected,
    dtype: Dtype,
    files: &ModelFiles,
    id: &str,
    offload: bool,
) -> Result<()> {
    let Some(avail) = available_bytes()? else {
        return Ok(());
    };
    let need = weight_memory(model, dtype, files, offload);
    let usable = (avail as f64 * USABLE) as u64;
    if need.peak() <= usable {
        return Ok(());
    }
    let narrower = Dtype::ALL
        .into_iter()
        .filter(|d| d.bytes() < dtype.bytes())
        .find(|&d| weight_memory(model, d, files, offload).peak() <= usable);
    let offload_fits = !offload && weight_memory(model, dtype, files, true).peak() <= usable;
    let fix = match (narrower, offload_fits) {
        (Some(d), _) => format!(
            "load the weights in {d} (--dtype {d}), or use a machine with more memory"
        ),
        (None, true) => format!(
            "keep the decoder layers out of memory with --offload cpu (eval, logits and prune: each layer is read from the file for its turn; {} in {dtype})",
            human(weight_memory(model, dtype, files, true).peak())
        ),
        (None, false) => {
            "no storage type fits it, even with its layers offloaded: use a machine (or GPU) with more memory".into()
        }
    };
    let loading = if need.loading > 0 {
        format!(
            " ({} of weights, {} more while loading)",
            human(need.resident()),
            human(need.loading)
        )
    } else {
        String::new()
    };
    bail!(
        "`{id}`: its {:.2} B parameters need {} in {dtype}{loading}, but {} is available{}; {fix} (`cargo xtask info --model {id} --memory` shows the plan)",
        (model.shape.num_params() + model.bias_params) as f64 / 1e9,
        human(need.peak()),
        human(avail),
        limit_note(),
    )
}

/// [`WeightMemory`] of an inspected model: file sources hand tensors over as f32.
pub fn weight_memory(
    model: &Inspected,
    dtype: Dtype,
    files: &ModelFiles,
    offload: bool,
) -> WeightMemory {
    let streamed = !matches!(files, ModelFiles::Synthetic(_));
    if offload {
        WeightMemory::offloaded(&model.shape, dtype, model.bias_params, streamed)
    } else {
        WeightMemory::of(&model.shape, dtype, model.bias_params, streamed)
    }
}

/// One GPU's share of a plan, in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceShare {
    /// `cuda:N`.
    pub name: String,
    /// Weights it holds (at most, while layers are read for their turn when offloaded).
    pub weights: u64,
    /// Activations of a forward on it.
    pub forward: u64,
}

/// The weights and activations each GPU of `gpus` holds: the layers split as
/// [`DeviceMap::balanced`] splits them (or, offloaded, the embedding and head where they live
/// and one layer at a time on each device), a forward's activations on every device (the
/// logits only on the head's).
pub fn device_shares(
    shape: &ModelShape,
    dtype: Dtype,
    weights: &WeightMemory,
    forward: &ForwardMemory,
    gpus: &[usize],
    offload: bool,
) -> Vec<DeviceShare> {
    let map = DeviceMap::balanced(shape, gpus.len());
    let per_device = map.params_per_device(shape);
    let params_of = layer_params(shape);
    let largest_layer = |d: usize| {
        params_of
            .iter()
            .zip(map.layers())
            .filter(|(_, m)| **m == d)
            .map(|(p, _)| *p)
            .max()
            .unwrap_or(0)
    };
    gpus.iter()
        .enumerate()
        .map(|(d, gpu)| {
            let params = if offload {
                let embedding = if d == 0 { shape.embedding_params() } else { 0 };
                let head = if d == map.head_device() && !shape.tie_word_embeddings {
                    shape.embedding_params()
                } else {
                    0
                };
                embedding + head + largest_layer(d)
            } else {
                per_device[d]
            };
            let vectors = if d == 0 { weights.vectors } else { 0 };
            let logits = if d == map.head_device() {
                0
            } else {
                forward.logits
            };
            DeviceShare {
                name: format!("cuda:{gpu}"),
                weights: params * dtype.bytes() + vectors,
                forward: forward.total() - logits,
            }
        })
        .collect()
}

/// Free memory of GPU `index` in bytes, as `nvidia-smi` reports it (`None` where it cannot
/// tell: no driver tools, no such GPU).
pub fn gpu_free_bytes(index: usize) -> Option<u64> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=memory.free",
            "--format=csv,noheader,nounits",
            "-i",
            &index.to_string(),
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_free_mib(&String::from_utf8_lossy(&out.stdout)).map(|mib| mib << 20)
}

/// The MiB figure of `nvidia-smi --query-gpu=memory.free --format=csv,noheader,nounits`.
fn parse_free_mib(out: &str) -> Option<u64> {
    out.lines().next()?.trim().parse().ok()
}

/// Each GPU's share of the weights must fit its free memory (read with `nvidia-smi`; not
/// checked where it cannot be read); checked before any tensor is read.
pub fn gpus_fit(
    model: &Inspected,
    dtype: Dtype,
    files: &ModelFiles,
    id: &str,
    gpus: &[usize],
    offload: bool,
) -> Result<()> {
    let weights = weight_memory(model, dtype, files, offload);
    let none = ForwardMemory {
        tables: 0,
        layer: 0,
        attention: 0,
        logits: 0,
    };
    for share in device_shares(&model.shape, dtype, &weights, &none, gpus, offload) {
        let gpu = share.name.trim_start_matches("cuda:").parse().unwrap_or(0);
        let Some(free) = gpu_free_bytes(gpu) else {
            tracing::warn!(
                "{}: free memory unknown (nvidia-smi not found); not checked",
                share.name
            );
            continue;
        };
        if share.weights as f64 > free as f64 * USABLE {
            let more = if gpus.len() == 1 {
                "list more GPUs (--device cuda:0,cuda:1 splits the layers over them: eval, logits, prune, compare, recover)"
            } else {
                "list more GPUs"
            };
            bail!(
                "`{id}`: {} would hold {} of weights in {dtype}, but {} is free on it; {more}, use a narrower --dtype, or keep the layers in host memory with --offload cpu (eval, logits and prune) (`cargo xtask info --model {id} --memory --device ...` shows the plan)",
                share.name,
                human(share.weights),
                human(free),
            );
        }
    }
    Ok(())
}

/// Bytes of the decoder weights a cut at `sparsity` keeps, in `dtype` (what a cut builds
/// beside the dense model or its streamed layers).
pub fn pruned_bytes(shape: &ModelShape, dtype: Dtype, sparsity: f64) -> u64 {
    let kept = shape.decoder_linear_params() as f64 * (1.0 - sparsity.clamp(0.0, 1.0));
    (kept * dtype.bytes() as f64) as u64
}

/// With offloaded dense layers, `prune` builds the pruned model resident on the devices the
/// layers stream to: its weights (the decoder's linear weights less `sparsity`, in `dtype`)
/// must fit what is left there now, before any work.
pub fn pruned_fits<B: burn::tensor::backend::Backend>(
    shape: &ModelShape,
    dtype: Dtype,
    sparsity: f64,
    devices: &[B::Device],
    id: &str,
) -> Result<()> {
    use burn::tensor::backend::Device as _;
    let need = pruned_bytes(shape, dtype, sparsity);
    let (free, place) = if crate::backend::on_host::<B>() {
        (available_bytes()?, "host memory".to_string())
    } else {
        // Layers are balanced over the GPUs: each holds about its share of the pruned model.
        let per = need / devices.len().max(1) as u64;
        for d in devices {
            let gpu = d.to_id().index_id as usize;
            if let Some(f) = gpu_free_bytes(gpu)
                && per as f64 > f as f64 * USABLE
            {
                bail!(
                    "`{id}` with --offload cpu: the pruned model is built on the GPUs, about {} of it on cuda:{gpu}, but {} is free there; raise --sparsity, use a narrower --dtype or list more GPUs",
                    human(per),
                    human(f)
                );
            }
        }
        return Ok(());
    };
    if let Some(free) = free
        && need as f64 > free as f64 * USABLE
    {
        bail!(
            "`{id}` with --offload cpu: the pruned model is built in {place}, {} of weights in {dtype} at --sparsity {sparsity}, but {} is available{}; raise --sparsity, use a narrower --dtype, or use a machine with more memory",
            human(need),
            human(free),
            limit_note()
        );
    }
    Ok(())
}

fn limit_note() -> String {
    if std::env::var_os(LIMIT_VAR).is_some() {
        format!(" ({LIMIT_VAR})")
    } else {
        String::new()
    }
}

/// `seq_len` (given by `flag`) must fit the model's trained positions unless the user allowed
/// longer contexts.
pub fn context(shape: &ModelShape, seq_len: usize, flag: &str, allow_longer: bool) -> Result<()> {
    let max = shape.max_position_embeddings;
    if seq_len > max && !allow_longer {
        bail!(
            "{flag} {seq_len} is longer than the {max} positions the model was trained for (max_position_embeddings, or its attention's sliding window): its quality there is undefined and attention memory grows with the square of the length; use {flag} {max} or less, or pass --allow-longer-context to run it anyway"
        );
    }
    Ok(())
}

/// A forward of `batch` x `seq` tokens must fit in the memory available now; `what` names the
/// step ("eval wikitext2", "calibration") for the message.
pub fn forward_fits(shape: &ModelShape, batch: usize, seq: usize, what: &str) -> Result<()> {
    let Some(avail) = available_bytes()? else {
        return Ok(());
    };
    let need = ForwardMemory::of(shape, batch, seq);
    let usable = (avail as f64 * USABLE) as u64;
    if need.total() <= usable {
        return Ok(());
    }
    let fitting_batch = (1..batch)
        .rev()
        .find(|&b| ForwardMemory::of(shape, b, seq).total() <= usable);
    let fix = match fitting_batch {
        Some(b) => format!("lower --batch-size to {b} or less, or --seq-len"),
        None => {
            let s = (2..seq)
                .rev()
                .step_by((seq / 64).max(1))
                .find(|&s| ForwardMemory::of(shape, 1, s).total() <= usable);
            match s {
                Some(s) => format!(
                    "even one row does not fit: lower --seq-len to about {s} (and --batch-size to 1)"
                ),
                None => {
                    "not even a short sequence fits: free memory or use a machine with more".into()
                }
            }
        }
    };
    bail!(
        "{what}: a forward of {batch} x {seq} tokens needs about {} of activations (attention {}, logits {}, layer {}, tables {}), but {} is available{}; {fix}",
        human(need.total()),
        human(need.attention),
        human(need.logits),
        human(need.layer),
        human(need.tables),
        human(avail),
        limit_note(),
    )
}

/// [`context`] and [`forward_fits`] for each `BATCHxSEQ` of a benchmark.
pub fn bench_shapes(shape: &ModelShape, shapes: &[(usize, usize)]) -> Result<()> {
    for &(batch, seq) in shapes {
        context(shape, seq, "--shapes (or --seq-len)", false)?;
        forward_fits(shape, batch, seq, &format!("bench {batch}x{seq}"))?;
    }
    Ok(())
}

/// The least-squares cut's f64 statistics (`lopper_sparse::ls_host_bytes`: the Gram matrices
/// of its widest projection's inputs, in host memory whatever the device) must fit in the host
/// memory available now; checked before any work, since the cut comes last.
pub fn ls_fits(
    shape: &ModelShape,
    obs: bool,
    refit_inputs: lopper_sparse::InputRefit,
) -> Result<()> {
    let Some(avail) = available_bytes()? else {
        return Ok(());
    };
    let settings = lopper_sparse::ReconSettings {
        obs,
        inputs: refit_inputs,
        ..lopper_sparse::ReconSettings::default()
    };
    let need = lopper_sparse::ls_host_bytes(shape, &settings);
    if need as f64 > avail as f64 * USABLE {
        let widest = shape
            .layers
            .iter()
            .map(|l| l.ffn_hidden.max(l.n_heads * l.head_dim))
            .max()
            .unwrap_or(0);
        bail!(
            "--reconstruct {}: the least-squares cut holds about {} of f64 statistics for its widest projection ({widest} inputs: {} Gram matrices of {widest} x {widest}{}), but {} is available{}; cut with --reconstruct bias or none, or use a machine with more memory",
            if obs { "obs" } else { "ls" },
            human(need),
            lopper_sparse::ls_grams(&settings),
            if refit_inputs != lopper_sparse::InputRefit::Off {
                ", and the refit input projections"
            } else {
                ""
            },
            human(avail),
            limit_note()
        );
    }
    Ok(())
}

/// The refit proxy's f64 statistics (`--refit-proxy`: every o_proj / down_proj's inverse
/// Gram matrix and weights, `lopper_sparse::RefitProxy::host_bytes`) must fit in the host
/// memory available now; checked before the search starts.
pub fn proxy_fits(shape: &ModelShape) -> Result<()> {
    let Some(avail) = available_bytes()? else {
        return Ok(());
    };
    let need = lopper_sparse::RefitProxy::host_bytes(shape);
    if need as f64 > avail as f64 * USABLE {
        bail!(
            "--refit-proxy holds about {} of f64 statistics (every o_proj and down_proj's inverse Gram matrix), but {} is available{}; search without --refit-proxy, or use a machine with more memory",
            human(need),
            human(avail),
            limit_note()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvidia_smi_free_memory_is_read_in_mib() {
        assert_eq!(parse_free_mib("81037\n"), Some(81037));
        assert_eq!(parse_free_mib(" 512 \n"), Some(512));
        assert_eq!(parse_free_mib("No devices were found\n"), None);
        assert_eq!(parse_free_mib(""), None);
    }

    #[test]
    fn gpu_shares_add_up_to_the_weights_and_offload_keeps_one_layer_per_gpu() {
        let mut shape = ModelShape::tiny();
        shape.layers = vec![shape.layers[0]; 8];
        let w = WeightMemory::of(&shape, Dtype::Bf16, 0, false);
        let f = ForwardMemory::of(&shape, 1, 16);
        let shares = device_shares(&shape, Dtype::Bf16, &w, &f, &[0, 3], false);
        assert_eq!(
            shares.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
            ["cuda:0", "cuda:3"]
        );
        assert_eq!(shares.iter().map(|d| d.weights).sum::<u64>(), w.resident());
        // The logits live where the head does: the last GPU.
        assert_eq!(shares[1].forward - shares[0].forward, f.logits);
        let off = WeightMemory::offloaded(&shape, Dtype::Bf16, 0, false);
        let shares = device_shares(&shape, Dtype::Bf16, &off, &f, &[0, 1], true);
        let layer = shape.layers[0].attn_params(32) + shape.layers[0].mlp_params(32);
        assert_eq!(
            shares[0].weights,
            (shape.embedding_params() + layer) * 2 + off.vectors
        );
        assert_eq!(shares[1].weights, (shape.embedding_params() + layer) * 2);
    }
}
