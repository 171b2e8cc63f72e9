//! Loading a model for a command: resolve the id, read its shape, check the memory plan, then
//! stream the weights onto the device in the requested dtype. Nothing is read before the plan
//! says it fits.

use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use lopper_core::Dtype;
use lopper_model::{
    HubOptions, LoadedModel, ModelFiles, ModelSpec, inspect, load_inspected_in, lopper_home,
    resolve,
};

use crate::backend::on_host;
use crate::guard;

/// Loads `model` (a command's `--model`) onto `device` with its weight matrices in `dtype`,
/// after checking that they fit the memory available (on the host, for the CPU).
pub fn load_model<B: Backend>(
    model: &str,
    dtype: Dtype,
    device: &B::Device,
) -> Result<LoadedModel<B>> {
    let spec: ModelSpec = model.parse()?;
    let files = resolve(&spec, &lopper_home(), &HubOptions::from_env())
        .with_context(|| format!("loading `{model}`"))?;
    let inspected =
        inspect(&files, &spec.to_string()).with_context(|| format!("loading `{model}`"))?;
    if on_host::<B>() {
        guard::weights_fit(&inspected, dtype, &files, model)?;
    }
    if matches!(files, ModelFiles::Synthetic(_)) {
        tracing::warn!(
            "{model}: a synthetic model (seeded random weights, a byte-level tokenizer): it exercises the shapes, memory and speed of the real one; every quality number it produces is meaningless"
        );
    }
    let t = std::time::Instant::now();
    let loaded = load_inspected_in(&files, inspected, device, dtype)
        .with_context(|| format!("loading `{model}`"))?;
    tracing::info!(
        "loaded {model}: {:.2} B parameters, weights in {dtype}, {:.1} s",
        loaded.model.shape().num_params() as f64 / 1e9,
        t.elapsed().as_secs_f64()
    );
    Ok(loaded)
}
