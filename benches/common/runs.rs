//! What the benchmarks that print their own tables share: sizes from the environment, and
//! the median of repeated runs.

use std::time::Duration;

/// The whole number in the environment variable `name`, or `default` when it is unset or
/// not a number.
pub fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median of `runs` (the upper one of an even count).
pub fn median(mut runs: Vec<Duration>) -> Duration {
    runs.sort();
    runs[runs.len() / 2]
}
