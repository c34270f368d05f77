//! Wall-clock time in milliseconds since the Unix epoch: sibling timestamps, ring generations,
//! gossip envelopes. One function, so every module takes time from the same place (and the
//! sans-IO cores take it as an argument instead). Also what is left of a deadline, as the
//! milliseconds a request carries on the wire, and when a frame is taken to have arrived.

use std::time::{SystemTime, UNIX_EPOCH};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What is left of a deadline at `now` in whole milliseconds, `None` when less than 1 ms is:
/// work that would start with nothing left must not start.
pub fn time_left_ms(deadline: std::time::Instant, now: std::time::Instant) -> Option<u32> {
    let left = deadline.saturating_duration_since(now).as_millis();
    (left >= 1).then(|| left.min(u128::from(u32::MAX)) as u32)
}

/// A process stall (SIGSTOP, a VM pause, a starved process) ended this recently or is under
/// way: frames read now may have waited in the kernel's socket buffers through it.
pub const STALL_THRESHOLD: std::time::Duration = std::time::Duration::from_millis(250);
/// How long after a stall ends frames read are still taken to have arrived when it began
/// (a connection drains the backlog the stall left in its socket in far less).
pub const STALL_GRACE: std::time::Duration = std::time::Duration::from_millis(500);
/// How often the stall watch ticks.
pub const STALL_TICK: std::time::Duration = std::time::Duration::from_millis(10);

/// When a frame read at `now` arrived, at the latest-safe estimate (sans-IO): a process that
/// was stopped cannot see when bytes reached its sockets, so a frame read during or just after
/// a stall is dated to the stall's start (the oldest it can be). `last_tick` is the watch's
/// last tick; `last_stall` the (start, end) of the last gap between ticks longer than
/// [`STALL_THRESHOLD`].
pub fn arrival(
    now: std::time::Instant,
    last_tick: std::time::Instant,
    last_stall: Option<(std::time::Instant, std::time::Instant)>,
) -> std::time::Instant {
    if now.saturating_duration_since(last_tick) > STALL_THRESHOLD {
        // Stalled until just now: the watch has not run since.
        return last_tick;
    }
    match last_stall {
        Some((start, end)) if now.saturating_duration_since(end) <= STALL_GRACE => start,
        _ => now,
    }
}

/// The process's stall watch: a thread that ticks every [`STALL_TICK`] and records gaps.
/// One per process (one process is one node); started on first use.
pub struct StallWatch {
    origin: std::time::Instant,
    /// Nanoseconds since `origin` of the last tick.
    last_tick: std::sync::atomic::AtomicU64,
    /// Start and end (ns since `origin`) of the last stall; 0 = none.
    stall_start: std::sync::atomic::AtomicU64,
    stall_end: std::sync::atomic::AtomicU64,
    /// Stalls seen since start.
    pub stalls: std::sync::atomic::AtomicU64,
}

impl StallWatch {
    pub fn global() -> &'static StallWatch {
        static WATCH: std::sync::OnceLock<&'static StallWatch> = std::sync::OnceLock::new();
        WATCH.get_or_init(|| {
            let watch: &'static StallWatch = Box::leak(Box::new(StallWatch {
                origin: std::time::Instant::now(),
                last_tick: Default::default(),
                stall_start: Default::default(),
                stall_end: Default::default(),
                stalls: Default::default(),
            }));
            std::thread::Builder::new()
                .name("stall-watch".into())
                .spawn(move || loop {
                    std::thread::sleep(STALL_TICK);
                    watch.tick(std::time::Instant::now());
                })
                .expect("the stall watch thread starts");
            watch
        })
    }

    fn ns(&self, at: std::time::Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_nanos() as u64
    }

    fn at(&self, ns: u64) -> std::time::Instant {
        self.origin + std::time::Duration::from_nanos(ns)
    }

    fn tick(&self, now: std::time::Instant) {
        use std::sync::atomic::Ordering;
        let now_ns = self.ns(now);
        let last = self.last_tick.swap(now_ns, Ordering::AcqRel);
        if now_ns.saturating_sub(last) > STALL_THRESHOLD.as_nanos() as u64 {
            // The end first: a reader that sees the new start sees an end at least as new.
            self.stall_end.store(now_ns, Ordering::Release);
            self.stall_start.store(last.max(1), Ordering::Release);
            self.stalls.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// When a frame read now arrived ([`arrival`]).
    pub fn arrival(&self) -> std::time::Instant {
        use std::sync::atomic::Ordering;
        let now = std::time::Instant::now();
        let start = self.stall_start.load(Ordering::Acquire);
        let stall = (start > 0).then(|| {
            (
                self.at(start),
                self.at(self.stall_end.load(Ordering::Acquire)),
            )
        });
        arrival(now, self.at(self.last_tick.load(Ordering::Acquire)), stall)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn no_time_left_is_none_not_one_millisecond() {
        let now = Instant::now();
        assert_eq!(time_left_ms(now, now), None);
        assert_eq!(time_left_ms(now - Duration::from_millis(5), now), None);
        assert_eq!(time_left_ms(now + Duration::from_micros(900), now), None);
        assert_eq!(time_left_ms(now + Duration::from_millis(1), now), Some(1));
        assert_eq!(
            time_left_ms(now + Duration::from_millis(250), now),
            Some(250)
        );
    }

    #[test]
    fn a_frame_read_during_or_just_after_a_stall_is_dated_to_its_start() {
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        // Ticking normally: the frame arrived now.
        assert_eq!(arrival(ms(1000), ms(995), None), ms(1000));
        // The watch has not ticked for 6 s: the process was stopped; the frame may have come
        // right after the last tick.
        assert_eq!(arrival(ms(7000), ms(1000), None), ms(1000));
        // The watch saw the stall (1 s → 7 s) end 100 ms ago: still dated to its start.
        assert_eq!(
            arrival(ms(7100), ms(7095), Some((ms(1000), ms(7000)))),
            ms(1000)
        );
        // Long after the stall: now.
        let later = ms(7000) + STALL_GRACE + Duration::from_millis(1);
        assert_eq!(
            arrival(later, later - STALL_TICK, Some((ms(1000), ms(7000)))),
            later
        );
    }

    #[test]
    fn the_watch_records_a_gap_between_ticks_as_a_stall() {
        let watch = StallWatch {
            origin: Instant::now(),
            last_tick: Default::default(),
            stall_start: Default::default(),
            stall_end: Default::default(),
            stalls: Default::default(),
        };
        let o = watch.origin;
        watch.tick(o + Duration::from_millis(10));
        watch.tick(o + Duration::from_millis(20));
        assert_eq!(watch.stalls.load(std::sync::atomic::Ordering::Relaxed), 0);
        watch.tick(o + Duration::from_millis(2020));
        assert_eq!(watch.stalls.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(
            watch.at(watch.stall_start.load(std::sync::atomic::Ordering::Relaxed)),
            o + Duration::from_millis(20)
        );
    }
}
