//! The charts, PNG and SVG, drawn with plotters. Text is rendered with plotters' pure-Rust
//! `ab_glyph` backend from a TrueType font found on the machine (DejaVu or Liberation), so the
//! build needs no fontconfig or freetype; without such a font the plots are skipped with a
//! warning and the tables still get written.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;

use super::matrix::Mode;
use super::report::{CellSummary, Results, Stat};

const FONTS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

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
    points: Vec<(f64, Stat)>,
}

/// Groups cells into series by (mode, link, dirty rate) for one metric.
fn series(
    cells: &[CellSummary],
    modes: impl Fn(Mode) -> bool,
    metric: impl Fn(&CellSummary) -> Option<Stat>,
    suffix: &str,
    scale: f64,
) -> Vec<Series> {
    let mut out: Vec<Series> = Vec::new();
    for c in cells.iter().filter(|c| modes(c.cell.mode)) {
        let Some(s) = metric(c) else { continue };
        let s = Stat {
            median: s.median / scale,
            min: s.min / scale,
            max: s.max / scale,
            n: s.n,
        };
        let name = format!(
            "{}{suffix}, {}, {} p/ms",
            c.cell.mode.name(),
            c.cell.link.label(),
            c.cell.write_rate
        );
        match out.iter_mut().find(|x| x.name == name) {
            Some(x) => x.points.push((c.cell.mib as f64, s)),
            None => out.push(Series {
                name,
                points: vec![(c.cell.mib as f64, s)],
            }),
        }
    }
    for s in &mut out {
        s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    ylabel: &str,
    lines: &[Series],
) -> Result<()> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing {title}: {e:?}");
    root.fill(&WHITE).map_err(err)?;
    let xmax = lines
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(1.0, f64::max)
        * 1.1;
    let ymax = lines
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1.max))
        .fold(1e-9, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("workload memory (MiB)")
        .y_desc(ylabel)
        .draw()
        .map_err(err)?;
    for (i, s) in lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                s.points.iter().map(|(x, st)| (*x, st.median)),
                color.stroke_width(2),
            ))
            .map_err(err)?
            .label(s.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(s.points.iter().map(|(x, st)| {
                ErrorBar::new_vertical(*x, st.min, st.median, st.max, color.filled(), 8)
            }))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

fn both(out: &Path, file: &str, title: &str, ylabel: &str, lines: &[Series]) -> Result<()> {
    let png = out.join(format!("{file}.png"));
    let svg = out.join(format!("{file}.svg"));
    draw(
        BitMapBackend::new(&png, (1000, 650)).into_drawing_area(),
        title,
        ylabel,
        lines,
    )?;
    draw(
        SVGBackend::new(&svg, (1000, 650)).into_drawing_area(),
        title,
        ylabel,
        lines,
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
    let cells = &r.cells;
    let all = |_: Mode| true;
    both(
        out,
        "downtime",
        "Downtime (largest heartbeat gap) vs memory",
        "downtime (ms)",
        &series(cells, all, |c| c.downtime_ms, "", 1.0),
    )?;
    both(
        out,
        "total_time",
        "Total migration time vs memory",
        "total time (ms)",
        &series(cells, all, |c| c.total_ms, "", 1.0),
    )?;
    both(
        out,
        "wire_bytes",
        "Bytes on the wire vs memory (criu-disk: image bytes)",
        "MiB",
        &series(cells, all, |c| c.wire_bytes, "", 1048576.0),
    )?;
    let mut faults = series(
        cells,
        Mode::has_fault_latency,
        |c| c.fault_p50_us,
        " p50",
        1.0,
    );
    faults.extend(series(
        cells,
        Mode::has_fault_latency,
        |c| c.fault_p99_us,
        " p99",
        1.0,
    ));
    both(
        out,
        "fault_latency",
        "Fault latency at the destination (pageserv modes)",
        "latency (us)",
        &faults,
    )?;
    both(
        out,
        "degraded",
        "Time below 50% of the normal write rate after the restore",
        "time (ms)",
        &series(cells, all, |c| c.degraded_ms, "", 1.0),
    )
}
