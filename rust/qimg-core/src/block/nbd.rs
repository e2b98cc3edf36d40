//! The `nbd` protocol node: a disk served over the NBD protocol (as
//! `qemu-nbd` serves one), over TCP or a unix socket.
//!
//! The handshake is fixed newstyle: structured replies and the
//! `base:allocation` meta context are asked for, the export is opened with
//! NBD_OPT_GO (asking for the server's block size limits), falling back to
//! NBD_OPT_EXPORT_NAME on servers without it. Requests are pipelined: any
//! number of threads may have requests in flight on one connection; a
//! reader thread hands each reply to the request its cookie names. Where the
//! server allows several connections to one export (multi-conn), requests are
//! spread over a few.
//!
//! Everything the server sends is untrusted: lengths and offsets are bounded
//! before use, and any protocol violation, dropped connection or late reply
//! is an I/O error of this node (inside a quorum: a bad child), never a panic.

use super::{check_request, BlockDev, FileNode, Status};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_BIT: u32 = 1 << 31;
const REP_ERR_UNSUP: u32 = REP_ERR_BIT | 1;
const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT | 6;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const TF_READ_ONLY: u16 = 1 << 1;
const TF_SEND_FLUSH: u16 = 1 << 2;
const TF_SEND_TRIM: u16 = 1 << 5;
const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
const TF_CAN_MULTI_CONN: u16 = 1 << 8;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;

const CMDF_NO_HOLE: u16 = 1 << 1;
const CMDF_REQ_ONE: u16 = 1 << 3;

const CHUNK_DONE: u16 = 1;
const CHUNK_NONE: u16 = 0;
const CHUNK_OFFSET_DATA: u16 = 1;
const CHUNK_OFFSET_HOLE: u16 = 2;
const CHUNK_BLOCK_STATUS: u16 = 5;
const CHUNK_ERROR: u16 = 32769;
const CHUNK_ERROR_OFFSET: u16 = 32770;

const STATE_ZERO: u32 = 1 << 1;

/// The largest request sent, whatever the server allows (QEMU's limit too).
const MAX_REQUEST: u32 = 32 << 20;
/// The largest reply payload accepted: a request's data plus slack for headers.
const MAX_PAYLOAD: u32 = MAX_REQUEST + 4096;
/// The largest option reply accepted during the handshake.
const MAX_OPTION_REPLY: u32 = 64 << 10;
/// Connections opened by default to a multi-conn export, at most.
const MULTI_CONN: usize = 4;
/// Reads are cut into requests of this size, sent together: the server
/// works on several at once and the replies stream back while it does.
/// (Against loopback qemu-nbd, 256 KiB took the least CPU on both ends;
/// 128 KiB and 2 MiB took more.)
const READ_PIECE: u64 = 256 << 10;

/// How many connections to open to a multi-conn export. Each one costs
/// CPU per byte on both ends (more wake-ups, smaller batches), and pays
/// only where spare cores serve the connections in parallel: against
/// loopback qemu-nbd on two cores, one connection per export took about
/// a third less CPU than four and finished sooner.
fn connections_wanted() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / 2).clamp(1, MULTI_CONN)
}

/// Where the server listens (in a node document: `{"type": "inet", ...}`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum NbdServer {
    Inet { host: String, port: String },
    Unix { path: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdOptions {
    pub server: NbdServer,
    pub export: String,
    /// How long a request (or the handshake) may wait for the server.
    pub timeout: Duration,
    /// Connections to open to a multi-conn export; None: as many as
    /// `connections_wanted` says.
    pub connections: Option<usize>,
}

impl NbdOptions {
    /// The export as a URL, as qemu-img names it.
    pub fn url(&self) -> String {
        match &self.server {
            NbdServer::Inet { host, port } => {
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host.clone()
                };
                format!("nbd://{host}:{port}/{}", self.export)
            }
            NbdServer::Unix { path } => format!("nbd+unix:///{}?socket={path}", self.export),
        }
    }
}

/// One socket, either kind.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

fn connect(opts: &NbdOptions) -> io::Result<Stream> {
    match &opts.server {
        NbdServer::Inet { host, port } => {
            let port: u16 = port
                .parse()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "bad port"))?;
            let mut last = io::Error::new(io::ErrorKind::NotFound, "host has no address");
            for addr in (host.as_str(), port).to_socket_addrs()? {
                match TcpStream::connect_timeout(&addr, opts.timeout) {
                    Ok(s) => {
                        s.set_nodelay(true)?;
                        return Ok(Stream::Tcp(s));
                    }
                    Err(e) => last = e,
                }
            }
            Err(last)
        }
        NbdServer::Unix { path } => Ok(Stream::Unix(UnixStream::connect(path)?)),
    }
}

