//! End-to-end tests live in `tests/*.rs`.
