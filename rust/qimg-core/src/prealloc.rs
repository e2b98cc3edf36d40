//! Preallocation modes, shared by every format that can create images.

use std::fmt;

/// How much of an image is allocated up front when it is created or grown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Prealloc {
    /// Allocate nothing beyond what the format needs to exist.
    Off,
    /// Allocate all metadata, leave the data region as a hole (qcow2 only).
    Metadata,
    /// Reserve the data region with fallocate; nothing is written to it.
    Falloc,
    /// Write zeroes over the whole data region.
    Full,
}

impl Prealloc {
    pub const ALL: [Prealloc; 4] = [
        Prealloc::Off,
        Prealloc::Metadata,
        Prealloc::Falloc,
        Prealloc::Full,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Prealloc::Off => "off",
            Prealloc::Metadata => "metadata",
            Prealloc::Falloc => "falloc",
            Prealloc::Full => "full",
        }
    }

    pub fn from_name(name: &str) -> Option<Prealloc> {
        Prealloc::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The mode named `name`, or the refusal of the name.
    pub fn parse(name: &str) -> crate::Result<Prealloc> {
        Prealloc::from_name(name).ok_or_else(|| {
            crate::Error::invalid(format!(
                "Parameter 'preallocation' does not accept value '{name}'"
            ))
        })
    }

    /// The refusal of this mode by a format or node that cannot do it.
    pub fn unsupported(self) -> crate::Error {
        crate::Error::invalid(format!("Unsupported preallocation mode: {self}"))
    }
}

impl fmt::Display for Prealloc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
