//! The `release` worker: after a ring change, this node gives away the data of ranges it no
//! longer replicates: each key is pushed to its current replicas (merged there with the
//! version-vector logic) and, once every live one merged it, deleted here by
//! compare-and-delete (`WriteOp::Release`: a state that changed meanwhile is kept and handed
//! over again on the next pass).
//!
//! It runs only when no transition is running and every live member has had this layout for
//! [`SETTLE`] (coordinators still reading with the previous layout are done by then), and it
//! runs again whenever anything lands in a foreign range (a late write or hint under an old
//! layout): such data is handed to its owners, never lost. A retired node (left, removed,
//! replaced) replicates nothing, so it hands everything over and ends empty; it then says so
//! in gossip (`holds_nothing`), and the claimant records it in the layout (`released`).
//!
//! Keys are found by scanning the data column family over the foreign positions, a page at a
//! time, paced by the transfer budgets (`--transfer-keys-per-sec`, `--transfer-kib-per-sec`:
//! keys found, bytes pushed) and the CPU yield like every background pass.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ringkv_protocol::peer::aae::{MAX_DIGESTS, STATES_BATCH_BYTES};
use ringkv_protocol::peer::AaeResponse;
use ringkv_protocol::ring::key_position;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::background::load::{CpuLoad, Rates};
use crate::background::{Progress, Worker, WorkerState};
use crate::membership::layout::LayoutId;
use crate::membership::{HandOverGuard, Membership};
use crate::ring::ranges::{foreign_spans, Span};
use crate::rpc::{PeerPool, Transport};
use crate::storage::{HexKey, Store, WriteOp};

/// Every live member must have had the layout this long before data is released.
pub const SETTLE: Duration = Duration::from_secs(5);
/// A pass over the foreign ranges that found nothing is repeated this often.
pub const IDLE_PASS: Duration = Duration::from_secs(30);
/// Keys per page of the scan (and per push).
pub const PAGE: usize = 256;
/// A retired node looks this often whether it holds nothing any more.
pub const EMPTY_CHECK: Duration = Duration::from_secs(2);

crate::metrics::metric_set! {
    /// Data given away after ring changes (registered under `release.`).
    pub struct ReleaseMetrics {
        keys_handed: Counter = "keys_handed", "keys of foreign ranges merged by their owners and deleted here";
        keys_kept: Counter = "keys_kept", "keys of foreign ranges kept for now (an owner did not merge them, or they changed)";
        passes: Counter = "passes", "passes over the foreign ranges";
        pass_keys: Gauge = "pass_keys", "foreign keys found in the last complete pass";
        withheld: Gauge = "withheld", "1 while this node keeps its data instead of handing it over: it was taken out of the ring before this start, so the data may predate deletes purged since (wipe its data dir)";
    }
}

pub struct ReleaseWorker<T: Transport = PeerPool> {
    node_id: String,
    n: usize,
    membership: Membership,
    store: Arc<Store>,
    transport: Arc<T>,
    /// Keys found and bytes (keys and states, to all owners together) pushed per second.
    rates: Rates,
    cpu: CpuLoad,
    metrics: Arc<ReleaseMetrics>,
    /// The layout and when every live member was first seen with it. Layouts are named by
    /// (version, digest): two layouts of one version (concurrent commits) own different spans.
    settled: Option<(LayoutId, Instant)>,
    /// The pass in progress: the layout it is for, the foreign spans, the span index and the
    /// last key done in it.
    pass: Option<(LayoutId, Vec<Span>, usize, Bytes)>,
    found: u64,
    /// The layout of the last pass started.
    last_version: LayoutId,
    next_pass: Instant,
    /// Whether it may hand over what it holds (`HandOverGuard`).
    guard: HandOverGuard,
    /// When it last looked whether it holds nothing (what it said is in its gossip metadata).
    empty_checked: Option<Instant>,
    /// Since when this process has seen this node retired, and how long after that data sent
    /// to it before may still land (`quiet`: the tombstone settle time, zero without GC).
    retired_since: Option<Instant>,
    quiet: Duration,
    detail: String,
}

