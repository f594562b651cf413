//! The repair loop's brakes, pure and clock-driven so that they are tested without
//! waiting: a per-pod cooldown, and a node-wide spacing of pod deletions.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// No pod is acted on twice within `period`, whatever the outcome of the first action.
#[derive(Debug)]
pub struct Cooldown {
    period: Duration,
    last: HashMap<String, Instant>,
}

impl Cooldown {
    /// A cooldown of `period` per pod UID.
    pub fn new(period: Duration) -> Cooldown {
        Cooldown {
            period,
            last: HashMap::new(),
        }
    }

    /// `Ok` when pod `uid` may be acted on at `now`, else when it may again.
    pub fn check(&self, uid: &str, now: Instant) -> Result<(), Instant> {
        match self.last.get(uid) {
            Some(&at) if now < at + self.period => Err(at + self.period),
            _ => Ok(()),
        }
    }

    /// Records an action on `uid` at `now`.
    pub fn record(&mut self, uid: &str, now: Instant) {
        self.last.insert(uid.to_owned(), now);
    }

    /// Forgets a pod that is gone; entries older than the period go too.
    pub fn forget(&mut self, uid: &str, now: Instant) {
        self.last.remove(uid);
        let period = self.period;
        self.last.retain(|_, at| now < *at + period);
    }
}

/// Node-wide deletions are spaced evenly: at most `per_minute`, never two within
/// `60 s / per_minute` (no burst), so that a node-wide fault that breaks every pod cannot
/// delete them all at once.
#[derive(Debug)]
pub struct DeleteBudget {
    spacing: Duration,
    last: Option<Instant>,
}

impl DeleteBudget {
    /// A budget of `per_minute` deletions (at least 1).
    pub fn new(per_minute: u32) -> DeleteBudget {
        DeleteBudget {
            spacing: Duration::from_secs(60) / per_minute.max(1),
            last: None,
        }
    }

    /// Takes one deletion at `now`, or says when the next one is allowed.
    pub fn take(&mut self, now: Instant) -> Result<(), Instant> {
        if let Some(last) = self.last {
            if now < last + self.spacing {
                return Err(last + self.spacing);
            }
        }
        self.last = Some(now);
        Ok(())
    }

    /// Gives back the deletion taken at `now`, when it did not happen (e.g. the pod changed
    /// and its preconditions failed).
    pub fn give_back(&mut self, taken_at: Instant) {
        if self.last == Some(taken_at) {
            self.last = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cooldown_holds_per_pod_for_the_period() {
        let t0 = Instant::now();
        let mut c = Cooldown::new(Duration::from_secs(300));
        assert!(c.check("a", t0).is_ok());
        c.record("a", t0);
        assert_eq!(
            c.check("a", t0 + Duration::from_secs(299)),
            Err(t0 + Duration::from_secs(300))
        );
        assert!(c.check("b", t0).is_ok(), "other pods are not held");
        assert!(c.check("a", t0 + Duration::from_secs(300)).is_ok());
        c.forget("a", t0);
        assert!(c.check("a", t0).is_ok());
    }

    #[test]
    fn deletions_are_spaced_without_burst() {
        let t0 = Instant::now();
        let mut b = DeleteBudget::new(6);
        assert!(b.take(t0).is_ok());
        assert_eq!(
            b.take(t0 + Duration::from_secs(1)),
            Err(t0 + Duration::from_secs(10))
        );
        assert!(b.take(t0 + Duration::from_secs(10)).is_ok());
        // 50 pods break at once: in the first minute at most 6 go.
        let mut b = DeleteBudget::new(6);
        let taken = (0..600)
            .map(|i| t0 + Duration::from_millis(100 * i))
            .filter(|&now| b.take(now).is_ok())
            .count();
        assert_eq!(taken, 6);
    }

    #[test]
    fn a_deletion_that_did_not_happen_is_given_back() {
        let t0 = Instant::now();
        let mut b = DeleteBudget::new(1);
        b.take(t0).unwrap();
        b.give_back(t0);
        assert!(b.take(t0 + Duration::from_millis(1)).is_ok());
    }
}
