//! One multiplexed connection to one node: a task owns the socket, matches reply frames to
//! requests by id, and coalesces queued requests into one flush (pipelining). Frame-level, so
//! the server's peer pool uses it for the peer protocol too.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::{FutureExt, SinkExt, StreamExt};
use ringkv_protocol::limits::{MAX_PEER_BODY_LEN, MAX_REQUEST_BODY_LEN};
use ringkv_protocol::{ErrorKind, ErrorReply, Frame, FrameCodec, Inbound, Rejection, Response};

use std::net::{IpAddr, SocketAddr};

use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};

/// Why a connection could not deliver a reply.
#[derive(Debug, Clone)]
pub enum ConnError {
    /// The request may or may not have reached the node.
    Lost(String),
    /// The reply frame could not be processed.
    Protocol(String),
    /// Not sent: the request's encoder ([`Conn::call_at_send`]) found its time had run out
    /// while it waited in the connection's queue.
    Expired,
    /// The node refused the connection before reading anything from it (`Overloaded` with
    /// request id 0: too many connections): nothing sent on it was done.
    Refused(ErrorReply),
}

/// What a caller queues: a frame, or a function that makes it when the connection sends it
/// (`None`: do not send).
enum Payload {
    Frame(Frame),
    AtSend(Box<dyn FnOnce() -> Option<Frame> + Send>),
}

struct Outgoing {
    payload: Payload,
    reply: oneshot::Sender<Result<Frame, ConnError>>,
}

/// A multiplexed connection; cheap to clone (clones share the socket).
#[derive(Clone)]
pub struct Conn {
    tx: mpsc::Sender<Outgoing>,
    alive: Arc<AtomicBool>,
    /// Set when the node refused the connection (`ConnError::Refused`).
    refused: Arc<OnceLock<ErrorReply>>,
    local: Option<SocketAddr>,
}

impl Conn {
    pub async fn connect(addr: &str, timeout: Duration, depth: usize) -> Result<Conn, String> {
        Conn::connect_from(addr, None, timeout, depth).await
    }

    /// Like `connect`, with the local side bound to `local` (port chosen by the kernel), so the
    /// connection's source address is that IP (nodes use their peer IP; without binding, any
    /// loopback destination gets source 127.0.0.1).
    pub async fn connect_from(
        addr: &str,
        local: Option<IpAddr>,
        timeout: Duration,
        depth: usize,
    ) -> Result<Conn, String> {
        let connect = async {
            match local {
                None => TcpStream::connect(addr).await,
                Some(ip) => {
                    let target = tokio::net::lookup_host(addr).await?.next().ok_or_else(|| {
                        std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
                    })?;
                    let socket = if target.is_ipv4() {
                        TcpSocket::new_v4()?
                    } else {
                        TcpSocket::new_v6()?
                    };
                    socket.bind(SocketAddr::new(ip, 0))?;
                    socket.connect(target).await
                }
            }
        };
        let stream = tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| format!("connect timed out after {timeout:?}"))?
            .map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().ok();
        let (rd, wr) = stream.into_split();
        // Sized for the largest peer reply (a forwarded client response or a whole state), which
        // is at least the largest client response.
        let reader = FramedRead::new(rd, FrameCodec::new(MAX_PEER_BODY_LEN));
        let out = Outbound::new(wr, MAX_REQUEST_BODY_LEN, WRITE_STALL_TIMEOUT);
        let (tx, rx) = mpsc::channel(depth);
        let alive = Arc::new(AtomicBool::new(true));
        let refused = Arc::new(OnceLock::new());
        tokio::spawn(run(reader, out, rx, alive.clone(), refused.clone()));
        Ok(Conn {
            tx,
            alive,
            refused,
            local,
        })
    }

    /// This side's address of the connection (what the node logs as the remote address).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire) && !self.tx.is_closed()
    }

    /// Sends `frame` and waits for the reply frame with the same request id. Request ids must
    /// be unique on the connection; the caller bounds the wait (dropping the future is safe).
    pub async fn call(&self, frame: Frame) -> Result<Frame, ConnError> {
        self.submit(Payload::Frame(frame)).await
    }

    /// Like [`Conn::call`], but the frame is made by `encode` only when the connection is
    /// about to send it, after whatever queued before it: a time the request carries (what
    /// is left of a deadline) then counts from the send, not from the call. `encode`
    /// returning `None` (its time ran out in the queue) drops the request unsent:
    /// [`ConnError::Expired`].
    pub async fn call_at_send(
        &self,
        encode: impl FnOnce() -> Option<Frame> + Send + 'static,
    ) -> Result<Frame, ConnError> {
        self.submit(Payload::AtSend(Box::new(encode))).await
    }

    async fn submit(&self, payload: Payload) -> Result<Frame, ConnError> {
        let (reply, rx) = oneshot::channel();
        // A connection the node refused takes nothing more: a request that finds it closed
        // was not sent at all.
        let closed = || ended(&self.refused, "connection closed");
        self.tx
            .send(Outgoing { payload, reply })
            .await
            .map_err(|_| closed())?;
        rx.await.unwrap_or_else(|_| Err(closed()))
    }
}

