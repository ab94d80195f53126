//! The result table the benches print: rows of paired (baseline, figure) medians with
//! a bootstrap ratio, single figures, targets checked or shown, and the summary.
//!
//! The benches differ only in small ways (the names of the two figure columns, the
//! ok? marks, the ratio's digits, the footnote); `Style` carries those. What a bench
//! adds of its own (an RTT row, a socket-mode row) it adds as an `impl Report` block
//! in its own file.

use std::process::ExitCode;
use std::time::Duration;

use super::procfs::load_average;
use super::stats::{bootstrap_interval, median, Percentiles};
use super::{print_line, Result};

/// One (baseline, figure) pair per measured round.
#[derive(Default)]
pub struct Paired {
    pub rounds: Vec<[f64; 2]>,
}

impl Paired {
    pub fn push(&mut self, baseline: f64, figure: f64) {
        self.rounds.push([baseline, figure]);
    }

    pub fn median_baseline(&self) -> f64 {
        median(self.rounds.iter().map(|r| r[0]).collect())
    }

    pub fn median_figure(&self) -> f64 {
        median(self.rounds.iter().map(|r| r[1]).collect())
    }

    /// Median of per-round figure/baseline with a bootstrap 95 % interval: pairing by
    /// round cancels drift that hits both figures of a round alike.
    pub fn ratio(&self) -> (f64, f64, f64) {
        let ratios: Vec<f64> = self.rounds.iter().map(|[baseline, figure]| figure / baseline).collect();
        let (low, high) = bootstrap_interval(&ratios);
        (median(ratios), low, high)
    }

    /// Median of per-round figure − baseline with a bootstrap 95 % interval.
    pub fn difference(&self) -> (f64, f64, f64) {
        let differences: Vec<f64> = self.rounds.iter().map(|[baseline, figure]| figure - baseline).collect();
        let (low, high) = bootstrap_interval(&differences);
        (median(differences), low, high)
    }

    /// Median of per-round figure − baseline.
    pub fn median_difference(&self) -> f64 {
        median(self.rounds.iter().map(|[baseline, figure]| figure - baseline).collect())
    }
}

/// What a paired row's ratio is checked against.
pub enum Target {
    None,
    /// Informational: shown, not checked.
    Info(&'static str),
    AtMost(f64),
    AtLeast(f64),
}

impl Target {
    /// The target column's text and whether `ratio` meets it (`None`: not checked).
    fn check(self, ratio: f64) -> (String, Option<bool>) {
        match self {
            Target::None => ("-".to_string(), None),
            Target::Info(text) => (text.to_string(), None),
            Target::AtMost(limit) => (format!("<= {limit:.2}"), Some(ratio <= limit)),
            Target::AtLeast(limit) => (format!(">= {limit:.2}"), Some(ratio >= limit)),
        }
    }
}

pub struct Row {
    pub metric: String,
    pub figure: String,
    pub baseline: String,
    pub ratio: String,
    pub target: String,
    pub ok: Option<bool>,
}

/// How the two figure columns are named and ordered.
#[derive(Clone, Copy)]
pub enum Columns {
    /// "figure", then "baseline" (link, ports, sync).
    FigureBaseline,
    /// "direct" (the baseline), then "offload" (the figure): the proxy bench.
    DirectOffload,
}

/// What differs between the benches' tables.
#[derive(Clone, Copy)]
pub struct Style {
    pub columns: Columns,
    /// The ok? column for a met and a missed target.
    pub marks: [&'static str; 2],
    /// Digits after the point in the ratio column.
    pub ratio_digits: usize,
    /// The line under the summary that says what the ratios are.
    pub footnote: &'static str,
}

pub struct Report {
    pub notes: Vec<String>,
    pub rows: Vec<Row>,
    style: Style,
}

impl Report {
    pub fn new(style: Style) -> Report {
        Report { notes: Vec::new(), rows: Vec::new(), style }
    }

    pub fn note(&mut self, note: String) {
        println!("{note}");
        self.notes.push(note);
    }

    /// Rows are printed as they come, so a long run shows progress, and again as a
    /// table at the end.
    pub fn row(&mut self, row: Row) {
        match self.style.columns {
            Columns::FigureBaseline => println!(
                "  {}: {} (baseline {}), ratio {}, target {}",
                row.metric, row.figure, row.baseline, row.ratio, row.target
            ),
            Columns::DirectOffload => {
                println!(
                    "  {}: direct {}, offload {}, ratio {}",
                    row.metric, row.baseline, row.figure, row.ratio
                )
            }
        }
        self.rows.push(row);
    }

    pub fn paired(&mut self, metric: &str, figures: &Paired, format: impl Fn(f64) -> String, target: Target) {
        let (target, ok) = target.check(figures.ratio().0);
        self.paired_with(metric, figures, format, target, ok);
    }

