//! Anti-entropy between replicas (the aae family): the service answering peers' exchanges,
//! the `anti_entropy` worker running them, and the ring spans two nodes share. The tree is
//! `crate::merkle` (pure), kept in the write path by `storage::tree` (only storage writes
//! batches). See docs/architecture.md, "Anti-entropy".

pub mod exchange;
pub mod gc;
pub mod release;
pub mod scan;
pub mod service;
pub mod transfer;

use ringkv_protocol::peer::{AaeRequest, AaeResponse, PeerRequest, PeerResponse};

use crate::rpc::Transport;

/// One aae-family request to the peer at `addr`, within `exchange::CALL_TIMEOUT`; a peer's
/// error reply or a transport failure as its message.
pub async fn call<T: Transport>(
    transport: &std::sync::Arc<T>,
    addr: &str,
    req: AaeRequest,
) -> Result<AaeResponse, String> {
    call_within(transport, addr, req, exchange::CALL_TIMEOUT).await
}

/// Pushes states this node just read to the peer at `addr`: the call (and so its sending: a
/// request whose caller gave up is never sent) is bounded by the peer-write limit too, as the
/// peer applies it within that limit of its arrival: a state read before a delete then lands
/// within tombstone GC's settle time, never after the tombstone's purge.
pub async fn push<T: Transport>(
    transport: &std::sync::Arc<T>,
    addr: &str,
    entries: Vec<(bytes::Bytes, bytes::Bytes)>,
    store: &crate::storage::Store,
) -> Result<AaeResponse, String> {
    let timeout = exchange::CALL_TIMEOUT.min(store.peer_write_limit());
    call_within(transport, addr, AaeRequest::PushStates { entries }, timeout).await
}

async fn call_within<T: Transport>(
    transport: &std::sync::Arc<T>,
    addr: &str,
    req: AaeRequest,
    timeout: std::time::Duration,
) -> Result<AaeResponse, String> {
    match transport
        .clone()
        .call(addr.to_string(), PeerRequest::Aae(req), timeout)
        .await
    {
        Ok(PeerResponse::Aae(r)) => Ok(r),
        Ok(PeerResponse::Error(e)) => Err(e.message),
        Ok(other) => Err(format!("unexpected reply {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Bytes of the states of `keys` a fetch answered (key and state; a key with no state, an
/// empty one, counts nothing): what the fetcher's `bytes_received` and the server's
/// `state_bytes_served` both count, as a push counts its `bytes_sent`.
pub fn states_bytes(keys: &[bytes::Bytes], states: &[bytes::Bytes]) -> u64 {
    keys.iter()
        .zip(states)
        .filter(|(_, s)| !s.is_empty())
        .map(|(k, s)| (k.len() + s.len()) as u64)
        .sum()
}
