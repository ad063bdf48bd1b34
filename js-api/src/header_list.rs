//! Response headers as bootstrap.js hands them to the respond ops: the
//! first header's name and value as two strings, the others joined into
//! one, `name\0value\0name\0value...`.
//!
//! Most responses carry one header (the content type a body implies): it
//! costs no string building in JS and no scanning here. Joining the rest
//! in JS makes the op read one string instead of walking
//! `[[name, value], ...]` through the V8 API (three property reads per
//! header), and it runs whatever accessors the tenant put on the list in
//! JS, before the op, so the ops touch no tenant code. NUL cannot occur
//! in a header name or value that the `http` crate accepts, so the split
//! is unambiguous for any list a server could send.

use std::borrow::Cow;

use deno_error::JsErrorBox;
use http::{HeaderMap, HeaderName, HeaderValue};

/// Most headers one response may carry. `http::HeaderMap` panics past
/// about 24 000 entries, and a panic inside an op aborts the process.
const MAX_HEADERS: usize = 1000;

/// Most bytes of joined names and values one response may carry.
const MAX_BYTES: usize = 1024 * 1024;

/// Converts a header list into a header map: `name` and `value` are the
/// first header (`name` is empty when there is none), `rest` the others,
/// joined. Entries the `http` crate refuses (control characters that Fetch
/// allows) are dropped with a warning, as a server could not send them.
pub(crate) fn from_parts(name: &str, value: &str, rest: &str) -> Result<HeaderMap, JsErrorBox> {
    if name.is_empty() && rest.is_empty() {
        return Ok(HeaderMap::new());
    }
    let total = name.len() + value.len() + rest.len();
    if total > MAX_BYTES {
        return Err(JsErrorBox::type_error(format!(
            "the response headers take {total} bytes, more than the {MAX_BYTES} allowed"
        )));
    }
    let rest = latin1(rest).ok_or_else(above_latin1)?;
    // n headers are 2n fields separated by 2n - 1 NULs.
    let in_rest = if rest.is_empty() {
        0
    } else {
        (rest.iter().filter(|b| **b == 0).count() + 1).div_ceil(2)
    };
    let count = 1 + in_rest;
    if count > MAX_HEADERS {
        return Err(JsErrorBox::type_error(format!(
            "the response has {count} headers, more than the {MAX_HEADERS} allowed"
        )));
    }
    let mut headers = HeaderMap::try_with_capacity(count)
        .map_err(|_| JsErrorBox::type_error("too many response headers"))?;
    let name = latin1(name).ok_or_else(above_latin1)?;
    let value = latin1(value).ok_or_else(above_latin1)?;
    append(&mut headers, &name, &value)?;
    if in_rest > 0 {
        let mut fields = rest.split(|b| *b == 0);
        while let Some(name) = fields.next() {
            let value = fields
                .next()
                .ok_or_else(|| JsErrorBox::type_error("a header has a name but no value"))?;
            append(&mut headers, name, value)?;
        }
    }
    Ok(headers)
}

/// Defines [`COMMON_REQUEST_HEADERS`] and the match that finds a name's
/// index in it, from one list, so the two cannot disagree.
macro_rules! common_request_headers {
    ($($index:literal $name:literal,)*) => {
        /// Request header names clients send most. `op_atoll_request_headers`
        /// hands such a name to JS as its index here instead of as a new
        /// string per request; bootstrap.js takes this list from
        /// `op_atoll_common_request_headers` once, when the snapshot is built.
        pub(crate) const COMMON_REQUEST_HEADERS: &[&str] = &[$($name,)*];

        /// `name`'s index in [`COMMON_REQUEST_HEADERS`], if it is listed.
        pub(crate) fn common_request_header(name: &str) -> Option<i32> {
            match name {
                $($name => Some($index),)*
                _ => None,
            }
        }
    };
}

common_request_headers! {
    0 "host",
    1 "user-agent",
    2 "accept",
    3 "accept-encoding",
    4 "accept-language",
    5 "cookie",
    6 "content-type",
    7 "content-length",
    8 "authorization",
    9 "referer",
    10 "origin",
    11 "cache-control",
    12 "connection",
    13 "pragma",
    14 "if-none-match",
    15 "if-modified-since",
    16 "range",
    17 "upgrade-insecure-requests",
    18 "x-forwarded-for",
    19 "x-forwarded-proto",
    20 "x-forwarded-host",
    21 "x-real-ip",
    22 "x-request-id",
    23 "sec-fetch-site",
    24 "sec-fetch-mode",
    25 "sec-fetch-dest",
    26 "sec-fetch-user",
    27 "sec-ch-ua",
    28 "sec-ch-ua-mobile",
    29 "sec-ch-ua-platform",
    30 "priority",
    31 "dnt",
}

/// Content types that `Response` sets itself (text, JSON) and that handlers
/// often set: shared instead of copied into a new buffer for each response,
/// and checked once, at compile time. bootstrap.js's
/// `COMMON_CONTENT_TYPES` lists them in this order.
static COMMON_VALUES: [HeaderValue; 4] = [
    HeaderValue::from_static("text/plain;charset=UTF-8"),
    HeaderValue::from_static("application/json"),
    HeaderValue::from_static("text/html;charset=UTF-8"),
    HeaderValue::from_static("text/html; charset=utf-8"),
];

