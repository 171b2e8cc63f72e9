//! `cargo xtask bench ...`: benchmarks that print tables. Figures are ratios measured in the same
//! run, never asserted by tests.

use std::time::Instant;

use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use clap::Subcommand;
use lopper_model::Llama;

use crate::backend::{DeviceChoice, Job, run_on};

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Forward-pass throughput of a model: tokens/s and implied GFLOP/s per batch shape.
    Forward {
        /// `default`, a .gguf file, a model directory, or hub:ORG/NAME[@REV].
        #[arg(long, default_value = "default")]
        model: String,
        /// Storage type of the weight matrices: f32, bf16 or f16 (activations and reductions stay f32).
        #[arg(long, default_value = "f32")]
        dtype: lopper_core::Dtype,
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
        /// Also time PyTorch on the same model and shapes, in alternating rounds of this run:
        /// a Python with torch, numpy and gguf (runs scripts/bench_torch.py).
        #[arg(long, value_name = "PYTHON")]
        vs_torch: Option<String>,
        /// Also time lopper with the BLAS turned off (the portable gemm), in the same rounds.
        #[arg(long)]
        portable: bool,
        /// Alternating rounds (lopper, [portable,] PyTorch); each round times --runs runs.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// Time the backward pass instead: the batch's mean next-token loss and its gradient
        /// with respect to every decoder linear weight (autodiff, as llm-pruner, ifso and
        /// recover run it), in passes of 2 windows; PyTorch does the same.
        #[arg(long)]
        backward: bool,
    },
    /// Matrix products on the model's shapes: the portable gemm, the BLAS in f32 and in bf16,
    /// GFLOP/s side by side in one run.
    Matmul {
        /// Products as MxKxN, comma-separated (rows x inner x columns).
        #[arg(
            long,
            default_value = "1024x576x1536,1024x1536x576,1024x576x576,1024x576x49152,128x576x1536"
        )]
        shapes: String,
        /// Timed runs per cell (the median is reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Surgery's real effect: uniform and random heterogeneous plans at each sparsity, cut, and
    /// timed next to the dense model in the same run.
    Pruned {
        /// `default`, a .gguf file, a model directory, or hub:ORG/NAME[@REV].
        #[arg(long, default_value = "default")]
        model: String,
        /// Storage type of the weight matrices: f32, bf16 or f16 (activations and reductions stay f32).
        #[arg(long, default_value = "f32")]
        dtype: lopper_core::Dtype,
        /// Fractions of prunable parameters removed, comma-separated.
        #[arg(long, default_value = "0.2,0.3,0.5")]
        sparsity: String,
        /// Batch shapes as BATCHxSEQ, comma-separated.
        #[arg(long, default_value = "8x128,1x2048")]
        shapes: String,
        /// Timed runs per row (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Seed of the random plans.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: DeviceChoice,
    },
    /// Time of one policy-gradient step (K sampled masks scored) at a sparsity, next to a dense
    /// step and to a step that masks without slicing, all in the same run.
    PgStep {
        /// `default`, a .gguf file, a model directory, or hub:ORG/NAME[@REV].
        #[arg(long, default_value = "default")]
        model: String,
        /// Storage type of the weight matrices: f32, bf16 or f16 (activations and reductions stay f32).
        #[arg(long, default_value = "f32")]
        dtype: lopper_core::Dtype,
        /// Fractions of parameters removed by the sampled masks, comma-separated.
        #[arg(long, default_value = "0.5")]
        sparsity: String,
        /// Windows per step.
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Tokens per window.
        #[arg(long, default_value_t = 128)]
        seq_len: usize,
        /// Masks per step (K).
        #[arg(long, default_value_t = 2)]
        samples_per_step: usize,
        /// Timed steps per row (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: DeviceChoice,
    },
    /// The policy-gradient estimators' signal and noise on one fixed state (a metric method's
    /// plan, lopper's preset): the reference's (moving-average baseline, independent masks) and
    /// lopper's (leave-one-out over antithetic pairs), each with one unit per channel and with
    /// channel blocks; the same calibration batches for every row.
    PgGradient(crate::gradient::PgGradientArgs),
    /// SLEB's greedy layer removal with its prefix cache (each trial runs only the layers after
    /// the one it removes) next to the same search run from the embeddings every trial, same
    /// run, same calibration windows: seconds, trials and the layers each removed.
    Sleb {
        /// `default`, a .gguf file, a model directory, or hub:ORG/NAME[@REV].
        #[arg(long, default_value = "default")]
        model: String,
        /// Storage type of the weight matrices: f32, bf16 or f16 (activations and reductions stay f32).
        #[arg(long, default_value = "f32")]
        dtype: lopper_core::Dtype,
        /// Fraction of decoder parameters removed.
        #[arg(long, default_value_t = 0.3)]
        sparsity: f64,
        /// C4 calibration windows.
        #[arg(long, default_value_t = 16)]
        windows: usize,
        /// Tokens per window.
        #[arg(long, default_value_t = 128)]
        seq_len: usize,
        /// Windows per forward.
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: DeviceChoice,
    },
    /// The one-shot solvers (magnitude, Wanda, SparseGPT, ALPS) on synthetic layers of the given
    /// shapes (host, f64): seconds per matrix, ALPS iterations and milliseconds per iteration,
    /// relative reconstruction error; one table, same run.
    Solvers {
        /// Matrix shapes as OUTxIN, comma-separated (the default model's q, gate/up, down).
        #[arg(long, default_value = "576x576,1536x576,576x1536")]
        shapes: String,
        /// Calibration tokens behind each Gram matrix.
        #[arg(long, default_value_t = 2048)]
        tokens: usize,
        /// unstructured or N:M.
        #[arg(long, default_value = "unstructured")]
        pattern: String,
        /// Sparsity of the unstructured pattern.
        #[arg(long, default_value_t = 0.5)]
        sparsity: f64,
    },
}

