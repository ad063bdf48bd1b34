//! The `atoll` binary; everything lives in `deploy/cli`.

mod allocator;

// Every request allocates and frees dozens of small objects on its worker
// thread (hyper's buffers, futures, header maps); mimalloc's thread-local
// free lists serve them faster than glibc's arenas.
#[global_allocator]
static GLOBAL: allocator::Allocator = allocator::Allocator;

fn main() {
    if let Err(e) = atoll_cli::main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

// Here rather than in allocator.rs, which the cold_start bench includes too.
#[cfg(test)]
mod allocator_tests {
    use std::alloc::{GlobalAlloc, Layout};

    use crate::allocator::Allocator;

    #[test]
    fn blocks_honour_alignment_and_keep_contents_when_grown() {
        let a = Allocator;
        for align in [1, 2, 4, 8, 16, 32, 64, 4096] {
            for size in [1, 7, 8, 24, 100, 1000, 1025, 8200, 70_000] {
                let size = size.max(align);
                let layout = Layout::from_size_align(size, align).expect("valid layout");
                // SAFETY: non-zero size; freed with the same layout below.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "alloc {size} aligned {align}");
                    p.write_bytes(0xa5, size);
                    let grown = a.realloc(p, layout, size * 3);
                    assert_eq!(grown as usize % align, 0, "realloc {size} aligned {align}");
                    assert!((0..size).all(|i| *grown.add(i) == 0xa5));
                    a.dealloc(
                        grown,
                        Layout::from_size_align(size * 3, align).expect("valid"),
                    );
                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0, "zeroed {size} aligned {align}");
                    assert!((0..size).all(|i| *z.add(i) == 0));
                    a.dealloc(z, layout);
                }
            }
        }
    }
}
