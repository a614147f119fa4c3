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
//! [`DEFAULT_MAX_FRAME`]). The handshake's, `Fetch`'s and `Error`'s
//! integers are big-endian and fixed-width; a string is a `u16` length and
//! UTF-8 bytes. Payloads are sliced out of the received frame without a
//! copy.
//!
//! The frames sent per message (`Batch`, `Returned`, `Results`) are
//! compact, as their encoding and decoding are most of a session's work:
//! counts, lengths and the fields of each item are LEB128 integers (seven
//! bits a byte, lowest first, the high bit set on all bytes but the last),
//! and the fields that are close from one item of a frame to the next
//! (ticket slot, generation and copy; an integer id; timestamp; deadline)
//! are sent as the difference from the previous item's, wrapping,
//! zigzag-mapped (0, -1, 1, -2… as 0, 1, 2, 3…), so usually as one byte.
//! What an item does not carry (a key, headers, a deadline) is left out, as
//! a flags byte says.
//!
//! # Conversation
//!
//! ```text
//! worker                                  topology
//!   Hello {magic "TMPS", version, task} ──►
//!                                      ◄── Challenge {nonce}      (or Error, close)
//!   Auth {HMAC-SHA256(secret, nonce ‖ task)} ──►
//!                                      ◄── Welcome {worker, heartbeat_ms, max_frame, at_most_once}  (or Error, close)
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
//! A ticket is the record's slot (`u32`), its generation (`u32`), the task
//! (`u16`) and the copy (`u32`). The topology stamps the copy
//! when it sends a message in a `Batch`, unique among the messages that
//! worker holds, so that siblings of a fan-out (one slot, generation and
//! task, different payloads) are told apart; a worker echoes every ticket
//! unchanged in `Results` and `Returned`. Version 5 added the copy.
//!
//! # A task message's context
//!
//! Each task message carries its context: the source message's id (an
//! integer or bytes), attempt, delivery count and timestamp, the parent
//! task's index (`u16::MAX` for the source or a join), the time left until
//! its deadline in milliseconds (relative, so the hosts' clocks need not
//! agree), and its key and headers. Each output carries its payload, key
//! and headers the same way. Version 3 of the protocol added the context.
//!
//! ```text
//! Batch, Returned:  tag | count | message…
//! message:  flags | slot Δ | gen Δ | task | copy Δ
//!           | id Δ (integer) or id length (bytes)
//!           | [attempt | deliveries | parent + 1] | timestamp Δ
//!           | [deadline Δ] | payload length | [key length] | [path: u64 LE]
//!           | payload | [id bytes] | [key] | [headers]
//! Results:  tag | complete (u8) | count | verdict… | count | output…
//! verdict:  slot Δ | gen Δ | task | copy Δ | tag + 8 × output count
//!           | [text: u16 length, UTF-8]           (error, panicked)
//! output:   flags | payload length | [key length] | [path: u64 LE]
//!           | payload | [key] | [headers]
//! headers:  count (u8) | (name length (u8), name, value length (u16), value)…
//! ```
//!
//! Flags: 1 a key, 2 headers, 32 a path (the message's place in its source
//! message's processing, sent only with at-most-once state updates), 64 it
//! may have been handled before (at-most-once updates: its updates are
//! looked up); for
//! messages also 4 the id is bytes, 8 a
//! deadline, 16 attempt, deliveries and parent left out, as the previous
//! message's (the first message's: 0, 0, 0). Δ: the difference from the
//! previous item of the frame (the first item's from 0); `[…]`: only as
//! the flags say. Version 6 made these frames
//! compact (version 5's fixed-width fields took a third more bytes);
//! version 7 added `Ticks`, laid out like a `Results` frame's outputs;
//! version 8 added the path.
//!
//! # Results
//!
//! `Results` carry one verdict per message after the message's ticket: a
//! tag (0 done, with its output count; 1 filtered; 2 error and 3 panicked,
//! each with a string; 4 timed out: an async task's call passed the
//! message's deadline and was cancelled). A worker answers the
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
use std::time::Instant;

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
pub const VERSION: u16 = 8;
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
        /// Whether the topology applies state updates at most once: the
        /// worker must be configured alike (it gives outputs paths).
        at_most_once: bool,
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

#[cold]
fn ends<T>(what: &str) -> Result<T, DecodeError> {
    err(format!("{what}: the frame ends"))
}

