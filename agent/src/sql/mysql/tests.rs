use super::*;

#[test]
fn smoke() {
    assert!(matches!(analyze("SELECT 1"), Analysis::Parsed { .. }));
}
