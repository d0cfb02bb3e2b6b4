//! What the classify benchmarks share: xAI's wire bodies, 64 KiB bodies, the naive serde_json
//! classifier, and best-of timings of the three measured in alternation.

use std::hint::black_box;
use std::time::Instant;

use http::header::WWW_AUTHENTICATE;
use http::{HeaderMap, StatusCode};
use memchr::memmem;
use serde_json::Value;
use xai_oauth_recovery::{classify, StaleReason, Verdict};

const STALE: &str = r#"{"code":"The caller does not have permission to execute the specified operation","error":"The OAuth2 access token could not be validated. [WKE=unauthenticated:bad-credentials]"}"#;
const ENTITLEMENT: &str = r#"{"code":"The caller does not have permission to execute the specified operation","error":"You have either run out of available resources or do not have an active Grok subscription. Manage subscriptions at https://grok.com"}"#;
const GENERIC: &str = r#"{"code":"The caller does not have permission to execute the specified operation","error":"Forbidden"}"#;
const BILLING: &str = r#"{"code":"personal-team-blocked:spending-limit","error":"You have run out of credits or need a Grok subscription..."}"#;

pub(crate) const MARKER: &[u8] = b"[WKE=unauthenticated:";

/// Ordinary English for the filler, as API logs and chat transcripts carry it.
const PROSE: [&str; 12] = [
    "The request was received by the gateway and forwarded to the inference cluster.",
    "Retrying after a short delay usually resolves transient network errors.",
    "Please check the request payload for missing fields before sending it again.",
    "The model returned a partial answer because the output limit was reached.",
    "Streaming responses arrive as server-sent events, one chunk per line.",
    "Each conversation keeps its own history, which is trimmed when it grows too long.",
    "Our records show that the upload finished successfully at noon on Tuesday.",
    "Latency was higher than usual while the region recovered from maintenance.",
    "Function calls let the assistant fetch weather data, search documents, or run code.",
    "If the problem persists, contact support with the request identifier shown below.",
    "The cache was warmed up with the most frequently requested documents of the week.",
    "Tokens are counted for both the prompt and the completion of every request.",
];

