//! The events the sandbox pushes, rendered as WeChat renders them (docs/wechat-api.md, sections 3
//! and 6): XML, or JSON for an account whose console is set to JSON, where every value is a
//! string and `List` is one object for one item and an array for several.

use std::fmt::Write as _;

use serde::{
    Serialize, Serializer,
    ser::{SerializeMap, SerializeSeq},
};

use super::EventFormat;

/// One event to push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Event {
    /// `TEMPLATESENDJOBFINISH`: a template message's receipt.
    TemplateFinish { msgid: u64, status: &'static str },
    /// One of the three subscription events, with its `List` items.
    Subscribe { kind: SubscribeEvent, items: Vec<Item> },
}

impl Event {
    pub fn name(&self) -> &'static str {
        match self {
            Event::TemplateFinish { .. } => "TEMPLATESENDJOBFINISH",
            Event::Subscribe { kind, .. } => kind.name(),
        }
    }

    /// The message id a receipt is about, for logs.
    pub fn msgid(&self) -> Option<u64> {
        match self {
            Event::TemplateFinish { msgid, .. } => Some(*msgid),
            Event::Subscribe { items, .. } => items.first().and_then(|i| i.msgid),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SubscribeEvent {
    Sent,
    Popup,
    Change,
}

impl SubscribeEvent {
    fn name(self) -> &'static str {
        match self {
            SubscribeEvent::Sent => "subscribe_msg_sent_event",
            SubscribeEvent::Popup => "subscribe_msg_popup_event",
            SubscribeEvent::Change => "subscribe_msg_change_event",
        }
    }

    /// The XML element around the `List` items.
    fn wrapper(self) -> &'static str {
        match self {
            SubscribeEvent::Sent => "SubscribeMsgSentEvent",
            SubscribeEvent::Popup => "SubscribeMsgPopupEvent",
            SubscribeEvent::Change => "SubscribeMsgChangeEvent",
        }
    }
}

/// One `List` item: `TemplateId`, then the event's own fields in WeChat's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Item {
    template_id: String,
    msgid: Option<u64>,
    /// (tag, value, whether the value is text: CDATA in XML).
    fields: Vec<(&'static str, String, bool)>,
}

impl Item {
    /// A `subscribe_msg_sent_event` item: `ErrorCode` 0 and `ErrorStatus` `success` when
    /// delivered.
    pub fn sent(template_id: &str, msgid: u64, error_code: i64, error_status: &str) -> Self {
        let fields = vec![
            ("MsgID", msgid.to_string(), false),
            ("ErrorCode", error_code.to_string(), false),
            ("ErrorStatus", error_status.to_owned(), true),
        ];
        Self { template_id: template_id.to_owned(), msgid: Some(msgid), fields }
    }

    /// A popup (with its `PopupScene`) or change (`scene` `None`) item.
    pub fn consent(template_id: &str, accept: bool, scene: Option<u8>) -> Self {
        let mut fields = vec![("SubscribeStatusString", if accept { "accept" } else { "reject" }.to_owned(), true)];
        if let Some(scene) = scene {
            fields.push(("PopupScene", scene.to_string(), false));
        }
        Self { template_id: template_id.to_owned(), msgid: None, fields }
    }
}

/// Who an event is from and to, and when.
pub(super) struct Header<'a> {
    /// The account's original id (`gh_…`).
    pub to_user_name: &'a str,
    /// The recipient's openid.
    pub from_user_name: &'a str,
    pub create_time: i64,
}

/// The event as the account's format has it.
pub(super) fn render(format: EventFormat, header: &Header<'_>, event: &Event) -> String {
    match format {
        EventFormat::Xml => xml(header, event),
        // Serializing strings and maps of strings cannot fail.
        EventFormat::Json => serde_json::to_string(&JsonEvent { header, event }).unwrap_or_default(),
    }
}

/// The body of a safe-mode push: the account's original id and the encrypted event.
pub(super) fn envelope(format: EventFormat, to_user_name: &str, encrypt: &str) -> String {
    match format {
        EventFormat::Xml => {
            let mut body = String::with_capacity(encrypt.len() + 120);
            body.push_str("<xml><ToUserName>");
            push_cdata(&mut body, to_user_name);
            body.push_str("</ToUserName><Encrypt>");
            push_cdata(&mut body, encrypt);
            body.push_str("</Encrypt></xml>");
            body
        }
        EventFormat::Json => serde_json::json!({"ToUserName": to_user_name, "Encrypt": encrypt}).to_string(),
    }
}

