//! The shard store on its in-memory twins: versions, fencing, undo, checksums, space, crashes.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use continuum_blockstore::checksum;
use continuum_blockstore::device::MemDevice;
use continuum_blockstore::index::MemIndex;
use continuum_blockstore::store::{
    ObjectKey, OpenedNote, Store, StoreError, Version, WriteMode, WriteReq,
};
use futures::executor::block_on;
use proptest::prelude::*;

const K: usize = 4096;

fn obj(stripe: u64, shard: u32) -> ObjectKey {
    ObjectKey {
        volume: 7,
        stripe,
        shard,
    }
}

fn v(epoch: u64, seq: u64) -> Version {
    Version::new(epoch, seq)
}

fn fill(byte: u8, blocks: usize) -> Bytes {
    Bytes::from(vec![byte; blocks * K])
}

fn req(object: ObjectKey, version: Version, base: Version, offset: u32, data: &Bytes) -> WriteReq {
    WriteReq {
        object,
        epoch: version.epoch,
        version,
        base,
        mode: WriteMode::Data,
        offset,
        length: data.len() as u32,
        crcs: checksum::compute(data),
        fua: false,
        write_set: 0b1,
        data_base: vec![],
        data_after: vec![],
        return_old: false,
    }
}

type MemStore = Store<MemDevice, MemIndex>;

fn store(blocks: u64) -> (MemStore, MemDevice, MemIndex) {
    let dev = MemDevice::new(blocks * K as u64);
    let idx = MemIndex::default();
    (Store::open(dev.clone(), idx.clone()).unwrap(), dev, idx)
}

fn read(s: &MemStore, o: ObjectKey, off: u32, len: u32) -> (Version, Vec<u8>) {
    let r = block_on(s.read(o, off, len)).unwrap();
    (r.version, r.data.to_vec())
}

#[test]
fn a_missing_object_reads_as_zeros() {
    let (s, _, _) = store(64);
    let (ver, data) = read(&s, obj(0, 0), 0, 8192);
    assert_eq!(ver, Version::NONE);
    assert!(data.iter().all(|b| *b == 0));
    assert_eq!(s.used_bytes(), K as u64); // block 0 is reserved
}

#[test]
fn writes_read_back_and_rollback_restores_each_version() {
    let (s, _, _) = store(64);
    let o = obj(1, 0);
    let a = fill(0xaa, 4);
    block_on(s.write(&req(o, v(1, 1), Version::NONE, 0, &a), a.clone())).unwrap();
    let b = fill(0xbb, 1);
    block_on(s.write(&req(o, v(1, 2), v(1, 1), 8192, &b), b.clone())).unwrap();
    let c = fill(0xcc, 2);
    // Extends the object with a gap.
    block_on(s.write(&req(o, v(1, 3), v(1, 2), 6 * K as u32, &c), c.clone())).unwrap();
    let (ver, data) = read(&s, o, 0, 8 * K as u32);
    assert_eq!(ver, v(1, 3));
    assert_eq!(&data[..2 * K], &a[..2 * K]);
    assert_eq!(&data[2 * K..3 * K], &b[..]);
    assert_eq!(&data[3 * K..4 * K], &a[3 * K..]);
    assert!(data[4 * K..6 * K].iter().all(|x| *x == 0));
    assert_eq!(&data[6 * K..], &c[..]);
    let info = &s.stat(&[o]).unwrap()[0];
    assert_eq!(info.unstable.len(), 3);
    assert_eq!(info.length, 8 * K as u32);

    // Undo 1.3 and 1.2: back to exactly the first version.
    block_on(s.rollback(1, &[(o, v(1, 2))])).unwrap();
    let (ver, data) = read(&s, o, 0, 4 * K as u32);
    assert_eq!(ver, v(1, 1));
    assert_eq!(&data[..], &a[..]);
    assert_eq!(s.stat(&[o]).unwrap()[0].length, 4 * K as u32);
    // Undo the first: the object is gone.
    block_on(s.rollback(1, &[(o, v(1, 1))])).unwrap();
    assert_eq!(read(&s, o, 0, 4096).0, Version::NONE);
    block_on(s.flush()).unwrap();
    assert_eq!(
        s.used_bytes(),
        K as u64,
        "every block of the undone versions is free"
    );
}

