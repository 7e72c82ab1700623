//! Rank 0's progress bar (indicatif) when stderr is a terminal: step, loss,
//! samples/s and ETA. Log lines are written through [`LogWriter`], which
//! suspends the bar while a line is printed, so the two never tear each
//! other. Where stderr is a file (Slurm logs) there is no bar, only the plain
//! step lines.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::sync::OnceLock;

static BAR: OnceLock<ProgressBar> = OnceLock::new();

/// Show a bar over `total` steps from `start` (rank 0, stderr a terminal, plain logs).
pub fn start(total: usize, start: usize) {
    if !std::io::stderr().is_terminal() || BAR.get().is_some() {
        return;
    }
    let bar = ProgressBar::new(total as u64);
    let style = ProgressStyle::with_template("{bar:30.cyan/blue} step {pos}/{len} {msg} [{elapsed_precise} ETA {eta}]")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_position(start as u64);
    let _ = BAR.set(bar);
}

/// Move the bar to step `done` with the step's figures.
pub fn step(done: usize, loss: f64, samples_per_s: f64) {
    if let Some(bar) = BAR.get() {
        bar.set_position(done as u64);
        bar.set_message(format!("loss {loss:.4} {samples_per_s:.0} samples/s"));
    }
}

/// Remove the bar (end of training).
pub fn finish() {
    if let Some(bar) = BAR.get() {
        bar.finish_and_clear();
    }
}

/// stderr for tracing: each line is written with the bar (if any) suspended.
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match BAR.get() {
            Some(bar) if !bar.is_finished() => bar.suspend(|| std::io::stderr().write(buf)),
            _ => std::io::stderr().write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> Self::Writer {
        LogWriter
    }
}
