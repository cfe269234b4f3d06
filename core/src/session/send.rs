//! The sending half's buffer: every byte read from the source stays here, at its stream
//! offset, until the peer acknowledges that it wrote it to its sink. Bounded: the source is
//! not read while it is full (backpressure). No I/O.

use std::collections::VecDeque;

use bytes::Bytes;

use super::frame::FrameError;

/// Unacknowledged bytes by offset.
#[derive(Debug)]
pub struct SendBuf {
    chunks: VecDeque<Bytes>,
    /// Offset of the first held byte (= bytes the peer confirmed written).
    base: u64,
    /// Offset after the last byte read from the source.
    end: u64,
    /// The source ended (at `end`).
    eof: bool,
    cap: usize,
}

impl SendBuf {
    /// An empty buffer holding at most `cap` unacknowledged bytes.
    pub fn new(cap: usize) -> Self {
        Self {
            chunks: VecDeque::new(),
            base: 0,
            end: 0,
            eof: false,
            cap: cap.max(1),
        }
    }

    /// Room for more source bytes.
    pub fn room(&self) -> usize {
        self.cap.saturating_sub(self.held())
    }

    /// Bytes held (read, not yet confirmed).
    pub fn held(&self) -> usize {
        usize::try_from(self.end - self.base).unwrap_or(usize::MAX)
    }

    /// Appends bytes read from the source.
    pub fn push(&mut self, b: Bytes) {
        debug_assert!(!self.eof, "no data after the end");
        if b.is_empty() {
            return;
        }
        self.end += b.len() as u64;
        self.chunks.push_back(b);
    }

    /// The source ended.
    pub fn finish(&mut self) {
        self.eof = true;
    }

    /// Whether the source ended.
    pub fn eof(&self) -> bool {
        self.eof
    }

    /// Offset after the last byte read.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Bytes the peer confirmed written.
    pub fn acked(&self) -> u64 {
        self.base
    }

    /// The peer wrote everything up to `written`: drops those bytes. `sent`: how far this
    /// side has sent on the current link (an ack past it is a protocol error).
    pub fn ack(&mut self, written: u64, sent: u64) -> Result<(), FrameError> {
        if written > sent || written > self.end {
            return Err(FrameError::AckBeyondSent {
                acked: written,
                sent: sent.min(self.end),
            });
        }
        while written > self.base {
            let front = self.chunks.front_mut().expect("bytes below end are held");
            let drop = usize::try_from(written - self.base)
                .unwrap_or(usize::MAX)
                .min(front.len());
            if drop == front.len() {
                self.chunks.pop_front();
            } else {
                let _ = front.split_to(drop);
            }
            self.base += drop as u64;
        }
        Ok(())
    }

    /// Checks that a peer resuming at `at` can be served (nothing it needs was dropped).
    pub fn resume_at(&self, at: u64) -> Result<(), FrameError> {
        if at < self.base || at > self.end {
            return Err(FrameError::ResumeOutsideBuffer {
                asked: at,
                held_from: self.base,
                held_to: self.end,
            });
        }
        Ok(())
    }

    /// Up to `max` bytes starting at offset `at` (one chunk's worth; zero-copy), or `None`
    /// when nothing is held there yet.
    pub fn get(&self, at: u64, max: usize) -> Option<Bytes> {
        if at < self.base || at >= self.end {
            return None;
        }
        let mut skip = usize::try_from(at - self.base).ok()?;
        for c in &self.chunks {
            if skip < c.len() {
                let stop = c.len().min(skip + max);
                return Some(c.slice(skip..stop));
            }
            skip -= c.len();
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_stay_until_acknowledged_and_replay_from_any_held_offset() {
        let mut s = SendBuf::new(10);
        s.push(Bytes::from_static(b"hello"));
        s.push(Bytes::from_static(b"world"));
        assert_eq!(s.room(), 0, "full: backpressure");
        assert_eq!(s.get(3, 100).as_deref(), Some(&b"lo"[..]));
        assert_eq!(s.get(5, 3).as_deref(), Some(&b"wor"[..]));
        assert_eq!(s.get(10, 3), None);
        s.ack(7, 10).unwrap();
        assert_eq!(s.room(), 7);
        assert_eq!(s.get(7, 100).as_deref(), Some(&b"rld"[..]));
        assert_eq!(s.get(6, 100), None, "acknowledged bytes are gone");
        assert!(s.resume_at(6).is_err());
        assert!(s.resume_at(7).is_ok() && s.resume_at(10).is_ok());
        assert!(s.resume_at(11).is_err());
        // An ack of bytes never sent is refused and changes nothing.
        assert!(s.ack(9, 8).is_err());
        assert!(s.ack(11, 20).is_err());
        assert_eq!(s.acked(), 7);
        // Stale acks are fine.
        s.ack(3, 10).unwrap();
        assert_eq!(s.acked(), 7);
    }
}
