//! Opening a node tree from its canonical JSON description.
//!
//! The Python side parses what users type (`json:{...}`, `--image-opts`),
//! checks it and explains mistakes; it hands over one canonical document in
//! which every node has its driver and node name and every option its final
//! type. This module reads that document strictly (anything unexpected is
//! an error naming it, never ignored) and builds the nodes.

use super::blkdebug::{BlkdebugNode, DebugEvent, Faults, InjectError, IoType};
use super::cache::CacheMode;
use super::lock::{self, Sharing};
use super::nbd::{NbdNode, NbdOptions, NbdServer};
use super::open::{open_image_on, open_qcow2_over, OpenOptions};
use super::quorum_node::{Child, QuorumNode, QuorumOptions, ReadPattern};
use super::raw::RawNode;
use super::{BlockDev, FileNode};
use crate::error::{Error, Result};
use crate::quorum::events::EventLog;
use serde_json::{Map, Value};
use std::path::Path;
use std::sync::Arc;

/// How the tree is opened.
#[derive(Debug, Clone, Copy, Default)]
pub struct SpecOptions {
    /// The top node takes writes (and so do the nodes under it that must).
    pub writable: bool,
    /// QEMU's cache mode for the local files of the tree.
    pub cache: CacheMode,
    /// Which of QEMU's image locks to take, and whether to share all (`-U`).
    pub sharing: Sharing,
}

/// Opens the tree described by `json`; quorum events go to `log`.
pub fn open_spec(json: &str, opts: SpecOptions, log: &Arc<EventLog>) -> Result<Arc<dyn BlockDev>> {
    if opts.sharing.force_share && opts.writable {
        return Err(Error::invalid(
            "force-share=on can only be used with read-only images",
        ));
    }
    let value: Value = serde_json::from_str(json)
        .map_err(|e| Error::invalid(format!("Invalid node specification: {e}")))?;
    open_node(&value, "root", opts, log)
}

struct Node<'a, 'p> {
    path: &'p str,
    map: &'a Map<String, Value>,
}

impl<'a, 'p> Node<'a, 'p> {
    fn new(value: &'a Value, path: &'p str) -> Result<Node<'a, 'p>> {
        match value {
            Value::Object(map) => Ok(Node { path, map }),
            _ => Err(bad(path, "must be an object")),
        }
    }

    /// Refuses keys outside `allowed`.
    fn only(&self, allowed: &[&str]) -> Result<()> {
        match self.map.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(k) => Err(bad(self.path, &format!("has no option '{k}'"))),
            None => Ok(()),
        }
    }

    fn get(&self, key: &str) -> Result<&'a Value> {
        self.map
            .get(key)
            .ok_or_else(|| bad(self.path, &format!("lacks '{key}'")))
    }

    fn str(&self, key: &str) -> Result<&'a str> {
        self.get(key)?
            .as_str()
            .ok_or_else(|| bad(self.path, &format!("'{key}' must be a string")))
    }

    fn bool(&self, key: &str) -> Result<bool> {
        self.get(key)?
            .as_bool()
            .ok_or_else(|| bad(self.path, &format!("'{key}' must be a boolean")))
    }

    fn int(&self, key: &str) -> Result<i64> {
        self.get(key)?
            .as_i64()
            .ok_or_else(|| bad(self.path, &format!("'{key}' must be an integer")))
    }
}

fn bad(path: &str, what: &str) -> Error {
    Error::invalid(format!("Node specification '{path}' {what}"))
}

