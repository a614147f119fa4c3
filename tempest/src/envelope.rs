//! The join envelope: everything a join task's parents emitted for one
//! source message, packed into one payload.
//!
//! The in-flight table packs it when a join task's last parent completes;
//! the join's adapter on the worker unpacks it without copying a payload
//! (every payload, key and header value is a slice of the envelope). It is
//! an ordinary payload on the way, so the wire need not know it.
//!
//! This module is at the bottom of the runtime with `msg`: it imports no
//! other module of the crate.
//!
//! # Layout
//!
//! All integers big-endian.
//!
//! ```text
//! u8  version (1)
//! u32 part count
//! per part:
//!   u16 parent (its position among the join task's parents)
//!   u32 payload length, payload
//!   u8  flags (1: a key follows, 2: headers follow)
//!   [u32 key length, key]
//!   [u8 header count, per header: u8 name length, name, u16 value length, value]
//! ```

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tempest_source::Headers;

const VERSION: u8 = 1;
const FLAG_KEY: u8 = 1;
const FLAG_HEADERS: u8 = 2;
/// The fewest bytes a part takes: parent, payload length, flags.
const MIN_PART: usize = 2 + 4 + 1;

/// One part of an envelope as it is packed: the parent's position among
/// the join task's parents, then the payload, key and headers.
pub(crate) type PartRef<'a> = (u16, &'a Bytes, Option<&'a Bytes>, &'a Headers);

/// One part of an unpacked envelope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RawPart {
    /// The parent's position among the join task's parents.
    pub parent: u16,
    pub payload: Bytes,
    pub key: Option<Bytes>,
    pub headers: Headers,
}

/// An envelope that cannot be unpacked, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct EnvelopeError(String);

impl fmt::Display for EnvelopeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed join envelope: {}", self.0)
    }
}

impl std::error::Error for EnvelopeError {}

fn bad<T>(what: impl Into<String>) -> Result<T, EnvelopeError> {
    Err(EnvelopeError(what.into()))
}

/// Packs `parts`, in the order given.
///
/// Lengths that do not fit their fields cannot occur: payloads and keys
/// longer than 4 GiB do not exist in a topology (frames are far smaller),
/// and [`Headers`] keeps names, values and their count within theirs.
pub(crate) fn encode<'a>(parts: impl ExactSizeIterator<Item = PartRef<'a>> + Clone) -> Bytes {
    let size = 1
        + 4
        + parts
            .clone()
            .map(|(_, payload, key, headers)| {
                MIN_PART
                    + payload.len()
                    + key.map_or(0, |k| 4 + k.len())
                    + if headers.is_empty() {
                        0
                    } else {
                        1 + headers
                            .iter()
                            .map(|(n, v)| 1 + n.len() + 2 + v.len())
                            .sum::<usize>()
                    }
            })
            .sum::<usize>();
    let mut dst = BytesMut::with_capacity(size);
    dst.put_u8(VERSION);
    dst.put_u32(parts.len() as u32);
    for (parent, payload, key, headers) in parts {
        dst.put_u16(parent);
        dst.put_u32(payload.len() as u32);
        dst.put_slice(payload);
        let flags = if key.is_some() { FLAG_KEY } else { 0 }
            | if headers.is_empty() { 0 } else { FLAG_HEADERS };
        dst.put_u8(flags);
        if let Some(k) = key {
            dst.put_u32(k.len() as u32);
            dst.put_slice(k);
        }
        if !headers.is_empty() {
            dst.put_u8(headers.len() as u8);
            for (name, value) in headers.iter() {
                dst.put_u8(name.len() as u8);
                dst.put_slice(name.as_bytes());
                dst.put_u16(value.len() as u16);
                dst.put_slice(value);
            }
        }
    }
    dst.freeze()
}

fn need(buf: &Bytes, n: usize, what: &str) -> Result<(), EnvelopeError> {
    if buf.remaining() < n {
        return bad(format!(
            "it ends inside {what} ({n} bytes needed, {} left)",
            buf.remaining()
        ));
    }
    Ok(())
}

fn take(buf: &mut Bytes, n: usize, what: &str) -> Result<Bytes, EnvelopeError> {
    need(buf, n, what)?;
    Ok(buf.split_to(n))
}

