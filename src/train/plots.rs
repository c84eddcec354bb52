//! Plots of a run, as PNG and SVG: the training curves, the reliability
//! diagram and confidence histograms.
use std::path::Path;

use super::metrics::Calibration;
use crate::error::{io_err, param_err, Result};

use plotters::prelude::*;

/// The plots' font, DejaVu Sans (Bitstream Vera licence, see
/// `assets/fonts/DejaVuSans-LICENSE.txt`), built into the binary and drawn
/// with ab_glyph: no fontconfig or freetype is needed at run time, so the
/// binary runs on headless GPU servers that have neither.
static PLOT_FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// Registers [`PLOT_FONT`] as plotters' "sans-serif" once per process.
fn register_plot_font() -> Result<()> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, PLOT_FONT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(param_err(
            "plot",
            "the built-in plot font (DejaVu Sans) could not be parsed",
        ))
    }
}

fn draw_reliability<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    cal: &Calibration,
    title: &str,
) -> std::result::Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{title} (ECE {:.3})", cal.ece), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(44)
        .build_cartesian_2d(0f64..1f64, 0f64..1f64)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("confidence")
        .y_desc("accuracy")
        .draw()
        .map_err(e)?;
    chart
        .draw_series(cal.bins.iter().filter(|b| b.count > 0).map(|b| {
            Rectangle::new(
                [(b.lower, 0.0), (b.upper, b.accuracy)],
                BLUE.mix(0.6).filled(),
            )
        }))
        .map_err(e)?;
    chart
        .draw_series(cal.bins.iter().filter(|b| b.count > 0).map(|b| {
            Rectangle::new(
                [
                    (b.lower, b.accuracy.min(b.confidence)),
                    (b.upper, b.accuracy.max(b.confidence)),
                ],
                RED.mix(0.3).filled(),
            )
        }))
        .map_err(e)?;
    chart
        .draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], BLACK))
        .map_err(e)?;
    root.present().map_err(e)
}

fn draw_histograms<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    sets: &[(&str, &[f64])],
    title: &str,
) -> std::result::Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    let all = sets.iter().flat_map(|(_, v)| v.iter().cloned());
    let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    let (lo, hi) = if lo.is_finite() && hi > lo {
        (lo, hi)
    } else {
        (0.0, 1.0)
    };
    let nb = 30;
    let w = (hi - lo) / nb as f64;
    let hist = |v: &[f64]| {
        let mut h = vec![0.0; nb];
        v.iter()
            .for_each(|&x| h[(((x - lo) / w) as usize).min(nb - 1)] += 1.0 / v.len().max(1) as f64);
        h
    };
    let hs: Vec<Vec<f64>> = sets.iter().map(|(_, v)| hist(v)).collect();
    let top = hs.iter().flatten().cloned().fold(0.0, f64::max).max(1e-9) * 1.1;
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(50)
        .build_cartesian_2d(lo..hi, 0.0..top)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("score")
        .y_desc("fraction")
        .draw()
        .map_err(e)?;
    let colors = [BLUE, RED, GREEN, MAGENTA];
    for (i, ((name, _), h)) in sets.iter().zip(&hs).enumerate() {
        let c = colors[i % colors.len()];
        chart
            .draw_series(h.iter().enumerate().map(|(k, &f)| {
                let x0 = lo + k as f64 * w;
                Rectangle::new([(x0, 0.0), (x0 + w, f)], c.mix(0.35).filled())
            }))
            .map_err(e)?
            .label(*name)
            .legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 10, y + 5)], c.mix(0.6).filled())
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)
}

/// Writes a reliability diagram to `<stem>.png` and `<stem>.svg`.
pub fn plot_reliability(stem: &Path, cal: &Calibration, title: &str) -> Result<()> {
    register_plot_font()?;
    let (png, svg) = (stem.with_extension("png"), stem.with_extension("svg"));
    draw_reliability(
        BitMapBackend::new(&png, (640, 480)).into_drawing_area(),
        cal,
        title,
    )
    .map_err(|m| io_err(&png, m))?;
    draw_reliability(
        SVGBackend::new(&svg, (640, 480)).into_drawing_area(),
        cal,
        title,
    )
    .map_err(|m| io_err(&svg, m))
}

/// Writes normalised histograms of several score sets (e.g. in- and
/// out-of-distribution max-probabilities) to `<stem>.png` and `<stem>.svg`.
pub fn plot_histograms(stem: &Path, sets: &[(&str, &[f64])], title: &str) -> Result<()> {
    register_plot_font()?;
    let (png, svg) = (stem.with_extension("png"), stem.with_extension("svg"));
    draw_histograms(
        BitMapBackend::new(&png, (640, 480)).into_drawing_area(),
        sets,
        title,
    )
    .map_err(|m| io_err(&png, m))?;
    draw_histograms(
        SVGBackend::new(&svg, (640, 480)).into_drawing_area(),
        sets,
        title,
    )
    .map_err(|m| io_err(&svg, m))
}

/// One line of a curve plot: (x, mean, std) points; a std above 0 draws
/// an error bar of ± std.
#[derive(Clone, Debug)]
pub struct Series {
    /// The legend entry (none when empty).
    pub name: String,
    /// (x, mean, std), x ascending.
    pub points: Vec<(f64, f64, f64)>,
}

