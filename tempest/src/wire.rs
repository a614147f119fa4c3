//! The wire protocol between a topology process and its task workers.
//!
//! # Framing
//!
//! ```text
//! +----------------+---------+----------------------+
//! | length: u32 BE | tag: u8 | fields (by tag)      |
//! +----------------+---------+----------------------+
//!   length counts the tag and the fields
//! ```
//!
//! Frames are split by tokio-util's `LengthDelimitedCodec`, which checks the
//! length against a maximum *before* buffering the frame: [`HANDSHAKE_MAX`]
//! until the handshake completes, then the configured `max_frame` (default
//! [`DEFAULT_MAX_FRAME`]). Integers are big-endian; a string is a `u16`
//! length and UTF-8 bytes; bytes are a `u32` length and the bytes. Payloads
//! are sliced out of the received frame without a copy.
//!
//! # Conversation
//!
//! ```text
//! worker                                  topology
//!   Hello {magic "TMPS", version, task} ──►
//!                                      ◄── Challenge {nonce}      (or Error, close)
//!   Auth {HMAC-SHA256(secret, nonce ‖ task)} ──►
//!                                      ◄── Welcome {worker, heartbeat_ms, max_frame}  (or Error, close)
//!   Fetch {max} ──►                    ◄── Batch [(ticket, payload, context)…]  (when work is ready)
//!   Results {complete, verdicts, outputs (payload, key, headers)} ──►
//!                                      ◄── GiveBack    (a peer of the task is idle)
//!   Returned [(ticket, payload, context)…] ──►  (per batch held: what the task thread has
//!                                       not claimed; the batch's Results still end it)
//!   Ticks [(payload, key, headers)…] ──►  (a tick's outputs: new roots)
//!   Heartbeat ◄──► Heartbeat           (each way, when idle)
//!   Goodbye ──►                        (clean disconnect)
//! ```
//!
//! A worker keeps up to two fetches outstanding; the topology answers a
//! fetch as soon as its task has messages (a long poll). When a worker's
//! batch runs long while another worker of its task is idle, the topology
//! asks it to give back what it has not started: the worker answers with
//! `Returned` frames naming exactly those messages, so nothing runs twice.
//!
//! # Tickets
//!
//! A ticket is 14 bytes: the record's slot (`u32`), its generation (`u32`),
//! the task (`u16`) and the copy (`u32`). The topology stamps the copy
//! when it sends a message in a `Batch`, unique among the messages that
//! worker holds, so that siblings of a fan-out (one slot, generation and
//! task, different payloads) are told apart; a worker echoes every ticket
//! unchanged in `Results` and `Returned`. Version 5 added the copy.
//!
//! # A task message's context
//!
//! Each task message carries its context: the source message's id (a kind
//! byte, then a `u64` or bytes), attempt, delivery count and timestamp, the
//! parent task's index (`u16::MAX` for the source or a join), the time left
//! until its deadline in milliseconds (`u32::MAX`: none; relative, so the
//! hosts' clocks need not agree), and its meta: a flags byte, the key if
//! flagged, the headers if flagged. Each output carries its payload and
//! meta the same way. Version 3 of the protocol added the context.
//!
//! # Results
//!
//! `Results` carry one verdict per message: a tag byte (0 done, with a
//! `u32` output count; 1 filtered; 2 error and 3 panicked, each with a
//! string; 4 timed out: an async task's call passed the message's deadline
//! and was cancelled) after the message's ticket. A worker answers the
//! messages it holds in any order (an async task's calls finish out of
//! order), several batches' answers may share a frame, and `complete`
//! ends the worker's oldest unfinished batch: it is sent once every
//! message of that batch is answered or returned, batches ending in the
//! order they came. The topology tracks what a worker holds by exact
//! ticket (copy included), not per position: an answer or a returned
//! message names the very message it is for, and one for a ticket the
//! worker does not hold is ignored (counted stale). Version 4 added the
//! timed-out verdict and answers out of order.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tempest_source::{Headers, MsgId};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use crate::msg::{
    to_nanos, Emitted, Meta, MsgCtx, Origin, Parent, TaskMsg, Ticket, Verdict, NO_NAME,
};

/// The first bytes of a worker's first frame.
pub const MAGIC: [u8; 4] = *b"TMPS";
/// The protocol version this build speaks.
pub const VERSION: u16 = 6;
/// The frame limit until the handshake completes.
pub const HANDSHAKE_MAX: usize = crate::msg::MIN_FRAME_LIMIT;
/// The default frame limit after the handshake.
pub const DEFAULT_MAX_FRAME: usize = 8 * 1024 * 1024;
/// Bytes in a challenge nonce and in a MAC.
pub const NONCE_LEN: usize = 32;

const HELLO: u8 = 1;
const CHALLENGE: u8 = 2;
const AUTH: u8 = 3;
const WELCOME: u8 = 4;
const FETCH: u8 = 5;
const BATCH: u8 = 6;
const RESULTS: u8 = 7;
const HEARTBEAT: u8 = 8;
const GOODBYE: u8 = 9;
const ERROR: u8 = 10;
const GIVE_BACK: u8 = 11;
const RETURNED: u8 = 12;
const TICKS: u8 = 13;

const V_DONE: u8 = 0;
const V_FILTERED: u8 = 1;
const V_ERROR: u8 = 2;
const V_PANICKED: u8 = 3;
const V_TIMED_OUT: u8 = 4;

