//! What happens to the kept weights when a plan is cut: `--reconstruct none|bias|ls|obs`, one
//! function for prune, export and compare.

use anyhow::{Result, bail};
use burn::tensor::backend::Backend;
use lopper_core::MaskPlan;
use lopper_model::Llama;
use lopper_sparse::{InputRefit, ProjectionReport, ReconSettings};
use lopper_surgery::{BiasSelection, InputMeans};

/// How the cut model's kept weights are set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reconstruct {
    /// The dense weights of the kept units, nothing else.
    None,
    /// FLAP-style bias compensation with the dense model's calibration means, each block's
    /// kept only where it lowers the cut model's calibration loss by more than the windows'
    /// noise (lopper_surgery::select_compensation).
    Bias,
    /// Layer-wise damped least squares of every kept o_proj / down_proj (lopper_sparse::reconstruct).
    Ls,
    /// `ls`, with each layer's removed KV groups and MLP channels chosen by OBS within the
    /// plan's counts.
    Obs,
}

impl Reconstruct {
    /// Whether the cut refits weights by least squares (`ls`, `obs`).
    pub fn refits(self) -> bool {
        matches!(self, Reconstruct::Ls | Reconstruct::Obs)
    }

    /// The input refit of this cut: `asked` (`--refit-inputs`), by default
    /// [`InputRefit::Next`] under `ls` / `obs` and off otherwise; asking for one under a cut
    /// that does not refit by least squares is refused.
    pub fn check_refit_inputs(self, asked: Option<InputRefit>) -> Result<InputRefit> {
        match asked {
            Some(m) if m != InputRefit::Off && !self.refits() => bail!(
                "--refit-inputs {m} refits by least squares: it needs --reconstruct ls or obs, not {self}"
            ),
            Some(m) => Ok(m),
            None if self.refits() => Ok(InputRefit::default()),
            None => Ok(InputRefit::Off),
        }
    }
}

impl std::str::FromStr for Reconstruct {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "none" => Reconstruct::None,
            "bias" => Reconstruct::Bias,
            "ls" => Reconstruct::Ls,
            "obs" => Reconstruct::Obs,
            o => bail!("--reconstruct `{o}`: use none, bias, ls or obs"),
        })
    }
}

impl std::fmt::Display for Reconstruct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reconstruct::None => "none",
            Reconstruct::Bias => "bias",
            Reconstruct::Ls => "ls",
            Reconstruct::Obs => "obs",
        })
    }
}

/// Calibration windows on which `bias` checks each block's compensation against the loss: the
/// last 16 of the calibration set, which a PG search holds out (prune and compare take the
/// means from the first `--metric-samples` windows; export from all of them). On the default model 32 took twice the time (about a minute for LLM-BIP's 60
/// blocks) and did not choose better for WikiText-2 (LLM-BIP at 30%: 209.3 against 204.7).
pub const BIAS_CHECK_WINDOWS: usize = 16;

/// Tokens per window of the calibration `ls` and `obs` fit on, unless `--recon-seq-len` says
/// otherwise (capped by the model's context, never below the calibration's own windows).
/// Measured on the default model (LLM-BIP's 20% plan, the same 32,768 C4 tokens as 256 windows
/// of 128): WikiText-2 126.89 @128 and 63.81 @2048 fit on windows of 128 tokens, 114.07 and
/// 47.19 on windows of 512; see docs/results/reconstruction-smollm2-135m.md.
pub const RECON_SEQ_LEN: usize = 512;