type Pending = HashMap<u64, oneshot::Sender<Result<Frame, ConnError>>>;

/// Bytes encoded but not yet written to the socket above which a connection takes no more
/// work to send: the client's queued requests wait in its channel (and are made only then,
/// `call_at_send`), the node's listener reads no new request. Writing never blocks the rest
/// of the connection: replies keep being read (and, on a node, running requests keep
/// running) while the other side is slow to read.
pub const UNSENT_PAUSE_BYTES: usize = 1 << 20;

/// How long a connection waits for the other side to read any of what it has to send before
/// it closes: a peer that stopped reading (stopped process, lost host whose TCP has not
/// failed) frees its connection slot and the memory of its unsent frames.
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// What [`Outbound::progress`] did.
#[derive(Debug)]
pub enum Progress {
    /// Everything encoded so far is written (or the write failed).
    Flushed(std::io::Result<()>),
    /// Some bytes were written and more wait (the socket is full).
    Wrote,
    /// Bytes waited to be written and the other side read none of them for a whole
    /// `stall_timeout`.
    Stalled,
}

/// A write buffer larger than this is given back once everything in it is written (it grows
/// to the largest burst of frames encoded at once, up to the byte budget's share: kept for the
/// connection's life, that would be memory no budget counts). The codec starts at 8 KiB.
pub const KEEP_WRITE_BUFFER: usize = 64 * 1024;

/// The write side of a connection that never waits for the socket: frames are encoded into
/// the buffer at once and written in the connection task's own `select!` arm (`progress`), and
/// a peer that reads nothing for a whole `stall_timeout` is noticed (`Progress::Stalled`).
/// Checked at most once per period, so a busy connection pays no timer work per frame.
pub struct Outbound<W> {
    writer: FramedWrite<W, FrameCodec>,
    stall_timeout: Duration,
    check: std::pin::Pin<Box<tokio::time::Sleep>>,
    armed: bool,
    /// Bytes ever encoded, and how many of them had been written at the last check.
    fed: u64,
    written_at_check: u64,
    /// The buffer grew past `KEEP_WRITE_BUFFER`: given back once everything is written.
    grown: bool,
}

impl<W: tokio::io::AsyncWrite + Unpin> Outbound<W> {
    pub fn new(io: W, max_body: usize, stall_timeout: Duration) -> Self {
        let mut writer = FramedWrite::new(io, FrameCodec::new(max_body));
        // Never flush from `feed`: writing happens only in `flush`, which the task polls
        // alongside its reads.
        writer.set_backpressure_boundary(usize::MAX);
        Outbound {
            writer,
            stall_timeout,
            check: Box::pin(tokio::time::sleep(stall_timeout)),
            armed: false,
            fed: 0,
            written_at_check: 0,
            grown: false,
        }
    }

