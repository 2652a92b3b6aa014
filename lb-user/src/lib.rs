//! The userspace side of the load balancer: loading the datapath and
//! programming its maps (`loader`, `dataplane`).

pub mod agent;
pub mod api;
pub mod cli;
pub mod confedit;
pub mod config;
pub mod dataplane;
pub mod demo;
pub mod health;
pub mod lab;
pub mod loader;
pub mod loadgen;
pub mod maglev;
pub mod sched;
