//! The userspace side of the load balancer. The folders say what runs on a
//! production node and what is tooling:
//!
//! - `backend_host`: `lb backend-host`, the backend side of `ipip` VIPs;
//! - `agent`: `lb run`, the daemon (state, reconcile, health tasks, control
//!   socket served per `api`, metrics, announcement);
//! - `datapath`: loading the XDP object and the typed facade over its maps;
//! - `policy`: Maglev and the other schedulers, health probes (pure);
//! - `config`: the TOML model and its validation, runtime edits written
//!   back (`config::edit`);
//! - `vocab`: one enum per concept (protocol, forwarding, scheduler, XDP
//!   mode, ...) with its spellings, on the ground floor: every other module
//!   may use it, it uses none of them;
//! - `host`: the kernel's routes and neighbours over netlink, namespaces;
//! - `api` and `cli`: the control protocol and the command line;
//! - `http_api`: the control protocol over HTTP (routes, OpenAPI document,
//!   tokens; served by `agent`);
//! - `tools`: the lab, the demos and the traffic generator, the test bench
//!   that ships with the product.

pub mod agent;
pub mod api;
pub mod backend_host;
pub mod cli;
pub mod config;
pub mod datapath;
pub mod host;
pub mod http_api;
pub mod policy;
pub mod tools;
pub mod vocab;
