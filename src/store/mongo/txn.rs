//! Multi-document transactions with retries: the one way this backend
//! changes several documents together.

use std::time::Instant;

use futures_util::future::BoxFuture;
use mongodb::error::{Error as MongoError, UNKNOWN_TRANSACTION_COMMIT_RESULT};
use mongodb::ClientSession;

use super::errors::{backoff_delay, is_connectivity, store_err, txn_retryable};
use super::{Inner, TXN_ATTEMPTS, TXN_RETRY_BUDGET};
use crate::store::StoreError;

impl Inner {
    /// Runs `body` in a transaction and commits it, retrying the whole
    /// transaction on write conflicts and the commit when its outcome is
    /// unknown, within `TXN_RETRY_BUDGET`. `body` must only touch the
    /// database through the session.
    pub(super) async fn transaction<T, F>(&self, mut body: F) -> Result<T, StoreError>
    where
        T: Send,
        F: for<'s> FnMut(&'s mut ClientSession) -> BoxFuture<'s, mongodb::error::Result<T>> + Send,
    {
        let started = Instant::now();
        let may_retry = |e: &MongoError, attempt: u32| {
            let ok = txn_retryable(e)
                && attempt < TXN_ATTEMPTS
                && started.elapsed() < TXN_RETRY_BUDGET
                // The driver labels a lost server "transient" too; one more
                // try covers a failover, more would only delay the 503.
                && (!is_connectivity(e) || attempt < 2);
            if ok {
                metrics::counter!("chatd_store_txn_retries_total").increment(1);
            }
            ok
        };
        let mut session = self.client.start_session().await.map_err(store_err)?;
        let mut attempt = 0u32;
        'txn: loop {
            attempt += 1;
            session
                .start_transaction()
                .with_options(self.txn_opts.clone())
                .await
                .map_err(store_err)?;
            let value = match body(&mut session).await {
                Ok(v) => v,
                Err(e) => {
                    let retry = may_retry(&e, attempt);
                    if is_connectivity(&e) {
                        // Aborting would wait for the lost server once more;
                        // dropping the session aborts in the background.
                        if retry {
                            session = self.client.start_session().await.map_err(store_err)?;
                        }
                    } else {
                        let _ = session.abort_transaction().await;
                    }
                    if retry {
                        tokio::time::sleep(backoff_delay(attempt)).await;
                        continue 'txn;
                    }
                    return Err(store_err(e));
                }
            };
            let mut commit_tries = 0u32;
            loop {
                match session.commit_transaction().await {
                    Ok(()) => return Ok(value),
                    // Committing again is safe: the server answers with the
                    // first commit's outcome.
                    Err(e)
                        if e.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT)
                            && commit_tries < if is_connectivity(&e) { 1 } else { 2 }
                            && started.elapsed() < TXN_RETRY_BUDGET =>
                    {
                        commit_tries += 1;
                    }
                    Err(e) if may_retry(&e, attempt) => {
                        tokio::time::sleep(backoff_delay(attempt)).await;
                        continue 'txn;
                    }
                    Err(e) => return Err(store_err(e)),
                }
            }
        }
    }
}
