//! The environment's part of the configuration, derived from the keys themselves: every key has
//! a variable, `WXPUSH_` and its path in capitals with `__` between a section and its key
//! (`rate_limit` → `WXPUSH_RATE_LIMIT`, `[token] refresh_ahead_secs` →
//! `WXPUSH_TOKEN__REFRESH_AHEAD_SECS`). Within a section a single `_` works as well
//! (`WXPUSH_TLS_CA_FILE`, `WXPUSH_WEBHOOK_MSGID_WAIT_MS`: the names older releases documented);
//! a test holds every name to one key.
//!
//! `[[accounts]]` is a list and has no variables; `WXPUSH_APPID`, `WXPUSH_APPSECRET`,
//! `WXPUSH_CALLBACK_TOKEN` and `WXPUSH_ENCODING_AES_KEY` describe the account named `default`.

use std::sync::LazyLock;

use figment::{
    error::Kind as ErrorKind,
    value::{Dict, Value},
};
use secrecy::SecretString;

use super::{Account, Config, ConfigError};
use crate::domain::job::DEFAULT_ACCOUNT;

/// What a key holds, which says how its variable's text is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Taken as it is (names, URLs, addresses, paths).
    Text,
    /// A number or a boolean.
    Parsed,
    /// A list: `1,5,30` or `[1, 5, 30]`.
    List,
}

/// One environment variable and the key it sets.
#[derive(Debug, Clone)]
struct Variable {
    name: String,
    path: Vec<String>,
    kind: Kind,
}

/// The variables describing the account named `default`, with the field each sets.
const DEFAULT_ACCOUNT_VARS: [(&str, &str); 4] = [
    ("WXPUSH_APPID", "appid"),
    ("WXPUSH_APPSECRET", "secret"),
    ("WXPUSH_CALLBACK_TOKEN", "callback_token"),
    ("WXPUSH_ENCODING_AES_KEY", "encoding_aes_key"),
];

/// Every variable of a key, derived once from the keys of the default configuration: a
/// section's keys first under their `__` name, then under their short one.
static VARIABLES: LazyLock<Vec<Variable>> = LazyLock::new(|| {
    // A Config serializes to a table; the tests below fail if it ever did not.
    let keys = Value::serialize(Config::default()).ok().and_then(Value::into_dict).unwrap_or_default();
    let mut long = Vec::new();
    let mut short = Vec::new();
    for (key, value) in keys.iter().filter(|(key, _)| *key != "accounts") {
        match value {
            Value::Dict(_, section) => {
                for (inner, value) in section {
                    let path = vec![key.clone(), inner.clone()];
                    long.push(variable(format!("{key}.{inner}"), path.clone(), value));
                    short.push(variable(format!("{key}_{inner}"), path, value));
                }
            }
            value => long.push(variable(key.clone(), vec![key.clone()], value)),
        }
    }
    long.extend(short);
    long
});

/// The variable of `key` (`token.wait_ms` → `WXPUSH_TOKEN__WAIT_MS`).
fn env_name(key: &str) -> String {
    format!("WXPUSH_{}", key.replace('.', "__").to_ascii_uppercase())
}

fn variable(key: String, path: Vec<String>, default: &Value) -> Variable {
    let kind = match default {
        Value::String(..) | Value::Char(..) | Value::Empty(..) => Kind::Text,
        Value::Array(..) => Kind::List,
        _ => Kind::Parsed,
    };
    Variable { name: env_name(&key), path, kind }
}

/// Every environment variable the configuration reads, with the key it sets:
/// `("WXPUSH_TOKEN__WAIT_MS", "token.wait_ms")`, `("WXPUSH_APPID", "accounts[default].appid")`.
/// Derived from the keys on first use; iterate it (`for (var, key) in ENV_VARS`) or call
/// [`EnvVars::iter`].
pub const ENV_VARS: EnvVars = EnvVars;

/// The list behind [`ENV_VARS`].
#[derive(Debug, Clone, Copy)]
pub struct EnvVars;