#[cold]
fn out_of_range<T>(what: &str, v: u64) -> Result<T, DecodeError> {
    err(format!("{what}: {v} is out of range"))
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

fn get_array(buf: &mut Bytes, what: &str) -> Result<[u8; NONCE_LEN], DecodeError> {
    need(buf, NONCE_LEN, what)?;
    let mut out = [0u8; NONCE_LEN];
    buf.copy_to_slice(&mut out);
    Ok(out)
}

/// A count of items at least `min_size` bytes each: refused if the frame
/// cannot hold that many, so a forged count never allocates.
fn get_count(buf: &mut Bytes, min_size: usize, what: &str) -> Result<usize, DecodeError> {
    let mut c = Cursor::new(buf.chunk());
    let n = c.len(what)?;
    let used = c.at;
    buf.advance(used);
    if n.saturating_mul(min_size) > buf.remaining() {
        return err(format!(
            "{what}: {n} items cannot fit in {} bytes",
            buf.remaining()
        ));
    }
    Ok(n)
}

/// A string of at most 65,535 bytes: a longer one (an error's text) is cut
/// at the last character boundary that fits, so it still decodes as UTF-8.
fn put_str(dst: &mut BytesMut, s: &str) {
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    dst.put_u16(end as u16);
    dst.put_slice(&s.as_bytes()[..end]);
}

/// `n` bytes of the frame, shared (no copy).
fn take(buf: &mut Bytes, n: usize, what: &str) -> Result<Bytes, DecodeError> {
    need(buf, n, what)?;
    Ok(buf.split_to(n))
}

// Compact integers. An unsigned integer is LEB128: seven bits a byte, the
// lowest first, the high bit set on every byte but the last (1 byte below
// 128). Fields that are close from one item of a frame to the next (see
// `Prev`) are sent as the difference from the previous item's, wrapping,
// zigzag-mapped so that small differences either way are small numbers.
// These few lines are written here rather than taken from a varint crate:
// they read from and write to `Bytes`/`BytesMut` slices in place, with
// this module's errors, which the crates' slice and `io` interfaces do
// not save us.

/// The most bytes an integer of each width takes.
const U16_MAX_LEN: usize = 3;
const U32_MAX_LEN: usize = 5;
const U64_MAX_LEN: usize = 10;

fn zigzag32(d: u32) -> u32 {
    let d = d as i32;
    ((d << 1) ^ (d >> 31)) as u32
}

fn unzigzag32(z: u32) -> u32 {
    (z >> 1) ^ (z & 1).wrapping_neg()
}

fn zigzag64(d: u64) -> u64 {
    let d = d as i64;
    ((d << 1) ^ (d >> 63)) as u64
}

fn unzigzag64(z: u64) -> u64 {
    (z >> 1) ^ (z & 1).wrapping_neg()
}

fn put_uvarint(dst: &mut BytesMut, v: u64) {
    let mut head = Head::new();
    head.uvarint(v);
    head.flush(dst);
}

/// What the previous item of a frame carried: an item's ticket, integer id,
/// timestamp and deadline are sent as differences from these. In a batch,
/// copy numbers count up by one, ids and timestamps of one poll are near
/// each other, and so are deadlines; so each usually takes a byte.
#[derive(Default)]
struct Prev {
    slot: u32,
    gen: u32,
    copy: u32,
    id: u64,
    timestamp: u64,
    left: u32,
    attempt: u32,
    delivered: u32,
    parent: u16,
}

/// The longest a ticket is: slot, generation, task, copy.
const TICKET_MAX: usize = U32_MAX_LEN * 3 + U16_MAX_LEN;

/// The fixed-size fields of one item, written to the stack and copied into
/// the frame in one piece.
struct Head {
    buf: [u8; MSG_HEAD_MAX],
    len: usize,
}

impl Head {
    fn new() -> Self {
        Head {
            buf: [0; MSG_HEAD_MAX],
            len: 0,
        }
    }

    #[inline(always)]
    fn u8(&mut self, b: u8) {
        self.buf[self.len] = b;
        self.len += 1;
    }

    #[inline(always)]
    fn u64_le(&mut self, v: u64) {
        self.buf[self.len..self.len + 8].copy_from_slice(&v.to_le_bytes());
        self.len += 8;
    }

    #[inline(always)]
    fn uvarint(&mut self, mut v: u64) {
        if v < 0x80 {
            return self.u8(v as u8);
        }
        while v >= 0x80 {
            self.u8(v as u8 | 0x80);
            v >>= 7;
        }
        self.u8(v as u8);
    }

    #[inline(always)]
    fn delta32(&mut self, prev: &mut u32, v: u32) {
        self.uvarint(u64::from(zigzag32(v.wrapping_sub(*prev))));
        *prev = v;
    }

    #[inline(always)]
    fn delta64(&mut self, prev: &mut u64, v: u64) {
        self.uvarint(zigzag64(v.wrapping_sub(*prev)));
        *prev = v;
    }

    #[inline(always)]
    fn ticket(&mut self, prev: &mut Prev, t: &Ticket) {
        self.delta32(&mut prev.slot, t.slot);
        self.delta32(&mut prev.gen, t.gen);
        self.uvarint(u64::from(t.task));
        self.delta32(&mut prev.copy, t.copy);
    }

    /// Appends what was written to `dst`, and starts over.
    #[inline(always)]
    fn flush(&mut self, dst: &mut BytesMut) {
        dst.put_slice(&self.buf[..self.len]);
        self.len = 0;
    }
}

/// Reads the fixed-size fields of one item from the front of a frame's
/// remaining bytes; the caller then advances past `at`.
struct Cursor<'a> {
    s: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn new(s: &'a [u8]) -> Self {
        Cursor { s, at: 0 }
    }

    #[inline(always)]
    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        match self.s.get(self.at) {
            Some(&b) => {
                self.at += 1;
                Ok(b)
            }
            None => ends(what),
        }
    }

    fn u64_le(&mut self, what: &str) -> Result<u64, DecodeError> {
        match self.s.get(self.at..self.at + 8) {
            Some(b) => {
                self.at += 8;
                let mut v = [0u8; 8];
                v.copy_from_slice(b);
                Ok(u64::from_le_bytes(v))
            }
            None => ends(what),
        }
    }

    /// Inlined for the usual one byte; longer ones out of line.
    #[inline(always)]
    fn uvarint(&mut self, what: &str) -> Result<u64, DecodeError> {
        match self.s.get(self.at) {
            Some(&b) if b < 0x80 => {
                self.at += 1;
                Ok(u64::from(b))
            }
            _ => self.long_uvarint(what),
        }
    }

    #[inline(never)]
    fn long_uvarint(&mut self, what: &str) -> Result<u64, DecodeError> {
        let mut v = 0;
        let mut shift = 0;
        loop {
            let b = self.u8(what)?;
            // The tenth byte may only hold the top bit of a `u64`.
            if shift == 63 && b > 1 {
                return err(format!("{what}: an integer longer than 64 bits"));
            }
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(v);
            }
            shift += 7;
        }
    }

    #[inline(always)]
    fn u32v(&mut self, what: &str) -> Result<u32, DecodeError> {
        let v = self.uvarint(what)?;
        u32::try_from(v).or_else(|_| out_of_range(what, v))
    }

    #[inline(always)]
    fn u16v(&mut self, what: &str) -> Result<u16, DecodeError> {
        let v = self.uvarint(what)?;
        u16::try_from(v).or_else(|_| out_of_range(what, v))
    }

    #[inline(always)]
    fn len(&mut self, what: &str) -> Result<usize, DecodeError> {
        let v = self.uvarint(what)?;
        usize::try_from(v).or_else(|_| out_of_range(what, v))
    }

    #[inline(always)]
    fn delta32(&mut self, prev: &mut u32, what: &str) -> Result<u32, DecodeError> {
        *prev = prev.wrapping_add(unzigzag32(self.u32v(what)?));
        Ok(*prev)
    }

    #[inline(always)]
    fn delta64(&mut self, prev: &mut u64, what: &str) -> Result<u64, DecodeError> {
        *prev = prev.wrapping_add(unzigzag64(self.uvarint(what)?));
        Ok(*prev)
    }

    #[inline(always)]
    fn ticket(&mut self, prev: &mut Prev) -> Result<Ticket, DecodeError> {
        Ok(Ticket {
            slot: self.delta32(&mut prev.slot, "ticket slot")?,
            gen: self.delta32(&mut prev.gen, "ticket generation")?,
            task: self.u16v("ticket task")?,
            copy: self.delta32(&mut prev.copy, "ticket copy")?,
        })
    }
}

