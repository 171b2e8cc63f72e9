//! Checks made before any forward pass: a context longer than the model's positions, and
//! activation memory a batch would need beyond what the machine has. Both refuse with the
//! figure and the flag that fixes it, instead of letting a run grow until it is killed.

use anyhow::{Result, bail};
use lopper_core::Dtype;
use lopper_core::ModelShape;
use lopper_core::memory::{LIMIT_VAR, available_bytes, human};
use lopper_model::{ForwardMemory, Inspected, ModelFiles, WeightMemory};

/// Share of the available memory a forward may plan to use (the rest is headroom for the
/// allocator, the tokenizer and the process's other buffers).
const USABLE: f64 = 0.9;

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
            "keep the decoder layers out of memory with --offload cpu (eval and logits: each layer is read from the file for its turn; {} in {dtype})",
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
