//! Opening an image: probing its format, reading its header, and opening
//! its backing chain, bottom up, with loops refused.

use super::cache::CacheMode;
use super::lock::{self, Sharing};
use super::{BlockDev, FileNode};
use crate::error::{Error, Result};
use crate::formats::{FormatDriver, OpenContext, PendingLayer, Registry};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How to open an image.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// The format, or None to probe it as qemu-img does.
    pub format: Option<&'static dyn FormatDriver>,
    /// Open only the image itself, not its backing chain.
    pub no_backing: bool,
    /// Open the image (not its backing chain) for writing.
    pub writable: bool,
    /// Open one backing file for writing too: the one this many layers
    /// below the image (1: its backing file). `commit` writes into it.
    pub writable_backing: Option<u32>,
    /// QEMU's cache mode for every file of the chain (flushes matter only
    /// to the image opened for writing).
    pub cache: CacheMode,
    /// Which of QEMU's image locks to take, and whether to share all (`-U`).
    pub sharing: Sharing,
}

struct Layer {
    file: Arc<FileNode>,
    /// The format's part, waiting for the node below.
    pending: Box<dyn PendingLayer>,
    /// For the layer below: the resolved name it was opened by.
    backing_path: Option<String>,
}

/// Opens `path` and, unless told not to, its whole backing chain.
pub fn open_image(path: &str, opts: &OpenOptions) -> Result<Arc<dyn BlockDev>> {
    Registry::standard().open_image(path, opts)
}

/// Opens the image whose bytes `file` holds (a local file or an NBD
/// export opened by the caller) and, unless told not to, its backing chain.
pub fn open_image_on(file: FileNode, opts: &OpenOptions) -> Result<Arc<dyn BlockDev>> {
    Registry::standard().open_image_on(file, opts)
}

impl Registry {
    /// Opens `path` and, unless told not to, its whole backing chain, with
    /// this registry's formats.
    pub fn open_image(&self, path: &str, opts: &OpenOptions) -> Result<Arc<dyn BlockDev>> {
        let file = open_local(path, opts.writable, opts.cache)?;
        open_chain(self, file, path, opts)
    }

    /// `open_image` of the bytes `file` holds.
    pub fn open_image_on(&self, file: FileNode, opts: &OpenOptions) -> Result<Arc<dyn BlockDev>> {
        let name = file.filename().to_string();
        open_chain(self, file, &name, opts)
    }
}

