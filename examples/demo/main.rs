//! What the layer does for an xAI client, shown against a mock of xAI on 127.0.0.1.
//!
//! ```text
//! cargo run --example demo             # a table, and what the user is told
//! cargo run --example demo -- --json   # one JSON document instead
//! ```
//!
//! Five scenarios, each with an account of its own, send real HTTP requests through
//! `XaiOAuthRecoveryLayer` over hyper-util's client, with `OAuth2Refresher` refreshing at the
//! mock's token endpoint:
//!
//! 1. a stale access token: 403, one refresh, one retry, 200;
//! 2. an account without a Grok subscription: the 403 comes back with a clear message, no refresh;
//! 3. 1,000 concurrent requests on a stale access token: exactly one refresh, 1,000 200s;
//! 4. a revoked refresh token: one token request however many requests, then "sign in again";
//! 5. refreshed tokens that keep failing: the refresh budget ends the loop.
//!
//! Every scenario checks its expectations against the mock's counters, the responses and their
//! `RecoveryReport`s. The demo exits 0 when all of them hold, 1 otherwise (saying which did
//! not), and 2 on bad arguments.

mod scenarios;

use std::fmt::Write as _;
use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use tower::BoxError;

use scenarios::{thousands, Demo, Outcome, Scenario};

const USAGE: &str = "usage: cargo run --example demo [-- --json]";

/// How to print the results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    /// A table, the user-facing messages under it, a progress bar on a terminal.
    Table,
    /// One JSON document, no progress bar.
    Json,
}

/// The `--json` output.
#[derive(Debug, Serialize)]
struct Document<'a> {
    /// Whether every scenario behaved as expected.
    ok: bool,
    /// The mock's address.
    mock: String,
    elapsed_ms: u128,
    scenarios: &'a [Outcome],
}

/// What the command line asks for.
enum Command {
    Run(Format),
    Help,
}

fn parse_args(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Command, String> {
    let mut format = Format::Table;
    for arg in args {
        match arg.to_str() {
            Some("--json") => format = Format::Json,
            Some("-h" | "--help") => return Ok(Command::Help),
            _ => return Err(format!("unexpected argument `{}`", arg.to_string_lossy())),
        }
    }
    Ok(Command::Run(format))
}

#[tokio::main]
async fn main() -> ExitCode {
    let format = match parse_args(std::env::args_os().skip(1)) {
        Ok(Command::Run(format)) => format,
        Ok(Command::Help) => {
            return match writeln!(io::stdout(), "{USAGE}") {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            };
        }
        Err(problem) => {
            let _ = writeln!(io::stderr(), "demo: {problem}; {USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(format).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            let _ = writeln!(io::stderr(), "demo: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Runs every scenario and prints the results; `Ok(false)` when one did not behave as expected.
async fn run(format: Format) -> Result<bool, BoxError> {
    let started = Instant::now();
    let demo = Demo::start()
        .await
        .map_err(|error| format!("cannot start the mock xAI server: {error}"))?;
    let show_progress = format == Format::Table && io::stdout().is_terminal();

    let mut outcomes = Vec::with_capacity(Scenario::ALL.len());
    for scenario in Scenario::ALL {
        let progress = if show_progress && scenario == Scenario::Burst {
            progress_bar(scenario)?
        } else {
            ProgressBar::hidden()
        };
        outcomes.push(scenarios::run(&demo, scenario, &progress).await);
        progress.finish_and_clear();
    }
    let elapsed = started.elapsed();
    let all_expected = outcomes.iter().all(|outcome| outcome.expected);

    let output = match format {
        Format::Table => table(&demo.base_url(), &outcomes, elapsed.as_secs_f64())?,
        Format::Json => {
            let document = Document {
                ok: all_expected,
                mock: demo.base_url(),
                elapsed_ms: elapsed.as_millis(),
                scenarios: &outcomes,
            };
            serde_json::to_string_pretty(&document)? + "\n"
        }
    };
    io::stdout()
        .lock()
        .write_all(output.as_bytes())
        .map_err(|error| format!("cannot write the results: {error}"))?;

    let mut stderr = io::stderr().lock();
    for outcome in outcomes.iter().filter(|outcome| !outcome.expected) {
        writeln!(
            stderr,
            "demo: scenario {} ({}) did not behave as expected: {}",
            outcome.number,
            outcome.scenario,
            outcome.problems.join("; ")
        )?;
    }
    Ok(all_expected)
}

/// A bar that counts the burst's responses as they arrive, drawn on stdout.
fn progress_bar(scenario: Scenario) -> Result<ProgressBar, BoxError> {
    let style = ProgressStyle::with_template(
        "{prefix} [{bar:40.cyan/blue}] {pos:>5}/{len} responses {elapsed}",
    )?
    .progress_chars("=> ");
    let bar = ProgressBar::with_draw_target(
        Some(scenarios::BURST_REQUESTS as u64),
        ProgressDrawTarget::stdout(),
    )
    .with_style(style)
    .with_prefix(format!("scenario {scenario}"));
    Ok(bar)
}

/// The table, then what the user is told in the scenarios where that is the point.
fn table(mock: &str, outcomes: &[Outcome], seconds: f64) -> Result<String, BoxError> {
    let header = [
        "#",
        "scenario",
        "requests",
        "refresher calls",
        "outcome",
        "expected?",
    ];
    let rows: Vec<[String; 6]> = outcomes
        .iter()
        .map(|outcome| {
            [
                outcome.number.to_string(),
                outcome.scenario.to_owned(),
                thousands(outcome.requests),
                outcome.refresher_calls.to_string(),
                outcome.outcome.clone(),
                if outcome.expected { "yes" } else { "NO" }.to_owned(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    // Numbers right-aligned, text left-aligned.
    let right = [false, false, true, true, false, false];
    let line = |cells: &[&str]| {
        let mut line = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let width = widths[i];
            if right[i] {
                line.push_str(&format!("{cell:>width$}"));
            } else {
                line.push_str(&format!("{cell:<width$}"));
            }
            line.push_str("  ");
        }
        line.trim_end().to_owned()
    };

    let mut out = String::new();
    writeln!(
        out,
        "xai-oauth-recovery demo: a mock xAI at {mock}, real HTTP through XaiOAuthRecoveryLayer"
    )?;
    writeln!(out)?;
    writeln!(out, "{}", line(&header))?;
    let rule: Vec<String> = widths.iter().map(|width| "-".repeat(*width)).collect();
    writeln!(
        out,
        "{}",
        line(&rule.iter().map(String::as_str).collect::<Vec<_>>())
    )?;
    for row in &rows {
        writeln!(
            out,
            "{}",
            line(&row.iter().map(String::as_str).collect::<Vec<_>>())
        )?;
    }
    writeln!(out)?;
    writeln!(out, "What the user is told:")?;
    for outcome in outcomes {
        if let Some(message) = &outcome.message {
            writeln!(out, "  {}. {}: {message}", outcome.number, outcome.scenario)?;
        }
    }
    writeln!(out)?;
    let expected = outcomes.iter().filter(|outcome| outcome.expected).count();
    if expected == outcomes.len() {
        writeln!(
            out,
            "All {expected} scenarios behaved as expected ({seconds:.2} s)."
        )?;
    } else {
        writeln!(
            out,
            "{} of {} scenarios did NOT behave as expected ({seconds:.2} s).",
            outcomes.len() - expected,
            outcomes.len()
        )?;
    }
    Ok(out)
}
