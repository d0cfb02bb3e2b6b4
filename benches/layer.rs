//! The layer beside its baselines, with criterion.
//!
//! `cargo bench --bench layer` measures, in one run:
//!
//! - `happy`: one 2xx request with a small body through the bare inner service, through
//!   tower-http's `AddAuthorization::bearer` and through the layer (target: layer <= 1.25x
//!   `AddAuthorization`), and the heap allocations per request of each;
//! - `recovery`: a stale 403, a refresh and the retry through the layer, beside two bare calls
//!   and one refresher call (target: <= 10 µs added);
//! - `storm`: 10,000 concurrent requests on one stale credential beside 10,000 plain ones, in
//!   one task (`join_all`) and, as `storm_tasks`, in a task each (targets: exactly 1 refresher
//!   call, <= 3x);
//! - `loopback`: hyper-util's client against a hyper server on 127.0.0.1, with and without the
//!   layer (target: <= 1.03x);
//! - the peak heap growth of a 1 GiB streaming 403 body and of a 1 GiB streaming request body
//!   (target: <= 4 MiB each),
//!
//! then prints the ratios from criterion's estimates of this run. `cargo bench --bench report`
//! measures the same with interleaved best-of batches and checks every target.

#[path = "support/estimates.rs"]
mod estimates;
#[path = "support/scenarios.rs"]
mod scenarios;

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime};

use criterion::Criterion;
use estimates::{criterion_dir, estimate};
use scenarios::{memory, runtime, Happy, Loopback, Recovery, Storm};
use tokio::runtime::Runtime;

fn happy(c: &mut Criterion) {
    let mut happy = Happy::new();
    let mut group = c.benchmark_group("happy");
    for (which, name) in Happy::NAMES.iter().enumerate() {
        group.bench_function(*name, |b| b.iter(|| happy.run(black_box(which))));
    }
    group.finish();
}

fn recovery(c: &mut Criterion, rt: &Runtime) {
    let mut recovery = Recovery::new();
    let mut group = c.benchmark_group("recovery");
    let [baseline, layer] = ["baseline", "layer"];
    group.bench_function(baseline, |b| b.iter(|| rt.block_on(recovery.baseline())));
    group.bench_function(layer, |b| b.iter(|| rt.block_on(recovery.layer())));
    group.finish();
}

fn storm(c: &mut Criterion, rt: &Runtime) {
    let mut storm = Storm::new();
    for (tasks, group) in [(false, "storm"), (true, "storm_tasks")] {
        let mut group = c.benchmark_group(group);
        group.sample_size(10);
        for (stale, name) in [false, true].into_iter().zip(["plain", "stale"]) {
            group.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let calls = rt.block_on(storm.run(stale, tasks));
                        assert_eq!(calls, u64::from(stale), "refresher calls");
                    }
                    start.elapsed()
                })
            });
        }
        group.finish();
    }
}

fn loopback(c: &mut Criterion, rt: &Runtime) {
    let mut loopback = rt.block_on(Loopback::start());
    let mut group = c.benchmark_group("loopback");
    for (layer, name) in [false, true].into_iter().zip(["plain", "layer"]) {
        group.bench_function(name, |b| b.iter(|| rt.block_on(loopback.run(layer))));
    }
    group.finish();
}

fn ratios(since: SystemTime) {
    let dir = criterion_dir();
    let ns = |group: &str, function: &str| estimate(&dir, group, function, since);
    let show = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.1}"));
    println!();
    println!(
        "layer: criterion's typical estimates from this run ({})",
        dir.display()
    );
    let rows = [
        ("happy", "layer", "add_authorization", "<= 1.25x"),
        ("happy", "layer", "add_authorization_eager_retry", "<= 1x"),
        ("happy", "replay_floor", "add_authorization", "(baseline)"),
        ("happy", "layer", "replay_floor", "(baseline)"),
        ("recovery", "layer", "baseline", "<= +10 us"),
        ("storm", "stale", "plain", "<= 3x"),
        ("storm_tasks", "stale", "plain", "<= 3x"),
        ("loopback", "layer", "plain", "<= 1.03x"),
    ];
    println!(
        "{:<12} {:>14} {:>14} {:>10} {:>12} {:>10}",
        "group", "ours ns", "baseline ns", "ratio", "added ns", "target"
    );
    for (group, ours, baseline, target) in rows {
        let (a, b) = (ns(group, ours), ns(group, baseline));
        let ratio = a.zip(b).map(|(a, b)| format!("{:.3}x", a / b));
        let added = a.zip(b).map(|(a, b)| a - b);
        println!(
            "{:<12} {:>14} {:>14} {:>10} {:>12} {:>10}",
            group,
            show(a),
            show(b),
            ratio.unwrap_or_else(|| "n/a".to_owned()),
            show(added),
            target
        );
    }
}

fn main() {
    let since = SystemTime::now() - Duration::from_secs(1);
    let rt = runtime();
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1000))
        .sample_size(30)
        .configure_from_args();
    happy(&mut c);
    recovery(&mut c, &rt);
    storm(&mut c, &rt);
    loopback(&mut c, &rt);
    c.final_summary();
    // `cargo bench` passes `--bench`; `cargo test --benches` runs each function once, without.
    if std::env::args().any(|arg| arg == "--bench") {
        ratios(since);
        let allocations = Happy::new().allocations();
        println!();
        println!("happy: heap allocations per request");
        for (name, n) in Happy::NAMES.iter().zip(allocations) {
            println!("{name:<30} {n:>6.2}");
        }
        println!();
        println!("memory: peak heap growth (target <= 4 MiB)");
        for (name, bytes) in memory(&rt) {
            println!("{name:<18} {:>9.1} KiB", bytes as f64 / 1024.0);
        }
    }
}
