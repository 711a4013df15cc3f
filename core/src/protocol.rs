//! The agent ↔ mover protocol: versioned, length-prefixed frames over any
//! byte stream (TCP, a pipe, ssh's stdin/stdout). Spec:
//! `docs/formats/protocol.md`.
//!
//! A frame is a 12-byte header — magic `FLOE`, version (u16 BE), flags (u16
//! BE, zero), payload length (u32 BE) — then the payload: one JSON message.

use crate::error::{Error, ErrorKind, Result, WireError};
use crate::model::{ConfigId, FrozenImage, ImageId, ImageMap, ItemId, ItemRecord, MapPart, Remap};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};

/// The frame magic.
pub const MAGIC: [u8; 4] = *b"FLOE";
/// The protocol version this build speaks.
pub const VERSION: u16 = 5;
/// Header length in bytes.
pub const HEADER_LEN: usize = 12;
/// The default limit on one frame's payload (a map of millions of extents
/// fits; anything larger is refused before it is read).
pub const DEFAULT_MAX_FRAME: u32 = 256 * 1024 * 1024;

/// What the mover asks of the agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// First message: who is asking, and in which protocol version.
    Hello {
        /// The mover's protocol version.
        protocol: u16,
        /// The mover's name.
        peer: String,
    },
    /// Freeze these sources and return the image and its map.
    Freeze {
        /// Sources (`array:vol0`, ...).
        sources: Vec<String>,
        /// Answer with the first part of the map as soon as it is made;
        /// `MapMore` fetches the rest (the mover reads meanwhile).
        #[serde(default)]
        parts: bool,
    },
    /// The next part of the map of an image frozen with `parts`.
    MapMore {
        /// The image.
        image: ImageId,
    },
    /// Take over a frozen image whose mover vanished (to resume its
    /// backup); answered like `Freeze`, with the current map.
    Attach {
        /// The image.
        image: ImageId,
    },
    /// Is this item's map still valid for `config`?
    CheckConfig {
        /// The image.
        image: ImageId,
        /// The item.
        item: ItemId,
        /// The config id the mover holds.
        config: ConfigId,
    },
    /// Are these items' config ids still current? (One round trip for a
    /// batch of small items.)
    CheckConfigs {
        /// The image.
        image: ImageId,
        /// Each item and the config id the mover holds for it.
        items: Vec<(ItemId, ConfigId)>,
    },
    /// Does the freezer still hold every write since the map? (Then
    /// nothing read so far can have changed: every config id the mover
    /// holds from the map is current, and a batch read before the answer
    /// needs no look per item.)
    Held {
        /// The image.
        image: ImageId,
    },
    /// What changed in this item's map since `since`?
    Remap {
        /// The image.
        image: ImageId,
        /// The item.
        item: ItemId,
        /// The config id the mover holds.
        since: ConfigId,
    },
    /// The backup is done with the image: release it.
    Release {
        /// The image.
        image: ImageId,
    },
    /// Restore through the agent: files go under `dest` on the agent's
    /// host (which must be under one of its `--allow-restore` dirs).
    RestoreBegin {
        /// The destination directory, absolute.
        dest: String,
        /// Leave owners as the agent's user.
        no_owners: bool,
        /// Sync the destination's file system in the background every
        /// this many bytes of file data (0: only at the end; absent: the
        /// agent's default, 128 MiB).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sync_every: Option<u64>,
    },
    /// Make this item at `dest` (under the session's destination). A file
    /// then takes `RestoreData` frames and a `RestoreItemEnd`.
    RestoreItem {
        /// Where, absolute.
        dest: String,
        /// The item as the set recorded it (its checksum included).
        record: Box<ItemRecord>,
    },
    /// The next bytes of the file being restored.
    RestoreData {
        /// The bytes, base64.
        data: String,
    },
    /// The file's bytes are all sent: check and close it.
    RestoreItemEnd,
    /// The items are all sent: directories' metadata, and sync.
    RestoreFinish,
}

