//! Transfer progress: an indicatif bar (files, bytes, rate, ETA) on a terminal, a plain line
//! every few seconds when stderr is a file or pipe, nothing with `-q`/`--no-progress`.

use crate::sync::receive::ReceiveProgress;
use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

pub enum Progress {
    Bar(ProgressBar),
    Lines {
        start: Instant,
        last: Instant,
        total_bytes: u64,
        total_files: u64,
    },
    Hidden,
}

impl Progress {
    pub fn new(enabled: bool, total_files: u64, total_bytes: u64) -> Progress {
        if !enabled {
            return Progress::Hidden;
        }
        if std::io::stderr().is_terminal() {
            let bar =
                ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{spinner} {msg} {bytes}/{total_bytes} {bar:30} {bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_message(format!("0/{total_files} files"));
            bar.enable_steady_tick(Duration::from_millis(200));
            Progress::Bar(bar)
        } else {
            let now = Instant::now();
            Progress::Lines {
                start: now,
                last: now,
                total_bytes,
                total_files,
            }
        }
    }

    pub fn update(&mut self, p: &ReceiveProgress, total_files: u64) {
        match self {
            Progress::Bar(bar) => {
                bar.set_position(p.bytes);
                bar.set_message(format!("{}/{} files", p.files, total_files));
            }
            Progress::Lines {
                start,
                last,
                total_bytes,
                total_files,
            } => {
                if last.elapsed() >= Duration::from_secs(5) {
                    *last = Instant::now();
                    let secs = start.elapsed().as_secs_f64().max(0.001);
                    eprintln!(
                        "relaymove: {}/{} files, {}/{} ({}/s)",
                        p.files,
                        total_files,
                        HumanBytes(p.bytes),
                        HumanBytes(*total_bytes),
                        HumanBytes((p.bytes as f64 / secs) as u64)
                    );
                }
            }
            Progress::Hidden => {}
        }
    }

    pub fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}