/// What the handshake found out about the export.
#[derive(Debug, Clone, Copy)]
struct Export {
    size: u64,
    flags: u16,
    structured: bool,
    /// The id of `base:allocation`, when the server agreed to it.
    allocation: Option<u32>,
    /// Alignment requests must keep (1 when the server names none).
    min_block: u32,
    max_request: u32,
}

fn proto(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_u16(s: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(s: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(s: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn read_vec(s: &mut impl Read, len: u32, limit: u32) -> io::Result<Vec<u8>> {
    if len > limit {
        return Err(proto(format!(
            "server sent {len} bytes where at most {limit} fit"
        )));
    }
    let mut v = vec![0u8; len as usize];
    s.read_exact(&mut v)?;
    Ok(v)
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn send_option(s: &mut Stream, option: u32, data: &[u8]) -> io::Result<()> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m)
}

/// One option reply: (type, data).
fn option_reply(s: &mut Stream, option: u32) -> io::Result<(u32, Vec<u8>)> {
    if read_u64(s)? != OPT_REPLY_MAGIC {
        return Err(proto("bad option reply magic"));
    }
    if read_u32(s)? != option {
        return Err(proto("option reply for another option"));
    }
    let kind = read_u32(s)?;
    let len = read_u32(s)?;
    Ok((kind, read_vec(s, len, MAX_OPTION_REPLY)?))
}

fn option_error(kind: u32, data: &[u8], what: &str) -> io::Error {
    let text = String::from_utf8_lossy(data).into_owned();
    let text = if text.is_empty() {
        format!("error {:#x}", kind)
    } else {
        text
    };
    if kind == REP_ERR_UNKNOWN {
        io::Error::new(io::ErrorKind::NotFound, format!("{what}: {text}"))
    } else {
        proto(format!("{what}: {text}"))
    }
}

fn handshake(s: &mut Stream, export: &str) -> io::Result<Export> {
    if read_u64(s)? != NBDMAGIC {
        return Err(proto("not an NBD server"));
    }
    if read_u64(s)? != IHAVEOPT {
        return Err(proto("the server speaks only the old NBD handshake"));
    }
    let server_flags = read_u16(s)?;
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(proto("the server does not speak fixed newstyle NBD"));
    }
    let no_zeroes = server_flags & FLAG_NO_ZEROES != 0;
    let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | if no_zeroes { FLAG_NO_ZEROES } else { 0 });
    s.write_all(&client_flags.to_be_bytes())?;

    send_option(s, OPT_STRUCTURED_REPLY, &[])?;
    let (kind, _) = option_reply(s, OPT_STRUCTURED_REPLY)?;
    let structured = kind == REP_ACK;

    let mut allocation = None;
    if structured {
        let mut q = Vec::new();
        q.extend_from_slice(&(export.len() as u32).to_be_bytes());
        q.extend_from_slice(export.as_bytes());
        q.extend_from_slice(&1u32.to_be_bytes());
        let query = b"base:allocation";
        q.extend_from_slice(&(query.len() as u32).to_be_bytes());
        q.extend_from_slice(query);
        send_option(s, OPT_SET_META_CONTEXT, &q)?;
        loop {
            let (kind, data) = option_reply(s, OPT_SET_META_CONTEXT)?;
            match kind {
                REP_META_CONTEXT => {
                    if data.get(4..) == Some(&query[..]) {
                        allocation = be32(&data, 0);
                    }
                }
                REP_ACK => break,
                k if k & REP_ERR_BIT != 0 => break,
                _ => return Err(proto("unexpected reply to SET_META_CONTEXT")),
            }
        }
    }

    let mut go = Vec::new();
    go.extend_from_slice(&(export.len() as u32).to_be_bytes());
    go.extend_from_slice(export.as_bytes());
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &go)?;
    let mut size_flags: Option<(u64, u16)> = None;
    let (mut min_block, mut max_request) = (1u32, MAX_REQUEST);
    loop {
        let (kind, data) = option_reply(s, OPT_GO)?;
        match kind {
            REP_INFO => match be16(&data, 0) {
                Some(INFO_EXPORT) => {
                    let (Some(size), Some(flags)) = (be64(&data, 2), be16(&data, 10)) else {
                        return Err(proto("short export information"));
                    };
                    size_flags = Some((size, flags));
                }
                Some(INFO_BLOCK_SIZE) => {
                    let (Some(min), Some(max)) = (be32(&data, 2), be32(&data, 10)) else {
                        return Err(proto("short block size information"));
                    };
                    if !min.is_power_of_two() || min > 64 << 10 || max < min {
                        return Err(proto("impossible block size limits"));
                    }
                    min_block = min;
                    max_request = max.min(MAX_REQUEST) / min * min;
                }
                _ => {}
            },
            REP_ACK => break,
            REP_ERR_UNSUP => {
                // An older server: the export by name, no information.
                return export_name(s, export, structured, allocation, no_zeroes);
            }
            k if k & REP_ERR_BIT != 0 => {
                return Err(option_error(k, &data, &format!("export '{export}'")));
            }
            _ => return Err(proto("unexpected reply to NBD_OPT_GO")),
        }
    }
    let (size, flags) = size_flags.ok_or_else(|| proto("the server named no export size"))?;
    checked_export(Export {
        size,
        flags,
        structured,
        allocation,
        min_block,
        max_request,
    })
}

