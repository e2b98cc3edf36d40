//! Numbers of the canonical node document that have a range, checked while
//! the document is read (`#[serde(try_from)]`): a parsed number is in range
//! by construction. Each serializes back to the number it was read from.

use serde::{Deserialize, Serialize};
use std::num::NonZeroUsize;
use std::time::Duration;

/// An NBD node's `timeout`: 1 to 86400 seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct Timeout(u64);

impl Timeout {
    /// When the document gives none.
    pub const DEFAULT: Duration = Duration::from_secs(30);
    const MAX: u64 = 86_400;

    pub fn duration(self) -> Duration {
        Duration::from_secs(self.0)
    }
}

impl TryFrom<u64> for Timeout {
    type Error = String;
    fn try_from(secs: u64) -> Result<Timeout, String> {
        if (1..=Timeout::MAX).contains(&secs) {
            Ok(Timeout(secs))
        } else {
            Err(format!(
                "'timeout' must be 1 to {} seconds, not {secs}",
                Timeout::MAX
            ))
        }
    }
}

impl From<Timeout> for u64 {
    fn from(t: Timeout) -> u64 {
        t.0
    }
}

/// An NBD node's `connections`: 1 to 16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "usize", into = "usize")]
pub struct Connections(usize);

impl Connections {
    const MAX: usize = 16;

    pub fn get(self) -> usize {
        self.0
    }
}

impl TryFrom<usize> for Connections {
    type Error = String;
    fn try_from(n: usize) -> Result<Connections, String> {
        if (1..=Connections::MAX).contains(&n) {
            Ok(Connections(n))
        } else {
            Err(format!(
                "'connections' must be 1 to {}, not {n}",
                Connections::MAX
            ))
        }
    }
}

impl From<Connections> for usize {
    fn from(c: Connections) -> usize {
        c.0
    }
}

/// A quorum's `vote-threshold`: at least 1 (its upper bound, the number of
/// children, is the quorum node's rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "usize", into = "usize")]
pub struct VoteThreshold(NonZeroUsize);

impl VoteThreshold {
    pub fn get(self) -> usize {
        self.0.get()
    }
}

impl TryFrom<usize> for VoteThreshold {
    type Error = &'static str;
    fn try_from(n: usize) -> Result<VoteThreshold, &'static str> {
        NonZeroUsize::new(n)
            .map(VoteThreshold)
            .ok_or("'vote-threshold' must be 1 or more")
    }
}

impl From<VoteThreshold> for usize {
    fn from(t: VoteThreshold) -> usize {
        t.get()
    }
}

/// A blkdebug rule's `errno`: a positive error number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "i32", into = "i32")]
pub struct Errno(i32);

impl Errno {
    pub fn get(self) -> i32 {
        self.0
    }
}

impl TryFrom<i32> for Errno {
    type Error = String;
    fn try_from(e: i32) -> Result<Errno, String> {
        if e > 0 {
            Ok(Errno(e))
        } else {
            Err(format!("'errno' must be a positive error number, not {e}"))
        }
    }
}

impl From<Errno> for i32 {
    fn from(e: Errno) -> i32 {
        e.0
    }
}

/// A blkdebug rule's `sector`: -1 (any request) or a 512-byte sector number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct Sector(i64);

impl Sector {
    /// The sector a rule is limited to; None for any.
    pub fn number(self) -> Option<u64> {
        u64::try_from(self.0).ok()
    }
}

impl TryFrom<i64> for Sector {
    type Error = String;
    fn try_from(s: i64) -> Result<Sector, String> {
        if s >= -1 {
            Ok(Sector(s))
        } else {
            Err(format!(
                "'sector' must be -1 (any) or a sector number, not {s}"
            ))
        }
    }
}

impl From<Sector> for i64 {
    fn from(s: Sector) -> i64 {
        s.0
    }
}