    /// A paired row whose target is checked by the caller (an absolute bound).
    pub fn paired_with(
        &mut self,
        metric: &str,
        figures: &Paired,
        format: impl Fn(f64) -> String,
        target: String,
        ok: Option<bool>,
    ) {
        let (ratio, low, high) = figures.ratio();
        let digits = self.style.ratio_digits;
        self.row(Row {
            metric: metric.to_string(),
            figure: format(figures.median_figure()),
            baseline: format(figures.median_baseline()),
            ratio: format!("{ratio:.digits$} [{low:.digits$}, {high:.digits$}]"),
            target,
            ok,
        });
    }

    /// A paired row whose ratio column shows the per-round difference in ms instead
    /// (the caller checks the target on it).
    pub fn paired_difference(
        &mut self,
        metric: &str,
        figures: &Paired,
        format: impl Fn(f64) -> String,
        target: String,
        ok: Option<bool>,
    ) {
        let (difference, low, high) = figures.difference();
        self.row(Row {
            metric: metric.to_string(),
            figure: format(figures.median_figure()),
            baseline: format(figures.median_baseline()),
            ratio: format!("{difference:+.2} ms [{low:+.2}, {high:+.2}]"),
            target,
            ok,
        });
    }

    /// A row with one figure and no baseline.
    pub fn single(&mut self, metric: &str, value: String, target: &str, ok: Option<bool>) {
        self.row(Row {
            metric: metric.to_string(),
            figure: value,
            baseline: "-".to_string(),
            ratio: "-".to_string(),
            target: target.to_string(),
            ok,
        });
    }

    /// The row for the delay relay's measured RTT (`relay`) against the setting `set`,
    /// with the direct ping-pong as its baseline. Returns the measured p50 in ms.
    pub fn relay_rtt(&mut self, set: Duration, relay: &Percentiles, direct: &Percentiles) -> f64 {
        let ms = |nanos: f64| nanos / 1e6;
        let measured = ms(relay.p50);
        let wanted = set.as_secs_f64() * 1e3;
        // The relay's timers and this busy box add a little on top of the setting.
        let ok = measured >= wanted && measured <= wanted + 5.0;
        self.row(Row {
            metric: format!("RTT through the delay relay, TCP ping-pong p50 / p99 (ms), set {wanted:.0}"),
            figure: format!("{measured:.2} / {:.2}", ms(relay.p99)),
            baseline: format!("{:.3} / {:.3}", ms(direct.p50), ms(direct.p99)),
            ratio: "-".to_string(),
            target: format!("{wanted:.0} .. {:.0}", wanted + 5.0),
            ok: Some(ok),
        });
        measured
    }

    pub fn missed(&self) -> usize {
        self.rows.iter().filter(|row| row.ok == Some(false)).count()
    }

    /// The bench's exit status: failure (with the error) when the run failed, 2 when
    /// `strict` and a target was missed. `bench` names it in the message ("link bench").
    pub fn exit_code(&self, outcome: Result<()>, strict: bool, bench: &str) -> ExitCode {
        match outcome {
            Err(err) => {
                eprintln!("\n{bench} FAILED: {err}");
                ExitCode::FAILURE
            }
            Ok(()) if strict && self.missed() > 0 => ExitCode::from(2),
            Ok(()) => ExitCode::SUCCESS,
        }
    }

    /// The table, under `== {title} ==`, then the summary and the footnote.
    pub fn print(&self, title: &str) {
        let header = match self.style.columns {
            Columns::FigureBaseline => {
                ["metric: figure vs baseline", "figure", "baseline", "ratio [95% CI]", "target", "ok?"]
            }
            Columns::DirectOffload => ["metric", "direct", "offload", "ratio [95% CI]", "target", "ok?"],
        };
        let cells: Vec<[String; 6]> = self
            .rows
            .iter()
            .map(|row| {
                let ok = match row.ok {
                    Some(true) => self.style.marks[0],
                    Some(false) => self.style.marks[1],
                    None => "",
                };
                let (first, second) = match self.style.columns {
                    Columns::FigureBaseline => (&row.figure, &row.baseline),
                    Columns::DirectOffload => (&row.baseline, &row.figure),
                };
                [
                    row.metric.clone(),
                    first.clone(),
                    second.clone(),
                    row.ratio.clone(),
                    row.target.clone(),
                    ok.to_string(),
                ]
            })
            .collect();
        let mut widths = header.map(|h| h.chars().count());
        for row in &cells {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        println!("\n== {title} ==");
        for note in &self.notes {
            println!("  {note}");
        }
        println!("  load average at the end: {}", load_average());
        println!();
        print_line(&header.map(str::to_string), &widths);
        println!("{}", widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("-|-"));
        for row in &cells {
            print_line(row, &widths);
        }
        let checked = self.rows.iter().filter(|row| row.ok.is_some()).count();
        println!("\nsummary: {} of {checked} targets met", checked - self.missed());
        for row in self.rows.iter().filter(|row| row.ok == Some(false)) {
            let figure = match self.style.columns {
                Columns::FigureBaseline => row.figure.clone(),
                Columns::DirectOffload => format!("offload {}", row.figure),
            };
            println!("  missed: {} ({figure}, ratio {}, target {})", row.metric, row.ratio, row.target);
        }
        println!("{}", self.style.footnote);
    }
}
