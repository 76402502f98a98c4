//! Subscription consent, per account, openid and template: how many one-time consents
//! (一次性订阅) are left and whether a long-term one (长期订阅) was granted. A subscription send
//! needs one (43101 otherwise); a one-time consent is used up only by a send that is accepted.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use serde::{Deserialize, Serialize};

use super::{
    Shared,
    events::{Event, Item, SubscribeEvent},
    lock,
    receipts::{self, Receipt},
    unix_now,
};
use crate::config::AccountKind;

/// A consent to grant, or every recipient's starting consent (`SandboxAccount::auto_consent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consent {
    /// This many messages, one each (a user may accept a one-time popup several times).
    Once(u32),
    /// Any number of messages until revoked.
    LongTerm,
}

/// The event a consent change pushes to the account's webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsentEvent {
    /// None: the change is made silently.
    #[default]
    None,
    /// `subscribe_msg_popup_event`: the user answered a popup (accept on grant, reject on
    /// revoke).
    Popup,
    /// `subscribe_msg_change_event`: the user refused in the notification settings (revoke only:
    /// WeChat pushes only refusals this way).
    Change,
}

/// The body of `POST /_sandbox/consents/grant` and `/_sandbox/consents/revoke`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentChange {
    pub appid: String,
    pub openid: String,
    /// One or more templates; an event lists them in this order, one `List` item each.
    pub template_ids: Vec<String>,
    /// Grant only: a long-term consent instead of one-time ones.
    #[serde(default)]
    pub long_term: bool,
    /// Grant only: how many one-time consents to add (default 1).
    #[serde(default)]
    pub count: Option<u32>,
    #[serde(default)]
    pub event: ConsentEvent,
    /// `PopupScene` of a popup event: 0 for a mini program (the default there); 1 (an H5 page,
    /// the default) or 2 (an article) for an official account.
    #[serde(default)]
    pub scene: Option<u8>,
}

/// One (openid, template) consent as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsentRecord {
    pub appid: String,
    pub openid: String,
    pub template_id: String,
    /// One-time consents left.
    pub once: u32,
    pub long_term: bool,
}

/// Which consents `GET /_sandbox/consents` lists: every field given must match.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Filter {
    pub appid: Option<String>,
    pub openid: Option<String>,
    pub template_id: Option<String>,
}

/// Why a consent change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConsentError {
    #[error("no account has appid {0:?}")]
    UnknownAppid(String),
    #[error("{0}")]
    Invalid(&'static str),
}

/// What one grant or revoke does to each of its templates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Change {
    Grant(Consent),
    Revoke,
}

impl ConsentChange {
    /// Checks the request against WeChat's rules for its account kind; the change and the
    /// `PopupScene` it pushes (when it pushes a popup event).
    pub(super) fn check(&self, grant: bool, kind: AccountKind) -> Result<(Change, u8), ConsentError> {
        let invalid = |why| Err(ConsentError::Invalid(why));
        if self.openid.is_empty() {
            return invalid("openid is empty");
        }
        if self.template_ids.is_empty() || self.template_ids.iter().any(String::is_empty) {
            return invalid("template_ids must name one or more templates");
        }
        let scenes: &[u8] = if kind == AccountKind::Miniprogram { &[0] } else { &[1, 2] };
        let scene = self.scene.unwrap_or(scenes[0]);
        if !scenes.contains(&scene) {
            return invalid("scene must be 0 for a mini program, 1 or 2 for an official account");
        }
        if !grant {
            if self.long_term || self.count.is_some() {
                return invalid("long_term and count belong to a grant");
            }
            return Ok((Change::Revoke, scene));
        }
        if self.event == ConsentEvent::Change {
            return invalid("a change event reports refusals only: grant with event popup or none");
        }
        let consent = match (self.long_term, self.count) {
            (true, Some(_)) => return invalid("count is for one-time consents, not long_term"),
            (true, None) => Consent::LongTerm,
            (false, Some(0)) => return invalid("count must be at least 1"),
            (false, count) => Consent::Once(count.unwrap_or(1)),
        };
        Ok((Change::Grant(consent), scene))
    }
}

/// One (openid, template) consent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct State {
    pub once: u32,
    pub long_term: bool,
}

impl State {
    fn from_consent(consent: Option<Consent>) -> State {
        match consent {
            None => State::default(),
            Some(Consent::Once(n)) => State { once: n, long_term: false },
            Some(Consent::LongTerm) => State { once: 0, long_term: true },
        }
    }
}

