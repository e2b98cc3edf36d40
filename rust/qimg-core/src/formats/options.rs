//! Creation option tables of format drivers, the `-o help` listings made
//! from them, and the typed option values a driver creates an image from.

use crate::error::{Error, Result};
use crate::prealloc::Prealloc;
use std::collections::BTreeMap;

/// The type of an option's value, as `-o help` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionKind {
    Str,
    Bool,
    Size,
    Number,
}

impl OptionKind {
    /// The placeholder in a help line (`cluster_size=<size>`).
    pub fn placeholder(self) -> &'static str {
        match self {
            OptionKind::Str => "<str>",
            OptionKind::Bool => "<bool (on/off)>",
            OptionKind::Size => "<size>",
            OptionKind::Number => "<num>",
        }
    }
}

/// One creation option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionSpec {
    pub name: &'static str,
    pub kind: OptionKind,
    pub help: String,
    /// Shown in the `Formatting ...` line when the option is not given.
    pub default: Option<String>,
}

impl OptionSpec {
    pub fn new(name: &'static str, kind: OptionKind, help: &str) -> OptionSpec {
        OptionSpec {
            name,
            kind,
            help: help.to_string(),
            default: None,
        }
    }

    /// The same option, echoed as `default` when it is not given.
    pub fn echoed(mut self, default: impl Into<String>) -> OptionSpec {
        self.default = Some(default.into());
        self
    }

    /// Its line in a `-o help` listing.
    pub fn help_line(&self) -> String {
        let left = format!("{}={}", self.name, self.kind.placeholder());
        format!("  {left:<22} - {}", self.help)
    }

    /// The virtual size, which every format takes.
    pub fn size() -> OptionSpec {
        OptionSpec::new(
            "size",
            OptionKind::Size,
            "Virtual size of the disk image in bytes",
        )
    }

    /// `preallocation`, listing `modes`.
    pub fn preallocation(modes: &[Prealloc]) -> OptionSpec {
        let names: Vec<&str> = modes.iter().map(|m| m.name()).collect();
        OptionSpec::new(
            "preallocation",
            OptionKind::Str,
            &format!("What to allocate up front, one of: {}", names.join(", ")),
        )
    }

    /// The `file` protocol's `nocow`.
    pub fn nocow() -> OptionSpec {
        OptionSpec::new(
            "nocow",
            OptionKind::Bool,
            "Create the file with copy-on-write disabled (btrfs only)",
        )
    }

    /// The `file` protocol's `extent_size_hint`.
    pub fn extent_size_hint() -> OptionSpec {
        OptionSpec::new(
            "extent_size_hint",
            OptionKind::Size,
            "Ask the filesystem to allocate in extents of this size (XFS); 0 turns it off",
        )
    }
}

/// A format's creation options and what `amend` can change.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OptionTable {
    /// The format's own options.
    pub format_options: Vec<OptionSpec>,
    /// Options of the `file` protocol that apply when a filename is known.
    pub protocol_options: Vec<OptionSpec>,
    /// The order of the `Formatting ...` line.
    pub echo_order: Vec<&'static str>,
    /// The preallocation modes the format can create.
    pub prealloc_modes: Vec<Prealloc>,
    /// Options qemu-img knows for the format that qimg refuses for now.
    pub not_yet: Vec<&'static str>,
    /// The options `amend` can change (empty: the format has no amend).
    pub amend_options: Vec<&'static str>,
    /// Amend options qemu-img has that qimg refuses for now.
    pub amend_not_yet: Vec<&'static str>,
}

impl OptionTable {
    /// Format options, then the protocol's that the format does not have.
    pub fn all_options(&self) -> Vec<&OptionSpec> {
        let mut all: Vec<&OptionSpec> = self.format_options.iter().collect();
        for o in &self.protocol_options {
            if !self.format_options.iter().any(|f| f.name == o.name) {
                all.push(o);
            }
        }
        all
    }