/// `bench solvers`: synthetic correlated inputs, so that the problems are not trivially diagonal.
fn bench_solvers(shapes: &str, tokens: usize, pattern: &str, sparsity: f64) -> Result<()> {
    use lopper_sparse::faer::Mat;
    use lopper_sparse::{Pattern, SparseMethod, SparseSettings};
    let pattern = Pattern::parse(pattern, sparsity)?;
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut normal = move || {
        // xorshift64*, then a sum of 4 uniforms (approximately normal, enough for a benchmark).
        (0..4)
            .map(|_| {
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
            })
            .sum::<f64>()
            - 2.0
    };
    println!(
        "| shape (out x in) | method | seconds | ALPS factor s | ALPS iterations | ms / iteration (ADMM + CG) | ms of its 2 products | rel. error |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for s in shapes.split(',') {
        let (o, i) = s
            .split_once('x')
            .and_then(|(o, i)| {
                Some((
                    o.trim().parse::<usize>().ok()?,
                    i.trim().parse::<usize>().ok()?,
                ))
            })
            .ok_or_else(|| anyhow::anyhow!("--shapes: `{s}` is not OUTxIN"))?;
        let w0 = Mat::from_fn(o, i, |_, _| normal());
        let z = Mat::from_fn(tokens, i, |_, _| normal());
        let mix = Mat::from_fn(i, i, |a, b| {
            if a == b {
                1.0
            } else {
                0.1 * normal() / (i as f64).sqrt()
            }
        });
        let x = &z * &mix;
        let h = x.transpose() * &x;
        for method in [
            SparseMethod::Magnitude,
            SparseMethod::Wanda,
            SparseMethod::SparseGpt,
            SparseMethod::Alps,
        ] {
            let settings = SparseSettings::default();
            let t = Instant::now();
            let (w, iters, factor_s) = if method == SparseMethod::Alps {
                // The factorisation (eigen-decomposition) once, then the iterations.
                let f = lopper_sparse::solve::AlpsFactor::new(&h, settings.alps.damp)?;
                let factor_s = t.elapsed().as_secs_f64();
                let (w, tr) =
                    lopper_sparse::solve::alps_factored(&w0, &f, pattern, &settings.alps)?;
                (w, tr.iterations, factor_s)
            } else {
                let (w, iters) = lopper_sparse::prune_matrix(&w0, &h, method, pattern, &settings)?;
                (w, iters, 0.0)
            };
            let secs = t.elapsed().as_secs_f64();
            let (fac, per, floor) = if iters > 0 {
                // The floor of one iteration: its two in x in x out products alone.
                let (a, b) = (
                    Mat::<f64>::from_fn(i, i, |_, _| normal()),
                    Mat::<f64>::zeros(i, o),
                );
                let t = Instant::now();
                let c = &a * &b;
                let c = &a * &c;
                let floor = t.elapsed().as_secs_f64();
                std::hint::black_box(c);
                (
                    format!("{factor_s:.3}"),
                    format!("{:.1}", 1e3 * (secs - factor_s) / iters as f64),
                    format!("{:.1}", 1e3 * floor),
                )
            } else {
                ("–".into(), "–".into(), "–".into())
            };
            println!(
                "| {o}x{i} | {method:?} | {secs:.3} | {fac} | {iters} | {per} | {floor} | {:.5} |",
                lopper_sparse::solve::relative_error(&w, &w0, &h)
            );
        }
    }
    Ok(())
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Solvers {
            shapes,
            tokens,
            pattern,
            sparsity,
        } => bench_solvers(&shapes, tokens, &pattern, sparsity),
        BenchCmd::Forward {
            model,
            dtype,
            shapes,
            runs,
            warmup,
            device,
            vs_torch,
            portable,
            rounds,
            backward,
        } => {
            let shapes = parse_shapes(&shapes)?;
            anyhow::ensure!(
                runs > 0 && rounds > 0,
                "--runs and --rounds must be at least 1"
            );
            if let Some(py) = &vs_torch {
                check_torch(py)?;
            }
            run_on(
                device,
                ForwardBench {
                    model,
                    dtype,
                    shapes,
                    runs,
                    warmup,
                    vs_torch,
                    portable,
                    rounds,
                    backward,
                },
            )
        }
        BenchCmd::Matmul { shapes, runs } => bench_matmul(&shapes, runs),
        BenchCmd::Pruned {
            model,
            dtype,
            sparsity,
            shapes,
            runs,
            seed,
            device,
        } => {
            let sparsities = parse_sparsities(&sparsity)?;
            let shapes = parse_shapes(&shapes)?;
            anyhow::ensure!(runs > 0, "--runs must be at least 1");
            run_on(
                device,
                PrunedBench {
                    model,
                    dtype,
                    sparsities,
                    shapes,
                    runs,
                    seed,
                },
            )
        }
        BenchCmd::Sleb {
            model,
            dtype,
            sparsity,
            windows,
            seq_len,
            batch_size,
            device,
        } => {
            lopper_core::check_keep(1.0 - sparsity)?;
            anyhow::ensure!(
                windows > 0 && batch_size > 0 && seq_len > 1,
                "--windows and --batch-size must be >= 1 and --seq-len >= 2"
            );
            run_on(
                device,
                SlebBench {
                    model,
                    dtype,
                    sparsity,
                    windows,
                    seq_len,
                    batch_size,
                },
            )
        }
        BenchCmd::PgGradient(args) => {
            let device = args.device;
            run_on(device, args.check()?)
        }
        BenchCmd::PgStep {
            model,
            dtype,
            sparsity,
            batch_size,
            seq_len,
            samples_per_step,
            runs,
            device,
        } => {
            let sparsities = parse_sparsities(&sparsity)?;
            anyhow::ensure!(
                runs > 0 && batch_size > 0 && seq_len > 1 && samples_per_step > 0,
                "--runs, --batch-size, --samples-per-step must be >= 1 and --seq-len >= 2"
            );
            run_on(
                device,
                PgStepBench {
                    model,
                    dtype,
                    sparsities,
                    batch_size,
                    seq_len,
                    samples_per_step,
                    runs,
                },
            )
        }
    }
}

