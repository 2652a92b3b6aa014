//! The `lb` CLI, built inside the test crate so that integration tests can
//! run it as a process (`CARGO_BIN_EXE_lb`): same code as lb-user's binary.

fn main() {
    lb_user::cli::main();
}
