//! `qcow2::check::check` against the real `qemu-img check --output=json`:
//! clean images made by qemu-img and qemu-io in many shapes, and images
//! corrupted on purpose by patching bytes. For each image every counter
//! qemu-img reports and every line it prints on stderr must match.
//!
//! These tests need QEMU's qemu-img and qemu-io, so they are ignored by
//! default; CI (scripts/test) runs them with `--include-ignored`.
#![allow(clippy::expect_used)] // A test stops at the first surprise.

mod common;
#[path = "common/qemu.rs"]
mod qemu;
use common::Rng;
use qemu::{qemu_img, qemu_io, run, Scratch};
use qimg_core::block::{open_image, FileNode, OpenOptions};
use qimg_core::formats::qcow2::QCOW2;
use qimg_core::qcow2::check::{check, CheckReport};
use qimg_core::qcow2::header::Header;
use qimg_core::qcow2::reader::Qcow2Node;
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

/// What only these tests look at in the scratch image.
impl Scratch {
    /// A file beside the image, as a string for qemu-img's arguments.
    fn sibling(&self, name: &str) -> String {
        self.path
            .with_file_name(name)
            .to_str()
            .expect("utf-8 path")
            .to_string()
    }

    fn read_be32(&self, at: u64) -> u32 {
        let f = std::fs::File::open(&self.path).expect("open");
        let mut b = [0u8; 4];
        f.read_exact_at(&mut b, at).expect("read");
        u32::from_be_bytes(b)
    }

    fn header(&self) -> Header {
        let head = std::fs::read(&self.path).expect("read image");
        Header::parse(&head, head.len() as u64).expect("a valid header")
    }

    fn cluster_size(&self) -> u64 {
        1 << self.read_be32(20)
    }
}

/// What qemu-img check reported.
struct QemuCheck {
    fields: HashMap<String, String>,
    stderr: Vec<String>,
    status: i32,
}

impl QemuCheck {
    fn num(&self, key: &str) -> u64 {
        self.fields
            .get(key)
            .map(|v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{key} is not a number: {v}"))
            })
            .unwrap_or(0)
    }
}

/// Reads the flat JSON object qemu-img check prints, one member a line.
fn parse_flat_json(text: &str) -> HashMap<String, String> {
    let mut fields = HashMap::new();
    for line in text.lines() {
        let line = line.trim().trim_end_matches(',');
        let Some((key, value)) = line.split_once(": ") else {
            continue;
        };
        let key = key.trim_matches('"').to_string();
        fields.insert(key, value.trim_matches('"').to_string());
    }
    fields
}

fn qemu_check(path: &str) -> QemuCheck {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", "-f", "qcow2", path])
        .output()
        .expect("run qemu-img check");
    let stderr = String::from_utf8_lossy(&out.stderr)
        .lines()
        // qemu-img's own closing line, not part of the check's findings.
        .filter(|l| !l.starts_with("qemu-img: Check failed"))
        .map(str::to_string)
        .collect();
    QemuCheck {
        fields: parse_flat_json(&String::from_utf8_lossy(&out.stdout)),
        stderr,
        status: out.status.code().unwrap_or(-1),
    }
}

fn our_check(path: &str) -> qimg_core::Result<CheckReport> {
    let node = open_image(
        path,
        &OpenOptions {
            format: Some(&QCOW2),
            no_backing: true,
            ..OpenOptions::default()
        },
    )?;
    let qcow2 = node.as_qcow2().expect("a qcow2 node");
    check(qcow2)
}

