//! The NBD client against a scripted server on a unix socket: a well-behaved
//! one (handshake, structured reads, block status, writes), and servers that
//! misbehave in each way the protocol allows (wrong cookie, bad magic, a
//! truncated or oversized reply, data outside the request, a dead or silent
//! server). Every fault must be an I/O error of the node, never a panic or a
//! hang.
#![allow(clippy::expect_used)] // A test stops at the first surprise.

use qimg_core::block::nbd::{NbdNode, NbdOptions, NbdServer};
use qimg_core::block::BlockDev;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

const SIZE: u64 = 1 << 20;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fault {
    None,
    WrongCookie,
    BadMagic,
    Truncated,
    Oversized,
    OutsideRequest,
    Close,
    Silent,
    ServerError,
}

fn read_exact(s: &mut UnixStream, n: usize) -> Option<Vec<u8>> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).ok()?;
    Some(v)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

fn opt_reply(s: &mut UnixStream, option: u32, kind: u32, data: &[u8]) {
    let mut m = Vec::new();
    m.extend_from_slice(&0x0003_e889_0455_65a9u64.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    let _ = s.write_all(&m);
}

fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&0x668e_33efu32.to_be_bytes());
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    m.extend_from_slice(payload);
    m
}

/// Serves one client: the handshake, then requests until it leaves. Reads
/// get `fault`; the export is `disk`.
fn serve(mut s: UnixStream, disk: Arc<Mutex<Vec<u8>>>, fault: Fault) -> Option<()> {
    let mut hello = Vec::new();
    hello.extend_from_slice(&0x4e42_444d_4147_4943u64.to_be_bytes());
    hello.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    hello.extend_from_slice(&3u16.to_be_bytes());
    s.write_all(&hello).ok()?;
    read_exact(&mut s, 4)?;
    loop {
        let h = read_exact(&mut s, 16)?;
        let option = u32_at(&h, 8);
        let data = read_exact(&mut s, u32_at(&h, 12) as usize)?;
        match option {
            8 => opt_reply(&mut s, 8, 1, &[]),
            10 => {
                let mut ctx = 7u32.to_be_bytes().to_vec();
                ctx.extend_from_slice(b"base:allocation");
                opt_reply(&mut s, 10, 4, &ctx);
                opt_reply(&mut s, 10, 1, &[]);
            }
            7 => {
                let name_len = u32_at(&data, 0) as usize;
                if &data[4..4 + name_len] != b"disk" {
                    opt_reply(&mut s, 7, (1 << 31) | 6, b"no such export");
                    continue;
                }
                let mut info = 0u16.to_be_bytes().to_vec();
                info.extend_from_slice(&SIZE.to_be_bytes());
                info.extend_from_slice(&(1u16 | 4 | 64).to_be_bytes());
                opt_reply(&mut s, 7, 3, &info);
                opt_reply(&mut s, 7, 1, &[]);
                break;
            }
            _ => opt_reply(&mut s, option, (1 << 31) | 1, &[]),
        }
    }
    loop {
        let r = read_exact(&mut s, 28)?;
        let cmd = u16::from_be_bytes([r[6], r[7]]);
        let cookie = u64_at(&r, 8);
        let offset = u64_at(&r, 16);
        let len = u32_at(&r, 24) as usize;
        match cmd {
            0 => {
                let off = offset as usize;
                let bytes = disk.lock().ok()?[off..off + len].to_vec();
                let mut payload = offset.to_be_bytes().to_vec();
                payload.extend_from_slice(&bytes);
                let reply = match fault {
                    Fault::None => chunk(1, 1, cookie, &payload),
                    Fault::WrongCookie => chunk(1, 1, cookie + 1000, &payload),
                    Fault::BadMagic => vec![0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0],
                    Fault::Truncated => chunk(1, 1, cookie, &payload)[..30].to_vec(),
                    Fault::Oversized => {
                        let mut m = chunk(1, 1, cookie, &[]);
                        m[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
                        m
                    }
                    Fault::OutsideRequest => {
                        let mut p = (offset + 1).to_be_bytes().to_vec();
                        p.extend_from_slice(&bytes);
                        chunk(1, 1, cookie, &p)
                    }
                    Fault::Close => return None,
                    Fault::Silent => {
                        std::thread::sleep(Duration::from_secs(3));
                        return None;
                    }
                    Fault::ServerError => {
                        let mut p = 5u32.to_be_bytes().to_vec();
                        p.extend_from_slice(&4u16.to_be_bytes());
                        p.extend_from_slice(b"gone");
                        chunk(1, 32769, cookie, &p)
                    }
                };
                if fault == Fault::Truncated {
                    s.write_all(&reply).ok()?;
                    return None;
                }
                s.write_all(&reply).ok()?;
            }
            1 => {
                let data = read_exact(&mut s, len)?;
                let off = offset as usize;
                disk.lock().ok()?[off..off + len].copy_from_slice(&data);
                s.write_all(&chunk(1, 0, cookie, &[])).ok()?;
            }
            2 => return Some(()),
            3 => s.write_all(&chunk(1, 0, cookie, &[])).ok()?,
            7 => {
                // The first half is data, the second half zeroes.
                let half = SIZE / 2;
                let (n, flags) = if offset < half {
                    ((half - offset).min(len as u64), 0u32)
                } else {
                    (len as u64, 3u32)
                };
                let mut p = 7u32.to_be_bytes().to_vec();
                p.extend_from_slice(&(n as u32).to_be_bytes());
                p.extend_from_slice(&flags.to_be_bytes());
                s.write_all(&chunk(1, 5, cookie, &p)).ok()?;
            }
            _ => {
                let mut p = 22u32.to_be_bytes().to_vec();
                p.extend_from_slice(&0u16.to_be_bytes());
                s.write_all(&chunk(1, 32769, cookie, &p)).ok()?;
            }
        }
    }
}

struct Server {
    _dir: tempfile::TempDir,
    path: PathBuf,
    disk: Arc<Mutex<Vec<u8>>>,
    _thread: JoinHandle<()>,
}

fn server(fault: Fault) -> Server {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("nbd.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let disk: Arc<Mutex<Vec<u8>>> =
        Arc::new(Mutex::new((0..SIZE).map(|i| (i % 253) as u8).collect()));
    let d = Arc::clone(&disk);
    let thread = std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let d = Arc::clone(&d);
            std::thread::spawn(move || serve(conn, d, fault));
        }
    });
    Server {
        _dir: dir,
        path,
        disk,
        _thread: thread,
    }
}