impl<T: Transport> ReleaseWorker<T> {
    pub fn new(
        n: usize,
        membership: Membership,
        store: Arc<Store>,
        transport: Arc<T>,
        rates: Rates,
        quiet: Duration,
        metrics: Arc<ReleaseMetrics>,
    ) -> ReleaseWorker<T> {
        let fresh = store.opened_fresh();
        ReleaseWorker {
            node_id: membership.view().me.to_string(),
            n,
            membership,
            store,
            transport,
            rates,
            cpu: CpuLoad::default(),
            metrics,
            settled: None,
            pass: None,
            found: 0,
            last_version: LayoutId::default(),
            next_pass: Instant::now(),
            guard: HandOverGuard::new(fresh),
            empty_checked: None,
            retired_since: None,
            quiet,
            detail: "no foreign data".into(),
        }
    }

    /// A retired node says in gossip once it holds no data and no hint (looked at every
    /// `EMPTY_CHECK`, withheld or not: a wiped data dir holds nothing either): the claimant
    /// records it in the layout, tombstone GC stops waiting for it, and it may join again.
    /// Only once nothing sent to it before it was retired can still land: no ring change
    /// runs, no live member coordinates a write begun under an older layout, and `quiet` has
    /// passed since this process saw it retired (a request's deadline and the peer-write
    /// limit are each at most half the settle time; found in review: an empty node said so
    /// at once while a late hint or repair could still reach it). Not for a process that never
    /// took part in the ring (`ClusterView::served`): a retired node refuses all data, so only
    /// its own work from before could still land.
    async fn report_emptiness(&mut self) {
        let view = self.membership.view();
        let said = view.seen.get(&view.me).is_some_and(|s| s.holds_nothing);
        if !view.retired() {
            self.retired_since = None;
            if said {
                self.membership.set_holds_nothing(false).await;
            }
            return;
        }
        // Only a process that took part while it was in the ring can have its own work still
        // landing (found by the full Jepsen profile: a node wiped and started again after it
        // left waited the whole settle time again, and could not join in that while).
        let quiet = if view.served {
            self.quiet
        } else {
            Duration::ZERO
        };
        let since = *self.retired_since.get_or_insert_with(Instant::now);
        let settled = view.next.is_none() && view.members_behind().is_empty();
        if !settled || since.elapsed() < quiet {
            return;
        }
        if self
            .empty_checked
            .is_some_and(|at| at.elapsed() < EMPTY_CHECK)
        {
            return;
        }
        self.empty_checked = Some(Instant::now());
        match self.store.holds_nothing().await {
            Ok(empty) if empty != said => {
                self.membership.set_holds_nothing(empty).await;
                if empty {
                    info!(node = %self.node_id, "taken out of the ring and holding nothing any more: said so to the cluster");
                }
            }
            Ok(_) => {}
            Err(e) => {
                warn!(node = %self.node_id, error = %e, "could not look whether this retired node holds anything");
            }
        }
    }

    /// Whether data may be released under the current layout (no transition, every live
    /// member has had it for SETTLE).
    fn may_release(&mut self) -> Option<LayoutId> {
        let view = self.membership.view();
        if view.next.is_some() || view.layout.version == 0 || !view.ready {
            self.settled = None;
            return None;
        }
        let version = view.layout_id();
        if !view.members_behind().is_empty() {
            self.settled = None;
            return None;
        }
        let since = match self.settled {
            Some((v, at)) if v == version => at,
            _ => {
                let now = Instant::now();
                self.settled = Some((version, now));
                now
            }
        };
        (since.elapsed() >= SETTLE).then_some(version)
    }

