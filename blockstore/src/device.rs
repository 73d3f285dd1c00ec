//! Where a block server keeps shard bytes: a data file addressed in 4 KiB blocks, behind the
//! narrow [`Device`] trait.
//!
//! - [`UringDevice`]: the real one, a file driven through io_uring (tokio-uring; small writes
//!   are `pwrite`s in place, see [`UringDevice::write`]'s note). Space freed
//!   by TRIM or by superseded versions is punched out of the file, so `du` shrinks with it.
//! - [`MemDevice`]: the in-memory twin for tests and the simulator. It models what a real disk
//!   does on power loss: writes since the last [`Device::sync`] are volatile, and
//!   [`MemDevice::crash`] keeps each of them or not (a seeded choice), so a torn multi-block
//!   write can leave some blocks new and some old. Recovery must still work because the store
//!   never references a block from a durable index entry before the block itself is synced,
//!   and every block carries a checksum that catches the rest.
//!
//! Both are single-threaded (the block server runs one io_uring reactor per process).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::rc::Rc;

use bytes::{Bytes, BytesMut};

use crate::checksum::BLOCK_BYTES;

/// A block device: byte offsets and lengths are multiples of [`BLOCK_BYTES`].
#[allow(async_fn_in_trait)]
pub trait Device {
    /// Reads `len` bytes at `offset`.
    async fn read(&self, offset: u64, len: usize) -> io::Result<BytesMut>;
    /// Writes `data` at `offset`.
    async fn write(&self, offset: u64, data: Bytes) -> io::Result<()>;
    /// Makes every completed write durable.
    async fn sync(&self) -> io::Result<()>;
    /// Releases the space of `[offset, offset + len)`; it reads as zeros afterwards.
    async fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Usable bytes.
    fn capacity(&self) -> u64;
    /// Names the span during which completed but unsynced writes can only be lost together
    /// with the whole machine: it changes when a power loss (or, for the twin, a simulated
    /// one) may have dropped them. A process that dies leaves its writes in the page cache.
    fn boot_id(&self) -> Vec<u8>;
    /// Bytes still free on the filesystem that holds the device (`None`: not known, or not
    /// shared with anything else). The index lives there too and needs room to write and to
    /// reopen: the store stops allocating while this is below its reserve. The figure may be
    /// a cached one, lowered by every byte written since it was taken.
    fn fs_free(&self) -> Option<u64>;
}

/// The data file, through io_uring.
pub struct UringDevice {
    file: tokio_uring::fs::File,
    /// The same file, for statvfs and small in-place writes (tokio-uring's handle lends no `AsFd`).
    stat: std::fs::File,
    capacity: u64,
    boot_id: Vec<u8>,
    /// The last statvfs answer, when it was taken, and the bytes written since (each counted
    /// as newly used: conservative). See [`Device::fs_free`].
    free_cache: std::cell::Cell<Option<(std::time::Instant, u64, u64)>>,
}

/// A cached free-space figure is used for at most this long...
const FS_FREE_MAX_AGE: std::time::Duration = std::time::Duration::from_millis(20);
/// ...or until this many bytes were written after it (a statvfs per shard write was ~1 % of a
/// block server's CPU in 4 KiB random writes).
const FS_FREE_MAX_WRITTEN: u64 = 4 << 20;
/// Writes up to this size are written in place with pwrite (see [`UringDevice::write`]).
const INLINE_WRITE_MAX: usize = 16 * 1024;

impl std::fmt::Debug for UringDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UringDevice({} bytes)", self.capacity)
    }
}

impl UringDevice {
    /// Opens (creating if needed) the data file at `path`, sized to `capacity` bytes (sparse).
    /// Must be called inside a tokio-uring runtime.
    pub fn open(path: &std::path::Path, capacity: u64) -> io::Result<Self> {
        let capacity = capacity / BLOCK_BYTES as u64 * BLOCK_BYTES as u64;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        if file.metadata()?.len() < capacity {
            file.set_len(capacity)?;
        }
        // The kernel's boot id changes at every boot; without it (not Linux, or /proc not
        // mounted) every start counts as after a power loss, which is safe.
        let boot_id = std::fs::read("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        Ok(Self {
            stat: file.try_clone()?,
            file: tokio_uring::fs::File::from_std(file),
            capacity,
            boot_id,
            free_cache: std::cell::Cell::new(None),
        })
    }
}

impl Device for UringDevice {
    async fn read(&self, offset: u64, len: usize) -> io::Result<BytesMut> {
        // The kernel fills the buffer: no zeroing first. The slice bounds the read to `len`
        // (the allocation may be larger).
        let buf = tokio_uring::buf::BoundedBuf::slice(BytesMut::with_capacity(len), 0..len);
        let (res, buf) = self.file.read_exact_at(buf, offset).await;
        res?;
        let buf = buf.into_inner();
        debug_assert_eq!(buf.len(), len);
        Ok(buf)
    }

    async fn write(&self, offset: u64, data: Bytes) -> io::Result<()> {
        if let Some((at, free, written)) = self.free_cache.get() {
            let written = written.saturating_add(data.len() as u64);
            self.free_cache.set(Some((at, free, written)));
        }
        if data.len() <= INLINE_WRITE_MAX {
            // A small buffered write is a short copy into the page cache: done here, in
            // place. Through io_uring, ext4 (no non-blocking buffered writes) punts every one
            // to a worker thread, and the hand-off and wake-up cost more than the copy.
            std::os::unix::fs::FileExt::write_all_at(&self.stat, &data, offset)?;
            return Ok(());
        }
        let (res, _) = self.file.write_all_at(data, offset).await;
        res
    }

    async fn sync(&self) -> io::Result<()> {
        self.file.sync_data().await
    }