/// Why the topology refused or dropped a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// The first frame was not a Hello with the right magic.
    NotTempest,
    /// The worker speaks another protocol version.
    Version,
    /// The topology has no task of that name.
    UnknownTask,
    /// The secret is wrong.
    Auth,
    /// A frame could not be decoded or came out of turn.
    Protocol,
    /// The topology is shutting down.
    ShuttingDown,
}

impl ErrorCode {
    fn to_u8(self) -> u8 {
        match self {
            ErrorCode::NotTempest => 1,
            ErrorCode::Version => 2,
            ErrorCode::UnknownTask => 3,
            ErrorCode::Auth => 4,
            ErrorCode::Protocol => 5,
            ErrorCode::ShuttingDown => 6,
        }
    }

    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => ErrorCode::NotTempest,
            2 => ErrorCode::Version,
            3 => ErrorCode::UnknownTask,
            4 => ErrorCode::Auth,
            5 => ErrorCode::Protocol,
            6 => ErrorCode::ShuttingDown,
            _ => return None,
        })
    }

    /// Whether reconnecting can help (a restart of the topology, say).
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorCode::ShuttingDown | ErrorCode::Protocol)
    }
}

/// One frame of the protocol.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    /// Worker → topology, first: who it is.
    Hello {
        /// [`VERSION`] of the worker.
        version: u16,
        /// The task it runs.
        task: String,
    },
    /// Topology → worker: prove you know the secret.
    Challenge {
        /// Random bytes to sign.
        nonce: [u8; NONCE_LEN],
    },
    /// Worker → topology: HMAC-SHA256(secret, nonce ‖ task).
    Auth {
        /// The MAC.
        mac: [u8; NONCE_LEN],
    },
    /// Topology → worker: accepted.
    Welcome {
        /// The worker's id in the topology.
        worker: u32,
        /// How often each side sends a heartbeat when idle.
        heartbeat_ms: u32,
        /// The frame limit from now on, both ways.
        max_frame: u32,
    },
    /// Worker → topology: send up to `max` task messages; `max == 0`
    /// withdraws the worker's outstanding fetches (it is draining).
    Fetch {
        /// The most messages wanted.
        max: u32,
    },
    /// Topology → worker: task messages to handle. Shared: the topology
    /// keeps the same batch until the worker has answered it.
    Batch(Arc<Vec<TaskMsg>>),
    /// Worker → topology: what became of some of the messages it holds
    /// (in any order), and whether its oldest batch is finished.
    Results {
        /// Whether this ends the oldest batch the worker holds.
        complete: bool,
        /// One verdict per message answered.
        items: Vec<(Ticket, Verdict)>,
        /// The outputs of `Done` verdicts, in order.
        outputs: Vec<Emitted>,
    },
    /// Topology → worker: give back the messages you hold and have not
    /// started (another worker of the task is idle).
    GiveBack,
    /// Worker → topology: these messages of one batch it holds will not
    /// run here (the task thread had not claimed them); the batch itself
    /// still ends with its `Results`. Laid out like `Batch`.
    Returned(Vec<TaskMsg>),
    /// Worker → topology: the outputs of a tick of the worker's task,
    /// each a new root.
    Ticks(Vec<Emitted>),
    /// Either way: still here.
    Heartbeat,
    /// Worker → topology: leaving cleanly.
    Goodbye,
    /// Topology → worker: refused or dropped, and why.
    Error {
        /// What kind of problem.
        code: ErrorCode,
        /// A sentence for the worker's log.
        message: String,
    },
}

/// A frame that does not decode.
#[derive(Debug, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed frame: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

fn err<T>(what: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError(what.into()))
}

fn need(buf: &Bytes, n: usize, what: &str) -> Result<(), DecodeError> {
    if buf.remaining() < n {
        err(format!(
            "{what}: {n} bytes needed, {} left",
            buf.remaining()
        ))
    } else {
        Ok(())
    }
}

fn get_u8(buf: &mut Bytes, what: &str) -> Result<u8, DecodeError> {
    need(buf, 1, what)?;
    Ok(buf.get_u8())
}

fn get_u16(buf: &mut Bytes, what: &str) -> Result<u16, DecodeError> {
    need(buf, 2, what)?;
    Ok(buf.get_u16())
}

fn get_u32(buf: &mut Bytes, what: &str) -> Result<u32, DecodeError> {
    need(buf, 4, what)?;
    Ok(buf.get_u32())
}

fn get_str(buf: &mut Bytes, what: &str) -> Result<String, DecodeError> {
    let len = get_u16(buf, what)? as usize;
    need(buf, len, what)?;
    let raw = buf.split_to(len);
    String::from_utf8(raw.to_vec()).or_else(|_| err(format!("{what} is not UTF-8")))
}

fn get_bytes(buf: &mut Bytes, what: &str) -> Result<Bytes, DecodeError> {
    let len = get_u32(buf, what)? as usize;
    need(buf, len, what)?;
    Ok(buf.split_to(len))
}

fn get_array(buf: &mut Bytes, what: &str) -> Result<[u8; NONCE_LEN], DecodeError> {
    need(buf, NONCE_LEN, what)?;
    let mut out = [0u8; NONCE_LEN];
    buf.copy_to_slice(&mut out);
    Ok(out)
}

/// The bytes a ticket takes: slot, generation, task, copy.
const TICKET_LEN: usize = 4 + 4 + 2 + 4;

