//! One scan of a response body for every phrase the rules look for: one pass, and a second
//! one in the rare case where it can change the verdict.
//!
//! # Why anchors
//!
//! The rules look for nine phrases, ASCII case-insensitively. An Aho-Corasick automaton over
//! the nine phrases with `ascii_case_insensitive` gets no prefilter (too many distinct first
//! bytes in both cases), so it walks the automaton byte by byte: about 110 µs on a 64 KiB
//! body that one SIMD `memmem` scan covers in about 1 µs.
//!
//! Instead, each group of phrases is found through a two-byte *anchor* that every phrase of
//! the group contains, chosen for being rare in English prose and JSON (`d:` of
//! `unauthenticated:`, `h2` of `oauth2`, `m-` of `personal-team-blocked`, `g-` of
//! `spending-limit`, `gr` of `grok`). The anchors, in every ASCII case combination, go to
//! aho-corasick's packed (Teddy) searcher, which tests 32 bytes at a time with SIMD. Each
//! anchor's case variants share one Teddy bucket (their low nybbles agree), so a candidate is
//! exactly a case-insensitive occurrence of an anchor; each one is then verified against the
//! phrases around it. A pass has at most 32 case variants, which keeps Teddy on its 32-byte
//! ("slim") form rather than its 16-byte ("fat") one.
//!
//! Two bytes, because Teddy's cost per byte grows with the number of leading bytes it
//! matches (its shortest pattern's length, up to four). Measured on the benchmark's 64 KiB
//! JSON log with AVX2 and no candidate in the body: about 1.0 µs with one-byte patterns, 1.7
//! to 2.0 µs with two, 2.7 µs with three, against 0.9 to 1.5 µs for one `memmem` scan. One
//! byte is out of reach: every byte of the phrases is common in text. Each candidate costs
//! about 20 ns (the search returns, and restarts after it), and two-byte anchors are more
//! frequent than three-byte ones, which is what the second pass is for.
//!
//! # Why two passes
//!
//! Rule 6 needs `out of available resources` and `does not have permission` only beside
//! `grok`, and `grok` is part of `do not have an active grok subscription`: every entitlement
//! body contains `grok`. So the first pass looks for every phrase but those two, whose words
//! are everyday English (the three-byte anchors ` av` and `s n` a single pass used for them
//! made over 80% of its candidates in English text). Only when the first pass found `grok`
//! and nothing that decides before those phrases (a marker, `oauth2 access token could not be
//! validated`, billing, or the subscription phrase: [`Findings::needs_second_pass`]) does a
//! second pass look for `av`, the anchor of `available` and of the `have` of
//! `does not have permission`; it stops at the first of the two phrases. None of xAI's four
//! wire bodies needs it. The first pass stops at the first well-known-error marker; otherwise
//! it covers the body once.
//!
//! On the benchmark's 64 KiB body the first pass costs about 2.35 µs, 26 candidates (the `gr`
//! of `grows`) included, where the single pass over seven three-byte anchors it replaces
//! cost about 2.7 µs without any candidate. On 64 KiB samples of English documentation
//! (Markdown READMEs, Vim's user manual) it costs 2.5 to 2.8 µs, where the single pass cost
//! 3.2 to 3.9 µs. With `av` instead of `gr` in the first pass, the benchmark's body would
//! meet no candidate (about 1.7 µs), but English text more of them than with `gr`, up to
//! twice as many in the samples: `have` is everywhere.
//!
//! Where the packed searcher is unavailable (no SSSE3/AVX2 or NEON), case-insensitive
//! Aho-Corasick automata over the same anchors find the same hits, pass by pass.

use std::sync::LazyLock;

use aho_corasick::{packed, AhoCorasick, Input, Span};

/// What the scan of a body found.
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
    /// `out of available resources`. Looked for only when it can decide the verdict (see
    /// [`Findings::needs_second_pass`]); the second pass stops at the first of it and
    /// [`Findings::no_permission`].
    pub(super) out_of_resources: bool,
    /// `does not have permission`, looked for like [`Findings::out_of_resources`].
    pub(super) no_permission: bool,
    /// `grok`.
    pub(super) grok: bool,
}

impl Findings {
    /// Rule 6: the body says the account lacks the Grok entitlement.
    pub(super) fn entitlement(&self) -> bool {
        self.no_subscription || (self.grok && (self.out_of_resources || self.no_permission))
    }

