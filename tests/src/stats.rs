//! Small helpers for the benchmarks' reports.

use std::time::Duration;

/// The `q` quantile (0.0–1.0, nearest rank) of `v`, which is sorted in place.
///
/// Panics when `v` is empty.
pub fn quantile(v: &mut [Duration], q: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

/// `d` in milliseconds with two decimals, e.g. `10.60 ms`.
pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}
