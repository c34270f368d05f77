//! The `tree_scan` worker: rebuilds an untrusted anti-entropy tree from the data in the
//! background, range by range in ring order (the tree is trusted below its cursor, and only
//! that part takes part in exchanges), then runs the slow **verify scan**: over a configured
//! period it recomputes every leaf from the data, counting and fixing those that do not match
//! (bit rot, or a bug in the write path). Both go through `Store::rescan`, which the writer runs
//! between two groups, so no write interleaves with a range being recomputed.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::service::AntiEntropy;
use crate::background::load::CpuLoad;
use crate::background::{Progress, Worker, WorkerState};
use crate::merkle::{leaf_end, leaf_start, LEAVES};
use crate::storage::RescanMode;

/// Most leaves per rebuild or verify step (1/1024 of the ring); a step starts at one leaf and
/// grows or shrinks with what the last step read (`next_step_leaves`).
pub const MAX_STEP_LEAVES: u32 = 1024;
/// About how many bytes (keys and values) one step reads. A step runs in the storage writer
/// between two groups, so every write waits for it, and it holds what it read in memory:
/// found in review, a fixed 1/1024 of the ring per step was 100 MB read in one writer stall on
/// a node holding 100 GB.
pub const STEP_BYTES: u64 = 4 << 20;

/// The leaves of the next step after one of `leaves` leaves that read `bytes`: as many as
/// should read about `STEP_BYTES` at the same density, at most twice as many as the last
/// (the data may be denser further on), within `1..=MAX_STEP_LEAVES`.
pub fn next_step_leaves(leaves: u32, bytes: u64) -> u32 {
    let leaves = u64::from(leaves.max(1));
    let scaled = (leaves * STEP_BYTES).checked_div(bytes).unwrap_or(u64::MAX);
    scaled.min(leaves * 2).clamp(1, u64::from(MAX_STEP_LEAVES)) as u32
}
/// The rebuild reads this many times the anti-entropy keys/s budget (a node whose tree is not
/// trusted cannot take part in exchanges for the rest of the ring, so the rebuild goes first).
pub const REBUILD_SPEEDUP: f64 = 10.0;

crate::metrics::metric_set! {
    /// The tree scans (registered under `aae.`).
    pub struct ScanMetrics {
        rebuild_keys: Counter = "rebuild_keys", "keys read to rebuild the tree";
        verify_leaves: Counter = "verify_leaves", "leaves recomputed by the verify scan";
        verify_mismatches: Counter = "verify_mismatches", "leaves the verify scan found not matching the data (fixed)";
        verify_cycles: Counter = "verify_cycles", "complete verify scans of the whole tree";
    }
}

pub struct TreeScanWorker {
    aae: Arc<AntiEntropy>,
    keys_per_sec: f64,
    cpu: CpuLoad,
    /// One whole verify scan takes this long (zero: none).
    verify_period: Duration,
    verify_next: u32,
    verify_due: Instant,
    /// Leaves in the next step (`next_step_leaves`).
    step: u32,
    rebuild_started: Option<Instant>,
    pub metrics: Arc<ScanMetrics>,
}

impl TreeScanWorker {
    pub fn new(aae: Arc<AntiEntropy>, keys_per_sec: u32, verify_period: Duration) -> Self {
        let metrics = Arc::new(ScanMetrics::default());
        TreeScanWorker {
            aae,
            keys_per_sec: keys_per_sec.max(1) as f64,
            cpu: CpuLoad::default(),
            verify_period,
            verify_next: 0,
            verify_due: Instant::now() + Self::verify_wait(verify_period, 1),
            step: 1,
            rebuild_started: None,
            metrics,
        }
    }

    /// Time after a verify step of `leaves` leaves: the period spread over the leaves.
    fn verify_wait(period: Duration, leaves: u32) -> Duration {
        period.mul_f64(f64::from(leaves) / LEAVES as f64)
    }

    fn ready(&self) -> u32 {
        self.aae.tree_ready().load(Ordering::Acquire)
    }

    /// Waits as long as `keys` keys take at `speedup` times the keys/s budget, scaled by the
    /// CPU yield as the wait goes (found in review: each wait was cut at 10 s, so on a large
    /// node a rebuild step ran at up to 12 times its budget on a busy machine); cut short only
    /// by shutdown (the step's work is done).
    async fn pace(&mut self, keys: u64, speedup: f64, stop: &CancellationToken) {
        let owed = Duration::from_secs_f64(keys as f64 / (self.keys_per_sec * speedup));
        let _ = self.cpu.repay(owed, stop).await;
    }
}

impl Worker for TreeScanWorker {
    fn name(&self) -> String {
        "tree_scan".into()
    }

