//! The consistent-hash ring lives in the protocol crate (`ringkv_protocol::ring`): key placement
//! is part of the contract between nodes and ring-aware clients, which must compute the same
//! preference lists.

pub use ringkv_protocol::ring::*;

pub mod ranges;
