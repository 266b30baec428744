//! Steps of a long command, shown as they happen (a spinner on a terminal, one line per step
//! otherwise) with the time each took.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// One finished step.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StepTime {
    pub step: String,
    pub seconds: f64,
}

pub struct Steps {
    started: Option<(String, Instant, Option<ProgressBar>)>,
    pub done: Vec<StepTime>,
    tty: bool,
}

impl Steps {
    pub fn new() -> Steps {
        Steps {
            started: None,
            done: Vec::new(),
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// Starts step `what` (finishing none: call [`Steps::ok`] or [`Steps::fail`] first).
    pub fn start(&mut self, what: &str) {
        let bar = self.tty.then(|| {
            let b = ProgressBar::new_spinner();
            b.set_style(
                ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            b.set_message(what.to_string());
            b.enable_steady_tick(Duration::from_millis(100));
            b
        });
        self.started = Some((what.to_string(), Instant::now(), bar));
    }

    /// The step in progress succeeded; `detail` is added to its line.
    pub fn ok(&mut self, detail: &str) {
        if let Some((what, t0, bar)) = self.started.take() {
            let secs = t0.elapsed().as_secs_f64();
            let line = if detail.is_empty() {
                format!("✓ {what} ({secs:.2} s)")
            } else {
                format!("✓ {what}: {detail} ({secs:.2} s)")
            };
            finish(bar, line);
            self.done.push(StepTime {
                step: what,
                seconds: secs,
            });
        }
    }

    /// The step in progress failed.
    pub fn fail(&mut self) {
        if let Some((what, t0, bar)) = self.started.take() {
            let line = format!("✗ {what} ({:.2} s)", t0.elapsed().as_secs_f64());
            finish(bar, line);
        }
    }

    pub fn total(&self) -> f64 {
        self.done.iter().map(|s| s.seconds).sum()
    }
}

fn finish(bar: Option<ProgressBar>, line: String) {
    match bar {
        Some(b) => {
            if let Ok(style) = ProgressStyle::with_template("{msg}") {
                b.set_style(style);
            }
            b.finish_with_message(line);
        }
        None => eprintln!("{line}"),
    }
}
