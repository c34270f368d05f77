//! Background workers: every loop the node runs besides serving requests is a [`Worker`] run by
//! the [`Runner`] (after Garage's `util/background`).
//!
//! A worker has a name and a status (state, progress, queue length, last error, errors in a
//! row). The runner calls [`Worker::work`] for one bounded unit of work at a time; when the
//! worker says it is idle, the runner waits in [`Worker::wait_for_work`] (a notification, an
//! interval, a membership change); after an error it backs off exponentially. On shutdown the
//! runner stops calling `work`, gives every worker its [`Worker::shutdown`] hook, and joins them
//! all within a deadline, before storage closes. Threads the runner does not drive (the
//! storage writer) are *observed*: listed with a status read from a closure.
//!
//! Every worker shows in `kvctl status` (`worker.<name>` lines) and in the metrics registry
//! (`workers.errors{worker}`, `workers.queue{worker}`; the root adds `workers.state`).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::Registry;

pub mod load;

/// First wait after a failed step; doubles per error in a row up to `BACKOFF_MAX`.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// What a worker says after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// More work is ready: call `work` again.
    Busy,
    /// Nothing to do: wait in `wait_for_work`.
    Idle,
    /// Finished for good.
    Done,
}

/// What a worker reports about itself, cheaply, after each step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// Free text: what it is doing, how far it got.
    pub detail: String,
    /// Items waiting for it, when it has a queue.
    pub queue: Option<u64>,
}

pub trait Worker: Send + 'static {
    fn name(&self) -> String;

    fn progress(&self) -> Progress {
        Progress::default()
    }

    /// One bounded unit of work. `stop` is cancelled when the node shuts down: a step that
    /// waits must also wait for it.
    fn work(
        &mut self,
        stop: &CancellationToken,
    ) -> impl Future<Output = Result<WorkerState, String>> + Send;

    /// Waits until there may be work; never called after `work` returned `Busy`.
    fn wait_for_work(&mut self) -> impl Future<Output = WorkerState> + Send {
        std::future::pending()
    }

    /// Last words at shutdown (drain, say goodbye), bounded by the runner's deadline.
    fn shutdown(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// A worker's state as the runner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Busy,
    Idle,
    BackingOff,
    Stopped,
}

impl RunState {
    pub fn name(self) -> &'static str {
        match self {
            RunState::Busy => "busy",
            RunState::Idle => "idle",
            RunState::BackingOff => "backing off",
            RunState::Stopped => "stopped",
        }
    }
}

/// The status of one worker: what `kvctl status` shows.
#[derive(Debug, Clone)]
pub struct WorkerStatus {
    pub name: String,
    pub state: RunState,
    pub progress: Progress,
    pub errors: u64,
    pub errors_in_a_row: u32,
    pub last_error: Option<String>,
}

impl WorkerStatus {
    fn new(name: String) -> WorkerStatus {
        WorkerStatus {
            name,
            state: RunState::Busy,
            progress: Progress::default(),
            errors: 0,
            errors_in_a_row: 0,
            last_error: None,
        }
    }

    /// One line for `kvctl status`.
    pub fn summary(&self) -> String {
        let mut s = self.state.name().to_string();
        if !self.progress.detail.is_empty() {
            s.push_str("; ");
            s.push_str(&self.progress.detail);
        }
        if let Some(q) = self.progress.queue {
            s.push_str(&format!("; queue {q}"));
        }
        if self.errors > 0 {
            s.push_str(&format!(
                "; {} errors ({} in a row)",
                self.errors, self.errors_in_a_row
            ));
        }
        if let Some(e) = &self.last_error {
            s.push_str(&format!("; last error: {e}"));
        }
        s
    }
}

/// How the runner reads one worker's status (a run worker's published record, or an observed
/// thread's closure).
type StatusReader = Arc<dyn Fn() -> WorkerStatus + Send + Sync>;

