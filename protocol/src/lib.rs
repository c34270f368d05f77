//! ringkv wire protocol: frames, client messages, the causal-context token and the limits.
//!
//! This crate has no runtime and no storage: it is shared by the server, the client library and
//! the tools. The byte-level format is documented in `docs/protocol.md`.

pub mod auth;
pub mod context;
pub mod frame;
pub mod limits;
pub mod message;
pub mod peer;
pub mod ring;
pub mod wire;

pub use context::{CausalContext, ContextError};
pub use frame::{Frame, FrameCodec, FrameError, Inbound, Rejection, PROTOCOL_VERSION};
pub use message::{
    ErrorKind, ErrorReply, MemberStatus, MembersReply, ReadOptions, ReadReply, RepairReply,
    Request, Response, RingMember, RingReply, Sibling, StatusReply, WriteOptions, WriteReply,
    RING_STATUS_NAMES, SWIM_STATE_NAMES,
};
pub use wire::DecodeError;
