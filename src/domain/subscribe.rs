//! Subscription-message data: WeChat's typed keys and the rules their values must keep.
//!
//! A subscription template (订阅通知 of an official account, 订阅消息 of a mini program) names its
//! keys by type and position: `thing1`, `amount3`, `character_string7`. WeChat checks each value
//! against its type and answers `47003` when one breaks the rule. [`validate_data`] applies the
//! same rules before sending, so such a job fails at once, costs no call and no quota, and says
//! which key is wrong (`thing1 is 23 characters, at most 20`).
//!
//! [`RULES`] is the one table (docs/wechat-api.md, "Subscription messages", holds the same rows
//! with WeChat's wording and sources; a test keeps the two equal). Where WeChat's table is vague,
//! the reading chosen is written next to the row there.

use std::{borrow::Cow, collections::BTreeMap, fmt};

use serde_json::Value;

/// The type a subscription key carries in its name (`thing1` is a [`SubscribeKind::Thing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SubscribeKind {
    Thing,
    Number,
    Letter,
    Symbol,
    CharacterString,
    Time,
    Date,
    Amount,
    PhoneNumber,
    CarNumber,
    Name,
    Phrase,
    /// A value from the template's registered list (`enum.DATA`); only WeChat knows the list.
    Enum,
}

impl SubscribeKind {
    /// This kind's row in [`RULES`] (a test keeps the table in declaration order).
    pub fn rule(self) -> &'static Rule {
        &RULES[self as usize]
    }

    /// The key prefix: `thing`, `character_string`, ….
    pub fn prefix(self) -> &'static str {
        self.rule().prefix
    }
}

impl fmt::Display for SubscribeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.prefix())
    }
}

/// Classes of characters, as WeChat's table names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chars(u8);

impl Chars {
    /// Chinese characters (汉字): the CJK ideograph blocks.
    pub const HAN: Chars = Chars(1);
    /// English letters (字母): `A`–`Z`, `a`–`z`.
    pub const LETTER: Chars = Chars(2);
    /// Digits (数字): `0`–`9`.
    pub const DIGIT: Chars = Chars(4);
    /// Symbols (符号): "除中文、英文、数字外的常见符号，不能带有换行等控制字符" — anything that is not
    /// Chinese, an English letter or a digit, except control characters.
    pub const SYMBOL: Chars = Chars(8);
    /// Any character but a control character.
    pub const ANY: Chars = Chars(15);

    const fn or(self, other: Chars) -> Chars {
        Chars(self.0 | other.0)
    }

    /// Whether `c` belongs to one of these classes.
    pub fn allows(self, c: char) -> bool {
        class_of(c).is_some_and(|class| self.0 & class.0 != 0)
    }
}

/// The class of one character; `None` for control characters, which no type allows.
fn class_of(c: char) -> Option<Chars> {
    if c.is_control() {
        None
    } else if c.is_ascii_digit() {
        Some(Chars::DIGIT)
    } else if c.is_ascii_alphabetic() {
        Some(Chars::LETTER)
    } else if is_han(c) {
        Some(Chars::HAN)
    } else {
        Some(Chars::SYMBOL)
    }
}

/// CJK Unified Ideographs (with extensions A–H) and the compatibility ideographs.
fn is_han(c: char) -> bool {
    matches!(c, '\u{3400}'..='\u{4DBF}' | '\u{4E00}'..='\u{9FFF}' | '\u{F900}'..='\u{FAFF}' | '\u{20000}'..='\u{323AF}')
}

/// What a value must look like, beyond its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Every character in these classes.
    Plain(Chars),
    /// Digits, with at most one decimal point between digits (`3`, `0.5`).
    Decimal,
    /// A 24-hour time, optionally after a date; or two of them joined by `~`.
    Time,
    /// A date, optionally followed by a 24-hour time; or two of them joined by `~`.
    Date,
    /// At most one currency sign, then at most [`AMOUNT_DIGITS`] digits with an optional decimal
    /// point, then an optional `元`.
    Amount,
    /// Letters and digits; the first and the last character may also be Chinese.
    CarNumber,
    /// Chinese, letters and symbols; with any Chinese in it, at most [`CHINESE_NAME_CHARS`].
    Name,
}

