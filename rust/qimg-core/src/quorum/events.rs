//! Event records of a quorum: what QEMU would send on its QMP monitor as
//! `QUORUM_REPORT_BAD` and `QUORUM_FAILURE`. The core only records them, with
//! the time they happened; the Python side shapes and delivers them.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

/// The kind of request a `QUORUM_REPORT_BAD` is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpType {
    Read,
    Write,
    Flush,
}

impl OpType {
    pub fn name(self) -> &'static str {
        match self {
            OpType::Read => "read",
            OpType::Write => "write",
            OpType::Flush => "flush",
        }
    }
}

/// Sector numbers as QMP reports them: 512-byte sectors, the count rounded
/// out so that the reported range covers every byte.
pub fn sectors(offset: u64, bytes: u64) -> (u64, u64) {
    let first = offset / 512;
    let end = offset.saturating_add(bytes).div_ceil(512);
    (first, end - first)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventData {
    /// A child returned an error or data that lost the vote.
    ReportBad {
        op: OpType,
        /// The child's error, when its I/O failed (absent when it lost a vote).
        error: Option<String>,
        node_name: String,
        sector_num: u64,
        sectors_count: u64,
    },
    /// No version of a range reached the vote threshold (or too few children
    /// answered): the request failed.
    Failure {
        reference: String,
        sector_num: u64,
        sectors_count: u64,
    },
}

impl EventData {
    pub fn name(&self) -> &'static str {
        match self {
            EventData::ReportBad { .. } => "QUORUM_REPORT_BAD",
            EventData::Failure { .. } => "QUORUM_FAILURE",
        }
    }

    pub fn report_bad(
        op: OpType,
        error: Option<String>,
        node_name: &str,
        offset: u64,
        bytes: u64,
    ) -> EventData {
        let (sector_num, sectors_count) = sectors(offset, bytes);
        EventData::ReportBad {
            op,
            error,
            node_name: node_name.to_string(),
            sector_num,
            sectors_count,
        }
    }

    pub fn failure(reference: &str, offset: u64, bytes: u64) -> EventData {
        let (sector_num, sectors_count) = sectors(offset, bytes);
        EventData::Failure {
            reference: reference.to_string(),
            sector_num,
            sectors_count,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub data: EventData,
    pub seconds: u64,
    pub microseconds: u32,
}

/// Every event of one opened node graph, in the order they happened. Nothing
/// is rate-limited or dropped: a reader drains them with [`EventLog::take`].
#[derive(Debug, Default)]
pub struct EventLog {
    events: Mutex<Vec<Event>>,
}

impl EventLog {
    pub fn new() -> Arc<EventLog> {
        Arc::new(EventLog::default())
    }

    pub fn record(&self, data: EventData) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let event = Event {
            data,
            seconds: now.as_secs(),
            microseconds: now.subsec_micros(),
        };
        self.lock().push(event);
    }

    /// The events recorded since the last call, oldest first.
    pub fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Event>> {
        self.events.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sector_ranges_cover_every_byte() {
        assert_eq!(sectors(0, 512), (0, 1));
        assert_eq!(sectors(0, 10 << 20), (0, 20480));
        assert_eq!(sectors(511, 2), (0, 2));
        assert_eq!(sectors(1024, 0), (2, 0));
        assert_eq!(sectors(1000, 100), (1, 2));
    }

    #[test]
    fn the_log_hands_out_events_once_in_order() {
        let log = EventLog::new();
        log.record(EventData::failure("q", 0, 512));
        log.record(EventData::report_bad(OpType::Read, None, "c1", 512, 512));
        let got = log.take();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].data.name(), "QUORUM_FAILURE");
        assert_eq!(got[1].data.name(), "QUORUM_REPORT_BAD");
        assert!(log.take().is_empty());
    }
}
