//! The schema refuses what is not a canonical document and gives back what
//! is one, byte for byte as a `Value` prints it (the quorum's display name).

use super::{canonical_spec, parse};
use serde_json::{json, Value};

fn file(name: &str) -> Value {
    json!({"driver": "file", "node-name": name, "filename": format!("/tmp/{name}")})
}

fn inet(name: &str) -> Value {
    json!({
        "driver": "nbd", "node-name": name,
        "server": {"type": "inet", "host": "localhost", "port": "10809"},
        "export": null, "timeout": 30, "connections": null,
    })
}

fn unix(name: &str) -> Value {
    json!({
        "driver": "nbd", "node-name": name,
        "server": {"type": "unix", "path": "/tmp/nbd.sock"},
        "export": "disk", "timeout": 86400, "connections": 16,
    })
}

fn blkdebug(name: &str, image: Value) -> Value {
    json!({
        "driver": "blkdebug", "node-name": name, "image": image,
        "inject-error": [
            {"event": "read_aio", "iotype": null, "errno": 5, "sector": -1, "once": false},
            {"event": "write_aio", "iotype": "write-zeroes", "errno": 28, "sector": 0, "once": true},
            {"event": "flush_to_disk", "iotype": "flush", "errno": 1, "sector": 7, "once": false},
        ],
    })
}

/// Every driver, option and nesting the document has, in one tree.
fn everything() -> Value {
    let qcow2_over_node = json!({
        "driver": "qcow2", "node-name": "c1", "file": blkdebug("c1.file", unix("c1.file.image")),
        "backing": {"driver": "qcow2", "node-name": "c1.backing", "file": file("c1.backing.file"),
                    "backing": null},
    });
    json!({
        "driver": "quorum", "node-name": "root",
        "children": [
            {"driver": "raw", "node-name": "c0", "file": file("c0.file")},
            qcow2_over_node,
            {"driver": "qcow2", "node-name": "c2", "file": inet("c2.file"), "backing": "default"},
            {"driver": "probe", "node-name": "c3", "file": file("c3.file")},
            {"driver": "probe", "node-name": "c4", "file": file("c4.file"), "backing": null},
            blkdebug("c5", json!({"driver": "raw", "node-name": "c5.image", "file": file("c5.image.file")})),
            blkdebug("c6", json!({"driver": "quorum", "node-name": "c6.image",
                                  "children": [file("c6.image.children.0")], "vote-threshold": 1,
                                  "blkverify": false, "rewrite-corrupted": true,
                                  "read-pattern": "fifo"})),
            file("c7"),
            inet("c8"),
        ],
        "vote-threshold": 2, "blkverify": false, "rewrite-corrupted": false,
        "read-pattern": "quorum",
    })
}

fn refused(doc: &Value) -> String {
    match parse(&doc.to_string()) {
        Ok(node) => panic!("accepted {doc}: {node:?}"),
        Err(e) => e.to_string(),
    }
}

/// Every object of `doc` (nodes, servers, rules), as paths of keys and indices.
fn objects(doc: &Value, at: Vec<Value>, out: &mut Vec<Vec<Value>>) {
    match doc {
        Value::Object(map) => {
            out.push(at.clone());
            for (k, v) in map {
                let mut below = at.clone();
                below.push(json!(k));
                objects(v, below, out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                let mut below = at.clone();
                below.push(json!(i));
                objects(v, below, out);
            }
        }
        _ => {}
    }
}

fn object_at<'a>(doc: &'a mut Value, path: &[Value]) -> &'a mut serde_json::Map<String, Value> {
    let mut here = doc;
    for step in path {
        here = match step {
            Value::String(k) => &mut here[k.as_str()],
            Value::Number(i) => &mut here[i.as_u64().expect("index") as usize],
            _ => unreachable!(),
        };
    }
    here.as_object_mut().expect("an object")
}

#[test]
fn a_document_comes_back_as_a_value_prints_it() {
    let doc = everything().to_string();
    let back = canonical_spec(&doc).expect("valid");
    let as_value: Value = serde_json::from_str(&doc).expect("json");
    assert_eq!(back, as_value.to_string());
}

#[test]
fn an_unknown_key_is_refused_in_every_object() {
    let doc = everything();
    let mut paths = Vec::new();
    objects(&doc, Vec::new(), &mut paths);
    // 22 nodes, 3 servers, 9 rules: each kind of object is among them.
    assert_eq!(paths.len(), 34);
    for path in paths {
        let mut bad = doc.clone();
        object_at(&mut bad, &path).insert("bogus".into(), json!(1));
        let err = refused(&bad);
        assert!(err.contains("unknown field `bogus`"), "{path:?}: {err}");
        assert!(err.starts_with("Invalid node specification: "), "{err}");
    }
}

