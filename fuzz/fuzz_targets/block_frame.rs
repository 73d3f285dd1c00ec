#![no_main]
use continuum_blockstore::wire::{Frame, FrameDecoder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Frame::new_checked(data);
    let mut buf = bytes::BytesMut::from(data);
    while let Ok(Some(_)) = FrameDecoder.decode(&mut buf) {}
});
