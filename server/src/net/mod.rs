//! Listeners and connections, shared by the client and the peer protocol.
//!
//! Bounded everywhere: at most `max_connections` connections per listener (extra ones get an
//! `Overloaded` error frame and are closed) and at most `max_in_flight` requests per connection
//! (the reader stops reading until one completes, so a fast pipeliner gets TCP backpressure,
//! not unbounded memory). A connection is one task: its requests run concurrently inside it
//! (no task spawn or channel hop per request) and every reply that is ready when the task runs
//! goes out in one flush.
//!
//! On a listener whose handler admits connections (the peer handshake), a remote IP address may
//! hold at most `MAX_UNADMITTED_PER_IP` connections that have not been admitted yet (and all
//! addresses together half of `max_connections`), and a
//! connection that ends unadmitted gets at most `UNADMITTED_FINISH` to take its last replies:
//! a stranger cannot hold the listener's connection slots (peers redialing after a restart
//! would be refused) by opening connections and reading nothing.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::{SinkExt, StreamExt};
use ringkv_client::conn::{Outbound, Progress, UNSENT_PAUSE_BYTES, WRITE_STALL_TIMEOUT};
use ringkv_protocol::frame::HEADER_LEN;
use ringkv_protocol::limits::MAX_RESPONSE_BODY_LEN;
use ringkv_protocol::{ErrorKind, Frame, FrameCodec, FrameError, Inbound, Rejection, Response};
use std::os::fd::{AsRawFd, RawFd};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::admission::Permit;
use crate::clock::StallWatch;
use crate::metrics::ListenerMetrics;

/// The retry-after hint given with a refused connection: connections free up slowly.
pub const CONNECTION_RETRY_AFTER_MS: u64 = 1_000;

/// How long shutdown waits for in-flight requests to finish and be answered.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Connections one remote IP address may have open and not yet admitted (authenticated), on a
/// listener that admits them; more are refused at once.
pub const MAX_UNADMITTED_PER_IP: usize = 16;

/// How long a connection that ends without being admitted may take to write its last replies
/// (a refusal's reason) before it is closed and its slot given back.
pub const UNADMITTED_FINISH: Duration = Duration::from_secs(1);

/// Read pauses one connection remembers (their backlogs not read yet) before merging them.
const MAX_BACKLOG_MARKS: usize = 64;

/// Refused connections are logged at most this often (the others are counted in the line).
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(1);

/// The connections not admitted yet: in all, and per remote IP.
#[derive(Default)]
struct UnadmittedCounts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

type Unadmitted = Arc<Mutex<UnadmittedCounts>>;

/// One connection's place among the unadmitted ones; given back when dropped.
struct UnadmittedPlace {
    counts: Unadmitted,
    ip: IpAddr,
}

