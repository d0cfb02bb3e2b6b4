//! What the layer makes of a response from your logs.
//!
//! ```sh
//! cargo run --example classify -- 403 examples/bodies/stale.json
//! pbpaste | cargo run --example classify -- 403
//! cargo run --example classify -- 401 --header 'WWW-Authenticate: Bearer error="invalid_token"' < /dev/null
//! ```
//!
//! Prints the verdict and what the layer does about it. Invalid input gets a one-line message
//! on stderr and exit code 2.

use std::io::{self, Read};
use std::process::ExitCode;

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};
use xai_oauth_recovery::{classify, StaleReason, Verdict};

const USAGE: &str = "usage: classify <status> [body-file|-] [--header 'Name: value']...  (the body is read from stdin without a file)";

/// The layer's default `max_error_body_bytes`: larger 401/403 bodies are not classified.
const DEFAULT_MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// What `classify` was asked.
#[derive(Debug)]
struct Input {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

/// What to do after reading the arguments.
#[derive(Debug)]
enum Command {
    Help,
    Classify {
        status: StatusCode,
        headers: HeaderMap,
        body_file: Option<String>,
    },
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Command, String> {
    let mut args = args.into_iter();
    let mut status = None;
    let mut body_file = None;
    let mut headers = HeaderMap::new();
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(Command::Help);
        } else if let Some(header) = arg.strip_prefix("--header=") {
            add_header(&mut headers, header)?;
        } else if arg == "--header" || arg == "-H" {
            let header = args
                .next()
                .ok_or_else(|| format!("{arg} needs a value such as 'WWW-Authenticate: Bearer'"))?;
            add_header(&mut headers, &header)?;
        } else if arg.starts_with('-') && arg != "-" {
            return Err(format!("unknown option `{arg}`; {USAGE}"));
        } else if status.is_none() {
            status = Some(parse_status(&arg)?);
        } else if body_file.is_none() {
            body_file = Some(arg);
        } else {
            return Err(format!("unexpected argument `{arg}`; {USAGE}"));
        }
    }
    let status = status.ok_or_else(|| format!("a status such as 403 is needed; {USAGE}"))?;
    Ok(Command::Classify {
        status,
        headers,
        body_file: body_file.filter(|file| file != "-"),
    })
}

fn parse_status(arg: &str) -> Result<StatusCode, String> {
    let code: u16 = arg
        .parse()
        .map_err(|_| format!("the status `{arg}` is not a number such as 403"))?;
    StatusCode::from_u16(code).map_err(|_| {
        format!("the status {code} is out of range: HTTP statuses run from 100 to 999")
    })
}

fn add_header(headers: &mut HeaderMap, header: &str) -> Result<(), String> {
    let (name, value) = header
        .split_once(':')
        .ok_or_else(|| format!("the header `{header}` has no `:`; write it as 'Name: value'"))?;
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| format!("`{}` is not a valid header name", name.trim()))?;
    let value = HeaderValue::from_str(value.trim())
        .map_err(|_| format!("the value of header `{name}` is not a valid header value"))?;
    headers.append(name, value);
    Ok(())
}

fn read_body(body_file: Option<&str>, stdin: impl Read) -> Result<Vec<u8>, String> {
    match body_file {
        Some(path) => std::fs::read(path).map_err(|e| format!("cannot read `{path}`: {e}")),
        None => {
            let mut body = Vec::new();
            let mut stdin = stdin;
            stdin
                .read_to_end(&mut body)
                .map_err(|e| format!("cannot read the body from stdin: {e}"))?;
            Ok(body)
        }
    }
}

