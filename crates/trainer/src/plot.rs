//! `plot.png` beside `summary.json`: the loss, the learning rate and the
//! evaluation accuracies against the step, drawn from `steps.jsonl` and
//! `evals.jsonl` with plotters' bitmap backend. The font (DejaVu Sans, its
//! licence in `assets/fonts/`) is compiled in, so no system font library or
//! font file is needed where the trainer runs.

use crate::rundir::{EVALS_FILE, PLOT_FILE, STEPS_FILE};
use anyhow::{Context, Result};
use plotters::prelude::*;
use std::path::{Path, PathBuf};

static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

/// The file name of the plot in a run directory.

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Series of `key` against `step` in a JSON-lines file (missing or null values skipped).
fn series(path: &Path, key: &str) -> Vec<(f64, f64)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_f64()?, v[key].as_f64().filter(|x| x.is_finite())?)))
        .collect()
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// One panel: `lines` (label, points) against the step.
fn panel(area: &Area, title: &str, lines: &[(&str, Vec<(f64, f64)>)]) -> Result<()> {
    let pts = lines.iter().flat_map(|(_, p)| p.iter());
    let (x1, mut y0, mut y1) =
        pts.fold((1.0f64, f64::MAX, f64::MIN), |(x, a, b), &(px, py)| (x.max(px), a.min(py), b.max(py)));
    if y0 > y1 {
        (y0, y1) = (0.0, 1.0);
    }
    let pad = ((y1 - y0) * 0.05).max(1e-9);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x1, (y0 - pad)..(y1 + pad))
        .context("plot axes")?;
    chart.configure_mesh().x_desc("step").label_style(("sans-serif", 14)).draw().context("plot mesh")?;
    for (k, (label, points)) in lines.iter().enumerate() {
        let colour = Palette99::pick(k).to_rgba();
        chart
            .draw_series(LineSeries::new(points.iter().copied(), colour.stroke_width(2)))
            .context("plot line")?
            .label(*label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2)));
    }
    if lines.len() > 1 {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .context("legend")?;
    }
    Ok(())
}

/// Draw `run_dir/plot.png` from the run's logs: loss, learning rate, and the
/// evaluation figures (kNN top-1, linear probe, zero-shot top-1) by step.
pub fn plot(run_dir: &Path) -> Result<PathBuf> {
    register_font();
    let (steps, evals) = (run_dir.join(STEPS_FILE), run_dir.join(EVALS_FILE));
    let path = run_dir.join(PLOT_FILE);
    let tmp = run_dir.join(crate::rundir::tmp_name(crate::rundir::PLOT_FILE, Some("png")));
    {
        let root = BitMapBackend::new(&tmp, (1500, 450)).into_drawing_area();
        root.fill(&WHITE).context("plot background")?;
        let areas = root.split_evenly((1, 3));
        panel(&areas[0], "loss", &[("loss", series(&steps, "loss"))])?;
        panel(&areas[1], "learning rate", &[("lr", series(&steps, "lr"))])?;
        let acc: Vec<(&str, Vec<(f64, f64)>)> = ["knn_top1", "linear_top1", "zero_shot_top1"]
            .into_iter()
            .map(|k| (k, series(&evals, k)))
            .filter(|(_, p)| !p.is_empty())
            .collect();
        panel(&areas[2], "evaluation", &acc)?;
        root.present().with_context(|| format!("writing {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
