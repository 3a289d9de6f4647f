//! The protobuf wire format, encoding only, for the ONNX messages that [`crate::GraphBuilder`]
//! writes (field numbers of `onnx.proto`, IR version 8).
//!
//! A protobuf message is a sequence of fields; each field is a key, `(field_number << 3) |
//! wire_type`, written as a base-128 varint, then the value: a varint for integers and enums
//! (wire type 0), a length-prefixed byte string for strings, bytes, nested messages and packed
//! repeated scalars (wire type 2), four little-endian bytes for `float` (wire type 5). Fields
//! may come in any order; a field at its default value (0, empty) may be left out, and is.

/// Wire type of varint-encoded integers and enums.
const VARINT: u32 = 0;
/// Wire type of strings, bytes, nested messages and packed repeated fields.
const LEN: u32 = 2;
/// Wire type of `float` (fixed 32 bits).
const FIXED32: u32 = 5;

/// A protobuf message being written: fields appended in the order the caller chooses.
#[derive(Debug, Default, Clone)]
pub struct Message {
    buf: Vec<u8>,
}

/// Append `v` as a base-128 varint (7 bits per byte, low group first, high bit = more follows).
/// Negative `int64` values are their two's complement as `u64`: ten bytes.
pub fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

impl Message {
    /// An empty message.
    pub fn new() -> Self {
        Self::default()
    }

    fn key(&mut self, field: u32, wire: u32) {
        put_varint(&mut self.buf, u64::from(field << 3 | wire));
    }

    /// An `int64`/`int32`/enum field (left out when 0).
    pub fn int(&mut self, field: u32, v: i64) -> &mut Self {
        if v != 0 {
            self.key(field, VARINT);
            put_varint(&mut self.buf, v as u64);
        }
        self
    }

    /// A `float` field, always written (an attribute's value 0.0 must be present).
    pub fn float(&mut self, field: u32, v: f32) -> &mut Self {
        self.key(field, FIXED32);
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// A `bytes` field (left out when empty).
    pub fn bytes(&mut self, field: u32, v: &[u8]) -> &mut Self {
        if !v.is_empty() {
            self.key(field, LEN);
            put_varint(&mut self.buf, v.len() as u64);
            self.buf.extend_from_slice(v);
        }
        self
    }

    /// A `string` field (left out when empty).
    pub fn string(&mut self, field: u32, v: &str) -> &mut Self {
        self.bytes(field, v.as_bytes())
    }

    /// One element of a `repeated string` field (written even when empty: the position counts,
    /// as for an omitted optional input of a node).
    pub fn repeated_string(&mut self, field: u32, v: &str) -> &mut Self {
        self.key(field, LEN);
        put_varint(&mut self.buf, v.len() as u64);
        self.buf.extend_from_slice(v.as_bytes());
        self
    }

    /// A nested message field (written even when empty: presence can matter, as for a shape).
    pub fn message(&mut self, field: u32, m: &Message) -> &mut Self {
        self.key(field, LEN);
        put_varint(&mut self.buf, m.buf.len() as u64);
        self.buf.extend_from_slice(&m.buf);
        self
    }

    /// A packed `repeated int64` field (left out when empty).
    pub fn packed_ints(&mut self, field: u32, vs: &[i64]) -> &mut Self {
        if !vs.is_empty() {
            let mut body = Vec::with_capacity(vs.len() * 2);
            for &v in vs {
                put_varint(&mut body, v as u64);
            }
            self.bytes(field, &body);
        }
        self
    }

    /// A packed `repeated float` field (left out when empty).
    pub fn packed_floats(&mut self, field: u32, vs: &[f32]) -> &mut Self {
        if !vs.is_empty() {
            let body: Vec<u8> = vs.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.bytes(field, &body);
        }
        self
    }

    /// The encoded bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    /// The encoded bytes so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(v: u64) -> Vec<u8> {
        let mut b = Vec::new();
        put_varint(&mut b, v);
        b
    }

    /// The examples of the protobuf encoding guide: 1, 150 (`96 01`), and a negative int64 is
    /// ten bytes ending in `01`.
    #[test]
    fn varints_follow_the_wire_format() {
        assert_eq!(varint(0), [0x00]);
        assert_eq!(varint(1), [0x01]);
        assert_eq!(varint(127), [0x7f]);
        assert_eq!(varint(128), [0x80, 0x01]);
        assert_eq!(varint(150), [0x96, 0x01]);
        assert_eq!(varint(300), [0xac, 0x02]);
        let minus_one = varint(-1i64 as u64);
        assert_eq!(minus_one.len(), 10);
        assert_eq!(minus_one[9], 0x01);
        assert!(minus_one[..9].iter().all(|&b| b == 0xff));
    }

    /// Field 1 = 150 is `08 96 01`; field 2 = "testing" is `12 07 74 65 73 74 69 6e 67`; a
    /// nested message at field 3 holding the first is `1a 03 08 96 01` (the guide's examples).
    #[test]
    fn fields_and_nesting_follow_the_wire_format() {
        let mut a = Message::new();
        a.int(1, 150);
        assert_eq!(a.as_bytes(), [0x08, 0x96, 0x01]);
        let mut b = Message::new();
        b.string(2, "testing");
        assert_eq!(
            b.as_bytes(),
            [0x12, 0x07, 0x74, 0x65, 0x73, 0x74, 0x69, 0x6e, 0x67]
        );
        let mut c = Message::new();
        c.message(3, &a);
        assert_eq!(c.as_bytes(), [0x1a, 0x03, 0x08, 0x96, 0x01]);
        // Packed repeated int64 [3, 270, 86942] at field 4: `22 06 03 8e 02 9e a7 05`.
        let mut d = Message::new();
        d.packed_ints(4, &[3, 270, 86942]);
        assert_eq!(
            d.as_bytes(),
            [0x22, 0x06, 0x03, 0x8e, 0x02, 0x9e, 0xa7, 0x05]
        );
        // Float 1.0 at field 2: key `15`, then `00 00 80 3f`.
        let mut e = Message::new();
        e.float(2, 1.0);
        assert_eq!(e.as_bytes(), [0x15, 0x00, 0x00, 0x80, 0x3f]);
        // Defaults are left out.
        let mut f = Message::new();
        f.int(1, 0).string(2, "").bytes(3, &[]).packed_ints(4, &[]);
        assert!(f.as_bytes().is_empty());
    }
}
