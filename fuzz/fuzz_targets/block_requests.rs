#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    continuum_blockstore::fuzzing::block_requests(data);
    if let Some((&split, rest)) = data.split_first() {
        let at = (split as usize).min(rest.len());
        continuum_blockstore::fuzzing::block_request_header(&rest[..at], &rest[at..]);
    }
});
