//! The one error type of floe-core: a stable [`ErrorKind`] to match on, the
//! context an operator needs (item, device, offset, length, path,
//! operation), and the source.
//!
//! Errors cross process and plugin boundaries as [`WireError`] (the kind, the
//! context and the rendered message), and come back as [`Error`] with the
//! same kind and context.

use crate::model::{DeviceId, ItemId};
use crate::units::{Bytes, DeviceOffset};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;

/// What went wrong, stable enough to match on and to put on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// An image map or remap that breaks the map's rules (overlap, gap,
    /// zero length, overflow, length mismatch).
    InvalidMap,
    /// A device id the mover cannot resolve to a device it may read.
    UnknownDevice,
    /// An extent that reaches past the end of its device.
    ExtentOutOfRange,
    /// A device (or source) this side is not allowed to touch.
    Denied,
    /// A device whose own identity differs from the one the map names.
    IdentityMismatch,
    /// The operating system failed a read of a source device (EIO, ...).
    ReadFailed,
    /// The operating system failed a write of a restore target.
    WriteFailed,
    /// The media has no room left (ENOSPC, end of medium).
    MediaFull,
    /// The media cannot be written (read-only, write-protected).
    MediaReadOnly,
    /// Any other media failure.
    Media,
    /// A set, item or object that does not exist.
    NotFound,
    /// A malformed, truncated or unexpected protocol frame.
    Protocol,
    /// A protocol frame larger than the limit.
    FrameTooLarge,
    /// A plugin built against another ABI version.
    AbiMismatch,
    /// A plugin library that could not be loaded.
    PluginLoad,
    /// A plugin that failed an operation.
    Plugin,
    /// The config id kept changing: the map never held still long enough.
    Unstable,
    /// Bytes whose checksum does not match the recorded one.
    ChecksumMismatch,
    /// Bad configuration or arguments.
    Config,
    /// The peer (agent or mover) reported a failure.
    Remote,
    /// Anything else the OS said.
    Io,
    /// The file system, device or source kind is not one this plugin
    /// supports.
    Unsupported,
}

impl ErrorKind {
    /// The snake_case name used on the wire and in messages.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::InvalidMap => "invalid_map",
            ErrorKind::UnknownDevice => "unknown_device",
            ErrorKind::ExtentOutOfRange => "extent_out_of_range",
            ErrorKind::Denied => "denied",
            ErrorKind::IdentityMismatch => "identity_mismatch",
            ErrorKind::ReadFailed => "read_failed",
            ErrorKind::WriteFailed => "write_failed",
            ErrorKind::MediaFull => "media_full",
            ErrorKind::MediaReadOnly => "media_read_only",
            ErrorKind::Media => "media",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Protocol => "protocol",
            ErrorKind::FrameTooLarge => "frame_too_large",
            ErrorKind::AbiMismatch => "abi_mismatch",
            ErrorKind::PluginLoad => "plugin_load",
            ErrorKind::Plugin => "plugin",
            ErrorKind::Unstable => "unstable",
            ErrorKind::ChecksumMismatch => "checksum_mismatch",
            ErrorKind::Config => "config",
            ErrorKind::Remote => "remote",
            ErrorKind::Io => "io",
            ErrorKind::Unsupported => "unsupported",
        }
    }
}

/// Where an error happened.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Context {
    /// The operation (`read`, `write`, `freeze`, `remap`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<String>,
    /// The agent (application host) involved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The item being worked on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<ItemId>,
    /// The device being read or written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceId>,
    /// The byte offset on the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<DeviceOffset>,
    /// The length of the operation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<Bytes>,
    /// A file system path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(op) = &self.op {
            parts.push(format!("op {op}"));
        }
        if let Some(agent) = &self.agent {
            parts.push(format!("agent {agent}"));
        }
        if let Some(item) = &self.item {
            parts.push(format!("item {item}"));
        }
        if let Some(device) = &self.device {
            parts.push(format!("device {device}"));
        }
        if let Some(offset) = self.offset {
            parts.push(format!("offset {offset}"));
        }
        if let Some(length) = self.length {
            parts.push(format!("length {length}"));
        }
        if let Some(path) = &self.path {
            parts.push(format!("path {}", path.display()));
        }
        f.write_str(&parts.join(", "))
    }
}

