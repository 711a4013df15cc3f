//! The control API: versioned JSON, one request and one response per line,
//! over TCP or a Unix socket. Spec: `docs/sim-san-control.md`.

use crate::array::Array;
use floe_core::units::{Bytes, DeviceOffset};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The control API version.
pub const CONTROL_VERSION: u32 = 1;

/// Why an array operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// No such LUN, volume or snapshot.
    NotFound,
    /// It exists already.
    Exists,
    /// Bad arguments.
    Invalid,
    /// No free chunks.
    NoSpace,
    /// In use.
    Busy,
    /// The host OS failed.
    Io,
    /// A malformed request or an unsupported version.
    Protocol,
}

/// An array error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("sim-san: {message} [{code:?}]")]
pub struct ArrayError {
    /// Stable code.
    pub code: ErrorCode,
    /// What happened.
    pub message: String,
}

/// A LUN.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LunInfo {
    /// Name (also an NBD export name).
    pub name: String,
    /// WWN-like identity (also an NBD export name).
    pub wwn: String,
    /// Size.
    pub size: Bytes,
    /// Backing sparse file.
    pub path: PathBuf,
    /// Unallocated bytes.
    pub free: Bytes,
    /// In the storage pool (false: a raw LUN, e.g. a restore target).
    pub pool: bool,
}

/// One extent of a target's map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapExtentInfo {
    /// Offset in the target.
    pub offset: DeviceOffset,
    /// Length.
    pub length: Bytes,
    /// LUN name.
    pub lun: String,
    /// LUN WWN.
    pub wwn: String,
    /// Offset on the LUN.
    pub lun_offset: DeviceOffset,
}

/// A target's (volume's or snapshot's) map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetMap {
    /// Name.
    pub target: String,
    /// For a snapshot, its origin volume.
    pub origin: Option<String>,
    /// Size.
    pub size: Bytes,
    /// Metadata generation.
    pub generation: u64,
    /// Block size of the LUNs.
    pub block_size: u32,
    /// Extents (all of them, or for a remap only the changed ones).
    pub extents: Vec<MapExtentInfo>,
}

/// Counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// NBD reads served since the schedule was set.
    pub reads: u64,
    /// Bytes read over NBD.
    pub bytes_read: Bytes,
    /// Config queries (generation, remap) since the schedule was set.
    pub queries: u64,
    /// Scheduled events that fired.
    pub events_fired: u64,
    /// Scheduled events still waiting.
    pub events_pending: u64,
}

/// When a scheduled event fires.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// When the Nth NBD read arrives, before it is served: the window
    /// between the mover's config check and its read.
    BeforeRead(u64),
    /// After the Nth NBD read's bytes were read, before they are sent: the
    /// window between the mover's read and its second check.
    AfterRead(u64),
    /// When the Nth config query arrives, before it is answered: the window
    /// before the mover's check.
    BeforeQuery(u64),
}

/// What a scheduled event does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Action {
    /// Migrate a range of a target's chunks.
    Migrate {
        /// Volume or snapshot; `volume@*` is the newest snapshot of volume.
        target: String,
        /// Offset.
        offset: DeviceOffset,
        /// Length.
        length: Bytes,
    },
    /// Write pseudo-random bytes to a volume (remaps its snapshots by
    /// copy-on-write).
    Write {
        /// Volume.
        target: String,
        /// Offset.
        offset: DeviceOffset,
        /// Length.
        length: Bytes,
        /// Pattern seed.
        seed: u64,
    },
}

/// A scheduled event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// When.
    pub trigger: Trigger,
    /// What.
    pub action: Action,
}

