//! The agent engine (application host): freeze → map → serve the map,
//! answer config-id checks and remaps → release. Independent of transport:
//! it serves the protocol of [`crate::protocol`] on any byte stream.
//! Also the mover's side of the conversation, [`AgentClient`].

use crate::abi::{Freezer, Interface, Mapper, PartFromPlugin, ValidityIndicator};
use crate::error::{Error, ErrorKind, Result};
use crate::loader::PluginRegistry;
use crate::map::validate_item;
use crate::model::{ConfigId, FrozenImage, ImageId, ImageMap, ItemId, ItemRecord, MapPart, Remap};
use crate::protocol::{
    encode_frozen_json, encode_map_part_json, encode_message, read_message, write_frame,
    write_message, Request, Response, DEFAULT_MAX_FRAME, VERSION,
};
use crate::units::Bytes;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;

/// What the agent is configured with.
#[derive(Clone, Debug, Default)]
pub struct AgentOptions {
    /// Per-plugin JSON config, by plugin name.
    pub plugin_config: HashMap<String, serde_json::Value>,
    /// The name this agent reports.
    pub host: String,
    /// Largest frame accepted.
    pub max_frame: Option<u32>,
    /// How long a frozen image outlives the mover that froze it, when that
    /// mover vanishes without releasing it (so a restarted mover can
    /// `attach` and resume). Zero releases at once.
    pub image_lease: std::time::Duration,
    /// Sources this agent may freeze and map, as patterns (`*` matches any
    /// run of characters, `?` one): `array:vol*`. Nothing else is served.
    pub allow_sources: Vec<String>,
    /// Directories a mover may restore files under, through this agent
    /// (`--allow-restore`). Empty: no restore through this agent.
    pub allow_restore: Vec<String>,
}

pub use crate::pattern::glob_match;

type Shared<T> = Arc<std::sync::Mutex<T>>;

fn lock<T: ?Sized>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Frozen {
    image: FrozenImage,
    freezer: Shared<Box<dyn Freezer>>,
    mapper: Shared<Box<dyn Mapper>>,
    validity: Box<dyn ValidityIndicator>,
    /// The rest of a map handed out in parts, while it is being made.
    parts: Option<MapParts>,
    /// Writes may still be held since before the map (a FIFREEZE
    /// freezer), or none reached a mapped extent since: each config check
    /// asks the freezer ([`Freezer::writes_held`]), then the mapper
    /// ([`Mapper::untouched`]), and while one says so, everything read so
    /// far is as mapped and the check is answered without a look. False
    /// for good once both say no.
    held: Arc<std::sync::atomic::AtomicBool>,
    /// The mapper said, with the whole map made, that it cannot tell
    /// which items a write reached ([`Mapper::touched`]): not asked again.
    untold: std::sync::atomic::AtomicBool,
}

