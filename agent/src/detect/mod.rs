//! Detection. For now: the feature windows every detector consumes.

pub mod features;
