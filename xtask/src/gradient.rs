//! `bench pg-gradient`: the signal and the noise of the policy-gradient estimators, measured on
//! one fixed search state with the same calibration batches for every estimator.

use std::time::Instant;

use anyhow::Result;
use burn::tensor::backend::Backend;
use lopper_importance::{Method, MethodSettings};
use lopper_policy::{Baseline, Init, PgConfig, PgState};
use lopper_surgery::{InputMeans, mean_loss_kept};

use crate::backend::Job;

/// `bench pg-gradient`'s flags.
#[derive(Debug, clap::Args)]
pub struct PgGradientArgs {
    /// `default`, a .gguf file, a model directory, or hub:ORG/NAME[@REV].
    #[arg(long, default_value = "default")]
    model: String,
    /// Storage type of the weight matrices: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: lopper_core::Dtype,
    /// Fraction of the pool removed.
    #[arg(long, default_value_t = 0.3)]
    sparsity: f64,
    /// The metric method whose plan is the state.
    #[arg(long, default_value = "flap")]
    init: String,
    /// Gradient estimates per row.
    #[arg(long, default_value_t = 24)]
    reps: usize,
    /// Windows per estimate.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Tokens per window.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Channel block sizes, comma-separated (1: one unit per channel; `wN`: per-layer widths
    /// in steps of N channels, as `prune --widths --channel-block N`).
    #[arg(long, default_value = "1,64,w32")]
    blocks: String,
    /// The start's probability band LO,HI (as `prune --start-band`; default 0.85,0.98).
    #[arg(long, value_parser = crate::prune::parse_band)]
    start_band: Option<(f64, f64)>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: crate::backend::DeviceChoice,
}

