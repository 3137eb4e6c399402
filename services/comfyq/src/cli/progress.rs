//! Progress of a followed job: an indicatif bar when stderr is a terminal,
//! otherwise one plain line per change of phase (logs and CI stay readable;
//! the tests read these lines).

use std::io::Write;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::Console;

/// The bar's length: the job's `fraction` in thousandths.
const JOB_STEPS: u64 = 1000;

pub(crate) struct Progress {
    bar: Option<ProgressBar>,
    /// The last plain line, so a repeated phase is not printed again.
    last_line: String,
}

impl Progress {
    pub(crate) fn for_job(console: &Console) -> Self {
        let bar = console.bars.then(|| {
            let bar = ProgressBar::with_draw_target(Some(JOB_STEPS), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner:.cyan} {elapsed:>4} [{bar:32.cyan/blue}] {percent:>3}% {wide_msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Self {
            bar,
            last_line: String::new(),
        }
    }

    /// A new phase or message (`queued, 3 ahead`, `node 4 KSampler 12/20`).
    /// `plain` says whether it is worth a line when there is no bar (step
    /// counters are not).
    pub(crate) fn set(&mut self, console: &mut Console, message: &str, plain: bool) {
        match &self.bar {
            Some(bar) => bar.set_message(message.to_owned()),
            None if plain && message != self.last_line => {
                let _ = writeln!(console.err, "{message}");
                self.last_line = message.to_owned();
            }
            None => {}
        }
    }

    /// The whole job's progress, 0.0 to 1.0.
    pub(crate) fn set_fraction(&self, fraction: f64) {
        if let Some(bar) = &self.bar {
            bar.set_position((fraction.clamp(0.0, 1.0) * JOB_STEPS as f64) as u64);
        }
    }

    /// Ends the bar, leaving `message` as its last line.
    pub(crate) fn finish(&mut self, console: &mut Console, message: &str) {
        match self.bar.take() {
            Some(bar) => {
                bar.set_position(JOB_STEPS);
                bar.finish_with_message(message.to_owned());
            }
            None => {
                let _ = writeln!(console.err, "{message}");
            }
        }
    }

    /// Ends the bar where it is (the job did not complete).
    pub(crate) fn abandon(&mut self, console: &mut Console, message: &str) {
        match self.bar.take() {
            Some(bar) => bar.abandon_with_message(message.to_owned()),
            None => {
                let _ = writeln!(console.err, "{message}");
            }
        }
    }
}

/// A byte-counting bar for one download (hidden without a terminal).
pub(crate) fn download_bar(console: &Console, name: &str, size: u64) -> ProgressBar {
    if !console.bars {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(size), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "  {msg:<28!} [{bar:32.green/blue}] {bytes:>9}/{total_bytes:<9} {bytes_per_sec}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(name.to_owned());
    bar
}