fn parse_sparsities(s: &str) -> Result<Vec<f64>> {
    let v = s
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<f64>()
                .context("--sparsity takes numbers like 0.5")
        })
        .collect::<Result<Vec<f64>>>()?;
    anyhow::ensure!(
        v.iter().all(|s| (0.0..1.0).contains(s)),
        "--sparsity values must lie in [0, 1)"
    );
    Ok(v)
}

fn parse_shapes(s: &str) -> Result<Vec<(usize, usize)>> {
    s.split(',')
        .map(|s| {
            let (b, t) = s.trim().split_once('x').context("shapes look like 8x128")?;
            Ok((b.parse()?, t.parse()?))
        })
        .collect::<Result<Vec<(usize, usize)>>>()
        .context("parsing --shapes")
}

/// Median seconds of `runs` forwards (after one warm-up) of `model` on a `batch x seq` input.
fn time_forward<B: Backend>(
    model: &Llama<B>,
    device: &B::Device,
    batch: usize,
    seq: usize,
    runs: usize,
) -> Result<f64> {
    let vocab = model.shape().vocab_size;
    let ids: Vec<Vec<u32>> = (0..batch)
        .map(|b| {
            (0..seq)
                .map(|t| ((b * 7919 + t * 104_729) % vocab) as u32)
                .collect()
        })
        .collect();
    let tokens = model.tokens(&ids)?;
    let mut times = Vec::new();
    for i in 0..=runs {
        let t = time_once::<B>(device, || {
            let _ = model.forward(tokens.clone()).narrow(2, 0, 1).into_data();
        });
        if i > 0 {
            times.push(t);
        }
    }
    Ok(median(times))
}

struct PrunedBench {
    model: String,
    dtype: lopper_core::Dtype,
    sparsities: Vec<f64>,
    shapes: Vec<(usize, usize)>,
    runs: usize,
    seed: u64,
}

