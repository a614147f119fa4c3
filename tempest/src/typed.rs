//! Typed tasks: a [`TypedTask`] reads and writes Rust values; an adapter
//! makes it a [`Task`] that decodes its input with the codec of the
//! message's producer and encodes its outputs with its own output codec
//! (see [`codec`](crate::codec)).
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use tempest::{MsgCtx, Pipeline, TaskError, Typed, TypedOut, TypedTask};
//!
//! #[derive(Deserialize)]
//! struct Line { text: String }
//!
//! #[derive(Serialize, Deserialize)]
//! struct Word { word: String }
//!
//! #[derive(Clone)]
//! struct Split;
//! impl TypedTask for Split {
//!     type In = Line;
//!     type Out = Word;
//!     fn name(&self) -> &str { "split" }
//!     fn handle(&mut self, line: Line, _: &MsgCtx) -> Result<Typed<Word>, TaskError> {
//!         // Each word keyed by itself, so a keyed sink can group them.
//!         Ok(line
//!             .text
//!             .split_whitespace()
//!             .map(|w| TypedOut::new(Word { word: w.to_string() }).key(w.to_string()))
//!             .collect::<Vec<_>>()
//!             .into())
//!     }
//! }
//!
//! let dag = Pipeline::new().typed(Split).build().unwrap();
//! assert_eq!(dag.root_name(), "split");
//! ```

use std::fmt;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tempest_source::{HeaderError, Headers};

use crate::codec::{Codec, CodecError, TaskCodecs};
use crate::msg::MsgCtx;
use crate::task::{decode_failed, Msg, Out, Output, Task, TaskContext, TaskError, TaskResult};

/// What [`TypedTask::handle`] returns.
pub type TypedResult<T> = Result<Typed<T>, TaskError>;

/// A task over Rust types: its input is decoded, its outputs encoded, with
/// the codecs the pipeline sets for each edge (JSON unless told otherwise).
/// Register it with [`Pipeline::typed`](crate::Pipeline::typed).
///
/// A payload that does not decode fails its message like any task error
/// (through the failure policy), with an error that names the task, the
/// message, the codec and its reason, and the payload's first bytes.
///
/// Like a [`Task`], each worker owns its own instance.
pub trait TypedTask: Send + 'static {
    /// The input type.
    type In: DeserializeOwned + 'static;
    /// The output type.
    type Out: Serialize + 'static;

    /// The task's name, unique within its pipeline.
    fn name(&self) -> &str;

    /// Called once per worker before its first message.
    fn started(&mut self, _ctx: &TaskContext) {}

    /// Handles one decoded message. `ctx` says where it comes from and
    /// carries its key and headers, which the outputs inherit unless a
    /// [`TypedOut`] sets others.
    fn handle(&mut self, input: Self::In, ctx: &MsgCtx) -> TypedResult<Self::Out>;

    /// Called once per worker when it stops.
    fn shutdown(&mut self) {}

    /// Called after each batch of messages, and when the worker is idle.
    fn flush_metrics(&mut self) {}

    /// Periodic work, as [`Task::tick`]: its values are encoded with the
    /// task's output codec, each a new root.
    fn tick(&mut self) -> TypedResult<Self::Out> {
        Ok(Typed::None)
    }
}

/// The outputs of one [`TypedTask::handle`] call, as values; the mirror of
/// [`Output`]. One value converts into it (`Ok(value.into())`), as do a
/// `Vec`, an `Option` and [`TypedOut`]s.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Typed<T> {
    /// No output.
    #[default]
    None,
    /// One output.
    One(T),
    /// Any number of outputs.
    Many(Vec<T>),
    /// Outputs that set their own key or headers.
    Outs(Vec<TypedOut<T>>),
}

impl<T> Typed<T> {
    /// How many outputs there are.
    pub fn len(&self) -> usize {
        match self {
            Typed::None => 0,
            Typed::One(_) => 1,
            Typed::Many(v) => v.len(),
            Typed::Outs(v) => v.len(),
        }
    }