    /// The `-o help` listing of format `name`; `with_protocol` when a
    /// filename was given (and the protocol's options apply).
    pub fn help_text(&self, name: &str, with_protocol: bool) -> String {
        let mut options: Vec<&OptionSpec> = if with_protocol {
            self.all_options()
        } else {
            self.format_options.iter().collect()
        };
        options.sort_by_key(|o| o.name);
        let lines = options.iter().map(|o| o.help_line());
        if with_protocol {
            return std::iter::once("Supported options:".to_string())
                .chain(lines)
                .collect::<Vec<_>>()
                .join("\n");
        }
        std::iter::once(format!("Supported {name} options:"))
            .chain(lines)
            .chain([
                String::new(),
                "The protocol level may support further options.".to_string(),
                "Specify the target filename to include those options.".to_string(),
            ])
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The `amend -o help` listing of format `name` (None: no amend).
    pub fn amend_help_text(&self, name: &str) -> Option<String> {
        if self.amend_options.is_empty() {
            return None;
        }
        let mut names = self.amend_options.clone();
        names.sort_unstable();
        let lines = names.iter().filter_map(|n| {
            self.format_options
                .iter()
                .find(|o| o.name == *n)
                .map(OptionSpec::help_line)
        });
        Some(
            std::iter::once(format!("Amend options for '{name}':"))
                .chain(lines)
                .collect::<Vec<_>>()
                .join("\n"),
        )
    }
}

/// A typed option value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionValue {
    Str(String),
    Bool(bool),
    Int(u64),
}

/// Typed `-o` values by option name, as a driver creates or measures from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    values: BTreeMap<String, OptionValue>,
}

impl Options {
    pub fn new() -> Options {
        Options::default()
    }

    /// These options with `name` set to `value`.
    pub fn set(mut self, name: &str, value: OptionValue) -> Options {
        self.values.insert(name.to_string(), value);
        self
    }

    pub fn get(&self, name: &str) -> Option<&OptionValue> {
        self.values.get(name)
    }

    /// A number or size; `default` when not given.
    pub fn int(&self, name: &str, default: u64) -> Result<u64> {
        match self.get(name) {
            None => Ok(default),
            Some(OptionValue::Int(n)) => Ok(*n),
            Some(_) => Err(wrong_type(name, "a number")),
        }
    }

    /// An on/off option; `default` when not given.
    pub fn flag(&self, name: &str, default: bool) -> Result<bool> {
        match self.get(name) {
            None => Ok(default),
            Some(OptionValue::Bool(b)) => Ok(*b),
            Some(_) => Err(wrong_type(name, "'on' or 'off'")),
        }
    }

    /// A string option, None when not given.
    pub fn text(&self, name: &str) -> Result<Option<&str>> {
        match self.get(name) {
            None => Ok(None),
            Some(OptionValue::Str(s)) => Ok(Some(s)),
            Some(_) => Err(wrong_type(name, "a string")),
        }
    }

    /// The virtual size, which every creation needs.
    pub fn size(&self) -> Result<u64> {
        match self.get("size") {
            None => Err(Error::invalid("Image creation needs a size parameter")),
            Some(_) => self.int("size", 0),
        }
    }

    /// The preallocation mode (off when not given), one of `modes`.
    pub fn prealloc(&self, modes: &[Prealloc]) -> Result<Prealloc> {
        let Some(name) = self.text("preallocation")? else {
            return Ok(Prealloc::Off);
        };
        let mode = Prealloc::parse(name)?;
        if modes.contains(&mode) {
            Ok(mode)
        } else {
            Err(mode.unsupported())
        }
    }
}

fn wrong_type(name: &str, want: &str) -> Error {
    Error::invalid(format!("Parameter '{name}' expects {want}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_lines_align_their_descriptions() {
        assert_eq!(
            OptionSpec::size().help_line(),
            "  size=<size>            - Virtual size of the disk image in bytes"
        );
    }
}
