//! Output for people (aligned tables, relative times, colours on a
//! terminal) and for scripts (`-o json`, `-o yaml`, stable field names).

use std::io::IsTerminal;

use chrono::{DateTime, Utc};
use serde::Serialize;
use zapflow_proto::v1 as pb;

/// How a command prints what it read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns, for people.
    #[default]
    Table,
    Json,
    Yaml,
}

/// Prints `value` as JSON or YAML (a table is the caller's to print).
pub fn print_data(format: Format, value: &impl Serialize) -> anyhow::Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Format::Yaml | Format::Table => print!("{}", serde_norway::to_string(value)?),
    }
    Ok(())
}

/// Whether to colour what goes to stdout: a terminal, and `NO_COLOR` unset.
pub fn colour_enabled() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// A word in a status's colour (when colours are on).
pub fn paint(word: &str) -> String {
    let code = match word {
        "succeeded" | "active" | "created" => "32",
        "failed" | "deleted" => "31",
        "running" | "retrying" | "pending" | "paused" | "updated" => "33",
        _ => return word.to_owned(),
    };
    if colour_enabled() {
        format!("\x1b[{code}m{word}\x1b[0m")
    } else {
        word.to_owned()
    }
}

/// A table: a header and rows, each column as wide as its widest cell.
/// Columns listed in `painted` are coloured by their text after padding.
pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
    painted: Vec<usize>,
}

impl Table {
    pub fn new(header: Vec<&'static str>) -> Self {
        Self {
            header,
            rows: Vec::new(),
            painted: Vec::new(),
        }
    }

    /// Colours the cells of column `index` by their status word.
    pub fn paint_column(mut self, index: usize) -> Self {
        self.painted.push(index);
        self
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn print(&self) {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let line = |cells: Vec<String>, paint_cells: bool| {
            let last = cells.len().saturating_sub(1);
            let text: Vec<String> = cells
                .into_iter()
                .enumerate()
                .map(|(index, cell)| {
                    let pad = widths[index].saturating_sub(cell.chars().count());
                    let shown = if paint_cells && self.painted.contains(&index) {
                        paint(&cell)
                    } else {
                        cell
                    };
                    if index == last {
                        shown
                    } else {
                        format!("{shown}{}", " ".repeat(pad))
                    }
                })
                .collect();
            println!("{}", text.join("  ").trim_end());
        };
        line(self.header.iter().map(|h| (*h).to_owned()).collect(), false);
        for row in &self.rows {
            line(row.clone(), true);
        }
    }
}

pub fn time(timestamp: Option<&prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    let timestamp = timestamp?;
    DateTime::from_timestamp(timestamp.seconds, timestamp.nanos.max(0) as u32)
}

/// RFC 3339, for scripts.
pub fn rfc3339(timestamp: Option<&prost_types::Timestamp>) -> Option<String> {
    time(timestamp).map(|time| time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

/// "5s ago", "3m ago", "2h ago", "4d ago"; "-" when unset.
pub fn ago(timestamp: Option<&prost_types::Timestamp>) -> String {
    let Some(time) = time(timestamp) else {
        return "-".into();
    };
    let seconds = (Utc::now() - time).num_seconds().max(0);
    match seconds {
        0..60 => format!("{seconds}s ago"),
        60..3600 => format!("{}m ago", seconds / 60),
        3600..86400 => format!("{}h ago", seconds / 3600),
        _ => format!("{}d ago", seconds / 86400),
    }
}

/// The time from `start` to `end` as "850ms", "2.4s", "3m12s"; "-" when
/// either is unset.
pub fn took(
    start: Option<&prost_types::Timestamp>,
    end: Option<&prost_types::Timestamp>,
) -> String {
    let (Some(start), Some(end)) = (time(start), time(end)) else {
        return "-".into();
    };
    let millis = (end - start).num_milliseconds().max(0);
    match millis {
        0..1000 => format!("{millis}ms"),
        1000..60_000 => format!("{:.1}s", millis as f64 / 1000.0),
        _ => format!("{}m{}s", millis / 60_000, millis % 60_000 / 1000),
    }
}

/// `text` cut to `max` characters, on one line.
pub fn short(text: &str, max: usize) -> String {
    let line = text.replace(['\n', '\r'], " ");
    if line.chars().count() <= max {
        line
    } else {
        let cut: String = line.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

pub fn run_status(status: i32) -> &'static str {
    match pb::RunStatus::try_from(status) {
        Ok(pb::RunStatus::Pending) => "pending",
        Ok(pb::RunStatus::Running) => "running",
        Ok(pb::RunStatus::Succeeded) => "succeeded",
        Ok(pb::RunStatus::Failed) => "failed",
        _ => "unknown",
    }
}

pub fn step_status(status: i32) -> &'static str {
    match pb::StepStatus::try_from(status) {
        Ok(pb::StepStatus::Pending) => "pending",
        Ok(pb::StepStatus::Running) => "running",
        Ok(pb::StepStatus::Retrying) => "retrying",
        Ok(pb::StepStatus::Succeeded) => "succeeded",
        Ok(pb::StepStatus::Failed) => "failed",
        Ok(pb::StepStatus::Skipped) => "skipped",
        _ => "unknown",
    }
}

pub fn zap_status(status: i32) -> &'static str {
    match pb::ZapStatus::try_from(status) {
        Ok(pb::ZapStatus::Active) => "active",
        Ok(pb::ZapStatus::Paused) => "paused",
        _ => "unknown",
    }
}
