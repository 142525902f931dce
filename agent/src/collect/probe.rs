//! probe collector.
