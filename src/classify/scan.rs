//! One pass over a response body for every phrase the rules look for.
//!
//! # Why anchors
//!
//! The rules look for nine phrases, ASCII case-insensitively. An Aho-Corasick automaton over
//! the nine phrases with `ascii_case_insensitive` gets no prefilter (too many distinct first
//! bytes in both cases), so it walks the automaton byte by byte: about 110 µs on a 64 KiB
//! body that one SIMD `memmem` scan covers in 1.4 µs.
//!
//! Instead, each group of phrases is found through a three-byte *anchor* that every phrase of
//! the group contains, chosen for being rare in English prose and JSON (`ed:` of
//! `unauthenticated:`, `h2 ` of `oauth2 access`, `rok` of `grok`, ...). The anchors, in every
//! ASCII case combination, go to aho-corasick's packed (Teddy) searcher, which tests 32 bytes
//! at a time with SIMD. Each anchor's case variants share one Teddy bucket (their low nybbles
//! agree), so a candidate is exactly a case-insensitive occurrence of an anchor; each one is
//! then verified against the phrases around it. The anchors have at most 32 case variants in
//! all, which keeps Teddy on its 32-byte ("slim") form rather than its 16-byte ("fat") one:
//! that is why the permission and resources phrases use `s n` and ` av` rather than rarer
//! three-letter anchors (and `s n` rather than `e p`, twice as frequent in English, or `t h`,
//! which xAI's entitlement body holds twice more). The scan stops at the first
//! well-known-error marker; otherwise it covers the body once, at about 2.5 times the cost of
//! one `memmem` scan.
//!
//! Where the packed searcher is unavailable (no SSSE3/AVX2 or NEON), a case-insensitive
//! Aho-Corasick automaton over the same anchors finds the same hits.

use std::sync::LazyLock;

use aho_corasick::{packed, AhoCorasick, Input, Span};

/// What one pass over a body found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Findings {
    /// The reason of the first well-known-error marker with a non-empty reason, lowercased.
    pub(super) wke: Option<String>,
    /// `oauth2 access token could not be validated`.
    pub(super) token_not_validated: bool,
    /// `personal-team-blocked` or `spending-limit`.
    pub(super) billing: bool,
    /// `do not have an active grok subscription`.
    pub(super) no_subscription: bool,
    /// `out of available resources`.
    pub(super) out_of_resources: bool,
    /// `does not have permission`.
    pub(super) no_permission: bool,
    /// `grok`.
    pub(super) grok: bool,
}

impl Findings {
    /// Rule 6: the body says the account lacks the Grok entitlement.
    pub(super) fn entitlement(&self) -> bool {
        self.no_subscription || (self.grok && (self.out_of_resources || self.no_permission))
    }
}

/// The phrases of the rules, lowercase.
const UNAUTHENTICATED: &[u8] = b"unauthenticated:";
const WKE_OPEN: &[u8] = b"[wke=";
const CODE_KEY: &[u8] = b"\"code\"";
const TOKEN_NOT_VALIDATED: &[u8] = b"oauth2 access token could not be validated";
const PERSONAL_TEAM_BLOCKED: &[u8] = b"personal-team-blocked";
const SPENDING_LIMIT: &[u8] = b"spending-limit";
const NO_SUBSCRIPTION: &[u8] = b"do not have an active grok subscription";
const OUT_OF_RESOURCES: &[u8] = b"out of available resources";
const NO_PERMISSION: &[u8] = b"does not have permission";
const GROK: &[u8] = b"grok";

/// The anchors, lowercase, indexed by [`Group`]. Each phrase contains its group's anchor at
/// the offset [`Group::verify`] uses.
const ANCHORS: [&[u8; 3]; 7] = [b"ed:", b"h2 ", b"l-t", b"g-l", b"rok", b" av", b"s n"];

/// A group of phrases sharing one anchor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    /// `ed:` of `unauthenticated:`: both well-known-error marker shapes.
    Unauthenticated,
    /// `h2 ` of `oauth2 access token could not be validated`.
    TokenNotValidated,
    /// `l-t` of `personal-team-blocked`.
    PersonalTeamBlocked,
    /// `g-l` of `spending-limit`.
    SpendingLimit,
    /// `rok` of `grok`, also in `do not have an active grok subscription`.
    Grok,
    /// ` av` of `out of available resources`.
    OutOfResources,
    /// `s n` of `does not have permission`.
    NoPermission,
}

impl Group {
    const ALL: [Group; 7] = [
        Group::Unauthenticated,
        Group::TokenNotValidated,
        Group::PersonalTeamBlocked,
        Group::SpendingLimit,
        Group::Grok,
        Group::OutOfResources,
        Group::NoPermission,
    ];

    fn from_index(index: usize) -> Option<Group> {
        Group::ALL.get(index).copied()
    }

