//! `Message` (a text or binary frame's content) and `Envelope<T>`.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::Error;

/// The content of one WebSocket data frame, as the application sees it
/// (after the codec has inflated and split what arrived).
#[derive(Clone, PartialEq, Eq)]
pub enum Message {
    /// A text frame (UTF-8).
    Text(String),
    /// A binary frame.
    Binary(Vec<u8>),
}

impl Message {
    /// The text, for a text message.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Message::Text(s) => Some(s),
            Message::Binary(_) => None,
        }
    }

    /// The bytes of either kind.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Message::Text(s) => s.as_bytes(),
            Message::Binary(b) => b,
        }
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Parses a text message as an [`Envelope`].
    ///
    /// # Errors
    ///
    /// [`Error::Decode`] for a binary message or text that is not an
    /// envelope of `T`, with an excerpt of the text.
    pub fn envelope<T: DeserializeOwned>(&self) -> Result<Envelope<T>, Error> {
        let text = self.as_text().ok_or_else(|| Error::Decode {
            reason: "a binary message is not an envelope".into(),
        })?;
        serde_json::from_str(text).map_err(|e| Error::Decode {
            reason: format!("{e} in {:?}", excerpt(text)),
        })
    }

    pub(crate) fn into_frame(self) -> Frame {
        match self {
            Message::Text(s) => Frame {
                text: true,
                data: Bytes::from(s),
            },
            Message::Binary(b) => Frame {
                text: false,
                data: Bytes::from(b),
            },
        }
    }
}

fn excerpt(text: &str) -> &str {
    let mut end = text.len().min(128);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Message::Text(s) if s.len() <= 128 => f.debug_tuple("Text").field(s).finish(),
            Message::Text(s) => write!(f, "Text({:?}.. {} bytes)", excerpt(s), s.len()),
            Message::Binary(b) => write!(f, "Binary({} bytes)", b.len()),
        }
    }
}

impl From<String> for Message {
    fn from(s: String) -> Self {
        Message::Text(s)
    }
}

impl From<&str> for Message {
    fn from(s: &str) -> Self {
        Message::Text(s.to_owned())
    }
}

impl From<Vec<u8>> for Message {
    fn from(b: Vec<u8>) -> Self {
        Message::Binary(b)
    }
}

impl From<&[u8]> for Message {
    fn from(b: &[u8]) -> Self {
        Message::Binary(b.to_vec())
    }
}

/// A message's bytes shared cheaply between the outbox and the socket.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Frame {
    pub(crate) text: bool,
    pub(crate) data: Bytes,
}

impl Frame {
    pub(crate) fn into_message(self) -> Message {
        if self.text {
            match String::from_utf8(self.data.to_vec()) {
                Ok(s) => Message::Text(s),
                Err(e) => Message::Binary(e.into_bytes()),
            }
        } else {
            Message::Binary(self.data.to_vec())
        }
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("text", &self.text)
            .field("len", &self.data.len())
            .finish()
    }
}

/// The message shape smolkit's codec speaks: a `type`, a `payload`, a
/// `timestamp` (milliseconds since the Unix epoch) and an optional `id`
/// (set by the session in at-least-once mode, echoed back in acks).
///
/// ```
/// use smolkit::ws::Envelope;
///
/// let env = Envelope::new("chat", "hello".to_owned()).with_id("7");
/// let json = serde_json::to_string(&env).unwrap();
/// assert!(json.starts_with(r#"{"type":"chat","payload":"hello","timestamp":"#));
/// let back: Envelope<String> = serde_json::from_str(&json).unwrap();
/// assert_eq!(back, env);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// What the payload is (`"chat"`, `"subscribe"`, ...). `batch` and
    /// `ack` are the codec's own.
    #[serde(rename = "type")]
    pub kind: String,
    /// The content.
    pub payload: T,
    /// Milliseconds since the Unix epoch when it was made.
    #[serde(default)]
    pub timestamp: u64,
    /// An id for acknowledgements (at-least-once mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

impl<T> Envelope<T> {
    /// An envelope stamped with the current time and no id.
    pub fn new(kind: impl Into<String>, payload: T) -> Self {
        Envelope {
            kind: kind.into(),
            payload,
            timestamp: now_millis(),
            id: None,
        }
    }

    /// Sets the id.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }
}

impl<T: Serialize> Envelope<T> {
    /// The envelope as a text message of JSON (what
    /// [`Session::send_envelope`](super::Session::send_envelope) sends).
    ///
    /// ```
    /// use smolkit::ws::{Envelope, Message};
    ///
    /// let m = Envelope::new("chat", 7).with_id("1").to_message().unwrap();
    /// assert!(m.as_text().unwrap().starts_with(r#"{"type":"chat","payload":7,"#));
    /// let back: Envelope<i32> = Envelope::try_from(m).unwrap();
    /// assert_eq!((back.kind.as_str(), back.payload), ("chat", 7));
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Encode`] when the payload does not serialise.
    pub fn to_message(&self) -> Result<Message, Error> {
        serde_json::to_string(self)
            .map(Message::Text)
            .map_err(|e| Error::Encode {
                reason: e.to_string(),
            })
    }
}

impl<T: Serialize> TryFrom<Envelope<T>> for Message {
    type Error = Error;

    fn try_from(envelope: Envelope<T>) -> Result<Self, Error> {
        envelope.to_message()
    }
}

impl<T: DeserializeOwned> TryFrom<Message> for Envelope<T> {
    type Error = Error;

    /// As [`Message::envelope`].
    fn try_from(message: Message) -> Result<Self, Error> {
        message.envelope()
    }
}

pub(crate) fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
