//! How many refreshes one credential may spend.
//!
//! # Why a budget and not "retry once"?
//!
//! Each request retries at most once, but a long-running client sends many requests. When the
//! token endpoint hands out tokens that the API keeps rejecting (a revoked grant that still
//! refreshes, a clock skew, a misconfigured audience), every request would refresh once more:
//! refresh, stale 403, refresh, ... for as long as the process lives. A budget per credential
//! bounds that loop whatever the request rate: at most `max_refreshes` refresher calls per
//! `window`, failed ones included. Refreshes that succeed and keep the client working never come
//! near it: access tokens live for hours.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

/// At most `max_refreshes` refresher calls per credential within any `window`.
///
/// The default is 3 refreshes per 5 minutes. Refreshes that fail count. Each credential has its
/// own account: one credential exhausting its budget never affects another.
///
/// ```
/// use std::time::Duration;
/// use xai_oauth_recovery::RefreshBudget;
///
/// let budget = RefreshBudget::new(5, Duration::from_secs(600));
/// assert_eq!(budget.max_refreshes(), 5);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefreshBudget {
    max_refreshes: u32,
    window: Duration,
}

impl RefreshBudget {
    /// At most `max_refreshes` refreshes per credential in any `window`. A budget of zero
    /// refreshes disables refreshing (every stale response is handed back as it is).
    pub const fn new(max_refreshes: u32, window: Duration) -> Self {
        Self {
            max_refreshes,
            window,
        }
    }

    /// The number of refreshes allowed per window.
    pub const fn max_refreshes(&self) -> u32 {
        self.max_refreshes
    }

    /// The window.
    pub const fn window(&self) -> Duration {
        self.window
    }
}

impl Default for RefreshBudget {
    fn default() -> Self {
        Self::new(3, Duration::from_secs(300))
    }
}

/// One credential's spending log: the start times of the refreshes in the current window,
/// never more than the budget allows, so its size is bounded whatever the traffic.
#[derive(Default)]
pub(crate) struct Spent {
    starts: VecDeque<Instant>,
}

impl Spent {
    /// Spends one refresh if the budget allows it at `now`.
    pub(crate) fn try_spend(&mut self, budget: &RefreshBudget, now: Instant) -> bool {
        while let Some(&oldest) = self.starts.front() {
            if now.saturating_duration_since(oldest) >= budget.window {
                self.starts.pop_front();
            } else {
                break;
            }
        }
        let max = budget.max_refreshes as usize;
        if self.starts.len() >= max {
            // Keep no more than this budget can look at.
            let excess = self.starts.len() - max;
            self.starts.drain(..excess);
            return false;
        }
        self.starts.push_back(now);
        true
    }

    /// How many refreshes are counted in the log.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.starts.len()
    }
}

impl fmt::Debug for Spent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spent")
            .field("in_window", &self.starts.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spends_up_to_the_limit_then_refuses_until_the_window_moves() {
        let budget = RefreshBudget::new(3, Duration::from_secs(300));
        let mut spent = Spent::default();
        let t0 = Instant::now();
        assert!(spent.try_spend(&budget, t0));
        assert!(spent.try_spend(&budget, t0 + Duration::from_secs(1)));
        assert!(spent.try_spend(&budget, t0 + Duration::from_secs(2)));
        assert!(!spent.try_spend(&budget, t0 + Duration::from_secs(3)));
        assert!(!spent.try_spend(&budget, t0 + Duration::from_secs(299)));
        // The first refresh leaves the window: one more is allowed, not three.
        assert!(spent.try_spend(&budget, t0 + Duration::from_secs(300)));
        assert!(!spent.try_spend(&budget, t0 + Duration::from_secs(300)));
        assert_eq!(spent.len(), 3);
    }

    #[test]
    fn zero_budget_never_spends() {
        let budget = RefreshBudget::new(0, Duration::from_secs(300));
        let mut spent = Spent::default();
        assert!(!spent.try_spend(&budget, Instant::now()));
        assert_eq!(spent.len(), 0);
    }

    #[test]
    fn log_stays_bounded_by_the_smallest_budget_in_use() {
        let big = RefreshBudget::new(10, Duration::from_secs(300));
        let small = RefreshBudget::new(2, Duration::from_secs(300));
        let mut spent = Spent::default();
        let t0 = Instant::now();
        for i in 0..10 {
            assert!(spent.try_spend(&big, t0 + Duration::from_millis(i)));
        }
        assert!(!spent.try_spend(&small, t0 + Duration::from_millis(20)));
        assert_eq!(spent.len(), 2);
    }

    #[test]
    fn default_is_three_per_five_minutes() {
        let budget = RefreshBudget::default();
        assert_eq!(
            (budget.max_refreshes(), budget.window()),
            (3, Duration::from_secs(300))
        );
    }
}
