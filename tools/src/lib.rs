//! Shared pieces of the ringkv tools: the benchmark tool's generator and targets.

pub mod bench;