/// The verdict and what the layer does about it, in words.
fn explain(input: &Input) -> String {
    let Input {
        status,
        headers,
        body,
    } = input;
    if *status != StatusCode::UNAUTHORIZED && *status != StatusCode::FORBIDDEN {
        return format!(
            "not classified: only 401 and 403 responses are inspected; a {status} passes through untouched, its body streaming"
        );
    }
    if body.len() > DEFAULT_MAX_ERROR_BODY_BYTES {
        return format!(
            "not classified: the body has {} bytes, more than the {} the layer buffers by default (max_error_body_bytes); the response passes through whole, nothing is refreshed",
            body.len(),
            DEFAULT_MAX_ERROR_BODY_BYTES
        );
    }
    const RECOVER: &str = "the layer refreshes the credential once and retries the request once";
    const UNCHANGED: &str = "refreshing cannot help, the response is handed back unchanged";
    match classify(*status, headers, body) {
        Verdict::StaleToken(reason) => {
            let why = match reason {
                StaleReason::Wke(reason) => format!("unauthenticated:{reason}"),
                StaleReason::TokenNotValidated => {
                    "the OAuth2 access token could not be validated".to_owned()
                }
                StaleReason::InvalidToken => {
                    "WWW-Authenticate: Bearer error=\"invalid_token\"".to_owned()
                }
                StaleReason::Unauthorized => "a 401 with nothing more specific".to_owned(),
                other => format!("{other:?}"),
            };
            format!("stale token ({why}): {RECOVER}")
        }
        Verdict::Entitlement => format!(
            "entitlement: this xAI account has no active Grok subscription (manage subscriptions at https://grok.com); {UNCHANGED}"
        ),
        Verdict::Billing => format!(
            "billing: this xAI account is out of credits or over its spending limit; {UNCHANGED}"
        ),
        Verdict::Unrecognized => format!(
            "unrecognized {status}: nothing in it says the token is stale, and a 403 is never refreshed on a guess; the response is handed back unchanged"
        ),
        other => format!("{other:?}: the response is handed back unchanged"),
    }
}

fn run(args: impl IntoIterator<Item = String>, stdin: impl Read) -> Result<String, String> {
    match parse_args(args)? {
        Command::Help => Ok(USAGE.to_owned()),
        Command::Classify {
            status,
            headers,
            body_file,
        } => {
            let body = read_body(body_file.as_deref(), stdin)?;
            Ok(explain(&Input {
                status,
                headers,
                body,
            }))
        }
    }
}

fn main() -> ExitCode {
    match run(std::env::args().skip(1), io::stdin().lock()) {
        Ok(message) => {
            println!("{message}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    fn body_file(name: &str) -> String {
        format!("{}/examples/bodies/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    fn run_file(status: &str, name: &str) -> Result<String, String> {
        run(args(&[status, &body_file(name)]), io::empty())
    }

    #[test]
    fn explains_the_sample_bodies() {
        assert_eq!(
            run_file("403", "stale.json").as_deref(),
            Ok("stale token (unauthenticated:bad-credentials): the layer refreshes the credential once and retries the request once")
        );
        assert_eq!(
            run_file("403", "entitlement.json").as_deref(),
            Ok("entitlement: this xAI account has no active Grok subscription (manage subscriptions at https://grok.com); refreshing cannot help, the response is handed back unchanged")
        );
        assert!(run_file("403", "billing.json").is_ok_and(|m| m.starts_with("billing: ")));
        assert!(run_file("403", "generic.json")
            .is_ok_and(|m| m.starts_with("unrecognized 403 Forbidden: ")));
        assert!(run_file("401", "generic.json").is_ok_and(|m| m.starts_with("stale token (a 401 ")));
        assert!(run_file("200", "stale.json").is_ok_and(|m| m.starts_with("not classified: ")));
    }

    #[test]
    fn reads_stdin_and_headers() {
        let stale = run(args(&["403"]), &include_bytes!("bodies/stale.json")[..]);
        assert!(stale.is_ok_and(|m| m.starts_with("stale token (unauthenticated:bad-credentials)")));
        let challenge = run(
            args(&[
                "401",
                "-",
                "--header",
                "WWW-Authenticate: Bearer realm=\"x\", error=\"invalid_token\"",
            ]),
            io::empty(),
        );
        assert!(challenge.is_ok_and(|m| m.contains("Bearer error=\"invalid_token\"")));
        let big = vec![b' '; DEFAULT_MAX_ERROR_BODY_BYTES + 1];
        assert!(run(args(&["403"]), &big[..]).is_ok_and(|m| m.contains("more than the 65536")));
    }

    #[test]
    fn invalid_input_is_a_one_line_error() {
        for bad in [
            &[][..],
            &["abc"],
            &["40x"],
            &["1000"],
            &["99"],
            &["-5"],
            &["403", "a", "b"],
            &["403", "--header"],
            &["403", "--header", "no colon"],
            &["403", "--header", "bad name: x"],
            &["403", "--verbose"],
        ] {
            let error = run(args(bad), io::empty());
            assert!(
                error.as_ref().is_err_and(|e| !e.contains('\n')),
                "{bad:?}: {error:?}"
            );
        }
        let missing = run_file("403", "no-such-body.json");
        assert!(missing.is_err_and(|e| e.starts_with("cannot read `")));
        assert!(run(args(&["--help"]), io::empty()).is_ok_and(|m| m.starts_with("usage: ")));
    }
}