/// A mapping thread: it maps part after part at its own pace (the image
/// may be frozen meanwhile: it never waits for the mover), lets the
/// freezer's writes go after the last, then hands that last part out.
struct MapParts {
    /// Each part, as its mapper gave it.
    rx: std::sync::mpsc::Receiver<Result<PartFromPlugin>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MapParts {
    fn start(
        image: FrozenImage,
        freezer: Shared<Box<dyn Freezer>>,
        mapper: Shared<Box<dyn Mapper>>,
        held: Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<MapParts> {
        use std::sync::atomic::Ordering;
        // Unbounded: a slow mover never holds the freeze longer.
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let halt = stop.clone();
        let thread = std::thread::Builder::new()
            .name("floe-map".into())
            .spawn(move || {
                // The freezer lets writes go under its lock; a check in
                // the meantime waits for the lock (`still_held` asks the
                // freezer, then the mapper, under it), so none trusts the
                // freeze once it may have ended — and none is answered
                // "not held" while the thaw is under way only to be
                // vouched for by the mapper right after (a mover told no
                // once checks every file from then on).
                let settle = || -> Result<()> {
                    let mut f = lock(&freezer);
                    let settled = f.mapped(&image);
                    crate::media::pausepoint("settle");
                    let vouched = settled.is_ok()
                        && (f.writes_held(&image).unwrap_or(false)
                            || lock(&mapper).untouched(&image).unwrap_or(false));
                    held.store(vouched, Ordering::SeqCst);
                    settled
                };
                loop {
                    if halt.load(Ordering::Relaxed) {
                        // Released mid-map: let the writes go, nothing more.
                        let _ = settle();
                        return;
                    }
                    // A part from a plugin goes on as the JSON it wrote:
                    // the mover decodes it and checks every item before
                    // it uses one (a bad file item fails that item).
                    let part = lock(&mapper)
                        .map_part_raw(&image)
                        .map_err(|e| e.op("map"))
                        .and_then(|p| {
                            if let PartFromPlugin::Part(m) = &p {
                                m.map.items.iter().try_for_each(validate_item)?;
                            }
                            Ok(p)
                        });
                    let last = part.as_ref().map_or(true, |p| !p.more());
                    if last {
                        // Writes held for the map go before the last part
                        // is handed out, mapped or not.
                        let settled = settle().map_err(|e| e.op("thaw"));
                        let _ = tx.send(settled.and(part));
                        return;
                    }
                    if tx.send(part).is_err() {
                        let _ = settle();
                        return;
                    }
                }
            })
            .map_err(|e| Error::new(ErrorKind::Io, "start the mapping thread").source(e))?;
        Ok(MapParts {
            rx,
            stop,
            thread: Some(thread),
        })
    }

    /// The next part (blocking until it is mapped).
    fn next(&mut self) -> Result<PartFromPlugin> {
        let r = self.rx.recv().unwrap_or_else(|_| {
            Err(Error::new(
                ErrorKind::Plugin,
                "the mapping thread ended without its last part",
            ))
        });
        if r.as_ref().map_or(true, |p| !p.more()) {
            self.join();
        }
        r
    }

    fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for MapParts {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.join();
    }
}

/// What the agent answers a request with: a message, or a frame already
/// encoded (a part of a map, as its plugin wrote it).
enum Answer {
    Message(Box<Response>),
    Frame(Vec<u8>),
}

impl Frozen {
    /// Are writes still held since before the map? (Then anything read so
    /// far is as mapped.) Asked after the reads a check is about: the
    /// freezer's answer now covers them.
    fn still_held(&self) -> bool {
        use std::sync::atomic::Ordering;
        if !self.held.load(Ordering::SeqCst) {
            return false;
        }
        let mut freezer = lock(&self.freezer);
        // Settled to no while this waited for the lock.
        if !self.held.load(Ordering::SeqCst) {
            return false;
        }
        if freezer.writes_held(&self.image).unwrap_or(false)
            || lock(&self.mapper).untouched(&self.image).unwrap_or(false)
        {
            return true;
        }
        self.held.store(false, Ordering::SeqCst);
        false
    }

    /// Which of `ids` a check must look at: each one, unless the mapper
    /// vouches that no write reached an item's mapped extents
    /// ([`Mapper::untouched`] said no, [`Mapper::touched`] says which).
    /// A mapper busy mapping is not waited for: then every item is looked
    /// at.
    fn to_look(&self, ids: &[ItemId]) -> Vec<bool> {
        use std::sync::atomic::Ordering;
        if self.untold.load(Ordering::Relaxed) {
            return vec![true; ids.len()];
        }
        let touched = match self.mapper.try_lock() {
            Ok(mut m) => m.touched(&self.image, ids).ok().flatten(),
            Err(std::sync::TryLockError::Poisoned(p)) => {
                p.into_inner().touched(&self.image, ids).ok().flatten()
            }
            Err(std::sync::TryLockError::WouldBlock) => return vec![true; ids.len()],
        };
        if touched.is_none() && self.parts.is_none() {
            // No watch, or one that may have missed a write: for good.
            self.untold.store(true, Ordering::Relaxed);
        }
        touched
            .filter(|t| t.len() == ids.len())
            .unwrap_or_else(|| vec![true; ids.len()])
    }

    /// Stop mapping (if parts are still being made) and let the image go.
    fn release(&mut self) -> Result<()> {
        self.parts = None;
        lock(&self.freezer).release(&self.image)
    }
}

/// The agent.
pub struct Agent {
    plugins: Arc<PluginRegistry>,
    opts: AgentOptions,
    /// Images whose mover vanished, and since when.
    orphans: std::sync::Mutex<HashMap<ImageId, (Frozen, std::time::Instant)>>,
    /// Threads serving connections.
    workers: ConnectionThreads,
}

fn frozen<'a>(images: &'a mut HashMap<ImageId, Frozen>, id: &ImageId) -> Result<&'a mut Frozen> {
    images.get_mut(id).ok_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            format!("no frozen image {id} on this agent"),
        )
    })
}

/// The plugin a source names: `array:vol0` → `array`.
pub fn source_plugin(source: &str) -> Result<(&str, &str)> {
    source
        .split_once(':')
        .filter(|(p, r)| !p.is_empty() && !r.is_empty())
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                format!("source {source:?} is not PLUGIN:NAME (e.g. array:vol0)"),
            )
        })
}

impl Agent {
    /// An agent using these plugins.
    pub fn new(plugins: Arc<PluginRegistry>, opts: AgentOptions) -> Agent {
        Agent {
            plugins,
            opts,
            orphans: std::sync::Mutex::new(HashMap::new()),
            workers: ConnectionThreads::default(),
        }
    }

    fn orphans(&self) -> std::sync::MutexGuard<'_, HashMap<ImageId, (Frozen, std::time::Instant)>> {
        self.orphans.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Release orphaned images whose lease ran out.
    pub fn reap(&self) {
        let expired: Vec<Frozen> = {
            let mut o = self.orphans();
            let ids: Vec<ImageId> = o
                .iter()
                .filter(|(_, (_, since))| since.elapsed() >= self.opts.image_lease)
                .map(|(id, _)| id.clone())
                .collect();
            ids.into_iter()
                .filter_map(|id| o.remove(&id).map(|(f, _)| f))
                .collect()
        };
        for mut f in expired {
            if let Err(e) = f.release() {
                crate::log_line!(
                    "floe agent: cannot release orphaned image {}: {e}",
                    f.image.id
                );
            }
        }
    }

