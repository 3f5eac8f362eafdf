//! The charts, PNG and SVG, drawn with plotters. Text is rendered with plotters' pure-Rust
//! `ab_glyph` backend from a TrueType font found on the machine (DejaVu or Liberation), so the
//! build needs no fontconfig or freetype; without such a font the plots are skipped with a
//! warning and the tables still get written.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;

use super::matrix::{Link, Mode};
use super::report::{CellSummary, Results, Stat};

const FONTS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// One colour per mode (indexed like `Mode::ALL`), so a mode looks the same in every chart;
/// the dirty rate (or p50/p99) is told apart by the line's dash, not by another colour.
const COLORS: [RGBColor; 11] = [
    RGBColor(127, 127, 127),
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
    RGBColor(227, 119, 194),
    RGBColor(0, 0, 0),
];

/// Width of the legend panel right of the chart: with up to 12 series a legend inside the
/// plotting area would cover the data.
const LEGEND_W: u32 = 270;

/// How a series' line is styled.
#[derive(Clone, Copy)]
enum Line {
    /// Dashed for the higher dirty rate.
    ByRate,
    /// Solid (fault latency p50); the higher rate in a darker shade.
    P50,
    /// Dashed (fault latency p99); the higher rate in a darker shade.
    P99,
}

fn darker(c: RGBColor) -> RGBColor {
    RGBColor(c.0 / 2, c.1 / 2, c.2 / 2)
}

fn mode_color(mode: Mode) -> RGBColor {
    let i = Mode::ALL.iter().position(|m| *m == mode).unwrap_or(0);
    COLORS[i % COLORS.len()]
}

/// Registers a font once; false if none was found.
fn font_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        FONTS.iter().any(|p| {
            std::fs::read(p).ok().is_some_and(|bytes| {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
            })
        })
    })
}

/// One line of a chart: (memory MiB, median, min, max) points.
struct Series {
    name: String,
    color: RGBColor,
    dashed: bool,
    points: Vec<(f64, Stat)>,
}

/// Groups the cells on `link` (and those of modes that do not use the link) into series by
/// (mode, dirty rate) for one metric. A rate above the lowest is drawn dashed, or, when the
/// dash already marks the percentile, in a darker shade.
fn series(
    cells: &[CellSummary],
    link: &Link,
    modes: impl Fn(Mode) -> bool,
    metric: impl Fn(&CellSummary) -> Option<Stat>,
    suffix: &str,
    scale: f64,
    line: Line,
) -> Vec<Series> {
    let mut out: Vec<Series> = Vec::new();
    let on_link = |c: &&CellSummary| &c.cell.link == link || !c.cell.mode.uses_link();
    let lowest_rate = cells.iter().map(|c| c.cell.write_rate).min().unwrap_or(0);
    for c in cells.iter().filter(|c| modes(c.cell.mode)).filter(on_link) {
        let Some(s) = metric(c) else { continue };
        let s = Stat {
            median: s.median / scale,
            min: s.min / scale,
            max: s.max / scale,
            n: s.n,
        };
        let name = format!(
            "{}{suffix}, {} pages/ms",
            c.cell.mode.name(),
            c.cell.write_rate
        );
        match out.iter_mut().find(|x| x.name == name) {
            Some(x) => x.points.push((c.cell.mib as f64, s)),
            None => out.push(Series {
                name,
                color: match (line, c.cell.write_rate > lowest_rate) {
                    (Line::P50 | Line::P99, true) => darker(mode_color(c.cell.mode)),
                    _ => mode_color(c.cell.mode),
                },
                dashed: match line {
                    Line::ByRate => c.cell.write_rate > lowest_rate,
                    Line::P50 => false,
                    Line::P99 => true,
                },
                points: vec![(c.cell.mib as f64, s)],
            }),
        }
    }
    for s in &mut out {
        s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

/// The y axis: linear from 0, or logarithmic for metrics that span orders of magnitude
/// (downtime and total time go from tens of ms to minutes across modes).
#[derive(Clone, Copy, PartialEq)]
enum Scale {
    Linear,
    Log,
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    ylabel: &str,
    lines: &[Series],
    scale: Scale,
) -> Result<()> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing {title}: {e:?}");
    root.fill(&WHITE).map_err(err)?;
    let (plot_w, _) = root.dim_in_pixel();
    let (root, legend_area) = root.split_horizontally(plot_w.saturating_sub(LEGEND_W));
    legend(&legend_area, lines).map_err(err)?;
    let xmax = lines
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(1.0, f64::max)
        * 1.1;
    let ymax = lines
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1.max))
        .fold(1e-9, f64::max);
    let ymin_pos = lines
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1.min))
        .filter(|v| *v > 0.0)
        .fold(f64::INFINITY, f64::min);
    if scale == Scale::Log && ymin_pos.is_finite() {
        // Zero values (none measured) cannot be drawn on a log axis; they sit at the bottom.
        let lo = ymin_pos / 2.0;
        let mut chart = builder(&root, title)
            .build_cartesian_2d(0f64..xmax, (lo..ymax * 2.0).log_scale())
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("workload memory (MiB)")
            .y_desc(format!("{ylabel}, log scale"))
            .draw()
            .map_err(err)?;
        plot_lines(&mut chart, lines, |v| v.max(lo)).map_err(err)?;
    } else {
        let mut chart = builder(&root, title)
            .build_cartesian_2d(0f64..xmax, 0f64..ymax * 1.15)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("workload memory (MiB)")
            .y_desc(ylabel)
            .draw()
            .map_err(err)?;
        plot_lines(&mut chart, lines, |v| v).map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

fn builder<'a, 'b, DB: DrawingBackend>(
    root: &'a DrawingArea<DB, Shift>,
    title: &'b str,
) -> ChartBuilder<'a, 'b, DB> {
    let mut b = ChartBuilder::on(root);
    b.caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80);
    b
}