/// The headers of a message without any.
static NO_HEADERS: Headers = Headers::new();

/// Flags of a task message or an output: what it carries.
const F_KEY: u8 = 1;
const F_HEADERS: u8 = 2;
/// A task message's id is bytes (else an integer).
const F_ID_BYTES: u8 = 4;
/// A task message has a deadline.
const F_DEADLINE: u8 = 8;
/// A task message's attempt, deliveries and parent are the previous
/// message's (as in most batches), so they are left out.
const F_SAME: u8 = 16;
/// A path follows the fixed fields (8 bytes, little-endian): see
/// [`MsgCtx::path`].
const F_PATH: u8 = 32;
/// With at-most-once updates: the message may have been handled before
/// (its updates are looked up).
const F_SEEN: u8 = 64;

/// The longest a task message's fixed fields are: flags, ticket, id (an
/// integer's difference or a length), attempt, deliveries, timestamp,
/// parent, deadline, payload length, key length, path.
const MSG_HEAD_MAX: usize = 1
    + TICKET_MAX
    + U64_MAX_LEN
    + U32_MAX_LEN * 2
    + U64_MAX_LEN
    + U16_MAX_LEN
    + U32_MAX_LEN
    + U64_MAX_LEN * 2
    + 8;
/// The fewest bytes a task message takes: a byte for each of flags, the
/// ticket's four fields, id, timestamp and payload length (attempt,
/// deliveries and parent left out as the previous message's).
const MIN_TASK_MSG: usize = 8;
/// The longest a verdict's fixed fields are: ticket and verdict (a tag and
/// an output count in one integer); an error's text follows.
const RESULT_ITEM_MAX: usize = TICKET_MAX + U64_MAX_LEN;
/// The fewest bytes a verdict takes in a `Results` frame: the ticket's four
/// fields and the verdict, a byte each.
const MIN_RESULT_ITEM: usize = 5;
/// The longest an output's fixed fields are: flags, payload length, key
/// length, path.
const OUTPUT_HEAD_MAX: usize = 1 + U64_MAX_LEN * 2 + 8;
/// The fewest bytes an output takes: flags and payload length.
const MIN_OUTPUT: usize = 2;
/// The most a `Batch` or `Returned` frame takes besides its messages: tag
/// and count.
pub(crate) const BATCH_HEAD: usize = 1 + U64_MAX_LEN;
/// The most a `Results` frame takes besides its items and outputs: tag,
/// complete flag, the two counts.
pub(crate) const RESULTS_HEAD: usize = 2 + U64_MAX_LEN * 2;

/// Headers: a count byte; each a name of up to 255 bytes behind a `u8`
/// length, a value behind a `u16` length.
fn put_headers(dst: &mut BytesMut, headers: &Headers) {
    // `Headers` keeps these within the limits the lengths can carry.
    dst.put_u8(headers.len() as u8);
    for (name, value) in headers.iter() {
        dst.put_u8(name.len() as u8);
        dst.put_slice(name.as_bytes());
        dst.put_u16(value.len() as u16);
        dst.put_slice(value);
    }
}