    fn start_reaper(self: &Arc<Self>) {
        if self.opts.image_lease.is_zero() {
            return;
        }
        let me = Arc::downgrade(self);
        std::thread::spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_millis(500));
            match me.upgrade() {
                Some(a) => a.reap(),
                None => return,
            }
        });
    }

    fn config(&self, plugin: &str) -> serde_json::Value {
        self.opts
            .plugin_config
            .get(plugin)
            .cloned()
            .unwrap_or_else(|| serde_json::json!({}))
    }

    /// Check the sources, freeze them, and take the mapper and validity
    /// indicator for what was frozen (on error, the image is let go).
    #[allow(clippy::type_complexity)]
    fn freeze_only(
        &self,
        sources: &[String],
    ) -> Result<(
        FrozenImage,
        Box<dyn Freezer>,
        Box<dyn Mapper>,
        Box<dyn ValidityIndicator>,
    )> {
        let first = sources
            .first()
            .ok_or_else(|| Error::new(ErrorKind::Config, "nothing to back up: no sources"))?;
        let (plugin, _) = source_plugin(first)?;
        for s in sources {
            if !self.opts.allow_sources.iter().any(|p| glob_match(p, s)) {
                return Err(Error::new(
                    ErrorKind::Denied,
                    format!(
                        "source {s} is not under this agent's allowed sources ({})",
                        self.opts.allow_sources.join(", ")
                    ),
                )
                .op("freeze")
                .agent(&self.opts.host));
            }
            if source_plugin(s)?.0 != plugin {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("sources of one set must use one plugin: {first} and {s} differ"),
                ));
            }
        }
        let mut freezer = self
            .plugins
            .require(plugin, Interface::Freezer)?
            .freezer(&self.config(plugin))?;
        let image = freezer.freeze(sources).map_err(|e| e.op("freeze"))?;
        // The freezer names the mapper for what it froze (fsflush on ext4 →
        // fiemap); by default it maps its own images.
        let plugins = (|| {
            let name = image.mapper.as_deref().unwrap_or(plugin);
            let cfg = self.config(name);
            let mapper = self
                .plugins
                .require(name, Interface::Mapper)?
                .mapper(&cfg)?;
            let validity = self
                .plugins
                .require(name, Interface::Validity)?
                .validity(&cfg)?;
            Ok((mapper, validity))
        })();
        match plugins {
            Ok((mapper, validity)) => Ok((image, freezer, mapper, validity)),
            Err(e) => {
                let _ = freezer.mapped(&image);
                let _ = freezer.release(&image);
                Err(e)
            }
        }
    }

    /// Freeze and map the whole image before answering.
    fn freeze(&self, sources: &[String]) -> Result<(Frozen, ImageMap)> {
        let (image, mut freezer, mut mapper, validity) = self.freeze_only(sources)?;
        let mapping = mapper.map(&image).map_err(|e| e.op("map"));
        // Writes held for the map (FIFREEZE) are let go now, mapped or
        // not (unless the freezer holds them until release).
        let settled = freezer.mapped(&image).map_err(|e| e.op("thaw"));
        let held = settled.is_ok()
            && (freezer.writes_held(&image).unwrap_or(false)
                || mapper.untouched(&image).unwrap_or(false));
        let map = match (mapping, settled) {
            (Ok(m), Ok(())) => m,
            (Err(e), _) | (Ok(_), Err(e)) => {
                let _ = freezer.release(&image);
                return Err(e);
            }
        };
        for item in &map.items {
            if let Err(e) = validate_item(item) {
                let _ = freezer.release(&image);
                return Err(e);
            }
        }
        Ok((
            Frozen {
                image,
                freezer: Arc::new(std::sync::Mutex::new(freezer)),
                mapper: Arc::new(std::sync::Mutex::new(mapper)),
                validity,
                parts: None,
                held: Arc::new(std::sync::atomic::AtomicBool::new(held)),
                untold: Default::default(),
            },
            map,
        ))
    }

    /// Freeze, and answer with the first part of the map while a thread
    /// maps the rest (`MapMore` hands it out).
    fn freeze_in_parts(&self, sources: &[String]) -> Result<(Frozen, PartFromPlugin)> {
        let (image, freezer, mapper, validity) = self.freeze_only(sources)?;
        let freezer = Arc::new(std::sync::Mutex::new(freezer));
        let mapper = Arc::new(std::sync::Mutex::new(mapper));
        let held = Arc::new(std::sync::atomic::AtomicBool::new(image.writes_held));
        let parts =
            match MapParts::start(image.clone(), freezer.clone(), mapper.clone(), held.clone()) {
                Ok(p) => p,
                Err(e) => {
                    let mut f = lock(&freezer);
                    let _ = f.mapped(&image);
                    let _ = f.release(&image);
                    return Err(e);
                }
            };
        let mut frozen = Frozen {
            image,
            freezer,
            mapper,
            validity,
            parts: Some(parts),
            held,
            untold: Default::default(),
        };
        // The first part goes in the `frozen` answer.
        let first = frozen.parts.as_mut().expect("started above").next();
        match first {
            Ok(part) => {
                if !part.more() {
                    frozen.parts = None;
                }
                Ok((frozen, part))
            }
            Err(e) => {
                let _ = frozen.release();
                Err(e)
            }
        }
    }

    fn answer(
        &self,
        images: &mut HashMap<ImageId, Frozen>,
        restore: &mut Option<crate::restore::RestoreSession>,
        req: Request,
    ) -> Result<Answer> {
        let session = |r: &mut Option<crate::restore::RestoreSession>| {
            r.take()
                .ok_or_else(|| Error::new(ErrorKind::Protocol, "no restore begun"))
        };
        Ok(Answer::Message(Box::new(match req {
            Request::RestoreBegin {
                dest,
                no_owners,
                sync_every,
            } => {
                let s = crate::restore::RestoreSession::begin(
                    &dest,
                    &self.opts.allow_restore,
                    no_owners,
                    sync_every.map_or(crate::restore::DEFAULT_SYNC_EVERY, Bytes),
                )
                .map_err(|e| e.agent(&self.opts.host))?;
                let dest = s.root().display().to_string();
                *restore = Some(s);
                Response::RestoreBegun { dest }
            }
            Request::RestoreItem { dest, record } => {
                let mut s = session(restore)?;
                let r = s.item(&dest, *record);
                *restore = Some(s);
                Response::RestoreWritten { bytes: r? }
            }
            Request::RestoreData { data } => {
                let bytes = crate::protocol::b64_decode(&data)
                    .ok_or_else(|| Error::new(ErrorKind::Protocol, "restore data is not base64"))?;
                let mut s = session(restore)?;
                let r = s.data(&bytes);
                *restore = Some(s);
                Response::RestoreWritten { bytes: r? }
            }
            Request::RestoreItemEnd => {
                let mut s = session(restore)?;
                let r = s.end_item();
                *restore = Some(s);
                Response::RestoreWritten { bytes: r? }
            }
            Request::RestoreFinish => {
                let r = session(restore)?.finish()?;
                Response::RestoreFinished {
                    items: r.items as u64,
                    bytes: r.bytes,
                    failures: r.failures,
                }
            }
            Request::Hello { protocol, .. } => {
                if protocol != VERSION {
                    return Err(Error::new(
                        ErrorKind::Protocol,
                        format!("mover speaks protocol {protocol}, agent speaks {VERSION}"),
                    ));
                }
                Response::Hello {
                    protocol: VERSION,
                    host: self.opts.host.clone(),
                }
            }
            Request::Freeze {
                sources,
                parts: false,
            } => {
                let (frozen, map) = self.freeze(&sources)?;
                let image = frozen.image.clone();
                images.insert(image.id.clone(), frozen);
                Response::Frozen {
                    image,
                    map,
                    more: false,
                }
            }
            Request::Freeze {
                sources,
                parts: true,
            } => {
                let (frozen, part) = self.freeze_in_parts(&sources)?;
                let image = frozen.image.clone();
                images.insert(image.id.clone(), frozen);
                // The first part as the plugin wrote it, like the others.
                let part = match part {
                    PartFromPlugin::Json { json, more } => {
                        match encode_frozen_json(&image, &json) {
                            Some(frame) => return frame.map(Answer::Frame),
                            None => PartFromPlugin::Json { json, more }.decode()?,
                        }
                    }
                    PartFromPlugin::Part(p) => p,
                };
                Response::Frozen {
                    image,
                    map: part.map,
                    more: part.more,
                }
            }
            Request::MapMore { image } => {
                let f = frozen(images, &image)?;
                let parts = f.parts.as_mut().ok_or_else(|| {
                    Error::new(
                        ErrorKind::Protocol,
                        format!("image {image} has no more of its map to hand out"),
                    )
                })?;
                let part = parts.next();
                if part.as_ref().map_or(true, |p| !p.more()) {
                    f.parts = None;
                }
                // Handed on as the plugin wrote it, neither decoded nor
                // encoded again.
                let part = match part? {
                    PartFromPlugin::Json { json, more } => match encode_map_part_json(&json) {
                        Some(frame) => return frame.map(Answer::Frame),
                        None => PartFromPlugin::Json { json, more }.decode()?,
                    },
                    PartFromPlugin::Part(p) => p,
                };
                Response::MapPart(part)
            }
            Request::Attach { image } => {
                self.reap();
                let (frozen, _) = self.orphans().remove(&image).ok_or_else(|| {
                    Error::new(
                        ErrorKind::NotFound,
                        format!("frozen image {image} is not waiting on this agent (released, or its lease ran out)"),
                    )
                    .agent(&self.opts.host)
                })?;
                let mapped = lock(&frozen.mapper).map(&frozen.image);
                let map = match mapped {
                    Ok(m) => m,
                    Err(e) => {
                        self.orphans()
                            .insert(image, (frozen, std::time::Instant::now()));
                        return Err(e.op("map"));
                    }
                };
                let resp = Response::Frozen {
                    image: frozen.image.clone(),
                    map,
                    more: false,
                };
                images.insert(image, frozen);
                resp
            }
            Request::CheckConfig {
                image,
                item,
                config,
            } => {
                let f = frozen(images, &image)?;
                let current = if f.still_held() || !f.to_look(std::slice::from_ref(&item))[0] {
                    config.clone()
                } else {
                    f.validity
                        .config_id(&f.image, &item)
                        .map_err(|e| e.item(&item))?
                };
                let valid = current == config;
                Response::Config { current, valid }
            }
            Request::Held { image } => {
                let f = frozen(images, &image)?;
                Response::Held {
                    held: f.still_held(),
                }
            }
            Request::CheckConfigs { image, items } => {
                let f = frozen(images, &image)?;
                if f.still_held() {
                    return Ok(Answer::Message(Box::new(Response::Configs {
                        current: items.into_iter().map(|(_, c)| c).collect(),
                    })));
                }
                let ids: Vec<ItemId> = items.iter().map(|(i, _)| i.clone()).collect();
                // Items no write reached are answered as asked.
                let look = f.to_look(&ids);
                let ids: Vec<ItemId> = ids
                    .into_iter()
                    .zip(&look)
                    .filter_map(|(i, l)| l.then_some(i))
                    .collect();
                let looked = if ids.is_empty() {
                    Vec::new()
                } else {
                    f.validity.config_ids(&f.image, &ids)?
                };
                if looked.len() != ids.len() {
                    return Err(Error::new(
                        ErrorKind::Plugin,
                        format!(
                            "the validity plugin answered {} config ids for {} items",
                            looked.len(),
                            ids.len()
                        ),
                    ));
                }
                let mut looked = looked.into_iter();
                let current = items
                    .into_iter()
                    .zip(look)
                    .map(|((_, asked), l)| {
                        if l {
                            looked.next().unwrap_or(asked)
                        } else {
                            asked
                        }
                    })
                    .collect();
                Response::Configs { current }
            }
            Request::Remap { image, item, since } => {
                let f = frozen(images, &image)?;
                let remap = lock(&f.mapper)
                    .remap(&f.image, &item, &since)
                    .map_err(|e| e.item(&item).op("remap"))?;
                Response::Remapped { remap }
            }
            Request::Release { image } => {
                frozen(images, &image)?;
                let mut f = images.remove(&image).expect("checked above");
                f.release().map_err(|e| e.op("release"))?;
                Response::Released
            }
        })))
    }

    /// Serve one mover on a byte stream until it hangs up; frozen images it
    /// did not release are released then, or kept for the image lease.
    pub fn serve(&self, r: impl Read, w: impl Write) -> Result<()> {
        self.serve_with_lease(r, w, !self.opts.image_lease.is_zero())
    }

    /// Serve one mover; `lease` says whether images it leaves behind wait
    /// for the lease (a daemon) or are released at once (`--stdio`, where
    /// the agent ends with the stream).
    pub fn serve_with_lease(&self, mut r: impl Read, mut w: impl Write, lease: bool) -> Result<()> {
        let mut images: HashMap<ImageId, Frozen> = HashMap::new();
        let mut restore = None;
        let max = self.opts.max_frame.unwrap_or(DEFAULT_MAX_FRAME);
        let result = loop {
            let req: Request = match read_message(&mut r, max) {
                Ok(Some(req)) => req,
                Ok(None) => break Ok(()),
                Err(e) => {
                    let _ = write_message(&mut w, &Response::Error { error: e.to_wire() });
                    break Err(e);
                }
            };
            let written = match self.answer(&mut images, &mut restore, req) {
                Ok(Answer::Message(r)) => write_message(&mut w, &*r),
                Ok(Answer::Frame(frame)) => write_frame(&mut w, &frame),
                Err(e) => write_message(&mut w, &Response::Error { error: e.to_wire() }),
            };
            if let Err(e) = written {
                break Err(e);
            }
        };
        for (id, mut f) in images.drain() {
            // A map still being made stops (and lets held writes go): an
            // attaching mover maps the image again.
            f.parts = None;
            if lease {
                self.orphans().insert(id, (f, std::time::Instant::now()));
            } else {
                let _ = f.release();
            }
        }
        result
    }

    /// Accept movers on a TCP listener, one thread each, forever.
    pub fn listen(self: Arc<Self>, listener: TcpListener) -> Result<()> {
        self.start_reaper();
        for conn in listener.incoming() {
            let conn = conn.map_err(|e| Error::io("accept", e))?;
            let _ = conn.set_nodelay(true);
            let me = self.clone();
            let served = self.workers.run(Box::new(move || {
                let Ok(r) = conn.try_clone() else { return };
                if let Err(e) = me.serve(r, &conn) {
                    crate::log_line!("floe agent: connection ended: {e}");
                }
            }));
            if let Err(e) = served {
                crate::log_line!("floe agent: a connection was dropped: {e}");
            }
        }
        Ok(())
    }
}

