//! Reading Redis replies without panicking on anything the server sends.

use redis::{RedisError, Value};
use tempest_source::SourceError;

/// The bytes of a string-like reply.
pub(crate) fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// A string-like reply as text.
pub(crate) fn text(v: &Value) -> Option<String> {
    bytes(v).map(|b| String::from_utf8_lossy(b).into_owned())
}

/// An integer reply (or an integer sent as a string).
pub(crate) fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        other => text(other)?.parse().ok(),
    }
}

/// The items of an array reply; nil is empty.
pub(crate) fn items(v: &Value) -> &[Value] {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        _ => &[],
    }
}

/// One stream entry: its id and, unless its data was trimmed away, its
/// fields.
pub(crate) struct Entry {
    pub id: String,
    pub fields: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

impl Entry {
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .as_ref()?
            .iter()
            .find(|(k, _)| k == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }
}

/// `[[id, [field, value, …]] …]` (nil fields: trimmed).
pub(crate) fn entries(v: &Value) -> Vec<Entry> {
    items(v)
        .iter()
        .filter_map(|e| {
            let parts = items(e);
            let id = text(parts.first()?)?;
            let fields = match parts.get(1) {
                Some(Value::Array(kv)) => Some(
                    kv.chunks(2)
                        .filter_map(|p| {
                            Some((bytes(p.first()?)?.to_vec(), bytes(p.get(1)?)?.to_vec()))
                        })
                        .collect(),
                ),
                Some(Value::Map(kv)) => Some(
                    kv.iter()
                        .filter_map(|(k, v)| Some((bytes(k)?.to_vec(), bytes(v)?.to_vec())))
                        .collect(),
                ),
                _ => None,
            };
            Some(Entry { id, fields })
        })
        .collect()
}

/// The entries of an `XREADGROUP` reply for one stream (nil: none).
pub(crate) fn read_group(v: &Value) -> Vec<Entry> {
    match v {
        Value::Map(streams) => streams.first().map(|(_, e)| entries(e)).unwrap_or_default(),
        other => items(other)
            .first()
            .map(|stream| entries(items(stream).get(1).unwrap_or(&Value::Nil)))
            .unwrap_or_default(),
    }
}

/// Turns a Redis error into a source error: connection trouble is
/// retryable, anything else is not.
pub(crate) fn source_error(what: impl Into<String>, e: RedisError) -> SourceError {
    if is_connection_error(&e) || is_transient(&e) {
        SourceError::unavailable(what, e)
    } else {
        SourceError::failed_with(what, e)
    }
}

/// Whether the error means the connection is gone.
pub(crate) fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout()
}

/// Server errors that pass by themselves: the server is loading its data,
/// busy with a script, failing over.
pub(crate) fn is_transient(e: &RedisError) -> bool {
    matches!(
        e.code(),
        Some("LOADING" | "BUSY" | "TRYAGAIN" | "MASTERDOWN" | "CLUSTERDOWN" | "READONLY")
    )
}

/// Connects to `uri` with a 5 s connect timeout and a read timeout long
/// enough for a blocking read of `block_ms`.
pub(crate) fn connect(uri: &str, block_ms: u64) -> Result<redis::Connection, SourceError> {
    let client = redis::Client::open(uri)
        .map_err(|e| SourceError::failed_with(format!("invalid uri {uri}"), e))?;
    let conn = client
        .get_connection_with_timeout(std::time::Duration::from_secs(5))
        .map_err(|e| source_error(format!("connecting to {uri}"), e))?;
    conn.set_read_timeout(Some(
        std::time::Duration::from_millis(block_ms) + std::time::Duration::from_secs(10),
    ))
    .map_err(|e| source_error("setting the read timeout", e))?;
    Ok(conn)
}

/// The error for an operation without a connection: retryable.
pub(crate) fn not_connected(what: &str) -> SourceError {
    SourceError::unavailable(
        what.to_string(),
        std::io::Error::new(std::io::ErrorKind::NotConnected, "not connected"),
    )
}

/// Runs `cmd` on `conn`; a connection error drops the connection so the
/// runtime reconnects.
pub(crate) fn query(
    conn: &mut Option<redis::Connection>,
    what: &str,
    cmd: &redis::Cmd,
) -> Result<Value, SourceError> {
    let c = conn.as_mut().ok_or_else(|| not_connected(what))?;
    cmd.query::<Value>(c).map_err(|e| {
        if is_connection_error(&e) {
            *conn = None;
        }
        source_error(what.to_string(), e)
    })
}

/// Runs a script on `conn`; a connection error drops the connection so the
/// runtime reconnects.
pub(crate) fn invoke<T: redis::FromRedisValue>(
    conn: &mut Option<redis::Connection>,
    what: &str,
    inv: redis::ScriptInvocation<'_>,
) -> Result<T, SourceError> {
    let c = conn.as_mut().ok_or_else(|| not_connected(what))?;
    inv.invoke::<T>(c).map_err(|e| {
        if is_connection_error(&e) {
            *conn = None;
        }
        source_error(what.to_string(), e)
    })
}

/// The field `name` of a map-like reply: a RESP3 map, or a RESP2 array of
/// alternating names and values (as `XINFO` sends).
pub(crate) fn field<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    match v {
        Value::Map(kv) => kv
            .iter()
            .find(|(k, _)| bytes(k) == Some(name.as_bytes()))
            .map(|(_, v)| v),
        other => items(other)
            .chunks(2)
            .find(|p| p.first().and_then(bytes) == Some(name.as_bytes()))
            .and_then(|p| p.get(1)),
    }
}

/// One line of an extended `XPENDING` reply: `[id, consumer, idle, count]`
/// as (id, delivery count).
pub(crate) fn pending_entry(v: &Value) -> Option<(String, u32)> {
    let p = items(v);
    let id = text(p.first()?)?;
    let count = u32::try_from(int(p.get(3)?)?).ok()?;
    Some((id, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn fields_of_resp2_arrays_and_resp3_maps() {
        let resp2 = Value::Array(vec![
            bulk("name"),
            bulk("c1"),
            bulk("pending"),
            Value::Int(3),
        ]);
        assert_eq!(field(&resp2, "pending"), Some(&Value::Int(3)));
        assert_eq!(field(&resp2, "name").and_then(text).as_deref(), Some("c1"));
        assert_eq!(field(&resp2, "idle"), None);
        let resp3 = Value::Map(vec![(bulk("pending"), Value::Int(4))]);
        assert_eq!(field(&resp3, "pending"), Some(&Value::Int(4)));
        assert_eq!(field(&Value::Nil, "pending"), None);
    }

    #[test]
    fn pending_entries_tolerate_odd_replies() {
        let ok = Value::Array(vec![bulk("1-0"), bulk("c"), Value::Int(10), Value::Int(2)]);
        assert_eq!(pending_entry(&ok), Some(("1-0".to_string(), 2)));
        let short = Value::Array(vec![bulk("1-0"), bulk("c")]);
        assert_eq!(pending_entry(&short), None);
        let negative = Value::Array(vec![bulk("1-0"), bulk("c"), Value::Int(1), Value::Int(-1)]);
        assert_eq!(pending_entry(&negative), None);
    }
}