/// One key type: its prefix, WeChat's limits and WeChat's own words for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub kind: SubscribeKind,
    pub prefix: &'static str,
    /// At most this many characters (Unicode scalar values), where WeChat gives a count.
    pub max_chars: Option<usize>,
    pub shape: Shape,
    /// The rule in English, as docs/wechat-api.md states it.
    pub rule: &'static str,
    /// WeChat's wording (订阅消息参数值内容限制说明).
    pub wechat: &'static str,
}

/// The digits an `amount` may have ("10位以内纯数字").
pub const AMOUNT_DIGITS: usize = 10;
/// The characters a `name` with Chinese in it may have ("中文和字母混合按中文名算，10个字内").
pub const CHINESE_NAME_CHARS: usize = 10;

const fn rule(
    kind: SubscribeKind,
    prefix: &'static str,
    max_chars: Option<usize>,
    shape: Shape,
    rule: &'static str,
    wechat: &'static str,
) -> Rule {
    Rule { kind, prefix, max_chars, shape, rule, wechat }
}

use Shape::*;
use SubscribeKind as K;

/// Every key type, in [`SubscribeKind`] order.
pub const RULES: &[Rule] = &[
    rule(
        K::Thing,
        "thing",
        Some(20),
        Plain(Chars::ANY),
        "any characters except control characters",
        "20个以内字符；可汉字、数字、字母或符号组合",
    ),
    rule(
        K::Number,
        "number",
        Some(32),
        Decimal,
        "digits, may have a decimal point",
        "32位以内数字；只能数字，可带小数",
    ),
    rule(K::Letter, "letter", Some(32), Plain(Chars::LETTER), "letters only", "32位以内字母；只能字母"),
    rule(
        K::Symbol,
        "symbol",
        Some(5),
        Plain(Chars::SYMBOL),
        "symbols only (not Chinese, letters or digits)",
        "5位以内符号；只能符号",
    ),
    rule(
        K::CharacterString,
        "character_string",
        Some(32),
        Plain(Chars::DIGIT.or(Chars::LETTER).or(Chars::SYMBOL)),
        "digits, letters and symbols (no Chinese)",
        "32位以内数字、字母或符号；可数字、字母或符号组合",
    ),
    rule(
        K::Time,
        "time",
        None,
        Time,
        "a 24-hour time, optionally after a date; or a range a~b",
        "24小时制时间格式（支持+年月日）",
    ),
    rule(
        K::Date,
        "date",
        None,
        Date,
        "a date, optionally followed by a 24-hour time; or a range a~b",
        "年月日格式（支持+24小时制时间）",
    ),
    rule(
        K::Amount,
        "amount",
        None,
        Amount,
        "one currency sign, up to 10 digits (decimal point allowed), may end in 元",
        "1个币种符号+10位以内纯数字，可带小数，结尾可带“元”",
    ),
    rule(
        K::PhoneNumber,
        "phone_number",
        Some(17),
        Plain(Chars::DIGIT.or(Chars::SYMBOL)),
        "digits and symbols",
        "17位以内，数字、符号",
    ),
    rule(
        K::CarNumber,
        "car_number",
        Some(8),
        CarNumber,
        "letters and digits; the first and last may be Chinese",
        "8位以内，第一位与最后一位可为汉字，其余为字母或数字",
    ),
    rule(
        K::Name,
        "name",
        Some(20),
        Name,
        "up to 10 characters with any Chinese in it, else up to 20 letters and symbols",
        "10个以内纯汉字或20个以内纯字母或符号",
    ),
    rule(K::Phrase, "phrase", Some(5), Plain(Chars::HAN), "Chinese characters only", "5个以内汉字"),
    rule(
        K::Enum,
        "enum",
        None,
        Plain(Chars::ANY),
        "one of the template's registered values (checked by WeChat)",
        "只能上传枚举值范围内的字段值",
    ),
];

