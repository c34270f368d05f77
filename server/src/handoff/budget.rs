//! The replay budget a node grants to every holder of hints for it, together (sans-IO).
//!
//! A token bucket in two dimensions, keys and bytes, refilled at the configured rates and
//! holding at most half a second of them. Keys are taken when credits are granted (a holder
//! then sends at most that many); bytes are granted up to what the bucket holds and taken when
//! the batch arrives, so one state larger than the bucket still goes through, after which the
//! bucket is in debt and the next grants wait. Ten holders asking at once share one budget:
//! a recovering node is never replayed into faster than it allows (no hint storm).
//!
//! The rates are scaled by a pace (0..=1, set from the node's CPU use, see
//! `background::load`): a node busy with foreground work takes its replay more slowly.

/// However slow the pace, a target still grants this many keys/s (or its whole budget if
/// smaller): a small budget is not paced down to a trickle that never drains.
pub const MIN_PACED_KEYS_PER_SEC: f64 = 100.0;

/// Seconds of budget the bucket holds: how far a burst may run ahead of the rate.
pub const BURST_SECS: f64 = 0.5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub keys: u32,
    pub bytes: u64,
    /// When nothing is granted: when to ask again.
    pub retry_after_ms: u32,
}

#[derive(Debug, Clone)]
pub struct ReplayBudget {
    keys_per_sec: f64,
    bytes_per_sec: f64,
    /// The share of the configured rates in force (1 = whole).
    pace: f64,
    keys: f64,
    bytes: f64,
    last_ms: Option<u64>,
}

impl ReplayBudget {
    pub fn new(keys_per_sec: u32, bytes_per_sec: u64) -> ReplayBudget {
        let mut b = ReplayBudget {
            keys_per_sec: keys_per_sec.max(1) as f64,
            bytes_per_sec: bytes_per_sec.max(1) as f64,
            pace: 1.0,
            keys: 0.0,
            bytes: 0.0,
            last_ms: None,
        };
        b.keys = b.key_capacity();
        b.bytes = b.byte_capacity();
        b
    }

    fn key_rate(&self) -> f64 {
        self.keys_per_sec * self.pace
    }

    fn byte_rate(&self) -> f64 {
        self.bytes_per_sec * self.pace
    }

    fn key_capacity(&self) -> f64 {
        (self.key_rate() * BURST_SECS).max(1.0)
    }

    fn byte_capacity(&self) -> f64 {
        (self.byte_rate() * BURST_SECS).max(1.0)
    }

    /// From now on, refill at `pace` (at most 1, at least [`MIN_PACED_KEYS_PER_SEC`]'s share)
    /// times the configured rates; what the bucket holds beyond the new burst is cut.
    pub fn set_pace(&mut self, now_ms: u64, pace: f64) {
        self.refill(now_ms);
        let least = (MIN_PACED_KEYS_PER_SEC / self.keys_per_sec).min(1.0);
        self.pace = pace.clamp(least, 1.0);
        self.keys = self.keys.min(self.key_capacity());
        self.bytes = self.bytes.min(self.byte_capacity());
    }

    pub fn pace(&self) -> f64 {
        self.pace
    }

    fn refill(&mut self, now_ms: u64) {
        if let Some(last) = self.last_ms {
            let secs = now_ms.saturating_sub(last) as f64 / 1000.0;
            self.keys = (self.keys + secs * self.key_rate()).min(self.key_capacity());
            self.bytes = (self.bytes + secs * self.byte_rate()).min(self.byte_capacity());
        }
        // The wall clock may step back (NTP, a wrong hardware clock): refill from the new
        // reading on, rather than waiting until the clock passes the old one again.
        self.last_ms = Some(now_ms);
    }

    /// Credits for a holder that wants to send `want_keys` keys, `want_bytes` bytes.
    pub fn grant(&mut self, now_ms: u64, want_keys: u32, want_bytes: u64) -> Grant {
        self.refill(now_ms);
        let keys = (self.keys.floor() as u64).min(want_keys as u64) as u32;
        if keys == 0 || self.bytes <= 0.0 || want_bytes == 0 {
            let key_wait = (1.0 - self.keys).max(0.0) / self.key_rate();
            let byte_wait = (1.0 - self.bytes).max(0.0) / self.byte_rate();
            let wait_ms = (key_wait.max(byte_wait) * 1000.0)
                .ceil()
                .clamp(1.0, 60_000.0);
            return Grant {
                keys: 0,
                bytes: 0,
                retry_after_ms: wait_ms as u32,
            };
        }
        self.keys -= keys as f64;
        Grant {
            keys,
            bytes: (self.bytes as u64).clamp(1, want_bytes),
            retry_after_ms: 0,
        }
    }