/// What the agent answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// Answer to `Hello`.
    Hello {
        /// The agent's protocol version.
        protocol: u16,
        /// The agent's host name.
        host: String,
    },
    /// Answer to `Freeze` and `Attach`.
    Frozen {
        /// The frozen image.
        image: FrozenImage,
        /// Its map (the first part, when asked for parts).
        map: ImageMap,
        /// More parts follow (`MapMore`).
        #[serde(default)]
        more: bool,
    },
    /// Answer to `MapMore`: the next part of the map (`map`: its items
    /// and failures; `more`: more parts follow).
    MapPart(MapPart),
    /// Answer to `CheckConfig`.
    Config {
        /// The current config id.
        current: ConfigId,
        /// True when it equals the one asked about.
        valid: bool,
    },
    /// Answer to `CheckConfigs`: the current config id of each item, in
    /// the order asked.
    Configs {
        /// Current config ids.
        current: Vec<ConfigId>,
    },
    /// Answer to `Held`.
    Held {
        /// Every write since the map is still held (false once the
        /// freezer let them go, for good).
        held: bool,
    },
    /// Answer to `Remap`.
    Remapped {
        /// Only the changed extents.
        remap: Remap,
    },
    /// Answer to `Release`.
    Released,
    /// Answer to `RestoreBegin`: the destination as the agent resolved it.
    RestoreBegun {
        /// Canonical destination.
        dest: String,
    },
    /// Answer to `RestoreItem`, `RestoreData` and `RestoreItemEnd`: bytes
    /// written so far for the item (holes not counted).
    RestoreWritten {
        /// Bytes.
        bytes: u64,
    },
    /// Answer to `RestoreFinish`.
    RestoreFinished {
        /// Items made.
        items: u64,
        /// Bytes of file content written.
        bytes: u64,
        /// Directories whose metadata could not be set: (item, error).
        failures: Vec<(String, String)>,
    },
    /// Any request failed.
    Error {
        /// What failed.
        error: WireError,
    },
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard, padded base64 (bytes inside JSON messages).
pub fn b64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            out.push(if i <= c.len() {
                char::from(B64[usize::try_from((n >> shift) & 63).unwrap_or(0)])
            } else {
                '='
            });
        }
    }
    out
}

/// Decode [`b64_encode`]'s form; `None` when malformed.
pub fn b64_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(4) {
        return None;
    }
    let val = |c: u8| {
        B64.iter()
            .position(|&x| x == c)
            .and_then(|v| u32::try_from(v).ok())
    };
    let mut out = Vec::with_capacity(b.len() / 4 * 3);
    for (k, q) in b.chunks(4).enumerate() {
        let last = k + 1 == b.len() / 4;
        let pad = q.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &q[..4 - pad] {
            n = (n << 6) | val(c)?;
        }
        n <<= 6 * u32::try_from(pad).unwrap_or(0);
        let bytes = n.to_be_bytes();
        let bytes = [bytes[1], bytes[2], bytes[3]];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

/// Frame flag: the payload is zstd-compressed JSON.
pub const FLAG_ZSTD: u16 = 0x0001;

/// Payloads at least this large are sent compressed (when the engine is
/// built, which brings zstd).
pub const COMPRESS_FROM: usize = 16 * 1024;

/// Encode `payload` as one frame.
pub fn encode_frame(payload: &[u8]) -> Result<Vec<u8>> {
    encode_frame_flags(payload, 0)
}

/// Encode `payload` as one frame with these flags.
pub fn encode_frame_flags(payload: &[u8], flags: u16) -> Result<Vec<u8>> {
    let len = u32::try_from(payload.len()).map_err(|_| {
        Error::new(
            ErrorKind::FrameTooLarge,
            format!("frame payload of {} bytes exceeds 4 GiB", payload.len()),
        )
    })?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Parse a frame header: the payload length, or why the header is bad.
pub fn decode_header(h: &[u8; HEADER_LEN], max: u32) -> Result<u32> {
    decode_header_flags(h, max).map(|(len, _)| len)
}

/// Parse a frame header: the payload length and flags.
pub fn decode_header_flags(h: &[u8; HEADER_LEN], max: u32) -> Result<(u32, u16)> {
    if h[0..4] != MAGIC {
        return Err(Error::new(
            ErrorKind::Protocol,
            format!("bad frame magic {:02x?}, expected \"FLOE\"", &h[0..4]),
        ));
    }
    let version = u16::from_be_bytes([h[4], h[5]]);
    if version != VERSION {
        return Err(Error::new(
            ErrorKind::Protocol,
            format!("peer speaks protocol version {version}, this build speaks {VERSION}"),
        ));
    }
    let flags = u16::from_be_bytes([h[6], h[7]]);
    if flags & !FLAG_ZSTD != 0 {
        return Err(Error::new(
            ErrorKind::Protocol,
            format!("unknown frame flags {flags:#06x}"),
        ));
    }
    let len = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
    if len > max {
        return Err(Error::new(
            ErrorKind::FrameTooLarge,
            format!("frame of {len} bytes exceeds the limit of {max} bytes"),
        ));
    }
    Ok((len, flags))
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read frame", e).with_kind(ErrorKind::Protocol)),
        }
    }
    Ok(got)
}

