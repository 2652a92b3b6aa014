//! Scale: one agent with 1,000 VIPs × 10 backends, and one with 10 VIPs ×
//! 1,000 backends (see `lb_tests::scale`); the 4,096-VIP run is a benchmark
//! (`cargo xtask bench`, tests/tests/bench_agent.rs).

const LB: &str = env!("CARGO_BIN_EXE_lb");

#[test]
fn a_thousand_vips_of_ten_backends() {
    lb_tests::scale::run(LB, "sca", 1000, 10, 1021, true);
}

#[test]
fn ten_vips_of_a_thousand_backends() {
    lb_tests::scale::run(LB, "scb", 10, 1000, 65537, false);
}
