//! How the stream is compressed: not at all (two local trees), at a fixed zstd level
//! (`--compress-level`), or at a level that follows the link.
//!
//! No level suits every link. Over loopback or 10 Gbit/s compressing costs more CPU than it
//! saves (measured on the benchmark's mail tree: level 1 takes 3× the CPU of level -1 and
//! decompresses 3× slower, for 0.66 of the size instead of 0.85); over a home uplink level 3
//! and up carry more mail a second. The adaptive stream therefore measures what it cares
//! about, uncompressed bytes taken a second, which back-pressure from the slowest stage
//! (this CPU, the link, the receiver) bounds, and moves through [`LADDER`] towards the level
//! that takes the most. Like zstd's `--adapt` it watches whether the sender waits for its
//! output: a sender that does not is the bottleneck and steps down at once. But waiting does
//! not say that a dearer level would help, since a receiver short of CPU (on a shared or
//! loaded machine) makes any link look slow: that is tried, and kept only when the stream
//! moves clearly more. The level changes mid-frame (zstd's multi-threaded mode applies it
//! from its next job), so the receiver sees one ordinary zstd stream.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{self, Write};
use std::time::{Duration, Instant};
use zstd::zstd_safe::CParameter;

/// Uncompressed bytes an adaptive stream took at each zstd level, cheapest level first.
pub type LevelsTaken = Vec<(i32, u64)>;

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar (both agents on one host).
    None,
    /// zstd at this level throughout.
    Level(i32),
    /// zstd from level 1, then at the level that moves the most data (see the module).
    Adaptive,
}

impl Compression {
    pub fn is_compressed(self) -> bool {
        self != Compression::None
    }
}

/// The levels an adaptive stream moves through, cheapest first, and where it starts.
/// Measured on the benchmark's mail tree, one thread: -5000 is little more than a copy (0.5
/// CPU-s a GB to compress, 0.25 to decompress, nothing saved); -50 saves 12% for 1.4 and 0.7;
/// -1 saves 15% (too close to -50 for a try to tell them apart, so a climb would stop
/// there); 1 saves 34% for about 3.5 and 1.9. Above 6 a level costs a production server much
/// CPU for a few percent.
const LADDER: [i32; 5] = [-5000, -50, 1, 3, 6];
const START: usize = 2;
/// A window measures one level's throughput: half a second and 8 MiB at least. After a
/// change, 0.1 s and 32 MiB are skipped first: zstd's workers (a few jobs of 2 MiB and
/// more), the pipes, ssh and the socket still hold what was compressed at the level before,
/// and on a slow link that sets the pace for seconds (measured on 40 Mbit/s: tries judged
/// after 0.1 s, then after 16 MiB, still kept level -50 where 1 was 25% faster).
const WINDOW: Duration = Duration::from_millis(500);
const WINDOW_BYTES: u64 = 8 << 20;
const SETTLE: Duration = Duration::from_millis(100);
const SETTLE_BYTES: u64 = 32 << 20;
/// A sender that waits for its output less than this share of a window is what limits the
/// stream (its CPU or disk): a cheaper level can only help, and is taken without a try.
const SENDER_BOUND: f64 = 0.2;
/// A try of a neighbour lasts this many windows, compared by their mean: a dearer level
/// must prove itself over two.
const CHEAPER_TRY_WINDOWS: u32 = 1;
const DEARER_TRY_WINDOWS: u32 = 2;
/// What a tried neighbour must move, against the level it was tried from, to be taken.
/// Cheaper is taken unless clearly slower, dearer only when clearly faster: CPU spent on
/// compressing is CPU a production server's own work does not get, and windows of one level
/// differ by up to 20% on a mixed tree (measured), so a small gain is noise.
const CHEAPER_TAKEN_ABOVE: f64 = 0.97;
const DEARER_TAKEN_ABOVE: f64 = 1.10;
/// At most this many windows between tries of a neighbour level: a try costs 40 MiB and
/// more at a worse level (the settling and its window), which on a slow link must stay a
/// small part of the stream.
const MAX_HOLD: u32 = 32;

