//! Durations as the file and the environment write them: a number under a key that names its
//! unit (`http_timeout_ms`, `ledger_ttl_secs`), so files written before the fields were typed
//! still load. Each module is a `#[serde(with = "…")]` for one unit.

use std::{fmt, time::Duration};

use serde::{
    Deserializer, Serializer,
    de::{self, Visitor},
};

/// Reads a whole, non-negative number; `unit` names it in the error ("a whole number of
/// milliseconds, found string \"5m\"").
struct Whole(&'static str);

impl Visitor<'_> for Whole {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a whole number of {}", self.0)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v).map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
    }
}

fn whole<'de, D: Deserializer<'de>>(d: D, unit: &'static str) -> Result<u64, D::Error> {
    d.deserialize_u64(Whole(unit))
}

fn saturating_u64(n: u128) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// Whole milliseconds.
pub mod millis {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(saturating_u64(d.as_millis()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        whole(d, "milliseconds").map(Duration::from_millis)
    }
}

/// Whole seconds.
pub mod secs {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        whole(d, "seconds").map(Duration::from_secs)
    }
}

/// Whole seconds, 0 meaning "none" (a check turned off, or the default behaviour instead).
pub mod secs_or_none {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.map_or(0, |d| d.as_secs()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        whole(d, "seconds").map(|n| (n > 0).then(|| Duration::from_secs(n)))
    }
}

/// Seconds with a fraction (`240.0`, `0.3`).
pub mod secs_f64 {
    use super::*;

    struct Seconds;

    impl Visitor<'_> for Seconds {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a number of seconds, 0 or more")
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
            Duration::try_from_secs_f64(v).map_err(|_| E::invalid_value(de::Unexpected::Float(v), &self))
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
            Ok(Duration::from_secs(v))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            u64::try_from(v).map(Duration::from_secs).map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
        }
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_f64(Seconds)
    }
}
