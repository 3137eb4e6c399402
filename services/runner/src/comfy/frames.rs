//! Binary WebSocket frames of ComfyUI.
//!
//! Layout (all integers `u32` big-endian): the event type, then
//! - 1 `PREVIEW_IMAGE`: image format (1 JPEG, 2 PNG), image bytes;
//! - 2 `UNENCODED_PREVIEW_IMAGE`: never sent on the wire by ComfyUI (it encodes such
//!   previews as event 1) — accepted and kept raw;
//! - 3 `TEXT`: node-id length, node id, UTF-8 text;
//! - 4 `PREVIEW_IMAGE_WITH_METADATA` (only after the feature-flag handshake): metadata
//!   length, JSON metadata, image bytes.
//!
//! Parsing never panics and never copies image bytes: they are [`Bytes`] slices of the
//! received frame.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Event 1.
pub const EVENT_PREVIEW_IMAGE: u32 = 1;
/// Event 2.
pub const EVENT_UNENCODED_PREVIEW_IMAGE: u32 = 2;
/// Event 3.
pub const EVENT_TEXT: u32 = 3;
/// Event 4.
pub const EVENT_PREVIEW_IMAGE_WITH_METADATA: u32 = 4;

/// A parsed binary frame.
#[derive(Debug, Clone, PartialEq)]
pub enum BinaryFrame {
    /// Event 1: a preview image of the running node (which one: the last `executing`).
    Preview {
        /// Image format.
        format: ImageFormat,
        /// Encoded image.
        image: Bytes,
    },
    /// Event 2: an unencoded preview; its payload is kept as is.
    UnencodedPreview {
        /// Everything after the event type.
        payload: Bytes,
    },
    /// Event 3: progress text of a node.
    Text {
        /// The node.
        node_id: String,
        /// The text.
        text: String,
    },
    /// Event 4: a preview image with its node and prompt.
    PreviewWithMetadata {
        /// Metadata.
        metadata: PreviewMetadata,
        /// Encoded image.
        image: Bytes,
    },
    /// Another event type.
    Unknown {
        /// Event type.
        event: u32,
        /// Everything after the event type.
        payload: Bytes,
    },
}

/// Image format of an event 1 preview.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    /// 1.
    Jpeg,
    /// 2.
    Png,
    /// Any other code.
    Other(u32),
}

impl ImageFormat {
    /// From the wire code.
    pub fn from_code(code: u32) -> Self {
        match code {
            1 => Self::Jpeg,
            2 => Self::Png,
            other => Self::Other(other),
        }
    }

    /// The wire code.
    pub fn code(self) -> u32 {
        match self {
            Self::Jpeg => 1,
            Self::Png => 2,
            Self::Other(c) => c,
        }
    }

    /// MIME type, if known.
    pub fn mime(self) -> Option<&'static str> {
        match self {
            Self::Jpeg => Some("image/jpeg"),
            Self::Png => Some("image/png"),
            Self::Other(_) => None,
        }
    }
}

/// Metadata of an event 4 preview.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PreviewMetadata {
    /// The node.
    #[serde(default)]
    pub node_id: Option<String>,
    /// The prompt.
    #[serde(default)]
    pub prompt_id: Option<String>,
    /// The node shown in the UI.
    #[serde(default)]
    pub display_node_id: Option<String>,
    /// The subgraph parent, if any.
    #[serde(default)]
    pub parent_node_id: Option<String>,
    /// The node in the original graph.
    #[serde(default)]
    pub real_node_id: Option<String>,
    /// MIME type of the image, e.g. `image/png`.
    #[serde(default)]
    pub image_type: Option<String>,
    /// Other fields.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Why a binary frame could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The frame ends before a field it announces.
    #[error("binary frame truncated: {field} needs {needed} bytes, {available} left")]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Bytes needed.
        needed: usize,
        /// Bytes left.
        available: usize,
    },
    /// A text field is not UTF-8.
    #[error("binary frame: {field} is not valid UTF-8")]
    InvalidUtf8 {
        /// The field.
        field: &'static str,
    },
    /// Event 4 metadata is not the expected JSON object.
    #[error("binary frame: invalid preview metadata: {0}")]
    InvalidMetadata(String),
}

struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    fn take(&mut self, field: &'static str, n: usize) -> Result<Bytes, FrameError> {
        let available = self.buf.len() - self.pos;
        if n > available {
            return Err(FrameError::Truncated {
                field,
                needed: n,
                available,
            });
        }
        let out = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(out)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, FrameError> {
        let b = self.take(field, 4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn len_prefixed(&mut self, field: &'static str) -> Result<Bytes, FrameError> {
        let n = self.u32(field)?;
        // On 16-bit targets an oversized length cannot fit; treat it as truncation.
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        self.take(field, n)
    }

    fn rest(self) -> Bytes {
        self.buf.slice(self.pos..)
    }
}

fn utf8(b: &Bytes, field: &'static str) -> Result<String, FrameError> {
    std::str::from_utf8(b)
        .map(str::to_owned)
        .map_err(|_| FrameError::InvalidUtf8 { field })
}

impl BinaryFrame {
    /// Parses one binary WebSocket message.
    pub fn parse(frame: Bytes) -> Result<Self, FrameError> {
        let mut r = Reader { buf: frame, pos: 0 };
        let event = r.u32("event type")?;
        match event {
            EVENT_PREVIEW_IMAGE => {
                let format = ImageFormat::from_code(r.u32("image format")?);
                Ok(Self::Preview {
                    format,
                    image: r.rest(),
                })
            }
            EVENT_UNENCODED_PREVIEW_IMAGE => Ok(Self::UnencodedPreview { payload: r.rest() }),
            EVENT_TEXT => {
                let node_id = utf8(&r.len_prefixed("node id")?, "node id")?;
                let text = utf8(&r.rest(), "text")?;
                Ok(Self::Text { node_id, text })
            }
            EVENT_PREVIEW_IMAGE_WITH_METADATA => {
                let raw = r.len_prefixed("metadata")?;
                let metadata: PreviewMetadata = serde_json::from_slice(&raw)
                    .map_err(|e| FrameError::InvalidMetadata(e.to_string()))?;
                Ok(Self::PreviewWithMetadata {
                    metadata,
                    image: r.rest(),
                })
            }
            event => Ok(Self::Unknown {
                event,
                payload: r.rest(),
            }),
        }
    }

    /// The wire event type.
    pub fn event(&self) -> u32 {
        match self {
            Self::Preview { .. } => EVENT_PREVIEW_IMAGE,
            Self::UnencodedPreview { .. } => EVENT_UNENCODED_PREVIEW_IMAGE,
            Self::Text { .. } => EVENT_TEXT,
            Self::PreviewWithMetadata { .. } => EVENT_PREVIEW_IMAGE_WITH_METADATA,
            Self::Unknown { event, .. } => *event,
        }
    }

    /// The preview image bytes and their MIME type, for events 1 and 4.
    pub fn preview_image(&self) -> Option<(&Bytes, Option<&str>)> {
        match self {
            Self::Preview { format, image } => Some((image, format.mime())),
            Self::PreviewWithMetadata { metadata, image } => {
                Some((image, metadata.image_type.as_deref()))
            }
            _ => None,
        }
    }

    /// Encodes the frame the way ComfyUI does (used by tests and simulators).
    ///
    /// Fails only if a length does not fit in a `u32` or metadata cannot be serialized.
    pub fn encode(&self) -> Result<Bytes, FrameError> {
        fn len32(field: &'static str, n: usize) -> Result<u32, FrameError> {
            u32::try_from(n).map_err(|_| FrameError::Truncated {
                field,
                needed: n,
                available: u32::MAX as usize,
            })
        }
        let mut out = BytesMut::new();
        out.put_u32(self.event());
        match self {
            Self::Preview { format, image } => {
                out.put_u32(format.code());
                out.put_slice(image);
            }
            Self::UnencodedPreview { payload } | Self::Unknown { payload, .. } => {
                out.put_slice(payload);
            }
            Self::Text { node_id, text } => {
                out.put_u32(len32("node id", node_id.len())?);
                out.put_slice(node_id.as_bytes());
                out.put_slice(text.as_bytes());
            }
            Self::PreviewWithMetadata { metadata, image } => {
                let json = serde_json::to_vec(metadata)
                    .map_err(|e| FrameError::InvalidMetadata(e.to_string()))?;
                out.put_u32(len32("metadata", json.len())?);
                out.put_slice(&json);
                out.put_slice(image);
            }
        }
        Ok(out.freeze())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use proptest::prelude::*;

    fn be(n: u32) -> [u8; 4] {
        n.to_be_bytes()
    }

    /// The text frame of transcript 07, byte for byte (`len: 45`).
    #[test]
    fn text_frame_like_comfyui() {
        let text = "width: 40, height: 30\n batch size: 2";
        let mut raw = Vec::new();
        raw.extend(be(3));
        raw.extend(be(1));
        raw.extend(b"2");
        raw.extend(text.as_bytes());
        assert_eq!(raw.len(), 45);
        let f = BinaryFrame::parse(Bytes::from(raw.clone())).unwrap();
        assert_eq!(
            f,
            BinaryFrame::Text {
                node_id: "2".into(),
                text: text.into()
            }
        );
        assert_eq!(f.encode().unwrap(), Bytes::from(raw));
    }

    /// Event 1 of transcript 20_legacy: JPEG, 3702 image bytes in a 3710-byte frame.
    #[test]
    fn legacy_preview_like_comfyui() {
        let mut image = vec![0xff, 0xd8, 0xff, 0xe0, 0x00, 0x10, 0x4a, 0x46];
        image.resize(3702, 0);
        let mut raw = Vec::new();
        raw.extend(be(1));
        raw.extend(be(1));
        raw.extend(&image);
        assert_eq!(raw.len(), 3710);
        let raw = Bytes::from(raw);
        let f = BinaryFrame::parse(raw.clone()).unwrap();
        let BinaryFrame::Preview { format, image: img } = &f else {
            panic!("not a preview: {f:?}")
        };
        assert_eq!(*format, ImageFormat::Jpeg);
        assert_eq!(img.len(), 3702);
        assert_eq!(&img[..], &image[..]);
        // Zero copy: the image is a slice of the frame's buffer.
        assert_eq!(img.as_ptr(), raw[8..].as_ptr());
        assert_eq!(f.preview_image().unwrap().1, Some("image/jpeg"));
    }

    /// Event 4 of transcript 20_metadata: 165 bytes of metadata as Python's json.dumps
    /// writes it, 3329 PNG bytes, 3502 in all.
    #[test]
    fn metadata_preview_like_comfyui() {
        let meta = r#"{"node_id": "2", "prompt_id": "c38010e7-c39e-4519-abb9-a31e0f97f29b", "display_node_id": "2", "parent_node_id": null, "real_node_id": "2", "image_type": "image/png"}"#;
        assert_eq!(meta.len(), 165);
        let mut image = vec![0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
        image.resize(3329, 7);
        let mut raw = Vec::new();
        raw.extend(be(4));
        raw.extend(be(165));
        raw.extend(meta.as_bytes());
        raw.extend(&image);
        assert_eq!(raw.len(), 3502);
        let f = BinaryFrame::parse(Bytes::from(raw)).unwrap();
        let BinaryFrame::PreviewWithMetadata {
            metadata,
            image: img,
        } = &f
        else {
            panic!("not a metadata preview: {f:?}")
        };
        assert_eq!(metadata.node_id.as_deref(), Some("2"));
        assert_eq!(
            metadata.prompt_id.as_deref(),
            Some("c38010e7-c39e-4519-abb9-a31e0f97f29b")
        );
        assert_eq!(metadata.parent_node_id, None);
        assert_eq!(metadata.image_type.as_deref(), Some("image/png"));
        assert_eq!(&img[..], &image[..]);
    }

    #[test]
    fn truncated_and_invalid_frames_are_errors() {
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![0, 0, 1],
            [be(1).as_slice(), &[0, 0]].concat(),
            [be(3).as_slice(), &be(10), b"abc"].concat(),
            [be(4).as_slice(), &be(100), b"{}"].concat(),
            [be(3).as_slice(), &be(u32::MAX)].concat(),
        ];
        for raw in cases {
            assert!(
                matches!(
                    BinaryFrame::parse(Bytes::from(raw.clone())),
                    Err(FrameError::Truncated { .. })
                ),
                "{raw:?}"
            );
        }
        let bad_utf8 = [be(3).as_slice(), &be(1), b"1", &[0xff, 0xfe]].concat();
        assert_eq!(
            BinaryFrame::parse(Bytes::from(bad_utf8)),
            Err(FrameError::InvalidUtf8 { field: "text" })
        );
        let bad_meta = [be(4).as_slice(), &be(3), b"[1]", b"img"].concat();
        assert!(matches!(
            BinaryFrame::parse(Bytes::from(bad_meta)),
            Err(FrameError::InvalidMetadata(_))
        ));
    }

    #[test]
    fn other_events_are_kept() {
        let raw = [be(2).as_slice(), b"raw"].concat();
        assert_eq!(
            BinaryFrame::parse(Bytes::from(raw)).unwrap(),
            BinaryFrame::UnencodedPreview {
                payload: Bytes::from_static(b"raw")
            }
        );
        let raw = [be(77).as_slice(), b"x"].concat();
        assert_eq!(
            BinaryFrame::parse(Bytes::from(raw)).unwrap(),
            BinaryFrame::Unknown {
                event: 77,
                payload: Bytes::from_static(b"x")
            }
        );
        // Event 1 with an unknown format is still a preview.
        let raw = [be(1).as_slice(), &be(9), b"img"].concat();
        assert_eq!(
            BinaryFrame::parse(Bytes::from(raw)).unwrap(),
            BinaryFrame::Preview {
                format: ImageFormat::Other(9),
                image: Bytes::from_static(b"img")
            }
        );
    }

    fn opt_id() -> impl Strategy<Value = Option<String>> {
        proptest::option::of("[0-9a-z:._-]{0,12}")
    }

    fn frame() -> impl Strategy<Value = BinaryFrame> {
        let bytes = || proptest::collection::vec(any::<u8>(), 0..256).prop_map(Bytes::from);
        prop_oneof![
            (any::<u32>(), bytes()).prop_map(|(c, image)| BinaryFrame::Preview {
                format: ImageFormat::from_code(c),
                image
            }),
            bytes().prop_map(|payload| BinaryFrame::UnencodedPreview { payload }),
            (".{0,20}", ".{0,200}").prop_map(|(node_id, text)| BinaryFrame::Text { node_id, text }),
            (
                opt_id(),
                opt_id(),
                opt_id(),
                opt_id(),
                opt_id(),
                opt_id(),
                bytes()
            )
                .prop_map(
                    |(
                        node_id,
                        prompt_id,
                        display_node_id,
                        parent_node_id,
                        real_node_id,
                        image_type,
                        image,
                    )| {
                        BinaryFrame::PreviewWithMetadata {
                            metadata: PreviewMetadata {
                                node_id,
                                prompt_id,
                                display_node_id,
                                parent_node_id,
                                real_node_id,
                                image_type,
                                extra: Map::new(),
                            },
                            image,
                        }
                    }
                ),
            (5u32.., bytes()).prop_map(|(event, payload)| BinaryFrame::Unknown { event, payload }),
        ]
    }

    proptest! {
        #[test]
        fn encode_parse_round_trip(f in frame()) {
            let raw = f.encode().unwrap();
            prop_assert_eq!(BinaryFrame::parse(raw).unwrap(), f);
        }

        #[test]
        fn arbitrary_bytes_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = BinaryFrame::parse(Bytes::from(raw));
        }

        #[test]
        fn arbitrary_payloads_never_panic(
            event in 0u32..6,
            len in prop_oneof![0u32..40, any::<u32>()],
            rest in proptest::collection::vec(any::<u8>(), 0..48),
        ) {
            let raw = [event.to_be_bytes().as_slice(), &len.to_be_bytes(), &rest].concat();
            let _ = BinaryFrame::parse(Bytes::from(raw));
        }
    }
}