/// About 64 KiB of JSON log records with English messages, none of the rules' phrases.
fn filler() -> String {
    let mut out = String::from(r#"{"code":"internal","error":"Request failed","details":["#);
    let mut i = 0usize;
    while out.len() < 64 * 1024 - 400 {
        let message = PROSE.get(i % PROSE.len()).copied().unwrap_or_default();
        out.push_str(&format!(
            r#"{{"id":"req_{i:06}","ts":"2025-06-01T12:{:02}:{:02}Z","level":"info","path":"/v1/chat/completions","status":200,"latency_ms":{},"message":"{message}"}},"#,
            i / 60 % 60,
            i % 60,
            120 + i * 7 % 900,
        ));
        i += 1;
    }
    out.push_str(r#"{"id":"end"}]}"#);
    out
}

/// The filler with a stale-token marker in its last message, near its end.
fn filler_with_marker() -> String {
    let mut body = filler();
    let key = r#""message":""#;
    let at = body.rfind(key).map_or(0, |i| i + key.len());
    body.insert_str(at, "[WKE=unauthenticated:bad-credentials] ");
    body
}

/// The same decisions made the obvious way: parse the JSON, gather its strings, lowercase
/// them, look for the phrases.
pub(crate) fn naive_classify(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Verdict {
    fn gather(value: &Value, code: &mut Vec<String>, text: &mut String) {
        match value {
            Value::String(s) => {
                text.push_str(&s.to_lowercase());
                text.push('\n');
            }
            Value::Array(items) => items.iter().for_each(|v| gather(v, code, text)),
            Value::Object(map) => {
                for (key, v) in map {
                    if let (true, Value::String(s)) = (key.eq_ignore_ascii_case("code"), v) {
                        code.push(s.to_lowercase());
                    }
                    gather(v, code, text);
                }
            }
            _ => {}
        }
    }
    fn reason(rest: &str) -> Option<String> {
        let end = rest
            .find(|c: char| c == ']' || c == '"' || c.is_whitespace())
            .unwrap_or(rest.len());
        Some(rest.get(..end)?.to_owned()).filter(|r| !r.is_empty())
    }

    if status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN {
        return Verdict::Unrecognized;
    }
    let (mut codes, mut text) = (Vec::new(), String::new());
    match serde_json::from_slice::<Value>(body) {
        Ok(value) => gather(&value, &mut codes, &mut text),
        Err(_) => text = String::from_utf8_lossy(body).to_lowercase(),
    }
    let bracketed = text
        .find("[wke=unauthenticated:")
        .and_then(|i| reason(text.get(i + 21..)?));
    let coded = codes
        .iter()
        .find_map(|c| reason(c.strip_prefix("unauthenticated:")?));
    if let Some(reason) = bracketed.or(coded) {
        return Verdict::StaleToken(StaleReason::Wke(reason));
    }
    if text.contains("oauth2 access token could not be validated") {
        return Verdict::StaleToken(StaleReason::TokenNotValidated);
    }
    let invalid_token = headers.get_all(WWW_AUTHENTICATE).iter().any(|v| {
        let v = String::from_utf8_lossy(v.as_bytes()).to_lowercase();
        v.contains("bearer") && v.contains("invalid_token")
    });
    if invalid_token {
        return Verdict::StaleToken(StaleReason::InvalidToken);
    }
    let all = format!("{}\n{text}", codes.join("\n"));
    if all.contains("personal-team-blocked") || all.contains("spending-limit") {
        return Verdict::Billing;
    }
    let grok = all.contains("grok");
    if all.contains("do not have an active grok subscription")
        || (grok && all.contains("out of available resources"))
        || (grok && all.contains("does not have permission"))
    {
        return Verdict::Entitlement;
    }
    if status == StatusCode::UNAUTHORIZED {
        Verdict::StaleToken(StaleReason::Unauthorized)
    } else {
        Verdict::Unrecognized
    }
}

pub(crate) struct Case {
    pub(crate) name: &'static str,
    pub(crate) body: Vec<u8>,
}

pub(crate) fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "wire_stale_wke",
            body: STALE.into(),
        },
        Case {
            name: "wire_entitlement",
            body: ENTITLEMENT.into(),
        },
        Case {
            name: "wire_generic_403",
            body: GENERIC.into(),
        },
        Case {
            name: "wire_billing",
            body: BILLING.into(),
        },
        Case {
            name: "64k_no_marker",
            body: filler().into(),
        },
        Case {
            name: "64k_marker_at_end",
            body: filler_with_marker().into(),
        },
    ]
}

/// Best-of timings (ns per call) of ours, naive and floor, measured in alternation so that the
/// three see the same load: on a shared machine, the ratio of their uncontended costs.
pub(crate) fn interleaved(case: &Case) -> [f64; 3] {
    let headers = HeaderMap::new();
    let finder = memmem::Finder::new(MARKER);
    let body = &case.body;
    let ours = || {
        black_box(classify(StatusCode::FORBIDDEN, &headers, black_box(body)));
    };
    let naive = || {
        black_box(naive_classify(
            StatusCode::FORBIDDEN,
            &headers,
            black_box(body),
        ));
    };
    let floor = || {
        black_box(finder.find(black_box(body)));
    };
    let functions: [&dyn Fn(); 3] = [&ours, &naive, &floor];
    // Enough calls per batch for about 20 µs.
    let calls = functions.map(|f| {
        let start = Instant::now();
        f();
        let once = start.elapsed().as_nanos().max(1);
        (20_000 / once).clamp(1, 100_000) as u32
    });
    let mut best = [f64::MAX; 3];
    for _ in 0..300 {
        for ((f, calls), best) in functions.iter().zip(calls).zip(&mut best) {
            let start = Instant::now();
            for _ in 0..calls {
                f();
            }
            *best = best.min(start.elapsed().as_nanos() as f64 / f64::from(calls));
        }
    }
    best
}