impl EnvVars {
    pub fn iter(self) -> std::slice::Iter<'static, (String, String)> {
        static LIST: LazyLock<Vec<(String, String)>> = LazyLock::new(|| {
            let keys = VARIABLES.iter().map(|v| (v.name.clone(), v.path.join(".")));
            let account = DEFAULT_ACCOUNT_VARS
                .iter()
                .map(|(var, field)| ((*var).to_owned(), format!("accounts[{DEFAULT_ACCOUNT}].{field}")));
            keys.chain(account).collect()
        });
        LIST.iter()
    }
}

impl IntoIterator for EnvVars {
    type Item = &'static (String, String);
    type IntoIter = std::slice::Iter<'static, (String, String)>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// The keys the environment sets, and which variable set each (to name it in errors).
pub(super) struct Overrides {
    /// `[section.]key → value`, as figment merges it over the file.
    pub(super) dict: Dict,
    set_by: Vec<(Vec<String>, String, String)>,
}

impl Overrides {
    /// Reads every key's variable from `env`; empty ones count as unset. A key's `__` name wins
    /// over its short one.
    pub(super) fn read(env: &impl Fn(&str) -> Option<String>) -> Overrides {
        let mut overrides = Overrides { dict: Dict::new(), set_by: Vec::new() };
        for variable in VARIABLES.iter() {
            let Some(text) = env(&variable.name).filter(|v| !v.trim().is_empty()) else { continue };
            if overrides.source_of(&variable.path).is_some() {
                continue;
            }
            overrides.insert(&variable.path, value(variable.kind, &text));
            overrides.set_by.push((variable.path.clone(), variable.name.clone(), text));
        }
        overrides
    }

    fn insert(&mut self, path: &[String], value: Value) {
        match path {
            [key] => {
                self.dict.insert(key.clone(), value);
            }
            [section, key] => {
                let entry = self.dict.entry(section.clone()).or_insert_with(|| Dict::new().into());
                if let Value::Dict(_, dict) = entry {
                    dict.insert(key.clone(), value);
                }
            }
            _ => {}
        }
    }

    /// Why figment could not read the merged configuration: naming the variable that set the
    /// value, else the file and the key.
    pub(super) fn extract_error(&self, file: &str, e: &figment::Error) -> ConfigError {
        if let Some((var, text)) = self.source_of(&e.path) {
            return ConfigError::Env { var: var.to_owned(), value: text.to_owned(), message: e.kind.to_string() };
        }
        let message = match &e.kind {
            // The path ends with the unknown field itself.
            ErrorKind::UnknownField(field, _) => match e.path.split_last() {
                Some((_, section)) if !section.is_empty() => {
                    format!("unknown field `{field}` in [{}]", section.join("."))
                }
                _ => format!("unknown field `{field}`"),
            },
            kind if e.path.is_empty() => kind.to_string(),
            kind => format!("{}: {kind}", e.path.join(".")),
        };
        ConfigError::Parse { path: file.to_owned(), message }
    }

    /// A wrong value of `key` (empty: a problem of several keys), naming the variable that set
    /// it, else the key and its variable.
    pub(super) fn invalid(&self, key: &str, message: String) -> ConfigError {
        if key.is_empty() {
            return ConfigError::Invalid(message);
        }
        let path: Vec<String> = key.split('.').map(str::to_owned).collect();
        match self.source_of(&path) {
            Some((var, text)) => ConfigError::Env { var: var.to_owned(), value: text.to_owned(), message },
            None => ConfigError::Invalid(format!("{key} ({}) {message}", env_name(key))),
        }
    }