/// Hill-climbing over [`LADDER`]: stay on the best level so far, now and then try a
/// neighbour for two windows, keep it if it moved more data. A failed try doubles the wait
/// before the next one and turns to the other neighbour, so a stream long on the right
/// level spends little of its time on others.
#[derive(Debug)]
pub struct LevelSearch {
    at: usize,
    /// The try under way: the level it started from, windows left, sum of their rates.
    trying: Option<Try>,
    /// Bytes a second measured at the current level (its windows averaged).
    rate: Option<f64>,
    /// Windows to stay before the next try, and which way it goes (-1 or 1).
    hold: u32,
    wait: u32,
    direction: isize,
    window_start: Instant,
    /// Bytes still to skip before the window starts (see `SETTLE_BYTES`).
    settling: u64,
    window_bytes: u64,
    window_blocked: Duration,
    /// Uncompressed bytes taken at each level, for the report.
    taken: [u64; LADDER.len()],
}

/// How many windows a try from level `from` to `to` lasts, and the share of `from`'s rate
/// it must beat to be kept.
fn try_terms(from: usize, to: usize) -> (u32, f64) {
    if to < from {
        (CHEAPER_TRY_WINDOWS, CHEAPER_TAKEN_ABOVE)
    } else {
        (DEARER_TRY_WINDOWS, DEARER_TAKEN_ABOVE)
    }
}

#[derive(Debug, Clone, Copy)]
struct Try {
    from: usize,
    from_rate: f64,
    windows: u32,
    sum: f64,
}

impl LevelSearch {
    pub fn new(now: Instant) -> LevelSearch {
        LevelSearch {
            at: START,
            trying: None,
            rate: None,
            hold: 1,
            wait: 0,
            direction: -1,
            window_start: now + SETTLE,
            settling: SETTLE_BYTES,
            window_bytes: 0,
            window_blocked: Duration::ZERO,
            taken: [0; LADDER.len()],
        }
    }

    pub fn level(&self) -> i32 {
        LADDER[self.at]
    }

    /// Counts `bytes` taken at `now`, after waiting `blocked` for the output to take what
    /// they became; returns the next level when it changes.
    pub fn taken(&mut self, bytes: u64, blocked: Duration, now: Instant) -> Option<i32> {
        self.taken[self.at] += bytes;
        if self.settling > 0 || now < self.window_start {
            self.settling = self.settling.saturating_sub(bytes);
            if now >= self.window_start {
                // Time is up, bytes are not: the window starts when they are.
                self.window_start = now;
            }
            return None;
        }
        self.window_bytes += bytes;
        self.window_blocked += blocked;
        let elapsed = now - self.window_start;
        if elapsed < WINDOW || self.window_bytes < WINDOW_BYTES {
            return None;
        }
        let rate = self.window_bytes as f64 / elapsed.as_secs_f64();
        let waited = self.window_blocked.as_secs_f64() / elapsed.as_secs_f64();
        self.window_bytes = 0;
        self.window_blocked = Duration::ZERO;
        self.window_start = now;
        let next = self.decide(rate, waited);
        if next == self.at {
            return None;
        }
        self.at = next;
        self.window_start = now + SETTLE;
        self.settling = SETTLE_BYTES;
        Some(LADDER[next])
    }

    fn decide(&mut self, rate: f64, waited: f64) -> usize {
        let at = self.at;
        if let Some(mut t) = self.trying.take() {
            t.windows -= 1;
            t.sum += rate;
            if t.windows > 0 {
                self.trying = Some(t);
                return at;
            }
            let (windows, taken_above) = try_terms(t.from, at);
            let tried = t.sum / windows as f64;
            if tried > t.from_rate * taken_above {
                self.rate = Some(tried);
                self.hold = 1;
                self.wait = 2;
                // Keep going the same way, unless this is the ladder's end.
                return match at.checked_add_signed(self.direction) {
                    Some(next) if next < LADDER.len() => self.start_try(at, next),
                    _ => at,
                };
            }
            self.hold = (self.hold * 2).min(MAX_HOLD);
            self.wait = self.hold;
            self.direction = -self.direction;
            self.rate = Some(t.from_rate);
            return t.from;
        }
        // Staying on a level, its windows are averaged.
        let rate = self.rate.map_or(rate, |old| (old + rate) / 2.0);
        self.rate = Some(rate);
        if waited < SENDER_BOUND {
            // Nothing to try: a dearer level would only slow the sender down more.
            if at == 0 {
                return at;
            }
            self.rate = None;
            self.direction = -1;
            return at - 1;
        }
        if self.wait > 0 {
            self.wait -= 1;
            return at;
        }
        for direction in [self.direction, -self.direction] {
            if let Some(next) = at.checked_add_signed(direction) {
                if next < LADDER.len() {
                    self.direction = direction;
                    return self.start_try(at, next);
                }
            }
        }
        at
    }

