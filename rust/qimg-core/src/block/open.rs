//! Opening an image: probing its format, reading its header, and opening
//! its backing chain, bottom up, with loops refused.

use super::raw::RawNode;
use super::{BlockDev, FileNode};
use crate::error::{Error, Result};
use crate::probe::{probe, Format};
use crate::qcow2::image_header::ImageHeader;
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
    /// Skip flushes to the disk (qemu's `cache=unsafe`).
    pub unsafe_cache: bool,
}

struct Layer {
    file: Arc<FileNode>,
    header: Option<ImageHeader>,
    /// The format came from probing.
    probed: bool,
    /// For the layer below: the resolved name it was opened by.
    backing_path: Option<String>,
}

/// Opens `path` and, unless told not to, its whole backing chain.
pub fn open_image(path: &str, opts: &OpenOptions) -> Result<Arc<dyn BlockDev>> {
    let mut layers: Vec<Layer> = Vec::new();
    let mut seen: HashSet<PathBuf> = HashSet::new();
    let mut name = path.to_string();
    let mut format = opts.format;
    loop {
        let top = layers.is_empty();
        let opened = open_layer(&name, format, &mut seen, opts.writable && top).map(|l| {
            if top && opts.unsafe_cache {
                l.without_flushes()
            } else {
                l
            }
        });
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
                let resolved = resolve_backing(&name, b);
                (resolved, h.backing_format.clone())
            }),
            None => None,
        };
        layers.push(layer);
        let Some((resolved, fmt)) = next else { break };
        if let Some(last) = layers.last_mut() {
            last.backing_path = Some(resolved.clone());
        }
        if opts.no_backing {
            break;
        }
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

/// Opens the qcow2 image `path` over `backing`, a node opened by the
/// caller, instead of the backing file its header names.
pub fn open_qcow2_over(
    path: &str,
    backing: Arc<dyn BlockDev>,
    opts: &OpenOptions,
) -> Result<Arc<dyn BlockDev>> {
    let mut seen = HashSet::new();
    let mut layer = open_layer(path, Some(Format::Qcow2), &mut seen, opts.writable)?;
    if opts.unsafe_cache {
        layer = layer.without_flushes();
    }
    let header = layer
        .header
        .ok_or_else(|| Error::InvalidImage(format!("Could not open '{path}'")))?;
    let name = backing.filename().to_string();
    Ok(Arc::new(
        Qcow2Node::open(layer.file, header, Some(backing), Some(name))
            .map_err(|e| e.context(&format!("Could not open '{path}'")))?,
    ))
}

impl Layer {
    fn without_flushes(self) -> Layer {
        match Arc::try_unwrap(self.file) {
            Ok(file) => Layer {
                file: Arc::new(file.without_flushes()),
                ..self
            },
            Err(file) => Layer { file, ..self },
        }
    }
}

fn open_layer(
    name: &str,
    format: Option<Format>,
    seen: &mut HashSet<PathBuf>,
    writable: bool,
) -> Result<Layer> {
    if name.contains("://") || name.starts_with("json:") {
        return Err(Error::InvalidImage(format!(
            "Could not open '{name}': protocols and json: specifications are not supported here yet; give a local file name"
        )));
    }
    let path = Path::new(name);
    let file = if writable {
        FileNode::open_rw(path)?
    } else {
        FileNode::open(path)?
    };
    let canonical = std::fs::canonicalize(path).map_err(|e| Error::open(path, e))?;
    if !seen.insert(canonical) {
        return Err(Error::InvalidImage(format!(
            "Could not open '{name}': the backing chain loops back to this file"
        )));
    }
    let cs_max = 1usize << crate::qcow2::ClusterSize::MAX_BITS;
    let mut head = vec![0u8; (file.file_len() as usize).min(cs_max)];
    file.pread(&mut head, 0)?;
    let probed = format.is_none();
    let format = match format {
        Some(f) => f,
        None => probe(&head).map_err(|fmt| {
            Error::InvalidImage(format!(
                "Could not open '{name}': the image is in {fmt} format, which qimg does not read"
            ))
        })?,
    };
    let mut header = match format {
        Format::Raw => None,
        Format::Qcow2 => Some(
            ImageHeader::parse(&head, file.file_len())
                .map_err(|e| e.context(&format!("Could not open '{name}'")))?,
        ),
    };
    let mut file = file;
    if writable && header.as_ref().is_some_and(|h| h.dirty()) {
        // An image with lazy refcounts left dirty by a writer that never
        // closed it: its refcounts are rebuilt before anything writes, as
        // QEMU does on open.
        drop(file);
        crate::qcow2::repair::rebuild_if_dirty(path)?;
        file = FileNode::open_rw(path)?;
        let mut head = vec![0u8; (file.file_len() as usize).min(cs_max)];
        file.pread(&mut head, 0)?;
        header = Some(
            ImageHeader::parse(&head, file.file_len())
                .map_err(|e| e.context(&format!("Could not open '{name}'")))?,
        );
    }
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
    if backing.starts_with('/') || backing.contains("://") || backing.starts_with("json:") {
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
    }
}
