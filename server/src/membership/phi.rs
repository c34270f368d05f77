//! Phi-accrual failure detector (Hayashibara et al. 2004; the normal model of Akka/Pekko,
//! used the way Cassandra uses phi: as a per-peer suspicion level). Sans-IO: time is an
//! argument.
//!
//! Per peer, a sliding window of heartbeat inter-arrival times. Given `Δ` since the last
//! heartbeat, `phi = -log10(1 - F(Δ))` where F is the normal CDF with mean
//! `mean + acceptable_pause` and deviation `max(stddev, min_std_dev)` (Akka's logistic
//! approximation of the CDF). With 500 ms heartbeats, a 2 s acceptable pause and the default
//! threshold 8, a silent peer crosses the threshold after about 3 s.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How long a restarted or newly joined member may stay unheard before its silence counts
/// ([`PhiDetector::restarted`], [`PhiDetector::joined`]).
pub const UNHEARD_GRACE: Duration = Duration::from_secs(20);

#[derive(Debug, Clone)]
pub struct PhiConfig {
    /// Phi above which a peer is treated as unavailable.
    pub threshold: f64,
    /// Inter-arrival samples kept per peer.
    pub window: usize,
    /// Floor of the standard deviation, so a perfectly regular peer is not convicted by a
    /// few ms of jitter.
    pub min_std_dev: Duration,
    /// Extra silence tolerated on top of the mean interval (GC pauses, scheduling).
    pub acceptable_pause: Duration,
    /// The expected heartbeat interval, used to seed a new peer's history.
    pub expected_interval: Duration,
    /// A gap this long between two wake-ups of the node's own membership worker is a local
    /// pause (the process stopped or starved; the worker wakes at least every 250 ms).
    pub local_pause: Duration,
    /// After a local pause, how long phi takes no routed peer out of routing: every peer's
    /// silence includes this node's own, and a peer held up with it (the same starved machine,
    /// a paused VM) has had no chance to be heard. Cassandra's failure detector does the same
    /// ("Not marking nodes down due to local pause").
    pub pause_grace: Duration,
}

impl PhiConfig {
    /// The longest inter-arrival time recorded as a sample: the acceptable pause plus four
    /// expected intervals (4 s by default).
    pub fn max_interval_ms(&self) -> f64 {
        (self.acceptable_pause + self.expected_interval * 4).as_secs_f64() * 1000.0
    }
}

impl Default for PhiConfig {
    fn default() -> Self {
        PhiConfig {
            threshold: 8.0,
            window: 1000,
            min_std_dev: Duration::from_millis(100),
            acceptable_pause: Duration::from_secs(2),
            expected_interval: Duration::from_millis(500),
            local_pause: Duration::from_secs(1),
            pause_grace: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone)]
struct ArrivalWindow {
    intervals_ms: VecDeque<f64>,
    sum: f64,
    sum_sq: f64,
    last: Instant,
    /// Started for a restarted or joined peer not heard yet (`PhiDetector::restarted`,
    /// `joined`): `last` is when its grace ends, and its first heartbeat starts a fresh
    /// window (no sample).
    unheard: bool,
}

impl ArrivalWindow {
    fn new(cfg: &PhiConfig, now: Instant) -> Self {
        // Seed with mean ± mean/4 so the first real intervals do not look extreme (Akka).
        let mean = cfg.expected_interval.as_secs_f64() * 1000.0;
        let mut w = ArrivalWindow {
            intervals_ms: VecDeque::with_capacity(cfg.window.min(64)),
            sum: 0.0,
            sum_sq: 0.0,
            last: now,
            unheard: false,
        };
        w.push(mean - mean / 4.0, cfg.window);
        w.push(mean + mean / 4.0, cfg.window);
        w
    }

    fn push(&mut self, ms: f64, cap: usize) {
        if self.intervals_ms.len() >= cap.max(1) {
            if let Some(old) = self.intervals_ms.pop_front() {
                self.sum -= old;
                self.sum_sq -= old * old;
            }
        }
        self.intervals_ms.push_back(ms);
        self.sum += ms;
        self.sum_sq += ms * ms;
    }

    fn mean(&self) -> f64 {
        self.sum / self.intervals_ms.len() as f64
    }

