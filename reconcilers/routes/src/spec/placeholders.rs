//! Caddy placeholders in route header values and redirect targets: only an explicit
//! allowlist of request placeholders is accepted, so a document can never make Caddy
//! expand something that reads the host (`{env.*}`, `{file.*}`, `{system.*}`, …) into
//! what it sends to clients or upstreams. Caddy's Caddyfile shorthands (`{host}`,
//! `{uri}`, `{header.X}`, …) follow the same rules and are rendered as their full form
//! (Caddy expands shorthands only in a Caddyfile, not in the JSON converge loads).
//!
//! The scan mirrors Caddy's replacer (`replacer.go`): a `{` not preceded by `\` opens a
//! placeholder that ends at the next `}` not preceded by `\`; a `{` with no closing `}`
//! is literal; `\{` and `\}` are literal braces.

use std::borrow::Cow;

/// Request placeholders a route may use, by full name.
pub const ALLOWED: &[&str] = &[
    "http.request.host",
    "http.request.hostport",
    "http.request.port",
    "http.request.uri",
    "http.request.uri.path",
    "http.request.uri.query",
    "http.request.scheme",
    "http.request.method",
    "http.request.proto",
    "http.request.remote",
    "http.request.remote.host",
    "http.request.remote.port",
    "http.request.uuid",
];

/// Families taken with a name after the prefix: a request header (an RFC 9110 token)
/// and a query parameter (`[A-Za-z0-9._-]+`).
const HEADER_PREFIX: &str = "http.request.header.";
const QUERY_PREFIX: &str = "http.request.uri.query.";

/// Caddyfile shorthand → full name (the subset of Caddy's list that maps to [`ALLOWED`]).
const SHORTHANDS: &[(&str, &str)] = &[
    ("host", "http.request.host"),
    ("hostport", "http.request.hostport"),
    ("port", "http.request.port"),
    ("uri", "http.request.uri"),
    ("path", "http.request.uri.path"),
    ("query", "http.request.uri.query"),
    ("scheme", "http.request.scheme"),
    ("method", "http.request.method"),
    ("remote", "http.request.remote"),
    ("remote_host", "http.request.remote.host"),
    ("remote_port", "http.request.remote.port"),
];
/// Shorthand families: `{header.X}` and `{query.X}`.
const SHORTHAND_PREFIXES: &[(&str, &str)] = &[("header.", HEADER_PREFIX), ("query.", QUERY_PREFIX)];

/// What the hint lists as usable.
pub const ALLOWED_HINT: &str = "allowed: {http.request.host}, {http.request.hostport}, {http.request.port}, {http.request.uri}, {http.request.uri.path}, {http.request.uri.query}, {http.request.uri.query.NAME}, {http.request.scheme}, {http.request.method}, {http.request.proto}, {http.request.remote}, {http.request.remote.host}, {http.request.remote.port}, {http.request.uuid}, {http.request.header.NAME}, and the shorthands {host}, {hostport}, {port}, {uri}, {path}, {query}, {query.NAME}, {scheme}, {method}, {remote}, {remote_host}, {remote_port}, {header.NAME}; write a literal brace as \\{";

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn is_query_key(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The full name an allowed placeholder key stands for (itself, or its shorthand's
/// expansion); `None`: not allowed.
fn resolve(key: &str) -> Option<Cow<'_, str>> {
    if ALLOWED.contains(&key) {
        return Some(Cow::Borrowed(key));
    }
    if let Some(h) = key.strip_prefix(HEADER_PREFIX) {
        return is_token(h).then_some(Cow::Borrowed(key));
    }
    if let Some(q) = key.strip_prefix(QUERY_PREFIX) {
        return is_query_key(q).then_some(Cow::Borrowed(key));
    }
    if let Some((_, full)) = SHORTHANDS.iter().find(|(s, _)| *s == key) {
        return Some(Cow::Borrowed(full));
    }
    for (short, full) in SHORTHAND_PREFIXES {
        if let Some(name) = key.strip_prefix(short) {
            let ok = if *full == HEADER_PREFIX {
                is_token(name)
            } else {
                is_query_key(name)
            };
            return ok.then(|| Cow::Owned(format!("{full}{name}")));
        }
    }
    None
}

/// Each placeholder of `s` as Caddy's replacer finds it: (start of `{`, end of `}`, key).
fn placeholders(s: &str) -> Vec<(usize, usize, &str)> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    'scan: while i < b.len() {
        if b[i] != b'{' || (i > 0 && b[i - 1] == b'\\') {
            i += 1;
            continue;
        }
        let Some(mut end) = s[i..].find('}').map(|e| e + i) else {
            i += 1;
            continue;
        };
        // A `\}` does not close it: the next unescaped `}` does (none: literal).
        while end < b.len() - 1 && b[end - 1] == b'\\' {
            match s[end + 1..].find('}') {
                Some(next) => end += next + 1,
                None => {
                    i += 1;
                    continue 'scan;
                }
            }
        }
        out.push((i, end, &s[i + 1..end]));
        i = end + 1;
    }
    out
}