    /// Encodes `frame` for sending, without waiting for the socket.
    pub fn feed(&mut self, frame: Frame) -> std::io::Result<()> {
        let before = self.unsent();
        self.writer
            .feed(frame)
            .now_or_never()
            .expect("without a backpressure boundary, feeding never waits for the socket")
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        self.fed += (self.unsent() - before) as u64;
        self.grown |= self.buffer_capacity() > KEEP_WRITE_BUFFER;
        if !self.armed {
            self.armed = true;
            self.written_at_check = self.written();
            let at = tokio::time::Instant::now() + self.stall_timeout;
            self.check.as_mut().reset(at);
        }
        Ok(())
    }

    /// What the buffer frames are encoded into holds (allocated, used or not).
    pub fn buffer_capacity(&self) -> usize {
        self.writer.write_buffer().capacity()
    }

    /// Bytes encoded and not yet written.
    pub fn unsent(&self) -> usize {
        self.writer.write_buffer().len()
    }

    /// Bytes encoded so far (written or not): the offset at which the last frame fed ends.
    pub fn fed(&self) -> u64 {
        self.fed
    }

    /// Bytes written to the socket so far.
    pub fn written(&self) -> u64 {
        self.fed - self.unsent() as u64
    }

    /// Whether anything waits to be written.
    pub fn pending(&self) -> bool {
        !self.writer.write_buffer().is_empty()
    }

    /// Writes what is encoded, making the stall checks that fall due meanwhile; returns once
    /// everything is written (or the write failed), once some bytes were written and the
    /// socket is full (`Wrote`: the caller sees which frames have left, `written`), or at a
    /// check that finds the other side stalled (cancel-safe: what was written stays written).
    /// Poll while `busy`.
    pub async fn progress(&mut self) -> Progress {
        loop {
            let pending = self.pending();
            let Outbound {
                writer,
                check,
                armed,
                grown,
                ..
            } = &mut *self;
            tokio::select! {
                flushed = flush_some(writer), if pending => {
                    // Written out: what is written is only skipped over, and the next frame
                    // would reclaim the whole allocation.
                    if matches!(flushed, Some(Ok(()))) && std::mem::take(grown) {
                        *writer.write_buffer_mut() = bytes::BytesMut::new();
                    }
                    return match flushed {
                        Some(r) => Progress::Flushed(
                            r.map_err(|e| std::io::Error::other(e.to_string())),
                        ),
                        None => Progress::Wrote,
                    };
                }
                _ = check.as_mut(), if *armed => {}
                else => return Progress::Flushed(Ok(())),
            }
            if self.stalled() {
                return Progress::Stalled;
            }
        }
    }

    /// Writes everything left, unless the other side reads none of it for a stall period.
    pub async fn finish(&mut self) {
        while self.pending() {
            match self.progress().await {
                Progress::Flushed(Ok(())) | Progress::Wrote => {}
                Progress::Flushed(Err(_)) | Progress::Stalled => return,
            }
        }
    }

    /// Whether `progress` has anything to do: bytes to write or a stall check to make.
    pub fn busy(&self) -> bool {
        self.pending() || self.armed
    }

    /// At a due check: true when bytes waited to be written and none was for the whole
    /// period. Rearms for the next period (or disarms when nothing waits).
    fn stalled(&mut self) -> bool {
        let written = self.written();
        if !self.pending() {
            self.armed = false;
            return false;
        }
        let stalled = written == self.written_at_check;
        self.written_at_check = written;
        let at = tokio::time::Instant::now() + self.stall_timeout;
        self.check.as_mut().reset(at);
        stalled
    }

    pub fn stall_timeout(&self) -> Duration {
        self.stall_timeout
    }
}