    fn start_try(&mut self, from: usize, to: usize) -> usize {
        let Some(from_rate) = self.rate else {
            return from;
        };
        self.trying = Some(Try {
            from,
            from_rate,
            windows: try_terms(from, to).0,
            sum: 0.0,
        });
        to
    }

    /// The levels that took any bytes.
    pub fn report(&self) -> LevelsTaken {
        LADDER
            .iter()
            .zip(self.taken)
            .filter(|(_, bytes)| *bytes > 0)
            .map(|(level, bytes)| (*level, bytes))
            .collect()
    }
}

/// Where the tar goes: straight out, or through zstd at a fixed or searched level.
pub enum Output<W: Write> {
    Plain(W),
    Zstd {
        encoder: zstd::stream::write::Encoder<'static, Timed<W>>,
        search: Option<Box<LevelSearch>>,
    },
}

impl<W: Write> Output<W> {
    pub fn new(out: W, compression: Compression, threads: u32) -> Result<Output<W>> {
        let (level, search) = match compression {
            Compression::None => return Ok(Output::Plain(out)),
            Compression::Level(level) => (level, None),
            Compression::Adaptive => {
                let search = Box::new(LevelSearch::new(Instant::now()));
                (search.level(), Some(search))
            }
        };
        let timed = Timed {
            inner: out,
            blocked: Duration::ZERO,
        };
        let mut encoder =
            zstd::stream::write::Encoder::new(timed, level).context("starting zstd")?;
        // Only zstd's multi-threaded mode takes a new level mid-frame: an adaptive stream
        // uses it even with one worker.
        if threads > 1 || search.is_some() {
            encoder
                .multithread(threads.max(1))
                .context("starting zstd workers")?;
            // zstd sizes a worker's job at four windows (2 MiB at level 1, 8 MiB from level
            // 3) and keeps several in flight, in and out: SRC's agent of a first copy over
            // SSH peaked at 40 MB with them, 32 with jobs of 1 MiB, as fast (7.2 s either
            // way on the benchmark's tree, loopback, 2 cores).
            encoder
                .set_parameter(CParameter::JobSize(1 << 20))
                .context("sizing zstd's jobs")?;
        }
        encoder.include_checksum(true)?;
        Ok(Output::Zstd { encoder, search })
    }

    /// Ends the stream; returns the writer and, for an adaptive stream, the bytes taken at
    /// each level.
    pub fn finish(self) -> Result<(W, LevelsTaken)> {
        match self {
            Output::Plain(out) => Ok((out, Vec::new())),
            Output::Zstd { encoder, search } => {
                let levels = search.map(|s| s.report()).unwrap_or_default();
                Ok((encoder.finish().context("finishing zstd")?.inner, levels))
            }
        }
    }
}

impl<W: Write> Write for Output<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Output::Plain(out) => out.write(buf),
            Output::Zstd { encoder, search } => {
                let n = encoder.write(buf)?;
                let blocked = std::mem::take(&mut encoder.get_mut().blocked);
                let next = search
                    .as_mut()
                    .and_then(|s| s.taken(n as u64, blocked, Instant::now()));
                if let Some(level) = next {
                    // A level zstd would not take ends the search, not the stream.
                    if encoder
                        .set_parameter(CParameter::CompressionLevel(level))
                        .is_err()
                    {
                        *search = None;
                    }
                }
                Ok(n)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Output::Plain(out) => out.flush(),
            Output::Zstd { encoder, .. } => encoder.flush(),
        }
    }
}

/// The stream's writer, timing how long writes to it wait (a full pipe, a slow link).
pub struct Timed<W: Write> {
    inner: W,
    blocked: Duration,
}

