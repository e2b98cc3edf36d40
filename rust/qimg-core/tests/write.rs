//! The write engine against a model: random writes, zeroes, discards and
//! compressed clusters go both to a qcow2 image (through qimg) and to a
//! plain byte vector; afterwards `qemu-img check` must find the image clean
//! and `qemu-img compare` must find it equal to the model.
//!
//! Needs qemu-img (the reference checker), so the tests are ignored by
//! default; CI (scripts/test) runs them with `--include-ignored`.
#![allow(clippy::expect_used)] // A test stops at the first surprise.

mod common;
use common::Rng;
use qimg_core::block::{open_image, OpenOptions};
use std::path::Path;
use std::process::Command;

const MIB: u64 = 1 << 20;

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img runs (install qemu-utils)")
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

#[derive(Clone, Copy, Debug)]
struct Setup {
    cluster: u64,
    size: u64,
    options: &'static str,
    backing: bool,
    compressed: bool,
    /// Write the whole image first (makes the refcount structures grow).
    fill: bool,
}

/// Fills `buf` with a recognisable pattern that rarely contains zero runs.
fn pattern(buf: &mut [u8], seed: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = ((seed as usize).wrapping_mul(31).wrapping_add(i * 7) % 251 + 1) as u8;
    }
}

fn run_case(setup: Setup, seed: u64, ops: usize) {
    let dir = tempdir();
    let img = dir.path().join("img.qcow2");
    let model_path = dir.path().join("model.raw");
    let mut model = vec![0u8; setup.size as usize];
    let mut backing_data = vec![0u8; setup.size as usize];
    let mut create: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
    let mut opts = format!("cluster_size={}", setup.cluster);
    if !setup.options.is_empty() {
        opts.push(',');
        opts.push_str(setup.options);
    }
    if setup.backing {
        let base = dir.path().join("base.raw");
        // The backing file is shorter than the overlay: its tail reads as zeroes.
        let base_len = setup.size * 3 / 4;
        pattern(&mut backing_data[..base_len as usize], seed ^ 0xbac);
        std::fs::write(&base, &backing_data[..base_len as usize]).expect("write base");
        model.copy_from_slice(&backing_data);
        create.extend(["-b".into(), "base.raw".into(), "-F".into(), "raw".into()]);
    }
    create.extend(["-o".into(), opts, path_str(&img), setup.size.to_string()]);
    let out = Command::new("qemu-img")
        .args(&create)
        .current_dir(dir.path())
        .output()
        .expect("qemu-img create");
    assert!(out.status.success(), "create: {out:?}");
    let v2 = setup.options.contains("compat=0.10");

    let mut rng = Rng(seed | 1);
    let cs = setup.cluster;
    {
        let node = open_image(
            &path_str(&img),
            &OpenOptions {
                writable: true,
                ..OpenOptions::default()
            },
        )
        .expect("open writable");
        let q = node.as_qcow2().expect("qcow2");
        if setup.fill {
            let mut buf = vec![0u8; 65536];
            for off in (0..setup.size).step_by(buf.len()) {
                let n = (setup.size - off).min(buf.len() as u64) as usize;
                pattern(&mut buf[..n], off);
                node.write_at(&buf[..n], off).expect("fill");
                model[off as usize..off as usize + n].copy_from_slice(&buf[..n]);
            }
        }
        let mut compressed = 0;
        if setup.compressed {
            // Compressed clusters first: they need unallocated clusters.
            let clusters = setup.size / cs;
            for _ in 0..8 {
                let c = rng.below(clusters);
                let mut buf = vec![0u8; cs as usize];
                // Compressible: repeated short runs.
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = ((i / 64) as u64 ^ seed) as u8 | 1;
                }
                match q.write_compressed(&buf, c * cs) {
                    Ok(()) => {
                        compressed += 1;
                        model[(c * cs) as usize..((c + 1) * cs) as usize].copy_from_slice(&buf)
                    }
                    Err(e) => assert!(
                        e.to_string().contains("over allocated data"),
                        "compressed write: {e}"
                    ),
                }
            }
        }
        assert!(compressed > 0 || !setup.compressed || setup.fill);
        for op in 0..ops {
            let kind = rng.below(10);
            // Offsets and lengths biased towards cluster edges.
            let align = [1u64, 512, cs / 2, cs][rng.below(4) as usize].max(1);
            let off = rng.below(setup.size / align) * align;
            let max = (setup.size - off).min(4 * cs + 3 * align);
            let len = (rng.below(max / align + 1) * align).min(setup.size - off);
            let (o, l) = (off as usize, len as usize);
            match kind {
                0..=5 => {
                    let mut buf = vec![0u8; l];
                    pattern(&mut buf, seed.wrapping_add(op as u64));
                    node.write_at(&buf, off).expect("write");
                    model[o..o + l].copy_from_slice(&buf);
                }
                6 | 7 => {
                    let unmap = rng.below(2) == 0;
                    node.write_zeroes(off, len, unmap).expect("write_zeroes");
                    model[o..o + l].fill(0);
                }
                8 => {
                    node.discard(off, len).expect("discard");
                    // Whole clusters only; v2 shows the backing file again.
                    let lo = off.next_multiple_of(cs);
                    let end = off + len;
                    let hi = if end == setup.size {
                        end.next_multiple_of(cs)
                    } else {
                        end / cs * cs
                    }
                    .min(setup.size);
                    if lo < hi {
                        let (a, b) = (lo as usize, hi as usize);
                        if v2 {
                            model[a..b].copy_from_slice(&backing_data[a..b]);
                        } else {
                            model[a..b].fill(0);
                        }
                    }
                }
                _ => node.flush().expect("flush"),
            }
            if op % 16 == 0 {
                let mut back = vec![0u8; l];
                node.read_at(&mut back, off).expect("read back");
                assert!(
                    back == model[o..o + l],
                    "read back at {off}+{len} after op {op}"
                );
            }
        }
        node.close().expect("close");
    }
    std::fs::write(&model_path, &model).expect("write model");
    let check = qemu_img(&["check", &path_str(&img)]);
    assert!(
        check.status.success(),
        "{setup:?} seed {seed}: qemu-img check: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        &path_str(&model_path),
        &path_str(&img),
    ]);
    assert!(
        cmp.status.success(),
        "{setup:?} seed {seed}: qemu-img compare: {}{}",
        String::from_utf8_lossy(&cmp.stdout),
        String::from_utf8_lossy(&cmp.stderr)
    );
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