/// The error type of floe-core (boxed: errors are rare, results are hot).
#[derive(Debug)]
pub struct Error(Box<Inner>);

#[derive(Debug)]
struct Inner {
    kind: ErrorKind,
    message: String,
    context: Context,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// Result with floe-core's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` saying `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error(Box::new(Inner {
            kind,
            message: message.into(),
            context: Context::default(),
            source: None,
        }))
    }

    /// The OS error `source` of an I/O operation, classified by errno.
    pub fn io(op: &str, source: std::io::Error) -> Self {
        let kind = match source.raw_os_error() {
            Some(28) => ErrorKind::MediaFull,                // ENOSPC
            Some(30) | Some(13) => ErrorKind::MediaReadOnly, // EROFS, EACCES
            _ => ErrorKind::Io,
        };
        Error::new(kind, format!("{op} failed"))
            .op(op)
            .source(source)
    }

    /// The stable kind.
    pub fn kind(&self) -> ErrorKind {
        self.0.kind
    }

    /// The context.
    pub fn context(&self) -> &Context {
        &self.0.context
    }

    /// The message, without context or source.
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// Change the kind (e.g. an I/O error on a source device is `ReadFailed`).
    pub fn with_kind(mut self, kind: ErrorKind) -> Self {
        self.0.kind = kind;
        self
    }

    /// Set the operation.
    pub fn op(mut self, op: impl Into<String>) -> Self {
        self.0.context.op = Some(op.into());
        self
    }

    /// Set the item, unless one is already set.
    pub fn item(mut self, item: &ItemId) -> Self {
        self.0.context.item.get_or_insert_with(|| item.clone());
        self
    }

    /// Set the agent, unless one is already set.
    pub fn agent(mut self, agent: &str) -> Self {
        self.0
            .context
            .agent
            .get_or_insert_with(|| agent.to_string());
        self
    }

    /// Set the device.
    pub fn device(mut self, device: &DeviceId) -> Self {
        self.0.context.device = Some(device.clone());
        self
    }

    /// Set the device offset and length.
    pub fn range(mut self, offset: DeviceOffset, length: Bytes) -> Self {
        self.0.context.offset = Some(offset);
        self.0.context.length = Some(length);
        self
    }

    /// Set the path.
    pub fn path(mut self, path: impl Into<PathBuf>) -> Self {
        self.0.context.path = Some(path.into());
        self
    }

    /// Set the source.
    pub fn source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.0.source = Some(Box::new(source));
        self
    }

    /// The error as it crosses a process or plugin boundary.
    pub fn to_wire(&self) -> WireError {
        let mut message = self.0.message.clone();
        if let Some(source) = &self.0.source {
            message = format!("{message}: {source}");
        }
        WireError {
            kind: self.0.kind,
            message,
            context: self.0.context.clone(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} [{}]", self.0.message, self.0.kind.name())?;
        let ctx = self.0.context.to_string();
        if !ctx.is_empty() {
            write!(f, " ({ctx})")?;
        }
        if let Some(source) = &self.0.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0
            .source
            .as_ref()
            .map(|s| s.as_ref() as &(dyn std::error::Error + 'static))
    }
}

/// An error as it travels between processes and across the plugin ABI.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    /// The stable kind.
    pub kind: ErrorKind,
    /// The message, with its sources rendered.
    pub message: String,
    /// Where it happened.
    #[serde(default)]
    pub context: Context,
}

impl From<WireError> for Error {
    fn from(w: WireError) -> Self {
        Error(Box::new(Inner {
            kind: w.kind,
            message: w.message,
            context: w.context,
            source: None,
        }))
    }
}