    async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        const PUNCH: i32 = 0x02 | 0x01; // FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        self.file.fallocate(offset, len, PUNCH).await
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn boot_id(&self) -> Vec<u8> {
        self.boot_id.clone()
    }

    fn fs_free(&self) -> Option<u64> {
        if let Some((at, free, written)) = self.free_cache.get() {
            if written < FS_FREE_MAX_WRITTEN && at.elapsed() < FS_FREE_MAX_AGE {
                return Some(free.saturating_sub(written));
            }
        }
        let st = rustix::fs::fstatvfs(&self.stat).ok()?;
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        self.free_cache
            .set(Some((std::time::Instant::now(), free, 0)));
        Some(free)
    }
}

#[derive(Default)]
struct MemState {
    /// Simulated power losses so far (the boot id).
    crashes: u64,
    /// Durable blocks (offset → 4 KiB).
    durable: BTreeMap<u64, Bytes>,
    /// Writes since the last sync, in order (offset → 4 KiB).
    volatile: Vec<(u64, Option<Bytes>)>,
    /// Current view (durable + volatile).
    current: BTreeMap<u64, Bytes>,
    /// What [`Device::fs_free`] answers (a filesystem shared with other files; see
    /// [`MemDevice::set_fs_free`]).
    fs_free: Option<u64>,
}

/// In-memory [`Device`] with power-loss semantics (see the module doc). Clones share state.
#[derive(Clone, Default)]
pub struct MemDevice {
    state: Rc<RefCell<MemState>>,
    capacity: u64,
}

impl std::fmt::Debug for MemDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MemDevice({} bytes)", self.capacity)
    }
}

impl MemDevice {
    pub fn new(capacity: u64) -> Self {
        Self {
            state: Rc::default(),
            capacity: capacity / BLOCK_BYTES as u64 * BLOCK_BYTES as u64,
        }
    }

    /// Power loss: each unsynced block write survives or not by `keep(i)` (i = its position
    /// among the unsynced writes), so multi-block writes can tear.
    pub fn crash(&self, mut keep: impl FnMut(usize) -> bool) {
        let mut s = self.state.borrow_mut();
        s.crashes += 1;
        let volatile = std::mem::take(&mut s.volatile);
        for (i, (off, data)) in volatile.into_iter().enumerate() {
            if keep(i) {
                match data {
                    Some(d) => s.durable.insert(off, d),
                    None => s.durable.remove(&off),
                };
            }
        }
        s.current = s.durable.clone();
    }

    /// Sets the free space of the simulated filesystem around the device (`None`: unbounded).
    pub fn set_fs_free(&self, free: Option<u64>) {
        self.state.borrow_mut().fs_free = free;
    }

    /// Flips one bit of the stored byte at `offset` (bit rot), in the durable and current view.
    pub fn flip_bit(&self, offset: u64, bit: u8) {
        let mut guard = self.state.borrow_mut();
        let s = &mut *guard;
        let block = offset / BLOCK_BYTES as u64 * BLOCK_BYTES as u64;
        let within = (offset - block) as usize;
        for map in [&mut s.durable, &mut s.current] {
            let mut b = map
                .get(&block)
                .map(|b| BytesMut::from(&b[..]))
                .unwrap_or_else(|| BytesMut::zeroed(BLOCK_BYTES));
            b[within] ^= 1 << (bit % 8);
            map.insert(block, b.freeze());
        }
    }

    /// Blocks holding data (not zero-filled by discard or never written).
    pub fn blocks_in_use(&self) -> usize {
        self.state.borrow().current.len()
    }

    /// The offset of the `n`-th block holding data, in offset order (for bit rot aimed at
    /// real data).
    pub fn block_in_use(&self, n: usize) -> Option<u64> {
        self.state.borrow().current.keys().nth(n).copied()
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        let aligned =
            offset.is_multiple_of(BLOCK_BYTES as u64) && len.is_multiple_of(BLOCK_BYTES as u64);
        if !aligned || offset + len > self.capacity {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("I/O at {offset}+{len} outside the aligned device"),
            ));
        }
        Ok(())
    }
}

impl Device for MemDevice {
    async fn read(&self, offset: u64, len: usize) -> io::Result<BytesMut> {
        self.check(offset, len as u64)?;
        let s = self.state.borrow();
        let mut out = BytesMut::zeroed(len);
        for (i, chunk) in out.chunks_mut(BLOCK_BYTES).enumerate() {
            if let Some(b) = s.current.get(&(offset + (i * BLOCK_BYTES) as u64)) {
                chunk.copy_from_slice(b);
            }
        }
        Ok(out)
    }

    async fn write(&self, offset: u64, data: Bytes) -> io::Result<()> {
        self.check(offset, data.len() as u64)?;
        let mut s = self.state.borrow_mut();
        for i in 0..data.len() / BLOCK_BYTES {
            let off = offset + (i * BLOCK_BYTES) as u64;
            let b = data.slice(i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES);
            s.current.insert(off, b.clone());
            s.volatile.push((off, Some(b)));
        }
        Ok(())
    }

    async fn sync(&self) -> io::Result<()> {
        let mut s = self.state.borrow_mut();
        s.volatile.clear();
        s.durable = s.current.clone();
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len)?;
        let mut s = self.state.borrow_mut();
        for i in 0..len / BLOCK_BYTES as u64 {
            let off = offset + i * BLOCK_BYTES as u64;
            s.current.remove(&off);
            s.volatile.push((off, None));
        }
        Ok(())
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn boot_id(&self) -> Vec<u8> {
        format!("mem-{}", self.state.borrow().crashes).into_bytes()
    }

    fn fs_free(&self) -> Option<u64> {
        self.state.borrow().fs_free
    }
}
