//! Shared pieces of the ringkv tools (kvctl and the benchmark tool).