fn get_headers(buf: &mut Bytes) -> Result<Headers, DecodeError> {
    let mut headers = Headers::new();
    let n = get_u8(buf, "header count")?;
    for _ in 0..n {
        let len = get_u8(buf, "header name")? as usize;
        need(buf, len, "header name")?;
        let name = String::from_utf8(buf.split_to(len).to_vec())
            .or_else(|_| err("a header name is not UTF-8"))?;
        let len = get_u16(buf, "header value")? as usize;
        let value = take(buf, len, "header value")?;
        headers
            .insert(name, value)
            .or_else(|e| err(format!("header: {e}")))?;
    }
    Ok(headers)
}

fn headers_len(headers: &Headers) -> usize {
    if headers.is_empty() {
        0
    } else {
        1 + headers
            .iter()
            .map(|(n, v)| 1 + n.len() + 2 + v.len())
            .sum::<usize>()
    }
}

fn meta_flags(key: Option<&Bytes>, headers: &Headers) -> u8 {
    (if key.is_some() { F_KEY } else { 0 }) | if headers.is_empty() { 0 } else { F_HEADERS }
}

/// The key (if flagged) and headers (if flagged) after an item's fixed
/// fields, as one `Meta`: none without an allocation.
fn get_meta(buf: &mut Bytes, flags: u8, key_len: usize) -> Result<Meta, DecodeError> {
    if flags & (F_KEY | F_HEADERS) == 0 {
        return Ok(Meta::default());
    }
    let key = if flags & F_KEY != 0 {
        Some(take(buf, key_len, "key")?)
    } else {
        None
    };
    let headers = if flags & F_HEADERS != 0 {
        get_headers(buf)?
    } else {
        Headers::new()
    };
    Ok(Meta::new(key, headers))
}

/// At most the bytes a task message takes in a `Batch` or `Returned` frame
/// (its integers may take fewer).
pub(crate) fn task_msg_len(m: &TaskMsg) -> usize {
    let id = match &m.ctx.id {
        MsgId::Int(_) => 0,
        MsgId::Bytes(b) => b.len(),
    };
    MSG_HEAD_MAX
        + id
        + m.payload.len()
        + m.ctx.key().map_or(0, Bytes::len)
        + headers_len(m.ctx.headers())
}

/// At most the bytes a verdict takes in a `Results` frame, outputs aside.
pub(crate) fn result_item_len(v: &Verdict) -> usize {
    RESULT_ITEM_MAX
        + match v {
            Verdict::Error(m) | Verdict::Panicked(m) => 2 + m.len().min(u16::MAX as usize),
            _ => 0,
        }
}

/// At most the bytes an output takes in a `Results` frame.
pub(crate) fn output_len(o: &Emitted) -> usize {
    OUTPUT_HEAD_MAX + o.payload.len() + o.key().map_or(0, Bytes::len) + headers_len(o.headers())
}

/// The milliseconds from `now` to a context's `deadline` (both as
/// [`to_nanos`] gives them), at least 0.
fn millis_left(deadline: u64, now: u64) -> u32 {
    (deadline.saturating_sub(now) / 1_000_000).min(u64::from(u32::MAX)) as u32
}

fn put_msgs(dst: &mut BytesMut, tag: u8, msgs: &[TaskMsg]) {
    // A guess; each message reserves what it needs at most (amortized).
    dst.reserve(
        BATCH_HEAD + msgs.len() * (MSG_HEAD_MAX + msgs.first().map_or(0, |m| m.payload.len())),
    );
    dst.put_u8(tag);
    put_uvarint(dst, msgs.len() as u64);
    // The deadline travels as the time left, so the two hosts' clocks need
    // not agree.
    let now = to_nanos(Instant::now());
    let mut prev = Prev::default();
    let mut head = Head::new();
    for m in msgs {
        let c = &m.ctx;
        let (key, headers, path) = if c.meta.is_empty() {
            (None, &NO_HEADERS, 0)
        } else {
            (c.key(), c.headers(), c.path())
        };
        let id_bytes = match &c.id {
            MsgId::Int(_) => None,
            MsgId::Bytes(b) => Some(b),
        };
        dst.reserve(
            MSG_HEAD_MAX
                + m.payload.len()
                + id_bytes.map_or(0, Bytes::len)
                + key.map_or(0, Bytes::len)
                + headers_len(headers),
        );
        let has_deadline = c.origin.deadline != 0;
        let same = c.origin.attempt == prev.attempt
            && c.origin.delivered == prev.delivered
            && c.parent.task == prev.parent;
        head.u8(meta_flags(key, headers)
            | if id_bytes.is_some() { F_ID_BYTES } else { 0 }
            | if has_deadline { F_DEADLINE } else { 0 }
            | if same { F_SAME } else { 0 }
            | if path != 0 { F_PATH } else { 0 }
            | if c.meta.seen() { F_SEEN } else { 0 });
        head.ticket(&mut prev, &m.ticket);
        match &c.id {
            MsgId::Int(n) => head.delta64(&mut prev.id, *n),
            MsgId::Bytes(b) => head.uvarint(b.len() as u64),
        }
        if !same {
            head.uvarint(u64::from(c.origin.attempt));
            head.uvarint(u64::from(c.origin.delivered));
            // The source's (and a join's) `NO_TASK` is 0, one byte.
            head.uvarint(u64::from(c.parent.task.wrapping_add(1)));
            prev.attempt = c.origin.attempt;
            prev.delivered = c.origin.delivered;
            prev.parent = c.parent.task;
        }
        head.delta64(&mut prev.timestamp, c.origin.timestamp);
        if has_deadline {
            head.delta32(&mut prev.left, millis_left(c.origin.deadline, now));
        }
        head.uvarint(m.payload.len() as u64);
        if let Some(k) = key {
            head.uvarint(k.len() as u64);
        }
        if path != 0 {
            head.u64_le(path);
        }
        head.flush(dst);
        dst.put_slice(&m.payload);
        if let Some(b) = id_bytes {
            dst.put_slice(b);
        }
        if let Some(k) = key {
            dst.put_slice(k);
        }
        if !headers.is_empty() {
            put_headers(dst, headers);
        }
    }
}

