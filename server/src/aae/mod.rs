//! Anti-entropy between replicas (the aae family): the service answering peers' exchanges,
//! the `anti_entropy` worker running them, and the ring spans two nodes share. The tree is
//! `crate::merkle` (pure), kept in the write path by `storage::tree` (only storage writes
//! batches). See docs/architecture.md, "Anti-entropy".

pub mod exchange;
pub mod ranges;
pub mod service;
