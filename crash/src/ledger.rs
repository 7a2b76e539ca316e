//! What the producers sent and what they were told: every request, by `(producer, request)`, with its
//! size and its outcome as the producer saw it. The checker holds the database against it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A request's identity: its producer and the producer's request id (never reused, not even after a
/// failure: see the retry note in `producer.rs`).
pub type Key = (i32, i64);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Flight,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Sent (or about to be); no answer yet. None remain when the producers are paused.
    InFlight,
    /// Acknowledged: HTTP 200, or covered by a Flight `PutResult`'s `request_id`. Must be present,
    /// exactly once, from now on.
    Acked,
    /// Refused with a definite answer (an HTTP error status, e.g. `503 shutting_down` during the
    /// graceful stop): nothing of it may be written.
    Refused,
    /// No answer: the server was killed (or stopped) while the request was in flight, or before it was
    /// sent. Either fully present or absent, at most once.
    Ambiguous,
}

#[derive(Debug, Clone)]
pub struct Sent {
    pub rows: i64,
    pub protocol: Protocol,
    pub state: State,
    /// The server run (0 before the first kill, +1 per restart) it was sent to.
    pub epoch: u64,
    /// When it was registered (just before it was sent), and for an acknowledged one how long the
    /// acknowledgement took.
    pub sent: Instant,
    pub ack_latency: Option<Duration>,
}

#[derive(Default)]
pub struct Ledger {
    requests: BTreeMap<Key, Sent>,
}

impl Ledger {
    pub fn register(&mut self, key: Key, rows: i64, protocol: Protocol, epoch: u64) {
        let sent = Sent { rows, protocol, state: State::InFlight, epoch, sent: Instant::now(), ack_latency: None };
        let previous = self.requests.insert(key, sent);
        assert!(previous.is_none(), "request {key:?} registered twice: request ids are never reused");
    }

    /// Records an outcome. An acknowledgement is final: a later failure of the same call does not undo it.
    pub fn settle(&mut self, key: Key, state: State) {
        let sent = self.requests.get_mut(&key).expect("a registered request");
        if sent.state != State::Acked {
            sent.state = state;
            if state == State::Acked {
                sent.ack_latency = Some(sent.sent.elapsed());
            }
        }
    }

    pub fn get(&self, key: &Key) -> Option<&Sent> {
        self.requests.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Key, &Sent)> {
        self.requests.iter()
    }
}
