//! How busy the machine's CPUs are, for background work that yields to the foreground.
//!
//! Background writes are cheap per key but not free (a replayed hint costs about as much CPU
//! as a replicated write, docs/benchmarks.md), and on a node whose CPUs are nearly saturated a
//! few percent more work multiplies the foreground's queueing delay. A writer-queue signal does
//! not see that (the queue stays short while every thread waits for a CPU), so background
//! budgets are scaled by the machine's CPU use, read from `/proc/stat` (Linux; elsewhere the
//! reading is `None` and budgets stay whole).

use std::time::{Duration, Instant};

/// A new `/proc/stat` reading is taken at most this often; busy is measured over the interval.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(250);
/// Below this busy fraction, background budgets are granted whole.
pub const YIELD_FROM: f64 = 0.5;
/// At or above this busy fraction, background budgets are at their floor.
pub const FLOOR_AT: f64 = 0.9;
/// The least share of a background budget granted however busy the machine is: backlogs still
/// drain under sustained load (slowly), instead of waiting for a quiet hour that may not come.
/// 2%: at 10% a replay of ~500 keys/s into a saturated 2-core node still multiplied the
/// open-loop p99 about 5x (docs/benchmarks.md, hinted handoff).
pub const FLOOR: f64 = 0.02;
/// How fast a pace may rise, in budget share per second (falls are immediate): from the floor
/// to whole takes about four seconds. The CPU reading lags the load by an interval, so a pace
/// that jumped to whole on one idle reading (a node just restarted, before its clients came
/// back) granted seconds of background work that then ran into the foreground's return: the
/// first second of a replay multiplied the open-loop p99 (docs/benchmarks.md, hinted handoff).
pub const RAMP_PER_SEC: f64 = 0.25;

/// A background budget in keys/s and bytes/s (the tighter of the two applies).
#[derive(Debug, Clone, Copy)]
pub struct Rates {
    keys_per_sec: f64,
    bytes_per_sec: f64,
}

impl Rates {
    pub fn new(keys_per_sec: u32, bytes_per_sec: u64) -> Rates {
        Rates {
            keys_per_sec: keys_per_sec.max(1) as f64,
            bytes_per_sec: bytes_per_sec.max(1) as f64,
        }
    }

    /// How long `keys` keys and `bytes` bytes of background work take at these budgets
    /// scaled by `pace` (the CPU yield, `CpuLoad::pace`, at least `FLOOR` in practice).
    pub fn pause(&self, keys: usize, bytes: u64, pace: f64) -> Duration {
        let secs = (keys as f64 / self.keys_per_sec).max(bytes as f64 / self.bytes_per_sec)
            / pace.max(1e-6);
        Duration::from_secs_f64(secs.min(1e9))
    }
}

/// How long to rest after `worked` of background work for that work to take at most the
/// share `pace` (0..=1, at least [`FLOOR`]) of the time: none at 1, 49 times `worked` at the
/// floor (Garage's "tranquility", scaled by the yield): a hint holder's rest between its
/// batches (`handoff::replay::holder_rest`), whose cost is their time on this node rather
/// than a count of keys against a budget.
pub fn duty_rest(worked: Duration, pace: f64) -> Duration {
    if pace >= 1.0 {
        return Duration::ZERO;
    }
    worked.mul_f64(1.0 / pace.max(FLOOR) - 1.0)
}

/// A paced wait is taken in slices of at most this, the pace read again for each: a wait
/// that began while the machine was busy shortens as it quiets down, and a node shutting down
/// ends it within a slice.
pub const REPAY_SLICE: Duration = SAMPLE_INTERVAL;

/// Waits until `owed` is repaid: `owed` is how long the work just done takes at the whole
/// budget (`Rates::pause` at pace 1), and each slice of waiting repays its length times the
/// pace `pace` returns for it (`CpuLoad::pace`). At a steady pace p the wait is `owed / p`,
/// however long: no cap lets the work run above its budget. Err if `stop` is cancelled first
/// (the node is shutting down).
pub async fn repay(
    owed: Duration,
    mut pace: impl FnMut() -> f64,
    stop: &tokio_util::sync::CancellationToken,
) -> Result<(), String> {
    let mut left = owed.as_secs_f64();
    while left > 0.0 {
        let p = pace().clamp(1e-6, 1.0);
        let slice = (left / p).min(REPAY_SLICE.as_secs_f64());
        crate::background::rest(Duration::from_secs_f64(slice), stop).await?;
        left -= slice * p;
    }
    Ok(())
}

