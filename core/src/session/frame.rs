//! The session layer's wire format: fixed 13-byte headers, pure encode/decode, no I/O.
//!
//! ```text
//! type u8 | a u64 (big endian) | b u32 (big endian) | body (DATA: b bytes, END: b bytes, HELLO: 32 bytes)
//! ```
//!
//! | type | a | b | body |
//! |---|---|---|---|
//! | `DATA` | stream offset of the first byte | payload length (1..=[`MAX_PAYLOAD`]) | payload |
//! | `ACK` | bytes written to the sink (cumulative) | 1 when the sender's EOF is written too | — |
//! | `EOF` | offset of the end of the sender's stream | 0 | — |
//! | `END` | [`EndCode`] | reason length (≤ [`MAX_REASON`]) | reason (UTF-8) |
//! | `PING` / `PONG` | sender's clock, µs (echoed) | 0 | — |
//! | `HELLO` | bytes received so far (where the peer resumes) | protocol version | session id (32 bytes) |
//! | `SWITCH` | offset where the sender stopped writing DATA on this link | 0 | — |
//!
//! `SWITCH` is the sequence boundary of a planned move to another link (relay-first's upgrade
//! to a direct path): the last frame the sender writes on the old link. The receiver reads the
//! old link up to it, then the new one (which starts with `HELLO` as after a resume), so order
//! holds and nothing is sent twice.
//!
//! Everything a peer sends is checked before it is acted on: unknown types, oversized
//! payloads or reasons, offsets that overflow, data that skips ahead of what was received, and
//! acknowledgements of bytes never sent are errors ([`FrameError`]), never panics or writes.

/// Header length.
pub const HEADER_LEN: usize = 13;
/// Largest DATA payload.
pub const MAX_PAYLOAD: u32 = 1 << 20;
/// Largest END reason.
pub const MAX_REASON: u32 = 1024;
/// Length of a session id.
pub const SESSION_ID_LEN: usize = 32;
/// The session protocol's version (in HELLO).
pub const VERSION: u16 = 1;

/// A frame's header as decoded (bodies are read separately, their length known from it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// Payload bytes at `offset`.
    Data {
        /// Stream offset of the first payload byte.
        offset: u64,
        /// Payload length.
        len: u32,
    },
    /// The peer wrote `written` bytes to its sink; `eof`: and our end too.
    Ack {
        /// Cumulative bytes written to the sink.
        written: u64,
        /// Whether our EOF was reached and the sink finished.
        eof: bool,
    },
    /// The sender's stream ends at `at`.
    Eof {
        /// End offset.
        at: u64,
    },
    /// The session ends; a reason of `len` bytes follows.
    End {
        /// Why.
        code: EndCode,
        /// Reason length.
        len: u32,
    },
    /// Liveness probe carrying the sender's clock.
    Ping(u64),
    /// Answer to a PING (the clock echoed).
    Pong(u64),
    /// The sender writes nothing more on this link; its DATA stopped at `at` (it continues on
    /// the link the session moves to).
    Switch {
        /// Offset of the sender's stream where this link's DATA ended.
        at: u64,
    },
    /// First frame on every link; the 32-byte session id follows.
    Hello {
        /// Bytes the sender has received (the peer resumes sending there).
        received: u64,
        /// The sender's protocol version.
        version: u16,
        /// A resumed session (the body is the session id) rather than a new one (the body is
        /// the sender's fresh nonce).
        resume: bool,
    },
}

/// Why a session ended, as told to the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndCode {
    /// Everything sent both ways was written: a clean end.
    Done,
    /// The sender was asked to stop (SIGINT, SIGTERM, SIGHUP); the reason names the signal.
    Stopped,
    /// The sender gave up on an error (its output failed, the peer broke the protocol).
    Abort,
}

impl EndCode {
    fn to_wire(self) -> u64 {
        match self {
            Self::Done => 0,
            Self::Stopped => 1,
            Self::Abort => 2,
        }
    }
}

const T_DATA: u8 = 1;
const T_ACK: u8 = 2;
const T_EOF: u8 = 3;
const T_END: u8 = 4;
const T_PING: u8 = 5;
const T_PONG: u8 = 6;
const T_HELLO: u8 = 7;
const T_SWITCH: u8 = 8;