fn child_path(path: &str, key: &str) -> String {
    if path == "root" {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn open_node(
    value: &Value,
    path: &str,
    opts: SpecOptions,
    log: &Arc<EventLog>,
) -> Result<Arc<dyn BlockDev>> {
    let node = Node::new(value, path)?;
    let driver = node.str("driver")?;
    match driver {
        "file" => {
            node.only(&["driver", "node-name", "filename"])?;
            let file = open_file(node.str("filename")?, opts)?;
            lock_raw(&file, opts)?;
            Ok(Arc::new(RawNode::protocol(Arc::new(file))))
        }
        "nbd" => {
            let export = FileNode::nbd(open_nbd(&node, opts)?);
            Ok(Arc::new(RawNode::protocol(Arc::new(export))))
        }
        "raw" => {
            node.only(&["driver", "node-name", "file"])?;
            let file = open_file_child(&node, opts)?;
            lock_raw(&file, opts)?;
            Ok(Arc::new(RawNode::new(Arc::new(file), false)))
        }
        "probe" | "qcow2" => {
            let format = if driver == "qcow2" {
                node.only(&["driver", "node-name", "file", "backing"])?;
                crate::formats::driver(driver)
            } else {
                // A probe node's backing is its header's, or null to leave it closed.
                node.only(&["driver", "node-name", "file", "backing"])?;
                if !matches!(node.map.get("backing"), None | Some(Value::Null)) {
                    return Err(bad(path, "'backing' of a probed node can only be null"));
                }
                None
            };
            let file = open_file_child(&node, opts)?;
            let backing = node.map.get("backing");
            let open_opts = OpenOptions {
                format,
                no_backing: matches!(backing, Some(Value::Null)),
                writable: opts.writable,
                writable_backing: None,
                cache: opts.cache,
                sharing: opts.sharing,
            };
            match backing {
                None | Some(Value::Null) => open_image_on(file, &open_opts),
                Some(Value::String(s)) if s == "default" => open_image_on(file, &open_opts),
                Some(b @ Value::Object(_)) => {
                    let below = open_node(
                        b,
                        &child_path(path, "backing"),
                        SpecOptions {
                            writable: false,
                            ..opts
                        },
                        log,
                    )?;
                    open_qcow2_over(file, below, &open_opts)
                }
                Some(_) => Err(bad(path, "'backing' must be \"default\", null or a node")),
            }
        }
        "quorum" => open_quorum(&node, opts, log),
        "blkdebug" => {
            node.only(&["driver", "node-name", "image", "inject-error"])?;
            let image = open_node(node.get("image")?, &child_path(path, "image"), opts, log)?;
            Ok(Arc::new(BlkdebugNode::new(image, rules_of(&node, path)?)))
        }
        other => Err(bad(path, &format!("has an unknown driver '{other}'"))),
    }
}

fn open_nbd(node: &Node<'_, '_>, opts: SpecOptions) -> Result<NbdNode> {
    node.only(&[
        "driver",
        "node-name",
        "server",
        "export",
        "timeout",
        "connections",
    ])?;
    let server_path = child_path(node.path, "server");
    let server = Node::new(node.get("server")?, &server_path)?;
    let server = match server.str("type")? {
        "inet" => {
            server.only(&["type", "host", "port"])?;
            NbdServer::Inet {
                host: server.str("host")?.to_string(),
                port: server.str("port")?.to_string(),
            }
        }
        "unix" => {
            server.only(&["type", "path"])?;
            NbdServer::Unix {
                path: server.str("path")?.to_string(),
            }
        }
        other => return Err(bad(&server_path, &format!("has an unknown type '{other}'"))),
    };
    let export = match node.map.get("export") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(bad(node.path, "'export' must be a string")),
    };
    let timeout = match node.map.get("timeout") {
        None | Some(Value::Null) => 30,
        Some(v) => v
            .as_u64()
            .filter(|t| (1..=86_400).contains(t))
            .ok_or_else(|| bad(node.path, "'timeout' must be 1 to 86400 seconds"))?,
    };
    let connections = match node.map.get("connections") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|n| (1..=16).contains(n))
                .map(|n| n as usize)
                .ok_or_else(|| bad(node.path, "'connections' must be 1 to 16"))?,
        ),
    };
    NbdNode::open(
        NbdOptions {
            server,
            export,
            timeout: std::time::Duration::from_secs(timeout),
            connections,
        },
        opts.writable,
    )
}

/// The `file` child of a format node, opened: a local file or an NBD export.
fn open_file_child(node: &Node<'_, '_>, opts: SpecOptions) -> Result<FileNode> {
    let path = child_path(node.path, "file");
    open_protocol(&Node::new(node.get("file")?, &path)?, opts)
}

/// A node in the file role, opened: a local file or an NBD export, under
/// any number of blkdebug nodes.
fn open_protocol(file: &Node<'_, '_>, opts: SpecOptions) -> Result<FileNode> {
    match file.str("driver")? {
        "file" => {
            file.only(&["driver", "node-name", "filename"])?;
            open_file(file.str("filename")?, opts)
        }
        "nbd" => {
            let export = FileNode::nbd(open_nbd(file, opts)?);
            Ok(if !opts.cache.flushes() {
                export.without_flushes()
            } else {
                export
            })
        }
        // blkdebug as the file layer: the format driver's own requests
        // (header, tables, refcounts, data) meet its rules, as in QEMU.
        "blkdebug" => {
            file.only(&["driver", "node-name", "image", "inject-error"])?;
            let image_path = child_path(file.path, "image");
            let inner = open_protocol(&Node::new(file.get("image")?, &image_path)?, opts)?;
            Ok(inner.with_faults(Faults::new(rules_of(file, file.path)?)))
        }
        _ => Err(bad(
            file.path,
            "must use the 'file', 'nbd' or 'blkdebug' driver",
        )),
    }
}