fn xml(header: &Header<'_>, event: &Event) -> String {
    let mut xml = String::with_capacity(320 + header.from_user_name.len());
    xml.push_str("<xml>\n<ToUserName>");
    push_cdata(&mut xml, header.to_user_name);
    xml.push_str("</ToUserName>\n<FromUserName>");
    push_cdata(&mut xml, header.from_user_name);
    // Writing to a String cannot fail.
    let _ = write!(
        xml,
        "</FromUserName>\n<CreateTime>{}</CreateTime>\n<MsgType><![CDATA[event]]></MsgType>\n<Event>",
        header.create_time
    );
    push_cdata(&mut xml, event.name());
    xml.push_str("</Event>\n");
    match event {
        Event::TemplateFinish { msgid, status } => {
            let _ = write!(xml, "<MsgID>{msgid}</MsgID>\n<Status>");
            push_cdata(&mut xml, status);
            xml.push_str("</Status>\n");
        }
        Event::Subscribe { kind, items } => {
            let _ = writeln!(xml, "<{}>", kind.wrapper());
            for item in items {
                push_item(&mut xml, item);
            }
            let _ = writeln!(xml, "</{}>", kind.wrapper());
        }
    }
    xml.push_str("</xml>");
    xml
}

fn push_item(xml: &mut String, item: &Item) {
    xml.push_str("<List>\n<TemplateId>");
    push_cdata(xml, &item.template_id);
    xml.push_str("</TemplateId>\n");
    for (tag, value, text) in &item.fields {
        let _ = write!(xml, "<{tag}>");
        if *text {
            push_cdata(xml, value);
        } else {
            xml.push_str(value);
        }
        let _ = writeln!(xml, "</{tag}>");
    }
    xml.push_str("</List>\n");
}

/// A CDATA section; a `]]>` inside the text (a touser is whatever the sender sent) is split
/// across two sections so that the XML stays well-formed.
fn push_cdata(out: &mut String, text: &str) {
    out.push_str("<![CDATA[");
    out.push_str(&text.replace("]]>", "]]]]><![CDATA[>"));
    out.push_str("]]>");
}

/// The JSON form, keys in WeChat's order (a `serde_json::Map` would sort them).
struct JsonEvent<'a> {
    header: &'a Header<'a>,
    event: &'a Event,
}

impl Serialize for JsonEvent<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let h = self.header;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("ToUserName", h.to_user_name)?;
        map.serialize_entry("FromUserName", h.from_user_name)?;
        map.serialize_entry("CreateTime", &h.create_time.to_string())?;
        map.serialize_entry("MsgType", "event")?;
        map.serialize_entry("Event", self.event.name())?;
        match self.event {
            Event::TemplateFinish { msgid, status } => {
                map.serialize_entry("MsgID", &msgid.to_string())?;
                map.serialize_entry("Status", status)?;
            }
            Event::Subscribe { items, .. } => match items.as_slice() {
                [one] => map.serialize_entry("List", one)?,
                many => map.serialize_entry("List", &JsonItems(many))?,
            },
        }
        map.end()
    }
}

struct JsonItems<'a>(&'a [Item]);

impl Serialize for JsonItems<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for item in self.0 {
            seq.serialize_element(item)?;
        }
        seq.end()
    }
}