/// The calibration windows `ls` / `obs` fit on, where they differ from the search's: the same
/// number of tokens (`samples x seq_len`) from the same source, sampler and seed, in windows
/// of `recon_seq_len` tokens (default [`RECON_SEQ_LEN`], capped by the model's context), and
/// the batch that keeps a forward pass's tokens at `batch_size x seq_len`. `None` when the
/// windows would be the calibration's own.
#[allow(clippy::too_many_arguments)]
pub fn ls_calibration(
    tok: &lopper_model::Tokenizer,
    shape: &lopper_core::ModelShape,
    calib: &str,
    sampler: lopper_data::Sampler,
    (samples, seq_len, batch_size): (usize, usize, usize),
    seed: u64,
    recon_seq_len: Option<usize>,
) -> Result<Option<(lopper_data::Calibration, usize)>> {
    let len = match recon_seq_len {
        Some(l) => {
            anyhow::ensure!(l >= 2, "--recon-seq-len must be at least 2");
            crate::guard::context(shape, l, "--recon-seq-len", false)?;
            l
        }
        None => RECON_SEQ_LEN
            .min(shape.max_position_embeddings)
            .max(seq_len),
    };
    if len == seq_len {
        return Ok(None);
    }
    let tokens = samples * seq_len;
    let windows = tokens.div_ceil(len).max(1);
    let batch = (batch_size * seq_len / len).max(1);
    crate::guard::forward_fits(shape, batch, len, "the least-squares cut's calibration")?;
    let c = crate::methods::draw_calibration(tok, calib, sampler, windows, len, seed)?;
    Ok(Some((c, batch)))
}

/// A cut model, the per-projection reports of `ls` / `obs`, the choices of `bias`, and under
/// `obs` the plan it was cut by (the plan's counts, OBS's channels).
pub struct Cut<B: Backend> {
    pub model: Llama<B>,
    pub reports: Option<Vec<ProjectionReport>>,
    pub bias: Option<BiasSelection>,
    pub chosen: Option<MaskPlan>,
}

impl<B: Backend> Cut<B> {
    /// Writes what the cut decided next to the model: `reconstruction.json` (ls / obs) or
    /// `bias-compensation.json` (bias).
    pub fn write_reports(&self, dir: &std::path::Path) -> Result<()> {
        if let Some(r) = &self.reports {
            crate::prune::write_json(&dir.join("reconstruction.json"), r)?;
        }
        if let Some(b) = &self.bias {
            crate::prune::write_json(&dir.join("bias-compensation.json"), b)?;
        }
        Ok(())
    }

    /// Records OBS's channels in `plan` (its metadata kept).
    pub fn update(&self, plan: &mut MaskPlan) {
        if let Some(c) = &self.chosen {
            plan.layers = c.layers.clone();
        }
    }
}

/// The model `plan` cuts from `model` under `how`. `means` are required by `bias`; `windows`
/// are the calibration windows `ls` and `obs` fit on.
pub fn cut<B: Backend>(
    model: &Llama<B>,
    plan: &MaskPlan,
    how: Reconstruct,
    means: Option<&InputMeans>,
    windows: &[Vec<u32>],
    batch_size: usize,
    refit_inputs: InputRefit,
) -> Result<Cut<B>> {
    let plain = |model| Cut {
        model,
        reports: None,
        bias: None,
        chosen: None,
    };
    Ok(match how {
        Reconstruct::None => plain(lopper_surgery::prune(model, plan)?),
        Reconstruct::Bias => {
            let Some(m) = means else {
                bail!("--reconstruct bias needs the calibration means of the dense model")
            };
            let check = &windows[windows.len().saturating_sub(BIAS_CHECK_WINDOWS)..];
            let bar = crate::progress::bar(
                lopper_surgery::compensated_blocks(model, plan, m)? as u64,
                "bias compensation [{bar:30}] {pos}/{len} blocks checked {msg} eta {eta}",
            )?;
            let (extra, sel) =
                lopper_surgery::select_compensation(model, plan, m, check, batch_size, |c| {
                    bar.inc(1);
                    bar.set_message(format!(
                        "layer {} {}: loss {:.4} with, {:.4} without",
                        c.layer, c.name, c.loss_with, c.loss_without
                    ));
                })?;
            bar.finish_and_clear();
            tracing::info!(
                windows = check.len(),
                kept = sel.blocks.iter().filter(|b| b.kept).count(),
                blocks = sel.blocks.len(),
                loss_flap_rule = sel.loss_all,
                loss_none = sel.loss_none,
                loss_chosen = sel.loss_chosen,
                "bias compensation checked against the calibration loss"
            );
            Cut {
                model: lopper_surgery::prune_with_biases(model, plan, &extra)?,
                reports: None,
                bias: Some(sel),
                chosen: None,
            }
        }
        Reconstruct::Ls | Reconstruct::Obs => {
            let settings = ReconSettings {
                batch_size,
                obs: how == Reconstruct::Obs,
                inputs: refit_inputs,
                ..ReconSettings::default()
            };
            let bar = crate::progress::bar(
                lopper_sparse::projections(plan, &settings) as u64,
                "reconstruct [{bar:30}] {pos}/{len} projections {msg} eta {eta}",
            )?;
            let (m, chosen, reports) = lopper_sparse::reconstruct(
                model,
                plan,
                windows,
                &settings,
                |r| {
                    if let Some(want) = r.tokens_wanted() {
                        tracing::warn!(
                            "layer {} {}: {} calibration tokens for {} kept inputs; least squares may fit the calibration text more than the language (give at least {want} tokens: more calibration windows)",
                            r.layer,
                            r.name,
                            r.tokens,
                            r.inputs
                        );
                    }
                    bar.inc(1);
                    bar.set_message(format!(
                        "layer {} {}: rel. error {:.4} (bias {:.4})",
                        r.layer, r.name, r.rel_error_ls, r.rel_error_bias
                    ));
                },
            )?;
            bar.finish_and_clear();
            Cut {
                model: m,
                reports: Some(reports),
                bias: None,
                chosen: (how == Reconstruct::Obs).then_some(chosen),
            }
        }
    })
}

