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
use crate::background::load::{repay, CpuLoad};
use crate::background::{Progress, Worker, WorkerState};
use crate::merkle::{leaf_end, leaf_start, LEAVES};
use crate::storage::RescanMode;

/// Leaves per rebuild step (1/1024 of the ring).
pub const REBUILD_LEAVES: u32 = 1024;
/// Leaves per verify step.
pub const VERIFY_LEAVES: u32 = 1024;
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
            verify_due: Instant::now() + Self::verify_step(verify_period),
            rebuild_started: None,
            metrics,
        }
    }

    /// Time between two verify steps: the period spread over the steps of one scan.
    fn verify_step(period: Duration) -> Duration {
        period / (LEAVES as u32 / VERIFY_LEAVES)
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
        let cpu = &mut self.cpu;
        let _ = repay(owed, || cpu.pace(), stop).await;
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
            let last = (ready + REBUILD_LEAVES).min(LEAVES as u32) - 1;
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
        let last = (first + VERIFY_LEAVES).min(LEAVES as u32) - 1;
        let outcome = self
            .aae
            .store()
            .rescan(leaf_start(first), leaf_end(last), RescanMode::Verify)
            .await
            .map_err(|e| format!("verifying tree leaves {first}..={last}: {e}"))?;
        self.metrics.verify_leaves.inc_by((last - first + 1) as u64);
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
        self.verify_due = Instant::now() + Self::verify_step(self.verify_period);
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