    /// Hands one page of foreign keys to their owners; the number of keys found.
    async fn page(&mut self, layout: LayoutId, stop: &CancellationToken) -> Result<usize, String> {
        let version = layout.version;
        let Some((_, spans, i, after)) = self.pass.as_mut() else {
            return Ok(0);
        };
        let Some(&(first, last)) = spans.get(*i) else {
            return Ok(0);
        };
        let (keys, more) = self
            .store
            .scan_digests(first, last, after, PAGE.min(MAX_DIGESTS))
            .await
            .map_err(|e| format!("scan of positions {first:016x}..={last:016x}: {e}"))?;
        match keys.last() {
            Some((k, _)) if more => *after = k.clone(),
            _ => {
                *i += 1;
                *after = Bytes::new();
            }
        }
        let found = keys.len();
        if found == 0 {
            return Ok(0);
        }
        let view = self.membership.view();
        if view.layout_id() != layout {
            // The layout changed under the pass: its spans may be this node's now.
            self.pass = None;
            return Ok(0);
        }
        // Per owner: the keys (and states) to push.
        let mut states: Vec<(Bytes, Bytes)> = Vec::with_capacity(found);
        for (key, _) in keys {
            match self.store.read_stored(&key).await {
                Ok(Some(s)) => states.push((key, Bytes::from(s))),
                Ok(None) => {}
                Err(e) => return Err(format!("key {}: {e}", HexKey(key.to_vec()))),
            }
        }
        let mut handed = 0u64;
        let mut kept = 0u64;
        // Bytes pushed (keys and states, to every owner), for the bytes/s budget.
        let mut sent = 0u64;
        // Group by owner set: one push per live owner per group.
        let mut groups: std::collections::BTreeMap<Vec<String>, Vec<(Bytes, Bytes)>> =
            std::collections::BTreeMap::new();
        for (key, state) in states {
            let preference = view.ring.preference_list(key_position(&key), self.n);
            if preference.contains(&view.me) {
                // This node replicates the key in the view's ring: not foreign.
                continue;
            }
            let owners: Vec<String> = preference.iter().map(|o| o.to_string()).collect();
            groups.entry(owners).or_default().push((key, state));
        }
        for (owners, entries) in groups {
            let live: Vec<&String> = owners.iter().filter(|o| view.is_alive(o)).collect();
            // Only when every owner is up: a down owner would miss the key if it were
            // deleted here (anti-entropy between the owners is not guaranteed to run first).
            if live.len() != owners.len() || owners.is_empty() {
                kept += entries.len() as u64;
                continue;
            }
            let mut merged = vec![true; entries.len()];
            for owner in live {
                let Some(addr) = view.peer_addr(owner) else {
                    merged.iter_mut().for_each(|m| *m = false);
                    continue;
                };
                let mut start = 0;
                while start < entries.len() {
                    // Batches within the states budget.
                    let mut end = start;
                    let mut bytes = 0;
                    while end < entries.len()
                        && (end == start || bytes + entries[end].1.len() <= STATES_BATCH_BYTES)
                    {
                        bytes += entries[end].1.len();
                        sent += (entries[end].0.len() + entries[end].1.len()) as u64;
                        end += 1;
                    }
                    let batch = entries[start..end].to_vec();
                    match super::push(&self.transport, addr, batch, &self.store).await {
                        Ok(AaeResponse::Merged(flags)) if flags.len() == end - start => {
                            for (m, ok) in merged[start..end].iter_mut().zip(flags) {
                                *m &= ok;
                            }
                        }
                        Ok(other) => {
                            warn!(node = %self.node_id, %owner, keys = end - start,
                                  first_key = %HexKey(entries[start].0.to_vec()), answer = ?other,
                                  "unexpected answer to a hand-over push");
                            merged[start..end].iter_mut().for_each(|m| *m = false);
                        }
                        Err(e) => {
                            warn!(node = %self.node_id, %owner, keys = end - start,
                                  first_key = %HexKey(entries[start].0.to_vec()), error = %e,
                                  "hand-over push failed; the keys stay here for the next pass");
                            merged[start..end].iter_mut().for_each(|m| *m = false);
                        }
                    }
                    start = end;
                }
            }
            for ((key, state), ok) in entries.into_iter().zip(merged) {
                if !ok {
                    kept += 1;
                    continue;
                }
                let op = WriteOp::Release {
                    key: key.clone(),
                    expected: state,
                };
                match self.store.write(op).await {
                    Ok(o) if o.changed => handed += 1,
                    Ok(_) => kept += 1,
                    Err(e) => {
                        warn!(node = %self.node_id, key = %HexKey(key.to_vec()), error = %e,
                              "could not delete a handed-over key; retried next pass");
                        kept += 1;
                    }
                }
            }
        }
        self.metrics.keys_handed.inc_by(handed);
        self.metrics.keys_kept.inc_by(kept);
        // Pace: the keys/s and bytes/s budgets (the tighter), scaled by the CPU yield as the
        // wait goes; cut short only by shutdown (the page's work is done).
        let _ = self
            .cpu
            .repay(self.rates.pause(found, sent, 1.0), stop)
            .await;
        if handed > 0 {
            self.detail = format!(
                "layout v{version}: handing foreign ranges to their owners ({} keys found this pass)",
                self.found + found as u64
            );
        }
        Ok(found)
    }
}

