//! `lb`: the load balancer's agent and CLI (see `lb_user::cli`).

fn main() {
    lb_user::cli::main();
}