/// A connection's work.
type Job = Box<dyn FnOnce() + Send>;

/// Threads that serve connections and then wait for the next one instead
/// of ending: a thread that ends hands its allocator's pages to the
/// others, and collecting them cost the agent 6 % of a 70,000-file
/// backup's CPU, once per connection. As many threads as connections at
/// once; at most [`ConnectionThreads::IDLE`] wait.
#[derive(Default)]
struct ConnectionThreads {
    idle: Arc<std::sync::Mutex<Vec<std::sync::mpsc::Sender<Job>>>>,
}

impl ConnectionThreads {
    /// Threads kept waiting for a connection.
    const IDLE: usize = 8;

    /// Run `job` on a waiting thread, or on a new one.
    fn run(&self, job: Job) -> Result<()> {
        let mut job = job;
        loop {
            let Some(worker) = lock(&self.idle).pop() else {
                break;
            };
            match worker.send(job) {
                Ok(()) => return Ok(()),
                Err(std::sync::mpsc::SendError(j)) => job = j, // it ended
            }
        }
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let idle = self.idle.clone();
        std::thread::Builder::new()
            .name("floe-conn".into())
            .spawn(move || {
                let mut next = Some(job);
                while let Some(job) = next.take() {
                    // A panic ends this connection, not the thread's use.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    let mut waiting = lock(&idle);
                    if waiting.len() >= Self::IDLE {
                        return;
                    }
                    waiting.push(tx.clone());
                    drop(waiting);
                    next = rx.recv().ok();
                }
            })
            .map_err(|e| Error::new(ErrorKind::Io, "start a connection thread").source(e))?;
        Ok(())
    }
}