    /// A batch of `bytes` arrived (the bytes of its states).
    pub fn spend_bytes(&mut self, now_ms: u64, bytes: u64) {
        self.refill(now_ms);
        self.bytes -= bytes as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found in review: after the clock stepped back, `last` stayed at the old reading and
    /// nothing refilled until the clock passed it again: all replay into the node froze.
    #[test]
    fn a_clock_stepped_back_does_not_stop_the_refill() {
        let mut b = ReplayBudget::new(10, 1 << 20);
        let first = b.grant(10_000, 100, 1 << 20).keys;
        assert!(first > 0);
        while b.grant(10_000, 100, 1 << 20).keys > 0 {}
        // The clock steps back 5 s; one second later the bucket is full again (its burst).
        assert_eq!(b.grant(5_000, 100, 1 << 20).keys, 0);
        assert_eq!(b.grant(6_000, 100, 1 << 20).keys, 5);
    }

    /// At a pace of a quarter, holders asking as fast as they can get a quarter of the rate.
    #[test]
    fn a_slower_pace_scales_the_rate_and_the_burst() {
        let mut b = ReplayBudget::new(1000, 1 << 30);
        b.set_pace(0, 0.25);
        let mut granted = 0u64;
        for t in (0..=10_000).step_by(5) {
            granted += b.grant(t, 256, 1 << 20).keys as u64;
        }
        let max = 250.0 * 10.0 + 250.0 * BURST_SECS;
        assert!(granted as f64 <= max, "{granted} > {max}");
        assert!(
            granted as f64 >= 0.95 * 2500.0,
            "the paced budget is used: {granted}"
        );
        b.set_pace(10_000, 1.0);
        let mut more = 0u64;
        for t in (10_005..=11_000).step_by(5) {
            more += b.grant(t, 256, 1 << 20).keys as u64;
        }
        assert!(more >= 900, "back to the whole rate: {more} in a second");
        let mut small = ReplayBudget::new(100, 1 << 30);
        small.set_pace(0, 0.1);
        assert_eq!(
            small.pace(),
            1.0,
            "a budget of 100 keys/s is not paced below it"
        );
    }

    /// Holders asking as fast as they can never get more than the rate plus one burst.
    #[test]
    fn many_holders_share_one_rate() {
        let mut b = ReplayBudget::new(1000, 1 << 30);
        let mut granted = 0u64;
        // Ten holders ask every millisecond for 10 seconds.
        for ms in 0..10_000u64 {
            for _ in 0..10 {
                granted += b.grant(ms, 256, 1 << 20).keys as u64;
            }
        }
        let max = 10.0 * 1000.0 + 1000.0 * BURST_SECS;
        assert!(granted as f64 <= max, "{granted} > {max}");
        assert!(
            granted as f64 >= 0.95 * 10.0 * 1000.0,
            "the budget is used: {granted}"
        );
    }

    #[test]
    fn bytes_are_paced_and_a_large_state_goes_through_in_debt() {
        let mut b = ReplayBudget::new(1_000_000, 1000);
        let g = b.grant(0, 10, 10_000);
        assert_eq!(g.keys, 10);
        assert_eq!(g.bytes, 500, "at most the bucket (half a second of bytes)");
        // The holder sent one 5 000-byte state (alone, it is always allowed).
        b.spend_bytes(0, 5_000);
        let g = b.grant(1000, 10, 10_000);
        assert_eq!((g.keys, g.bytes), (0, 0), "in debt: nothing");
        assert!(g.retry_after_ms >= 3_000, "{g:?}");
        let g = b.grant(5_000, 10, 10_000);
        assert!(g.keys > 0 && g.bytes > 0, "debt repaid after 4.5 s: {g:?}");
    }

    #[test]
    fn an_empty_bucket_says_when_to_come_back() {
        let mut b = ReplayBudget::new(10, 1 << 20);
        assert_eq!(b.grant(0, 100, 1 << 20).keys, 5);
        let g = b.grant(0, 100, 1 << 20);
        assert_eq!(g.keys, 0);
        assert_eq!(g.retry_after_ms, 100, "one key per 100 ms");
        assert_eq!(b.grant(100, 100, 1 << 20).keys, 1);
    }
}
