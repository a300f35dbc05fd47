//! Tests of the query layer: a property test of the funnel engine against a brute-force
//! reference, hand-made cases, and the endpoints over real HTTP.

mod cases;
mod endpoints;
mod prop;
mod support;
