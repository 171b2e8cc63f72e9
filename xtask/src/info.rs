//! `cargo xtask info`: shape, parameter counts and file details of a model.

use anyhow::{Context, Result};
use lopper_core::UnitKind;
use lopper_model::{ModelSpec, load};

pub fn run(model: &str, json: bool) -> Result<()> {
    let spec: ModelSpec = model.parse()?;
    let loaded = load::<burn_flex::Flex>(&spec, &burn_flex::FlexDevice)
        .with_context(|| format!("loading model `{model}`"))?;
    let shape = loaded.model.shape();
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
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
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
