//! The ingress's worker threads. Each runs a single-threaded tokio runtime of its own and
//! accepts from every listener (the same socket, shared), so a connection, its requests and its
//! backend connections are served by one thread with no hand-off between threads; busy workers
//! leave new connections to idle ones. The agent's own work (gossip, state sync, the API) runs
//! on another runtime, so a flood of requests cannot delay failure detection.

use std::net::TcpListener;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::routes::Listener;
use crate::{Error, Ingress};

/// Worker threads, stopped and joined when dropped (what they still serve is dropped with them:
/// stop the listeners with their shutdown tokens first to let requests finish).
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
    stop: CancellationToken,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts `n` workers (at least one), named `uc-ingress-<i>`.
    pub fn start(n: usize) -> Result<Workers, Error> {
        let stop = CancellationToken::new();
        let mut workers = Workers {
            handles: Vec::new(),
            stop: stop.clone(),
            threads: Vec::new(),
        };
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            workers.handles.push(rt.handle().clone());
            let stop = stop.clone();
            // On error, `workers` is dropped and stops the threads already started.
            workers.threads.push(
                std::thread::Builder::new()
                    .name(format!("uc-ingress-{i}"))
                    .spawn(move || {
                        rt.block_on(stop.cancelled());
                        rt.shutdown_timeout(std::time::Duration::from_secs(1));
                    })?,
            );
        }
        Ok(workers)
    }

    /// How many workers there are.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Serves `listener` on every worker, as [`crate::serve`] does, until `shutdown`; returns
    /// when every worker has finished with it. The listener is made non-blocking.
    pub async fn serve(
        &self,
        ingress: Arc<Ingress>,
        listener: TcpListener,
        kind: Listener,
        public_port: u16,
        tls: Option<Arc<rustls::ServerConfig>>,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let mut running = Vec::with_capacity(self.handles.len());
        for handle in &self.handles {
            let l = listener.try_clone()?;
            let (ingress, tls, shutdown) = (ingress.clone(), tls.clone(), shutdown.clone());
            running.push(handle.spawn(async move {
                // Registered with this worker's own reactor.
                let l = tokio::net::TcpListener::from_std(l)?;
                crate::serve(ingress, l, kind, public_port, tls, shutdown).await
            }));
        }
        drop(listener);
        info!(%local, ?kind, public_port, workers = running.len(), "ingress listening");
        let mut result = Ok(());
        for r in running {
            match r.await {
                Ok(Err(e)) if result.is_ok() => result = Err(e),
                Ok(_) => {}
                // The workers were stopped under it.
                Err(_) => {}
            }
        }
        result
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