macro_rules! case {
    ($name:ident, $cluster:expr, $size:expr, $opts:expr, $backing:expr, $compressed:expr) => {
        case!($name, $cluster, $size, $opts, $backing, $compressed, false);
    };
    ($name:ident, $cluster:expr, $size:expr, $opts:expr, $backing:expr, $compressed:expr, $fill:expr) => {
        #[test]
        #[ignore = "needs QEMU's qemu-img; run with --include-ignored"]
        fn $name() {
            for seed in 1..=6u64 {
                run_case(
                    Setup {
                        cluster: $cluster,
                        size: $size,
                        options: $opts,
                        backing: $backing,
                        compressed: $compressed,
                        fill: $fill,
                    },
                    seed * 0x9e37_79b9,
                    120,
                );
            }
        }
    };
}

case!(plain_64k, 65536, 8 * MIB, "", false, true);
case!(plain_64k_backing, 65536, 8 * MIB, "", true, true);
case!(small_clusters, 512, MIB + 1536, "", false, true);
case!(small_clusters_backing, 512, MIB, "", true, false);
case!(big_clusters, 2 * MIB, 16 * MIB, "", false, true);
case!(extended_l2, 65536, 8 * MIB, "extended_l2=on", false, true);
case!(
    extended_l2_backing,
    65536,
    8 * MIB,
    "extended_l2=on",
    true,
    true
);
case!(compat_v2, 65536, 8 * MIB, "compat=0.10", false, true);
case!(
    compat_v2_backing,
    65536,
    8 * MIB,
    "compat=0.10",
    true,
    false
);
case!(
    lazy_refcounts,
    65536,
    8 * MIB,
    "lazy_refcounts=on",
    false,
    true
);
case!(zstd, 65536, 8 * MIB, "compression_type=zstd", false, true);
case!(
    refcount_bits_1,
    4096,
    2 * MIB,
    "refcount_bits=1",
    false,
    false
);
case!(
    refcount_bits_64,
    4096,
    2 * MIB,
    "refcount_bits=64",
    true,
    true
);
case!(
    reftable_growth,
    512,
    4 * MIB,
    "refcount_bits=64",
    false,
    false,
    true
);
case!(
    reftable_growth_backing,
    512,
    3 * MIB,
    "refcount_bits=32",
    true,
    true,
    true
);
