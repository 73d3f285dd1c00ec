//! An in-memory export: sparse 64 KiB chunks, allocated on first write, freed by TRIM and
//! WRITE_ZEROES when whole chunks are covered. It serves the protocol tests, the fuzz targets
//! and, in the benches, the protocol-only baseline beside nbdkit's memory plugin. Nothing is
//! durable (flush is a no-op by nature, not a stub: memory is the storage).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use bytes::{Bytes, BytesMut};

use crate::handshake::{ExportEntry, ExportInfo, Refusal};
use crate::server::{Catalog, Export, ExportResult};
use crate::transmission::{extents_by_chunk, Extent, MAX_PAYLOAD_BYTES};
use crate::wire;

const CHUNK: u64 = 64 * 1024;

/// A sparse in-memory disk.
#[derive(Debug)]
pub struct MemExport {
    size: u64,
    chunks: RwLock<BTreeMap<u64, Vec<u8>>>,
}

impl MemExport {
    pub fn new(size: u64) -> Self {
        Self {
            size,
            chunks: RwLock::default(),
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Chunks holding data (for tests of freeing).
    pub fn allocated_chunks(&self) -> usize {
        self.chunks.read().expect("poisoned").len()
    }

    fn zero(&self, offset: u64, length: u64) {
        let mut chunks = self.chunks.write().expect("poisoned");
        let mut at = offset;
        while at < offset + length {
            let c = at / CHUNK;
            let within = at % CHUNK;
            let n = (CHUNK - within).min(offset + length - at);
            if n == CHUNK {
                chunks.remove(&c);
            } else if let Some(buf) = chunks.get_mut(&c) {
                buf[within as usize..(within + n) as usize].fill(0);
            }
            at += n;
        }
    }
}

impl Export for MemExport {
    async fn read(&self, offset: u64, length: u32) -> ExportResult<Bytes> {
        let chunks = self.chunks.read().expect("poisoned");
        let mut out = BytesMut::zeroed(length as usize);
        let mut at = offset;
        while at < offset + length as u64 {
            let c = at / CHUNK;
            let within = at % CHUNK;
            let n = (CHUNK - within).min(offset + length as u64 - at);
            if let Some(buf) = chunks.get(&c) {
                let dst = (at - offset) as usize;
                out[dst..dst + n as usize]
                    .copy_from_slice(&buf[within as usize..(within + n) as usize]);
            }
            at += n;
        }
        Ok(out.freeze())
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> ExportResult<()> {
        let mut chunks = self.chunks.write().expect("poisoned");
        let mut at = offset;
        while at < offset + data.len() as u64 {
            let c = at / CHUNK;
            let within = at % CHUNK;
            let n = (CHUNK - within).min(offset + data.len() as u64 - at);
            let buf = chunks.entry(c).or_insert_with(|| vec![0; CHUNK as usize]);
            let src = (at - offset) as usize;
            buf[within as usize..(within + n) as usize]
                .copy_from_slice(&data[src..src + n as usize]);
            at += n;
        }
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        _fua: bool,
        no_hole: bool,
    ) -> ExportResult<()> {
        if no_hole {
            return self
                .write(offset, Bytes::from(vec![0; length as usize]), false)
                .await;
        }
        self.zero(offset, length as u64);
        Ok(())
    }

    async fn trim(&self, offset: u64, length: u32, _fua: bool) -> ExportResult<()> {
        self.zero(offset, length as u64);
        Ok(())
    }

    async fn flush(&self) -> ExportResult<()> {
        Ok(())
    }

    async fn cache(&self, _offset: u64, _length: u32) -> ExportResult<()> {
        Ok(())
    }

    async fn block_status(&self, offset: u64, length: u32) -> ExportResult<Vec<Extent>> {
        let chunks = self.chunks.read().expect("poisoned");
        Ok(extents_by_chunk(offset, length, CHUNK, |c| {
            chunks.contains_key(&c)
        }))
    }
}

/// Transmission flags of every export this server offers (volume and memory alike).
pub const EXPORT_FLAGS: u16 = wire::TFLAG_SEND_FLUSH
    | wire::TFLAG_SEND_FUA
    | wire::TFLAG_SEND_TRIM
    | wire::TFLAG_SEND_WRITE_ZEROES
    | wire::TFLAG_SEND_FAST_ZERO
    | wire::TFLAG_SEND_CACHE
    | wire::TFLAG_SEND_DF
    | wire::TFLAG_CAN_MULTI_CONN;

/// The block sizes advertised: any alignment is accepted (sub-4 KiB writes cost a
/// read-modify-write), 4 KiB preferred, 32 MiB at most per request.
pub fn export_info(name: &str, description: &str, size: u64) -> ExportInfo {
    ExportInfo {
        name: name.to_string(),
        description: description.to_string(),
        size,
        flags: EXPORT_FLAGS,
        min_block: 1,
        preferred_block: 4096,
        max_block: MAX_PAYLOAD_BYTES,
    }
}

/// Named in-memory exports.
#[derive(Debug, Default)]
pub struct MemCatalog {
    exports: BTreeMap<String, Arc<MemExport>>,
}

impl MemCatalog {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, name: &str, size: u64) -> Arc<MemExport> {
        let e = Arc::new(MemExport::new(size));
        self.exports.insert(name.to_string(), e.clone());
        e
    }
}

impl Catalog for MemCatalog {
    type Export = MemExport;

    async fn list(&self) -> Vec<ExportEntry> {
        self.exports
            .keys()
            .map(|n| ExportEntry {
                name: n.clone(),
                description: "memory".into(),
            })
            .collect()
    }

    async fn describe(&self, name: &str) -> Result<ExportInfo, Refusal> {
        let e = self
            .exports
            .get(name)
            .ok_or_else(|| Refusal::unknown(name))?;
        Ok(export_info(name, "memory", e.size))
    }

    async fn open(&self, name: &str) -> Result<(ExportInfo, Arc<MemExport>), Refusal> {
        let e = self
            .exports
            .get(name)
            .ok_or_else(|| Refusal::unknown(name))?;
        Ok((export_info(name, "memory", e.size), e.clone()))
    }
}
