//! The host around the balancer: the kernel's routes, links and neighbours
//! over rtnetlink (`netlink`, what the agent uses), network namespaces
//! (`netns`), and running commands (`iproute`, for the lab and tests).

pub mod iproute;
pub mod netlink;
pub mod netns;
pub mod packet_socket;
pub mod syn_probe;