impl Serialize for Item {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.fields.len() + 1))?;
        map.serialize_entry("TemplateId", &self.template_id)?;
        for (tag, value, _) in &self.fields {
            map.serialize_entry(tag, value)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn header() -> Header<'static> {
        Header {
            to_user_name: "gh_123456789abc",
            from_user_name: "otFpruAK8D-E6EfStSYonYSBZ8_4",
            create_time: 1610969468,
        }
    }

    #[test]
    fn template_receipt_is_the_documented_layout() {
        let h = Header {
            to_user_name: "gh_7f083739789a",
            from_user_name: "oia2TjuEGTNoeX76QEjQNrcURxG8",
            create_time: 1395658920,
        };
        let xml = render(EventFormat::Xml, &h, &Event::TemplateFinish { msgid: 200163836, status: "success" });
        assert_eq!(
            xml,
            "<xml>\n<ToUserName><![CDATA[gh_7f083739789a]]></ToUserName>\n\
             <FromUserName><![CDATA[oia2TjuEGTNoeX76QEjQNrcURxG8]]></FromUserName>\n\
             <CreateTime>1395658920</CreateTime>\n<MsgType><![CDATA[event]]></MsgType>\n\
             <Event><![CDATA[TEMPLATESENDJOBFINISH]]></Event>\n<MsgID>200163836</MsgID>\n\
             <Status><![CDATA[success]]></Status>\n</xml>"
        );
        let json: Value = serde_json::from_str(&render(
            EventFormat::Json,
            &h,
            &Event::TemplateFinish { msgid: 200163836, status: "success" },
        ))
        .expect("json");
        assert_eq!(json["MsgID"], "200163836");
        assert_eq!(json["Event"], "TEMPLATESENDJOBFINISH");
    }

    #[test]
    fn cdata_survives_a_hostile_openid() {
        let h = Header { to_user_name: "gh_x", from_user_name: "a]]>b", create_time: 1 };
        let xml = render(EventFormat::Xml, &h, &Event::TemplateFinish { msgid: 2, status: "success" });
        assert!(xml.contains("<![CDATA[a]]]]><![CDATA[>b]]>"));
    }

    #[test]
    fn sent_event_xml_is_the_documented_layout() {
        let item = Item::sent("VRR0UEO9VJOLs0MHlU0OilqX6MVFDwH3_3gz3Oc0NIc", 1700827132819554304, 0, "success");
        let event = Event::Subscribe { kind: SubscribeEvent::Sent, items: vec![item] };
        assert_eq!(
            render(EventFormat::Xml, &header(), &event),
            "<xml>\n<ToUserName><![CDATA[gh_123456789abc]]></ToUserName>\n\
             <FromUserName><![CDATA[otFpruAK8D-E6EfStSYonYSBZ8_4]]></FromUserName>\n\
             <CreateTime>1610969468</CreateTime>\n<MsgType><![CDATA[event]]></MsgType>\n\
             <Event><![CDATA[subscribe_msg_sent_event]]></Event>\n<SubscribeMsgSentEvent>\n<List>\n\
             <TemplateId><![CDATA[VRR0UEO9VJOLs0MHlU0OilqX6MVFDwH3_3gz3Oc0NIc]]></TemplateId>\n\
             <MsgID>1700827132819554304</MsgID>\n<ErrorCode>0</ErrorCode>\n\
             <ErrorStatus><![CDATA[success]]></ErrorStatus>\n</List>\n</SubscribeMsgSentEvent>\n</xml>"
        );
    }

    #[test]
    fn json_lists_are_one_object_or_an_array_of_strings() {
        let one = Event::Subscribe { kind: SubscribeEvent::Sent, items: vec![Item::sent("T", u64::MAX, 0, "success")] };
        let text = render(EventFormat::Json, &header(), &one);
        assert!(text.starts_with(r#"{"ToUserName":"gh_123456789abc","FromUserName":"#), "WeChat's key order: {text}");
        let v: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(v["CreateTime"], "1610969468");
        assert_eq!(
            v["List"],
            json!({"TemplateId": "T", "MsgID": u64::MAX.to_string(), "ErrorCode": "0", "ErrorStatus": "success"})
        );
        let popup = Event::Subscribe {
            kind: SubscribeEvent::Popup,
            items: vec![Item::consent("A", true, Some(0)), Item::consent("B", false, Some(0))],
        };
        let v: Value = serde_json::from_str(&render(EventFormat::Json, &header(), &popup)).expect("json");
        assert_eq!(v["Event"], "subscribe_msg_popup_event");
        assert_eq!(
            v["List"],
            json!([
                {"TemplateId": "A", "SubscribeStatusString": "accept", "PopupScene": "0"},
                {"TemplateId": "B", "SubscribeStatusString": "reject", "PopupScene": "0"}
            ])
        );
        let change = Event::Subscribe { kind: SubscribeEvent::Change, items: vec![Item::consent("C", false, None)] };
        let xml = render(EventFormat::Xml, &header(), &change);
        assert!(xml.contains(
            "<SubscribeMsgChangeEvent>\n<List>\n<TemplateId><![CDATA[C]]></TemplateId>\n\
             <SubscribeStatusString><![CDATA[reject]]></SubscribeStatusString>\n</List>\n</SubscribeMsgChangeEvent>"
        ));
    }

    #[test]
    fn safe_mode_envelopes() {
        assert_eq!(
            envelope(EventFormat::Xml, "gh_x", "abc"),
            "<xml><ToUserName><![CDATA[gh_x]]></ToUserName><Encrypt><![CDATA[abc]]></Encrypt></xml>"
        );
        let v: Value = serde_json::from_str(&envelope(EventFormat::Json, "gh_x", "abc")).expect("json");
        assert_eq!(v, json!({"ToUserName": "gh_x", "Encrypt": "abc"}));
    }
}