/// A control request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// The array's identity and version.
    Hello,
    /// Create a LUN.
    CreateLun {
        /// Name.
        name: String,
        /// Size (multiple of 64 KiB).
        size: Bytes,
        /// In the storage pool (default true); false makes a raw LUN that
        /// volumes and snapshots never use.
        #[serde(default)]
        pool: Option<bool>,
    },
    /// List LUNs.
    ListLuns,
    /// Create a volume.
    CreateVolume {
        /// Name.
        name: String,
        /// Size (multiple of 64 KiB).
        size: Bytes,
        /// Longest run of contiguous 64 KiB chunks (default 16).
        #[serde(default)]
        max_run_chunks: Option<u64>,
        /// LUNs to use (default all).
        #[serde(default)]
        luns: Option<Vec<String>>,
    },
    /// Write a pseudo-random pattern.
    Write {
        /// Volume.
        target: String,
        /// Offset.
        offset: DeviceOffset,
        /// Length.
        length: Bytes,
        /// Pattern seed.
        seed: u64,
    },
    /// Random writes.
    Workload {
        /// Volume.
        target: String,
        /// Seed.
        seed: u64,
        /// How many writes.
        writes: u32,
        /// Longest write.
        max_length: Bytes,
    },
    /// Read bytes (hex).
    Read {
        /// Target.
        target: String,
        /// Offset.
        offset: DeviceOffset,
        /// Length (at most 16 MiB).
        length: Bytes,
    },
    /// BLAKE3 of a target's bytes.
    Checksum {
        /// Target.
        target: String,
        /// Offset (default 0).
        #[serde(default)]
        offset: Option<DeviceOffset>,
        /// Length (default to the end).
        #[serde(default)]
        length: Option<Bytes>,
    },
    /// Snapshot volumes at one instant.
    Snapshot {
        /// Volumes.
        volumes: Vec<String>,
        /// Snapshot names are `volume@suffix`.
        suffix: String,
    },
    /// Delete a volume or snapshot.
    Delete {
        /// Name.
        target: String,
    },
    /// Migrate a range of a target.
    Migrate {
        /// Target.
        target: String,
        /// Offset.
        offset: DeviceOffset,
        /// Length.
        length: Bytes,
    },
    /// The whole current map.
    Map {
        /// Target.
        target: String,
    },
    /// The generation (a counted config query).
    Generation {
        /// Target.
        target: String,
    },
    /// Extents changed since a generation (a counted config query).
    Remap {
        /// Target.
        target: String,
        /// Generation the caller holds.
        since: u64,
    },
    /// Fail reads of a LUN range with EIO.
    InjectError {
        /// LUN name or WWN.
        lun: String,
        /// Offset.
        offset: DeviceOffset,
        /// Length.
        length: Bytes,
        /// How many reads fail (default: all until cleared).
        #[serde(default)]
        count: Option<u32>,
    },
    /// Drop the NBD connection on reads of a LUN range.
    InjectDisconnect {
        /// LUN name or WWN.
        lun: String,
        /// Offset.
        offset: DeviceOffset,
        /// Length.
        length: Bytes,
        /// How many reads are cut off (default: all until cleared).
        #[serde(default)]
        count: Option<u32>,
    },
    /// Delay reads of a LUN range.
    InjectLatency {
        /// LUN name or WWN.
        lun: String,
        /// Offset.
        offset: DeviceOffset,
        /// Length.
        length: Bytes,
        /// Delay, milliseconds (added to `micros`).
        #[serde(default)]
        millis: u64,
        /// Delay, microseconds (added to `millis`): SSD-backed arrays
        /// answer in a fraction of a millisecond.
        #[serde(default)]
        micros: u64,
    },
    /// Remove all faults.
    ClearFaults,
    /// Replace the remap schedule (resets the read and query counters).
    Schedule {
        /// Events.
        events: Vec<Event>,
    },
    /// Counters.
    Stats,
    /// Check internal invariants.
    Check,
}

/// A request on the wire: the version and the operation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Request {
    /// Must be [`CONTROL_VERSION`].
    pub v: u32,
    /// The operation.
    #[serde(flatten)]
    pub op: Op,
}

/// A response on the wire.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    /// [`CONTROL_VERSION`].
    pub v: u32,
    /// Success.
    pub ok: bool,
    /// The result on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// The error on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ArrayError>,
}

fn hex(bytes: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(D[usize::from(b >> 4)] as char);
        s.push(D[usize::from(b & 15)] as char);
    }
    s
}

/// Decode hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn to_value<T: Serialize>(v: T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

