//! The agent's one retry policy: exponential backoff (doubling) from a first delay to a
//! cap, from the `backon` crate that `kube-runtime` uses too. Each loop that retries
//! (taint writes, the repair watch, a fight over the CNI config, a failing self-test)
//! holds one [`Backoff`] and resets it on success.

use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};

/// Delays that double from `first` to `cap`, for as long as failures go on.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    current: Option<Duration>,
}

impl Backoff {
    /// Delays `first`, `2 × first`, … up to `cap`, exactly.
    pub fn new(first: Duration, cap: Duration) -> Backoff {
        let builder = ExponentialBuilder::new()
            .with_min_delay(first)
            .with_max_delay(cap)
            .with_factor(2.0)
            .without_max_times();
        Backoff {
            delays: builder.build(),
            builder,
            current: None,
        }
    }

    /// Like [`Backoff::new`], with random jitter added to each delay (up to the delay
    /// again), so that agents on many nodes do not retry against the API server in step.
    pub fn with_jitter(first: Duration, cap: Duration) -> Backoff {
        let builder = ExponentialBuilder::new()
            .with_min_delay(first)
            .with_max_delay(cap)
            .with_factor(2.0)
            .without_max_times()
            .with_jitter();
        Backoff {
            delays: builder.build(),
            builder,
            current: None,
        }
    }

    /// The delay before the next attempt after one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let d = self
            .delays
            .next()
            .unwrap_or_else(|| self.current.unwrap_or_default());
        self.current = Some(d);
        d
    }

    /// The delay last handed out, if a failure is being backed off from.
    pub fn current(&self) -> Option<Duration> {
        self.current
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
        self.current = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        let got: Vec<u64> = (0..5).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 5, 5]);
        assert_eq!(b.current(), Some(Duration::from_secs(5)));
        b.reset();
        assert_eq!(b.current(), None);
        assert_eq!(b.next_delay(), Duration::from_secs(1));
        let mut j = Backoff::with_jitter(Duration::from_millis(100), Duration::from_secs(1));
        let d = j.next_delay();
        assert!(
            d >= Duration::from_millis(100) && d <= Duration::from_millis(200),
            "{d:?}"
        );
    }
}