impl<W: Write> Write for Timed<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let start = Instant::now();
        let n = self.inner.write(buf);
        self.blocked += start.elapsed();
        n
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds a search from a simulated pipeline whose throughput at each level is `rate`
    /// (bytes a second), the sender waiting for its output `waited` of the time, for
    /// `seconds`; returns the share of bytes taken at each level. As in zstd's workers, the
    /// pace is set by the level of the input taken 10 MiB before.
    fn run(mut rate: impl FnMut(i32) -> f64, waited: f64, seconds: f64) -> Vec<(i32, f64)> {
        const LAG: u64 = 10 << 20;
        let start = Instant::now();
        let mut search = LevelSearch::new(start);
        let step = Duration::from_millis(10);
        let mut now = start;
        // (bytes taken before, level from then on)
        let mut changes: Vec<(u64, i32)> = vec![(0, search.level())];
        let mut total = 0u64;
        while (now - start).as_secs_f64() < seconds {
            now += step;
            let pace = changes
                .iter()
                .rev()
                .find(|(from, _)| *from <= total.saturating_sub(LAG))
                .map_or(search.level(), |(_, level)| *level);
            let bytes = (rate(pace) * step.as_secs_f64()) as u64;
            total += bytes;
            if let Some(level) = search.taken(bytes, step.mul_f64(waited), now) {
                changes.push((total, level));
            }
        }
        let total: u64 = search.report().iter().map(|(_, b)| b).sum();
        search
            .report()
            .into_iter()
            .map(|(l, b)| (l, b as f64 / total as f64))
            .collect()
    }

    fn share(report: &[(i32, f64)], level: i32) -> f64 {
        report
            .iter()
            .find(|(l, _)| *l == level)
            .map_or(0.0, |(_, s)| *s)
    }

    #[test]
    fn on_a_fast_link_the_stream_settles_on_the_cheapest_level() {
        // The receiver shares this CPU (loopback): every step down is a little faster, and
        // the sender waits for its output half the time.
        let report = run(|level| 200e6 - 10e6 * level as f64, 0.5, 10.0);
        assert!(share(&report, -5000) > 0.6, "{report:?}");
    }

    #[test]
    fn a_sender_that_cannot_keep_up_steps_down_without_trying() {
        // Compressing is the bottleneck: the output never waits.
        let report = run(|level| 100e6 - 10e6 * level as f64, 0.05, 4.0);
        assert!(share(&report, -5000) > 0.5, "{report:?}");
        assert!(share(&report, 3) + share(&report, 6) == 0.0, "{report:?}");
    }

    #[test]
    fn on_a_slow_link_the_stream_climbs_to_the_level_that_carries_most() {
        // 40 Mbit/s of compressed bytes: what a level's ratio makes of it.
        let ratio = |level: i32| match level {
            -5000 => 1.0,
            -50 => 0.88,
            1 => 0.66,
            3 => 0.60,
            _ => 0.50,
        };
        let report = run(|level| 5e6 / ratio(level), 0.9, 200.0);
        assert!(share(&report, 6) > 0.6, "{report:?}");
        assert!(
            share(&report, -5000) + share(&report, -50) < 0.05,
            "{report:?}"
        );
    }

    #[test]
    fn when_the_level_makes_no_difference_the_cheapest_is_used() {
        // A disk-bound sender: every level moves the same.
        let report = run(|_| 100e6, 0.1, 30.0);
        assert!(share(&report, -5000) > 0.8, "{report:?}");
    }

    #[test]
    fn noisy_windows_do_not_hide_which_way_the_link_wants() {
        // Windows of one level vary by ±20% (a mixed tree), as measured over SSH.
        let noisy = |rate: fn(i32) -> f64| {
            let seed = std::cell::Cell::new(12345u64);
            move |level| {
                seed.set(seed.get().wrapping_mul(6364136223846793005).wrapping_add(1));
                let noise = (seed.get() >> 33) as f64 / (1u64 << 31) as f64; // 0..1
                rate(level) * (0.8 + 0.4 * noise)
            }
        };
        let fast = run(noisy(|level| 200e6 - 5e6 * level as f64), 0.5, 10.0);
        assert!(
            share(&fast, 1) + share(&fast, 3) + share(&fast, 6) < 0.3,
            "{fast:?}"
        );
        let slow = run(
            noisy(|level| {
                5e6 / match level {
                    -5000 => 1.0,
                    -50 => 0.88,
                    _ => 0.66 - 0.02 * level as f64,
                }
            }),
            0.9,
            200.0,
        );
        assert!(share(&slow, -5000) + share(&slow, -50) < 0.2, "{slow:?}");
    }

    #[test]
    fn a_level_changed_mid_stream_decodes_as_one_stream() {
        let mut out = Output::new(Vec::new(), Compression::Adaptive, 1).unwrap();
        let data: Vec<u8> = (0..4_000_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let Output::Zstd { encoder, .. } = &mut out else {
            panic!("not compressed")
        };
        for (chunk, level) in data.chunks(1 << 20).zip([1, -5000, 6, -50].iter().cycle()) {
            encoder
                .set_parameter(CParameter::CompressionLevel(*level))
                .unwrap();
            encoder.write_all(chunk).unwrap();
        }
        let (wire, _) = out.finish().unwrap();
        assert_eq!(zstd::decode_all(wire.as_slice()).unwrap(), data);
    }
}