fn open_chain(
    registry: &Registry,
    top: FileNode,
    path: &str,
    opts: &OpenOptions,
) -> Result<Arc<dyn BlockDev>> {
    if opts.sharing.force_share && (opts.writable || opts.writable_backing.is_some()) {
        return Err(Error::invalid(
            "force-share=on can only be used with read-only images",
        ));
    }
    if opts.writable_backing.is_some() && opts.no_backing {
        return Err(Error::invalid(
            "a backing file cannot be opened for writing without the backing chain",
        ));
    }
    let mut layers: Vec<Layer> = Vec::new();
    let mut seen: HashSet<PathBuf> = HashSet::new();
    let mut name = path.to_string();
    let mut format = opts.format;
    let mut top = Some(top);
    let mut depth = 0u32;
    loop {
        let writable = opts.writable_backing == Some(depth);
        let opened = match top.take() {
            // The caller opened the top file in the cache mode asked for.
            Some(file) => layer_of(registry, file, &name, format, &mut seen, opts.sharing, true),
            None => open_local(&name, writable, opts.cache).and_then(|f| {
                layer_of(
                    registry,
                    f,
                    &name,
                    format,
                    &mut seen,
                    opts.sharing,
                    writable,
                )
            }),
        };
        depth += 1;
        let layer = match (opened, layers.last()) {
            (Ok(l), _) => l,
            (Err(e), None) => return Err(e),
            (Err(e), Some(above)) => {
                return Err(e.context(&format!(
                    "Could not open backing file of '{}'",
                    above.file.filename()
                )))
            }
        };
        let next = layer.pending.backing().map(|b| {
            let resolved = backing_path(&layer.file, &name, &b.name);
            (b.name, resolved, b.format)
        });
        layers.push(layer);
        let Some((stored, resolved, fmt)) = next else {
            break;
        };
        if let Some(last) = layers.last_mut() {
            last.backing_path.clone_from(&resolved);
        }
        if opts.no_backing {
            break;
        }
        let resolved = resolved.ok_or_else(|| {
            // QEMU would look for it on the same server, by a URL made from
            // the export's name; qimg opens backing files only as local files.
            Error::InvalidImage(format!(
                "Could not open '{name}': its backing file name '{stored}' is relative, and an NBD export has no directory to find it in; give the backing node in a json: spec (or \"backing\": null)"
            ))
        })?;
        format = match fmt.as_deref() {
            None => None,
            Some(f) => Some(registry.get(f).ok_or_else(|| {
                Error::InvalidImage(format!(
                    "Could not open backing file of '{name}': backing format '{}' is not supported by qimg ({} are)",
                    crate::error::printable(f),
                    registry.names_joined()
                ))
            })?),
        };
        name = resolved;
    }
    if opts
        .writable_backing
        .is_some_and(|d| d as usize >= layers.len())
    {
        return Err(Error::invalid(format!(
            "'{path}' has no backing file to open for writing"
        )));
    }

    let mut below: Option<Arc<dyn BlockDev>> = None;
    while let Some(layer) = layers.pop() {
        below = Some(
            layer
                .pending
                .into_node(layer.file, below.take(), layer.backing_path)?,
        );
    }
    below.ok_or_else(|| Error::InvalidImage(format!("Could not open '{path}'")))
}

/// The name the backing file `backing` of the image in `file` (opened as
/// `name`) is opened by; None when a relative name has nothing to be
/// relative to (the image is an NBD export).
fn backing_path(file: &FileNode, name: &str, backing: &str) -> Option<String> {
    if file.path().is_none() && !backing.starts_with('/') {
        return None;
    }
    Some(resolve_backing(name, backing))
}

/// Opens the qcow2 image in `file` over `backing`, a node opened by the
/// caller, instead of the backing file its header names.
pub fn open_qcow2_over(
    file: FileNode,
    backing: Arc<dyn BlockDev>,
    opts: &OpenOptions,
) -> Result<Arc<dyn BlockDev>> {
    let path = file.filename().to_string();
    let mut seen = HashSet::new();
    if opts.sharing.force_share && opts.writable {
        return Err(Error::invalid(
            "force-share=on can only be used with read-only images",
        ));
    }
    let layer = layer_of(
        Registry::standard(),
        file,
        &path,
        Some(&crate::formats::qcow2::QCOW2),
        &mut seen,
        opts.sharing,
        true,
    )?;
    let name = backing.filename().to_string();
    layer
        .pending
        .into_node(layer.file, Some(backing), Some(name))
}

/// QEMU's rule for a protocol prefix in a file name: `proto:rest`, where
/// the ':' comes before any '/' (so `./a:b` is a plain name).
pub fn protocol_prefix(name: &str) -> Option<(&str, &str)> {
    let cut = name.find([':', '/'])?;
    (name.as_bytes()[cut] == b':').then(|| (&name[..cut], &name[cut + 1..]))
}

/// The local path a file name opens, as qemu-img reads it: a `file:`
/// prefix names the file after it, `host_device:` a block device; any
/// other protocol is not a local file.
pub fn local_path(name: &str) -> Result<&str> {
    match protocol_prefix(name) {
        None => Ok(name),
        Some(("file", "")) => Err(Error::invalid(
            "The 'file' block driver requires a file name",
        )),
        Some(("file", rest)) => Ok(rest),
        Some((proto @ ("host_device" | "host_cdrom"), rest)) => {
            use std::os::unix::fs::FileTypeExt;
            let kind = std::fs::metadata(rest).map(|m| m.file_type());
            if kind.is_ok_and(|t| t.is_block_device() || t.is_char_device()) {
                Ok(rest)
            } else {
                Err(Error::invalid(format!(
                    "'{proto}' driver requires '{rest}' to be either a character or block device"
                )))
            }
        }
        Some(("json", _)) => Err(Error::InvalidImage(
            "a json: specification is not a local file name".into(),
        )),
        Some((proto, _)) if proto.starts_with("nbd") => Err(Error::InvalidImage(format!(
            "'{proto}:' names an NBD export, not a local file"
        ))),
        Some((proto, _)) => Err(Error::invalid(format!("Unknown protocol '{proto}'"))),
    }
}

