//! Framing: a fixed 16-byte header, then the body.
//!
//! ```text
//! offset size field
//! 0      2    magic      0x52 0x4B ("RK")
//! 2      1    version    PROTOCOL_VERSION (1)
//! 3      1    opcode     message type (see message.rs)
//! 4      8    request_id big-endian; a response carries the id of its request
//! 12     4    body_len   big-endian; bytes that follow
//! ```
//!
//! The header layout is frozen across protocol versions so that a peer speaking another version
//! can still be answered (with `UnsupportedVersion`, matched by request id) and its body skipped.
//! Oversized bodies are likewise skipped without being buffered, so one bad request never costs
//! the connection. Only a wrong magic is fatal: the stream cannot be resynchronised.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

pub const MAGIC: u16 = 0x524B;
pub const PROTOCOL_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 16;

/// One decoded frame: opcode, request id and the undecoded body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub opcode: u8,
    pub request_id: u64,
    pub body: Bytes,
}

/// What the decoder yields: a frame, or a frame it refused (and skipped) but can answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    Frame(Frame),
    /// The header was readable but the frame cannot be processed; the body has been (or is
    /// being) skipped and the connection stays usable.
    Rejected {
        request_id: u64,
        reason: Rejection,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    UnsupportedVersion { got: u8 },
    TooLarge { body_len: u64, limit: u64 },
}

/// Fatal stream errors: the connection must be closed after answering.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("bad magic 0x{found:04x} (expected 0x{MAGIC:04x}): not a ringkv stream")]
    BadMagic { found: u16 },
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// tokio-util codec for ringkv frames. `max_body` is the largest body accepted (requests on the
/// server side, responses on the client side).
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_body: usize,
    /// Bytes of a rejected body still to discard.
    skipping: u64,
}

impl FrameCodec {
    pub fn new(max_body: usize) -> Self {
        FrameCodec {
            max_body,
            skipping: 0,
        }
    }

    /// Changes the largest body accepted from the next frame header on (e.g. once a peer
    /// connection has authenticated).
    pub fn set_max_body(&mut self, max_body: usize) {
        self.max_body = max_body;
    }
}

impl Decoder for FrameCodec {
    type Item = Inbound;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, FrameError> {
        if self.skipping > 0 {
            let n = (self.skipping.min(src.len() as u64)) as usize;
            src.advance(n);
            self.skipping -= n as u64;
            if self.skipping > 0 {
                return Ok(None);
            }
        }
        if src.len() < HEADER_LEN {
            src.reserve(HEADER_LEN - src.len());
            return Ok(None);
        }
        let magic = u16::from_be_bytes([src[0], src[1]]);
        if magic != MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        let version = src[2];
        let opcode = src[3];
        let request_id = u64::from_be_bytes(src[4..12].try_into().expect("8-byte slice"));
        let body_len = u32::from_be_bytes(src[12..16].try_into().expect("4-byte slice")) as u64;
        let reject = if version != PROTOCOL_VERSION {
            Some(Rejection::UnsupportedVersion { got: version })
        } else if body_len > self.max_body as u64 {
            Some(Rejection::TooLarge {
                body_len,
                limit: self.max_body as u64,
            })
        } else {
            None
        };
        if let Some(reason) = reject {
            src.advance(HEADER_LEN);
            self.skipping = body_len;
            let n = (self.skipping.min(src.len() as u64)) as usize;
            src.advance(n);
            self.skipping -= n as u64;
            return Ok(Some(Inbound::Rejected { request_id, reason }));
        }
        let total = HEADER_LEN + body_len as usize;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        let body = src.split_to(body_len as usize).freeze();
        Ok(Some(Inbound::Frame(Frame {
            opcode,
            request_id,
            body,
        })))
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        put_header(dst, frame.opcode, frame.request_id, frame.body.len());
        dst.extend_from_slice(&frame.body);
        Ok(())
    }
}

/// Writes a frame header; the caller appends exactly `body_len` bytes.
pub fn put_header(dst: &mut BytesMut, opcode: u8, request_id: u64, body_len: usize) {
    let body_len = u32::try_from(body_len).expect("frame bodies are bounded far below 4 GiB");
    dst.reserve(HEADER_LEN + body_len as usize);
    dst.put_u16(MAGIC);
    dst.put_u8(PROTOCOL_VERSION);
    dst.put_u8(opcode);
    dst.put_u64(request_id);
    dst.put_u32(body_len);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(frame: Frame) -> BytesMut {
        let mut buf = BytesMut::new();
        FrameCodec::new(1 << 20).encode(frame, &mut buf).unwrap();
        buf
    }

    #[test]
    fn round_trip_split_anywhere() {
        let frame = Frame {
            opcode: 3,
            request_id: 42,
            body: Bytes::from_static(b"hello world"),
        };
        let wire = encode(frame.clone());
        for cut in 0..wire.len() {
            let mut codec = FrameCodec::new(1024);
            let mut buf = BytesMut::from(&wire[..cut]);
            assert_eq!(codec.decode(&mut buf).unwrap(), None, "cut at {cut}");
            buf.extend_from_slice(&wire[cut..]);
            assert_eq!(
                codec.decode(&mut buf).unwrap(),
                Some(Inbound::Frame(frame.clone()))
            );
        }
    }

    #[test]
    fn oversized_body_is_rejected_and_skipped() {
        let big = Frame {
            opcode: 4,
            request_id: 7,
            body: Bytes::from(vec![9u8; 5000]),
        };
        let small = Frame {
            opcode: 1,
            request_id: 8,
            body: Bytes::new(),
        };
        let mut wire = encode(big);
        wire.extend_from_slice(&encode(small.clone()));
        let mut codec = FrameCodec::new(100);
        // Feed in small chunks to exercise skipping across reads.
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for chunk in wire.chunks(333) {
            buf.extend_from_slice(chunk);
            while let Some(item) = codec.decode(&mut buf).unwrap() {
                out.push(item);
            }
        }
        assert_eq!(
            out,
            vec![
                Inbound::Rejected {
                    request_id: 7,
                    reason: Rejection::TooLarge {
                        body_len: 5000,
                        limit: 100
                    }
                },
                Inbound::Frame(small)
            ]
        );
    }

    #[test]
    fn unknown_version_is_rejected_with_request_id() {
        let mut wire = encode(Frame {
            opcode: 1,
            request_id: 99,
            body: Bytes::from_static(b"abc"),
        });
        wire[2] = 7;
        let mut codec = FrameCodec::new(100);
        assert_eq!(
            codec.decode(&mut wire).unwrap(),
            Some(Inbound::Rejected {
                request_id: 99,
                reason: Rejection::UnsupportedVersion { got: 7 }
            })
        );
        assert!(wire.is_empty());
    }

    #[test]
    fn bad_magic_is_fatal() {
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\n\r\n"[..]);
        assert!(matches!(
            FrameCodec::new(100).decode(&mut buf),
            Err(FrameError::BadMagic { .. })
        ));
    }
}