#[test]
fn a_required_key_is_missed_in_every_object() {
    let optional = [
        "export",
        "timeout",
        "connections",
        "backing",
        "inject-error",
        "iotype",
    ];
    let doc = everything();
    let mut paths = Vec::new();
    objects(&doc, Vec::new(), &mut paths);
    let mut removed = 0;
    for path in paths {
        let keys: Vec<String> = object_at(&mut doc.clone(), &path).keys().cloned().collect();
        for key in keys {
            let mut less = doc.clone();
            object_at(&mut less, &path).remove(&key);
            if optional.contains(&key.as_str()) {
                parse(&less.to_string()).expect("an optional key");
            } else {
                let err = refused(&less);
                assert!(
                    err.contains(&format!("missing field `{key}`")),
                    "{path:?} {key}: {err}"
                );
                removed += 1;
            }
        }
    }
    assert!(removed > 100, "{removed}");
}

#[test]
fn absent_options_take_their_defaults() {
    let nbd = json!({"driver": "nbd", "node-name": "n", "server": {"type": "unix", "path": "/s"}});
    let doc = json!({"driver": "qcow2", "node-name": "q",
                     "file": {"driver": "blkdebug", "node-name": "d", "image": nbd}});
    let back: Value =
        serde_json::from_str(&canonical_spec(&doc.to_string()).expect("valid")).expect("json");
    assert_eq!(back["backing"], json!("default"));
    assert_eq!(back["file"]["inject-error"], json!([]));
    assert_eq!(back["file"]["image"]["export"], Value::Null);
    assert_eq!(back["file"]["image"]["timeout"], Value::Null);
    let probe = json!({"driver": "probe", "node-name": "p", "file": file("f")});
    let back = canonical_spec(&probe.to_string()).expect("valid");
    assert!(!back.contains("backing"), "{back}");
}

/// `doc` with `key` of the object at `path` set to `value`.
fn with(path: &[&str], key: &str, value: Value) -> Value {
    let mut doc = everything();
    let path: Vec<Value> = path
        .iter()
        .map(|s| s.parse::<u64>().map_or(json!(s), |i| json!(i)))
        .collect();
    object_at(&mut doc, &path).insert(key.into(), value);
    doc
}

#[test]
fn numbers_out_of_range_are_refused() {
    let nbd = ["children", "8"];
    let rule = ["children", "5", "inject-error", "0"];
    for (path, key, value, message) in [
        (
            &nbd[..],
            "timeout",
            json!(0),
            "'timeout' must be 1 to 86400 seconds, not 0",
        ),
        (&nbd[..], "timeout", json!(86401), "not 86401"),
        (
            &nbd[..],
            "timeout",
            json!(-1),
            "invalid value: integer `-1`",
        ),
        (
            &nbd[..],
            "connections",
            json!(0),
            "'connections' must be 1 to 16, not 0",
        ),
        (&nbd[..], "connections", json!(17), "not 17"),
        (
            &[][..],
            "vote-threshold",
            json!(0),
            "'vote-threshold' must be 1 or more",
        ),
        (
            &[][..],
            "vote-threshold",
            json!(-2),
            "invalid value: integer `-2`",
        ),
        (
            &rule[..],
            "errno",
            json!(0),
            "'errno' must be a positive error number, not 0",
        ),
        (&rule[..], "errno", json!(-5), "not -5"),
        (
            &rule[..],
            "errno",
            json!(1i64 << 31),
            "invalid value: integer `2147483648`",
        ),
        (
            &rule[..],
            "sector",
            json!(-2),
            "'sector' must be -1 (any) or a sector number, not -2",
        ),
        (
            &rule[..],
            "once",
            json!("yes"),
            "invalid type: string \"yes\", expected a boolean",
        ),
        (
            &[][..],
            "blkverify",
            json!(1),
            "invalid type: integer `1`, expected a boolean",
        ),
        (
            &nbd[..],
            "export",
            json!(3),
            "invalid type: integer `3`, expected a string",
        ),
    ] {
        let err = refused(&with(path, key, value));
        assert!(err.contains(message), "{key}: {err}");
    }
    for (path, key, value) in [
        (&nbd[..], "timeout", json!(1)),
        (&nbd[..], "timeout", json!(86400)),
        (&nbd[..], "timeout", Value::Null),
        (&nbd[..], "connections", json!(1)),
        (&rule[..], "sector", json!(0)),
        (&rule[..], "errno", json!(i32::MAX)),
    ] {
        parse(&with(path, key, value).to_string()).expect("in range");
    }
}

