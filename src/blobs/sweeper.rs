//! Removes uploads that were never attached to a message once they are
//! older than `limits.attachment_unattached_ttl_secs`. Every node runs one;
//! the deletes are conditional (an attach that wins the race keeps the
//! file), so several sweepers over one GridFS bucket do no harm.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::BlobStore;

/// Ids looked at per round trip.
const BATCH: usize = 500;

/// How often a sweeper with this TTL looks: a quarter of the TTL, between
/// 200 ms and 10 minutes.
pub fn interval_for(ttl: Duration) -> Duration {
    (ttl / 4).clamp(Duration::from_millis(200), Duration::from_secs(600))
}

/// One pass: removes every unattached upload created more than `ttl` ago;
/// returns how many were removed.
pub async fn sweep_once(store: &dyn BlobStore, ttl: Duration) -> Result<usize, super::BlobError> {
    let ttl = chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
    let cutoff = chrono::Utc::now()
        .checked_sub_signed(ttl)
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC)
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    sweep_before(store, &cutoff).await
}

/// Removes every unattached upload created before `cutoff` (RFC 3339).
pub async fn sweep_before(store: &dyn BlobStore, cutoff: &str) -> Result<usize, super::BlobError> {
    let mut removed = 0;
    loop {
        let ids = store.unattached_before(cutoff, BATCH).await?;
        let mut any = false;
        for id in &ids {
            if store.delete_unattached(id).await? {
                removed += 1;
                any = true;
            }
        }
        // A short page is the last; a page where nothing could be removed
        // (all bound meanwhile) would repeat itself.
        if ids.len() < BATCH || !any {
            break;
        }
    }
    Ok(removed)
}

/// Runs [`sweep_once`] every [`interval_for`]`(ttl)` until `stop`.
pub fn start(
    store: Arc<dyn BlobStore>,
    ttl: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let every = interval_for(ttl);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            match sweep_once(store.as_ref(), ttl).await {
                Ok(0) => {}
                Ok(n) => {
                    metrics::counter!("chatd_attachments_swept_total").increment(n as u64);
                    tracing::info!(removed = n, "unattached uploads removed");
                }
                Err(e) => tracing::warn!(error = %e, "attachment sweep failed"),
            }
        }
    })
}
