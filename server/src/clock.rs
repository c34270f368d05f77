//! Wall-clock time in milliseconds since the Unix epoch: sibling timestamps, ring generations,
//! gossip envelopes. One function, so every module takes time from the same place (and the
//! sans-IO cores take it as an argument instead).

use std::time::{SystemTime, UNIX_EPOCH};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
