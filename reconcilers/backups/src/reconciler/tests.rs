//! Reconciler tests.
