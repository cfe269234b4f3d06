//! The binary's allocator: the system allocator, with large blocks aligned to a page.
//!
//! Why: rustls decrypts each TLS record in its receive buffer and copies the plaintext
//! (16 KiB) into a freshly allocated `Vec`. Where glibc happened to place that `Vec` 1 to 63
//! bytes past the receive buffer's position within a 4 KiB page, every load of the copy
//! aliased the store just before it (the CPU's 4K-aliasing stall): that one copy then took a
//! third of the receiving `connect` process's CPU and the process twice the CPU of the same
//! link a run later (measured on relay links, where the heap's layout happened to land
//! there every time; `perf` + a uprobe on `memmove` gave the addresses). With both blocks
//! page-aligned the plaintext starts 5 bytes (the record header) into the receive buffer's
//! page and 0 bytes into its own: the copy's stores trail its loads and never alias them.
//!
//! Blocks of [`LARGE`] bytes or more (a few per link: TLS buffers, the copy loops' buffers)
//! get page alignment; everything smaller, which is nearly every allocation and all of the
//! rendezvous server's per-session state, is the system allocator's as before.

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks at least this large are page-aligned.
pub const LARGE: usize = 16 << 10;
const PAGE: usize = 4096;

/// The system allocator, with blocks of [`LARGE`] bytes or more page-aligned.
#[derive(Debug, Default, Clone, Copy)]
pub struct PageAlignedLarge;

/// The layout a request is served with: page-aligned when large.
fn served(layout: Layout) -> Layout {
    if layout.size() >= LARGE && layout.align() < PAGE {
        // A power of two no smaller than the requested alignment; the size is unchanged,
        // so it cannot overflow where the original did not.
        Layout::from_size_align(layout.size(), PAGE).unwrap_or(layout)
    } else {
        layout
    }
}

// SAFETY: every block is allocated and freed by `System` with the same (served) layout;
// `served` is a pure function of the caller's layout, which the caller must pass unchanged
// to `dealloc` and `realloc`.
unsafe impl GlobalAlloc for PageAlignedLarge {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: `served` keeps a non-zero size and a valid alignment.
        unsafe { System.alloc(served(layout)) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(served(layout)) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated with `served(layout)` (see `alloc` and `realloc`).
        unsafe { System.dealloc(ptr, served(layout)) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = served(layout);
        let Ok(wanted) = Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        let new = served(wanted);
        if new.align() == old.align() {
            // Same alignment class: System's realloc keeps it (it copies itself when the
            // alignment is larger than malloc's).
            // SAFETY: `ptr` was allocated with `old`; `new_size` is non-zero (caller's rule).
            return unsafe { System.realloc(ptr, old, new_size) };
        }
        // Crossing the threshold: a block of the other class, the contents, the old one freed.
        // SAFETY: `new` has a non-zero size; both blocks are valid for `min` bytes.
        unsafe {
            let fresh = System.alloc(new);
            if !fresh.is_null() {
                std::ptr::copy_nonoverlapping(ptr, fresh, layout.size().min(new_size));
                System.dealloc(ptr, old);
            }
            fresh
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(p: *mut u8, size: usize) {
        assert!(!p.is_null());
        if size >= LARGE {
            assert_eq!(p as usize % PAGE, 0, "{size} bytes not page-aligned");
        }
    }

    #[test]
    fn large_blocks_are_page_aligned_and_keep_their_contents_across_reallocs() {
        let a = PageAlignedLarge;
        // Grow from small through the threshold and beyond, then shrink back: each step keeps
        // the bytes and serves large sizes page-aligned.
        let sizes = [
            100,
            4096,
            LARGE - 1,
            LARGE,
            18437,
            300_000,
            20_000,
            LARGE,
            5000,
            64,
        ];
        let mut size = sizes[0];
        let layout = Layout::from_size_align(size, 8).unwrap();
        // SAFETY: a valid non-zero layout; every later call passes the current layout.
        unsafe {
            let mut p = a.alloc(layout);
            check(p, size);
            for i in 0..size {
                *p.add(i) = (i % 251) as u8;
            }
            for &next in &sizes[1..] {
                let old = Layout::from_size_align(size, 8).unwrap();
                p = a.realloc(p, old, next);
                check(p, next);
                for i in 0..size.min(next) {
                    assert_eq!(
                        *p.add(i),
                        (i % 251) as u8,
                        "byte {i} after {size} -> {next}"
                    );
                }
                for i in size.min(next)..next {
                    *p.add(i) = (i % 251) as u8;
                }
                size = next;
            }
            a.dealloc(p, Layout::from_size_align(size, 8).unwrap());
            let z = a.alloc_zeroed(Layout::from_size_align(LARGE * 2, 1).unwrap());
            check(z, LARGE * 2);
            assert!((0..LARGE * 2).all(|i| *z.add(i) == 0));
            a.dealloc(z, Layout::from_size_align(LARGE * 2, 1).unwrap());
        }
    }

    #[test]
    fn stricter_alignments_are_kept() {
        let a = PageAlignedLarge;
        let l = Layout::from_size_align(LARGE * 4, 1 << 16).unwrap();
        // SAFETY: a valid non-zero layout, freed with the same one.
        unsafe {
            let p = a.alloc(l);
            assert_eq!(p as usize % (1 << 16), 0);
            a.dealloc(p, l);
        }
    }
}
