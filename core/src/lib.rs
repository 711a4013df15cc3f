//! Floe core: the domain model, the plugin ABI, and (feature `engine`) the
//! agent and mover engines, device readers and plugin loader.
//!
//! Plugin authors depend on this crate with `default-features = false`: they
//! get [`model`], [`units`], [`error`] and [`abi`], nothing of the engine.

pub mod abi;
pub mod error;
pub mod fsmeta;
pub mod log;
pub mod map;
pub mod media;
pub mod model;
pub mod pattern;
pub mod pax;
pub mod plan;
pub mod protocol;
pub mod retention;
pub mod tape;
pub mod units;

#[cfg(feature = "engine")]
pub mod agent;
#[cfg(feature = "engine")]
pub mod catalog;
#[cfg(feature = "engine")]
pub mod device;
#[cfg(feature = "engine")]
pub mod loader;
#[cfg(feature = "engine")]
pub mod mover;
#[cfg(feature = "engine")]
pub mod nbd_client;
#[cfg(feature = "engine")]
pub mod restore;
pub mod sys;
#[cfg(feature = "engine")]
pub mod tls;

pub use error::{Error, ErrorKind, Result};
