//! Loading a model for a command: resolve the id, read its shape, check the memory plan, then
//! stream the weights onto the device in the requested dtype. Nothing is read before the plan
//! says it fits.

use anyhow::{Context, Result};
use burn::tensor::backend::{Backend, Device as _};
use lopper_core::Dtype;
use lopper_model::{
    DeviceMap, HubOptions, LoadedModel, ModelFiles, ModelSpec, inspect, load_placed, lopper_home,
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
    load_placed_model(model, dtype, std::slice::from_ref(device), false)
}

/// [`load_model`] over `devices` (the decoder layers split in balanced contiguous runs), with
/// the layers left in their source and read for each turn when `offload`.
pub fn load_placed_model<B: Backend>(
    model: &str,
    dtype: Dtype,
    devices: &[B::Device],
    offload: bool,
) -> Result<LoadedModel<B>> {
    let spec: ModelSpec = model.parse()?;
    let files = resolve(&spec, &lopper_home(), &HubOptions::from_env())
        .with_context(|| format!("loading `{model}`"))?;
    let inspected =
        inspect(&files, &spec.to_string()).with_context(|| format!("loading `{model}`"))?;
    if on_host::<B>() {
        guard::weights_fit(&inspected, dtype, &files, model, offload)?;
    } else {
        let gpus: Vec<usize> = devices
            .iter()
            .map(|d| d.to_id().index_id as usize)
            .collect();
        guard::gpus_fit(&inspected, dtype, &files, model, &gpus, offload)?;
    }
    if matches!(files, ModelFiles::Synthetic(_)) {
        tracing::warn!(
            "{model}: a synthetic model (seeded random weights, a byte-level tokenizer): it exercises the shapes, memory and speed of the real one; every quality number it produces is meaningless"
        );
    }
    let t = std::time::Instant::now();
    let map = DeviceMap::balanced(&inspected.shape, devices.len());
    let loaded = load_placed(&files, inspected, devices, &map, dtype, offload)
        .with_context(|| format!("loading `{model}`"))?;
    if devices.len() > 1 {
        tracing::info!("layers per device: {}", describe_map(&map));
    }
    if offload {
        tracing::info!(
            "decoder layers offloaded: each is read from {} onto its device for its turn",
            loaded.info.path.display()
        );
    }
    tracing::info!(
        "loaded {model}: {:.2} B parameters, weights in {dtype}, {:.1} s",
        loaded.model.shape().num_params() as f64 / 1e9,
        t.elapsed().as_secs_f64()
    );
    Ok(loaded)
}

/// `0-15 on device 0, 16-31 on device 1`.
fn describe_map(map: &DeviceMap) -> String {
    let l = map.layers();
    let mut runs = Vec::new();
    let mut start = 0;
    for i in 1..=l.len() {
        if i == l.len() || l[i] != l[start] {
            runs.push(format!("{}-{} on device {}", start, i - 1, l[start]));
            start = i;
        }
    }
    runs.join(", ")
}
