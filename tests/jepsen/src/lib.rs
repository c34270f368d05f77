//! ringkv's Jepsen-style harness: real clusters of `ringkv` processes, nemeses, recorded
//! histories and checkers (see docs/jepsen.md). The process layer is also what every
//! integration test uses to run real server binaries.

pub mod checker;
pub mod cluster;
pub mod history;
pub mod nemesis;
pub mod process;
pub mod runner;

pub use cluster::Cluster;
pub use process::{bin_path, NodeProcess};