    fn std_dev(&self) -> f64 {
        let n = self.intervals_ms.len() as f64;
        let mean = self.mean();
        (self.sum_sq / n - mean * mean).max(0.0).sqrt()
    }
}

/// Phi for `elapsed_ms` of silence given the history's mean and deviation.
pub fn phi(elapsed_ms: f64, mean_ms: f64, std_dev_ms: f64) -> f64 {
    let y = (elapsed_ms - mean_ms) / std_dev_ms;
    let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
    if elapsed_ms > mean_ms {
        -(e / (1.0 + e)).log10()
    } else {
        -(1.0 - 1.0 / (1.0 + e)).log10()
    }
}

#[derive(Debug, Clone, Default)]
pub struct PhiDetector {
    cfg: PhiConfig,
    peers: HashMap<String, ArrivalWindow>,
}

impl PhiDetector {
    pub fn new(cfg: PhiConfig) -> Self {
        PhiDetector {
            cfg,
            peers: HashMap::new(),
        }
    }

    pub fn config(&self) -> &PhiConfig {
        &self.cfg
    }

    /// Records a heartbeat from `peer` at `now`, which is when it arrived: the reader was
    /// waiting for it.
    pub fn heartbeat(&mut self, peer: &str, now: Instant) {
        self.heard(peer, now, true);
    }

    /// Records a heartbeat from `peer` that waited in the socket until `now` (read in a
    /// backlog, after the reader was held up): the peer was heard, but when it arrived is
    /// unknown, so it is no sample. Sampled, a backlog read at once is a run of near-zero
    /// intervals after one long one, and a narrow window would then suspect the peer within a
    /// fraction of its normal interval.
    pub fn heartbeat_from_backlog(&mut self, peer: &str, now: Instant) {
        self.heard(peer, now, false);
    }

    fn heard(&mut self, peer: &str, now: Instant, sample: bool) {
        match self.peers.get_mut(peer) {
            None => {
                self.peers
                    .insert(peer.to_string(), ArrivalWindow::new(&self.cfg, now));
            }
            Some(w) if w.unheard => *w = ArrivalWindow::new(&self.cfg, now),
            Some(w) => {
                let ms = now.saturating_duration_since(w.last).as_secs_f64() * 1000.0;
                w.last = now;
                // A gap longer than a heartbeat can be late is an outage (the direct path was
                // down), not a sample: recorded, it would widen the deviation and slow the
                // next suspicion for the rest of the window (Cassandra's `fd_max_interval`).
                if sample && ms <= self.cfg.max_interval_ms() {
                    w.push(ms, self.cfg.window);
                }
            }
        }
    }

    /// The peer's current phi; `None` if it never sent a heartbeat (and, restarted or joined,
    /// is still within its grace).
    pub fn phi(&self, peer: &str, now: Instant) -> Option<f64> {
        let w = self.peers.get(peer)?;
        if w.unheard && now < w.last {
            return None;
        }
        let elapsed = now.saturating_duration_since(w.last).as_secs_f64() * 1000.0;
        let mean = w.mean() + self.cfg.acceptable_pause.as_secs_f64() * 1000.0;
        let std = w.std_dev().max(self.cfg.min_std_dev.as_secs_f64() * 1000.0);
        Some(phi(elapsed, mean, std))
    }

    /// True when the peer's phi exceeds the threshold (unknown peers are not suspected).
    pub fn is_suspected(&self, peer: &str, now: Instant) -> bool {
        self.phi(peer, now).is_some_and(|p| p > self.cfg.threshold)
    }

    pub fn last_heartbeat(&self, peer: &str) -> Option<Instant> {
        self.peers.get(peer).map(|w| w.last)
    }

    /// A member restarted (a new identity): the old process's history says nothing about the
    /// new one. Its silence counts from `now` plus [`UNHEARD_GRACE`] until its first
    /// heartbeat, then as any peer's. Before (found in review), the history was dropped, and a
    /// peer never heard is never suspected: a member restarted behind a one-way outage stayed
    /// routed while indirect probes kept it alive in SWIM. The grace covers a new process that
    /// does not know this node yet (it heartbeats only the members its foca knows).
    pub fn restarted(&mut self, peer: &str, now: Instant) {
        self.peers
            .insert(peer.to_string(), self.unheard_window(now));
    }

    /// A member joined (foca's MemberUp): if it has no history here yet, its silence counts
    /// as a restarted member's, after [`UNHEARD_GRACE`] until its first heartbeat. A member
    /// already heard keeps its history. Before (found in review), a member that joined and was
    /// never heard had no history and was never suspected: one that joined behind a one-way
    /// outage stayed routed while indirect probes kept it alive in SWIM. (Starting its history
    /// at MemberUp without a grace was tried and reverted: a newcomer heartbeats only the
    /// members its own foca knows, and in a large cluster it may learn some seconds later.)
    pub fn joined(&mut self, peer: &str, now: Instant) {
        if !self.peers.contains_key(peer) {
            let w = self.unheard_window(now);
            self.peers.insert(peer.to_string(), w);
        }
    }

