//! Progress of a mirror on stderr. While it scans, hashes and plans: the phase and how long
//! it has run, so a big tree does not leave the screen blank. During the transfer: files,
//! bytes, percent, rate, elapsed time and ETA.
//!
//! On a terminal that is an indicatif spinner, then a bar, cleared at the end. When stderr
//! is a file or a pipe (cron, a log), redraws would be noise: a plain line every 5 s instead,
//! each with a timestamp, and percent and ETA during the transfer. Nothing with
//! `-q`/`--no-progress`. Logic never prints progress itself; it tells a [`Progress`].

use crate::sync::receive::ReceiveProgress;
use indicatif::{HumanBytes, HumanDuration, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often a line is written when stderr is not a terminal.
const LINE_EVERY: Duration = Duration::from_secs(5);

/// The display of one mirror; cleared (or its lines stopped) when dropped.
pub enum Progress {
    Bar { bar: ProgressBar, total_files: u64 },
    Lines(Lines),
    Hidden,
}

impl Progress {
    /// A bar on a terminal, lines otherwise, nothing when not `enabled`.
    pub fn new(enabled: bool) -> Progress {
        if !enabled {
            Progress::Hidden
        } else if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.enable_steady_tick(Duration::from_millis(200));
            Progress::Bar {
                bar,
                total_files: 0,
            }
        } else {
            Progress::Lines(Lines::start())
        }
    }

    /// A phase whose size is not known beforehand: scanning, hashing, planning.
    pub fn phase(&mut self, what: String) {
        match self {
            Progress::Bar { bar, .. } => {
                bar.set_message(what);
                bar.set_style(style("{spinner} {msg} ({elapsed})"));
                bar.reset();
            }
            Progress::Lines(lines) => lines.set(State::Phase {
                what,
                since: Instant::now(),
            }),
            Progress::Hidden => {}
        }
    }

    /// The transfer of `total_files` files holding `total_bytes`.
    pub fn transfer(&mut self, total_files: u64, total_bytes: u64) {
        match self {
            Progress::Bar {
                bar,
                total_files: total,
            } => {
                *total = total_files;
                bar.set_message(format!("0/{total_files} files"));
                bar.set_length(total_bytes);
                bar.set_style(style(
                    "{spinner} {msg} {bytes}/{total_bytes} {bar:30} {percent}% {bytes_per_sec}, \
                     {elapsed} elapsed, ETA {eta}",
                ));
                bar.reset();
            }
            Progress::Lines(lines) => lines.set(State::Transfer {
                done: ReceiveProgress::default(),
                total_files,
                total_bytes,
                since: Instant::now(),
            }),
            Progress::Hidden => {}
        }
    }

    /// The receiver's count of what it has written.
    pub fn update(&mut self, p: &ReceiveProgress) {
        match self {
            Progress::Bar { bar, total_files } => {
                bar.set_position(p.bytes);
                bar.set_message(format!("{}/{total_files} files", p.files));
            }
            Progress::Lines(lines) => lines.update(p),
            Progress::Hidden => {}
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Progress::Bar { bar, .. } = self {
            bar.finish_and_clear();
        }
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// What a progress line describes.
#[derive(Clone, Debug)]
pub enum State {
    Phase {
        what: String,
        since: Instant,
    },
    Transfer {
        done: ReceiveProgress,
        total_files: u64,
        total_bytes: u64,
        since: Instant,
    },
}

/// A line every [`LINE_EVERY`] from a thread of its own, so that a phase that reports
/// nothing while it runs (a scan) still gets its lines. Dropping it stops the thread.
pub struct Lines {
    state: Arc<Mutex<Option<State>>>,
    stop: Option<mpsc::Sender<()>>,
    writer: Option<JoinHandle<()>>,
}

impl Lines {
    fn start() -> Lines {
        let state: Arc<Mutex<Option<State>>> = Arc::new(Mutex::new(None));
        let (stop, stopped) = mpsc::channel::<()>();
        let shown = state.clone();
        let writer = std::thread::spawn(move || {
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(LINE_EVERY) {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                if let Some(state) = lock(&shown).as_ref() {
                    eprintln!("{}", line(state, now, Instant::now()));
                }
            }
        });
        Lines {
            state,
            stop: Some(stop),
            writer: Some(writer),
        }
    }

    fn set(&self, state: State) {
        *lock(&self.state) = Some(state);
    }

    fn update(&self, p: &ReceiveProgress) {
        if let Some(State::Transfer { done, .. }) = lock(&self.state).as_mut() {
            *done = *p;
        }
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        // A closed channel ends the writer's wait at once.
        drop(self.stop.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// A panic elsewhere while holding the lock leaves the state as good as it was.
fn lock(state: &Mutex<Option<State>>) -> std::sync::MutexGuard<'_, Option<State>> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// One progress line for a log: the time (UTC), then the phase and how long it has run, or
/// the transfer's files, bytes, percent, rate, elapsed time and ETA. `now` is Unix seconds.
pub fn line(state: &State, now: u64, at: Instant) -> String {
    let time = crate::report::utc(now);
    let duration = |d: Duration| format!("{:#}", HumanDuration(d));
    match state {
        State::Phase { what, since } => {
            format!("{time} relaymove: {what} ({})", duration(at - *since))
        }
        State::Transfer {
            done,
            total_files,
            total_bytes,
            since,
        } => {
            let elapsed = at - *since;
            // By bytes; by files when there are no bytes to send (symlinks, empty files).
            let fraction = match (*total_bytes, *total_files) {
                (0, 0) => 1.0,
                (0, files) => done.files as f64 / files as f64,
                (bytes, _) => done.bytes as f64 / bytes as f64,
            }
            .min(1.0);
            let eta = if fraction > 0.0 {
                duration(elapsed.mul_f64((1.0 - fraction) / fraction))
            } else {
                "unknown".to_string()
            };
            let rate = done.bytes as f64 / elapsed.as_secs_f64().max(0.001);
            format!(
                "{time} relaymove: {}/{total_files} files, {}/{} ({:.0}%), {}/s, {} elapsed, ETA {eta}",
                done.files,
                HumanBytes(done.bytes),
                HumanBytes(*total_bytes),
                fraction * 100.0,
                HumanBytes(rate as u64),
                duration(elapsed),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_795_000_000;

    #[test]
    fn a_phase_line_has_a_timestamp_and_the_time_the_phase_has_run() {
        let since = Instant::now();
        let state = State::Phase {
            what: "scanning old:/srv/mail and new:/srv/mail".into(),
            since,
        };
        assert_eq!(
            line(&state, NOW, since + Duration::from_secs(15)),
            "2026-11-18 11:06:40 UTC relaymove: scanning old:/srv/mail and new:/srv/mail (15s)"
        );
    }

    #[test]
    fn a_transfer_line_has_a_timestamp_percent_rate_elapsed_time_and_eta() {
        let since = Instant::now();
        let state = State::Transfer {
            done: ReceiveProgress {
                files: 100,
                bytes: 25 << 20,
                wire_bytes: 0,
            },
            total_files: 400,
            total_bytes: 100 << 20,
            since,
        };
        assert_eq!(
            line(&state, NOW, since + Duration::from_secs(10)),
            "2026-11-18 11:06:40 UTC relaymove: 100/400 files, 25.00 MiB/100.00 MiB (25%), \
             2.50 MiB/s, 10s elapsed, ETA 30s"
        );
    }

    #[test]
    fn before_the_first_byte_the_eta_is_unknown_and_without_bytes_files_count() {
        let since = Instant::now();
        let transfer = |files, total_bytes| State::Transfer {
            done: ReceiveProgress {
                files,
                bytes: 0,
                wire_bytes: 0,
            },
            total_files: 4,
            total_bytes,
            since,
        };
        let at = since + Duration::from_secs(6);
        assert!(line(&transfer(0, 1000), NOW, at).ends_with("(0%), 0 B/s, 6s elapsed, ETA unknown"));
        assert!(line(&transfer(2, 0), NOW, at).ends_with("(50%), 0 B/s, 6s elapsed, ETA 6s"));
    }
}
