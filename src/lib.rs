//! chatd