/// Starts workers, knows their status, stops them.
pub struct Runner {
    node_id: String,
    stop: CancellationToken,
    tasks: Mutex<JoinSet<()>>,
    workers: Arc<Mutex<Vec<StatusReader>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().expect("worker runner lock poisoned")
}

/// One series per listed worker, labelled with its name.
fn per_worker(
    workers: &Mutex<Vec<StatusReader>>,
    value: impl Fn(&WorkerStatus) -> f64,
) -> Vec<(crate::metrics::Labels, f64)> {
    lock(workers)
        .iter()
        .map(|read| {
            let s = read();
            (vec![("worker".to_string(), s.name.clone())], value(&s))
        })
        .collect()
}

impl Runner {
    pub fn new(node_id: String, registry: Arc<Registry>) -> Arc<Runner> {
        let workers: Arc<Mutex<Vec<StatusReader>>> = Arc::default();
        let errors = workers.clone();
        registry.probe_counter_family(
            "workers.errors",
            "failed steps of each background worker",
            move || per_worker(&errors, |s| s.errors as f64),
        );
        let queue = workers.clone();
        registry.probe_family(
            "workers.queue",
            "items waiting for each background worker",
            move || per_worker(&queue, |s| s.progress.queue.unwrap_or(0) as f64),
        );
        Arc::new(Runner {
            node_id,
            stop: CancellationToken::new(),
            tasks: Mutex::new(JoinSet::new()),
            workers,
        })
    }

    /// Lists a worker: in `statuses()` and in the `workers.errors{worker}` and
    /// `workers.queue{worker}` metric families.
    fn list(&self, read: StatusReader) {
        lock(&self.workers).push(read);
    }

    /// Starts `worker` on its own task.
    pub fn spawn<W: Worker>(&self, worker: W) {
        let name = worker.name();
        let status = Arc::new(Mutex::new(WorkerStatus::new(name.clone())));
        let shared = status.clone();
        self.list(Arc::new(move || lock(&shared).clone()));
        let stop = self.stop.clone();
        let node_id = self.node_id.clone();
        lock(&self.tasks).spawn(run_worker(worker, status, stop, node_id));
    }

    /// Lists a thread this runner does not drive, with its status read from `observe`.
    pub fn observe(
        &self,
        name: &str,
        observe: impl Fn() -> (RunState, Progress) + Send + Sync + 'static,
    ) {
        let owned = name.to_string();
        self.list(Arc::new(move || {
            let (state, progress) = observe();
            WorkerStatus {
                state,
                progress,
                ..WorkerStatus::new(owned.clone())
            }
        }));
    }

    /// Every worker's status, in start order.
    pub fn statuses(&self) -> Vec<WorkerStatus> {
        lock(&self.workers).iter().map(|read| read()).collect()
    }

    /// Stops every worker: no new steps, each one's `shutdown` hook, all joined within
    /// `deadline` (stragglers are aborted and named in the log).
    pub async fn shutdown(&self, deadline: Duration) {
        self.stop.cancel();
        let mut tasks = std::mem::take(&mut *lock(&self.tasks));
        let started = Instant::now();
        let joined = tokio::time::timeout(deadline, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if joined.is_err() {
            let busy: Vec<String> = self
                .statuses()
                .into_iter()
                .filter(|s| s.state != RunState::Stopped)
                .map(|s| s.name)
                .collect();
            warn!(node = %self.node_id, ?busy, ?deadline, "workers still running after the shutdown deadline; aborting them");
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        } else {
            info!(node = %self.node_id, elapsed = ?started.elapsed(), "workers stopped");
        }
    }
}

/// How stale a busy worker's published status may get: a worker doing many small steps (the
/// late-reply worker: two per request) must not pay a lock and a progress string per step.
pub const STATUS_REFRESH: Duration = Duration::from_millis(250);

/// The runner's record of one worker, published to `status` when it matters.
struct Record {
    shared: Arc<Mutex<WorkerStatus>>,
    state: RunState,
    published: Instant,
    errors_in_a_row: u32,
}

impl Record {
    /// Publishes the state and progress now if the state changed or the last publication is
    /// older than `STATUS_REFRESH` (or `force`).
    fn set<W: Worker>(&mut self, state: RunState, worker: &W, force: bool) {
        let now = Instant::now();
        if !force && state == self.state && now.duration_since(self.published) < STATUS_REFRESH {
            return;
        }
        self.state = state;
        self.published = now;
        let mut s = lock(&self.shared);
        s.state = state;
        s.progress = worker.progress();
    }

