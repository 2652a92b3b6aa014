//! The test bench that ships with the product, not part of a production
//! node: the lab network in namespaces (`lab`), the guided demos (`demo`) and
//! the XDP traffic generator (`loadgen`).

pub mod demo;
pub mod lab;
pub mod loadgen;
