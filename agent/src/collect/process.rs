//! process collector.
