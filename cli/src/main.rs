//! The `nettool` binary: the command line over the built-in strategies.

fn main() {
    let code = nettool::run_with(nettool_strategies::registry());
    // stdin may still be blocked in a reader thread; do not wait for it.
    std::process::exit(code);
}