impl<T: Transport> Worker for ReleaseWorker<T> {
    fn name(&self) -> String {
        "release".into()
    }

    fn progress(&self) -> Progress {
        Progress {
            detail: self.detail.clone(),
            queue: None,
        }
    }

    async fn work(&mut self, stop: &CancellationToken) -> Result<WorkerState, String> {
        self.report_emptiness().await;
        if let Some(why) = self.guard.withheld(&self.membership.view()) {
            if self.metrics.withheld.get() == 0 {
                warn!(node = %self.node_id, "{why}");
                self.metrics.withheld.set(1);
            }
            self.detail = why;
            self.pass = None;
            return Ok(WorkerState::Idle);
        }
        let Some(version) = self.may_release() else {
            self.pass = None;
            return Ok(WorkerState::Idle);
        };
        let stale = self.pass.as_ref().is_some_and(|(v, ..)| *v != version);
        if stale {
            self.pass = None;
        }
        if self.pass.is_none() {
            // A new layout is looked at at once; the same one again after a pause.
            if self.last_version == version && Instant::now() < self.next_pass {
                return Ok(WorkerState::Idle);
            }
            let view = self.membership.view();
            let spans = foreign_spans(&view.ring, &view.me, self.n);
            self.pass = Some((version, spans, 0, Bytes::new()));
            self.last_version = version;
            self.found = 0;
        }
        match self.page(version, stop).await {
            Ok(found) => self.found += found as u64,
            Err(e) => {
                warn!(node = %self.node_id, error = %e, "hand-over pass failed; retried");
                self.pass = None;
                self.next_pass = Instant::now() + Duration::from_secs(5);
                return Ok(WorkerState::Idle);
            }
        }
        let done = self
            .pass
            .as_ref()
            .is_some_and(|(_, spans, i, _)| *i >= spans.len());
        if done {
            self.metrics.passes.inc();
            self.metrics.pass_keys.set(self.found);
            if self.found > 0 {
                info!(node = %self.node_id, version = version.version, keys = self.found,
                      "pass over the ranges this node no longer replicates done");
                // Keys kept (an owner down, a state changed) are tried again soon.
                self.next_pass = Instant::now() + Duration::from_secs(5);
            } else {
                self.detail = format!("layout v{}: no foreign data", version.version);
                self.next_pass = Instant::now() + IDLE_PASS;
            }
            self.pass = None;
            return Ok(WorkerState::Idle);
        }
        Ok(WorkerState::Busy)
    }

    async fn wait_for_work(&mut self) -> WorkerState {
        tokio::time::sleep(Duration::from_millis(500)).await;
        WorkerState::Busy
    }
}