/// An account's consents. Recipients nobody granted or revoked anything for have the account's
/// starting consent; only changed ones take memory.
pub(super) struct Consents {
    start: Option<Consent>,
    /// openid → template_id → consent.
    changed: HashMap<String, HashMap<String, State>>,
}

impl Consents {
    pub fn new(start: Option<Consent>) -> Self {
        Self { start, changed: HashMap::new() }
    }

    pub fn state(&self, openid: &str, template_id: &str) -> State {
        match self.changed.get(openid).and_then(|t| t.get(template_id)) {
            Some(state) => *state,
            None => State::from_consent(self.start),
        }
    }

    fn entry(&mut self, openid: &str, template_id: &str) -> &mut State {
        let start = State::from_consent(self.start);
        self.changed.entry(openid.to_owned()).or_default().entry(template_id.to_owned()).or_insert(start)
    }

    pub fn apply(&mut self, openid: &str, template_id: &str, change: Change) -> State {
        let state = self.entry(openid, template_id);
        match change {
            Change::Grant(Consent::Once(n)) => state.once = state.once.saturating_add(n),
            Change::Grant(Consent::LongTerm) => state.long_term = true,
            Change::Revoke => *state = State::default(),
        }
        *state
    }

    /// Takes one consent for a send: `None` when there is none left (43101). `Some(true)` when a
    /// one-time consent was taken, so that it can be given back if the send is not accepted.
    fn take(&mut self, openid: &str, template_id: &str) -> Option<bool> {
        let current = self.state(openid, template_id);
        if current.long_term {
            return Some(false);
        }
        if current.once == 0 {
            return None;
        }
        self.entry(openid, template_id).once -= 1;
        Some(true)
    }

    /// Every changed consent, sorted by openid then template.
    pub fn records(&self) -> Vec<(&str, &str, State)> {
        let mut out: Vec<_> = self
            .changed
            .iter()
            .flat_map(|(openid, templates)| templates.iter().map(move |(t, s)| (openid.as_str(), t.as_str(), *s)))
            .collect();
        out.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        out
    }
}

impl Shared {
    /// Grants or revokes, then pushes the event the change asks for.
    pub(super) fn change_consent(
        self: &Arc<Self>,
        change: &ConsentChange,
        grant: bool,
    ) -> Result<Vec<ConsentRecord>, ConsentError> {
        let &index =
            self.by_appid.get(&change.appid).ok_or_else(|| ConsentError::UnknownAppid(change.appid.clone()))?;
        let account = &self.accounts[index];
        let (how, scene) = change.check(grant, account.kind)?;
        let records: Vec<ConsentRecord> = {
            let mut consents = lock(&account.consents);
            let openid = change.openid.as_str();
            let apply = |t: &String| record(&change.appid, openid, t, consents.apply(openid, t, how));
            change.template_ids.iter().map(apply).collect()
        };
        tracing::info!(appid = %change.appid, openid = %change.openid, templates = change.template_ids.len(), grant, event = ?change.event, "consent changed");
        let (kind, scene) = match change.event {
            ConsentEvent::None => return Ok(records),
            ConsentEvent::Popup => (SubscribeEvent::Popup, Some(scene)),
            ConsentEvent::Change => (SubscribeEvent::Change, None),
        };
        let items = change.template_ids.iter().map(|t| Item::consent(t, grant, scene)).collect();
        let create_time = i64::try_from(unix_now().as_secs()).unwrap_or(i64::MAX);
        let event = Event::Subscribe { kind, items };
        receipts::schedule(self, Receipt { account: index, touser: change.openid.clone(), create_time, event });
        Ok(records)
    }

    /// The consents granted or revoked so far that match `filter`.
    pub(super) fn consents(&self, filter: &Filter) -> Vec<ConsentRecord> {
        let matches = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        let mut out = Vec::new();
        for account in self.accounts.iter().filter(|a| matches(&filter.appid, &a.appid)) {
            for (openid, template_id, state) in lock(&account.consents).records() {
                if matches(&filter.openid, openid) && matches(&filter.template_id, template_id) {
                    out.push(record(&account.appid, openid, template_id, state));
                }
            }
        }
        out
    }
}