fn export_name(
    s: &mut Stream,
    export: &str,
    structured: bool,
    allocation: Option<u32>,
    no_zeroes: bool,
) -> io::Result<Export> {
    send_option(s, OPT_EXPORT_NAME, export.as_bytes())?;
    let size = read_u64(s)?;
    let flags = read_u16(s)?;
    if !no_zeroes {
        let mut pad = [0u8; 124];
        s.read_exact(&mut pad)?;
    }
    checked_export(Export {
        size,
        flags,
        structured,
        allocation,
        min_block: 1,
        max_request: MAX_REQUEST,
    })
}

fn checked_export(e: Export) -> io::Result<Export> {
    if e.size > i64::MAX as u64 {
        return Err(proto(format!("export size {} is impossible", e.size)));
    }
    Ok(e)
}

/// A reply, as the reader thread hands it over. (Read data never passes
/// here: the reader thread puts it straight into the caller's buffer.)
enum Part {
    /// Block status descriptors (length, flags) of the allocation context.
    Extents(Vec<(u32, u32)>),
    /// The request failed on the server with this errno.
    Failed(i32, String),
    /// The last part: the request is over.
    Done,
}

struct Pending {
    tx: Sender<io::Result<Part>>,
    /// For reads: the request's length (a simple reply's data is this long).
    read_len: u32,
    offset: u64,
    /// For reads: where the data goes.
    sink: Option<Arc<SinkSlot>>,
}

/// The caller's buffer for one read request, lent to the reader thread of
/// the connection: it writes the reply's data (and zeroes for holes)
/// straight into it, with no copy in between.
struct Sink {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a Sink is only a lent region of a caller's buffer. The reader
// thread writes through it only while holding the slot's lock and only
// while the slot still holds it; the caller empties the slot (waiting for
// the lock) before it uses or frees the buffer again.
unsafe impl Send for Sink {}

/// A lent buffer, or None once the caller has taken it back.
struct SinkSlot(Mutex<Option<Sink>>);

/// The regions of one caller's buffer lent for a read. Dropping it takes
/// them all back, so no way out of the read (an error, a panic) leaves a
/// reader thread writing into the buffer once its owner has it again.
struct Lent(Vec<Arc<SinkSlot>>);

impl Lent {
    /// Lends `len` bytes at `base + at` (see [`SinkSlot::lend`]).
    fn lend(&mut self, base: *mut u8, at: usize, len: usize) -> Arc<SinkSlot> {
        let slot = SinkSlot::lend(base, at, len);
        self.0.push(Arc::clone(&slot));
        slot
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        for slot in &self.0 {
            slot.revoke();
        }
    }
}

/// The bytes a reply puts into a lent buffer.
enum Bytes<'a> {
    /// The next bytes of the connection.
    Stream(&'a mut Stream, &'a Pool),
    /// Zeroes (a hole).
    Zeroes,
}

impl SinkSlot {
    /// Lends `len` bytes at `base + at`, a region of a buffer the caller
    /// leaves alone until it calls `revoke`.
    fn lend(base: *mut u8, at: usize, len: usize) -> Arc<SinkSlot> {
        Arc::new(SinkSlot(Mutex::new(Some(Sink {
            ptr: base.wrapping_add(at),
            len,
        }))))
    }

    /// Takes the buffer back: no write into it happens after this returns.
    fn revoke(&self) {
        *lock(&self.0) = None;
    }

