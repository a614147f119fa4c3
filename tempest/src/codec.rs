//! Codecs: how the payloads on an edge are encoded, so typed tasks (see
//! [`TypedTask`](crate::TypedTask)) can read and write Rust values.
//!
//! The codec travels on the **edge**, not in the message: every producer
//! (the source and each task) has one output codec, fixed when the pipeline
//! is built ([`Pipeline::codec`](crate::Pipeline::codec),
//! [`Pipeline::output_codec`](crate::Pipeline::output_codec),
//! [`Pipeline::source_codec`](crate::Pipeline::source_codec)). A consumer
//! decodes a message with the codec of the task that emitted it, which its
//! context names ([`TaskContext::input_codec`](crate::TaskContext::input_codec)).
//! No message carries a byte for it, and a mismatch the pipeline can see
//! (a typed task fed raw bytes, a postcard edge between two different
//! types) fails the build instead of a message.

use std::any::TypeId;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::msg::{TaskIdx, NO_TASK};

/// How a producer encodes its payloads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Codec {
    /// JSON ([`serde_json`]): readable and understood everywhere, and
    /// self-describing, so the two ends of an edge may use different types
    /// (a consumer may read a subset of the fields). The default.
    #[default]
    Json,
    /// [postcard](https://docs.rs/postcard): compact and fast, but not
    /// self-describing; both ends of an edge must use the same type, which
    /// the pipeline checks when both are typed tasks.
    Postcard,
    /// Opaque bytes with no codec: only untyped tasks can read them.
    Raw,
}

impl Codec {
    /// The codec's name as `Topology.toml`, `FromStr` and `Display` spell
    /// it: `json`, `postcard` or `raw`.
    pub fn as_str(self) -> &'static str {
        match self {
            Codec::Json => "json",
            Codec::Postcard => "postcard",
            Codec::Raw => "raw",
        }
    }

    /// The codec's name in a sentence: `JSON`, `postcard`, `raw bytes`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Codec::Json => "JSON",
            Codec::Postcard => "postcard",
            Codec::Raw => "raw bytes",
        }
    }

    /// Encodes `value`.
    ///
    /// ```
    /// use tempest::Codec;
    ///
    /// let bytes = Codec::Json.encode(&("alice", 2)).unwrap();
    /// assert_eq!(&bytes[..], b"[\"alice\",2]");
    /// let back: (String, u32) = Codec::Json.decode(&bytes).unwrap();
    /// assert_eq!(back, ("alice".to_string(), 2));
    /// assert!(Codec::Raw.encode(&1).is_err());
    /// ```
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Bytes, CodecError> {
        let encoded = match self {
            Codec::Json => serde_json::to_vec(value).map_err(|e| e.to_string()),
            Codec::Postcard => postcard::to_allocvec(value).map_err(|e| e.to_string()),
            Codec::Raw => Err(RAW_HAS_NO_CODEC.to_string()),
        };
        encoded.map(Bytes::from).map_err(|reason| CodecError {
            codec: self,
            direction: Direction::Encode,
            reason,
        })
    }

    /// Decodes one value that must fill `bytes` exactly.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, CodecError> {
        let decoded = match self {
            Codec::Json => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
            // `take_from_bytes` rather than `from_bytes`, which ignores
            // trailing bytes: bytes left over mean the producer wrote
            // another type, and saying so beats a silently wrong value.
            Codec::Postcard => match postcard::take_from_bytes(bytes) {
                Ok((value, [])) => Ok(value),
                Ok((_, rest)) => Err(format!(
                    "{} byte(s) left over after the value; the producer wrote another type",
                    rest.len()
                )),
                Err(e) => Err(e.to_string()),
            },
            Codec::Raw => Err(RAW_HAS_NO_CODEC.to_string()),
        };
        decoded.map_err(|reason| CodecError {
            codec: self,
            direction: Direction::Decode,
            reason,
        })
    }
}

const RAW_HAS_NO_CODEC: &str = "raw payloads have no codec";

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Codec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "json" => Ok(Codec::Json),
            "postcard" => Ok(Codec::Postcard),
            "raw" => Ok(Codec::Raw),
            other => Err(format!(
                "unknown codec \"{other}\"; the codecs are \"json\", \"postcard\" and \"raw\""
            )),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    Encode,
    Decode,
}