/// The markdown summary of `ls` / `obs` reports for report.md.
pub fn summary(how: Reconstruct, reports: &[ProjectionReport]) -> String {
    if reports.is_empty() {
        return format!(
            "\nReconstruction ({how}): the plan changes nothing; no projection was refit.\n"
        );
    }
    let mean = |f: &dyn Fn(&ProjectionReport) -> f64| {
        reports.iter().map(f).sum::<f64>() / reports.len() as f64
    };
    let secs: f64 = reports.iter().map(|r| r.seconds).sum();
    let fallback = reports
        .iter()
        .filter(|r| r.chosen == lopper_sparse::Chosen::BiasRefit)
        .count();
    // The dampings used, each with how many projections used it (chosen on held-out batches,
    // or raised where the Gram matrix needed it).
    let mut damps: Vec<(f64, usize)> = Vec::new();
    for r in reports
        .iter()
        .filter(|r| r.chosen == lopper_sparse::Chosen::LeastSquares)
    {
        match damps.iter_mut().find(|(d, _)| *d == r.damp) {
            Some((_, n)) => *n += 1,
            None => damps.push((r.damp, 1)),
        }
    }
    damps.sort_by(|a, b| a.0.total_cmp(&b.0));
    let held_out = reports.iter().any(|r| r.held_out.is_some());
    format!(
        "\nReconstruction ({how}): {} projections refit by damped least squares on {} calibration tokens in {secs:.1} s. Mean relative error of the residual-stream target: {:.4} cut alone, {:.4} with the bias refit, {:.4} with least squares{}{}. Per projection in `reconstruction.json`.\n",
        reports.len(),
        reports[0].tokens,
        mean(&|r| r.rel_error_cut),
        mean(&|r| r.rel_error_bias),
        mean(&|r| r.rel_error_ls),
        if fallback > 0 {
            format!("; {fallback} kept the bias refit (least squares was not better)")
        } else {
            String::new()
        },
        if damps.is_empty() {
            String::new()
        } else {
            format!(
                "; damping{} {}",
                if held_out {
                    " (chosen per projection on held-out calibration batches)"
                } else {
                    ""
                },
                damps
                    .iter()
                    .map(|(d, n)| format!("{d} for {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
    )
}

/// The report's paragraph on `bias`'s choices.
pub fn bias_summary(b: &BiasSelection) -> String {
    format!(
        "\nBias compensation: FLAP's rule, each block's kept only where it lowers the calibration loss by more than {} standard errors ({} windows): kept for {} of {} blocks; mean calibration loss {:.4} (every block compensated: {:.4}; none: {:.4}). Per block in `bias-compensation.json`.\n",
        lopper_surgery::GAIN_Z,
        b.windows,
        b.blocks.iter().filter(|c| c.kept).count(),
        b.blocks.len(),
        b.loss_chosen,
        b.loss_all,
        b.loss_none
    )
}