/// The first placeholder of `s` that is not allowed, as written (`{env.HOME}`).
pub fn refused(s: &str) -> Option<String> {
    placeholders(s)
        .into_iter()
        .find(|(_, _, key)| resolve(key).is_none())
        .map(|(_, _, key)| format!("{{{key}}}"))
}

/// `s` with every shorthand written as its full name, as Caddy's JSON needs it (after
/// validation, so every placeholder is an allowed one).
pub fn expand(s: &str) -> Cow<'_, str> {
    let found = placeholders(s);
    let mut out = String::new();
    let mut last = 0;
    for (start, end, key) in found {
        if let Some(full) = resolve(key).filter(|f| *f != key) {
            out.push_str(&s[last..start]);
            out.push('{');
            out.push_str(&full);
            out.push('}');
            last = end + 1;
        }
    }
    if last == 0 {
        return Cow::Borrowed(s);
    }
    out.push_str(&s[last..]);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_placeholders_are_refused() {
        for bad in [
            "{env.HOME}",
            "x-{env.AWS_SECRET_ACCESS_KEY}",
            "{file./etc/shadow}",
            "{system.hostname}",
            "{system.os}",
            "{time.now.year}",
            "{http.vars.x}",
            "{http.request.tls.client.subject}",
            "{http.reverse_proxy.upstream.address}",
            "{http.request.header.}",
            "{http.request.header.a b}",
            "{header.}",
            "{query.a=b}",
            "{}",
            "{upstream_hostport}",
            // The replacer ends a placeholder at its first unescaped `}`.
            "{env.X\\}}",
            "{ok} {env.Y}",
            "{host}{env.Z}",
        ] {
            assert!(refused(bad).is_some(), "{bad}");
        }
        assert_eq!(refused("a {env.HOME} b").as_deref(), Some("{env.HOME}"));
    }

    #[test]
    fn request_placeholders_and_literals_pass() {
        for ok in [
            "",
            "plain",
            "https://www.example.com{uri}",
            "https://{host}{path}?{query}",
            "{http.request.scheme}://{http.request.hostport}{http.request.uri}",
            "{http.request.header.X-Request-Id}",
            "{header.User-Agent} from {remote_host}:{remote_port}",
            "{http.request.uri.query.page}",
            "{method} {http.request.proto} {http.request.uuid}",
            // Literal braces: escaped, or never closed.
            "\\{env.HOME\\}",
            "{\"a\": 1",
            "max-age=1; {",
        ] {
            assert_eq!(refused(ok), None, "{ok}");
        }
    }

    #[test]
    fn shorthands_render_as_full_names() {
        assert_eq!(
            expand("https://a.test{uri}"),
            "https://a.test{http.request.uri}"
        );
        assert_eq!(
            expand("{scheme}://{host}{path}?{query}&p={query.page}"),
            "{http.request.scheme}://{http.request.host}{http.request.uri.path}?{http.request.uri.query}&p={http.request.uri.query.page}"
        );
        assert_eq!(
            expand("{header.X-Id}/{remote_host}"),
            "{http.request.header.X-Id}/{http.request.remote.host}"
        );
        assert!(matches!(
            expand("{http.request.uri} \\{uri\\}"),
            Cow::Borrowed(_)
        ));
        assert!(matches!(expand("plain"), Cow::Borrowed(_)));
    }
}
