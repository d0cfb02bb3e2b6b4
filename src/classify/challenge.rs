//! RFC 6750 `WWW-Authenticate: Bearer error="invalid_token"` challenges.
//!
//! A `WWW-Authenticate` value is a comma-separated list of challenges (RFC 9110, section
//! 11.6.1): `Basic realm="a", Bearer realm="b", error="invalid_token"`. Commas separate both
//! challenges and the parameters of one challenge; an element that starts with a token not
//! followed by `=` opens a new challenge. Quoted values may hold commas and escapes. Only a
//! Bearer challenge counts; scheme, parameter name and value compare ASCII case-insensitively.

use http::header::WWW_AUTHENTICATE;
use http::HeaderMap;

/// Whether a `WWW-Authenticate` header of `headers` holds a Bearer challenge with
/// `error=invalid_token` (quoted or not).
pub(super) fn bearer_invalid_token(headers: &HeaderMap) -> bool {
    headers
        .get_all(WWW_AUTHENTICATE)
        .iter()
        .any(|value| value_has_bearer_invalid_token(value.as_bytes()))
}

fn value_has_bearer_invalid_token(mut rest: &[u8]) -> bool {
    let mut in_bearer = false;
    loop {
        rest = skip_while(rest, |b| b == b',' || is_space(b));
        let Some(&first) = rest.first() else {
            return false;
        };
        let (token, after) = split_token(rest);
        if token.is_empty() {
            // Not where a token may start: skip a stray quoted string or `=`.
            rest = if first == b'"' {
                skip_value(rest)
            } else {
                rest.get(1..).unwrap_or_default()
            };
            continue;
        }
        let after_space = skip_while(after, is_space);
        if let Some(value) = after_space.strip_prefix(b"=") {
            // `name = value`: a parameter of the current challenge.
            let (matches, remaining) =
                param_value_is(skip_while(value, is_space), b"invalid_token");
            if in_bearer && matches && token.eq_ignore_ascii_case(b"error") {
                return true;
            }
            rest = remaining;
        } else {
            // A token not followed by `=`: the scheme of a new challenge. What follows it in
            // the same element is a parameter or a token68, read by the next round.
            in_bearer = token.eq_ignore_ascii_case(b"bearer");
            rest = after_space;
        }
    }
}

fn is_space(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// Whether `b` may be part of a token (RFC 9110 `tchar`, leniently: any visible byte but the
/// delimiters that matter here, and any non-ASCII byte).
fn is_token_byte(b: u8) -> bool {
    !(b.is_ascii_control() || b == b' ' || b == b',' || b == b'=' || b == b'"')
}

fn skip_while(bytes: &[u8], mut skip: impl FnMut(u8) -> bool) -> &[u8] {
    let start = bytes.iter().position(|&b| !skip(b)).unwrap_or(bytes.len());
    bytes.get(start..).unwrap_or_default()
}

fn split_token(bytes: &[u8]) -> (&[u8], &[u8]) {
    let end = bytes
        .iter()
        .position(|&b| !is_token_byte(b))
        .unwrap_or(bytes.len());
    bytes.split_at(end)
}

/// Skips a token or quoted string and returns what follows it.
fn skip_value(bytes: &[u8]) -> &[u8] {
    param_value_is(bytes, b"").1
}

/// Reads a parameter value (a quoted string, unescaped, or a token) at the start of `bytes`:
/// whether it equals `expected` ASCII case-insensitively, and what follows it.
fn param_value_is<'a>(bytes: &'a [u8], expected: &[u8]) -> (bool, &'a [u8]) {
    let Some(quoted) = bytes.strip_prefix(b"\"") else {
        let (token, rest) = split_token(bytes);
        return (token.eq_ignore_ascii_case(expected), rest);
    };
    let mut expected = expected.iter();
    let mut matches = true;
    let mut escaped = false;
    for (i, &b) in quoted.iter().enumerate() {
        if escaped {
            escaped = false;
        } else if b == b'\\' {
            escaped = true;
            continue;
        } else if b == b'"' {
            let rest = quoted.get(i + 1..).unwrap_or_default();
            return (matches && expected.next().is_none(), rest);
        }
        matches &= expected.next().is_some_and(|e| e.eq_ignore_ascii_case(&b));
    }
    // An unterminated quoted string runs to the end of the value.
    (false, &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has(value: &str) -> bool {
        value_has_bearer_invalid_token(value.as_bytes())
    }

    #[test]
    fn finds_invalid_token_in_a_bearer_challenge() {
        assert!(has(r#"Bearer error="invalid_token""#));
        assert!(has("Bearer error=invalid_token"));
        assert!(has(
            r#"Bearer realm="api.x.ai", error="invalid_token", error_description="The access token expired""#
        ));
        assert!(has(r#"bearer ERROR = "Invalid_Token""#));
        assert!(has(
            r#"Basic realm="a, b", Bearer realm="x", error="invalid_token""#
        ));
        assert!(has(r#"Negotiate dG9rZW4=, Bearer error="invalid_token""#));
        assert!(has(r#"Bearer error="invalid\_token""#));
        assert!(has("Bearer   error=invalid_token  ,scope=x"));
    }

    #[test]
    fn ignores_everything_else() {
        assert!(!has(r#"Basic realm="x", error="invalid_token""#));
        assert!(!has(r#"Bearer realm="x", Basic error="invalid_token""#));
        assert!(!has(r#"Bearer error="insufficient_scope""#));
        assert!(!has(r#"Bearer error_description="invalid_token""#));
        assert!(!has(r#"Bearer error="invalid_token"#));
        assert!(!has(r#"Bearer error="invalid_tokens""#));
        assert!(!has(r#"Bearer realm="error=invalid_token""#));
        assert!(!has("Bearer"));
        assert!(!has(""));
        assert!(!has("=,\"\",=="));
        assert!(!has("Bearer invalid_token"));
        assert!(!has("\"Bearer\" error=invalid_token"));
    }
}