fn open(s: &Server, export: &str, writable: bool) -> qimg_core::Result<NbdNode> {
    NbdNode::open(
        NbdOptions {
            server: NbdServer::Unix {
                path: s.path.display().to_string(),
            },
            export: export.to_string(),
            timeout: Duration::from_secs(1),
            connections: None,
        },
        writable,
    )
}

#[test]
fn a_well_behaved_server_reads_writes_and_reports_allocation() {
    let s = server(Fault::None);
    let node = open(&s, "disk", true).expect("open");
    assert_eq!(node.size(), SIZE);
    let mut buf = vec![0u8; 70_000];
    node.read_at(&mut buf, 1234).expect("read");
    let want: Vec<u8> = (1234..1234 + 70_000u64).map(|i| (i % 253) as u8).collect();
    assert!(buf == want);
    node.write_at(&[9u8; 4096], 8192).expect("write");
    node.flush().expect("flush");
    assert!(s.disk.lock().expect("disk")[8192..8192 + 4096] == [9u8; 4096]);
    let st = node.status(0, SIZE).expect("status");
    assert_eq!((st.len, st.data, st.zero), (SIZE / 2, true, false));
    let st = node.status(SIZE / 2, SIZE / 2).expect("status");
    assert_eq!((st.len, st.data, st.zero), (SIZE / 2, false, true));
}

#[test]
fn an_unknown_export_is_refused_with_the_servers_words() {
    let s = server(Fault::None);
    let err = match open(&s, "nope", false) {
        Ok(_) => panic!("no such export"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("no such export"), "{err}");
}

#[test]
fn every_faulty_reply_is_an_io_error() {
    for fault in [
        Fault::WrongCookie,
        Fault::BadMagic,
        Fault::Truncated,
        Fault::Oversized,
        Fault::OutsideRequest,
        Fault::Close,
        Fault::Silent,
        Fault::ServerError,
    ] {
        let s = server(fault);
        let node = open(&s, "disk", false).expect("open");
        let mut buf = vec![0u8; 4096];
        let err = match node.read_at(&mut buf, 0) {
            Ok(()) => panic!("{fault:?}: the read succeeded"),
            Err(e) => e,
        };
        assert!(
            matches!(err, qimg_core::Error::Io { .. }),
            "{fault:?}: {err}"
        );
        // The node stays usable as an object: later requests fail too, quickly.
        let again = node.read_at(&mut buf, 0);
        if fault != Fault::ServerError {
            assert!(
                again.is_err(),
                "{fault:?}: a read after the fault succeeded"
            );
        }
    }
}

#[test]
fn a_read_only_open_refuses_writes() {
    let s = server(Fault::None);
    let node = open(&s, "disk", false).expect("open");
    assert!(node.write_at(&[1u8; 512], 0).is_err());
}