/// The content type `COMMON_VALUES[index]`: what `new Response("text")`
/// and `Response.json(...)` set, passed as a number instead of a string.
pub(crate) fn common_content_type(index: u32) -> Result<HeaderValue, JsErrorBox> {
    usize::try_from(index)
        .ok()
        .and_then(|i| COMMON_VALUES.get(i))
        .cloned()
        .ok_or_else(|| JsErrorBox::type_error("unknown common content type"))
}

/// `headers` emptied (its allocation kept) with `content_type` as its only
/// header.
pub(crate) fn only_content_type(mut headers: HeaderMap, content_type: HeaderValue) -> HeaderMap {
    headers.clear();
    headers.insert(http::header::CONTENT_TYPE, content_type);
    headers
}

fn header_value(value: &[u8]) -> Result<HeaderValue, http::header::InvalidHeaderValue> {
    match COMMON_VALUES.iter().find(|c| c.as_bytes() == value) {
        Some(common) => Ok(common.clone()),
        None => HeaderValue::from_bytes(value),
    }
}

fn append(headers: &mut HeaderMap, name: &[u8], value: &[u8]) -> Result<(), JsErrorBox> {
    match (HeaderName::from_bytes(name), header_value(value)) {
        (Ok(n), Ok(v)) => headers
            .try_append(n, v)
            .map(drop)
            .map_err(|_| JsErrorBox::type_error("too many response headers")),
        _ => {
            tracing::warn!("dropped a response header the server cannot send");
            Ok(())
        }
    }
}

fn above_latin1() -> JsErrorBox {
    JsErrorBox::type_error("a header name or value has characters above U+00FF")
}

/// The Latin-1 bytes of `s` (header byte strings reach Rust as UTF-8), or
/// `None` if it has characters above U+00FF.
fn latin1(s: &str) -> Option<Cow<'_, [u8]>> {
    if s.is_ascii() {
        return Some(Cow::Borrowed(s.as_bytes()));
    }
    s.chars()
        .map(|c| u8::try_from(u32::from(c)).ok())
        .collect::<Option<Vec<u8>>>()
        .map(Cow::Owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_lists_become_header_maps() {
        let h = from_parts("content-type", "text/plain", "x-a\0b\0x-a\0c").expect("valid");
        assert_eq!(h.len(), 3);
        assert_eq!(h["content-type"], "text/plain");
        let all: Vec<_> = h.get_all("x-a").iter().collect();
        assert_eq!(all, ["b", "c"]);
        assert!(from_parts("", "", "").expect("empty").is_empty());
        let h = from_parts("x-only", "1", "").expect("one");
        assert_eq!(h.len(), 1);
        // Latin-1 values keep their bytes.
        let h = from_parts("x-l", "caf\u{e9}", "x-m\0\u{ff}").expect("latin-1");
        assert_eq!(h["x-l"].as_bytes(), b"caf\xe9");
        assert_eq!(h["x-m"].as_bytes(), b"\xff");
    }

    #[test]
    fn common_request_headers_are_found_at_their_index() {
        for (i, name) in COMMON_REQUEST_HEADERS.iter().enumerate() {
            assert_eq!(common_request_header(name), i32::try_from(i).ok(), "{name}");
            // Names arrive lowercase from the http crate: as listed.
            assert_eq!(name.to_ascii_lowercase(), *name);
        }
        assert_eq!(common_request_header("x-custom"), None);
        assert_eq!(common_request_header("User-Agent"), None);
    }

    #[test]
    fn common_content_types_match_their_list() {
        for (i, value) in COMMON_VALUES.iter().enumerate() {
            let mut reused = HeaderMap::new();
            reused.insert("x-request", HeaderValue::from_static("gone"));
            let h = only_content_type(reused, common_content_type(i as u32).expect("listed"));
            assert_eq!(h.len(), 1);
            assert_eq!(h["content-type"], *value);
        }
        assert!(common_content_type(COMMON_VALUES.len() as u32).is_err());
    }

    #[test]
    fn bad_lists_are_refused_or_dropped() {
        assert!(
            from_parts("x-a", "v", "x-b").is_err(),
            "a name without a value"
        );
        assert!(from_parts("x-a", "\u{100}", "").is_err(), "above U+00FF");
        assert!(
            from_parts("x-a", "v", "x-b\0\u{100}").is_err(),
            "above U+00FF"
        );
        let many: Vec<String> = (0..MAX_HEADERS).map(|i| format!("x-h{i}\0v")).collect();
        assert!(
            from_parts("x-a", "v", &many.join("\0")).is_err(),
            "too many"
        );
        assert!(
            from_parts("x-a", &"v".repeat(MAX_BYTES), "").is_err(),
            "too large"
        );
        // A name the http crate refuses is dropped, the rest kept.
        let h = from_parts("bad name", "v", "x-ok\0v").expect("valid");
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-ok"));
    }
}