/// Why a frame (or a peer's use of it) is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The type byte is not one of ours.
    #[error("malformed frame: unknown type {0}")]
    UnknownType(u8),
    /// A DATA frame longer than [`MAX_PAYLOAD`] (or empty).
    #[error("malformed frame: DATA payload of {0} bytes (allowed 1..={MAX_PAYLOAD})")]
    BadPayloadLength(u32),
    /// An END reason longer than [`MAX_REASON`].
    #[error("malformed frame: END reason of {0} bytes (at most {MAX_REASON})")]
    ReasonTooLong(u32),
    /// An END code we do not know.
    #[error("malformed frame: END code {0}")]
    UnknownEndCode(u64),
    /// A field that must be zero is not, or an offset overflows.
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    /// DATA that starts past what was received: bytes in between would be lost.
    #[error("out-of-window DATA at offset {offset}: only {received} bytes received so far")]
    Gap {
        /// The frame's offset.
        offset: u64,
        /// Bytes received so far.
        received: u64,
    },
    /// DATA past the end the peer announced.
    #[error("DATA beyond the peer's announced end ({end})")]
    PastEnd {
        /// The announced end.
        end: u64,
    },
    /// An acknowledgement of bytes that were never sent.
    #[error("the peer acknowledged {acked} bytes, but only {sent} were sent")]
    AckBeyondSent {
        /// The acknowledged position.
        acked: u64,
        /// Bytes sent.
        sent: u64,
    },
    /// A resume position outside what the sender still holds.
    #[error(
        "the peer resumes at byte {asked}, outside what is still held ({held_from}..={held_to})"
    )]
    ResumeOutsideBuffer {
        /// Where the peer wants to resume.
        asked: u64,
        /// First byte held.
        held_from: u64,
        /// End of what was read.
        held_to: u64,
    },
    /// A HELLO of another session (a stranger, or a link that is not this session's).
    #[error("the link belongs to another session (session id mismatch)")]
    WrongSession,
    /// A HELLO of another protocol version.
    #[error(
        "the peer speaks session protocol {0}, this nettool speaks {VERSION}: update both sides"
    )]
    Version(u16),
    /// Something other than HELLO came first, or HELLO came again.
    #[error("protocol violation: {0}")]
    Unexpected(&'static str),
}

/// Encodes a header (and nothing else: bodies are written after it).
pub fn encode(h: &Header) -> [u8; HEADER_LEN] {
    let (t, a, b) = match *h {
        Header::Data { offset, len } => (T_DATA, offset, len),
        Header::Ack { written, eof } => (T_ACK, written, u32::from(eof)),
        Header::Eof { at } => (T_EOF, at, 0),
        Header::End { code, len } => (T_END, code.to_wire(), len),
        Header::Ping(t) => (T_PING, t, 0),
        Header::Pong(t) => (T_PONG, t, 0),
        Header::Switch { at } => (T_SWITCH, at, 0),
        Header::Hello {
            received,
            version,
            resume,
        } => (
            T_HELLO,
            received,
            u32::from(version) | (u32::from(resume) << 16),
        ),
    };
    let mut out = [0u8; HEADER_LEN];
    out[0] = t;
    out[1..9].copy_from_slice(&a.to_be_bytes());
    out[9..13].copy_from_slice(&b.to_be_bytes());
    out
}

/// Decodes and validates a header on its own (limits that need no state).
pub fn decode(raw: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
    let a = u64::from_be_bytes(raw[1..9].try_into().expect("8 bytes"));
    let b = u32::from_be_bytes(raw[9..13].try_into().expect("4 bytes"));
    let zero_b = |what| {
        if b == 0 {
            Ok(())
        } else {
            Err(FrameError::Malformed(what))
        }
    };
    Ok(match raw[0] {
        T_DATA => {
            if b == 0 || b > MAX_PAYLOAD {
                return Err(FrameError::BadPayloadLength(b));
            }
            if a.checked_add(u64::from(b)).is_none() {
                return Err(FrameError::Malformed("DATA offset overflows"));
            }
            Header::Data { offset: a, len: b }
        }
        T_ACK => match b {
            0 | 1 => Header::Ack {
                written: a,
                eof: b == 1,
            },
            _ => return Err(FrameError::Malformed("ACK flag other than 0 or 1")),
        },
        T_EOF => {
            zero_b("EOF with a length")?;
            Header::Eof { at: a }
        }
        T_END => {
            if b > MAX_REASON {
                return Err(FrameError::ReasonTooLong(b));
            }
            let code = match a {
                0 => EndCode::Done,
                1 => EndCode::Stopped,
                2 => EndCode::Abort,
                other => return Err(FrameError::UnknownEndCode(other)),
            };
            Header::End { code, len: b }
        }
        T_PING => {
            zero_b("PING with a length")?;
            Header::Ping(a)
        }
        T_PONG => {
            zero_b("PONG with a length")?;
            Header::Pong(a)
        }
        T_SWITCH => {
            zero_b("SWITCH with a length")?;
            Header::Switch { at: a }
        }
        T_HELLO => {
            if b >> 17 != 0 {
                return Err(FrameError::Malformed("HELLO flags"));
            }
            Header::Hello {
                received: a,
                version: (b & 0xffff) as u16,
                resume: b & (1 << 16) != 0,
            }
        }
        t => return Err(FrameError::UnknownType(t)),
    })
}

