//! AMQP short strings: at most 255 bytes on the wire. lapin's `ShortString` accepts any length
//! and fails (or panics) when the frame is written, so every short string built from input
//! (job ids, header names, routing keys made from event names) goes through this type, which
//! cannot hold more than the protocol allows.

use lapin::types::ShortString;
use sha1::{Digest, Sha1};

/// Longest AMQP short string, in bytes.
pub const MAX_SHORT_BYTES: usize = 255;

/// Prefix of the digest that stands for a value too long for a short string.
pub const DIGEST_PREFIX: &str = "sha1:";

/// A string of at most [`MAX_SHORT_BYTES`] bytes, ready to be an AMQP short string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Short(String);

/// A value longer than an AMQP short string allows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} is {len} bytes; AMQP allows at most 255")]
pub struct TooLong {
    pub what: &'static str,
    pub len: usize,
}

impl Short {
    /// `value` as it is, or an error naming `what` when it is too long.
    pub fn new(what: &'static str, value: &str) -> Result<Short, TooLong> {
        if value.len() > MAX_SHORT_BYTES {
            return Err(TooLong { what, len: value.len() });
        }
        Ok(Short(value.to_owned()))
    }

    /// `value` as it is when it fits, otherwise `sha1:` and the 40 lowercase hex digits of the
    /// SHA-1 of its UTF-8 bytes. Used for `correlation_id`: a consumer holding a long job_id
    /// computes the same digest to match it.
    pub fn or_digest(value: &str) -> Short {
        if value.len() <= MAX_SHORT_BYTES {
            return Short(value.to_owned());
        }
        Short(format!("{DIGEST_PREFIX}{}", hex::encode(Sha1::digest(value.as_bytes()))))
    }

    /// `value` cut to the longest prefix that fits, at a character boundary: for names where a
    /// shortened form is still useful (routing keys made from event names, header values).
    pub fn truncated(value: &str) -> Short {
        if value.len() <= MAX_SHORT_BYTES {
            return Short(value.to_owned());
        }
        let mut end = MAX_SHORT_BYTES;
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        Short(value[..end].to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<Short> for ShortString {
    fn from(s: Short) -> ShortString {
        ShortString::from(s.0)
    }
}

impl std::fmt::Display for Short {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_long_value_becomes_its_digest() {
        let cjk = "订".repeat(86);
        assert_eq!(cjk.len(), 258);
        let short = Short::or_digest(&cjk);
        assert!(short.as_str().starts_with("sha1:"));
        assert_eq!(short.as_str().len(), 45);
        assert_eq!(Short::or_digest("order-42").as_str(), "order-42");
        assert_eq!(Short::or_digest(&"a".repeat(255)).as_str(), "a".repeat(255));
    }

    #[test]
    fn new_refuses_what_does_not_fit() {
        assert_eq!(Short::new("a queue name", &"q".repeat(256)), Err(TooLong { what: "a queue name", len: 256 }));
        assert!(Short::new("a queue name", &"q".repeat(255)).is_ok());
    }

    proptest! {
        #[test]
        fn every_value_fits(s in "\\PC{0,300}") {
            for short in [Short::or_digest(&s), Short::truncated(&s)] {
                prop_assert!(short.as_str().len() <= MAX_SHORT_BYTES);
            }
            let t = Short::truncated(&s);
            prop_assert!(s.starts_with(t.as_str()));
        }
    }
}