/// Read one frame's payload; `None` on a clean end of stream between frames.
pub fn read_frame(r: &mut impl Read, max: u32) -> Result<Option<Vec<u8>>> {
    let mut h = [0u8; HEADER_LEN];
    let got = read_full(r, &mut h)?;
    if got == 0 {
        return Ok(None);
    }
    if got < HEADER_LEN {
        return Err(Error::new(
            ErrorKind::Protocol,
            format!("truncated frame header: {got} of {HEADER_LEN} bytes"),
        ));
    }
    let (len, flags) = decode_header_flags(&h, max)?;
    let len = usize::try_from(len)
        .map_err(|_| Error::new(ErrorKind::FrameTooLarge, "frame too large"))?;
    let mut payload = vec![0u8; len];
    let got = read_full(r, &mut payload)?;
    if got < len {
        return Err(Error::new(
            ErrorKind::Protocol,
            format!("truncated frame: {got} of {len} payload bytes before end of stream"),
        ));
    }
    if flags & FLAG_ZSTD != 0 {
        return inflate(&payload, max).map(Some);
    }
    Ok(Some(payload))
}

/// Decompress a zstd payload, refusing one that would exceed `max` bytes.
#[cfg(feature = "engine")]
fn inflate(payload: &[u8], max: u32) -> Result<Vec<u8>> {
    let max = usize::try_from(max).unwrap_or(usize::MAX);
    // A buffer of the size the frame says (ours say it), not of the limit:
    // a limit-sized one is fresh memory from the kernel for every frame.
    // A frame that holds more than it says fails, saying so.
    let capacity = zstd::zstd_safe::get_frame_content_size(payload)
        .ok()
        .flatten()
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| n <= max)
        .unwrap_or(max);
    zstd::bulk::decompress(payload, capacity).map_err(|e| {
        let what = if capacity < max {
            format!("compressed frame does not decompress to the {capacity} bytes its header says")
        } else {
            format!("compressed frame does not decompress within the limit of {max} bytes")
        };
        Error::new(ErrorKind::Protocol, what).source(e)
    })
}

#[cfg(not(feature = "engine"))]
fn inflate(_payload: &[u8], _max: u32) -> Result<Vec<u8>> {
    Err(Error::new(
        ErrorKind::Protocol,
        "compressed frame, but this build has no zstd (floe-core without the engine)",
    ))
}

/// Write one message as a frame and flush.
pub fn write_message<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<()> {
    write_frame(w, &encode_message(msg)?)
}

/// Write an encoded frame and flush.
pub fn write_frame(w: &mut impl Write, frame: &[u8]) -> Result<()> {
    w.write_all(frame)
        .and_then(|()| w.flush())
        .map_err(|e| Error::io("write frame", e).with_kind(ErrorKind::Protocol))
}

/// One message as the frame that carries it (compressed when large).
pub fn encode_message<T: Serialize>(msg: &T) -> Result<Vec<u8>> {
    let payload = serde_json::to_vec(msg)
        .map_err(|e| Error::new(ErrorKind::Protocol, "cannot encode message").source(e))?;
    encode_payload(&payload)
}

/// How a `map_part` message begins, as serde writes it: its tag.
pub const MAP_PART_OPEN: &str = r#"{"type":"map_part","#;

/// A [`Response::MapPart`] from the JSON of its [`MapPart`] as a plugin
/// wrote it: the frame `encode_message` makes of the decoded part, without
/// encoding it again. JSON that is the whole message already (it begins
/// with the tag, as the plugin ABI writes parts) is the payload as it is;
/// any other JSON object with at least one field gets the tag put before
/// its fields. `None` for anything else.
pub fn encode_map_part_json(json: &str) -> Option<Result<Vec<u8>>> {
    if json.starts_with(MAP_PART_OPEN) {
        return Some(encode_payload(json.as_bytes()));
    }
    let fields = json.trim_start().strip_prefix('{')?;
    if !fields.trim_start().starts_with('"') {
        return None;
    }
    // The tag, then the plugin's fields where they lie: the part (megabytes)
    // is not copied into a payload first.
    Some(encode_pieces(&[
        MAP_PART_OPEN.as_bytes(),
        fields.as_bytes(),
    ]))
}

