//! Hard limits of the wire format and the data model.
//!
//! Every limit is a named constant with the reason for its value. The server may lower the
//! value/key limits through config, never raise them above these (the decoder enforces these).
//!
//! Two kinds of limits hold a key's state in check, and they are consistent end to end:
//!
//! - **write caps** (`MAX_SIBLINGS`, `MAX_OBJECT_LEN`): a client write that would *grow* a key
//!   past them is refused (`TooManySiblings` / `TooLarge`); a write that resolves siblings
//!   always passes;
//! - **state bounds** (`MAX_STATE_SIBLINGS`, `MAX_STATE_LEN`, `MAX_VV_ENTRIES`): what a replica
//!   may hold after merging the states of coordinators that did not see each other's writes
//!   (a partition). Merges never drop data; a merge that would grow a state past these bounds
//!   is refused (the replica keeps what it has, nothing is lost, and the key converges once a
//!   client resolves it). Every reply, context token and peer frame is sized for the state
//!   bounds, so every state a node can hold is readable and resolvable by a client.

/// Most tokens (vnodes) one node may own: a ring is built from every owner's count, on every
/// node and in every ring-aware client, so a count from a layout, a peer or a ring reply is
/// bounded before any ring is built from it (Cassandra's `num_tokens` is 16–256; Riak's ring
/// has 64–1024 partitions in all).
pub const MAX_VNODES: u32 = 4096;

/// Largest user key. Keys are copied into every replica message, hint and Merkle leaf, so they
/// are kept small; 4 KiB is above what Riak (no hard limit, advises < 1 KB) and Cassandra
/// (64 KiB partition key, advises far less) users put in practice.
pub const MAX_KEY_LEN: usize = 4 * 1024;

/// Largest value of one sibling. A key state is rewritten whole on every update
/// (read-modify-write of the sibling set), so large values cost write amplification;
/// 1 MiB matches the ceiling Riak operators are advised to stay under.
pub const MAX_VALUE_LEN: usize = 1024 * 1024;

/// Most siblings a client write may leave on a key. A write that would *grow* the sibling set
/// beyond this is refused with `TooManySiblings` (Riak fails puts above 100 siblings); a write
/// whose context resolves siblings always passes.
pub const MAX_SIBLINGS: usize = 100;

/// Largest key state (all sibling values together) a client write may leave. Bounds the work
/// of one read-modify-write. 8 MiB: eight maximum-size values, above Riak's 5 MB warning.
pub const MAX_OBJECT_LEN: usize = 8 * 1024 * 1024;

/// How many coordinators' worth of writes a replica's merged state may hold. Each replica that
/// coordinates writes refuses client writes past the write caps on its own state, so after a
/// partition heals the merge of k sides holds at most k × the caps. k is at most the number of
/// replicas that coordinated while cut off from each other: 3 with the default N=3, plus one
/// spare. Beyond it merges are refused (nothing is lost; see the module doc).
pub const MERGE_FACTOR: usize = 4;

/// Most siblings a replica's state may hold (the merge bound); also the most a read shows.
pub const MAX_STATE_SIBLINGS: usize = MERGE_FACTOR * MAX_SIBLINGS;

/// Largest state (sibling values) a replica may hold after merges; also the most a read carries.
pub const MAX_STATE_LEN: usize = MERGE_FACTOR * MAX_OBJECT_LEN;

/// Version-vector entries of actors that hold no sibling which a state keeps before the
/// entries of retired actors (older incarnations of a node that has a newer one in the same
/// vector) are pruned. Such entries only say "this actor's older writes were superseded";
/// keeping 32 is far more than the replicas of a key (N ≤ 16) ever need, so pruning happens only
/// after many incarnations (docs/architecture.md, "Version-vector bound").
pub const MAX_SIBLINGLESS_ENTRIES: usize = 32;

/// The one bound on version vectors: a state holds at most one entry per actor that has a
/// sibling (at most `MAX_STATE_SIBLINGS`) plus `MAX_SIBLINGLESS_ENTRIES` others, and a context
/// token carries at most this many entries. Contexts are built from states by the same rule,
/// so the cluster never hands a client a context it could not send back.
pub const MAX_VV_ENTRIES: usize = MAX_STATE_SIBLINGS + MAX_SIBLINGLESS_ENTRIES;