impl Job for PrunedBench {
    fn run<B: Backend>(self, device: B::Device, device_name: String) -> Result<()> {
        use lopper_core::{UnitScores, keep_count};
        use rand::{Rng, SeedableRng};
        let loaded = crate::loading::load_model::<B>(&self.model, self.dtype, &device)?;
        let dense = &loaded.model;
        let shape = dense.shape().clone();
        crate::guard::bench_shapes(&shape, &self.shapes)?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed);
        // Plans: uniform (per-layer top-k of a constant score = the first units) and random
        // heterogeneous (global random scores, global top-k per type).
        let mut plans = Vec::new();
        for &s in &self.sparsities {
            let keep = 1.0 - s;
            let flat = UnitScores {
                method: "uniform".into(),
                kv_groups: shape
                    .layers
                    .iter()
                    .map(|l| vec![1.0; l.n_kv_heads])
                    .collect(),
                channels: shape
                    .layers
                    .iter()
                    .map(|l| vec![1.0; l.ffn_hidden])
                    .collect(),
            };
            plans.push(("uniform", s, flat.plan_per_layer(&shape, keep)?));
            let mut global =
                |n_per: &dyn Fn(&lopper_core::LayerShape) -> usize| -> Vec<Vec<usize>> {
                    let all: Vec<(usize, usize)> = shape
                        .layers
                        .iter()
                        .enumerate()
                        .flat_map(|(l, ls)| (0..n_per(ls)).map(move |i| (l, i)))
                        .collect();
                    let scores: Vec<f64> = all.iter().map(|_| rng.random::<f64>()).collect();
                    let mut kept = vec![Vec::new(); shape.n_layers()];
                    for i in lopper_core::top_k(&scores, keep_count(keep, all.len())) {
                        kept[all[i].0].push(all[i].1);
                    }
                    kept
                };
            let groups = global(&|l| l.n_kv_heads);
            let channels = global(&|l| l.ffn_hidden);
            let mut plan = lopper_core::MaskPlan::keep_all(&shape);
            for (l, lp) in plan.layers.iter_mut().enumerate() {
                lp.kv_groups = groups[l].clone();
                lp.channels = channels[l].clone();
            }
            plan.validate()?;
            plans.push(("random heterogeneous", s, plan));
        }
        let bar = crate::progress::bar(
            ((plans.len() + 1) * self.shapes.len()) as u64,
            "{msg} [{bar:30}] {pos}/{len}, eta {eta}",
        )?;
        bar.set_message("dense");
        let mut dense_t = Vec::new();
        crate::progress::reset_peak_rss();
        for &(b, t) in &self.shapes {
            dense_t.push(time_forward(dense, &device, b, t, self.runs)?);
            bar.inc(1);
        }
        let dense_peak = crate::progress::peak_rss_mib();
        let mut rows = Vec::new();
        for (kind, s, plan) in &plans {
            bar.set_message(format!("{kind} {s}"));
            let small = lopper_surgery::prune(dense, plan)?;
            let mut t = Vec::new();
            crate::progress::reset_peak_rss();
            for &(b, q) in &self.shapes {
                t.push(time_forward(&small, &device, b, q, self.runs)?);
                bar.inc(1);
            }
            rows.push((
                kind,
                s,
                small.shape().clone(),
                t,
                crate::progress::peak_rss_mib(),
            ));
        }
        bar.finish_and_clear();
        println!(
            "pruned-model benchmark: {} on {device_name}; median of {} runs after 1 warm-up; speedup = dense time / pruned time in this run",
            loaded.info.spec, self.runs
        );
        let shape_cols: Vec<String> = self
            .shapes
            .iter()
            .map(|(b, t)| format!("{b}x{t} tok/s | speedup"))
            .collect();
        println!(
            "| plan | sparsity | params | weights MiB ({}) | peak RSS MiB | FLOPs/token ratio | {} | speedup / FLOP reduction ({}x{}) |",
            self.dtype,
            shape_cols.join(" | "),
            self.shapes[0].0,
            self.shapes[0].1
        );
        println!(
            "|---|---:|---:|---:|---:|---:|{}---:|",
            "---:|---:|".repeat(self.shapes.len())
        );
        let ctx = self.shapes[0].1;
        let fl = |s: &lopper_core::ModelShape| s.flops_per_token(ctx) as f64;
        let tps = |i: usize, secs: f64| (self.shapes[i].0 * self.shapes[i].1) as f64 / secs;
        let cells = |t: &[f64]| -> String {
            t.iter()
                .enumerate()
                .map(|(i, &x)| format!("{:.0} | {:.2}", tps(i, x), dense_t[i] / x))
                .collect::<Vec<_>>()
                .join(" | ")
        };
        let mib = |v: Option<f64>| v.map_or("n/a".to_string(), |m| format!("{m:.0}"));
        println!(
            "| dense | 0 | {} | {:.0} | {} | 1.000 | {} | 1.00 |",
            shape.num_params(),
            (shape.num_params() * self.dtype.bytes()) as f64 / 1048576.0,
            mib(dense_peak),
            cells(&dense_t)
        );
        for (kind, s, sh, t, peak) in rows {
            let ratio = fl(&sh) / fl(&shape);
            let speedup = dense_t[0] / t[0];
            println!(
                "| {kind} | {s} | {} | {:.0} | {} | {ratio:.3} | {} | {:.2} |",
                sh.num_params(),
                (sh.num_params() * self.dtype.bytes()) as f64 / 1048576.0,
                mib(peak),
                cells(&t),
                speedup * ratio
            );
        }
        println!(
            "\npeak RSS: the process's peak resident memory while that row's forwards ran (host memory; the dense model stays resident throughout, so pruned rows include it)"
        );
        Ok(())
    }
}