fn get_ticket(buf: &mut Bytes) -> Result<Ticket, DecodeError> {
    need(buf, TICKET_LEN, "ticket")?;
    Ok(Ticket {
        slot: buf.get_u32(),
        gen: buf.get_u32(),
        task: buf.get_u16(),
        copy: buf.get_u32(),
    })
}

/// A count of items at least `min_size` bytes each: refused if the frame
/// cannot hold that many, so a forged count never allocates.
fn get_count(buf: &mut Bytes, min_size: usize, what: &str) -> Result<usize, DecodeError> {
    let n = get_u32(buf, what)? as usize;
    if n.saturating_mul(min_size) > buf.remaining() {
        return err(format!(
            "{what}: {n} items cannot fit in {} bytes",
            buf.remaining()
        ));
    }
    Ok(n)
}

fn put_str(dst: &mut BytesMut, s: &str) {
    let s = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    dst.put_u16(s.len() as u16);
    dst.put_slice(s);
}

fn put_bytes(dst: &mut BytesMut, b: &[u8]) {
    dst.put_u32(b.len() as u32);
    dst.put_slice(b);
}

fn put_ticket(dst: &mut BytesMut, t: &Ticket) {
    dst.put_u32(t.slot);
    dst.put_u32(t.gen);
    dst.put_u16(t.task);
    dst.put_u32(t.copy);
}

/// The fewest bytes a task message takes: ticket, payload length, an id
/// (its kind and an empty byte string), attempt, deliveries, timestamp,
/// parent, deadline, meta flags.
const MIN_TASK_MSG: usize = TICKET_LEN + 4 + 5 + 4 + 4 + 8 + 2 + 4 + 1;
/// The fewest bytes a verdict takes in a `Results` frame: the ticket and
/// the verdict's tag.
pub(crate) const MIN_RESULT_ITEM: usize = TICKET_LEN + 1;
/// The fewest bytes an output takes: payload length, meta flags.
const MIN_OUTPUT: usize = 4 + 1;
/// A deadline of "none" on the wire.
const NO_DEADLINE: u32 = u32::MAX;

const META_KEY: u8 = 1;
const META_HEADERS: u8 = 2;

/// Key and headers: a flags byte, then the key (bytes) if flagged, then
/// the headers if flagged (a count byte; each a name of up to 255 bytes
/// behind a `u8` length, a value behind a `u16` length).
fn put_meta(dst: &mut BytesMut, key: Option<&Bytes>, headers: &Headers) {
    let flags = if key.is_some() { META_KEY } else { 0 }
        | if headers.is_empty() { 0 } else { META_HEADERS };
    dst.put_u8(flags);
    if let Some(k) = key {
        put_bytes(dst, k);
    }
    if !headers.is_empty() {
        // `Headers` keeps these within the limits the lengths can carry.
        dst.put_u8(headers.len() as u8);
        for (name, value) in headers.iter() {
            dst.put_u8(name.len() as u8);
            dst.put_slice(name.as_bytes());
            dst.put_u16(value.len() as u16);
            dst.put_slice(value);
        }
    }
}

fn get_meta(buf: &mut Bytes) -> Result<(Option<Bytes>, Headers), DecodeError> {
    let flags = get_u8(buf, "meta flags")?;
    if flags & !(META_KEY | META_HEADERS) != 0 {
        return err(format!("meta flags {flags:#x}"));
    }
    let key = if flags & META_KEY != 0 {
        Some(get_bytes(buf, "key")?)
    } else {
        None
    };
    let mut headers = Headers::new();
    if flags & META_HEADERS != 0 {
        let n = get_u8(buf, "header count")?;
        for _ in 0..n {
            let len = get_u8(buf, "header name")? as usize;
            need(buf, len, "header name")?;
            let name = String::from_utf8(buf.split_to(len).to_vec())
                .or_else(|_| err("a header name is not UTF-8"))?;
            let len = get_u16(buf, "header value")? as usize;
            need(buf, len, "header value")?;
            let value = buf.split_to(len);
            headers
                .insert(name, value)
                .or_else(|e| err(format!("header: {e}")))?;
        }
    }
    Ok((key, headers))
}

fn put_id(dst: &mut BytesMut, id: &MsgId) {
    match id {
        MsgId::Int(n) => {
            dst.put_u8(0);
            dst.put_u64(*n);
        }
        MsgId::Bytes(b) => {
            dst.put_u8(1);
            put_bytes(dst, b);
        }
    }
}

fn get_id(buf: &mut Bytes) -> Result<MsgId, DecodeError> {
    match get_u8(buf, "id kind")? {
        0 => {
            need(buf, 8, "id")?;
            Ok(MsgId::Int(buf.get_u64()))
        }
        1 => Ok(MsgId::Bytes(get_bytes(buf, "id")?)),
        k => err(format!("id kind {k}")),
    }
}

fn meta_len(key: Option<&Bytes>, headers: &Headers) -> usize {
    1 + key.map_or(0, |k| 4 + k.len())
        + if headers.is_empty() {
            0
        } else {
            1 + headers
                .iter()
                .map(|(n, v)| 1 + n.len() + 2 + v.len())
                .sum::<usize>()
        }
}

/// The bytes a task message takes in a `Batch` or `Returned` frame.
pub(crate) fn task_msg_len(m: &TaskMsg) -> usize {
    // Beyond the shortest id: an integer's 8 bytes replace the length's 4.
    let id = match &m.ctx.id {
        MsgId::Int(_) => 4,
        MsgId::Bytes(b) => b.len(),
    };
    MIN_TASK_MSG - 1 + id + m.payload.len() + meta_len(m.ctx.key(), m.ctx.headers())
}

