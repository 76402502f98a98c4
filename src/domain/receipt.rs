//! Parsing WeChat event pushes (TEMPLATESENDJOBFINISH and the rest).
//!
//! A push body is XML (`<xml><ToUserName>…</xml>`, the official format) or JSON (the format a
//! mini program or an account set to JSON pushes in). Either way it is read into [`Fields`], an
//! object of every element by name, and then into a typed [`Push`]:
//!
//! - leaf elements become strings (CDATA kept exactly, plain text trimmed of the whitespace
//!   pretty-printing adds); nested elements (`SubscribeMsgSentEvent/List`, `ScanCodeInfo`, …)
//!   become JSON objects, and an element repeated under one parent becomes an array;
//! - a safe-mode body is the same shape with an `Encrypt` field: [`parse_fields`] reads it, the
//!   caller checks `msg_signature` and decrypts, and [`Push::parse`] reads the plaintext;
//! - the subscription-message events are typed ([`Subscription`]): their `List`, one object or
//!   an array in JSON and one element or several in XML, becomes a list of items, and a `List`
//!   that cannot be read makes the whole push unreadable.
//!
//! No DTD is ever processed: a `<!DOCTYPE` (the only place entities can be declared) is refused,
//! and an entity reference other than the five predefined ones and character references is an
//! error, so neither external entities nor entity expansion bombs can reach this code.

use chrono::{DateTime, Utc};
use quick_xml::{Reader, events::Event};
use serde_json::{Map, Value};

use super::{
    job::JobKind,
    result::{Consent, ConsentEvent, DeliveryEvent, DeliveryStatus, SETTINGS_SCENE},
};

/// Every field of a push, by element (or JSON key) name.
pub type Fields = Map<String, Value>;

/// The event WeChat pushes when a template message's delivery is known.
pub const TEMPLATE_SEND_JOB_FINISH: &str = "TEMPLATESENDJOBFINISH";

/// The receipt of subscription messages, one `List` item per message.
pub const SUBSCRIBE_MSG_SENT_EVENT: &str = "subscribe_msg_sent_event";
/// A user's answers in a subscription popup, one `List` item per template.
pub const SUBSCRIBE_MSG_POPUP_EVENT: &str = "subscribe_msg_popup_event";
/// A user's change in the service-notification settings, one `List` item per template.
pub const SUBSCRIBE_MSG_CHANGE_EVENT: &str = "subscribe_msg_change_event";

/// How deep elements may nest; real pushes go three levels deep, this is only a guard.
const MAX_DEPTH: usize = 32;
/// How much of an offending value an error message quotes.
const QUOTE_CHARS: usize = 64;

/// Why a push body could not be read. Each message says what is wrong and, for XML, where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiptError {
    #[error("push body is empty")]
    Empty,
    #[error("push body is not UTF-8 (invalid byte at {at})")]
    NotUtf8 { at: usize },
    #[error("DOCTYPE and ENTITY declarations are refused (at byte {at})")]
    Doctype { at: u64 },
    #[error("unknown entity &{name}; at byte {at} (only &lt; &gt; &amp; &apos; &quot; and &#…; are allowed)")]
    UnknownEntity { name: String, at: u64 },
    #[error("unterminated CDATA in <{element}> at byte {at}: no `]]>` before </{element}>")]
    UnterminatedCdata { element: String, at: u64 },
    #[error("XML is malformed at byte {at}: {message}")]
    Xml { at: u64, message: String },
    #[error("elements nest deeper than {MAX_DEPTH} levels at byte {at}")]
    TooDeep { at: u64 },
    #[error("the push has no root element")]
    NoRoot,
    #[error("content after the root element at byte {at}")]
    TrailingContent { at: u64 },
    #[error("JSON is malformed: {0}")]
    Json(String),
    #[error("JSON push is not an object")]
    JsonNotObject,
    #[error("{0} is missing")]
    Missing(&'static str),
    #[error("{0} appears more than once")]
    Repeated(&'static str),
    #[error("{field} is not text")]
    NotText { field: &'static str },
    #[error("{field} is not a number: {value:?}")]
    NotANumber { field: &'static str, value: String },
    #[error("List has no items")]
    EmptyList,
    #[error("List[{index}] is not an object")]
    ItemNotObject { index: usize },
    /// A field of one `List` item; `reason` is shown, not chained, so the message is whole.
    #[error("List[{index}]: {reason}")]
    InList { index: usize, reason: Box<ReceiptError> },
    #[error("SubscribeStatusString {value:?} is neither accept nor reject")]
    UnknownConsent { value: String },
}

/// The format a push arrived in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Xml,
    Json,
}

/// A delivery receipt: `Event` TEMPLATESENDJOBFINISH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateReceipt {
    /// The msgid template/send returned; 64 bits, kept exact.
    pub msgid: u64,
    /// `Status` exactly as WeChat sent it.
    pub raw_status: String,
}

impl TemplateReceipt {
    pub fn status(&self) -> DeliveryStatus {
        DeliveryStatus::from_raw(&self.raw_status)
    }
}

/// One `List` item of `subscribe_msg_sent_event`: the receipt of one subscription message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentItem {
    pub template_id: String,
    /// The msgid subscribe/send (or bizsend) returned; 64 bits, kept exact.
    pub msgid: u64,
    /// `ErrorCode`: 0 delivered, anything else failed.
    pub error_code: i64,
    /// `ErrorStatus` exactly as WeChat sent it.
    pub error_status: String,
}

impl SentItem {
    pub fn status(&self) -> DeliveryStatus {
        DeliveryStatus::from_error_code(self.error_code)
    }
}

/// One `List` item of a popup or change event: the user's answer for one template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentItem {
    pub template_id: String,
    /// `SubscribeStatusString` exactly as WeChat sent it.
    pub raw_status: String,
    pub consent: Consent,
    /// `PopupScene` (popups only).
    pub popup_scene: Option<String>,
}

/// A subscription-message event, its `List` read into items (one object or an array in JSON,
/// one element or several in XML).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subscription {
    Sent(Vec<SentItem>),
    Popup(Vec<ConsentItem>),
    Change(Vec<ConsentItem>),
}

/// One push from WeChat: the common header, the receipt when it is one, and every field.
#[derive(Debug, Clone, PartialEq)]
pub struct Push {
    pub format: Format,
    /// The official account's original id (`gh_…`).
    pub to_user_name: String,
    /// The user's openid (for a receipt: the recipient).
    pub from_user_name: String,
    pub create_time: i64,
    /// `event`, `text`, `image`, …
    pub msg_type: String,
    /// `Event` when `msg_type` is `event`.
    pub event: Option<String>,
    /// Set for TEMPLATESENDJOBFINISH.
    pub receipt: Option<TemplateReceipt>,
    /// Set for the three subscription-message events.
    pub subscription: Option<Subscription>,
    /// Every field as received, including the ones above.
    pub fields: Fields,
}

impl Push {
    /// Reads a plaintext (or decrypted) push, XML or JSON.
    pub fn parse(body: &[u8]) -> Result<Push, ReceiptError> {
        let (format, fields) = parse_fields_with_format(body)?;
        Push::from_fields(format, fields)
    }

    /// Types the fields of a push.
    pub fn from_fields(format: Format, fields: Fields) -> Result<Push, ReceiptError> {
        let to_user_name = required_text(&fields, "ToUserName")?;
        let from_user_name = required_text(&fields, "FromUserName")?;
        let create_time = parse_number(&fields, "CreateTime")?;
        let msg_type = required_text(&fields, "MsgType")?;
        let event = if msg_type.eq_ignore_ascii_case("event") {
            Some(required_text(&fields, "Event")?)
        } else {
            optional_text(&fields, "Event")?
        };
        let receipt = match &event {
            Some(e) if e.eq_ignore_ascii_case(TEMPLATE_SEND_JOB_FINISH) => {
                let msgid = parse_msgid(&fields)?;
                let raw_status = required_text(&fields, "Status")?;
                Some(TemplateReceipt { msgid, raw_status })
            }
            _ => None,
        };
        let subscription = match &event {
            Some(e) => parse_subscription(e, &fields)?,
            None => None,
        };
        Ok(Push { format, to_user_name, from_user_name, create_time, msg_type, event, receipt, subscription, fields })
    }

