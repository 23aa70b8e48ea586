//! `cargo xtask sql-visitor`: generates `agent/src/sql/visit.rs`, a visitor
//! over every node of `pg_query`'s parse tree, from the message definitions
//! in the `pg_query` crate's `protobuf.rs` (prost's output).
//!
//! The statement analysis must see every table and function a statement
//! names, in every statement type; a hand-written walk misses what it does
//! not list. The generated visitor descends into every message field of
//! every node, so the analysis overrides only the nodes it interprets and
//! the rest is walked for it. `--check` fails when the committed file
//! differs from what the current `pg_query` would give (run by the tests).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The generated file, relative to the workspace root.
pub(crate) const OUTPUT: &str = "agent/src/sql/visit.rs";

/// How a message field holds its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arity {
    Optional,
    Repeated,
}

/// A field whose type is a message.
#[derive(Debug)]
struct Field {
    name: String,
    message: String,
    arity: Arity,
}

/// What the generator reads from `protobuf.rs`.
#[derive(Debug, Default)]
struct Schema {
    /// Message structs (top level) and their message fields.
    messages: BTreeMap<String, Vec<Field>>,
    /// The variants of `node::Node` and the message each holds.
    variants: Vec<(String, String)>,
}

/// Generates the visitor; with `check`, compares instead of writing.
pub(crate) fn run(root: &Path, check: bool) -> Result<()> {
    let source_path = protobuf_rs(root)?;
    let source = std::fs::read_to_string(&source_path)
        .with_context(|| format!("cannot read {}", source_path.display()))?;
    let version = source_path
        .ancestors()
        .nth(2)
        .and_then(|dir| dir.file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "pg_query".to_owned());
    let schema = parse(&source)?;
    let generated = rustfmt(&generate(&schema, &version))?;
    let output = root.join(OUTPUT);
    if check {
        let current = std::fs::read_to_string(&output).unwrap_or_default();
        if current != generated {
            bail!(
                "{OUTPUT} is not what {version} gives; regenerate it with `cargo xtask sql-visitor`"
            );
        }
        println!("{OUTPUT}: up to date with {version}");
    } else {
        std::fs::write(&output, generated)
            .with_context(|| format!("cannot write {}", output.display()))?;
        println!("{OUTPUT}: generated from {version}");
    }
    Ok(())
}

