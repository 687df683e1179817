//! Input limits: how large a document, how long an array or object, how long a string
//! may be, and the checks that enforce them on every input path (files, the agent
//! socket, and later the control-plane client) before a document is parsed.
//!
//! The pipeline is bytes → [`read_document`] (reads at most the limit + 1 bytes) →
//! [`document_text`] (size, UTF-8 byte-order mark, UTF-8) → `document::parse_with`,
//! which runs [`check_json`] (one pass over the JSON bytes, no allocation per value)
//! or, for YAML, [`check_value`] on the parsed value, before the typed parse. Both name
//! the exact JSON path of each violation, and both refuse a NUL character in any string
//! or key: no runtime can pass it to a process.

use converge_core::{Problem, Problems};
use std::fmt::Write as _;
use std::io::Read;

/// Default largest document: 16 MiB.
pub const DEFAULT_MAX_DOCUMENT_BYTES: usize = 16 << 20;
/// Default most items in one array, or entries in one object.
pub const DEFAULT_MAX_ITEMS: usize = 100_000;
/// Default longest string (value or key), in bytes of UTF-8: 64 KiB.
pub const DEFAULT_MAX_STRING_BYTES: usize = 64 << 10;
/// Deepest nesting of arrays and objects (serde_json's own recursion limit).
pub const MAX_DEPTH: usize = 128;
/// A check stops after this many problems: one refusal need not list a million.
pub const MAX_PROBLEMS: usize = 100;

/// Input limits, enforced before a document is parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest document in bytes (`--max-document-bytes`).
    pub max_document_bytes: usize,
    /// Most items in one array, or entries in one object (`--max-items`).
    pub max_items: usize,
    /// Longest string or object key in bytes of UTF-8 (`--max-string-bytes`).
    pub max_string_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_document_bytes: DEFAULT_MAX_DOCUMENT_BYTES,
            max_items: DEFAULT_MAX_ITEMS,
            max_string_bytes: DEFAULT_MAX_STRING_BYTES,
        }
    }
}

/// Reads a document, but never more than `max_document_bytes + 1` bytes, so that an
/// oversized input is detected (by [`document_text`]) without being held in memory.
pub fn read_document(reader: impl Read, limits: &Limits) -> std::io::Result<Vec<u8>> {
    let cap = read_cap(limits);
    let mut buf = Vec::new();
    reader.take(cap).read_to_end(&mut buf)?;
    Ok(buf)
}

/// [`read_document`] for async readers (the agent socket).
pub async fn read_document_async(
    reader: impl tokio::io::AsyncRead + Unpin,
    limits: &Limits,
) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let cap = read_cap(limits);
    let mut buf = Vec::new();
    reader.take(cap).read_to_end(&mut buf).await?;
    Ok(buf)
}

fn read_cap(limits: &Limits) -> u64 {
    u64::try_from(limits.max_document_bytes)
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

/// Reads a document file: a regular file is refused from its size alone when it is over
/// the limit (nothing read); anything else (a pipe) is read by [`read_document`].
/// `Ok(Err)` is that refusal; the bytes still go through [`document_text`].
pub fn read_file(
    path: &std::path::Path,
    limits: &Limits,
) -> std::io::Result<Result<Vec<u8>, Problem>> {
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if meta.is_file() && meta.len() > read_cap(limits) - 1 {
        return Ok(Err(too_large(limits)));
    }
    read_document(file, limits).map(Ok)
}

/// The problem of a document over `max_document_bytes`.
pub fn too_large(limits: &Limits) -> Problem {
    Problem {
        path: "$".into(),
        message: format!(
            "document is larger than {} bytes",
            limits.max_document_bytes
        ),
        hint: Some("the limit is set with --max-document-bytes".into()),
    }
}

/// The UTF-8 byte-order mark, accepted (and dropped) at the start of a document.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Checks a document's bytes (as read by [`read_document`]) and returns its text: no
/// larger than the limit, an optional UTF-8 byte-order mark dropped, valid UTF-8.
pub fn document_text<'a>(bytes: &'a [u8], limits: &Limits) -> Result<&'a str, Problem> {
    if bytes.len() > limits.max_document_bytes {
        return Err(too_large(limits));
    }
    let (skip, body) = match bytes.strip_prefix(BOM) {
        Some(rest) => (BOM.len(), rest),
        None => (0, bytes),
    };
    std::str::from_utf8(body).map_err(|e| Problem {
        path: "$".into(),
        message: format!("invalid UTF-8 at byte {}", skip + e.valid_up_to()),
        hint: Some("documents are UTF-8 text".into()),
    })
}

