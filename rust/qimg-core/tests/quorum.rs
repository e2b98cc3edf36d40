//! The quorum node end to end on raw replicas in a temporary directory:
//! voted reads and their events, failing children (blkdebug), writes,
//! rewrite-corrupted, blkverify, fifo, and scrub with repair.
#![allow(clippy::expect_used)] // A test stops at the first surprise.

use qimg_core::block::{open_spec, BlockDev, SpecOptions};
use qimg_core::quorum::events::{EventData, EventLog, OpType};
use qimg_core::quorum::scrub::scrub;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const SIZE: u64 = 1 << 20;
const BLOCK: u64 = 64 * 1024;

struct Set {
    _dir: tempfile::TempDir,
    files: Vec<PathBuf>,
}

/// `n` identical replicas filled with a position-dependent pattern.
fn replicas(n: usize) -> Set {
    let dir = tempfile::tempdir().expect("temp dir");
    let data: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    let files = (0..n)
        .map(|i| {
            let p = dir.path().join(format!("c{i}.raw"));
            std::fs::write(&p, &data).expect("write replica");
            p
        })
        .collect();
    Set { _dir: dir, files }
}

fn corrupt(path: &Path, offset: u64, len: usize) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open replica");
    f.write_all_at(&vec![0xee; len], offset).expect("corrupt");
}

fn child(i: usize, path: &Path, rules: Option<&str>) -> String {
    let raw = format!(
        r#"{{"driver":"raw","node-name":"c{i}","file":{{"driver":"file","node-name":"c{i}.file","filename":"{}"}}}}"#,
        path.display()
    );
    match rules {
        None => raw,
        Some(r) => format!(
            r#"{{"driver":"blkdebug","node-name":"dbg{i}","image":{raw},"inject-error":{r}}}"#
        ),
    }
}

struct Opts<'a> {
    threshold: usize,
    extra: &'a str,
    rules: Vec<Option<&'a str>>,
}

fn open(set: &Set, o: &Opts<'_>, writable: bool) -> (Arc<dyn BlockDev>, Arc<EventLog>) {
    let children: Vec<String> = set
        .files
        .iter()
        .enumerate()
        .map(|(i, p)| child(i, p, o.rules.get(i).copied().flatten()))
        .collect();
    let spec = format!(
        r#"{{"driver":"quorum","node-name":"q","children":[{}],"vote-threshold":{},"blkverify":false,"rewrite-corrupted":false,"read-pattern":"quorum"{}}}"#,
        children.join(","),
        o.threshold,
        o.extra
    );
    // Options given in `extra` replace the defaults above (last key wins
    // in the JSON reader used here, as in serde_json's map).
    let log = EventLog::new();
    let node = open_spec(
        &spec,
        SpecOptions {
            writable,
            cache: qimg_core::block::cache::CacheMode::Unsafe,
            ..SpecOptions::default()
        },
        &log,
    )
    .expect("open quorum");
    (node, log)
}

fn plain(threshold: usize) -> Opts<'static> {
    Opts {
        threshold,
        extra: "",
        rules: Vec::new(),
    }
}

fn expected() -> Vec<u8> {
    (0..SIZE).map(|i| (i % 251) as u8).collect()
}

fn bad(node: &str, offset: u64, len: u64, error: Option<&str>, op: OpType) -> EventData {
    EventData::report_bad(op, error.map(str::to_string), node, offset, len)
}

#[test]
fn a_corrupt_replica_is_outvoted_and_reported_to_the_block() {
    let set = replicas(3);
    corrupt(&set.files[1], 3 * BLOCK + 10, 100);
    let (q, log) = open(&set, &plain(2), false);
    let mut buf = vec![0u8; SIZE as usize];
    q.read_at(&mut buf, 0).expect("read");
    assert!(buf == expected());
    let events: Vec<EventData> = log.take().into_iter().map(|e| e.data).collect();
    assert_eq!(
        events,
        vec![bad("c1", 3 * BLOCK, BLOCK, None, OpType::Read)]
    );
}

#[test]
fn two_corrupt_replicas_of_three_fail_the_read() {
    let set = replicas(3);
    corrupt(&set.files[1], 0, 10);
    corrupt(&set.files[2], 5, 10);
    let (q, log) = open(&set, &plain(2), false);
    let mut buf = vec![0u8; 4096];
    let err = q.read_at(&mut buf, 0).expect_err("no majority");
    assert!(err.to_string().contains("Input/output error"), "{err}");
    let events: Vec<EventData> = log.take().into_iter().map(|e| e.data).collect();
    assert_eq!(events, vec![EventData::failure("q", 0, 4096)]);
}

#[test]
fn a_failing_child_is_reported_with_its_error_and_the_vote_goes_on() {
    let set = replicas(3);
    let rule = r#"[{"event":"read_aio","iotype":null,"errno":5,"sector":-1,"once":false}]"#;
    let o = Opts {
        threshold: 2,
        extra: "",
        rules: vec![None, None, Some(rule)],
    };
    let (q, log) = open(&set, &o, false);
    let mut buf = vec![0u8; 8192];
    q.read_at(&mut buf, 4096).expect("two children answer");
    assert!(buf[..] == expected()[4096..4096 + 8192]);
    let events: Vec<EventData> = log.take().into_iter().map(|e| e.data).collect();
    assert_eq!(
        events,
        vec![bad(
            "dbg2",
            4096,
            8192,
            Some("Input/output error"),
            OpType::Read
        )]
    );
}