impl Agent {
    /// Accept movers over mutual TLS, one thread each, forever. A mover
    /// whose certificate is not trusted never gets a frame through.
    pub fn listen_tls(
        self: Arc<Self>,
        listener: TcpListener,
        cfg: Arc<rustls::ServerConfig>,
    ) -> Result<()> {
        for conn in listener.incoming() {
            let conn = conn.map_err(|e| Error::io("accept", e))?;
            let _ = conn.set_nodelay(true);
            let (me, cfg) = (self.clone(), cfg.clone());
            let served = self.workers.run(Box::new(move || {
                let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                match crate::tls::accept(cfg, conn) {
                    Ok(s) => {
                        let (r, w) = crate::tls::split(s);
                        if let Err(e) = me.serve(r, w) {
                            crate::log_line!("floe agent: connection from {peer} ended: {e}");
                        }
                    }
                    Err(e) => crate::log_line!("floe agent: refused {peer}: {e}"),
                }
            }));
            if let Err(e) = served {
                crate::log_line!("floe agent: a connection was dropped: {e}");
            }
        }
        Ok(())
    }
}

/// A reader that counts what passes.
struct Counted<R> {
    inner: R,
    n: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n += k as u64;
        Ok(k)
    }
}

/// The mover's side: a connection to an agent.
pub struct AgentClient {
    r: Counted<Box<dyn Read + Send>>,
    w: Box<dyn Write + Send>,
    /// The agent's host name.
    pub host: String,
    max: u32,
    /// Requests sent ahead whose answers are not read yet, oldest first
    /// (the agent answers in order).
    ahead: std::collections::VecDeque<u64>,
    /// Answers read while waiting for a later one, by request.
    answers: HashMap<u64, Response>,
    next: u64,
}

