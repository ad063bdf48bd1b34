//! The `atoll` binary; everything lives in `deploy/cli`.

// Every request allocates and frees dozens of small objects on its worker
// thread (hyper's buffers, futures, header maps); mimalloc's thread-local
// free lists serve them faster than glibc's arenas.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    if let Err(e) = atoll_cli::main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
