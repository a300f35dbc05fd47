//! Tests of the real `funnelhouse` binary: crash safety under kill -9, the CLI commands.

mod cli;
mod crash;
mod support;