/// Foreground pressure (0..=1: how full the node's client budget or writer queue is) above
/// which background budgets shrink, reaching [`FLOOR`] at 1.
pub const PRESSURE_FROM: f64 = 0.5;

type PressureFn = Box<dyn Fn() -> f64 + Send + Sync>;

/// Where the foreground pressure is read from: set once by the root (one process is one
/// node), read by every background pace. Unset = no pressure.
static FOREGROUND: std::sync::OnceLock<PressureFn> = std::sync::OnceLock::new();

/// Sets where [`foreground_pressure`] reads from (the first call wins).
pub fn set_foreground_pressure(read: impl Fn() -> f64 + Send + Sync + 'static) {
    let _ = FOREGROUND.set(Box::new(read));
}

/// How deep the foreground queues are now, 0..=1 (0 when unset).
pub fn foreground_pressure() -> f64 {
    FOREGROUND.get().map_or(0.0, |read| read().clamp(0.0, 1.0))
}

/// The share of a background budget to grant under foreground `pressure` (0..=1): 1 up to
/// [`PRESSURE_FROM`], falling linearly to [`FLOOR`] at 1. Hint replay, anti-entropy,
/// transfers and GC slow down while client requests queue, not only when the CPUs are busy
/// (a deep writer queue on an idle CPU is a slow disk).
pub fn pressure_scale(pressure: f64) -> f64 {
    if pressure <= PRESSURE_FROM {
        return 1.0;
    }
    let over = ((pressure - PRESSURE_FROM) / (1.0 - PRESSURE_FROM)).min(1.0);
    1.0 - over * (1.0 - FLOOR)
}

/// The share of a background budget to grant when the CPUs are `busy` (0..=1): 1 up to
/// [`YIELD_FROM`], falling linearly to [`FLOOR`] at [`FLOOR_AT`].
pub fn yield_scale(busy: f64) -> f64 {
    if busy <= YIELD_FROM {
        return 1.0;
    }
    let over = ((busy - YIELD_FROM) / (FLOOR_AT - YIELD_FROM)).min(1.0);
    1.0 - over * (1.0 - FLOOR)
}

/// (busy, total) jiffies of all CPUs from the `cpu` line of `/proc/stat`: idle and iowait are
/// not busy; guest time is already inside user and nice.
pub fn parse_proc_stat(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if f.len() < 5 {
        return None;
    }
    let total: u64 = f.iter().sum();
    let idle = f[3] + f[4];
    Some((total - idle, total))
}

/// A pace that follows its target down at once and up at most [`RAMP_PER_SEC`] (sans-IO).
#[derive(Debug, Clone, Copy)]
pub struct Ramp {
    pace: f64,
    at: Option<Instant>,
}

impl Default for Ramp {
    /// Starts at the floor: a start must not burst.
    fn default() -> Ramp {
        Ramp {
            pace: FLOOR,
            at: None,
        }
    }
}

impl Ramp {
    /// The pace at `now` towards `target` (0..=1).
    pub fn next(&mut self, now: Instant, target: f64) -> f64 {
        let rise = self.at.map_or(0.0, |at| {
            now.saturating_duration_since(at).as_secs_f64() * RAMP_PER_SEC
        });
        self.pace = target.min(self.pace + rise);
        self.at = Some(now);
        self.pace
    }
}

/// The machine's CPU use over the last [`SAMPLE_INTERVAL`] or more.
#[derive(Debug, Default)]
pub struct CpuLoad {
    last: Option<(Instant, u64, u64)>,
    busy: Option<f64>,
    ramp: Ramp,
}

impl CpuLoad {
    /// The busy fraction (0..=1) between the last two readings, re-reading `/proc/stat` if the
    /// last reading is older than [`SAMPLE_INTERVAL`]; `None` before two readings or off Linux.
    pub fn busy(&mut self) -> Option<f64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|(at, _, _)| now.duration_since(at) < SAMPLE_INTERVAL)
        {
            return self.busy;
        }
        let reading = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|t| parse_proc_stat(&t));
        if let Some((busy, total)) = reading {
            if let Some((_, b0, t0)) = self.last {
                let dt = total.saturating_sub(t0);
                if dt > 0 {
                    self.busy = Some((busy.saturating_sub(b0) as f64 / dt as f64).min(1.0));
                }
            }
            self.last = Some((now, busy, total));
        }
        self.busy
    }

    /// Waits until `owed` is repaid at this CPU's pace, read again for each slice
    /// ([`repay`]); Err if `stop` is cancelled first.
    pub async fn repay(
        &mut self,
        owed: Duration,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<(), String> {
        repay(owed, || self.pace(), stop).await
    }

    /// The share of a background budget to grant now: [`yield_scale`] of the CPU use, rising
    /// from the floor at most [`RAMP_PER_SEC`] (a node just started, typically into a backlog
    /// of hints, does not burst on its first idle reading). Off Linux (no `/proc/stat`)
    /// budgets stay whole.
    pub fn pace(&mut self) -> f64 {
        let pressure = pressure_scale(foreground_pressure());
        let target = match self.busy() {
            Some(busy) => yield_scale(busy).min(pressure),
            None if self.last.is_some() => FLOOR,
            None => return pressure,
        };
        self.ramp.next(Instant::now(), target)
    }
}

