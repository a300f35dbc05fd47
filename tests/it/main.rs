//! Tests of the real `funnelhouse` binary: crash safety under kill -9, the CLI commands,
//! the HTTP limits, shared storage, a Ballista cluster.

mod cli;
mod cluster;
mod crash;
mod http_limits;
mod shared;
mod support;
