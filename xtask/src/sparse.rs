//! `cargo xtask prune --method alps|sparsegpt|wanda|magnitude --pattern ...`: one-shot
//! unstructured / N:M pruning; the model keeps its shape with zeros in it.

use std::time::Instant;

use anyhow::Result;
use burn::tensor::backend::Backend;
use lopper_model::{Llama, Tokenizer};
use lopper_sparse::{LinearReport, Pattern, SparseMethod, SparseSettings};
use lopper_surgery::{ExportFormat, ExportOptions};

use crate::prune::{PruneArgs, write_json};

#[allow(clippy::too_many_arguments)]
pub fn run<B: Backend>(
    a: &PruneArgs,
    model: &Llama<B>,
    tok: &Tokenizer,
    windows: &[Vec<u32>],
    method: SparseMethod,
    pattern: Pattern,
    resolved: &serde_json::Value,
    eval_tasks: Option<&[crate::eval::Task]>,
    device_name: &str,
    started: Instant,
) -> Result<()> {
    let t = Instant::now();
    let (pruned, reports) = solve(
        model,
        windows,
        method,
        pattern,
        a.batch_size.unwrap_or(4),
        &a.out.join("sparsity.json"),
        resolved,
    )?;
    let solve_seconds = t.elapsed().as_secs_f64();
    let (overall, mean_err) = summary(&reports);
    lopper_surgery::export(
        &pruned,
        tok,
        None,
        &ExportOptions {
            format: ExportFormat::Hf,
            force: true,
            provenance: resolved.clone(),
        },
        &a.out.join("model"),
    )?;
    let mut report = format!(
        "# lopper prune: {} ({}) at sparsity {:.4}\n\nCommand: `{}`\n\nOverall sparsity of the decoder linears: {overall:.4}; solve time {solve_seconds:.1} s on {device_name}.\n\n",
        a.method,
        match pattern {
            Pattern::Unstructured(_) => "unstructured".to_string(),
            Pattern::NM { n, m } => format!("{n}:{m}"),
        },
        pattern.sparsity(),
        resolved["command"].as_str().unwrap_or(""),
    );
    report += "| layer | linear | shape | sparsity | rel. reconstruction error | seconds |\n|---:|---|---|---:|---:|---:|\n";
    for r in &reports {
        report += &row(r);
    }
    if let Some(tasks) = eval_tasks {
        crate::eval::eval_into_report(
            &pruned,
            tok,
            tasks,
            &crate::eval::EvalSettings::for_report(a.eval_limit, a.allow_longer_context),
            &a.out.join("eval.json"),
            serde_json::json!({"sparsity": "sparsity.json"}),
            device_name,
            &mut report,
        )?;
    }
    report += &format!(
        "\nWall time: {:.1} s{}.\n",
        started.elapsed().as_secs_f64(),
        crate::progress::peak_rss_note()
    );
    lopper_core::write_atomic(&a.out.join("report.md"), report.as_bytes())?;
    println!(
        "{}: {overall:.4} of the decoder linear weights are zero; mean relative reconstruction error {:.4}; model in {}",
        a.method,
        mean_err,
        a.out.join("model").display()
    );
    Ok(())
}

/// Solves every decoder linear with a progress bar and writes `sparsity_json` (per-linear
/// sparsity, relative reconstruction error and seconds; overall sparsity; `resolved` settings).
pub fn solve<B: Backend>(
    model: &Llama<B>,
    windows: &[Vec<u32>],
    method: SparseMethod,
    pattern: Pattern,
    batch_size: usize,
    sparsity_json: &std::path::Path,
    resolved: &serde_json::Value,
) -> Result<(Llama<B>, Vec<LinearReport>)> {
    let n_linears = model
        .shape()
        .layers
        .iter()
        .map(|l| 4 * usize::from(l.has_attn()) + 3 * usize::from(l.has_mlp()))
        .sum::<usize>();
    let bar = crate::progress::bar(
        n_linears as u64,
        "one-shot [{bar:30}] {pos}/{len} linears {msg} eta {eta}",
    )?;
    let settings = SparseSettings {
        batch_size,
        ..SparseSettings::default()
    };
    let t = Instant::now();
    let (pruned, reports) =
        lopper_sparse::prune_model(model, windows, method, pattern, &settings, |r| {
            bar.inc(1);
            bar.set_message(format!(
                "layer {} {} err {:.4}",
                r.layer, r.name, r.rel_error
            ));
        })?;
    bar.finish_and_clear();
    let (overall, _) = summary(&reports);
    write_json(
        sparsity_json,
        &serde_json::json!({
            "method": method, "pattern": pattern, "overall_sparsity": overall,
            "solve_seconds": t.elapsed().as_secs_f64(), "linears": reports, "resolved": resolved,
        }),
    )?;
    Ok((pruned, reports))
}

/// Overall sparsity of the decoder linears (weighted by size) and their mean relative error.
pub fn summary(reports: &[LinearReport]) -> (f64, f64) {
    let (zeros, total) = reports.iter().fold((0.0, 0.0), |(z, n), r| {
        let size = (r.shape[0] * r.shape[1]) as f64;
        (z + r.sparsity * size, n + size)
    });
    let err = reports.iter().map(|r| r.rel_error).sum::<f64>() / reports.len().max(1) as f64;
    (zeros / total.max(1.0), err)
}

fn row(r: &LinearReport) -> String {
    format!(
        "| {} | {} | {}x{} | {:.4} | {:.5} | {:.2} |\n",
        r.layer, r.name, r.shape[0], r.shape[1], r.sparsity, r.rel_error, r.seconds
    )
}
