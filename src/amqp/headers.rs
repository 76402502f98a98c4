//! Every `x-wxpush-*` header wxpush writes on a message, and the readers of the ones it reads
//! back. Nothing else names a header, so the envelope format is on one page.

use chrono::{DateTime, Utc};

pub use super::header_str;
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, ShortString},
};

/// How many send attempts a job has had (set when it goes to a delay queue).
pub const ATTEMPTS: &str = "x-wxpush-attempts";
/// Why a job was dead-lettered or delayed.
pub const REASON: &str = "x-wxpush-reason";
/// The queue a dead-lettered job came from.
pub const SOURCE_QUEUE: &str = "x-wxpush-source-queue";
/// When the worker dead-lettered a job (RFC 3339).
pub const DEAD_LETTERED_AT: &str = "x-wxpush-dead-lettered-at";
/// Set on a job parked for the daily quota, so that its `send.deferred` notice goes out once.
pub const PARKED: &str = "x-wxpush-parked";

/// The webhook's dead-lettered pushes: where they came from and the request that carried them.
pub mod push {
    pub const SOURCE: &str = "x-wxpush-source";
    pub const ACCOUNT: &str = "x-wxpush-account";
    pub const TIMESTAMP: &str = "x-wxpush-timestamp";
    pub const NONCE: &str = "x-wxpush-nonce";
    pub const SIGNATURE: &str = "x-wxpush-signature";
    pub const MSG_SIGNATURE: &str = "x-wxpush-msg-signature";
    pub const ENCRYPT_TYPE: &str = "x-wxpush-encrypt-type";
    pub const OPENID: &str = "x-wxpush-openid";
}

/// RabbitMQ's own headers on a message it dead-lettered.
pub mod broker {
    pub const DEATH: &str = "x-death";
    pub const FIRST_DEATH_EXCHANGE: &str = "x-first-death-exchange";
    pub const FIRST_DEATH_QUEUE: &str = "x-first-death-queue";
    pub const FIRST_DEATH_REASON: &str = "x-first-death-reason";
    pub const LAST_DEATH_EXCHANGE: &str = "x-last-death-exchange";
    pub const LAST_DEATH_QUEUE: &str = "x-last-death-queue";
    pub const LAST_DEATH_REASON: &str = "x-last-death-reason";
}

/// A header as text: strings as they are, numbers and the rest in a readable form.
pub fn text_of(props: &BasicProperties, name: &str) -> Option<String> {
    props.headers().as_ref()?.inner().get(name).map(value_text)
}

fn value_text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::Timestamp(t) => chrono::DateTime::from_timestamp(*t as i64, 0)
            .map_or_else(|| t.to_string(), |d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        AMQPValue::ByteArray(b) => String::from_utf8_lossy(b.as_slice()).into_owned(),
        other => format!("{other:?}"),
    }
}

fn has(props: &BasicProperties, name: &str) -> bool {
    props.headers().as_ref().is_some_and(|h| h.inner().contains_key(name))
}

/// Whether the job was parked before (its `send.deferred` notice went out then).
pub fn is_parked(props: &BasicProperties) -> bool {
    has(props, PARKED)
}

/// Attempts so far, from [`ATTEMPTS`] (any integer type a publisher may have used); 0 when there
/// is none. A header that is not a whole number from 0 to 2^32 - 1 is an error (its text says
/// what it held): a corrupt count must neither reset a job's attempts nor wrap around.
pub fn attempts(props: &BasicProperties) -> Result<u32, String> {
    let Some(value) = props.headers().as_ref().and_then(|h| h.inner().get(ATTEMPTS)) else { return Ok(0) };
    let n: Option<i64> = match value {
        AMQPValue::ShortShortInt(v) => Some((*v).into()),
        AMQPValue::ShortShortUInt(v) => Some((*v).into()),
        AMQPValue::ShortInt(v) => Some((*v).into()),
        AMQPValue::ShortUInt(v) => Some((*v).into()),
        AMQPValue::LongInt(v) => Some((*v).into()),
        AMQPValue::LongUInt(v) => Some((*v).into()),
        AMQPValue::LongLongInt(v) => Some(*v),
        _ => None,
    };
    n.and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| format!("header {ATTEMPTS} is not a count of attempts: {value:?}"))
}

/// `props` with `edit` applied to a copy of its headers, made persistent (delivery mode 2).
fn edited(props: &BasicProperties, edit: impl FnOnce(&mut FieldTable)) -> BasicProperties {
    let mut headers = props.headers().clone().unwrap_or_default();
    edit(&mut headers);
    props.clone().with_headers(headers).with_delivery_mode(2)
}

/// The envelope of a job on its way to a delay queue: its attempts so far, why it waits, and
/// whether it is parked for the daily quota.
pub fn delayed(props: &BasicProperties, attempts: u32, why: &str, parked: bool) -> BasicProperties {
    edited(props, |h| {
        h.insert(ShortString::from(ATTEMPTS), AMQPValue::LongUInt(attempts));
        h.insert(ShortString::from(REASON), header_str(why));
        if parked {
            h.insert(ShortString::from(PARKED), AMQPValue::Boolean(true));
        }
    })
}

/// The envelope of a job on its way to the dead-letter queue: why, from where, and when.
pub fn dead_lettered(props: &BasicProperties, reason: &str, source_queue: &str, at: DateTime<Utc>) -> BasicProperties {
    edited(props, |h| {
        h.insert(ShortString::from(REASON), header_str(reason));
        h.insert(ShortString::from(SOURCE_QUEUE), header_str(source_queue));
        h.insert(ShortString::from(DEAD_LETTERED_AT), header_str(&at.to_rfc3339()));
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(name: &str, value: AMQPValue) -> BasicProperties {
        let mut h = FieldTable::default();
        h.insert(ShortString::from(name), value);
        BasicProperties::default().with_headers(h)
    }

    #[test]
    fn attempts_read_any_integer_and_refuse_the_rest() {
        assert_eq!(attempts(&BasicProperties::default()), Ok(0));
        assert_eq!(attempts(&with(ATTEMPTS, AMQPValue::ShortShortUInt(3))), Ok(3));
        assert_eq!(attempts(&with(ATTEMPTS, AMQPValue::LongLongInt(7))), Ok(7));
        for bad in [AMQPValue::LongLongInt(-1), AMQPValue::LongLongInt(1 << 33), header_str("3")] {
            let e = attempts(&with(ATTEMPTS, bad)).unwrap_err();
            assert!(e.contains(ATTEMPTS), "{e}");
        }
    }

    #[test]
    fn delayed_and_dead_lettered_envelopes_keep_other_headers() {
        let props = with("x-custom", header_str("kept"));
        let d = delayed(&props, 2, "busy", true);
        assert_eq!(attempts(&d), Ok(2));
        assert!(is_parked(&d) && !is_parked(&props));
        assert_eq!(text_of(&d, REASON).as_deref(), Some("busy"));
        assert_eq!(text_of(&d, "x-custom").as_deref(), Some("kept"));
        assert_eq!(*d.delivery_mode(), Some(2));
        let dl = dead_lettered(&props, "expired", "jobs", Utc::now());
        assert_eq!(text_of(&dl, SOURCE_QUEUE).as_deref(), Some("jobs"));
        assert!(text_of(&dl, DEAD_LETTERED_AT).is_some());
        assert!(!is_parked(&dl));
    }
}
