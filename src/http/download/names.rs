//! File names from URLs and `Content-Disposition`, made safe to create in
//! the target folder.
//!
//! `Content-Disposition` is parsed here rather than with a crate: the
//! maintained HTTP crates (`http`, `hyper`, `headers`) do not parse it, and
//! the crates that do either pull in a MIME stack or do not decode RFC 5987
//! `filename*` (charset, language, percent-encoding). The grammar needed is
//! small (RFC 6266 §4.1: a token or quoted string per parameter, and
//! `filename*` = `charset'lang'pct-encoded`); percent-decoding uses the
//! `percent-encoding` crate that `url` already brings in.

use std::collections::HashSet;

/// The longest file name written, in bytes (most file systems allow 255;
/// room is left for the `.part` suffix and a collision suffix).
pub const MAX_NAME_BYTES: usize = 200;

/// Names that Windows reserves for devices, with or without an extension.
const RESERVED: &[&str] = &[
    "CON", "PRN", "AUX", "NUL", "COM1", "COM2", "COM3", "COM4", "COM5", "COM6", "COM7", "COM8",
    "COM9", "LPT1", "LPT2", "LPT3", "LPT4", "LPT5", "LPT6", "LPT7", "LPT8", "LPT9",
];

/// Turns any string into a single safe file-name component: no path
/// separators (`/`, `\`), no `..` or `.` alone, no leading dots (no hidden
/// or relative names), no drive letters or colons, no control characters,
/// none of `<>:"|?*`, no reserved device name, no trailing dots or spaces,
/// at most [`MAX_NAME_BYTES`] bytes cut on a UTF-8 boundary. Returns `None`
/// when nothing usable is left.
pub fn sanitize(raw: &str) -> Option<String> {
    // Only the last path component counts: "a/b/../c.txt" is "c.txt".
    let last = raw.rsplit(['/', '\\']).next().unwrap_or("");
    let mut name: String = last
        .chars()
        .map(|c| {
            if c.is_control() || matches!(c, '<' | '>' | ':' | '"' | '|' | '?' | '*') {
                '_'
            } else {
                c
            }
        })
        .collect();
    let trimmed = name.trim_matches(|c: char| c == '.' || c.is_whitespace());
    if trimmed.len() != name.len() {
        name = trimmed.to_owned();
    }
    if name.is_empty() || name.chars().all(|c| c == '_') {
        return None;
    }
    let stem = name.split('.').next().unwrap_or("");
    if RESERVED
        .iter()
        .any(|r| r.eq_ignore_ascii_case(stem.trim_end()))
    {
        name.insert(0, '_');
    }
    Some(truncate(&name, MAX_NAME_BYTES))
}

/// Cuts `name` to at most `max` bytes on a character boundary, keeping a
/// short extension when there is one.
pub(super) fn truncate(name: &str, max: usize) -> String {
    if name.len() <= max {
        return name.to_owned();
    }
    let ext = name
        .rfind('.')
        .map(|i| &name[i..])
        .filter(|e| e.len() <= 16 && e.len() < max / 2)
        .unwrap_or("");
    let mut cut = max - ext.len();
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut out = name[..cut].trim_end_matches(['.', ' ']).to_owned();
    out.push_str(ext);
    out
}

/// The name a URL suggests: its last non-empty path segment,
/// percent-decoded, else its host, else `download`.
pub(super) fn from_url(url: &url::Url) -> String {
    let segment = url
        .path_segments()
        .and_then(|mut s| s.rfind(|p| !p.is_empty()).map(str::to_owned))
        .map(|s| {
            percent_encoding::percent_decode_str(&s)
                .decode_utf8_lossy()
                .into_owned()
        });
    segment
        .as_deref()
        .and_then(sanitize)
        .or_else(|| url.host_str().and_then(sanitize))
        .unwrap_or_else(|| "download".to_owned())
}

/// The file name of a `Content-Disposition` value: `filename*` (RFC 5987,
/// UTF-8 or ISO-8859-1) wins over `filename`; `None` when neither parses.
/// The result is not yet sanitized.
pub(super) fn content_disposition(value: &str) -> Option<String> {
    let mut plain = None;
    let mut extended = None;
    for (key, val) in params(value) {
        match key.to_ascii_lowercase().as_str() {
            "filename*" => extended = extended.or_else(|| decode_ext_value(&val)),
            "filename" => plain = plain.or(Some(val)),
            _ => {}
        }
    }
    extended.or(plain).filter(|n| !n.is_empty())
}

/// The `;`-separated parameters after the disposition type, with quoted
/// strings unescaped.
fn params(value: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = match value.find(';') {
        Some(i) => &value[i + 1..],
        None => return out,
    };
    loop {
        rest = rest.trim_start_matches([' ', '\t', ';']);
        if rest.is_empty() {
            return out;
        }
        let Some(eq) = rest.find('=') else { return out };
        let key = rest[..eq].trim().to_owned();
        rest = rest[eq + 1..].trim_start();
        let val = if let Some(q) = rest.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = q.char_indices();
            let mut end = q.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            v.push(n);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => v.push(c),
                }
            }
            rest = &q[end.min(q.len())..];
            v
        } else {
            let end = rest.find(';').unwrap_or(rest.len());
            let v = rest[..end].trim().to_owned();
            rest = &rest[end..];
            v
        };
        out.push((key, val));
    }
}