fn draw_curves<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    x_desc: &str,
    series: &[Series],
) -> std::result::Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    root.fill(&WHITE).map_err(e)?;
    let finite = || {
        series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|p| p.1.is_finite())
    };
    let (x0, x1) = finite().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
        (a.min(p.0), b.max(p.0))
    });
    let (y0, y1) = finite().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
        let sd = if p.2.is_finite() { p.2 } else { 0.0 };
        (a.min(p.1 - sd), b.max(p.1 + sd))
    });
    // One point, or none (a resumed run with nothing left to train): a
    // unit range, never an infinite one (plotters would not return).
    let (x0, x1) = if x1 > x0 {
        (x0, x1)
    } else if x0.is_finite() {
        (0.0, x0.max(0.0) + 1.0)
    } else {
        (0.0, 1.0)
    };
    let (y0, y1) = if y1 > y0 {
        (y0, y1)
    } else if y0.is_finite() {
        (y0 - 0.5, y0 + 0.5)
    } else {
        (0.0, 1.0)
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(50)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(e)?;
    chart.configure_mesh().x_desc(x_desc).draw().map_err(e)?;
    let colours = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    for (i, s) in series.iter().enumerate() {
        let colour = colours[i % colours.len()];
        let pts = || s.points.iter().filter(|p| p.1.is_finite());
        let line = chart
            .draw_series(LineSeries::new(pts().map(|p| (p.0, p.1)), colour))
            .map_err(e)?;
        if !s.name.is_empty() {
            line.label(s.name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour));
        }
        chart
            .draw_series(
                pts()
                    .filter(|p| p.2 > 0.0)
                    .map(|p| ErrorBar::new_vertical(p.0, p.1 - p.2, p.1, p.1 + p.2, colour, 6)),
            )
            .map_err(e)?;
    }
    if series.iter().any(|s| !s.name.is_empty()) {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(e)?;
    }
    root.present().map_err(e)
}

/// Writes curves (one line per series, ± std as error bars) to
/// `<stem>.png` and `<stem>.svg`, `x_desc` naming the x axis.
pub fn plot_curves(stem: &Path, title: &str, x_desc: &str, series: &[Series]) -> Result<()> {
    register_plot_font()?;
    let (png, svg) = (stem.with_extension("png"), stem.with_extension("svg"));
    draw_curves(
        BitMapBackend::new(&png, (640, 480)).into_drawing_area(),
        title,
        x_desc,
        series,
    )
    .map_err(|m| io_err(&png, m))?;
    draw_curves(
        SVGBackend::new(&svg, (640, 480)).into_drawing_area(),
        title,
        x_desc,
        series,
    )
    .map_err(|m| io_err(&svg, m))
}

/// Writes a curve (step, value) to `<stem>.png` and `<stem>.svg`.
pub fn plot_curve(stem: &Path, title: &str, pts: &[(u64, f64)]) -> Result<()> {
    let series = Series {
        name: String::new(),
        points: pts.iter().map(|p| (p.0 as f64, p.1, 0.0)).collect(),
    };
    plot_curves(stem, title, "step", &[series])
}

fn draw_heatmap<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    axes: (&str, &str),
    values: &[Vec<f64>],
) -> std::result::Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    root.fill(&WHITE).map_err(e)?;
    let rows = values.len();
    let cols = values.iter().map(Vec::len).max().unwrap_or(0);
    let finite = || values.iter().flatten().copied().filter(|v| v.is_finite());
    let lo = finite().fold(f64::INFINITY, f64::min);
    let hi = finite().fold(f64::NEG_INFINITY, f64::max);
    let span = if hi > lo { hi - lo } else { 1.0 };
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{title} (white {lo:.3}, dark blue {hi:.3})"),
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(44)
        .build_cartesian_2d(0f64..cols.max(1) as f64, 0f64..rows.max(1) as f64)
        .map_err(e)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc(axes.0)
        .y_desc(axes.1)
        .x_labels(cols.min(16))
        .y_labels(rows.min(16))
        .draw()
        .map_err(e)?;
    let cells = values.iter().enumerate().flat_map(|(r, row)| {
        row.iter().enumerate().map(move |(c, &v)| {
            let t = if v.is_finite() { (v - lo) / span } else { 0.0 };
            let shade = |full: f64| (255.0 - t * (255.0 - full)) as u8;
            Rectangle::new(
                [(c as f64, r as f64), (c as f64 + 1.0, r as f64 + 1.0)],
                RGBColor(shade(16.0), shade(48.0), shade(160.0)).filled(),
            )
        })
    });
    chart.draw_series(cells).map_err(e)?;
    root.present().map_err(e)
}

/// Writes a heatmap of `values[row][column]` (row 0 at the bottom) to
/// `<stem>.png` and `<stem>.svg`; `axes` names the x (column) and y (row)
/// axes. The title states the values of the lightest and darkest cells.
pub fn plot_heatmap(
    stem: &Path,
    title: &str,
    axes: (&str, &str),
    values: &[Vec<f64>],
) -> Result<()> {
    register_plot_font()?;
    let (png, svg) = (stem.with_extension("png"), stem.with_extension("svg"));
    draw_heatmap(
        BitMapBackend::new(&png, (640, 520)).into_drawing_area(),
        title,
        axes,
        values,
    )
    .map_err(|m| io_err(&png, m))?;
    draw_heatmap(
        SVGBackend::new(&svg, (640, 520)).into_drawing_area(),
        title,
        axes,
        values,
    )
    .map_err(|m| io_err(&svg, m))
}
