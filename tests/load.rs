//! Load with invariants: thousands of concurrent requests on a two-worker runtime over a random
//! mix of answers, credentials going stale and signed in again under them, and a refresher that
//! is slow, fails, hangs and panics at random.
//!
//! After every round: every request ended exactly once with its own response, byte for byte;
//! no request made more than two inner calls (exactly as many as its outcome says); refreshes
//! never overlapped on a credential, never replaced a token twice, and stayed within the budget;
//! no task, body or handle is left behind, round after round.
//!
//! `cargo run --release --example soak -- --seconds N` runs the same kind of load for as long as
//! asked, over real HTTP.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use support::chaos::{ChaosApi, ChaosRefresher, Settings, World};
use tokio::runtime::Runtime;
use tower::Layer;
use xai_oauth_recovery::{Credentials, RefreshBudget, XaiOAuthRecovery, XaiOAuthRecoveryLayer};

type Svc = XaiOAuthRecovery<ChaosApi, ChaosRefresher>;

/// Hang detector only: a round that has not ended by then is reported as hung.
const DEADLINE: Duration = Duration::from_secs(120);

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn service(world: &Arc<World>, credentials: &Credentials, budget: u32) -> Svc {
    XaiOAuthRecoveryLayer::new(
        credentials.clone(),
        ChaosRefresher {
            world: world.clone(),
        },
    )
    .refresh_budget(RefreshBudget::new(budget, Duration::from_secs(3600)))
    .refresh_timeout(Duration::from_millis(100))
    .max_replay_body_bytes(1024)
    .layer(ChaosApi {
        world: world.clone(),
    })
}

/// Sends `n` concurrent requests with ids from `first`, some of which first turn the world
/// upside down (a token goes stale, a credential is signed in again), and waits for all of
/// them and for every task they started.
async fn round(world: &Arc<World>, svc: &Svc, credentials: &Credentials, first: u64, n: u64) {
    let mut tasks = Vec::with_capacity(n as usize);
    for id in first..first + n {
        let world = world.clone();
        let svc = svc.clone();
        let credentials = credentials.clone();
        tasks.push(tokio::spawn(async move {
            if id % 97 == 0 {
                world.chaos(&credentials);
            }
            (id, world.run_one(svc, id).await)
        }));
    }
    let all = async {
        let mut calls = HashMap::new();
        for task in tasks {
            let (id, n) = task.await.expect("a request task panicked");
            assert!(calls.insert(id, n).is_none(), "request {id} ended twice");
        }
        calls
    };
    let calls = tokio::time::timeout(DEADLINE, all)
        .await
        .expect("requests still running at the deadline: a hang");
    world.end_round(&calls);
    // The refresh tasks end right after their last waiter is answered: wait for them.
    let metrics = tokio::runtime::Handle::current().metrics();
    tokio::time::timeout(DEADLINE, async {
        while metrics.num_alive_tasks() > 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("refresh tasks still running at the deadline: a hang");
}

fn assert_invariants(world: &World, budget: u32, requests: u64) {
    let violations = world.violations();
    assert!(
        violations.is_empty(),
        "seed {}: {} violations, first ones: {:#?}",
        world.settings.seed,
        violations.len(),
        &violations[..violations.len().min(20)]
    );
    let counts = world.counts();
    assert_eq!((counts.requests, counts.ended), (requests, requests));
    assert_eq!(counts.bodies_verified + counts.errors, requests);
    for (id, calls) in world.refresher_calls() {
        assert!(
            calls <= u64::from(budget),
            "`{id}`: {calls} refresher calls, budget {budget}"
        );
    }
    assert_eq!(world.bodies_alive(), 0, "bodies left behind");
}

#[test]
fn ten_thousand_concurrent_requests_keep_every_invariant() {
    let budget = 24;
    let world = World::new(Settings {
        seed: 0x10ad,
        ..Settings::default()
    });
    let credentials = world.credentials();
    let svc = service(&world, &credentials, budget);
    let baseline = Arc::strong_count(&world);

    runtime().block_on(round(&world, &svc, &credentials, 0, 10_000));

    assert_invariants(&world, budget, 10_000);
    let counts = world.counts();
    // The mix really was mixed: every kind of outcome happened.
    for status in [200, 403, 503] {
        assert!(
            counts.statuses.get(&status).is_some_and(|&n| n > 100),
            "{counts:?}"
        );
    }
    assert!(
        counts.retried > 0 && counts.errors > 0 && counts.faults > 0,
        "{counts:?}"
    );
    assert!(counts.refresher_calls > 0, "{counts:?}");
    assert_eq!(Arc::strong_count(&world), baseline, "handles left behind");
}

#[test]
fn repeated_rounds_leave_nothing_behind() {
    let budget = 1_000;
    let world = World::new(Settings {
        seed: 0x5eed,
        ..Settings::default()
    });
    let credentials = world.credentials();
    let svc = service(&world, &credentials, budget);
    let baseline = Arc::strong_count(&world);
    let runtime = runtime();
    let mut requests = 0;
    for r in 0..4 {
        runtime.block_on(round(&world, &svc, &credentials, r * 1_000, 1_000));
        requests += 1_000;
        assert_invariants(&world, budget, requests);
        assert_eq!(
            Arc::strong_count(&world),
            baseline,
            "round {r}: handles left behind"
        );
        assert_eq!(
            runtime.metrics().num_alive_tasks(),
            0,
            "round {r}: tasks left behind"
        );
    }
    drop(svc);
    assert_eq!(Arc::strong_count(&world), 1);
}

#[test]
fn without_refresher_faults_every_stale_token_recovers() {
    // Only stale tokens go wrong: every request that is not handed back for its budget or its
    // body comes back as it asked.
    let budget = 1_000;
    let world = World::new(Settings {
        seed: 7,
        refresher_faults: false,
        born_stale_per_mille: 0,
        ..Settings::default()
    });
    let credentials = world.credentials();
    let svc = service(&world, &credentials, budget);
    runtime().block_on(round(&world, &svc, &credentials, 0, 3_000));
    assert_invariants(&world, budget, 3_000);
    assert!(world.counts().retried > 0);
}
