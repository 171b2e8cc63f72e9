//! PNG plots of a pruning run (plotters, with an embedded DejaVu Sans so no system font is needed).

use std::path::Path;
use std::sync::Once;

use anyhow::{Result, anyhow};
use lopper_core::MaskPlan;
use lopper_policy::StepRecord;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::types::RangedCoordf64;
use plotters::element::DashedPathElement;
use plotters::prelude::*;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

fn font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Renders with `draw` into `path` (through a temporary file and a rename).
fn render(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend, plotters::coord::Shift>) -> Result<()>,
) -> Result<()> {
    font();
    let tmp = path.with_extension("tmp.png");
    {
        let root = BitMapBackend::new(&tmp, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        draw(&root)?;
        root.present()
            .map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}

type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A captioned chart with labelled axes over `(x, y)` ranges.
fn axes<'a, 'b>(
    root: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
    caption: String,
    (x, y): (std::ops::Range<f64>, std::ops::Range<f64>),
    (x_desc, y_desc): (&str, &str),
    x_integer: bool,
) -> Result<Chart<'a, 'b>> {
    let n_x = (x.end - x.start).round() as usize;
    let mut chart = ChartBuilder::on(root)
        .caption(caption, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x, y)
        .map_err(|e| anyhow!("{e}"))?;
    let int_label = |v: &f64| {
        if (v - v.round()).abs() < 1e-6 {
            format!("{}", v.round() as i64)
        } else {
            String::new()
        }
    };
    let mut mesh = chart.configure_mesh();
    if x_integer {
        // One tick per integer (at most ~32 labels), no fractional labels.
        mesh.x_labels(n_x.clamp(2, 32) + 1)
            .x_label_formatter(&int_label);
    }
    mesh.x_desc(x_desc)
        .y_desc(y_desc)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    Ok(chart)
}

/// The series legend, framed on a translucent white box.
fn legend<'a, 'b: 'a, Y: Ranged<ValueType = f64>>(
    chart: &mut ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, Y>>,
    position: SeriesLabelPosition,
) -> Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow!("{e}"))
}

/// Sampled-mask loss (each step, and its 20-step moving average) and the baseline over steps.
pub fn loss_curve(path: &Path, curve: &[StepRecord]) -> Result<()> {
    let pts: Vec<(f64, f64, f64)> = curve
        .iter()
        .filter(|r| r.loss.is_finite())
        .map(|r| (r.step as f64, r.loss, r.baseline))
        .collect();
    if pts.is_empty() {
        return Ok(());
    }
    let lo = pts
        .iter()
        .map(|p| p.1.min(p.2))
        .fold(f64::INFINITY, f64::min);
    let hi = pts
        .iter()
        .map(|p| p.1.max(p.2))
        .fold(f64::NEG_INFINITY, f64::max);
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let last = pts.last().map_or(1.0, |p| p.0).max(1.0);
    render(path, (900, 500), |root| {
        let mut chart = axes(
            root,
            "policy-gradient search: loss of sampled masks".into(),
            (0f64..last, (lo - pad)..(hi + pad)),
            ("step", "loss (nats/token)"),
            true,
        )?;
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.0, p.1)),
                RGBColor(170, 190, 230),
            ))
            .map_err(|e| anyhow!("{e}"))?
            .label("sampled-mask loss")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RGBColor(170, 190, 230)));
        let w = 20usize;
        let avg: Vec<(f64, f64)> = (0..pts.len())
            .map(|i| {
                let s = i.saturating_sub(w - 1);
                let m = pts[s..=i].iter().map(|p| p.1).sum::<f64>() / (i - s + 1) as f64;
                (pts[i].0, m)
            })
            .collect();
        chart
            .draw_series(LineSeries::new(avg, BLUE.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label("loss, 20-step mean")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.0, p.2)),
                RED.stroke_width(2),
            ))
            .map_err(|e| anyhow!("{e}"))?
            .label("baseline")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.stroke_width(2)));
        legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        Ok(())
    })
}