    fn unheard_window(&self, now: Instant) -> ArrivalWindow {
        let mut w = ArrivalWindow::new(&self.cfg, now + UNHEARD_GRACE);
        w.unheard = true;
        w
    }

    /// The restarted or joined peers not heard since (`restarted`, `joined`).
    pub fn unheard(&self) -> Vec<String> {
        self.peers
            .iter()
            .filter(|(_, w)| w.unheard)
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Forgets a peer's history (it left, or its identity went down).
    pub fn remove(&mut self, peer: &str) {
        self.peers.remove(peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A detector that received `count` heartbeats `interval` apart; returns it and the time of
    /// the last heartbeat.
    fn trained(cfg: PhiConfig, interval: Duration, count: usize) -> (PhiDetector, Instant) {
        let mut d = PhiDetector::new(cfg);
        let mut t = Instant::now();
        for _ in 0..count {
            d.heartbeat("p", t);
            t += interval;
        }
        (d, t - interval)
    }

    /// Heartbeats read in a backlog (the reader was held up) say the peer is alive but are no
    /// samples: sampled, the burst's near-zero intervals made a narrow window suspect the
    /// peer before its next heartbeat was due.
    #[test]
    fn a_backlog_of_heartbeats_is_heard_but_not_sampled() {
        let cfg = PhiConfig {
            window: 2,
            acceptable_pause: Duration::ZERO,
            min_std_dev: ms(50),
            ..PhiConfig::default()
        };
        let (mut sampled, last) = trained(cfg.clone(), ms(500), 10);
        let (mut backlog, _) = trained(cfg, ms(500), 10);
        // Held up for 1.2 s: three heartbeats wait in the socket and are read at once.
        let read = last + ms(1200);
        for _ in 0..3 {
            sampled.heartbeat("p", read);
            backlog.heartbeat_from_backlog("p", read);
        }
        // The next heartbeat is due 500 ms after the last one sent; 400 ms after the read
        // nothing is late.
        let later = read + ms(400);
        assert!(
            sampled.is_suspected("p", later),
            "the burst's intervals make phi twitchy"
        );
        assert!(!backlog.is_suspected("p", later));
        // And the peer was heard: it is suspected only once silent past its usual beat.
        assert!(backlog.is_suspected("p", read + ms(1500)));
    }

    /// Found in review: a 60 s gap (the direct path down while indirect probes kept the peer
    /// alive) became one sample, and suspicion then took ~12 s instead of ~3 s for the next
    /// ~1000 heartbeats.
    #[test]
    fn an_outage_gap_is_not_a_sample() {
        let (mut d, last) = trained(PhiConfig::default(), ms(500), 100);
        let mut t = last + Duration::from_secs(60);
        for _ in 0..10 {
            d.heartbeat("p", t);
            t += ms(500);
        }
        let last = t - ms(500);
        assert!(
            d.is_suspected("p", last + ms(3_500)),
            "{:?}",
            d.phi("p", last + ms(3_500))
        );
    }

    /// A restarted member is suspected if it stays silent past the grace and the usual
    /// silence; its first heartbeat starts a fresh history, with no sample from the grace.
    #[test]
    fn a_restarted_member_never_heard_is_suspected_after_the_grace() {
        let (mut d, last) = trained(PhiConfig::default(), ms(500), 10);
        let t0 = last + ms(100);
        d.restarted("p", t0);
        let grace = UNHEARD_GRACE.as_millis() as u64;
        assert_eq!(d.unheard(), vec!["p".to_string()]);
        assert_eq!(
            d.phi("p", t0 + ms(1_000)),
            None,
            "no phi to show within the grace"
        );
        assert!(!d.is_suspected("p", t0 + ms(grace)));
        assert!(
            d.is_suspected("p", t0 + ms(grace + 8_000)),
            "{:?}",
            d.phi("p", t0 + ms(grace + 8_000))
        );
        // Heard within the grace: a fresh history from then, as a peer heard for the first time.
        let mut heard = PhiDetector::new(PhiConfig::default());
        heard.restarted("p", t0);
        heard.heartbeat("p", t0 + ms(3_000));
        assert!(heard.unheard().is_empty());
        let mut fresh = PhiDetector::new(PhiConfig::default());
        fresh.heartbeat("p", t0 + ms(3_000));
        for at in [3_500, 6_000, 9_000] {
            assert_eq!(heard.phi("p", t0 + ms(at)), fresh.phi("p", t0 + ms(at)));
        }
    }

    /// A member that joins and is never heard is suspected after the grace and the usual
    /// silence (before, it had no history and was never suspected); one heard before its
    /// MemberUp keeps the history it has.
    #[test]
    fn a_joined_member_never_heard_is_suspected_after_the_grace() {
        let t0 = Instant::now();
        let grace = UNHEARD_GRACE.as_millis() as u64;
        let mut d = PhiDetector::new(PhiConfig::default());
        d.joined("p", t0);
        assert_eq!(d.unheard(), vec!["p".to_string()]);
        assert_eq!(d.phi("p", t0 + ms(1_000)), None);
        assert!(!d.is_suspected("p", t0 + ms(grace)));
        assert!(d.is_suspected("p", t0 + ms(grace + 8_000)));
        // Heard first, then announced up: the history it has stands.
        let (mut heard, last) = trained(PhiConfig::default(), ms(500), 10);
        heard.joined("p", last + ms(100));
        assert!(heard.unheard().is_empty());
        assert!(heard.is_suspected("p", last + ms(8_000)));
        assert!(!heard.is_suspected("p", last + ms(1_000)));
    }

    #[test]
    fn unknown_peers_have_no_phi() {
        let d = PhiDetector::default();
        assert_eq!(d.phi("nobody", Instant::now()), None);
        assert!(!d.is_suspected("nobody", Instant::now()));
    }

    #[test]
    fn phi_rises_monotonically_with_silence_and_crosses_8_near_3s() {
        let (d, last) = trained(PhiConfig::default(), ms(500), 100);
        let mut prev = -1.0;
        for silence in (0..6000).step_by(100) {
            let p = d.phi("p", last + ms(silence)).unwrap();
            assert!(p >= prev, "phi fell from {prev} to {p} at {silence} ms");
            prev = p;
        }
        assert!(
            d.phi("p", last + ms(500)).unwrap() < 1.0,
            "a normal interval is not suspicious"
        );
        assert!(!d.is_suspected("p", last + ms(2700)));
        assert!(d.is_suspected("p", last + ms(3300)));
    }

    #[test]
    fn phi_adapts_to_the_observed_interval() {
        let cfg = PhiConfig {
            acceptable_pause: Duration::ZERO,
            ..PhiConfig::default()
        };
        let (fast, fast_last) = trained(cfg.clone(), ms(100), 200);
        let (slow, slow_last) = trained(cfg, ms(1000), 200);
        let silence = ms(1200);
        let (pf, ps) = (
            fast.phi("p", fast_last + silence).unwrap(),
            slow.phi("p", slow_last + silence).unwrap(),
        );
        assert!(
            pf > 8.0,
            "1.2 s of silence from a 100 ms peer is damning: {pf}"
        );
        assert!(ps < 2.0, "1.2 s of silence from a 1 s peer is normal: {ps}");
    }

    #[test]
    fn phi_stays_low_under_jitter() {
        let mut d = PhiDetector::new(PhiConfig::default());
        let mut t = Instant::now();
        // Deterministic jitter: intervals cycle through 350..=650 ms.
        let jitter = [350u64, 650, 420, 580, 500, 390, 610, 470, 530, 450];
        let mut worst: f64 = 0.0;
        for i in 0..500 {
            d.heartbeat("p", t);
            let next = ms(jitter[i % jitter.len()]);
            // Just before the next heartbeat arrives, phi is at its highest for this interval.
            worst = worst.max(d.phi("p", t + next - ms(1)).unwrap());
            t += next;
        }
        assert!(worst < 1.0, "jittery but live peer reached phi {worst}");
    }

    #[test]
    fn removing_a_peer_forgets_its_history() {
        let (mut d, last) = trained(PhiConfig::default(), ms(500), 10);
        assert!(d.is_suspected("p", last + ms(10_000)));
        d.remove("p");
        assert_eq!(d.phi("p", last + ms(10_000)), None);
    }

    #[test]
    fn window_is_bounded() {
        let cfg = PhiConfig {
            window: 10,
            ..PhiConfig::default()
        };
        let (d, _) = trained(cfg, ms(500), 100);
        assert_eq!(d.peers["p"].intervals_ms.len(), 10);
    }
}