/// Checks `path` with both tools and asserts that they agree on everything.
fn assert_same(path: &str) -> CheckReport {
    let q = qemu_check(path);
    assert!(
        q.fields.contains_key("check-errors"),
        "qemu-img check did not complete (status {}): {:?}",
        q.status,
        q.stderr
    );
    let r = our_check(path).unwrap_or_else(|e| panic!("qimg check of {path} failed: {e}"));
    let ours = [
        ("corruptions", r.corruptions),
        ("leaks", r.leaks),
        ("check-errors", r.check_errors),
        ("image-end-offset", r.image_end_offset),
        ("total-clusters", r.total_clusters),
        ("allocated-clusters", r.allocated_clusters),
        ("fragmented-clusters", r.fragmented_clusters),
        ("compressed-clusters", r.compressed_clusters),
    ];
    for (key, value) in ours {
        assert_eq!(
            value,
            q.num(key),
            "{key} differs from qemu-img for {path}\nqemu-img stderr: {:#?}\nours: {:#?}",
            q.stderr,
            r.messages
        );
    }
    assert_eq!(
        r.messages, q.stderr,
        "messages differ from qemu-img for {path}"
    );
    r
}

fn assert_clean(r: &CheckReport) {
    assert_eq!(
        (r.corruptions, r.leaks, r.check_errors),
        (0, 0, 0),
        "{:?}",
        r.messages
    );
    assert!(r.messages.is_empty(), "{:?}", r.messages);
}

// ---- clean images --------------------------------------------------------

#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn empty_image_is_clean() {
    let s = Scratch::new();
    s.create("", "1M");
    let r = assert_same(s.p());
    assert_clean(&r);
    assert_eq!(r.total_clusters, 16);
    assert_eq!(r.allocated_clusters, 0);
}

#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn written_zeroed_and_discarded_image_is_clean() {
    let s = Scratch::new();
    s.create("", "4M");
    s.io(&[
        "write -P 0x11 2M 128k",
        "write -P 0x22 0 192k",
        "write -z 64k 64k",
        "write -z -u 1M 64k",
        "write -P 0x33 3M 64k",
        "discard 3M 64k",
        "write -P 0x44 1536k 64k",
    ]);
    let r = assert_same(s.p());
    assert_clean(&r);
    assert!(r.allocated_clusters > 0);
    assert!(
        r.fragmented_clusters > 0,
        "guest order differs from host order"
    );
}

#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn compressed_images_are_clean() {
    let s = Scratch::new();
    let raw = s.sibling("src.raw");
    qemu_img(&["create", "-q", "-f", "raw", &raw, "1M"]);
    qemu_io_raw(&raw, &["write -P 0x5a 0 256k", "write -P 0xa5 512k 64k"]);
    for opts in ["compression_type=zlib", "compression_type=zstd"] {
        qemu_img(&[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            opts,
            &raw,
            s.p(),
        ]);
        let r = assert_same(s.p());
        assert_clean(&r);
        assert_eq!(r.compressed_clusters, 5, "{opts}");
        assert_eq!(r.fragmented_clusters, 5, "{opts}");
        assert_eq!(r.allocated_clusters, 5, "{opts}");
    }
}

fn qemu_io_raw(path: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(path);
    run("qemu-io", &args);
}

#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn extended_l2_image_with_subcluster_writes_is_clean() {
    let s = Scratch::new();
    s.create("extended_l2=on,cluster_size=64k", "4M");
    s.io(&[
        "write -P 1 0 4k",
        "write -P 2 36k 8k",
        "write -z 128k 4k",
        "write -P 3 1M 64k",
        "discard 1M 2k",
        "write -z 2M 64k",
    ]);
    let r = assert_same(s.p());
    assert_clean(&r);
}

#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn compat_v2_image_is_clean() {
    let s = Scratch::new();
    s.create("compat=0.10", "2M");
    s.io(&["write -P 7 0 100k", "write -z 1M 64k", "discard 0 64k"]);
    assert_clean(&assert_same(s.p()));
}

#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn small_and_large_cluster_sizes_are_clean() {
    for (opts, writes) in [
        (
            "cluster_size=512",
            ["write -P 1 0 3k", "write -P 2 100k 1536"],
        ),
        ("cluster_size=2M", ["write -P 1 0 4k", "write -P 2 5M 4k"]),
    ] {
        let s = Scratch::new();
        s.create(opts, "8M");
        s.io(&writes);
        assert_clean(&assert_same(s.p()));
    }
}

