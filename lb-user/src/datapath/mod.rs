//! The datapath as userspace sees it: `loader` loads, attaches and pins the
//! XDP object (the only module that touches aya's program and link APIs);
//! the facade ([`Dataplane`]) is the typed access to its maps; `trace` is
//! `lb trace`'s side of the datapath's packet tracer; `encode` translates
//! the agent's settings into what the maps hold (pure, no BPF); `drop_log`
//! reads the datapath's log of rare drops, `signals` its signs of backend
//! failure.

pub mod drop_log;
pub mod encode;
mod facade;
pub mod loader;
pub mod signals;
pub mod trace;

pub use facade::*;