/// Unpacks an envelope. Every payload, key and header value is a slice of
/// `buf`; nothing panics or allocates more than `buf` can justify,
/// whatever its bytes.
pub(crate) fn decode(mut buf: Bytes) -> Result<Vec<RawPart>, EnvelopeError> {
    need(&buf, 1 + 4, "its header")?;
    let version = buf.get_u8();
    if version != VERSION {
        return bad(format!("version {version} (expected {VERSION})"));
    }
    let count = buf.get_u32() as usize;
    if count > buf.remaining() / MIN_PART {
        return bad(format!(
            "{count} parts cannot fit in {} bytes",
            buf.remaining()
        ));
    }
    let mut parts = Vec::with_capacity(count);
    for _ in 0..count {
        need(&buf, 2 + 4, "a part")?;
        let parent = buf.get_u16();
        let len = buf.get_u32() as usize;
        let payload = take(&mut buf, len, "a payload")?;
        need(&buf, 1, "a part's flags")?;
        let flags = buf.get_u8();
        if flags & !(FLAG_KEY | FLAG_HEADERS) != 0 {
            return bad(format!("part flags {flags:#x}"));
        }
        let key = if flags & FLAG_KEY != 0 {
            need(&buf, 4, "a key's length")?;
            let len = buf.get_u32() as usize;
            Some(take(&mut buf, len, "a key")?)
        } else {
            None
        };
        let mut headers = Headers::new();
        if flags & FLAG_HEADERS != 0 {
            need(&buf, 1, "a header count")?;
            for _ in 0..buf.get_u8() {
                need(&buf, 1, "a header name's length")?;
                let len = buf.get_u8() as usize;
                let name = take(&mut buf, len, "a header name")?;
                let Ok(name) = std::str::from_utf8(&name) else {
                    return bad("a header name is not UTF-8");
                };
                need(&buf, 2, "a header value's length")?;
                let len = buf.get_u16() as usize;
                let value = take(&mut buf, len, "a header value")?;
                if let Err(e) = headers.insert(name, value) {
                    return bad(format!("a part's headers: {e}"));
                }
            }
        }
        parts.push(RawPart {
            parent,
            payload,
            key,
            headers,
        });
    }
    if buf.has_remaining() {
        return bad(format!("{} bytes follow the last part", buf.remaining()));
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pack(parts: &[RawPart]) -> Bytes {
        encode(
            parts
                .iter()
                .map(|p| (p.parent, &p.payload, p.key.as_ref(), &p.headers)),
        )
    }

    fn part(parent: u16, payload: &'static str) -> RawPart {
        RawPart {
            parent,
            payload: Bytes::from(payload),
            key: None,
            headers: Headers::new(),
        }
    }

    #[test]
    fn parts_round_trip_as_slices_of_the_envelope() {
        let mut headers = Headers::new();
        headers.insert("trace", "t1").unwrap();
        headers.insert("lang", "").unwrap();
        let parts = vec![
            part(0, "a"),
            RawPart {
                key: Some(Bytes::from("k")),
                headers,
                ..part(0, "")
            },
            part(3, "ccc"),
        ];
        let env = pack(&parts);
        let back = decode(env.clone()).unwrap();
        assert_eq!(back, parts);
        let range = env.as_ptr_range();
        assert!(
            range.contains(&back[2].payload.as_ptr()),
            "payloads are not copied"
        );
        assert_eq!(decode(pack(&[])).unwrap(), vec![]);
    }

    #[test]
    fn malformed_envelopes_are_errors() {
        let good = pack(&[part(1, "payload")]);
        for cut in 0..good.len() {
            let err = decode(good.slice(..cut)).unwrap_err();
            assert!(err.to_string().starts_with("malformed join envelope"));
        }
        let mut extra = good.to_vec();
        extra.push(0);
        assert!(decode(extra.into()).is_err());
        let mut version = good.to_vec();
        version[0] = 9;
        assert!(decode(version.into()).is_err());
        // A count far beyond what the bytes hold allocates nothing.
        let huge = Bytes::from_static(&[1, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0]);
        assert!(decode(huge).unwrap_err().to_string().contains("cannot fit"));
        // Bad flags, a header name that is not UTF-8, an empty header name.
        let flags = Bytes::from_static(&[1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0x80]);
        assert!(decode(flags).is_err());
        let name = Bytes::from_static(&[1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 2, 1, 1, 0xff, 0, 0]);
        assert!(decode(name).unwrap_err().to_string().contains("UTF-8"));
        let empty = Bytes::from_static(&[1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 2, 1, 0, 0, 0]);
        assert!(decode(empty).unwrap_err().to_string().contains("headers"));
    }

    proptest! {
        /// Whatever the bytes, decoding returns, and never panics.
        #[test]
        fn decoding_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(Bytes::from(bytes));
        }

        /// Random parts round-trip; every strict prefix fails.
        #[test]
        fn random_parts_round_trip(
            parts in proptest::collection::vec(
                (any::<u16>(), proptest::collection::vec(any::<u8>(), 0..20),
                 proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8)),
                 proptest::collection::vec(("[a-z]{1,4}", proptest::collection::vec(any::<u8>(), 0..6)), 0..3)),
                0..6),
        ) {
            let parts: Vec<RawPart> = parts.into_iter().map(|(parent, payload, key, hs)| {
                let mut headers = Headers::new();
                for (n, v) in hs {
                    headers.insert(n, v).unwrap();
                }
                RawPart { parent, payload: payload.into(), key: key.map(Bytes::from), headers }
            }).collect();
            let env = pack(&parts);
            prop_assert_eq!(decode(env.clone()).unwrap(), parts);
            for cut in 0..env.len() {
                prop_assert!(decode(env.slice(..cut)).is_err());
            }
        }
    }
}
