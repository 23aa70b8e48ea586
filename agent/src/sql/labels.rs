//! Statement kinds and command labels from the node type names that
//! `pg_query::summary` reports (`"SelectStmt"`, `"DropStmt"`, ...), and the
//! words for PostgreSQL object types.
//!
//! Labels follow PostgreSQL's command tags (`CreateCommandTag` in the
//! server's `utility.c`) where those are specific enough, and say more where
//! a policy message gains from it (`EXPLAIN ANALYZE`, `SET ROLE`).

use pg_query::protobuf::ObjectType;

use super::StatementKind;

/// How a top-level statement type is labelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Class {
    /// Kind and label follow from the type name alone.
    Fixed(StatementKind, &'static str),
    /// The label (or the kind) depends on fields of the node: build the tree.
    Tree,
    /// Not in the table: kind from the name's prefix, label from the name.
    Unknown,
}

/// Classifies a statement type name as reported by `pg_query::summary`.
pub(super) fn classify(node_type: &str) -> Class {
    use StatementKind as K;
    let fixed = |kind, label| Class::Fixed(kind, label);
    match node_type {
        // Hot path: these never need the tree for their label.
        "SelectStmt" => fixed(K::Select, "SELECT"),
        "InsertStmt" => fixed(K::Insert, "INSERT"),
        "UpdateStmt" => fixed(K::Update, "UPDATE"),
        "DeleteStmt" => fixed(K::Delete, "DELETE"),
        "VariableShowStmt" => fixed(K::Set, "SHOW"),
        "CallStmt" => fixed(K::Call, "CALL"),
        "DoStmt" => fixed(K::Do, "DO"),
        "PrepareStmt" => fixed(K::Prepared, "PREPARE"),
        "ExecuteStmt" => fixed(K::Prepared, "EXECUTE"),
        "DeallocateStmt" => fixed(K::Prepared, "DEALLOCATE"),
        "TruncateStmt" => fixed(K::Truncate, "TRUNCATE"),

        // The label or the tables need fields of the node.
        "MergeStmt"
        | "CopyStmt"
        | "ExplainStmt"
        | "TransactionStmt"
        | "VariableSetStmt"
        | "DropStmt"
        | "GrantStmt"
        | "GrantRoleStmt"
        | "AlterTableStmt"
        | "RenameStmt"
        | "AlterObjectSchemaStmt"
        | "AlterOwnerStmt"
        | "AlterObjectDependsStmt"
        | "CreateTableAsStmt"
        | "CreateFunctionStmt"
        | "AlterFunctionStmt"
        | "DefineStmt"
        | "VacuumStmt"
        | "FetchStmt" => Class::Tree,

        "CreateStmt" => fixed(K::Create, "CREATE TABLE"),
        "CreateForeignTableStmt" => fixed(K::Create, "CREATE FOREIGN TABLE"),
        "IndexStmt" => fixed(K::Create, "CREATE INDEX"),
        "ViewStmt" => fixed(K::Create, "CREATE VIEW"),
        "CreateSchemaStmt" => fixed(K::Create, "CREATE SCHEMA"),
        "CreateSeqStmt" => fixed(K::Create, "CREATE SEQUENCE"),
        "CreateRoleStmt" => fixed(K::Create, "CREATE ROLE"),
        "CreatedbStmt" => fixed(K::Create, "CREATE DATABASE"),
        "CreateExtensionStmt" => fixed(K::Create, "CREATE EXTENSION"),
        "CreateTrigStmt" => fixed(K::Create, "CREATE TRIGGER"),
        "CreateEventTrigStmt" => fixed(K::Create, "CREATE EVENT TRIGGER"),
        "RuleStmt" => fixed(K::Create, "CREATE RULE"),
        "CreatePolicyStmt" => fixed(K::Create, "CREATE POLICY"),
        "CreatePublicationStmt" => fixed(K::Create, "CREATE PUBLICATION"),
        "CreateSubscriptionStmt" => fixed(K::Create, "CREATE SUBSCRIPTION"),
        "CreateForeignServerStmt" => fixed(K::Create, "CREATE SERVER"),
        "CreateFdwStmt" => fixed(K::Create, "CREATE FOREIGN DATA WRAPPER"),
        "CreateUserMappingStmt" => fixed(K::Create, "CREATE USER MAPPING"),
        "CreateTableSpaceStmt" => fixed(K::Create, "CREATE TABLESPACE"),
        "CreateDomainStmt" => fixed(K::Create, "CREATE DOMAIN"),
        "CompositeTypeStmt" | "CreateEnumStmt" | "CreateRangeStmt" => {
            fixed(K::Create, "CREATE TYPE")
        }
        "CreateCastStmt" => fixed(K::Create, "CREATE CAST"),
        "CreateConversionStmt" => fixed(K::Create, "CREATE CONVERSION"),
        "CreateOpClassStmt" => fixed(K::Create, "CREATE OPERATOR CLASS"),
        "CreateOpFamilyStmt" => fixed(K::Create, "CREATE OPERATOR FAMILY"),
        "CreatePLangStmt" => fixed(K::Create, "CREATE LANGUAGE"),
        "CreateAmStmt" => fixed(K::Create, "CREATE ACCESS METHOD"),
        "CreateTransformStmt" => fixed(K::Create, "CREATE TRANSFORM"),
        "CreateStatsStmt" => fixed(K::Create, "CREATE STATISTICS"),
        "ImportForeignSchemaStmt" => fixed(K::Create, "IMPORT FOREIGN SCHEMA"),

        "AlterSystemStmt" => fixed(K::Alter, "ALTER SYSTEM"),
        "AlterRoleStmt" | "AlterRoleSetStmt" => fixed(K::Alter, "ALTER ROLE"),
        "AlterDatabaseStmt" | "AlterDatabaseSetStmt" | "AlterDatabaseRefreshCollStmt" => {
            fixed(K::Alter, "ALTER DATABASE")
        }
        "AlterExtensionStmt" | "AlterExtensionContentsStmt" => fixed(K::Alter, "ALTER EXTENSION"),
        "AlterEventTrigStmt" => fixed(K::Alter, "ALTER EVENT TRIGGER"),
        "AlterPolicyStmt" => fixed(K::Alter, "ALTER POLICY"),
        "AlterPublicationStmt" => fixed(K::Alter, "ALTER PUBLICATION"),
        "AlterSubscriptionStmt" => fixed(K::Alter, "ALTER SUBSCRIPTION"),
        "AlterForeignServerStmt" => fixed(K::Alter, "ALTER SERVER"),
        "AlterFdwStmt" => fixed(K::Alter, "ALTER FOREIGN DATA WRAPPER"),
        "AlterUserMappingStmt" => fixed(K::Alter, "ALTER USER MAPPING"),
        "AlterTableSpaceOptionsStmt" => fixed(K::Alter, "ALTER TABLESPACE"),
        "AlterTableMoveAllStmt" => fixed(K::Alter, "ALTER TABLE"),
        "AlterDomainStmt" => fixed(K::Alter, "ALTER DOMAIN"),
        "AlterEnumStmt" | "AlterTypeStmt" => fixed(K::Alter, "ALTER TYPE"),
        "AlterSeqStmt" => fixed(K::Alter, "ALTER SEQUENCE"),
        "AlterDefaultPrivilegesStmt" => fixed(K::Alter, "ALTER DEFAULT PRIVILEGES"),
        "AlterOpFamilyStmt" => fixed(K::Alter, "ALTER OPERATOR FAMILY"),
        "AlterOperatorStmt" => fixed(K::Alter, "ALTER OPERATOR"),
        "AlterStatsStmt" => fixed(K::Alter, "ALTER STATISTICS"),
        "AlterCollationStmt" => fixed(K::Alter, "ALTER COLLATION"),
        "AlterTSDictionaryStmt" => fixed(K::Alter, "ALTER TEXT SEARCH DICTIONARY"),
        "AlterTSConfigurationStmt" => fixed(K::Alter, "ALTER TEXT SEARCH CONFIGURATION"),

        "DropRoleStmt" => fixed(K::Drop, "DROP ROLE"),
        "DropdbStmt" => fixed(K::Drop, "DROP DATABASE"),
        "DropOwnedStmt" => fixed(K::Drop, "DROP OWNED"),
        "DropSubscriptionStmt" => fixed(K::Drop, "DROP SUBSCRIPTION"),
        "DropTableSpaceStmt" => fixed(K::Drop, "DROP TABLESPACE"),
        "DropUserMappingStmt" => fixed(K::Drop, "DROP USER MAPPING"),

        "ConstraintsSetStmt" => fixed(K::Set, "SET CONSTRAINTS"),

        "DiscardStmt" => fixed(K::Other, "DISCARD"),
        "ClusterStmt" => fixed(K::Other, "CLUSTER"),
        "ReindexStmt" => fixed(K::Other, "REINDEX"),
        "CheckPointStmt" => fixed(K::Other, "CHECKPOINT"),
        "LockStmt" => fixed(K::Other, "LOCK TABLE"),
        "NotifyStmt" => fixed(K::Other, "NOTIFY"),
        "ListenStmt" => fixed(K::Other, "LISTEN"),
        "UnlistenStmt" => fixed(K::Other, "UNLISTEN"),
        "LoadStmt" => fixed(K::Other, "LOAD"),
        "DeclareCursorStmt" => fixed(K::Other, "DECLARE CURSOR"),
        "ClosePortalStmt" => fixed(K::Other, "CLOSE CURSOR"),
        "RefreshMatViewStmt" => fixed(K::Other, "REFRESH MATERIALIZED VIEW"),
        "ReassignOwnedStmt" => fixed(K::Other, "REASSIGN OWNED"),
        "CommentStmt" => fixed(K::Other, "COMMENT"),
        "SecLabelStmt" => fixed(K::Other, "SECURITY LABEL"),
        _ => Class::Unknown,
    }
}

