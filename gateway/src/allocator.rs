//! The process's global allocator: mimalloc, called the way its fast paths expect.
//!
//! The `mimalloc` crate hands every request to `mi_malloc_aligned(size, align)`, even for the
//! alignments every mimalloc block already has. In mimalloc 3 that call only takes the fast path
//! for blocks up to 1 KiB whose free slot happens to be aligned; anything larger whose size class
//! is not a power of two is *over-allocated* (a bigger block, an aligned pointer inside it, a
//! flagged page that makes its `free` slower too). A proxied request makes about five such
//! allocations (the request's exchange future, header-map tables, read buffers): counted with
//! callgrind, ~285 instructions each instead of ~40.
//!
//! Every mimalloc block starts at a multiple of the word size (block sizes are whole words and
//! pages are aligned), so a layout aligned to a word or less is served by plain `mi_malloc`;
//! larger alignments keep the aligned API.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment every mimalloc block has without asking.
const WORD: usize = std::mem::size_of::<usize>();

pub struct EdgeAllocator;

#[allow(unsafe_code)]
// SAFETY: each method forwards to the mimalloc function that implements the same contract
// (`mi_malloc`/`mi_zalloc`/`mi_realloc` for word-aligned layouts, whose blocks are word aligned;
// the `_aligned` variants otherwise); `mi_free` accepts a pointer from any of them.
unsafe impl GlobalAlloc for EdgeAllocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= WORD {
            unsafe { mi::mi_malloc(layout.size()) as *mut u8 }
        } else {
            unsafe { mi::mi_malloc_aligned(layout.size(), layout.align()) as *mut u8 }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= WORD {
            unsafe { mi::mi_zalloc(layout.size()) as *mut u8 }
        } else {
            unsafe { mi::mi_zalloc_aligned(layout.size(), layout.align()) as *mut u8 }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        unsafe { mi::mi_free(ptr as *mut c_void) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= WORD {
            unsafe { mi::mi_realloc(ptr as *mut c_void, new_size) as *mut u8 }
        } else {
            unsafe {
                mi::mi_realloc_aligned(ptr as *mut c_void, new_size, layout.align()) as *mut u8
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size class a plain `mi_malloc` can land in keeps word alignment, and larger
    /// alignments are honoured, across sizes on both sides of mimalloc's small/medium limits.
    #[test]
    #[allow(unsafe_code)]
    fn blocks_keep_the_alignment_their_layout_asks_for() {
        let allocator = EdgeAllocator;
        for align in [1usize, 2, 4, 8, 16, 64, 128, 4096] {
            for size in (1..=4200).step_by(7).chain([8192, 65_536, 1 << 20]) {
                let layout = Layout::from_size_align(size, align).expect("a valid layout");
                // SAFETY: a non-zero layout, freed with the same allocator and layout.
                unsafe {
                    let p = allocator.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    p.write_bytes(0xA5, size);
                    let grown = allocator.realloc(p, layout, size * 2);
                    assert_eq!(
                        grown as usize % align,
                        0,
                        "realloc size {size} align {align}"
                    );
                    assert_eq!(*grown.add(size - 1), 0xA5);
                    allocator.dealloc(
                        grown,
                        Layout::from_size_align(size * 2, align).expect("a valid layout"),
                    );
                    let z = allocator.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0);
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                    allocator.dealloc(z, layout);
                }
            }
        }
    }
}
