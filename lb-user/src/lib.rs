//! The userspace side of the load balancer.
//!
//! `loader` is the only module that touches aya's program and link APIs;
//! `dataplane` is the typed facade over the maps; `maglev` and `sched` are
//! pure ring builders; `config` turns TOML into a validated model and
//! `confedit` writes runtime changes back; `health` probes; `agent` is
//! `lb run` (reconcile loop, health tasks, control socket served per `api`);
//! `cli` is the command line; `lab`, `demo` and `loadgen` are the test
//! bench that ships with the product.

pub mod agent;
pub mod api;
pub mod cli;
pub mod confedit;
pub mod config;
pub mod dataplane;
pub mod demo;
pub mod health;
pub mod iproute;
pub mod lab;
pub mod loader;
pub mod loadgen;
pub mod maglev;
pub mod netlink;
pub mod netns;
pub mod sched;
pub mod vocab;
