//! The zapflow domain: what a zap, a run and a step are, independent of
//! storage and transport.

pub mod delivery;
pub mod duration;
pub mod model;
pub mod retry;
pub mod schedule;
pub mod secret;
pub mod template;
pub mod webhook_signature;

pub use model::{
    ActionSpec, Attempt, AttemptOutcome, RetryOverride, RunStatus, StepStatus, ZapStatus,
};
