//! The soak's series drawn as one PNG of six panels: resident memory and open descriptors
//! of each process, PostgreSQL connections, queue depth and pending requests, the api's
//! open waits and the load's answers, and latency. A dashed line marks the end of the
//! warm-up.
//!
//! Drawn with `plotters`, bitmap backend only, and text from a font embedded in the binary
//! (DejaVu Sans Mono, free license, next to this crate's manifest in `assets/`): nothing is
//! asked of the machine (no fontconfig, no freetype, no gnuplot).

use std::path::Path;

use anyhow::anyhow;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use super::sample::Sample;

const FONT: &[u8] = include_bytes!("../../assets/DejaVuSansMono.ttf");
const FAMILY: &str = "sans-serif";
const SIZE: (u32, u32) = (1600, 1350);

/// One line of a panel: its name and its points (minutes, value).
type Line = (String, Vec<(f64, f64)>);

/// Draws the samples into `path`; `names`: the processes, in the samples' order.
pub fn draw(
    path: &Path,
    title: &str,
    names: &[String],
    samples: &[Sample],
    warmup_end_secs: f64,
) -> anyhow::Result<()> {
    register_font(FAMILY, FontStyle::Normal, FONT)
        .map_err(|_| anyhow!("the embedded font does not parse"))?;
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    drawn(root.fill(&WHITE))?;
    let body = drawn(root.titled(title, (FAMILY, 24)))?;
    let panels = body.split_evenly((3, 2));
    let minutes = |s: &Sample| s.at_secs / 60.0;
    let per_process = |value: &dyn Fn(&Sample, usize) -> Option<f64>| -> Vec<Line> {
        names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let points = samples
                    .iter()
                    .filter_map(|s| Some((minutes(s), value(s, i)?)))
                    .collect();
                (name.clone(), points)
            })
            .collect()
    };
    let one = |name: &str, value: &dyn Fn(&Sample) -> Option<f64>| -> Line {
        let points = samples
            .iter()
            .filter_map(|s| Some((minutes(s), value(s)?)))
            .collect();
        (name.to_owned(), points)
    };
    let x_max = samples.last().map_or(1.0, minutes).max(1.0 / 6.0);
    let warmup = warmup_end_secs / 60.0;
    let rss = per_process(&|s, i| Some(s.processes.get(i)?.rss_kib? as f64 / 1024.0));
    let fds = per_process(&|s, i| Some(s.processes.get(i)?.fds? as f64));
    let contents: [(&str, &str, Vec<Line>); 6] = [
        ("Resident memory (RSS)", "MiB", rss),
        ("Open file descriptors", "descriptors", fds),
        (
            "PostgreSQL connections of the system",
            "connections",
            vec![one("connections", &|s| s.pg_connections.map(|v| v as f64))],
        ),
        (
            "Partition queues and pending requests",
            "messages / requests",
            vec![
                one("queued (ready + unacked)", &|s| s.queue_depth.map(|v| v as f64)),
                one("requests PENDING", &|s| s.pending.map(|v| v as f64)),
            ],
        ),
        (
            "Open waits (api) and answers per second (load)",
            "count / per second",
            vec![
                one("api_waits_open", &|s| s.waiters),
                one("answers per second", &|s| {
                    // The first sample has no window before it: what it counted came
                    // before the load.
                    let previous = samples.iter().take_while(|t| t.at_secs < s.at_secs).last()?;
                    let window = s.at_secs - previous.at_secs;
                    (window > 0.0).then(|| s.requests as f64 / window)
                }),
            ],
        ),
        (
            "Latency of the load's requests, each 10 s window",
            "ms",
            vec![one("p50", &|s| s.p50_ms), one("p99", &|s| s.p99_ms)],
        ),
    ];
    for (area, (caption, unit, lines)) in panels.iter().zip(contents) {
        panel(area, caption, unit, &lines, x_max, warmup)?;
    }
    drawn(root.present())?;
    Ok(())
}

fn panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    caption: &str,
    unit: &str,
    lines: &[Line],
    x_max: f64,
    warmup: f64,
) -> anyhow::Result<()> {
    let y_top = lines
        .iter()
        .flat_map(|(_, points)| points.iter().map(|(_, y)| *y))
        .fold(0.0_f64, f64::max);
    // Headroom for the legend, and a visible axis when everything is zero.
    let y_max = (y_top * 1.25).max(1.0);
    let mut chart = drawn(
        ChartBuilder::on(area)
            .caption(caption, (FAMILY, 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max),
    )?;
    drawn(
        chart
            .configure_mesh()
            .x_desc("minutes")
            .y_desc(unit)
            .label_style((FAMILY, 13))
            .axis_desc_style((FAMILY, 14))
            .light_line_style(WHITE)
            .draw(),
    )?;
    let warmup_line = DashedLineSeries::new(
        vec![(warmup, 0.0), (warmup, y_max)],
        6,
        4,
        BLACK.mix(0.5).stroke_width(1),
    );
    drawn(chart.draw_series(warmup_line))?;
    for (i, (name, points)) in lines.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let series = drawn(chart.draw_series(LineSeries::new(points.clone(), color.stroke_width(2))))?;
        series
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    drawn(
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font((FAMILY, 13))
            .draw(),
    )?;
    Ok(())
}

/// plotters' errors carry the backend's error type, which is not `Sync`.
fn drawn<T, E: std::fmt::Debug>(result: Result<T, E>) -> anyhow::Result<T> {
    result.map_err(|e| anyhow!("cannot draw the chart: {e:?}"))
}
