//! Membership changes kept as their encoding.
//!
//! A node encodes each change once, when it is published, and serves those
//! bytes to every subscriber, from memory and from its store, without decoding
//! them into owned strings and encoding them again per subscriber. It reads
//! only what it routes and filters by: the segment and the cursor's sequence,
//! with [`ChangeView`].

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::DecodeError;
use prost::encoding::{DecodeContext, WireType};

use super::wire::{Malformed, Reader};
use crate::ConvertError;

/// Field numbers of `MembershipChange` and `Cursor` in
/// proto/dynseg/v1/changes.proto.
mod field {
    pub(super) const USER_ID: u32 = 1;
    pub(super) const SEGMENT: u32 = 2;
    pub(super) const AT_MS: u32 = 4;
    pub(super) const CURSOR: u32 = 7;
    pub(super) const CURSOR_SHARD: u32 = 1;
    pub(super) const CURSOR_SEQUENCE: u32 = 3;
}

/// What a node (or a client) reads of an encoded `dynseg.v1.MembershipChange`,
/// borrowed from its bytes: all but the kind, cause, rule version and epoch.
/// Fields are read as prost reads them (the last of a scalar wins; a repeated
/// cursor is merged).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChangeView<'a> {
    /// `user_id`.
    pub user_id: &'a str,
    /// `segment`.
    pub segment: &'a str,
    /// `at_ms`.
    pub at_ms: i64,
    /// `cursor.shard` (0 when absent).
    pub shard: u32,
    /// `cursor.sequence` (0 when absent).
    pub sequence: u64,
}

fn malformed(e: Malformed) -> ConvertError {
    ConvertError(format!("malformed change: {e}"))
}

impl<'a> ChangeView<'a> {
    /// Reads the change's ids, time and sequence, checking that every field
    /// is well formed.
    pub fn parse(bytes: &'a [u8]) -> Result<ChangeView<'a>, ConvertError> {
        let mut view = ChangeView {
            user_id: "",
            segment: "",
            at_ms: 0,
            shard: 0,
            sequence: 0,
        };
        let mut reader = Reader::new(bytes);
        while !reader.is_empty() {
            let (number, wire_type) = reader.key().map_err(malformed)?;
            let read = match number {
                field::USER_ID => reader.string(number, wire_type).map(|s| view.user_id = s),
                field::SEGMENT => reader.string(number, wire_type).map(|s| view.segment = s),
                field::AT_MS => reader
                    .varint_field(number, wire_type)
                    .map(|v| view.at_ms = v as i64),
                field::CURSOR => reader
                    .message(number, wire_type)
                    .and_then(|cursor| read_cursor(cursor, &mut view)),
                _ => reader.skip(wire_type),
            };
            read.map_err(malformed)?;
        }
        Ok(view)
    }
}

/// Reads a cursor's shard and sequence into `view`, those it has (a merged
/// cursor keeps the earlier values otherwise).
fn read_cursor(cursor: &[u8], view: &mut ChangeView<'_>) -> Result<(), Malformed> {
    let mut reader = Reader::new(cursor);
    while !reader.is_empty() {
        let (number, wire_type) = reader.key()?;
        match number {
            // uint32 is a varint; prost keeps its low bits.
            field::CURSOR_SHARD => view.shard = reader.varint_field(number, wire_type)? as u32,
            field::CURSOR_SEQUENCE => view.sequence = reader.varint_field(number, wire_type)?,
            _ => reader.skip(wire_type)?,
        }
    }
    Ok(())
}

/// Whether `bytes` is a sequence of whole fields, groups excepted.
fn well_formed(bytes: &[u8]) -> bool {
    let mut reader = Reader::new(bytes);
    while !reader.is_empty() {
        let Ok((_, wire_type)) = reader.key() else {
            return false;
        };
        if reader.skip(wire_type).is_err() {
            return false;
        }
    }
    true
}

/// `dynseg.v1.ChangeBatch` with its changes encoded.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ChangeBatch {
    /// Each change's encoding, in order.
    #[prost(bytes = "bytes", repeated, tag = "1")]
    pub changes: Vec<Bytes>,
}

/// `dynseg.v1.GatewayChange` with its change encoded: a gateway hands on the
/// bytes a node sent, adding only the resume token.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GatewayChange {
    /// The change, as its node encoded it.
    #[prost(message, optional, tag = "1")]
    pub change: Option<EncodedChange>,
    /// Resumes right after this change (see `pb::GatewayChange`).
    #[prost(string, tag = "2")]
    pub resume_token: String,
}

/// One `dynseg.v1.MembershipChange` as its encoding: what the node's
/// `Subscribe` stream sends, written to the wire as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EncodedChange(pub Bytes);

impl prost::Message for EncodedChange {
    /// Takes the bytes in one piece once they are checked to be well formed
    /// fields; field by field (with prost's error) otherwise.
    fn merge(&mut self, mut buf: impl Buf) -> Result<(), DecodeError> {
        let bytes = buf.copy_to_bytes(buf.remaining());
        if well_formed(&bytes) {
            self.0 = if self.0.is_empty() {
                bytes
            } else {
                [&self.0[..], &bytes[..]].concat().into()
            };
            return Ok(());
        }
        let mut rest = bytes;
        while rest.has_remaining() {
            let (tag, wire_type) = prost::encoding::decode_key(&mut rest)?;
            self.merge_field(tag, wire_type, &mut rest, DecodeContext::default())?;
        }
        Ok(())
    }

    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0);
    }

    /// Keeps each field as it came (key and value), so that decoding and
    /// encoding again gives back the same bytes.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        use prost::encoding::{
            bytes, check_wire_type, decode_varint, encode_varint, fixed32, fixed64,
        };
        let mut out = BytesMut::from(std::mem::take(&mut self.0));
        prost::encoding::encode_key(tag, wire_type, &mut out);
        match wire_type {
            WireType::Varint => encode_varint(decode_varint(buf)?, &mut out),
            WireType::SixtyFourBit => {
                let mut value = 0;
                fixed64::merge(wire_type, &mut value, buf, ctx)?;
                out.put_u64_le(value);
            }
            WireType::ThirtyTwoBit => {
                let mut value = 0;
                fixed32::merge(wire_type, &mut value, buf, ctx)?;
                out.put_u32_le(value);
            }
            WireType::LengthDelimited => {
                let mut value = Bytes::new();
                bytes::merge(wire_type, &mut value, buf, ctx)?;
                encode_varint(value.len() as u64, &mut out);
                out.put_slice(&value);
            }
            // Groups are not proto3: refused as a wrong wire type is.
            WireType::StartGroup | WireType::EndGroup => {
                check_wire_type(WireType::LengthDelimited, wire_type)?;
            }
        }
        self.0 = out.freeze();
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0 = Bytes::new();
    }
}