#[test]
fn stabilize_releases_replaced_blocks_only_after_a_flush() {
    let (s, dev, _) = store(64);
    let o = obj(2, 1);
    let a = fill(1, 16);
    block_on(s.write(&req(o, v(1, 1), Version::NONE, 0, &a), a.clone())).unwrap();
    let b = fill(2, 16);
    block_on(s.write(&req(o, v(1, 2), v(1, 1), 0, &b), b.clone())).unwrap();
    assert_eq!(s.used_bytes(), 33 * K as u64);
    block_on(s.stabilize(1, &[(o, v(1, 1))])).unwrap();
    // 1.1's undo (nothing: it replaced zeros) is gone; 1.2 still holds a's blocks.
    assert_eq!(s.used_bytes(), 33 * K as u64);
    block_on(s.stabilize(1, &[(o, v(1, 2))])).unwrap();
    // Applied only once the data is durable, at the next flush.
    assert_eq!(s.stat(&[o]).unwrap()[0].unstable.len(), 2);
    assert_eq!(s.used_bytes(), 33 * K as u64);
    block_on(s.flush()).unwrap();
    assert!(s.stat(&[o]).unwrap()[0].unstable.is_empty());
    assert_eq!(s.used_bytes(), 17 * K as u64);
    assert_eq!(
        dev.blocks_in_use(),
        16,
        "a freed 64 KiB run is discarded on the device"
    );
    assert_eq!(read(&s, o, 0, 16 * K as u32).1, b.to_vec());
    // A single overwritten block is freed for reuse but not punched out.
    let c = fill(3, 1);
    block_on(s.write(&req(o, v(1, 3), v(1, 2), 0, &c), c.clone())).unwrap();
    block_on(s.stabilize(1, &[(o, v(1, 3))])).unwrap();
    block_on(s.flush()).unwrap();
    assert_eq!(s.used_bytes(), 17 * K as u64);
    assert_eq!(dev.blocks_in_use(), 17);
}

#[test]
fn stale_epochs_are_refused_for_every_change() {
    let (s, _, _) = store(64);
    let o = obj(3, 0);
    let a = fill(1, 1);
    block_on(s.write(&req(o, v(5, 1), Version::NONE, 0, &a), a.clone())).unwrap();
    // A new writer (epoch 6) fences the volume with its first change.
    block_on(s.stabilize(6, &[(o, v(5, 1))])).unwrap();
    let stale = req(o, v(5, 2), v(5, 1), 0, &a);
    let err = block_on(s.write(&stale, a.clone())).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::StaleEpoch {
                volume: 7,
                epoch: 5,
                highest: 6
            }
        ),
        "{err}"
    );
    assert!(matches!(
        block_on(s.rollback(5, &[(o, v(5, 1))])),
        Err(StoreError::StaleEpoch { .. })
    ));
    assert!(matches!(
        block_on(s.stabilize(4, &[(o, v(5, 1))])),
        Err(StoreError::StaleEpoch { .. })
    ));
    assert!(matches!(
        block_on(s.delete_volume(7, 5)),
        Err(StoreError::StaleEpoch { .. })
    ));
    // Other volumes are not fenced by it.
    let other = ObjectKey { volume: 8, ..o };
    block_on(s.write(&req(other, v(1, 1), Version::NONE, 0, &a), a.clone())).unwrap();
    assert_eq!(
        s.stats
            .stale_epoch_refusals
            .load(std::sync::atomic::Ordering::Relaxed),
        4
    );
    assert_eq!(
        read(&s, o, 0, 4096).1,
        a.to_vec(),
        "the stale writes changed nothing"
    );
}

