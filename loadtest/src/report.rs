//! A scenario's results: latency rows, value rows (throughput, counts), process
//! figures, each optionally next to its baseline; printed as a table or JSON.

use serde::Serialize;

use crate::hist::{Latency, Summary};
use crate::procstat::ProcStat;

#[derive(Debug, Default, Serialize)]
pub(crate) struct Report {
    pub(crate) scenario: String,
    pub(crate) settings: serde_json::Value,
    pub(crate) latencies: Vec<LatencyRow>,
    pub(crate) values: Vec<ValueRow>,
    pub(crate) processes: Vec<ProcStat>,
    /// Figures per interval (soak), one object per interval.
    pub(crate) series: Vec<serde_json::Value>,
    pub(crate) notes: Vec<String>,
    /// A scenario's own figures beyond rows (`chaos`: faults, evidence).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) details: Option<serde_json::Value>,
    /// Promises the run broke (the process then exits with 1).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) broken: Vec<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct LatencyRow {
    pub(crate) metric: String,
    #[serde(flatten)]
    pub(crate) summary: Summary,
    /// The baseline this row is compared with, and the ratios p50/p50 and p99/p99.
    pub(crate) baseline: Option<String>,
    pub(crate) ratio_p50: Option<f64>,
    pub(crate) ratio_p99: Option<f64>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ValueRow {
    pub(crate) metric: String,
    pub(crate) value: f64,
    pub(crate) unit: String,
    pub(crate) baseline: Option<String>,
    pub(crate) ratio: Option<f64>,
}

impl Report {
    pub(crate) fn new(scenario: &str, settings: serde_json::Value) -> Self {
        Self {
            scenario: scenario.to_owned(),
            settings,
            ..Self::default()
        }
    }

    /// Adds a latency row (skipped when empty, with a note).
    pub(crate) fn latency(&mut self, metric: &str, histogram: &Latency) {
        if histogram.len() == 0 {
            self.notes.push(format!("{metric}: no samples"));
            return;
        }
        self.latencies.push(LatencyRow {
            metric: metric.to_owned(),
            summary: histogram.summary(),
            baseline: None,
            ratio_p50: None,
            ratio_p99: None,
        });
    }

    /// Adds a latency row compared with the row `baseline` (already added).
    pub(crate) fn latency_vs(&mut self, metric: &str, histogram: &Latency, baseline: &str) {
        self.latency(metric, histogram);
        let base = self
            .latencies
            .iter()
            .find(|row| row.metric == baseline)
            .map(|row| row.summary);
        if let (Some(base), Some(row)) = (base, self.latencies.last_mut())
            && row.metric == metric
        {
            row.baseline = Some(baseline.to_owned());
            row.ratio_p50 = ratio(row.summary.p50_ms, base.p50_ms);
            row.ratio_p99 = ratio(row.summary.p99_ms, base.p99_ms);
        }
    }

    pub(crate) fn value(&mut self, metric: &str, value: f64, unit: &str) {
        self.values.push(ValueRow {
            metric: metric.to_owned(),
            value,
            unit: unit.to_owned(),
            baseline: None,
            ratio: None,
        });
    }

    /// Adds a value compared with the value row `baseline` (already added).
    pub(crate) fn value_vs(&mut self, metric: &str, value: f64, unit: &str, baseline: &str) {
        let base = self
            .values
            .iter()
            .find(|row| row.metric == baseline)
            .map(|row| row.value);
        self.values.push(ValueRow {
            metric: metric.to_owned(),
            value,
            unit: unit.to_owned(),
            baseline: base.map(|_| baseline.to_owned()),
            ratio: base.and_then(|base| ratio(value, base)),
        });
    }

    /// Compares the existing latency row `metric` with the row `baseline`.
    pub(crate) fn compare(&mut self, metric: &str, baseline: &str) {
        let base = self
            .latencies
            .iter()
            .find(|row| row.metric == baseline)
            .map(|row| row.summary);
        if let (Some(base), Some(row)) = (
            base,
            self.latencies.iter_mut().find(|row| row.metric == metric),
        ) {
            row.baseline = Some(baseline.to_owned());
            row.ratio_p50 = ratio(row.summary.p50_ms, base.p50_ms);
            row.ratio_p99 = ratio(row.summary.p99_ms, base.p99_ms);
        }
    }

    /// The summary of the latency row `metric`, if present.
    pub(crate) fn summary(&self, metric: &str) -> Option<Summary> {
        self.latencies
            .iter()
            .find(|row| row.metric == metric)
            .map(|row| row.summary)
    }

    pub(crate) fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    pub(crate) fn print(&self) {
        println!("== {} ==", self.scenario);
        println!("settings: {}", self.settings);
        if !self.latencies.is_empty() {
            println!(
                "{:<50} {:>7} {:>9} {:>9} {:>9} {:>9}  vs baseline (p50×, p99×)",
                "latency", "n", "p50 ms", "p90 ms", "p99 ms", "max ms"
            );
            for row in &self.latencies {
                let s = row.summary;
                let versus = match (&row.baseline, row.ratio_p50, row.ratio_p99) {
                    (Some(base), Some(p50), Some(p99)) => format!("{base}: {p50:.1}×, {p99:.1}×"),
                    _ => String::new(),
                };
                println!(
                    "{:<50} {:>7} {:>9.3} {:>9.3} {:>9.3} {:>9.3}  {versus}",
                    row.metric, s.n, s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms
                );
            }
        }
        if !self.values.is_empty() {
            println!("{:<50} {:>14} {:<10} vs baseline", "value", "", "unit");
            for row in &self.values {
                let versus = match (&row.baseline, row.ratio) {
                    (Some(base), Some(ratio)) => format!("{base}: {ratio:.3}×"),
                    _ => String::new(),
                };
                println!(
                    "{:<50} {:>14.2} {:<10} {versus}",
                    row.metric, row.value, row.unit
                );
            }
        }
        if !self.processes.is_empty() {
            println!(
                "{:<40} {:>8} {:>10} {:>10} {:>10} {:>10}",
                "process", "pid", "RSS MiB", "peak MiB", "user s", "system s"
            );
            for p in &self.processes {
                println!(
                    "{:<40} {:>8} {:>10.1} {:>10.1} {:>10.2} {:>10.2}",
                    p.process, p.pid, p.rss_mib, p.peak_rss_mib, p.cpu_user_s, p.cpu_system_s
                );
            }
        }
        for row in &self.series {
            println!("interval {row}");
        }
        for note in &self.notes {
            println!("note: {note}");
        }
        if let Some(details) = &self.details {
            println!(
                "details: {}",
                serde_json::to_string_pretty(details).unwrap_or_default()
            );
        }
        for broken in &self.broken {
            println!("BROKEN: {broken}");
        }
        println!();
    }
}

fn ratio(value: f64, base: f64) -> Option<f64> {
    (base > 0.0).then(|| value / base)
}
