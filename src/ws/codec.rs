//! The message codec: zlib for large text frames, batches of envelopes in
//! one frame, and the limits that keep a hostile peer from making us
//! allocate without bound.

use std::io::{Read, Write};

use bytes::{BufMut, Bytes, BytesMut};
use flate2::Compression;
use flate2::read::ZlibDecoder;
use flate2::write::ZlibEncoder;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::Error;
use super::message::{Frame, Message, now_millis};

/// The prefix every batch frame starts with (the encoder writes exactly
/// this, so the receiver recognises a batch without parsing other frames).
const BATCH_PREFIX: &[u8] = br#"{"type":"batch","payload":["#;

/// How messages become frames and frames become messages.
///
/// * **Compression** (off by default; both ends must speak it): a text
///   message longer than the threshold goes as a binary frame holding its
///   zlib stream. A binary frame that starts with a zlib header and
///   inflates to UTF-8 is received as the text it holds; any other binary
///   frame is received as it is. Inflation stops at
///   [`max_inflated`](Codec::with_max_inflated): a compression bomb is an
///   error, never an allocation.
/// * **Batches**: several envelopes sent within the batching window go as
///   one frame, `{"type":"batch","payload":[...],"timestamp":..}`, which
///   the receiving codec splits back into one message per envelope.
/// * **Size**: frames larger than [`max_message`](Codec::with_max_message) are
///   refused by the socket (the connection is closed with 1009, message
///   too big).
///
/// ```
/// use smolkit::ws::{Codec, Message};
///
/// let codec = Codec::new().with_compress_above(Some(64));
/// let big = Message::Text("x".repeat(10_000));
/// let wire = codec.encode(big.clone());
/// assert!(matches!(&wire, Message::Binary(b) if b.len() < 100));
/// assert_eq!(codec.decode(wire).unwrap(), vec![big]);
/// ```
///
/// # Default
///
/// No compression (level 1 when turned on), inflation capped at 16 MiB,
/// messages and frames at 16 MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Codec {
    compress_above: Option<usize>,
    level: u32,
    max_inflated: usize,
    max_message: usize,
}

impl Default for Codec {
    fn default() -> Self {
        Codec::new()
    }
}

#[derive(Deserialize)]
struct BatchIn<'a> {
    #[serde(borrow)]
    payload: Vec<&'a RawValue>,
}

impl Codec {
    /// No compression; 16 MiB for an incoming message and for an inflated
    /// one.
    pub fn new() -> Self {
        Codec {
            compress_above: None,
            level: 1,
            max_inflated: 16 << 20,
            max_message: 16 << 20,
        }
    }

    /// Compresses text messages longer than `threshold` bytes (`None`: off).
    pub fn with_compress_above(mut self, threshold: Option<usize>) -> Self {
        self.compress_above = threshold;
        self
    }

    /// The zlib level, 0 (store) to 9 (smallest); default 1 (fastest).
    pub fn with_compression_level(mut self, level: u32) -> Self {
        self.level = level.min(9);
        self
    }

    /// The most bytes one compressed frame may inflate to.
    pub fn with_max_inflated(mut self, bytes: usize) -> Self {
        self.max_inflated = bytes;
        self
    }

    /// The largest incoming message (and frame) the socket accepts.
    pub fn with_max_message(mut self, bytes: usize) -> Self {
        self.max_message = bytes;
        self
    }

    /// The configured limit on an incoming message.
    pub fn max_message_size(&self) -> usize {
        self.max_message
    }

    /// The frame `message` goes as: compressed when it is text above the
    /// threshold.
    pub fn encode(&self, message: Message) -> Message {
        self.encode_frame(message.into_frame()).into_message()
    }

    /// One frame holding `envelopes` (each a JSON text), compressed when
    /// above the threshold.
    ///
    /// # Errors
    ///
    /// [`Error::Decode`] if one of them is not JSON.
    pub fn batch(&self, envelopes: &[Message]) -> Result<Message, Error> {
        for m in envelopes {
            let text = m.as_text().unwrap_or_default();
            serde_json::from_str::<&RawValue>(text).map_err(|e| Error::Decode {
                reason: format!("a batch item is not JSON: {e}"),
            })?;
        }
        let frames: Vec<Bytes> = envelopes
            .iter()
            .map(|m| Bytes::copy_from_slice(m.as_bytes()))
            .collect();
        Ok(self.encode_frame(batch_frame(frames.iter())).into_message())
    }

    /// The messages a received frame holds: inflated if compressed, split
    /// if a batch.
    ///
    /// # Errors
    ///
    /// [`Error::Inflated`] when a compressed frame inflates past the limit;
    /// [`Error::Decode`] for a batch frame that does not parse.
    pub fn decode(&self, message: Message) -> Result<Vec<Message>, Error> {
        let mut out = Vec::new();
        self.decode_frame(message.into_frame(), &mut out)?;
        Ok(out.into_iter().map(Frame::into_message).collect())
    }

