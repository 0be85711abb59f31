//! The writer thread: group commit of every pending write.

use rusqlite::Connection;
use tokio::sync::mpsc;

use super::sql_err;
use crate::store::StoreError;

pub(super) type Finish = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
pub(super) type WriteJob = Box<dyn FnOnce(&Connection) -> Finish + Send>;

pub(super) fn writer_loop(conn: Connection, mut rx: mpsc::Receiver<WriteJob>, max_batch: usize) {
    let mut batch: Vec<WriteJob> = Vec::with_capacity(max_batch);
    let mut finishes: Vec<Finish> = Vec::with_capacity(max_batch);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let began = begin_immediate(&conn);
        if let Err(e) = began {
            for job in batch.drain(..) {
                // The job never ran; tell its caller the store is unavailable.
                let f = job(&conn);
                f(Err(e.clone()));
            }
            continue;
        }
        for job in batch.drain(..) {
            finishes.push(job(&conn));
        }
        let commit = conn.execute_batch("COMMIT").map_err(sql_err);
        if commit.is_err() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        metrics::histogram!("chatd_store_batch_size").record(finishes.len() as f64);
        for f in finishes.drain(..) {
            f(commit.clone());
        }
    }
}

fn begin_immediate(conn: &Connection) -> Result<(), StoreError> {
    // busy_timeout covers most contention; a few retries cover the rest.
    let mut last = None;
    for _ in 0..5 {
        match conn.execute_batch("BEGIN IMMEDIATE") {
            Ok(()) => return Ok(()),
            Err(e) => last = Some(sql_err(e)),
        }
    }
    Err(last.unwrap_or_else(|| StoreError::Unavailable("cannot begin".into())))
}
