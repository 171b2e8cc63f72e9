//! What happens to the kept weights when a plan is cut: `--reconstruct none|bias|ls`, one
//! function for prune, export and compare.

use anyhow::{Result, bail};
use burn::tensor::backend::Backend;
use lopper_core::MaskPlan;
use lopper_model::Llama;
use lopper_sparse::{ProjectionReport, ReconSettings};
use lopper_surgery::InputMeans;

/// How the cut model's kept weights are set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reconstruct {
    /// The dense weights of the kept units, nothing else.
    None,
    /// FLAP-style bias compensation with the dense model's calibration means.
    Bias,
    /// Layer-wise damped least squares of every kept o_proj / down_proj (lopper_sparse::reconstruct).
    Ls,
}

impl std::str::FromStr for Reconstruct {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "none" => Reconstruct::None,
            "bias" => Reconstruct::Bias,
            "ls" => Reconstruct::Ls,
            "obs" => bail!(
                "--reconstruct obs (OBS choice of the removed units) is not implemented; use none, bias or ls"
            ),
            o => bail!("--reconstruct `{o}`: use none, bias or ls"),
        })
    }
}

impl std::fmt::Display for Reconstruct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reconstruct::None => "none",
            Reconstruct::Bias => "bias",
            Reconstruct::Ls => "ls",
        })
    }
}

/// The model `plan` cuts from `model` under `how`, and the per-projection reports of `ls`.
/// `means` are required by `bias`; `windows` are the calibration windows `ls` fits on.
pub fn cut<B: Backend>(
    model: &Llama<B>,
    plan: &MaskPlan,
    how: Reconstruct,
    means: Option<&InputMeans>,
    windows: &[Vec<u32>],
    batch_size: usize,
) -> Result<(Llama<B>, Option<Vec<ProjectionReport>>)> {
    Ok(match how {
        Reconstruct::None => (lopper_surgery::prune(model, plan)?, None),
        Reconstruct::Bias => {
            let Some(m) = means else {
                bail!("--reconstruct bias needs the calibration means of the dense model")
            };
            (lopper_surgery::prune_compensated(model, plan, m)?, None)
        }
        Reconstruct::Ls => {
            let bar = crate::progress::bar(
                lopper_sparse::refits(plan)
                    .iter()
                    .map(|&(o, d)| u64::from(o) + u64::from(d))
                    .sum(),
                "reconstruct [{bar:30}] {pos}/{len} projections {msg} eta {eta}",
            )?;
            let (m, reports) = lopper_sparse::reconstruct(
                model,
                plan,
                windows,
                &ReconSettings {
                    batch_size,
                    ..ReconSettings::default()
                },
                |r| {
                    bar.inc(1);
                    bar.set_message(format!(
                        "layer {} {}: rel. error {:.4} (bias {:.4})",
                        r.layer, r.name, r.rel_error_ls, r.rel_error_bias
                    ));
                },
            )?;
            bar.finish_and_clear();
            (m, Some(reports))
        }
    })
}

/// The markdown summary of `ls` reports for report.md.
pub fn summary(reports: &[ProjectionReport]) -> String {
    if reports.is_empty() {
        return "\nReconstruction (ls): the plan changes nothing; no projection was refit.\n"
            .into();
    }
    let mean = |f: &dyn Fn(&ProjectionReport) -> f64| {
        reports.iter().map(f).sum::<f64>() / reports.len() as f64
    };
    let secs: f64 = reports.iter().map(|r| r.seconds).sum();
    let fallback = reports
        .iter()
        .filter(|r| r.chosen == lopper_sparse::Chosen::BiasRefit)
        .count();
    let raised = reports.iter().filter(|r| r.damp > 0.01).count();
    format!(
        "\nReconstruction (ls): {} projections refit by damped least squares on {} calibration tokens in {secs:.1} s. Mean relative error of the residual-stream target: {:.4} cut alone, {:.4} with the bias refit, {:.4} with least squares{}{}. Per projection in `reconstruction.json`.\n",
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
        if raised > 0 {
            format!("; {raised} needed more damping than 0.01")
        } else {
            String::new()
        },
    )
}