    /// Puts `bytes` into `[at, at + len)` of the lent buffer (a range the
    /// caller checked against the request); bytes from the stream are
    /// read and dropped when the buffer was taken back.
    fn put(&self, at: usize, len: usize, bytes: Bytes<'_>) -> io::Result<()> {
        let slot = lock(&self.0);
        let dst = match slot.as_ref() {
            Some(sink) if at.checked_add(len).is_some_and(|end| end <= sink.len) => {
                // SAFETY: the region lies inside the lent buffer (checked
                // just above), which stays valid and untouched by its owner
                // while the slot holds it; the lock keeps `revoke` waiting
                // until this write is over.
                unsafe { std::slice::from_raw_parts_mut(sink.ptr.add(at), len) }
            }
            _ => {
                return match bytes {
                    Bytes::Stream(s, pool) => skip(s, len, pool),
                    Bytes::Zeroes => Ok(()),
                }
            }
        };
        match bytes {
            Bytes::Stream(s, _) => s.read_exact(dst),
            Bytes::Zeroes => {
                dst.fill(0);
                Ok(())
            }
        }
    }
}

/// Scratch buffers for the reader thread, for reply bytes that have no
/// buffer to go to (a caller that gave up waiting, data outside a request).
#[derive(Default)]
struct Pool(Mutex<Vec<Vec<u8>>>);

impl Pool {
    fn take(&self, len: usize) -> Vec<u8> {
        let mut b = lock(&self.0).pop().unwrap_or_default();
        b.resize(len, 0);
        b
    }

    fn put(&self, b: Vec<u8>) {
        let mut bufs = lock(&self.0);
        if bufs.len() < 32 {
            bufs.push(b);
        }
    }
}

/// One connection: a writer lock for requests, a reader thread for replies.
struct Conn {
    writer: Mutex<Stream>,
    pending: Arc<Mutex<HashMap<u64, Pending>>>,
    dead: Arc<AtomicBool>,
    /// The reader has finished: it failed every waiting request and takes no
    /// more. Set and read under the `pending` lock.
    ended: Arc<AtomicBool>,
    /// Why this side gave the connection up (a reply that never came): what
    /// every request still waiting on it then fails with.
    given_up: Arc<Mutex<Option<String>>>,
    cookies: AtomicU64,
}

impl Conn {
    fn open(opts: &NbdOptions) -> io::Result<(Conn, Export)> {
        let mut s = connect(opts)?;
        s.set_timeout(Some(opts.timeout))?;
        let export = handshake(&mut s, &opts.export)?;
        s.set_timeout(None)?;
        let reader = s.try_clone()?;
        let pending: Arc<Mutex<HashMap<u64, Pending>>> = Arc::new(Mutex::new(HashMap::new()));
        let dead = Arc::new(AtomicBool::new(false));
        let ended = Arc::new(AtomicBool::new(false));
        let given_up = Arc::new(Mutex::new(None));
        {
            let (pending, dead) = (Arc::clone(&pending), Arc::clone(&dead));
            let (ended, given_up) = (Arc::clone(&ended), Arc::clone(&given_up));
            let pool = Pool::default();
            let structured = export.structured;
            std::thread::Builder::new()
                .name("qimg-nbd-reader".into())
                .spawn(move || {
                    let ends = Ends {
                        dead: &dead,
                        ended: &ended,
                        given_up: &given_up,
                    };
                    read_replies(reader, &pending, ends, &pool, structured)
                })?;
        }
        Ok((
            Conn {
                writer: Mutex::new(s),
                pending,
                dead,
                ended,
                given_up,
                cookies: AtomicU64::new(1),
            },
            export,
        ))
    }

    /// Sends one request; its reply parts arrive on the returned receiver.
    fn send(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> io::Result<Receiver<io::Result<Part>>> {
        self.send_to(cmd, flags, offset, len, data, None)
    }

    /// Sends one request, with `sink` receiving a read's data.
    fn send_to(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
        sink: Option<Arc<SinkSlot>>,
    ) -> io::Result<Receiver<io::Result<Part>>> {
        let cookie = self.cookies.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = channel();
        let read_len = if cmd == CMD_READ { len } else { 0 };
        {
            // Checked and registered under the lock the reader drains with: a
            // request is either refused here or answered by the reader, never
            // left behind by a reader that has already finished.
            let mut waiting = lock(&self.pending);
            if self.ended.load(Ordering::SeqCst) {
                let why = lock(&self.given_up).clone();
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    why.unwrap_or_else(|| "the connection to the NBD server is lost".into()),
                ));
            }
            waiting.insert(
                cookie,
                Pending {
                    tx,
                    read_len,
                    offset,
                    sink,
                },
            );
        }
        let mut m = Vec::with_capacity(28 + data.len());
        m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&cmd.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(data);
        if lock(&self.writer).write_all(&m).is_err() {
            // The server went away (or broke the protocol) before this request
            // was sent. The reader reads what the server said last and fails
            // this request with that cause, which says more than EPIPE; the
            // shutdown makes sure the reader gets there.
            self.kill();
        }
        Ok(rx)
    }

    fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
        lock(&self.writer).shutdown();
    }

    /// Gives the connection up because of `why`, which every request still
    /// waiting on it reports (rather than the closed connection that follows).
    fn give_up(&self, why: String) {
        lock(&self.given_up).get_or_insert(why);
        self.kill();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How a connection's end is recorded (see [`Conn`]).
struct Ends<'a> {
    dead: &'a AtomicBool,
    ended: &'a AtomicBool,
    given_up: &'a Mutex<Option<String>>,
}