/// Most version-vector entries a context may carry (the same bound as a state's).
pub const MAX_CONTEXT_ENTRIES: usize = MAX_VV_ENTRIES;

/// Largest opaque causal context: version byte, key fingerprint, entry count, and per entry an
/// 8-byte actor plus a counter varint of at most 10 bytes, then the checksum.
pub const MAX_CONTEXT_LEN: usize = 1 + 4 + 10 + MAX_CONTEXT_ENTRIES * (8 + 10) + 4;

/// Largest request frame body a server accepts: one key, one value, one context and the
/// fixed fields, with headroom. Larger frames are answered with `TooLarge` and skipped without
/// being buffered, so the connection stays usable.
pub const MAX_REQUEST_BODY_LEN: usize = MAX_KEY_LEN + MAX_VALUE_LEN + MAX_CONTEXT_LEN + 1024;

/// Encoded size of a sibling besides its value (dot, timestamp, kind, length prefix), in a
/// reply or a stored state.
pub const SIBLING_OVERHEAD: usize = 8 + 10 + 10 + 1 + 10;

/// Largest response frame body a client accepts: a whole state at its bound, with framing per
/// sibling and a full context.
pub const MAX_RESPONSE_BODY_LEN: usize =
    MAX_STATE_LEN + MAX_STATE_SIBLINGS * SIBLING_OVERHEAD + MAX_CONTEXT_LEN + 64 * 1024;

/// Largest encoded key state exchanged between peers (replication, read repair, replica reads):
/// a state at its bounds, its version vector, plus room for sibling-less entries of live
/// actors beyond the pruning threshold (one per node that ever coordinated the key).
pub const MAX_STATE_ENCODED_LEN: usize =
    MAX_STATE_LEN + MAX_STATE_SIBLINGS * SIBLING_OVERHEAD + 4 * MAX_VV_ENTRIES * 18 + 1024;

/// Largest peer frame body after the handshake: one encoded state plus its key, or a
/// forwarded request or its reply (a client response).
pub const MAX_PEER_BODY_LEN: usize =
    MAX_STATE_ENCODED_LEN + MAX_KEY_LEN + MAX_CONTEXT_LEN + 64 * 1024;

/// Largest peer frame body before the handshake completes: a `Hello` or a proof is a few
/// hundred bytes, so a stranger cannot make a node buffer large frames.
pub const MAX_HANDSHAKE_BODY_LEN: usize = 4 * 1024;

/// Longest error or status text carried on the wire.
pub const MAX_TEXT_LEN: usize = 64 * 1024;

/// Most entries in a status reply (metrics plus info lines).
pub const MAX_STATUS_ENTRIES: usize = 4096;

// The limits are consistent, checked when the crate compiles: a state at its bounds fits a
// reply, a context and a peer frame; nothing before the handshake can be a full request.
const _: () = {
    // A context with every entry a state may hold fits the context length limit.
    assert!(MAX_CONTEXT_LEN >= 1 + 4 + 10 + MAX_VV_ENTRIES * 18 + 4);
    // One entry per sibling of a state at its bound, plus the sibling-less ones.
    assert!(MAX_VV_ENTRIES >= MAX_STATE_SIBLINGS + MAX_SIBLINGLESS_ENTRIES);
    // The state bounds are at least the write caps.
    assert!(MAX_STATE_SIBLINGS >= MAX_SIBLINGS && MAX_STATE_LEN >= MAX_OBJECT_LEN);
    // A maximum-size value fits a write under the object cap.
    assert!(MAX_OBJECT_LEN >= MAX_VALUE_LEN);
    // A read reply of a state at its bounds fits a response frame; a peer frame carries it.
    assert!(
        MAX_RESPONSE_BODY_LEN
            >= MAX_STATE_LEN + MAX_STATE_SIBLINGS * SIBLING_OVERHEAD + MAX_CONTEXT_LEN
    );
    assert!(MAX_PEER_BODY_LEN >= MAX_STATE_ENCODED_LEN + MAX_KEY_LEN);
    assert!(MAX_PEER_BODY_LEN >= MAX_REQUEST_BODY_LEN);
    assert!(MAX_PEER_BODY_LEN >= MAX_RESPONSE_BODY_LEN);
    assert!(MAX_HANDSHAKE_BODY_LEN < MAX_REQUEST_BODY_LEN);
};
