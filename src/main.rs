//! The `atoll` binary; everything lives in `deploy/cli`.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys::{
    mi_free, mi_malloc, mi_malloc_aligned, mi_realloc, mi_realloc_aligned, mi_zalloc,
    mi_zalloc_aligned,
};

// Every request allocates and frees dozens of small objects on its worker
// thread (hyper's buffers, futures, header maps); mimalloc's thread-local
// free lists serve them faster than glibc's arenas.
#[global_allocator]
static GLOBAL: Mimalloc = Mimalloc;

/// Every block mimalloc hands out is aligned to at least a word.
const MIN_ALIGN: usize = std::mem::size_of::<usize>();

/// mimalloc, asked through its plain entry points whenever the alignment
/// needed is no more than it always gives. The `mimalloc` crate's allocator
/// calls the aligned ones for every allocation; their extra checks were
/// about a third of an allocation's instructions.
struct Mimalloc;

// SAFETY: mimalloc implements the C allocation contract; each call below
// passes the alignment on unless it is at most MIN_ALIGN, which every
// mimalloc block has.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl.
        unsafe {
            if layout.align() <= MIN_ALIGN {
                mi_malloc(layout.size()).cast()
            } else {
                mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl.
        unsafe {
            if layout.align() <= MIN_ALIGN {
                mi_zalloc(layout.size()).cast()
            } else {
                mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator.
        unsafe { mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator with `layout`.
        unsafe {
            if layout.align() <= MIN_ALIGN {
                mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

fn main() {
    if let Err(e) = atoll_cli::main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