    /// Records a failed step; returns the errors in a row.
    fn failed(&mut self, e: &str) -> u32 {
        self.errors_in_a_row += 1;
        let mut s = lock(&self.shared);
        s.errors += 1;
        s.errors_in_a_row = self.errors_in_a_row;
        s.last_error = Some(e.to_string());
        self.errors_in_a_row
    }

    /// Records a good step (a lock only when it ends a run of errors).
    fn succeeded(&mut self) {
        if self.errors_in_a_row > 0 {
            self.errors_in_a_row = 0;
            lock(&self.shared).errors_in_a_row = 0;
        }
    }
}

async fn run_worker<W: Worker>(
    mut worker: W,
    status: Arc<Mutex<WorkerStatus>>,
    stop: CancellationToken,
    node_id: String,
) {
    let name = worker.name();
    let mut rec = Record {
        shared: status,
        state: RunState::Busy,
        published: Instant::now(),
        errors_in_a_row: 0,
    };
    loop {
        if stop.is_cancelled() {
            break;
        }
        match worker.work(&stop).await {
            Ok(state) => {
                rec.succeeded();
                match state {
                    WorkerState::Busy => rec.set(RunState::Busy, &worker, false),
                    WorkerState::Done => break,
                    WorkerState::Idle => {
                        rec.set(RunState::Idle, &worker, false);
                        let next = tokio::select! {
                            _ = stop.cancelled() => break,
                            next = worker.wait_for_work() => next,
                        };
                        if next == WorkerState::Done {
                            break;
                        }
                        rec.set(RunState::Busy, &worker, false);
                    }
                }
            }
            Err(e) => {
                let in_a_row = rec.failed(&e);
                rec.set(RunState::BackingOff, &worker, true);
                let wait = backoff(in_a_row);
                warn!(node = %node_id, worker = %name, error = %e, errors_in_a_row = in_a_row, ?wait,
                      "worker step failed; backing off");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
                rec.set(RunState::Busy, &worker, false);
            }
        }
    }
    worker.shutdown().await;
    rec.set(RunState::Stopped, &worker, true);
}

/// The wait after `errors_in_a_row` failed steps.
pub fn backoff(errors_in_a_row: u32) -> Duration {
    doubling(BACKOFF_MIN, BACKOFF_MAX, errors_in_a_row)
}

/// `first` after the first failure in a row, doubling with each further one, at most `max`.
pub fn doubling(first: Duration, max: Duration, in_a_row: u32) -> Duration {
    let exp = in_a_row.saturating_sub(1).min(16);
    (first * 2u32.pow(exp)).min(max)
}

/// At most this many background writes (hint replay merges and deletes, anti-entropy repairs)
/// are handed to the writer together: a batch of 256 in one group commit would hold the
/// foreground writes queued behind it for the whole batch (measured: docs/benchmarks.md).
pub const APPLY_CHUNK: usize = 32;

/// Background writes (hint replay, later repair and transfers) wait this many times as long as
/// their last chunk took before the next one (Garage's tranquilizer): a chunk that queued
/// behind busy foreground work took long, so the pause grows with the foreground's load and
/// the background's share of the writer stays at most 1 / (1 + TRANQUILITY).
pub const TRANQUILITY: u32 = 2;
/// States received from a peer in bulk (an anti-entropy push or fetch, a hint replay) are
/// merged within this long of their arrival or dropped (the sender's request has timed out by
/// then, and it sends them again later): nothing lands late (tombstone GC relies on it).
pub const MERGE_DEADLINE: Duration = Duration::from_secs(30);

/// The longest tranquil pause (a chunk stuck behind a stall does not park replay for minutes).
pub const MAX_TRANQUIL_PAUSE: Duration = Duration::from_secs(1);

/// The pause after a background chunk that took `elapsed`.
pub fn tranquil_pause(elapsed: Duration) -> Duration {
    (elapsed * TRANQUILITY).min(MAX_TRANQUIL_PAUSE)
}

/// Applies `apply` to `items` [`APPLY_CHUNK`] at a time: a chunk's futures run together (one
/// group commit), then the chunk's [`tranquil_pause`]. With a `gate`, each chunk and its pause
/// hold it (one chunk at a time across callers). Stops after a chunk in which `failed` holds
/// for an outcome; the outcomes are in the items' order.
pub async fn paced_chunks<T, Fut>(
    items: Vec<T>,
    gate: Option<&tokio::sync::Mutex<()>>,
    mut apply: impl FnMut(T) -> Fut,
    failed: impl Fn(&Fut::Output) -> bool,
) -> Vec<Fut::Output>
where
    Fut: Future,
{
    let mut out = Vec::with_capacity(items.len());
    let mut items = items.into_iter().peekable();
    while items.peek().is_some() {
        let _held = match gate {
            Some(g) => Some(g.lock().await),
            None => None,
        };
        let started = Instant::now();
        let chunk: Vec<Fut> = items.by_ref().take(APPLY_CHUNK).map(&mut apply).collect();
        let done = futures::future::join_all(chunk).await;
        let stop = done.iter().any(&failed);
        out.extend(done);
        if stop {
            break;
        }
        tokio::time::sleep(tranquil_pause(started.elapsed())).await;
    }
    out
}

/// Sleeps `pause` (a background pace) unless `stop` is cancelled first: Err then, so a paced
/// step ends at once when the node shuts down instead of sleeping out its pause.
pub async fn rest(pause: Duration, stop: &CancellationToken) -> Result<(), String> {
    if pause.is_zero() {
        return Ok(());
    }
    tokio::select! {
        _ = stop.cancelled() => Err(STOPPED.into()),
        _ = tokio::time::sleep(pause) => Ok(()),
    }
}

/// The error of a paced step cut short by shutdown.
pub const STOPPED: &str = "stopped: the node is shutting down";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::eventually;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tokio::sync::Notify;

