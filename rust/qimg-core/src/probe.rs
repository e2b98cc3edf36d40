//! Recognising an image's format from its first bytes, as qemu-img probes.

use crate::qcow2::format::MAGIC;

/// Formats qimg knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }

    pub fn from_name(name: &str) -> Option<Format> {
        match name {
            "raw" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            _ => None,
        }
    }
}

/// Magic numbers of formats qimg does not read, so that such images are
/// refused by name instead of being read as raw bytes.
const FOREIGN_MAGICS: [(&[u8], usize, &str); 12] = [
    (b"KDMV", 0, "vmdk"),
    (b"COWD", 0, "vmdk"),
    (b"LUKS\xba\xbe", 0, "luks"),
    (b"WithoutFreeSpace", 0, "parallels"),
    (b"WithouFreSpacExt", 0, "parallels"),
    (b"Bochs Virtual HD Image", 0, "bochs"),
    (b"#!/bin/sh\n#V2.0 Format\n", 0, "cloop"),
    (b"# Disk DescriptorFile", 0, "vmdk"),
    (b"conectix", 0, "vpc"),
    (b"vhdxfile", 0, "vhdx"),
    (b"QED\0", 0, "qed"),
    (b"\x7f\x10\xda\xbe", 64, "vdi"),
];

/// Identifies the format of `head`, the first bytes of a file.
pub fn probe(head: &[u8]) -> std::result::Result<Format, &'static str> {
    if head.len() >= 8 && head[..4] == MAGIC {
        let version = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        // Version 1 is the older qcow format, which qimg does not read.
        return if version == 1 {
            Err("qcow")
        } else {
            Ok(Format::Qcow2)
        };
    }
    for (magic, at, name) in FOREIGN_MAGICS {
        if head.len() >= at + magic.len() && &head[at..at + magic.len()] == magic {
            return Err(name);
        }
    }
    Ok(Format::Raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probing_names_foreign_formats() {
        assert_eq!(probe(b"QFI\xfb\0\0\0\x03"), Ok(Format::Qcow2));
        assert_eq!(probe(b"QFI\xfb\0\0\0\x01"), Err("qcow"));
        assert_eq!(probe(b"KDMV...."), Err("vmdk"));
        assert_eq!(probe(b"hello"), Ok(Format::Raw));
        assert_eq!(probe(b""), Ok(Format::Raw));
    }
}
