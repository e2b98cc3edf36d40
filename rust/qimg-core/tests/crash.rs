//! Crash safety: a writer process is killed (SIGKILL) at random moments
//! while it writes, zeroes, discards and stores compressed clusters, flushing
//! now and then. After every kill `qemu-img check` must find no corruption
//! (leaked clusters are allowed), and every byte that was flushed before the
//! kill and not touched afterwards must read back.
//!
//! The writer is this test binary itself, started again with an environment
//! variable that makes `crash_worker` do the writing.
//!
//! The campaigns need QEMU's qemu-img, so they are ignored by default; CI
//! (scripts/test) runs them with `--include-ignored`. `crash_worker` is not
//! ignored: it needs no QEMU, and the campaigns start it by name without
//! that flag.
#![allow(clippy::expect_used)] // A test stops at the first surprise.

mod common;
use common::Rng;
use qimg_core::block::{open_image, OpenOptions};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const SIZE: u64 = 8 << 20;
/// Compressed clusters go to the last eighth of the disk, each written once;
/// other writes stay below it (compressed writes need unallocated clusters).
const COMPRESSED_FROM: u64 = SIZE / 8 * 7;
const WORKER_IMAGE: &str = "QIMG_CRASH_IMAGE";
const WORKER_SEED: &str = "QIMG_CRASH_SEED";
const WORKER_CLUSTER: &str = "QIMG_CRASH_CLUSTER";

#[derive(Debug, Clone, Copy)]
enum Op {
    Write { off: u64, len: u64, seed: u64 },
    Zero { off: u64, len: u64, unmap: bool },
    Discard { off: u64, len: u64 },
    Compressed { cluster: u64, seed: u64 },
    Flush,
}

/// The deterministic sequence of operations for `seed`; both processes
/// generate it.
struct Ops {
    rng: Rng,
    cluster: u64,
    next_compressed: u64,
    index: u64,
}

impl Ops {
    fn new(seed: u64, cluster: u64) -> Ops {
        Ops {
            rng: Rng(seed | 1),
            cluster,
            next_compressed: COMPRESSED_FROM / cluster,
            index: 0,
        }
    }

    fn next_op(&mut self) -> Op {
        self.index += 1;
        let cs = self.cluster;
        let kind = self.rng.below(16);
        let align = [512u64, 4096, cs][self.rng.below(3) as usize];
        let off = self.rng.below(COMPRESSED_FROM / align) * align;
        let len = ((self.rng.below(6 * cs / align) + 1) * align).min(COMPRESSED_FROM - off);
        match kind {
            0..=7 => Op::Write {
                off,
                len,
                seed: self.index,
            },
            8 | 9 => Op::Zero {
                off,
                len,
                unmap: kind == 9,
            },
            10 => Op::Discard { off, len },
            11 | 12 if self.next_compressed < SIZE / cs => {
                self.next_compressed += 1;
                Op::Compressed {
                    cluster: self.next_compressed - 1,
                    seed: self.index,
                }
            }
            _ => Op::Flush,
        }
    }
}

fn fill(buf: &mut [u8], seed: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        // Compressible but never all zero.
        *b = ((seed as usize * 7 + i / 97) % 250 + 1) as u8;
    }
}

/// The writer side: runs until killed.
#[test]
fn crash_worker() {
    let (Ok(image), Ok(seed), Ok(cluster)) = (
        std::env::var(WORKER_IMAGE),
        std::env::var(WORKER_SEED),
        std::env::var(WORKER_CLUSTER),
    ) else {
        return; // Not started as a worker: nothing to do.
    };
    let seed: u64 = seed.parse().expect("seed");
    let cluster: u64 = cluster.parse().expect("cluster");
    let node = open_image(
        &image,
        &OpenOptions {
            writable: true,
            ..OpenOptions::default()
        },
    )
    .expect("open writable");
    let q = node.as_qcow2().expect("qcow2");
    let mut ops = Ops::new(seed, cluster);
    let mut done = 0u64;
    loop {
        let op = ops.next_op();
        match op {
            Op::Write { off, len, seed } => {
                let mut buf = vec![0u8; len as usize];
                fill(&mut buf, seed);
                node.write_at(&buf, off).expect("write");
            }
            Op::Zero { off, len, unmap } => node.write_zeroes(off, len, unmap).expect("zero"),
            Op::Discard { off, len } => node.discard(off, len).expect("discard"),
            Op::Compressed { cluster: c, seed } => {
                let mut buf = vec![0u8; cluster as usize];
                fill(&mut buf, seed);
                q.write_compressed(&buf, c * cluster).expect("compressed");
            }
            Op::Flush => {
                node.flush().expect("flush");
                println!("F {done}");
            }
        }
        done += 1;
        if done > 5_000_000 {
            return;
        }
    }
}

/// Applies `op` to the model; returns the byte range it touches.
fn apply(model: &mut [u8], op: Op, cluster: u64) -> Option<(u64, u64)> {
    match op {
        Op::Write { off, len, seed } => {
            fill(&mut model[off as usize..(off + len) as usize], seed);
            Some((off, off + len))
        }
        Op::Zero { off, len, .. } => {
            model[off as usize..(off + len) as usize].fill(0);
            Some((off, off + len))
        }
        Op::Discard { off, len } => {
            let lo = off.next_multiple_of(cluster);
            let hi = (off + len) / cluster * cluster;
            if lo < hi {
                model[lo as usize..hi as usize].fill(0);
            }
            Some((lo, hi.max(lo)))
        }
        Op::Compressed { cluster: c, seed } => {
            let (a, b) = (c * cluster, (c + 1) * cluster);
            fill(&mut model[a as usize..b as usize], seed);
            Some((a, b))
        }
        Op::Flush => None,
    }
}

