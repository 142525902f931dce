//! Reconnect backoff: full jitter between `reconnect_min` and a cap that
//! doubles with every failure up to `reconnect_max`, so a fleet that lost
//! its broker at the same moment does not come back in lockstep. Reset
//! once a connection has proved itself: the uplink resets it when the
//! broker answers something after its CONNACK, not on the CONNACK alone,
//! so a broker that accepts every connection and then stalls or drops it
//! is retried ever more slowly.
//!
//! Every delay is at least `min`, whatever the jitter: in a window `w`
//! there are at most `w / min + 1` attempts ([`Backoff::most_attempts`]).
//! A broker that refuses the node's password sees that many at most, and
//! in practice far fewer as the cap doubles.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    /// Failures since the last reset.
    failures: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            failures: 0,
        }
    }

    /// After a healthy connection: the next failure waits about `min`
    /// again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The upper bound of the next delay: `min * 2^failures`, at most `max`.
    pub fn cap(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        self.min.saturating_mul(factor).min(self.max)
    }

    /// The delay before the next attempt, uniform in `[min, cap]`; counts a
    /// failure. `unit` is a uniform random number in [0, 1).
    pub fn next_with(&mut self, unit: f64) -> Duration {
        let cap = self.cap();
        self.failures = self.failures.saturating_add(1);
        let span = cap.saturating_sub(self.min).as_secs_f64();
        self.min + Duration::from_secs_f64(span * unit.clamp(0.0, 1.0))
    }

    /// The most attempts a window of `window` can hold whatever the
    /// jitter: one at its start and one per `min` after it (attempts
    /// themselves take time, so real counts are lower).
    pub fn most_attempts(&self, window: Duration) -> u64 {
        if self.min.is_zero() {
            return u64::MAX;
        }
        (window.as_nanos() / self.min.as_nanos()) as u64 + 1
    }

    /// [`Backoff::next_with`] with OS randomness.
    pub fn next_delay(&mut self) -> Duration {
        self.next_with(random_unit())
    }
}

/// A uniform number in [0, 1) from the OS.
pub fn random_unit() -> f64 {
    use rand_core::RngCore;
    (rand_core::OsRng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(60);

    #[test]
    fn cap_doubles_up_to_max_and_resets() {
        let mut b = Backoff::new(MIN, MAX);
        let caps: Vec<u64> = (0..9)
            .map(|_| {
                let c = b.cap().as_secs();
                b.next_with(0.5);
                c
            })
            .collect();
        assert_eq!(caps, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
        for _ in 0..100 {
            b.next_with(0.9);
        }
        assert_eq!(b.cap(), MAX, "no overflow after many failures");
        b.reset();
        assert_eq!(b.cap(), MIN);
        assert_eq!(b.next_with(0.99), MIN, "first delay after a reset is min");
    }

    #[test]
    fn most_attempts_bounds_any_sequence_of_delays() {
        let b = Backoff::new(MIN, MAX);
        assert_eq!(b.most_attempts(Duration::from_secs(20)), 21);
        assert_eq!(b.most_attempts(Duration::from_millis(999)), 1);
        // The tightest sequence the jitter can draw (every delay `min`)
        // fits exactly that many attempts in the window.
        let mut b = Backoff::new(MIN, MAX);
        let window = Duration::from_secs(20);
        let mut t = Duration::ZERO;
        let mut attempts = 1;
        loop {
            t += b.next_with(0.0);
            if t > window {
                break;
            }
            attempts += 1;
        }
        assert_eq!(attempts, b.most_attempts(window));
        assert_eq!(
            Backoff::new(Duration::ZERO, MAX).most_attempts(window),
            u64::MAX
        );
    }

    #[test]
    fn delays_stay_within_min_and_cap() {
        let mut b = Backoff::new(MIN, MAX);
        for i in 0..50 {
            let cap = b.cap();
            let d = b.next_delay();
            assert!(
                d >= MIN && d <= cap,
                "failure {i}: {d:?} not in [{MIN:?}, {cap:?}]"
            );
        }
        let mut b = Backoff::new(MIN, MAX);
        b.failures = 10;
        assert_eq!(b.next_with(0.0), MIN);
        b.failures = 10;
        assert!(b.next_with(0.999_999) > Duration::from_millis(59_900));
    }

    #[test]
    fn jitter_spreads_a_fleet() {
        // 1000 nodes failing for the 6th time: their delays spread over
        // [1s, 32s], not one instant.
        let delays: Vec<Duration> = (0..1000)
            .map(|_| {
                let mut b = Backoff::new(MIN, MAX);
                b.failures = 5;
                b.next_delay()
            })
            .collect();
        let lo = delays.iter().filter(|d| d.as_secs_f64() < 16.5).count();
        assert!((350..650).contains(&lo), "{lo} of 1000 in the lower half");
        let distinct: std::collections::HashSet<u128> =
            delays.iter().map(|d| d.as_millis()).collect();
        assert!(
            distinct.len() > 500,
            "only {} distinct delays",
            distinct.len()
        );
    }
}
