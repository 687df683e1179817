//! Property tests of the document parser: arbitrary bytes, arbitrary JSON and mutated
//! fixtures never panic; they parse or return problems that each carry a JSON path.

use converge::document::{parse, Format};
use proptest::prelude::*;

fn fixture() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/worker.json"))
        .expect("fixture")
}

fn check(text: &str, format: Format) {
    if let Err(problems) = parse(text, format) {
        assert!(!problems.is_empty());
        for p in problems.iter() {
            assert!(p.path.starts_with('$'), "path {:?}", p.path);
        }
    }
}

fn arb_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        "[a-z0-9./:_-]{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("name".to_string()),
                    Just("dns".to_string()),
                    Just("records".to_string()),
                    "[a-z]{1,8}"
                ],
                inner,
                0..6
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let text = String::from_utf8_lossy(&bytes);
        check(&text, Format::Json);
        check(&text, Format::Yaml);
    }

    #[test]
    fn arbitrary_json_values_never_panic(v in arb_json()) {
        check(&v.to_string(), Format::Json);
    }

    #[test]
    fn mutated_fixture_never_panics(cut in 0usize..4096, insert in "[\\[\\]{}\",:0-9a-z -]{0,4}") {
        let mut text = fixture();
        let at = (0..=cut.min(text.len())).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
        text.insert_str(at, &insert);
        check(&text, Format::Json);
    }

    #[test]
    fn sections_replaced_by_arbitrary_json_never_panic(section in prop_oneof![Just("containers"), Just("wireguard"), Just("firewall"), Just("dns"), Just("routes"), Just("backups"), Just("metadata")], v in arb_json()) {
        let mut doc: serde_json::Value = serde_json::from_str(&fixture()).expect("fixture json");
        doc[section] = v;
        check(&doc.to_string(), Format::Json);
    }
}
