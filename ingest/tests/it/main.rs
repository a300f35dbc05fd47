//! Integration tests of the collector over real HTTP on 127.0.0.1.

mod durability;
mod faults;
mod http;
mod scan;
mod segment;
mod storage;
mod support;
mod validation;
