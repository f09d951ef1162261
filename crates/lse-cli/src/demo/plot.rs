//! The chart of `lse demo`: both loss curves, and the largest logit of every step against the
//! dtype's naive-`exp` overflow point.
//!
//! Text is set in DejaVu Sans, embedded in the binary (`assets/DejaVuSans.ttf`; its licence is
//! next to it), so drawing needs no system fonts or fontconfig.

use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

use lse::DType;
use plotters::backend::DrawingBackend;
use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle};

use super::train::{Config, Outcome, RunOutcome};
use crate::error::{CliError, Result};

/// DejaVu Sans 2.37 (Bitstream Vera licence; see `assets/LICENSE-DejaVuSans.txt`).
const FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

/// The chart's size in pixels.
const SIZE: (u32, u32) = (1200, 900);

/// Steps in the trailing mean of the plotted loss.
pub const SMOOTHING: usize = 20;

const NAIVE: RGBColor = RGBColor(214, 39, 40);
const STABLE: RGBColor = RGBColor(31, 119, 180);

/// Registers the embedded font as `sans-serif` (once per process).
fn register() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok =
        *REGISTERED.get_or_init(|| register_font("sans-serif", FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err(CliError::Other(
            "cannot load the embedded chart font".into(),
        ))
    }
}

/// The trailing mean of the last [`SMOOTHING`] losses at every `every`-th step (steps count
/// from 1), as runs of consecutive points: a window holding a non-finite loss has no point and
/// breaks the curve.
fn smoothed(losses: &[f64], every: usize) -> Vec<Vec<(u64, f64)>> {
    let mut segments = vec![Vec::new()];
    let mut sum = 0.0;
    let mut bad = 0usize;
    for (i, &v) in losses.iter().enumerate() {
        if v.is_finite() {
            sum += v;
        } else {
            bad += 1;
        }
        if i >= SMOOTHING {
            let old = losses[i - SMOOTHING];
            if old.is_finite() {
                sum -= old;
            } else {
                bad -= 1;
            }
        }
        let n = (i + 1).min(SMOOTHING);
        if bad > 0 {
            if segments.last().is_some_and(|s| !s.is_empty()) {
                segments.push(Vec::new());
            }
        } else if i % every == 0 || i + 1 == losses.len() {
            if let Some(segment) = segments.last_mut() {
                segment.push((i as u64 + 1, sum / n as f64));
            }
        }
    }
    segments.retain(|s| !s.is_empty());
    segments
}

/// The values 1, 2 and 5 times a power of 10 in `[lo, hi]`: the labels of a log axis.
fn one_two_five(lo: f64, hi: f64) -> Vec<f64> {
    let mut keys = Vec::new();
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi {
        for m in [1.0, 2.0, 5.0] {
            let v = m * decade;
            if (lo..=hi).contains(&v) {
                keys.push(v);
            }
        }
        decade *= 10.0;
    }
    keys
}

/// Every `every`-th finite value of `values`, with its step.
fn thinned(values: &[f64], every: usize) -> Vec<(u64, f64)> {
    values
        .iter()
        .enumerate()
        .filter(|&(i, v)| v.is_finite() && (i % every == 0 || i + 1 == values.len()))
        .map(|(i, &v)| (i as u64 + 1, v))
        .collect()
}

fn draw_error<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> CliError + '_ {
    move |e| CliError::File {
        path: path.to_owned(),
        message: format!("cannot draw the chart: {e}"),
    }
}

/// Draws the chart of `outcome` into the PNG file `path`.
///
/// # Errors
/// [`CliError::File`] when the file cannot be written; [`CliError::Other`] when the embedded
/// font cannot be loaded.
pub fn draw(path: &Path, dtype: DType, config: &Config, outcome: &Outcome) -> Result<()> {
    register()?;
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    let err = draw_error(path);
    root.fill(&WHITE).map_err(&err)?;
    let title = format!(
        "lse demo: {dtype} logits, naive softmax vs lse ({} classes, seed {})",
        config.classes, config.seed
    );
    let root = root.titled(&title, ("sans-serif", 28)).map_err(&err)?;
    let (upper, lower) = root.split_vertically(SIZE.1 * 52 / 100);
    let every = (config.steps as usize / 4000).max(1);
    loss_panel(&upper, dtype, config, outcome, every).map_err(&err)?;
    logit_panel(&lower, dtype, config, outcome, every).map_err(&err)?;
    root.present().map_err(&err)?;
    Ok(())
}

/// The label of a run in the legend.
fn label(run: &RunOutcome, dtype: DType, naive: bool) -> String {
    if naive {
        let end = match &run.first_non_finite {
            Some(f) => format!(", non-finite at step {}", f.step),
            None => String::new(),
        };
        format!("naive: exp(x) / Σ exp(x) in {dtype}{end}")
    } else {
        "lse: cross_entropy_with_grad + LogitMonitor + LossScaler".to_owned()
    }
}

/// A legend entry: a short horizontal line in `style`.
fn legend_line(style: ShapeStyle) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new([(x, y), (x + 30, y)], style)
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
type DrawResult = std::result::Result<
    (),
    DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>,
>;

/// The grid and axis labels of both panels: steps across, `y_desc` up.
fn draw_mesh<X, Y>(
    chart: &mut ChartContext<'_, BitMapBackend<'_>, Cartesian2d<X, Y>>,
    y_desc: impl Into<String>,
) -> DrawResult
where
    X: Ranged<ValueType = u64> + ValueFormatter<u64>,
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(y_desc)
        .y_label_formatter(&|v| format!("{}", (v * 1e6).round() / 1e6))
        .axis_desc_style(("sans-serif", 20))
        .label_style(("sans-serif", 16))
        .light_line_style(WHITE.mix(0.0))
        .draw()
}