/// Decodes task messages. Their contexts name their parent by index only:
/// the receiver fills in the names from its own pipeline
/// ([`Dag::name_parents`](crate::Dag)).
fn get_msgs(buf: &mut Bytes, what: &str) -> Result<Vec<TaskMsg>, DecodeError> {
    let n = get_count(buf, MIN_TASK_MSG, what)?;
    let mut msgs = Vec::with_capacity(n);
    let now = to_nanos(Instant::now());
    let mut prev = Prev::default();
    for _ in 0..n {
        let mut c = Cursor::new(buf.chunk());
        let flags = c.u8("message flags")?;
        if flags & !(F_KEY | F_HEADERS | F_ID_BYTES | F_DEADLINE | F_SAME | F_PATH | F_SEEN) != 0 {
            return err(format!("message flags {flags:#x}"));
        }
        let ticket = c.ticket(&mut prev)?;
        let id_len = if flags & F_ID_BYTES != 0 {
            c.len("id")?
        } else {
            c.delta64(&mut prev.id, "id")?;
            0
        };
        if flags & F_SAME == 0 {
            prev.attempt = c.u32v("attempt")?;
            prev.delivered = c.u32v("deliveries")?;
            prev.parent = c.u16v("parent")?.wrapping_sub(1);
        }
        let (attempt, delivered, parent) = (prev.attempt, prev.delivered, prev.parent);
        let timestamp = c.delta64(&mut prev.timestamp, "timestamp")?;
        let deadline = if flags & F_DEADLINE != 0 {
            let left = c.delta32(&mut prev.left, "deadline")?;
            // At least `now`, so never 0 (none).
            now.saturating_add(u64::from(left) * 1_000_000)
        } else {
            0
        };
        let payload_len = c.len("payload")?;
        let key_len = if flags & F_KEY != 0 { c.len("key")? } else { 0 };
        let path = if flags & F_PATH != 0 {
            c.u64_le("path")?
        } else {
            0
        };
        let used = c.at;
        buf.advance(used);
        let payload = take(buf, payload_len, "payload")?;
        let id = if flags & F_ID_BYTES != 0 {
            MsgId::Bytes(take(buf, id_len, "id")?)
        } else {
            MsgId::Int(prev.id)
        };
        let meta = get_meta(buf, flags, key_len)?.with_path_seen(path, flags & F_SEEN != 0);
        msgs.push(TaskMsg {
            ticket,
            payload,
            ctx: MsgCtx {
                id,
                origin: Origin {
                    attempt,
                    delivered,
                    timestamp,
                    deadline,
                },
                parent: Parent {
                    task: parent,
                    name: NO_NAME,
                },
                meta,
            },
        });
    }
    Ok(msgs)
}

fn put_results(
    dst: &mut BytesMut,
    complete: bool,
    items: &[(Ticket, Verdict)],
    outputs: &[Emitted],
) {
    // A hint: an error's text may take more.
    dst.reserve(
        RESULTS_HEAD
            + items.len() * RESULT_ITEM_MAX
            + outputs.iter().map(output_len).sum::<usize>(),
    );
    dst.put_u8(RESULTS);
    dst.put_u8(u8::from(complete));
    put_uvarint(dst, items.len() as u64);
    let mut prev = Prev::default();
    let mut head = Head::new();
    for (ticket, verdict) in items {
        head.ticket(&mut prev, ticket);
        // The tag in the low three bits, a done verdict's output count above.
        head.uvarint(match verdict {
            Verdict::Done(n) => u64::from(V_DONE) | u64::from(*n) << 3,
            Verdict::Filtered => u64::from(V_FILTERED),
            Verdict::Error(_) => u64::from(V_ERROR),
            Verdict::Panicked(_) => u64::from(V_PANICKED),
            Verdict::TimedOut => u64::from(V_TIMED_OUT),
        });
        head.flush(dst);
        if let Verdict::Error(m) | Verdict::Panicked(m) = verdict {
            put_str(dst, m);
        }
    }
    put_outputs(dst, outputs);
}

/// A count, then each output: flags, lengths, payload, key, headers.
fn put_outputs(dst: &mut BytesMut, outputs: &[Emitted]) {
    let mut head = Head::new();
    put_uvarint(dst, outputs.len() as u64);
    for o in outputs {
        let (key, headers) = (o.key(), o.headers());
        let path = o.path();
        head.u8(meta_flags(key, headers)
            | if path != 0 { F_PATH } else { 0 }
            | if o.seen() { F_SEEN } else { 0 });
        head.uvarint(o.payload.len() as u64);
        if let Some(k) = key {
            head.uvarint(k.len() as u64);
        }
        if path != 0 {
            head.u64_le(path);
        }
        head.flush(dst);
        dst.put_slice(&o.payload);
        if let Some(k) = key {
            dst.put_slice(k);
        }
        if !headers.is_empty() {
            put_headers(dst, headers);
        }
    }
}