    /// The variable (and its text) that set the key at `path`, if one did.
    pub(super) fn source_of(&self, path: &[String]) -> Option<(&str, &str)> {
        self.set_by.iter().find(|(p, _, _)| p == path).map(|(_, var, text)| (var.as_str(), text.as_str()))
    }
}

/// The variable's text as the key's kind of value. Text that does not read as one is kept as
/// text, and the key's type then refuses it, naming the variable.
fn value(kind: Kind, text: &str) -> Value {
    let trimmed = text.trim();
    match kind {
        Kind::Text => Value::from(text.to_owned()),
        Kind::Parsed => trimmed.parse().unwrap_or_else(|_| Value::from(text.to_owned())),
        Kind::List if trimmed.starts_with('[') => trimmed.parse().unwrap_or_else(|_| Value::from(text.to_owned())),
        Kind::List => format!("[{trimmed}]").parse().unwrap_or_else(|_| Value::from(text.to_owned())),
    }
}

/// Applies `WXPUSH_APPID` and its siblings to the account named `default`, adding it when
/// `WXPUSH_APPID` is set and the file has none.
pub(super) fn apply_default_account(
    accounts: &mut Vec<Account>,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    let [appid, secret, callback_token, aes_key] =
        DEFAULT_ACCOUNT_VARS.map(|(var, _)| env(var).filter(|v| !v.is_empty()));
    if appid.is_none() && secret.is_none() && callback_token.is_none() && aes_key.is_none() {
        return Ok(());
    }
    let index = match accounts.iter().position(|a| a.name == DEFAULT_ACCOUNT) {
        Some(i) => i,
        None => {
            let Some(appid) = appid.clone() else {
                return Err(ConfigError::Invalid(
                    "WXPUSH_APPSECRET, WXPUSH_CALLBACK_TOKEN or WXPUSH_ENCODING_AES_KEY is set but the account \
                     `default` has no appid: set WXPUSH_APPID too, or add an [[accounts]] entry named \"default\""
                        .into(),
                ));
            };
            accounts.push(Account::new(DEFAULT_ACCOUNT, appid));
            accounts.len() - 1
        }
    };
    let account = &mut accounts[index];
    if let Some(v) = appid {
        account.appid = v;
    }
    if let Some(v) = secret {
        account.secret = SecretString::from(v);
    }
    if let Some(v) = callback_token {
        account.callback_token = Some(SecretString::from(v));
    }
    if let Some(v) = aes_key {
        account.encoding_aes_key = Some(SecretString::from(v));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn every_name_sets_one_key_and_every_key_has_its_derived_name() {
        let mut seen = BTreeMap::new();
        for (var, key) in ENV_VARS {
            if let Some(other) = seen.insert(var.clone(), key.clone()) {
                panic!("{var} would set both {other} and {key}");
            }
        }
        assert_eq!(seen["WXPUSH_AMQP_URL"], "amqp_url");
        assert_eq!(seen["WXPUSH_TOKEN__REFRESH_AHEAD_SECS"], "token.refresh_ahead_secs");
        assert_eq!(seen["WXPUSH_TLS_CA_FILE"], "tls.ca_file", "the short name of a section key");
        assert_eq!(seen["WXPUSH_WEBHOOK_MSGID_WAIT_MS"], "webhook.msgid_wait_ms");
        assert_eq!(seen["WXPUSH_ENCODING_AES_KEY"], "accounts[default].encoding_aes_key");
        assert!(!seen.keys().any(|v| v.starts_with("WXPUSH_ACCOUNTS")), "the list of accounts has no variable");
    }

    #[test]
    fn text_stays_text_and_numbers_and_lists_are_read() {
        assert_eq!(value(Kind::Text, "0123"), Value::from("0123".to_owned()));
        assert_eq!(value(Kind::Parsed, " 8 ").to_u128(), Some(8));
        assert_eq!(value(Kind::Parsed, "many"), Value::from("many".to_owned()));
        for list in ["1,5,30", "[1, 5, 30]", " 1, 5 ,30 "] {
            let numbers: Vec<u128> =
                value(Kind::List, list).into_array().unwrap().iter().filter_map(Value::to_u128).collect();
            assert_eq!(numbers, [1, 5, 30], "{list}");
        }
    }

    #[test]
    fn the_long_name_wins_over_the_short_one() {
        let env = |var: &str| match var {
            "WXPUSH_TOKEN__WAIT_MS" => Some("7".to_owned()),
            "WXPUSH_TOKEN_WAIT_MS" => Some("9".to_owned()),
            _ => None,
        };
        let overrides = Overrides::read(&env);
        let path = ["token".to_owned(), "wait_ms".to_owned()];
        assert_eq!(overrides.source_of(&path), Some(("WXPUSH_TOKEN__WAIT_MS", "7")));
    }
}
