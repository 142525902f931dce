//! Incident hysteresis: a score over the threshold for `k` of the last `n`
//! steps opens an incident; `m` clean steps in a row close it. Pure state,
//! one tracker per (target, detector).

use std::fmt;
use std::str::FromStr;

/// `k of n`: how many of the last `n` steps must be over the threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KOfN {
    pub k: u32,
    pub n: u32,
}

/// The longest window a `k of n` may look back over.
pub const MAX_N: u32 = 64;

impl FromStr for KOfN {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("expected \"K of N\" with 1 <= K <= N <= {MAX_N}, got {s:?}");
        let mut it = s.split_whitespace();
        let (Some(k), Some("of"), Some(n), None) = (it.next(), it.next(), it.next(), it.next())
        else {
            return Err(bad());
        };
        let (Ok(k), Ok(n)) = (k.parse::<u32>(), n.parse::<u32>()) else {
            return Err(bad());
        };
        if k == 0 || k > n || n > MAX_N {
            return Err(bad());
        }
        Ok(KOfN { k, n })
    }
}

impl fmt::Display for KOfN {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} of {}", self.k, self.n)
    }
}

/// What one step did to a tracker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Opened,
    Closed,
}

/// The hysteresis state of one (target, detector).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracker {
    open_rule: KOfN,
    close_after: u32,
    /// The last `n` steps, newest in bit 0: 1 = over the threshold.
    history: u64,
    /// Steps pushed, capped at `n` (a window not yet full counts only what
    /// it has seen).
    seen: u32,
    open: bool,
    clean_run: u32,
}

impl Tracker {
    pub fn new(open_rule: KOfN, close_after: u32) -> Tracker {
        Tracker {
            open_rule,
            close_after: close_after.max(1),
            history: 0,
            seen: 0,
            open: false,
            clean_run: 0,
        }
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Feeds one step: `over` is whether its score reached the threshold.
    pub fn push(&mut self, over: bool) -> Option<Transition> {
        let n = self.open_rule.n;
        let mask = if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
        self.history = ((self.history << 1) | u64::from(over)) & mask;
        self.seen = (self.seen + 1).min(n);
        if self.open {
            if over {
                self.clean_run = 0;
                None
            } else {
                self.clean_run += 1;
                if self.clean_run >= self.close_after {
                    self.open = false;
                    self.clean_run = 0;
                    // A new incident needs k fresh steps over the threshold.
                    self.history = 0;
                    Some(Transition::Closed)
                } else {
                    None
                }
            }
        } else if self.history.count_ones() >= self.open_rule.k {
            self.open = true;
            self.clean_run = 0;
            Some(Transition::Opened)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn k(s: &str) -> KOfN {
        s.parse().unwrap()
    }

    #[test]
    fn parses_k_of_n() {
        assert_eq!(k("2 of 3"), KOfN { k: 2, n: 3 });
        assert_eq!(k(" 1  of 1 "), KOfN { k: 1, n: 1 });
        for bad in [
            "0 of 3", "4 of 3", "2 of", "2 in 3", "2 of 65", "x of 3", "2 of 3 x",
        ] {
            assert!(bad.parse::<KOfN>().is_err(), "{bad}");
        }
    }

    #[test]
    fn opens_on_k_of_n_and_closes_after_m_clean() {
        let mut t = Tracker::new(k("2 of 3"), 3);
        assert_eq!(t.push(true), None);
        assert_eq!(t.push(false), None);
        assert_eq!(t.push(true), Some(Transition::Opened));
        assert!(t.is_open());
        // Over again resets the clean run.
        assert_eq!(t.push(false), None);
        assert_eq!(t.push(false), None);
        assert_eq!(t.push(true), None);
        assert_eq!(t.push(false), None);
        assert_eq!(t.push(false), None);
        assert_eq!(t.push(false), Some(Transition::Closed));
        // One spike after closing is not enough under 2 of 3.
        assert_eq!(t.push(true), None);
        assert_eq!(t.push(false), None);
        assert_eq!(t.push(false), None);
        assert_eq!(t.push(true), None);
    }

    #[test]
    fn isolated_spikes_never_open_two_of_three() {
        let mut t = Tracker::new(k("2 of 3"), 2);
        for i in 0..100 {
            assert_eq!(t.push(i % 3 == 0), None, "step {i}");
        }
    }

    #[test]
    fn one_of_one_opens_at_once() {
        let mut t = Tracker::new(k("1 of 1"), 1);
        assert_eq!(t.push(true), Some(Transition::Opened));
        assert_eq!(t.push(false), Some(Transition::Closed));
    }

    proptest! {
        /// Opened and Closed alternate, starting with Opened, and an
        /// incident opens only when k of the last n steps were over.
        #[test]
        fn transitions_alternate(steps in proptest::collection::vec(any::<bool>(), 0..300),
                                 kk in 1u32..6, extra in 0u32..6, m in 1u32..8) {
            let rule = KOfN { k: kk, n: kk + extra };
            let mut t = Tracker::new(rule, m);
            let mut open = false;
            for (i, &over) in steps.iter().enumerate() {
                match t.push(over) {
                    Some(Transition::Opened) => {
                        prop_assert!(!open);
                        prop_assert!(over, "an incident opens on a step over the threshold");
                        let lo = (i + 1).saturating_sub(rule.n as usize);
                        let recent = steps[lo..=i].iter().filter(|&&b| b).count();
                        prop_assert!(recent >= rule.k as usize);
                        open = true;
                    }
                    Some(Transition::Closed) => {
                        prop_assert!(open);
                        let lo = (i + 1).saturating_sub(m as usize);
                        prop_assert!(i + 1 >= m as usize);
                        prop_assert!(steps[lo..=i].iter().all(|&b| !b));
                        open = false;
                    }
                    None => {}
                }
                prop_assert_eq!(open, t.is_open());
            }
        }
    }
}