/// The reader thread: replies to their requests until the connection ends;
/// then every waiting request fails.
fn read_replies(
    mut s: Stream,
    pending: &Mutex<HashMap<u64, Pending>>,
    ends: Ends<'_>,
    pool: &Pool,
    structured: bool,
) {
    let err = loop {
        if let Err(e) = read_one(&mut s, pending, pool, structured) {
            break e;
        }
    };
    ends.dead.store(true, Ordering::SeqCst);
    s.shutdown();
    // The first cause recorded wins: a timeout or a protocol error given up on
    // before, else what ended this loop. Requests sent later report it too.
    let text = lock(ends.given_up)
        .get_or_insert_with(|| {
            if err.kind() == io::ErrorKind::UnexpectedEof {
                "the NBD server closed the connection".to_string()
            } else {
                format!("NBD connection failed: {err}")
            }
        })
        .clone();
    let mut waiting = lock(pending);
    ends.ended.store(true, Ordering::SeqCst);
    for (_, p) in waiting.drain() {
        let _ =
            p.tx.send(Err(io::Error::new(io::ErrorKind::BrokenPipe, text.clone())));
    }
}

fn read_one(
    s: &mut Stream,
    pending: &Mutex<HashMap<u64, Pending>>,
    pool: &Pool,
    structured: bool,
) -> io::Result<()> {
    let magic = read_u32(s)?;
    match magic {
        SIMPLE_REPLY_MAGIC => {
            let errno = read_u32(s)?;
            let cookie = read_u64(s)?;
            let p = lock(pending)
                .remove(&cookie)
                .ok_or_else(|| proto(format!("reply to unknown request {cookie}")))?;
            if errno != 0 {
                let _ =
                    p.tx.send(Ok(Part::Failed(server_errno(errno), String::new())));
            } else if p.read_len > 0 {
                if p.read_len > MAX_PAYLOAD {
                    return Err(proto("a read reply larger than any request"));
                }
                let n = p.read_len as usize;
                match &p.sink {
                    Some(sink) => sink.put(0, n, Bytes::Stream(s, pool))?,
                    None => skip(s, n, pool)?,
                }
            }
            let _ = p.tx.send(Ok(Part::Done));
            Ok(())
        }
        STRUCTURED_REPLY_MAGIC if structured => {
            let flags = read_u16(s)?;
            let kind = read_u16(s)?;
            let cookie = read_u64(s)?;
            let len = read_u32(s)?;
            if len > MAX_PAYLOAD {
                return Err(proto(format!("server sent a {len}-byte reply chunk")));
            }
            let (tx, sink, base, request_len) = {
                let map = lock(pending);
                let p = map
                    .get(&cookie)
                    .ok_or_else(|| proto(format!("reply to unknown request {cookie}")))?;
                (
                    p.tx.clone(),
                    p.sink.clone(),
                    p.offset,
                    u64::from(p.read_len),
                )
            };
            // Where `[at, at + n)` lies in the request's buffer, if inside it.
            let inside = |at: u64, n: u64| {
                at.checked_sub(base)
                    .filter(|rel| rel.checked_add(n).is_some_and(|end| end <= request_len))
                    .and_then(|rel| usize::try_from(rel).ok())
            };
            let outside = || {
                Part::Failed(
                    libc::EIO,
                    "the server sent data outside the request".to_string(),
                )
            };
            let part = match kind {
                CHUNK_OFFSET_DATA => {
                    if len < 8 {
                        return Err(proto("short data chunk"));
                    }
                    let at = read_u64(s)?;
                    let n = len - 8;
                    match (&sink, inside(at, u64::from(n))) {
                        (Some(sink), Some(rel)) => {
                            sink.put(rel, n as usize, Bytes::Stream(s, pool))?;
                            None
                        }
                        _ => {
                            skip(s, n as usize, pool)?;
                            Some(outside())
                        }
                    }
                }
                CHUNK_OFFSET_HOLE => {
                    let payload = read_vec(s, len, MAX_PAYLOAD)?;
                    let (Some(at), Some(n)) = (be64(&payload, 0), be32(&payload, 8)) else {
                        return Err(proto("short hole chunk"));
                    };
                    match (&sink, inside(at, u64::from(n))) {
                        (Some(sink), Some(rel)) => {
                            sink.put(rel, n as usize, Bytes::Zeroes)?;
                            None
                        }
                        _ => Some(outside()),
                    }
                }
                _ => {
                    let payload = read_vec(s, len, MAX_PAYLOAD)?;
                    other_chunk(kind, &payload)?
                }
            };
            if let Some(part) = part {
                let _ = tx.send(Ok(part));
            }
            if flags & CHUNK_DONE != 0 {
                if let Some(p) = lock(pending).remove(&cookie) {
                    let _ = p.tx.send(Ok(Part::Done));
                }
            }
            Ok(())
        }
        _ => Err(proto(format!("bad reply magic {magic:#x}"))),
    }
}

