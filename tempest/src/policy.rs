//! [`FailurePolicy`]: what happens to a message a task fails or that times
//! out. At the bottom of the runtime with [`msg`](crate::msg): the in-flight
//! table, the topology and the configuration all read it.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};

/// What happens to a message when a task fails it or it times out.
///
/// In `Topology.toml`: `failure_policy = "none"`, `"best_effort"` or
/// `{ retry = 3 }`; anything else is an error that shows these forms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Give up on the message without acking it: the source redelivers it
    /// (its own visibility timeout or pending list).
    None,
    /// Ack it anyway. A task error counts as that task emitting nothing, so
    /// the rest of the DAG still runs; a timeout acks at once.
    BestEffort,
    /// Run the whole message again from the root, up to this many times,
    /// after a backoff that doubles each time; then give up as with `None`.
    Retry(u32),
}

/// The forms `failure_policy` takes, for error messages.
const POLICY_FORMS: &str =
    "write failure_policy = { retry = 3 } (retry up to 3 times), \"none\" or \"best_effort\"";

impl<'de> Deserialize<'de> for FailurePolicy {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(PolicyVisitor)
    }
}

struct PolicyVisitor;

impl<'de> Visitor<'de> for PolicyVisitor {
    type Value = FailurePolicy;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"none\", \"best_effort\" or { retry = N }")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<FailurePolicy, E> {
        let plain: String = s
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .map(|c| c.to_ascii_lowercase())
            .collect();
        match s {
            "none" => Ok(FailurePolicy::None),
            "best_effort" => Ok(FailurePolicy::BestEffort),
            _ if plain.starts_with("retry") => {
                let count = plain["retry".len()..].parse::<u32>().unwrap_or(3);
                Err(E::custom(format!(
                    "\"{s}\" needs a count, as a table: write failure_policy = {{ retry = {count} }}; the other policies are \"none\" and \"best_effort\""
                )))
            }
            _ if plain == "none" || plain == "besteffort" => Err(E::custom(format!(
                "unknown policy \"{s}\"; did you mean \"{}\"?",
                if plain == "none" {
                    "none"
                } else {
                    "best_effort"
                }
            ))),
            _ => Err(E::custom(format!("unknown policy \"{s}\"; {POLICY_FORMS}"))),
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FailurePolicy, A::Error> {
        let mut retries = None;
        while let Some(key) = map.next_key::<String>()? {
            if key != "retry" {
                return Err(de::Error::custom(format!(
                    "unknown key \"{key}\" in the policy; {POLICY_FORMS}"
                )));
            }
            if retries.is_some() {
                return Err(de::Error::custom("retry is given twice"));
            }
            retries = Some(map.next_value::<RetryCount>()?.0);
        }
        retries.map(FailurePolicy::Retry).ok_or_else(|| {
            de::Error::custom(format!("an empty table is not a policy; {POLICY_FORMS}"))
        })
    }
}

/// The `N` of `{ retry = N }`.
struct RetryCount(u32);

impl<'de> Deserialize<'de> for RetryCount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Count;
        impl Visitor<'_> for Count {
            type Value = RetryCount;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a retry count")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<RetryCount, E> {
                u32::try_from(n).map(RetryCount).map_err(|_| {
                    E::custom(format!(
                        "the retry count {n} is too large (at most {})",
                        u32::MAX
                    ))
                })
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<RetryCount, E> {
                match u64::try_from(n) {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::custom(format!(
                        "the retry count {n} is negative; write failure_policy = {{ retry = 3 }}, or \"none\" for no retries"
                    ))),
                }
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<RetryCount, E> {
                let count = s.trim().parse::<u32>().unwrap_or(3);
                Err(E::custom(format!(
                    "the retry count is a number, not a string: write failure_policy = {{ retry = {count} }}"
                )))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<RetryCount, E> {
                Err(E::custom(format!(
                    "the retry count {n} is not a whole number: write failure_policy = {{ retry = 3 }}"
                )))
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<RetryCount, E> {
                Err(E::custom(format!(
                    "the retry count {b} is not a number: write failure_policy = {{ retry = 3 }}"
                )))
            }
        }
        deserializer.deserialize_any(Count)
    }
}