fn record(appid: &str, openid: &str, template_id: &str, state: State) -> ConsentRecord {
    ConsentRecord {
        appid: appid.to_owned(),
        openid: openid.to_owned(),
        template_id: template_id.to_owned(),
        once: state.once,
        long_term: state.long_term,
    }
}

/// A consent taken for a send in flight. Dropped without [`Hold::commit`] (the send failed, hit
/// a cap, or its client went away), it gives a one-time consent back. A revoke that happens in
/// between is then undone by one: a window of one request, which the sandbox accepts.
pub(super) struct Hold<'a> {
    consents: &'a Mutex<Consents>,
    openid: &'a str,
    template_id: &'a str,
    once: bool,
}

impl<'a> Hold<'a> {
    /// `None` when the recipient has no consent left for the template.
    pub fn take(consents: &'a Mutex<Consents>, openid: &'a str, template_id: &'a str) -> Option<Self> {
        let once = lock(consents).take(openid, template_id)?;
        Some(Self { consents, openid, template_id, once })
    }

    /// The send was accepted: the consent stays used.
    pub fn commit(mut self) {
        self.once = false;
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        if self.once {
            let mut consents = lock(self.consents);
            let state = consents.entry(self.openid, self.template_id);
            state.once = state.once.saturating_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(template_ids: &[&str]) -> ConsentChange {
        ConsentChange {
            appid: "wx1".into(),
            openid: "o1".into(),
            template_ids: template_ids.iter().map(|t| (*t).to_owned()).collect(),
            long_term: false,
            count: None,
            event: ConsentEvent::None,
            scene: None,
        }
    }

    #[test]
    fn one_time_consents_are_used_once_and_given_back_when_not_accepted() {
        let m = Mutex::new(Consents::new(None));
        assert!(Hold::take(&m, "o", "t").is_none(), "no consent by default");
        m.lock().unwrap().apply("o", "t", Change::Grant(Consent::Once(2)));
        Hold::take(&m, "o", "t").expect("first").commit();
        drop(Hold::take(&m, "o", "t").expect("second, not accepted"));
        assert_eq!(m.lock().unwrap().state("o", "t").once, 1, "given back");
        Hold::take(&m, "o", "t").expect("second").commit();
        assert!(Hold::take(&m, "o", "t").is_none(), "used up");
        assert!(Hold::take(&m, "o", "other").is_none(), "per template");
    }

    #[test]
    fn long_term_lasts_until_revoked_and_revoke_beats_the_starting_consent() {
        let m = Mutex::new(Consents::new(Some(Consent::LongTerm)));
        for _ in 0..3 {
            Hold::take(&m, "o", "t").expect("long-term").commit();
        }
        assert_eq!(m.lock().unwrap().apply("o", "t", Change::Revoke), State::default());
        assert!(Hold::take(&m, "o", "t").is_none());
        assert!(Hold::take(&m, "p", "t").is_some(), "others keep the starting consent");
        assert_eq!(m.lock().unwrap().records(), vec![("o", "t", State::default())], "only changed ones are kept");
    }

    #[test]
    fn changes_are_checked_against_the_account_kind() {
        use AccountKind::*;
        assert_eq!(change(&["t"]).check(true, OfficialAccount), Ok((Change::Grant(Consent::Once(1)), 1)));
        assert_eq!(change(&["t"]).check(true, Miniprogram), Ok((Change::Grant(Consent::Once(1)), 0)));
        let long = ConsentChange { long_term: true, ..change(&["t"]) };
        assert_eq!(long.check(true, OfficialAccount), Ok((Change::Grant(Consent::LongTerm), 1)));
        assert!(long.check(false, OfficialAccount).is_err(), "long_term on a revoke");
        assert!(ConsentChange { count: Some(0), ..change(&["t"]) }.check(true, Miniprogram).is_err());
        assert!(change(&[]).check(true, Miniprogram).is_err());
        assert!(change(&[""]).check(true, Miniprogram).is_err());
        assert!(ConsentChange { scene: Some(2), ..change(&["t"]) }.check(true, Miniprogram).is_err());
        assert!(ConsentChange { scene: Some(0), ..change(&["t"]) }.check(false, OfficialAccount).is_err());
        let cancel = ConsentChange { event: ConsentEvent::Change, ..change(&["t"]) };
        assert!(cancel.check(true, OfficialAccount).is_err(), "a change event is a refusal");
        assert_eq!(cancel.check(false, OfficialAccount), Ok((Change::Revoke, 1)));
    }
}
