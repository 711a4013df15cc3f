//! Finding and loading plugins.
//!
//! Plugins are files named `libfloe_plugin_<name>.so`, looked up in:
//! `$FLOE_PLUGIN_DIR` (colon-separated), `<exe>/../lib/floe/plugins` (the
//! installed and `cargo xtask dist` layout), and the executable's own
//! directory (the cargo build tree, where `target/<profile>/floe` sits next
//! to the plugins).
//!
//! Each file is checked before it is trusted: its `floe_plugin_abi_version`
//! symbol (read with libloading) must equal [`ABI_VERSION`]; then abi_stable
//! loads the root module without its per-type cache
//! (`lib_header_from_path(..).init_root_module()`), so several plugins of
//! one interface load side by side, and checks its type layout.

use crate::abi::{
    constructor_error, Freezer, Interface, LoadedFreezer, LoadedMapper, LoadedMediaReader,
    LoadedMediaWriter, LoadedValidity, Mapper, MediaReader, MediaWriter, PluginInfo, PluginModRef,
    ValidityIndicator, ABI_VERSION,
};
use crate::error::{Error, ErrorKind, Result};
use abi_stable::std_types::{RErr, ROk};
use std::path::{Path, PathBuf};

/// The file name prefix of plugins.
pub const PREFIX: &str = "libfloe_plugin_";

/// One loaded plugin.
pub struct LoadedPlugin {
    /// Where it was loaded from.
    pub path: PathBuf,
    /// What it says about itself.
    pub info: PluginInfo,
    module: PluginModRef,
    /// The handle the version was read through, kept: abi_stable's load
    /// of the root module then finds the library already mapped.
    _library: libloading::Library,
}

fn cfg_text(config: &serde_json::Value) -> String {
    config.to_string()
}