    /// Whether this is a delivery receipt.
    pub fn is_receipt(&self) -> bool {
        self.receipt.is_some()
    }

    /// Routing key on the results exchange: `delivery.<status>` for a receipt,
    /// `event.<event lowercase>` for any other event (a subscription event is published per
    /// `List` item instead: [`Push::delivery_events`], [`Push::consent_events`]), `message.<msgtype lowercase>` for a
    /// user's message. Characters a topic key cannot carry as one word become `_`.
    pub fn routing_key(&self) -> String {
        if let Some(r) = &self.receipt {
            return r.status().routing_key().to_owned();
        }
        match &self.event {
            Some(e) => format!("event.{}", routing_word(e)),
            None => format!("message.{}", routing_word(&self.msg_type)),
        }
    }

    /// What makes two pushes "the same event", as WeChat's docs advise: a receipt by MsgID and
    /// Status (the seed's two failures share a MsgID but are different events), a message by
    /// its MsgId, any other event by FromUserName + CreateTime + Event.
    pub fn dedupe_key(&self) -> String {
        if let Some(r) = &self.receipt {
            return format!("receipt:{}:{}", r.msgid, r.raw_status);
        }
        if self.event.is_none()
            && let Some(id) = self.fields.get("MsgId").or_else(|| self.fields.get("MsgID")).and_then(scalar_text)
        {
            return format!("msg:{}", id.trim());
        }
        format!("event:{}:{}:{}", self.from_user_name, self.create_time, self.event.as_deref().unwrap_or(""))
    }
}

impl Push {
    /// The delivery events this push reports, each with what makes it "the same event": the
    /// one of a TEMPLATESENDJOBFINISH (kind `template`), or one per item of a
    /// subscribe_msg_sent_event (kind `subscribe_kind`, the account's), de-duplicated like a
    /// receipt by MsgID and result. `job_id` is left to the caller (the msgid record).
    pub fn delivery_events(
        &self,
        account: &str,
        subscribe_kind: JobKind,
        received_at: DateTime<Utc>,
    ) -> Vec<(String, DeliveryEvent)> {
        let event = |msgid, status, raw_status: &str| DeliveryEvent {
            kind: "delivery".into(),
            account: account.to_owned(),
            msgid,
            job_id: None,
            job_kind: JobKind::Template,
            touser: self.from_user_name.clone(),
            to_user_name: self.to_user_name.clone(),
            status,
            raw_status: raw_status.to_owned(),
            template_id: None,
            errcode: None,
            create_time: self.create_time,
            received_at,
        };
        if let Some(r) = &self.receipt {
            return vec![(self.dedupe_key(), event(r.msgid, r.status(), &r.raw_status))];
        }
        let Some(Subscription::Sent(items)) = &self.subscription else { return Vec::new() };
        items
            .iter()
            .map(|i| {
                let key = format!("sent:{}:{}:{}", i.msgid, i.error_code, i.error_status);
                let delivery = DeliveryEvent {
                    job_kind: subscribe_kind,
                    template_id: Some(i.template_id.clone()),
                    errcode: Some(i.error_code),
                    ..event(i.msgid, i.status(), &i.error_status)
                };
                (key, delivery)
            })
            .collect()
    }

    /// The consent events of a popup or change event, one per item, each with what makes it
    /// "the same event" (FromUserName, CreateTime, TemplateId and the answer, as WeChat's docs
    /// advise, and the event's name).
    pub fn consent_events(
        &self,
        account: &str,
        subscribe_kind: JobKind,
        received_at: DateTime<Utc>,
    ) -> Vec<(String, ConsentEvent)> {
        let (items, popup) = match &self.subscription {
            Some(Subscription::Popup(items)) => (items, true),
            Some(Subscription::Change(items)) => (items, false),
            _ => return Vec::new(),
        };
        let event = self.event.clone().unwrap_or_default();
        items
            .iter()
            .map(|i| {
                let key = format!(
                    "consent:{event}:{}:{}:{}:{}",
                    self.from_user_name, self.create_time, i.template_id, i.raw_status
                );
                let consent = ConsentEvent {
                    kind: "consent".into(),
                    account: account.to_owned(),
                    job_kind: subscribe_kind,
                    openid: self.from_user_name.clone(),
                    to_user_name: self.to_user_name.clone(),
                    template_id: i.template_id.clone(),
                    consent: i.consent,
                    status: i.raw_status.clone(),
                    scene: if popup { i.popup_scene.clone() } else { Some(SETTINGS_SCENE.to_owned()) },
                    event: event.clone(),
                    create_time: self.create_time,
                    received_at,
                };
                (key, consent)
            })
            .collect()
    }
}

/// `MsgID` of a receipt or a sent item: 64 bits, kept exact.
fn parse_msgid(fields: &Fields) -> Result<u64, ReceiptError> {
    // The doc spells it MsgID; messages and some SDKs spell it MsgId.
    let field = if fields.contains_key("MsgID") { "MsgID" } else { "MsgId" };
    parse_number::<u64>(fields, field).map_err(|e| match e {
        ReceiptError::Missing(_) => ReceiptError::Missing("MsgID"),
        other => other,
    })
}

/// Types a subscription-message event; `None` for any other event.
fn parse_subscription(event: &str, fields: &Fields) -> Result<Option<Subscription>, ReceiptError> {
    let is = |name: &str| event.eq_ignore_ascii_case(name);
    let subscription = if is(SUBSCRIBE_MSG_SENT_EVENT) {
        Subscription::Sent(read_items(fields, "SubscribeMsgSentEvent", sent_item)?)
    } else if is(SUBSCRIBE_MSG_POPUP_EVENT) {
        Subscription::Popup(read_items(fields, "SubscribeMsgPopupEvent", consent_item)?)
    } else if is(SUBSCRIBE_MSG_CHANGE_EVENT) {
        Subscription::Change(read_items(fields, "SubscribeMsgChangeEvent", consent_item)?)
    } else {
        return Ok(None);
    };
    Ok(Some(subscription))
}

/// The items of an event's `List`, wherever the push put it: at the top (JSON), under the
/// event's element (XML, and older JSON: `{"List": …}`), or as that element itself (older
/// JSON: an array). A `List` is one item or an array of them.
fn read_items<T>(
    fields: &Fields,
    wrapper: &str,
    read: fn(&Fields) -> Result<T, ReceiptError>,
) -> Result<Vec<T>, ReceiptError> {
    let list = match (fields.get("List"), fields.get(wrapper)) {
        (Some(list), _) => list,
        (None, Some(inner)) => inner.get("List").unwrap_or(inner),
        (None, None) => return Err(ReceiptError::Missing("List")),
    };
    let items: Vec<&Value> = match list {
        Value::Array(items) => items.iter().collect(),
        one => vec![one],
    };
    if items.is_empty() {
        return Err(ReceiptError::EmptyList);
    }
    items
        .into_iter()
        .enumerate()
        .map(|(index, item)| match item {
            Value::Object(item) => read(item).map_err(|e| ReceiptError::InList { index, reason: Box::new(e) }),
            _ => Err(ReceiptError::ItemNotObject { index }),
        })
        .collect()
}

fn sent_item(item: &Fields) -> Result<SentItem, ReceiptError> {
    Ok(SentItem {
        template_id: required_text(item, "TemplateId")?,
        msgid: parse_msgid(item)?,
        error_code: parse_number(item, "ErrorCode")?,
        error_status: required_text(item, "ErrorStatus")?,
    })
}

