//! Every performance target, measured in one run, in one table.
//!
//! `cargo bench --bench report` measures the crate beside its baselines with its own timing
//! loops: interleaved best-of batches, so that both sides of each ratio see the same load on a
//! shared machine. It prints the measured ratios next to their targets and exits with status 1
//! when one is missed. `cargo bench --bench classify` and `cargo bench --bench layer` measure
//! the same scenarios with criterion.

#[path = "support/classify.rs"]
mod bodies;
#[path = "support/scenarios.rs"]
mod scenarios;

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::Instant;

use scenarios::{memory, runtime, Happy, Loopback, Recovery, Storm};

/// Best time per call (ns) of each of `N` functions, measured in alternation: `rounds` times,
/// each function runs a batch of `calls` calls (`run(which, calls)`) and keeps its fastest.
fn interleaved<const N: usize>(
    rounds: usize,
    calls: u32,
    mut run: impl FnMut(usize, u32),
) -> [f64; N] {
    let mut best = [f64::MAX; N];
    for _ in 0..rounds {
        for (which, best) in best.iter_mut().enumerate() {
            let start = Instant::now();
            run(which, calls);
            *best = best.min(start.elapsed().as_nanos() as f64 / f64::from(calls));
        }
    }
    best
}

/// How a measured value compares with its target.
#[derive(Clone, Copy)]
enum Target {
    AtLeast(f64),
    AtMost(f64),
    Exactly(f64),
    /// Shown, not checked.
    Aim(f64),
}

impl Target {
    fn met(self, value: f64) -> Option<bool> {
        match self {
            Target::AtLeast(t) => Some(value >= t),
            Target::AtMost(t) => Some(value <= t),
            Target::Exactly(t) => Some(value == t),
            Target::Aim(_) => None,
        }
    }

    fn show(self, unit: &str) -> String {
        match self {
            Target::AtLeast(t) => format!(">= {t}{unit}"),
            Target::AtMost(t) => format!("<= {t}{unit}"),
            Target::Exactly(t) => format!("== {t}{unit}"),
            Target::Aim(t) => format!("aim {t}{unit}"),
        }
    }
}

struct Row {
    bench: &'static str,
    what: String,
    detail: String,
    value: f64,
    unit: &'static str,
    target: Target,
}

