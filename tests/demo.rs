//! The scenarios of `cargo run --example demo`, each on a mock xAI of its own and all five in
//! a row on one, as the demo runs them: every expectation the demo checks holds.
#![cfg(feature = "mock")]

#[path = "../examples/demo/scenarios.rs"]
mod scenarios;

use indicatif::ProgressBar;
use scenarios::{
    thousands, Demo, Outcome, Scenario, BURST_REQUESTS, LOOP_BUDGET, LOOP_REQUESTS,
    NO_SUBSCRIPTION_REQUESTS, REVOKED_REQUESTS,
};
use tower::BoxError;

async fn run_alone(scenario: Scenario) -> Result<Outcome, BoxError> {
    let demo = Demo::start().await?;
    let outcome = scenarios::run(&demo, scenario, &ProgressBar::hidden()).await;
    assert_expected(&outcome);
    Ok(outcome)
}

fn assert_expected(outcome: &Outcome) {
    assert!(
        outcome.expected && outcome.problems.is_empty(),
        "scenario {} ({}): {:?}",
        outcome.number,
        outcome.scenario,
        outcome.problems
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_token_is_refreshed_once_and_the_retry_succeeds() -> Result<(), BoxError> {
    let outcome = run_alone(Scenario::StaleToken).await?;
    assert_eq!((outcome.requests, outcome.refresher_calls), (1, 1));
    assert_eq!(outcome.statuses.get(&200), Some(&1));
    assert_eq!(outcome.message, None);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_subscription_is_never_refreshed_and_the_user_is_told() -> Result<(), BoxError> {
    let outcome = run_alone(Scenario::NoSubscription).await?;
    assert_eq!(outcome.requests, NO_SUBSCRIPTION_REQUESTS);
    assert_eq!(outcome.refresher_calls, 0);
    assert_eq!(outcome.statuses.get(&403), Some(&NO_SUBSCRIPTION_REQUESTS));
    assert_eq!(
        outcome.message.as_deref(),
        Some("this xAI account has no active Grok subscription: refreshing cannot help (manage subscriptions at https://grok.com)")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_on_a_stale_token_costs_one_refresh() -> Result<(), BoxError> {
    let outcome = run_alone(Scenario::Burst).await?;
    assert_eq!(outcome.requests, BURST_REQUESTS);
    assert_eq!(outcome.refresher_calls, 1);
    assert_eq!(outcome.statuses.get(&200), Some(&BURST_REQUESTS));
    assert_eq!(outcome.statuses.len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_refresh_token_means_sign_in_again_without_a_storm() -> Result<(), BoxError> {
    let outcome = run_alone(Scenario::Revoked).await?;
    assert_eq!(outcome.requests, REVOKED_REQUESTS);
    assert_eq!(outcome.refresher_calls, 1);
    assert_eq!(outcome.statuses.get(&403), Some(&REVOKED_REQUESTS));
    assert_eq!(
        outcome.message.as_deref(),
        Some("sign in again: the refresh token of credential `dave` was revoked or rejected")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_that_keep_failing_stop_at_the_budget() -> Result<(), BoxError> {
    let outcome = run_alone(Scenario::RefreshLoop).await?;
    assert_eq!(outcome.requests, LOOP_REQUESTS);
    assert_eq!(
        outcome.refresher_calls,
        u64::from(LOOP_BUDGET.max_refreshes())
    );
    assert_eq!(outcome.statuses.get(&403), Some(&LOOP_REQUESTS));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_scenarios_in_a_row_on_one_mock_as_the_demo_runs_them() -> Result<(), BoxError> {
    let demo = Demo::start().await?;
    assert!(demo.base_url().starts_with("http://127.0.0.1:"));
    let mut numbers = Vec::new();
    for scenario in Scenario::ALL {
        let outcome = scenarios::run(&demo, scenario, &ProgressBar::hidden()).await;
        assert_expected(&outcome);
        assert_eq!(outcome.expectation, scenario.expectation());
        assert!(!scenario.to_string().is_empty());
        numbers.push(outcome.number);
    }
    assert_eq!(numbers, [1, 2, 3, 4, 5]);
    Ok(())
}

#[test]
fn thousands_are_grouped() {
    let cases = [
        (0, "0"),
        (7, "7"),
        (999, "999"),
        (1_000, "1,000"),
        (12_345, "12,345"),
        (1_234_567, "1,234,567"),
    ];
    for (n, expected) in cases {
        assert_eq!(thousands(n), expected);
    }
}