    /// Whether `out of available resources` or `does not have permission` can still change
    /// the verdict: only with `grok`, and only when nothing the first pass finds decides it
    /// first (a marker, `oauth2 access token could not be validated`, billing, or
    /// `do not have an active grok subscription`, which is the entitlement by itself).
    fn needs_second_pass(&self) -> bool {
        self.grok
            && self.wke.is_none()
            && !self.token_not_validated
            && !self.billing
            && !self.no_subscription
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

/// The length of every anchor.
const ANCHOR_LEN: usize = 2;

/// The groups the first pass looks for: everything but the two phrases that count only
/// beside `grok`.
const FIRST_PASS: &[Group] = &[
    Group::Unauthenticated,
    Group::TokenNotValidated,
    Group::PersonalTeamBlocked,
    Group::SpendingLimit,
    Group::Grok,
];

/// The groups the second pass looks for, when [`Findings::needs_second_pass`].
const SECOND_PASS: &[Group] = &[Group::ResourcesOrPermission];

/// A group of phrases sharing one anchor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    /// `d:` of `unauthenticated:`: both well-known-error marker shapes.
    Unauthenticated,
    /// `h2` of `oauth2 access token could not be validated`.
    TokenNotValidated,
    /// `m-` of `personal-team-blocked`.
    PersonalTeamBlocked,
    /// `g-` of `spending-limit`.
    SpendingLimit,
    /// `gr` of `grok`, also in `do not have an active grok subscription`.
    Grok,
    /// `av` of `out of available resources` and of the `have` of `does not have permission`.
    ResourcesOrPermission,
}

impl Group {
    /// The anchor, lowercase. Each phrase of the group contains it at the offset
    /// [`Group::verify`] uses.
    fn anchor(self) -> &'static [u8; ANCHOR_LEN] {
        match self {
            Group::Unauthenticated => b"d:",
            Group::TokenNotValidated => b"h2",
            Group::PersonalTeamBlocked => b"m-",
            Group::SpendingLimit => b"g-",
            Group::Grok => b"gr",
            Group::ResourcesOrPermission => b"av",
        }
    }

    /// Verifies the phrases of this group around an anchor found at `at`, records what holds
    /// and returns `true` once nothing further in the body matters to this pass: at a
    /// well-known-error marker, or at the first phrase of the second pass.
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
                found.billing |= phrase_at(body, at, 12, PERSONAL_TEAM_BLOCKED);
            }
            Group::SpendingLimit => found.billing |= phrase_at(body, at, 7, SPENDING_LIMIT),
            Group::Grok => {
                if phrase_at(body, at, 0, GROK) {
                    found.grok = true;
                    found.no_subscription |= phrase_at(body, at, 22, NO_SUBSCRIPTION);
                }
            }
            Group::ResourcesOrPermission => {
                found.out_of_resources |= phrase_at(body, at, 7, OUT_OF_RESOURCES);
                found.no_permission |= phrase_at(body, at, 10, NO_PERMISSION);
                return found.out_of_resources || found.no_permission;
            }
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

