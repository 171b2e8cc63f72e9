//! `cargo xtask bench ...`: benchmarks that print tables. Figures are ratios measured in the same
//! run, never asserted by tests.

use std::time::Instant;

use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use lopper_model::{Llama, ModelSpec, load};

use crate::backend::{DeviceChoice, Job, run_on};

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Forward-pass throughput of a model: tokens/s and implied GFLOP/s per batch shape.
    Forward {
        /// `default`, a .gguf file, a model directory, or hub:ORG/NAME[@REV].
        #[arg(long, default_value = "default")]
        model: String,
        /// Batch shapes as BATCHxSEQ, comma-separated.
        #[arg(long, default_value = "8x128,1x2048")]
        shapes: String,
        /// Timed runs per shape (the median is reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Untimed warm-up runs per shape.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: DeviceChoice,
    },
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Forward {
            model,
            shapes,
            runs,
            warmup,
            device,
        } => {
            let shapes = shapes
                .split(',')
                .map(|s| {
                    let (b, t) = s.trim().split_once('x').context("shapes look like 8x128")?;
                    Ok((b.parse()?, t.parse()?))
                })
                .collect::<Result<Vec<(usize, usize)>>>()
                .context("parsing --shapes")?;
            anyhow::ensure!(runs > 0, "--runs must be at least 1");
            run_on(
                device,
                ForwardBench {
                    model,
                    shapes,
                    runs,
                    warmup,
                },
            )
        }
    }
}

struct ForwardBench {
    model: String,
    shapes: Vec<(usize, usize)>,
    runs: usize,
    warmup: usize,
}

/// Seconds of one call, after the backend has finished its queued work.
pub fn time_once<B: Backend>(device: &B::Device, f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    B::sync(device).expect("device sync");
    t.elapsed().as_secs_f64()
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

impl Job for ForwardBench {
    fn run<B: Backend>(self, device: B::Device, device_name: String) -> Result<()> {
        let spec: ModelSpec = self.model.parse()?;
        let loaded =
            load::<B>(&spec, &device).with_context(|| format!("loading `{}`", self.model))?;
        let model: &Llama<B> = &loaded.model;
        let shape = model.shape().clone();
        let bar = ProgressBar::new((self.shapes.len() * (self.runs + self.warmup)) as u64)
            .with_style(ProgressStyle::with_template(
                "{msg} [{bar:30}] {pos}/{len} runs, eta {eta}",
            )?);
        let mut rows = Vec::new();
        for &(batch, seq) in &self.shapes {
            bar.set_message(format!("forward {batch}x{seq}"));
            // Deterministic pseudo-text: ids spread over the vocabulary.
            let ids: Vec<Vec<u32>> = (0..batch)
                .map(|b| {
                    (0..seq)
                        .map(|t| ((b * 7919 + t * 104_729) % shape.vocab_size) as u32)
                        .collect()
                })
                .collect();
            let tokens = model.tokens(&ids)?;
            let mut times = Vec::new();
            for i in 0..self.warmup + self.runs {
                let t = time_once::<B>(&device, || {
                    let logits = model.forward(tokens.clone());
                    // Read one value back so lazy backends really finish.
                    let _ = logits.narrow(2, 0, 1).into_data();
                });
                if i >= self.warmup {
                    times.push(t);
                }
                bar.inc(1);
            }
            let med = median(times);
            let tokens_n = (batch * seq) as f64;
            // Causal attention: position p attends over p + 1 positions.
            let per_key = (shape.flops_per_token(1) - shape.flops_per_token(0)) as f64;
            let flops = tokens_n * shape.flops_per_token(0) as f64
                + batch as f64 * per_key * (seq * (seq + 1) / 2) as f64;
            rows.push((batch, seq, med, tokens_n / med, flops / med / 1e9));
        }
        bar.finish_and_clear();
        println!("forward benchmark: {} on {device_name}", loaded.info.spec);
        println!(
            "median of {} runs after {} warm-up\n",
            self.runs, self.warmup
        );
        println!("| batch x seq | seconds | tokens/s | GFLOP/s |");
        println!("|---|---:|---:|---:|");
        for (b, s, secs, tps, gflops) in rows {
            println!("| {b} x {s} | {secs:.3} | {tps:.0} | {gflops:.1} |");
        }
        Ok(())
    }
}
