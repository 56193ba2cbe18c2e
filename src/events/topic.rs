//! Topic names and wildcard patterns (RabbitMQ's convention).

use std::error::Error;
use std::fmt;

/// A topic or pattern that is not well formed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicError {
    /// The text given.
    pub value: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl fmt::Display for TopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid topic {:?}: {}", self.value, self.reason)
    }
}

impl Error for TopicError {}

impl From<TopicError> for crate::ConfigError {
    fn from(e: TopicError) -> Self {
        crate::ConfigError::new("pattern", e.value, e.reason)
    }
}

fn err(value: &str, reason: &'static str) -> TopicError {
    TopicError {
        value: value.to_owned(),
        reason,
    }
}

/// Checks an emitted topic: `.`-separated non-empty words, no wildcards.
pub(crate) fn validate_topic(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(err(topic, "empty"));
    }
    for word in topic.split('.') {
        if word.is_empty() {
            return Err(err(topic, "empty segment"));
        }
        if word.contains(['*', '#']) {
            return Err(err(topic, "wildcards are for patterns, not topics"));
        }
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Word(Box<str>),
    /// `*`: exactly one word.
    Star,
    /// `#`: zero or more words.
    Hash,
}

/// A compiled subscription pattern.
#[derive(Debug, Clone)]
pub(crate) struct Pattern {
    text: Box<str>,
    segs: Vec<Seg>,
    literal: bool,
}

impl Pattern {
    pub(crate) fn parse(text: &str) -> Result<Pattern, TopicError> {
        if text.is_empty() {
            return Err(err(text, "empty"));
        }
        let mut segs = Vec::new();
        for word in text.split('.') {
            segs.push(match word {
                "" => return Err(err(text, "empty segment")),
                "*" => Seg::Star,
                "#" => Seg::Hash,
                w if w.contains(['*', '#']) => {
                    return Err(err(text, "a wildcard must be a whole segment"));
                }
                w => Seg::Word(w.into()),
            });
        }
        let literal = segs.iter().all(|s| matches!(s, Seg::Word(_)));
        Ok(Pattern {
            text: text.into(),
            segs,
            literal,
        })
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `topic` (already validated) matches.
    pub(crate) fn matches(&self, topic: &str) -> bool {
        if self.literal {
            return *self.text == *topic;
        }
        // Dynamic programming over (pattern segment, topic word): linear
        // in their product, whatever the number of `#`.
        let words: Vec<&str> = topic.split('.').collect();
        let n = words.len();
        // reach[j]: the first i pattern segments can match the first j words.
        let mut reach = vec![false; n + 1];
        reach[0] = true;
        for seg in &self.segs {
            let mut next = vec![false; n + 1];
            match seg {
                Seg::Hash => {
                    let mut any = false;
                    for j in 0..=n {
                        any |= reach[j];
                        next[j] = any;
                    }
                }
                Seg::Star => {
                    next[1..].copy_from_slice(&reach[..n]);
                }
                Seg::Word(w) => {
                    for j in 1..=n {
                        next[j] = reach[j - 1] && **w == *words[j - 1];
                    }
                }
            }
            reach = next;
        }
        reach[n]
    }
}

/// Whether two topic names are the same, inline for short names (a
/// remembered route is checked by name on every emit: a call to `memcmp`
/// for an 8-byte topic was 9% of the one-subscriber emit's samples).
#[inline]
pub(crate) fn same_topic(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    if a.len() > 32 {
        return a == b;
    }
    let (mut x, mut y) = (a.chunks_exact(8), b.chunks_exact(8));
    for (p, q) in (&mut x).zip(&mut y) {
        if p.iter().zip(q).fold(0, |d, (m, n)| d | (m ^ n)) != 0 {
            return false;
        }
    }
    x.remainder()
        .iter()
        .zip(y.remainder())
        .fold(0, |d, (m, n)| d | (m ^ n))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_matches_zero_words() {
        assert!(Pattern::parse("a.#").unwrap().matches("a"));
        assert!(Pattern::parse("#.a").unwrap().matches("a"));
        assert!(!Pattern::parse("a.*").unwrap().matches("a"));
    }

    #[test]
    fn same_topic_compares_every_byte_at_every_length() {
        let long = "orders.eu.created.by-the-batch-import.v2";
        for len in 0..=long.len() {
            let a = &long[..len];
            let owned = a.to_owned();
            assert!(same_topic(a, &owned), "{a:?}");
            assert!(!same_topic(a, &long[..len.saturating_sub(1)]) || len == 0);
            // One byte changed anywhere: a different name.
            for at in 0..len {
                let mut other = owned.clone().into_bytes();
                other[at] ^= 0x20;
                let other = String::from_utf8(other).unwrap();
                assert!(!same_topic(a, &other), "{a:?} vs {other:?}");
            }
        }
    }
}