/// What a structured chunk other than data or a hole says.
fn other_chunk(kind: u16, payload: &[u8]) -> io::Result<Option<Part>> {
    Ok(match kind {
        CHUNK_NONE => None,
        CHUNK_BLOCK_STATUS => {
            let body = payload
                .get(4..)
                .ok_or_else(|| proto("short status chunk"))?;
            let extents = body
                .chunks_exact(8)
                .filter_map(|c| Some((be32(c, 0)?, be32(c, 4)?)))
                .collect();
            Some(Part::Extents(extents))
        }
        CHUNK_ERROR | CHUNK_ERROR_OFFSET => {
            let errno = be32(payload, 0).ok_or_else(|| proto("short error chunk"))?;
            let mlen = be16(payload, 4).unwrap_or(0) as usize;
            let msg = payload
                .get(6..6 + mlen)
                .map(|m| String::from_utf8_lossy(m).into_owned())
                .unwrap_or_default();
            Some(Part::Failed(server_errno(errno), msg))
        }
        k if k & 0x8000 != 0 => Some(Part::Failed(libc::EIO, format!("error chunk {k}"))),
        _ => None,
    })
}

/// Reads and drops `n` bytes of a reply nobody waits for any more.
fn skip(s: &mut Stream, n: usize, pool: &Pool) -> io::Result<()> {
    let mut scratch = pool.take(n.min(1 << 20));
    let mut left = n;
    while left > 0 {
        let k = left.min(scratch.len());
        s.read_exact(&mut scratch[..k])?;
        left -= k;
    }
    pool.put(scratch);
    Ok(())
}

/// NBD's error numbers are Linux's for the few it names.
fn server_errno(e: u32) -> i32 {
    match e {
        1 => libc::EPERM,
        5 => libc::EIO,
        12 => libc::ENOMEM,
        22 => libc::EINVAL,
        28 => libc::ENOSPC,
        75 => libc::EOVERFLOW,
        95 => libc::EOPNOTSUPP,
        108 => libc::ESHUTDOWN,
        _ => libc::EIO,
    }
}

/// The connections to one export. Nodes of one process opening the same
/// export share them: many servers (qemu-nbd by default) take one client at
/// a time, and a second connection from the same process would wait forever.
struct Session {
    server: NbdServer,
    name: String,
    conns: Vec<Conn>,
    export: Export,
}

static SESSIONS: Mutex<Vec<Weak<Session>>> = Mutex::new(Vec::new());

/// How long an extra connection to a multi-conn export may take to open:
/// servers that advertise multi-conn but take one client at a time never
/// answer it, and it is only an optimisation.
const EXTRA_CONN_TIMEOUT: Duration = Duration::from_millis(500);

impl Session {
    fn get(opts: &NbdOptions) -> io::Result<Arc<Session>> {
        let mut sessions = lock(&SESSIONS);
        sessions.retain(|w| w.strong_count() > 0);
        let live = sessions.iter().filter_map(Weak::upgrade).find(|s| {
            s.server == opts.server
                && s.name == opts.export
                && !s.conns.iter().all(|c| c.dead.load(Ordering::SeqCst))
        });
        if let Some(s) = live {
            return Ok(s);
        }
        let (first, export) = Conn::open(opts)?;
        let mut conns = vec![first];
        if export.flags & TF_CAN_MULTI_CONN != 0 {
            let quick = NbdOptions {
                timeout: opts.timeout.min(EXTRA_CONN_TIMEOUT),
                ..opts.clone()
            };
            let extra: Vec<Conn> = std::thread::scope(|sc| {
                let wanted = opts.connections.unwrap_or_else(connections_wanted);
                let handles: Vec<_> = (1..wanted)
                    .map(|_| sc.spawn(|| Conn::open(&quick)))
                    .collect();
                handles
                    .into_iter()
                    .filter_map(|h| h.join().ok()?.ok())
                    .map(|(c, _)| c)
                    .collect()
            });
            conns.extend(extra);
        }
        let session = Arc::new(Session {
            server: opts.server.clone(),
            name: opts.export.clone(),
            conns,
            export,
        });
        sessions.push(Arc::downgrade(&session));
        Ok(session)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        for conn in &self.conns {
            if !conn.dead.load(Ordering::SeqCst) {
                // A polite goodbye; no reply comes to it.
                let _ = conn.send(CMD_DISC, 0, 0, 0, &[]);
                lock(&conn.pending).clear();
            }
            conn.kill();
        }
    }
}

