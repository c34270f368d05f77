//! Hard limits of the wire format and the data model.
//!
//! Every limit is a named constant with the reason for its value. The server may lower the
//! value/key limits through config, never raise them above these (the decoder enforces these).

/// Largest user key. Keys are copied into every replica message, hint and Merkle leaf, so they
/// are kept small; 4 KiB is above what Riak (no hard limit, advises < 1 KB) and Cassandra
/// (64 KiB partition key, advises far less) users put in practice.
pub const MAX_KEY_LEN: usize = 4 * 1024;

/// Largest value of one sibling. A key state is rewritten whole on every update
/// (read-modify-write of the sibling set), so large values cost write amplification;
/// 1 MiB matches the ceiling Riak operators are advised to stay under.
pub const MAX_VALUE_LEN: usize = 1024 * 1024;

/// Largest opaque causal context a client may send. A context holds one entry per actor that
/// coordinated writes to the key (about N, plus one per unclean restart); 64 entries of at most
/// 18 bytes plus the header fit easily.
pub const MAX_CONTEXT_LEN: usize = 2 * 1024;

/// Most version-vector entries a context may carry (see `MAX_CONTEXT_LEN`).
pub const MAX_CONTEXT_ENTRIES: usize = 64;

/// Largest request frame body a server accepts: one key, one value, one context and the
/// fixed fields, with headroom. Larger frames are answered with `TooLarge` and skipped without
/// being buffered, so the connection stays usable.
pub const MAX_REQUEST_BODY_LEN: usize = MAX_KEY_LEN + MAX_VALUE_LEN + MAX_CONTEXT_LEN + 1024;

/// Most siblings a key may hold. A write that would *grow* the sibling set beyond this is
/// refused with `TooManySiblings` (Riak fails puts above 100 siblings); a write whose context
/// resolves siblings always passes.
pub const MAX_SIBLINGS: usize = 100;

/// Largest stored key state (all sibling values together). Bounds read responses and the
/// work of one read-modify-write. A write that would grow a key state beyond it is refused.
pub const MAX_OBJECT_LEN: usize = 32 * 1024 * 1024;

/// Largest response frame body a client accepts: a full key state plus framing per sibling.
pub const MAX_RESPONSE_BODY_LEN: usize = MAX_OBJECT_LEN + MAX_SIBLINGS * 64 + 64 * 1024;

/// Longest error or status text carried on the wire.
pub const MAX_TEXT_LEN: usize = 64 * 1024;

/// Most entries in a status reply (metrics plus info lines).
pub const MAX_STATUS_ENTRIES: usize = 4096;
