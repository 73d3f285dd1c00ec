//! The fuzz entry point (`continuum_overlay::fuzzing`, the cargo-fuzz target `overlay_receive`)
//! as a property test, so CI feeds it random and mutated datagrams on every run.

use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn random_datagrams_never_crash_the_device(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        continuum_overlay::fuzzing::receive(&data);
    }
}
