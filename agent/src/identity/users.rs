//! User and group names from `passwd(5)` and `group(5)` files. Only the local
//! files are read (no NSS): a uid known only to LDAP or sssd stays numeric and
//! the identity records a gap.

use std::io;
use std::path::Path;

/// Finds the name whose third field (uid in `passwd`, gid in `group`) is `id`.
/// Comments, blank lines, NIS `+`/`-` entries and malformed lines are skipped.
pub(super) fn name_for_id(text: &str, id: u32) -> Option<String> {
    text.lines()
        .filter(|line| !line.starts_with(['#', '+', '-']))
        .find_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?.trim();
            let _password = fields.next()?;
            let found: u32 = fields.next()?.trim().parse().ok()?;
            (found == id && !name.is_empty()).then(|| name.to_owned())
        })
}

/// Reads `path` and looks `id` up in it.
pub(super) fn lookup(path: &Path, id: u32) -> io::Result<Option<String>> {
    Ok(name_for_id(&std::fs::read_to_string(path)?, id))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn tolerates_comments_and_garbage() {
        let passwd = "# comment\n\n+nis::0:0::/:/bin/sh\ngarbage\nbad:x:notanumber:0\n:x:5:5::/:\nroot:x:0:0:root:/root:/bin/bash\nci:x:1001:1001::/home/ci:/bin/sh\n";
        assert_eq!(name_for_id(passwd, 0).as_deref(), Some("root"));
        assert_eq!(name_for_id(passwd, 1001).as_deref(), Some("ci"));
        assert_eq!(name_for_id(passwd, 5), None);
        assert_eq!(name_for_id(passwd, 42), None);
        let group = "root:x:0:\nrunners:x:1001:ci,deploy\n";
        assert_eq!(name_for_id(group, 1001).as_deref(), Some("runners"));
    }
}
