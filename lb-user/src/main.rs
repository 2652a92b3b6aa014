//! `lb`: the load balancer's agent and CLI (see `lb_user::cli`).

fn main() {
    // `lb stats | head` should end quietly, as other Unix tools do, not
    // panic on a closed pipe: restore the default SIGPIPE action.
    // SAFETY: signal() with SIG_DFL before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    lb_user::cli::main();
}