/// Kind and label for a statement type missing from [`classify`]'s table
/// (a node type added by a newer parser): `AlterFooBarStmt` gives
/// `alter` and "ALTER FOO BAR".
pub(super) fn fallback(node_type: &str) -> (StatementKind, String) {
    let base = node_type.strip_suffix("Stmt").unwrap_or(node_type);
    let mut label = String::with_capacity(base.len() + 4);
    for (i, c) in base.chars().enumerate() {
        if i > 0 && c.is_ascii_uppercase() {
            label.push(' ');
        }
        label.push(c.to_ascii_uppercase());
    }
    let kind = if base.starts_with("Create") {
        StatementKind::Create
    } else if base.starts_with("Alter") {
        StatementKind::Alter
    } else if base.starts_with("Drop") {
        StatementKind::Drop
    } else {
        StatementKind::Other
    };
    (kind, label)
}

/// The SQL words for an object type (`ObjectType` as an integer from the
/// tree), as used after CREATE / ALTER / DROP.
pub(super) fn object_type_words(object_type: i32) -> &'static str {
    use ObjectType as O;
    let Ok(object_type) = ObjectType::try_from(object_type) else {
        return "OBJECT";
    };
    match object_type {
        O::Undefined => "OBJECT",
        O::ObjectAccessMethod => "ACCESS METHOD",
        O::ObjectAggregate => "AGGREGATE",
        O::ObjectAmop | O::ObjectAmproc => "OPERATOR FAMILY",
        O::ObjectAttribute => "ATTRIBUTE",
        O::ObjectCast => "CAST",
        O::ObjectColumn => "COLUMN",
        O::ObjectCollation => "COLLATION",
        O::ObjectConversion => "CONVERSION",
        O::ObjectDatabase => "DATABASE",
        O::ObjectDefault => "DEFAULT",
        O::ObjectDefacl => "DEFAULT PRIVILEGES",
        O::ObjectDomain => "DOMAIN",
        O::ObjectDomconstraint => "DOMAIN CONSTRAINT",
        O::ObjectEventTrigger => "EVENT TRIGGER",
        O::ObjectExtension => "EXTENSION",
        O::ObjectFdw => "FOREIGN DATA WRAPPER",
        O::ObjectForeignServer => "SERVER",
        O::ObjectForeignTable => "FOREIGN TABLE",
        O::ObjectFunction => "FUNCTION",
        O::ObjectIndex => "INDEX",
        O::ObjectLanguage => "LANGUAGE",
        O::ObjectLargeobject => "LARGE OBJECT",
        O::ObjectMatview => "MATERIALIZED VIEW",
        O::ObjectOpclass => "OPERATOR CLASS",
        O::ObjectOperator => "OPERATOR",
        O::ObjectOpfamily => "OPERATOR FAMILY",
        O::ObjectParameterAcl => "PARAMETER",
        O::ObjectPolicy => "POLICY",
        O::ObjectProcedure => "PROCEDURE",
        O::ObjectPublication | O::ObjectPublicationNamespace | O::ObjectPublicationRel => {
            "PUBLICATION"
        }
        O::ObjectRole => "ROLE",
        O::ObjectRoutine => "ROUTINE",
        O::ObjectRule => "RULE",
        O::ObjectSchema => "SCHEMA",
        O::ObjectSequence => "SEQUENCE",
        O::ObjectSubscription => "SUBSCRIPTION",
        O::ObjectStatisticExt => "STATISTICS",
        O::ObjectTabconstraint => "CONSTRAINT",
        O::ObjectTable => "TABLE",
        O::ObjectTablespace => "TABLESPACE",
        O::ObjectTransform => "TRANSFORM",
        O::ObjectTrigger => "TRIGGER",
        O::ObjectTsconfiguration => "TEXT SEARCH CONFIGURATION",
        O::ObjectTsdictionary => "TEXT SEARCH DICTIONARY",
        O::ObjectTsparser => "TEXT SEARCH PARSER",
        O::ObjectTstemplate => "TEXT SEARCH TEMPLATE",
        O::ObjectType => "TYPE",
        O::ObjectUserMapping => "USER MAPPING",
        O::ObjectView => "VIEW",
    }
}

/// Whether objects of this type are relations whose names a policy matches
/// as tables (tables, views, materialized views, sequences, foreign tables).
pub(super) fn is_relation_type(object_type: i32) -> bool {
    matches!(
        ObjectType::try_from(object_type),
        Ok(ObjectType::ObjectTable
            | ObjectType::ObjectView
            | ObjectType::ObjectMatview
            | ObjectType::ObjectSequence
            | ObjectType::ObjectForeignTable)
    )
}
