//! Recycled payload buffers: streaming reuses the same memory instead of allocating (and
//! page-faulting) a fresh megabyte per chunk. A buffer leaves the pool as the owner of a
//! [`Bytes`] and comes back when the last slice of it is dropped (on the sending side: once
//! the peer acknowledged it; on the receiving side: once the sink wrote it).

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Buffers kept for reuse at most (more are freed).
const KEEP: usize = 16;

/// A pool of zero-initialized buffers of one size.
#[derive(Clone)]
pub struct Pool {
    size: usize,
    free: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Pool {
    /// A pool of `size`-byte buffers.
    pub fn new(size: usize) -> Self {
        Self {
            size,
            free: Arc::default(),
        }
    }

    /// A buffer of the pool's size (initialized memory: reused, or zeroed once when new).
    pub fn take(&self) -> Vec<u8> {
        self.free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_else(|| vec![0u8; self.size])
    }

    /// The first `len` bytes of `buf` as `Bytes`; `buf` returns to the pool when the last
    /// slice is dropped.
    pub fn freeze(&self, buf: Vec<u8>, len: usize) -> Bytes {
        debug_assert!(len <= buf.len());
        Bytes::from_owner(Pooled {
            buf,
            len,
            pool: self.clone(),
        })
    }

    /// Buffers waiting for reuse (for tests).
    pub fn idle(&self) -> usize {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

struct Pooled {
    buf: Vec<u8>,
    len: usize,
    pool: Pool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let mut free = self.pool.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < KEEP && buf.len() == self.pool.size {
            free.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_comes_back_when_its_last_slice_is_dropped() {
        let pool = Pool::new(1024);
        let mut buf = pool.take();
        buf[..3].copy_from_slice(b"abc");
        let b = pool.freeze(buf, 3);
        let part = b.slice(1..);
        assert_eq!(&b[..], b"abc");
        drop(b);
        assert_eq!(pool.idle(), 0, "a slice still holds it");
        assert_eq!(&part[..], b"bc");
        drop(part);
        assert_eq!(pool.idle(), 1);
        assert_eq!(pool.take().len(), 1024);
        assert_eq!(pool.idle(), 0);
    }
}