/// The legend box of both panels, at `position`.
fn draw_legend<'a, X, Y>(
    chart: &mut ChartContext<'a, BitMapBackend<'a>, Cartesian2d<X, Y>>,
    position: SeriesLabelPosition,
) -> DrawResult
where
    X: Ranged,
    Y: Ranged,
{
    chart
        .configure_series_labels()
        .position(position)
        .label_font(("sans-serif", 18))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
}

fn loss_panel(
    area: &Area<'_>,
    dtype: DType,
    config: &Config,
    o: &Outcome,
    every: usize,
) -> DrawResult {
    let stable = smoothed(&o.stable.losses, every);
    let naive = smoothed(&o.naive.losses, every);
    let values = stable
        .iter()
        .chain(&naive)
        .flatten()
        .map(|p| p.1)
        .filter(|v| *v > 0.0);
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    // Whole decades, so that the log axis gets its 1-2-5 labels.
    let (lo, hi) = if lo <= hi {
        (
            10f64.powf(lo.log10().floor()),
            10f64.powf(hi.log10().ceil()),
        )
    } else {
        (0.01, 10.0)
    };
    let mut chart = ChartBuilder::on(area)
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(
            0..config.steps,
            (lo..hi).log_scale().with_key_points(one_two_five(lo, hi)),
        )?;
    draw_mesh(
        &mut chart,
        format!("loss (mean of {SMOOTHING} steps, log scale)"),
    )?;
    // The lse curve first, the naive one dashed over it: until the naive run fails they are
    // the same curve.
    for (i, segment) in stable.into_iter().enumerate() {
        let series = chart.draw_series(LineSeries::new(segment, STABLE.stroke_width(4)))?;
        if i == 0 {
            series
                .label(label(&o.stable, dtype, false))
                .legend(legend_line(STABLE.stroke_width(3)));
        }
    }
    // The last finite point of the naive curve before its first non-finite step.
    let failed_at = o.naive.first_non_finite.as_ref().map(|f| f.step);
    let before_failure = naive
        .iter()
        .flatten()
        .rfind(|p| failed_at.is_some_and(|s| p.0 < s))
        .copied();
    for (i, segment) in naive.into_iter().enumerate() {
        let series =
            chart.draw_series(DashedLineSeries::new(segment, 8, 5, NAIVE.stroke_width(2)))?;
        if i == 0 {
            series
                .label(label(&o.naive, dtype, true))
                .legend(legend_line(NAIVE.stroke_width(3)));
        }
    }
    if let (Some(f), Some((_, y))) = (&o.naive.first_non_finite, before_failure) {
        chart.draw_series([Cross::new((f.step, y), 10, NAIVE.stroke_width(4))])?;
        let what = if f.loss.is_nan() { "NaN" } else { "inf" };
        // Above the marker, on the side with more room.
        let late = f.step * 10 > config.steps * 6;
        let (anchor, dx) = if late {
            (HPos::Right, -(config.steps as i64) / 100)
        } else {
            (HPos::Left, config.steps as i64 / 100)
        };
        let font = ("sans-serif", 20)
            .into_font()
            .color(&NAIVE)
            .pos(Pos::new(anchor, VPos::Bottom));
        let x = (f.step as i64 + dx).clamp(0, config.steps as i64) as u64;
        chart.draw_series([Text::new(
            format!("naive loss = {what} at step {}", f.step),
            (x, (y * 2.5).min(hi)),
            font,
        )])?;
    }
    draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    Ok(())
}

fn logit_panel(
    area: &Area<'_>,
    dtype: DType,
    config: &Config,
    o: &Outcome,
    every: usize,
) -> DrawResult {
    let threshold = dtype.exp_overflow_threshold();
    let peak = o
        .stable
        .peak_logit()
        .max(o.naive.peak_logit())
        .max(threshold);
    let range: Range<f64> = 0.0..peak * 1.15;
    let mut chart = ChartBuilder::on(area)
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(0..config.steps, range)?;
    draw_mesh(&mut chart, "largest logit of the batch")?;
    for (run, color, name) in [
        (&o.stable, STABLE, "lse run"),
        (&o.naive, NAIVE, "naive run"),
    ] {
        chart
            .draw_series(LineSeries::new(
                thinned(&run.max_logits, every),
                color.stroke_width(1),
            ))?
            .label(name)
            .legend(legend_line(color.stroke_width(3)));
    }
    chart
        .draw_series(DashedLineSeries::new(
            [(0, threshold), (config.steps, threshold)],
            10,
            6,
            BLACK.stroke_width(2),
        ))?
        .label(format!(
            "{threshold:.2} = ln(max {dtype}): a naive {dtype} exp overflows above it"
        ))
        .legend(legend_line(BLACK.stroke_width(2)));
    if let Some(f) = &o.naive.first_non_finite {
        chart.draw_series([Cross::new((f.step, f.max_logit), 10, NAIVE.stroke_width(4))])?;
    }
    draw_legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_skips_windows_with_non_finite_losses() {
        let mut losses = vec![1.0; 30];
        losses[25] = f64::NAN;
        let s = smoothed(&losses, 1);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].len(), 25);
        assert_eq!(s[0][24], (25, 1.0));
        let mut losses = vec![2.0; 50];
        losses[5] = f64::INFINITY;
        let s = smoothed(&losses, 1);
        assert_eq!((s.len(), s[0].len(), s[1][0]), (2, 5, (26, 2.0)));
        assert_eq!(
            one_two_five(0.1, 10.0),
            [0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]
        );
        let t = thinned(&[1.0, f64::INFINITY, 3.0, 4.0], 2);
        assert_eq!(t, [(1, 1.0), (3, 3.0), (4, 4.0)]);
    }
}
