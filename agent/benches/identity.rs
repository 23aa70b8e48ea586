//! The identity lookup's cost per connection:
//!
//! - `identity/describe_process`: what the agent reads from `/proc` (and
//!   `/etc/passwd`, `/etc/group`) to name the process behind a redirected
//!   connection, here the benchmark's own process and its ancestry. The
//!   executable's hash is cached, as it is for repeated connections.
//!
//! Run: `cargo bench -p tollgate-agent --bench identity`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};

use tollgate_agent::identity::IdentityResolver;

fn describe_process(c: &mut Criterion) {
    let resolver = IdentityResolver::new();
    let pid = std::process::id();
    // The first lookup hashes the executable; later ones find it cached.
    let first = resolver.describe_process(pid);
    assert!(first.exe_sha256.is_some(), "gaps: {:?}", first.gaps);
    c.bench_function("identity/describe_process", |b| {
        b.iter(|| black_box(resolver.describe_process(black_box(pid))))
    });
}

criterion_group!(benches, describe_process);
criterion_main!(benches);