    pub(crate) fn encode_frame(&self, frame: Frame) -> Frame {
        match self.compress_above {
            Some(threshold) if frame.text && frame.data.len() > threshold => {
                let mut enc = ZlibEncoder::new(
                    Vec::with_capacity(frame.data.len() / 4 + 64),
                    Compression::new(self.level),
                );
                // NOTE: writing to a Vec cannot fail.
                match enc.write_all(&frame.data).and_then(|()| enc.finish()) {
                    Ok(z) => Frame {
                        text: false,
                        data: Bytes::from(z),
                    },
                    Err(_) => frame,
                }
            }
            _ => frame,
        }
    }

    pub(crate) fn decode_frame(&self, frame: Frame, out: &mut Vec<Frame>) -> Result<(), Error> {
        let frame = if !frame.text && is_zlib(&frame.data) {
            match self.inflate(&frame.data)? {
                Some(text) => text,
                None => frame,
            }
        } else {
            frame
        };
        if frame.text && frame.data.starts_with(BATCH_PREFIX) {
            let batch: BatchIn<'_> =
                serde_json::from_slice(&frame.data).map_err(|e| Error::Decode {
                    reason: format!("bad batch frame: {e}"),
                })?;
            for item in batch.payload {
                out.push(Frame {
                    text: true,
                    data: frame.data.slice_ref(item.get().as_bytes()),
                });
            }
        } else {
            out.push(frame);
        }
        Ok(())
    }

    /// `Ok(None)` when the bytes are not a zlib stream of UTF-8 after all.
    fn inflate(&self, data: &[u8]) -> Result<Option<Frame>, Error> {
        let limit = self.max_inflated;
        let mut out = Vec::with_capacity((data.len() * 4).min(limit).min(1 << 20));
        let mut dec = ZlibDecoder::new(data).take(limit as u64 + 1);
        match dec.read_to_end(&mut out) {
            Ok(_) if out.len() > limit => Err(Error::Inflated {
                compressed: data.len(),
                limit,
            }),
            Ok(_) => Ok(String::from_utf8(out).ok().map(|s| Frame {
                text: true,
                data: Bytes::from(s),
            })),
            Err(_) => Ok(None),
        }
    }
}

/// A zlib header: deflate method, a window of at most 32 KiB, and the
/// header check (RFC 1950 §2.2).
fn is_zlib(data: &[u8]) -> bool {
    data.len() >= 2
        && data[0] & 0x0f == 8
        && data[0] >> 4 <= 7
        && (u16::from(data[0]) << 8 | u16::from(data[1])).is_multiple_of(31)
}

/// `{"type":"batch","payload":[a,b,..],"timestamp":..}` from JSON texts.
pub(crate) fn batch_frame<'a>(items: impl Iterator<Item = &'a Bytes> + Clone) -> Frame {
    let len: usize = items.clone().map(|b| b.len() + 1).sum();
    let mut buf = BytesMut::with_capacity(BATCH_PREFIX.len() + len + 32);
    buf.put_slice(BATCH_PREFIX);
    for (i, item) in items.enumerate() {
        if i > 0 {
            buf.put_u8(b',');
        }
        buf.put_slice(item);
    }
    buf.put_slice(format!(r#"],"timestamp":{}}}"#, now_millis()).as_bytes());
    Frame {
        text: true,
        data: buf.freeze(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_round_trip_keeps_items_whole() {
        let codec = Codec::new();
        let items = vec![
            Message::Text(r#"{"type":"a","payload":[1,2],"timestamp":1}"#.into()),
            Message::Text(r#"{"type":"b","payload":{"x":"],"},"timestamp":2}"#.into()),
        ];
        let frame = codec.batch(&items).unwrap();
        assert_eq!(codec.decode(frame).unwrap(), items);
    }

    #[test]
    fn bomb_is_refused_within_the_cap() {
        let codec = Codec::new()
            .with_compress_above(Some(0))
            .with_max_inflated(1 << 20);
        let wire = codec.encode(Message::Text("a".repeat(64 << 20)));
        assert!(wire.len() < 1 << 20, "zeros compress well: {}", wire.len());
        match codec.decode(wire) {
            Err(Error::Inflated { limit, .. }) => assert_eq!(limit, 1 << 20),
            other => panic!("expected Inflated, got {other:?}"),
        }
    }

    #[test]
    fn binary_that_only_looks_like_zlib_is_kept() {
        let codec = Codec::new();
        let raw = vec![0x78, 0x9c, 1, 2, 3, 4];
        assert!(is_zlib(&raw));
        assert_eq!(
            codec.decode(Message::Binary(raw.clone())).unwrap(),
            vec![Message::Binary(raw)]
        );
    }

    #[test]
    fn batch_of_non_json_is_refused() {
        let err = Codec::new()
            .batch(&[Message::Text("not json".into())])
            .unwrap_err();
        assert!(matches!(err, Error::Decode { .. }), "{err:?}");
    }
}