/// Appends an object key to a JSON path: `.name`, or `["a/b"]` when it is not a plain
/// identifier.
pub fn push_key(path: &mut String, key: &str) {
    let plain = key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if plain {
        path.push('.');
        path.push_str(key);
    } else {
        let _ = write!(path, "[{key:?}]");
    }
}

fn push_index(path: &mut String, i: usize) {
    let _ = write!(path, "[{i}]");
}

fn too_many(path: String, len: Option<usize>, limits: &Limits, array: bool) -> Problem {
    let what = if array { "array has" } else { "object has" };
    let (count, unit) = if array {
        (len, "items")
    } else {
        (len, "entries")
    };
    let message = match count {
        Some(n) => format!("{what} {n} {unit}, more than {}", limits.max_items),
        None => format!("{what} more than {} {unit}", limits.max_items),
    };
    Problem {
        path,
        message,
        hint: Some("the limit is set with --max-items".into()),
    }
}

fn too_long(path: String, len: usize, key: bool, limits: &Limits) -> Problem {
    Problem {
        path,
        message: format!(
            "{} is {len} bytes long, more than {}",
            if key { "key" } else { "string" },
            limits.max_string_bytes
        ),
        hint: Some("the limit is set with --max-string-bytes".into()),
    }
}

fn nul(path: String, key: bool) -> Problem {
    Problem {
        path,
        message: format!(
            "{} contains a NUL character (\\u0000)",
            if key { "key" } else { "string" }
        ),
        hint: Some("no process can receive NUL in an argument or environment variable".into()),
    }
}

fn too_deep(path: String) -> Problem {
    Problem {
        path,
        message: format!("arrays and objects nested deeper than {MAX_DEPTH} levels"),
        hint: None,
    }
}

/// One open array or object while scanning JSON text.
struct Frame {
    array: bool,
    /// Commas seen at this level: the index of the current item.
    commas: usize,
    /// Byte span (inside the quotes) of the current key, objects only.
    key: (usize, usize),
    /// The next string at this level is a key.
    expect_key: bool,
    /// Its item count was reported already.
    reported: bool,
}

/// Checks the limits (items, string length, NUL, depth) on JSON text in one pass over
/// its bytes, before it is parsed: nothing is allocated per value, so a document of
/// millions of items is refused at the cost of reading it once. Each problem names its
/// JSON path. The scan does not validate the syntax (the parser does that next): on
/// malformed input it never panics and reports at most what it saw.
pub fn check_json(text: &str, limits: &Limits) -> Problems {
    Problems(scan::<true>(text, limits, text.len()).problems)
}

/// How many values (array items, object entries and containers; roughly) JSON text has.
pub fn json_values(text: &str) -> usize {
    scan::<false>(text, &Limits::default(), text.len()).values
}

/// The JSON path of the value being read at byte `offset` of JSON text: where a parser
/// that stopped there (serde's line and column) was.
pub fn json_path_at(text: &str, offset: usize) -> String {
    scan::<false>(text, &Limits::default(), offset).path
}

/// What [`scan`] found.
struct Scan {
    problems: Vec<Problem>,
    values: usize,
    /// The path where the scan stopped.
    path: String,
}

