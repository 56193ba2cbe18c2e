//! Header helpers: Retry-After and body excerpts for error messages.

use std::time::{Duration, SystemTime};

use ::http::HeaderMap;
use ::http::header::RETRY_AFTER;

/// The `Retry-After` delay of a response: delta-seconds or an HTTP date
/// (a date in the past is zero). `None` when absent or unparsable.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The first 256 bytes of a body as text (lossy), with `…` when cut.
pub(crate) fn excerpt(body: &[u8]) -> String {
    const MAX: usize = 256;
    let cut = &body[..body.len().min(MAX)];
    let mut s = String::from_utf8_lossy(cut).into_owned();
    if body.len() > MAX {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::http::HeaderValue;

    #[test]
    fn retry_after_seconds_dates_and_garbage() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static(" 7 "));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("-1"));
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn excerpt_cuts_on_a_char_boundary_lossily() {
        assert_eq!(excerpt(b"short"), "short");
        let long = "é".repeat(200);
        let e = excerpt(long.as_bytes());
        assert!(e.ends_with('…'));
        assert!(e.len() <= 256 + '…'.len_utf8() + 3);
    }

    proptest::proptest! {
        /// Any header value (issue 15 #8): a delay, or `None`; never a panic.
        #[test]
        fn retry_after_never_panics(value in "\\PC{0,40}", secs in proptest::prelude::any::<u64>()) {
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(&value) {
                h.insert(RETRY_AFTER, v);
                let _ = retry_after(&h);
            }
            h.insert(RETRY_AFTER, HeaderValue::from(secs));
            proptest::prop_assert_eq!(retry_after(&h), Some(Duration::from_secs(secs)));
        }
    }
}