/// The receiving half's position: decides which part of a DATA frame is new, so nothing is
/// written twice and nothing is skipped.
#[derive(Debug, Clone, Default)]
pub struct Window {
    /// Bytes received (and handed to the sink) so far.
    pub received: u64,
    /// Where the peer said its stream ends, once it did.
    pub end: Option<u64>,
}

impl Window {
    /// For DATA at `offset` with `len` bytes: the range of the payload to write (empty when
    /// all of it was received before, e.g. replayed after a resume), or an error for data that
    /// skips ahead or runs past the announced end.
    pub fn accept(&mut self, offset: u64, len: u32) -> Result<std::ops::Range<usize>, FrameError> {
        let stop = offset
            .checked_add(u64::from(len))
            .ok_or(FrameError::Malformed("DATA offset overflows"))?;
        if offset > self.received {
            return Err(FrameError::Gap {
                offset,
                received: self.received,
            });
        }
        if let Some(end) = self.end {
            if stop > end {
                return Err(FrameError::PastEnd { end });
            }
        }
        if stop <= self.received {
            return Ok(0..0);
        }
        let skip = usize::try_from(self.received - offset).expect("below len, a u32");
        self.received = stop;
        Ok(skip..len as usize)
    }

    /// The peer's stream ends at `at`: an error when that is before what was received.
    pub fn eof(&mut self, at: u64) -> Result<(), FrameError> {
        if at < self.received || self.end.is_some_and(|e| e != at) {
            return Err(FrameError::Malformed("EOF before data already received"));
        }
        self.end = Some(at);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_header_round_trips() {
        for h in [
            Header::Data {
                offset: u64::MAX - MAX_PAYLOAD as u64,
                len: MAX_PAYLOAD,
            },
            Header::Ack {
                written: 7,
                eof: true,
            },
            Header::Eof { at: 99 },
            Header::End {
                code: EndCode::Stopped,
                len: 12,
            },
            Header::Ping(5),
            Header::Pong(6),
            Header::Switch { at: 1 << 33 },
            Header::Hello {
                received: 1 << 40,
                version: VERSION,
                resume: true,
            },
        ] {
            assert_eq!(decode(&encode(&h)), Ok(h));
        }
    }

    #[test]
    fn malformed_and_oversized_headers_are_named_errors() {
        let raw = |t: u8, a: u64, b: u32| {
            let mut r = [0u8; HEADER_LEN];
            r[0] = t;
            r[1..9].copy_from_slice(&a.to_be_bytes());
            r[9..13].copy_from_slice(&b.to_be_bytes());
            r
        };
        assert_eq!(decode(&raw(0, 0, 0)), Err(FrameError::UnknownType(0)));
        assert_eq!(decode(&raw(200, 0, 0)), Err(FrameError::UnknownType(200)));
        assert_eq!(
            decode(&raw(T_DATA, 0, MAX_PAYLOAD + 1)),
            Err(FrameError::BadPayloadLength(MAX_PAYLOAD + 1))
        );
        assert_eq!(
            decode(&raw(T_DATA, 0, 0)),
            Err(FrameError::BadPayloadLength(0))
        );
        assert!(matches!(
            decode(&raw(T_DATA, u64::MAX, 2)),
            Err(FrameError::Malformed(_))
        ));
        assert_eq!(
            decode(&raw(T_END, 0, MAX_REASON + 1)),
            Err(FrameError::ReasonTooLong(MAX_REASON + 1))
        );
        assert_eq!(
            decode(&raw(T_END, 9, 0)),
            Err(FrameError::UnknownEndCode(9))
        );
        assert!(decode(&raw(T_ACK, 0, 2)).is_err());
        assert!(decode(&raw(T_PING, 0, 1)).is_err());
        assert!(decode(&raw(T_EOF, 0, 1)).is_err());
        assert!(decode(&raw(T_SWITCH, 0, 1)).is_err());
    }

    #[test]
    fn the_window_writes_each_byte_once_and_refuses_gaps() {
        let mut w = Window::default();
        assert_eq!(w.accept(0, 10), Ok(0..10));
        // Replayed after a resume: fully old, then partly old.
        assert_eq!(w.accept(0, 10), Ok(0..0));
        assert_eq!(w.accept(5, 10), Ok(5..10));
        assert_eq!(w.received, 15);
        // Out of window: a gap would lose bytes 15..20.
        assert_eq!(
            w.accept(20, 5),
            Err(FrameError::Gap {
                offset: 20,
                received: 15
            })
        );
        assert_eq!(w.received, 15, "a refused frame changes nothing");
        w.eof(20).unwrap();
        assert_eq!(w.accept(15, 5), Ok(0..5));
        assert_eq!(w.accept(20, 1), Err(FrameError::PastEnd { end: 20 }));
        assert!(w.eof(19).is_err(), "the end cannot move back");
    }
}