#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn refcount_widths_one_and_sixty_four_are_clean() {
    for opts in ["refcount_bits=1", "refcount_bits=8", "refcount_bits=64"] {
        let s = Scratch::new();
        s.create(opts, "2M");
        s.io(&["write -P 1 0 200k", "write -P 2 1M 64k"]);
        assert_clean(&assert_same(s.p()));
    }
}

#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn image_with_snapshots_is_clean() {
    let s = Scratch::new();
    s.create("", "4M");
    s.io(&["write -P 1 0 256k"]);
    qemu_img(&["snapshot", "-c", "first", s.p()]);
    s.io(&["write -P 2 64k 64k", "write -P 3 2M 64k"]);
    qemu_img(&["snapshot", "-c", "second", s.p()]);
    s.io(&["write -P 4 0 64k"]);
    let r = assert_same(s.p());
    assert_clean(&r);
}

#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn metadata_preallocated_image_is_clean() {
    let s = Scratch::new();
    s.create("preallocation=metadata", "3M");
    let r = assert_same(s.p());
    assert_clean(&r);
    assert_eq!(r.allocated_clusters, 48);
}

#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn image_with_persistent_bitmaps_is_clean() {
    let s = Scratch::new();
    s.create("", "4M");
    qemu_img(&["bitmap", "--add", s.p(), "b0"]);
    qemu_img(&["bitmap", "--add", "-g", "4k", s.p(), "b1"]);
    s.io(&["write -P 1 0 1M"]);
    assert_clean(&assert_same(s.p()));
}

#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn file_length_not_a_multiple_of_the_cluster_size_is_clean() {
    let s = Scratch::new();
    s.create("", "1M");
    s.io(&["write -P 1 0 64k"]);
    let len = s.len();
    for extra in [100, 512, 70_000] {
        s.set_len(len + extra);
        assert_same(s.p());
    }
}

#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn zero_sized_image_is_clean() {
    let s = Scratch::new();
    s.create("", "0");
    let r = assert_same(s.p());
    assert_clean(&r);
    assert_eq!(r.total_clusters, 0);
}

#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn overlay_is_checked_without_its_backing_file() {
    let s = Scratch::new();
    let base = s.sibling("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &base, "2M"]);
    qemu_io(Path::new(&base), &["write -P 1 0 1M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &base,
        "-F",
        "qcow2",
        s.p(),
    ]);
    s.io(&["write -P 2 64k 64k", "write -z 1M 64k"]);
    assert_clean(&assert_same(s.p()));
}

// ---- corrupted images ----------------------------------------------------

/// A 1 MiB image with two data clusters: guest 0 and guest 128k.
fn two_cluster_image() -> Scratch {
    let s = Scratch::new();
    s.create("", "1M");
    s.io(&["write -P 0x11 0 64k", "write -P 0x22 128k 64k"]);
    s
}

#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn raised_refcount_is_a_leak_and_a_copied_flag_error() {
    let s = two_cluster_image();
    let data = s.read_be64(s.l2_offset()) & 0x00ff_ffff_ffff_fe00;
    let cluster = data / s.cluster_size();
    s.set_refcount(cluster, 2);
    let r = assert_same(s.p());
    assert_eq!((r.leaks, r.corruptions), (1, 1));
    assert_eq!(
        r.messages[0],
        format!("Leaked cluster {cluster} refcount=2 reference=1")
    );
}

#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn refcount_on_an_unreferenced_cluster_is_a_leak() {
    let s = two_cluster_image();
    let cs = s.cluster_size();
    let end = s.len().div_ceil(cs);
    s.set_len((end + 1) * cs);
    s.set_refcount(end, 1);
    let r = assert_same(s.p());
    assert_eq!((r.leaks, r.corruptions), (1, 0));
    assert_eq!(
        r.messages,
        [format!("Leaked cluster {end} refcount=1 reference=0")]
    );
    assert_eq!(r.image_end_offset, (end + 1) * cs);
}