/// RFC 5987 `ext-value`: `charset'language'percent-encoded`.
fn decode_ext_value(v: &str) -> Option<String> {
    let mut parts = v.splitn(3, '\'');
    let charset = parts.next()?.trim();
    let _language = parts.next()?;
    let encoded = parts.next()?;
    let bytes: Vec<u8> = percent_encoding::percent_decode_str(encoded).collect();
    if charset.eq_ignore_ascii_case("utf-8") {
        String::from_utf8(bytes).ok()
    } else if charset.eq_ignore_ascii_case("iso-8859-1") {
        Some(bytes.iter().map(|&b| b as char).collect())
    } else {
        None
    }
}

/// Hands out names in the target folder: a name already taken (by an
/// earlier request of the run) gets the first 8 hex digits of the SHA-256
/// of its URL before the extension, so the choice depends on the inputs
/// alone, not on timing.
#[derive(Debug, Default)]
pub(super) struct Names {
    taken: HashSet<String>,
}

impl Names {
    /// Claims `name` for `url`, or its URL-suffixed form when taken.
    pub(super) fn claim(&mut self, name: &str, url: &str) -> String {
        if self.taken.insert(fold(name)) {
            return name.to_owned();
        }
        let suffixed = with_suffix(name, &super::hex(&super::sha256(url.as_bytes()))[..8]);
        // A second collision (the suffixed name was itself taken) counts up.
        let mut candidate = suffixed.clone();
        let mut n = 2u32;
        while !self.taken.insert(fold(&candidate)) {
            candidate = with_suffix(&suffixed, &n.to_string());
            n += 1;
        }
        candidate
    }
}

fn fold(name: &str) -> String {
    name.to_lowercase()
}

/// `stem-suffix.ext`, still within [`MAX_NAME_BYTES`].
fn with_suffix(name: &str, suffix: &str) -> String {
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => name.split_at(i),
        _ => (name, ""),
    };
    let room = MAX_NAME_BYTES.saturating_sub(ext.len() + suffix.len() + 1);
    let stem = truncate(stem, room.max(1));
    format!("{stem}-{suffix}{ext}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_become_one_safe_component() {
        for (raw, want) in [
            ("../../etc/passwd", Some("passwd")),
            ("..", None),
            (".", None),
            ("/", None),
            ("C:\\Windows\\evil.exe", Some("evil.exe")),
            ("C:evil.exe", Some("C_evil.exe")),
            ("a\u{0}b\nc.txt", Some("a_b_c.txt")),
            (".hidden", Some("hidden")),
            ("CON", Some("_CON")),
            ("com1.txt", Some("_com1.txt")),
            ("name. . .", Some("name")),
            ("report.pdf", Some("report.pdf")),
            ("résumé.pdf", Some("résumé.pdf")),
        ] {
            assert_eq!(sanitize(raw).as_deref(), want, "{raw:?}");
        }
    }

    #[test]
    fn long_names_are_cut_on_a_char_boundary_keeping_the_extension() {
        let long = format!("{}.tar.gz", "é".repeat(300));
        let s = sanitize(&long).unwrap();
        assert!(s.len() <= MAX_NAME_BYTES);
        assert!(s.ends_with(".gz"));
        assert!(s.starts_with('é'));
    }

    #[test]
    fn content_disposition_prefers_the_extended_name() {
        assert_eq!(
            content_disposition(
                r#"attachment; filename="plain.txt"; filename*=UTF-8''%E2%82%AC%20rates.txt"#
            )
            .as_deref(),
            Some("€ rates.txt")
        );
        assert_eq!(
            content_disposition(r#"attachment; filename="a \"quoted\" name.txt""#).as_deref(),
            Some(r#"a "quoted" name.txt"#)
        );
        assert_eq!(
            content_disposition("attachment; filename=bare.bin").as_deref(),
            Some("bare.bin")
        );
        assert_eq!(
            content_disposition("attachment; filename*=iso-8859-1'en'%A3%20rates").as_deref(),
            Some("£ rates")
        );
        assert_eq!(content_disposition("inline"), None);
        assert_eq!(content_disposition("attachment; filename*=bogus"), None);
    }

    #[test]
    fn url_names_decode_and_fall_back() {
        let u = |s: &str| url::Url::parse(s).unwrap();
        assert_eq!(from_url(&u("http://h/a/b%20c.txt?x=1")), "b c.txt");
        assert_eq!(from_url(&u("http://h/dir/")), "dir");
        assert_eq!(from_url(&u("http://example.com/")), "example.com");
        assert_eq!(from_url(&u("http://h/%2e%2e")), "h");
    }

    #[test]
    fn collisions_get_a_suffix_from_the_url() {
        let mut names = Names::default();
        assert_eq!(names.claim("f.txt", "http://a/f.txt"), "f.txt");
        let second = names.claim("F.TXT", "http://b/F.TXT");
        assert!(
            second.starts_with("F-") && second.ends_with(".TXT"),
            "{second}"
        );
        assert_eq!(second.len(), "F-12345678.TXT".len());
        let mut again = Names::default();
        again.claim("f.txt", "http://a/f.txt");
        assert_eq!(
            again.claim("F.TXT", "http://b/F.TXT"),
            second,
            "deterministic"
        );
    }
}