/// Reads JSON text up to byte `until`, tracking the open arrays and objects; checks
/// `limits` if `CHECK` (a constant, so that the check-free scans cost nothing on the
/// fast path's).
fn scan<const CHECK: bool>(text: &str, limits: &Limits, until: usize) -> Scan {
    // Bytes past `until` are not looked at (bounds the loops by the slice itself).
    let b = &text.as_bytes()[..until.min(text.len())];
    let mut stack: Vec<Frame> = Vec::with_capacity(16);
    let mut problems = Vec::new();
    let mut values = 1;
    let mut i = 0;
    while i < b.len() {
        // Numbers, literals, whitespace and colons mean nothing here: skip them.
        while i < b.len() && !SIGNIFICANT[usize::from(b[i])] {
            i += 1;
        }
        let Some(&c) = b.get(i) else { break };
        match c {
            b'"' => {
                let start = i + 1;
                let mut j = start;
                let mut has_nul = false;
                loop {
                    j = quote_or_backslash(b, j);
                    match b.get(j) {
                        Some(b'\\') => {
                            if b[j + 1..].starts_with(b"u0000") {
                                has_nul = true;
                            }
                            j += 2;
                        }
                        _ => break,
                    }
                }
                let end = j.min(b.len());
                let key = match stack.last_mut() {
                    Some(f) if !f.array && f.expect_key => {
                        f.key = (start, end);
                        f.expect_key = false;
                        true
                    }
                    _ => false,
                };
                if CHECK {
                    if has_nul {
                        problems.push(nul(json_path(text, &stack, stack.len()), key));
                    }
                    if end - start > limits.max_string_bytes {
                        // Escapes make the raw text longer than the string: measure it.
                        let len = text
                            .get(i..=end)
                            .and_then(|raw| serde_json::from_str::<String>(raw).ok())
                            .map(|s| s.len());
                        if let Some(len) = len.filter(|l| *l > limits.max_string_bytes) {
                            problems.push(too_long(
                                json_path(text, &stack, stack.len()),
                                len,
                                key,
                                limits,
                            ));
                        }
                    }
                }
                i = end;
            }
            c @ (b'[' | b'{') => {
                if stack.len() == MAX_DEPTH {
                    if CHECK {
                        problems.push(too_deep(json_path(text, &stack, stack.len())));
                    }
                    break;
                }
                values += 1;
                stack.push(Frame {
                    array: c == b'[',
                    commas: 0,
                    key: (0, 0),
                    expect_key: true,
                    reported: false,
                });
            }
            b']' | b'}' => {
                stack.pop();
            }
            b',' => {
                values += 1;
                if let Some(f) = stack.last_mut() {
                    f.commas += 1;
                    f.expect_key = true;
                    // n commas: at least n + 1 items.
                    if CHECK && f.commas >= limits.max_items && !f.reported {
                        f.reported = true;
                        let array = f.array;
                        let at = stack.len() - 1;
                        problems.push(too_many(json_path(text, &stack, at), None, limits, array));
                    }
                }
            }
            _ => {}
        }
        if problems.len() >= MAX_PROBLEMS {
            break;
        }
        i += 1;
    }
    let path = json_path(text, &stack, stack.len());
    Scan {
        problems,
        values,
        path,
    }
}

/// The bytes [`check_json`] acts on outside strings.
const SIGNIFICANT: [bool; 256] = {
    let mut t = [false; 256];
    let mut k = 0;
    let bytes = *b"\"[]{},";
    while k < bytes.len() {
        t[bytes[k] as usize] = true;
        k += 1;
    }
    t
};

/// The index of the first `"` or `\` in `b` from `from` on (`b.len()` if none): eight
/// bytes at a time, since most of a document's bytes are inside strings.
#[inline]
fn quote_or_backslash(b: &[u8], from: usize) -> usize {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = ONES << 7;
    // The lowest 0x80 bit set marks exactly the first byte equal to `c` (bits above it
    // may be false positives, which the lowest-bit search never reads).
    let found = |w: u64, c: u8| {
        let x = w ^ (ONES * u64::from(c));
        x.wrapping_sub(ONES) & !x & HIGH
    };
    let mut j = from;
    while let Some(chunk) = b.get(j..j + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_le_bytes(word);
        let m = found(w, b'"') | found(w, b'\\');
        if m != 0 {
            return j + (m.trailing_zeros() / 8) as usize;
        }
        j += 8;
    }
    while j < b.len() && !matches!(b[j], b'"' | b'\\') {
        j += 1;
    }
    j.min(b.len())
}

/// The JSON path of the current position inside the first `depth` open frames.
fn json_path(text: &str, stack: &[Frame], depth: usize) -> String {
    let mut path = String::from("$");
    for f in &stack[..depth] {
        if f.array {
            push_index(&mut path, f.commas);
        } else {
            let (s, e) = f.key;
            let raw = text.get(s.saturating_sub(1)..e + 1).unwrap_or_default();
            match serde_json::from_str::<String>(raw) {
                Ok(k) => push_key(&mut path, &k),
                Err(_) => push_key(&mut path, text.get(s..e).unwrap_or_default()),
            }
        }
    }
    path
}