#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn zeroed_refcount_of_a_data_cluster_is_an_error() {
    let s = two_cluster_image();
    let data = s.read_be64(s.l2_offset()) & 0x00ff_ffff_ffff_fe00;
    let cluster = data / s.cluster_size();
    s.set_refcount(cluster, 0);
    let r = assert_same(s.p());
    assert_eq!(r.corruptions, 2);
    assert_eq!(
        r.messages[0],
        format!("ERROR cluster {cluster} refcount=0 reference=1")
    );
}

#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn l2_entry_pointing_into_the_l1_table_is_an_overlap() {
    let s = two_cluster_image();
    let l1 = s.l1_offset();
    s.patch_be64(s.l2_offset() + 8, (1 << 63) | l1);
    let r = assert_same(s.p());
    assert!(r.corruptions >= 1);
}

#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn unaligned_l2_table_offset_is_reported() {
    let s = two_cluster_image();
    let l1 = s.l1_offset();
    let entry = s.read_be64(l1);
    s.patch_be64(l1, entry + 0x200);
    let r = assert_same(s.p());
    assert!(r
        .messages
        .iter()
        .any(|m| m.contains("Table is not cluster aligned")));
}

#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn l2_entries_beyond_the_end_of_the_file_are_reported() {
    let s = two_cluster_image();
    let l2 = s.l2_offset();
    s.patch_be64(l2 + 8, (1 << 63) | 0x100_0000);
    // Compressed, far away, too.
    s.patch_be64(l2 + 24, (1 << 62) | 0x200_0000);
    let r = assert_same(s.p());
    assert!(r
        .messages
        .iter()
        .any(|m| m.contains("exceeding the end of the file")));
}

#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn l2_table_beyond_the_end_of_the_file_is_reported() {
    let s = two_cluster_image();
    s.patch_be64(s.l1_offset() + 8, (1 << 63) | 0x4000_0000);
    assert_same(s.p());
}

#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn reserved_bits_in_l1_and_l2_entries_are_reported() {
    let s = two_cluster_image();
    let l1 = s.l1_offset();
    let l2 = s.l2_offset();
    s.patch_be64(l1, s.read_be64(l1) | (1 << 60) | 1);
    s.patch_be64(l2, s.read_be64(l2) | (1 << 58) | 2);
    let r = assert_same(s.p());
    assert!(r
        .messages
        .iter()
        .any(|m| m.starts_with("ERROR found L1 entry with reserved bits set")));
    assert!(r
        .messages
        .iter()
        .any(|m| m.starts_with("ERROR found l2 entry with reserved bits set")));
}

#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn unaligned_data_and_preallocated_zero_offsets_are_reported() {
    let s = two_cluster_image();
    let l2 = s.l2_offset();
    let data0 = s.read_be64(l2);
    s.patch_be64(l2, data0 + 0x400);
    let data2 = s.read_be64(l2 + 16);
    // A zero cluster that keeps an unaligned host cluster.
    s.patch_be64(l2 + 16, data2 + 0x200 + 1);
    let r = assert_same(s.p());
    assert!(r
        .messages
        .iter()
        .any(|m| m.contains("Data cluster is not properly aligned")));
    assert!(r
        .messages
        .iter()
        .any(|m| m.contains("Preallocated cluster is not properly aligned")));
}

#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn refcount_block_outside_the_image_is_reported() {
    let s = two_cluster_image();
    s.patch_be64(s.reftable_offset(), 0x1000_0000);
    let r = assert_same(s.p());
    assert!(r
        .messages
        .contains(&"ERROR refcount block 0 is outside image".to_string()));
}

#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn unaligned_refcount_block_is_a_check_error() {
    let s = two_cluster_image();
    let rt = s.reftable_offset();
    s.patch_be64(rt, s.read_be64(rt) + 0x200);
    let r = assert_same(s.p());
    assert!(r.check_errors > 0);
}

