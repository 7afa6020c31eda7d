//! Integration tests against real PostgreSQL, a Kafka-protocol broker and
//! an SMTP server on loopback. See crates/testkit for how to reach them.

mod api;
mod crash;
mod crash_points;
mod end_to_end;
mod gateway;
mod limits;
mod processor;
mod recording;
mod replay;
mod restart;
mod retries;
mod store;
mod support;
mod tenancy;
mod worker;