    /// Outcomes keep the items' order, chunk by chunk, and a chunk with a failure is the last.
    #[tokio::test]
    async fn paced_chunks_keep_order_and_stop_after_a_failed_chunk() {
        let items: Vec<usize> = (0..(2 * APPLY_CHUNK + 6)).collect();
        let all = paced_chunks(items.clone(), None, |i| async move { i }, |_| false).await;
        assert_eq!(all, items);
        let gate = tokio::sync::Mutex::new(());
        let fail_at = APPLY_CHUNK + 3;
        let some = paced_chunks(items, Some(&gate), |i| async move { i }, |i| *i == fail_at).await;
        assert_eq!(some, (0..2 * APPLY_CHUNK).collect::<Vec<_>>());
    }

    #[test]
    fn a_tranquil_pause_grows_with_the_chunk_time_up_to_its_cap() {
        let fast = tranquil_pause(Duration::from_millis(2));
        let slow = tranquil_pause(Duration::from_millis(20));
        assert_eq!(fast, Duration::from_millis(2) * TRANQUILITY);
        assert_eq!(slow, fast * 10);
        assert_eq!(tranquil_pause(Duration::from_secs(60)), MAX_TRANQUIL_PAUSE);
    }

    /// Fails its first two steps, then does `items` units of work one per step, then idles
    /// until notified.
    struct Counting {
        items: u32,
        done: Arc<AtomicU32>,
        failures_left: u32,
        wake: Arc<Notify>,
        shut: Arc<AtomicU32>,
    }