#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn reserved_bits_in_the_refcount_table_are_reported() {
    let s = two_cluster_image();
    let rt = s.reftable_offset();
    s.patch_be64(rt, s.read_be64(rt) | 0x1);
    s.patch_be64(rt + 8, 0x3);
    assert_same(s.p());
}

#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn copied_flags_wrong_either_way_are_reported() {
    let s = two_cluster_image();
    let l1 = s.l1_offset();
    s.patch_be64(l1, s.read_be64(l1) & !(1 << 63));
    let l2 = s.l2_offset();
    s.patch_be64(l2 + 16, s.read_be64(l2 + 16) & !(1 << 63));
    let r = assert_same(s.p());
    assert_eq!(r.corruptions, 2);
}

#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn compressed_cluster_with_copied_flag_is_reported() {
    let s = Scratch::new();
    let raw = s.sibling("src.raw");
    qemu_img(&["create", "-q", "-f", "raw", &raw, "1M"]);
    qemu_io_raw(&raw, &["write -P 0x5a 0 128k"]);
    qemu_img(&["convert", "-c", "-f", "raw", "-O", "qcow2", &raw, s.p()]);
    let l2 = s.l2_offset();
    s.patch_be64(l2, s.read_be64(l2) | (1 << 63));
    let r = assert_same(s.p());
    assert!(r.messages[0].contains("copied flag must never be set for compressed clusters"));
}

#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn shared_cluster_overflows_one_bit_refcounts() {
    let s = Scratch::new();
    s.create("refcount_bits=1", "1M");
    s.io(&["write -P 1 0 64k"]);
    let l2 = s.l2_offset();
    s.patch_be64(l2 + 8, s.read_be64(l2));
    let r = assert_same(s.p());
    assert!(r
        .messages
        .iter()
        .any(|m| m.starts_with("ERROR: overflow cluster offset=")));
}

#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn crash_with_lazy_refcounts_leaves_refcounts_behind() {
    let s = Scratch::new();
    s.create("lazy_refcounts=on", "4M");
    // qemu-io's abort command kills the process before refcounts are written.
    let status = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 1 0 256k",
            "-c",
            "write -P 2 1M 64k",
        ])
        .args(["-c", "abort", s.p()])
        .output()
        .expect("run qemu-io");
    assert!(!status.status.success());
    let r = assert_same(s.p());
    assert!(r.corruptions > 0);
}

#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn broken_snapshot_entries_are_reported() {
    let s = Scratch::new();
    s.create("", "1M");
    s.io(&["write -P 1 0 64k"]);
    qemu_img(&["snapshot", "-c", "one", s.p()]);
    qemu_img(&["snapshot", "-c", "two", s.p()]);
    let table = s.read_be64(64);
    // First entry: L1 table not cluster aligned.
    s.patch_be64(table, s.read_be64(table) + 0x200);
    assert_same(s.p());
    // First entry: L1 table too large.
    s.patch_be64(table, s.read_be64(table) - 0x200);
    s.patch(table + 8, &0x0040_0001u32.to_be_bytes());
    assert_same(s.p());
    // Last entry: too little extra data for a v3 image (the entry before
    // is 40 + 24 bytes of extra data + "1" + "one", padded to 8).
    s.patch(table + 8, &1u32.to_be_bytes());
    let second = table + 72;
    assert_eq!(s.read_be32(second + 36), 24);
    s.patch(second + 36, &8u32.to_be_bytes());
    let r = assert_same(s.p());
    assert!(r
        .messages
        .contains(&"ERROR snapshot table entry 1 is incomplete".to_string()));
}

#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn too_much_snapshot_extra_data_fails_the_check_like_qemu() {
    let s = Scratch::new();
    s.create("", "1M");
    qemu_img(&["snapshot", "-c", "one", s.p()]);
    let table = s.read_be64(64);
    s.patch(table + 36, &2000u32.to_be_bytes());
    let q = qemu_check(s.p());
    assert_eq!(q.status, 1);
    let err = our_check(s.p()).expect_err("the check cannot complete");
    assert!(
        err.to_string().ends_with("Check failed: File too large"),
        "{err}"
    );
}

