//! host collector.
