//! Primitive encodings shared by every message: big-endian integers, length-prefixed byte
//! strings (u32 length) and UTF-8 text. Decoding never panics and never allocates more than the
//! input holds: every length is checked against the remaining bytes and an explicit limit.

use bytes::{BufMut, Bytes, BytesMut};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated: needed {needed} more bytes for {field}")]
    Truncated { field: &'static str, needed: usize },
    #[error("{field} is {len} bytes, limit {limit}")]
    TooLong {
        field: &'static str,
        len: usize,
        limit: usize,
    },
    #[error("invalid {field}: {detail}")]
    Invalid { field: &'static str, detail: String },
    #[error("{0} trailing bytes after message")]
    Trailing(usize),
    #[error("unknown opcode 0x{0:02x}")]
    UnknownOpcode(u8),
}

/// Cursor over a frame body. Byte strings are returned as zero-copy slices of the body.
pub struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    pub fn new(buf: Bytes) -> Self {
        Reader { buf, pos: 0 }
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<Bytes, DecodeError> {
        let left = self.buf.len() - self.pos;
        if n > left {
            return Err(DecodeError::Truncated {
                field,
                needed: n - left,
            });
        }
        let out = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(out)
    }

    pub fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let b = self.take(N, field)?;
        Ok(b[..].try_into().expect("take returned N bytes"))
    }

    pub fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }
    /// A flag byte: 0 or 1, anything else is `Invalid`.
    pub fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            k => Err(DecodeError::Invalid {
                field,
                detail: format!("{k} (expected 0 or 1)"),
            }),
        }
    }

    /// A count (at most `limit`) of flag bytes.
    pub fn bools(&mut self, field: &'static str, limit: usize) -> Result<Vec<bool>, DecodeError> {
        let n = self.count(field, limit, 1)?;
        (0..n).map(|_| self.bool(field)).collect()
    }

    pub fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }
    pub fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }
    pub fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    /// u32 length, then that many bytes; the length must not exceed `limit`.
    pub fn bytes(&mut self, field: &'static str, limit: usize) -> Result<Bytes, DecodeError> {
        let len = self.u32(field)? as usize;
        if len > limit {
            return Err(DecodeError::TooLong { field, len, limit });
        }
        self.take(len, field)
    }

    pub fn text(&mut self, field: &'static str, limit: usize) -> Result<String, DecodeError> {
        let b = self.bytes(field, limit)?;
        String::from_utf8(b.to_vec()).map_err(|e| DecodeError::Invalid {
            field,
            detail: e.to_string(),
        })
    }

    /// A u32 element count, checked against `limit` and against the bytes left (each element
    /// takes at least `min_elem_len` bytes), so a forged count cannot cause a huge allocation.
    pub fn count(
        &mut self,
        field: &'static str,
        limit: usize,
        min_elem_len: usize,
    ) -> Result<usize, DecodeError> {
        let n = self.u32(field)? as usize;
        if n > limit {
            return Err(DecodeError::TooLong {
                field,
                len: n,
                limit,
            });
        }
        let left = self.buf.len() - self.pos;
        if n.saturating_mul(min_elem_len.max(1)) > left {
            return Err(DecodeError::Truncated {
                field,
                needed: n * min_elem_len.max(1) - left,
            });
        }
        Ok(n)
    }

    /// Whether every byte was read: optional trailing fields (added to a message later, so an
    /// older peer's shorter body still decodes) are read only when bytes are left.
    pub fn is_done(&self) -> bool {
        self.pos == self.buf.len()
    }

    /// An optional trailing u8: `default` when the body ends here.
    pub fn trailing_u8(&mut self, field: &'static str, default: u8) -> Result<u8, DecodeError> {
        if self.is_done() {
            Ok(default)
        } else {
            self.u8(field)
        }
    }

    pub fn finish(self) -> Result<(), DecodeError> {
        let left = self.buf.len() - self.pos;
        if left == 0 {
            Ok(())
        } else {
            Err(DecodeError::Trailing(left))
        }
    }
}

pub fn put_bytes(dst: &mut BytesMut, b: &[u8]) {
    dst.put_u32(u32::try_from(b.len()).expect("byte strings are bounded far below 4 GiB"));
    dst.put_slice(b);
}

pub fn put_count(dst: &mut BytesMut, n: usize) {
    dst.put_u32(u32::try_from(n).expect("counts are bounded far below 4 G"));
}

/// Appends `v` as an unsigned LEB128 varint (1–10 bytes).
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads an unsigned LEB128 varint at `*pos`, advancing it. `None` = truncated or longer
/// than 10 bytes.
pub fn get_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= ((b & 0x7f) as u64) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_bytes_are_zero_or_one() {
        let mut r = Reader::new(Bytes::from_static(&[0, 0, 0, 2, 1, 0, 2]));
        assert_eq!(r.bools("flags", 4).unwrap(), vec![true, false]);
        assert!(matches!(
            r.bool("more"),
            Err(DecodeError::Invalid { field: "more", .. })
        ));
        let mut too_many = Reader::new(Bytes::from_static(&[0, 0, 0, 9]));
        assert!(matches!(
            too_many.bools("flags", 4),
            Err(DecodeError::TooLong { .. })
        ));
    }
}