/// The bytes an output takes in a `Results` frame.
/// A count, then each output's payload and meta.
fn put_outputs(dst: &mut BytesMut, outputs: &[Emitted]) {
    dst.put_u32(outputs.len() as u32);
    for o in outputs {
        put_bytes(dst, &o.payload);
        put_meta(dst, o.key(), o.headers());
    }
}

/// What [`put_outputs`] wrote.
fn get_outputs(buf: &mut Bytes) -> Result<Vec<Emitted>, DecodeError> {
    let n = get_count(buf, MIN_OUTPUT, "outputs")?;
    let mut outputs = Vec::with_capacity(n);
    for _ in 0..n {
        let payload = get_bytes(buf, "output")?;
        let (key, headers) = get_meta(buf)?;
        outputs.push(Emitted::new(payload, key, headers));
    }
    Ok(outputs)
}

pub(crate) fn output_len(o: &Emitted) -> usize {
    4 + o.payload.len() + meta_len(o.key(), o.headers())
}

fn put_msgs(dst: &mut BytesMut, tag: u8, msgs: &[TaskMsg]) {
    dst.reserve(5 + msgs.iter().map(task_msg_len).sum::<usize>());
    dst.put_u8(tag);
    dst.put_u32(msgs.len() as u32);
    let now = Instant::now();
    for m in msgs {
        put_ticket(dst, &m.ticket);
        put_bytes(dst, &m.payload);
        let c = &m.ctx;
        put_id(dst, &c.id);
        dst.put_u32(c.origin.attempt);
        dst.put_u32(c.origin.delivered);
        dst.put_u64(c.origin.timestamp);
        dst.put_u16(c.parent.task);
        // The deadline travels as the time left, so the two hosts' clocks
        // need not agree.
        let left = c.deadline().map_or(NO_DEADLINE, |d| {
            d.saturating_duration_since(now)
                .as_millis()
                .min(u128::from(NO_DEADLINE - 1)) as u32
        });
        dst.put_u32(left);
        put_meta(dst, c.key(), c.headers());
    }
}

/// Decodes task messages. Their contexts name their parent by index only:
/// the receiver fills in the names from its own pipeline
/// ([`Dag::name_parents`](crate::Dag)).
fn get_msgs(buf: &mut Bytes, what: &str) -> Result<Vec<TaskMsg>, DecodeError> {
    let n = get_count(buf, MIN_TASK_MSG, what)?;
    let mut msgs = Vec::with_capacity(n);
    let now = Instant::now();
    for _ in 0..n {
        let ticket = get_ticket(buf)?;
        let payload = get_bytes(buf, "payload")?;
        let id = get_id(buf)?;
        need(buf, 4 + 4 + 8 + 2 + 4, "context")?;
        let attempt = buf.get_u32();
        let delivered = buf.get_u32();
        let timestamp = buf.get_u64();
        let parent = buf.get_u16();
        let left = buf.get_u32();
        let (key, headers) = get_meta(buf)?;
        msgs.push(TaskMsg {
            ticket,
            payload,
            ctx: MsgCtx {
                id,
                origin: Origin {
                    attempt,
                    delivered,
                    timestamp,
                    deadline: if left == NO_DEADLINE {
                        0
                    } else {
                        to_nanos(now + Duration::from_millis(u64::from(left)))
                    },
                },
                parent: Parent {
                    task: parent,
                    name: NO_NAME,
                },
                meta: Meta::new(key, headers),
            },
        });
    }
    Ok(msgs)
}

impl Frame {
    /// A `Batch` frame of `msgs`.
    pub fn batch(msgs: Vec<TaskMsg>) -> Frame {
        Frame::Batch(Arc::new(msgs))
    }

    /// Appends the frame's body (tag and fields, no length) to `dst`.
    pub fn encode_body(&self, dst: &mut BytesMut) {
        match self {
            Frame::Hello { version, task } => {
                dst.put_u8(HELLO);
                dst.put_slice(&MAGIC);
                dst.put_u16(*version);
                put_str(dst, task);
            }
            Frame::Challenge { nonce } => {
                dst.put_u8(CHALLENGE);
                dst.put_slice(nonce);
            }
            Frame::Auth { mac } => {
                dst.put_u8(AUTH);
                dst.put_slice(mac);
            }
            Frame::Welcome {
                worker,
                heartbeat_ms,
                max_frame,
            } => {
                dst.put_u8(WELCOME);
                dst.put_u32(*worker);
                dst.put_u32(*heartbeat_ms);
                dst.put_u32(*max_frame);
            }
            Frame::Fetch { max } => {
                dst.put_u8(FETCH);
                dst.put_u32(*max);
            }
            Frame::Batch(msgs) => put_msgs(dst, BATCH, msgs),
            Frame::Returned(msgs) => put_msgs(dst, RETURNED, msgs),
            Frame::GiveBack => dst.put_u8(GIVE_BACK),
            Frame::Results {
                complete,
                items,
                outputs,
            } => {
                dst.reserve(
                    10 + items.len() * (MIN_RESULT_ITEM + 4)
                        + outputs.iter().map(output_len).sum::<usize>(),
                );
                dst.put_u8(RESULTS);
                dst.put_u8(u8::from(*complete));
                dst.put_u32(items.len() as u32);
                for (ticket, verdict) in items {
                    put_ticket(dst, ticket);
                    match verdict {
                        Verdict::Done(n) => {
                            dst.put_u8(V_DONE);
                            dst.put_u32(*n);
                        }
                        Verdict::Filtered => dst.put_u8(V_FILTERED),
                        Verdict::Error(m) => {
                            dst.put_u8(V_ERROR);
                            put_str(dst, m);
                        }
                        Verdict::Panicked(m) => {
                            dst.put_u8(V_PANICKED);
                            put_str(dst, m);
                        }
                        Verdict::TimedOut => dst.put_u8(V_TIMED_OUT),
                    }
                }
                put_outputs(dst, outputs);
            }
            Frame::Ticks(outputs) => {
                dst.reserve(5 + outputs.iter().map(output_len).sum::<usize>());
                dst.put_u8(TICKS);
                put_outputs(dst, outputs);
            }
            Frame::Heartbeat => dst.put_u8(HEARTBEAT),
            Frame::Goodbye => dst.put_u8(GOODBYE),
            Frame::Error { code, message } => {
                dst.put_u8(ERROR);
                dst.put_u8(code.to_u8());
                put_str(dst, message);
            }
        }
    }