    impl Worker for Counting {
        fn name(&self) -> String {
            "counting".into()
        }
        fn progress(&self) -> Progress {
            Progress {
                detail: format!("{} done", self.done.load(Ordering::SeqCst)),
                queue: Some(self.items as u64),
            }
        }
        async fn work(&mut self, _stop: &CancellationToken) -> Result<WorkerState, String> {
            if self.failures_left > 0 {
                self.failures_left -= 1;
                return Err("disk on fire".into());
            }
            if self.items == 0 {
                return Ok(WorkerState::Idle);
            }
            self.items -= 1;
            self.done.fetch_add(1, Ordering::SeqCst);
            Ok(WorkerState::Busy)
        }
        async fn wait_for_work(&mut self) -> WorkerState {
            self.wake.notified().await;
            self.items += 1;
            WorkerState::Busy
        }
        async fn shutdown(&mut self) {
            self.shut.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_worker_backs_off_works_idles_wakes_and_stops() {
        let registry = Arc::new(Registry::default());
        let runner = Runner::new("n1".into(), registry.clone());
        let done = Arc::new(AtomicU32::new(0));
        let wake = Arc::new(Notify::new());
        let shut = Arc::new(AtomicU32::new(0));
        runner.spawn(Counting {
            items: 3,
            done: done.clone(),
            failures_left: 2,
            wake: wake.clone(),
            shut: shut.clone(),
        });
        eventually("three items done", || done.load(Ordering::SeqCst) == 3).await;
        eventually("idle", || runner.statuses()[0].state == RunState::Idle).await;
        let st = runner.statuses().remove(0);
        assert_eq!(st.name, "counting");
        assert_eq!(st.errors, 2);
        assert_eq!(st.errors_in_a_row, 0, "reset by the first good step");
        assert_eq!(st.last_error.as_deref(), Some("disk on fire"));
        assert_eq!(st.progress.queue, Some(0));
        assert!(
            st.summary().contains("idle; 3 done; queue 0; 2 errors"),
            "{}",
            st.summary()
        );
        let metrics = registry.snapshot();
        assert!(
            metrics.contains(&("workers.errors{worker=counting}".to_string(), 2)),
            "{metrics:?}"
        );
        wake.notify_one();
        eventually("woken to one more", || done.load(Ordering::SeqCst) == 4).await;
        runner.shutdown(Duration::from_secs(1)).await;
        assert_eq!(shut.load(Ordering::SeqCst), 1, "the shutdown hook ran once");
        assert_eq!(runner.statuses()[0].state, RunState::Stopped);
    }

    /// A worker that ignores the stop signal is aborted at the deadline.
    #[tokio::test]
    async fn a_stuck_worker_is_aborted_at_the_deadline() {
        struct Stuck;
        impl Worker for Stuck {
            fn name(&self) -> String {
                "stuck".into()
            }
            async fn work(&mut self, _stop: &CancellationToken) -> Result<WorkerState, String> {
                std::future::pending::<()>().await;
                Ok(WorkerState::Busy)
            }
        }
        let runner = Runner::new("n1".into(), Arc::new(Registry::default()));
        runner.spawn(Stuck);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let started = Instant::now();
        runner.shutdown(Duration::from_millis(200)).await;
        // It returned (the stuck task was aborted) only after giving the worker its deadline.
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(
            runner.statuses()[0].state,
            RunState::Busy,
            "it never stopped by itself"
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        assert_eq!(backoff(1), BACKOFF_MIN);
        assert_eq!(backoff(2), BACKOFF_MIN * 2);
        assert_eq!(backoff(3), BACKOFF_MIN * 4);
        assert_eq!(backoff(100), BACKOFF_MAX);
    }
}