/// What is wrong with one value (the key is in [`SubscribeDataError`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    #[error("is not a typed key (thing1, number2, amount3, …)")]
    NotTyped,
    #[error("is not text (a string or a number)")]
    NotText,
    #[error("is empty")]
    Empty,
    #[error("is {chars} characters, at most {max}")]
    TooLong { chars: usize, max: usize },
    #[error("is {chars} characters and has Chinese in it, at most {CHINESE_NAME_CHARS}")]
    ChineseNameTooLong { chars: usize },
    #[error("has {digits} digits, at most {max}")]
    TooManyDigits { digits: usize, max: usize },
    #[error("has a character not allowed at position {position}; allowed: {allowed}")]
    BadChar { position: usize, allowed: &'static str },
    #[error("is not {expected}")]
    BadFormat { expected: &'static str },
}

/// A subscription key or value WeChat would refuse: `thing1 is 23 characters, at most 20`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key} {fault}")]
pub struct SubscribeDataError {
    pub key: String,
    pub fault: Fault,
}

/// A data value as a job carries it: a string, a number, or WeChat's `{"value": …}` item.
pub trait DataValue {
    /// The text WeChat would check, or `None` when the value is not text.
    fn text(&self) -> Option<Cow<'_, str>>;
}

impl DataValue for str {
    fn text(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Borrowed(self))
    }
}

impl DataValue for String {
    fn text(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Borrowed(self))
    }
}

impl<T: DataValue + ?Sized> DataValue for &T {
    fn text(&self) -> Option<Cow<'_, str>> {
        (**self).text()
    }
}

impl DataValue for Value {
    fn text(&self) -> Option<Cow<'_, str>> {
        fn scalar(v: &Value) -> Option<Cow<'_, str>> {
            match v {
                Value::String(s) => Some(Cow::Borrowed(s)),
                Value::Number(n) => Some(Cow::Owned(n.to_string())),
                _ => None,
            }
        }
        match self {
            Value::Object(item) => item.get("value").and_then(scalar),
            v => scalar(v),
        }
    }
}

/// Reads a key: `thing1` → `(Thing, 1)`, `number01` → `(Number, 1)`. The name is a type prefix
/// followed by digits; anything else is refused, naming the key.
pub fn parse_key(key: &str) -> Result<(SubscribeKind, u32), SubscribeDataError> {
    key_rule(key).map(|(rule, index)| (rule.kind, index)).ok_or_else(|| fail(key, Fault::NotTyped))
}

fn key_rule(key: &str) -> Option<(&'static Rule, u32)> {
    let prefix = key.trim_end_matches(|c: char| c.is_ascii_digit());
    let digits = &key[prefix.len()..];
    let index = if digits.is_empty() { None } else { digits.parse().ok() }?;
    RULES.iter().find(|r| r.prefix == prefix).map(|r| (r, index))
}

fn fail(key: &str, fault: Fault) -> SubscribeDataError {
    SubscribeDataError { key: key.to_owned(), fault }
}

/// Checks every key and value of a subscription message's `data`; the first key (in key order)
/// that breaks its type's rule is the error.
pub fn validate_data<V: DataValue>(data: &BTreeMap<String, V>) -> Result<(), SubscribeDataError> {
    for (key, value) in data {
        let text = value.text().ok_or_else(|| fail(key, Fault::NotText))?;
        validate_value(key, &text)?;
    }
    Ok(())
}

/// Checks one value against the type its key names.
pub fn validate_value(key: &str, value: &str) -> Result<(), SubscribeDataError> {
    let (rule, _) = key_rule(key).ok_or_else(|| fail(key, Fault::NotTyped))?;
    check(rule, value).map_err(|fault| fail(key, fault))
}

