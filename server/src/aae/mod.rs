//! Anti-entropy: Merkle-style hash trees maintained in the write path, and (to come) the
//! exchange between replicas and its scheduling worker. The tree's persistence and its
//! write-path hook are in `storage::tree` (only storage writes batches). See
//! docs/architecture.md.

pub mod exchange;
pub mod ranges;
pub mod service;
pub mod tree;
