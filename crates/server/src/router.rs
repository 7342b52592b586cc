//! In-memory routing: which connection holds each device's tunnel, and which
//! authenticated connections exist (so removed identities can be dropped).
//!
//! Device ids are virtual names looked up here; no port is ever bound per device.
//! A std `Mutex` is enough: every critical section is a map operation, never
//! held across `.await`.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burrow_core::Id;
use russh::server::Handle;

use crate::registry::Identity;

/// A number that names one SSH connection for the life of the process.
pub type ConnId = u64;

/// A device's reverse tunnel: the device connection and the ports it forwards.
#[derive(Clone)]
pub struct Tunnel {
    pub conn: ConnId,
    pub handle: Handle,
    pub ports: BTreeSet<u32>,
    pub activity: Arc<Activity>,
}

impl Tunnel {
    fn new(conn: ConnId, handle: &Handle) -> Self {
        Tunnel { conn, handle: handle.clone(), ports: BTreeSet::new(), activity: Arc::new(Activity::new()) }
    }
}

/// Open channels through a tunnel, and since when it has had none.
#[derive(Debug)]
pub struct Activity {
    open: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl Activity {
    fn new() -> Self {
        Activity { open: AtomicUsize::new(0), idle_since: Mutex::new(Instant::now()) }
    }

    /// Counts a channel as open until the guard drops.
    pub fn enter(self: &Arc<Self>) -> ActivityGuard {
        self.open.fetch_add(1, Ordering::SeqCst);
        ActivityGuard(self.clone())
    }

    pub fn idle_for(&self, grace: Duration, now: Instant) -> bool {
        self.open.load(Ordering::SeqCst) == 0 && now.duration_since(*self.idle_since.lock().unwrap()) >= grace
    }
}

pub struct ActivityGuard(Arc<Activity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            *self.0.idle_since.lock().unwrap() = Instant::now();
        }
    }
}

/// An authenticated connection, remembered so the pivot can end it.
#[derive(Clone)]
pub struct Session {
    pub identity: Identity,
    pub fingerprint: String,
    pub handle: Handle,
    /// Where it connected from, for bans made while it is open.
    pub peer: std::net::IpAddr,
}

/// What happened when a device asked to forward a port.
pub enum Bind {
    /// The port is now routed to this connection.
    Added,
    /// The port was added and an older connection of the same device lost its tunnel.
    Replaced(Handle),
}

#[derive(Default)]
pub struct Router {
    tunnels: Mutex<HashMap<Id, Tunnel>>,
    /// Bumped whenever a tunnel is created or replaced.
    generation: AtomicU64,
    sessions: Mutex<Sessions>,
}

#[derive(Default)]
struct Sessions {
    by_conn: HashMap<ConnId, Session>,
    /// Connections per key fingerprint.
    per_key: HashMap<String, usize>,
}

impl Router {
    pub fn tunnel(&self, id: &Id) -> Option<Tunnel> {
        self.tunnels.lock().unwrap().get(id).cloned()
    }

    /// Changes whenever a tunnel comes up (new, or replacing an older one).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Routes `id:port` to connection `conn`. A tunnel of the same device on
    /// another connection is replaced, so a device that reconnects after a
    /// network drop is never locked out.
    pub fn bind(&self, id: &Id, conn: ConnId, handle: &Handle, port: u32) -> (Bind, Vec<u32>) {
        let mut tunnels = self.tunnels.lock().unwrap();
        let mut result = Bind::Added;
        let entry = tunnels.entry(id.clone()).or_insert_with(|| {
            self.generation.fetch_add(1, Ordering::Relaxed);
            Tunnel::new(conn, handle)
        });
        if entry.conn != conn {
            let old = std::mem::replace(entry, Tunnel::new(conn, handle));
            self.generation.fetch_add(1, Ordering::Relaxed);
            result = Bind::Replaced(old.handle);
        }
        entry.ports.insert(port);
        (result, entry.ports.iter().copied().collect())
    }

    /// Stops routing `id:port` to `conn`. Returns the ports left, or `None` if
    /// the tunnel is gone (or belongs to another connection).
    pub fn unbind(&self, id: &Id, conn: ConnId, port: u32) -> Option<Vec<u32>> {
        let mut tunnels = self.tunnels.lock().unwrap();
        let t = tunnels.get_mut(id).filter(|t| t.conn == conn)?;
        t.ports.remove(&port);
        if t.ports.is_empty() {
            tunnels.remove(id);
            return Some(Vec::new());
        }
        Some(t.ports.iter().copied().collect())
    }

    /// Forgets the tunnel if `conn` still holds it; true if it did.
    pub fn drop_tunnel(&self, id: &Id, conn: ConnId) -> bool {
        let mut tunnels = self.tunnels.lock().unwrap();
        if tunnels.get(id).is_some_and(|t| t.conn == conn) {
            tunnels.remove(id);
            return true;
        }
        false
    }

    pub fn tunnels(&self) -> Vec<(Id, Tunnel)> {
        self.tunnels.lock().unwrap().iter().map(|(id, t)| (id.clone(), t.clone())).collect()
    }

    pub fn tunnel_ids(&self) -> Vec<Id> {
        self.tunnels.lock().unwrap().keys().cloned().collect()
    }

    pub fn add_session(&self, conn: ConnId, session: Session) {
        let mut s = self.sessions.lock().unwrap();
        *s.per_key.entry(session.fingerprint.clone()).or_default() += 1;
        if let Some(old) = s.by_conn.insert(conn, session) {
            s.forget_key(&old.fingerprint);
        }
    }

    pub fn remove_session(&self, conn: ConnId) {
        let mut s = self.sessions.lock().unwrap();
        if let Some(old) = s.by_conn.remove(&conn) {
            s.forget_key(&old.fingerprint);
        }
    }

    /// Connections authenticated with the key of this fingerprint.
    pub fn sessions_of(&self, fingerprint: &str) -> usize {
        self.sessions.lock().unwrap().per_key.get(fingerprint).copied().unwrap_or(0)
    }

    pub fn sessions(&self) -> Vec<(ConnId, Session)> {
        self.sessions.lock().unwrap().by_conn.iter().map(|(c, s)| (*c, s.clone())).collect()
    }
}

impl Sessions {
    fn forget_key(&mut self, fingerprint: &str) {
        if let Some(n) = self.per_key.get_mut(fingerprint) {
            *n -= 1;
            if *n == 0 {
                self.per_key.remove(fingerprint);
            }
        }
    }
}