    /// The frame as it goes on the wire: length and body.
    pub fn to_wire(&self) -> Bytes {
        let mut buf = BytesMut::new();
        buf.put_u32(0);
        self.encode_body(&mut buf);
        let len = (buf.len() - 4) as u32;
        buf[..4].copy_from_slice(&len.to_be_bytes());
        buf.freeze()
    }

    /// Decodes a frame body. Never panics; payloads share `body`'s memory.
    pub fn decode_body(mut body: Bytes) -> Result<Frame, DecodeError> {
        let buf = &mut body;
        let frame = match get_u8(buf, "tag")? {
            HELLO => {
                need(buf, 4, "magic")?;
                if buf.split_to(4)[..] != MAGIC {
                    return err("bad magic: not a Tempest worker");
                }
                Frame::Hello {
                    version: get_u16(buf, "version")?,
                    task: get_str(buf, "task name")?,
                }
            }
            CHALLENGE => Frame::Challenge {
                nonce: get_array(buf, "nonce")?,
            },
            AUTH => Frame::Auth {
                mac: get_array(buf, "mac")?,
            },
            WELCOME => Frame::Welcome {
                worker: get_u32(buf, "worker")?,
                heartbeat_ms: get_u32(buf, "heartbeat")?,
                max_frame: get_u32(buf, "max frame")?,
            },
            FETCH => Frame::Fetch {
                max: get_u32(buf, "max")?,
            },
            BATCH => Frame::Batch(Arc::new(get_msgs(buf, "batch")?)),
            RETURNED => Frame::Returned(get_msgs(buf, "returned")?),
            GIVE_BACK => Frame::GiveBack,
            RESULTS => {
                let complete = match get_u8(buf, "complete")? {
                    0 => false,
                    1 => true,
                    b => return err(format!("complete flag {b}")),
                };
                let n = get_count(buf, MIN_RESULT_ITEM, "results")?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    let ticket = get_ticket(buf)?;
                    let verdict = match get_u8(buf, "verdict")? {
                        V_DONE => Verdict::Done(get_u32(buf, "output count")?),
                        V_FILTERED => Verdict::Filtered,
                        V_ERROR => Verdict::Error(get_str(buf, "error")?),
                        V_PANICKED => Verdict::Panicked(get_str(buf, "panic")?),
                        V_TIMED_OUT => Verdict::TimedOut,
                        v => return err(format!("verdict {v}")),
                    };
                    items.push((ticket, verdict));
                }
                Frame::Results {
                    complete,
                    items,
                    outputs: get_outputs(buf)?,
                }
            }
            TICKS => Frame::Ticks(get_outputs(buf)?),
            HEARTBEAT => Frame::Heartbeat,
            GOODBYE => Frame::Goodbye,
            ERROR => {
                let code = get_u8(buf, "error code")?;
                Frame::Error {
                    code: ErrorCode::from_u8(code).unwrap_or(ErrorCode::Protocol),
                    message: get_str(buf, "error message")?,
                }
            }
            t => return err(format!("unknown tag {t}")),
        };
        if buf.has_remaining() {
            return err(format!("{} bytes after the frame", buf.remaining()));
        }
        Ok(frame)
    }
}

/// Frames a byte stream: `u32` big-endian lengths, a maximum checked before
/// buffering, [`Frame`] bodies.
#[derive(Debug)]
pub struct WireCodec {
    lengths: LengthDelimitedCodec,
    max: usize,
}

impl WireCodec {
    /// A codec with the handshake's tiny frame limit.
    pub fn handshake() -> Self {
        WireCodec::with_max(HANDSHAKE_MAX)
    }

    /// A codec refusing frames longer than `max` bytes.
    pub fn with_max(max: usize) -> Self {
        WireCodec {
            lengths: LengthDelimitedCodec::builder()
                .length_field_length(4)
                .max_frame_length(max)
                .new_codec(),
            max,
        }
    }

    /// Changes the frame limit (after the handshake).
    pub fn set_max(&mut self, max: usize) {
        self.lengths.set_max_frame_length(max);
        self.max = max;
    }
}

/// What can go wrong reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The connection failed, or a frame was longer than allowed.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// A frame did not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A frame to send is longer than allowed.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// The frame's length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