impl PgGradientArgs {
    /// The checked settings, before anything is loaded.
    pub fn check(self) -> Result<PgGradientBench> {
        let init: Method = self.init.parse()?;
        anyhow::ensure!(
            !init.removes_layers(),
            "--init {}: a layer method has no per-unit order; use a unit method such as flap",
            init.name()
        );
        anyhow::ensure!(
            self.sparsity > 0.0 && self.sparsity < 1.0,
            "--sparsity {} must be strictly between 0 and 1",
            self.sparsity
        );
        anyhow::ensure!(
            self.reps >= 4 && self.batch_size > 0 && self.seq_len > 1,
            "--reps must be >= 4 (signal and noise need several estimates), --batch-size >= 1, --seq-len >= 2"
        );
        let blocks = self
            .blocks
            .split(',')
            .map(|b| {
                let b = b.trim();
                let (size, widths) = match b.strip_prefix('w') {
                    Some(n) => (n, true),
                    None => (b, false),
                };
                size.parse::<usize>()
                    .ok()
                    .filter(|&n| n >= if widths { 2 } else { 1 })
                    .map(|n| (n, widths))
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "--blocks `{b}`: give block sizes >= 1 or widths in steps >= 2, e.g. 1,64,w32"
                        )
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(PgGradientBench {
            init,
            blocks,
            args: self,
        })
    }
}

/// Checked settings of `bench pg-gradient`: the flags with `--init` and `--blocks` parsed.
pub struct PgGradientBench {
    args: PgGradientArgs,
    init: Method,
    /// Channel block sizes, each with whether its blocks are tied into per-layer widths.
    blocks: Vec<(usize, bool)>,
}

/// Signal and noise of `reps` gradient estimates `g` (one vector each): the mean squared
/// deviation of one estimate from their mean (`noise`), the squared norm of the mean less its
/// expected noise share (`signal`, an unbiased estimate of the true gradient's squared norm),
/// and the cosine between the means of the first and the second half of the estimates.
pub fn signal_and_noise(g: &[Vec<f64>]) -> (f64, f64, f64) {
    let r = g.len();
    if r < 2 {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let n = g[0].len();
    let mean_of = |rows: &[Vec<f64>]| -> Vec<f64> {
        let mut m = vec![0.0; n];
        for row in rows {
            for (a, b) in m.iter_mut().zip(row) {
                *a += b / rows.len() as f64;
            }
        }
        m
    };
    let mu = mean_of(g);
    let noise = g
        .iter()
        .map(|row| {
            row.iter()
                .zip(&mu)
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f64>()
        })
        .sum::<f64>()
        / (r - 1) as f64;
    let signal = mu.iter().map(|x| x * x).sum::<f64>() - noise / r as f64;
    let (a, b) = (mean_of(&g[..r / 2]), mean_of(&g[r / 2..]));
    let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    (
        signal,
        noise,
        dot / (norm(&a) * norm(&b)).max(f64::MIN_POSITIVE),
    )
}

impl Job for PgGradientBench {
    fn run<B: Backend>(self, device: B::Device, device_name: String) -> Result<()> {
        let loaded = crate::loading::load_model::<B>(&self.args.model, self.args.dtype, &device)?;
        let model = &loaded.model;
        crate::guard::bench_shapes(model.shape(), &[(self.args.batch_size, self.args.seq_len)])?;
        // Two warm-up batches (the moving baseline's start) after the measured ones.
        let windows = (self.args.reps + 2) * self.args.batch_size;
        let calib = crate::methods::draw_calibration(
            &loaded.tokenizer,
            "c4",
            lopper_data::Sampler::ConcatChunks,
            windows.max(64),
            self.args.seq_len,
            0,
        )?;
        let w = &calib.windows;
        let keep = 1.0 - self.args.sparsity;
        let mp =
            crate::methods::metric_plan(model, w, self.init, keep, 64, &MethodSettings::default())?;
        let init = Init::Plan {
            plan: mp.plan,
            scores: mp.scores,
        };
        let (o_proj, down_proj) = lopper_importance::input_means(model, &w[..64], 8)?;
        let means = InputMeans { o_proj, down_proj };
        let batches: Vec<_> = w
            .chunks(self.args.batch_size)
            .take(self.args.reps + 2)
            .map(|rows| model.tokens(rows))
            .collect::<std::result::Result<_, _>>()?;
        println!(
            "PG gradient estimates on {device_name} ({:?}): sparsity {}, start: {}'s plan (band {:?}), {} estimates of 2 masks x {}x{} per row, the same batches in every row",
            self.args.dtype,
            self.args.sparsity,
            self.init.name(),
            self.args
                .start_band
                .unwrap_or(lopper_policy::DEFAULT_START_BAND),
            self.args.reps,
            self.args.batch_size,
            self.args.seq_len
        );
        println!(
            "| channel units | estimator | variables | mean sampled loss | noise E|g - mean|^2 | signal |mean|^2 | signal / noise | cos(half means) | s |"
        );
        println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
        for &(block, widths) in &self.blocks {
            for (name, baseline, antithetic) in [
                (
                    "moving baseline, independent masks (reference)",
                    Baseline::Moving,
                    false,
                ),
                (
                    "leave-one-out, antithetic pairs (lopper)",
                    Baseline::LeaveOneOut,
                    true,
                ),
            ] {
                let t = Instant::now();
                let cfg = PgConfig {
                    baseline,
                    antithetic,
                    channel_block: block,
                    widths,
                    start_band: self.args.start_band,
                    batch_size: self.args.batch_size,
                    ..PgConfig::new(self.args.sparsity)
                };
                let space = cfg.space(model.shape(), &init)?;
                let mut state = PgState::new(cfg, &space, &init)?;
                let mut grads = Vec::with_capacity(self.args.reps);
                let mut losses = Vec::new();
                for (r, tokens) in batches[self.args.reps..]
                    .iter()
                    .chain(&batches[..self.args.reps])
                    .enumerate()
                {
                    let (g, l) = state.estimate(&space, &mut |p| {
                        Ok(mean_loss_kept(model, p, Some(&means), tokens.clone())?)
                    })?;
                    if r >= 2 {
                        losses.extend(l);
                        grads.push(g);
                    }
                }
                let (signal, noise, cos) = signal_and_noise(&grads);
                println!(
                    "| {} | {name} | {} | {:.4} | {noise:.4e} | {signal:.4e} | {:.4} | {cos:.3} | {:.0} |",
                    if widths {
                        format!("widths in steps of {block}")
                    } else if block > 1 {
                        format!("blocks of {block}")
                    } else {
                        "channels".into()
                    },
                    // A width search's variables: one per layer's width, not per block.
                    if widths {
                        let groups = space.channel_groups();
                        space.units.len() + groups.len()
                            - groups.iter().map(Vec::len).sum::<usize>()
                    } else {
                        space.units.len()
                    },
                    losses.iter().sum::<f64>() / losses.len().max(1) as f64,
                    signal / noise,
                    t.elapsed().as_secs_f64()
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::signal_and_noise;

    #[test]
    fn signal_and_noise_separate_a_constant_from_its_scatter() {
        // A constant gradient (3, 4) plus +-1 on the first coordinate: signal 25, noise ~1.
        let g: Vec<Vec<f64>> = (0..400)
            .map(|i| vec![3.0 + if i % 2 == 0 { 1.0 } else { -1.0 }, 4.0])
            .collect();
        let (signal, noise, cos) = signal_and_noise(&g);
        assert!((noise - 1.0).abs() < 0.01, "{noise}");
        assert!((signal - 25.0).abs() < 0.01, "{signal}");
        assert!(cos > 0.999);
        // Pure noise around zero: no signal, halves uncorrelated in sign.
        let z: Vec<Vec<f64>> = (0..400)
            .map(|i| vec![if i % 2 == 0 { 1.0 } else { -1.0 }, 0.0])
            .collect();
        let (s, n, _) = signal_and_noise(&z);
        assert!(s.abs() < 0.01 && (n - 1.0).abs() < 0.01, "{s} {n}");
    }
}
