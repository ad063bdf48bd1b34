//! Graceful shutdown of a listener's connections: when the node stops,
//! every open connection is asked to finish the request it is serving and
//! close, and the listener waits until all have.
//!
//! hyper_util's `GracefulShutdown` does this with a watch channel that each
//! connection polls on every wake-up (a mutex-guarded waiter list, about
//! 2 % of a small request's CPU). Here a connection is registered once, and
//! shutdown visits the registry and sets a flag the connection reads when
//! it is polled (see [`HeadDeadline::drain`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::head_deadline::HeadDeadline;

/// The open connections of one listener.
#[derive(Default)]
pub(crate) struct Connections {
    registry: Mutex<Registry>,
    /// Woken when the last connection closes while draining.
    closed: tokio::sync::Notify,
}

#[derive(Default)]
struct Registry {
    next: u64,
    open: HashMap<u64, Arc<HeadDeadline>>,
    draining: bool,
}

impl Connections {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A map of handles: a panic mid-update cannot leave it inconsistent.
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts `conn` as open until the returned registration drops. A
    /// connection registered after draining began is asked to finish at once.
    pub(crate) fn register(self: &Arc<Self>, conn: &Arc<HeadDeadline>) -> Registration {
        let mut registry = self.lock();
        let id = registry.next;
        registry.next += 1;
        if registry.draining {
            conn.drain();
        }
        registry.open.insert(id, conn.clone());
        Registration {
            connections: self.clone(),
            id,
        }
    }

    /// Asks every open connection to finish, then waits until all have
    /// closed.
    pub(crate) async fn drain(&self) {
        {
            let mut registry = self.lock();
            registry.draining = true;
            for conn in registry.open.values() {
                conn.drain();
            }
        }
        loop {
            let closed = self.closed.notified();
            let mut closed = std::pin::pin!(closed);
            // Listening before looking: a close between the look and the
            // wait still wakes it.
            closed.as_mut().enable();
            if self.lock().open.is_empty() {
                return;
            }
            closed.await;
        }
    }
}

/// Keeps a connection counted as open (see [`Connections::register`]).
pub(crate) struct Registration {
    connections: Arc<Connections>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut registry = self.connections.lock();
        registry.open.remove(&self.id);
        if registry.draining && registry.open.is_empty() {
            self.connections.closed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn drain_flags_open_connections_and_waits_for_them() {
        let connections = Arc::new(Connections::default());
        let (a, b) = (HeadDeadline::new(), HeadDeadline::new());
        let reg_a = connections.register(&a);
        let reg_b = connections.register(&b);
        let draining = tokio::spawn({
            let connections = connections.clone();
            async move { connections.drain().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(a.is_draining() && b.is_draining());
        drop(reg_a);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!draining.is_finished(), "one connection is still open");
        // A connection that registers late is told to finish at once.
        let c = HeadDeadline::new();
        let reg_c = connections.register(&c);
        assert!(c.is_draining());
        drop(reg_b);
        drop(reg_c);
        tokio::time::timeout(Duration::from_secs(5), draining)
            .await
            .expect("drain returns once every connection closed")
            .expect("drain task");
    }

    #[tokio::test]
    async fn drain_with_nothing_open_returns_at_once() {
        let connections = Arc::new(Connections::default());
        drop(connections.register(&HeadDeadline::new()));
        tokio::time::timeout(Duration::from_secs(5), connections.drain())
            .await
            .expect("nothing to wait for");
    }
}
