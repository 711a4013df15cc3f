//! The unsafe corner: O_DIRECT-aligned buffers, the block-device size
//! ioctl, and reading a plugin's ABI version symbol.
//!
//! Kernel ABI used (include/uapi/linux/fs.h):
//! `#define BLKGETSIZE64 _IOR(0x12,114,size_t)` — returns the device size in
//! bytes into a `u64`.
//! O_DIRECT (open(2)): "the user-space buffer, the file offset and the
//! length of the transfer must all be suitably aligned" — to the logical
//! block size of the device; we align to 4096, which covers 512 and 4096.

//! The aligned buffer is built without the `engine` feature too: media
//! plugins write and read their archives with O_DIRECT through it.

use std::alloc::{alloc_zeroed, dealloc, Layout};
#[cfg(feature = "engine")]
use std::fs::File;
#[cfg(feature = "engine")]
use std::os::unix::io::AsRawFd;
use std::ptr::NonNull;

/// Alignment of every O_DIRECT buffer.
pub const ALIGN: usize = 4096;

/// A zeroed heap buffer whose address and length are multiples of [`ALIGN`].
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give out &[u8], like Vec<u8>.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A buffer of `len` bytes (rounded up to [`ALIGN`] for its capacity).
    pub fn new(len: usize) -> AlignedBuf {
        let cap = len.div_ceil(ALIGN).max(1) * ALIGN;
        let layout = Layout::from_size_align(cap, ALIGN).expect("valid layout");
        // SAFETY: the layout has a non-zero size (cap >= ALIGN).
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len, cap }
    }

    /// Length in use.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Change the length in use (within the capacity; new bytes are
    /// whatever was there).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "AlignedBuf::set_len beyond capacity");
        self.len = len;
    }

    /// Capacity.
    pub fn capacity(&self) -> usize {
        self.cap
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialized (zeroed) bytes,
        // owned by self for the lifetime of the borrow.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.cap, ALIGN).expect("valid layout");
        // SAFETY: allocated in new() with exactly this layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

#[cfg(feature = "engine")]
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272; // _IOR(0x12, 114, size_t) on 64-bit

/// The size in bytes of the block device open as `f`.
#[cfg(feature = "engine")]
pub fn block_device_size(f: &File) -> std::io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points
    // to a live, writable u64; the fd is valid for the call's duration.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size)
}

/// Why a plugin's version symbol could not be read.
#[cfg(feature = "engine")]
#[derive(Debug)]
pub enum PluginSymbolError {
    /// dlopen failed.
    Load(String),
    /// The library has no `floe_plugin_abi_version`.
    NoSymbol,
}

/// Load the library at `path` and call its `floe_plugin_abi_version`; the
/// library stays loaded while the handle is kept (the root module is then
/// read from the same mapping, not from a second load of the file).
///
/// Floe plugin ABI (docs/formats/plugin-abi.md): every plugin exports
/// `extern "C" fn floe_plugin_abi_version() -> u32`.
#[cfg(feature = "engine")]
pub fn plugin_abi_version(
    path: &std::path::Path,
) -> Result<(u32, libloading::Library), PluginSymbolError> {
    // SAFETY: loading a library runs its initializers; plugins are code the
    // operator installed in a plugin directory, trusted like the binary.
    let lib = unsafe { libloading::Library::new(path) }
        .map_err(|e| PluginSymbolError::Load(e.to_string()))?;
    // SAFETY: the symbol is declared with exactly the type every Floe
    // plugin exports it with (export_plugin! generates it); the library
    // stays loaded while the function is called.
    let f: libloading::Symbol<'_, extern "C" fn() -> u32> =
        unsafe { lib.get(crate::abi::ABI_VERSION_SYMBOL) }
            .map_err(|_| PluginSymbolError::NoSymbol)?;
    let version = f();
    Ok((version, lib))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_are_aligned_and_zeroed() {
        for len in [0, 1, 4095, 4096, 70000] {
            let b = AlignedBuf::new(len);
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
            assert_eq!(b.capacity() % ALIGN, 0);
        }
    }
}
