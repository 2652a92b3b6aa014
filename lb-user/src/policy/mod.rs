//! Decisions with no I/O: Maglev rings (`maglev`), the other schedulers'
//! rings and weights (`sched`), and health-check probes and their rise/fall
//! state machine (`health`).

pub mod health;
pub mod maglev;
pub mod sched;