struct PgStepBench {
    model: String,
    dtype: lopper_core::Dtype,
    sparsities: Vec<f64>,
    batch_size: usize,
    seq_len: usize,
    samples_per_step: usize,
    runs: usize,
}

impl Job for PgStepBench {
    fn run<B: Backend>(self, device: B::Device, device_name: String) -> Result<()> {
        use lopper_core::UnitKind;
        use lopper_policy::{Init, PgConfig, PgState, UnitSpace};
        let loaded = crate::loading::load_model::<B>(&self.model, self.dtype, &device)?;
        let model = &loaded.model;
        crate::guard::bench_shapes(model.shape(), &[(self.batch_size, self.seq_len)])?;
        let vocab = model.shape().vocab_size as u64;
        let rows: Vec<Vec<u32>> = (0..self.batch_size as u64)
            .map(|r| {
                (0..self.seq_len as u64)
                    .map(|t| ((t * 7919 + r * 104_729 + 13) % vocab) as u32)
                    .collect()
            })
            .collect();
        let tokens = model.tokens(&rows)?;
        let space = UnitSpace::new(model.shape(), &[UnitKind::KvGroup, UnitKind::Channel])?;
        let k = self.samples_per_step;
        // One step's forward work: K losses (the estimator and projection are host-side and tiny).
        let step = |plans: &[lopper_core::MaskPlan], sliced: bool| -> Result<f64> {
            let mut total = 0.0;
            for p in plans {
                total += if sliced {
                    lopper_surgery::mean_loss_kept(model, p, None, tokens.clone())?
                } else {
                    let masks = lopper_model::Masks::from_plan(p, &device)?;
                    model.mean_loss(tokens.clone(), Some(&masks))?
                };
            }
            Ok(total)
        };
        let time = |plans: &[lopper_core::MaskPlan], sliced: bool| -> Result<f64> {
            step(plans, sliced)?; // warm-up
            let mut t = Vec::new();
            for _ in 0..self.runs {
                let start = Instant::now();
                step(plans, sliced)?;
                B::sync(&device)?;
                t.push(start.elapsed().as_secs_f64());
            }
            Ok(median(t))
        };
        let dense_plans = vec![lopper_core::MaskPlan::keep_all(model.shape()); k];
        let dense = time(&dense_plans, true)?;
        println!(
            "pg step on {device_name}: {} masks x {}x{} tokens, median of {} steps",
            k, self.batch_size, self.seq_len, self.runs
        );
        println!(
            "| sparsity | kept params | step (sliced) s | vs dense | step (masked, no slicing) s | vs dense |"
        );
        println!("|---:|---:|---:|---:|---:|---:|");
        println!("| 0 (dense) | 1.000 | {dense:.3} | 1.00 | {dense:.3} | 1.00 |");
        for &s in &self.sparsities {
            if s == 0.0 {
                continue;
            }
            let cfg = PgConfig {
                units: vec![UnitKind::KvGroup, UnitKind::Channel],
                steps: 1,
                samples_per_step: k,
                batch_size: self.batch_size,
                seed: 1,
                ..PgConfig::reference(s)
            };
            let mut state = PgState::new(cfg, &space, &Init::Uniform)?;
            let plans: Vec<_> = (0..k).map(|_| space.plan_of(&state.sample())).collect();
            let kept = plans.iter().map(|p| p.kept_param_ratio()).sum::<f64>() / k as f64;
            let sliced = time(&plans, true)?;
            let masked = time(&plans, false)?;
            println!(
                "| {s} | {kept:.3} | {sliced:.3} | {:.2} | {masked:.3} | {:.2} |",
                sliced / dense,
                masked / dense
            );
        }
        Ok(())
    }
}