fn get_results(buf: &mut Bytes) -> Result<Frame, DecodeError> {
    let complete = match get_u8(buf, "complete")? {
        0 => false,
        1 => true,
        b => return err(format!("complete flag {b}")),
    };
    let n = get_count(buf, MIN_RESULT_ITEM, "results")?;
    let mut items = Vec::with_capacity(n);
    let mut prev = Prev::default();
    for _ in 0..n {
        let mut c = Cursor::new(buf.chunk());
        let ticket = c.ticket(&mut prev)?;
        let v = c.uvarint("verdict")?;
        let used = c.at;
        buf.advance(used);
        let verdict = match ((v & 7) as u8, v >> 3) {
            (V_DONE, n) => {
                Verdict::Done(u32::try_from(n).or_else(|_| err(format!("output count {n}")))?)
            }
            (V_FILTERED, 0) => Verdict::Filtered,
            (V_ERROR, 0) => Verdict::Error(get_str(buf, "error")?),
            (V_PANICKED, 0) => Verdict::Panicked(get_str(buf, "panic")?),
            (V_TIMED_OUT, 0) => Verdict::TimedOut,
            _ => return err(format!("verdict {v}")),
        };
        items.push((ticket, verdict));
    }
    let outputs = get_outputs(buf)?;
    Ok(Frame::Results {
        complete,
        items,
        outputs,
    })
}