fn main() {
    // `cargo test --benches` runs bench targets without `--bench`: a smoke run, no timings.
    let full = std::env::args().any(|arg| arg == "--bench");
    let scale = |n: usize| if full { n } else { 1 };
    let mut rows = Vec::new();
    let mut row = |bench, what: String, detail: String, value, unit, target| {
        rows.push(Row {
            bench,
            what,
            detail,
            value,
            unit,
            target,
        })
    };

    let cases = bodies::cases();
    for case in &cases {
        let [ours, naive, floor] = if full {
            bodies::interleaved(case)
        } else {
            [1.0; 3]
        };
        let times = format!("ours {ours:.0} ns, naive {naive:.0} ns");
        row(
            "classify",
            format!("naive/ours {}", case.name),
            times,
            naive / ours,
            "x",
            Target::AtLeast(3.0),
        );
        if case.body.len() > 60_000 {
            let times = format!("ours {ours:.0} ns, memmem {floor:.0} ns");
            row(
                "classify",
                format!("ours/memmem {}", case.name),
                times,
                ours / floor,
                "x",
                Target::AtMost(3.0),
            );
        }
    }

    let mut happy = Happy::new();
    let [bare, auth, layer, eager, floor] = interleaved::<5>(scale(300), 2_000, |which, calls| {
        for _ in 0..calls {
            black_box(happy.run(which));
        }
    });
    let ratios = [
        (
            "layer/AddAuthorization",
            format!("layer {layer:.0} ns, AddAuthorization {auth:.0} ns, bare {bare:.0} ns"),
            layer / auth,
            Target::AtMost(1.25),
        ),
        // DESIGN: an eager `clone_request` retry is what the layer must not pay on the 2xx path.
        (
            "layer/(AddAuthorization + eager retry)",
            format!("layer {layer:.0} ns, AddAuthorization + tower retry {eager:.0} ns"),
            layer / eager,
            Target::AtMost(1.0),
        ),
        // What the 2xx target asks of any design that can replay a streaming body: shown beside
        // the target, not checked (it is a baseline, not the crate).
        (
            "replay floor/AddAuthorization",
            format!("replay floor {floor:.0} ns, AddAuthorization {auth:.0} ns"),
            floor / auth,
            Target::Aim(1.25),
        ),
        (
            "layer/replay floor",
            format!("layer {layer:.0} ns, replay floor {floor:.0} ns"),
            layer / floor,
            Target::Aim(1.0),
        ),
    ];
    for (what, times, ratio, target) in ratios {
        row("happy", what.into(), times, ratio, "x", target);
    }
    let [bare, auth, layer, eager, floor] = happy.allocations();
    let counts = format!(
        "layer {layer:.2}, AddAuthorization {auth:.2}, bare {bare:.2}, eager retry {eager:.2}, replay floor {floor:.2}"
    );
    row(
        "happy",
        "allocations added per request".into(),
        counts,
        layer - auth,
        "",
        Target::Aim(0.0),
    );

    let rt = runtime();
    let mut recovery = Recovery::new();
    let [baseline, layer] = interleaved::<2>(scale(100), 50, |which, calls| {
        rt.block_on(async {
            for _ in 0..calls {
                black_box(match which {
                    0 => recovery.baseline().await,
                    _ => recovery.layer().await,
                });
            }
        })
    });
    let times = format!("layer {layer:.0} ns, 2 inner + 1 refresher {baseline:.0} ns");
    row(
        "recovery",
        "added per recovered request".into(),
        times,
        (layer - baseline) / 1000.0,
        " us",
        Target::AtMost(10.0),
    );

    let mut storm = Storm::new();
    for (tasks, how) in [(false, "one task, join_all"), (true, "a task each")] {
        let mut refreshes = 0;
        let [plain, stale] = interleaved::<2>(scale(7), 1, |which, _| {
            let calls = rt.block_on(storm.run(which == 1, tasks));
            if which == 1 {
                refreshes = calls;
            }
        });
        let detail = format!("{} concurrent requests, {how}", Storm::REQUESTS);
        row(
            "storm",
            format!("refresher calls ({how})"),
            detail,
            refreshes as f64,
            "",
            Target::Exactly(1.0),
        );
        let times = format!("stale {:.1} ms, plain {:.1} ms", stale / 1e6, plain / 1e6);
        row(
            "storm",
            format!("stale/plain ({how})"),
            times,
            stale / plain,
            "x",
            Target::AtMost(3.0),
        );
    }

    let mut loopback = rt.block_on(Loopback::start());
    let [plain, layer] = interleaved::<2>(scale(60), 25, |which, calls| {
        rt.block_on(async {
            for _ in 0..calls {
                black_box(loopback.run(which == 1).await);
            }
        })
    });
    let times = format!(
        "layer {:.1} us, plain {:.1} us",
        layer / 1000.0,
        plain / 1000.0
    );
    row(
        "loopback",
        "layer/plain".into(),
        times,
        layer / plain,
        "x",
        Target::AtMost(1.03),
    );

    if full {
        for (name, bytes) in memory(&rt) {
            let detail = format!("{bytes} bytes");
            row(
                "memory",
                format!("peak growth, {name}"),
                detail,
                bytes as f64 / (1 << 20) as f64,
                " MiB",
                Target::AtMost(4.0),
            );
        }
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "| bench | measure | measured | target | met | detail |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    let mut missed = 0;
    for row in &rows {
        let met = match row.target.met(row.value) {
            Some(true) => "yes",
            Some(false) => {
                missed += 1;
                "**no**"
            }
            None => "-",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.3}{} | {} | {} | {} |",
            row.bench,
            row.what,
            row.value,
            row.unit,
            row.target.show(row.unit),
            met,
            row.detail
        );
    }
    println!();
    print!("{out}");
    if !full {
        return;
    }
    if missed > 0 {
        println!();
        println!("{missed} target(s) missed");
        std::process::exit(1);
    }
    println!();
    println!("every target met");
}