/// Checks a value against a rule: not empty (47003 "可能为空"), not too long, then its shape.
pub fn check(rule: &Rule, value: &str) -> Result<(), Fault> {
    if value.is_empty() {
        return Err(Fault::Empty);
    }
    let chars = value.chars().count();
    if let Some(max) = rule.max_chars.filter(|&max| chars > max) {
        return Err(Fault::TooLong { chars, max });
    }
    match rule.shape {
        Plain(allowed) => only(value, allowed, rule.rule),
        Decimal => is_decimal(value)
            .then_some(())
            .ok_or(Fault::BadFormat { expected: "a number (digits, may have a decimal point)" }),
        Time => ranged(value, time_point).then_some(()).ok_or(Fault::BadFormat { expected: TIME_FORMAT }),
        Date => ranged(value, date_point).then_some(()).ok_or(Fault::BadFormat { expected: DATE_FORMAT }),
        Amount => amount(value),
        CarNumber => car_number(value),
        Name => name(value, chars),
    }
}

const TIME_FORMAT: &str = "a 24-hour time such as 15:01, 15:01:30 or 2019年10月1日 15:01 (a range joins two with ~)";
const DATE_FORMAT: &str =
    "a date such as 2019年10月1日, 2019-10-01, 10-01 or 2019-10-01 15:01 (a range joins two with ~)";
const AMOUNT_FORMAT: &str = "an amount such as ¥100, 99.50 or 100元 (one currency sign, digits, an optional 元)";

