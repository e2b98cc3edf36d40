//! Small value types for qcow2 parameters, each valid by construction.

use crate::error::{Error, Result};
use std::fmt;

/// A qcow2 cluster size: a power of two from 512 bytes to 2 MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClusterSize {
    bits: u32,
}

impl ClusterSize {
    pub const MIN_BITS: u32 = 9;
    pub const MAX_BITS: u32 = 21;
    pub const DEFAULT: ClusterSize = ClusterSize { bits: 16 };

    pub fn new(bytes: u64) -> Result<Self> {
        if bytes.is_power_of_two() {
            let bits = bytes.trailing_zeros();
            if (Self::MIN_BITS..=Self::MAX_BITS).contains(&bits) {
                return Ok(ClusterSize { bits });
            }
        }
        Err(Error::invalid(format!(
            "Cluster size must be a power of two between 512 and 2048k, not {bytes}"
        )))
    }

    pub fn from_bits(bits: u32) -> Result<Self> {
        if (Self::MIN_BITS..=Self::MAX_BITS).contains(&bits) {
            Ok(ClusterSize { bits })
        } else {
            Err(Error::InvalidImage(format!(
                "Unsupported cluster size: 2^{bits} (qcow2 allows 2^9 to 2^21)"
            )))
        }
    }

    pub fn bits(self) -> u32 {
        self.bits
    }

    pub fn bytes(self) -> u64 {
        1u64 << self.bits
    }

    /// Round `n` up to a whole number of clusters, in bytes.
    pub fn round_up(self, n: u64) -> u64 {
        self.clusters_for(n) << self.bits
    }

    /// Number of clusters needed to hold `n` bytes.
    pub fn clusters_for(self, n: u64) -> u64 {
        n.div_ceil(self.bytes())
    }
}

impl fmt::Display for ClusterSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.bytes())
    }
}

/// log2 of the refcount entry width in bits: 0 (1 bit) ..= 6 (64 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RefcountOrder(u32);

impl RefcountOrder {
    pub const DEFAULT: RefcountOrder = RefcountOrder(4);

    /// From a width in bits (the `refcount_bits` option).
    pub fn from_bits(width: u64) -> Result<Self> {
        if width.is_power_of_two() && width <= 64 {
            Ok(RefcountOrder(width.trailing_zeros()))
        } else {
            Err(Error::invalid(format!(
                "Refcount width must be a power of two and may not exceed 64 bits, not {width}"
            )))
        }
    }

    pub fn from_order(order: u32) -> Result<Self> {
        if order <= 6 {
            Ok(RefcountOrder(order))
        } else {
            Err(Error::InvalidImage(format!(
                "Unsupported refcount order: {order}"
            )))
        }
    }

    pub fn order(self) -> u32 {
        self.0
    }

    pub fn width_bits(self) -> u64 {
        1u64 << self.0
    }

    /// Refcount entries held by one refcount block of `cs`.
    pub fn entries_per_block(self, cs: ClusterSize) -> u64 {
        (cs.bytes() * 8) >> self.0
    }
}

/// qcow2 version: v2 ("0.10") or v3 ("1.1").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compat {
    V2,
    V3,
}

impl Compat {
    /// Accepts QEMU's spellings: `0.10`, `v2`, `1.1`, `v3`.
    pub fn parse(s: &str) -> Option<Compat> {
        match s {
            "0.10" | "v2" => Some(Compat::V2),
            "1.1" | "v3" => Some(Compat::V3),
            _ => None,
        }
    }

    pub fn version(self) -> u32 {
        match self {
            Compat::V2 => 2,
            Compat::V3 => 3,
        }
    }
}

/// How compressed clusters are compressed (a v3 header field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CompressionType {
    Zlib,
    Zstd,
}

impl CompressionType {
    pub fn parse(s: &str) -> Option<CompressionType> {
        match s {
            "zlib" => Some(CompressionType::Zlib),
            "zstd" => Some(CompressionType::Zstd),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }

    /// The value of the header's compression_type byte.
    pub fn code(self) -> u8 {
        match self {
            CompressionType::Zlib => 0,
            CompressionType::Zstd => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_size_accepts_powers_of_two_from_512_to_2m() {
        for bits in 9..=21 {
            assert_eq!(
                ClusterSize::new(1 << bits).map(|c| c.bits()).ok(),
                Some(bits)
            );
        }
        for bad in [0u64, 256, 1023, 4 << 20, 3 << 10, u64::MAX] {
            assert!(ClusterSize::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn refcount_order_accepts_powers_of_two_up_to_64() {
        for (width, order) in [(1, 0), (2, 1), (4, 2), (8, 3), (16, 4), (32, 5), (64, 6)] {
            assert_eq!(
                RefcountOrder::from_bits(width).map(|o| o.order()).ok(),
                Some(order)
            );
        }
        for bad in [0u64, 3, 24, 128] {
            assert!(RefcountOrder::from_bits(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn compat_accepts_qemu_spellings() {
        assert_eq!(Compat::parse("0.10"), Some(Compat::V2));
        assert_eq!(Compat::parse("v3"), Some(Compat::V3));
        assert_eq!(Compat::parse("1.0"), None);
    }
}
