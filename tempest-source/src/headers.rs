//! [`Headers`]: small named values that travel with a message through every
//! hop of a pipeline and across the wire.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

/// The most headers one message may carry.
pub const MAX_HEADERS: usize = 32;
/// The longest header name, in bytes.
pub const MAX_HEADER_NAME: usize = 255;
/// The longest header value, in bytes.
pub const MAX_HEADER_VALUE: usize = u16::MAX as usize;

/// A header that cannot be set, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// The name is empty or longer than [`MAX_HEADER_NAME`] bytes.
    #[error("header name {0:?} must be 1 to 255 bytes long")]
    Name(String),
    /// The value is longer than [`MAX_HEADER_VALUE`] bytes.
    #[error("header {name:?}: a value of {len} bytes is longer than the limit of 65535")]
    Value {
        /// The header's name.
        name: String,
        /// The value's length.
        len: usize,
    },
    /// The message already carries [`MAX_HEADERS`] headers.
    #[error("header {0:?}: a message carries at most 32 headers")]
    TooMany(String),
}

/// Small named values a message carries: set by a source (a broker's
/// message headers) or a task, inherited by every output of a task unless
/// it sets its own, and carried across the wire in distributed mode.
///
/// Empty headers take no allocation; cloning never copies (the entries are
/// shared, and copied only when a clone is changed). Names are compared
/// exactly; setting a name again replaces its value.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Headers(Option<Arc<Entries>>);

/// Names and values, in the order first set.
type Entries = Vec<(Box<str>, Bytes)>;

impl Headers {
    /// No headers.
    pub const fn new() -> Self {
        Headers(None)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |v| v.len())
    }

    /// The value of header `name`.
    pub fn get(&self, name: &str) -> Option<&Bytes> {
        self.0
            .as_ref()?
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, v)| v)
    }

    /// The value of header `name` as text, if it is UTF-8.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Every header, in the order they were first set.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Bytes)> + '_ {
        self.0.iter().flat_map(|v| v.iter()).map(|(n, v)| (&**n, v))
    }

    /// Sets header `name` to `value`, replacing an earlier value.
    pub fn insert(
        &mut self,
        name: impl Into<String>,
        value: impl Into<Bytes>,
    ) -> Result<(), HeaderError> {
        let name: String = name.into();
        let value: Bytes = value.into();
        if name.is_empty() || name.len() > MAX_HEADER_NAME {
            return Err(HeaderError::Name(name));
        }
        if value.len() > MAX_HEADER_VALUE {
            return Err(HeaderError::Value {
                len: value.len(),
                name,
            });
        }
        let entries = Arc::make_mut(self.0.get_or_insert_with(Default::default));
        if let Some(slot) = entries.iter_mut().find(|(n, _)| **n == *name) {
            slot.1 = value;
            return Ok(());
        }
        if entries.len() >= MAX_HEADERS {
            return Err(HeaderError::TooMany(name));
        }
        entries.push((name.into_boxed_str(), value));
        Ok(())
    }

    /// Removes header `name`, returning its value.
    pub fn remove(&mut self, name: &str) -> Option<Bytes> {
        let entries = Arc::make_mut(self.0.as_mut()?);
        let at = entries.iter().position(|(n, _)| &**n == name)?;
        let (_, value) = entries.remove(at);
        if entries.is_empty() {
            self.0 = None;
        }
        Some(value)
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.iter().map(|(n, v)| (n, String::from_utf8_lossy(v))))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_replace_share_and_refuse_what_cannot_travel() {
        let mut h = Headers::new();
        assert!(h.is_empty());
        h.insert("trace", "a").unwrap();
        h.insert("tenant", "t1").unwrap();
        h.insert("trace", "b").unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h.get_str("trace"), Some("b"));
        let copy = h.clone();
        h.remove("trace");
        assert_eq!(copy.get_str("trace"), Some("b"), "a clone keeps its own");
        assert_eq!(h.iter().map(|(n, _)| n).collect::<Vec<_>>(), ["tenant"]);
        assert!(matches!(h.insert("", "x"), Err(HeaderError::Name(_))));
        assert!(matches!(
            h.insert("big", vec![0u8; 70_000]),
            Err(HeaderError::Value { len: 70_000, .. })
        ));
        for i in 1..MAX_HEADERS {
            h.insert(format!("h{i}"), "v").unwrap();
        }
        assert_eq!(h.len(), MAX_HEADERS);
        let err = h.insert("one-more", "v").unwrap_err();
        assert!(err.to_string().contains("at most 32"), "{err}");
        h.remove("tenant");
        for i in 1..MAX_HEADERS {
            h.remove(&format!("h{i}"));
        }
        assert_eq!(h, Headers::new(), "emptied headers hold nothing");
    }
}
