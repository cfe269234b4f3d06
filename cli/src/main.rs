//! The `nettool` binary: the command line over the built-in strategies.

fn main() {
    let code = nettool::run_with(nettool_strategies::registry());
    // stdin may still be blocked in a reader thread; do not wait for it. `run_with` has put
    // stdio's flags back (a non-blocking stdin left behind breaks the user's shell).
    std::process::exit(code);
}
