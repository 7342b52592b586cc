//! The threads that run SSH connections.
//!
//! Each shard is one OS thread with its own single-threaded tokio runtime,
//! and a connection lives on one shard for its whole life, its socket
//! registered with that shard's reactor. Relaying a packet hands it between
//! three tasks (the receiving session, the relay, the sending session). On
//! tokio's work-stealing runtime every hand-off also woke an idle worker, and
//! when the two sessions sit on different threads every packet crosses
//! threads; both cost 10-15% more pivot CPU per relayed GiB than one shard
//! (`burrow-bench vs-openssh`, docs/benchmarks.md). So the pivot runs one
//! shard unless told otherwise; more shards spread handshakes over cores.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::runtime::{Builder, Handle};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub(crate) struct Shards {
    handles: Vec<Handle>,
    threads: Vec<JoinHandle<()>>,
    next: AtomicUsize,
    stop: CancellationToken,
}

impl Shards {
    /// Starts `n` shard threads (at least one).
    pub fn start(n: usize) -> std::io::Result<Shards> {
        let stop = CancellationToken::new();
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for i in 0..n.max(1) {
            let runtime = Builder::new_current_thread().enable_all().build()?;
            handles.push(runtime.handle().clone());
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("burrow-ssh-{i}"))
                .spawn(move || runtime.block_on(stop.cancelled()))?;
            threads.push(thread);
        }
        Ok(Shards { handles, threads, next: AtomicUsize::new(0), stop })
    }

    /// Runs `task` on the next shard in turn, tracked by `tracker`.
    pub fn spawn<F>(&self, tracker: &TaskTracker, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        tracker.spawn_on(task, &self.handles[i]);
    }

    /// Stops the threads; tasks still on them are dropped.
    pub async fn stop(mut self) {
        self.stop.cancel();
        let threads = std::mem::take(&mut self.threads);
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

impl Drop for Shards {
    /// If the pivot's future is dropped before `stop`, the threads still end.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