/// A value that a [`Codec`] could not encode or decode, with the codec's
/// own reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodecError {
    codec: Codec,
    direction: Direction,
    reason: String,
}

impl CodecError {
    /// The codec that failed.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// Whether decoding (rather than encoding) failed.
    pub fn is_decode(&self) -> bool {
        self.direction == Direction::Decode
    }

    /// The codec's reason, e.g. `expected value at line 1 column 1`.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = match self.direction {
            Direction::Encode => "encode",
            Direction::Decode => "decode",
        };
        write!(f, "cannot {verb} {}: {}", self.codec.label(), self.reason)
    }
}

impl std::error::Error for CodecError {}

/// How many bytes of a payload an error shows.
pub(crate) const PREVIEW_BYTES: usize = 32;

/// The first [`PREVIEW_BYTES`] of `payload` for an error message: its
/// length, then the bytes as a Rust byte string (printable ASCII as is,
/// the rest as `\xNN`), so text and binary payloads both read well.
///
/// `payload (7 bytes) starts b"{\"wor"…`
pub(crate) fn preview(payload: &[u8]) -> String {
    let shown = &payload[..payload.len().min(PREVIEW_BYTES)];
    let more = if payload.len() > shown.len() {
        "…"
    } else {
        ""
    };
    format!(
        "payload ({} byte{}) starts b\"{}\"{more}",
        payload.len(),
        if payload.len() == 1 { "" } else { "s" },
        shown.escape_ascii()
    )
}

/// The output codecs of a pipeline's producers, by task index, and the
/// source's: what a consumer needs to decode any message it receives.
/// Cheap to clone (the table is shared).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct EdgeCodecs {
    pub source: Codec,
    pub tasks: Arc<[Codec]>,
}

impl Default for EdgeCodecs {
    fn default() -> Self {
        EdgeCodecs {
            source: Codec::default(),
            tasks: Arc::from(Vec::new()),
        }
    }
}

impl EdgeCodecs {
    /// The codec of the messages `parent` emits ([`NO_TASK`]: the source).
    pub fn of(&self, parent: TaskIdx) -> Codec {
        if parent == NO_TASK {
            return self.source;
        }
        self.tasks
            .get(parent as usize)
            .copied()
            .unwrap_or(self.source)
    }
}

/// What one task needs to know of the codecs: those of every producer it
/// may receive from, and its own output codec.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct TaskCodecs {
    pub inputs: EdgeCodecs,
    pub output: Codec,
}

/// The Rust types a typed task reads and writes, recorded in the pipeline
/// so it can check its postcard edges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TypeSig {
    pub in_id: TypeId,
    pub in_name: &'static str,
    pub out_id: TypeId,
    pub out_name: &'static str,
}

