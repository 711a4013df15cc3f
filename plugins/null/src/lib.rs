//! Floe plugin `null`: a media writer that keeps nothing (`--media null:`),
//! for dry runs and for measuring the read path alone. It has no reader:
//! nothing written to it can be restored, and `floe backup` says so.

use floe_core::abi::{Interface, MediaWriter, Plugin, PluginInfo};
use floe_core::error::Result;
use floe_core::media::NullMediaWriter;

/// The plugin.
pub struct NullPlugin;

impl Plugin for NullPlugin {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "null".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            interfaces: vec![Interface::MediaWriter],
            sequential_media: false,
            path_order: false,
        }
    }
    fn media_writer(config: &serde_json::Value) -> Result<Box<dyn MediaWriter>> {
        // `null:` keeps nothing: it takes no option but a (ignored) path.
        floe_core::abi::known_options(config, "null media", &["dir"])?;
        Ok(Box::new(NullMediaWriter::default()))
    }
}

floe_core::export_plugin!(NullPlugin);
