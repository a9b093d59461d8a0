//! The fields of a model call that the edge routes and limits by, read from the request body as it
//! arrives: one pass over the bytes, a small state machine that checks the JSON is well formed and
//! keeps only the top-level `model`, `stream`, `max_tokens` (or `max_completion_tokens`,
//! `max_output_tokens`) and `user` values, plus a hash of the first bytes of the prompt
//! (`messages`, `prompt` or `input`). Nothing is parsed into a tree, so a multi-MiB prompt costs
//! one scan and a few hundred bytes of state; the body itself goes upstream byte for byte.

/// Nesting deeper than this is refused: a model server's JSON parser would refuse it too, and it
/// bounds the scanner's stack.
pub const MAX_DEPTH: usize = 512;
/// Captured top-level values longer than this are not kept (a `model` that long is refused).
const MAX_CAPTURE: usize = 1024;
/// Keys longer than this (escaped) cannot be one of the fields of interest.
const MAX_KEY: usize = 256;

/// What a model call's body says about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallFields {
    pub model: Option<String>,
    pub stream: bool,
    /// `max_tokens`, else `max_completion_tokens`, else `max_output_tokens`.
    pub max_tokens: Option<u64>,
    pub user: Option<String>,
    /// FNV-1a of the first `prefix_bytes` bytes of the prompt value, as sent (`None`: no prompt).
    pub prefix: Option<u64>,
    /// Bytes of the whole body.
    pub body_bytes: u64,
}

