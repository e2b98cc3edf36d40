//! The canonical node document, as types.
//!
//! `qimg.spec` writes one JSON document per node tree: every node has its
//! `driver` and `node-name`, every option its final type. These types are
//! that document: serde reads it strictly (an unknown key, a missing
//! required key, a wrong type or a value out of range is an error), so a
//! parsed [`Node`] is valid by construction and the opener only walks it.
//! Nodes, servers and rules are read from JSON objects only (see
//! `strict`). Serializing a node gives the document back (keys sorted, as
//! `serde_json::Value` keeps them).
//!
//! Rules that relate options of a quorum to each other (threshold against
//! the number of children, blkverify, rewrite-corrupted) are the quorum
//! node's own (`QuorumNode::new`); the users' wording of every rule is
//! Python's, which checks them before a document is written.

use super::ranges::{Connections, Errno, Sector, Timeout, VoteThreshold};
use super::strict::{self, object, objects};
use crate::block::blkdebug::{DebugEvent, InjectError, IoType};
use crate::block::nbd::NbdServer;
use crate::block::quorum_node::ReadPattern;
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::time::Duration;

/// A node of the tree, by its `driver`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "driver", rename_all = "kebab-case")]
pub enum Node {
    File(File),
    Nbd(Nbd),
    Raw(Raw),
    Qcow2(Qcow2),
    Probe(Probe),
    Quorum(Quorum),
    Blkdebug(Blkdebug<Node>),
}

impl Node {
    pub fn node_name(&self) -> &str {
        match self {
            Node::File(n) => &n.node_name,
            Node::Nbd(n) => &n.node_name,
            Node::Raw(n) => &n.node_name,
            Node::Qcow2(n) => &n.node_name,
            Node::Probe(n) => &n.node_name,
            Node::Quorum(n) => &n.node_name,
            Node::Blkdebug(n) => &n.node_name,
        }
    }
}

/// The `file` child of a format node: a local file or an NBD export, under
/// any number of blkdebug nodes (whose rules then meet the format driver's
/// own requests, as in QEMU).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "driver", rename_all = "kebab-case")]
pub enum Protocol {
    File(File),
    Nbd(Nbd),
    Blkdebug(Blkdebug<Protocol>),
}

/// `driver: file`: a file in the host's file system.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct File {
    pub node_name: String,
    pub filename: String,
}

/// `driver: nbd`: an export of an NBD server.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Nbd {
    pub node_name: String,
    #[serde(deserialize_with = "object")]
    pub server: NbdServer,
    /// The export's name; absent or null asks for the default export.
    #[serde(default)]
    pub export: Option<String>,
    /// Absent or null: [`Timeout::DEFAULT`].
    #[serde(default)]
    pub timeout: Option<Timeout>,
    /// Absent or null: the NBD driver's choice.
    #[serde(default)]
    pub connections: Option<Connections>,
}

impl Nbd {
    /// How long a connection attempt or a request may take.
    pub fn timeout(&self) -> Duration {
        self.timeout.map_or(Timeout::DEFAULT, Timeout::duration)
    }
}

/// `driver: raw`: guest bytes are the file's bytes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Raw {
    pub node_name: String,
    #[serde(deserialize_with = "object")]
    pub file: Protocol,
}

/// `driver: qcow2`, with its backing node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Qcow2 {
    pub node_name: String,
    #[serde(deserialize_with = "object")]
    pub file: Protocol,
    /// Absent: [`Backing::Header`].
    #[serde(default)]
    pub backing: Backing,
}

/// `driver: probe`: the format is probed from the file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Probe {
    pub node_name: String,
    #[serde(deserialize_with = "object")]
    pub file: Protocol,
    /// Absent: the backing chain the header names is opened.
    #[serde(
        default,
        deserialize_with = "strict::present",
        skip_serializing_if = "Option::is_none"
    )]
    pub backing: Option<LeftClosed>,
}

/// `driver: quorum`: replicas voted on.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Quorum {
    pub node_name: String,
    #[serde(deserialize_with = "objects")]
    pub children: Vec<Node>,
    pub vote_threshold: VoteThreshold,
    pub blkverify: bool,
    pub rewrite_corrupted: bool,
    pub read_pattern: ReadPattern,
}

/// `driver: blkdebug` over an `image` of type `I`: any node at the top of
/// a tree or in a quorum, a [`Protocol`] node in the file role.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(
    rename_all = "kebab-case",
    deny_unknown_fields,
    bound(deserialize = "I: Deserialize<'de>")
)]
pub struct Blkdebug<I> {
    pub node_name: String,
    #[serde(deserialize_with = "object")]
    pub image: Box<I>,
    /// Absent: no rules.
    #[serde(default, deserialize_with = "objects")]
    pub inject_error: Vec<Rule>,
}

/// One `inject-error` rule of a blkdebug node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Rule {
    pub event: DebugEvent,
    /// Absent or null: requests of any type.
    #[serde(default)]
    pub iotype: Option<IoType>,
    pub errno: Errno,
    pub sector: Sector,
    pub once: bool,
}

impl Rule {
    pub fn inject_error(&self) -> InjectError {
        InjectError {
            event: self.event,
            iotype: self.iotype,
            errno: self.errno.get(),
            sector: self.sector.number(),
            once: self.once,
        }
    }
}

/// The `backing` of a qcow2 node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Backing {
    /// `"default"`: the chain the image's header names.
    #[default]
    Header,
    /// `null`: no backing file.
    Closed,
    /// A node opened read-only below the image, whatever its header says.
    Node(Box<Node>),
}

impl Serialize for Backing {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Backing::Header => s.serialize_str("default"),
            Backing::Closed => s.serialize_unit(),
            Backing::Node(node) => node.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Backing {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Backing, D::Error> {
        // By hand: an untagged enum would hide why a backing node is wrong
        // behind "did not match any variant".
        struct Expect;
        impl<'de> Visitor<'de> for Expect {
            type Value = Backing;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"default\", null or a node")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Backing, E> {
                match v {
                    "default" => Ok(Backing::Header),
                    _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
                }
            }
            fn visit_unit<E: de::Error>(self) -> Result<Backing, E> {
                Ok(Backing::Closed)
            }
            fn visit_none<E: de::Error>(self) -> Result<Backing, E> {
                Ok(Backing::Closed)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Backing, A::Error> {
                let node = Node::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(Backing::Node(Box::new(node)))
            }
        }
        d.deserialize_any(Expect)
    }
}

/// `"backing": null` on a probe node: the backing file its header names
/// stays closed (`info` names it without opening it). Nothing else may be
/// given: a backing node needs the format to be known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeftClosed;

impl Serialize for LeftClosed {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_unit()
    }
}

impl<'de> Deserialize<'de> for LeftClosed {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<LeftClosed, D::Error> {
        struct Expect;
        impl<'de> Visitor<'de> for Expect {
            type Value = LeftClosed;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("null (the backing of a probed node can only be left closed)")
            }
            fn visit_unit<E: de::Error>(self) -> Result<LeftClosed, E> {
                Ok(LeftClosed)
            }
            fn visit_none<E: de::Error>(self) -> Result<LeftClosed, E> {
                Ok(LeftClosed)
            }
        }
        d.deserialize_any(Expect)
    }
}