/// Flushes `writer`: `Some` once everything is written (or the write failed), `None` as soon
/// as the socket is full after some bytes were written (the socket's readiness, not a timer,
/// wakes the next call, which makes no syscall until it can write).
async fn flush_some<W: tokio::io::AsyncWrite + Unpin>(
    writer: &mut FramedWrite<W, FrameCodec>,
) -> Option<Result<(), ringkv_protocol::FrameError>> {
    std::future::poll_fn(|cx| {
        let before = writer.write_buffer().len();
        match futures::Sink::<Frame>::poll_flush(std::pin::Pin::new(&mut *writer), cx) {
            std::task::Poll::Ready(r) => std::task::Poll::Ready(Some(r)),
            std::task::Poll::Pending if writer.write_buffer().len() < before => {
                std::task::Poll::Ready(None)
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    })
    .await
}

/// What a request on a connection that ended gets: `Refused` if the node refused the
/// connection (nothing on it was read), else `Lost` with `cause`.
fn ended(refused: &OnceLock<ErrorReply>, cause: &str) -> ConnError {
    match refused.get() {
        Some(e) => ConnError::Refused(e.clone()),
        None => ConnError::Lost(cause.to_string()),
    }
}

/// Encodes requests from the front of `backlog` while less than `UNSENT_PAUSE_BYTES` waits to
/// be written (at least one), registering each for its reply; a caller that gave up is skipped,
/// one whose time ran out (`Payload::AtSend` made nothing) is answered `Expired`. A write error
/// fails the request being fed and is returned.
fn feed_backlog<W>(
    backlog: &mut VecDeque<Outgoing>,
    out: &mut Outbound<W>,
    pending: &mut Pending,
) -> std::io::Result<()>
where
    W: tokio::io::AsyncWrite + Unpin,
{
    while out.unsent() < UNSENT_PAUSE_BYTES {
        let Some(msg) = backlog.pop_front() else {
            break;
        };
        // A caller that timed out dropped its receiver; skip sending for it.
        if msg.reply.is_closed() {
            continue;
        }
        // Made now, after everything queued before it was fed to the socket.
        let frame = match msg.payload {
            Payload::Frame(frame) => frame,
            Payload::AtSend(encode) => match encode() {
                Some(frame) => frame,
                None => {
                    let _ = msg.reply.send(Err(ConnError::Expired));
                    continue;
                }
            },
        };
        let id = frame.request_id;
        if let Err(e) = out.feed(frame) {
            let _ = msg
                .reply
                .send(Err(ConnError::Lost(format!("write failed: {e}"))));
            return Err(e);
        }
        pending.insert(id, msg.reply);
    }
    Ok(())
}

async fn run(
    mut reader: FramedRead<tokio::net::tcp::OwnedReadHalf, FrameCodec>,
    mut out: Outbound<tokio::net::tcp::OwnedWriteHalf>,
    mut rx: mpsc::Receiver<Outgoing>,
    alive: Arc<AtomicBool>,
    // Set when the node refused the connection (see `ConnError::Refused`).
    refused: Arc<OnceLock<ErrorReply>>,
) {
    let mut pending: Pending = HashMap::new();
    // Requests taken from the channel and not yet encoded: they are encoded (and a request's
    // time left stamped, `call_at_send`) only while less than `UNSENT_PAUSE_BYTES` waits to
    // be written, so one queued behind megabytes of others is stamped when its turn comes,
    // not when the batch was taken.
    let mut backlog: VecDeque<Outgoing> = VecDeque::new();
    let cause = loop {
        if !backlog.is_empty() && out.unsent() < UNSENT_PAUSE_BYTES {
            if let Err(e) = feed_backlog(&mut backlog, &mut out, &mut pending) {
                break format!("write failed: {e}");
            }
        }
        tokio::select! {
            // Requests are taken only while little waits to be written (the rest wait in the
            // channel, unmade); replies are read whatever the socket's write side does.
            out_msg = rx.recv(), if backlog.is_empty() && out.unsent() < UNSENT_PAUSE_BYTES => {
                let Some(first) = out_msg else { break "client dropped".to_string() };
                backlog.push_back(first);
                while let Ok(more) = rx.try_recv() {
                    backlog.push_back(more);
                }
                // Let the other tasks that are ready to send (typically the callers whose
                // replies were just delivered) queue their requests first: they then share
                // this flush, one write syscall for the batch.
                tokio::task::yield_now().await;
                while let Ok(more) = rx.try_recv() {
                    backlog.push_back(more);
                }
                if let Err(e) = feed_backlog(&mut backlog, &mut out, &mut pending) {
                    break format!("write failed: {e}");
                }
            }
            progress = out.progress(), if out.busy() => match progress {
                Progress::Flushed(Err(e)) => break format!("write failed: {e}"),
                Progress::Flushed(Ok(())) | Progress::Wrote => {}
                Progress::Stalled => {
                    break format!(
                        "the node read none of {} unsent bytes for {:?}",
                        out.unsent(),
                        out.stall_timeout()
                    );
                }
            },
            item = reader.next() => {
                match item {
                    None => break "connection closed by the node".to_string(),
                    Some(Err(e)) => break format!("read failed: {e}"),
                    Some(Ok(Inbound::Rejected { request_id, reason })) => {
                        let msg = match reason {
                            Rejection::TooLarge { body_len, limit } => format!("response frame of {body_len} bytes exceeds {limit}"),
                            Rejection::UnsupportedVersion { got } => format!("node answered with protocol version {got}"),
                        };
                        if let Some(tx) = pending.remove(&request_id) {
                            let _ = tx.send(Err(ConnError::Protocol(msg)));
                        }
                    }
                    Some(Ok(Inbound::Frame(frame))) => {
                        let id = frame.request_id;
                        if id == 0 {
                            // Connection-level error from the node; the error body is the same
                            // in the client and peer protocols. `Overloaded` is a refusal at
                            // accept (too many connections): nothing was read.
                            let msg = match Response::decode(frame.opcode, frame.body) {
                                Ok(Response::Error(e)) => {
                                    let msg = format!("{}: {}", e.kind.name(), e.message);
                                    if matches!(e.kind, ErrorKind::Overloaded { .. }) {
                                        let _ = refused.set(e);
                                    }
                                    msg
                                }
                                other => format!("unexpected connection-level frame: {other:?}"),
                            };
                            break msg;
                        }
                        if let Some(tx) = pending.remove(&id) {
                            let _ = tx.send(Ok(frame));
                        }
                    }
                }
            }
        }
    };
    alive.store(false, Ordering::Release);
    rx.close();
    let failed = || ended(&refused, &cause);
    for (_, tx) in pending.drain() {
        let _ = tx.send(Err(failed()));
    }
    for msg in backlog.drain(..) {
        let _ = msg.reply.send(Err(failed()));
    }
    while let Ok(out) = rx.try_recv() {
        let _ = out.reply.send(Err(failed()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{Bytes, BytesMut};
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;
    use tokio_util::codec::Encoder;

    /// Both sides of a connection writing more than the sockets hold must not wait on each
    /// other: the connection keeps reading replies while its own requests wait to be written.
    /// Before, its task awaited the write of a batch and read nothing meanwhile, so a node
    /// writing large replies while not reading (its own writes blocked the same way) jammed
    /// the connection for good: every later call timed out.
    #[tokio::test]
    async fn replies_are_read_while_requests_wait_for_the_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let node = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let (rd, mut wr) = socket.into_split();
            let mut reader = FramedRead::new(rd, FrameCodec::new(MAX_REQUEST_BODY_LEN));
            let first = match reader.next().await {
                Some(Ok(Inbound::Frame(f))) => f,
                other => panic!("{other:?}"),
            };
            // 48 MiB of replies to requests the client never made (it skips them), then the
            // answer to its first request, all written before reading anything more.
            let mut out = BytesMut::new();
            let mut codec = FrameCodec::new(MAX_PEER_BODY_LEN);
            for i in 0..24u64 {
                let junk = Frame {
                    opcode: first.opcode,
                    request_id: 1 << 40 | i,
                    body: Bytes::from(vec![0u8; 2 << 20]),
                };
                codec.encode(junk, &mut out).unwrap();
            }
            codec.encode(first, &mut out).unwrap();
            wr.write_all(&out).await.unwrap();
            // Then take whatever the client sends.
            while let Some(Ok(_)) = reader.next().await {}
        });
        let conn = Conn::connect(&addr, Duration::from_secs(2), 64)
            .await
            .unwrap();
        let small = Frame {
            opcode: 1,
            request_id: 1,
            body: Bytes::from_static(b"ping"),
        };
        let answered = tokio::spawn({
            let conn = conn.clone();
            async move { conn.call(small).await }
        });
        // 24 MiB of requests right behind it (queued before the connection sends the first),
        // which the node does not read while it writes.
        for i in 0..24u64 {
            let conn = conn.clone();
            tokio::spawn(async move {
                let big = Frame {
                    opcode: 1,
                    request_id: 100 + i,
                    body: Bytes::from(vec![1u8; MAX_REQUEST_BODY_LEN - 64]),
                };
                let _ = conn.call(big).await;
            });
        }
        let reply = tokio::time::timeout(Duration::from_secs(20), answered)
            .await
            .expect("the connection jammed: the reply to the first request never arrived")
            .unwrap()
            .unwrap();
        assert_eq!(reply.request_id, 1);
        assert_eq!(&reply.body[..], b"ping");
        node.abort();
    }

    /// `progress` comes back as soon as some bytes are written, not only once everything is:
    /// the connection task then sees each frame that has left (the server gives back the
    /// budget places of replies written, and takes new requests once less waits), while the
    /// other side reads slowly.
    #[tokio::test]
    async fn progress_reports_bytes_written_before_everything_is() {
        use tokio::io::AsyncReadExt;
        let (near, mut far) = tokio::io::duplex(1024);
        let mut out = Outbound::new(near, MAX_REQUEST_BODY_LEN, Duration::from_secs(600));
        let frame = |id: u64, len: usize| Frame {
            opcode: 1,
            request_id: id,
            body: Bytes::from(vec![7u8; len]),
        };
        out.feed(frame(1, 4 * 1024)).unwrap();
        let first_ends = out.fed();
        out.feed(frame(2, 64 * 1024)).unwrap();
        // The far side reads the first frame and a little more, then nothing.
        let mut buf = vec![0u8; first_ends as usize + 2048];
        let mut read = 0;
        while read < buf.len() {
            match tokio::time::timeout(Duration::from_secs(5), out.progress()).await {
                Ok(Progress::Wrote) => {}
                Ok(Progress::Flushed(r)) => panic!("flushed 68 KiB into 1 KiB: {r:?}"),
                Ok(Progress::Stalled) => panic!("not stalled: the far side reads"),
                Err(_) => panic!(
                    "progress did not come back with {} of {} bytes written",
                    out.written(),
                    out.fed()
                ),
            }
            let want = (buf.len() - read).min(1024);
            read += far.read(&mut buf[read..read + want]).await.unwrap();
        }
        // Everything the far side took has been reported, without waiting for the rest.
        let step = tokio::time::timeout(Duration::from_secs(5), out.progress()).await;
        assert!(matches!(step, Ok(Progress::Wrote)), "{step:?}");
        assert!(
            out.written() >= first_ends,
            "{} < {first_ends}",
            out.written()
        );
        assert!(out.pending(), "64 KiB cannot all be in a 1 KiB pipe");
    }

    /// Found in review: the buffer replies are encoded into kept the size of the largest
    /// burst it ever held (a `BytesMut` grows and never shrinks), for as long as the
    /// connection lived: 64 pipelined reads of a 1 MiB value left 64–128 MiB with a client
    /// that had read everything, outside every budget. Once written out, a buffer grown past
    /// `KEEP_WRITE_BUFFER` is given back.
    #[tokio::test]
    async fn a_write_buffer_grown_by_a_burst_is_given_back_once_written() {
        // A pipe that holds the whole burst: the writer never waits for a reader.
        let (near, _far) = tokio::io::duplex(8 << 20);
        let mut out = Outbound::new(near, MAX_REQUEST_BODY_LEN, Duration::from_secs(30));
        for id in 0..4 {
            out.feed(Frame {
                opcode: 1,
                request_id: id,
                body: Bytes::from(vec![7u8; 1 << 20]),
            })
            .unwrap();
        }
        assert!(out.buffer_capacity() >= 4 << 20);
        loop {
            match out.progress().await {
                Progress::Flushed(r) => break r.unwrap(),
                Progress::Wrote => {}
                Progress::Stalled => panic!("the pipe holds it all"),
            }
        }
        assert!(!out.pending());
        // What is written is only skipped over: the next frame encoded reclaims the whole
        // allocation, unless it was given back.
        out.feed(Frame {
            opcode: 1,
            request_id: 9,
            body: Bytes::from_static(b"small"),
        })
        .unwrap();
        assert!(
            out.buffer_capacity() <= KEEP_WRITE_BUFFER,
            "{} bytes kept after writing everything",
            out.buffer_capacity()
        );
        assert!(matches!(out.progress().await, Progress::Flushed(Ok(()))));
    }

    /// A peer that reads some of what waits is slow, not stalled; one that reads none of it
    /// for a whole period is stalled, and only then.
    #[tokio::test]
    async fn a_write_stall_is_a_whole_period_without_a_byte_read() {
        use tokio::io::AsyncReadExt;
        use tokio::time::Instant;
        let period = Duration::from_secs(2);
        let (near, mut far) = tokio::io::duplex(1024);
        let mut out = Outbound::new(near, MAX_REQUEST_BODY_LEN, period);
        assert!(!out.busy());
        out.feed(Frame {
            opcode: 1,
            request_id: 1,
            body: Bytes::from(vec![7u8; 64 * 1024]),
        })
        .unwrap();
        assert!(out.busy());
        // The far side reads 1 KiB every 250 ms for 5 s: every check finds bytes written since
        // the one before.
        let mut buf = [0u8; 1024];
        let slow_until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < slow_until {
            let step = tokio::time::timeout(Duration::from_millis(250), out.progress()).await;
            match step {
                Err(_) => {
                    far.read_exact(&mut buf).await.unwrap();
                }
                Ok(Progress::Flushed(r)) => panic!("flushed 64 KiB into 1 KiB: {r:?}"),
                Ok(Progress::Wrote) => {}
                Ok(Progress::Stalled) => panic!("slow is not stalled"),
            }
        }
        let last_read = Instant::now();
        assert!(out.busy());
        // Then it reads nothing: stalled at a check between one and two periods later.
        let stalled_at = loop {
            if let Progress::Stalled = out.progress().await {
                break Instant::now();
            }
        };
        let after = stalled_at - last_read;
        assert!(
            after >= period - Duration::from_millis(300) && after <= 2 * period + period / 2,
            "stalled {after:?} after the last read (period {period:?})"
        );
        // Once everything is read, nothing waits and the watch disarms.
        let reader = tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = far.read_to_end(&mut sink).await;
        });
        loop {
            match out.progress().await {
                Progress::Flushed(r) => break r.unwrap(),
                Progress::Wrote => {}
                Progress::Stalled => panic!("stalled while the far side reads everything"),
            }
        }
        assert!(!out.pending());
        while out.busy() {
            let step = out.progress().await;
            assert!(!matches!(step, Progress::Stalled), "{step:?}");
        }
        drop(out);
        reader.await.unwrap();
    }
}