#[test]
fn names_outside_their_lists_are_refused() {
    for (path, key, value, message) in [
        (
            &[][..],
            "read-pattern",
            "random",
            "unknown variant `random`, expected `quorum` or `fifo`",
        ),
        (
            &["children", "5", "inject-error", "0"][..],
            "event",
            "cor_write",
            "unknown variant `cor_write`",
        ),
        (
            &["children", "5", "inject-error", "0"][..],
            "iotype",
            "block-status",
            "unknown variant `block-status`",
        ),
        (
            &["children", "8", "server"][..],
            "type",
            "vsock",
            "unknown variant `vsock`, expected `inet` or `unix`",
        ),
        (
            &["children", "0"][..],
            "driver",
            "vvfat",
            "unknown variant `vvfat`",
        ),
    ] {
        let err = refused(&with(path, key, json!(value)));
        assert!(err.contains(message), "{key}: {err}");
    }
}

#[test]
fn backings_are_default_null_or_a_node_and_probes_only_null() {
    let err = refused(&with(&["children", "2"], "backing", json!("none")));
    assert!(
        err.contains("expected \"default\", null or a node"),
        "{err}"
    );
    let err = refused(&with(&["children", "1", "backing"], "bogus", json!(1)));
    assert!(err.contains("unknown field `bogus`"), "{err}");
    for value in [json!("default"), file("b")] {
        let err = refused(&with(&["children", "3"], "backing", value));
        assert!(err.contains("can only be left closed"), "{err}");
    }
}

#[test]
fn the_file_role_takes_file_nbd_or_blkdebug_only() {
    let raw = json!({"driver": "raw", "node-name": "r", "file": file("f")});
    let err = refused(&with(&["children", "0"], "file", raw.clone()));
    assert!(
        err.contains("unknown variant `raw`, expected one of `file`, `nbd`, `blkdebug`"),
        "{err}"
    );
    let err = refused(&with(&["children", "1", "file"], "image", raw.clone()));
    assert!(err.contains("unknown variant `raw`"), "{err}");
    // At the top of a tree (here: in a quorum) blkdebug filters any node.
    parse(&with(&["children", "5"], "image", raw).to_string()).expect("any image");
}

#[test]
fn a_key_given_twice_keeps_its_last_value() {
    let doc = everything().to_string();
    let twice = format!("{},\"read-pattern\":\"fifo\"}}", &doc[..doc.len() - 1]);
    let back: Value = serde_json::from_str(&canonical_spec(&twice).expect("valid")).expect("json");
    assert_eq!(back["read-pattern"], json!("fifo"));
}

#[test]
fn what_is_not_a_document_is_refused() {
    for (doc, message) in [
        ("[1]", "invalid type: sequence, expected a JSON object"),
        (
            "[\"file\", \"n\", \"/tmp/f\"]",
            "invalid type: sequence, expected a JSON object",
        ),
        ("{\"driver\": \"file\"", "EOF while parsing"),
        (
            "{\"node-name\": \"x\", \"filename\": \"f\"}",
            "missing field `driver`",
        ),
        ("{\"driver\": 7}", "invalid type: integer `7`"),
    ] {
        let err = match parse(doc) {
            Ok(node) => panic!("accepted {doc}: {node:?}"),
            Err(e) => e.to_string(),
        };
        assert!(err.starts_with("Invalid node specification: "), "{err}");
        assert!(err.contains(message), "{doc}: {err}");
    }
}

#[test]
fn arrays_in_place_of_objects_are_refused() {
    // What serde's derived readers would take as the values in field order.
    let node = json!(["file", "n", "/tmp/f"]);
    let rule = json!(["read_aio", null, 5, -1, false]);
    let server = json!(["unix", "/tmp/nbd.sock"]);
    for (path, key, value) in [
        (&[][..], "children", json!([node.clone()])),
        (&["children", "0"][..], "file", node.clone()),
        (&["children", "5"][..], "image", node.clone()),
        (&["children", "1"][..], "backing", node),
        (&["children", "5"][..], "inject-error", json!([rule])),
        (&["children", "8"][..], "server", server),
    ] {
        let err = refused(&with(path, key, value));
        assert!(err.contains("invalid type: sequence"), "{key}: {err}");
    }
}
