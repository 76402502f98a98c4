//! How a long command shows that it is moving: a progress bar when it runs in a terminal, a
//! plain line at most every 10 seconds otherwise (logs, CI, output piped on), nothing in tests.

use std::{
    io::IsTerminal,
    sync::Mutex,
    time::{Duration, Instant},
};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Receives a command's progress. Every method has a do-nothing default.
pub trait Progress: Send + Sync {
    /// Publishing: `bytes` of the input read, `lines` read, `published` confirmed by the broker.
    fn publishing(&self, _bytes: u64, _lines: u64, _published: u64) {}
    /// Waiting for results: `arrived` of `expected`.
    fn waiting(&self, _arrived: u64, _expected: u64) {}
    /// Something worth a line of its own while the work goes on (a skipped input line).
    fn note(&self, _message: &str) {}
    /// The work is over: clear the bar.
    fn finish(&self) {}
}

/// Shows nothing.
pub struct Silent;

impl Progress for Silent {}

/// Collects notes, for tests.
#[derive(Default)]
pub struct Recorder {
    pub notes: Mutex<Vec<String>>,
}

impl Progress for Recorder {
    fn note(&self, message: &str) {
        self.notes.lock().unwrap_or_else(|p| p.into_inner()).push(message.to_owned());
    }
}

/// The right display on stderr: a bar when both stdout and stderr are a terminal, plain lines
/// otherwise (a redirected stdout means the run is being logged or piped on). `total_bytes` is
/// the input's size when known (a file), giving the bar an end.
pub fn for_stderr(total_bytes: Option<u64>) -> Box<dyn Progress> {
    if std::io::stderr().is_terminal() && std::io::stdout().is_terminal() {
        Box::new(Bar::new(total_bytes))
    } else {
        Box::new(Plain::new())
    }
}

/// An indicatif bar on stderr.
pub struct Bar {
    bar: ProgressBar,
    sized: bool,
}

impl Bar {
    pub fn new(total_bytes: Option<u64>) -> Self {
        let (bar, sized) = match total_bytes {
            Some(n) if n > 0 => {
                let bar = ProgressBar::with_draw_target(Some(n), ProgressDrawTarget::stderr());
                let style = ProgressStyle::with_template("{spinner} [{bar:30}] {percent:>3}% {msg} ({elapsed})")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> ");
                bar.set_style(style);
                (bar, true)
            }
            _ => {
                let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
                let style = ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner());
                bar.set_style(style);
                (bar, false)
            }
        };
        bar.enable_steady_tick(Duration::from_millis(120));
        Self { bar, sized }
    }
}

impl Progress for Bar {
    fn publishing(&self, bytes: u64, lines: u64, published: u64) {
        if self.sized {
            self.bar.set_position(bytes);
        }
        self.bar.set_message(format!("{lines} lines read, {published} published"));
    }

    fn waiting(&self, arrived: u64, expected: u64) {
        self.bar.set_message(format!("waiting for results: {arrived} of {expected}"));
    }

    fn note(&self, message: &str) {
        self.bar.println(message);
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Plain progress lines come at most this often.
pub const PLAIN_EVERY: Duration = Duration::from_secs(10);

/// A line on stderr at most every [`PLAIN_EVERY`], for output that is not a terminal.
pub struct Plain {
    every: Duration,
    last: Mutex<Option<Instant>>,
}

impl Plain {
    pub fn new() -> Self {
        Self { every: PLAIN_EVERY, last: Mutex::new(None) }
    }

    fn due(&self) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match *last {
            Some(t) if now.duration_since(t) < self.every => false,
            _ => {
                *last = Some(now);
                true
            }
        }
    }
}

impl Default for Plain {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress for Plain {
    fn publishing(&self, _bytes: u64, lines: u64, published: u64) {
        if self.due() {
            eprintln!("publishing: {lines} lines read, {published} published");
        }
    }

    fn waiting(&self, arrived: u64, expected: u64) {
        if self.due() {
            eprintln!("waiting for results: {arrived} of {expected}");
        }
    }

    fn note(&self, message: &str) {
        eprintln!("{message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_come_at_most_every_10_seconds() {
        let plain = Plain::new();
        assert!(plain.due(), "the first update is shown");
        for _ in 0..1000 {
            assert!(!plain.due(), "updates within 10 s are not");
        }
        *plain.last.lock().unwrap() = Some(Instant::now() - Duration::from_secs(9));
        assert!(!plain.due());
        *plain.last.lock().unwrap() = Some(Instant::now() - Duration::from_secs(10));
        assert!(plain.due(), "10 s later the next one is");
    }
}
