//! The `atoll` binary; everything lives in `deploy/cli`.

fn main() {
    if let Err(e) = atoll_cli::main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
