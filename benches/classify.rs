//! `classify` against a naive serde_json classifier and a single `memmem` scan (the floor).
//!
//! `cargo bench --bench classify` measures the three on xAI's wire bodies and on 64 KiB
//! bodies, then prints the ratios from criterion's estimates of this run:
//! naive / ours (target: >= 3) and ours / floor (target: <= 3 on 64 KiB).

#[path = "support/classify.rs"]
mod bodies;
#[path = "support/estimates.rs"]
mod estimates;

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use bodies::{cases, interleaved, naive_classify, Case, MARKER};
use criterion::Criterion;
use estimates::{criterion_dir, estimate};
use http::{HeaderMap, StatusCode};
use memchr::memmem;
use xai_oauth_recovery::classify;

fn bench(c: &mut Criterion, cases: &[Case]) {
    let headers = HeaderMap::new();
    let floor = memmem::Finder::new(MARKER);
    for case in cases {
        let ours = classify(StatusCode::FORBIDDEN, &headers, &case.body);
        let naive = naive_classify(StatusCode::FORBIDDEN, &headers, &case.body);
        assert_eq!(ours, naive, "{}: the naive classifier disagrees", case.name);

        let mut group = c.benchmark_group(case.name);
        group.bench_function("ours", |b| {
            b.iter(|| classify(StatusCode::FORBIDDEN, &headers, black_box(&case.body)))
        });
        group.bench_function("naive", |b| {
            b.iter(|| naive_classify(StatusCode::FORBIDDEN, &headers, black_box(&case.body)))
        });
        group.bench_function("floor", |b| b.iter(|| floor.find(black_box(&case.body))));
        group.finish();
    }
}

fn table(title: &str, rows: impl IntoIterator<Item = (&'static str, usize, [Option<f64>; 3])>) {
    println!();
    println!("{title}");
    println!(
        "{:<20} {:>7} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "body", "bytes", "ours ns", "naive ns", "floor ns", "naive/ours", "ours/floor"
    );
    let show = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.1}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "n/a".to_owned(),
    };
    for (name, bytes, [ours, naive, floor]) in rows {
        println!(
            "{:<20} {:>7} {:>12} {:>12} {:>12} {:>12} {:>12}",
            name,
            bytes,
            show(ours),
            show(naive),
            show(floor),
            ratio(naive, ours),
            ratio(ours, floor),
        );
    }
}

fn report(cases: &[Case], since: SystemTime) {
    let dir = criterion_dir();
    table(
        &format!(
            "classify: criterion's typical estimates from this run ({})",
            dir.display()
        ),
        cases.iter().map(|case| {
            let times = ["ours", "naive", "floor"].map(|f| estimate(&dir, case.name, f, since));
            (case.name, case.body.len(), times)
        }),
    );
    table(
        "classify: best of 300 interleaved batches (the three under the same load)",
        cases
            .iter()
            .map(|case| (case.name, case.body.len(), interleaved(case).map(Some))),
    );
    println!();
    println!("targets: naive/ours >= 3 on every body; ours/floor <= 3 on the 64 KiB bodies");
}

fn main() {
    let since = SystemTime::now() - Duration::from_secs(1);
    let cases = cases();
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500))
        .sample_size(50)
        .configure_from_args();
    bench(&mut c, &cases);
    c.final_summary();
    // `cargo bench` passes `--bench`; `cargo test --benches` runs each function once, without.
    if std::env::args().any(|arg| arg == "--bench") {
        report(&cases, since);
    }
}
