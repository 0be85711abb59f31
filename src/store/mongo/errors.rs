//! How driver errors map to [`StoreError`]: what is "not now"
//! (`Unavailable`), what is a duplicate key, what a transaction may retry.

use std::time::Duration;

use mongodb::error::{
    Error as MongoError, ErrorKind, WriteFailure, TRANSIENT_TRANSACTION_ERROR,
    UNKNOWN_TRANSACTION_COMMIT_RESULT,
};

use super::super::StoreError;

/// The server's code for a unique index violation.
pub(super) const DUPLICATE_KEY: i32 = 11000;

/// Server error codes that mean "not now" rather than "never": no primary,
/// shutting down, timed out, write concern not met in time.
pub(super) const UNAVAILABLE_CODES: &[i32] = &[
    6,     // HostUnreachable
    7,     // HostNotFound
    50,    // MaxTimeMSExpired
    64,    // WriteConcernFailed
    89,    // NetworkTimeout
    91,    // ShutdownInProgress
    112,   // WriteConflict
    189,   // PrimarySteppedDown
    251,   // NoSuchTransaction
    262,   // ExceededTimeLimit
    9001,  // SocketException
    10107, // NotWritablePrimary
    11600, // InterruptedAtShutdown
    11602, // InterruptedDueToReplStateChange
    13435, // NotPrimaryNoSecondaryOk
    13436, // NotPrimaryOrSecondary
];

pub(super) fn code_of(e: &MongoError) -> Option<i32> {
    match e.kind.as_ref() {
        ErrorKind::Command(c) => Some(c.code),
        ErrorKind::Write(WriteFailure::WriteError(w)) => Some(w.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => Some(w.code),
        ErrorKind::InsertMany(m) => m
            .write_errors
            .as_ref()
            .and_then(|v| v.first().map(|w| w.code))
            .or(m.write_concern_error.as_ref().map(|w| w.code)),
        _ => None,
    }
}

pub(super) fn is_dup_key(e: &MongoError) -> bool {
    match e.kind.as_ref() {
        ErrorKind::InsertMany(m) => m
            .write_errors
            .as_ref()
            .is_some_and(|v| v.iter().any(|w| w.code == DUPLICATE_KEY)),
        _ => code_of(e) == Some(DUPLICATE_KEY),
    }
}

/// The server cannot be reached at all (as opposed to refusing a command).
pub(super) fn is_connectivity(e: &MongoError) -> bool {
    matches!(
        e.kind.as_ref(),
        ErrorKind::Io(_)
            | ErrorKind::ConnectionPoolCleared { .. }
            | ErrorKind::ServerSelection { .. }
            | ErrorKind::DnsResolve { .. }
    )
}

pub(super) fn is_unavailable(e: &MongoError) -> bool {
    is_connectivity(e)
        || matches!(
            e.kind.as_ref(),
            ErrorKind::Shutdown | ErrorKind::Write(WriteFailure::WriteConcernError(_))
        )
        || matches!(e.kind.as_ref(), ErrorKind::InsertMany(m) if m.write_concern_error.is_some())
        || code_of(e).is_some_and(|c| UNAVAILABLE_CODES.contains(&c))
        || e.contains_label(TRANSIENT_TRANSACTION_ERROR)
        || e.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT)
        || e.contains_label(mongodb::error::RETRYABLE_WRITE_ERROR)
}

/// Maps a driver error: connection trouble is `Unavailable` (503 upstream).
/// The `Unavailable` text may reach clients, so it names the cause without
/// addresses or topology; the whole driver error goes to the debug log.
pub(crate) fn store_err(e: MongoError) -> StoreError {
    if is_unavailable(&e) {
        tracing::debug!(error = %e, "mongodb unavailable");
        StoreError::Unavailable(unavailable_reason(&e))
    } else {
        StoreError::Internal(e.to_string())
    }
}

pub(super) fn unavailable_reason(e: &MongoError) -> String {
    let code_name = |code: i32, name: &str| format!("mongodb answered {name} ({code})");
    match e.kind.as_ref() {
        ErrorKind::Io(io) => format!("mongodb connection failed: {}", io.kind()),
        ErrorKind::ServerSelection { .. } => {
            "mongodb unreachable (no server selected in time)".into()
        }
        ErrorKind::ConnectionPoolCleared { .. } => "mongodb connection lost".into(),
        ErrorKind::DnsResolve { .. } => "mongodb host name did not resolve".into(),
        ErrorKind::Shutdown => "mongodb client shut down".into(),
        ErrorKind::Command(c) => code_name(c.code, &c.code_name),
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => {
            format!("mongodb write concern not met ({})", w.code_name)
        }
        ErrorKind::Write(WriteFailure::WriteError(w)) => {
            code_name(w.code, w.code_name.as_deref().unwrap_or("WriteError"))
        }
        _ if e.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT) => {
            "mongodb commit outcome unknown".into()
        }
        _ => "mongodb unavailable".into(),
    }
}

pub(super) fn bson_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(format!("bson: {e}"))
}

/// Whether a failed transaction body may simply run again: a write conflict
/// (labelled transient), or a unique key another transaction committed
/// after our snapshot (the retry reads it and takes the other branch).
pub(super) fn txn_retryable(e: &MongoError) -> bool {
    e.contains_label(TRANSIENT_TRANSACTION_ERROR) || is_dup_key(e)
}

pub(super) fn backoff_delay(attempt: u32) -> Duration {
    let cap_ms = 2u64.saturating_pow(attempt.min(6)).min(64);
    Duration::from_millis(rand::random_range(1..=cap_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::{self, doc};
    use std::sync::Arc;

    fn command_error(code: i32) -> MongoError {
        let ce: mongodb::error::CommandError =
            bson::from_document(doc! { "code": code, "codeName": "X", "errmsg": "m" }).unwrap();
        MongoError::from(ErrorKind::Command(ce))
    }

    #[test]
    fn errors_are_classified() {
        let io = MongoError::from(ErrorKind::Io(Arc::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        ))));
        match store_err(io) {
            StoreError::Unavailable(m) => {
                assert_eq!(m, "mongodb connection failed: connection refused")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            store_err(command_error(10107)),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            store_err(command_error(2)),
            StoreError::Internal(_)
        ));
        let dup = command_error(DUPLICATE_KEY);
        assert!(is_dup_key(&dup) && txn_retryable(&dup));
        let we: mongodb::error::WriteError =
            bson::from_document(doc! { "code": DUPLICATE_KEY, "errmsg": "E11000" }).unwrap();
        assert!(is_dup_key(&MongoError::from(ErrorKind::Write(
            WriteFailure::WriteError(we)
        ))));
    }
}
