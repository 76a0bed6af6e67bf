//! Reading protobuf's wire format from a borrowed buffer: the few primitives
//! [`super::EventView`] needs, with every bound checked (the bytes come from
//! the network or the disk).

use std::fmt;

/// Why bytes are not a well-formed message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Malformed {
    /// The bytes end inside a field.
    Truncated,
    /// A varint longer than 64 bits.
    VarintOverflow,
    /// A field numbered 0 or above 2^29.
    BadFieldNumber,
    /// A field of a known number with the wrong wire type.
    WireType { field: u32, wire_type: u8 },
    /// A wire type protobuf 3 does not use (groups, 6, 7).
    UnsupportedWireType(u8),
    /// A string field that is not UTF-8.
    NotUtf8 { field: u32 },
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Malformed::Truncated => f.write_str("the bytes end inside a field"),
            Malformed::VarintOverflow => f.write_str("a varint is longer than 64 bits"),
            Malformed::BadFieldNumber => f.write_str("a field number is out of range"),
            Malformed::WireType { field, wire_type } => {
                write!(f, "field {field} has the wrong wire type ({wire_type})")
            }
            Malformed::UnsupportedWireType(w) => write!(f, "wire type {w} is not supported"),
            Malformed::NotUtf8 { field } => write!(f, "field {field} is not valid UTF-8"),
        }
    }
}

pub(super) const VARINT: u8 = 0;
pub(super) const FIXED64: u8 = 1;
pub(super) const LEN: u8 = 2;
pub(super) const FIXED32: u8 = 5;

/// A cursor over one message's bytes.
pub(super) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The next varint. Tags and lengths are nearly all one byte: that case
    /// is inlined into the callers; the general loop is not.
    #[inline]
    pub(super) fn varint(&mut self) -> Result<u64, Malformed> {
        if let Some((&byte, rest)) = self.buf.split_first()
            && byte < 0x80
        {
            self.buf = rest;
            return Ok(u64::from(byte));
        }
        self.varint_long()
    }

    #[inline(never)]
    fn varint_long(&mut self) -> Result<u64, Malformed> {
        let mut value = 0u64;
        for (i, &byte) in self.buf.iter().enumerate().take(10) {
            // The tenth byte holds bit 63 only.
            if i == 9 && byte > 1 {
                return Err(Malformed::VarintOverflow);
            }
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                self.buf = &self.buf[i + 1..];
                return Ok(value);
            }
        }
        Err(if self.buf.len() >= 10 {
            Malformed::VarintOverflow
        } else {
            Malformed::Truncated
        })
    }

    /// The next field's number and wire type.
    #[inline]
    pub(super) fn key(&mut self) -> Result<(u32, u8), Malformed> {
        let key = self.varint()?;
        let field = key >> 3;
        if field == 0 || field > u64::from(u32::MAX >> 3) {
            return Err(Malformed::BadFieldNumber);
        }
        Ok((field as u32, (key & 7) as u8))
    }

    pub(super) fn bytes(&mut self) -> Result<&'a [u8], Malformed> {
        let len = self.varint()?;
        let len = usize::try_from(len).map_err(|_| Malformed::Truncated)?;
        if len > self.buf.len() {
            return Err(Malformed::Truncated);
        }
        let (field, rest) = self.buf.split_at(len);
        self.buf = rest;
        Ok(field)
    }

    pub(super) fn fixed64(&mut self) -> Result<u64, Malformed> {
        let Some((bytes, rest)) = self.buf.split_first_chunk::<8>() else {
            return Err(Malformed::Truncated);
        };
        self.buf = rest;
        Ok(u64::from_le_bytes(*bytes))
    }

    /// Passes over a field this reader does not know.
    pub(super) fn skip(&mut self, wire_type: u8) -> Result<(), Malformed> {
        match wire_type {
            VARINT => self.varint().map(drop),
            FIXED64 => self.fixed64().map(drop),
            LEN => self.bytes().map(drop),
            FIXED32 => match self.buf.split_first_chunk::<4>() {
                Some((_, rest)) => {
                    self.buf = rest;
                    Ok(())
                }
                None => Err(Malformed::Truncated),
            },
            other => Err(Malformed::UnsupportedWireType(other)),
        }
    }

    /// A string field's text.
    pub(super) fn string(&mut self, field: u32, wire_type: u8) -> Result<&'a str, Malformed> {
        expect(field, wire_type, LEN)?;
        std::str::from_utf8(self.bytes()?).map_err(|_| Malformed::NotUtf8 { field })
    }

    /// A varint field's value.
    pub(super) fn varint_field(&mut self, field: u32, wire_type: u8) -> Result<u64, Malformed> {
        expect(field, wire_type, VARINT)?;
        self.varint()
    }

    /// An embedded message's bytes.
    pub(super) fn message(&mut self, field: u32, wire_type: u8) -> Result<&'a [u8], Malformed> {
        expect(field, wire_type, LEN)?;
        self.bytes()
    }
}

pub(super) fn expect(field: u32, wire_type: u8, expected: u8) -> Result<(), Malformed> {
    if wire_type == expected {
        Ok(())
    } else {
        Err(Malformed::WireType { field, wire_type })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_read_as_prost_writes_them() {
        for value in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut buf = Vec::new();
            prost::encoding::encode_varint(value, &mut buf);
            buf.push(0xAA);
            let mut reader = Reader::new(&buf);
            assert_eq!(reader.varint(), Ok(value));
            assert_eq!(reader.buf, [0xAA]);
        }
    }

    #[test]
    fn short_and_overlong_input_is_an_error() {
        assert_eq!(
            Reader::new(&[0x80, 0x80]).varint(),
            Err(Malformed::Truncated)
        );
        assert_eq!(
            Reader::new(&[0xff; 10]).varint(),
            Err(Malformed::VarintOverflow)
        );
        assert_eq!(Reader::new(&[5, 1, 2]).bytes(), Err(Malformed::Truncated));
        assert_eq!(Reader::new(&[1, 2, 3]).fixed64(), Err(Malformed::Truncated));
        assert_eq!(Reader::new(&[0x00]).key(), Err(Malformed::BadFieldNumber));
        assert_eq!(
            Reader::new(&[0x0b]).skip(3),
            Err(Malformed::UnsupportedWireType(3))
        );
        assert_eq!(
            Reader::new(&[2, 0xff, 0xfe]).string(1, LEN),
            Err(Malformed::NotUtf8 { field: 1 })
        );
        assert_eq!(
            Reader::new(&[1]).string(4, VARINT),
            Err(Malformed::WireType {
                field: 4,
                wire_type: VARINT
            })
        );
    }
}
