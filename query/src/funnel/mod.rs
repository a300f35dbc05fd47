//! Funnels: the per-user chain semantics, the request spec, and the engine.

pub mod chain;
pub mod engine;
mod fold;
pub mod live;
pub mod plan;
pub mod spec;
pub mod sql;

pub use engine::{
    FoldExchange, FunnelReport, TrendReport, explain_analyze, funnel, funnel_at, funnel_plan,
    trend, trend_at,
};
pub use live::{LiveFunnel, LiveFunnels};
pub use spec::{Breakdown, FilterValue, FunnelRequest, FunnelSpec, StepSpec};
