//! The fan-out helper: send to a set of targets, feed a sans-IO quorum tracker, honour the
//! deadline, and hand the replies that arrive after the decision to one background worker.
//!
//! Reads and writes use it today; hinted handoff, anti-entropy and transfers reuse it. The
//! caller pushes one `'static` future per target (a peer call, or a local storage operation);
//! [`FanOut::decide`] polls them all on the caller's task until the [`Tracker`] decides or the
//! deadline passes; [`FanOut::finish_late`] moves the rest, with the tracker, to the
//! [`LateReplies`] worker, which keeps feeding it until the deadline and then runs a
//! completion (read repair, late-ack counting). One worker for every request's late replies
//! instead of one spawned task per request: visible in `kvctl status`, joined at shutdown.

use std::collections::VecDeque;
use std::future::Future;
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant as TokioInstant;
use tokio_util::sync::CancellationToken;

use crate::background::{Progress, Worker, WorkerState};
use crate::coordinator::quorum::{Decision, QuorumError};

/// A quorum tracker fed with replies of type `R`.
pub trait Tracker<R>: Send + 'static {
    type Output;
    fn on_reply(&mut self, reply: R) -> Decision<Self::Output>;
    /// How many more successful replies a decision needs: while fewer calls are outstanding
    /// (one failed), [`FanOut::decide`] starts spare calls ([`FanOut::push_spare`]).
    fn wanted(&self) -> usize {
        0
    }
    /// The deadline passed (or no reply can come) before a decision: the error to answer.
    fn on_deadline(&mut self) -> QuorumError;
}

/// How long the late-reply worker waits for a request's remaining replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LateWait {
    /// Until the request's deadline (calls that may outlive it, like a local read).
    UntilDeadline,
    /// Until every call finished: only for calls each bounded by its own timeout (peer calls
    /// carry the request's remaining time), which spares a timer per request.
    AllReplies,
}

/// The outstanding replies of one request: calls of one future type `F` (an `Either` when a
/// request mixes kinds), polled in place, no box per target.
pub struct FanOut<F> {
    pending: FuturesUnordered<F>,
    deadline: Instant,
    /// Calls not started yet, in order: started when a started one fails (fewer outstanding
    /// than the tracker still wants), or one per `speculate` interval without a decision.
    spares: VecDeque<F>,
    speculate: Option<Duration>,
    /// Spares started.
    spares_started: usize,
}