/// Takes QEMU's locks for a file read as raw bytes.
fn lock_raw(file: &FileNode, opts: SpecOptions) -> Result<()> {
    let want = lock::request(opts.sharing, false, opts.writable, true);
    file.lock(want)
        .map_err(|e| e.context(&format!("Could not open '{}'", file.filename())))
}

fn open_file(name: &str, opts: SpecOptions) -> Result<FileNode> {
    FileNode::open_with(Path::new(name), opts.writable, opts.cache)
}

fn open_quorum(
    node: &Node<'_, '_>,
    opts: SpecOptions,
    log: &Arc<EventLog>,
) -> Result<Arc<dyn BlockDev>> {
    node.only(&[
        "driver",
        "node-name",
        "children",
        "vote-threshold",
        "blkverify",
        "rewrite-corrupted",
        "read-pattern",
    ])?;
    let name = node.str("node-name")?.to_string();
    let threshold = usize::try_from(node.int("vote-threshold")?)
        .map_err(|_| Error::invalid("Parameter 'vote-threshold' expects a value >= 1"))?;
    let read_pattern = match node.str("read-pattern")? {
        "quorum" => ReadPattern::Quorum,
        "fifo" => ReadPattern::Fifo,
        _ => return Err(Error::invalid("Please set read-pattern as fifo or quorum")),
    };
    let quorum_opts = QuorumOptions {
        threshold,
        blkverify: node.bool("blkverify")?,
        rewrite_corrupted: node.bool("rewrite-corrupted")?,
        read_pattern,
    };
    let Value::Array(items) = node.get("children")? else {
        return Err(bad(node.path, "'children' must be a list"));
    };
    // Repairs write to the children even through a read-only quorum.
    let child_opts = SpecOptions {
        writable: opts.writable || quorum_opts.rewrite_corrupted,
        ..opts
    };
    let mut children = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let path = child_path(node.path, &format!("children.{i}"));
        let child = Node::new(item, &path)?;
        let child_name = child.str("node-name")?.to_string();
        let opened = open_node(item, &path, child_opts, log)?;
        children.push(Child {
            node: opened,
            name: child_name,
        });
    }
    let display = format!("json:{}", Value::Object(node.map.clone()));
    Ok(Arc::new(QuorumNode::new(
        children,
        quorum_opts,
        name,
        display,
        opts.writable,
        Arc::clone(log),
    )?))
}

/// The `inject-error` rules of blkdebug node `node` (at `path`).
fn rules_of(node: &Node<'_, '_>, path: &str) -> Result<Vec<InjectError>> {
    match node.map.get("inject-error") {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| rule(v, &child_path(path, &format!("inject-error.{i}"))))
            .collect(),
        Some(_) => Err(bad(path, "'inject-error' must be a list")),
    }
}

fn rule(value: &Value, path: &str) -> Result<InjectError> {
    let node = Node::new(value, path)?;
    node.only(&["event", "iotype", "errno", "sector", "once"])?;
    let event = match node.str("event")? {
        "read_aio" => DebugEvent::ReadAio,
        "write_aio" => DebugEvent::WriteAio,
        "flush_to_disk" => DebugEvent::FlushToDisk,
        other => return Err(bad(path, &format!("has an unsupported event '{other}'"))),
    };
    let iotype = match node.map.get("iotype") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(match s.as_str() {
            "read" => IoType::Read,
            "write" => IoType::Write,
            "write-zeroes" => IoType::WriteZeroes,
            "discard" => IoType::Discard,
            "flush" => IoType::Flush,
            other => return Err(bad(path, &format!("has an unsupported iotype '{other}'"))),
        }),
        Some(_) => return Err(bad(path, "'iotype' must be a string")),
    };
    let errno = i32::try_from(node.int("errno")?)
        .ok()
        .filter(|e| *e > 0)
        .ok_or_else(|| bad(path, "'errno' must be a positive error number"))?;
    let sector = match node.int("sector")? {
        -1 => None,
        s => Some(
            u64::try_from(s).map_err(|_| bad(path, "'sector' must be -1 or a sector number"))?,
        ),
    };
    Ok(InjectError {
        event,
        iotype,
        errno,
        sector,
        once: node.bool("once")?,
    })
}
