//! JSON log lines that query cleanly: one object per line, every field at the top level with
//! its own JSON type, the fields of the enclosing spans (a job's `job_id` and `account`)
//! included.
//!
//! tracing-subscriber's JSON format nests span fields under `span`/`spans`; json-subscriber can
//! flatten them but then writes a key twice when an event repeats a field of its span. Here the
//! event's own value wins, then the innermost span's.

use std::{collections::HashSet, fmt};

use serde_json::{Map, Value};
use tracing::{Event, Subscriber, field::Field};
use tracing_log::NormalizeEvent;
use tracing_subscriber::{
    fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, format::Writer},
    registry::LookupSpan,
};

/// The event format of `WXPUSH_LOG_FORMAT=json`. Span fields must be recorded as JSON
/// (`tracing_subscriber::fmt::format::JsonFields`), which is how they are read back here.
pub struct FlatJson;

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let mut line = Map::new();
        line.insert("timestamp".into(), chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true).into());
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        let mut fields = TypedFields::default();
        event.record(&mut fields);
        let mut seen: HashSet<String> = line.keys().cloned().collect();
        for (key, value) in fields.0 {
            if seen.insert(key.clone()) {
                line.insert(key, value);
            }
        }
        if let Some(scope) = ctx.event_scope() {
            // Leaf first: the innermost span's value of a field wins.
            for span in scope {
                let extensions = span.extensions();
                let Some(recorded) = extensions.get::<FormattedFields<N>>() else { continue };
                let Ok(Value::Object(span_fields)) = serde_json::from_str::<Value>(recorded) else { continue };
                for (key, value) in span_fields {
                    if seen.insert(key.clone()) {
                        line.insert(key, value);
                    }
                }
            }
        }
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// An event's fields as typed JSON values, in the order they were written.
#[derive(Default)]
struct TypedFields(Vec<(String, Value)>);

impl TypedFields {
    fn put(&mut self, field: &Field, value: Value) {
        let name = field.name();
        // `log` records carry their metadata as fields; it is already in target and level.
        if name.starts_with("log.") {
            return;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        self.0.push((name.to_owned(), value));
    }
}

impl tracing::field::Visit for TypedFields {
    fn record_f64(&mut self, field: &Field, value: f64) {
        // NaN and infinities have no JSON number: null rather than a string.
        self.put(field, serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.put(field, i64::try_from(value).map_or_else(|_| value.to_string().into(), Value::from));
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.put(field, u64::try_from(value).map_or_else(|_| value.to_string().into(), Value::from));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string().into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `message` arrives here as format_args!, whose Debug is its text.
        self.put(field, format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use serde_json::json;
    use tracing::{info, info_span, warn};
    use tracing_subscriber::fmt::{MakeWriter, format::JsonFields};

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    /// The lines `run` logs, as written and as parsed.
    fn lines(run: impl FnOnce()) -> Vec<(String, Value)> {
        let out = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .with_writer(out.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, run);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| (l.to_owned(), serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))))
            .collect()
    }

    #[test]
    fn fields_are_typed_and_span_fields_are_top_level() {
        let errcode: Option<i64> = Some(43004);
        let missing: Option<&str> = None;
        let got = lines(|| {
            let span = info_span!("job", job_id = "order-42", account = "default");
            let _entered = span.enter();
            warn!(errcode, reason = "require subscribe", attempts = 1u32, retry = false, missing, "job failed");
        });
        assert_eq!(got.len(), 1);
        let line = &got[0].1;
        assert_eq!(line["message"], json!("job failed"));
        assert_eq!(line["errcode"], json!(43004), "a number, not \"Some(43004)\"");
        assert_eq!(line["attempts"], json!(1));
        assert_eq!(line["retry"], json!(false));
        assert_eq!(line["job_id"], json!("order-42"));
        assert_eq!(line["account"], json!("default"));
        assert_eq!(line["level"], json!("WARN"));
        assert!(line.get("missing").is_none(), "a None field is left out");
        assert!(line.get("span").is_none() && line.get("spans").is_none(), "{line}");
        assert!(line["timestamp"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn no_key_is_written_twice_and_the_nearest_value_wins() {
        let got = lines(|| {
            let outer = info_span!("batch", account = "outer", batch = 7u64);
            let _o = outer.enter();
            let inner = info_span!("job", job_id = "j1", account = "inner");
            let _i = inner.enter();
            info!(job_id = "from-event", "override");
            info!("plain");
        });
        let raw = &got[0].0;
        assert_eq!(raw.matches("\"job_id\"").count(), 1, "{raw}");
        assert_eq!(raw.matches("\"account\"").count(), 1, "{raw}");
        assert_eq!(got[0].1["job_id"], json!("from-event"));
        assert_eq!(got[0].1["account"], json!("inner"));
        assert_eq!(got[1].1["job_id"], json!("j1"));
        assert_eq!(got[1].1["batch"], json!(7));
    }
}