#[cfg(test)]
mod repay_tests {
    use super::*;
    use tokio_util::sync::CancellationToken;

    /// A wait repays its debt at the pace read for each slice: at a steady pace p it lasts
    /// `owed / p`, with no cap; a pace that rises during the wait shortens it; shutdown ends
    /// it. (The slices each pace is read for are counted: that part does not depend on time.)
    #[tokio::test]
    async fn a_paced_wait_repays_its_debt_at_the_pace_of_each_slice() {
        let stop = CancellationToken::new();
        let t = Instant::now();
        let mut reads = 0;
        let steady = |reads: &mut u32| {
            *reads += 1;
            0.5
        };
        repay(Duration::from_millis(200), || steady(&mut reads), &stop)
            .await
            .unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(400),
            "{:?}",
            t.elapsed()
        );
        // 400 ms in slices of at most 250 ms: two, each repaying half its length.
        assert_eq!(reads, 2);
        // 100 ms owed: two slices at the floor (250 ms each, repaying 5 ms each), then the
        // pace is whole and the 90 ms left are one slice.
        let t = Instant::now();
        let mut reads = 0;
        repay(
            Duration::from_millis(100),
            || {
                reads += 1;
                if reads <= 2 {
                    FLOOR
                } else {
                    1.0
                }
            },
            &stop,
        )
        .await
        .unwrap();
        assert_eq!(reads, 3);
        assert!(
            t.elapsed() >= Duration::from_millis(590),
            "{:?}",
            t.elapsed()
        );
        // A debt the floor would take 100 minutes to repay is not cut short by any cap:
        // after a slice it is still owed (shown by the slices it is read for until stopped).
        let mut reads = 0;
        let cut = tokio::time::timeout(
            Duration::from_millis(600),
            repay(
                Duration::from_secs(120),
                || {
                    reads += 1;
                    FLOOR
                },
                &stop,
            ),
        )
        .await;
        assert!(cut.is_err(), "still waiting");
        assert!(reads >= 2, "{reads}");
        // Nothing owed: no wait; shutdown: an error at once.
        repay(Duration::ZERO, || FLOOR, &stop).await.unwrap();
        stop.cancel();
        let cut = repay(Duration::from_secs(100), || FLOOR, &stop).await;
        assert_eq!(cut, Err(crate::background::STOPPED.to_string()));
    }

    #[test]
    fn the_duty_rest_leaves_the_pace_as_the_share_of_time_worked() {
        let worked = Duration::from_millis(10);
        assert_eq!(duty_rest(worked, 1.0), Duration::ZERO);
        assert_eq!(duty_rest(worked, 0.5), worked);
        assert_eq!(duty_rest(worked, 0.0), worked.mul_f64(49.0));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_tighter_budget_sets_the_pause_scaled_by_the_yield() {
        let rates = Rates::new(1_000, 1 << 20);
        // 100 keys at 1 000 keys/s: 0.1 s; their 50 KiB at 1 MiB/s: ~0.05 s: keys bind.
        let d = rates.pause(100, 50 << 10, 1.0);
        assert!((d.as_secs_f64() - 0.1).abs() < 1e-9, "{d:?}");
        // The same keys carrying 1 MiB: the bytes bind (1 s).
        let d = rates.pause(100, 1 << 20, 1.0);
        assert!((d.as_secs_f64() - 1.0).abs() < 1e-9, "{d:?}");
        // At a quarter of the budget (a busy CPU), four times as long.
        let d = rates.pause(100, 1 << 20, 0.25);
        assert!((d.as_secs_f64() - 4.0).abs() < 1e-9, "{d:?}");
        // At the floor, fifty times as long: the budget holds however long that is.
        let d = Rates::new(100, u64::MAX).pause(100, 0, FLOOR);
        assert!((d.as_secs_f64() - 50.0).abs() < 1e-6, "{d:?}");
        assert_eq!(rates.pause(0, 0, 1.0), Duration::ZERO);
    }

    use super::*;

    #[test]
    fn background_shrinks_as_the_foreground_queues_fill() {
        assert_eq!(pressure_scale(0.0), 1.0);
        assert_eq!(pressure_scale(PRESSURE_FROM), 1.0);
        let mid = pressure_scale((PRESSURE_FROM + 1.0) / 2.0);
        assert!((mid - (1.0 + FLOOR) / 2.0).abs() < 1e-9, "{mid}");
        assert!((pressure_scale(1.0) - FLOOR).abs() < 1e-9);
        assert!((pressure_scale(5.0) - FLOOR).abs() < 1e-9);
    }

    #[test]
    fn budgets_are_whole_when_idle_and_at_the_floor_when_saturated() {
        assert_eq!(yield_scale(0.0), 1.0);
        assert_eq!(yield_scale(YIELD_FROM), 1.0);
        let mid = yield_scale((YIELD_FROM + FLOOR_AT) / 2.0);
        assert!((mid - (1.0 + FLOOR) / 2.0).abs() < 1e-9, "{mid}");
        assert!((yield_scale(FLOOR_AT) - FLOOR).abs() < 1e-9);
        assert!((yield_scale(1.0) - FLOOR).abs() < 1e-9);
        let mut last = 1.0;
        for i in 0..=100 {
            let s = yield_scale(i as f64 / 100.0);
            assert!(
                s <= last && s >= FLOOR - 1e-9,
                "monotone and floored at {i}%: {s}"
            );
            last = s;
        }
    }

    /// A fresh reader grants the floor until it has measured one interval (no burst at start).
    #[test]
    fn a_fresh_reader_starts_at_the_floor() {
        if std::fs::read_to_string("/proc/stat").is_err() {
            return; // not Linux: budgets stay whole
        }
        let mut cpu = CpuLoad::default();
        assert_eq!(cpu.pace(), FLOOR);
        std::thread::sleep(SAMPLE_INTERVAL + Duration::from_millis(50));
        let pace = cpu.pace();
        assert!(
            (FLOOR..=FLOOR + 0.5 * RAMP_PER_SEC).contains(&pace),
            "{pace}: rises by the ramp at most, whatever the reading"
        );
        assert!(cpu.busy().is_some(), "measured once the interval passed");
    }

    /// From the floor, an idle reading raises the pace by the ramp only; a busy one drops it
    /// at once; a long gap allows the whole rise.
    #[test]
    fn a_pace_rises_by_the_ramp_and_falls_at_once() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut ramp = Ramp::default();
        assert_eq!(ramp.next(at(0), 1.0), FLOOR, "a start does not burst");
        let p = ramp.next(at(1000), 1.0);
        assert!((p - (FLOOR + RAMP_PER_SEC)).abs() < 1e-9, "{p}");
        assert_eq!(ramp.next(at(1100), 0.1), 0.1, "falls at once");
        let p = ramp.next(at(1300), 1.0);
        assert!((p - (0.1 + 0.2 * RAMP_PER_SEC)).abs() < 1e-9, "{p}");
        assert_eq!(
            ramp.next(at(60_000), 1.0),
            1.0,
            "a long gap allows the whole rise"
        );
        assert_eq!(
            ramp.next(at(59_000), 0.5),
            0.5,
            "time going backwards rises nothing"
        );
        assert_eq!(ramp.next(at(59_500), 1.0), 0.5 + 0.5 * RAMP_PER_SEC);
    }

    #[test]
    fn proc_stat_counts_idle_and_iowait_as_not_busy() {
        let text = "cpu  100 5 50 800 40 3 2 0 0 0\ncpu0 50 2 25 400 20 1 1 0 0 0\nintr 1 2\n";
        assert_eq!(parse_proc_stat(text), Some((160, 1000)));
        assert_eq!(parse_proc_stat("intr 1 2\n"), None);
        assert_eq!(parse_proc_stat("cpu  1 x 3 4 5\n"), None);
    }

    #[test]
    fn the_live_reading_is_a_fraction() {
        let mut load = CpuLoad::default();
        load.busy();
        std::thread::sleep(SAMPLE_INTERVAL + Duration::from_millis(20));
        if let Some(b) = load.busy() {
            assert!((0.0..=1.0).contains(&b), "{b}");
        }
    }
}