/// The reason of a well-known-error marker whose `d:` anchor is at `at`, if one is there:
/// `[wke=unauthenticated:<reason>` or a JSON `"code"` whose value starts with
/// `unauthenticated:<reason>`. An empty reason is no marker.
fn wke_reason(body: &[u8], at: usize) -> Option<String> {
    let reason_start = at.checked_add(ANCHOR_LEN)?;
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

/// Finds the anchors of one pass.
#[derive(Debug)]
enum Finder {
    /// Teddy over every case variant of every anchor; `groups[pattern id]` is its group.
    Packed {
        searcher: packed::Searcher,
        groups: Vec<Group>,
    },
    /// A case-insensitive automaton over the anchors; `groups[pattern id]` is its group.
    Automaton {
        automaton: AhoCorasick,
        groups: &'static [Group],
    },
}

impl Finder {
    fn packed(pass: &[Group]) -> Option<Finder> {
        let mut builder = packed::Config::new().builder();
        let mut groups = Vec::new();
        // The lowercase variant of every anchor comes first, so that each anchor opens its
        // own Teddy bucket (a pass has at most eight anchors); the other variants join the
        // bucket of their anchor.
        for variant in 0..1u8 << ANCHOR_LEN {
            for &group in pass {
                if let Some(pattern) = case_variant(group.anchor(), variant) {
                    builder.add(pattern);
                    groups.push(group);
                }
            }
        }
        let searcher = builder.build()?;
        Some(Finder::Packed { searcher, groups })
    }

    fn automaton(pass: &'static [Group]) -> Option<Finder> {
        AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .build(pass.iter().map(|group| group.anchor()))
            .ok()
            .map(|automaton| Finder::Automaton {
                automaton,
                groups: pass,
            })
    }

    /// The next anchor at or after `from`: its position and group.
    fn next(&self, body: &[u8], from: usize) -> Option<(usize, Group)> {
        let (at, pattern, groups) = match self {
            Finder::Packed { searcher, groups } => {
                let found = searcher.find_in(body, Span::from(from..body.len()))?;
                (found.start(), found.pattern(), &groups[..])
            }
            Finder::Automaton { automaton, groups } => {
                let found = automaton.find(Input::new(body).range(from..))?;
                (found.start(), found.pattern(), *groups)
            }
        };
        Some((at, *groups.get(pattern.as_usize())?))
    }

    /// Verifies every anchor of this pass in `body`, in order, until one says to stop.
    fn scan(&self, body: &[u8], found: &mut Findings) {
        let mut from = 0;
        while from < body.len() {
            let Some((at, group)) = self.next(body, from) else {
                break;
            };
            if group.verify(body, at, found) {
                break;
            }
            from = at + 1;
        }
    }
}

/// Both passes.
#[derive(Debug)]
struct Engine {
    first: Finder,
    second: Finder,
}

impl Engine {
    fn packed() -> Option<Engine> {
        Some(Engine {
            first: Finder::packed(FIRST_PASS)?,
            second: Finder::packed(SECOND_PASS)?,
        })
    }

    fn automaton() -> Option<Engine> {
        Some(Engine {
            first: Finder::automaton(FIRST_PASS)?,
            second: Finder::automaton(SECOND_PASS)?,
        })
    }

    /// Scans `body`: the first pass, then the second when it can change the verdict.
    fn scan(&self, body: &[u8]) -> Findings {
        let mut found = Findings::default();
        self.first.scan(body, &mut found);
        if found.needs_second_pass() {
            self.second.scan(body, &mut found);
        }
        found
    }
}

/// The anchor with the letters selected by the bits of `variant` in upper case, or `None`
/// when `variant` sets a bit of a byte that is not a letter (that variant is another's
/// duplicate).
fn case_variant(anchor: &[u8; ANCHOR_LEN], variant: u8) -> Option<[u8; ANCHOR_LEN]> {
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

/// The packed engine, or the automaton where Teddy is unavailable; `None` if neither could be
/// built (not expected for a few two-byte patterns): bodies are then not read and only the
/// status and headers decide.
static ENGINE: LazyLock<Option<Engine>> =
    LazyLock::new(|| Engine::packed().or_else(Engine::automaton));

/// Scans `body` for every phrase of the rules that can decide its verdict.
pub(super) fn scan(body: &[u8]) -> Findings {
    ENGINE
        .as_ref()
        .map(|engine| engine.scan(body))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_phrase_contains_its_anchor_at_the_verified_offset() {
        let cases: [(&[u8], usize, Group); 10] = [
            (UNAUTHENTICATED, 14, Group::Unauthenticated),
            (TOKEN_NOT_VALIDATED, 4, Group::TokenNotValidated),
            (PERSONAL_TEAM_BLOCKED, 12, Group::PersonalTeamBlocked),
            (SPENDING_LIMIT, 7, Group::SpendingLimit),
            (GROK, 0, Group::Grok),
            (NO_SUBSCRIPTION, 22, Group::Grok),
            (OUT_OF_RESOURCES, 7, Group::ResourcesOrPermission),
            (NO_PERMISSION, 10, Group::ResourcesOrPermission),
            (b"[wke=unauthenticated:", 19, Group::Unauthenticated),
            (b"\"unauthenticated:", 15, Group::Unauthenticated),
        ];
        for (phrase, offset, group) in cases {
            assert_eq!(
                phrase.get(offset..offset + ANCHOR_LEN),
                Some(&group.anchor()[..]),
                "{}",
                String::from_utf8_lossy(phrase)
            );
        }
    }

    #[test]
    fn each_pass_keeps_teddy_slim_with_one_bucket_per_anchor() {
        let variants: Vec<[u8; 2]> = (0..4).filter_map(|v| case_variant(b"d:", v)).collect();
        assert_eq!(variants, [*b"d:", *b"D:"]);
        let variants: Vec<[u8; 2]> = (0..4).filter_map(|v| case_variant(b"gr", v)).collect();
        assert_eq!(variants, [*b"gr", *b"Gr", *b"gR", *b"GR"]);
        for pass in [FIRST_PASS, SECOND_PASS] {
            // Teddy has eight buckets; each anchor opens one.
            assert!(pass.len() <= 8);
            let total: usize = pass
                .iter()
                .map(|group| {
                    (0..4)
                        .filter_map(|v| case_variant(group.anchor(), v))
                        .count()
                })
                .sum();
            assert!(
                total <= 32,
                "{total} variants put Teddy on its 16-byte form"
            );
        }
        // Every group is in exactly one pass.
        for group in [
            Group::Unauthenticated,
            Group::TokenNotValidated,
            Group::PersonalTeamBlocked,
            Group::SpendingLimit,
            Group::Grok,
            Group::ResourcesOrPermission,
        ] {
            let passes = [FIRST_PASS, SECOND_PASS]
                .iter()
                .filter(|pass| pass.contains(&group))
                .count();
            assert_eq!(passes, 1, "{group:?}");
        }
    }

    /// Bodies for the engines to agree on, the two-pass cases among them.
    const BODIES: [&[u8]; 16] = [
        b"{\"error\":\"The OAuth2 access token could not be validated. [WKE=unauthenticated:Bad-Credentials]\"}",
        b"You have either run out of AVAILABLE resources or do not have an active GROK subscription. grok.com",
        b"personal-team-blocked:SPENDING-LIMIT",
        b"The caller does not have PERMISSION to use grok",
        b"{\"code\" :  \"UNAUTHENTICATED:revoked\"}",
        b"",
        b"av",
        b"gr",
        b"grok: out of available resources",
        b"Out Of Available Resources (GrOk)",
        b"gRoK: have you heard? we have no resources available",
        b"grok does not have permissio",
        b"does not have permission. Out of available resources. grok",
        b"grok out of available resources [WKE=unauthenticated:revoked]",
        b"grok spending-limit out of available resources",
        b"oauth2 access token could not be validated, grok does not have permission",
    ];

    #[test]
    fn the_packed_searcher_and_the_automaton_find_the_same() {
        let engines: Vec<Engine> = [Engine::packed(), Engine::automaton()]
            .into_iter()
            .flatten()
            .collect();
        assert!(!engines.is_empty());
        for body in BODIES {
            let expected = engines.first().map(|e| e.scan(body));
            for engine in &engines {
                assert_eq!(
                    Some(engine.scan(body)),
                    expected,
                    "{}",
                    String::from_utf8_lossy(body)
                );
            }
        }
    }

    #[test]
    fn the_engines_agree_on_every_arrangement_of_the_phrases() {
        let engines: Vec<Engine> = [Engine::packed(), Engine::automaton()]
            .into_iter()
            .flatten()
            .collect();
        let pieces: [&[u8]; 12] = [
            b"[WKE=unauthenticated:revoked]",
            b"\"code\":\"unauthenticated:x\"",
            b"oauth2 access token could not be validated",
            b"personal-team-blocked",
            b"spending-limit",
            b"do not have an active grok subscription",
            b"out of available resources",
            b"does not have permission",
            b"grok",
            b"grows: have it available",
            b"d: h2 m- g-",
            b" ",
        ];
        let mut body = Vec::new();
        for (i, a) in pieces.iter().enumerate() {
            for (j, b) in pieces.iter().enumerate() {
                for (k, c) in pieces.iter().enumerate() {
                    body.clear();
                    for piece in [a, b, c] {
                        body.extend_from_slice(piece);
                    }
                    // Flip the case of some letters, differently for each arrangement.
                    for (n, byte) in body.iter_mut().enumerate() {
                        if (n + i + 2 * j + 3 * k) % 3 == 0 {
                            byte.make_ascii_uppercase();
                        }
                    }
                    let expected = engines.first().map(|e| e.scan(&body));
                    for engine in &engines {
                        assert_eq!(
                            Some(engine.scan(&body)),
                            expected,
                            "{}",
                            String::from_utf8_lossy(&body)
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_second_pass_runs_only_when_it_can_decide() {
        let grok = |resources: bool, permission: bool| Findings {
            grok: true,
            out_of_resources: resources,
            no_permission: permission,
            ..Findings::default()
        };
        let cases: [(&[u8], Findings); 9] = [
            // Before and after `grok`, in any case.
            (b"OUT OF AVAILABLE RESOURCES, says Grok", grok(true, false)),
            (b"grok: Out of Available Resources", grok(true, false)),
            (b"Does Not Have Permission (GROK)", grok(false, true)),
            (b"gRoK does not have permission", grok(false, true)),
            // `av` that belongs to neither phrase.
            (
                b"grok: have patience, nothing available",
                grok(false, false),
            ),
            // The second pass stops at its first phrase.
            (
                b"grok does not have permission, out of available resources",
                grok(false, true),
            ),
            // Without `grok`, or with something deciding first, the phrases are not looked for.
            (b"out of available resources", Findings::default()),
            (
                b"grok spending-limit out of available resources",
                Findings {
                    grok: true,
                    billing: true,
                    ..Findings::default()
                },
            ),
            (
                b"do not have an active grok subscription: out of available resources",
                Findings {
                    grok: true,
                    no_subscription: true,
                    ..Findings::default()
                },
            ),
        ];
        for (body, expected) in cases {
            assert_eq!(scan(body), expected, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn short_and_truncated_bodies_scan_without_panicking() {
        for body in [
            &b"d:"[..],
            b":",
            b"gr",
            b"av",
            b"g",
            b"unauthenticated:",
            b"\"code\":\"unauthenticated:",
            b"grok av",
        ] {
            let _ = scan(body);
        }
        for cut in 0..=UNAUTHENTICATED.len() + 5 {
            let body = b"[WKE=unauthenticated:x";
            let _ = scan(body.get(..cut.min(body.len())).unwrap_or_default());
        }
    }
}
