//! Fuzzes the record decoder: no input may panic it, accepted records must be canonical.
#![no_main]

#[path = "../checks.rs"]
#[allow(dead_code)] // each target uses one of the checks
mod checks;

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| checks::decode_record(bytes));