pub struct NbdNode {
    session: Arc<Session>,
    next: AtomicUsize,
    opts: NbdOptions,
    display: String,
    writable: bool,
}

impl NbdNode {
    /// Connects to the export; with `writable`, a read-only export is refused.
    pub fn open(opts: NbdOptions, writable: bool) -> Result<NbdNode> {
        let url = opts.url();
        let fail = |e: io::Error| Error::io(format!("Could not open '{url}'"), e);
        let session = Session::get(&opts).map_err(fail)?;
        if writable && session.export.flags & TF_READ_ONLY != 0 {
            return Err(Error::io(
                format!("Could not open '{url}' for writing: the export is read-only"),
                io::Error::from_raw_os_error(libc::EACCES),
            ));
        }
        Ok(NbdNode {
            session,
            next: AtomicUsize::new(0),
            display: url,
            opts,
            writable,
        })
    }

    fn conn(&self) -> &Conn {
        let conns = &self.session.conns;
        &conns[self.next.fetch_add(1, Ordering::Relaxed) % conns.len()]
    }

    fn error(&self, what: &str, e: io::Error) -> Error {
        Error::io(format!("{what} on '{}'", self.display), e)
    }

    /// Waits for every part of a reply, handing each to `on_part`.
    fn wait(
        &self,
        conn: &Conn,
        rx: Receiver<io::Result<Part>>,
        mut on_part: impl FnMut(Part) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut failed: Option<io::Error> = None;
        loop {
            match rx.recv_timeout(self.opts.timeout) {
                Ok(Ok(Part::Done)) => break,
                Ok(Ok(Part::Failed(errno, msg))) => {
                    let base = io::Error::from_raw_os_error(errno);
                    failed.get_or_insert(if msg.is_empty() {
                        base
                    } else {
                        io::Error::new(base.kind(), format!("{msg} ({base})"))
                    });
                }
                Ok(Ok(part)) => {
                    if let Err(e) = on_part(part) {
                        failed.get_or_insert(e);
                    }
                }
                Ok(Err(e)) => return Err(e),
                Err(RecvTimeoutError::Timeout) => {
                    // The reply may still come, but nothing can wait for it
                    // any longer: the connection is given up.
                    let why = format!(
                        "the NBD server did not answer within {} s",
                        self.opts.timeout.as_secs()
                    );
                    conn.give_up(why.clone());
                    return Err(io::Error::new(io::ErrorKind::TimedOut, why));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the connection to the NBD server is lost",
                    ))
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// One request without data in the reply.
    fn command(&self, cmd: u16, flags: u16, offset: u64, len: u32, data: &[u8]) -> io::Result<()> {
        let conn = self.conn();
        let rx = conn.send(cmd, flags, offset, len, data)?;
        self.wait(conn, rx, |_| Ok(()))
    }

    /// Splits `[offset, offset + len)` into requests of at most `limit`
    /// bytes that the server accepts.
    fn pieces(&self, offset: u64, len: u64, limit: u64) -> Vec<(u64, u32)> {
        let max = u64::from(
            self.session
                .export
                .max_request
                .max(self.session.export.min_block),
        )
        .min(limit.next_multiple_of(u64::from(self.session.export.min_block)));
        let mut out = Vec::new();
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(max);
            out.push((at, n as u32));
            at += n;
        }
        out
    }

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "'{}' is open read-only",
                self.display
            )))
        }
    }

    fn aligned(&self, offset: u64, len: u64) -> bool {
        let a = u64::from(self.session.export.min_block);
        offset % a == 0 && len % a == 0
    }
}