impl LoadedPlugin {
    /// Load one plugin file.
    pub fn load(path: &Path) -> Result<LoadedPlugin> {
        let load_err = |msg: String| {
            Error::new(ErrorKind::PluginLoad, msg)
                .op("load plugin")
                .path(path)
        };
        let (version, library) = crate::sys::plugin_abi_version(path).map_err(|e| {
            load_err(match e {
                crate::sys::PluginSymbolError::Load(msg) => {
                    format!("cannot load plugin {}: {msg}", path.display())
                }
                crate::sys::PluginSymbolError::NoSymbol => format!(
                    "{} is not a Floe plugin: it has no floe_plugin_abi_version symbol",
                    path.display()
                ),
            })
        })?;
        if version != ABI_VERSION {
            return Err(Error::new(
                ErrorKind::AbiMismatch,
                format!(
                    "plugin {} was built for Floe plugin ABI version {version}, this floe speaks ABI version {ABI_VERSION}: rebuild the plugin against this floe-core",
                    path.display()
                ),
            )
            .op("load plugin")
            .path(path));
        }
        let module = abi_stable::library::lib_header_from_path(path)
            .and_then(|h| h.init_root_module::<PluginModRef>())
            .map_err(|e| {
                Error::new(
                    ErrorKind::AbiMismatch,
                    format!(
                        "plugin {} does not match this floe's plugin ABI: {e}",
                        path.display()
                    ),
                )
                .op("load plugin")
                .path(path)
            })?;
        let module_version = (module.abi_version())();
        if module_version != ABI_VERSION {
            return Err(Error::new(
                ErrorKind::AbiMismatch,
                format!(
                    "plugin {} root module says ABI version {module_version}, this floe speaks {ABI_VERSION}",
                    path.display()
                ),
            )
            .path(path));
        }
        let info: PluginInfo = serde_json::from_str((module.info())().as_str()).map_err(|e| {
            load_err(format!(
                "plugin {} describes itself badly: {e}",
                path.display()
            ))
        })?;
        Ok(LoadedPlugin {
            path: path.to_path_buf(),
            info,
            module,
            _library: library,
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// Does it provide `i`?
    pub fn provides(&self, i: Interface) -> bool {
        self.info.interfaces.contains(&i)
    }

    fn wrap<T, B>(
        &self,
        what: &str,
        r: abi_stable::std_types::RResult<B, abi_stable::std_types::RString>,
        f: impl FnOnce(String, B) -> T,
    ) -> Result<T> {
        match r {
            ROk(b) => Ok(f(self.info.name.clone(), b)),
            RErr(e) => Err(constructor_error(&self.info.name, what, &e)),
        }
    }

    /// A new freezer.
    pub fn freezer(&self, config: &serde_json::Value) -> Result<Box<dyn Freezer>> {
        let r = (self.module.new_freezer())(cfg_text(config).as_str().into());
        self.wrap("new freezer", r, |n, b| {
            Box::new(LoadedFreezer(n, b)) as Box<dyn Freezer>
        })
    }
    /// A new mapper.
    pub fn mapper(&self, config: &serde_json::Value) -> Result<Box<dyn Mapper>> {
        let r = (self.module.new_mapper())(cfg_text(config).as_str().into());
        self.wrap("new mapper", r, |n, b| {
            Box::new(LoadedMapper(n, b)) as Box<dyn Mapper>
        })
    }
    /// A new validity indicator.
    pub fn validity(&self, config: &serde_json::Value) -> Result<Box<dyn ValidityIndicator>> {
        let r = (self.module.new_validity())(cfg_text(config).as_str().into());
        self.wrap("new validity indicator", r, |n, b| {
            Box::new(LoadedValidity(n, b)) as Box<dyn ValidityIndicator>
        })
    }
    /// A new media writer.
    pub fn media_writer(&self, config: &serde_json::Value) -> Result<Box<dyn MediaWriter>> {
        let r = (self.module.new_media_writer())(cfg_text(config).as_str().into());
        self.wrap("new media writer", r, |n, b| {
            Box::new(LoadedMediaWriter(n, b)) as Box<dyn MediaWriter>
        })
    }
    /// A new media reader.
    pub fn media_reader(&self, config: &serde_json::Value) -> Result<Box<dyn MediaReader>> {
        let r = (self.module.new_media_reader())(cfg_text(config).as_str().into());
        self.wrap("new media reader", r, |n, b| {
            Box::new(LoadedMediaReader(n, b)) as Box<dyn MediaReader>
        })
    }
}

/// The plugin files found, each loaded when first needed: a command
/// that reads tar media loads the tar plugin, not every plugin installed
/// (each is a dlopen with its relocations — a tenth of a second for all
/// of them on a cold cache). A plugin is looked for by its file name first
/// (`libfloe_plugin_NAME.so`, `-` written `_`), then by the name each file
/// declares.
#[derive(Default)]
pub struct PluginRegistry {
    files: Vec<PluginFile>,
}

/// A plugin file and, once tried, what loading it gave.
struct PluginFile {
    path: PathBuf,
    loaded: std::sync::OnceLock<Result<LoadedPlugin>>,
}

impl PluginFile {
    fn load(&self) -> &Result<LoadedPlugin> {
        self.loaded.get_or_init(|| LoadedPlugin::load(&self.path))
    }

    /// True when its file name is the one a plugin named `name` has.
    fn named(&self, name: &str) -> bool {
        self.path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| {
                n.strip_prefix(PREFIX)
                    .and_then(|n| n.strip_suffix(".so"))
                    .is_some_and(|n| n == name.replace('-', "_"))
            })
    }
}

impl PluginRegistry {
    /// The default search path (see the module docs).
    pub fn default_dirs() -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        if let Ok(v) = std::env::var("FLOE_PLUGIN_DIR") {
            dirs.extend(v.split(':').filter(|s| !s.is_empty()).map(PathBuf::from));
        }
        if let Some(exe_dir) = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
        {
            dirs.push(exe_dir.join("../lib/floe/plugins"));
            dirs.push(exe_dir.clone());
            // test binaries live in target/<profile>/deps
            if exe_dir.ends_with("deps") {
                if let Some(p) = exe_dir.parent() {
                    dirs.push(p.to_path_buf());
                }
            }
        }
        dirs
    }

    /// The plugin files in `dirs` (none loaded yet). The first plugin of a
    /// name wins; later ones of the same name are skipped. Files that
    /// cannot be loaded are listed by [`PluginRegistry::refused`].
    pub fn load_dirs(dirs: &[PathBuf]) -> PluginRegistry {
        let mut reg = PluginRegistry::default();
        for dir in dirs {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut files: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(PREFIX) && n.ends_with(".so"))
                })
                .collect();
            files.sort();
            reg.files.extend(files.into_iter().map(|path| PluginFile {
                path,
                loaded: std::sync::OnceLock::new(),
            }));
        }
        reg
    }

    /// Every plugin (each file loaded), the first of each name.
    pub fn plugins(&self) -> Vec<&LoadedPlugin> {
        let mut seen: Vec<&LoadedPlugin> = Vec::new();
        for p in self.files.iter().filter_map(|f| f.load().as_ref().ok()) {
            if !seen.iter().any(|q| q.name() == p.name()) {
                seen.push(p);
            }
        }
        seen
    }

    /// How many plugin files were loaded (or tried) so far.
    pub fn loaded(&self) -> usize {
        self.files
            .iter()
            .filter(|f| f.loaded.get().is_some())
            .count()
    }

    /// The files refused (each file loaded), and why.
    pub fn refused(&self) -> Vec<&Error> {
        self.files
            .iter()
            .filter_map(|f| f.load().as_ref().err())
            .collect()
    }

    /// The files refused among those loaded so far (none loaded for
    /// this call), and why: a command that found its plugins elsewhere
    /// says which files on the way it had to pass over (an old build
    /// early in the search path).
    pub fn refused_so_far(&self) -> Vec<&Error> {
        self.files
            .iter()
            .filter_map(|f| f.loaded.get().and_then(|r| r.as_ref().err()))
            .collect()
    }

    /// The plugin named `name`: the file of that name if it declares that
    /// name, else the first file that does.
    pub fn get(&self, name: &str) -> Option<&LoadedPlugin> {
        fn declares<'a>(f: &'a PluginFile, name: &str) -> Option<&'a LoadedPlugin> {
            f.load().as_ref().ok().filter(|p| p.name() == name)
        }
        let declares = |f| declares(f, name);
        self.files
            .iter()
            .filter(|f| f.named(name))
            .find_map(declares)
            .or_else(|| self.files.iter().find_map(declares))
    }

    /// The plugin named `name`, which must provide `i`.
    pub fn require(&self, name: &str, i: Interface) -> Result<&LoadedPlugin> {
        let p = self.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.plugins().iter().map(|p| p.name()).collect();
            let mut msg = format!("no plugin named {name:?} (loaded: {})", known.join(", "));
            for r in self.refused() {
                msg.push_str(&format!("; refused: {r}"));
            }
            Error::new(ErrorKind::PluginLoad, msg)
        })?;
        if !p.provides(i) {
            return Err(Error::new(
                ErrorKind::PluginLoad,
                format!("plugin {name} ({}) provides no {i:?}", p.path.display()),
            ));
        }
        Ok(p)
    }
}