    fn progress(&self) -> Progress {
        let ready = self.ready();
        let detail = if (ready as usize) < LEAVES {
            format!(
                "rebuilding the anti-entropy tree: {:.1}% ({} keys read); exchanges use the trusted part only",
                ready as f64 * 100.0 / LEAVES as f64,
                self.metrics.rebuild_keys.get()
            )
        } else if self.verify_period.is_zero() {
            "tree trusted; verify scan off".into()
        } else {
            format!(
                "tree trusted; verify scan at {:.1}% of this pass, {} mismatches found so far",
                self.verify_next as f64 * 100.0 / LEAVES as f64,
                self.metrics.verify_mismatches.get(),
            )
        };
        Progress {
            detail,
            queue: Some((LEAVES as u32 - ready) as u64),
        }
    }

    async fn work(&mut self, stop: &CancellationToken) -> Result<WorkerState, String> {
        let ready = self.ready();
        if (ready as usize) < LEAVES {
            let started = *self.rebuild_started.get_or_insert_with(Instant::now);
            let last = (ready + self.step).min(LEAVES as u32) - 1;
            let outcome = self
                .aae
                .store()
                .rescan(leaf_start(ready), leaf_end(last), RescanMode::Rebuild)
                .await
                .map_err(|e| {
                    format!(
                        "rebuilding tree leaves {ready}..={last} (positions {:016x}..={:016x}): {e}",
                        leaf_start(ready),
                        leaf_end(last)
                    )
                })?;
            self.metrics.rebuild_keys.inc_by(outcome.keys);
            self.step = next_step_leaves(last - ready + 1, outcome.bytes);
            if self.ready() as usize >= LEAVES {
                info!(node = %self.aae.node_id(), keys = self.metrics.rebuild_keys.get(),
                      secs = started.elapsed().as_secs(), "anti-entropy tree rebuilt from the data");
            }
            self.pace(outcome.keys, REBUILD_SPEEDUP, stop).await;
            return Ok(WorkerState::Busy);
        }
        if self.verify_period.is_zero() || Instant::now() < self.verify_due {
            return Ok(WorkerState::Idle);
        }
        let first = self.verify_next;
        let last = (first + self.step).min(LEAVES as u32) - 1;
        let outcome = self
            .aae
            .store()
            .rescan(leaf_start(first), leaf_end(last), RescanMode::Verify)
            .await
            .map_err(|e| format!("verifying tree leaves {first}..={last}: {e}"))?;
        self.metrics.verify_leaves.inc_by((last - first + 1) as u64);
        self.step = next_step_leaves(last - first + 1, outcome.bytes);
        if outcome.mismatches > 0 {
            self.metrics.verify_mismatches.inc_by(outcome.mismatches);
            warn!(node = %self.aae.node_id(), first_leaf = first, last_leaf = last,
                  positions = format!("{:016x}..={:016x}", leaf_start(first), leaf_end(last)),
                  mismatches = outcome.mismatches, keys = outcome.keys,
                  "anti-entropy tree leaves did not match the data (fixed)");
        }
        self.verify_next = if last as usize + 1 >= LEAVES {
            self.metrics.verify_cycles.inc();
            0
        } else {
            last + 1
        };
        self.verify_due = Instant::now() + Self::verify_wait(self.verify_period, last - first + 1);
        Ok(WorkerState::Idle)
    }

    async fn wait_for_work(&mut self) -> WorkerState {
        let wait = self
            .verify_due
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(100), Duration::from_secs(5));
        tokio::time::sleep(wait).await;
        WorkerState::Busy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found in review: every rebuild and verify step read 1/1024 of the ring, whatever the
    /// node held, in the storage writer (every write waits for it) and into memory: 100 MB on
    /// a node of 100 GB. A step now reads about `STEP_BYTES`.
    #[test]
    fn a_step_reads_about_its_byte_target_whatever_the_data_size() {
        // A node of 100 GB: 1024 leaves read 100 MB; the next step takes about 4 MiB's worth.
        let big = next_step_leaves(1024, 100 << 20);
        assert_eq!(u64::from(big), 1024 * STEP_BYTES / (100 << 20));
        assert_eq!(big, 40);
        // A leaf alone past the target: one leaf (the least step).
        assert_eq!(next_step_leaves(1, 64 << 20), 1);
        // A small node grows its steps, at most twice per step, up to 1/1024 of the ring.
        assert_eq!(next_step_leaves(1, 1_000), 2);
        assert_eq!(next_step_leaves(512, 1_000), MAX_STEP_LEAVES);
        assert_eq!(next_step_leaves(1024, 0), MAX_STEP_LEAVES);
        assert_eq!(next_step_leaves(0, 0), 2);
        // At the target: the same step.
        assert_eq!(next_step_leaves(100, STEP_BYTES), 100);
    }
}