/// Every character in `allowed`; the error names the first one that is not.
fn only(value: &str, allowed: Chars, words: &'static str) -> Result<(), Fault> {
    match value.chars().position(|c| !allowed.allows(c)) {
        None => Ok(()),
        Some(i) => Err(Fault::BadChar { position: i + 1, allowed: words }),
    }
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn is_decimal(s: &str) -> bool {
    match s.split_once('.') {
        Some((whole, fraction)) => all_digits(whole) && all_digits(fraction),
        None => all_digits(s),
    }
}

/// A number of 1 to `max_len` digits within `range`.
fn number_in(s: &str, max_len: usize, range: std::ops::RangeInclusive<u32>) -> bool {
    all_digits(s) && s.len() <= max_len && s.parse().is_ok_and(|n| range.contains(&n))
}

/// `H:MM` or `H:MM:SS`, hours 0–23 (one or two digits).
fn is_clock(s: &str) -> bool {
    let mut parts = s.split(':');
    let hour = parts.next().is_some_and(|h| number_in(h, 2, 0..=23));
    let rest: Vec<&str> = parts.collect();
    hour && (1..=2).contains(&rest.len()) && rest.iter().all(|p| p.len() == 2 && number_in(p, 2, 0..=59))
}

fn is_year(s: &str) -> bool {
    s.len() == 4 && all_digits(s)
}

fn is_month(s: &str) -> bool {
    number_in(s, 2, 1..=12)
}

fn is_day(s: &str) -> bool {
    number_in(s, 2, 1..=31)
}

/// `2019年10月1日`, `2019年10月`, `10月1日`, or the same joined by one of `-` `/` `.`
/// (`2018-01-01`, `2018/01`, `01.01`), as WeChat's note under the table lists them.
fn is_date(s: &str) -> bool {
    chinese_date(s) || separated_date(s)
}

fn chinese_date(s: &str) -> bool {
    let (year, rest) = match s.split_once('年') {
        Some((y, rest)) => (Some(y), rest),
        None => (None, s),
    };
    let Some((month, day)) = rest.split_once('月') else { return false };
    let day_ok = match day {
        "" => year.is_some(),
        day => day.strip_suffix('日').is_some_and(is_day),
    };
    year.is_none_or(is_year) && is_month(month) && day_ok
}

fn separated_date(s: &str) -> bool {
    let Some(sep) = s.chars().find(|c| matches!(c, '-' | '/' | '.')) else { return false };
    let parts: Vec<&str> = s.split(sep).collect();
    match parts.as_slice() {
        [y, m, d] => is_year(y) && is_month(m) && is_day(d),
        [y, m] if y.len() == 4 => is_year(y) && is_month(m),
        [m, d] => is_month(m) && is_day(d),
        _ => false,
    }
}

/// `alone` by itself, or a date and a time separated by spaces (only spaces: a line break is a
/// control character, which no type allows).
fn point(s: &str, alone: fn(&str) -> bool) -> bool {
    match s.split_once(' ') {
        Some((date, time)) => is_date(date) && is_clock(time.trim_start_matches(' ')),
        None => alone(s),
    }
}

/// A time, or a date and a time.
fn time_point(s: &str) -> bool {
    point(s, is_clock)
}

/// A date, or a date and a time.
fn date_point(s: &str) -> bool {
    point(s, is_date)
}

/// One point, or two joined by `~` ("支持填时间段，两个时间点之间用“~”符号连接"), spaces around it
/// allowed.
fn ranged(s: &str, point: fn(&str) -> bool) -> bool {
    match s.split_once('~') {
        Some((from, to)) => point(from.trim_matches(' ')) && point(to.trim_matches(' ')),
        None => point(s),
    }
}

fn amount(value: &str) -> Result<(), Fault> {
    let bad = Fault::BadFormat { expected: AMOUNT_FORMAT };
    let body = value.strip_suffix('元').unwrap_or(value);
    let mut chars = body.chars();
    let body = match chars.next() {
        Some(sign) if !".+-~".contains(sign) && class_of(sign) == Some(Chars::SYMBOL) => chars.as_str(),
        _ => body,
    };
    if !is_decimal(body) {
        return Err(bad);
    }
    let digits = body.bytes().filter(u8::is_ascii_digit).count();
    if digits > AMOUNT_DIGITS {
        return Err(Fault::TooManyDigits { digits, max: AMOUNT_DIGITS });
    }
    Ok(())
}

fn car_number(value: &str) -> Result<(), Fault> {
    let last = value.chars().count().saturating_sub(1);
    let inner = Chars::LETTER.or(Chars::DIGIT);
    let edge = inner.or(Chars::HAN);
    match value.chars().enumerate().position(|(i, c)| !(if i == 0 || i == last { edge } else { inner }).allows(c)) {
        None => Ok(()),
        Some(i) => Err(Fault::BadChar { position: i + 1, allowed: K::CarNumber.rule().rule }),
    }
}

/// "中文名10个汉字内；纯英文名20个字母内；中文和字母混合按中文名算，10个字内".
fn name(value: &str, chars: usize) -> Result<(), Fault> {
    only(value, Chars::HAN.or(Chars::LETTER).or(Chars::SYMBOL), "Chinese, letters and symbols")?;
    if chars > CHINESE_NAME_CHARS && value.chars().any(is_han) {
        return Err(Fault::ChineseNameTooLong { chars });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_table_has_one_row_per_kind_in_order() {
        for (i, rule) in RULES.iter().enumerate() {
            assert_eq!(rule.kind as usize, i, "{} is out of order", rule.prefix);
            assert_eq!(rule.kind.rule(), rule);
            assert_eq!(rule.kind.to_string(), rule.prefix);
            assert!(!rule.prefix.ends_with(|c: char| c.is_ascii_digit()), "a prefix cannot end in a digit");
        }
        assert_eq!(RULES.len(), K::Enum as usize + 1);
    }

    #[test]
    fn keys_are_a_type_and_a_position() {
        assert_eq!(parse_key("thing1"), Ok((K::Thing, 1)));
        assert_eq!(parse_key("number01"), Ok((K::Number, 1)));
        assert_eq!(parse_key("character_string7"), Ok((K::CharacterString, 7)));
        assert_eq!(parse_key("phone_number8"), Ok((K::PhoneNumber, 8)));
        assert_eq!(parse_key("car_number9"), Ok((K::CarNumber, 9)));
        assert_eq!(parse_key("enum12"), Ok((K::Enum, 12)));
        for bad in ["keyword1", "first", "thing", "Thing1", "thing1a", "thing_1", "1thing", "", "thing99999999999"] {
            let err = parse_key(bad).expect_err(bad);
            assert_eq!(err.fault, Fault::NotTyped);
            assert_eq!(err.to_string(), format!("{bad} is not a typed key (thing1, number2, amount3, …)"));
        }
    }

    #[test]
    fn the_issue_names_the_key_and_the_limit() {
        let data =
            BTreeMap::from([("thing1".to_owned(), json!({"value": "一二三四五六七八九十一二三四五六七八九十一二三"}))]);
        assert_eq!(validate_data(&data).unwrap_err().to_string(), "thing1 is 23 characters, at most 20");
    }

    /// (key, value, None when WeChat accepts it, or the error after the key).
    const CASES: &[(&str, &str, Option<&str>)] = &[
        ("thing1", "订单已发货", None),
        ("thing1", "Order #42, ¥99", None),
        ("thing1", "一二三四五六七八九十一二三四五六七八九十", None),
        ("thing1", "", Some("is empty")),
        (
            "thing1",
            "line\nbreak",
            Some("has a character not allowed at position 5; allowed: any characters except control characters"),
        ),
        ("number2", "339208499", None),
        ("number2", "0.5", None),
        ("number2", "12345678901234567890123456789012", None),
        ("number2", "123456789012345678901234567890123", Some("is 33 characters, at most 32")),
        ("number2", "-3", Some("is not a number (digits, may have a decimal point)")),
        ("number2", "1.2.3", Some("is not a number (digits, may have a decimal point)")),
        ("number2", "1.", Some("is not a number (digits, may have a decimal point)")),
        ("number2", "１２", Some("is not a number (digits, may have a decimal point)")),
        ("letter11", "ABCxyz", None),
        ("letter11", "ab1", Some("has a character not allowed at position 3; allowed: letters only")),
        ("letter11", "é", Some("has a character not allowed at position 1; allowed: letters only")),
        ("symbol12", "+-*/%", None),
        ("symbol12", "￥、", None),
        ("symbol12", "!!!!!!", Some("is 6 characters, at most 5")),
        (
            "symbol12",
            "#a",
            Some("has a character not allowed at position 2; allowed: symbols only (not Chinese, letters or digits)"),
        ),
        (
            "symbol12",
            "中",
            Some("has a character not allowed at position 1; allowed: symbols only (not Chinese, letters or digits)"),
        ),
        ("character_string7", "SF1234-5678/A", None),
        (
            "character_string7",
            "订单1",
            Some("has a character not allowed at position 1; allowed: digits, letters and symbols (no Chinese)"),
        ),
        ("character_string7", "202103040830158485629163994677123", Some("is 33 characters, at most 32")),
        ("time4", "15:01", None),
        ("time4", "9:05:30", None),
        ("time4", "2019年10月1日 15:01", None),
        ("time4", "2022-12-08 16:13:16", None),
        ("time4", "08:00~09:30", None),
        ("time4", "2019-10-01 08:00 ~ 2019-10-01 09:30", None),
        (
            "time4",
            "2019年8月8日",
            Some("is not a 24-hour time such as 15:01, 15:01:30 or 2019年10月1日 15:01 (a range joins two with ~)"),
        ),
        (
            "time4",
            "24:00",
            Some("is not a 24-hour time such as 15:01, 15:01:30 or 2019年10月1日 15:01 (a range joins two with ~)"),
        ),
        (
            "time4",
            "15:1",
            Some("is not a 24-hour time such as 15:01, 15:01:30 or 2019年10月1日 15:01 (a range joins two with ~)"),
        ),
        (
            "time4",
            "2019-10-01\n15:01",
            Some("is not a 24-hour time such as 15:01, 15:01:30 or 2019年10月1日 15:01 (a range joins two with ~)"),
        ),
        (
            "time4",
            "15:01~",
            Some("is not a 24-hour time such as 15:01, 15:01:30 or 2019年10月1日 15:01 (a range joins two with ~)"),
        ),
        ("date5", "2019年10月1日", None),
        ("date5", "2019年10月", None),
        ("date5", "10月1日", None),
        ("date5", "2018-01-01", None),
        ("date5", "2018/01/01", None),
        ("date5", "2018.01.01", None),
        ("date5", "2018-01", None),
        ("date5", "01-01", None),
        ("date5", "2019年10月1日 15:01", None),
        ("date5", "2019-12-25 09:42", None),
        ("date5", "2024-01-01~2024-01-07", None),
        ("date5", "2015年01月05日", None),
        (
            "date5",
            "2018-01/01",
            Some(
                "is not a date such as 2019年10月1日, 2019-10-01, 10-01 or 2019-10-01 15:01 (a range joins two with ~)",
            ),
        ),
        (
            "date5",
            "2022-11-32",
            Some(
                "is not a date such as 2019年10月1日, 2019-10-01, 10-01 or 2019-10-01 15:01 (a range joins two with ~)",
            ),
        ),
        (
            "date5",
            "10月",
            Some(
                "is not a date such as 2019年10月1日, 2019-10-01, 10-01 or 2019-10-01 15:01 (a range joins two with ~)",
            ),
        ),
        (
            "date5",
            "tomorrow",
            Some(
                "is not a date such as 2019年10月1日, 2019-10-01, 10-01 or 2019-10-01 15:01 (a range joins two with ~)",
            ),
        ),
        ("amount3", "¥100", None),
        ("amount3", "￥99.50", None),
        ("amount3", "$1234567890", None),
        ("amount3", "100元", None),
        ("amount3", "0.01", None),
        ("amount3", "¥12345678901", Some("has 11 digits, at most 10")),
        (
            "amount3",
            "¥¥1",
            Some("is not an amount such as ¥100, 99.50 or 100元 (one currency sign, digits, an optional 元)"),
        ),
        (
            "amount3",
            "-5",
            Some("is not an amount such as ¥100, 99.50 or 100元 (one currency sign, digits, an optional 元)"),
        ),
        (
            "amount3",
            "RMB100",
            Some("is not an amount such as ¥100, 99.50 or 100元 (one currency sign, digits, an optional 元)"),
        ),
        (
            "amount3",
            "元",
            Some("is not an amount such as ¥100, 99.50 or 100元 (one currency sign, digits, an optional 元)"),
        ),
        ("phone_number8", "+86-0766-66888866", None),
        ("phone_number8", "+86-0766-668888661", Some("is 18 characters, at most 17")),
        (
            "phone_number8",
            "15隐私保护7851",
            Some("has a character not allowed at position 3; allowed: digits and symbols"),
        ),
        ("car_number9", "粤A8Z888挂", None),
        ("car_number9", "粤AD12345", None),
        ("car_number9", "粤A8Z8888挂", Some("is 9 characters, at most 8")),
        (
            "car_number9",
            "粤A中888",
            Some(
                "has a character not allowed at position 3; allowed: letters and digits; the first and last may be Chinese",
            ),
        ),
        (
            "car_number9",
            "粤A-888",
            Some(
                "has a character not allowed at position 3; allowed: letters and digits; the first and last may be Chinese",
            ),
        ),
        ("name10", "黄先生", None),
        ("name10", "欧阳·娜娜", None),
        ("name10", "John O'Brien-Smith", None),
        ("name10", "一二三四五六七八九十", None),
        ("name10", "一二三四五六七八九十一", Some("is 11 characters and has Chinese in it, at most 10")),
        ("name10", "Li 小龙 Bruce", Some("is 11 characters and has Chinese in it, at most 10")),
        ("name10", "Alexandra Wilhelmina X", Some("is 22 characters, at most 20")),
        ("name10", "R2D2", Some("has a character not allowed at position 2; allowed: Chinese, letters and symbols")),
        ("phrase6", "配送中", None),
        ("phrase6", "审核通过", None),
        ("phrase6", "货物配送中了", Some("is 6 characters, at most 5")),
        ("phrase6", "OK", Some("has a character not allowed at position 1; allowed: Chinese characters only")),
        ("phrase6", "配送中!", Some("has a character not allowed at position 4; allowed: Chinese characters only")),
        ("enum13", "已发货", None),
        ("keyword1", "x", Some("is not a typed key (thing1, number2, amount3, …)")),
    ];

    #[test]
    fn every_type_accepts_and_refuses_as_wechat_documents() {
        for &(key, value, want) in CASES {
            let got = validate_value(key, value).map_err(|e| e.to_string());
            assert_eq!(got, want.map(|w| format!("{key} {w}")).map_or(Ok(()), Err), "{key} = {value:?}");
        }
        for rule in RULES {
            let accepted =
                CASES.iter().any(|&(k, _, w)| w.is_none() && parse_key(k).is_ok_and(|(kind, _)| kind == rule.kind));
            let refused =
                CASES.iter().any(|&(k, _, w)| w.is_some() && parse_key(k).is_ok_and(|(kind, _)| kind == rule.kind));
            assert!(accepted, "{}: an accepted example", rule.prefix);
            assert!(refused || rule.kind == K::Enum, "{}: a refused example", rule.prefix);
        }
    }

    #[test]
    fn data_values_are_strings_numbers_or_items() {
        let ok = BTreeMap::from([
            ("number1".to_owned(), json!(42)),
            ("number2".to_owned(), json!(0.5)),
            ("thing3".to_owned(), json!({"value": "好"})),
            ("phrase4".to_owned(), json!("配送中")),
        ]);
        assert_eq!(validate_data(&ok), Ok(()));
        assert_eq!(validate_data(&BTreeMap::from([("number1", "7")].map(|(k, v)| (k.to_owned(), v)))), Ok(()));
        let cases = [
            (json!(-1), "is not a number"),
            (json!(true), "is not text"),
            (json!({}), "is not text"),
            (json!({"value": {"value": "x"}}), "is not text"),
        ];
        for (value, fault) in cases {
            let err = validate_data(&BTreeMap::from([("number1".to_owned(), value)])).unwrap_err();
            assert!(err.to_string().starts_with(&format!("number1 {fault}")), "{err}");
        }
        // The first bad key in key order is the one reported.
        let two = BTreeMap::from([("thing2".to_owned(), json!("")), ("thing1".to_owned(), json!("\u{7}"))]);
        assert_eq!(validate_data(&two).unwrap_err().key, "thing1");
    }

    /// The docs' key-type table has one row per rule, in order, with its prefix, limit and words.
    #[test]
    fn the_docs_table_matches() {
        let doc = include_str!("../../docs/wechat-api.md");
        let section = doc.split("### Key types and their rules").nth(1).and_then(|s| s.split("\n#").next());
        let rows: Vec<&str> =
            section.expect("the docs have the section").lines().filter(|l| l.starts_with("| `")).collect();
        assert_eq!(rows.len(), RULES.len(), "{rows:#?}");
        for (row, rule) in rows.iter().zip(RULES) {
            let max = rule.max_chars.map_or("—".to_owned(), |n| n.to_string());
            let want = format!("| `{}` | {max} | {} |", rule.prefix, rule.rule);
            assert!(row.starts_with(&want), "{row}\nshould start with\n{want}");
        }
    }

    fn interesting_text() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let pieces = prop::sample::select(vec![
            "0", "1", "9", "12", "59", "2019", ".", ":", "-", "/", "~", " ", "年", "月", "日", "元", "¥", "a", "Z",
            "中", "粤", "·", "\n", "é", "😀", "\u{0}",
        ]);
        prop_oneof![prop::collection::vec(pieces, 0..40).prop_map(|v| v.concat()), any::<String>()]
    }

    proptest::proptest! {
        /// No input panics, and an accepted value keeps its type's limits.
        #[test]
        fn accepted_values_keep_their_limits(index in 0..RULES.len(), n in 0u32..100, value in interesting_text(), raw in ".*") {
            let rule = &RULES[index];
            let _ = validate_value(&raw, &value);
            let key = format!("{}{n}", rule.prefix);
            if validate_value(&key, &value).is_ok() {
                let chars = value.chars().count();
                proptest::prop_assert!(chars > 0);
                proptest::prop_assert!(!value.chars().any(char::is_control));
                if let Some(max) = rule.max_chars {
                    proptest::prop_assert!(chars <= max, "{key} = {value:?}");
                }
                if rule.kind == K::Amount {
                    proptest::prop_assert!(value.chars().filter(char::is_ascii_digit).count() <= AMOUNT_DIGITS);
                }
                if rule.kind == K::Name && value.chars().any(is_han) {
                    proptest::prop_assert!(chars <= CHINESE_NAME_CHARS);
                }
            }
        }
    }
}
