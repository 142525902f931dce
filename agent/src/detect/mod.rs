//! Detection: the feature windows every detector consumes, the built-in
//! baseline detector, the daemon's detection stage (per-target baselines,
//! installed models, incident hysteresis), and offline replay of recorded
//! data through them.

pub mod baseline;
pub mod engine;
pub mod features;
pub mod incident;
pub mod lifecycle;
pub mod onnx;
pub mod replay;
pub mod stage;