#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn file_of_more_than_int_max_clusters_is_refused_like_qemu() {
    let s = Scratch::new();
    s.create("cluster_size=512", "1M");
    // Sparse: 2^31 + 1 clusters of 512 bytes.
    s.set_len(((1u64 << 31) + 1) * 512);
    let q = qemu_check(s.p());
    assert_eq!(q.status, 1);
    assert_eq!(q.stderr, Vec::<String>::new());
    let err = our_check(s.p()).expect_err("too large to check");
    assert_eq!(err.to_string(), "Check failed: File too large");
}

/// Checks `path` with qimg through a node opened on `header` as given,
/// bypassing the header parser's own limits, and compares with qemu-img.
fn assert_same_with_header(path: &str, header: Header) -> CheckReport {
    let q = qemu_check(path);
    let file = Arc::new(FileNode::open(Path::new(path)).expect("open file"));
    let node = Qcow2Node::open(file, header, None, None).expect("open qcow2 node");
    let r = check(&node).expect("check");
    assert_eq!(
        r.corruptions,
        q.num("corruptions"),
        "{:?} / {:?}",
        r.messages,
        q.stderr
    );
    assert_eq!(r.leaks, q.num("leaks"));
    assert_eq!(r.check_errors, q.num("check-errors"));
    assert_eq!(r.image_end_offset, q.num("image-end-offset"));
    assert_eq!(r.total_clusters, q.num("total-clusters"));
    assert_eq!(r.allocated_clusters, q.num("allocated-clusters"));
    assert_eq!(r.messages, q.stderr);
    r
}

/// qemu-img check does not require the L1 or snapshot table to lie inside
/// the file (it reads zeroes past its end); the check itself copes with
/// that too, whatever the opener decides.
#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn tables_past_the_end_of_the_file_are_counted_like_qemu() {
    let s = two_cluster_image();
    let mut header = s.header();
    s.patch_be64(40, 0x100_0000);
    header.l1_table_offset = 0x100_0000;
    let r = assert_same_with_header(s.p(), header);
    assert_eq!(r.leaks, 4);

    let s = two_cluster_image();
    let mut header = s.header();
    s.patch(60, &1u32.to_be_bytes());
    s.patch_be64(64, 0x100_0000);
    header.snapshot_count = 1;
    header.snapshots_offset = 0x100_0000;
    let r = assert_same_with_header(s.p(), header);
    assert_eq!(r.corruptions, 2);
}

// ---- random damage ---------------------------------------------------------

