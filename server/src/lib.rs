//! ringkv node. See docs/architecture.md for the code map and the import rules.
//!
//! `main.rs` only parses flags and calls [`run`]; `node.rs` is the composition root. The pure
//! cores (`version`, `ring`, `coordinator::{quorum, plan}`) do no I/O; `storage` and
//! `membership` own their state behind handles; `net` is transport only; `rpc` reaches peers;
//! the services (`coordinator`, `replica`) do the work; `api` decodes and dispatches;
//! `background` runs every loop; `metrics` is the one registry.

pub mod aae;
pub mod admission;
pub mod api;
pub mod background;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod coordinator;
pub mod durable;
pub mod handoff;
pub mod membership;
pub mod merkle;
pub mod metrics;
pub mod net;
pub mod node;
pub mod replica;
pub mod ring;
pub mod rpc;
pub mod storage;
#[cfg(test)]
pub(crate) mod testkit;
pub mod version;

pub use node::{boot_id, run, ServerError, BOOT_ID_FILE, RING_FILE};
