//! AMF0 (Adobe's Action Message Format, version 0): the encoding of RTMP commands and metadata.
//!
//! Decoding is bounded: nesting deeper than [`MAX_DEPTH`] and truncated input are errors, never
//! panics.

use bytes::{BufMut, BytesMut};

/// Deepest nesting of objects and arrays accepted.
pub(crate) const MAX_DEPTH: usize = 16;

/// An AMF0 value.
#[derive(Clone, Debug, PartialEq)]
pub enum Amf0 {
    /// 0x00.
    Number(f64),
    /// 0x01.
    Boolean(bool),
    /// 0x02 (and 0x0C long strings when decoding).
    String(String),
    /// 0x03: ordered properties.
    Object(Vec<(String, Amf0)>),
    /// 0x05.
    Null,
    /// 0x06.
    Undefined,
    /// 0x08: ordered properties.
    EcmaArray(Vec<(String, Amf0)>),
    /// 0x0A.
    StrictArray(Vec<Amf0>),
    /// 0x0B: milliseconds since the epoch and a time zone.
    Date(f64, i16),
}

impl Amf0 {
    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Amf0::String(s) => Some(s),
            _ => None,
        }
    }

    /// The number, if this is one.
    pub(crate) fn as_f64(&self) -> Option<f64> {
        match self {
            Amf0::Number(n) => Some(*n),
            _ => None,
        }
    }

    /// A property of an object or ECMA array.
    pub(crate) fn get(&self, key: &str) -> Option<&Amf0> {
        match self {
            Amf0::Object(p) | Amf0::EcmaArray(p) => {
                p.iter().find(|(k, _)| k == key).map(|(_, v)| v)
            }
            _ => None,
        }
    }
}

/// Why AMF0 input could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Amf0Error {
    /// The input ended inside a value.
    #[error("truncated AMF0 value")]
    Truncated,
    /// A type marker castnode does not accept.
    #[error("unsupported AMF0 type marker {0:#04x}")]
    UnsupportedType(u8),
    /// Objects nested deeper than [`MAX_DEPTH`].
    #[error("AMF0 nested too deeply")]
    TooDeep,
    /// A string that is not UTF-8.
    #[error("AMF0 string is not UTF-8")]
    BadString,
}

/// Decodes every value in `buf`.
pub fn decode_all(mut buf: &[u8]) -> Result<Vec<Amf0>, Amf0Error> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        out.push(decode(&mut buf)?);
    }
    Ok(out)
}

/// Decodes one value from the front of `buf`, advancing it.
pub(crate) fn decode(buf: &mut &[u8]) -> Result<Amf0, Amf0Error> {
    decode_depth(buf, 0)
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], Amf0Error> {
    if buf.len() < n {
        return Err(Amf0Error::Truncated);
    }
    let (head, tail) = buf.split_at(n);
    *buf = tail;
    Ok(head)
}

fn u16be(buf: &mut &[u8]) -> Result<usize, Amf0Error> {
    let b = take(buf, 2)?;
    Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
}

