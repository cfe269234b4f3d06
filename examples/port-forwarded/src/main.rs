//! `nettool-pf`: the standard `nettool` command line, with the `port-forwarded` strategy
//! registered after the built-in ones.

fn main() {
    let mut registry = nettool_strategies::registry();
    registry
        .register(nettool_port_forwarded::factory())
        .expect("the name port-forwarded is free");
    std::process::exit(nettool::run_with(registry));
}
