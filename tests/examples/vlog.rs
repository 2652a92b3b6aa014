//! Prints the kernel verifier's log when the datapath fails to load
//! (`cargo run -p lb-tests --example vlog`): the first tool to reach for
//! after a datapath change the verifier rejects.
fn main() {
    match lb_tests::load() {
        Ok(_) => println!("all programs load"),
        Err(e) => {
            for cause in e.chain() {
                let s = cause.to_string();
                let n = s.len();
                println!("{}", &s[n.saturating_sub(4000)..]);
            }
        }
    }
}