/// Why a body is not a usable model call.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SniffError {
    #[error("the request body is not valid JSON: {what} at byte {offset}")]
    Syntax { what: &'static str, offset: u64 },
    #[error("the request body is not a JSON object")]
    NotAnObject,
    #[error("the request body ends before its JSON does")]
    Truncated,
    #[error("the request body nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("`{0}` appears more than once")]
    Duplicate(&'static str),
    #[error("`{field}` {reason}")]
    Field {
        field: &'static str,
        reason: &'static str,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Model,
    Stream,
    MaxTokens,
    MaxCompletionTokens,
    MaxOutputTokens,
    User,
    Prompt,
}

impl Field {
    fn of(key: &str) -> Option<Field> {
        Some(match key {
            "model" => Field::Model,
            "stream" => Field::Stream,
            "max_tokens" => Field::MaxTokens,
            "max_completion_tokens" => Field::MaxCompletionTokens,
            "max_output_tokens" => Field::MaxOutputTokens,
            "user" => Field::User,
            "messages" | "prompt" | "input" => Field::Prompt,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Field::Model => "model",
            Field::Stream => "stream",
            Field::MaxTokens => "max_tokens",
            Field::MaxCompletionTokens => "max_completion_tokens",
            Field::MaxOutputTokens => "max_output_tokens",
            Field::User => "user",
            Field::Prompt => "messages",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpDigits,
}

impl Num {
    fn next(self, b: u8) -> Option<Num> {
        Some(match (self, b) {
            (Num::Minus, b'0') => Num::Zero,
            (Num::Minus, b'1'..=b'9') => Num::Int,
            (Num::Int, b'0'..=b'9') => Num::Int,
            (Num::Zero | Num::Int, b'.') => Num::Dot,
            (Num::Dot | Num::Frac, b'0'..=b'9') => Num::Frac,
            (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Num::Exp,
            (Num::Exp, b'+' | b'-') => Num::ExpSign,
            (Num::Exp | Num::ExpSign | Num::ExpDigits, b'0'..=b'9') => Num::ExpDigits,
            _ => return None,
        })
    }

    fn complete(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::ExpDigits)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// A value (or, at the very start, the top-level object).
    Value,
    /// Right after `[`: a value or `]`.
    ArrayStart,
    /// Right after `{`: a key or `}`.
    ObjectStart,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After a value: `,` or the container's end.
    After,
    /// Inside a string; `key` says whether it is an object key.
    Str {
        key: bool,
    },
    /// After `\` in a string.
    Escape {
        key: bool,
    },
    /// In `\uXXXX`, this many hex digits to go.
    Unicode {
        key: bool,
        left: u8,
    },
    Number(Num),
    /// In `true`, `false` or `null`.
    Literal {
        word: &'static [u8],
        at: u8,
    },
    /// The top-level object ended: whitespace only.
    Done,
}

/// Feeds on a body chunk by chunk; [`Sniffer::finish`] says what it found.
pub struct Sniffer {
    state: State,
    /// `true` for an object, `false` for an array, innermost last.
    stack: Vec<bool>,
    offset: u64,
    prefix_bytes: usize,
    /// The raw top-level key being read (with its quotes).
    key: Vec<u8>,
    key_overflow: bool,
    /// The field the current top-level value belongs to, once its key is read.
    pending: Option<Field>,
    /// The top-level value being kept, and its raw bytes.
    capturing: Option<Field>,
    capture: Vec<u8>,
    capture_overflow: bool,
    /// Prompt bytes still to hash, while inside the prompt value.
    hashing: bool,
    hash: u64,
    hashed: usize,
    seen: u8,
    fields: CallFields,
    max_completion_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

impl Sniffer {
    /// A scanner hashing the first `prefix_bytes` bytes of the prompt.
    pub fn new(prefix_bytes: usize) -> Self {
        Self {
            state: State::Value,
            stack: Vec::new(),
            offset: 0,
            prefix_bytes,
            key: Vec::new(),
            key_overflow: false,
            pending: None,
            capturing: None,
            capture: Vec::new(),
            capture_overflow: false,
            hashing: false,
            hash: FNV_OFFSET,
            hashed: 0,
            seen: 0,
            fields: CallFields::default(),
            max_completion_tokens: None,
            max_output_tokens: None,
        }
    }

    /// The next bytes of the body. An error is final: the body is refused.
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), SniffError> {
        let mut i = 0;
        while i < chunk.len() {
            if let State::Str { key } = self.state {
                // The bulk of a prompt is string content: skip to the next byte that matters.
                let rest = &chunk[i..];
                let n = rest
                    .iter()
                    .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
                    .unwrap_or(rest.len());
                if n > 0 {
                    self.record(&rest[..n], key);
                    i += n;
                    self.offset += n as u64;
                    continue;
                }
            }
            let b = chunk[i];
            if self.step(b)? {
                i += 1;
                self.offset += 1;
            }
        }
        Ok(())
    }

    /// The body ended: its fields, or why it is not a model call.
    pub fn finish(mut self) -> Result<CallFields, SniffError> {
        if self.state != State::Done {
            return Err(if self.stack.is_empty() && self.state == State::Value {
                SniffError::NotAnObject
            } else {
                SniffError::Truncated
            });
        }
        self.fields.body_bytes = self.offset;
        self.fields.max_tokens = self
            .fields
            .max_tokens
            .or(self.max_completion_tokens)
            .or(self.max_output_tokens);
        if self.seen & Field::Prompt.bit() != 0 {
            self.fields.prefix = Some(self.hash);
        }
        Ok(self.fields)
    }

    fn syntax(&self, what: &'static str) -> SniffError {
        SniffError::Syntax {
            what,
            offset: self.offset,
        }
    }

    /// Bytes that belong to the current token: a top-level key, a kept value, the prompt.
    fn record(&mut self, bytes: &[u8], key: bool) {
        if key && self.stack.len() == 1 {
            if self.key.len() + bytes.len() <= MAX_KEY {
                self.key.extend_from_slice(bytes);
            } else {
                self.key_overflow = true;
            }
            return;
        }
        if self.capturing.is_some() {
            if self.capture.len() + bytes.len() <= MAX_CAPTURE {
                self.capture.extend_from_slice(bytes);
            } else {
                self.capture_overflow = true;
            }
        }
        if self.hashing && self.hashed < self.prefix_bytes {
            let take = bytes.len().min(self.prefix_bytes - self.hashed);
            for &b in &bytes[..take] {
                self.hash = (self.hash ^ u64::from(b)).wrapping_mul(FNV_PRIME);
            }
            self.hashed += take;
        }
    }

    /// One byte outside string content; `false`: not consumed (read it again in the new state).
    fn step(&mut self, b: u8) -> Result<bool, SniffError> {
        let ws = matches!(b, b' ' | b'\t' | b'\n' | b'\r');
        match self.state {
            State::Value | State::ArrayStart => {
                if ws {
                    return Ok(true);
                }
                if self.state == State::ArrayStart && b == b']' {
                    self.record(&[b], false);
                    return self.close(false).map(|()| true);
                }
                if self.stack.is_empty() && b != b'{' {
                    return Err(SniffError::NotAnObject);
                }
                self.begin_value();
                self.record(&[b], false);
                match b {
                    b'{' => self.open(true)?,
                    b'[' => self.open(false)?,
                    b'"' => self.state = State::Str { key: false },
                    b'-' => self.state = State::Number(Num::Minus),
                    b'0' => self.state = State::Number(Num::Zero),
                    b'1'..=b'9' => self.state = State::Number(Num::Int),
                    b't' => self.literal(b"true"),
                    b'f' => self.literal(b"false"),
                    b'n' => self.literal(b"null"),
                    _ => return Err(self.syntax("unexpected character where a value belongs")),
                }
            }
            State::ObjectStart | State::Key => {
                if ws {
                    return Ok(true);
                }
                match b {
                    b'}' if self.state == State::ObjectStart => {
                        self.record(&[b], false);
                        self.close(true)?;
                    }
                    b'"' => {
                        self.key.clear();
                        self.key_overflow = false;
                        self.record(&[b], true);
                        self.state = State::Str { key: true };
                    }
                    _ => return Err(self.syntax("expected a key")),
                }
            }
            State::Colon => {
                if ws {
                    return Ok(true);
                }
                if b != b':' {
                    return Err(self.syntax("expected ':'"));
                }
                self.state = State::Value;
            }
            State::After => {
                if ws {
                    return Ok(true);
                }
                let object = self.stack.last().copied();
                match (b, object) {
                    (b',', Some(true)) => self.state = State::Key,
                    (b',', Some(false)) => self.state = State::Value,
                    (b'}', Some(true)) | (b']', Some(false)) => {
                        self.record(&[b], false);
                        self.close(b == b'}')?;
                    }
                    _ => return Err(self.syntax("expected ',' or the end of the container")),
                }
            }
            State::Str { key } => match b {
                b'"' => {
                    self.record(&[b], key);
                    if key {
                        self.end_key()?;
                    } else {
                        self.value_done()?;
                    }
                }
                b'\\' => {
                    self.record(&[b], key);
                    self.state = State::Escape { key };
                }
                _ => return Err(self.syntax("control character in a string")),
            },
            State::Escape { key } => {
                self.record(&[b], key);
                self.state = match b {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => State::Str { key },
                    b'u' => State::Unicode { key, left: 4 },
                    _ => return Err(self.syntax("bad escape in a string")),
                };
            }
            State::Unicode { key, left } => {
                if !b.is_ascii_hexdigit() {
                    return Err(self.syntax("bad \\u escape in a string"));
                }
                self.record(&[b], key);
                self.state = if left == 1 {
                    State::Str { key }
                } else {
                    State::Unicode {
                        key,
                        left: left - 1,
                    }
                };
            }
            State::Number(num) => match num.next(b) {
                Some(next) => {
                    self.record(&[b], false);
                    self.state = State::Number(next);
                }
                None if num.complete() => {
                    self.value_done()?;
                    return Ok(false);
                }
                None => return Err(self.syntax("malformed number")),
            },
            State::Literal { word, at } => {
                if word.get(usize::from(at)) != Some(&b) {
                    return Err(self.syntax("malformed literal"));
                }
                self.record(&[b], false);
                if usize::from(at) + 1 == word.len() {
                    self.value_done()?;
                } else {
                    self.state = State::Literal { word, at: at + 1 };
                }
            }
            State::Done => {
                if !ws {
                    return Err(self.syntax("data after the JSON object"));
                }
            }
        }
        Ok(true)
    }

    fn literal(&mut self, word: &'static [u8]) {
        self.state = State::Literal { word, at: 1 };
    }

    /// A value starts: a top-level one may be kept or hashed.
    fn begin_value(&mut self) {
        if self.stack.len() != 1 {
            return;
        }
        match self.pending {
            Some(Field::Prompt) => self.hashing = true,
            Some(field) => {
                self.capturing = Some(field);
                self.capture.clear();
                self.capture_overflow = false;
            }
            None => {}
        }
    }

    fn open(&mut self, object: bool) -> Result<(), SniffError> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(SniffError::TooDeep);
        }
        self.stack.push(object);
        self.state = if object {
            State::ObjectStart
        } else {
            State::ArrayStart
        };
        Ok(())
    }

    fn close(&mut self, object: bool) -> Result<(), SniffError> {
        if self.stack.pop() != Some(object) {
            return Err(self.syntax("mismatched bracket"));
        }
        if self.stack.is_empty() {
            self.state = State::Done;
            return Ok(());
        }
        self.value_done()
    }

    /// A top-level key was read: which field its value is, if any.
    fn end_key(&mut self) -> Result<(), SniffError> {
        self.state = State::Colon;
        if self.stack.len() != 1 {
            return Ok(());
        }
        self.pending = None;
        if self.key_overflow {
            return Ok(());
        }
        let field = if self.key.contains(&b'\\') {
            // An escaped key names the same field to the model server: decode it so that a body
            // cannot show the edge one model and the server another.
            serde_json::from_slice::<String>(&self.key)
                .ok()
                .and_then(|k| Field::of(&k))
        } else {
            std::str::from_utf8(&self.key[1..self.key.len() - 1])
                .ok()
                .and_then(Field::of)
        };
        if let Some(field) = field {
            if self.seen & field.bit() != 0 {
                if field == Field::Prompt {
                    // `prompt` next to `messages`: the first one is the prefix.
                    return Ok(());
                }
                return Err(SniffError::Duplicate(field.name()));
            }
            self.seen |= field.bit();
            self.pending = Some(field);
        }
        Ok(())
    }

    /// A value ended (any depth); a top-level one is now kept.
    fn value_done(&mut self) -> Result<(), SniffError> {
        self.state = State::After;
        if self.stack.len() != 1 {
            return Ok(());
        }
        self.pending = None;
        self.hashing = false;
        let Some(field) = self.capturing.take() else {
            return Ok(());
        };
        let raw = std::mem::take(&mut self.capture);
        let overflow = std::mem::replace(&mut self.capture_overflow, false);
        let bad = |reason| SniffError::Field {
            field: field.name(),
            reason,
        };
        match field {
            Field::Model => {
                if overflow {
                    return Err(bad("is too long"));
                }
                if raw != b"null" {
                    let name = serde_json::from_slice::<String>(&raw)
                        .map_err(|_| bad("must be a string"))?;
                    self.fields.model = Some(name);
                }
            }
            Field::Stream => match raw.as_slice() {
                b"true" => self.fields.stream = true,
                b"false" | b"null" => self.fields.stream = false,
                _ => return Err(bad("must be a boolean")),
            },
            Field::MaxTokens | Field::MaxCompletionTokens | Field::MaxOutputTokens => {
                let value = if raw == b"null" {
                    None
                } else {
                    Some(
                        serde_json::from_slice::<u64>(&raw)
                            .map_err(|_| bad("must be a non-negative integer"))?,
                    )
                };
                match field {
                    Field::MaxTokens => self.fields.max_tokens = value,
                    Field::MaxCompletionTokens => self.max_completion_tokens = value,
                    _ => self.max_output_tokens = value,
                }
            }
            Field::User => {
                if !overflow {
                    self.fields.user = serde_json::from_slice::<String>(&raw).ok();
                }
            }
            Field::Prompt => {}
        }
        Ok(())
    }
}

/// Scans a whole body at once (tests and callers holding the body already).
pub fn sniff(body: &[u8], prefix_bytes: usize) -> Result<CallFields, SniffError> {
    let mut sniffer = Sniffer::new(prefix_bytes);
    sniffer.push(body)?;
    sniffer.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(body: &str) -> CallFields {
        sniff(body.as_bytes(), 64).unwrap_or_else(|e| panic!("{body}: {e}"))
    }

    #[test]
    fn reads_the_top_level_fields_only() {
        let f = fields(
            r#" { "messages": [{"role":"user","content":"hi \"model\": x", "model": "inner"}],
                 "model" : "qwen-max", "stream": true, "max_tokens": 12, "user": "u-1",
                 "tools": {"model": "nested", "stream": false, "n": [1, -2.5e+3, 0.0, null]} } "#,
        );
        assert_eq!(f.model.as_deref(), Some("qwen-max"));
        assert!(f.stream);
        assert_eq!(f.max_tokens, Some(12));
        assert_eq!(f.user.as_deref(), Some("u-1"));
        assert!(f.prefix.is_some());
        let g = fields(r#"{"model":"m","max_completion_tokens":7}"#);
        assert_eq!(g.max_tokens, Some(7));
        assert!(!g.stream);
        assert_eq!(g.prefix, None);
        assert_eq!(
            fields(r#"{"model":"m","max_output_tokens":3}"#).max_tokens,
            Some(3)
        );
        assert_eq!(fields("{}").model, None);
        assert_eq!(fields(r#"{"model":null}"#).model, None);
    }

    #[test]
    fn any_chunking_gives_the_same_answer() {
        let body = br#"{"model":"qwen-\u0074urbo","stream":false,"max_tokens":123,"messages":[{"content":"\\ \/ \n"}],"x":[true,false,null,{"a":{}}]}"#;
        let whole = sniff(body, 16).expect("valid");
        assert_eq!(whole.model.as_deref(), Some("qwen-turbo"));
        assert_eq!(whole.max_tokens, Some(123));
        for size in 1..body.len() {
            let mut sniffer = Sniffer::new(16);
            for chunk in body.chunks(size) {
                sniffer.push(chunk).expect("valid");
            }
            assert_eq!(sniffer.finish().expect("valid"), whole, "chunks of {size}");
        }
    }

    #[test]
    fn the_prefix_hash_follows_the_first_bytes_of_the_prompt() {
        let a = fields(
            r#"{"model":"m","messages":[{"role":"system","content":"You are a tax bot. Q1"}]}"#,
        );
        let b = fields(
            r#"{"messages":[{"role":"system","content":"You are a tax bot. Q2"}],"model":"m"}"#,
        );
        let c =
            fields(r#"{"model":"m","messages":[{"role":"system","content":"You are a cat. Q1"}]}"#);
        let short = |body: &str| sniff(body.as_bytes(), 40).expect("valid").prefix;
        assert_eq!(
            short(
                r#"{"model":"m","messages":[{"role":"system","content":"You are a tax bot. Q1"}]}"#
            ),
            short(
                r#"{"messages":[{"role":"system","content":"You are a tax bot. Q2"}],"model":"m"}"#
            ),
            "same first 40 bytes of the prompt, wherever it sits"
        );
        assert_ne!(a.prefix, b.prefix, "64 bytes reach the question");
        assert_ne!(a.prefix, c.prefix);
        assert_eq!(
            fields(r#"{"prompt":"abc"}"#).prefix,
            fields(r#"{"input":"abc"}"#).prefix
        );
    }

    #[test]
    fn malformed_bodies_are_refused() {
        let cases: [(&str, &str); 20] = [
            ("", "not-object"),
            ("   ", "not-object"),
            ("[1]", "not-object"),
            ("\"model\"", "not-object"),
            ("{not json", "syntax"),
            (r#"{"model": "qwen-turbo", "messages": ["#, "truncated"),
            (r#"{"model":"a",}"#, "syntax"),
            (r#"{"model":"a"} x"#, "syntax"),
            (r#"{"model":"a"}}"#, "syntax"),
            (r#"{"a":[1,2}"#, "syntax"),
            (r#"{"a":01}"#, "syntax"),
            (r#"{"a":1.}"#, "syntax"),
            (r#"{"a":-}"#, "syntax"),
            (r#"{"a":tru}"#, "syntax"),
            ("{\"a\":\"x\ny\"}", "syntax"),
            (r#"{"a":"\q"}"#, "syntax"),
            (r#"{"model":"a","model":"b"}"#, "duplicate"),
            (r#"{"model":"a","mod\u0065l":"b"}"#, "duplicate"),
            (r#"{"model":5}"#, "field"),
            (r#"{"model":"a","max_tokens":-1}"#, "field"),
        ];
        for (body, expect) in cases {
            let got = match sniff(body.as_bytes(), 8) {
                Ok(f) => panic!("{body:?} accepted: {f:?}"),
                Err(SniffError::NotAnObject) => "not-object",
                Err(SniffError::Syntax { .. }) => "syntax",
                Err(SniffError::Truncated) => "truncated",
                Err(SniffError::TooDeep) => "deep",
                Err(SniffError::Duplicate(_)) => "duplicate",
                Err(SniffError::Field { .. }) => "field",
            };
            assert_eq!(got, expect, "{body:?}");
        }
        let deep = "{\"a\":".to_string() + &"[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH) + "}";
        assert_eq!(sniff(deep.as_bytes(), 8), Err(SniffError::TooDeep));
        let long_model = format!(r#"{{"model":"{}"}}"#, "m".repeat(MAX_CAPTURE + 1));
        assert!(matches!(
            sniff(long_model.as_bytes(), 8),
            Err(SniffError::Field { field: "model", .. })
        ));
    }

    #[test]
    fn a_multi_mebibyte_prompt_is_one_scan() {
        let mut body = br#"{"model":"qwen-max","messages":[{"role":"user","content":""#.to_vec();
        body.extend(std::iter::repeat_n(b'x', 4 << 20));
        body.extend_from_slice(br#""}],"stream":true}"#);
        let f = sniff(&body, 1024).expect("valid");
        assert_eq!(f.model.as_deref(), Some("qwen-max"));
        assert!(f.stream);
        assert_eq!(f.body_bytes, body.len() as u64);
    }
}