/// Chaos seed 15546: a writer's stabilization, queued until the next flush, must not land
/// after a newer writer has fenced the volume (it decides from what it finds after fencing).
#[test]
fn a_replaced_writers_queued_stabilization_is_not_applied() {
    let (s, _, _) = store(64);
    let (o, p) = (obj(3, 0), obj(3, 1));
    let a = fill(1, 1);
    block_on(s.write(&req(o, v(5, 1), Version::NONE, 0, &a), a.clone())).unwrap();
    block_on(s.write(&req(p, v(5, 2), Version::NONE, 0, &a), a.clone())).unwrap();
    block_on(s.stabilize(5, &[(o, v(5, 1)), (p, v(5, 2))])).unwrap();
    block_on(s.fence_volume(7, 6)).unwrap();
    // The new writer stabilizes one of them itself.
    block_on(s.stabilize(6, &[(p, v(5, 2))])).unwrap();
    block_on(s.flush()).unwrap();
    let infos = s.stat(&[o, p]).unwrap();
    assert_eq!(
        infos[0].unstable.len(),
        1,
        "writer 5's stabilization is void"
    );
    assert!(infos[1].unstable.is_empty(), "writer 6's is applied");
    // The new writer can still decide: roll the version back.
    block_on(s.rollback(6, &[(o, v(5, 1))])).unwrap();
    assert_eq!(read(&s, o, 0, K as u32).0, Version::NONE);
}

