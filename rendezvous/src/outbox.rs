//! What other tasks queue for one control connection (bounded).

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use nettool_core::protocol::{Role, ServerToClient};

use crate::pairing::Pair;
use crate::{lock, OUTBOX_CAPACITY};

/// What other tasks queue for one control connection: bounded (see [`OUTBOX_CAPACITY`]).
/// A queue that overflows means the client does not read; its task then drops it, whatever
/// it is doing (even in the middle of a blocked write).
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    pub(crate) queue: Mutex<OutboxQueue>,
    pub(crate) overflowed: std::sync::atomic::AtomicBool,
    pub(crate) ready: Notify,
    pub(crate) overflow: Notify,
}

#[derive(Debug, Default)]
pub(crate) struct OutboxQueue {
    pub(crate) messages: std::collections::VecDeque<Outbound>,
    /// Its connection task has ended: nothing more is queued.
    pub(crate) closed: bool,
}

/// Closes an outbox when its connection task ends, however it ends (returned, or aborted
/// with the server): what is still queued is dropped. A queued `Paired` holds the pair, which
/// holds this outbox; without this, that cycle would keep both alive.
pub(crate) struct CloseOnDrop<'a>(pub(crate) &'a Outbox);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        let dropped = {
            let mut queue = lock(&self.0.queue);
            queue.closed = true;
            std::mem::take(&mut queue.messages)
        };
        drop(dropped);
    }
}

impl Outbox {
    pub(crate) fn push(&self, msg: Outbound) {
        let mut queue = lock(&self.queue);
        if queue.closed {
            return;
        }
        if queue.messages.len() >= OUTBOX_CAPACITY {
            drop(queue);
            if !self
                .overflowed
                .swap(true, std::sync::atomic::Ordering::SeqCst)
            {
                self.overflow.notify_one();
            }
            return;
        }
        queue.messages.push_back(msg);
        drop(queue);
        self.ready.notify_one();
    }

    /// The next queued message. Cancel safe (a message is taken only when returned).
    pub(crate) async fn next(&self) -> Outbound {
        loop {
            if let Some(msg) = lock(&self.queue).messages.pop_front() {
                return msg;
            }
            self.ready.notified().await;
        }
    }

    /// Resolves once the queue has overflowed.
    pub(crate) async fn overflowed(&self) {
        loop {
            if self.overflowed.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            self.overflow.notified().await;
        }
    }
}

/// What a connection task is told by others.
#[derive(Debug)]
pub(crate) enum Outbound {
    Msg(ServerToClient),
    Paired(Arc<Pair>, Role, ServerToClient),
    /// Send this message, then close.
    Fatal(ServerToClient),
}