/// Execute one operation on the array.
pub fn execute(array: &Array, mut op: Op) -> Result<serde_json::Value, ArrayError> {
    use serde_json::json;
    match &mut op {
        Op::Read { target, .. }
        | Op::Checksum { target, .. }
        | Op::Delete { target }
        | Op::Migrate { target, .. }
        | Op::Map { target }
        | Op::Generation { target }
        | Op::Remap { target, .. } => *target = array.resolve(target),
        _ => {}
    }
    Ok(match op {
        Op::Hello => {
            json!({"array": array.id(), "version": CONTROL_VERSION, "chunk": crate::array::CHUNK})
        }
        Op::CreateLun { name, size, pool } => {
            to_value(array.create_lun_in(&name, size, pool.unwrap_or(true))?)
        }
        Op::ListLuns => to_value(array.luns()),
        Op::CreateVolume {
            name,
            size,
            max_run_chunks,
            luns,
        } => to_value(array.create_volume(
            &name,
            size,
            max_run_chunks.unwrap_or(16),
            luns.as_deref(),
        )?),
        Op::Write {
            target,
            offset,
            length,
            seed,
        } => {
            array.write_pattern(&target, offset, length, seed)?;
            json!({})
        }
        Op::Workload {
            target,
            seed,
            writes,
            max_length,
        } => {
            array.workload(&target, seed, writes, max_length)?;
            json!({})
        }
        Op::Read {
            target,
            offset,
            length,
        } => {
            if length.0 > 16 * 1024 * 1024 {
                return Err(ArrayError {
                    code: ErrorCode::Invalid,
                    message: "read at most 16 MiB at a time".into(),
                });
            }
            json!({"hex": hex(&array.read(&target, offset, length)?)})
        }
        Op::Checksum {
            target,
            offset,
            length,
        } => {
            json!({"blake3": array.checksum(&target, offset, length)?})
        }
        Op::Snapshot { volumes, suffix } => {
            json!({"snapshots": array.snapshot(&volumes, &suffix)?})
        }
        Op::Delete { target } => {
            array.delete(&target)?;
            json!({})
        }
        Op::Migrate {
            target,
            offset,
            length,
        } => json!({"generation": array.migrate(&target, offset, length)?}),
        Op::Map { target } => to_value(array.map(&target)?),
        Op::Generation { target } => json!({"generation": array.generation(&target)?}),
        Op::Remap { target, since } => to_value(array.remap(&target, since)?),
        Op::InjectError {
            lun,
            offset,
            length,
            count,
        } => {
            array.inject_error(&lun, offset, length, count)?;
            json!({})
        }
        Op::InjectDisconnect {
            lun,
            offset,
            length,
            count,
        } => {
            array.inject_disconnect(&lun, offset, length, count)?;
            json!({})
        }
        Op::InjectLatency {
            lun,
            offset,
            length,
            millis,
            micros,
        } => {
            let delay = Duration::from_millis(millis).saturating_add(Duration::from_micros(micros));
            array.inject_latency(&lun, offset, length, delay)?;
            json!({})
        }
        Op::ClearFaults => {
            array.clear_faults();
            json!({})
        }
        Op::Schedule { events } => {
            let n = events.len();
            array.set_schedule(events);
            json!({"events": n})
        }
        Op::Stats => to_value(array.stats()),
        Op::Check => {
            array.check_invariants().map_err(|m| ArrayError {
                code: ErrorCode::Invalid,
                message: m,
            })?;
            json!({})
        }
    })
}

/// Answer one request line.
pub fn handle_line(array: &Array, line: &str) -> Response {
    let result = match serde_json::from_str::<Request>(line) {
        Err(e) => Err(ArrayError {
            code: ErrorCode::Protocol,
            message: format!("malformed request: {e}"),
        }),
        Ok(r) if r.v != CONTROL_VERSION => Err(ArrayError {
            code: ErrorCode::Protocol,
            message: format!(
                "control API version {} requested, this sim-san speaks {CONTROL_VERSION}",
                r.v
            ),
        }),
        Ok(r) => execute(array, r.op),
    };
    match result {
        Ok(v) => Response {
            v: CONTROL_VERSION,
            ok: true,
            result: Some(v),
            error: None,
        },
        Err(e) => Response {
            v: CONTROL_VERSION,
            ok: false,
            result: None,
            error: Some(e),
        },
    }
}

