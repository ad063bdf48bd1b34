//! Response headers read straight from deno_fetch's header list.
//!
//! A `Response`'s inner header list is an array of `[name, value]` byte
//! strings. Reading it with the V8 API instead of serde avoids serde_v8's
//! generic sequence and struct machinery, which cost more than the rest of
//! the response op for a typical one- or two-header response.

use deno_core::v8;
use deno_error::JsErrorBox;
use http::{HeaderMap, HeaderName, HeaderValue};

/// Most headers one response may carry. `http::HeaderMap` panics past
/// about 24 000 entries, and a panic inside an op aborts the process: the
/// count is checked before anything is allocated. The loop below reads
/// only that many entries, even if an accessor grows the list meanwhile.
const MAX_HEADERS: u32 = 1000;

/// Converts `[[name, value], ...]` into a header map. Entries the `http`
/// crate refuses (control characters that Fetch allows) are dropped with a
/// warning, as a server could not send them anyway.
///
/// The list is reachable by the tenant's code, so reading it may run that
/// code (accessors): call this only from ops that are not fast calls and
/// hold no `OpState` borrow.
pub(crate) fn from_v8<'s>(
    scope: &mut v8::PinScope<'s, '_>,
    list: v8::Local<'s, v8::Array>,
) -> Result<HeaderMap, JsErrorBox> {
    let len = list.length();
    if len > MAX_HEADERS {
        return Err(JsErrorBox::type_error(format!(
            "the response has {len} headers, more than the {MAX_HEADERS} allowed"
        )));
    }
    let mut headers = HeaderMap::try_with_capacity(len as usize)
        .map_err(|_| JsErrorBox::type_error("too many response headers"))?;
    for i in 0..len {
        let pair = list
            .get_index(scope, i)
            .and_then(|p| v8::Local::<v8::Array>::try_from(p).ok())
            .ok_or_else(|| JsErrorBox::type_error("a header entry is not a [name, value] pair"))?;
        let name = byte_string(scope, pair.get_index(scope, 0))?;
        let value = byte_string(scope, pair.get_index(scope, 1))?;
        match (
            HeaderName::from_bytes(&name),
            HeaderValue::from_bytes(&value),
        ) {
            (Ok(n), Ok(v)) => {
                headers
                    .try_append(n, v)
                    .map_err(|_| JsErrorBox::type_error("too many response headers"))?;
            }
            _ => tracing::warn!("dropped a response header the server cannot send"),
        }
    }
    Ok(headers)
}

/// The Latin-1 bytes of a JS string whose characters are all below U+0100.
fn byte_string(
    scope: &mut v8::PinScope<'_, '_>,
    value: Option<v8::Local<'_, v8::Value>>,
) -> Result<Vec<u8>, JsErrorBox> {
    let s = value
        .and_then(|v| v8::Local::<v8::String>::try_from(v).ok())
        .ok_or_else(|| JsErrorBox::type_error("a header name or value is not a string"))?;
    if !s.contains_only_onebyte() {
        return Err(JsErrorBox::type_error(
            "a header name or value has characters above U+00FF",
        ));
    }
    let mut out = vec![0u8; s.length()];
    s.write_one_byte_v2(scope, 0, &mut out, v8::WriteFlags::empty());
    Ok(out)
}