/// Requests go ahead of their answers only as frames this small: a frame
/// that fits the socket's buffers is never stuck behind an answer the
/// agent is writing while this side writes too.
pub const AHEAD_MAX: usize = 48 * 1024;

impl AgentClient {
    /// Say hello over a byte stream.
    pub fn new(r: Box<dyn Read + Send>, w: Box<dyn Write + Send>) -> Result<AgentClient> {
        let mut c = AgentClient {
            r: Counted { inner: r, n: 0 },
            w,
            host: String::new(),
            max: DEFAULT_MAX_FRAME,
            ahead: Default::default(),
            answers: HashMap::new(),
            next: 0,
        };
        match c.call(Request::Hello {
            protocol: VERSION,
            peer: "floe-mover".into(),
        })? {
            Response::Hello { host, .. } => c.host = host,
            other => return Err(unexpected(&other)),
        }
        Ok(c)
    }

    /// Connect over TCP (`host:port`).
    pub fn connect_tcp(addr: &str) -> Result<AgentClient> {
        let s = std::net::TcpStream::connect(addr).map_err(|e| {
            Error::new(ErrorKind::Remote, format!("cannot reach agent at {addr}")).source(e)
        })?;
        let _ = s.set_nodelay(true);
        let r = s.try_clone().map_err(|e| Error::io("clone socket", e))?;
        AgentClient::new(Box::new(r), Box::new(s))
    }

    /// Connect over mutual TLS (`host:port`).
    pub fn connect_tls(addr: &str, cfg: Arc<rustls::ClientConfig>) -> Result<AgentClient> {
        let s = crate::tls::connect(cfg, addr)?;
        let (r, w) = crate::tls::split(s);
        AgentClient::new(Box::new(r), Box::new(w))
    }

    /// Bytes received from the agent so far (frames as on the wire).
    pub fn bytes_received(&self) -> u64 {
        self.r.n
    }

    fn call(&mut self, req: Request) -> Result<Response> {
        write_message(&mut self.w, &req)?;
        // Answers to requests sent ahead come first.
        while let Some(t) = self.ahead.pop_front() {
            let r = self.read_answer()?;
            self.answers.insert(t, r);
        }
        Self::answered(self.read_answer()?)
    }

    fn read_answer(&mut self) -> Result<Response> {
        read_message::<Response>(&mut self.r, self.max)?
            .ok_or_else(|| Error::new(ErrorKind::Remote, "the agent hung up"))
    }

    fn answered(r: Response) -> Result<Response> {
        match r {
            Response::Error { error } => Err(Error::from(error)),
            r => Ok(r),
        }
    }

    /// Send `req` now, to read its answer later ([`AgentClient::answer`]):
    /// the agent works on it while this side does something else. `None`
    /// (nothing sent) when its frame is larger than [`AHEAD_MAX`].
    pub fn ask_ahead(&mut self, req: &Request) -> Result<Option<u64>> {
        let frame = encode_message(req)?;
        if frame.len() > AHEAD_MAX {
            return Ok(None);
        }
        write_frame(&mut self.w, &frame)?;
        let t = self.next;
        self.next += 1;
        self.ahead.push_back(t);
        Ok(Some(t))
    }

    /// The answer to a request sent ahead.
    pub fn answer(&mut self, token: u64) -> Result<Response> {
        loop {
            if let Some(r) = self.answers.remove(&token) {
                return Self::answered(r);
            }
            let Some(t) = self.ahead.pop_front() else {
                return Err(Error::new(
                    ErrorKind::Protocol,
                    format!("no answer is due for request {token}"),
                ));
            };
            let r = self.read_answer()?;
            self.answers.insert(t, r);
        }
    }

    /// [`AgentClient::check_many`], sent ahead (`None`: too large to).
    pub fn check_many_ahead(
        &mut self,
        image: &ImageId,
        items: Vec<(ItemId, ConfigId)>,
    ) -> Result<Option<u64>> {
        self.ask_ahead(&Request::CheckConfigs {
            image: image.clone(),
            items,
        })
    }

    /// Ask ahead whether the freezer still holds every write since the
    /// map ([`AgentClient::held_answer`] reads the answer).
    pub fn held_ahead(&mut self, image: &ImageId) -> Result<Option<u64>> {
        self.ask_ahead(&Request::Held {
            image: image.clone(),
        })
    }

    /// The answer to [`AgentClient::held_ahead`].
    pub fn held_answer(&mut self, token: u64) -> Result<bool> {
        match self.answer(token)? {
            Response::Held { held } => Ok(held),
            other => Err(unexpected(&other)),
        }
    }