/// Formats Rust source as `cargo fmt` would (the file is checked by it).
fn rustfmt(source: &str) -> Result<String> {
    use std::io::Write as _;
    let mut child = Command::new("rustfmt")
        .args(["--edition", "2021", "--emit", "stdout"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot run rustfmt")?;
    child
        .stdin
        .take()
        .context("rustfmt has no stdin")?
        .write_all(source.as_bytes())
        .context("cannot write to rustfmt")?;
    let output = child.wait_with_output().context("rustfmt failed")?;
    if !output.status.success() {
        bail!(
            "rustfmt failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    String::from_utf8(output.stdout).context("rustfmt printed non-UTF-8")
}

/// The `protobuf.rs` of the `pg_query` package the agent builds with.
fn protobuf_rs(root: &Path) -> Result<PathBuf> {
    let output = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
        .current_dir(root)
        .args(["metadata", "--format-version", "1", "--locked"])
        .output()
        .context("cannot run cargo metadata")?;
    if !output.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("cargo metadata printed no JSON")?;
    let manifest = metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|package| package["name"] == "pg_query")
        .and_then(|package| package["manifest_path"].as_str())
        .context("pg_query is not a dependency of the workspace")?;
    let dir = Path::new(manifest)
        .parent()
        .context("pg_query's manifest has no directory")?;
    Ok(dir.join("src").join("protobuf.rs"))
}

/// Reads message structs, their message fields and the `node::Node`
/// variants from prost's output (one item per line, attributes before).
fn parse(source: &str) -> Result<Schema> {
    let mut schema = Schema::default();
    let mut lines = source.lines().peekable();
    // The struct being read (top level only) and the last prost attribute.
    let mut current: Option<String> = None;
    let mut in_node_enum = false;
    let mut attribute = String::new();
    while let Some(line) = lines.next() {
        let trimmed = line.trim();
        if line.starts_with("pub struct ") {
            let name = trimmed
                .trim_start_matches("pub struct ")
                .trim_end_matches(" {")
                .to_owned();
            schema.messages.insert(name.clone(), Vec::new());
            current = Some(name);
            continue;
        }
        if line.starts_with("pub mod node {") {
            in_node_enum = true;
            continue;
        }
        if line == "}" {
            current = None;
            in_node_enum = false;
            continue;
        }
        if trimmed.starts_with("#[prost(") {
            // An attribute may span lines up to its `)]`.
            attribute = trimmed.to_owned();
            while !attribute.ends_with(")]") {
                match lines.next() {
                    Some(more) => attribute.push_str(more.trim()),
                    None => bail!("unterminated attribute: {attribute}"),
                }
            }
            continue;
        }
        if in_node_enum {
            if trimmed.starts_with('#') || trimmed.starts_with("pub ") || trimmed.starts_with("//")
            {
                continue;
            }
            // `Name(super::Type),` or `Name(::prost::alloc::boxed::Box<super::Type>),`,
            // possibly over several lines.
            let mut declaration = trimmed.to_owned();
            while declaration.contains('(') && !declaration.ends_with("),") {
                match lines.next() {
                    Some(more) => declaration.push_str(more.trim()),
                    None => bail!("unterminated variant: {declaration}"),
                }
            }
            if let Some((variant, rest)) = declaration.split_once('(') {
                if attribute.starts_with("#[prost(message") && !variant.contains(' ') {
                    let message = last_type_name(rest)
                        .with_context(|| format!("no type in variant {declaration}"))?;
                    schema.variants.push((variant.to_owned(), message));
                }
            }
            attribute.clear();
            continue;
        }
        let Some(message) = current.as_ref() else {
            continue;
        };
        if let Some(rest) = trimmed.strip_prefix("pub ") {
            // The type may continue on the next lines up to the `,`.
            let mut declaration = rest.to_owned();
            while !declaration.ends_with(',') {
                match lines.next() {
                    Some(more) => declaration.push_str(more.trim()),
                    None => bail!("unterminated field: {declaration}"),
                }
            }
            let is_message = attribute.starts_with("#[prost(message");
            let arity = if attribute.contains("repeated") {
                Arity::Repeated
            } else {
                Arity::Optional
            };
            let taken = std::mem::take(&mut attribute);
            if !is_message {
                continue;
            }
            let (name, ty) = declaration
                .split_once(':')
                .with_context(|| format!("no type in field {declaration}"))?;
            let field_message = last_type_name(ty)
                .with_context(|| format!("no message type in field {declaration} ({taken})"))?;
            if let Some(fields) = schema.messages.get_mut(message) {
                fields.push(Field {
                    name: name.trim().to_owned(),
                    message: field_message,
                    arity,
                });
            }
        }
    }
    if schema.variants.is_empty() {
        bail!("no node::Node variants found: has prost's output changed shape?");
    }
    Ok(schema)
}

/// The innermost type name of a type expression:
/// `::core::option::Option<::prost::alloc::boxed::Box<OnConflictClause>>,`
/// gives `OnConflictClause`.
fn last_type_name(ty: &str) -> Option<String> {
    let inner = ty
        .trim()
        .trim_end_matches(|c: char| matches!(c, ',' | ')' | '>') || c.is_whitespace());
    let inner = inner.rsplit('<').next()?;
    let name = inner.rsplit("::").next()?.trim();
    (!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .then(|| name.to_owned())
}

/// `RangeVar` gives `range_var`, `AExpr` gives `a_expr`.
fn snake(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The messages reachable from the node variants (the parse tree's types).
fn reachable(schema: &Schema) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut stack: Vec<String> = schema.variants.iter().map(|(_, m)| m.clone()).collect();
    stack.push("Node".to_owned());
    while let Some(message) = stack.pop() {
        if !seen.insert(message.clone()) {
            continue;
        }
        for field in schema.messages.get(&message).into_iter().flatten() {
            stack.push(field.message.clone());
        }
    }
    seen
}

fn generate(schema: &Schema, version: &str) -> String {
    let messages = reachable(schema);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "// @generated by `cargo xtask sql-visitor` from {version}'s protobuf.rs; do not edit.\n\
         //! A visitor over every node of `pg_query`'s parse tree: one `visit_` method\n\
         //! per message type, each defaulting to a `walk_` function that visits every\n\
         //! message field in declaration order. Override a method to interpret a\n\
         //! node; call its `walk_` function to descend into it as well.\n\
         #![allow(dead_code, clippy::all)]\n\
         \n\
         use pg_query::protobuf as pb;\n\
         use pg_query::NodeEnum;\n\
         \n\
         /// Visits a parse tree; every method's default walks the node's children.\n\
         pub(crate) trait Visit {{\n\
         \x20   /// Any node.\n\
         \x20   fn visit_node_enum(&mut self, node: &NodeEnum) {{\n\
         \x20       walk_node_enum(self, node)\n\
         \x20   }}"
    );
    for message in &messages {
        let method = snake(message);
        let _ = writeln!(
            out,
            "    /// A `{message}`.\n    \
             fn visit_{method}(&mut self, node: &pb::{message}) {{\n        \
             walk_{method}(self, node)\n    }}"
        );
    }
    out.push_str("}\n\n");

    out.push_str(
        "/// Visits the message a node holds.\n\
         pub(crate) fn walk_node_enum<V: Visit + ?Sized>(v: &mut V, node: &NodeEnum) {\n    \
         match node {\n",
    );
    for (variant, message) in &schema.variants {
        let _ = writeln!(
            out,
            "        NodeEnum::{variant}(n) => v.visit_{}(n),",
            snake(message)
        );
    }
    out.push_str("    }\n}\n\n");

    out.push_str(
        "/// The parse tree's name of a node's type (`SelectStmt`, `RangeVar`).\n\
         pub(crate) fn node_type_name(node: &NodeEnum) -> &'static str {\n    \
         match node {\n",
    );
    for (variant, _) in &schema.variants {
        let _ = writeln!(out, "        NodeEnum::{variant}(_) => \"{variant}\",");
    }
    out.push_str("    }\n}\n");

    for message in &messages {
        let method = snake(message);
        let fields = schema
            .messages
            .get(message)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let _ = write!(
            out,
            "\n/// Visits the message fields of a `{message}`.\n\
             pub(crate) fn walk_{method}<V: Visit + ?Sized>("
        );
        if message == "Node" {
            out.push_str(
                "v: &mut V, node: &pb::Node) {\n    \
                 if let Some(inner) = &node.node {\n        \
                 v.visit_node_enum(inner);\n    }\n}\n",
            );
            continue;
        }
        if fields.is_empty() {
            out.push_str("_v: &mut V, _node: &pb::");
            out.push_str(message);
            out.push_str(") {}\n");
            continue;
        }
        let _ = writeln!(out, "v: &mut V, node: &pb::{message}) {{");
        for field in fields {
            let visit = snake(&field.message);
            let name = &field.name;
            match field.arity {
                Arity::Repeated => {
                    let _ = writeln!(
                        out,
                        "    for item in &node.{name} {{\n        v.visit_{visit}(item);\n    }}"
                    );
                }
                Arity::Optional => {
                    let _ = writeln!(
                        out,
                        "    if let Some(item) = &node.{name} {{\n        v.visit_{visit}(item);\n    }}"
                    );
                }
            }
        }
        out.push_str("}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_are_read_through_wrappers() {
        assert_eq!(
            last_type_name(
                " ::core::option::Option<::prost::alloc::boxed::Box<OnConflictClause>>,"
            )
            .as_deref(),
            Some("OnConflictClause")
        );
        assert_eq!(
            last_type_name("::prost::alloc::vec::Vec<Node>,").as_deref(),
            Some("Node")
        );
        assert_eq!(
            last_type_name("super::RangeVar),").as_deref(),
            Some("RangeVar")
        );
        assert_eq!(snake("AExpr"), "a_expr");
        assert_eq!(snake("RangeVar"), "range_var");
    }

    #[test]
    fn the_committed_visitor_is_current() -> Result<()> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask has no parent directory")?;
        run(root, true)
    }
}
