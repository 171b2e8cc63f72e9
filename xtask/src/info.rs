//! `cargo xtask info`: shape, parameter counts and file details of a model.

use anyhow::{Context, Result};
use lopper_core::memory::{available_bytes, human};
use lopper_core::{Dtype, UnitKind};
use lopper_model::{ForwardMemory, HubOptions, ModelSpec, inspect, lopper_home, resolve};

use crate::backend::DeviceList;
use crate::guard::DeviceShare;

/// What `--memory` plans for.
#[derive(Debug, Clone)]
pub struct MemoryQuery {
    pub dtype: Dtype,
    pub batch_size: usize,
    pub seq_len: usize,
    pub devices: DeviceList,
    pub offload: bool,
    /// The sparsity of a cut whose model is built beside the dense one (or the streamed layers).
    pub sparsity: Option<f64>,
}

impl MemoryQuery {
    /// Bytes of the model a cut at `sparsity` builds, where one is asked.
    fn pruned(&self, shape: &lopper_core::ModelShape) -> Result<Option<u64>> {
        self.sparsity
            .map(|s| {
                anyhow::ensure!(
                    (0.0..1.0).contains(&s),
                    "--sparsity {s} is impossible: give a fraction in [0, 1) (0.3 removes 30%)"
                );
                Ok(crate::guard::pruned_bytes(shape, self.dtype, s))
            })
            .transpose()
    }
}