#[test]
fn versions_are_compare_and_swap() {
    let (s, _, _) = store(64);
    let o = obj(4, 0);
    let a = fill(1, 1);
    block_on(s.write(&req(o, v(1, 5), Version::NONE, 0, &a), a.clone())).unwrap();
    // Wrong base.
    let err = block_on(s.write(&req(o, v(1, 6), v(1, 4), 0, &a), a.clone())).unwrap_err();
    assert!(matches!(err, StoreError::VersionMismatch { current, .. } if current == v(1, 5)));
    // Not newer.
    let err = block_on(s.write(&req(o, v(1, 5), v(1, 5), 0, &a), a.clone())).unwrap_err();
    assert!(matches!(err, StoreError::VersionNotNewer { .. }));
    // A later epoch with any lower seq is newer.
    block_on(s.write(&req(o, v(2, 1), v(1, 5), 0, &a), a.clone())).unwrap();
    assert_eq!(
        s.stats
            .version_mismatches
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

#[test]
fn parity_deltas_xor_and_check_the_data_versions() {
    let (s, _, _) = store(64);
    let p = obj(5, 4);
    let base = fill(0x0f, 2);
    let mut r = req(p, v(1, 1), Version::NONE, 0, &base);
    r.data_after = vec![(0, v(1, 1)), (1, v(1, 1))];
    block_on(s.write(&r, base.clone())).unwrap();
    let delta = fill(0xff, 1);
    let mut x = req(p, v(1, 2), v(1, 1), 4096, &delta);
    x.mode = WriteMode::Xor;
    x.return_old = true;
    x.data_base = vec![(1, v(1, 0))]; // wrong: the parity says shard 1 is at 1.1
    let err = block_on(s.write(&x, delta.clone())).unwrap_err();
    assert!(
        matches!(err, StoreError::DataVersionMismatch { shard: 1, .. }),
        "{err}"
    );
    x.data_base = vec![(1, v(1, 1))];
    x.data_after = vec![(1, v(1, 2))];
    let out = block_on(s.write(&x, delta.clone())).unwrap();
    assert_eq!(out.previous, v(1, 1));
    assert_eq!(out.old.unwrap().to_vec(), vec![0x0f; K]);
    let r = block_on(s.read(p, 0, 8192)).unwrap();
    assert_eq!(&r.data[..K], &vec![0x0f; K][..]);
    assert_eq!(&r.data[K..], &vec![0xf0; K][..]);
    assert_eq!(r.data_versions, vec![(0, v(1, 1)), (1, v(1, 2))]);
    assert_eq!(r.crcs, checksum::compute(&r.data));
    // Rolling the delta back restores the parity and its data versions.
    block_on(s.rollback(1, &[(p, v(1, 2))])).unwrap();
    let r = block_on(s.read(p, 0, 8192)).unwrap();
    assert_eq!(r.data.to_vec(), base.to_vec());
    assert_eq!(r.data_versions, vec![(0, v(1, 1)), (1, v(1, 1))]);
}

#[test]
fn zero_writes_free_space_and_read_as_zeros() {
    let (s, _, _) = store(64);
    let o = obj(6, 0);
    let a = fill(9, 8);
    block_on(s.write(&req(o, v(1, 1), Version::NONE, 0, &a), a.clone())).unwrap();
    let mut z = req(o, v(1, 2), v(1, 1), 0, &Bytes::new());
    z.mode = WriteMode::Zero;
    z.length = 8 * K as u32;
    z.crcs = vec![];
    block_on(s.write(&z, Bytes::new())).unwrap();
    assert!(read(&s, o, 0, 8 * K as u32).1.iter().all(|b| *b == 0));
    block_on(s.stabilize(1, &[(o, v(1, 2))])).unwrap();
    block_on(s.flush()).unwrap();
    assert_eq!(s.used_bytes(), K as u64, "trimmed data uses no space");
}

#[test]
fn install_replaces_the_whole_object_and_can_be_undone() {
    let (s, _, _) = store(64);
    let o = obj(7, 2);
    let a = fill(1, 6);
    block_on(s.write(&req(o, v(1, 1), Version::NONE, 0, &a), a.clone())).unwrap();
    let b = fill(2, 2);
    let mut i = req(o, v(3, 1), Version::new(9, 9), 0, &b); // base is not checked
    i.mode = WriteMode::Install;
    block_on(s.write(&i, b.clone())).unwrap();
    assert_eq!(s.stat(&[o]).unwrap()[0].length, 2 * K as u32);
    assert_eq!(read(&s, o, 0, 6 * K as u32).1[..2 * K], b[..]);
    block_on(s.rollback(3, &[(o, v(3, 1))])).unwrap();
    assert_eq!(read(&s, o, 0, 6 * K as u32), (v(1, 1), a.to_vec()));
}

#[test]
fn bit_rot_is_an_error_never_data() {
    let (s, dev, _) = store(64);
    let o = obj(8, 0);
    let a = fill(3, 4);
    block_on(s.write(&req(o, v(1, 1), Version::NONE, 0, &a), a.clone())).unwrap();
    // Block 1 of the device holds the object's first block (allocation starts at 1).
    dev.flip_bit(2 * K as u64 + 17, 3);
    let err = block_on(s.read(o, 0, 4 * K as u32)).unwrap_err();
    assert!(
        matches!(err, StoreError::ChecksumMismatch { block: 1, .. }),
        "{err}"
    );
    // Untouched blocks still read.
    assert_eq!(read(&s, o, 0, 4096).1, a[..K].to_vec());
    assert_eq!(
        s.stats
            .checksum_errors
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // A payload corrupted in transit is refused before it is written.
    let mut bad = req(o, v(1, 2), v(1, 1), 0, &a);
    bad.crcs[2] ^= 1;
    assert!(matches!(
        block_on(s.write(&bad, a.clone())),
        Err(StoreError::BadPayload { block: 2, .. })
    ));
}

#[test]
fn malformed_requests_get_clear_errors() {
    let (s, _, _) = store(64);
    let o = obj(9, 0);
    let a = fill(1, 1);
    let cases: Vec<(WriteReq, Bytes)> = vec![
        (req(o, v(1, 1), Version::NONE, 100, &a), a.clone()),
        (
            req(o, v(1, 1), Version::NONE, 0, &a),
            Bytes::from(vec![0u8; 100]),
        ),
        (
            req(o, v(1, 1), Version::NONE, 8 * 1024 * 1024, &a),
            a.clone(),
        ),
        (
            WriteReq {
                crcs: vec![],
                ..req(o, v(1, 1), Version::NONE, 0, &a)
            },
            a.clone(),
        ),
    ];
    for (r, p) in cases {
        let err = block_on(s.write(&r, p)).unwrap_err();
        assert!(matches!(err, StoreError::Invalid { .. }), "{err}");
    }
    assert!(matches!(
        block_on(s.read(o, 1, 4096)),
        Err(StoreError::Invalid { .. })
    ));
}

#[test]
fn a_full_device_refuses_writes_and_recovers_space() {
    let (s, _, _) = store(9); // 8 usable blocks
    let o = obj(10, 0);
    let a = fill(1, 8);
    block_on(s.write(&req(o, v(1, 1), Version::NONE, 0, &a), a.clone())).unwrap();
    let b = fill(2, 1);
    let err = block_on(s.write(&req(o, v(1, 2), v(1, 1), 0, &b), b.clone())).unwrap_err();
    assert!(
        matches!(err, StoreError::NoSpace { needed: 1, free: 0 }),
        "{err}"
    );
    // Acked data is intact.
    assert_eq!(read(&s, o, 0, 8 * K as u32).1, a.to_vec());
    // Trimming half and stabilizing frees space; the allocator flushes by itself when needed.
    let mut z = req(o, v(1, 2), v(1, 1), 0, &Bytes::new());
    z.mode = WriteMode::Zero;
    z.length = 4 * K as u32;
    z.crcs = vec![];
    block_on(s.write(&z, Bytes::new())).unwrap();
    block_on(s.stabilize(1, &[(o, v(1, 2))])).unwrap();
    block_on(s.write(&req(o, v(1, 3), v(1, 2), 0, &b), b.clone())).unwrap();
    assert_eq!(read(&s, o, 0, 4096).1, b.to_vec());
}

/// The filesystem around the data file is shared with the index: the store allocates
/// nothing while less than its reserve would be left, and goes on when space returns.
#[test]
fn a_filesystem_below_the_reserve_refuses_allocations_not_reads() {
    let (s, dev, _) = store(64);
    s.set_space_reserve(1 << 20);
    let o = obj(10, 0);
    let a = fill(1, 2);
    dev.set_fs_free(Some((1 << 20) + 2 * K as u64));
    block_on(s.write(&req(o, v(1, 1), Version::NONE, 0, &a), a.clone())).unwrap();
    // Another block would eat into the reserve (the allocator itself has 61 free).
    let b = fill(2, 1);
    dev.set_fs_free(Some((1 << 20) + K as u64 - 1));
    let err = block_on(s.write(&req(o, v(1, 2), v(1, 1), 0, &b), b.clone())).unwrap_err();
    assert!(
        matches!(err, StoreError::NoSpace { needed: 1, .. }),
        "{err}"
    );
    assert!(s.stats.space_refusals.load(Ordering::Relaxed) > 0);
    assert_eq!(read(&s, o, 0, 2 * K as u32), (v(1, 1), a.to_vec()));
    // Space back (another file shrank): writes go on.
    dev.set_fs_free(Some(64 << 20));
    block_on(s.write(&req(o, v(1, 2), v(1, 1), 0, &b), b.clone())).unwrap();
    assert_eq!(read(&s, o, 0, 4096).1, b.to_vec());
    // Without a reserve the filesystem is not asked.
    s.set_space_reserve(0);
    dev.set_fs_free(Some(0));
    block_on(s.write(&req(o, v(1, 3), v(1, 2), 0, &a), a.clone())).unwrap();
}

#[test]
fn list_and_delete_a_volume() {
    let (s, _, _) = store(256);
    let a = fill(1, 1);
    for stripe in 0..10 {
        for shard in 0..3 {
            let o = obj(stripe, shard);
            block_on(s.write(&req(o, v(1, 1), Version::NONE, 0, &a), a.clone())).unwrap();
            if stripe % 2 == 0 {
                block_on(s.stabilize(1, &[(o, v(1, 1))])).unwrap();
            }
        }
    }
    let other = ObjectKey {
        volume: 70,
        stripe: 0,
        shard: 0,
    };
    block_on(s.write(&req(other, v(1, 1), Version::NONE, 0, &a), a.clone())).unwrap();
    block_on(s.flush()).unwrap();
    let (page, more) = s.list(7, None, 7, false).unwrap();
    assert_eq!(page.len(), 7);
    assert!(more);
    let (rest, more) = s.list(7, Some(page[6].object), 100, false).unwrap();
    assert_eq!(rest.len(), 23);
    assert!(!more);
    let (unstable, _) = s.list(7, None, 100, true).unwrap();
    assert_eq!(unstable.len(), 15);
    assert!(unstable.iter().all(|i| i.object.stripe % 2 == 1));
    assert_eq!(block_on(s.delete_volume(7, 1)).unwrap(), 30);
    assert!(s.list(7, None, 100, false).unwrap().0.is_empty());
    block_on(s.flush()).unwrap();
    assert_eq!(
        s.used_bytes(),
        2 * K as u64,
        "block 0 and the other volume's block"
    );
}

#[test]
fn reopening_rebuilds_the_free_space_map() {
    let (s, dev, idx) = store(64);
    let a = fill(4, 3);
    let o = obj(11, 0);
    block_on(s.write(&req(o, v(1, 1), Version::NONE, 0, &a), a.clone())).unwrap();
    let b = fill(5, 2);
    block_on(s.write(&req(o, v(1, 2), v(1, 1), 0, &b), b.clone())).unwrap();
    let used = s.used_bytes();
    drop(s);
    let s = Store::open(dev, idx).unwrap();
    assert_eq!(
        s.used_bytes(),
        used,
        "current and undo blocks are both in use"
    );
    let c = fill(6, 4);
    block_on(s.write(&req(obj(12, 0), v(1, 1), Version::NONE, 0, &c), c.clone())).unwrap();
    assert_eq!(read(&s, o, 0, 3 * K as u32).1[..2 * K], b[..]);
    assert_eq!(read(&s, o, 0, 3 * K as u32).1[2 * K..], a[2 * K..]);
    block_on(s.rollback(1, &[(o, v(1, 2))])).unwrap();
    assert_eq!(read(&s, o, 0, 3 * K as u32).1, a.to_vec());
}

// ---- Power loss: what was acknowledged durable survives; nothing reads as garbage. ----

/// `blocks` blocks of `byte`, each ending with the CRC-32 of the rest (little-endian): every
/// such block has the same CRC-32 (the CRC residue), so the store's checksum alone cannot
/// tell one from another.
fn sealed(byte: u8, blocks: usize) -> Bytes {
    let mut out = Vec::with_capacity(blocks * K);
    for i in 0..blocks {
        let mut b = vec![byte; K - 4];
        b[0] = i as u8;
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&b);
    }
    Bytes::from(out)
}

#[test]
fn sealed_blocks_share_one_crc() {
    let (a, b) = (sealed(1, 1), sealed(2, 1));
    assert_ne!(a, b);
    assert_eq!(crc32fast::hash(&a), crc32fast::hash(&b));
}

/// Chaos seeds 16139, 16350 and 20108: an unsynced write's index record survived a power
/// loss but its device write did not, and the reused block still held an older sealed block
/// of another object, which passed the CRC check and was served as the new write's data.
#[test]
fn a_record_whose_device_write_was_lost_is_rolled_back_at_open() {
    // Blocks 1 and 2 are the only ones the allocator can hand out.
    let (s, dev, idx) = store(3);
    let (a, b) = (obj(1, 0), obj(2, 0));
    let a1 = sealed(1, 1);
    let mut r = req(a, v(1, 1), Version::NONE, 0, &a1);
    r.fua = true;
    block_on(s.write(&r, a1.clone())).unwrap();
    let a2 = sealed(2, 1);
    let mut r = req(a, v(1, 2), v(1, 1), 0, &a2);
    r.fua = true;
    block_on(s.write(&r, a2.clone())).unwrap();
    block_on(s.stabilize(1, &[(a, v(1, 2))])).unwrap();
    block_on(s.flush()).unwrap(); // a1's block is free again
    let b1 = sealed(3, 1);
    block_on(s.write(&req(b, v(1, 1), Version::NONE, 0, &b1), b1.clone())).unwrap();
    drop(s);
    // The index batch survives, the device write does not: b's record points at a1's bytes.
    dev.crash(|_| false);
    idx.crash(usize::MAX);
    let s = Store::open(dev, idx).unwrap();
    let (ver, data) = read(&s, b, 0, K as u32);
    assert_eq!(ver, Version::NONE, "the undurable version is rolled back");
    assert!(
        data.iter().all(|x| *x == 0),
        "and never reads as a1's bytes"
    );
    assert_eq!(read(&s, a, 0, K as u32), (v(1, 2), a2.to_vec()));
}

#[test]
fn a_process_crash_without_power_loss_keeps_unsynced_writes() {
    let (s, dev, idx) = store(16);
    let d = sealed(4, 2);
    block_on(s.write(&req(obj(3, 0), v(1, 1), Version::NONE, 0, &d), d.clone())).unwrap();
    drop(s); // no flush, no power loss: the page cache holds the write
    let s = Store::open(dev, idx).unwrap();
    assert_eq!(read(&s, obj(3, 0), 0, 2 * K as u32), (v(1, 1), d.to_vec()));
}

/// A writer tells a server that lost power (and the writes it had not synced) from one that
/// only restarted by the incarnation in its answers: it changes at every open after a power
/// loss, only then, and the write outcome carries it.
#[test]
fn the_incarnation_changes_at_every_open_after_a_power_loss_and_only_then() {
    let (s, dev, idx) = store(16);
    let first = s.incarnation();
    assert_ne!(first, 0, "a new store has an incarnation");
    let d = sealed(5, 1);
    let out = block_on(s.write(&req(obj(5, 0), v(1, 1), Version::NONE, 0, &d), d.clone())).unwrap();
    assert_eq!(out.incarnation, first);
    drop(s);
    let s = Store::open(dev.clone(), idx.clone()).unwrap();
    assert_eq!(s.incarnation(), first, "a process restart keeps it");
    drop(s);
    dev.crash(|_| false);
    idx.crash(usize::MAX);
    let s = Store::open(dev.clone(), idx.clone()).unwrap();
    let second = s.incarnation();
    assert!(
        second > first,
        "a power loss makes a newer one: {second:#x} after {first:#x}"
    );
    drop(s);
    dev.crash(|_| true);
    idx.crash(usize::MAX);
    let s = Store::open(dev, idx).unwrap();
    assert!(s.incarnation() > second, "and every later one too");
}

/// Chaos seed 12857: after a process crash, records carried sync generations above the synced
/// one, the new process counted from the synced one, and its flushes could not stabilize
/// them (each flush retried, the simulator crawled).
#[test]
fn after_a_process_crash_one_flush_stabilizes_what_the_old_process_wrote() {
    let (s, dev, idx) = store(256);
    let o = obj(4, 0);
    let d = fill(2, 1);
    // Many unstable versions: writes apply queued stabilizations with device syncs of their
    // own (each a new generation) that record nothing in the index.
    let mut cur = Version::NONE;
    for seq in 1..=80 {
        block_on(s.write(&req(o, v(1, seq), cur, 0, &d), d.clone())).unwrap();
        cur = v(1, seq);
        block_on(s.stabilize(1, &[(o, v(1, seq.saturating_sub(40).max(1)))])).unwrap();
    }
    drop(s);
    let s = Store::open(dev, idx).unwrap();
    block_on(s.stabilize(1, &[(o, cur)])).unwrap();
    block_on(s.flush()).unwrap();
    assert!(s.stat(&[o]).unwrap()[0].unstable.is_empty());
    assert!(!s.flush_due(), "nothing left queued");
}

#[derive(Clone, Debug)]
enum Op {
    Write {
        stripe: u64,
        block: u32,
        len: u32,
        byte: u8,
        fua: bool,
    },
    Stabilize {
        stripe: u64,
    },
    Rollback {
        stripe: u64,
    },
    Flush,
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        4 => (0u64..3, 0u32..6, 1u32..4, any::<u8>(), any::<bool>())
            .prop_map(|(stripe, block, len, byte, fua)| Op::Write { stripe, block, len, byte, fua }),
        1 => (0u64..3).prop_map(|stripe| Op::Stabilize { stripe }),
        1 => (0u64..3).prop_map(|stripe| Op::Rollback { stripe }),
        1 => Just(Op::Flush),
    ];
    proptest::collection::vec(op, 1..40)
}

/// Contents of each object (10 blocks) at each version, as the model knows them.
type History = std::collections::BTreeMap<Version, Vec<u8>>;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn after_power_loss_objects_hold_a_written_version_at_or_after_the_durable_one(
        ops in ops(), dev_seed in any::<u64>(), idx_keep in 0usize..50,
    ) {
        let dev = MemDevice::new(256 * K as u64);
        let idx = MemIndex::default();
        let s = Store::open(dev.clone(), idx.clone()).unwrap();
        let n = 10 * K;
        // Per stripe: current version, content history, last durable version.
        let mut cur = [Version::NONE; 3];
        let mut hist: Vec<History> = vec![History::new(); 3];
        let mut content = vec![vec![0u8; n]; 3];
        let mut durable = [Version::NONE; 3];
        let mut seq = 0;
        for h in hist.iter_mut() {
            h.insert(Version::NONE, vec![0u8; n]);
        }
        for op in &ops {
            match *op {
                Op::Write { stripe, block, len, byte, fua } => {
                    seq += 1;
                    let ver = v(1, seq);
                    let data = sealed(byte, len as usize);
                    let mut r = req(obj(stripe, 0), ver, cur[stripe as usize], block * K as u32, &data);
                    r.fua = fua;
                    block_on(s.write(&r, data.clone())).unwrap();
                    let c = &mut content[stripe as usize];
                    let off = block as usize * K;
                    c[off..off + len as usize * K].copy_from_slice(&data);
                    cur[stripe as usize] = ver;
                    hist[stripe as usize].insert(ver, c.clone());
                    if fua {
                        durable = cur;
                    }
                }
                Op::Stabilize { stripe } => {
                    block_on(s.stabilize(1, &[(obj(stripe, 0), cur[stripe as usize])])).unwrap();
                }
                Op::Rollback { stripe } => {
                    // Undo the newest unstable version, if any.
                    let info = &s.stat(&[obj(stripe, 0)]).unwrap()[0];
                    if let Some(u) = info.unstable.last() {
                        block_on(s.rollback(1, &[(obj(stripe, 0), u.version)])).unwrap();
                        let st = stripe as usize;
                        cur[st] = u.previous;
                        content[st] = hist[st][&u.previous].clone();
                        if durable[st] > cur[st] { durable[st] = cur[st]; }
                    }
                }
                Op::Flush => {
                    block_on(s.flush()).unwrap();
                    durable = cur;
                }
            }
        }
        drop(s);
        let mut rng = dev_seed;
        dev.crash(|_| { rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); rng >> 63 == 1 });
        idx.crash(idx_keep);
        let s = Store::open(dev, idx).unwrap();
        for st in 0..3 {
            match block_on(s.read(obj(st as u64, 0), 0, n as u32)) {
                Ok(r) => {
                    prop_assert!(r.version >= durable[st], "stripe {st}: version {} below the durable {}", r.version, durable[st]);
                    let want = hist[st].get(&r.version);
                    prop_assert!(want.is_some(), "stripe {st}: version {} was never written", r.version);
                    prop_assert_eq!(&r.data.to_vec(), want.unwrap(), "stripe {} at {}", st, r.version);
                }
                // A torn unsynced write was rolled back at open (invariant 8): nothing reads
                // as a checksum error, let alone as another block's bytes.
                Err(e) => prop_assert!(false, "stripe {st}: {e}"),
            }
        }
    }
}