    /// Does the freezer still hold every write since the map? (Then every
    /// config id from the map is current.)
    pub fn held(&mut self, image: &ImageId) -> Result<bool> {
        match self.call(Request::Held {
            image: image.clone(),
        })? {
            Response::Held { held } => Ok(held),
            other => Err(unexpected(&other)),
        }
    }

    /// The answer to [`AgentClient::check_many_ahead`] of `n` items.
    pub fn check_many_answer(&mut self, token: u64, n: usize) -> Result<Vec<ConfigId>> {
        match self.answer(token)? {
            Response::Configs { current } if current.len() == n => Ok(current),
            other => Err(unexpected(&other)),
        }
    }

    /// Begin a restore under `dest` on the agent's host, its file system
    /// synced every `sync_every` bytes as it goes (0: at the end only);
    /// the destination as the agent resolved it.
    pub fn restore_begin(
        &mut self,
        dest: &str,
        no_owners: bool,
        sync_every: Bytes,
    ) -> Result<String> {
        match self.call(Request::RestoreBegin {
            dest: dest.to_string(),
            no_owners,
            sync_every: Some(sync_every.0),
        })? {
            Response::RestoreBegun { dest } => Ok(dest),
            other => Err(unexpected(&other)),
        }
    }

    /// Make one item (a file then takes `restore_data` and
    /// `restore_item_end`).
    pub fn restore_item(&mut self, dest: &str, record: &ItemRecord) -> Result<u64> {
        self.restore_written(Request::RestoreItem {
            dest: dest.to_string(),
            record: Box::new(record.clone()),
        })
    }

    /// The open file's next bytes.
    pub fn restore_data(&mut self, data: &[u8]) -> Result<u64> {
        self.restore_written(Request::RestoreData {
            data: crate::protocol::b64_encode(data),
        })
    }

    /// Close and check the open file.
    pub fn restore_item_end(&mut self) -> Result<u64> {
        self.restore_written(Request::RestoreItemEnd)
    }

    fn restore_written(&mut self, req: Request) -> Result<u64> {
        match self.call(req)? {
            Response::RestoreWritten { bytes } => Ok(bytes),
            other => Err(unexpected(&other)),
        }
    }

