//! Detection: the feature windows every detector consumes, the built-in
//! baseline detector, and offline replay of recorded data through them.

pub mod baseline;
pub mod features;
pub mod replay;
