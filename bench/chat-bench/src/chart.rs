//! The latency-vs-offered-load chart (PNG, plotters' bitmap backend).

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;

/// One line per server: (offered sends/s, p50 ms, p99 ms).
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64, f64)>,
}

const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

fn load_font() -> Result<()> {
    for p in FONT_CANDIDATES {
        if let Ok(bytes) = std::fs::read(p) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| anyhow!("{p} is not a usable font"))?;
            return Ok(());
        }
    }
    Err(anyhow!(
        "no TrueType font found (tried {FONT_CANDIDATES:?}); install fonts-dejavu-core"
    ))
}

/// "500", "1.5k", "20k", "1.2M": short enough that neighbours do not touch.
fn fmt_rate(x: f64) -> String {
    let short = |v: f64, unit: &str| {
        if v >= 10.0 || (v - v.round()).abs() < 0.05 {
            format!("{v:.0}{unit}")
        } else {
            format!("{v:.1}{unit}")
        }
    };
    if x >= 1e6 {
        short(x / 1e6, "M")
    } else if x >= 1e3 {
        short(x / 1e3, "k")
    } else {
        format!("{x:.0}")
    }
}

pub fn draw(path: &Path, title: &str, series: &[Series]) -> Result<()> {
    load_font()?;
    let e = |e: &dyn std::fmt::Debug| anyhow!("drawing {}: {e:?}", path.display());
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut xmin, mut xmax, mut ymin, mut ymax) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, p50, p99) in pts {
        xmin = xmin.min(x);
        xmax = xmax.max(x);
        ymin = ymin.min(p50.max(0.01));
        ymax = ymax.max(p99);
    }
    if xmin > xmax {
        return Err(anyhow!("no points to draw"));
    }
    // Ticks at the offered rates themselves: a log axis otherwise labels
    // only the decades (or, asked for more, every 1-2-5 step, which collide).
    let mut rates: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    rates.sort_by(f64::total_cmp);
    rates.dedup_by(|a, b| (*a / *b - 1.0).abs() < 0.05);
    let root = BitMapBackend::new(path, (1100, 680)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (xmin * 0.8..xmax * 1.25).log_scale().with_key_points(rates),
            (ymin * 0.7..ymax * 1.5).log_scale(),
        )
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("offered load (messages sent per second, all senders)")
        .y_desc("send → recipient latency (ms)")
        .x_label_formatter(&|x| fmt_rate(*x))
        .y_label_formatter(&|y| {
            if *y >= 1.0 {
                format!("{y:.0}")
            } else {
                format!("{y:.2}")
            }
        })
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .draw()
        .map_err(|x| e(&x))?;
    let colors = [
        RGBColor(200, 30, 30),
        RGBColor(30, 80, 200),
        RGBColor(30, 150, 60),
        RGBColor(150, 80, 200),
    ];
    for (i, s) in series.iter().enumerate() {
        let c = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(
                s.points.iter().map(|p| (p.0, p.2)),
                c.stroke_width(3),
            ))
            .map_err(|x| e(&x))?
            .label(format!("{} p99", s.name))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3)));
        chart
            .draw_series(
                s.points
                    .iter()
                    .map(|p| Circle::new((p.0, p.2), 5, c.filled())),
            )
            .map_err(|x| e(&x))?;
        chart
            .draw_series(DashedLineSeries::new(
                s.points.iter().map(|p| (p.0, p.1)),
                8,
                5,
                c.stroke_width(2),
            ))
            .map_err(|x| e(&x))?
            .label(format!("{} p50", s.name))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(1)));
        chart
            .draw_series(
                s.points
                    .iter()
                    .map(|p| TriangleMarker::new((p.0, p.1), 5, c.filled())),
            )
            .map_err(|x| e(&x))?;
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}