    /// Whether there is no output.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T: Serialize> Typed<T> {
    /// The outputs encoded with `codec`, or the first value that would not
    /// encode.
    pub fn encode(self, codec: Codec) -> Result<Output, CodecError> {
        Ok(match self {
            Typed::None => Output::None,
            Typed::One(v) => Output::One(codec.encode(&v)?),
            Typed::Many(v) => Output::Many(
                v.iter()
                    .map(|v| codec.encode(v))
                    .collect::<Result<_, _>>()?,
            ),
            Typed::Outs(v) => Output::Outs(
                v.into_iter()
                    .map(|o| Ok(o.meta.with_payload(codec.encode(&o.value)?)))
                    .collect::<Result<_, _>>()?,
            ),
        })
    }
}

impl<T> From<T> for Typed<T> {
    fn from(value: T) -> Self {
        Typed::One(value)
    }
}

impl<T> From<Vec<T>> for Typed<T> {
    fn from(values: Vec<T>) -> Self {
        Typed::Many(values)
    }
}

impl<T> From<Option<T>> for Typed<T> {
    fn from(value: Option<T>) -> Self {
        value.map_or(Typed::None, Typed::One)
    }
}

impl<T> From<TypedOut<T>> for Typed<T> {
    fn from(out: TypedOut<T>) -> Self {
        Typed::Outs(vec![out])
    }
}

impl<T> From<Vec<TypedOut<T>>> for Typed<T> {
    fn from(outs: Vec<TypedOut<T>>) -> Self {
        Typed::Outs(outs)
    }
}

/// One typed output that sets its own key or headers, like [`Out`]; the
/// rest it inherits from the message it came from.
#[derive(Clone, Debug)]
pub struct TypedOut<T> {
    value: T,
    /// The key and headers to set, on an empty payload.
    meta: Out,
}

impl<T: PartialEq> PartialEq for TypedOut<T> {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value && self.meta == other.meta
    }
}

impl<T> TypedOut<T> {
    /// An output of `value`, inheriting key and headers.
    pub fn new(value: T) -> Self {
        TypedOut {
            value,
            meta: Out::new(Bytes::new()),
        }
    }

    /// The value.
    pub fn value(&self) -> &T {
        &self.value
    }

    /// The output with this key.
    pub fn key(mut self, key: impl Into<Bytes>) -> Self {
        self.meta = self.meta.key(key);
        self
    }

    /// The output without a key.
    pub fn no_key(mut self) -> Self {
        self.meta = self.meta.no_key();
        self
    }

    /// The output with header `name` set to `value`, over the headers it
    /// inherits.
    pub fn header(
        mut self,
        name: impl Into<String>,
        value: impl Into<Bytes>,
    ) -> Result<Self, HeaderError> {
        self.meta = self.meta.header(name, value)?;
        Ok(self)
    }

    /// The output with exactly these headers (none inherited).
    pub fn headers(mut self, headers: Headers) -> Self {
        self.meta = self.meta.headers(headers);
        self
    }
}

/// A [`TypedTask`] as a [`Task`]: decodes, calls, encodes.
pub(crate) struct TypedAdapter<T> {
    task: T,
    /// Until `started`: JSON everywhere. (A join's parts each name their
    /// parent: `codecs.inputs.of(parent)` is the codec of each.)
    codecs: TaskCodecs,
}

impl<T> TypedAdapter<T> {
    pub(crate) fn new(task: T) -> Self {
        TypedAdapter {
            task,
            codecs: TaskCodecs::default(),
        }
    }
}

impl<T> fmt::Debug for TypedAdapter<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TypedAdapter")
            .field("task", &std::any::type_name::<T>())
            .field("codecs", &self.codecs)
            .finish()
    }
}