/// The opened mark carries the writer's note of undecided stripes: the next writer gets the
/// last note of the highest opened epoch (a higher `record` replaces one of the same epoch,
/// never a lower one), and nothing from an older opened epoch; a reopen keeps it.
#[test]
fn the_opened_note_is_the_last_one_of_the_last_opened_writer() {
    let (s, dev, idx) = store(64);
    let note = |epoch, record, undecided: Vec<(u64, u64)>| OpenedNote {
        epoch,
        record,
        undecided,
    };
    let first = note(3, 1, vec![(8, 2), (9, 1)]);
    let (_, opened, before) = block_on(s.fence_open(7, 3, Some(&first))).unwrap();
    assert_eq!((opened, before), (0, OpenedNote::default()));
    // A shorter list later, then a late copy of the first: the later one stays.
    block_on(s.fence_open(7, 3, Some(&note(3, 2, vec![(9, 1)])))).unwrap();
    block_on(s.fence_open(7, 3, Some(&first))).unwrap();
    let (_, opened, got) = block_on(s.fence_open(7, 4, None)).unwrap();
    assert_eq!((opened, got), (3, note(3, 2, vec![(9, 1)])));
    drop(s);
    let s = Store::open(dev, idx).unwrap();
    // Writer 4 opens with nothing undecided: writer 5 learns an empty note of epoch 4.
    block_on(s.fence_open(7, 4, Some(&note(4, 1, vec![])))).unwrap();
    let (_, opened, got) = block_on(s.fence_open(7, 5, None)).unwrap();
    assert_eq!((opened, got), (4, note(4, 1, vec![])));
}