/// A [`Response::Frozen`] of `image` with the first part of its map, from
/// that part's JSON as the plugin ABI writes it (the whole `map_part`
/// message, `more` first): its map goes into the frame where the plugin's
/// buffer holds it, neither decoded nor encoded again. `None` for a part
/// written otherwise.
pub fn encode_frozen_json(image: &FrozenImage, part_json: &str) -> Option<Result<Vec<u8>>> {
    let fields = part_json.strip_prefix(MAP_PART_OPEN)?;
    let (more, rest) = if let Some(r) = fields.strip_prefix(r#""more":true,"map":"#) {
        (&br#","more":true}"#[..], r)
    } else {
        (
            &br#","more":false}"#[..],
            fields.strip_prefix(r#""more":false,"map":"#)?,
        )
    };
    // The map, up to the brace that closes the message.
    let map = rest.strip_suffix('}')?;
    let image = match serde_json::to_vec(image) {
        Ok(i) => i,
        Err(e) => {
            return Some(Err(Error::new(
                ErrorKind::Protocol,
                "cannot encode message",
            )
            .source(e)))
        }
    };
    Some(encode_pieces(&[
        br#"{"type":"frozen","image":"#,
        &image,
        br#","map":"#,
        map.as_bytes(),
        more,
    ]))
}

/// A JSON payload as the frame that carries it (compressed when large).
fn encode_payload(payload: &[u8]) -> Result<Vec<u8>> {
    encode_pieces(&[payload])
}

/// The frame of the payload these pieces make, one after the other
/// (compressed when large).
fn encode_pieces(pieces: &[&[u8]]) -> Result<Vec<u8>> {
    #[cfg(feature = "engine")]
    {
        let total: usize = pieces.iter().map(|p| p.len()).sum();
        if let ([one], true) = (pieces, total >= COMPRESS_FROM) {
            // In one piece: zstd reads it where it is (streamed, it would
            // be copied into zstd's window first).
            let packed = zstd::bulk::compress(one, 1).map_err(|e| {
                Error::new(ErrorKind::Protocol, "cannot compress message").source(e)
            })?;
            return encode_frame_flags(&packed, FLAG_ZSTD);
        }
        if total >= COMPRESS_FROM {
            return compress_pieces(pieces, total);
        }
    }
    match pieces {
        [one] => encode_frame(one),
        _ => encode_frame(&pieces.concat()),
    }
}

/// A compressed frame of `total` bytes of pieces: zstd streams them into
/// the frame's own buffer, after room for its header (the frame says the
/// content size, as a decoder that inflates into one buffer needs).
#[cfg(feature = "engine")]
fn compress_pieces(pieces: &[&[u8]], total: usize) -> Result<Vec<u8>> {
    let failed =
        |e: std::io::Error| Error::new(ErrorKind::Protocol, "cannot compress message").source(e);
    let mut out = Vec::with_capacity(HEADER_LEN + total / 4);
    out.resize(HEADER_LEN, 0);
    let mut z = zstd::stream::write::Encoder::new(out, 1).map_err(failed)?;
    z.include_contentsize(true).map_err(failed)?;
    z.set_pledged_src_size(u64::try_from(total).ok())
        .map_err(failed)?;
    for p in pieces {
        z.write_all(p).map_err(failed)?;
    }
    let mut out = z.finish().map_err(failed)?;
    let len = u32::try_from(out.len() - HEADER_LEN).map_err(|_| {
        Error::new(
            ErrorKind::FrameTooLarge,
            format!(
                "frame payload of {} bytes exceeds 4 GiB",
                out.len() - HEADER_LEN
            ),
        )
    })?;
    out[..4].copy_from_slice(&MAGIC);
    out[4..6].copy_from_slice(&VERSION.to_be_bytes());
    out[6..8].copy_from_slice(&FLAG_ZSTD.to_be_bytes());
    out[8..12].copy_from_slice(&len.to_be_bytes());
    Ok(out)
}

/// A message of the protocol: an internally tagged enum (`"type"`).
///
/// serde decodes an internally tagged enum by first copying the whole
/// message into its own tree of values (it cannot know the tag comes
/// first), then decoding the variant from that: a part of a map (70,000
/// files make ~17 parts of ~2 MB) was parsed twice over, most of the
/// reader thread's time between reads. Our peers write the tag first, so
/// a large variant may be decoded straight from the bytes after it.
pub trait Message: DeserializeOwned {
    /// Decode the variant `tag` from `body` (the message without its tag:
    /// `{` followed by the fields), or `None` to take the general path.
    fn decode_tagged(_tag: &str, _body: &[u8]) -> Option<serde_json::Result<Self>> {
        None
    }
}

impl Message for Request {
    fn decode_tagged(tag: &str, body: &[u8]) -> Option<serde_json::Result<Self>> {
        /// `check_configs`'s fields (a batch of thousands of items).
        #[derive(Deserialize)]
        struct Checks {
            image: ImageId,
            items: Vec<(ItemId, ConfigId)>,
        }
        match tag {
            "check_configs" => Some(
                serde_json::from_slice(body)
                    .map(|Checks { image, items }| Request::CheckConfigs { image, items }),
            ),
            _ => None,
        }
    }
}

impl Message for Response {
    fn decode_tagged(tag: &str, body: &[u8]) -> Option<serde_json::Result<Self>> {
        /// `frozen`'s fields (its map's first part: megabytes).
        #[derive(Deserialize)]
        struct Frozen {
            image: FrozenImage,
            map: ImageMap,
            #[serde(default)]
            more: bool,
        }
        match tag {
            "map_part" => Some(serde_json::from_slice(body).map(Response::MapPart)),
            "frozen" => {
                Some(
                    serde_json::from_slice(body)
                        .map(|Frozen { image, map, more }| Response::Frozen { image, map, more }),
                )
            }
            _ => None,
        }
    }
}

/// A payload that starts `{"type":"TAG",` (as serde writes it): the tag
/// and where the comma after it is (from there, with the comma made a
/// `{`, the rest is a JSON object of its own).
fn tag_first(payload: &[u8]) -> Option<(&str, usize)> {
    const OPEN: &[u8] = br#"{"type":""#;
    let rest = payload.strip_prefix(OPEN)?;
    let end = rest.iter().position(|&b| b == b'"')?;
    let tag = std::str::from_utf8(&rest[..end]).ok()?;
    if !tag.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
        return None;
    }
    let comma = OPEN.len() + end + 1;
    (payload.get(comma) == Some(&b',')).then_some((tag, comma))
}

/// Decode a message from a payload.
pub fn decode_message<T: Message>(payload: &[u8]) -> Result<T> {
    decode_owned(payload.to_vec())
}

/// Decode a message from a payload of its own: the tag-first fast path
/// reads the fields where they are (a map part is megabytes: not copied).
fn decode_owned<T: Message>(mut payload: Vec<u8>) -> Result<T> {
    let malformed = |e| Error::new(ErrorKind::Protocol, "malformed message").source(e);
    if let Some((tag, comma)) = tag_first(&payload).map(|(t, at)| (t.to_string(), at)) {
        payload[comma] = b'{';
        let fast = T::decode_tagged(&tag, &payload[comma..]);
        payload[comma] = b',';
        if let Some(decoded) = fast {
            return decoded.map_err(malformed);
        }
    }
    serde_json::from_slice(&payload).map_err(malformed)
}

/// Read one message; `None` on a clean end of stream.
pub fn read_message<T: Message>(r: &mut impl Read, max: u32) -> Result<Option<T>> {
    match read_frame(r, max)? {
        None => Ok(None),
        Some(p) => decode_owned(p).map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_frozen_answer_made_from_a_plugin_s_first_part_is_the_answer_serde_makes() {
        use crate::model::*;
        let item = |k: u64| Item {
            id: ItemId::new(format!("/srv/\"more\":false,}}{k}")),
            kind: ItemKind::File,
            size: crate::units::Bytes(k),
            config: ConfigId::new(format!("f:{k}")),
            extents: Vec::new(),
            meta: Default::default(),
            file: None,
        };
        let image = FrozenImage {
            id: ImageId::new("fsflush-1-2"),
            plugin: "fsflush".into(),
            items: vec![FrozenItem {
                id: ItemId::new("/srv"),
                source: "fsflush:/srv".into(),
                handle: serde_json::json!({"k": [1, "two"]}),
            }],
            frozen_at: 7,
            mapper: Some("fiemap".into()),
            writes_held: true,
        };
        for (more, n) in [(true, 300), (false, 1), (false, 0)] {
            let part = MapPart {
                more,
                map: ImageMap {
                    image: image.id.clone(),
                    items: (0..n).map(item).collect(),
                    failures: vec![ItemFailure {
                        item: ItemId::new("/srv/gone"),
                        error: "vanished".into(),
                    }],
                },
            };
            // As the plugin ABI writes a part: the map_part message.
            let json = serde_json::to_string(&Response::MapPart(part.clone())).unwrap();
            let frame = encode_frozen_json(&image, &json).unwrap().unwrap();
            let want = Response::Frozen {
                image: image.clone(),
                map: part.map.clone(),
                more,
            };
            let back: Response = read_message(&mut frame.as_slice(), DEFAULT_MAX_FRAME)
                .unwrap()
                .unwrap();
            assert_eq!(back, want);
            // The tag-first path and the general one agree on serde's bytes.
            let bytes = serde_json::to_vec(&want).unwrap();
            let general: Response = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(general, want);
            assert_eq!(decode_message::<Response>(&bytes).unwrap(), want);
        }
        // A part written otherwise is not taken apart.
        assert!(encode_frozen_json(&image, r#"{"more":true,"map":{}}"#).is_none());
        assert!(
            encode_frozen_json(&image, r#"{"type":"map_part","map":{},"more":true}"#).is_none()
        );
        assert!(
            encode_frozen_json(&image, r#"{"type":"map_part","more":true,"map":{}"#).is_some_and(
                |f| {
                    read_message::<Response>(&mut f.unwrap().as_slice(), DEFAULT_MAX_FRAME).is_err()
                }
            )
        );
    }

    #[test]
    fn a_tag_first_batch_of_checks_decodes_as_the_general_path_does() {
        let req = Request::CheckConfigs {
            image: ImageId::new("img \"1\""),
            items: (0..40)
                .map(|k| {
                    (
                        ItemId::new(format!("/srv/d\\{k}/f\u{e9}")),
                        ConfigId::new(format!("f:{k}:0:1:2.000000003:ab")),
                    )
                })
                .collect(),
        };
        let bytes = serde_json::to_vec(&req).unwrap();
        let (tag, comma) = tag_first(&bytes).unwrap();
        assert_eq!(tag, "check_configs");
        let mut body = bytes[comma..].to_vec();
        body[0] = b'{';
        assert_eq!(Request::decode_tagged(tag, &body).unwrap().unwrap(), req);
        assert_eq!(decode_message::<Request>(&bytes).unwrap(), req);
        // Through a frame as the mover sends it (compressed: it is large).
        let frame = encode_message(&req).unwrap();
        let back: Request = read_message(&mut frame.as_slice(), DEFAULT_MAX_FRAME)
            .unwrap()
            .unwrap();
        assert_eq!(back, req);
        // Fields the batch does not have, or lacks, are an error.
        for bad in [
            &br#"{"type":"check_configs","image":"i"}"#[..],
            br#"{"type":"check_configs","image":"i","items":[["a"]]}"#,
            br#"{"type":"check_configs","image":"i","items":[],"x":1}"#,
        ] {
            let fast = decode_message::<Request>(bad);
            let general = serde_json::from_slice::<Request>(bad);
            assert_eq!(
                fast.is_err(),
                general.is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn a_tag_first_part_of_a_map_decodes_as_the_general_path_does() {
        use crate::model::*;
        let file = |k: u64| Item {
            id: ItemId::new(format!("/srv/a \"b\"/f{k}")),
            kind: ItemKind::File,
            size: crate::units::Bytes(8192 + k),
            config: ConfigId::new(format!("f:{k}:0:8192:1.5:ab")),
            extents: vec![MapExtent {
                logical: crate::units::ItemOffset(0),
                length: crate::units::Bytes(8192 + k),
                kind: ExtentKind::Inline(vec![1, 2, 3]),
            }],
            meta: [("k".to_string(), "v".to_string())].into_iter().collect(),
            file: None,
        };
        let resp = Response::MapPart(MapPart {
            map: ImageMap {
                image: ImageId::new("img"),
                items: (0..50).map(file).collect(),
                failures: vec![ItemFailure {
                    item: ItemId::new("/srv/x"),
                    error: "gone".into(),
                }],
            },
            more: true,
        });
        let bytes = serde_json::to_vec(&resp).unwrap();
        let (tag, comma) = tag_first(&bytes).expect("serde writes the tag first");
        assert_eq!(tag, "map_part");
        let mut body = bytes[comma..].to_vec();
        body[0] = b'{';
        let fast = Response::decode_tagged(tag, &body).unwrap().unwrap();
        let general: Response = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(fast, resp);
        assert_eq!(general, resp);
        assert_eq!(decode_message::<Response>(&bytes).unwrap(), resp);
        // Another writer's spacing or order takes the general path.
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let pretty = serde_json::to_vec_pretty(&v).unwrap();
        assert!(tag_first(&pretty).is_none());
        assert_eq!(decode_message::<Response>(&pretty).unwrap(), resp);
        // A body that is not a part of a map is an error, not a panic or
        // another message.
        let e = decode_message::<Response>(br#"{"type":"map_part","map":7}"#).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol);
        assert!(decode_message::<Response>(br#"{"type":"map_part"}"#).is_err());
        assert_eq!(
            decode_message::<Response>(br#"{"type":"released"}"#).unwrap(),
            Response::Released
        );

        // The agent hands a plugin's JSON of the part on as the frame it
        // would have encoded (compressed: it is large), byte for byte.
        let Response::MapPart(part) = &resp else {
            unreachable!()
        };
        // Written as the plugin ABI writes parts (the whole message): the
        // frame encode_message makes, byte for byte.
        let message = serde_json::to_string(&resp).unwrap();
        assert!(message.starts_with(MAP_PART_OPEN));
        let frame = encode_map_part_json(&message).unwrap().unwrap();
        assert_eq!(frame, encode_message(&resp).unwrap());
        // The part alone: the tag put before it (streamed into the frame).
        let json = serde_json::to_string(part).unwrap();
        let frame = encode_map_part_json(&json).unwrap().unwrap();
        let back: Response = read_message(&mut frame.as_slice(), DEFAULT_MAX_FRAME)
            .unwrap()
            .unwrap();
        assert_eq!(back, resp);
        // Another plugin's spacing still makes the same message.
        let spaced = format!(" {{ {}", &json[1..]);
        let frame = encode_map_part_json(&spaced).unwrap().unwrap();
        let back: Response = read_message(&mut frame.as_slice(), DEFAULT_MAX_FRAME)
            .unwrap()
            .unwrap();
        assert_eq!(back, resp);
        // Only a JSON object with fields is spliced.
        for not in ["[]", "{}", "7", ""] {
            assert!(encode_map_part_json(not).is_none(), "{not}");
        }
    }

    #[test]
    fn large_messages_travel_compressed_and_bombs_are_refused() {
        let req = Request::Freeze {
            sources: (0..20_000)
                .map(|i| format!("fsflush:/srv/data/file{i}"))
                .collect(),
            parts: true,
        };
        let mut buf = Vec::new();
        write_message(&mut buf, &req).unwrap();
        let flags = u16::from_be_bytes([buf[6], buf[7]]);
        assert_eq!(flags, FLAG_ZSTD);
        let plain = serde_json::to_vec(&req).unwrap().len();
        assert!(buf.len() * 5 < plain, "{} of {plain}", buf.len());
        let back: Request = read_message(&mut buf.as_slice(), DEFAULT_MAX_FRAME)
            .unwrap()
            .unwrap();
        assert_eq!(
            serde_json::to_string(&back).unwrap(),
            serde_json::to_string(&req).unwrap()
        );
        // Small on the wire, too large once inflated: refused.
        let e = read_message::<Request>(&mut buf.as_slice(), 64 * 1024).unwrap_err();
        assert!(
            e.to_string()
                .contains("does not decompress within the limit"),
            "{e}"
        );
        // Inflated into a buffer of the size the frame says, not of the
        // limit.
        let payload = read_frame(&mut buf.as_slice(), DEFAULT_MAX_FRAME)
            .unwrap()
            .unwrap();
        assert_eq!(payload.len(), plain);
        assert_eq!(payload.capacity(), plain);
        // A frame whose header says less than it holds: refused.
        let json = br#"{"type":"freeze","sources":["fsflush:/srv/a/long/enough/path"]}"#;
        let mut z = zstd::bulk::compress(json, 1).unwrap();
        // Single segment, a one-byte content size right after the
        // descriptor (zstd's format for a small frame).
        assert_eq!(z[4] & 0xE0, 0x20, "{z:?}");
        assert_eq!(usize::from(z[5]), json.len());
        z[5] = 10;
        let lying = encode_frame_flags(&z, FLAG_ZSTD).unwrap();
        let e = read_message::<Request>(&mut lying.as_slice(), DEFAULT_MAX_FRAME).unwrap_err();
        assert!(
            e.to_string().contains("the 10 bytes its header says"),
            "{e}"
        );
        // Garbage marked compressed: a protocol error, not a panic.
        let bad = encode_frame_flags(b"not zstd at all", FLAG_ZSTD).unwrap();
        let e = read_message::<Request>(&mut bad.as_slice(), DEFAULT_MAX_FRAME).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol);
        let odd = encode_frame_flags(b"{}", 0x0004).unwrap();
        let e = read_message::<Request>(&mut odd.as_slice(), DEFAULT_MAX_FRAME).unwrap_err();
        assert!(e.to_string().contains("unknown frame flags"), "{e}");
    }

    #[test]
    fn round_trip_and_errors() {
        let msg = Request::Freeze {
            sources: vec!["array:vol0".into()],
            parts: false,
        };
        let mut buf = Vec::new();
        write_message(&mut buf, &msg).unwrap();
        let back: Request = read_message(&mut buf.as_slice(), DEFAULT_MAX_FRAME)
            .unwrap()
            .unwrap();
        assert_eq!(back, msg);
        // A freeze without `parts` (an older mover's) asks for the whole
        // map; a `frozen` without `more` is whole.
        let old: Request =
            serde_json::from_str(r#"{"type":"freeze","sources":["array:vol0"]}"#).unwrap();
        assert_eq!(old, msg);
        for (req, resp) in [
            (
                Request::Held {
                    image: ImageId::new("i"),
                },
                Response::Held { held: true },
            ),
            (
                Request::Held {
                    image: ImageId::new("j"),
                },
                Response::Held { held: false },
            ),
        ] {
            let mut buf = Vec::new();
            write_message(&mut buf, &req).unwrap();
            write_message(&mut buf, &resp).unwrap();
            let mut r = buf.as_slice();
            assert_eq!(
                read_message::<Request>(&mut r, DEFAULT_MAX_FRAME).unwrap(),
                Some(req)
            );
            assert_eq!(
                read_message::<Response>(&mut r, DEFAULT_MAX_FRAME).unwrap(),
                Some(resp)
            );
        }
        let whole: Response = serde_json::from_str(
            r#"{"type":"frozen","image":{"id":"i","plugin":"p","items":[],"frozen_at":0},"map":{"image":"i","items":[]}}"#,
        )
        .unwrap();
        assert!(matches!(whole, Response::Frozen { more: false, .. }));

        let e = read_message::<Request>(&mut &buf[..buf.len() - 3], DEFAULT_MAX_FRAME).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol);
        assert!(e.to_string().contains("truncated frame"), "{e}");

        let e = read_message::<Request>(&mut &buf[..5], DEFAULT_MAX_FRAME).unwrap_err();
        assert!(
            e.to_string().contains("truncated frame header: 5 of 12"),
            "{e}"
        );

        let e = read_message::<Request>(&mut buf.as_slice(), 8).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FrameTooLarge);
        assert!(
            e.to_string().contains("exceeds the limit of 8 bytes"),
            "{e}"
        );

        let mut bad = buf.clone();
        bad[5] = 9;
        let e = read_message::<Request>(&mut bad.as_slice(), DEFAULT_MAX_FRAME).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("protocol version 9, this build speaks {VERSION}")),
            "{e}"
        );

        assert!(read_message::<Request>(&mut &[][..], DEFAULT_MAX_FRAME)
            .unwrap()
            .is_none());
    }

    #[test]
    fn base64_is_the_standard_padded_alphabet() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(b64_encode(plain.as_bytes()), enc);
            assert_eq!(b64_decode(enc).as_deref(), Some(plain.as_bytes()));
        }
        assert_eq!(b64_decode("Zg="), None);
        assert_eq!(b64_decode("Zg==Zg=="), None);
    }

    proptest! {
        #[test]
        fn base64_round_trips_and_its_decoder_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300), junk in ".{0,40}") {
            prop_assert_eq!(b64_decode(&b64_encode(&data)), Some(data));
            let _ = b64_decode(&junk);
        }
    }

    proptest! {
        /// The decoder never panics and never reads past a frame.
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut r = bytes.as_slice();
            let _ = read_message::<Request>(&mut r, 1024);
        }

        /// Valid headers with random payloads decode or fail cleanly.
        #[test]
        fn framed_garbage_is_a_protocol_error(payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let frame = encode_frame(&payload).unwrap();
            match read_message::<Request>(&mut frame.as_slice(), 1024) {
                Ok(Some(_)) => {}
                Ok(None) => prop_assert!(false, "a frame is never end of stream"),
                Err(e) => prop_assert_eq!(e.kind(), ErrorKind::Protocol),
            }
        }
    }
}
