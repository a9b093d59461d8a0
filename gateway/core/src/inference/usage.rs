//! Token usage from a response body without holding the body: keep only its last bytes, then find
//! the last `"usage": {...}` object in them (the final SSE `data:` event, or the end of a JSON body).

/// How much of the end of a response is kept to find `usage` in.
const TAIL_BYTES: usize = 16 * 1024;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

#[derive(Default)]
pub struct UsageScanner {
    tail: Vec<u8>,
}

impl UsageScanner {
    pub fn push(&mut self, chunk: &[u8]) {
        if chunk.len() >= TAIL_BYTES {
            self.tail.clear();
            self.tail
                .extend_from_slice(&chunk[chunk.len() - TAIL_BYTES..]);
            return;
        }
        let overflow = (self.tail.len() + chunk.len()).saturating_sub(TAIL_BYTES);
        if overflow > 0 {
            self.tail.drain(..overflow);
        }
        self.tail.extend_from_slice(chunk);
    }

    /// The last complete `usage` object seen, if any.
    pub fn usage(&self) -> Option<Usage> {
        find_usage(&self.tail)
    }
}

#[derive(serde::Deserialize)]
struct RawUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

fn find_usage(text: &[u8]) -> Option<Usage> {
    const KEY: &[u8] = b"\"usage\"";
    let mut end = text.len();
    while let Some(at) = rfind(&text[..end], KEY) {
        end = at;
        let rest = &text[at + KEY.len()..];
        let rest = skip_ws(rest);
        let Some(rest) = rest.strip_prefix(b":") else {
            continue;
        };
        let rest = skip_ws(rest);
        if rest.first() != Some(&b'{') {
            continue; // e.g. "usage": null in intermediate stream chunks
        }
        let Some(object) = balanced_object(rest) else {
            continue;
        };
        if let Ok(raw) = serde_json::from_slice::<RawUsage>(object) {
            return Some(Usage {
                prompt_tokens: raw.prompt_tokens,
                completion_tokens: raw.completion_tokens,
            });
        }
    }
    None
}

fn rfind(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if haystack.len() < needle.len() {
        return None;
    }
    (0..=haystack.len() - needle.len())
        .rev()
        .find(|&i| &haystack[i..i + needle.len()] == needle)
}

fn skip_ws(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|b| b.is_ascii_whitespace()).count();
    &s[n..]
}

/// `{ ... }` at the start of `s`, braces balanced (string contents are skipped).
fn balanced_object(s: &[u8]) -> Option<&[u8]> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (i, &b) in s.iter().enumerate() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' => depth += 1,
            b'}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(&s[..=i]);
                }
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_usage_in_the_last_sse_event() {
        let mut scanner = UsageScanner::default();
        scanner.push(b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n");
        scanner
            .push(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":5,");
        scanner.push(b"\"total_tokens\":12,\"details\":{\"x\":\"}\"}}}\n\ndata: [DONE]\n\n");
        assert_eq!(
            scanner.usage(),
            Some(Usage {
                prompt_tokens: 7,
                completion_tokens: 5
            })
        );
    }

    #[test]
    fn keeps_only_the_tail_of_a_large_body() {
        let mut scanner = UsageScanner::default();
        scanner.push(&vec![b'x'; 100_000]);
        scanner.push(b"{\"usage\": {\"prompt_tokens\": 3}}");
        assert!(scanner.tail.len() <= TAIL_BYTES);
        assert_eq!(scanner.usage().map(|u| u.total()), Some(3));
        let empty = UsageScanner::default();
        assert_eq!(empty.usage(), None);
    }
}