/// What [`put_outputs`] wrote.
fn get_outputs(buf: &mut Bytes) -> Result<Vec<Emitted>, DecodeError> {
    let n = get_count(buf, MIN_OUTPUT, "outputs")?;
    let mut outputs = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = Cursor::new(buf.chunk());
        let flags = c.u8("output flags")?;
        if flags & !(F_KEY | F_HEADERS | F_PATH | F_SEEN) != 0 {
            return err(format!("output flags {flags:#x}"));
        }
        let payload_len = c.len("output")?;
        let key_len = if flags & F_KEY != 0 { c.len("key")? } else { 0 };
        let path = if flags & F_PATH != 0 {
            c.u64_le("path")?
        } else {
            0
        };
        let used = c.at;
        buf.advance(used);
        let payload = take(buf, payload_len, "output")?;
        let meta = get_meta(buf, flags, key_len)?;
        outputs.push(Emitted::with_meta(
            payload,
            meta.with_path_seen(path, flags & F_SEEN != 0),
        ));
    }
    Ok(outputs)
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
                at_most_once,
            } => {
                dst.put_u8(WELCOME);
                dst.put_u32(*worker);
                dst.put_u32(*heartbeat_ms);
                dst.put_u32(*max_frame);
                dst.put_u8(u8::from(*at_most_once));
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
            } => put_results(dst, *complete, items, outputs),
            Frame::Ticks(outputs) => {
                dst.reserve(1 + U64_MAX_LEN + outputs.iter().map(output_len).sum::<usize>());
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
                at_most_once: match get_u8(buf, "at-most-once flag")? {
                    0 => false,
                    1 => true,
                    b => return err(format!("at-most-once flag {b}")),
                },
            },
            FETCH => Frame::Fetch {
                max: get_u32(buf, "max")?,
            },
            BATCH => Frame::Batch(Arc::new(get_msgs(buf, "batch")?)),
            RETURNED => Frame::Returned(get_msgs(buf, "returned")?),
            GIVE_BACK => Frame::GiveBack,
            RESULTS => get_results(buf)?,
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
    use crate::msg::{FROM_SOURCE as FROM_SOURCE_PARENT, NO_TASK};
    use proptest::prelude::*;
    use std::time::Duration;

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
            meta: Meta::new(Some(Bytes::from_static(b"alice")), headers)
                .with_path(0x0123_4567_89ab_cdef),
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
                at_most_once: true,
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

    /// Regression: a text longer than a string field was cut at byte
    /// 65,535 even inside a character, and the frame then failed to decode
    /// ("not UTF-8"), taking the session down with it.
    #[test]
    fn an_overlong_text_is_cut_at_a_character_boundary() {
        let long = format!("{}é and more", "a".repeat(u16::MAX as usize - 1));
        let f = Frame::Error {
            code: ErrorCode::Auth,
            message: long.clone(),
        };
        let Frame::Error { message, .. } = roundtrip(&f) else {
            panic!("not an error frame");
        };
        assert_eq!(message, "a".repeat(u16::MAX as usize - 1));
        assert!(long.starts_with(&message));
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
        let Frame::Results { items, .. } = roundtrip(&results) else {
            panic!("not results");
        };
        let copies: Vec<u32> = items.iter().map(|(t, _)| t.copy).collect();
        assert_eq!(copies, [3, 2, 1]);
        // After the first, a sibling's ticket differs by its copy alone: a
        // byte for each field (two for this task's number), as does a
        // filtered verdict.
        let one = Frame::Results {
            complete: false,
            items: items[..1].to_vec(),
            outputs: Vec::new(),
        };
        assert_eq!(
            results.to_wire().len() - one.to_wire().len(),
            2 * (MIN_RESULT_ITEM + 1)
        );
    }

    /// The layout the module's docs draw, byte by byte: the second message
    /// of a batch is sent as differences from the first.
    #[test]
    fn a_batch_is_laid_out_as_documented() {
        let ctx = |id: u64, timestamp| MsgCtx {
            id: MsgId::Int(id),
            origin: Origin {
                attempt: 1,
                delivered: 1,
                timestamp,
                deadline: 0,
            },
            parent: FROM_SOURCE_PARENT,
            meta: Meta::default(),
        };
        let frame = Frame::batch(vec![
            TaskMsg {
                ticket: Ticket {
                    slot: 300,
                    gen: 2,
                    task: 1,
                    copy: 7,
                },
                payload: Bytes::from_static(b"ab"),
                ctx: ctx(1000, 5),
            },
            TaskMsg {
                ticket: Ticket {
                    slot: 299,
                    gen: 2,
                    task: 1,
                    copy: 8,
                },
                payload: Bytes::from_static(b"c"),
                ctx: ctx(1001, 5).with_key("k"),
            },
        ]);
        let wire = frame.to_wire();
        #[rustfmt::skip]
        let want: &[u8] = &[
            BATCH, 2,
            // flags, slot 300 (zigzag 600), gen, task, copy
            0, 0xd8, 0x04, 4, 1, 14,
            // id 1000 (zigzag 2000), attempt, deliveries, parent (none: 0),
            // timestamp, payload length, payload
            0xd0, 0x0f, 1, 1, 0, 10, 2, b'a', b'b',
            // a key, attempt, deliveries and parent the same; slot -1, gen
            // and task the same, copy +1
            F_KEY | F_SAME, 1, 0, 1, 2,
            // id +1, timestamp +0, payload and key lengths, payload, key
            2, 0, 1, 1, b'c', b'k',
        ];
        assert_eq!(&wire[4..], want);
        assert_eq!(roundtrip(&frame), frame);
    }

    /// Integers at their limits, and differences that wrap, survive; the
    /// longest encodings fit the room kept for them.
    #[test]
    fn integers_at_their_limits_round_trip() {
        for v in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut dst = BytesMut::new();
            put_uvarint(&mut dst, v);
            assert!(dst.len() <= U64_MAX_LEN);
            let mut c = Cursor::new(&dst);
            assert_eq!(c.uvarint("v"), Ok(v));
            assert_eq!(c.at, dst.len());
        }
        for (a, b) in [(0u32, u32::MAX), (u32::MAX, 0), (0, 1 << 31), (1 << 31, 0)] {
            let (mut p, mut q) = (a, a);
            let mut head = Head::new();
            head.delta32(&mut p, b);
            let mut c = Cursor::new(&head.buf[..head.len]);
            assert_eq!(c.delta32(&mut q, "d"), Ok(b));
        }
        // Every difference as far from the last as it can be.
        let far = TaskMsg {
            ticket: Ticket {
                slot: 1 << 31,
                gen: 1 << 31,
                task: u16::MAX,
                copy: 1 << 31,
            },
            payload: Bytes::from_static(b"p"),
            ctx: MsgCtx {
                id: MsgId::Int(1 << 63),
                origin: Origin {
                    attempt: u32::MAX,
                    delivered: u32::MAX,
                    timestamp: 1 << 63,
                    deadline: 0,
                },
                parent: Parent {
                    task: NO_TASK - 1,
                    name: NO_NAME,
                },
                meta: Meta::new(Some(Bytes::from_static(b"k")), Headers::new()).with_path(u64::MAX),
            },
        };
        let frame = Frame::batch(vec![far.clone(), far]);
        let wire = frame.to_wire();
        assert!(wire.len() - 4 <= BATCH_HEAD + 2 * task_msg_len(&frame_msgs(&frame)[0]));
        assert_eq!(roundtrip(&frame), frame);
        // An integer of more than 64 bits is refused.
        let mut long = vec![BATCH];
        long.extend([0xff; 9]);
        long.push(0x02);
        assert!(Frame::decode_body(Bytes::from(long)).is_err());
    }

    fn frame_msgs(frame: &Frame) -> &[TaskMsg] {
        match frame {
            Frame::Batch(m) => m,
            Frame::Returned(m) => m,
            _ => &[],
        }
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
        assert!(wire.len() - 4 <= BATCH_HEAD + task_msg_len(&msgs[0]));
        // A deadline already passed arrives as passed, not as none.
        let past = MsgCtx::new(1).with_deadline(Instant::now() - Duration::from_secs(1));
        let frame = Frame::batch(vec![TaskMsg {
            ctx: past,
            ..msgs[0].clone()
        }]);
        let Frame::Batch(msgs) = roundtrip(&frame) else {
            panic!("not a batch");
        };
        assert!(msgs[0].ctx.deadline().expect("a deadline") <= Instant::now());
    }

    /// Regression: the smallest-message bound assumed an integer id, so a
    /// batch of messages with short byte ids was refused as too many to
    /// fit its frame. A message takes at least `MIN_TASK_MSG` bytes and at
    /// most `task_msg_len`.
    #[test]
    fn batches_of_short_byte_ids_decode_and_sizes_are_bounded() {
        let msgs: Vec<TaskMsg> = (0..100u8)
            .map(|i| TaskMsg {
                ticket: Ticket {
                    slot: u32::from(i),
                    gen: 0,
                    task: 0,
                    copy: u32::from(i),
                },
                payload: Bytes::new(),
                ctx: MsgCtx {
                    id: MsgId::Bytes(Bytes::new()),
                    origin: Origin {
                        attempt: 1,
                        delivered: 1,
                        timestamp: 0,
                        deadline: 0,
                    },
                    parent: FROM_SOURCE_PARENT,
                    meta: Meta::default(),
                },
            })
            .collect();
        let frame = Frame::batch(msgs);
        let wire = frame.to_wire();
        let Frame::Batch(back) = Frame::decode_body(wire.slice(4..)).unwrap() else {
            panic!("not a batch");
        };
        assert_eq!(back.len(), 100);
        // The first message says its attempt, deliveries and parent; the
        // others, the same, take the least a message can.
        assert_eq!(wire.len() - 4, 2 + (MIN_TASK_MSG + 3) + 99 * MIN_TASK_MSG);
        let sized: usize = back.iter().map(task_msg_len).sum();
        assert!(wire.len() - 4 <= BATCH_HEAD + sized);
        let rich = TaskMsg {
            ticket: back[0].ticket,
            payload: Bytes::from_static(b"payload"),
            ctx: rich_ctx(),
        };
        let one = Frame::batch(vec![rich.clone()]).to_wire();
        assert!(one.len() - 4 <= BATCH_HEAD + task_msg_len(&rich));
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
            // A count that does not end, and one too large for the frame.
            &[BATCH, 0xff, 0xff, 0xff, 0xff][..],
            &[BATCH, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..],
            // A message flag no version has.
            &[BATCH, 1, 0x80, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0][..],
            // A payload longer than what is left.
            &[BATCH, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 5, 1][..],
            &[BATCH, 1, F_SAME, 0, 0, 0, 0, 0, 0, 5, 1][..],
            // A parent beyond a u16.
            &[BATCH, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0x80, 0x80, 0x04, 0, 0][..],
            // An attempt beyond a u32.
            &[
                BATCH, 1, 0, 0, 0, 0, 0, 0, 0x80, 0x80, 0x80, 0x80, 0x10, 1, 0, 0, 0,
            ][..],
            &[RESULTS, 2][..],
            // One result: a ticket (a byte a field), then an unknown verdict.
            &[RESULTS, 1, 1, 0, 0, 0, 0, 7, 0][..],
            // A filtered verdict with an output count.
            &[RESULTS, 1, 1, 0, 0, 0, 0, 1 | 8, 0][..],
            // An output with an unknown flag.
            &[RESULTS, 1, 0, 1, 0x80, 0][..],
            // Bytes after the frame.
            &[RESULTS, 1, 0, 0, 0][..],
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
            prop_oneof![Just(0u64), any::<u64>()],
        )
            .prop_map(
                |(id, attempt, delivered, timestamp, parent, (key, headers), path)| MsgCtx {
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
                    meta: Meta::new(key, headers).with_path_seen(path, path % 2 == 1),
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
                proptest::collection::vec((bytes.clone(), meta.clone(), any::<u64>()), 0..8)
            )
                .prop_map(|(complete, items, outputs)| Frame::Results {
                    complete,
                    items,
                    outputs: outputs
                        .into_iter()
                        .map(|(payload, (key, headers), path)| {
                            let mut o = Emitted::new(payload, key, headers);
                            o.set_path(path, path % 3 == 0);
                            o
                        })
                        .collect(),
                }),
            proptest::collection::vec((bytes, meta), 0..8).prop_map(|outputs| Frame::Ticks(
                outputs
                    .into_iter()
                    .map(|(payload, (key, headers))| Emitted::new(payload, key, headers))
                    .collect()
            )),
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

        /// Valid frames with bytes changed, cut short or lengthened never
        /// panic the decoder either (random bytes rarely get past a tag).
        #[test]
        fn damaged_frames_never_panic(
            frame in arb_frame(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cut in any::<prop::sample::Index>(),
            extra in proptest::collection::vec(any::<u8>(), 0..4),
        ) {
            let mut body = frame.to_wire()[4..].to_vec();
            for (at, b) in &edits {
                let i = at.index(body.len());
                body[i] = *b;
            }
            let _ = Frame::decode_body(Bytes::from(body.clone()));
            body.truncate(cut.index(body.len() + 1));
            let _ = Frame::decode_body(Bytes::from(body.clone()));
            body.extend(extra);
            let _ = Frame::decode_body(Bytes::from(body));
        }

        /// Deadlines (sent as the time left, each the difference from the
        /// last) arrive within a moment of where they were, and the rest of
        /// each message exactly.
        #[test]
        fn deadlines_round_trip(lefts in proptest::collection::vec(proptest::option::of(0u64..40 * 24 * 3600 * 1000), 1..20)) {
            let now = Instant::now();
            let msgs: Vec<TaskMsg> = lefts
                .iter()
                .enumerate()
                .map(|(i, left)| {
                    let ctx = MsgCtx::new(i as u64);
                    TaskMsg {
                        ticket: Ticket { slot: i as u32, gen: 1, task: 0, copy: i as u32 },
                        payload: Bytes::from_static(b"x"),
                        ctx: match left {
                            Some(ms) => ctx.with_deadline(now + Duration::from_millis(*ms)),
                            None => ctx,
                        },
                    }
                })
                .collect();
            let Frame::Batch(back) = roundtrip(&Frame::batch(msgs.clone())) else {
                panic!("not a batch");
            };
            for (sent, got) in msgs.iter().zip(back.iter()) {
                match (sent.ctx.deadline(), got.ctx.deadline()) {
                    (None, None) => {}
                    (Some(a), Some(b)) => {
                        let off = if a > b { a - b } else { b - a };
                        prop_assert!(off < Duration::from_secs(5), "off by {:?}", off);
                    }
                    (a, b) => prop_assert!(false, "deadline {:?} came as {:?}", a, b),
                }
                let mut got = got.clone();
                got.ctx.origin.deadline = sent.ctx.origin.deadline;
                prop_assert_eq!(&got, sent);
            }
        }
    }
}