/// Damages metadata entries of small images at random and compares with
/// qemu-img wherever both tools complete the check; never panics.
/// QIMG_CHECK_FUZZ_ROUNDS and QIMG_CHECK_FUZZ_SEED run it longer or differently.
#[test]
#[ignore = "needs QEMU's qemu-img and qemu-io; run with --include-ignored"]
fn random_metadata_damage_matches_qemu() {
    let env_num = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let rounds = env_num("QIMG_CHECK_FUZZ_ROUNDS", 60);
    let mut rng = Rng(env_num("QIMG_CHECK_FUZZ_SEED", 0x9e37_79b9_7f4a_7c15) | 1);
    let mut compared = 0;
    for round in 0..rounds {
        let s = Scratch::new();
        let kind = round % 6;
        if kind == 5 {
            let raw = s.sibling("src.raw");
            qemu_img(&["create", "-q", "-f", "raw", &raw, "2M"]);
            qemu_io_raw(&raw, &["write -P 0x5a 0 256k", "write -P 0xa5 1M 64k"]);
            qemu_img(&["convert", "-c", "-f", "raw", "-O", "qcow2", &raw, s.p()]);
            s.io(&["write -P 1 64k 64k"]);
        } else {
            let opts = [
                "",
                "refcount_bits=4",
                "extended_l2=on",
                "cluster_size=4k",
                "compat=0.10",
            ][kind as usize];
            s.create(opts, "2M");
            s.io(&[
                "write -P 1 0 192k",
                "write -P 2 1M 64k",
                "write -z 1536k 64k",
            ]);
        }
        if round % 7 == 0 {
            qemu_img(&["snapshot", "-c", "s", s.p()]);
            s.io(&["write -P 3 0 64k"]);
        }
        if round % 11 == 0 && kind != 4 {
            qemu_img(&["bitmap", "--add", s.p(), "b"]);
            s.io(&["write -P 4 512k 64k"]);
        }
        let cs = s.cluster_size();
        // Metadata clusters worth damaging: L1, L2, reftable, refblock.
        let mut targets = vec![
            s.l1_offset(),
            s.l2_offset(),
            s.reftable_offset(),
            s.refblock_offset(),
        ];
        // The snapshot table and a snapshot's L1 table, the bitmap directory and a bitmap table.
        if s.read_be32(60) > 0 {
            let table = s.read_be64(64);
            targets.extend([table, s.read_be64(table)]);
        }
        if let Some(ext) = s.header().bitmaps {
            let dir = ext.directory_offset;
            targets.extend([dir, s.read_be64(dir)]);
        }
        for _ in 0..1 + rng.below(3) {
            let table = targets[rng.below(targets.len() as u64) as usize];
            let at = table + rng.below(cs.min(512) / 8) * 8;
            let old = s.read_be64(at);
            let new = match rng.below(6) {
                0 => old ^ (1 << rng.below(64)),
                1 => old.wrapping_add(cs),
                2 => old.wrapping_add(0x200),
                3 => 0,
                4 => s.read_be64(table + rng.below(cs.min(512) / 8) * 8),
                _ => rng.next() & 0x00ff_ffff_ffff_ffff,
            };
            s.patch_be64(at, new);
        }
        if rng.below(8) == 0 {
            s.set_len(s.len() + rng.below(3 * cs));
        }
        let q = qemu_check(s.p());
        let ours = our_check(s.p());
        if !q.fields.contains_key("check-errors") || ours.is_err() {
            if std::env::var_os("QIMG_CHECK_VERBOSE").is_some() {
                let ours = ours.err().map(|e| e.to_string());
                eprintln!(
                    "round {round} skipped: qemu-img {:?}, qimg {ours:?}",
                    q.stderr
                );
            }
            continue;
        }
        let r = assert_same(s.p());
        compared += 1;
        if std::env::var_os("QIMG_CHECK_VERBOSE").is_some() {
            eprintln!("round {round}: {:?}", r.messages);
        }
    }
    assert!(
        compared * 2 >= rounds,
        "only {compared} of {rounds} damaged images could be compared"
    );
}

/// Checks the image named by QIMG_CHECK_IMAGE (any image, e.g. a large one
/// to time) against qemu-img: `QIMG_CHECK_IMAGE=x.qcow2 cargo test -p qimg-core
/// --test check -- --ignored --nocapture`. Without QIMG_CHECK_IMAGE it checks nothing.
#[test]
#[ignore = "needs QEMU's qemu-img and an image named by QIMG_CHECK_IMAGE; run with --ignored"]
fn image_from_the_environment_matches_qemu() {
    let Some(path) = std::env::var_os("QIMG_CHECK_IMAGE") else {
        return;
    };
    let path = path.to_str().expect("utf-8 path").to_string();
    let start = std::time::Instant::now();
    let _ = qemu_check(&path);
    let theirs = start.elapsed();
    let start = std::time::Instant::now();
    let _ = our_check(&path);
    let ours = start.elapsed();
    let r = assert_same(&path);
    eprintln!(
        "{path}: qemu-img {theirs:?}, qimg {ours:?}; {} corruptions, {} leaks, {} messages",
        r.corruptions,
        r.leaks,
        r.messages.len()
    );
}
