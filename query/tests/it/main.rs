//! Tests of the query layer: a property test of the funnel engine against a brute-force
//! reference, hand-made cases, the endpoints over real HTTP, campaign funnels and alerts,
//! and live funnels against full recomputation.

mod campaigns;
mod cases;
mod endpoints;
mod live;
mod prop;
mod support;