impl TypeSig {
    pub fn of<In: 'static, Out: 'static>() -> Self {
        TypeSig {
            in_id: TypeId::of::<In>(),
            in_name: std::any::type_name::<In>(),
            out_id: TypeId::of::<Out>(),
            out_name: std::any::type_name::<Out>(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Word {
        word: String,
        count: u64,
        tags: Vec<String>,
        weight: Option<f64>,
    }

    fn word() -> Word {
        Word {
            word: "héllo".into(),
            count: u64::MAX,
            tags: vec!["a".into(), String::new()],
            weight: Some(0.5),
        }
    }

    #[test]
    fn json_and_postcard_round_trip() {
        for codec in [Codec::Json, Codec::Postcard] {
            let bytes = codec.encode(&word()).unwrap();
            assert_eq!(codec.decode::<Word>(&bytes).unwrap(), word(), "{codec}");
        }
        let json = Codec::Json.encode(&word()).unwrap();
        let postcard = Codec::Postcard.encode(&word()).unwrap();
        assert!(json.starts_with(b"{\"word\":\"h"), "{json:?}");
        assert!(postcard.len() < json.len() / 2, "postcard is compact");
    }

    #[test]
    fn json_round_trips_floats_exactly() {
        // Found by `any_value_round_trips`: without serde_json's
        // `float_roundtrip` feature this comes back as ...3567593.
        let x = 378752259.35675925_f64;
        let bytes = Codec::Json.encode(&x).unwrap();
        assert_eq!(
            Codec::Json.decode::<f64>(&bytes).unwrap().to_bits(),
            x.to_bits()
        );
    }

    #[test]
    fn json_lets_a_consumer_read_a_subset() {
        #[derive(Deserialize)]
        struct JustTheWord {
            word: String,
        }
        let bytes = Codec::Json.encode(&word()).unwrap();
        let w: JustTheWord = Codec::Json.decode(&bytes).unwrap();
        assert_eq!(w.word, "héllo");
    }

    #[test]
    fn decode_errors_carry_the_codec_and_its_reason() {
        let err = Codec::Json.decode::<Word>(b"not json").unwrap_err();
        assert!(err.is_decode());
        assert_eq!(err.codec(), Codec::Json);
        assert_eq!(err.reason(), "expected ident at line 1 column 2");
        assert_eq!(
            err.to_string(),
            "cannot decode JSON: expected ident at line 1 column 2"
        );

        let err = Codec::Postcard.decode::<Word>(&[0x05, b'a']).unwrap_err();
        assert!(
            err.to_string().starts_with("cannot decode postcard: "),
            "{err}"
        );
        assert!(!err.reason().is_empty());

        let err = Codec::Raw.decode::<u8>(b"x").unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot decode raw bytes: raw payloads have no codec"
        );
        let err = Codec::Raw.encode(&1u8).unwrap_err();
        assert!(!err.is_decode());
        assert_eq!(
            err.to_string(),
            "cannot encode raw bytes: raw payloads have no codec"
        );
    }

    #[test]
    fn postcard_refuses_bytes_left_over() {
        // A (u32, u32) read as one u32: postcard's `from_bytes` would
        // return 1 and drop the rest.
        let bytes = Codec::Postcard.encode(&(1u32, 2u32)).unwrap();
        let err = Codec::Postcard.decode::<u32>(&bytes).unwrap_err();
        assert_eq!(
            err.reason(),
            "1 byte(s) left over after the value; the producer wrote another type"
        );
    }

    #[test]
    fn previews_show_at_most_32_bytes_escaped() {
        assert_eq!(preview(b""), "payload (0 bytes) starts b\"\"");
        assert_eq!(
            preview(b"{\"a\""),
            "payload (4 bytes) starts b\"{\\\"a\\\"\""
        );
        assert_eq!(
            preview(&[0, 0xff]),
            "payload (2 bytes) starts b\"\\x00\\xff\""
        );
        let long = [b'x'; 40];
        assert_eq!(
            preview(&long),
            format!("payload (40 bytes) starts b\"{}\"…", "x".repeat(32))
        );
    }

    #[test]
    fn codecs_parse_and_print_by_name() {
        for codec in [Codec::Json, Codec::Postcard, Codec::Raw] {
            assert_eq!(codec.to_string().parse::<Codec>(), Ok(codec));
        }
        assert!("msgpack"
            .parse::<Codec>()
            .unwrap_err()
            .contains("\"postcard\""));
    }

    proptest::proptest! {
        #[test]
        fn any_value_round_trips(
            word in ".*",
            count in proptest::prelude::any::<u64>(),
            tags in proptest::collection::vec(".{0,8}", 0..4),
            weight in proptest::option::of(-1e9f64..1e9),
        ) {
            let w = Word { word, count, tags, weight };
            for codec in [Codec::Json, Codec::Postcard] {
                let bytes = codec.encode(&w).unwrap();
                proptest::prop_assert_eq!(&codec.decode::<Word>(&bytes).unwrap(), &w);
            }
        }

        /// Payloads come from peers and sources: any bytes decode to a
        /// value or an error, never a panic.
        #[test]
        fn any_bytes_decode_or_fail_cleanly(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            for codec in [Codec::Json, Codec::Postcard, Codec::Raw] {
                if let Err(e) = codec.decode::<Word>(&bytes) {
                    proptest::prop_assert!(!e.reason().is_empty());
                }
            }
            let _ = preview(&bytes);
        }
    }

    #[test]
    fn the_source_and_unknown_parents_fall_back_to_the_source_codec() {
        let codecs = EdgeCodecs {
            source: Codec::Raw,
            tasks: Arc::from(vec![Codec::Json, Codec::Postcard]),
        };
        assert_eq!(codecs.of(1), Codec::Postcard);
        assert_eq!(codecs.of(NO_TASK), Codec::Raw);
    }
}