pub fn run(model: &str, json: bool, memory: Option<MemoryQuery>) -> Result<()> {
    let spec: ModelSpec = model.parse()?;
    let files = resolve(&spec, &lopper_home(), &HubOptions::from_env())
        .with_context(|| format!("model `{model}`"))?;
    // The shape, tokenizer and file details only: no weight is read.
    let loaded = inspect(&files, &spec.to_string()).with_context(|| format!("model `{model}`"))?;
    let shape = &loaded.shape;
    let plan = memory
        .map(|q| -> Result<_> {
            let weights = crate::guard::weight_memory(&loaded, q.dtype, &files, q.offload);
            let forward = ForwardMemory::of(shape, q.batch_size, q.seq_len);
            let pruned = q.pruned(shape)?;
            let mut shares = match &q.devices {
                DeviceList::Cpu => vec![],
                DeviceList::Cuda(gpus) => {
                    crate::guard::device_shares(shape, q.dtype, &weights, &forward, gpus, q.offload)
                }
            };
            // The cut model's layers are balanced over the devices as the dense ones are.
            let n = shares.len().max(1) as u64;
            for d in &mut shares {
                d.weights += pruned.unwrap_or(0) / n;
            }
            // The default cut (`--reconstruct ls`) holds its statistics in host memory.
            let ls = q.sparsity.map(|_| {
                lopper_sparse::ls_host_bytes(shape, &lopper_sparse::ReconSettings::default())
            });
            Ok((q, weights, forward, shares, pruned, ls))
        })
        .transpose()?;
    let available = available_bytes()?;
    if json {
        let v = serde_json::json!({
            "model": loaded.info,
            "shape": shape,
            "params": {
                "total": shape.num_params(),
                "embedding": shape.embedding_params(),
                "decoder_linear": shape.decoder_linear_params(),
                "norms": shape.norm_params(),
            },
            "units": {
                "kv_groups": shape.units(UnitKind::KvGroup).len(),
                "channels": shape.units(UnitKind::Channel).len(),
                "layers": shape.n_layers(),
            },
            "flops_per_token_at_128": shape.flops_per_token(128),
            "tokenizer": {"vocab_size": loaded.tokenizer.vocab_size(), "bos": loaded.tokenizer.bos_id, "eos": loaded.tokenizer.eos_id},
            "matmul": lopper_kernels::describe(),
        });
        let mut v = v;
        if let Some((q, w, f, shares, pruned, ls)) = &plan {
            let on_gpus = !shares.is_empty();
            let (cut, ls_bytes) = (pruned.unwrap_or(0), ls.unwrap_or(0));
            v["memory"] = serde_json::json!({
                "dtype": q.dtype, "batch_size": q.batch_size, "seq_len": q.seq_len,
                "offload": q.offload,
                "weights": w.resident(), "loading_extra": w.loading,
                "forward": f.total(),
                "sparsity": q.sparsity, "pruned": pruned, "ls_statistics": ls,
                "host_total": if on_gpus { w.loading.max(ls_bytes) } else { w.peak().max(w.resident() + f.total() + cut + ls_bytes) },
                "devices": shares.iter().map(|d| serde_json::json!({
                    "device": d.name, "weights": d.weights, "forward": d.forward,
                    "total": d.weights + d.forward,
                })).collect::<Vec<_>>(),
                "available": available,
            });
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if let Some((q, w, f, shares, pruned, ls)) = &plan {
        if shares.is_empty() {
            print_plan(
                q,
                w,
                f,
                (*pruned, *ls),
                available,
                shape.num_params() + loaded.bias_params,
            );
        } else {
            print_device_plan(
                q,
                w,
                shares,
                (shape.num_params() + loaded.bias_params, *ls),
                available_gpus(shares),
            );
        }
    }
    let i = &loaded.info;
    println!("model      {}", i.spec);
    println!("path       {}", i.path.display());
    println!(
        "format     {} ({:.1} MiB)",
        i.format,
        i.file_size as f64 / (1 << 20) as f64
    );
    if let Some(g) = &i.gguf {
        println!(
            "gguf       version {}, {} tensors, types {}",
            g["version"], g["tensors"], g["tensor_types"]
        );
    }
    println!(
        "shape      vocab {}, hidden {}, {} layers, rope theta {}, norm eps {:e}, tied head: {}",
        shape.vocab_size,
        shape.hidden_size,
        shape.n_layers(),
        shape.rope.theta,
        shape.norm_eps,
        shape.tie_word_embeddings
    );
    println!(
        "params     {} total = {} embedding + {} decoder linear (prunable) + {} norms",
        shape.num_params(),
        shape.embedding_params(),
        shape.decoder_linear_params(),
        shape.norm_params()
    );
    println!(
        "units      {} KV groups, {} MLP channels, {} layers",
        shape.units(UnitKind::KvGroup).len(),
        shape.units(UnitKind::Channel).len(),
        shape.n_layers()
    );
    println!(
        "flops      {:.1} MFLOP/token at context 128",
        shape.flops_per_token(128) as f64 / 1e6
    );
    println!(
        "tokenizer  {} tokens, bos {:?}, eos {:?}",
        loaded.tokenizer.vocab_size(),
        loaded.tokenizer.bos_id,
        loaded.tokenizer.eos_id
    );
    println!("matmul     {}", lopper_kernels::describe());
    println!("\nlayer  q_heads  kv_heads  head_dim  mlp_width");
    let mut rows = shape.layers.iter().enumerate().peekable();
    while let Some((start, l)) = rows.next() {
        let mut end = start;
        while rows.peek().is_some_and(|(_, n)| *n == l) {
            end = rows.next().unwrap().0;
        }
        let range = if end > start {
            format!("{start}-{end}")
        } else {
            start.to_string()
        };
        println!(
            "{range:<6} {:>7}  {:>8}  {:>8}  {:>9}",
            l.n_heads, l.n_kv_heads, l.head_dim, l.ffn_hidden
        );
    }
    Ok(())
}

fn print_plan(
    q: &MemoryQuery,
    w: &lopper_model::WeightMemory,
    f: &ForwardMemory,
    (pruned, ls): (Option<u64>, Option<u64>),
    available: Option<u64>,
    params: u64,
) {
    let total = w
        .peak()
        .max(w.resident() + f.total() + pruned.unwrap_or(0) + ls.unwrap_or(0));
    println!(
        "memory plan ({} weights, forward of {} x {} tokens, on the CPU: all of it in host memory{})",
        q.dtype,
        q.batch_size,
        q.seq_len,
        if q.offload {
            "; decoder layers offloaded: the embedding, the head and one layer at a time"
        } else {
            ""
        }
    );
    println!(
        "  weights        {:>10}  ({}{:.2} B parameters: matrices in {}, norms and biases f32)",
        human(w.resident()),
        if q.offload {
            "embedding, head and the largest layer of "
        } else {
            ""
        },
        params as f64 / 1e9,
        q.dtype
    );
    println!(
        "  while loading  {:>10}  (the largest tensor's f32 values in flight)",
        format!("+{}", human(w.loading))
    );
    println!(
        "  forward        {:>10}  (activations: layer {}, attention {}, logits {}, tables {})",
        format!("+{}", human(f.total())),
        human(f.layer),
        human(f.attention),
        human(f.logits),
        human(f.tables)
    );
    if let (Some(p), Some(s)) = (pruned, q.sparsity) {
        println!(
            "  cut model      {:>10}  (the model a cut at --sparsity {s} builds whole, beside {})",
            format!("+{}", human(p)),
            if q.offload {
                "the streamed layers"
            } else {
                "the dense model"
            }
        );
    }
    if let Some(b) = ls {
        println!(
            "  least squares  {:>10}  (the default cut's f64 statistics of its widest projection, in host memory)",
            format!("+{}", human(b))
        );
    }
    println!("  peak           {:>10}", human(total));
    match available {
        Some(a) => println!(
            "  available      {:>10}  -> {}",
            human(a),
            if total as f64 <= a as f64 * 0.9 {
                "fits"
            } else {
                "does NOT fit: commands refuse it before reading any weight"
            }
        ),
        None => println!("  available      unknown on this system"),
    }
    println!();
}

/// The plan over GPUs: each device's weights and activations; the host holds one tensor in
/// flight while loading (and, offloaded, the file's pages the kernel may evict).
fn print_device_plan(
    q: &MemoryQuery,
    w: &lopper_model::WeightMemory,
    shares: &[DeviceShare],
    (params, ls): (u64, Option<u64>),
    free: Vec<Option<u64>>,
) {
    println!(
        "memory plan ({} weights, {:.2} B parameters, forward of {} x {} tokens, layers split over {} GPU(s){})",
        q.dtype,
        params as f64 / 1e9,
        q.batch_size,
        q.seq_len,
        shares.len(),
        if q.offload {
            "; decoder layers offloaded: each device holds its share of the embedding and head and one layer at a time"
        } else {
            ""
        }
    );
    println!("  device     weights     forward       total        free");
    for (d, free) in shares.iter().zip(free) {
        let total = d.weights + d.forward;
        println!(
            "  {:<8} {:>10}  {:>10}  {:>10}  {}",
            d.name,
            human(d.weights),
            human(d.forward),
            human(total),
            match free {
                Some(f) if total as f64 <= f as f64 * crate::guard::USABLE =>
                    format!("{:>10}  -> fits", human(f)),
                Some(f) => format!("{:>10}  -> does NOT fit", human(f)),
                None => "   unknown  (nvidia-smi not found)".into(),
            }
        );
    }
    println!(
        "  host     {:>10}  (one tensor's f32 values in flight while loading)",
        human(w.loading)
    );
    if let Some(b) = ls {
        println!(
            "  host     {:>10}  (the default least-squares cut's f64 statistics of its widest projection)",
            human(b)
        );
    }
    println!(
        "  every command reads each GPU's free memory (nvidia-smi) before loading and refuses a share that does not fit"
    );
    println!();
}

/// The free memory of each GPU of the plan, where `nvidia-smi` can tell.
fn available_gpus(shares: &[DeviceShare]) -> Vec<Option<u64>> {
    shares
        .iter()
        .map(|d| {
            d.name
                .strip_prefix("cuda:")
                .and_then(|i| i.parse().ok())
                .and_then(crate::guard::gpu_free_bytes)
        })
        .collect()
}
