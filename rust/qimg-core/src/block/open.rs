//! Opening an image: probing its format, reading its header, and opening
//! its backing chain, bottom up, with loops refused.

use super::cache::CacheMode;
use super::lock::{self, Sharing};
use super::raw::RawNode;
use super::{BlockDev, FileNode};
use crate::error::{Error, Result};
use crate::probe::{probe, Format};
use crate::qcow2::header::{read_head, Header};
use crate::qcow2::reader::Qcow2Node;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How to open an image.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// The format, or None to probe it as qemu-img does.
    pub format: Option<Format>,
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
    header: Option<Header>,
    /// The format came from probing.
    probed: bool,
    /// For the layer below: the resolved name it was opened by.
    backing_path: Option<String>,
}

/// Opens `path` and, unless told not to, its whole backing chain.
pub fn open_image(path: &str, opts: &OpenOptions) -> Result<Arc<dyn BlockDev>> {
    let file = open_local(path, opts.writable, opts.cache)?;
    open_chain(file, path, opts)
}

/// Opens the image whose bytes `file` holds (a local file or an NBD
/// export opened by the caller) and, unless told not to, its backing chain.
pub fn open_image_on(file: FileNode, opts: &OpenOptions) -> Result<Arc<dyn BlockDev>> {
    let name = file.filename().to_string();
    open_chain(file, &name, opts)
}

fn open_chain(top: FileNode, path: &str, opts: &OpenOptions) -> Result<Arc<dyn BlockDev>> {
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
            Some(file) => layer_of(file, &name, format, &mut seen, opts.sharing, true),
            None => open_local(&name, writable, opts.cache)
                .and_then(|f| layer_of(f, &name, format, &mut seen, opts.sharing, writable)),
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
        let next = match &layer.header {
            Some(h) => h.backing_file.as_ref().map(|b| {
                let resolved = backing_path(&layer.file, &name, b);
                (b.clone(), resolved, h.backing_format.clone())
            }),
            None => None,
        };
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
            Some(f) => Some(Format::from_name(f).ok_or_else(|| {
                Error::InvalidImage(format!(
                    "Could not open backing file of '{name}': backing format '{f}' is not supported by qimg (raw and qcow2 are)"
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
        let node: Arc<dyn BlockDev> = match layer.header {
            None => Arc::new(RawNode::new(layer.file, layer.probed)),
            Some(h) => {
                let filename = layer.file.filename().to_string();
                Arc::new(
                    Qcow2Node::open(layer.file, h, below.take(), layer.backing_path)
                        .map_err(|e| e.context(&format!("Could not open '{filename}'")))?,
                )
            }
        };
        below = Some(node);
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
        file,
        &path,
        Some(Format::Qcow2),
        &mut seen,
        opts.sharing,
        true,
    )?;
    let header = layer
        .header
        .ok_or_else(|| Error::InvalidImage(format!("Could not open '{path}'")))?;
    let name = backing.filename().to_string();
    Ok(Arc::new(
        Qcow2Node::open(layer.file, header, Some(backing), Some(name))
            .map_err(|e| e.context(&format!("Could not open '{path}'")))?,
    ))
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
    file: FileNode,
    name: &str,
    format: Option<Format>,
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
    let head = read_head(&file)?;
    let probed = format.is_none();
    let format = match format {
        Some(f) => f,
        None => probe(&head).map_err(|fmt| {
            Error::InvalidImage(format!(
                "Could not open '{name}': the image is in {fmt} format, which qimg does not read"
            ))
        })?,
    };
    let parse = |head: &[u8], file: &FileNode| {
        Header::parse(head, file.file_len())
            .map_err(|e| e.context(&format!("Could not open '{name}'")))
    };
    let mut header = match format {
        Format::Raw => None,
        Format::Qcow2 => Some(parse(&head, &file)?),
    };
    let mut file = file;
    if file.is_writable() && header.as_ref().is_some_and(|h| h.dirty()) {
        // An image with lazy refcounts left dirty by a writer that never
        // closed it: its refcounts are rebuilt before anything writes, as
        // QEMU does on open.
        let Some(path) = file.path().map(Path::to_path_buf) else {
            return Err(Error::InvalidImage(format!(
                "Could not open '{name}' for writing: a writer left its refcounts dirty (lazy refcounts), and qimg rebuilds them only in local files; run 'qemu-img check -r all' on the image where it is stored, or open it read-only"
            )));
        };
        drop(file);
        crate::qcow2::check::repair::rebuild_if_dirty(&path)?;
        file = FileNode::open_rw(&path)?;
        header = Some(parse(&read_head(&file)?, &file)?);
    }
    let want = lock::request(sharing, header.is_some(), file.is_writable(), top);
    file.lock(want)
        .map_err(|e| e.context(&format!("Could not open '{name}'")))?;
    Ok(Layer {
        file: Arc::new(file),
        header,
        probed,
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