fn consent_item(item: &Fields) -> Result<ConsentItem, ReceiptError> {
    let template_id = required_text(item, "TemplateId")?;
    let raw_status = required_text(item, "SubscribeStatusString")?;
    let consent =
        Consent::from_raw(&raw_status).ok_or_else(|| ReceiptError::UnknownConsent { value: quote(&raw_status) })?;
    let popup_scene = optional_text(item, "PopupScene")?.map(|s| s.trim().to_owned());
    Ok(ConsentItem { template_id, raw_status, consent, popup_scene })
}

/// Reads the fields of a push body (XML or JSON), without requiring any of them; used for the
/// outer safe-mode envelope, which carries only `ToUserName` and `Encrypt`.
pub fn parse_fields(body: &[u8]) -> Result<Fields, ReceiptError> {
    parse_fields_with_format(body).map(|(_, f)| f)
}

/// `Encrypt` of a safe-mode (or compatible-mode) envelope, if it has one.
pub fn encrypt_field(fields: &Fields) -> Result<Option<String>, ReceiptError> {
    optional_text(fields, "Encrypt")
}

fn parse_fields_with_format(body: &[u8]) -> Result<(Format, Fields), ReceiptError> {
    let text = std::str::from_utf8(body).map_err(|e| ReceiptError::NotUtf8 { at: e.valid_up_to() })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    match text.trim_start().as_bytes().first() {
        None => Err(ReceiptError::Empty),
        Some(b'{' | b'[') => parse_json(text).map(|f| (Format::Json, f)),
        Some(_) => parse_xml(text).map(|f| (Format::Xml, f)),
    }
}

fn parse_json(text: &str) -> Result<Fields, ReceiptError> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ReceiptError::JsonNotObject),
        Err(e) => Err(ReceiptError::Json(e.to_string())),
    }
}

/// An element being read.
struct Frame {
    name: String,
    start: u64,
    text: String,
    cdata: String,
    has_cdata: bool,
    children: Option<Fields>,
}

impl Frame {
    fn new(name: String, start: u64) -> Self {
        Frame { name, start, text: String::new(), cdata: String::new(), has_cdata: false, children: None }
    }

    fn into_value(self) -> Value {
        let text = self.text.trim();
        match self.children {
            Some(mut children) => {
                // Mixed content is not something WeChat sends; keep any text rather than drop it.
                let mixed = if self.has_cdata { format!("{}{}", self.cdata, text) } else { text.to_owned() };
                if !mixed.is_empty() {
                    children.insert("#text".into(), Value::String(mixed));
                }
                Value::Object(children)
            }
            // CDATA is kept exactly; plain text around it is only the pretty-printer's whitespace.
            None if self.has_cdata => Value::String(if text.is_empty() { self.cdata } else { self.cdata + text }),
            None => Value::String(text.to_owned()),
        }
    }
}

/// Adds a child element to its parent; an element seen twice becomes an array of its occurrences
/// (XML leaves and objects are never arrays themselves, so an array always means repetition).
fn insert_child(parent: &mut Fields, name: String, value: Value) {
    match parent.get_mut(&name) {
        Some(Value::Array(items)) => items.push(value),
        Some(existing) => {
            let first = std::mem::take(existing);
            *existing = Value::Array(vec![first, value]);
        }
        None => {
            parent.insert(name, value);
        }
    }
}

fn parse_xml(text: &str) -> Result<Fields, ReceiptError> {
    let mut reader = Reader::from_str(text);
    let mut tree = Tree::default();
    loop {
        let at = reader.buffer_position();
        let event = reader
            .read_event()
            .map_err(|e| ReceiptError::Xml { at: reader.error_position(), message: e.to_string() })?;
        match event {
            Event::Start(start) => tree.open(start.name().as_ref().to_owned(), at)?,
            Event::Empty(start) => tree.empty(start.name().as_ref().to_owned(), at)?,
            Event::End(_) => tree.close(at)?,
            Event::Text(t) => tree.text(&t.xml10_content(), at)?,
            Event::CData(c) => tree.cdata(&c.xml10_content(), at)?,
            Event::GeneralRef(r) => {
                let resolved = match r.resolve_char_ref() {
                    Ok(Some(c)) => c.to_string(),
                    Ok(None) => match quick_xml::escape::resolve_predefined_entity(&r) {
                        Some(s) => s.to_owned(),
                        None => return Err(ReceiptError::UnknownEntity { name: quote(&r), at }),
                    },
                    Err(e) => return Err(ReceiptError::Xml { at, message: e.to_string() }),
                };
                tree.entity(&resolved, at)?;
            }
            Event::DocType(_) => return Err(ReceiptError::Doctype { at }),
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
            Event::Eof => return tree.finish(),
        }
    }
}

/// The elements being read (`stack`) and the root once it is closed.
#[derive(Default)]
struct Tree {
    stack: Vec<Frame>,
    root: Option<Fields>,
}

impl Tree {
    fn open(&mut self, name: String, at: u64) -> Result<(), ReceiptError> {
        if self.root.is_some() {
            return Err(ReceiptError::TrailingContent { at });
        }
        if self.stack.len() >= MAX_DEPTH {
            return Err(ReceiptError::TooDeep { at });
        }
        self.stack.push(Frame::new(name, at));
        Ok(())
    }

    fn empty(&mut self, name: String, at: u64) -> Result<(), ReceiptError> {
        match self.stack.last_mut() {
            Some(parent) => insert_child(parent.children.get_or_insert_default(), name, Value::String(String::new())),
            None if self.root.is_none() => self.root = Some(Fields::new()),
            None => return Err(ReceiptError::TrailingContent { at }),
        }
        Ok(())
    }

    fn close(&mut self, at: u64) -> Result<(), ReceiptError> {
        // quick-xml has already checked that the end tag matches the open element.
        let Some(frame) = self.stack.pop() else {
            return Err(ReceiptError::Xml { at, message: "end tag without a start tag".into() });
        };
        match self.stack.last_mut() {
            Some(parent) => {
                let name = frame.name.clone();
                insert_child(parent.children.get_or_insert_default(), name, frame.into_value());
            }
            None => self.root = Some(frame.children.unwrap_or_default()),
        }
        Ok(())
    }

    fn text(&mut self, content: &str, at: u64) -> Result<(), ReceiptError> {
        match self.stack.last_mut() {
            Some(frame) => frame.text.push_str(content),
            None if content.trim().is_empty() => {}
            None if self.root.is_some() => return Err(ReceiptError::TrailingContent { at }),
            None => return Err(ReceiptError::Xml { at, message: "text before the root element".into() }),
        }
        Ok(())
    }

    fn cdata(&mut self, content: &str, at: u64) -> Result<(), ReceiptError> {
        let Some(frame) = self.stack.last_mut() else {
            return Err(ReceiptError::Xml { at, message: "CDATA outside the root element".into() });
        };
        // A CDATA section that runs past its own element's end tag was not closed where it
        // should have been (the seed's `]]&g;`): say so rather than report the mismatched end
        // tag further down.
        if content.contains(&format!("</{}>", frame.name)) {
            return Err(ReceiptError::UnterminatedCdata { element: frame.name.clone(), at });
        }
        frame.cdata.push_str(content);
        frame.has_cdata = true;
        Ok(())
    }

    fn entity(&mut self, resolved: &str, at: u64) -> Result<(), ReceiptError> {
        let Some(frame) = self.stack.last_mut() else {
            return Err(ReceiptError::Xml { at, message: "entity reference outside the root element".into() });
        };
        frame.text.push_str(resolved);
        Ok(())
    }

    fn finish(self) -> Result<Fields, ReceiptError> {
        if let Some(open) = self.stack.last() {
            let message = format!("<{}> is not closed before the end of the body", open.name);
            return Err(ReceiptError::Xml { at: open.start, message });
        }
        self.root.ok_or(ReceiptError::NoRoot)
    }
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn optional_text(fields: &Fields, field: &'static str) -> Result<Option<String>, ReceiptError> {
    match fields.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(_)) => Err(ReceiptError::Repeated(field)),
        Some(v) => scalar_text(v).map(Some).ok_or(ReceiptError::NotText { field }),
    }
}

