//! container collector.
