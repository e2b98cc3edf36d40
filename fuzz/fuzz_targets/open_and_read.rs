//! Fuzz target: the input is an image file. It is opened (format probed, backing chain
//! followed), a bounded part of it is read, its snapshot table is read, it is checked, and a
//! bounded part of it is mapped. Errors are fine; panics, hangs, huge allocations and crashes
//! are what libFuzzer reports.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qimg_core::block::{map_extents, open_image, read_clipped, BlockDev, OpenOptions};
use qimg_core::prealloc::Prealloc;
use qimg_core::qcow2::check::check;
use qimg_core::qcow2::snapshot::read_snapshots;
use qimg_core::qcow2::{create, ClusterSize, CreateSpec};
use std::path::PathBuf;
use std::sync::OnceLock;

/// Bytes read at the start and at the end of the virtual disk.
const READ_CAP: u64 = 1 << 20;
/// Step of the reads.
const STEP: u64 = 64 << 10;
/// Bytes mapped at the start of the virtual disk.
const MAP_CAP: u64 = 64 << 20;

/// A per-process scratch directory holding `image` (the input, rewritten each run) and a
/// valid `base.qcow2`, so that inputs naming `base.qcow2` as backing file read through a chain.
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("qimg-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the scratch directory");
        let mut spec = CreateSpec::new(1 << 20);
        spec.cluster_size = ClusterSize::new(4096).expect("4k clusters");
        spec.prealloc = Prealloc::Metadata;
        create(&dir.join("base.qcow2"), &spec, Default::default()).expect("create base.qcow2");
        dir
    })
}

fn exercise(path: &str, opts: &OpenOptions) {
    let Ok(node) = open_image(path, opts) else {
        return;
    };
    let node: &dyn BlockDev = node.as_ref();
    let size = node.size();
    let mut buf = vec![0u8; STEP as usize];
    let head = 0..size.min(READ_CAP);
    let tail = size.saturating_sub(READ_CAP).max(head.end)..size;
    for range in [head, tail] {
        let mut pos = range.start;
        while pos < range.end {
            let n = STEP.min(range.end - pos);
            if node.read_at(&mut buf[..n as usize], pos).is_err() {
                break;
            }
            pos += n;
        }
    }
    let _ = read_clipped(node, &mut buf[..4096], size.saturating_sub(1000));
    // What `info` and `check` read.
    if let Some(q) = node.as_qcow2() {
        let _ = read_snapshots(q.file_node(), q.header());
        let _ = check(q);
    }
    let _ = map_extents(node, 0, MAP_CAP);
}

fuzz_target!(|data: &[u8]| {
    let image = scratch().join("image");
    std::fs::write(&image, data).expect("write the input");
    let name = image.to_str().expect("a UTF-8 scratch path");
    // The last byte picks the options, so that both probing and forced qcow2 get fuzzed.
    let opts = match data.last().map(|b| b % 4) {
        Some(0) => OpenOptions {
            format: Some(qimg_core::probe::Format::Qcow2),
            no_backing: false,
        },
        Some(1) => OpenOptions {
            format: Some(qimg_core::probe::Format::Qcow2),
            no_backing: true,
        },
        _ => OpenOptions::default(),
    };
    exercise(name, &opts);
});