fn u32be(buf: &mut &[u8]) -> Result<usize, Amf0Error> {
    let b = take(buf, 4)?;
    Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

fn string(buf: &mut &[u8], len: usize) -> Result<String, Amf0Error> {
    let b = take(buf, len)?;
    String::from_utf8(b.to_vec()).map_err(|_| Amf0Error::BadString)
}

fn properties(buf: &mut &[u8], depth: usize) -> Result<Vec<(String, Amf0)>, Amf0Error> {
    let mut props = Vec::new();
    loop {
        let len = u16be(buf)?;
        if len == 0 && buf.first() == Some(&0x09) {
            *buf = &buf[1..];
            return Ok(props);
        }
        let key = string(buf, len)?;
        let value = decode_depth(buf, depth + 1)?;
        props.push((key, value));
    }
}

fn decode_depth(buf: &mut &[u8], depth: usize) -> Result<Amf0, Amf0Error> {
    if depth > MAX_DEPTH {
        return Err(Amf0Error::TooDeep);
    }
    let marker = take(buf, 1)?[0];
    Ok(match marker {
        0x00 => Amf0::Number(f64::from_be_bytes(
            take(buf, 8)?.try_into().map_err(|_| Amf0Error::Truncated)?,
        )),
        0x01 => Amf0::Boolean(take(buf, 1)?[0] != 0),
        0x02 => {
            let len = u16be(buf)?;
            Amf0::String(string(buf, len)?)
        }
        0x03 => Amf0::Object(properties(buf, depth)?),
        0x05 => Amf0::Null,
        0x06 => Amf0::Undefined,
        0x08 => {
            let _count = u32be(buf)?;
            Amf0::EcmaArray(properties(buf, depth)?)
        }
        0x0A => {
            let count = u32be(buf)?;
            // Each element takes at least one byte: a count beyond the input is a lie.
            if count > buf.len() {
                return Err(Amf0Error::Truncated);
            }
            let mut items = Vec::with_capacity(count);
            for _ in 0..count {
                items.push(decode_depth(buf, depth + 1)?);
            }
            Amf0::StrictArray(items)
        }
        0x0B => {
            let ms =
                f64::from_be_bytes(take(buf, 8)?.try_into().map_err(|_| Amf0Error::Truncated)?);
            let tz = take(buf, 2)?;
            Amf0::Date(ms, i16::from_be_bytes([tz[0], tz[1]]))
        }
        0x0C => {
            let len = u32be(buf)?;
            Amf0::String(string(buf, len)?)
        }
        m => return Err(Amf0Error::UnsupportedType(m)),
    })
}

fn put_key(out: &mut BytesMut, k: &str) {
    let k = &k.as_bytes()[..k.len().min(0xFFFF)];
    out.put_u16(k.len() as u16);
    out.put_slice(k);
}

/// Appends the encoding of `v` to `out`.
pub(crate) fn encode(v: &Amf0, out: &mut BytesMut) {
    match v {
        Amf0::Number(n) => {
            out.put_u8(0x00);
            out.put_f64(*n);
        }
        Amf0::Boolean(b) => {
            out.put_u8(0x01);
            out.put_u8(u8::from(*b));
        }
        Amf0::String(s) if s.len() > 0xFFFF => {
            out.put_u8(0x0C);
            out.put_u32(s.len() as u32);
            out.put_slice(s.as_bytes());
        }
        Amf0::String(s) => {
            out.put_u8(0x02);
            put_key(out, s);
        }
        Amf0::Object(props) | Amf0::EcmaArray(props) => {
            if let Amf0::EcmaArray(_) = v {
                out.put_u8(0x08);
                out.put_u32(props.len() as u32);
            } else {
                out.put_u8(0x03);
            }
            for (k, v) in props {
                put_key(out, k);
                encode(v, out);
            }
            out.put_slice(&[0, 0, 0x09]);
        }
        Amf0::Null => out.put_u8(0x05),
        Amf0::Undefined => out.put_u8(0x06),
        Amf0::StrictArray(items) => {
            out.put_u8(0x0A);
            out.put_u32(items.len() as u32);
            for i in items {
                encode(i, out);
            }
        }
        Amf0::Date(ms, tz) => {
            out.put_u8(0x0B);
            out.put_f64(*ms);
            out.put_i16(*tz);
        }
    }
}

/// Encodes a sequence of values.
pub fn encode_all(values: &[Amf0]) -> BytesMut {
    let mut out = BytesMut::new();
    for v in values {
        encode(v, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn value() -> impl Strategy<Value = Amf0> {
        let leaf = prop_oneof![
            any::<f64>()
                .prop_filter("NaN is not equal to itself", |f| !f.is_nan())
                .prop_map(Amf0::Number),
            any::<bool>().prop_map(Amf0::Boolean),
            ".{0,20}".prop_map(Amf0::String),
            Just(Amf0::Null),
            Just(Amf0::Undefined),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(("[a-z]{1,8}", inner.clone()), 0..6).prop_map(Amf0::Object),
                prop::collection::vec(("[a-z]{1,8}", inner.clone()), 0..6)
                    .prop_map(Amf0::EcmaArray),
                prop::collection::vec(inner, 0..6).prop_map(Amf0::StrictArray),
            ]
        })
    }

    proptest! {
        #[test]
        fn round_trip(values in prop::collection::vec(value(), 0..5)) {
            let bytes = encode_all(&values);
            prop_assert_eq!(decode_all(&bytes).unwrap(), values);
        }

        #[test]
        fn never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_all(&bytes);
        }
    }

    #[test]
    fn rejects_deep_nesting_and_truncation() {
        let mut deep = vec![];
        for _ in 0..100 {
            deep.extend_from_slice(&[0x0A, 0, 0, 0, 1]);
        }
        deep.push(0x05);
        assert_eq!(decode_all(&deep), Err(Amf0Error::TooDeep));
        assert_eq!(decode_all(&[0x02, 0, 5, b'a']), Err(Amf0Error::Truncated));
        assert_eq!(
            decode_all(&[0x0A, 0xff, 0xff, 0xff, 0xff]),
            Err(Amf0Error::Truncated)
        );
    }
}
