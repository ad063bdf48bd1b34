//! Per-isolate accounting of ArrayBuffer memory.
//!
//! Backing stores of `ArrayBuffer`s live outside the V8 heap, so the heap
//! limit does not see them: without a budget one tenant could fill the
//! node's memory with typed arrays. Each isolate gets its own allocator that
//! refuses allocations past its budget; JS then sees a `RangeError`
//! ("Array buffer allocation failed") and the node carries on.

use std::ffi::c_void;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use deno_core::v8;

/// Bytes of ArrayBuffer memory an isolate may hold at once.
pub(crate) struct BufferBudget {
    used: AtomicUsize,
    limit: usize,
}

impl BufferBudget {
    fn reserve(&self, len: usize) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(len).filter(|n| *n <= self.limit)
            })
            .is_ok()
    }

    fn release(&self, len: usize) {
        self.used.fetch_sub(len, Ordering::Relaxed);
    }
}

unsafe extern "C" fn allocate(budget: &BufferBudget, len: usize) -> *mut c_void {
    if !budget.reserve(len) {
        return std::ptr::null_mut();
    }
    // SAFETY: plain calloc; a null result is reported to V8 as failure.
    let p = unsafe { libc::calloc(len.max(1), 1) };
    if p.is_null() {
        budget.release(len);
    }
    p
}

unsafe extern "C" fn allocate_uninitialized(budget: &BufferBudget, len: usize) -> *mut c_void {
    if !budget.reserve(len) {
        return std::ptr::null_mut();
    }
    // SAFETY: plain malloc; a null result is reported to V8 as failure.
    let p = unsafe { libc::malloc(len.max(1)) };
    if p.is_null() {
        budget.release(len);
    }
    p
}

unsafe extern "C" fn free(budget: &BufferBudget, data: *mut c_void, len: usize) {
    // SAFETY: V8 frees only pointers this allocator returned, with their length.
    unsafe { libc::free(data) };
    budget.release(len);
}

unsafe extern "C" fn drop_budget(budget: *const BufferBudget) {
    // SAFETY: the pointer came from `Arc::into_raw` in `allocator` and V8
    // drops the allocator exactly once.
    drop(unsafe { Arc::from_raw(budget) });
}

static VTABLE: v8::RustAllocatorVtable<BufferBudget> = v8::RustAllocatorVtable {
    allocate,
    allocate_uninitialized,
    free,
    drop: drop_budget,
};

/// An ArrayBuffer allocator for one isolate that holds at most `limit` bytes.
pub(crate) fn allocator(limit: usize) -> v8::SharedRef<v8::Allocator> {
    let budget = Arc::new(BufferBudget {
        used: AtomicUsize::new(0),
        limit,
    });
    // SAFETY: the vtable is 'static and its functions match the handle type;
    // ownership of one Arc count passes to the allocator (see `drop_budget`).
    unsafe { v8::new_rust_allocator(Arc::into_raw(budget), &VTABLE) }.make_shared()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_refuses_past_its_limit_and_recovers_on_free() {
        let b = BufferBudget {
            used: AtomicUsize::new(0),
            limit: 100,
        };
        assert!(b.reserve(60));
        assert!(b.reserve(40));
        assert!(!b.reserve(1), "over the limit");
        assert!(!b.reserve(usize::MAX), "overflow is refused, not wrapped");
        b.release(40);
        assert!(b.reserve(30));
        // Through the allocator entry points, as V8 calls them.
        // SAFETY: exercising the vtable functions with a live budget.
        unsafe {
            let p = allocate(&b, 10);
            assert!(!p.is_null());
            assert!(allocate_uninitialized(&b, 1).is_null(), "budget exhausted");
            free(&b, p, 10);
        }
        assert_eq!(b.used.load(Ordering::Relaxed), 90);
    }
}