impl Decoder for WireCodec {
    type Item = Frame;
    type Error = WireError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        match self.lengths.decode(src)? {
            Some(body) => Ok(Some(Frame::decode_body(body.freeze())?)),
            None => Ok(None),
        }
    }
}

impl Encoder<Frame> for WireCodec {
    type Error = WireError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), WireError> {
        self.encode(&frame, dst)
    }
}

impl Encoder<&Frame> for WireCodec {
    type Error = WireError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), WireError> {
        let start = dst.len();
        dst.put_u32(0);
        frame.encode_body(dst);
        let len = dst.len() - start - 4;
        if len > self.max {
            dst.truncate(start);
            return Err(WireError::TooLong { len, max: self.max });
        }
        dst[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(())
    }
}

/// HMAC-SHA256(secret, nonce ‖ task).
pub fn sign(secret: &[u8], nonce: &[u8; NONCE_LEN], task: &str) -> [u8; NONCE_LEN] {
    let mut out = [0u8; NONCE_LEN];
    out.copy_from_slice(&mac(secret, nonce, task).finalize().into_bytes());
    out
}

/// Checks a worker's MAC in constant time.
pub fn verify(secret: &[u8], nonce: &[u8; NONCE_LEN], task: &str, given: &[u8; NONCE_LEN]) -> bool {
    mac(secret, nonce, task).verify_slice(given).is_ok()
}

fn mac(secret: &[u8], nonce: &[u8; NONCE_LEN], task: &str) -> Hmac<Sha256> {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(nonce);
    mac.update(task.as_bytes());
    mac
}