    /// End the restore: what the agent made (failures: directories whose
    /// metadata could not be set).
    pub fn restore_finish(&mut self) -> Result<crate::restore::TreeReport> {
        match self.call(Request::RestoreFinish)? {
            Response::RestoreFinished {
                items,
                bytes,
                failures,
            } => Ok(crate::restore::TreeReport {
                items: usize::try_from(items).unwrap_or(usize::MAX),
                bytes,
                failures,
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// Freeze sources; the whole map.
    pub fn freeze(&mut self, sources: &[String]) -> Result<(FrozenImage, ImageMap)> {
        let (image, mut map, mut more) = self.freeze_in_parts(sources, false)?;
        while more {
            let part = self.map_more(&image.id)?;
            map.items.extend(part.map.items);
            map.failures.extend(part.map.failures);
            more = part.more;
        }
        Ok((image, map))
    }

    /// Freeze sources; with `parts`, the agent answers with the first part
    /// of the map (and whether more follow, from [`AgentClient::map_more`]).
    pub fn freeze_in_parts(
        &mut self,
        sources: &[String],
        parts: bool,
    ) -> Result<(FrozenImage, ImageMap, bool)> {
        match self.call(Request::Freeze {
            sources: sources.to_vec(),
            parts,
        })? {
            Response::Frozen { image, map, more } => Ok((image, map, more)),
            other => Err(unexpected(&other)),
        }
    }

    /// The next part of a map asked for in parts.
    pub fn map_more(&mut self, image: &ImageId) -> Result<MapPart> {
        match self.call(Request::MapMore {
            image: image.clone(),
        })? {
            Response::MapPart(part) => Ok(part),
            other => Err(unexpected(&other)),
        }
    }

    /// Take over a frozen image a previous mover left (to resume).
    pub fn attach(&mut self, image: &ImageId) -> Result<(FrozenImage, ImageMap)> {
        match self.call(Request::Attach {
            image: image.clone(),
        })? {
            Response::Frozen { image, map, .. } => Ok((image, map)),
            other => Err(unexpected(&other)),
        }
    }

    /// Is `config` still valid? The current config id and the answer.
    pub fn check(
        &mut self,
        image: &ImageId,
        item: &ItemId,
        config: &ConfigId,
    ) -> Result<(ConfigId, bool)> {
        match self.call(Request::CheckConfig {
            image: image.clone(),
            item: item.clone(),
            config: config.clone(),
        })? {
            Response::Config { current, valid } => Ok((current, valid)),
            other => Err(unexpected(&other)),
        }
    }

    /// The current config ids of several items (one round trip).
    pub fn check_many(
        &mut self,
        image: &ImageId,
        items: Vec<(ItemId, ConfigId)>,
    ) -> Result<Vec<ConfigId>> {
        let n = items.len();
        match self.call(Request::CheckConfigs {
            image: image.clone(),
            items,
        })? {
            Response::Configs { current } if current.len() == n => Ok(current),
            other => Err(unexpected(&other)),
        }
    }

    /// The extents that changed since `since`.
    pub fn remap(&mut self, image: &ImageId, item: &ItemId, since: &ConfigId) -> Result<Remap> {
        match self.call(Request::Remap {
            image: image.clone(),
            item: item.clone(),
            since: since.clone(),
        })? {
            Response::Remapped { remap } => Ok(remap),
            other => Err(unexpected(&other)),
        }
    }

    /// Release the image.
    pub fn release(&mut self, image: &ImageId) -> Result<()> {
        match self.call(Request::Release {
            image: image.clone(),
        })? {
            Response::Released => Ok(()),
            other => Err(unexpected(&other)),
        }
    }
}

fn unexpected(r: &Response) -> Error {
    Error::new(
        ErrorKind::Protocol,
        format!("unexpected answer from the agent: {r:?}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_to_requests_sent_ahead_go_to_their_requests() {
        // A scripted agent answering in order: each check with the id of
        // its first item, so every answer says which request it is for.
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let agent = std::thread::spawn(move || {
            let mut r = b.try_clone().unwrap();
            let mut w = b;
            while let Ok(Some(req)) = read_message::<Request>(&mut r, DEFAULT_MAX_FRAME) {
                let resp = match req {
                    Request::Hello { .. } => Response::Hello {
                        protocol: VERSION,
                        host: "h".into(),
                    },
                    Request::CheckConfigs { items, .. } => Response::Configs {
                        current: items
                            .iter()
                            .map(|(i, _)| ConfigId::new(format!("for {i}")))
                            .collect(),
                    },
                    Request::CheckConfig { item, .. } => Response::Error {
                        error: Error::new(ErrorKind::NotFound, format!("no {item}")).to_wire(),
                    },
                    _ => Response::Released,
                };
                write_message(&mut w, &resp).unwrap();
            }
        });
        let mut c = AgentClient::new(Box::new(a.try_clone().unwrap()), Box::new(a)).unwrap();
        let img = ImageId::new("i");
        let ask = |c: &mut AgentClient, name: &str| {
            c.check_many_ahead(&img, vec![(ItemId::new(name), ConfigId::new("c"))])
                .unwrap()
                .expect("small enough to go ahead")
        };
        let (x, y) = (ask(&mut c, "x"), ask(&mut c, "y"));
        // A plain call in between reads the answers ahead of its own first.
        let e = c
            .check(&img, &ItemId::new("z"), &ConfigId::new("c"))
            .unwrap_err();
        assert!(e.to_string().contains("no z"), "{e}");
        let z = ask(&mut c, "w");
        assert_eq!(c.check_many_answer(z, 1).unwrap(), [ConfigId::new("for w")]);
        assert_eq!(c.check_many_answer(y, 1).unwrap(), [ConfigId::new("for y")]);
        assert_eq!(c.check_many_answer(x, 1).unwrap(), [ConfigId::new("for x")]);
        assert!(c.check_many_answer(x, 1).is_err(), "an answer is read once");
        // A request too large to go ahead is not sent.
        let many: Vec<(ItemId, ConfigId)> = (0..20_000)
            .map(|k| {
                (
                    ItemId::new(format!("/srv/{k:08x}/{}", k * 7919)),
                    ConfigId::new(format!("f:{k}:{}", k * 31)),
                )
            })
            .collect();
        assert_eq!(c.check_many_ahead(&img, many).unwrap(), None);
        assert_eq!(
            c.check_many_answer(x + 100, 1).unwrap_err().kind(),
            ErrorKind::Protocol
        );
        drop(c);
        agent.join().unwrap();
    }

    #[test]
    fn connection_threads_are_reused_and_as_many_as_connections_at_once() {
        use std::sync::mpsc::channel;
        let threads = ConnectionThreads::default();
        let (tx, rx) = channel();
        let ran = |tx: std::sync::mpsc::Sender<std::thread::ThreadId>| -> Job {
            Box::new(move || tx.send(std::thread::current().id()).unwrap())
        };
        threads.run(ran(tx.clone())).unwrap();
        let first = rx.recv().unwrap();
        // Back among the waiting before the next connection comes.
        let t = std::time::Instant::now();
        while lock(&threads.idle).is_empty() && t.elapsed().as_secs() < 5 {
            std::thread::yield_now();
        }
        threads.run(ran(tx.clone())).unwrap();
        assert_eq!(
            rx.recv().unwrap(),
            first,
            "a new thread for the second connection"
        );
        // Two at once: two threads.
        let (hold_tx, hold_rx) = channel::<()>();
        let hold_rx = Arc::new(std::sync::Mutex::new(hold_rx));
        let (a, b) = (tx.clone(), tx.clone());
        let h = hold_rx.clone();
        threads
            .run(Box::new(move || {
                a.send(std::thread::current().id()).unwrap();
                let _ = lock(&h).recv();
            }))
            .unwrap();
        let one = rx.recv().unwrap();
        threads
            .run(Box::new(move || {
                b.send(std::thread::current().id()).unwrap()
            }))
            .unwrap();
        let two = rx.recv().unwrap();
        assert_ne!(one, two, "a busy thread was handed a second connection");
        hold_tx.send(()).unwrap();
        // A job that panics ends its connection, not the thread.
        threads
            .run(Box::new(|| panic!("a connection's panic")))
            .unwrap();
        threads.run(ran(tx)).unwrap();
        rx.recv().unwrap();
    }

    #[test]
    fn globs() {
        assert!(glob_match("array:vol*", "array:vol0"));
        assert!(glob_match("array:*", "array:x"));
        assert!(glob_match("array:vol?", "array:vol1"));
        assert!(!glob_match("array:vol?", "array:vol10"));
        assert!(!glob_match("array:vol*", "array:secret"));
        assert!(!glob_match("array:vol*", "disk:vol0"));
        assert!(glob_match("*", ""));
    }
}