#[test]
fn too_few_answers_report_every_failed_child_then_the_failure() {
    let set = replicas(3);
    let rule = r#"[{"event":"read_aio","iotype":null,"errno":5,"sector":-1,"once":false}]"#;
    let o = Opts {
        threshold: 3,
        extra: "",
        rules: vec![None, Some(rule), None],
    };
    let (q, log) = open(&set, &o, false);
    let mut buf = vec![0u8; 512];
    let err = q
        .read_at(&mut buf, 1024)
        .expect_err("two answers, three needed");
    assert!(err.to_string().contains("Input/output error"), "{err}");
    let events: Vec<EventData> = log.take().into_iter().map(|e| e.data).collect();
    assert_eq!(
        events,
        vec![
            bad("dbg1", 1024, 512, Some("Input/output error"), OpType::Read),
            EventData::failure("q", 1024, 512),
        ]
    );
}

#[test]
fn writes_need_threshold_successes() {
    let set = replicas(3);
    let rule = r#"[{"event":"write_aio","iotype":null,"errno":28,"sector":-1,"once":false}]"#;
    let o = Opts {
        threshold: 2,
        extra: "",
        rules: vec![Some(rule), None, Some(rule)],
    };
    let (q, log) = open(&set, &o, true);
    let err = q
        .write_at(&[1u8; 512], 0)
        .expect_err("only one child took it");
    assert!(err.to_string().contains("No space left on device"), "{err}");
    let events: Vec<EventData> = log.take().into_iter().map(|e| e.data).collect();
    let enospc = Some("No space left on device");
    assert_eq!(
        events,
        vec![
            bad("dbg0", 0, 512, enospc, OpType::Write),
            bad("dbg2", 0, 512, enospc, OpType::Write),
            EventData::failure("q", 0, 512),
        ]
    );
    let o = Opts {
        threshold: 2,
        extra: "",
        rules: vec![Some(rule), None, None],
    };
    let (q, log) = open(&set, &o, true);
    q.write_at(&[7u8; 512], 512).expect("two children took it");
    q.flush().expect("flush");
    assert_eq!(log.take().len(), 1);
    let on_disk = std::fs::read(&set.files[1]).expect("read back");
    assert!(on_disk[512..1024] == [7u8; 512]);
}

#[test]
fn rewrite_corrupted_repairs_the_loser_on_disk() {
    let set = replicas(3);
    corrupt(&set.files[0], 100, 1);
    let o = Opts {
        threshold: 2,
        extra: r#","rewrite-corrupted":true"#,
        rules: Vec::new(),
    };
    let (q, _log) = open(&set, &o, false);
    let mut buf = vec![0u8; 4096];
    q.read_at(&mut buf, 0).expect("read");
    q.close().expect("close");
    assert!(std::fs::read(&set.files[0]).expect("read back") == expected());
}

#[test]
fn blkverify_names_the_first_difference_and_fifo_reads_one_child() {
    let set = replicas(2);
    corrupt(&set.files[1], 777, 1);
    let o = Opts {
        threshold: 2,
        extra: r#","blkverify":true"#,
        rules: Vec::new(),
    };
    let (q, log) = open(&set, &o, false);
    let mut buf = vec![0u8; 4096];
    let err = q.read_at(&mut buf, 512).expect_err("mismatch");
    assert!(
        err.to_string()
            .contains("quorum: offset=512 bytes=4096 contents mismatch at offset 777"),
        "{err}"
    );
    assert!(log.take().is_empty());

    let fail = r#"[{"event":"read_aio","iotype":null,"errno":5,"sector":-1,"once":false}]"#;
    let o = Opts {
        threshold: 1,
        extra: r#","read-pattern":"fifo""#,
        rules: vec![Some(fail), None],
    };
    let (q, log) = open(&set, &o, false);
    q.read_at(&mut buf, 0).expect("child 1 answers");
    assert_eq!(buf[777], 0xee);
    assert_eq!(log.take().len(), 1);
}

#[test]
fn scrub_finds_every_bad_block_and_repair_makes_the_set_clean() {
    let set = replicas(3);
    corrupt(&set.files[2], 0, 1);
    corrupt(&set.files[2], 5 * BLOCK - 1, 2);
    corrupt(&set.files[0], SIZE - 1, 1);
    let (q, log) = open(&set, &plain(2), true);
    let node = q.as_quorum().expect("quorum");
    let report = scrub(node, true, 2, &qimg_core::progress::ignore).expect("scrub");
    assert_eq!(report.children[0].bad, vec![(SIZE - BLOCK, BLOCK)]);
    assert!(report.children[1].bad.is_empty());
    assert_eq!(
        report.children[2].bad,
        vec![(0, BLOCK), (4 * BLOCK, 2 * BLOCK)]
    );
    assert_eq!(report.children[2].repaired_bytes, 3 * BLOCK);
    assert_eq!(log.take().len(), 3);
    let again = scrub(node, false, 2, &qimg_core::progress::ignore).expect("second scrub");
    assert!(again.clean(), "{again:?}");
    q.close().expect("close");
    for f in &set.files {
        assert!(std::fs::read(f).expect("read back") == expected());
    }
}

#[test]
fn children_of_different_sizes_are_refused() {
    let set = replicas(2);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&set.files[1])
        .and_then(|f| f.set_len(SIZE / 2))
        .expect("shrink");
    let children: Vec<String> = set
        .files
        .iter()
        .enumerate()
        .map(|(i, p)| child(i, p, None))
        .collect();
    let spec = format!(
        r#"{{"driver":"quorum","node-name":"q","children":[{}],"vote-threshold":1,"blkverify":false,"rewrite-corrupted":false,"read-pattern":"quorum"}}"#,
        children.join(",")
    );
    let err = match open_spec(&spec, SpecOptions::default(), &EventLog::new()) {
        Ok(_) => panic!("sizes differ"),
        Err(e) => e,
    };
    assert!(err.to_string().contains("differ in size"), "{err}");
}