/// Kept fraction of KV groups and of MLP channels in every source layer.
pub fn kept_per_layer(path: &Path, plan: &MaskPlan) -> Result<()> {
    let n = plan.layers.len();
    let frac = |k: usize, t: usize| if t == 0 { 0.0 } else { k as f64 / t as f64 };
    // (layer, kept fraction) of one unit kind, from (kept, total) per layer.
    let series = |count: &dyn Fn(
        &lopper_core::LayerPlan,
        &lopper_core::LayerShape,
    ) -> (usize, usize)|
     -> Vec<(f64, f64)> {
        plan.layers
            .iter()
            .zip(&plan.source.layers)
            .enumerate()
            .map(|(i, (lp, ls))| {
                let (k, t) = count(lp, ls);
                (i as f64, frac(k, t))
            })
            .collect()
    };
    let heads = series(&|lp, ls| (lp.kv_groups.len(), ls.n_kv_heads));
    let chans = series(&|lp, ls| (lp.channels.len(), ls.ffn_hidden));
    render(path, (900, 500), |root| {
        let mut chart = axes(
            root,
            format!(
                "kept per layer (kept parameters {:.3})",
                plan.kept_param_ratio()
            ),
            (-0.5f64..(n as f64 - 0.5), 0f64..1.05),
            ("layer", "kept fraction"),
            true,
        )?;
        for (data, color, label) in [
            (heads, RED, "KV groups (with their query heads)"),
            (chans, BLUE, "MLP channels"),
        ] {
            chart
                .draw_series(LineSeries::new(data.clone(), color.stroke_width(2)))
                .map_err(|e| anyhow!("{e}"))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(data.into_iter().map(|p| Circle::new(p, 3, color.filled())))
                .map_err(|e| anyhow!("{e}"))?;
        }
        legend(&mut chart, SeriesLabelPosition::LowerRight)?;
        Ok(())
    })
}

/// The y range `lo..hi` with its ticks on round values. On a log10 axis (`lo`, `hi` are log10
/// values) the ticks are 1, 2 and 5 times a power of ten (1, 1.5, 2, 3, 5 and 7 where the range
/// spans less than a factor of about 5), with light lines at every integer multiple of a power
/// of ten; on a linear axis, steps of 1, 2 or 5 times a power of ten, about eight of them.
fn y_axis(lo: f64, hi: f64, log_y: bool) -> Ticked {
    let inner = RangedCoordf64::from(lo..hi);
    if !log_y {
        let raw = ((hi - lo) / 8.0).max(f64::MIN_POSITIVE);
        let mag = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 5.0, 10.0]
            .iter()
            .map(|m| m * mag)
            .find(|s| *s >= raw)
            .unwrap_or(10.0 * mag);
        let bold: Vec<f64> = (((lo / step).ceil() as i64)..=((hi / step).floor() as i64))
            .map(|i| i as f64 * step)
            .collect();
        let light = (((lo * 5.0 / step).ceil() as i64)..=((hi * 5.0 / step).floor() as i64))
            .map(|i| i as f64 * step / 5.0)
            .collect();
        return Ticked { inner, bold, light };
    }
    let decades = (lo.floor() as i32)..=(hi.ceil() as i32);
    let at = |mantissas: &[f64]| -> Vec<f64> {
        decades
            .clone()
            .flat_map(|e| mantissas.iter().map(move |m| (m * 10f64.powi(e)).log10()))
            .filter(|v| (lo..=hi).contains(v))
            .collect()
    };
    let mut bold = at(&[1.0, 2.0, 5.0]);
    if bold.len() < 4 {
        bold = at(&[1.0, 1.5, 2.0, 3.0, 5.0, 7.0]);
    }
    let light = at(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]);
    Ticked { inner, bold, light }
}

/// An f64 axis whose labelled (bold) and light grid lines sit where [`y_axis`] put them.
struct Ticked {
    inner: RangedCoordf64,
    bold: Vec<f64>,
    light: Vec<f64>,
}

impl Ranged for Ticked {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.inner.map(value, limit)
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            self.light.clone()
        } else {
            self.bold.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.inner.range()
    }
}

