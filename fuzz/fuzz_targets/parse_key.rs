//! Fuzzes the key parser (`FromStr`) and the byte constructor (`DataKey::from_slice`).
#![no_main]

#[path = "../checks.rs"]
#[allow(dead_code)] // each target uses one of the checks
mod checks;

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| checks::parse_key(bytes));