/// Returns whether the killed writer left the image marked dirty.
fn run_once(dir: &Path, options: &str, cluster: u64, seed: u64, delay_us: u64) -> bool {
    let image = dir.join(format!("crash-{seed}.qcow2"));
    let _ = std::fs::remove_file(&image);
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o"])
        .arg(format!("cluster_size={cluster}{options}"))
        .arg(&image)
        .arg(SIZE.to_string())
        .output()
        .expect("qemu-img create (install qemu-utils)");
    assert!(out.status.success(), "create: {out:?}");

    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args(["--exact", "crash_worker", "--nocapture", "--test-threads=1"])
        .env(WORKER_IMAGE, &image)
        .env(WORKER_SEED, seed.to_string())
        .env(WORKER_CLUSTER, cluster.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn worker");
    let stdout = child.stdout.take().expect("worker stdout");
    let reader = std::thread::spawn(move || {
        let mut last: Option<u64> = None;
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            if let Some(n) = line.strip_prefix("F ") {
                last = n.trim().parse().ok();
            }
        }
        last
    });
    std::thread::sleep(Duration::from_micros(delay_us));
    let _ = child.kill();
    let _ = child.wait();
    let flushed = reader.join().expect("reader thread");

    let check = Command::new("qemu-img")
        .args(["check", "--output=json"])
        .arg(&image)
        .output()
        .expect("qemu-img check");
    let report = String::from_utf8_lossy(&check.stdout);
    // 0: clean, 3: leaked clusters only. 2 would be corruption.
    assert!(
        matches!(check.status.code(), Some(0 | 3)),
        "{options} seed {seed} delay {delay_us}us: qemu-img check exit {:?}: {report}{}",
        check.status.code(),
        String::from_utf8_lossy(&check.stderr)
    );

    let header = std::fs::read(&image).expect("read image");
    let dirty = header.get(79).is_some_and(|b| b & 1 != 0);
    if options.contains("lazy_refcounts=on") {
        // A writable open rebuilds the refcounts of the dirty image: then
        // not even leaks remain.
        let node = open_image(
            &image.display().to_string(),
            &OpenOptions {
                writable: true,
                ..OpenOptions::default()
            },
        )
        .expect("writable reopen of the killed image");
        node.close().expect("close");
        drop(node);
        let check = Command::new("qemu-img")
            .arg("check")
            .arg(&image)
            .output()
            .expect("qemu-img check");
        assert!(
            check.status.success(),
            "{options} seed {seed}: after the rebuild: {}",
            String::from_utf8_lossy(&check.stdout)
        );
    }

    // Replay: the flushed state, minus what later operations may have touched.
    let Some(n) = flushed else {
        return dirty;
    };
    let mut model = vec![0u8; SIZE as usize];
    let mut ops = Ops::new(seed, cluster);
    for _ in 0..=n {
        let op = ops.next_op();
        apply(&mut model, op, cluster);
    }
    let mut uncertain = vec![false; SIZE as usize];
    loop {
        let op = ops.next_op();
        let mut scratch = model.clone();
        if let Some((a, b)) = apply(&mut scratch, op, cluster) {
            uncertain[a as usize..b as usize].fill(true);
        }
        if matches!(op, Op::Flush) {
            break;
        }
    }
    let node = open_image(&image.display().to_string(), &OpenOptions::default()).expect("reopen");
    let mut back = vec![0u8; SIZE as usize];
    node.read_at(&mut back, 0).expect("read back");
    if let Some(bad) = (0..SIZE as usize).find(|&i| !uncertain[i] && back[i] != model[i]) {
        panic!(
            "{options} seed {seed} delay {delay_us}us: byte {bad} reads {} but {} was flushed (after op {n})",
            back[bad], model[bad]
        );
    }
    dirty
}

fn campaign(options: &str, cluster: u64, runs: u64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut rng = Rng(0x5eed ^ cluster ^ options.len() as u64);
    let mut dirty = 0;
    for run in 0..runs {
        let seed = rng.next() % 1_000_000 + run;
        // Mostly early kills (during the first allocations), some later ones.
        let delay = if rng.below(3) == 0 {
            rng.below(200_000)
        } else {
            rng.below(40_000)
        };
        dirty += u64::from(run_once(dir.path(), options, cluster, seed, delay));
    }
    if options.contains("lazy_refcounts=on") {
        // Otherwise the rebuild on open was never exercised.
        assert!(dirty > 0, "no run left a dirty image");
    } else {
        assert_eq!(
            dirty, 0,
            "images without lazy refcounts never get the dirty bit"
        );
    }
}

#[test]
#[ignore = "needs QEMU's qemu-img; run with --include-ignored"]
fn killed_writer_default_image() {
    campaign("", 65536, 60);
}

#[test]
#[ignore = "needs QEMU's qemu-img; run with --include-ignored"]
fn killed_writer_growing_refcounts() {
    // 4k clusters with 64-bit refcounts: refcount blocks cover 2 MiB each and
    // the refcount table outgrows its first cluster while the writer runs.
    campaign(",refcount_bits=64", 4096, 60);
}

#[test]
#[ignore = "needs QEMU's qemu-img; run with --include-ignored"]
fn killed_writer_extended_l2() {
    campaign(",extended_l2=on", 65536, 50);
}

#[test]
#[ignore = "needs QEMU's qemu-img; run with --include-ignored"]
fn killed_writer_lazy_refcounts() {
    campaign(",lazy_refcounts=on", 65536, 50);
}