/// Checks the limits on a parsed value (the YAML path, and the reference the JSON scan
/// is tested against): items, string and key length, NUL, depth, each with its path.
pub fn check_value(value: &serde_json::Value, limits: &Limits) -> Problems {
    let mut problems = Vec::new();
    walk(value, &mut String::from("$"), 0, limits, &mut problems);
    Problems(problems)
}

/// How many values (scalars, items, containers) a parsed value has.
pub fn value_count(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::Array(a) => 1 + a.iter().map(value_count).sum::<usize>(),
        serde_json::Value::Object(m) => 1 + m.values().map(value_count).sum::<usize>(),
        _ => 1,
    }
}

fn walk(
    v: &serde_json::Value,
    path: &mut String,
    depth: usize,
    limits: &Limits,
    out: &mut Vec<Problem>,
) {
    use serde_json::Value;
    if out.len() >= MAX_PROBLEMS {
        return;
    }
    let string = |s: &str, path: &str, key: bool, out: &mut Vec<Problem>| {
        if s.contains('\0') {
            out.push(nul(path.to_string(), key));
        }
        if s.len() > limits.max_string_bytes {
            out.push(too_long(path.to_string(), s.len(), key, limits));
        }
    };
    match v {
        Value::String(s) => string(s, path, false, out),
        Value::Array(_) | Value::Object(_) if depth == MAX_DEPTH => {
            out.push(too_deep(path.clone()));
        }
        Value::Array(a) => {
            if a.len() > limits.max_items {
                out.push(too_many(path.clone(), Some(a.len()), limits, true));
            }
            for (i, item) in a.iter().enumerate() {
                let n = path.len();
                push_index(path, i);
                walk(item, path, depth + 1, limits, out);
                path.truncate(n);
            }
        }
        Value::Object(m) => {
            if m.len() > limits.max_items {
                out.push(too_many(path.clone(), Some(m.len()), limits, false));
            }
            for (k, item) in m {
                let n = path.len();
                push_key(path, k);
                string(k, path, true, out);
                walk(item, path, depth + 1, limits, out);
                path.truncate(n);
            }
        }
        _ => {}
    }
    out.truncate(MAX_PROBLEMS);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn small() -> Limits {
        Limits {
            max_document_bytes: 100,
            max_items: 3,
            max_string_bytes: 8,
        }
    }

    fn paths(p: &Problems) -> Vec<String> {
        p.iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect()
    }

    #[test]
    fn read_document_stops_after_limit_plus_one() {
        let limits = small();
        let input = vec![b'x'; 1000];
        let bytes = read_document(&input[..], &limits).unwrap_or_default();
        assert_eq!(bytes.len(), 101);
        let err = document_text(&bytes, &limits).err();
        assert_eq!(
            err.map(|p| p.message),
            Some("document is larger than 100 bytes".to_string())
        );
        let bytes = read_document(&input[..100], &limits).unwrap_or_default();
        assert!(document_text(&bytes, &limits).is_ok());
    }

    #[test]
    fn read_file_refuses_a_large_file_by_its_size() -> std::io::Result<()> {
        let limits = small();
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("doc.json");
        std::fs::write(&path, vec![b' '; 101])?;
        assert_eq!(read_file(&path, &limits)?.err(), Some(too_large(&limits)));
        std::fs::write(&path, vec![b' '; 100])?;
        assert_eq!(read_file(&path, &limits)?.map(|b| b.len()), Ok(100));
        assert!(read_file(&dir.path().join("missing"), &limits).is_err());
        Ok(())
    }

    #[test]
    fn bom_is_dropped_and_bad_utf8_names_its_byte() {
        let l = Limits::default();
        assert_eq!(document_text(b"\xEF\xBB\xBF{}", &l).ok(), Some("{}"));
        assert_eq!(document_text(b"{}", &l).ok(), Some("{}"));
        let e = document_text(b"{\"a\": \"\xff\"}", &l).err();
        assert_eq!(
            e.map(|p| p.message),
            Some("invalid UTF-8 at byte 7".to_string())
        );
        // Offsets count from the start of the input, byte-order mark included.
        let e = document_text(b"\xEF\xBB\xBF{\xc3}", &l).err();
        assert_eq!(
            e.map(|p| p.message),
            Some("invalid UTF-8 at byte 4".to_string())
        );
    }

    #[test]
    fn json_scan_names_each_violation() {
        let text = r#"{"a": [1, 2, 3, 4], "b": {"c\u0000": "x", "long key!": "123456789"},
            "d": [{"e": "\u0000"}, "\\u0000", "\u00e9\u00e9\u00e9\u00e9"], "f": {"1":1,"2":2,"3":3,"4":4}}"#;
        assert_eq!(
            paths(&check_json(text, &small())),
            vec![
                "$.a: array has more than 3 items",
                "$.b[\"c\\0\"]: key contains a NUL character (\\u0000)",
                "$.b[\"long key!\"]: key is 9 bytes long, more than 8",
                "$.b[\"long key!\"]: string is 9 bytes long, more than 8",
                "$.d[0].e: string contains a NUL character (\\u0000)",
                "$: object has more than 3 entries",
                "$.f: object has more than 3 entries",
            ]
        );
    }

    #[test]
    fn value_walk_agrees_on_the_paths() {
        let text = r#"{"a": [1, 2, 3, 4], "d": [{"e": "\u0000"}, "\\u0000"], "f": {"1":1,"2":2,"3":3,"4":4}}"#;
        let value: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
        assert_eq!(
            paths(&check_value(&value, &small())),
            vec![
                "$.a: array has 4 items, more than 3",
                "$.d[0].e: string contains a NUL character (\\u0000)",
                "$.f: object has 4 entries, more than 3",
            ]
        );
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let p = check_json(&deep, &Limits::default());
        assert_eq!(p.len(), 1);
        assert!(p.0[0].message.contains("deeper than 128"), "{:?}", p.0);
        let value = (0..200).fold(serde_json::Value::Null, |v, _| serde_json::json!([v]));
        let p = check_value(&value, &Limits::default());
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn problems_are_capped() {
        let text = format!("[{}]", vec!["\"\\u0000\""; 1000].join(","));
        assert_eq!(check_json(&text, &Limits::default()).len(), MAX_PROBLEMS);
        let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        assert_eq!(check_value(&value, &Limits::default()).len(), MAX_PROBLEMS);
    }

    #[test]
    fn finds_the_first_quote_or_backslash() {
        for text in [
            "",
            "a",
            "abcdefgh",
            "abcdefghijklmnop\"",
            "ab\\c\"",
            "\u{80}\u{ff}xyzabcdefg\"\"",
            "aaaaaaaa\"aaaaaaa\\",
        ] {
            let b = text.as_bytes();
            for from in 0..=b.len() {
                let want = (from..b.len())
                    .find(|i| matches!(b[*i], b'"' | b'\\'))
                    .unwrap_or(b.len());
                assert_eq!(quote_or_backslash(b, from), want, "{text:?} from {from}");
            }
        }
    }

    #[test]
    fn keys_become_readable_paths() {
        let mut p = String::from("$");
        push_key(&mut p, "env");
        push_key(&mut p, "a/b");
        push_key(&mut p, "8080");
        assert_eq!(p, "$.env[\"a/b\"][\"8080\"]");
    }

    fn arb_json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<i64>().prop_map(serde_json::Value::from),
            "(a|\u{0}|é|\"|\\\\|/){0,12}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(5, 64, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
                proptest::collection::btree_map("(k|\u{0}|é|\"|/){0,10}", inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// The one-pass scan over the text finds exactly what the walk over the parsed
        /// value finds (same paths, same order), compact or pretty-printed.
        #[test]
        fn json_scan_matches_value_walk(v in arb_json()) {
            let limits = Limits { max_document_bytes: 1 << 20, max_items: 4, max_string_bytes: 10 };
            // The scan reports an array's size at its (max + 1)th item, the walk before
            // its items: same problems, in another order.
            let found = |p: &Problems| {
                let mut v: Vec<(String, bool)> = p
                    .iter()
                    .map(|p| (p.path.clone(), p.message.contains("NUL")))
                    .collect();
                v.sort();
                v
            };
            let want = found(&check_value(&v, &limits));
            for text in [v.to_string(), serde_json::to_string_pretty(&v).unwrap_or_default()] {
                prop_assert_eq!(&found(&check_json(&text, &limits)), &want, "{}", text);
            }
        }
    }
}