fn required_text(fields: &Fields, field: &'static str) -> Result<String, ReceiptError> {
    optional_text(fields, field)?.ok_or(ReceiptError::Missing(field))
}

fn parse_number<T: std::str::FromStr>(fields: &Fields, field: &'static str) -> Result<T, ReceiptError> {
    let text = required_text(fields, field)?;
    text.trim().parse().map_err(|_| ReceiptError::NotANumber { field, value: quote(&text) })
}

fn quote(s: &str) -> String {
    if s.chars().count() <= QUOTE_CHARS { s.to_owned() } else { s.chars().take(QUOTE_CHARS).chain(['…']).collect() }
}

/// One word of a topic routing key: lowercase ASCII letters, digits, `_` and `-`.
fn routing_word(s: &str) -> String {
    let word: String = s
        .trim()
        .chars()
        .take(64)
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c.to_ascii_lowercase() } else { '_' })
        .collect();
    if word.is_empty() { "unknown".into() } else { word }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed's first sample exactly as published, with its `]]&g;` typo.
    pub(crate) const SEED_MALFORMED: &str = "<xml>\n<ToUserName><![CDATA[gh_7f083739789a]]></ToUserName>\n<FromUserName><![CDATA[oia2TjuEGTNoeX76QEjQNrcURxG8]]&g;</FromUserName>\n<CreateTime>1395658920</CreateTime>\n<MsgType><![CDATA[event]]></MsgType>\n<Event><![CDATA[TEMPLATESENDJOBFINISH]]></Event>\n<MsgID>200163836</MsgID>\n<Status><![CDATA[success]]></Status>\n</xml>";
    const SEED_SUCCESS: &str = "<xml>\n<ToUserName><![CDATA[gh_7f083739789a]]></ToUserName>\n<FromUserName><![CDATA[oia2TjuEGTNoeX76QEjQNrcURxG8]]></FromUserName>\n<CreateTime>1395658920</CreateTime>\n<MsgType><![CDATA[event]]></MsgType>\n<Event><![CDATA[TEMPLATESENDJOBFINISH]]></Event>\n<MsgID>200163836</MsgID>\n<Status><![CDATA[success]]></Status>\n</xml>";
    const SEED_USER_BLOCK: &str = "<xml>\n<ToUserName><![CDATA[gh_7f083739789a]]></ToUserName>\n<FromUserName><![CDATA[oia2TjuEGTNoeX76QEjQNrcURxG8]]></FromUserName>\n<CreateTime>1395658984</CreateTime>\n<MsgType><![CDATA[event]]></MsgType>\n<Event><![CDATA[TEMPLATESENDJOBFINISH]]></Event>\n<MsgID>200163840</MsgID>\n<Status><![CDATA[failed:user block]]></Status>\n</xml>";
    const SEED_SYSTEM_FAILED: &str = "<xml>\n<ToUserName><![CDATA[gh_7f083739789a]]></ToUserName>\n<FromUserName><![CDATA[oia2TjuEGTNoeX76QEjQNrcURxG8]]></FromUserName>\n<CreateTime>1395658984</CreateTime>\n<MsgType><![CDATA[event]]></MsgType>\n<Event><![CDATA[TEMPLATESENDJOBFINISH]]></Event>\n<MsgID>200163840</MsgID>\n<Status><![CDATA[failed: system failed]]></Status>\n</xml>";

    fn receipt(xml: &str) -> (Push, TemplateReceipt) {
        let p = Push::parse(xml.as_bytes()).unwrap();
        let r = p.receipt.clone().unwrap();
        (p, r)
    }

    #[test]
    fn the_seed_malformed_push_is_a_clear_error() {
        let err = Push::parse(SEED_MALFORMED.as_bytes()).unwrap_err();
        assert!(matches!(&err, ReceiptError::UnterminatedCdata { element, .. } if element == "FromUserName"), "{err}");
        let msg = err.to_string();
        assert!(msg.starts_with("unterminated CDATA in <FromUserName> at byte "), "{msg}");
        // The byte offset points at the CDATA section itself.
        let ReceiptError::UnterminatedCdata { at, .. } = err else { unreachable!() };
        assert!(SEED_MALFORMED[at as usize..].starts_with("<![CDATA[oia2"), "{at}");
    }

    #[test]
    fn the_seed_receipts_parse() {
        let (p, r) = receipt(SEED_SUCCESS);
        assert_eq!(p.format, Format::Xml);
        assert_eq!(p.to_user_name, "gh_7f083739789a");
        assert_eq!(p.from_user_name, "oia2TjuEGTNoeX76QEjQNrcURxG8");
        assert_eq!(p.create_time, 1395658920);
        assert_eq!(p.msg_type, "event");
        assert_eq!(p.event.as_deref(), Some("TEMPLATESENDJOBFINISH"));
        assert_eq!(r, TemplateReceipt { msgid: 200163836, raw_status: "success".into() });
        assert_eq!(p.routing_key(), "delivery.success");

        let (p, r) = receipt(SEED_USER_BLOCK);
        assert_eq!(
            (r.msgid, r.raw_status.as_str(), r.status()),
            (200163840, "failed:user block", DeliveryStatus::UserBlock)
        );
        assert_eq!(p.routing_key(), "delivery.user_block");

        let (p, r) = receipt(SEED_SYSTEM_FAILED);
        assert_eq!(r.raw_status, "failed: system failed");
        assert_eq!(r.status(), DeliveryStatus::SystemFailed);
        assert_eq!(p.routing_key(), "delivery.system_failed");
    }

    #[test]
    fn the_two_seed_failures_share_a_msgid_but_are_different_events() {
        let a = Push::parse(SEED_USER_BLOCK.as_bytes()).unwrap();
        let b = Push::parse(SEED_SYSTEM_FAILED.as_bytes()).unwrap();
        assert_eq!(a.receipt.as_ref().map(|r| r.msgid), b.receipt.as_ref().map(|r| r.msgid));
        assert_ne!(a.dedupe_key(), b.dedupe_key());
        assert_eq!(a.dedupe_key(), Push::parse(SEED_USER_BLOCK.as_bytes()).unwrap().dedupe_key());
    }

    #[test]
    fn msgid_and_msgid_spellings_and_64_bit_ids() {
        let xml = SEED_SUCCESS.replace("<MsgID>200163836</MsgID>", "<MsgId>3599307433715204104</MsgId>");
        let (_, r) = receipt(&xml);
        assert_eq!(r.msgid, 3599307433715204104);
        let xml = SEED_SUCCESS.replace("200163836", "18446744073709551615");
        assert_eq!(receipt(&xml).1.msgid, u64::MAX);
        let xml = SEED_SUCCESS.replace("200163836", " 42\n");
        assert_eq!(receipt(&xml).1.msgid, 42);
    }

    #[test]
    fn bad_or_missing_receipt_fields_say_what_is_wrong() {
        let err = |xml: String| Push::parse(xml.as_bytes()).unwrap_err().to_string();
        assert_eq!(err(SEED_SUCCESS.replace("200163836", "abc")), "MsgID is not a number: \"abc\"");
        assert_eq!(err(SEED_SUCCESS.replace("200163836", "-1")), "MsgID is not a number: \"-1\"");
        assert_eq!(
            err(SEED_SUCCESS.replace("200163836", "18446744073709551616")),
            "MsgID is not a number: \"18446744073709551616\""
        );
        assert_eq!(err(SEED_SUCCESS.replace("<MsgID>200163836</MsgID>", "")), "MsgID is missing");
        assert_eq!(err(SEED_SUCCESS.replace("<Status><![CDATA[success]]></Status>", "")), "Status is missing");
        assert_eq!(err(SEED_SUCCESS.replace("1395658920", "soon")), "CreateTime is not a number: \"soon\"");
        assert_eq!(
            err(SEED_SUCCESS.replace("<Event><![CDATA[TEMPLATESENDJOBFINISH]]></Event>", "")),
            "Event is missing"
        );
        assert_eq!(err(SEED_SUCCESS.replace("</xml>", "<MsgID>1</MsgID></xml>")), "MsgID appears more than once");
        assert_eq!(
            err(SEED_SUCCESS.replace("<ToUserName><![CDATA[gh_7f083739789a]]></ToUserName>", "")),
            "ToUserName is missing"
        );
        let long = "9".repeat(100);
        let msg = err(SEED_SUCCESS.replace("200163836", &long));
        assert!(msg.len() < 120 && msg.ends_with("…\""), "{msg}");
    }

    #[test]
    fn statuses_normalize_through_delivery_status() {
        for (raw, key) in [
            ("success", "delivery.success"),
            ("failed:user block", "delivery.user_block"),
            ("failed: system failed", "delivery.system_failed"),
            ("failed:system failed", "delivery.system_failed"),
            ("Failed: User Block", "delivery.user_block"),
            ("failed: quota", "delivery.failed"),
            ("", "delivery.failed"),
        ] {
            let xml = SEED_SUCCESS.replace("<![CDATA[success]]>", &format!("<![CDATA[{raw}]]>"));
            let (p, r) = receipt(&xml);
            assert_eq!(r.raw_status, raw, "kept raw");
            assert_eq!(p.routing_key(), key, "{raw}");
        }
    }

    #[test]
    fn doctype_and_entities_are_refused() {
        let bomb = "<?xml version=\"1.0\"?>\n<!DOCTYPE lolz [<!ENTITY lol \"lol\"><!ENTITY lol2 \"&lol;&lol;\">]>\n<xml><ToUserName>&lol2;</ToUserName></xml>";
        let err = Push::parse(bomb.as_bytes()).unwrap_err();
        assert!(matches!(err, ReceiptError::Doctype { at: 22 }), "{err:?}");
        let xxe = "<!DOCTYPE xml [<!ENTITY xxe SYSTEM \"file:///etc/passwd\">]><xml><A>&xxe;</A></xml>";
        assert!(matches!(Push::parse(xxe.as_bytes()), Err(ReceiptError::Doctype { .. })));
        let undeclared = SEED_SUCCESS.replace("gh_7f083739789a]]>", "gh_7f083739789a]]>&xxe;");
        let err = Push::parse(undeclared.as_bytes()).unwrap_err();
        assert!(matches!(&err, ReceiptError::UnknownEntity { name, .. } if name == "xxe"), "{err:?}");
        assert!(err.to_string().starts_with("unknown entity &xxe; at byte "), "{err}");
        let stray = "<xml><!ENTITY x \"y\"></xml>";
        assert!(Push::parse(stray.as_bytes()).is_err());
    }

    #[test]
    fn predefined_and_character_entities_resolve() {
        let xml = SEED_SUCCESS.replace("<![CDATA[oia2TjuEGTNoeX76QEjQNrcURxG8]]>", "a&lt;b&amp;c&#x41;&#66;");
        let (p, _) = receipt(&xml);
        assert_eq!(p.from_user_name, "a<b&cAB");
    }

    #[test]
    fn other_events_and_messages_keep_every_field() {
        let sub = "<xml><ToUserName><![CDATA[gh_1]]></ToUserName><FromUserName><![CDATA[o_user]]></FromUserName><CreateTime>123</CreateTime><MsgType><![CDATA[event]]></MsgType><Event><![CDATA[SCAN]]></Event><EventKey><![CDATA[SCENE_VALUE]]></EventKey><Ticket><![CDATA[TICKET]]></Ticket></xml>";
        let p = Push::parse(sub.as_bytes()).unwrap();
        assert!(!p.is_receipt());
        assert_eq!(p.routing_key(), "event.scan");
        assert_eq!(p.fields["EventKey"], "SCENE_VALUE");
        assert_eq!(p.fields["Ticket"], "TICKET");
        assert_eq!(p.fields["CreateTime"], "123");
        assert_eq!(p.dedupe_key(), "event:o_user:123:SCAN");

        let sent = "<xml>\n  <ToUserName><![CDATA[gh_1]]></ToUserName>\n  <FromUserName><![CDATA[o_user]]></FromUserName>\n  <CreateTime>1620963428</CreateTime>\n  <MsgType><![CDATA[event]]></MsgType>\n  <Event><![CDATA[subscribe_msg_sent_event]]></Event>\n  <SubscribeMsgSentEvent>\n    <List>\n      <TemplateId><![CDATA[T1]]></TemplateId>\n      <MsgID>1700827132819554304</MsgID>\n      <ErrorCode>0</ErrorCode>\n      <ErrorStatus><![CDATA[success]]></ErrorStatus>\n    </List>\n    <List>\n      <TemplateId><![CDATA[T2]]></TemplateId>\n      <MsgID>1700827132819554305</MsgID>\n      <ErrorCode>0</ErrorCode>\n      <ErrorStatus><![CDATA[success]]></ErrorStatus>\n    </List>\n  </SubscribeMsgSentEvent>\n</xml>";
        let p = Push::parse(sent.as_bytes()).unwrap();
        assert_eq!(p.routing_key(), "event.subscribe_msg_sent_event");
        let list = &p.fields["SubscribeMsgSentEvent"]["List"];
        assert_eq!(list[0]["TemplateId"], "T1");
        assert_eq!(list[1]["MsgID"], "1700827132819554305");

        let text = "<xml><ToUserName><![CDATA[gh_10f6c3c3ac5a]]></ToUserName>\n<FromUserName><![CDATA[oyORnuP8q7ou2gfYjqLzSIWZf0rs]]></FromUserName>\n<CreateTime>1409735668</CreateTime>\n<MsgType><![CDATA[text]]></MsgType>\n<Content><![CDATA[abcdteT]]></Content>\n<MsgId>6054768590064713728</MsgId>\n</xml>";
        let p = Push::parse(text.as_bytes()).unwrap();
        assert_eq!(p.event, None);
        assert_eq!(p.routing_key(), "message.text");
        assert_eq!(p.dedupe_key(), "msg:6054768590064713728");
        assert_eq!(p.fields["Content"], "abcdteT");
        let empty = "<xml><ToUserName>a</ToUserName><FromUserName>b</FromUserName><CreateTime>1</CreateTime><MsgType>event</MsgType><Event>weird.Name*</Event><Empty/></xml>";
        let p = Push::parse(empty.as_bytes()).unwrap();
        assert_eq!(p.routing_key(), "event.weird_name_");
        assert_eq!(p.fields["Empty"], "");
    }

    #[test]
    fn cdata_is_kept_exactly_and_text_is_trimmed() {
        let xml = SEED_SUCCESS.replace("<![CDATA[gh_7f083739789a]]>", "\n  <![CDATA[ gh <x> ]]>\n  ");
        let (p, _) = receipt(&xml);
        assert_eq!(p.to_user_name, " gh <x> ");
        let xml = SEED_SUCCESS.replace("<![CDATA[gh_7f083739789a]]>", "\n  gh_plain \n");
        assert_eq!(receipt(&xml).0.to_user_name, "gh_plain");
    }

    #[test]
    fn json_pushes_parse_too() {
        let json = r#"{"ToUserName":"gh_97417a04a28d","FromUserName":"o9AgO5Kd5ggOC-bXrbNODIiE3bGY","CreateTime":1714112445,"MsgType":"event","Event":"debug_demo","debug_str":"hello world"}"#;
        let p = Push::parse(json.as_bytes()).unwrap();
        assert_eq!(p.format, Format::Json);
        assert_eq!(p.routing_key(), "event.debug_demo");
        assert_eq!(p.fields["debug_str"], "hello world");
        let json = r#"{"ToUserName":"gh_1","FromUserName":"o","CreateTime":"1395658920","MsgType":"event","Event":"TEMPLATESENDJOBFINISH","MsgID":3599307433715204104,"Status":"failed:user block"}"#;
        let p = Push::parse(json.as_bytes()).unwrap();
        assert_eq!(
            p.receipt,
            Some(TemplateReceipt { msgid: 3599307433715204104, raw_status: "failed:user block".into() })
        );
        let env = parse_fields(br#"{"ToUserName":"gh_1","Encrypt":"abc=="}"#).unwrap();
        assert_eq!(encrypt_field(&env).unwrap().as_deref(), Some("abc=="));
        assert_eq!(Push::parse(b"[1]").unwrap_err(), ReceiptError::JsonNotObject);
        assert!(matches!(Push::parse(b"{\"a\":"), Err(ReceiptError::Json(_))));
        let bad = json.replace("3599307433715204104", "1.5");
        assert_eq!(Push::parse(bad.as_bytes()).unwrap_err().to_string(), "MsgID is not a number: \"1.5\"");
    }

    #[test]
    fn safe_mode_envelopes_read_their_encrypt_field() {
        let env =
            "<xml>\n<ToUserName><![CDATA[gh_1]]></ToUserName>\n<Encrypt><![CDATA[hyzAe4Oz+/=]]></Encrypt>\n</xml>";
        let f = parse_fields(env.as_bytes()).unwrap();
        assert_eq!(encrypt_field(&f).unwrap().as_deref(), Some("hyzAe4Oz+/="));
        assert_eq!(Push::parse(env.as_bytes()).unwrap_err(), ReceiptError::Missing("FromUserName"));
        assert_eq!(encrypt_field(&parse_fields(SEED_SUCCESS.as_bytes()).unwrap()).unwrap(), None);
    }

    #[test]
    fn structural_errors() {
        let e = |s: &[u8]| Push::parse(s).unwrap_err();
        assert_eq!(e(b""), ReceiptError::Empty);
        assert_eq!(e(b"  \n "), ReceiptError::Empty);
        assert_eq!(e(b"<xml>\xff</xml>"), ReceiptError::NotUtf8 { at: 5 });
        assert_eq!(e(b"<!-- only a comment -->"), ReceiptError::NoRoot);
        assert!(matches!(e(b"<xml><a>1</a>"), ReceiptError::Xml { at: 0, .. }));
        assert!(e(b"<xml><a>1</a>").to_string().contains("<xml> is not closed"));
        assert!(matches!(e(b"<xml><a>1</b></xml>"), ReceiptError::Xml { .. }));
        assert!(matches!(e(b"<xml></xml><xml></xml>"), ReceiptError::TrailingContent { .. }));
        assert!(matches!(e(b"<xml></xml>junk"), ReceiptError::TrailingContent { .. }));
        assert!(matches!(e(b"junk<xml></xml>"), ReceiptError::Xml { .. }));
        assert!(matches!(e(b"<xml><a><![CDATA[x</a></xml>"), ReceiptError::Xml { .. }));
        let deep = format!("<xml>{}{}</xml>", "<a>".repeat(40), "</a>".repeat(40));
        assert!(matches!(e(deep.as_bytes()), ReceiptError::TooDeep { .. }));
        assert!(e(b"<xml><a>1 & 2</a></xml>").to_string().starts_with("XML is malformed at byte"));
        let with_bom = format!("\u{feff}<?xml version=\"1.0\" encoding=\"utf-8\"?>{SEED_SUCCESS}");
        assert!(Push::parse(with_bom.as_bytes()).is_ok());
    }

    const SENT_XML_ONE: &str = "<xml>\n    <ToUserName><![CDATA[gh_123456789abc]]></ToUserName>\n    <FromUserName><![CDATA[otFpruAK8D-E6EfStSYonYSBZ8_4]]></FromUserName>\n    <CreateTime>1610969468</CreateTime>\n    <MsgType><![CDATA[event]]></MsgType>\n    <Event><![CDATA[subscribe_msg_sent_event]]></Event>\n    <SubscribeMsgSentEvent>\n        <List>\n            <TemplateId><![CDATA[VRR0UEO9VJOLs0MHlU0OilqX6MVFDwH3_3gz3Oc0NIc]]></TemplateId>\n            <MsgID>1700827132819554304</MsgID>\n            <ErrorCode>0</ErrorCode>\n            <ErrorStatus><![CDATA[success]]></ErrorStatus>\n        </List>\n    </SubscribeMsgSentEvent>\n</xml>";
    const SENT_JSON_ONE: &str = r#"{"ToUserName": "gh_123456789abc", "FromUserName": "o7esq5PHRGBQYmeNyfG064wEFVpQ", "CreateTime": "1620963428", "MsgType": "event", "Event": "subscribe_msg_sent_event", "List": {"TemplateId": "BEwX0BO-T3MqK3Uc5oTU3CGBqzjpndk2jzUf7VfExd8", "MsgID": "1864323726461255680", "ErrorCode": "0", "ErrorStatus": "success"}}"#;
    const POPUP_XML: &str = "<xml>\n    <ToUserName><![CDATA[gh_123456789abc]]></ToUserName>\n    <FromUserName><![CDATA[otFpruAK8D-E6EfStSYonYSBZ8_4]]></FromUserName>\n    <CreateTime>1610969440</CreateTime>\n    <MsgType><![CDATA[event]]></MsgType>\n    <Event><![CDATA[subscribe_msg_popup_event]]></Event>\n    <SubscribeMsgPopupEvent>\n        <List>\n            <TemplateId><![CDATA[VRR0UEO9VJOLs0MHlU0OilqX6MVFDwH3_3gz3Oc0NIc]]></TemplateId>\n            <SubscribeStatusString><![CDATA[accept]]></SubscribeStatusString>\n            <PopupScene>2</PopupScene>\n        </List>\n        <List>\n            <TemplateId><![CDATA[9nLIlbOQZC5Y89AZteFEux3WCXRRRG5Wfzkpssu4bLI]]></TemplateId>\n            <SubscribeStatusString><![CDATA[reject]]></SubscribeStatusString>\n            <PopupScene>2</PopupScene>\n        </List>\n    </SubscribeMsgPopupEvent>\n</xml>";
    const CHANGE_JSON: &str = r#"{"ToUserName": "gh_123456789abc", "FromUserName": "o7esq5OI1Uej6Xixw1lA2H7XDVbc", "CreateTime": "1610968440", "MsgType": "event", "Event": "subscribe_msg_change_event", "List": {"TemplateId": "BEwX0BOT3MqK3Uc5oTU3CGBqzjpndk2jzUf7VfExd8", "SubscribeStatusString": "reject"}}"#;

    fn sent_item(template_id: &str, msgid: u64, error_code: i64, error_status: &str) -> SentItem {
        SentItem { template_id: template_id.into(), msgid, error_code, error_status: error_status.into() }
    }

    fn sent_items(body: &str) -> Vec<SentItem> {
        match Push::parse(body.as_bytes()).unwrap().subscription {
            Some(Subscription::Sent(items)) => items,
            other => panic!("not a sent event: {other:?}"),
        }
    }

    /// The JSON push of a sent event with `list` as its List (top level, the current shape).
    fn sent_json(list: &str) -> String {
        format!(
            r#"{{"ToUserName":"gh_1","FromUserName":"o_user","CreateTime":1620963428,"MsgType":"event","Event":"subscribe_msg_sent_event","List":{list}}}"#
        )
    }

    #[test]
    fn a_sent_event_with_one_item_reads_in_xml_and_json() {
        let item = sent_item("VRR0UEO9VJOLs0MHlU0OilqX6MVFDwH3_3gz3Oc0NIc", 1700827132819554304, 0, "success");
        assert_eq!(sent_items(SENT_XML_ONE), [item]);
        let p = Push::parse(SENT_JSON_ONE.as_bytes()).unwrap();
        assert_eq!(p.format, Format::Json);
        assert_eq!(p.create_time, 1620963428);
        let item = sent_item("BEwX0BO-T3MqK3Uc5oTU3CGBqzjpndk2jzUf7VfExd8", 1864323726461255680, 0, "success");
        assert_eq!(p.subscription, Some(Subscription::Sent(vec![item])));
        assert!(!p.is_receipt(), "a sent event is not a template receipt");
    }

    #[test]
    fn a_sent_event_with_several_items_reads_each_in_order() {
        let xml = SENT_XML_ONE.replace(
            "</SubscribeMsgSentEvent>",
            "<List><TemplateId>T2</TemplateId><MsgId>18446744073709551615</MsgId><ErrorCode>10001</ErrorCode><ErrorStatus>system failed</ErrorStatus></List></SubscribeMsgSentEvent>",
        );
        let items = sent_items(&xml);
        assert_eq!(items.len(), 2);
        assert_eq!(items[1], sent_item("T2", u64::MAX, 10001, "system failed"));
        assert_eq!((items[0].status(), items[1].status()), (DeliveryStatus::Success, DeliveryStatus::Failed));

        let json = sent_json(
            r#"[{"TemplateId":"T1","MsgID":"9007199254740993","ErrorCode":"0","ErrorStatus":"success"},
                {"TemplateId":"T2","MsgID":3599307433715204104,"ErrorCode":-1,"ErrorStatus":"failed"}]"#,
        );
        let items = sent_items(&json);
        // Past 2^53 the id is kept exact, from a string and from a number alike.
        assert_eq!(
            items,
            [sent_item("T1", 9007199254740993, 0, "success"), sent_item("T2", 3599307433715204104, -1, "failed")]
        );
    }

    #[test]
    fn the_older_json_shapes_wrap_the_list() {
        let item = r#"{"TemplateId":"T1","MsgID":"42","ErrorCode":"0","ErrorStatus":"success"}"#;
        for wrapped in [format!(r#"{{"List":{item}}}"#), format!(r#"{{"List":[{item}]}}"#), format!("[{item}]")] {
            let json = sent_json("0").replace(r#","List":0"#, &format!(r#","SubscribeMsgSentEvent":{wrapped}"#));
            assert_eq!(sent_items(&json), [sent_item("T1", 42, 0, "success")], "{json}");
        }
        let popup = r#"{"ToUserName":"gh_1","FromUserName":"o","CreateTime":"1620973045","MsgType":"event","Event":"subscribe_msg_popup_event","SubscribeMsgPopupEvent":[{"TemplateId":"T","SubscribeStatusString":"accept","PopupScene":"0"}]}"#;
        let p = Push::parse(popup.as_bytes()).unwrap();
        let Some(Subscription::Popup(items)) = p.subscription else { panic!("{p:?}") };
        assert_eq!(items[0].popup_scene.as_deref(), Some("0"));
    }

    #[test]
    fn popup_and_change_events_read_every_answer() {
        let p = Push::parse(POPUP_XML.as_bytes()).unwrap();
        let Some(Subscription::Popup(items)) = &p.subscription else { panic!("{p:?}") };
        assert_eq!(
            items,
            &[
                ConsentItem {
                    template_id: "VRR0UEO9VJOLs0MHlU0OilqX6MVFDwH3_3gz3Oc0NIc".into(),
                    raw_status: "accept".into(),
                    consent: Consent::Accepted,
                    popup_scene: Some("2".into()),
                },
                ConsentItem {
                    template_id: "9nLIlbOQZC5Y89AZteFEux3WCXRRRG5Wfzkpssu4bLI".into(),
                    raw_status: "reject".into(),
                    consent: Consent::Rejected,
                    popup_scene: Some("2".into()),
                },
            ]
        );
        let p = Push::parse(CHANGE_JSON.as_bytes()).unwrap();
        let Some(Subscription::Change(items)) = &p.subscription else { panic!("{p:?}") };
        assert_eq!((items.len(), items[0].consent, items[0].popup_scene.clone()), (1, Consent::Rejected, None));
    }

    #[test]
    fn sent_items_become_delivery_events_of_the_accounts_kind() {
        let at = Utc::now();
        let xml = SENT_XML_ONE.replace(
            "</SubscribeMsgSentEvent>",
            "<List><TemplateId>T2</TemplateId><MsgID>7</MsgID><ErrorCode>10001</ErrorCode><ErrorStatus>system failed</ErrorStatus></List></SubscribeMsgSentEvent>",
        );
        let p = Push::parse(xml.as_bytes()).unwrap();
        let events = p.delivery_events("mini", JobKind::MiniprogramSubscribe, at);
        assert_eq!(events.len(), 2);
        let (key, first) = &events[0];
        assert_eq!(key, "sent:1700827132819554304:0:success");
        assert_eq!(
            (first.account.as_str(), first.job_kind, first.msgid),
            ("mini", JobKind::MiniprogramSubscribe, 1700827132819554304)
        );
        assert_eq!(
            (first.status.routing_key(), first.errcode, first.raw_status.as_str()),
            ("delivery.success", Some(0), "success")
        );
        assert_eq!(first.template_id.as_deref(), Some("VRR0UEO9VJOLs0MHlU0OilqX6MVFDwH3_3gz3Oc0NIc"));
        assert_eq!(
            (first.touser.as_str(), first.to_user_name.as_str()),
            ("otFpruAK8D-E6EfStSYonYSBZ8_4", "gh_123456789abc")
        );
        assert_eq!((first.create_time, first.received_at, first.job_id.clone()), (1610969468, at, None));
        let (key, second) = &events[1];
        assert_eq!(key, "sent:7:10001:system failed");
        assert_eq!((second.status.routing_key(), second.errcode), ("delivery.failed", Some(10001)));
        assert!(p.consent_events("mini", JobKind::MiniprogramSubscribe, at).is_empty());

        // A template receipt is one delivery event of kind template, keyed as before.
        let p = Push::parse(SEED_SUCCESS.as_bytes()).unwrap();
        let events = p.delivery_events("default", JobKind::Subscribe, at);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].0, p.dedupe_key());
        assert_eq!(
            (events[0].1.job_kind, events[0].1.template_id.clone(), events[0].1.errcode),
            (JobKind::Template, None, None)
        );
        // Other events are neither.
        let other = Push::parse(
            r#"{"ToUserName":"a","FromUserName":"b","CreateTime":1,"MsgType":"event","Event":"SCAN"}"#.as_bytes(),
        )
        .unwrap();
        assert!(other.delivery_events("default", JobKind::Subscribe, at).is_empty());
        assert!(other.consent_events("default", JobKind::Subscribe, at).is_empty());
    }

    #[test]
    fn consent_items_become_consent_events_with_their_scene() {
        let at = Utc::now();
        let p = Push::parse(POPUP_XML.as_bytes()).unwrap();
        let events = p.consent_events("default", JobKind::Subscribe, at);
        let keys: Vec<&str> = events.iter().map(|(_, e)| e.routing_key()).collect();
        assert_eq!(keys, ["consent.accepted", "consent.rejected"]);
        let (key, first) = &events[0];
        assert_eq!(
            key,
            "consent:subscribe_msg_popup_event:otFpruAK8D-E6EfStSYonYSBZ8_4:1610969440:VRR0UEO9VJOLs0MHlU0OilqX6MVFDwH3_3gz3Oc0NIc:accept"
        );
        assert_ne!(events[0].0, events[1].0);
        assert_eq!(
            (first.kind.as_str(), first.account.as_str(), first.job_kind),
            ("consent", "default", JobKind::Subscribe)
        );
        assert_eq!(
            (first.openid.as_str(), first.to_user_name.as_str()),
            ("otFpruAK8D-E6EfStSYonYSBZ8_4", "gh_123456789abc")
        );
        assert_eq!(
            (first.status.as_str(), first.scene.as_deref(), first.event.as_str()),
            ("accept", Some("2"), "subscribe_msg_popup_event")
        );
        assert_eq!((first.create_time, first.received_at), (1610969440, at));
        assert!(p.delivery_events("default", JobKind::Subscribe, at).is_empty());

        let p = Push::parse(CHANGE_JSON.as_bytes()).unwrap();
        let events = p.consent_events("mini", JobKind::MiniprogramSubscribe, at);
        assert_eq!(events.len(), 1);
        let e = &events[0].1;
        assert_eq!(
            (e.routing_key(), e.scene.as_deref(), e.status.as_str()),
            ("consent.rejected", Some(SETTINGS_SCENE), "reject")
        );
        assert_eq!(
            (e.job_kind, e.template_id.as_str()),
            (JobKind::MiniprogramSubscribe, "BEwX0BOT3MqK3Uc5oTU3CGBqzjpndk2jzUf7VfExd8")
        );
    }

    #[test]
    fn malformed_lists_say_what_is_wrong() {
        let err = |body: String| Push::parse(body.as_bytes()).unwrap_err().to_string();
        let item = |fields: &str| sent_json(&format!("{{{fields}}}"));
        assert_eq!(err(sent_json("[]")), "List has no items");
        assert_eq!(err(sent_json("null")), "List[0] is not an object");
        assert_eq!(
            err(sent_json(r#"[{"TemplateId":"T","MsgID":"1","ErrorCode":"0","ErrorStatus":"ok"}, "x"]"#)),
            "List[1] is not an object"
        );
        assert_eq!(err(sent_json("[[]]")), "List[0] is not an object");
        assert_eq!(err(item(r#""MsgID":"1","ErrorCode":"0","ErrorStatus":"ok""#)), "List[0]: TemplateId is missing");
        assert_eq!(err(item(r#""TemplateId":"T","ErrorCode":"0","ErrorStatus":"ok""#)), "List[0]: MsgID is missing");
        assert_eq!(
            err(item(r#""TemplateId":"T","MsgID":"1.0","ErrorCode":"0","ErrorStatus":"ok""#)),
            "List[0]: MsgID is not a number: \"1.0\""
        );
        assert_eq!(
            err(item(r#""TemplateId":"T","MsgID":"1","ErrorCode":"ok","ErrorStatus":"ok""#)),
            "List[0]: ErrorCode is not a number: \"ok\""
        );
        assert_eq!(err(item(r#""TemplateId":"T","MsgID":"1","ErrorCode":"0""#)), "List[0]: ErrorStatus is missing");
        assert_eq!(
            err(item(r#""TemplateId":{"a":1},"MsgID":"1","ErrorCode":"0","ErrorStatus":"ok""#)),
            "List[0]: TemplateId is not text"
        );
        let no_list = sent_json("0").replace(r#","List":0"#, "");
        assert_eq!(err(no_list), "List is missing");
        // In XML: an empty wrapper, an empty item, an item with a field twice.
        let xml = |list: &str| {
            SENT_XML_ONE.replace(
                &SENT_XML_ONE
                    [SENT_XML_ONE.find("<SubscribeMsgSentEvent>").unwrap()..SENT_XML_ONE.find("</xml>").unwrap()],
                list,
            )
        };
        assert_eq!(err(xml("<SubscribeMsgSentEvent></SubscribeMsgSentEvent>")), "List[0] is not an object");
        assert_eq!(err(xml("<SubscribeMsgSentEvent><List/></SubscribeMsgSentEvent>")), "List[0] is not an object");
        assert_eq!(err(xml("")), "List is missing");
        let twice = "<SubscribeMsgSentEvent><List><TemplateId>a</TemplateId><TemplateId>b</TemplateId><MsgID>1</MsgID><ErrorCode>0</ErrorCode><ErrorStatus>s</ErrorStatus></List></SubscribeMsgSentEvent>";
        assert_eq!(err(xml(twice)), "List[0]: TemplateId appears more than once");
        // A consent answer other than accept or reject is not guessed at.
        let popup = POPUP_XML.replace("<![CDATA[reject]]>", "<![CDATA[ban]]>");
        assert_eq!(err(popup), "List[1]: SubscribeStatusString \"ban\" is neither accept nor reject");
        let change = CHANGE_JSON.replace(r#""SubscribeStatusString": "reject""#, r#""Status": "reject""#);
        assert_eq!(err(change), "List[0]: SubscribeStatusString is missing");
    }

    proptest::proptest! {
        #[test]
        fn no_string_panics_the_parser(s in "\\PC{0,300}") {
            let _ = Push::parse(s.as_bytes());
        }

        #[test]
        fn no_bytes_panic_the_parser(b in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = Push::parse(&b);
        }

        #[test]
        fn no_xmlish_soup_panics_the_parser(parts in proptest::collection::vec(proptest::sample::select(vec![
            "<xml>", "</xml>", "<a>", "</a>", "<a/>", "<![CDATA[", "]]>", "]]&g;", "&amp;", "&#0;", "&#x110000;", "&x;",
            "<!DOCTYPE x>", "<!ENTITY", "<?pi?>", "<!--", "-->", "1", "MsgID", "<MsgID>", "</MsgID>", "{", "}", "\"",
            ":", "<Event>", "</Event>", "TEMPLATESENDJOBFINISH", " ", "\n", "<", ">", "&", "\u{feff}",
            "subscribe_msg_sent_event", "subscribe_msg_popup_event", "<List>", "</List>", "<SubscribeMsgSentEvent>",
            "</SubscribeMsgSentEvent>", "<TemplateId>", "</TemplateId>", "<ErrorCode>", "</ErrorCode>",
        ]), 0..60)) {
            let s: String = parts.concat();
            let _ = Push::parse(s.as_bytes());
        }

        #[test]
        fn any_msgid_round_trips(id in proptest::num::u64::ANY) {
            let xml = SEED_SUCCESS.replace("200163836", &id.to_string());
            let p = Push::parse(xml.as_bytes()).unwrap();
            proptest::prop_assert_eq!(p.receipt.map(|r| r.msgid), Some(id));
        }
    }

    /// Any JSON value in any of a List's places reads or is refused, never panics.
    fn json_soup() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            proptest::sample::select(vec![
                "",
                "0",
                "1",
                "accept",
                "reject",
                "success",
                "-1",
                "1e3",
                "18446744073709551616"
            ])
            .prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            let keys = proptest::sample::select(vec![
                "List",
                "TemplateId",
                "MsgID",
                "MsgId",
                "ErrorCode",
                "ErrorStatus",
                "SubscribeStatusString",
                "PopupScene",
            ]);
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(keys, inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn no_list_panics_the_parser(
            list in json_soup(),
            event in proptest::sample::select(vec![SUBSCRIBE_MSG_SENT_EVENT, SUBSCRIBE_MSG_POPUP_EVENT, SUBSCRIBE_MSG_CHANGE_EVENT]),
            place in proptest::sample::select(vec!["List", "SubscribeMsgSentEvent", "SubscribeMsgPopupEvent", "SubscribeMsgChangeEvent"]),
        ) {
            let mut fields = Fields::new();
            for (k, v) in [("ToUserName", "gh"), ("FromUserName", "o"), ("CreateTime", "1"), ("MsgType", "event"), ("Event", event)] {
                fields.insert(k.into(), Value::from(v));
            }
            fields.insert(place.into(), list);
            let body = serde_json::to_vec(&fields).unwrap();
            if let Ok(p) = Push::parse(&body) {
                let (deliveries, consents) = (
                    p.delivery_events("a", JobKind::Subscribe, Utc::now()),
                    p.consent_events("a", JobKind::Subscribe, Utc::now()),
                );
                // A readable subscription event always reports something.
                proptest::prop_assert!(p.subscription.is_none() || !deliveries.is_empty() || !consents.is_empty());
            }
        }
    }
}