/// A fresh random nonce.
pub fn nonce() -> Result<[u8; NONCE_LEN], getrandom::Error> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::getrandom(&mut n)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(frame: &Frame) -> Frame {
        let mut codec = WireCodec::with_max(DEFAULT_MAX_FRAME);
        let mut buf = BytesMut::new();
        codec.encode(frame, &mut buf).unwrap();
        let out = codec.decode(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty());
        out
    }

    fn rich_ctx() -> MsgCtx {
        let mut headers = Headers::new();
        headers.insert("trace", "abc").unwrap();
        headers.insert("tenant", vec![0u8, 255]).unwrap();
        MsgCtx {
            id: MsgId::Bytes(Bytes::from_static(b"1700000000000-3")),
            origin: Origin {
                attempt: 2,
                delivered: 3,
                timestamp: 1_700_000_000_000,
                deadline: 0,
            },
            parent: Parent {
                task: 1,
                name: NO_NAME,
            },
            meta: Meta::new(Some(Bytes::from_static(b"alice")), headers),
        }
    }

    fn sample_frames() -> Vec<Frame> {
        let t = Ticket {
            slot: 7,
            gen: 3,
            task: 2,
            copy: 11,
        };
        // A sibling: the same slot, generation and task, another copy.
        let sibling = Ticket { copy: 12, ..t };
        vec![
            Frame::Hello {
                version: VERSION,
                task: "split".into(),
            },
            Frame::Challenge { nonce: [9; 32] },
            Frame::Auth { mac: [1; 32] },
            Frame::Welcome {
                worker: 4,
                heartbeat_ms: 1000,
                max_frame: 1 << 20,
            },
            Frame::Fetch { max: 1024 },
            Frame::batch(vec![
                TaskMsg {
                    ticket: t,
                    payload: Bytes::from_static(b"hello"),
                    ctx: rich_ctx(),
                },
                TaskMsg {
                    ticket: sibling,
                    payload: Bytes::new(),
                    ctx: MsgCtx::new(7),
                },
            ]),
            Frame::Results {
                complete: true,
                items: vec![
                    (t, Verdict::Done(2)),
                    (sibling, Verdict::Filtered),
                    (t, Verdict::Error("bad".into())),
                    (t, Verdict::Panicked("boom".into())),
                    (t, Verdict::TimedOut),
                ],
                outputs: vec![
                    Emitted::plain(Bytes::from_static(b"a")),
                    Emitted::new(
                        Bytes::from_static(b"bc"),
                        Some(Bytes::from_static(b"k")),
                        rich_ctx().headers().clone(),
                    ),
                ],
            },
            Frame::GiveBack,
            Frame::Returned(vec![TaskMsg {
                ticket: t,
                payload: Bytes::from_static(b"unstarted"),
                ctx: rich_ctx(),
            }]),
            Frame::Heartbeat,
            Frame::Goodbye,
            Frame::Error {
                code: ErrorCode::Auth,
                message: "wrong secret".into(),
            },
        ]
    }

    #[test]
    fn every_frame_round_trips() {
        for f in sample_frames() {
            assert_eq!(roundtrip(&f), f);
        }
    }

    /// Siblings of a fan-out share slot, generation and task; their copy
    /// numbers tell them apart, and travel both ways unchanged.
    #[test]
    fn tickets_carry_their_copy_both_ways() {
        let t = Ticket {
            slot: 0x0102_0304,
            gen: 0x0506_0708,
            task: 0x090a,
            copy: 0x0b0c_0d0e,
        };
        let msg = |ticket| TaskMsg {
            ticket,
            payload: Bytes::new(),
            ctx: MsgCtx::new(MsgId::Bytes(Bytes::new())),
        };
        let wire = Frame::batch(vec![msg(t)]).to_wire();
        // Length, tag and count, then the ticket's 14 bytes.
        assert_eq!(
            wire[9..9 + TICKET_LEN],
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
        );
        assert_eq!(task_msg_len(&msg(t)), MIN_TASK_MSG);
        let siblings: Vec<TaskMsg> = (1..=3).map(|copy| msg(Ticket { copy, ..t })).collect();
        for frame in [
            Frame::batch(siblings.clone()),
            Frame::Returned(siblings.clone()),
        ] {
            assert_eq!(roundtrip(&frame), frame);
        }
        let results = Frame::Results {
            complete: false,
            items: siblings
                .iter()
                .rev()
                .map(|m| (m.ticket, Verdict::Filtered))
                .collect(),
            outputs: Vec::new(),
        };
        assert_eq!(
            results.to_wire().len() - 4,
            10 + 3 * MIN_RESULT_ITEM,
            "a filtered verdict takes the least a result item can"
        );
        let Frame::Results { items, .. } = roundtrip(&results) else {
            panic!("not results");
        };
        let copies: Vec<u32> = items.iter().map(|(t, _)| t.copy).collect();
        assert_eq!(copies, [3, 2, 1]);
    }

    #[test]
    fn every_frame_survives_every_split_point() {
        let mut codec = WireCodec::with_max(DEFAULT_MAX_FRAME);
        for frame in sample_frames() {
            let wire = frame.to_wire();
            for cut in 0..=wire.len() {
                let mut buf = BytesMut::from(&wire[..cut]);
                let early = codec.decode(&mut buf).unwrap();
                if cut < wire.len() {
                    assert!(
                        early.is_none(),
                        "{frame:?} decoded from {cut} of {} bytes",
                        wire.len()
                    );
                    buf.extend_from_slice(&wire[cut..]);
                    assert_eq!(codec.decode(&mut buf).unwrap(), Some(frame.clone()));
                } else {
                    assert_eq!(early, Some(frame.clone()));
                }
                assert!(buf.is_empty());
            }
        }
    }

    #[test]
    fn a_partial_frame_is_not_an_error() {
        let mut codec = WireCodec::with_max(DEFAULT_MAX_FRAME);
        let mut buf = BytesMut::new();
        codec.encode(&Frame::Fetch { max: 5 }, &mut buf).unwrap();
        let mut part = buf.split_to(3);
        assert!(codec.decode(&mut part).unwrap().is_none());
    }

    #[test]
    fn a_deadline_travels_as_the_time_left() {
        let deadline = Instant::now() + Duration::from_secs(30);
        let frame = Frame::batch(vec![TaskMsg {
            ticket: Ticket {
                slot: 1,
                gen: 1,
                task: 1,
                copy: u32::MAX,
            },
            payload: Bytes::from_static(b"x"),
            ctx: MsgCtx::new(1).with_deadline(deadline),
        }]);
        let wire = frame.to_wire();
        let Frame::Batch(msgs) = Frame::decode_body(wire.slice(4..)).unwrap() else {
            panic!("not a batch");
        };
        let got = msgs[0].ctx.deadline().expect("a deadline");
        let off = if got > deadline {
            got - deadline
        } else {
            deadline - got
        };
        assert!(off < Duration::from_secs(5), "deadline off by {off:?}");
        assert_eq!(task_msg_len(&msgs[0]) + 5, wire.len() - 4);
    }

    /// Regression: the smallest-message bound assumed an integer id, so a
    /// batch of messages with short byte ids was refused as too many to
    /// fit its frame.
    #[test]
    fn batches_of_short_byte_ids_decode_and_sizes_are_exact() {
        let msgs: Vec<TaskMsg> = (0..100u8)
            .map(|i| TaskMsg {
                ticket: Ticket {
                    slot: u32::from(i),
                    gen: 0,
                    task: 0,
                    copy: u32::from(i),
                },
                payload: Bytes::new(),
                ctx: MsgCtx::new(MsgId::Bytes(Bytes::new())),
            })
            .collect();
        let frame = Frame::batch(msgs);
        let wire = frame.to_wire();
        let Frame::Batch(back) = Frame::decode_body(wire.slice(4..)).unwrap() else {
            panic!("not a batch");
        };
        assert_eq!(back.len(), 100);
        let sized: usize = back.iter().map(task_msg_len).sum();
        assert_eq!(sized + 5, wire.len() - 4);
        let rich = TaskMsg {
            ticket: back[0].ticket,
            payload: Bytes::from_static(b"payload"),
            ctx: rich_ctx(),
        };
        let one = Frame::batch(vec![rich.clone()]).to_wire();
        assert_eq!(task_msg_len(&rich) + 5, one.len() - 4);
    }

    #[test]
    fn oversized_lengths_are_refused_before_buffering() {
        let mut codec = WireCodec::handshake();
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 1, 2][..]);
        let e = codec.decode(&mut buf).unwrap_err();
        assert!(matches!(e, WireError::Io(_)), "{e}");
        let mut big = BytesMut::new();
        let e = codec
            .encode(
                &Frame::batch(vec![TaskMsg {
                    ticket: Ticket {
                        slot: 0,
                        gen: 0,
                        task: 0,
                        copy: 0,
                    },
                    payload: Bytes::from(vec![0; 2000]),
                    ctx: MsgCtx::new(0),
                }]),
                &mut big,
            )
            .unwrap_err();
        assert!(matches!(e, WireError::TooLong { .. }));
    }

    #[test]
    fn malformed_bodies_are_errors() {
        for body in [
            &b""[..],
            &[99][..],
            &[HELLO, b'H', b'T', b'T', b'P'][..],
            &[HELLO, b'T', b'M', b'P', b'S', 0][..],
            &[FETCH, 0, 0][..],
            &[FETCH, 0, 0, 0, 1, 9][..],
            &[BATCH, 0xff, 0xff, 0xff, 0xff][..],
            &[RESULTS, 2][..],
            // One result: a ticket (14 bytes), then an unknown verdict.
            &[
                RESULTS, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9,
            ][..],
            // One result whose ticket lacks its copy (version 4's layout).
            &[
                RESULTS, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0,
            ][..],
        ] {
            assert!(
                Frame::decode_body(Bytes::copy_from_slice(body)).is_err(),
                "{body:?}"
            );
        }
    }

    #[test]
    fn macs_verify_only_with_the_secret() {
        let n = nonce().unwrap();
        let mac = sign(b"s3cret", &n, "split");
        assert!(verify(b"s3cret", &n, "split", &mac));
        assert!(!verify(b"other", &n, "split", &mac));
        assert!(!verify(b"s3cret", &n, "count", &mac));
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        let bytes = proptest::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from);
        let ticket = (any::<u32>(), any::<u32>(), any::<u16>(), any::<u32>()).prop_map(
            |(slot, gen, task, copy)| Ticket {
                slot,
                gen,
                task,
                copy,
            },
        );
        let meta = (
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8)),
            proptest::collection::vec(
                ("[a-z]{1,8}", proptest::collection::vec(any::<u8>(), 0..8)),
                0..3,
            ),
        )
            .prop_map(|(key, hs)| {
                let mut headers = Headers::new();
                for (n, v) in hs {
                    headers.insert(n, v).unwrap();
                }
                (key.map(Bytes::from), headers)
            });
        let id = prop_oneof![
            any::<u64>().prop_map(MsgId::Int),
            proptest::collection::vec(any::<u8>(), 0..12).prop_map(|b| MsgId::Bytes(b.into())),
        ];
        let ctx = (
            id,
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
            any::<u16>(),
            meta.clone(),
        )
            .prop_map(
                |(id, attempt, delivered, timestamp, parent, (key, headers))| MsgCtx {
                    id,
                    origin: Origin {
                        attempt,
                        delivered,
                        timestamp,
                        deadline: 0,
                    },
                    parent: Parent {
                        task: parent,
                        name: NO_NAME,
                    },
                    meta: Meta::new(key, headers),
                },
            );
        let verdict = prop_oneof![
            any::<u32>().prop_map(Verdict::Done),
            Just(Verdict::Filtered),
            "[a-z ]{0,20}".prop_map(Verdict::Error),
            "[a-z ]{0,20}".prop_map(Verdict::Panicked),
            Just(Verdict::TimedOut),
        ];
        prop_oneof![
            (any::<u16>(), "[a-z0-9-]{0,30}")
                .prop_map(|(version, task)| Frame::Hello { version, task }),
            any::<[u8; 32]>().prop_map(|nonce| Frame::Challenge { nonce }),
            any::<u32>().prop_map(|max| Frame::Fetch { max }),
            proptest::collection::vec((ticket.clone(), bytes.clone(), ctx.clone()), 0..8).prop_map(
                |v| {
                    Frame::batch(
                        v.into_iter()
                            .map(|(ticket, payload, ctx)| TaskMsg {
                                ticket,
                                payload,
                                ctx,
                            })
                            .collect(),
                    )
                }
            ),
            proptest::collection::vec((ticket.clone(), bytes.clone(), ctx), 0..8).prop_map(|v| {
                Frame::Returned(
                    v.into_iter()
                        .map(|(ticket, payload, ctx)| TaskMsg {
                            ticket,
                            payload,
                            ctx,
                        })
                        .collect(),
                )
            }),
            Just(Frame::GiveBack),
            (
                any::<bool>(),
                proptest::collection::vec((ticket, verdict), 0..8),
                proptest::collection::vec((bytes, meta), 0..8)
            )
                .prop_map(|(complete, items, outputs)| Frame::Results {
                    complete,
                    items,
                    outputs: outputs
                        .into_iter()
                        .map(|(payload, (key, headers))| Emitted::new(payload, key, headers))
                        .collect(),
                }),
            Just(Frame::Heartbeat),
        ]
    }

    proptest! {
        /// Several frames, encoded back to back and fed to the decoder in
        /// chunks split at random points, come out whole and in order.
        #[test]
        fn frames_survive_any_split(frames in proptest::collection::vec(arb_frame(), 1..6), cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..10)) {
            let mut codec = WireCodec::with_max(DEFAULT_MAX_FRAME);
            let mut wire = BytesMut::new();
            for f in &frames {
                codec.encode(f, &mut wire).unwrap();
            }
            let wire = wire.freeze();
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
            points.push(wire.len());
            points.sort_unstable();
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            let mut at = 0;
            for p in points {
                buf.extend_from_slice(&wire[at..p]);
                at = p;
                while let Some(f) = codec.decode(&mut buf).unwrap() {
                    out.push(f);
                }
            }
            prop_assert_eq!(out, frames);
        }

        /// Random bytes never panic the decoder.
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut codec = WireCodec::with_max(HANDSHAKE_MAX);
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
            let _ = Frame::decode_body(Bytes::from(data));
        }
    }
}
