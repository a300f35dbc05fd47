//! Funnels: the per-user chain semantics, the request spec, and the engine.

pub mod chain;
pub mod engine;
mod fold;
pub mod spec;

pub use engine::{FunnelReport, TrendReport, funnel, trend};
pub use spec::{Breakdown, FilterValue, FunnelRequest, FunnelSpec, StepSpec};
