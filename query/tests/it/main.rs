//! Tests of the query layer: a property test of the funnel engine against a brute-force
//! reference, hand-made cases, the endpoints over real HTTP, and campaign funnels and alerts.

mod campaigns;
mod cases;
mod endpoints;
mod prop;
mod support;