/// One line per named series of `(x, y)` points, with markers; `log_y` draws y on a log10 axis
/// (ticks labelled with the plain values). Series with no finite positive point are skipped.
pub fn series(
    path: &Path,
    caption: &str,
    (x_desc, y_desc): (&str, &str),
    data: &[(String, Vec<(f64, f64)>)],
    log_y: bool,
) -> Result<()> {
    let tr = |y: f64| if log_y { y.log10() } else { y };
    let data: Vec<(&str, Vec<(f64, f64)>)> = data
        .iter()
        .map(|(l, pts)| {
            let pts: Vec<(f64, f64)> = pts
                .iter()
                .filter(|p| p.1.is_finite() && (!log_y || p.1 > 0.0))
                .map(|&(x, y)| (x, tr(y)))
                .collect();
            (l.as_str(), pts)
        })
        .filter(|(_, p)| !p.is_empty())
        .collect();
    if data.is_empty() {
        return Ok(());
    }
    let all = || data.iter().flat_map(|(_, p)| p.iter().copied());
    let (x0, x1) = all().fold((f64::INFINITY, f64::NEG_INFINITY), |a, p| {
        (a.0.min(p.0), a.1.max(p.0))
    });
    let (y0, y1) = all().fold((f64::INFINITY, f64::NEG_INFINITY), |a, p| {
        (a.0.min(p.1), a.1.max(p.1))
    });
    let (xp, yp) = (((x1 - x0) * 0.05).max(0.01), ((y1 - y0) * 0.08).max(0.02));
    let palette = [
        RGBColor(0, 0, 0),
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
    ];
    render(path, (900, 560), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(caption, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((x0 - xp)..(x1 + xp), y_axis(y0 - yp, y1 + yp, log_y))
            .map_err(|e| anyhow!("{e}"))?;
        let fmt = |v: &f64| {
            if log_y {
                // Ticks sit on round values (y_axis); print them without float noise.
                let p = 10f64.powf(*v);
                let digits = if p >= 10.0 { 0 } else { 2 };
                let s = format!("{p:.digits$}");
                if digits > 0 {
                    s.trim_end_matches('0').trim_end_matches('.').to_string()
                } else {
                    s
                }
            } else {
                format!("{v:.3}")
            }
        };
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .y_label_formatter(&fmt)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        // A label `method+cut` (compare's cells) takes its method's colour and its cut's dash,
        // so that the cuts of one method read as one family; `ls` the heaviest line;
        // labels beyond the palette's colours draw their markers as triangles.
        let mut bases: Vec<&str> = Vec::new();
        for (label, pts) in &data {
            let (base, cut) = label.split_once('+').unwrap_or((label, ""));
            let i = bases.iter().position(|b| *b == base).unwrap_or_else(|| {
                bases.push(base);
                bases.len() - 1
            });
            let color = palette[i % palette.len()];
            let (dash, gap) = match cut {
                "bias" => (10, 5),
                "none" => (2, 5),
                "obs" => (6, 2),
                _ => (1000, 0),
            };
            // The refit cut drawn heavier than a method's own (unsuffixed) cut.
            let width = match cut {
                "ls" => 3,
                "" => 1,
                _ => 2,
            };
            let style = color.stroke_width(width);
            chart
                .draw_series(DashedLineSeries::new(pts.clone(), dash, gap, style))
                .map_err(|e| anyhow!("{e}"))?
                .label(*label)
                .legend(move |(x, y)| {
                    DashedPathElement::new([(x, y), (x + 24, y)], dash.min(8), gap.min(5), style)
                });
            if i < palette.len() {
                chart
                    .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                    .map_err(|e| anyhow!("{e}"))?;
            } else {
                chart
                    .draw_series(
                        pts.iter()
                            .map(|&p| TriangleMarker::new(p, 5, color.filled())),
                    )
                    .map_err(|e| anyhow!("{e}"))?;
            }
        }
        legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(ticks: &[f64], log: bool) -> Vec<f64> {
        let round = |v: f64| (v * 1e6).round() / 1e6;
        ticks
            .iter()
            .map(|&t| round(if log { 10f64.powf(t) } else { t }))
            .collect()
    }

    #[test]
    fn axis_ticks_sit_on_round_values() {
        // A narrow log range (under a factor of 7) gets the finer mantissas.
        let a = y_axis(50f64.log10(), 330f64.log10(), true);
        assert_eq!(
            values(&a.bold, true),
            [50.0, 70.0, 100.0, 150.0, 200.0, 300.0]
        );
        assert_eq!(values(&a.light, true)[..3], [50.0, 60.0, 70.0]);
        // A wide one: 1, 2 and 5 times a power of ten.
        let a = y_axis(40f64.log10(), 12000f64.log10(), true);
        let want = [50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0];
        assert_eq!(values(&a.bold, true), want);
        let a = y_axis(0.355, 0.462, false);
        assert_eq!(values(&a.bold, false), [0.36, 0.38, 0.40, 0.42, 0.44, 0.46]);
        assert!(a.light.len() > a.bold.len());
    }
}