/// Opens the local file `name`.
fn open_local(name: &str, writable: bool, cache: CacheMode) -> Result<FileNode> {
    let path =
        Path::new(local_path(name).map_err(|e| e.context(&format!("Could not open '{name}'")))?);
    FileNode::open_with(path, writable, cache)
}

/// Reads the format and header of the image in `file`, opened as `name`,
/// and takes QEMU's locks for it (`top`: the image itself, not a backing file).
fn layer_of(
    registry: &Registry,
    file: FileNode,
    name: &str,
    format: Option<&'static dyn FormatDriver>,
    seen: &mut HashSet<PathBuf>,
    sharing: Sharing,
    top: bool,
) -> Result<Layer> {
    let identity = match file.path() {
        Some(path) => std::fs::canonicalize(path).map_err(|e| Error::open(path, e))?,
        None => PathBuf::from(file.filename()),
    };
    if !seen.insert(identity) {
        return Err(Error::InvalidImage(format!(
            "Could not open '{name}': the backing chain loops back to this file"
        )));
    }
    let probed = format.is_none();
    let driver = match format {
        Some(f) => f,
        None => registry.probe(&file.probe_head()?).map_err(|fmt| {
            Error::InvalidImage(format!(
                "Could not open '{name}': the image is in {fmt} format, which qimg does not read"
            ))
        })?,
    };
    let opened = driver.open(file, &OpenContext { name, probed })?;
    let (file, pending) = (opened.file, opened.layer);
    let want = lock::request(sharing, pending.has_metadata(), file.is_writable(), top);
    file.lock(want)
        .map_err(|e| e.context(&format!("Could not open '{name}'")))?;
    Ok(Layer {
        file: Arc::new(file),
        pending,
        backing_path: None,
    })
}

/// Resolves a backing file name stored in `overlay` the way QEMU does:
/// absolute names stay, relative ones are taken from the overlay's directory.
pub fn resolve_backing(overlay: &str, backing: &str) -> String {
    // A name with a protocol prefix (file:, json:, nbd://) stands as it is.
    if backing.starts_with('/') || protocol_prefix(backing).is_some() {
        return backing.to_string();
    }
    match overlay.rfind('/') {
        Some(cut) => format!("{}{}", &overlay[..=cut], backing),
        None => backing.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_backing_names_resolve_against_the_overlay_directory() {
        assert_eq!(resolve_backing("top.qcow2", "base.raw"), "base.raw");
        assert_eq!(resolve_backing("d/top.qcow2", "base.raw"), "d/base.raw");
        assert_eq!(resolve_backing("/a/b/top", "../c"), "/a/b/../c");
        assert_eq!(resolve_backing("d/top", "/abs/base"), "/abs/base");
        assert_eq!(resolve_backing("d/top", "file:base"), "file:base");
    }

    #[test]
    fn protocol_prefixes_are_read_as_qemu_reads_them() {
        assert_eq!(local_path("file:x.qcow2").ok(), Some("x.qcow2"));
        assert_eq!(local_path("./file:x").ok(), Some("./file:x"));
        assert_eq!(local_path("dir/a:b").ok(), Some("dir/a:b"));
        assert_eq!(
            local_path("foo:bar").map_err(|e| e.to_string()),
            Err("Unknown protocol 'foo'".to_string())
        );
        assert!(local_path("file:").is_err());
        assert_eq!(protocol_prefix("nbd://h/x"), Some(("nbd", "//h/x")));
    }
}