    /// Verifies the phrases of this group around an anchor found at `at`, records what holds
    /// and returns `true` once a well-known-error marker is found (the scan stops there).
    fn verify(self, body: &[u8], at: usize, found: &mut Findings) -> bool {
        match self {
            Group::Unauthenticated => {
                found.wke = wke_reason(body, at);
                return found.wke.is_some();
            }
            Group::TokenNotValidated => {
                found.token_not_validated |= phrase_at(body, at, 4, TOKEN_NOT_VALIDATED);
            }
            Group::PersonalTeamBlocked => {
                found.billing |= phrase_at(body, at, 7, PERSONAL_TEAM_BLOCKED);
            }
            Group::SpendingLimit => found.billing |= phrase_at(body, at, 7, SPENDING_LIMIT),
            Group::Grok => {
                if phrase_at(body, at, 1, GROK) {
                    found.grok = true;
                    found.no_subscription |= phrase_at(body, at, 23, NO_SUBSCRIPTION);
                }
            }
            Group::OutOfResources => {
                found.out_of_resources |= phrase_at(body, at, 6, OUT_OF_RESOURCES);
            }
            Group::NoPermission => found.no_permission |= phrase_at(body, at, 3, NO_PERMISSION),
        }
        false
    }
}

/// Whether `phrase` (lowercase) starts `offset` bytes before `at`, in any ASCII case.
fn phrase_at(body: &[u8], at: usize, offset: usize, phrase: &[u8]) -> bool {
    at.checked_sub(offset)
        .and_then(|start| body.get(start..start.checked_add(phrase.len())?))
        .is_some_and(|window| window.eq_ignore_ascii_case(phrase))
}

/// The reason of a well-known-error marker whose `ed:` anchor is at `at`, if one is there:
/// `[wke=unauthenticated:<reason>` or a JSON `"code"` whose value starts with
/// `unauthenticated:<reason>`. An empty reason is no marker.
fn wke_reason(body: &[u8], at: usize) -> Option<String> {
    let reason_start = at.checked_add(3)?;
    let start = reason_start.checked_sub(UNAUTHENTICATED.len())?;
    if !phrase_at(body, start, 0, UNAUTHENTICATED) {
        return None;
    }
    let before = body.get(..start)?;
    let bracketed = ends_with_ignore_case(before, WKE_OPEN);
    if !bracketed && !is_json_code_value(before) {
        return None;
    }
    let rest = body.get(reason_start..)?;
    let end = rest
        .iter()
        .position(|&b| ENDS_REASON[usize::from(b)])
        .unwrap_or(rest.len());
    let reason = rest.get(..end).filter(|reason| !reason.is_empty())?;
    Some(
        String::from_utf8(reason.to_ascii_lowercase())
            .unwrap_or_else(|invalid| String::from_utf8_lossy(invalid.as_bytes()).into_owned()),
    )
}

/// The bytes that end a well-known-error reason: `]`, `"` and ASCII whitespace.
static ENDS_REASON: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = matches!(b as u8, b']' | b'"') || (b as u8).is_ascii_whitespace();
        b += 1;
    }
    table
};

/// Whether `before` ends with the opening of a JSON `"code"` string value: `"code"`, optional
/// whitespace, `:`, optional whitespace, `"`.
fn is_json_code_value(before: &[u8]) -> bool {
    let Some(before) = before.strip_suffix(b"\"") else {
        return false;
    };
    let Some(before) = before.trim_ascii_end().strip_suffix(b":") else {
        return false;
    };
    ends_with_ignore_case(before.trim_ascii_end(), CODE_KEY)
}

fn ends_with_ignore_case(haystack: &[u8], suffix: &[u8]) -> bool {
    haystack
        .len()
        .checked_sub(suffix.len())
        .and_then(|start| haystack.get(start..))
        .is_some_and(|tail| tail.eq_ignore_ascii_case(suffix))
}

/// Finds anchors.
#[derive(Debug)]
enum Engine {
    /// Teddy over every case variant of every anchor; `groups[pattern id]` is its group.
    Packed {
        searcher: packed::Searcher,
        groups: Vec<Group>,
    },
    /// A case-insensitive automaton over the anchors; the pattern id is the group's index.
    Automaton(AhoCorasick),
    /// Neither could be built (not expected for seven three-byte patterns): bodies are not
    /// read and only the status and headers decide.
    Blind,
}

impl Engine {
    fn packed() -> Option<Engine> {
        let mut builder = packed::Config::new().builder();
        let mut groups = Vec::new();
        // The lowercase variant of every anchor comes first, so that each anchor opens its
        // own Teddy bucket; the other variants join the bucket of their anchor.
        for variant in 0..8u8 {
            for (&group, anchor) in Group::ALL.iter().zip(ANCHORS) {
                if let Some(pattern) = case_variant(anchor, variant) {
                    builder.add(pattern);
                    groups.push(group);
                }
            }
        }
        let searcher = builder.build()?;
        Some(Engine::Packed { searcher, groups })
    }

    fn automaton() -> Option<Engine> {
        AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .build(ANCHORS)
            .ok()
            .map(Engine::Automaton)
    }

    fn best() -> Engine {
        Engine::packed()
            .or_else(Engine::automaton)
            .unwrap_or(Engine::Blind)
    }

