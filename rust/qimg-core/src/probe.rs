//! Recognising an existing image's format and virtual size, as far as
//! `create` needs it for backing files. (The full reader lives elsewhere.)

use crate::error::{Error, Result};
use crate::file::open_read;
use crate::qcow2::header::MAGIC;
use std::io::Read;
use std::path::Path;

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

/// What `create` needs to know of a backing image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageSummary {
    pub format: Format,
    pub virtual_size: u64,
}

/// Opens `path` and reads its format (the qcow2 magic, else raw) and its
/// virtual size. With `format` given, the file is read as that format.
pub fn summarize(path: &Path, format: Option<Format>) -> Result<ImageSummary> {
    let mut file = open_read(path)?;
    let len = file.metadata().map_err(|e| Error::open(path, e))?.len();
    let mut head = [0u8; 32];
    let got = read_up_to(&mut file, &mut head).map_err(|e| Error::open(path, e))?;
    let is_qcow2 = got >= 4 && head[..4] == MAGIC;
    let format = format.unwrap_or(if is_qcow2 { Format::Qcow2 } else { Format::Raw });
    let virtual_size = match format {
        Format::Raw => len.div_ceil(512) * 512,
        Format::Qcow2 => {
            if !is_qcow2 || got < 32 {
                return Err(Error::InvalidImage(format!(
                    "Could not open '{}': Image is not in qcow2 format",
                    path.display()
                )));
            }
            let version = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
            if !(2..=3).contains(&version) {
                return Err(Error::InvalidImage(format!(
                    "Could not open '{}': Unsupported qcow2 version {version}",
                    path.display()
                )));
            }
            let mut size = [0u8; 8];
            size.copy_from_slice(&head[24..32]);
            u64::from_be_bytes(size)
        }
    };
    Ok(ImageSummary {
        format,
        virtual_size,
    })
}

fn read_up_to(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}
