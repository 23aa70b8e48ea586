//! Errors that name their place in a file (`FILE:LINE:COLUMN: message`), as
//! the configuration and policy files report them, so an editor can jump
//! to each.

use std::fmt;
use std::path::{Path, PathBuf};

/// One problem in a file, with its place when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocatedError {
    /// The file.
    pub path: PathBuf,
    /// 1-based line, when the problem has a place in the file.
    pub line: Option<usize>,
    /// 1-based column.
    pub column: Option<usize>,
    /// What is wrong and what to do.
    pub message: String,
}

impl LocatedError {
    /// An error about a whole file (unreadable, missing, ...).
    pub fn file(path: &Path, message: impl Into<String>) -> LocatedError {
        LocatedError {
            path: path.to_path_buf(),
            line: None,
            column: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for LocatedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => {
                write!(f, "{}:{}:{}: {}", self.path.display(), l, c, self.message)
            }
            _ => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

impl std::error::Error for LocatedError {}

/// Parses TOML into `T`, turning a syntax or shape error into one
/// positioned [`LocatedError`].
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
) -> Result<T, LocatedError> {
    toml::from_str(text).map_err(|e| {
        let (line, column) = match e.span() {
            Some(span) => {
                let (l, c) = crate::config::line_column(text, span.start);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        LocatedError {
            path: path.to_path_buf(),
            line,
            column,
            message: match e.message().trim_end() {
                // The TOML parser says nothing of some bytes it refuses
                // (a control character in a comment).
                "" => "invalid TOML here (a control character or a stray byte)".to_owned(),
                message => message.to_owned(),
            },
        }
    })
}

/// Every problem found, one per line: files in the order read, each file's
/// in text order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocatedErrors(pub Vec<LocatedError>);

impl fmt::Display for LocatedErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for LocatedErrors {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_print_one_per_line_with_their_place_when_known() {
        let errors = LocatedErrors(vec![
            LocatedError {
                path: PathBuf::from("a.toml"),
                line: Some(3),
                column: Some(7),
                message: "unknown key".into(),
            },
            LocatedError::file(Path::new("b.toml"), "cannot read: no such file"),
        ]);
        assert_eq!(
            errors.to_string(),
            "a.toml:3:7: unknown key\nb.toml: cannot read: no such file"
        );
    }
}
