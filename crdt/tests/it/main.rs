//! Integration tests of uc-crdt.
fn main() {}