/// Serve one control connection until it closes.
pub fn serve_connection<S: std::io::Read + Write>(array: Arc<Array>, stream: S) {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.trim().is_empty() {
            continue;
        }
        let resp = handle_line(&array, line.trim());
        let mut out = serde_json::to_vec(&resp).unwrap_or_default();
        out.push(b'\n');
        let w = reader.get_mut();
        if w.write_all(&out).and_then(|()| w.flush()).is_err() {
            return;
        }
    }
}

/// A client of the control API.
pub struct Client {
    reader: BufReader<TcpStream>,
}

impl Client {
    /// Connect to `addr` (host:port).
    pub fn connect(addr: &str) -> Result<Client, ArrayError> {
        let s = TcpStream::connect(addr).map_err(|e| ArrayError {
            code: ErrorCode::Io,
            message: format!("cannot reach sim-san control API at {addr}: {e}"),
        })?;
        let _ = s.set_nodelay(true);
        Ok(Client {
            reader: BufReader::new(s),
        })
    }

    /// Send one operation; the result value.
    pub fn call(&mut self, op: Op) -> Result<serde_json::Value, ArrayError> {
        let io = |e: std::io::Error| ArrayError {
            code: ErrorCode::Io,
            message: format!("sim-san control connection: {e}"),
        };
        let mut line = serde_json::to_vec(&Request {
            v: CONTROL_VERSION,
            op,
        })
        .map_err(|e| ArrayError {
            code: ErrorCode::Protocol,
            message: e.to_string(),
        })?;
        line.push(b'\n');
        self.reader.get_mut().write_all(&line).map_err(io)?;
        let mut resp = String::new();
        if self.reader.read_line(&mut resp).map_err(io)? == 0 {
            return Err(ArrayError {
                code: ErrorCode::Io,
                message: "sim-san closed the control connection".into(),
            });
        }
        let r: Response = serde_json::from_str(&resp).map_err(|e| ArrayError {
            code: ErrorCode::Protocol,
            message: format!("malformed response: {e}"),
        })?;
        match (r.ok, r.result, r.error) {
            (true, Some(v), _) => Ok(v),
            (_, _, Some(e)) => Err(e),
            _ => Err(ArrayError {
                code: ErrorCode::Protocol,
                message: "response with neither result nor error".into(),
            }),
        }
    }

    /// Send one operation and decode the result.
    pub fn call_as<T: serde::de::DeserializeOwned>(&mut self, op: Op) -> Result<T, ArrayError> {
        let v = self.call(op)?;
        serde_json::from_value(v).map_err(|e| ArrayError {
            code: ErrorCode::Protocol,
            message: format!("unexpected result: {e}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn array() -> (tempfile::TempDir, Array) {
        let d = tempfile::tempdir().unwrap();
        let a = Array::new(d.path(), 1).unwrap();
        (d, a)
    }

    #[test]
    fn versions_and_malformed_requests_are_answered_with_errors() {
        let (_d, a) = array();
        let r = handle_line(&a, r#"{"v":2,"op":"hello"}"#);
        assert!(!r.ok);
        assert!(r
            .error
            .unwrap()
            .message
            .contains("version 2 requested, this sim-san speaks 1"));
        let r = handle_line(&a, r#"{"v":1,"op":"no_such_op"}"#);
        assert_eq!(r.error.unwrap().code, ErrorCode::Protocol);
        let r = handle_line(&a, r#"{"v":1,"op":"create_lun","name":"l","size":65536}"#);
        assert!(r.ok, "{r:?}");
        let r = handle_line(&a, r#"{"v":1,"op":"map","target":"nope"}"#);
        assert_eq!(r.error.unwrap().code, ErrorCode::NotFound);
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(
            unhex(&hex(&[0, 1, 254, 255])).unwrap(),
            vec![0, 1, 254, 255]
        );
        assert!(unhex("abc").is_none());
    }

    proptest! {
        #[test]
        fn the_request_decoder_never_panics(line in "\\PC{0,200}") {
            let (_d, a) = array();
            let _ = handle_line(&a, &line);
        }
    }
}
