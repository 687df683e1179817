//! Plots a soak run (`benches/soak.sh`): the agent's RSS (anonymous and file-backed), open
//! file descriptors, SQLite store size (state.db + WAL) and CPU % against minutes, one panel
//! each, into an SVG.
//!
//! Run: `cargo bench --bench soak_plot -- SAMPLES.csv OUT.svg`. Without a CSV (as under
//! `cargo test --all-targets`) it plots a small made-up run into a temporary file, to check
//! that it works.

use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// The columns of samples.csv, by name (the script may add columns).
struct Samples {
    minute: Vec<f64>,
    columns: Vec<(String, Vec<f64>)>,
}

impl Samples {
    fn parse(text: &str, source: &Path) -> Result<Self> {
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let header: Vec<String> = lines
            .next()
            .ok_or_else(|| format!("{}: empty file", source.display()))?
            .split(',')
            .map(|h| h.trim().to_string())
            .collect();
        let mut columns: Vec<(String, Vec<f64>)> =
            header.iter().map(|h| (h.clone(), Vec::new())).collect();
        for (n, line) in lines.enumerate() {
            let cells: Vec<&str> = line.split(',').collect();
            if cells.len() != header.len() {
                return Err(format!(
                    "{} line {}: {} fields, the header has {}",
                    source.display(),
                    n + 2,
                    cells.len(),
                    header.len()
                )
                .into());
            }
            for ((name, values), cell) in columns.iter_mut().zip(&cells) {
                // An empty cell (nothing measured yet, as CPU in the first row) is not plotted.
                let v = if cell.trim().is_empty() {
                    f64::NAN
                } else {
                    cell.trim().parse::<f64>().map_err(|e| {
                        format!("{} line {} column {name}: {e}", source.display(), n + 2)
                    })?
                };
                values.push(v);
            }
        }
        let minute = columns
            .iter()
            .find(|(n, _)| n == "minute")
            .map(|(_, v)| v.clone())
            .ok_or_else(|| format!("{}: no column minute", source.display()))?;
        Ok(Self { minute, columns })
    }

    fn column(&self, name: &str) -> Result<&[f64]> {
        self.columns
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
            .ok_or_else(|| format!("no column {name}").into())
    }
}

/// One panel: a title, a y unit, and (label, column, scale, colour) series.
struct Panel<'a> {
    title: &'a str,
    unit: &'a str,
    series: &'a [(&'a str, &'a str, f64, RGBColor)],
}

fn plot(samples: &Samples, out: &Path, title: &str) -> Result<()> {
    const KB_TO_MB: f64 = 1.0 / 1024.0;
    const B_TO_MB: f64 = 1.0 / (1024.0 * 1024.0);
    let panels = [
        Panel {
            title: "agent RSS",
            unit: "MB",
            series: &[
                ("anonymous", "rss_anon_kb", KB_TO_MB, RED),
                ("file-backed", "rss_file_kb", KB_TO_MB, BLUE),
            ],
        },
        Panel {
            title: "open file descriptors and threads",
            unit: "count",
            series: &[("fds", "fds", 1.0, RED), ("threads", "threads", 1.0, BLUE)],
        },
        Panel {
            title: "SQLite store (state.db + WAL)",
            unit: "MB",
            series: &[
                ("state.db + WAL", "store_bytes", B_TO_MB, RED),
                ("WAL", "wal_bytes", B_TO_MB, BLUE),
            ],
        },
        Panel {
            title: "agent CPU (utime + stime over each minute)",
            unit: "% of one core",
            series: &[("CPU", "cpu_pct", 1.0, RED)],
        },
    ];
    let root = SVGBackend::new(out, (1000, 1300)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let areas = root.split_evenly((panels.len(), 1));
    let x_max = samples.minute.iter().copied().fold(1.0, f64::max);
    for (panel, area) in panels.iter().zip(&areas) {
        let mut lines = Vec::new();
        for &(label, column, scale, colour) in panel.series {
            let points: Vec<(f64, f64)> = samples
                .minute
                .iter()
                .zip(samples.column(column)?)
                .filter(|(_, y)| y.is_finite())
                .map(|(&x, &y)| (x, y * scale))
                .collect();
            lines.push((label, colour, points));
        }
        // From zero, so that a flat line looks flat and a slope is not magnified.
        let y_max = lines
            .iter()
            .flat_map(|(_, _, p)| p.iter().map(|&(_, y)| y))
            .fold(0.0, f64::max)
            * 1.15;
        let y_max = if y_max > 0.0 { y_max } else { 1.0 };
        let mut chart = ChartBuilder::on(area)
            .caption(panel.title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc("minutes")
            .y_desc(panel.unit)
            .draw()?;
        for (label, colour, points) in lines {
            chart
                .draw_series(LineSeries::new(points, colour.stroke_width(2)))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

fn run() -> Result<()> {
    // cargo bench passes --bench; the CSV and the output are the other arguments.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let Some(csv) = args.first().map(PathBuf::from) else {
        // Smoke run: a made-up three-sample run.
        let dir = tempfile::tempdir()?;
        let csv = dir.path().join("samples.csv");
        fs::write(
            &csv,
            "minute,rss_anon_kb,rss_file_kb,fds,threads,store_bytes,wal_bytes,cpu_pct\n\
             0,7000,30000,30,9,800000,700000,\n1,7100,30100,31,9,900000,800000,2.5\n\
             2,7100,30100,31,9,900000,800000,2.4\n",
        )?;
        let out = dir.path().join("soak.svg");
        plot(
            &Samples::parse(&fs::read_to_string(&csv)?, &csv)?,
            &out,
            "smoke",
        )?;
        let svg = fs::read_to_string(&out)?;
        if !svg.contains("<svg") || !svg.contains("polyline") {
            return Err("the smoke plot has no line".into());
        }
        println!(
            "soak_plot: smoke run ok (usage: cargo bench --bench soak_plot -- SAMPLES.csv OUT.svg)"
        );
        return Ok(());
    };
    let out = args
        .get(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| csv.with_extension("svg"));
    let text =
        fs::read_to_string(&csv).map_err(|e| format!("cannot read {}: {e}", csv.display()))?;
    let samples = Samples::parse(&text, &csv)?;
    let title = format!(
        "converge soak: one agent, every section, churn ({:.0} minutes)",
        samples.minute.last().copied().unwrap_or(0.0)
    );
    plot(&samples, &out, &title)?;
    println!("soak_plot: {} -> {}", csv.display(), out.display());
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("soak_plot: {e}");
        std::process::exit(1);
    }
}
