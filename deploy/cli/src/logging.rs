//! Log output of the CLI's long-running commands.

/// Installs the tracing subscriber: human-readable text, or one JSON object
/// per line. Verbosity follows `ATOLL_LOG` (an `EnvFilter`).
///
/// Lines go to stderr from a thread of their own: a worker thread formats
/// a request's line and queues it, and the writer thread hands what has
/// queued to the kernel in few large writes. Writing each line from the
/// worker cost a system call per request. When the queue is full (128 k
/// lines: stderr's reader fell behind) workers wait rather than drop lines.
/// The returned guard writes out what is queued when it is dropped: keep it
/// until the command ends.
#[must_use = "dropping the guard stops log output"]
pub fn init(json: bool) -> tracing_appender::non_blocking::WorkerGuard {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("ATOLL_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,atoll::console=debug"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("atoll-log")
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.with_ansi(ansi).try_init()
    };
    guard
}