impl<T: TypedTask> Task for TypedAdapter<T> {
    fn name(&self) -> &str {
        self.task.name()
    }

    fn started(&mut self, ctx: &TaskContext) {
        self.codecs = ctx.codecs.clone();
        self.task.started(ctx);
    }

    fn handle(&mut self, msg: Msg, ctx: &MsgCtx) -> TaskResult {
        let codec = self.codecs.inputs.of(ctx.parent.task);
        let input: T::In = codec
            .decode(&msg)
            .map_err(|e| decode_failed::<T::In>(self.task.name(), ctx, &e, &msg))?;
        self.task
            .handle(input, ctx)?
            .encode(self.codecs.output)
            .map_err(|e| {
                TaskError::msg(format!(
                    "task \"{}\": message {}: {e} (a {})",
                    self.task.name(),
                    ctx.id(),
                    std::any::type_name::<T::Out>()
                ))
            })
    }

    fn shutdown(&mut self) {
        self.task.shutdown();
    }

    fn flush_metrics(&mut self) {
        self.task.flush_metrics();
    }

    fn tick(&mut self) -> TaskResult {
        self.task.tick()?.encode(self.codecs.output).map_err(|e| {
            TaskError::msg(format!(
                "task \"{}\": a tick: {e} (a {})",
                self.task.name(),
                std::any::type_name::<T::Out>()
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Arc;

    use serde::Deserialize;

    use crate::codec::EdgeCodecs;
    use crate::msg::Emitted;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Line {
        text: String,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Word {
        word: String,
        n: u32,
    }

    #[derive(Clone)]
    struct Split;
    impl TypedTask for Split {
        type In = Line;
        type Out = Word;
        fn name(&self) -> &str {
            "split"
        }
        fn handle(&mut self, line: Line, _: &MsgCtx) -> TypedResult<Word> {
            match line.text.as_str() {
                "" => Ok(Typed::None),
                "one" => Ok(Word {
                    word: "one".into(),
                    n: 1,
                }
                .into()),
                "fail" => Err(TaskError::msg("no")),
                text => Ok(text
                    .split(' ')
                    .map(|w| {
                        TypedOut::new(Word {
                            word: w.into(),
                            n: 1,
                        })
                        .key(w.to_string())
                    })
                    .collect::<Vec<_>>()
                    .into()),
            }
        }
    }

    fn adapter(input: Codec, output: Codec) -> TypedAdapter<Split> {
        let mut a = TypedAdapter::new(Split);
        a.codecs = TaskCodecs {
            inputs: EdgeCodecs {
                source: input,
                tasks: Arc::from(vec![]),
            },
            output,
        };
        a
    }

    fn emitted(out: Output, ctx: &MsgCtx) -> Vec<Emitted> {
        let mut v = Vec::new();
        out.drain_into(ctx, &mut v).unwrap();
        v
    }

    #[test]
    fn the_adapter_decodes_calls_and_encodes() {
        let ctx = MsgCtx::new(1).with_key("line");
        for (input, output) in [
            (Codec::Json, Codec::Postcard),
            (Codec::Postcard, Codec::Json),
        ] {
            let mut a = adapter(input, output);
            let line = input.encode(&Line { text: "a b".into() }).unwrap();
            let out = emitted(a.handle(line, &ctx).unwrap(), &ctx);
            assert_eq!(out.len(), 2);
            assert_eq!(
                output.decode::<Word>(&out[1].payload).unwrap(),
                Word {
                    word: "b".into(),
                    n: 1
                }
            );
            assert_eq!(
                out[1].key().map(|k| &k[..]),
                Some(&b"b"[..]),
                "set per output"
            );

            let one = input.encode(&Line { text: "one".into() }).unwrap();
            let out = emitted(a.handle(one, &ctx).unwrap(), &ctx);
            assert_eq!(out.len(), 1);
            assert_eq!(
                out[0].key().map(|k| &k[..]),
                Some(&b"line"[..]),
                "inherited"
            );

            let none = input.encode(&Line { text: "".into() }).unwrap();
            assert!(a.handle(none, &ctx).unwrap().is_empty());
            let fail = input
                .encode(&Line {
                    text: "fail".into(),
                })
                .unwrap();
            assert_eq!(a.handle(fail, &ctx).unwrap_err().message(), "no");
        }
    }

    #[test]
    fn a_payload_that_does_not_decode_is_named_with_its_first_bytes() {
        let mut a = adapter(Codec::Json, Codec::Json);
        let payload = Bytes::from(format!("{{\"txt\": \"{}\"}}", "x".repeat(40)));
        let err = a.handle(payload, &MsgCtx::new(42)).unwrap_err();
        assert_eq!(
            err.message(),
            format!(
                "task \"split\": message 42: cannot decode JSON from the source as {}: \
                 missing field `text` at line 1 column 51; payload (51 bytes) starts \
                 b\"{{\\\"txt\\\": \\\"{}\"…",
                std::any::type_name::<Line>(),
                "x".repeat(23)
            )
        );

        let mut a = adapter(Codec::Postcard, Codec::Json);
        let err = a
            .handle(Bytes::from_static(&[0x09, 0xff]), &MsgCtx::new("m-7"))
            .unwrap_err();
        let text = err.message();
        assert!(
            text.starts_with(
                "task \"split\": message m-7: cannot decode postcard from the source as "
            ),
            "{text}"
        );
        assert!(
            text.ends_with("; payload (2 bytes) starts b\"\\t\\xff\""),
            "{text}"
        );
    }

    #[test]
    fn an_output_that_does_not_encode_fails_its_message() {
        // JSON maps need string keys.
        type Pairs = std::collections::BTreeMap<(u8, u8), u8>;
        struct Pairing;
        impl TypedTask for Pairing {
            type In = u8;
            type Out = Pairs;
            fn name(&self) -> &str {
                "pairing"
            }
            fn handle(&mut self, n: u8, _: &MsgCtx) -> TypedResult<Pairs> {
                Ok(Pairs::from([((n, n), n)]).into())
            }
        }
        let mut a = TypedAdapter::new(Pairing);
        let err = a
            .handle(Bytes::from_static(b"3"), &MsgCtx::new(5))
            .unwrap_err();
        assert_eq!(
            err.message(),
            format!(
                "task \"pairing\": message 5: cannot encode JSON: key must be a string (a {})",
                std::any::type_name::<Pairs>()
            )
        );
        a.codecs.output = Codec::Postcard;
        let out = a.handle(Bytes::from_static(b"3"), &MsgCtx::new(5)).unwrap();
        assert_eq!(out.len(), 1, "postcard encodes any key");
    }

    #[test]
    fn typed_outputs_convert() {
        // Where the output type is known (a `handle`'s return), `.into()`
        // picks the conversion; `Typed::<T>::from` says it here.
        assert_eq!(Typed::<i32>::from(1).len(), 1);
        assert_eq!(Typed::<i32>::from(vec![1, 2]).len(), 2);
        assert!(Typed::<u8>::from(None).is_empty());
        assert_eq!(Typed::<i32>::from(TypedOut::new(1).no_key()).len(), 1);
        struct NotDefault;
        assert!(Typed::<NotDefault>::default().is_empty());
        let many: Typed<Vec<u8>> = vec![1u8, 2].into();
        assert_eq!(
            many,
            Typed::One(vec![1, 2]),
            "a Vec output type stays one value"
        );
        let out = Typed::<u8>::from(vec![TypedOut::new(7u8).header("h", "v").unwrap()])
            .encode(Codec::Json)
            .unwrap();
        let e = emitted(out, &MsgCtx::new(1));
        assert_eq!(&e[0].payload[..], b"7");
        assert_eq!(e[0].headers().get_str("h"), Some("v"));
    }
}
