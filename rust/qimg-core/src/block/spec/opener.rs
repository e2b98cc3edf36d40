//! Builds the nodes of a parsed canonical document.

use super::schema::{Backing, Nbd, Node, Protocol, Quorum, Rule};
use super::SpecOptions;
use crate::block::blkdebug::{BlkdebugNode, Faults, InjectError};
use crate::block::lock;
use crate::block::nbd::{NbdNode, NbdOptions};
use crate::block::open::{open_image_on, open_qcow2_over, OpenOptions};
use crate::block::quorum_node::{Child, QuorumNode, QuorumOptions};
use crate::block::raw::RawNode;
use crate::block::{BlockDev, FileNode};
use crate::error::Result;
use crate::formats::qcow2::QCOW2;
use crate::formats::FormatDriver;
use crate::quorum::events::EventLog;
use std::path::Path;
use std::sync::Arc;

pub(super) fn open_node(
    node: &Node,
    opts: SpecOptions,
    log: &Arc<EventLog>,
) -> Result<Arc<dyn BlockDev>> {
    match node {
        Node::File(file) => {
            let file = open_file(&file.filename, opts)?;
            lock_raw(&file, opts)?;
            Ok(Arc::new(RawNode::protocol(Arc::new(file))))
        }
        Node::Nbd(nbd) => {
            let export = FileNode::nbd(open_nbd(nbd, opts)?);
            Ok(Arc::new(RawNode::protocol(Arc::new(export))))
        }
        Node::Raw(raw) => {
            let file = open_protocol(&raw.file, opts)?;
            lock_raw(&file, opts)?;
            Ok(Arc::new(RawNode::new(Arc::new(file), None)))
        }
        Node::Qcow2(qcow2) => {
            let below = match &qcow2.backing {
                Backing::Header | Backing::Closed => None,
                Backing::Node(below) => Some(&**below),
            };
            let no_backing = qcow2.backing == Backing::Closed;
            let format: Option<&'static dyn FormatDriver> = Some(&QCOW2);
            open_format(&qcow2.file, format, no_backing, below, opts, log)
        }
        // A probe node's backing is its header's, or none when left closed.
        Node::Probe(probe) => {
            let no_backing = probe.backing.is_some();
            open_format(&probe.file, None, no_backing, None, opts, log)
        }
        Node::Quorum(quorum) => open_quorum(node, quorum, opts, log),
        Node::Blkdebug(blkdebug) => {
            let image = open_node(&blkdebug.image, opts, log)?;
            let rules = rules_of(&blkdebug.inject_error);
            Ok(Arc::new(BlkdebugNode::new(image, rules)))
        }
    }
}

/// A format node over `file`: of `format`, or probed when None; over the
/// `below` node (read-only) instead of the header's backing chain when
/// given, over none with `no_backing`.
fn open_format(
    file: &Protocol,
    format: Option<&'static dyn FormatDriver>,
    no_backing: bool,
    below: Option<&Node>,
    opts: SpecOptions,
    log: &Arc<EventLog>,
) -> Result<Arc<dyn BlockDev>> {
    let file = open_protocol(file, opts)?;
    let open_opts = OpenOptions {
        format,
        no_backing,
        writable: opts.writable,
        writable_backing: None,
        cache: opts.cache,
        sharing: opts.sharing,
    };
    match below {
        None => open_image_on(file, &open_opts),
        Some(below) => {
            let read_only = SpecOptions {
                writable: false,
                ..opts
            };
            let below = open_node(below, read_only, log)?;
            open_qcow2_over(file, below, &open_opts)
        }
    }
}

fn open_nbd(nbd: &Nbd, opts: SpecOptions) -> Result<NbdNode> {
    NbdNode::open(
        NbdOptions {
            server: nbd.server.clone(),
            export: nbd.export.clone().unwrap_or_default(),
            timeout: nbd.timeout(),
            connections: nbd.connections.map(|n| n.get()),
        },
        opts.writable,
    )
}

/// A node in the file role, opened: a local file or an NBD export, under
/// any number of blkdebug nodes.
fn open_protocol(file: &Protocol, opts: SpecOptions) -> Result<FileNode> {
    match file {
        Protocol::File(file) => open_file(&file.filename, opts),
        Protocol::Nbd(nbd) => {
            let export = FileNode::nbd(open_nbd(nbd, opts)?);
            Ok(if !opts.cache.flushes() {
                export.without_flushes()
            } else {
                export
            })
        }
        // blkdebug as the file layer: the format driver's own requests
        // (header, tables, refcounts, data) meet its rules, as in QEMU.
        Protocol::Blkdebug(blkdebug) => {
            let inner = open_protocol(&blkdebug.image, opts)?;
            Ok(inner.with_faults(Faults::new(rules_of(&blkdebug.inject_error))))
        }
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

/// The quorum `quorum`, which is `node`.
fn open_quorum(
    node: &Node,
    quorum: &Quorum,
    opts: SpecOptions,
    log: &Arc<EventLog>,
) -> Result<Arc<dyn BlockDev>> {
    let quorum_opts = QuorumOptions {
        threshold: quorum.vote_threshold.get(),
        blkverify: quorum.blkverify,
        rewrite_corrupted: quorum.rewrite_corrupted,
        read_pattern: quorum.read_pattern,
    };
    // Repairs write to the children even through a read-only quorum.
    let child_opts = SpecOptions {
        writable: opts.writable || quorum_opts.rewrite_corrupted,
        ..opts
    };
    let children = quorum
        .children
        .iter()
        .map(|child| {
            Ok(Child {
                node: open_node(child, child_opts, log)?,
                name: child.node_name().to_string(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // Events and messages name the quorum by its whole document, keys
    // sorted (a `Value` keeps them so), as the core always has.
    let display = format!("json:{}", super::to_value(node)?);
    Ok(Arc::new(QuorumNode::new(
        children,
        quorum_opts,
        quorum.node_name.clone(),
        display,
        opts.writable,
        Arc::clone(log),
    )?))
}

fn rules_of(rules: &[Rule]) -> Vec<InjectError> {
    rules.iter().map(Rule::inject_error).collect()
}