impl<F, R> FanOut<F>
where
    F: Future<Output = R> + Send + 'static,
    R: Send + 'static,
{
    pub fn new(deadline: Instant) -> Self {
        FanOut {
            pending: FuturesUnordered::new(),
            deadline,
            spares: VecDeque::new(),
            speculate: None,
            spares_started: 0,
        }
    }

    pub fn push(&mut self, call: F) {
        self.pending.push(call);
    }

    /// A call started only if needed: when a started call fails and the tracker still wants
    /// more replies than are outstanding, or (with [`FanOut::speculate_after`]) when no
    /// decision came within that delay (a speculative retry, as Cassandra's). A call is a
    /// future, so a spare never started costs nothing.
    pub fn push_spare(&mut self, call: F) {
        self.spares.push_back(call);
    }

    /// Starts one spare after `delay` without a decision, and one more per further `delay`.
    pub fn speculate_after(&mut self, delay: Duration) {
        self.speculate = Some(delay);
    }

    /// How many spare calls were started.
    pub fn spares_started(&self) -> usize {
        self.spares_started
    }

    fn start_spare(&mut self) -> bool {
        match self.spares.pop_front() {
            Some(call) => {
                self.pending.push(call);
                self.spares_started += 1;
                true
            }
            None => false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Feeds replies to `tracker` until it decides; at the deadline (or when every reply is in
    /// undecided) the tracker names the error.
    pub async fn decide<T: Tracker<R>>(
        &mut self,
        tracker: &mut T,
    ) -> Result<T::Output, QuorumError> {
        let sleep = tokio::time::sleep_until(TokioInstant::from_std(self.deadline));
        tokio::pin!(sleep);
        // Far in the future when there is nothing to speculate with (never fires).
        let speculate_at = |from: Instant, s: &Self| match s.speculate {
            Some(d) if !s.spares.is_empty() => from + d,
            _ => s.deadline,
        };
        let speculate =
            tokio::time::sleep_until(TokioInstant::from_std(speculate_at(Instant::now(), self)));
        tokio::pin!(speculate);
        loop {
            while self.pending.len() < tracker.wanted() && self.start_spare() {}
            let decision = tokio::select! {
                reply = self.pending.next() => match reply {
                    Some(reply) => tracker.on_reply(reply),
                    None => return Err(tracker.on_deadline()),
                },
                _ = &mut speculate, if self.speculate.is_some() && !self.spares.is_empty() => {
                    self.start_spare();
                    let next = speculate_at(Instant::now(), self);
                    speculate.as_mut().reset(TokioInstant::from_std(next));
                    Decision::Pending
                }
                _ = &mut sleep => return Err(tracker.on_deadline()),
            };
            match decision {
                Decision::Ok(out) => return Ok(out),
                Decision::Failed(e) => return Err(e),
                Decision::Pending => {}
            }
        }
    }

    /// Hands the replies still to come to the late-reply worker: each one goes to `tracker`
    /// (its decisions ignored) until `wait` says stop, then `finish(tracker)` runs there.
    pub fn finish_late<T, Fin, Done>(
        self,
        late: &LateReplies,
        wait: LateWait,
        mut tracker: T,
        finish: Fin,
    ) where
        T: Tracker<R>,
        Fin: FnOnce(T) -> Done + Send + 'static,
        Done: Future<Output = ()> + Send + 'static,
    {
        // Spares never started stay unstarted (nothing was sent for them).
        let FanOut {
            mut pending,
            deadline,
            ..
        } = self;
        late.submit(Box::pin(async move {
            let drain = async {
                while let Some(reply) = pending.next().await {
                    let _ = tracker.on_reply(reply);
                }
            };
            match wait {
                LateWait::AllReplies => drain.await,
                LateWait::UntilDeadline => {
                    let _ = tokio::time::timeout_at(TokioInstant::from_std(deadline), drain).await;
                }
            }
            // Calls still running past the deadline are dropped (their own timeouts end them).
            drop(pending);
            finish(tracker).await;
        }));
    }
}

type Job = BoxFuture<'static, ()>;

/// The handle requests use to queue their late replies.
#[derive(Clone)]
pub struct LateReplies {
    tx: mpsc::UnboundedSender<Job>,
}

impl LateReplies {
    /// The handle and the worker that runs the jobs (start it on the runner). The queue is
    /// unbounded but every job ends by its request's deadline (a coordinator's own hint, kept
    /// after it, by the peer-write limit: half the tombstone settle time, or unbounded with
    /// tombstone GC off, which only a stalled writer reaches), so it holds about the requests
    /// of the last deadline's worth of traffic; its length is the worker's queue.
    pub fn new() -> (LateReplies, LateReplyWorker) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            LateReplies { tx },
            LateReplyWorker {
                rx,
                jobs: FuturesUnordered::new(),
                finished: 0,
                closed: false,
            },
        )
    }

    fn submit(&self, job: Job) {
        // After shutdown the worker is gone: the late replies are simply not waited for.
        let _ = self.tx.send(job);
    }
}

/// Runs every request's late-reply job concurrently on one task.
pub struct LateReplyWorker {
    rx: mpsc::UnboundedReceiver<Job>,
    jobs: FuturesUnordered<Job>,
    finished: u64,
    /// Every handle is gone: no job can come any more.
    closed: bool,
}

/// Most new jobs, and most finished jobs, one step of the late-reply worker takes.
pub const LATE_BATCH: usize = 64;

impl Worker for LateReplyWorker {
    fn name(&self) -> String {
        "late_replies".into()
    }

    fn progress(&self) -> Progress {
        Progress {
            detail: format!("{} requests finished after their answer", self.finished),
            queue: Some(self.jobs.len() as u64),
        }
    }

    /// Waits for one event (a new job, a job finished), then takes every other event already
    /// ready, at most `LATE_BATCH` of each: a busy node pays a step's overhead once per batch.
    async fn work(&mut self, stop: &CancellationToken) -> Result<WorkerState, String> {
        // Biased, the stop signal last: it is only polled (and registered) when nothing is ready.
        tokio::select! {
            biased;
            job = self.rx.recv(), if !self.closed => match job {
                Some(job) => self.jobs.push(job),
                None => self.closed = true,
            },
            Some(()) = self.jobs.next(), if !self.jobs.is_empty() => self.finished += 1,
            _ = stop.cancelled() => return Ok(WorkerState::Busy),
        }
        for _ in 0..LATE_BATCH {
            match self.rx.try_recv() {
                Ok(job) => self.jobs.push(job),
                Err(_) => break,
            }
        }
        for _ in 0..LATE_BATCH {
            match self.jobs.next().now_or_never() {
                Some(Some(())) => self.finished += 1,
                _ => break,
            }
        }
        if self.closed && self.jobs.is_empty() {
            return Ok(WorkerState::Done);
        }
        Ok(WorkerState::Busy)
    }

    /// Lets the jobs already queued finish (each ends by its deadline; the runner's shutdown
    /// deadline bounds the wait).
    async fn shutdown(&mut self) {
        self.rx.close();
        while let Some(job) = self.rx.recv().await {
            self.jobs.push(job);
        }
        while self.jobs.next().await.is_some() {
            self.finished += 1;
        }
    }
}
