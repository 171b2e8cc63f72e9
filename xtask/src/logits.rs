//! `cargo xtask logits`: a model's next-token logits on a text or token ids (sanity checks, and
//! comparisons with other runtimes such as llama.cpp).

use std::path::PathBuf;

use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use clap::Args;

use crate::backend::{DeviceList, Offload, PlacedJob, run_on_devices};

#[derive(Debug, Args)]
pub struct LogitsArgs {
    /// `default`, a .gguf file, a model directory, or hub:ORG/NAME[@REV].
    #[arg(long, default_value = "default")]
    model: String,
    /// Storage type of the weight matrices: f32, bf16 or f16 (activations and reductions stay f32).
    #[arg(long, default_value = "f32")]
    pub dtype: lopper_core::Dtype,
    /// Text to tokenise (no special tokens added).
    #[arg(long, conflicts_with = "ids")]
    text: Option<String>,
    /// Comma-separated token ids.
    #[arg(long)]
    ids: Option<String>,
    /// Write `{"ids": [...], "logits": [[...vocab] per position]}` here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// cpu, cuda, cuda:N, or a list of GPUs (cuda:0,cuda:1) over which the decoder layers are
    /// split in balanced contiguous runs.
    #[arg(long, default_value = "cpu")]
    device: DeviceList,
    /// `cpu`: keep the decoder layers out of device memory (in the checkpoint's memory map, or
    /// the generator of a synthetic model) and read each onto its device for its turn: the
    /// device holds the embedding, the LM head and one layer.
    #[arg(long, value_name = "WHERE")]
    offload: Option<Offload>,
}

pub fn run(args: LogitsArgs) -> Result<()> {
    anyhow::ensure!(
        args.text.is_some() || args.ids.is_some(),
        "give --text or --ids"
    );
    run_on_devices(&args.device.clone(), LogitsJob(args))
}

struct LogitsJob(LogitsArgs);

impl PlacedJob for LogitsJob {
    fn run<B: Backend>(self, devices: Vec<B::Device>, _device_name: String) -> Result<()> {
        let a = &self.0;
        let loaded = crate::loading::load_placed_model::<B>(
            &a.model,
            a.dtype,
            &devices,
            a.offload.is_some(),
        )?;
        let ids: Vec<u32> = match (&a.text, &a.ids) {
            (Some(t), _) => loaded.tokenizer.encode(t)?,
            (None, Some(s)) => s
                .split(',')
                .map(|x| {
                    x.trim()
                        .parse::<u32>()
                        .with_context(|| format!("--ids: `{x}` is not a token id"))
                })
                .collect::<Result<_>>()?,
            _ => unreachable!("checked before"),
        };
        let tokens = loaded.model.tokens(std::slice::from_ref(&ids))?;
        let logits = loaded.model.forward(tokens);
        let [_, seq, vocab] = logits.dims();
        let v: Vec<f32> = logits
            .into_data()
            .convert::<f32>()
            .to_vec()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let last = &v[(seq - 1) * vocab..];
        let mut top: Vec<usize> = (0..vocab).collect();
        top.sort_by(|&x, &y| last[y].total_cmp(&last[x]));
        if let Some(p) = &a.out {
            let rows: Vec<&[f32]> = v.chunks(vocab).collect();
            let j = serde_json::json!({"ids": ids, "logits": rows});
            lopper_core::write_atomic(p, j.to_string().as_bytes())?;
        }
        println!("{} tokens; top next tokens:", ids.len());
        for &t in &top[..5] {
            println!(
                "  {t:>6} {:>10.4} {:?}",
                last[t],
                loaded.tokenizer.id_to_token(t as u32).unwrap_or_default()
            );
        }
        Ok(())
    }
}