/// Draws each series: median line, min–max bars.
fn plot_lines<'a, DB: DrawingBackend + 'a, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<plotters::coord::types::RangedCoordf64, Y>>,
    lines: &[Series],
    clamp: impl Fn(f64) -> f64,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>>
where
    Y: Ranged<ValueType = f64>,
{
    for s in lines {
        let color = s.color;
        let points = s.points.iter().map(|(x, st)| (*x, clamp(st.median)));
        if s.dashed {
            chart.draw_series(DashedLineSeries::new(points, 8, 5, color.stroke_width(2)))?;
        } else {
            chart.draw_series(LineSeries::new(points, color.stroke_width(2)))?;
        }
        chart.draw_series(
            s.points
                .iter()
                .map(|(x, st)| Circle::new((*x, clamp(st.median)), 3, color.filled())),
        )?;
        chart.draw_series(s.points.iter().map(|(x, st)| {
            ErrorBar::new_vertical(
                *x,
                clamp(st.min),
                clamp(st.median),
                clamp(st.max),
                color.filled(),
                8,
            )
        }))?;
    }
    Ok(())
}

/// The legend, one row per series, in its own panel.
fn legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    lines: &[Series],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let font = ("sans-serif", 13).into_font();
    for (i, s) in lines.iter().enumerate() {
        let y = 60 + 22 * i as i32;
        let style = s.color.stroke_width(2);
        if s.dashed {
            for x in [5, 17, 29] {
                area.draw(&PathElement::new(vec![(x, y), (x + 8, y)], style))?;
            }
        } else {
            area.draw(&PathElement::new(vec![(5, y), (37, y)], style))?;
        }
        area.draw(&Text::new(s.name.clone(), (45, y - 7), font.clone()))?;
    }
    Ok(())
}

fn both(
    out: &Path,
    file: &str,
    title: &str,
    ylabel: &str,
    lines: &[Series],
    scale: Scale,
) -> Result<()> {
    let png = out.join(format!("{file}.png"));
    let svg = out.join(format!("{file}.svg"));
    draw(
        BitMapBackend::new(&png, (1000, 650)).into_drawing_area(),
        title,
        ylabel,
        lines,
        scale,
    )?;
    draw(
        SVGBackend::new(&svg, (1000, 650)).into_drawing_area(),
        title,
        ylabel,
        lines,
        scale,
    )
}

/// Writes every chart (PNG + SVG) into `out`. Skips them, with a warning, without a font.
pub fn write_all(r: &Results, out: &Path) -> Result<()> {
    if !font_ready() {
        eprintln!(
            "bench: no TrueType font found (looked at {}): plots skipped, tables written",
            FONTS.join(", ")
        );
        return Ok(());
    }
    for link in &r.matrix.links {
        link_plots(r, link, out)?;
    }
    Ok(())
}

/// The five charts of one link: `<metric>-<link slug>.{png,svg}`.
fn link_plots(r: &Results, link: &Link, out: &Path) -> Result<()> {
    let cells = &r.cells;
    let all = |_: Mode| true;
    let (l, slug) = (link.label(), link.slug());
    both(
        out,
        &format!("downtime-{slug}"),
        &format!("Downtime (largest heartbeat gap) vs memory, link {l}"),
        "downtime (ms)",
        &series(cells, link, all, |c| c.downtime_ms, "", 1.0, Line::ByRate),
        Scale::Log,
    )?;
    both(
        out,
        &format!("total_time-{slug}"),
        &format!("Total migration time vs memory, link {l}"),
        "total time (ms)",
        &series(cells, link, all, |c| c.total_ms, "", 1.0, Line::ByRate),
        Scale::Log,
    )?;
    both(
        out,
        &format!("wire_bytes-{slug}"),
        &format!("Bytes on the wire vs memory, link {l} (criu-disk: image bytes)"),
        "MiB",
        &series(
            cells,
            link,
            all,
            |c| c.wire_bytes,
            "",
            1048576.0,
            Line::ByRate,
        ),
        Scale::Linear,
    )?;
    let mut faults = series(
        cells,
        link,
        Mode::has_fault_latency,
        |c| c.fault_p50_us,
        " p50",
        1.0,
        Line::P50,
    );
    faults.extend(series(
        cells,
        link,
        Mode::has_fault_latency,
        |c| c.fault_p99_us,
        " p99",
        1.0,
        Line::P99,
    ));
    both(
        out,
        &format!("fault_latency-{slug}"),
        &format!("Fault latency at the destination (pageserv modes), link {l}"),
        "latency (us)",
        &faults,
        Scale::Log,
    )?;
    both(
        out,
        &format!("degraded-{slug}"),
        &format!("Time below 50% of the workload's normal speed after the restore, link {l}"),
        "time (ms)",
        &series(cells, link, all, |c| c.degraded_ms, "", 1.0, Line::ByRate),
        Scale::Linear,
    )
}