impl UnadmittedPlace {
    /// A place for a connection from `ip`, or why there is none: at most
    /// `MAX_UNADMITTED_PER_IP` per address and `max_total` in all (half the listener's
    /// connections, so that authenticated peers always find room).
    fn take(counts: &Unadmitted, ip: IpAddr, max_total: usize) -> Result<UnadmittedPlace, String> {
        let mut c = counts.lock().expect("unadmitted counts lock poisoned");
        if c.total >= max_total {
            return Err(format!(
                "too many connections not authenticated yet (limit {max_total})"
            ));
        }
        let n = c.per_ip.entry(ip).or_insert(0);
        if *n >= MAX_UNADMITTED_PER_IP {
            return Err(format!(
                "too many connections from {ip} not authenticated yet (limit {MAX_UNADMITTED_PER_IP})"
            ));
        }
        *n += 1;
        c.total += 1;
        Ok(UnadmittedPlace {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for UnadmittedPlace {
    fn drop(&mut self) {
        let mut c = self.counts.lock().expect("unadmitted counts lock poisoned");
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

/// A reply frame, and whether the connection must close after it is sent.
pub struct Reply {
    pub frame: Frame,
    pub close: bool,
    /// The request's place in its budget, given back once the frame has been written to the
    /// socket: a client that stops reading keeps its replies within the node's budget (and
    /// its fair share of it) instead of in memory outside any budget. The frame's bytes are
    /// charged to it until then (`Permit::charge_reply`).
    pub hold: Option<Permit>,
}

/// Answers the frames of one connection. A new handler is made per connection, so it may keep
/// per-connection state (e.g. the peer handshake).
pub trait FrameHandler: Send + Sync + 'static {
    /// Answers `frame`, read at (the stall-safe estimate of) `arrived`: the request's deadline
    /// counts from then (`clock::StallWatch`).
    fn handle(
        self: Arc<Self>,
        frame: Frame,
        arrived: Instant,
    ) -> impl Future<Output = Reply> + Send;

    /// False until the connection has authenticated (the peer handshake). Until then the
    /// listener reads only frames up to `ListenerConfig::unadmitted_max_body` and closes the
    /// connection after `ListenerConfig::admission_timeout`.
    fn admitted(&self) -> bool {
        true
    }

    /// Called when a connection is closed for not authenticating in time.
    fn admission_timed_out(&self) {}
}

/// Settings of one listener.
#[derive(Clone)]
pub struct ListenerConfig {
    pub node_id: String,
    /// "client" or "peer", for logs.
    pub kind: &'static str,
    pub max_connections: usize,
    pub max_in_flight: usize,
    pub max_request_body: usize,
    /// Largest frame body read before the handler admits the connection.
    pub unadmitted_max_body: usize,
    /// How long a connection may stay unadmitted before it is closed.
    pub admission_timeout: Duration,
}

fn error_frame(node_id: &str, request_id: u64, kind: ErrorKind, msg: String) -> Frame {
    Response::error(kind, true, format!("node {node_id}: {msg}")).to_frame(request_id)
}

pub async fn serve<H, F>(
    listener: TcpListener,
    cfg: ListenerConfig,
    metrics: ListenerMetrics,
    make_handler: F,
    shutdown: CancellationToken,
) where
    H: FrameHandler,
    // The connection's remote and local addresses.
    F: Fn(SocketAddr, Option<SocketAddr>) -> Arc<H>,
{
    let limit = Arc::new(Semaphore::new(cfg.max_connections));
    let unadmitted: Unadmitted = Arc::default();
    // Refusals are logged at most once per `REFUSAL_LOG_EVERY` (each is counted): a flood of
    // connections must not flood the log too.
    let mut refusals_logged: Option<Instant> = None;
    let mut refusals_unlogged = 0u64;
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (socket, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // e.g. EMFILE: back off instead of spinning.
                warn!(node = %cfg.node_id, listener = cfg.kind, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let handler = make_handler(peer, socket.local_addr().ok());
        let place = if handler.admitted() {
            Ok(None)
        } else {
            UnadmittedPlace::take(&unadmitted, peer.ip(), (cfg.max_connections / 2).max(1))
                .map(Some)
        };
        let permit = place.and_then(|place| {
            limit
                .clone()
                .try_acquire_owned()
                .map(|permit| (permit, place))
                .map_err(|_| format!("too many connections (limit {})", cfg.max_connections))
        });
        match permit {
            Ok((permit, place)) => {
                metrics.connections_accepted.inc();
                conns.spawn(connection(
                    socket,
                    cfg.clone(),
                    metrics.clone(),
                    handler,
                    shutdown.clone(),
                    permit,
                    place,
                ));
            }
            Err(why) => {
                metrics.connections_refused.inc();
                if refusals_logged.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_EVERY) {
                    warn!(node = %cfg.node_id, listener = cfg.kind, %peer, not_logged_since = refusals_unlogged,
                          "connection refused: {why}");
                    refusals_logged = Some(Instant::now());
                    refusals_unlogged = 0;
                } else {
                    refusals_unlogged += 1;
                }
                let frame = error_frame(
                    &cfg.node_id,
                    0,
                    ErrorKind::Overloaded {
                        retry_after_ms: CONNECTION_RETRY_AFTER_MS,
                    },
                    why,
                );
                conns.spawn(async move {
                    let mut w = FramedWrite::new(socket, FrameCodec::new(MAX_RESPONSE_BODY_LEN));
                    let _ = w.send(frame).await;
                });
            }
        }
        // Reap finished connection tasks so the set does not grow.
        while conns.try_join_next().is_some() {}
    }
    info!(node = %cfg.node_id, listener = cfg.kind, open = conns.len(), "listener stopped; draining connections");
    let drain = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        warn!(node = %cfg.node_id, listener = cfg.kind, "connections still busy after the shutdown grace; closing them");
    }
}

async fn connection<H: FrameHandler>(
    socket: TcpStream,
    cfg: ListenerConfig,
    metrics: ListenerMetrics,
    handler: Arc<H>,
    shutdown: CancellationToken,
    // This connection's place among `max_connections`.
    slot: OwnedSemaphorePermit,
    // Its place among its IP's unadmitted connections, until it is admitted.
    mut unadmitted: Option<UnadmittedPlace>,
) {
    let peer = socket
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    metrics.connections_active.inc();
    let fd = socket.as_raw_fd();
    let (rd, wr) = socket.into_split();
    let mut reader = FramedRead::new(
        Counted { inner: rd, read: 0 },
        FrameCodec::new(cfg.max_request_body),
    );
    // Replies are encoded into `out` at once and written in their own arm: a client that reads
    // slowly (or not at all) never stops this task from running its admitted requests, which
    // then finish and give back their budget. While more than `UNSENT_PAUSE_BYTES` of replies
    // wait, no new request is read (TCP backpressure); a client that reads none of them for
    // `WRITE_STALL_TIMEOUT` is disconnected.
    let mut out = Outbound::new(wr, MAX_RESPONSE_BODY_LEN, WRITE_STALL_TIMEOUT);
    // The connection's requests run inside this task, not as tasks of their own: no spawn and
    // no channel hop per request, and every reply that is ready goes out in one flush.
    // Priorities: replies that are ready, then frames already received (so a pipelined batch
    // is parsed and started before anything is written), then one flush for all the replies
    // produced so far: one write syscall per batch, not per reply.
    let mut in_flight = FuturesUnordered::new();
    // The budget places of replies fed to `out` and not yet written, with the byte offset
    // (`Outbound::fed`) their frame ends at; given back as `Outbound::written` passes it.
    let mut holds: VecDeque<(u64, Permit)> = VecDeque::new();
    // Set when the connection ends early (a write failed, or the other side stalled).
    let mut broken = false;
    // False once the connection stops taking requests (peer closed, bad frame, a handler asked
    // to close, shutdown); requests already running still answer.
    let mut reading = true;
    // Until the handler admits the connection (the peer handshake), frames are small and the
    // clock runs: a stranger can neither make the node buffer large frames nor hold a
    // connection slot for long.
    let mut admitted = handler.admitted();
    if !admitted {
        reader.decoder_mut().set_max_body(cfg.unadmitted_max_body);
    }
    let admission_deadline = tokio::time::sleep(cfg.admission_timeout);
    tokio::pin!(admission_deadline);
    // While this connection does not read (too many requests running, too many replies
    // unsent), what the other side sends waits in the socket, unseen. When reading resumes,
    // the bytes then queued (`backlog`: the stream offset they end at, and when the pause
    // began) may have arrived at any time during the pause: a frame starting within them is
    // dated to the pause's start, as after a process stall (`clock::StallWatch`), so its
    // deadline counts the wait. Later bytes arrived after the pause and are not backdated.
    let mut paused_since: Option<Instant> = None;
    let mut backlog: VecDeque<(u64, Instant)> = VecDeque::new();
    while reading || !in_flight.is_empty() {
        let can_read =
            reading && in_flight.len() < cfg.max_in_flight && out.unsent() < UNSENT_PAUSE_BYTES;
        if can_read {
            if let Some(start) = paused_since.take() {
                let queued_end = reader.get_ref().read + socket_queued(fd);
                let full = backlog.len() >= MAX_BACKLOG_MARKS;
                match backlog.back_mut() {
                    // Bounded: past the cap, the newest mark takes in the new bytes with its
                    // older date (they are dated earlier, never later, than they could be).
                    Some(last) if full => {
                        last.0 = last.0.max(queued_end);
                    }
                    _ => backlog.push_back((queued_end, start)),
                }
            }
        } else if reading && paused_since.is_none() {
            paused_since = Some(Instant::now());
        }
        if !admitted && handler.admitted() {
            admitted = true;
            unadmitted = None;
            reader.decoder_mut().set_max_body(cfg.max_request_body);
        }
        let rejected = tokio::select! {
            biased;
            _ = shutdown.cancelled(), if reading => {
                reading = false;
                None
            }
            _ = &mut admission_deadline, if !admitted && reading => {
                if handler.admitted() {
                    // Admitted since the check above: lift the limit on the next turn.
                    None
                } else {
                    handler.admission_timed_out();
                    warn!(node = %cfg.node_id, listener = cfg.kind, %peer, timeout = ?cfg.admission_timeout,
                          "closing connection: it did not authenticate in time");
                    reading = false;
                    None
                }
            }
            Some(reply) = in_flight.next(), if !in_flight.is_empty() => {
                let reply: Reply = reply;
                if reply.close {
                    reading = false;
                }
                let reply_len = reply.frame.body.len();
                if out.feed(reply.frame).is_err() {
                    broken = true;
                    break;
                }
                if let Some(mut permit) = reply.hold {
                    // Until written, the reply counts against the byte budget too.
                    permit.charge_reply(reply_len);
                    holds.push_back((out.fed(), permit));
                }
                None
            }
            item = reader.next(), if can_read => match item {
                None => {
                    reading = false;
                    None
                }
                Some(Ok(Inbound::Frame(frame))) => {
                    let mut arrived = StallWatch::global().arrival();
                    if !backlog.is_empty() {
                        let consumed = reader.get_ref().read - reader.read_buffer().len() as u64;
                        let frame_start =
                            consumed.saturating_sub((HEADER_LEN + frame.body.len()) as u64);
                        while backlog.front().is_some_and(|(end, _)| *end <= frame_start) {
                            backlog.pop_front();
                        }
                        if let Some((_, start)) = backlog.front() {
                            arrived = arrived.min(*start);
                        }
                    }
                    in_flight.push(handler.clone().handle(frame, arrived));
                    None
                }
                Some(Ok(Inbound::Rejected { request_id, reason })) => {
                    metrics.frames_rejected.inc();
                    Some(rejection_frame(&cfg.node_id, request_id, reason))
                }
                Some(Err(FrameError::BadMagic { found })) => {
                    metrics.malformed.inc();
                    warn!(node = %cfg.node_id, listener = cfg.kind, %peer, "closing connection: bad magic 0x{found:04x}");
                    reading = false;
                    let msg =
                        format!("not a ringkv frame (bad magic 0x{found:04x}); closing connection");
                    Some(error_frame(&cfg.node_id, 0, ErrorKind::Malformed, msg))
                }
                Some(Err(FrameError::Io(e))) => {
                    debug!(node = %cfg.node_id, listener = cfg.kind, %peer, error = %e, "connection read error");
                    reading = false;
                    None
                }
            },
            progress = out.progress(), if out.busy() => match progress {
                Progress::Flushed(Err(_)) => {
                    broken = true;
                    break;
                }
                Progress::Flushed(Ok(())) | Progress::Wrote => None,
                Progress::Stalled => {
                    metrics.write_stalls.inc();
                    warn!(node = %cfg.node_id, listener = cfg.kind, %peer, unsent_bytes = out.unsent(),
                          running = in_flight.len(), timeout = ?WRITE_STALL_TIMEOUT,
                          "closing connection: the other side read none of its replies");
                    broken = true;
                    break;
                }
            },
        };
        if let Some(frame) = rejected {
            if out.feed(frame).is_err() {
                broken = true;
                break;
            }
        }
        let written = out.written();
        while holds.front().is_some_and(|(end, _)| *end <= written) {
            holds.pop_front();
        }
    }
    if broken {
        // Nothing more can be sent: close the socket and free its buffer and connection slot,
        // give the budget back at once, and let the requests still running finish (each within
        // its deadline) rather than cancel them halfway through a write's fan-out; their
        // replies are dropped.
        holds.clear();
        drop((reader, out, slot));
        metrics.connections_active.dec();
        while in_flight.next().await.is_some() {}
    } else if !admitted && !handler.admitted() {
        // Never admitted: its last replies (a refusal's reason) get a short grace, not the
        // stall timeout a slow but genuine reader gets.
        let _ = tokio::time::timeout(UNADMITTED_FINISH, out.finish()).await;
        drop((holds, unadmitted));
        metrics.connections_active.dec();
    } else {
        out.finish().await;
        drop(holds);
        metrics.connections_active.dec();
    }
}

/// A read half that counts the bytes read from it (the stream offset reached).
struct Counted<R> {
    inner: R,
    read: u64,
}

impl<R: AsyncRead + Unpin> AsyncRead for Counted<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = &polled {
            self.read += (buf.filled().len() - before) as u64;
        }
        polled
    }
}

/// Bytes received on the socket `fd` and not read yet (0 when unknown).
fn socket_queued(fd: RawFd) -> u64 {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which points to `n`; `fd` is the
    // connection's socket, open while its read half (the caller's `reader`) lives.
    let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n as *mut libc::c_int) };
    if rc == 0 {
        n.max(0) as u64
    } else {
        0
    }
}

/// The error reply to a frame the codec refused (the connection stays usable).
fn rejection_frame(node_id: &str, request_id: u64, reason: Rejection) -> Frame {
    let (kind, msg) = match reason {
        Rejection::UnsupportedVersion { got } => (
            ErrorKind::UnsupportedVersion {
                got: got as u64,
                supported: ringkv_protocol::PROTOCOL_VERSION as u64,
            },
            format!(
                "protocol version {got} is not supported (this node speaks {})",
                ringkv_protocol::PROTOCOL_VERSION
            ),
        ),
        Rejection::TooLarge { body_len, limit } => (
            ErrorKind::TooLarge {
                size: body_len,
                limit,
            },
            format!("request frame of {body_len} bytes exceeds the limit of {limit}"),
        ),
    };
    error_frame(node_id, request_id, kind, msg)
}