    /// The next anchor at or after `from`: its position and group.
    fn next(&self, body: &[u8], from: usize) -> Option<(usize, Group)> {
        match self {
            Engine::Packed { searcher, groups } => {
                let found = searcher.find_in(body, Span::from(from..body.len()))?;
                Some((found.start(), *groups.get(found.pattern().as_usize())?))
            }
            Engine::Automaton(automaton) => {
                let found = automaton.find(Input::new(body).range(from..))?;
                Some((
                    found.start(),
                    Group::from_index(found.pattern().as_usize())?,
                ))
            }
            Engine::Blind => None,
        }
    }

    /// Scans `body` once.
    fn scan(&self, body: &[u8]) -> Findings {
        let mut found = Findings::default();
        let mut from = 0;
        while from < body.len() {
            let Some((at, group)) = self.next(body, from) else {
                break;
            };
            if group.verify(body, at, &mut found) {
                break;
            }
            from = at + 1;
        }
        found
    }
}

/// The anchor with the letters selected by the bits of `variant` in upper case, or `None`
/// when `variant` sets a bit of a byte that is not a letter (that variant is another's
/// duplicate).
fn case_variant(anchor: &[u8; 3], variant: u8) -> Option<[u8; 3]> {
    let mut out = *anchor;
    for (bit, byte) in out.iter_mut().enumerate() {
        if variant & (1 << bit) != 0 {
            if !byte.is_ascii_lowercase() {
                return None;
            }
            byte.make_ascii_uppercase();
        }
    }
    Some(out)
}

static ENGINE: LazyLock<Engine> = LazyLock::new(Engine::best);

/// Scans `body` once for every phrase of the rules.
pub(super) fn scan(body: &[u8]) -> Findings {
    ENGINE.scan(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_phrase_contains_its_anchor_at_the_verified_offset() {
        let cases: [(&[u8], usize, Group); 9] = [
            (UNAUTHENTICATED, 13, Group::Unauthenticated),
            (TOKEN_NOT_VALIDATED, 4, Group::TokenNotValidated),
            (PERSONAL_TEAM_BLOCKED, 7, Group::PersonalTeamBlocked),
            (SPENDING_LIMIT, 7, Group::SpendingLimit),
            (GROK, 1, Group::Grok),
            (NO_SUBSCRIPTION, 23, Group::Grok),
            (OUT_OF_RESOURCES, 6, Group::OutOfResources),
            (NO_PERMISSION, 3, Group::NoPermission),
            (b"[wke=unauthenticated:", 18, Group::Unauthenticated),
        ];
        for (phrase, offset, group) in cases {
            let anchor = ANCHORS.get(group as usize).copied();
            assert_eq!(
                phrase.get(offset..offset + 3),
                anchor.map(|a| &a[..]),
                "{}",
                String::from_utf8_lossy(phrase)
            );
        }
    }

    #[test]
    fn case_variants_cover_every_letter_combination_once() {
        let variants: Vec<[u8; 3]> = (0..8).filter_map(|v| case_variant(b"ed:", v)).collect();
        assert_eq!(variants, [*b"ed:", *b"Ed:", *b"eD:", *b"ED:"]);
        assert_eq!((0..8).filter_map(|v| case_variant(b"rok", v)).count(), 8);
        assert_eq!((0..8).filter_map(|v| case_variant(b"h2 ", v)).count(), 2);
        let total: usize = ANCHORS
            .iter()
            .map(|anchor| (0..8).filter_map(|v| case_variant(anchor, v)).count())
            .sum();
        assert!(
            total <= 32,
            "{total} variants put Teddy on its 16-byte form"
        );
    }

    #[test]
    fn the_packed_searcher_and_the_automaton_find_the_same() {
        let engines: Vec<Engine> = [Engine::packed(), Engine::automaton()]
            .into_iter()
            .flatten()
            .collect();
        assert!(!engines.is_empty());
        let bodies: [&[u8]; 6] = [
            b"{\"error\":\"The OAuth2 access token could not be validated. [WKE=unauthenticated:Bad-Credentials]\"}",
            b"You have either run out of AVAILABLE resources or do not have an active GROK subscription. grok.com",
            b"personal-team-blocked:SPENDING-LIMIT",
            b"The caller does not have PERMISSION to use grok",
            b"{\"code\" :  \"UNAUTHENTICATED:revoked\"}",
            b"",
        ];
        for body in bodies {
            let expected = engines.first().map(|e| e.scan(body));
            for engine in &engines {
                assert_eq!(Some(engine.scan(body)), expected);
            }
        }
    }

    #[test]
    fn short_and_truncated_bodies_scan_without_panicking() {
        for body in [
            &b"ed:"[..],
            b"d:",
            b"rok",
            b"g",
            b"unauthenticated:",
            b"\"code\":\"unauthenticated:",
        ] {
            let _ = scan(body);
        }
        for cut in 0..=UNAUTHENTICATED.len() + 5 {
            let body = b"[WKE=unauthenticated:x";
            let _ = scan(body.get(..cut.min(body.len())).unwrap_or_default());
        }
    }
}