impl BlockDev for NbdNode {
    fn size(&self) -> u64 {
        self.session.export.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_request(self, offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        if !self.aligned(offset, buf.len() as u64) {
            // Widen to the server's block size.
            let a = u64::from(self.session.export.min_block);
            let start = offset / a * a;
            let end = (offset + buf.len() as u64)
                .next_multiple_of(a)
                .min(self.size());
            let mut wide = vec![0u8; (end - start) as usize];
            self.read_at(&mut wide, start)?;
            let from = (offset - start) as usize;
            buf.copy_from_slice(&wide[from..from + buf.len()]);
            return Ok(());
        }
        // Every piece is sent before any reply is awaited: pipelining. The
        // reader threads write each reply's data straight into its region
        // of `buf`, which is not touched here until every region is taken
        // back.
        let base = buf.as_mut_ptr();
        let mut lent = Lent(Vec::new());
        let mut sent = Vec::new();
        let mut first_err: Option<Error> = None;
        for (at, n) in self.pieces(offset, buf.len() as u64, READ_PIECE) {
            let slot = lent.lend(base, (at - offset) as usize, n as usize);
            let conn = self.conn();
            match conn.send_to(CMD_READ, 0, at, n, &[], Some(Arc::clone(&slot))) {
                Ok(rx) => sent.push((conn, rx, slot)),
                Err(e) => {
                    first_err = Some(self.error("Read failed", e));
                    break;
                }
            }
        }
        for (conn, rx, slot) in sent {
            let r = self.wait(conn, rx, |_| Ok(()));
            slot.revoke();
            if let Err(e) = r {
                first_err.get_or_insert(self.error("Read failed", e));
            }
        }
        drop(lent);
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn status(&self, offset: u64, len: u64) -> Result<Status> {
        let whole = Status {
            len,
            data: true,
            offset: Some(offset),
            ..Status::default()
        };
        if self.session.export.allocation.is_none() {
            return Ok(whole);
        }
        let len32 = len.min(u64::from(self.session.export.max_request)) as u32;
        let conn = self.conn();
        let rx = conn
            .send(CMD_BLOCK_STATUS, CMDF_REQ_ONE, offset, len32, &[])
            .map_err(|e| self.error("Block status failed", e))?;
        let mut first: Option<(u32, u32)> = None;
        self.wait(conn, rx, |part| {
            if let Part::Extents(list) = part {
                if first.is_none() {
                    first = list.first().copied();
                }
            }
            Ok(())
        })
        .map_err(|e| self.error("Block status failed", e))?;
        match first {
            Some((n, flags)) if n > 0 => {
                let zero = flags & STATE_ZERO != 0;
                Ok(Status {
                    len: u64::from(n).min(len),
                    data: !zero,
                    zero,
                    // The export's own offsets (also a raw image's over it).
                    offset: Some(offset),
                    ..Status::default()
                })
            }
            _ => Ok(whole),
        }
    }

    fn format_name(&self) -> &'static str {
        "nbd"
    }

    fn is_remote(&self) -> bool {
        true
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn filename(&self) -> &str {
        &self.display
    }

    fn file(&self) -> Option<&Arc<FileNode>> {
        None
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        check_request(self, offset, buf.len() as u64)?;
        let mut sent = Vec::new();
        for (at, n) in self.pieces(offset, buf.len() as u64, u64::MAX) {
            let from = (at - offset) as usize;
            let conn = self.conn();
            let rx = conn
                .send(CMD_WRITE, 0, at, n, &buf[from..from + n as usize])
                .map_err(|e| self.error("Write failed", e))?;
            sent.push((conn, rx));
        }
        let mut first_err = None;
        for (conn, rx) in sent {
            if let Err(e) = self.wait(conn, rx, |_| Ok(())) {
                first_err.get_or_insert(self.error("Write failed", e));
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_writable()?;
        check_request(self, offset, len)?;
        if self.session.export.flags & TF_SEND_WRITE_ZEROES == 0 {
            let zeroes = vec![0u8; len.min(u64::from(self.session.export.max_request)) as usize];
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(zeroes.len() as u64) as usize;
                self.write_at(&zeroes[..n], at)?;
                at += n as u64;
            }
            return Ok(());
        }
        let flags = if unmap { 0 } else { CMDF_NO_HOLE };
        for (at, n) in self.pieces(offset, len, u64::MAX) {
            self.command(CMD_WRITE_ZEROES, flags, at, n, &[])
                .map_err(|e| self.error("Write zeroes failed", e))?;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        check_request(self, offset, len)?;
        // Discarding is advice: a server that takes none ignores it.
        if self.session.export.flags & TF_SEND_TRIM == 0 {
            return Ok(());
        }
        for (at, n) in self.pieces(offset, len, u64::MAX) {
            self.command(CMD_TRIM, 0, at, n, &[])
                .map_err(|e| self.error("Discard failed", e))?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if !self.writable || self.session.export.flags & TF_SEND_FLUSH == 0 {
            return Ok(());
        }
        for conn in &self.session.conns {
            let rx = conn
                .send(CMD_FLUSH, 0, 0, 0, &[])
                .map_err(|e| self.error("Flush failed", e))?;
            self.wait(conn, rx, |_| Ok(()))
                .map_err(|e| self.error("Flush failed", e))?;
        }
        Ok(())
    }
}
