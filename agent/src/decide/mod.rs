//! Rules and guardrails. `decide` is a pure function of (observations,
//! rules, guard state, clock): no I/O, so it is tested exhaustively.

pub mod types;

pub use types::*;
