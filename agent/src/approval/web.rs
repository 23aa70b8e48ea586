//! The reviewers' web page: one self-contained HTML document (its script
//! and style inline, nothing fetched from elsewhere) that lists pending
//! requests with their context, approves (with a reason, an edit or a
//! grant) and denies through the same API, and refreshes every two
//! seconds. It is served without authentication, since it holds no data:
//! every call it makes carries the reviewer's token.

/// The page.
pub const PAGE: &str = include_str!("page.html");

#[cfg(test)]
mod tests {
    use super::PAGE;

    #[test]
    fn the_page_fetches_nothing_from_elsewhere() {
        for outside in ["<script src", "<link", "http://", "https://", "@import"] {
            assert!(!PAGE.contains(outside), "the page refers to {outside}");
        }
        // Every call goes to this API, by path.
        assert!(PAGE.contains("fetch(path"));
        for path in ["\"/v1/requests\"", "\"/v1/requests/\""] {
            assert!(PAGE.contains(path), "{path}");
        }
    }

    #[test]
    fn the_page_writes_request_data_as_text_never_as_markup() {
        // Statement text and identities come from the requester: shown
        // with textContent, so a statement cannot inject script.
        assert!(!PAGE.contains("innerHTML"));
        assert!(!PAGE.contains("insertAdjacentHTML"));
        assert!(!PAGE.contains("document.write"));
    }
}
