//! Log output of the CLI's long-running commands.

/// Installs the tracing subscriber: human-readable text, or one JSON object
/// per line. Verbosity follows `ATOLL_LOG` (an `EnvFilter`).
pub fn init(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("ATOLL_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,atoll::console=debug"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init()
    };
}