struct ForwardBench {
    model: String,
    dtype: lopper_core::Dtype,
    shapes: Vec<(usize, usize)>,
    runs: usize,
    warmup: usize,
    vs_torch: Option<String>,
    portable: bool,
    rounds: usize,
    backward: bool,
}

/// The reference timing script, from the checkout this xtask was built in.
fn torch_script() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("scripts")
        .join("bench_torch.py")
}

/// Refuses a Python that cannot run the reference before any timing starts.
fn check_torch(python: &str) -> Result<()> {
    let out = std::process::Command::new(python)
        .args(["-c", "import torch, numpy, gguf; print(torch.__version__)"])
        .output()
        .with_context(|| format!("cannot run `{python}` (--vs-torch names a Python executable)"))?;
    anyhow::ensure!(
        out.status.success(),
        "`{python}` cannot import torch, numpy and gguf: {}\nmake one with `python3 -m venv /tmp/torch && /tmp/torch/bin/pip install torch numpy gguf`",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// PyTorch's median seconds per shape over `runs` runs, from one run of the reference script.
fn torch_times(
    python: &str,
    gguf: &std::path::Path,
    shapes: &[(usize, usize)],
    runs: usize,
    warmup: usize,
    backward: bool,
    dtype: lopper_core::Dtype,
) -> Result<Vec<f64>> {
    let shapes_arg: Vec<String> = shapes.iter().map(|(b, s)| format!("{b}x{s}")).collect();
    let out = std::process::Command::new(python)
        .arg(torch_script())
        .arg(gguf)
        .args(["--threads", &crate::backend::threads().to_string()])
        .args(["--shapes", &shapes_arg.join(",")])
        .args([
            "--runs",
            &runs.to_string(),
            "--warmup",
            &warmup.to_string(),
            "--json",
        ])
        .args(["--dtype", dtype.name()])
        .args(if backward {
            vec![
                "--backward".to_string(),
                "--chunk".into(),
                lopper_importance::gradient::WINDOWS_PER_BACKWARD.to_string(),
            ]
        } else {
            vec![]
        })
        .output()
        .with_context(|| format!("running {}", torch_script().display()))?;
    anyhow::ensure!(
        out.status.success(),
        "the PyTorch reference failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("the PyTorch reference printed no JSON line")?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    let secs = v["seconds"]
        .as_array()
        .context("no `seconds` in the PyTorch reference's output")?
        .iter()
        .map(|x| x.as_f64().context("a non-number in `seconds`"))
        .collect::<Result<Vec<f64>>>()?;
    anyhow::ensure!(
        secs.len() == shapes.len(),
        "PyTorch timed {} shapes, expected {}",
        secs.len(),
        shapes.len()
    );
    Ok(secs)
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
        let loaded = crate::loading::load_model::<B>(&self.model, self.dtype, &device)?;
        let model: &Llama<B> = &loaded.model;
        let shape = model.shape().clone();
        crate::guard::bench_shapes(&shape, &self.shapes)?;
        let gguf = match &self.vs_torch {
            None => None,
            Some(_) if loaded.info.format == "gguf" => Some(loaded.info.path.clone()),
            Some(_) => anyhow::bail!(
                "--vs-torch reads the model from a GGUF file; {} is {}",
                loaded.info.path.display(),
                loaded.info.format
            ),
        };
        let per_round = self.shapes.len() * (self.runs + self.warmup);
        let lopper_blocks = 1 + usize::from(self.portable);
        let bar = crate::progress::bar(
            (self.rounds * lopper_blocks * per_round) as u64,
            "{msg} [{bar:30}] {pos}/{len} runs, eta {eta}",
        )?;
        // Deterministic pseudo-text: ids spread over the vocabulary (the same ids as the PyTorch
        // reference).
        let rows: Vec<Vec<Vec<u32>>> = self
            .shapes
            .iter()
            .map(|&(batch, seq)| {
                (0..batch)
                    .map(|b| {
                        (0..seq)
                            .map(|t| ((b * 7919 + t * 104_729) % shape.vocab_size) as u32)
                            .collect()
                    })
                    .collect()
            })
            .collect();
        let inputs = rows
            .iter()
            .map(|ids| model.tokens(ids))
            .collect::<lopper_model::Result<Vec<_>>>()?;
        // The backward pass differentiates a copy on the autodiff backend, made once.
        let ad = if self.backward {
            Some(lopper_importance::gradient::autodiff_copy(model, true)?)
        } else {
            None
        };
        let time_block = |label: &str, times: &mut [Vec<f64>]| -> Result<()> {
            for (i, tokens) in inputs.iter().enumerate() {
                let (batch, seq) = self.shapes[i];
                bar.set_message(format!("{label} {batch}x{seq}"));
                for r in 0..self.warmup + self.runs {
                    let mut failed = None;
                    let t = time_once::<B>(&device, || match &ad {
                        Some(ad) => {
                            if let Err(e) =
                                lopper_importance::gradient::linear_grads(ad, &rows[i], None)
                            {
                                failed = Some(e);
                            }
                        }
                        None => {
                            let logits = model.forward(tokens.clone());
                            // Read one value back so lazy backends really finish.
                            let _ = logits.narrow(2, 0, 1).into_data();
                        }
                    });
                    if let Some(e) = failed {
                        return Err(e.into());
                    }
                    if r >= self.warmup {
                        times[i].push(t);
                    }
                    bar.inc(1);
                }
            }
            Ok(())
        };
        let n = self.shapes.len();
        let (mut ours, mut portable, mut torch) =
            (vec![vec![]; n], vec![vec![]; n], vec![vec![]; n]);
        for _ in 0..self.rounds {
            time_block("lopper", &mut ours)?;
            if self.portable {
                lopper_kernels::set_blas_enabled(false);
                let r = time_block("portable", &mut portable);
                lopper_kernels::set_blas_enabled(true);
                r?;
            }
            if let (Some(py), Some(g)) = (&self.vs_torch, &gguf) {
                bar.set_message("PyTorch");
                for (i, t) in torch_times(
                    py,
                    g,
                    &self.shapes,
                    self.runs,
                    self.warmup,
                    self.backward,
                    self.dtype,
                )?
                .into_iter()
                .enumerate()
                {
                    torch[i].push(t);
                }
            }
        }
        bar.finish_and_clear();
        if self.backward {
            println!(
                "backward benchmark (loss and its gradient to every decoder linear weight, {} windows per pass; GFLOP/s counts twice the forward plus the linears' weight gradients): {} on {device_name}",
                lopper_importance::gradient::WINDOWS_PER_BACKWARD,
                loaded.info.spec
            );
        } else {
            println!(
                "forward benchmark: {}, weights in {} (PyTorch: the whole model in it), on {device_name}",
                loaded.info.spec, self.dtype
            );
        }
        println!(
            "median of {} rounds x {} runs after {} warm-up; PyTorch: the median of its per-round medians\n",
            self.rounds, self.runs, self.warmup
        );
        let mut head = "| batch x seq | seconds | tokens/s | GFLOP/s |".to_string();
        let mut rule = "|---|---:|---:|---:|".to_string();
        if self.portable {
            head += " portable tokens/s | BLAS / portable |";
            rule += "---:|---:|";
        }
        if self.vs_torch.is_some() {
            head += " PyTorch tokens/s | lopper / PyTorch |";
            rule += "---:|---:|";
        }
        println!("{head}\n{rule}");
        for (i, &(batch, seq)) in self.shapes.iter().enumerate() {
            let med = median(ours[i].clone());
            let tokens_n = (batch * seq) as f64;
            // Causal attention: position p attends over p + 1 positions.
            let per_key = (shape.flops_per_token(1) - shape.flops_per_token(0)) as f64;
            let mut flops = tokens_n * shape.flops_per_token(0) as f64
                + batch as f64 * per_key * (seq * (seq + 1) / 2) as f64;
            if self.backward {
                flops = 2.0 * flops + 2.0 * tokens_n * shape.decoder_linear_params() as f64;
            }
            let mut row = format!(
                "| {batch} x {seq} | {med:.3} | {:.0} | {:.1} |",
                tokens_n / med,
                flops / med / 1e9
            );
            if self.portable {
                let p = median(portable[i].clone());
                row += &format!(" {:.0} | {:.2}x |", tokens_n / p, p / med);
            }
            if self.vs_torch.is_some() {
                let t = median(torch[i].clone());
                row += &format!(" {:.0} | {:.2}x |", tokens_n / t, t / med);
            }
            println!("{row}");
        }
        Ok(())
    }
}

/// GFLOP/s of one product shape on each path.
fn bench_matmul(shapes: &str, runs: usize) -> Result<()> {
    use burn::tensor::{DType, Distribution, Tensor};
    use burn_flex::{Flex, FlexDevice};
    anyhow::ensure!(runs > 0, "--runs must be at least 1");
    let shapes = shapes
        .split(',')
        .map(|s| {
            let d: Vec<usize> = s
                .trim()
                .split('x')
                .map(|v| v.parse::<usize>())
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| anyhow::anyhow!("`{s}`: a shape is MxKxN, e.g. 1024x576x1536"))?;
            anyhow::ensure!(
                d.len() == 3 && d.iter().all(|&v| v > 0),
                "`{s}`: a shape is MxKxN with every size >= 1"
            );
            anyhow::ensure!(
                d[0] * d[1] + d[1] * d[2] + d[0] * d[2] <= 1 << 29,
                "`{s}` needs more than 2 GiB of operands; choose a smaller shape"
            );
            Ok((d[0], d[1], d[2]))
        })
        .collect::<Result<Vec<_>>>()?;
    let device = FlexDevice;
    println!(
        "matrix products, {} threads; BLAS: {}\n",
        crate::backend::threads(),
        lopper_kernels::describe()
    );
    let blas = lopper_kernels::blas().is_some();
    println!(
        "| m x k x n | portable f32 GFLOP/s | BLAS f32 GFLOP/s | BLAS bf16 weight GFLOP/s | BLAS f32 / portable |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (m, k, n) in shapes {
        let a = Tensor::<Flex, 2>::random([m, k], Distribution::Normal(0.0, 1.0), &device);
        let b = Tensor::<Flex, 2>::random([k, n], Distribution::Normal(0.0, 1.0), &device);
        let flops = 2.0 * (m * k * n) as f64;
        let gflops = |f: &dyn Fn()| {
            f();
            let t = median((0..runs).map(|_| time_once::<Flex>(&device, f)).collect());
            flops / t / 1e9
        };
        let portable = gflops(&|| drop(a.clone().matmul(b.clone())));
        let (f32s, bf16s) = if blas {
            // A bf16 model's product: f32 activations times a bf16 weight.
            let bh = b.clone().cast(DType::BF16);
            (
                format!(
                    "{:.1}",
                    gflops(&|| drop(lopper_kernels::matmul(a.clone(), b.clone())))
                ),
                format!(
                    "{:.1}",
                    gflops(&|| drop(lopper_kernels::matmul(a.clone(), bh.clone())))
                ),
            )
        } else {
            ("–".into(), "–".into())
        };
        let ratio = f32s
            .parse::<f64>()
            .map_or("–".into(), |v| format!("{:.2}x", v / portable));
        println!("| {m} x {k} x {n} | {portable:.1} | {f32s} | {bf16s} | {ratio} |");
    }
    Ok(())
}

struct SlebBench {
    model: String,
    dtype: lopper_core::Dtype,
    sparsity: f64,
    windows: usize,
    seq_len: usize,
    batch_size: usize,
}

impl Job for SlebBench {
    fn run<B: Backend>(self, device: B::Device, device_name: String) -> Result<()> {
        let loaded = crate::loading::load_model::<B>(&self.model, self.dtype, &device)?;
        let model = &loaded.model;
        crate::guard::bench_shapes(model.shape(), &[(self.batch_size, self.seq_len)])?;
        let calib = crate::methods::draw_calibration(
            &loaded.tokenizer,
            "c4",
            lopper_data::Sampler::ConcatChunks,
            self.windows,
            self.seq_len,
            0,
        )?;
        let keep = 1.0 - self.sparsity;
        let n = model.shape().n_layers();
        println!(
            "SLEB at sparsity {} on {device_name}: {} windows x {} tokens, batch {}",
            self.sparsity, self.windows, self.seq_len, self.batch_size
        );
        println!("| search | seconds | trials | layers removed | final loss |");
        println!("|---|---:|---:|---|---:|");
        let mut seconds = Vec::new();
        for (name, cached) in [("prefix cache", true), ("from the embeddings", false)] {
            let t = Instant::now();
            let log = |r: &lopper_importance::SlebRound| {
                tracing::info!(layer = r.layer, loss = r.loss, "{name}: removed");
            };
            let (w, b) = (&calib.windows, self.batch_size);
            let rounds = if cached {
                lopper_importance::sleb(model, w, b, keep, 1, log)?
            } else {
                lopper_importance::sleb_uncached(model, w, b, keep, 1, log)?
            };
            let s = t.elapsed().as_secs_f64();
            // Each round tries every remaining layer between the protected first and last.
            let trials: usize = (0..=rounds.len()).map(|r| n.saturating_sub(2 + r)).sum();
            println!(
                "| {name} | {s:.1} | {trials} | {:?} | {:.4} |",
                rounds.iter().map(|r| r.layer).collect::<Vec<_>>(),
                rounds.last().map_or(f64::NAN, |r| r.loss)
            );
            seconds.push(s);
        }
        println!(
            "\nspeedup of the prefix cache: {:.2}x",
            seconds[1] / seconds[0]
        );
        Ok(())
    }
}
